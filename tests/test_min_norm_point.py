"""The quadratic relaxation by Wolfe's minimum-norm-point algorithm (the fast path of correlated
k-subsets, and of arborescences at low temperature): against the projection onto the hull of the
enumerated structures, an optimality certificate over every structure, derivatives against
differences, and the Jacobian where the final vertices do not span the optimal face. Here every
arborescence row off a tree goes to Wolfe's algorithm (the others' Newton path:
test_arborescence_newton.py)."""

import math
import warnings

import numpy as np
import pytest
import torch

import convex_sst as cs
import oracles
from convex_sst._min_norm_point import TOL, _Corral, _span_the_face, min_norm_point, project_onto_hull
from convex_sst.fast import projection_by_argmax

@pytest.fixture(autouse=True)
def _wolfe_for_every_arborescence_row(monkeypatch):
    import convex_sst.fast

    monkeypatch.setattr(convex_sst.fast, "_ARBORESCENCE_HULL_SPAN", -math.inf)


CASES = [("arborescence", {"n": 4}), ("arborescence", {"n": 5, "root": 2}), ("correlated_k_subset", {"n": 7, "k": 3})]


def _birkhoff_argmax(n):
    P = cs.load_polytope("birkhoff", n=n)
    return lambda s: P.argmax(s.reshape(-1, n, n)).reshape(s.shape[0], -1)


@pytest.mark.parametrize("name,params", CASES)
@pytest.mark.parametrize("t", [0.1, 1.0, 5.0])
@pytest.mark.parametrize("ties", [False, True])
def test_equals_the_projection_onto_the_hull_of_the_structures(name, params, t, ties, gen):
    P = cs.load_polytope(name, **params)
    V = P.vertices().reshape(-1, P.size).double().numpy()
    B = 12
    if ties:  # small integers: many structures tie, and the optimal face is degenerate
        u = torch.randint(-2, 3, (B,) + P.shape, generator=gen).double()
    else:
        u = torch.randn((B,) + P.shape, generator=gen, dtype=torch.float64)
    x = cs.relax(u, P, "quadratic", t, backend="fast")
    assert bool(P.contains(x).all())
    x = x.reshape(B, -1).numpy()
    theta = (u / t).reshape(B, -1).numpy()
    for i in range(B):
        g = theta[i] - x[i]
        # optimal over every structure: (θ − x)ᵀ(v − x) ≤ 0 for all v, to rounding
        assert (V @ g).max() - g @ x[i] < 1e-12 * (1 + np.abs(g).sum())
        assert np.abs(x[i] - oracles.hull_projection(V, theta[i])).max() < 1e-12


@pytest.mark.parametrize("name,params", [("arborescence", {"n": 7}), ("correlated_k_subset", {"n": 20, "k": 5})])
@pytest.mark.parametrize("t", [0.3, 3.0])
def test_directional_derivatives_match_differences_on_every_row(name, params, t, gen):
    # x is piecewise affine in u: central differences are exact up to rounding away from the
    # (measure-zero) places where the optimal face changes, so every row must agree
    P = cs.load_polytope(name, **params)
    B = 24
    u = torch.randn((B,) + P.shape, generator=gen, dtype=torch.float64, requires_grad=True)
    v = torch.randn(u.shape, generator=gen, dtype=torch.float64)
    x = cs.relax(u, P, "quadratic", t, backend="fast")
    (jv,) = torch.autograd.grad((x * v).sum(), u)  # the Jacobian is symmetric: Jᵀv = Jv
    h = 1e-6
    with torch.no_grad():
        fd = (cs.relax(u + h * v, P, "quadratic", t) - cs.relax(u - h * v, P, "quadratic", t)) / (2 * h)
    assert (jv - fd).abs().max() < 1e-6


