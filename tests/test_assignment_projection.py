"""The quadratic and the binary entropy on Birkhoff polytopes and matchings by Newton's method on
the dual (their fast path): against OSQP with its active-set polish and a certified dual solve,
the projection onto the hull of the enumerated permutations, the face Jacobian of the active
constraints, central differences, low and extreme temperatures, and the failure modes."""

import warnings

import numpy as np
import pytest
import torch

import convex_sst as cs
from conftest import check_newton_against_wolfe, check_unconverged_rows
import oracles
from convex_sst._assignment_projection import SEPARABLE, _dual, _null_blocks, project_assignments

CASES = [("birkhoff", {"n": 3}), ("birkhoff", {"n": 5}), ("matching", {"n": 3, "m": 5}), ("matching", {"n": 4, "m": 6})]


def _theta(P, B, gen, ties):
    if ties:  # small integers: tied utilities, degenerate optimal faces
        return torch.randint(-2, 3, (B,) + P.shape, generator=gen).double()
    return torch.randn((B,) + P.shape, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize("reg", ["quadratic", "binary_entropy"])
@pytest.mark.parametrize("name,params", CASES)
@pytest.mark.parametrize("t", [0.05, 0.5, 3.0])
@pytest.mark.parametrize("ties", [False, True])
def test_equals_an_independent_solve(name, params, t, ties, reg, gen):
    # the quadratic: OSQP with its active-set polish (exact on degenerate faces); the binary
    # entropy: the dual solved to rounding, certified per row
    P = cs.load_polytope(name, **params)
    B = 6
    u = _theta(P, B, gen, ties)
    with warnings.catch_warnings():
        warnings.simplefilter("error", cs.SolverWarning)
        x = cs.relax(u, P, reg, t, backend="fast").reshape(B, -1)
    checked = 0
    for i in range(B):
        theta = (u[i] / t).reshape(-1).numpy()
        if reg == "quadratic":
            ref, certificate, tol = oracles.quadratic_on_form(theta, P.form), 0.0, 1e-9
        else:
            ref, certificate = oracles.dual_solve(theta, P.form, reg)
            tol = 1e-10
        if certificate > 1e-11:  # the oracle's own failure (L-BFGS-B at low temperature): skip the row
            continue
        checked += 1
        assert np.abs(x[i].numpy() - ref).max() < tol
    assert checked >= B // 2


def test_row_extremes_leave_out_no_entry_of_a_sample_with_no_other():
    """The continuation's span and tolerance come from these extremes: a sample whose entries
    were all left out had extremes (-inf, inf), an infinite tolerance, and its Newton path
    stopped at the start (what test_newton_paths_with_logits_far_below_zero saw)."""
    from convex_sst._assignment_projection import row_extremes, spread_and_scale
    th = torch.tensor([[[1.0, -2.0], [3.0, 0.5]], [[-5.0, 0.0], [7.0, 2.0]]], dtype=torch.float64)
    low = torch.tensor([[[True, True], [True, True]], [[True, False], [False, True]]])
    top, bottom = row_extremes(th, low)
    assert top.tolist() == [3.0, 7.0] and bottom.tolist() == [-2.0, 0.0]
    assert spread_and_scale(th, low) == (7.0, 7.0)


@pytest.mark.parametrize("reg", ["quadratic", "binary_entropy", "entropy"])
@pytest.mark.parametrize("name,params", CASES[::2])
def test_a_common_offset_leaves_the_relaxation_and_its_digits(name, params, reg, gen):
    """Σx is n on P, so ``u + c`` gives the same X and gradient. The paths' tolerances are
    relative to |θ|: at c = 1e7 X was off by 6e-7 (Birkhoff n = 5, the quadratic; Sinkhorn, the
    entropy, by 4e-8); now θ is centred first (as for the torch solver) and X keeps the
    rounding of u + c itself (ulp(1e7) = 2e-9)."""
    P = cs.load_polytope(name, **params)
    u = torch.randn((8,) + P.shape, generator=gen, dtype=torch.float64)
    v = torch.randn_like(u)
    def run(w):
        w = w.clone().requires_grad_(True)
        x = cs.relax(w, P, reg, 1.0, backend="fast", on_failure="raise")
        return x.detach(), torch.autograd.grad((x * v).sum(), w)[0]
    x0, g0 = run(u)
    for c in (1e3, 1e7, -1e3, -1e7):
        x, g = run(u + c)
        tol = 1e-15 * abs(c) + 1e-12
        assert (x - x0).abs().max() < tol and (g - g0).abs().max() < 10 * tol, c


@pytest.mark.parametrize("t", [0.2, 1.0])
def test_equals_the_projection_onto_the_hull_of_the_permutations(t, gen):
    P = cs.load_polytope("birkhoff", n=4)
    V = P.vertices().reshape(-1, 16).numpy()
    u = torch.randn(6, 4, 4, generator=gen, dtype=torch.float64)
    x = cs.relax(u, P, "quadratic", t, backend="fast").reshape(6, -1).numpy()
    for i in range(6):
        theta = (u[i] / t).reshape(-1).numpy()
        assert np.abs(x[i] - oracles.hull_projection(V, theta)).max() < 1e-12
        g = theta - x[i]
        assert (V @ g).max() - g @ x[i] < 1e-12 * (1 + np.abs(g).sum())  # optimal over every permutation


@pytest.mark.parametrize("reg", ["quadratic", "binary_entropy"])
@pytest.mark.parametrize("name,params", CASES)
@pytest.mark.parametrize("t", [0.3, 2.0])
def test_gradient_is_the_face_jacobian(name, params, t, reg, gen):
    P = cs.load_polytope(name, **params)
    B = 6
    u = torch.randn((B,) + P.shape, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(u.shape, generator=gen, dtype=torch.float64)
    x = cs.relax(u, P, reg, t, backend="fast")
    (g,) = torch.autograd.grad((x * w).sum(), u)
    for i in range(B):
        z = x[i].detach().reshape(-1).numpy()
        hinv = None if reg == "quadratic" else z * (1 - z)  # 1 / f''(z)
        ref = oracles.face_vjp(z, w[i].reshape(-1).numpy(), P.form, hinv) / t
        assert np.abs(g[i].reshape(-1).numpy() - ref).max() < 1e-9


@pytest.mark.parametrize("reg", ["quadratic", "binary_entropy"])
@pytest.mark.parametrize("name,params", [("birkhoff", {"n": 12}), ("matching", {"n": 8, "m": 13})])
@pytest.mark.parametrize("t", [0.3, 3.0])
def test_directional_derivatives_match_differences_on_every_row(name, params, t, reg, gen):
    # with the quadratic x is piecewise affine in u: central differences are exact up to rounding
    # away from the (measure-zero) places where the support changes; with the binary entropy x is
    # smooth (error O(h²)): every row must agree
    P = cs.load_polytope(name, **params)
    B = 16
    u = torch.randn((B,) + P.shape, generator=gen, dtype=torch.float64, requires_grad=True)
    v = torch.randn(u.shape, generator=gen, dtype=torch.float64)
    x = cs.relax(u, P, reg, t, backend="fast")
    (jv,) = torch.autograd.grad((x * v).sum(), u)  # the Jacobian is symmetric: Jᵀv = Jv
    h = 1e-6
    with torch.no_grad():
        fd = (cs.relax(u + h * v, P, reg, t) - cs.relax(u - h * v, P, reg, t)) / (2 * h)
    assert (jv - fd).abs().amax((1, 2)).max() < 1e-7


def test_jacobian_is_an_orthogonal_projector(gen):
    P = cs.load_polytope("matching", n=4, m=6)
    u = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    t = 0.7  # dx/du = Π / t
    J = t * torch.autograd.functional.jacobian(lambda z: cs.relax(z, P, "quadratic", t).reshape(-1), u).reshape(24, 24)
    assert (J - J.T).abs().max() < 1e-12
    assert (J @ J - J).abs().max() < 1e-12
    assert 0 < torch.linalg.matrix_rank(J) < 24


@pytest.mark.parametrize("reg", sorted(SEPARABLE))
def test_the_dual_function_has_the_constraint_residuals_as_gradient(reg, gen):
    # D(a, b) = Σ f*(θ − a_i − b_j) + Σ a + Σ b, whose line search Newton's method runs on, has the
    # gradient 1 − (row sums of X) in a and 1 − (column sums of X) in b: the residuals of P
    theta = torch.randn(3, 4, 4, generator=gen, dtype=torch.float64)
    a = torch.randn(3, 4, generator=gen, dtype=torch.float64).requires_grad_(True)
    b = torch.randn(3, 4, generator=gen, dtype=torch.float64).requires_grad_(True)
    D, X, V, scale = _dual(theta, a, b, SEPARABLE[reg])
    ga, gb = torch.autograd.grad(D.sum(), (a, b))
    torch.testing.assert_close(ga, 1.0 - X.sum(2), rtol=0, atol=1e-12)
    torch.testing.assert_close(gb, 1.0 - X.sum(1), rtol=0, atol=1e-12)
    torch.testing.assert_close(V, theta - a[:, :, None] - b[:, None, :], rtol=0, atol=0)
    assert (scale >= D.abs()).all()


def test_null_blocks_are_the_connected_components_without_free_columns(gen):
    # label propagation against scipy's connected components on random supports
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import connected_components

    n, m = 6, 9
    S = torch.rand(20, n, m, generator=gen) < 0.2
    T = torch.rand(20, m, generator=gen) < 0.7
    E = _null_blocks(S, T)
    for i in range(20):
        ST = (S[i] & T[i][None, :]).numpy()
        adj = np.zeros((n + m, n + m), dtype=bool)
        adj[:n, n:] = ST
        _, label = connected_components(csr_matrix(adj | adj.T), directed=False)
        slack = (S[i] & ~T[i][None, :]).any(1).numpy()
        bad_labels = set(label[:n][slack])
        sing = T[i].numpy() & np.array([label[n + j] not in bad_labels for j in range(m)])
        ref = sing[:, None] & sing[None, :] & (label[n:, None] == label[None, n:])
        assert (E[i].numpy() == ref).all()


@pytest.mark.parametrize("t", [1e-3, 1e-6])
def test_low_temperatures_converge_to_the_hard_assignment(t, gen):
    # most rows project onto a permutation (found by two argmax calls); the others are solved with
    # the duals warm-started along λθ, λ = 50 / span, 16λ, ... (without it, n = 100 at t = 1e-3 took
    # 127 Newton steps, at 1e-4 more than 200)
    P = cs.load_polytope("birkhoff", n=30)
    u = torch.randn(16, 30, 30, generator=gen, dtype=torch.float64, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", cs.SolverWarning)
        x = cs.relax(u, P, "quadratic", t)
    (g,) = torch.autograd.grad((x * torch.randn(x.shape, generator=gen, dtype=torch.float64)).sum(), u)
    assert torch.isfinite(g).all()
    x = x.detach()
    hard = P.argmax(u.detach())
    assert int(((x - hard).abs().amax((1, 2)) == 0).sum()) >= 8
    assert bool(P.contains(x, atol=1e-10).all())
    # optimal: no permutation v improves (θ − x)ᵀ(v − x), by the Hungarian algorithm on θ − x
    g = u.detach() / t - x
    best = P.argmax(g)
    assert ((g * best).sum((1, 2)) - (g * x).sum((1, 2)) <= 1e-12 * g.abs().sum((1, 2))).all()
    # the Newton iterations themselves, without the vertex shortcut
    X, _, _, err, bad, steps = project_assignments((u.detach() / t), False, 1e-12, 100)
    assert not bool(bad.any()) and steps <= 80
    # to its resolution, eps |θ| per entry (exact on the rows the shortcut finds on a vertex)
    assert (X - x).abs().max() < max(1e-9, 1e3 * torch.finfo(X.dtype).eps * float(u.detach().abs().max()) / t)


def test_rows_on_a_vertex_have_zero_jacobian_and_others_do_not(gen):
    P = cs.load_polytope("birkhoff", n=4)
    u = torch.randn(2, 4, 4, generator=gen, dtype=torch.float64)
    u[0] = 10 * torch.eye(4, dtype=torch.float64)       # far inside the identity's normal cone
    u.requires_grad_()
    x = cs.relax(u, P, "quadratic", 1.0)
    assert torch.equal(x[0].detach(), torch.eye(4, dtype=torch.float64))
    (g,) = torch.autograd.grad((x * torch.randn(x.shape, generator=gen, dtype=torch.float64)).sum(), u)
    assert torch.equal(g[0], torch.zeros(4, 4, dtype=torch.float64)) and g[1].abs().max() > 0


def test_unconverged_rows_fall_back_warn_or_raise(gen):
    P = cs.load_polytope("birkhoff", n=6)
    u = torch.randn(4, 6, 6, generator=gen, dtype=torch.float64)
    check_unconverged_rows(P, u, "quadratic", 0.5, "assignment duals", "row/column sums")
    with pytest.raises(cs.InputError, match=r"on_failure must be 'fallback', 'warn' or 'raise'"):
        cs.relax(u, P, "quadratic", 0.5, on_failure="ignore")


def test_float32_and_mixed_temperatures(gen):
    P = cs.load_polytope("matching", n=5, m=7)
    u = torch.randn(6, 5, 7, generator=gen, dtype=torch.float64)
    t = torch.tensor([1e-3, 0.1, 0.5, 1.0, 5.0, 50.0], dtype=torch.float64)
    x64 = cs.relax(u, P, "quadratic", t)
    x32 = cs.relax(u.float(), P, "quadratic", t.float())
    assert x32.dtype == torch.float32 and (x32.double() - x64).abs().max() < 1e-6
    for i in range(6):
        ref = oracles.quadratic_on_form((u[i] / t[i]).reshape(-1).numpy(), P.form)
        assert np.abs(x64[i].reshape(-1).numpy() - ref).max() < 1e-9


@pytest.mark.parametrize("reg", ["quadratic", "binary_entropy"])
@pytest.mark.parametrize("name,params", [("birkhoff", {"n": 3}), ("birkhoff", {"n": 5}), ("matching", {"n": 3, "m": 4})])
def test_manual_masks_and_forced_entries(name, params, reg):
    # -1e9 on 60 % of the entries often leaves no structure that avoids them all: the relaxation
    # lives on the face with the least masked mass (oracles.masked_face_solve); +1e9 forces entries
    g = torch.Generator().manual_seed(3)
    P = cs.load_polytope(name, **params)
    for t in (1.0, 0.05):
        u = 2 * torch.randn((8,) + P.shape, generator=g, dtype=torch.float64)
        mask = torch.rand((8,) + P.shape, generator=g) < 0.6
        with warnings.catch_warnings():
            warnings.simplefilter("error", cs.SolverWarning)
            x = cs.relax(u.masked_fill(mask, -1e9), P, reg, t).reshape(8, -1)
        for b in range(8):
            low = mask[b].reshape(-1).numpy()
            theta = (u[b].reshape(-1) / t).numpy()
            ref, certificate = oracles.masked_face_solve(np.where(low, -1e9 / t, theta), P.form, low, reg)
            assert certificate < 1e-11
            assert np.abs(x[b].numpy() - ref).max() < 1e-9, (t, b)
    # one forced entry per row: the same as forcing it by +200 (x moves by less than e^-40)
    u = torch.randn((8,) + P.shape, generator=g, dtype=torch.float64)
    best = P.argmax(u).reshape(8, -1).argmax(1)
    xs = []
    for up in (1e9, 200.0):
        uu = u.reshape(8, -1).clone()
        uu[torch.arange(8), best] += up
        xs.append(cs.relax(uu.reshape(u.shape), P, reg, 0.5))
    assert (xs[0] - xs[1]).abs().max() < 1e-9


@pytest.mark.parametrize("t", [1e-2, 1e-3])
def test_binary_entropy_at_low_temperature(t, gen):
    # saturated entries (x(1 − x) below 1e-12) leave the Jacobian; the rest against differences
    P = cs.load_polytope("matching", n=6, m=9)
    u = torch.randn(8, 6, 9, generator=gen, dtype=torch.float64, requires_grad=True)
    v = torch.randn(u.shape, generator=gen, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", cs.SolverWarning)
        x = cs.relax(u, P, "binary_entropy", t)
    (jv,) = torch.autograd.grad((x * v).sum(), u)
    assert torch.isfinite(jv).all()
    for i in range(8):
        ref, certificate = oracles.dual_solve((u[i] / t).detach().reshape(-1).numpy(), P.form, "binary_entropy")
        if certificate < 1e-11:
            assert np.abs(x[i].detach().reshape(-1).numpy() - ref).max() < 1e-9
    h = 1e-4 * t
    with torch.no_grad():
        fd = (cs.relax(u + h * v, P, "binary_entropy", t) - cs.relax(u - h * v, P, "binary_entropy", t)) / (2 * h)
    assert t * (jv - fd).abs().max() < 1e-6


def test_quadratic_support_leaves_out_entries_at_rounding(monkeypatch):
    """Forced entries (+1e4) at t = 0.1: Newton leaves entries off the solution at rounding
    level. Counted as on the support, they changed the face of the Jacobian, and the gradient
    was off by 0.16/t; the support is now X above the solve's tolerance. Against Wolfe's
    algorithm, whose face comes from its permutations, and central differences."""
    F = 1e4
    u = torch.tensor([[F, F, F, 0.30, 0.62],
                      [F, F, F, -0.67, -0.66],
                      [-0.58, 0.25, F, -2.03, -0.57],
                      [0.24, -0.88, 0.76, F, 0.55],
                      [F, F, 0.98, 1.99, F]], dtype=torch.float64)[None]
    w = torch.randn(1, 5, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    P = cs.load_polytope("birkhoff", n=5)
    # (differences of entries at 1e4 keep 5 digits)
    check_newton_against_wolfe(P, u, w, 0.1, "_ASSIGNMENT_HULL_SPAN", monkeypatch, 1e-7, 1e-2)


@pytest.mark.parametrize("row", ["full_column_without_multiplier", "entries_at_the_tolerance"])
def test_matching_quadratic_jacobian_on_tied_forced_entries(row, monkeypatch):
    """Matchings 4 × 6 with forced entries (+1e4) that tie. (1) Rows 0 and 2 put all their mass
    on columns 1 and 2, which stay full under any small change, but their multipliers are not
    unique and Newton's came out 0: the column must count as tight anyway. (2) Newton, solved to
    1e-12, left entries that are 0 at 1.1-1.3e-12: they must not count as on the support. Either
    way the gradient was off by 0.15-0.23 where Wolfe's algorithm and central differences agree."""
    F = 1e4
    u = torch.tensor({
        "full_column_without_multiplier": [[1.00, F, F, 1.35, -0.12, -0.97], [-0.41, -1.31, -0.25, F, 0.58, F],
                                           [-1.30, F, F, 0.21, F, -1.21], [1.42, 0.09, 0.46, 1.47, F, 0.70]],
        "entries_at_the_tolerance": [[F, -0.80, F, 0.40, 1.03, -1.56], [-0.08, 0.92, F, -0.75, F, -0.73],
                                     [F, 0.33, F, -1.22, 0.26, -0.57], [F, 1.36, F, F, 0.06, -0.89]]}[row],
        dtype=torch.float64)[None]
    w = torch.randn(1, 4, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    P = cs.load_polytope("matching", n=4, m=6)
    check_newton_against_wolfe(P, u, w, 1.0, "_ASSIGNMENT_HULL_SPAN", monkeypatch, 1e-6, 1e-3)
