"""The quadratic, the binary entropy and the entropy on DAG paths by Newton's method on the vertex
potentials (their fast path): against OSQP with its active-set polish and a certified dual
solve, on graphs with arcs on no source–target path, the face Jacobian, central differences,
reduced costs, low temperatures and larger graphs, masks, and the failure modes."""

import dataclasses
import warnings

import numpy as np
import pytest
import torch

import convex_sst as cs
from conftest import check_unconverged_rows
import oracles
from convex_sst._assignment_projection import SEPARABLE
from convex_sst._flow_newton import _cut_off_blocks, _dual, _laplacian, _residual, flow_plan, reduced_costs

# a DAG with arcs on no 0 → 5 path: 6 → 1 (6 unreachable from 0), 4 → 7 (7 cannot reach 5),
# 5 → 7 (out of the target); and the complete DAG on 7 vertices
ODD = {"n": 8, "edges": [[0, 1], [0, 2], [1, 2], [1, 3], [2, 3], [2, 4], [3, 5], [4, 5], [1, 4], [6, 1], [4, 7],
                         [5, 7]], "source": 0, "target": 5}
FULL = {"n": 7, "edges": [[i, j] for i in range(7) for j in range(i + 1, 7)], "source": 0, "target": 6}
REGS = ["quadratic", "binary_entropy", "entropy"]


def dead_arcs_at_zero(P, params):
    """P's form with the arcs on no path (ODD's 9, 10, 11) bounded by 0: the same polytope, where
    the dual solve of the smooth f need not send their multipliers to infinity."""
    if params is not ODD:
        return P.form
    ub = P.form.ub.copy()
    ub[[9, 10, 11]] = 0.0
    return dataclasses.replace(P.form, ub=ub)