def test_torch_solver_agrees(gen):
    P = cs.load_polytope("arborescence", n=6)
    u = torch.randn((8,) + P.shape, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(u.shape, generator=gen, dtype=torch.float64)
    out = {}
    for backend in ("fast", "torch"):
        x = cs.relax(u, P, "quadratic", 0.5, backend=backend)
        out[backend] = (x.detach(), torch.autograd.grad((x * w).sum(), u)[0])
    assert (out["fast"][0] - out["torch"][0]).abs().max() < 1e-6
    assert (out["fast"][1] - out["torch"][1]).abs().max() < 1e-5


def test_the_jacobian_spans_the_optimal_face_when_the_vertices_do_not():
    # equal utilities on Birkhoff n = 3: Wolfe's corral is {I, C, C²} (C a 3-cycle), whose
    # average is already the optimum J/3, but they span 2 of the polytope's 4 dimensions. x is
    # in the interior, so the Jacobian is the projector onto the whole tangent space
    # {row and column sums 0}: (I − J/3) ⊗ (I − J/3)
    n = 3
    argmax = _birkhoff_argmax(n)
    theta = torch.zeros(1, n * n, dtype=torch.float64)
    x, corrals, _, failed = min_norm_point(theta.numpy(), lambda s: argmax(torch.from_numpy(s)).numpy())
    assert not failed.any() and np.allclose(x, 1 / 3)
    D = corrals[0].S[1:] - corrals[0].S[0]
    assert np.linalg.matrix_rank(D) == (n - 1) ** 2
    theta.requires_grad_(True)
    x = project_onto_hull(theta, argmax, TOL, 100, lambda *a: None)
    J = torch.stack([torch.autograd.grad(x[0, j], theta, retain_graph=True)[0][0] for j in range(n * n)])
    c = torch.eye(n, dtype=torch.float64) - 1 / n
    assert (J - torch.kron(c, c)).abs().max() < 1e-12


def test_the_face_completion_tilts_both_ways():
    # the simplex at θ = 0: x = (1/3, 1/3, 1/3), every vertex optimal. A corral {e_0, e_1} ends
    # short of the face; the completion tilts the scores by ±ε r with r ⟂ e_1 − e_0, and only one
    # sign can reach e_2 (r_2 > r_0: +, else −). Each row draws its own r, so with 16 rows both
    # signs are needed; every corral must end spanning the whole simplex
    B, d = 16, 3
    theta, x = np.zeros((B, d)), np.full((B, d), 1 / 3)
    eye = np.eye(d)
    corrals = []
    for i in range(B):
        c = _Corral(eye[0], theta[i])
        assert c.add(eye[1], theta[i])
        corrals.append(c)
    _span_the_face(theta, x, corrals, lambda s: eye[s.argmax(1)])
    for c in corrals:
        assert c.k == 3 and np.linalg.matrix_rank(c.S[1:] - c.S[0]) == 2


def test_large_corrals_on_birkhoff_match_differences(gen):
    # high temperature on Birkhoff n = 12 (t = 12): corrals of over 100 vertices in faces of high
    # dimension, where they often end short of their face (without the completion, 2 rows of
    # these 24 were off by up to 0.4; at n = 14 and t = 20, 14 of 24)
    n = 12
    argmax = _birkhoff_argmax(n)
    theta = torch.randn(24, n * n, generator=gen, dtype=torch.float64) / 12.0
    v = torch.randn(theta.shape, generator=gen, dtype=torch.float64)
    th = theta.clone().requires_grad_(True)
    x = project_onto_hull(th, argmax, TOL, 1000, lambda *a: None)
    (jv,) = torch.autograd.grad((x * v).sum(), th)
    h = 1e-6
    with torch.no_grad():
        fd = (project_onto_hull(theta + h * v, argmax, TOL, 1000, lambda *a: None)
              - project_onto_hull(theta - h * v, argmax, TOL, 1000, lambda *a: None)) / (2 * h)
    assert (jv - fd).abs().max() < 1e-6


def test_unconverged_rows_are_reported(gen):
    # (correlated k-subsets: their fast path is this algorithm itself, whose options relax passes;
    # arborescence rows at low temperature come here from Newton's path, with its own report)
    P = cs.load_polytope("correlated_k_subset", n=7, k=3)
    u = torch.randn((4,) + P.shape, generator=gen, dtype=torch.float64)
    with pytest.warns(cs.SolverWarning, match="minimum-norm-point.*batch element"):
        cs.relax(u, P, "quadratic", 2.0, max_iter=1)
    with pytest.raises(cs.SolverError, match="minimum-norm-point"):
        cs.relax(u, P, "quadratic", 2.0, max_iter=1, on_failure="raise")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cs.relax(u, P, "quadratic", 2.0)


def test_fast_path_is_registered_for_the_flow_formulations():
    for name in ("arborescence", "correlated_k_subset"):
        assert ("quadratic" in [r for p, r in cs.available_fast_paths() if p == name])
    P = cs.load_polytope("arborescence", n=4)
    x = projection_by_argmax(torch.zeros((0,) + P.shape, dtype=torch.float64), P)
    assert x.shape == (0,) + P.shape


def test_the_corrals_factor_after_drops_equals_a_fresh_factorization():
    # vertices leave the corral by rank-one updates of its Cholesky factor (s_0 by a fresh one)
    from convex_sst._min_norm_point import _Corral

    rng = np.random.default_rng(0)
    checked = 0
    for trial in range(200):
        d = int(rng.integers(5, 40))
        theta = rng.standard_normal(d)
        c = _Corral((rng.random(d) < 0.5).astype(float), theta)
        for _ in range(int(rng.integers(2, 25))):
            c.add((rng.random(d) < 0.5).astype(float), theta)  # refused where affinely dependent
        c.lam = rng.random(c.k) + 0.1
        keep = rng.random(c.k) < 0.7
        keep[int(rng.integers(c.k))] = True
        keep[0] |= trial % 3 == 0  # s_0 kept in every third trial, at random in the others
        c.keep(keep)
        if c.k > 1:
            fresh = np.linalg.cholesky(c.directions())
            assert c.factored and np.abs(np.tril(c._L) - fresh).max() < 1e-12 * max(1.0, np.abs(fresh).max())
            checked += 1
    assert checked > 150


# the Newton paths whose quadratic sends rows at low temperature here: (polytope, the constant)
LOW_TEMPERATURE = [
    (("dag_path", {"n": 12, "edges": [[i, j] for i in range(12) for j in range(i + 1, 12)], "source": 0, "target": 11}),
     "_DAG_HULL_SPAN"),
    (("birkhoff", {"n": 6}), "_ASSIGNMENT_HULL_SPAN"),
    (("matching", {"n": 4, "m": 6}), "_ASSIGNMENT_HULL_SPAN"),
]


def _rows_of_every_kind(case, gen):
    """24 rows at t = 1e-3 to 1: close utilities (0.1 N(0, 1)) and one entry at -10, so that the
    rows at t = 0.05 span far more than 100 without sitting at a vertex; those at t ≤ 0.01 mostly
    do, those at t ≥ 0.5 span less than 50; some with forbidden entries."""
    P = cs.load_polytope(case[0], **case[1])
    t = torch.tensor([1e-3, 0.01, 0.05, 0.05, 0.5, 1.0], dtype=torch.float64).repeat(4)
    u = 0.1 * torch.randn((24,) + P.shape, generator=gen, dtype=torch.float64)
    u.reshape(24, -1)[:, 1] = -10.0
    u.reshape(24, -1)[::5, [3, 17, 20]] = -torch.inf
    return P, u, t


@pytest.mark.parametrize("case,constant", LOW_TEMPERATURE, ids=["dag_path", "birkhoff", "matching"])
def test_low_temperature_rows_by_wolfe_equal_newton(case, constant, gen, monkeypatch):
    """The quadratic's rows not at a vertex whose logits span more than the path's constant go
    to Wolfe's algorithm (fast._newton_or_hull): exactly those rows, and x and vector-Jacobian
    products equal to Newton's on every row (the dispatch off); gradcheck on a row of each kind."""
    P, u, t = _rows_of_every_kind(case, gen)
    w = torch.randn(u.shape, generator=gen, dtype=torch.float64)
    hulls = []
    project = cs.fast.project_onto_hull
    monkeypatch.setattr(cs.fast, "project_onto_hull", lambda theta, *a: hulls.append(len(theta)) or project(theta, *a))

    def run(x_u):
        x = cs.relax(x_u, P, "quadratic", t, on_failure="raise")
        return x, torch.autograd.grad((x * w).sum(), x_u)[0]

    x, g = run(u.clone().requires_grad_())
    span = getattr(cs.fast, constant)
    monkeypatch.setattr(cs.fast, constant, math.inf)
    x1, g1 = run(u.clone().requires_grad_())
    assert len(hulls) == 1 and 3 <= hulls[0] < 24  # some rows by Wolfe's algorithm, not all
    assert (x - x1).abs().max() < 1e-9 and (g - g1).abs().max() < 1e-8
    assert (x.reshape(24, -1)[::5, [3, 17, 20]] == 0).all()
    th = (u / t.reshape((-1,) + (1,) * len(P.shape))).reshape(24, -1).nan_to_num(neginf=math.nan)
    wide = th.nan_to_num(-math.inf).amax(1) - th.nan_to_num(math.inf).amin(1) > span
    at_vertex = ((x1 == 0) | (x1 == 1)).reshape(24, -1).all(1)
    assert hulls[0] == int((wide & ~at_vertex).sum())  # exactly the rows not at a vertex
    monkeypatch.setattr(cs.fast, constant, span)
    for row in [int((wide & ~at_vertex).nonzero()[0, 0]), 4]:  # Wolfe's algorithm; Newton (t = 0.5)
        assert torch.autograd.gradcheck(lambda v: cs.relax(v, P, "quadratic", t[row]), u[row:row + 1].clone().requires_grad_())


@pytest.mark.parametrize("case,constant", LOW_TEMPERATURE[:2], ids=["dag_path", "birkhoff"])
def test_low_temperature_rows_unconverged(case, constant, gen, monkeypatch):
    """Rows Wolfe's algorithm reports go to the torch solver by default, with Newton's, else are
    named in the warning or the error (not as Newton's)."""
    from convex_sst import solver

    P, u, t = _rows_of_every_kind(case, gen)
    project = cs.fast.project_onto_hull

    def failing(theta, argmax, tol, cycles, report):
        x = project(theta, argmax, tol, cycles, report)
        report(torch.ones(len(theta), dtype=torch.bool), len(theta), "gap open (forced)")
        return x

    monkeypatch.setattr(cs.fast, "project_onto_hull", failing)
    with pytest.raises(cs.SolverError, match="minimum-norm-point.*gap open"):
        cs.relax(u, P, "quadratic", t, on_failure="raise")
    with pytest.warns(cs.SolverWarning, match="minimum-norm-point"):
        x = cs.relax(u, P, "quadratic", t, on_failure="warn")
    calls = []
    torch_solver = solver.relax_torch
    monkeypatch.setattr(solver, "relax_torch", lambda theta, *a, **k: calls.append(len(theta)) or torch_solver(theta, *a, **k))
    with warnings.catch_warnings():
        warnings.simplefilter("error", cs.SolverWarning)
        fallback = cs.relax(u, P, "quadratic", t)
    assert calls and (fallback - x).abs().max() < 1e-5  # the torch solver's answer
    monkeypatch.setattr(cs.fast, "project_onto_hull", project)  # Newton's rows, beside Wolfe's
    with pytest.raises(cs.SolverError, match="Newton"):
        cs.relax(u, P, "quadratic", t, max_iter=1, on_failure="raise")
