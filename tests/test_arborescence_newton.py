"""The entropy, the binary entropy and the quadratic on arborescences by Newton's method on a dual
whose sets are added as needed (their fast path): against a certified dual solve of Edmonds' cut
form, the face Jacobian, KKT certificates over every vertex set, the interior-point solver on
larger trees and low temperatures, and the failure modes. Here every quadratic row off a tree
takes Newton's method (by default those whose logits span more than
``fast._ARBORESCENCE_HULL_SPAN + n / 3`` take Wolfe's algorithm, tested in test_min_norm_point.py;
the routing: test_quadratic_rows_go_to_newton_or_wolfe_by_their_span)."""

import math

import itertools
import warnings

import numpy as np
import pytest
import torch

import convex_sst as cs
from conftest import check_newton_against_wolfe, check_unconverged_rows
import oracles
from convex_sst._arborescence_newton import solve_arborescences
from convex_sst._assignment_projection import SEPARABLE

import convex_sst.fast

REGS = ["entropy", "binary_entropy"]
ALL_REGS = REGS + ["quadratic"]
DEFAULT_HULL_SPAN = convex_sst.fast._ARBORESCENCE_HULL_SPAN


@pytest.fixture(autouse=True)
def _newton_for_every_quadratic_row(monkeypatch):
    monkeypatch.setattr(convex_sst.fast, "_ARBORESCENCE_HULL_SPAN", math.inf)


@pytest.fixture(scope="module")
def cut_form(tmp_path_factory):
    """The arborescences of K5 rooted at 0 in Edmonds' cut form (no auxiliary variables)."""
    path = tmp_path_factory.mktemp("cut") / "cut_arborescence.yaml"
    path.write_text(oracles.cut_arborescence_config(5))
    return cs.load_polytope(str(path)).form


def forest_violation(x: np.ndarray) -> float:
    """The largest ``x(E[S]) − (|S| − 1)`` over all vertex sets S of ``x (n, n)``, by enumeration."""
    n = x.shape[0]
    S = np.array(list(itertools.product([0.0, 1.0], repeat=n)))[1:]
    return float((np.einsum("sh,hm,sm->s", S, x, S) - (S.sum(1) - 1)).max())