@pytest.mark.parametrize("reg", REGS)
@pytest.mark.parametrize("params", [ODD, FULL], ids=["odd", "full"])
@pytest.mark.parametrize("t", [0.05, 0.5, 3.0])
@pytest.mark.parametrize("ties", [False, True])
def test_equals_an_independent_solve(params, t, ties, reg, gen):
    P = cs.load_polytope("dag_path", **params)
    B = 6
    if ties:
        u = torch.randint(-2, 3, (B, P.size), generator=gen).double()
    else:
        u = torch.randn(B, P.size, generator=gen, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", cs.SolverWarning)
        x = cs.relax(u, P, reg, t, backend="fast")
    checked = 0
    for i in range(B):
        theta = (u[i] / t).numpy()
        if reg == "quadratic":
            ref, certificate, tol = oracles.quadratic_on_form(theta, P.form), 0.0, 1e-9
        else:
            ref, certificate = oracles.dual_solve(theta, dead_arcs_at_zero(P, params), reg)
            tol = 1e-10
        if certificate > 1e-11:  # the oracle's own failure: skip the row
            continue
        checked += 1
        assert np.abs(x[i].numpy() - ref).max() < tol
    assert checked >= B // 2
    if params is ODD:  # arcs on no path: exactly 0
        assert (x[:, [9, 10, 11]] == 0).all()


@pytest.mark.parametrize("reg", REGS)
@pytest.mark.parametrize("t", [0.3, 2.0])
def test_gradient_is_the_face_jacobian_and_matches_differences(t, reg, gen):
    P = cs.load_polytope("dag_path", **ODD)
    B = 8
    u = torch.randn(B, P.size, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(u.shape, generator=gen, dtype=torch.float64)
    x = cs.relax(u, P, reg, t, backend="fast")
    (g,) = torch.autograd.grad((x * w).sum(), u)
    for i in range(B):
        z = x[i].detach().numpy()
        hinv = {"quadratic": None, "binary_entropy": z * (1 - z), "entropy": z}[reg]
        ref = oracles.face_vjp(z, w[i].numpy(), P.form, hinv) / t
        assert np.abs(g[i].numpy() - ref).max() < 1e-9
    h = 1e-6
    with torch.no_grad():
        fd = (cs.relax(u + h * w, P, reg, t) - cs.relax(u - h * w, P, reg, t)) / (2 * h)
    assert (g - fd).abs().max() < 1e-7  # the Jacobian is symmetric: Jᵀw = Jw


@pytest.mark.parametrize("reg", REGS)
def test_the_dual_function_has_the_conservation_residuals_as_gradient(reg, gen):
    # D(p) = Σ f*(θ_e − p_tail + p_head) + bᵀp, whose line search Newton's method runs on, has the
    # gradient b − A x (A: each vertex's incidence row but t's), and the Newton system's matrix is
    # A diag(W) Aᵀ, by scattering each arc's weight
    P = cs.load_polytope("dag_path", **ODD)
    plan = flow_plan(8, P.data["A"], 0, 5, torch.device("cpu"))
    B, k = 4, plan.A.shape[0]
    theta = torch.randn(B, len(plan.arcs), generator=gen, dtype=torch.float64)
    p = torch.randn(B, k, generator=gen, dtype=torch.float64).requires_grad_(True)
    D, x, V, scale = _dual(theta, p, plan, SEPARABLE[reg])
    (g,) = torch.autograd.grad(D.sum(), p)
    torch.testing.assert_close(g, plan.b - x @ plan.A.T, rtol=0, atol=1e-12)
    torch.testing.assert_close(_residual(x, plan), (x @ plan.A.T - plan.b).abs().amax(1), rtol=0, atol=0)
    assert (scale >= D.abs()).all() and (g.abs().amax(1) > 1e-3).all()
    W = torch.rand(B, len(plan.arcs), generator=gen, dtype=torch.float64)
    torch.testing.assert_close(_laplacian(W, plan), (plan.A * W[:, None, :]) @ plan.A.T, rtol=0, atol=1e-14)


def test_reduced_costs_are_nonpositive_and_zero_on_a_longest_path(gen):
    P = cs.load_polytope("dag_path", **ODD)
    plan = flow_plan(8, P.data["A"], 0, 5, torch.device("cpu"))
    theta = 1e3 * torch.randn(32, P.size, generator=gen, dtype=torch.float64)
    for th in (theta, theta.round()):  # and with ties
        reduced = reduced_costs(th[:, plan.arcs], plan)
        assert (reduced <= 0).all()
        best = P.argmax(th)[:, plan.arcs]
        assert (reduced[best > 0] == 0).all()  # exactly: the longest path's sums are rounded as in d
        # a potential difference: the same on every path up to the constant d(t), here the best score
        paths = P.argmax(torch.randn(32, P.size, generator=gen, dtype=torch.float64))[:, plan.arcs]
        score = (th[:, plan.arcs] * best).sum(1)
        assert torch.allclose((reduced * paths).sum(1), (th[:, plan.arcs] * paths).sum(1) - score, rtol=0, atol=1e-9)


@pytest.mark.parametrize("reg", REGS)
def test_relaxation_is_invariant_to_vertex_potentials(reg, gen):
    # ⟨x, θ + Aᵀφ⟩ = ⟨x, θ⟩ + φ_s − φ_t on P: the same relaxation (the smooth regularizers solve
    # the reduced costs, the quadratic θ as given, so this also compares two starting points)
    P = cs.load_polytope("dag_path", **FULL)
    A = torch.as_tensor(P.data["A"])
    u = torch.randn(16, P.size, generator=gen, dtype=torch.float64)
    phi = 3.0 * torch.randn(16, 7, generator=gen, dtype=torch.float64)
    for t in (0.05, 1.0):
        x = cs.relax(u, P, reg, t)
        y = cs.relax(u + t * (phi[:, A[:, 0]] - phi[:, A[:, 1]]), P, reg, t)
        assert (x - y).abs().max() < 1e-10


def test_cut_off_blocks_are_the_components_without_the_target(gen):
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import connected_components

    P = cs.load_polytope("dag_path", **FULL)
    plan = flow_plan(7, P.data["A"], 0, 6, torch.device("cpu"))
    W = (torch.rand(20, len(plan.arcs), generator=gen) < 0.25).double()
    E = _cut_off_blocks(W, plan)
    for i in range(20):
        adj = np.zeros((7, 7), dtype=bool)
        on = W[i].numpy() > 0
        adj[plan.tail.numpy()[on], plan.head.numpy()[on]] = True
        _, label = connected_components(csr_matrix(adj | adj.T), directed=False)
        free = label[:6] != label[6]
        ref = free[:, None] & free[None, :] & (label[:6, None] == label[None, :6])
        assert (E[i].numpy() == ref).all()


@pytest.mark.parametrize("reg", REGS)
@pytest.mark.parametrize("t", [1e-3, 1e-6])
def test_low_temperatures(t, reg, gen):
    P = cs.load_polytope("dag_path", n=12, edges=[[i, j] for i in range(12) for j in range(i + 1, 12)],
                         source=0, target=11)
    u = torch.randn(16, P.size, generator=gen, dtype=torch.float64, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", cs.SolverWarning)
        x = cs.relax(u, P, reg, t)
    (g,) = torch.autograd.grad((x * torch.randn(x.shape, generator=gen, dtype=torch.float64)).sum(), u)
    assert torch.isfinite(g).all()
    assert bool(P.contains(x.detach(), atol=1e-9).all())
    # optimal for the quadratic: no path improves (θ − x)ᵀ(v − x), by the longest-path DP
    if reg == "quadratic":
        d = u.detach() / t - x.detach()
        best = P.argmax(d)
        assert ((d * best).sum(1) - (d * x.detach()).sum(1) <= 1e-12 * d.abs().sum(1)).all()


@pytest.mark.parametrize("reg", REGS + ["quadratic by Newton"])
def test_a_larger_dag_at_low_temperature_converges(reg, gen, monkeypatch):
    # the complete DAG on 60 vertices at t = 0.01: the quadratic's continuation left rows
    # unconverged (they went to the torch solver), then it started from the reduced costs there
    # (still checked: "quadratic by Newton"), and now Wolfe's algorithm takes these rows;
    # the binary entropy ran past max_iter = 100 with the regularization 0.1 × residual
    if reg == "quadratic by Newton":
        monkeypatch.setattr(cs.fast, "_DAG_HULL_SPAN", float("inf"))
        reg = "quadratic"
    P = cs.load_polytope("dag_path", n=60, edges=[[i, j] for i in range(60) for j in range(i + 1, 60)],
                         source=0, target=59)
    u = torch.randn(16, P.size, generator=gen, dtype=torch.float64)
    t = 0.01
    x = cs.relax(u, P, reg, t, on_failure="raise")
    assert bool(P.contains(x, atol=1e-9).all())
    if reg == "quadratic":
        d = u / t - x  # optimal: no path improves (θ − x)ᵀ(v − x), to rounding (|θ| ~ 300 over 1 770 arcs)
        best = P.argmax(d)
        assert ((d * best).sum(1) - (d * x).sum(1) <= 1e-10 * d.abs().sum(1)).all()


@pytest.mark.parametrize("reg", ["binary_entropy", "entropy"])
def test_smooth_solutions_are_exact_to_rounding_at_low_temperature(reg, gen):
    # the last Newton steps go on past the floor 100 eps |θ| where they can: stopped there, x was
    # off by up to 7e-11 at t = 0.01 (2.8e-11 with the entropy)
    P = cs.load_polytope("dag_path", n=10, edges=[[i, j] for i in range(10) for j in range(i + 1, 10)],
                         source=0, target=9)
    t = 0.01
    u = torch.randn(12, P.size, generator=gen, dtype=torch.float64)
    x = cs.relax(u, P, reg, t)
    checked = 0
    for i in range(12):
        ref, certificate = oracles.dual_solve((u[i] / t).numpy(), P.form, reg)
        if certificate > 1e-13:
            continue
        checked += 1
        assert np.abs(x[i].numpy() - ref).max() < 1e-11
    assert checked >= 6


@pytest.mark.parametrize("reg", REGS)
def test_manual_masks(reg):
    g = torch.Generator().manual_seed(5)
    P = cs.load_polytope("dag_path", **FULL)
    for t in (1.0, 0.05):
        u = 2 * torch.randn(8, P.size, generator=g, dtype=torch.float64)
        mask = torch.rand(8, P.size, generator=g) < 0.6
        x = cs.relax(u.masked_fill(mask, -1e9), P, reg, t)
        for b in range(8):
            low = mask[b].numpy()
            ref, certificate = oracles.masked_face_solve(np.where(low, -1e9 / t, (u[b] / t).numpy()), P.form, low, reg)
            if certificate > 1e-11:
                continue
            assert np.abs(x[b].numpy() - ref).max() < 1e-9, (t, b)


def test_unconverged_rows_fall_back_warn_or_raise(gen):
    P = cs.load_polytope("dag_path", **FULL)
    u = torch.randn(4, P.size, generator=gen, dtype=torch.float64)
    check_unconverged_rows(P, u, "binary_entropy", 0.5, "flow potentials", "flow conservation")