@pytest.mark.parametrize("reg", ALL_REGS)
@pytest.mark.parametrize("t", [0.05, 0.5, 3.0])
@pytest.mark.parametrize("ties", [False, True])
def test_equals_a_certified_dual_solve(t, ties, reg, cut_form, gen):
    P = cs.load_polytope("arborescence", n=5)
    B = 6
    if ties:
        u = torch.randint(-2, 3, (B, 5, 5), generator=gen).double()
    else:
        u = torch.randn(B, 5, 5, generator=gen, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", cs.SolverWarning)
        x = cs.relax(u, P, reg, t, backend="fast", on_failure="raise")
    checked = 0
    for i in range(B):
        ref, certificate = oracles.dual_solve((u[i] / t).numpy().ravel(), cut_form, reg)
        if certificate > 1e-11:  # the oracle's own failure: skip the row
            continue
        checked += 1
        assert np.abs(x[i].numpy().ravel() - ref).max() < 1e-10
    assert checked >= B // 2


@pytest.mark.parametrize("reg", ALL_REGS)
@pytest.mark.parametrize("t", [0.2, 2.0])
def test_gradient_is_the_face_jacobian_and_matches_differences(t, reg, cut_form, gen):
    P = cs.load_polytope("arborescence", n=5)
    B = 6
    u = torch.randn(B, 5, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(u.shape, generator=gen, dtype=torch.float64)
    x = cs.relax(u, P, reg, t, backend="fast")
    (g,) = torch.autograd.grad((x * w).sum(), u)
    for i in range(B):
        z = x[i].detach().numpy().ravel()
        hinv = {"entropy": z, "binary_entropy": z * (1 - z), "quadratic": None}[reg]
        ref = oracles.face_vjp(z, w[i].numpy().ravel(), cut_form, hinv) / t
        assert np.abs(g[i].numpy().ravel() - ref).max() < 1e-9
    h = 1e-6
    d = torch.randn(u.shape, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        diff = (cs.relax(u + h * d, P, reg, t) - cs.relax(u - h * d, P, reg, t)) / (2 * h)
    jvp = torch.autograd.functional.jvp(lambda v: cs.relax(v, P, reg, t), u.detach(), d)[1]
    assert (jvp - diff).abs().max() < 1e-6


@pytest.mark.parametrize("reg", ALL_REGS)
@pytest.mark.parametrize("t", [0.01, 0.1, 1.0])
def test_kkt_certificate_over_every_vertex_set(t, reg, gen):
    """Stationarity (``ψ⁻¹(x) = θ − a_m − Σ_S λ_S 1[h, m ∈ S]``: the same ``a_m`` down every
    column; for the quadratic on its support, and ``θ − a_m − Σ_S λ_S 1[h, m ∈ S] ≤ 0`` off it),
    in-degrees 1, every one of the 2ⁿ sets within its bound, λ ≥ 0, and λ_S > 0 only on tight
    sets: x is optimal."""
    n, B = 8, 16
    theta = torch.randn(B, n, n, generator=gen, dtype=torch.float64) / t
    x, S, lam, bad, _, _ = solve_arborescences(theta, 0, SEPARABLE[reg], 1e-12, 100)
    assert not bad.any()
    assert (lam >= 0).all()
    tol = 1e-10 * max(1.0, float(theta.abs().max()))
    assert (x.sum(1)[:, 1:] - 1).abs().max() < tol
    assert (x[:, :, 0] == 0).all() and (torch.diagonal(x, dim1=1, dim2=2) == 0).all()
    slack = S.sum(2) - 1 - ((S @ x) * S).sum(2)
    used = S.sum(2) > 0
    assert (slack.abs() * lam * used).max() < tol
    for i in range(B):
        assert forest_violation(x[i].numpy()) < tol
    Lam = (S * lam[:, :, None]).mT @ S
    inv = {"entropy": lambda: torch.log(x) + 1, "binary_entropy": lambda: torch.log(x) - torch.log1p(-x),
           "quadratic": lambda: x}[reg]()
    a = theta - Lam - inv  # a_m wherever ψ⁻¹ is well conditioned (x not 0, not near 1 for σ)
    ok = (x > (0.0 if reg == "quadratic" else 1e-200)) & (x < (0.999 if reg == "binary_entropy" else math.inf))
    top = torch.where(ok, a, -torch.inf).amax(1)
    bottom = torch.where(ok, a, torch.inf).amin(1)
    spread = torch.where(torch.isfinite(top - bottom), top - bottom, 0.0)
    assert spread[:, 1:].max() < 1e-8 * max(1.0, float(theta.abs().max()))
    if reg == "quadratic":  # every arc off the support: θ − a_m − Λ ≤ 0, a_m from the support
        valid = ~torch.eye(n, dtype=torch.bool)
        valid[:, 0] = False
        off = valid & (x == 0)
        assert ok[:, :, 1:].any(1).all()  # every vertex but the root has a parent on the support
        assert (torch.where(off, theta - Lam - top[:, None, :], -1.0)).max() < 1e-8 * max(1.0, float(theta.abs().max()))


@pytest.mark.parametrize("reg", ALL_REGS)
@pytest.mark.parametrize("t", [0.05, 1.0])
def test_larger_trees_match_the_interior_point_solver(t, reg, gen):
    P = cs.load_polytope("arborescence", n=11)
    u = torch.randn(6, 11, 11, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(u.shape, generator=gen, dtype=torch.float64)
    x = cs.relax(u, P, reg, t, backend="fast", on_failure="raise")
    ref = cs.relax(u, P, reg, t, backend="torch")
    assert (x - ref).abs().max() < 1e-7
    (g,) = torch.autograd.grad((x * w).sum(), u)
    (gr,) = torch.autograd.grad((ref * w).sum(), u)
    assert (g - gr).abs().max() < 1e-5 * max(1.0, float(gr.abs().max()))


@pytest.mark.parametrize("reg", ALL_REGS)
def test_low_temperature_on_twenty_vertices_converges(reg, gen):
    P = cs.load_polytope("arborescence", n=20)
    u = torch.randn(4, 20, 20, generator=gen, dtype=torch.float64)
    t = 0.01
    x = cs.relax(u, P, reg, t, on_failure="raise")
    assert (x.sum(1)[:, 1:] - 1).abs().max() < 1e-9
    # the best tree scores at least as much, and no more than t times f's range on P (≤ n² log 2)
    gap = (u * P.argmax(u)).sum((1, 2)) - (u * x).sum((1, 2))
    assert (gap > -1e-9).all() and (gap < t * 400 * np.log(2)).all()


def _set_partitions(items: list[int]):
    """Every partition of ``items`` into nonempty parts (lists)."""
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for p in _set_partitions(rest):
        yield [[first]] + p
        for i in range(len(p)):
            yield p[:i] + [[first] + p[i]] + p[i + 1:]


@pytest.mark.parametrize("n", [7, 16])
def test_separation_finds_a_minimum_partition_in_either_vertex_order(n, monkeypatch):
    """``_separate`` returns the violated parts of a minimum partition of ``y = x + xᵀ``; from
    ``_LOW_DEGREE_FIRST`` vertices on, Cunningham's algorithm takes them by increasing weight and
    the parts are mapped back. On points with in-degree 1 off the root (cycles: violated sets),
    half with tied logits, each set returned must be violated, and their total violation must be
    the same in both orders; at n = 7 it must be the minimum over all 877 partitions."""
    from convex_sst import _arborescence_newton as an

    rng = np.random.default_rng(5)
    B = 24
    logits = rng.normal(size=(B, n, n)) * rng.choice([1.0, 3.0, 10.0], size=(B, 1, 1))
    logits[: B // 2] = np.round(logits[: B // 2])
    logits[:, np.arange(n), np.arange(n)] = -np.inf
    x = torch.softmax(torch.from_numpy(logits), dim=1)  # each column (head distribution) sums to 1
    x[:, :, 0] = 0.0  # the root has no parent
    S = torch.zeros(B, 0, n, dtype=torch.float64)
    Y = (x + x.mT).numpy()
    totals = {}
    for order, first in (("weight", 0), ("given", 10**9)):
        monkeypatch.setattr(an, "_LOW_DEGREE_FIRST", first)
        found = an._separate(x, S, 1e-12)
        total = np.zeros(B)
        for b, sets in enumerate(found):
            for mask in sets:
                violation = 0.5 * Y[b][np.ix_(mask, mask)].sum() - (mask.sum() - 1)
                assert violation > 1e-12
                total[b] += violation
        totals[order] = total
    assert np.allclose(totals["weight"], totals["given"], rtol=0, atol=1e-10)
    assert (totals["weight"] > 0.1).sum() > B // 2  # most points are far from the polytope
    if n <= 8:
        for b in range(B):
            best = max(sum(max(0.0, 0.5 * Y[b][np.ix_(p, p)].sum() - (len(p) - 1)) for p in parts)
                       for parts in _set_partitions(list(range(n))))
            assert abs(totals["weight"][b] - best) < 1e-10


def test_working_sets_do_not_cycle():
    # with every set of negative multiplier dropped at once, row 54 of this batch repeated a
    # 12-round cycle of working sets until _MAX_ROUNDS (under the stage schedule that row 51's
    # larger span sets; alone it converged) and went to the torch solver (8 s for two rows)
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import maximum_flow

    P = cs.load_polytope("arborescence", n=30)
    u = torch.randn(64, 30, 30, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = cs.relax(u[[51, 54]], P, "entropy", 0.1, backend="fast", on_failure="raise")
    alone = cs.relax(u[54:55], P, "entropy", 0.1, backend="fast", on_failure="raise")
    assert (x[1] - alone[0]).abs().max() < 1e-8
    assert (x.sum(1)[:, 1:] - 1).abs().max() < 1e-9
    for xi in x.numpy():  # every vertex one unit of flow from the root: Edmonds' cuts hold
        cap = csr_matrix(np.round(xi * 1e8).astype(np.int32))
        assert min(maximum_flow(cap, 0, v).flow_value for v in range(1, 30)) >= 1e8 * (1 - 1e-5)


def _listops_arc_scores() -> list[torch.Tensor]:
    from pathlib import Path

    text = (Path(__file__).parent / "data" / "listops_arc_scores.txt").read_text()
    blocks = [b for b in text.split("\n\n") if b.strip()]
    return [torch.tensor(np.loadtxt(b.splitlines()), dtype=torch.float64) for b in blocks]


def test_working_sets_do_not_cycle_on_listops_scores(monkeypatch):
    """Rows a ListOps model produced in training (tests/data/listops_arc_scores.txt). Dropping the
    most negative set while keeping Newton's point, the first needed 160 rounds (more than the
    100 allowed then) and the second cycled through the same 3 sets for 3 000 rounds; both went to
    the torch solver. With the step back that keeps the multipliers ≥ 0 the dual decreases every
    round: both converge within the fast path, to the interior-point solution."""
    import convex_sst._arborescence_newton as module

    rounds = []
    separate = module._separate
    monkeypatch.setattr(module, "_separate", lambda *a: rounds.append(1) or separate(*a))
    for u in _listops_arc_scores():
        n = u.shape[0]
        P = cs.load_polytope("arborescence", n=n, root=0)
        rounds.clear()
        x = cs.relax(u, P, "entropy", 1.0, backend="fast", on_failure="raise")
        assert len(rounds) <= 200
        assert (x - cs.relax(u, P, "entropy", 1.0, backend="torch")).abs().max() < 1e-7
        assert (x.sum(0)[1:] - 1).abs().max() < 1e-9 and not bool(x[:, 0].any())


def test_unconverged_rows_fall_back_warn_or_raise(gen):
    P = cs.load_polytope("arborescence", n=6)
    u = torch.randn(4, 6, 6, generator=gen, dtype=torch.float64)
    check_unconverged_rows(P, u, "binary_entropy", 0.2, "arborescence duals", "forest constraints")


@pytest.mark.parametrize("reg", REGS)
def test_huge_logits_give_the_best_tree_by_its_proven_gap(reg, gen):
    """At logits of 1e25 and beyond ``x = ψ(θ − a − Λ)`` keeps no digits; rows whose best tree
    beats the second best by more than 2e17 n² are that tree (|x − tree| ≤ 2n² / gap); the others
    cannot be resolved and are reported (a residual above 1e-6 is a failure at any scale; the
    default falls back to the interior-point solver)."""
    n = 6
    P = cs.load_polytope("arborescence", n=n)
    u = torch.randn(4, n, n, generator=gen, dtype=torch.float64)
    u = (u / u.abs().max()).requires_grad_()
    for t in (1e-25, 1e-100, 1e-300):
        x = cs.relax(u, P, reg, t, on_failure="raise")
        assert torch.equal(x.detach(), P.argmax(u.detach()))
        (g,) = torch.autograd.grad(x.sum(), u)
        assert torch.equal(g, torch.zeros_like(g))
    tied = u.detach().clone()
    tied[:, 1, 2] = tied[:, 3, 2] = tied[:, :, 2].max() + 1  # two best parents for vertex 2: no gap
    with pytest.raises(cs.SolverError, match="arborescence duals did not converge"):  # reported, not silent
        cs.relax(tied, P, reg, 1e-300, on_failure="raise")


def test_backward_in_chunks_of_rows_is_the_same(gen, monkeypatch):
    import convex_sst._arborescence_newton as module

    P = cs.load_polytope("arborescence", n=5)
    u = torch.randn(7, 5, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(u.shape, generator=gen, dtype=torch.float64)
    (whole,) = torch.autograd.grad((cs.relax(u, P, "entropy", 0.5) * w).sum(), u)
    monkeypatch.setattr(module, "_VJP_BYTES", 1)  # one row at a time
    (chunked,) = torch.autograd.grad((cs.relax(u, P, "entropy", 0.5) * w).sum(), u)
    assert (chunked - whole).abs().max() < 1e-12
    assert torch.autograd.gradgradcheck(lambda v: cs.relax(v, P, "entropy", 0.5), (u[:3].detach().requires_grad_(),))


def test_quadratic_rows_go_to_newton_or_wolfe_by_their_span(gen, monkeypatch):
    """By default the quadratic's rows off a tree whose logits span at most
    ``_ARBORESCENCE_HULL_SPAN + n / 3`` take Newton's method and the others Wolfe's algorithm
    (those near the threshold with the larger group): a batch of both gives the values and
    gradients of either method alone."""
    P = cs.load_polytope("arborescence", n=6)
    # spans about 4.3 × scale: most rows below the threshold, some just above, some far above
    threshold, band = DEFAULT_HULL_SPAN + 6 / 3, convex_sst.fast._ARBORESCENCE_HULL_BAND
    scale = threshold / 4.3 * torch.tensor([0.2, 0.75, 0.75, 0.75, 1.4, 5.4], dtype=torch.float64).repeat(3)
    u = torch.randn(18, 6, 6, generator=gen, dtype=torch.float64) * scale[:, None, None]
    w = torch.randn(u.shape, generator=gen, dtype=torch.float64)
    real = convex_sst.fast.project_onto_hull
    seen: list[int] = []

    def spy(theta, *args):
        seen.append(theta.shape[0])
        return real(theta, *args)

    monkeypatch.setattr(convex_sst.fast, "project_onto_hull", spy)
    results = {}
    for span in (DEFAULT_HULL_SPAN, math.inf, -math.inf):
        monkeypatch.setattr(convex_sst.fast, "_ARBORESCENCE_HULL_SPAN", span)
        seen.clear()
        v = u.clone().requires_grad_()
        x = cs.relax(v, P, "quadratic", 1.0, on_failure="raise")
        (g,) = torch.autograd.grad((x * w).sum(), v)
        results[span] = (x.detach(), g, sum(seen))
    x, _, mixed = results[DEFAULT_HULL_SPAN]
    _, _, newton_only = results[math.inf]
    _, _, wolfe_only = results[-math.inf]
    span = (u.flatten(1).amax(1) - u.flatten(1).amin(1))  # (at t = 1)
    off_tree = ~((x == 0) | (x == 1)).flatten(1).all(1)
    assert newton_only == 0 and wolfe_only == int(off_tree.sum())
    # above the threshold to Wolfe, except that rows within a factor `band` of it go with the
    # larger group
    wide, narrow = off_tree & (span > threshold), off_tree & (span <= threshold)
    near = off_tree & (span > threshold / band) & (span <= threshold * band)
    assert wide.any() and narrow.any() and near.any() and (off_tree & ~near).any()
    expected = (wide & ~near) | (near if int(wide.sum()) >= int(narrow.sum()) else torch.zeros_like(near))
    assert 0 < mixed == int(expected.sum()) < wolfe_only
    for span in (math.inf, -math.inf):
        assert (results[span][0] - results[DEFAULT_HULL_SPAN][0]).abs().max() < 1e-10
        assert (results[span][1] - results[DEFAULT_HULL_SPAN][1]).abs().max() < 1e-8


def test_quadratic_newton_does_not_stall_on_dependent_rows(monkeypatch):
    """On its support the in-degree and set rows of the quadratic's system are often dependent:
    with the regularization ``_MU·err`` alone, this row (the 28th of the 13th batch of a sweep
    drawn from seed 0) stalled at a residual of 1.01e-12, its steps going 0.1 to 1e16 along the
    null directions. The floor ``_RIDGE`` keeps them short."""
    import convex_sst._arborescence_newton as module

    g = torch.Generator().manual_seed(0)
    for n, ties in [(5, False), (5, True)] * 4 + [(10, False), (10, True)] * 2:
        torch.randint(-2, 3, (64, n, n), generator=g) if ties else torch.randn(64, n, n, generator=g, dtype=torch.float64)
    theta = (torch.randn(64, 10, 10, generator=g, dtype=torch.float64) * 2.0)[27:28]
    x, S, lam, bad, _, _ = solve_arborescences(theta, 0, SEPARABLE["quadratic"], 1e-12, 100)
    assert not bad.any() and (x.sum(1)[:, 1:] - 1).abs().max() < 1e-12
    monkeypatch.setattr(module, "_RIDGE", 0.0)
    if not solve_arborescences(theta, 0, SEPARABLE["quadratic"], 1e-12, 100)[3].any():
        pytest.skip("without the floor this row converged too here (its stall depends on rounding)")


def test_quadratic_support_leaves_out_arcs_at_rounding(monkeypatch):
    """Forced arcs (+1e4) at t = 0.1: Newton leaves two arcs off the solution at 2.2e-16. Counted
    as on the support, they changed the face of the Jacobian, and the gradient was off by 30
    (3/t); the support is now x above the solve's tolerance. Against Wolfe's algorithm, whose
    face comes from its trees, and central differences."""
    F = 1e4
    u = torch.tensor([[F, -1.04, -1.00, F, -1.25, -0.47],
                      [F, -0.08, 0.73, F, F, -1.30],
                      [0.26, F, -0.75, F, 1.17, 1.77],
                      [F, F, F, 0.73, 0.71, F],
                      [F, 1.18, -0.77, -0.57, F, -0.58],
                      [-0.24, F, -1.80, -0.77, -0.00, F]], dtype=torch.float64)[None]
    w = torch.arange(36, dtype=torch.float64).reshape(1, 6, 6)
    P = cs.load_polytope("arborescence", n=6)
    # (differences of entries at 1e4 keep 5 digits)
    check_newton_against_wolfe(P, u, w, 0.1, "_ARBORESCENCE_HULL_SPAN", monkeypatch, 1e-7, 1e-2)
