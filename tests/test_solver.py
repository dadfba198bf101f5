"""The batched torch interior-point solver (backend="torch") against references."""

import math
import warnings

import numpy as np
import pytest
import torch
from conftest import RELAX_CASES, user_copy

import convex_sst as cs
from convex_sst import solver
from convex_sst.regularizers import get_regularizer
from convex_sst.solver import solve_torch


def _equality_form(name):
    return cs.load_polytope(name, **RELAX_CASES[name]).form.num_ub == 0


SEPARABLE = [(name, reg) for name in RELAX_CASES
             for reg in cs.load_polytope(name, **RELAX_CASES[name]).regularizers if get_regularizer(reg).separable]
TIGHT = {"solver": "scs", "solver_args": {"eps_abs": 1e-12, "eps_rel": 1e-12}}
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")


# SCS at 1e-12 may flag a solve "inaccurate" (arborescence x entropy) yet still agree to 1e-6
@pytest.mark.filterwarnings("ignore:generic solver \\(scs\\) reported:convex_sst.SolverWarning")
@pytest.mark.parametrize("name,reg", SEPARABLE)
def test_torch_solver_matches_reference_at_t1(name, reg, gen):
    P = cs.load_polytope(name, **RELAX_CASES[name])
    u = torch.randn((8,) + P.shape, generator=gen, dtype=torch.float64)
    x = cs.relax(u, P, reg, 1.0, backend="torch")
    if (name, reg) in cs.available_fast_paths():
        ref = cs.relax(u, P, reg, 1.0, backend="fast")
    else:
        ref = cs.relax(u, P, reg, 1.0, backend="generic", **TIGHT)
    assert (x - ref).abs().max() < 1e-6


GRADCHECK = [(n, r, t) for t in (1.0, 0.1) for n, r in [
    ("simplex", "entropy"), ("k_subset", "binary_entropy"), ("k_subset", "quadratic"), ("birkhoff", "quadratic"),
    ("birkhoff", "entropy"), ("hypercube", "binary_entropy"), ("dag_path", "quadratic"), ("dag_path", "entropy"),
    ("matching", "binary_entropy"), ("spanning_tree", "binary_entropy"), ("spanning_tree", "entropy"),
    ("arborescence", "entropy"), ("arborescence", "quadratic")]]


@pytest.mark.parametrize("name,reg,t", GRADCHECK)
def test_torch_solver_gradcheck(name, reg, t, gen):
    P = cs.load_polytope(name, **RELAX_CASES[name])
    u = torch.randn((2,) + P.shape, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: cs.relax(v, P, reg, t, backend="torch"), (u,), atol=1e-5)


@pytest.mark.parametrize("name,params,reg", [("k_subset", {"n": 10, "k": 3}, "binary_entropy"),
                                             ("simplex", {"n": 10}, "entropy"),
                                             ("birkhoff", {"n": 5}, "entropy")])
def test_low_temperature_gradients_match_closed_forms_on_every_sample(name, params, reg, gen):
    P = cs.load_polytope(name, **params)
    u = torch.randn((128,) + P.shape, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn((128,) + P.shape, generator=gen, dtype=torch.float64)
    xt = cs.relax(u, P, reg, 0.1, backend="torch")
    (gt,) = torch.autograd.grad((xt * w).sum(), u)
    xf = cs.relax(u, P, reg, 0.1, backend="fast")
    (gf,) = torch.autograd.grad((xf * w).sum(), u)
    assert (xt - xf).abs().max() < 1e-6
    err = (gt - gf).reshape(128, -1).abs().amax(1)
    assert bool((err <= 1e-6).all()), err.max()


@pytest.mark.filterwarnings("error::convex_sst.SolverWarning")
@pytest.mark.parametrize("name", sorted(RELAX_CASES))
def test_torch_solver_reaches_the_hard_argmax_at_huge_scaled_logits(name):
    # |u / t| up to 1e15 on every built-in: converged (no warning) and the exact best structure
    # to 1e-9. Beyond that it can stop unconverged, with a SolverWarning (spanning trees of K4
    # at 1e20, 2 x 3 matchings at 1e30; found by a fuzz of random calls)
    P = cs.load_polytope(name, **RELAX_CASES[name])
    g = torch.Generator().manual_seed(0)
    for scale in (1e6, 1e15):
        u = scale * torch.randn((8,) + P.shape, generator=g, dtype=torch.float64)
        for reg in ("entropy", "binary_entropy", "quadratic"):
            x = cs.relax(u, P, reg, 1.0, backend="torch")
            assert (x - P.argmax(u)).abs().max() < 1e-9, (scale, reg)


def test_report_status_names_each_outcome():
    report = solver.SolveReport(converged=torch.tensor([True, False, True, False, True]),
                                iterations=torch.tensor([5, 50, 7, 50, 9]),
                                kkt_residual=torch.tensor([1e-12, 1e-3, math.nan, math.inf, 5e-8]).double(), tol=1e-9)
    assert report.status == ["converged", "max_iter", "nan", "nan", "inaccurate"]
    assert solver.SolveReport(converged=torch.tensor([True]), iterations=torch.tensor([3]),
                              kkt_residual=torch.tensor([1e-8]).double(), tol=1e-9).status == ["converged"]  # 10·tol


def test_report_and_failures_name_the_batch_indices(gen):
    P = cs.load_polytope("k_subset", n=6, k=2)
    reg = get_regularizer("binary_entropy")
    u = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    x, report = solve_torch(u, P, reg)
    assert report.status == ["converged"] * 4 and bool(report.converged.all())
    hard = u.clone()
    hard[2] *= 1000.0  # needs more iterations than the others
    its = solve_torch(hard, P, reg)[1].iterations
    cap = int(its[[0, 1, 3]].max())
    assert int(its[2]) > cap
    xs, rep = solve_torch(hard, P, reg, max_iter=cap)
    assert rep.converged.tolist() == [True, True, False, True]
    assert (xs[[0, 1, 3]] - x[[0, 1, 3]]).abs().max() < 1e-8  # the others are unaffected
    with pytest.warns(cs.SolverWarning, match=r"torch solver did not converge for batch element\(s\) \[2\] of 4") as rec:
        cs.relax(hard, P, reg, 1.0, backend="torch", max_iter=cap)
    assert rec[0].filename == __file__  # attributed to the caller's line, not the library's
    with pytest.raises(cs.SolverError, match=r"batch element\(s\) \[2\]"):
        cs.relax(hard, P, reg, 1.0, backend="torch", max_iter=cap, on_failure="raise")
    bad = u.clone()
    bad[1, 3] = float("nan")
    with pytest.raises(cs.InputError, match=r"batch index \(1,\)"):
        cs.relax(bad, P, reg, 1.0, backend="torch")


def test_degenerate_polytope_with_redundant_rows_and_free_aux(tmp_path, gen):
    path = tmp_path / "degenerate.yaml"
    path.write_text(
        "name: degenerate_simplex\n"
        "params:\n  n: {type: int, default: 4}\n"
        "output: {shape: [n]}\n"
        "variables:\n  a: [2]\n"
        "constraints:\n"
        "  - sum(x) == 1\n  - 2 * sum(x) == 2\n  - sum(a) == 1\n  - 0 <= a <= 1\n  - 0 <= x <= 1\n")
    P = cs.load_polytope(path)
    u = torch.randn(5, 4, generator=gen, dtype=torch.float64)
    x = cs.relax(u, P, "entropy", 0.5, backend="torch")
    assert (x - torch.softmax(u / 0.5, -1)).abs().max() < 1e-8
    assert cs.relax(u, P, "entropy", 0.5).shape == (5, 4)  # auto picks the torch solver here


def test_auto_picks_torch_for_small_equality_systems(tmp_path, monkeypatch):
    from convex_sst.relax import TORCH_AUTO_MAX_BANDED_ROWS, TORCH_AUTO_MAX_ROWS, select_backend
    from convex_sst.solver import relax_torch, standard_form

    reg = get_regularizer("quadratic")
    # Birkhoff, matchings and arborescences with the quadratic have fast paths; users' copies do not
    assert select_backend(cs.load_polytope(user_copy(tmp_path, "birkhoff"), n=4), reg, "auto") is relax_torch
    assert select_backend(cs.load_polytope(user_copy(tmp_path, "matching"), n=2, m=3), reg, "auto") is relax_torch
    mine = user_copy(tmp_path, "arborescence")
    assert select_backend(cs.load_polytope(mine, n=8), reg, "auto") is relax_torch
    big = cs.load_polytope(mine, n=14)
    assert big.form.num_eq > TORCH_AUTO_MAX_ROWS
    assert select_backend(big, reg, "auto") is not relax_torch
    # the entropies (exponential cones in cvxpylayers: slower, and inaccurate) take the torch
    # solver up to 1 600 rows (spanning trees up to n = 32, whose standard form takes seconds
    # to build, minutes before it was sparse and propagated bounds: correlated k-subsets here)
    mid = cs.load_polytope("correlated_k_subset", n=50, k=8)
    assert TORCH_AUTO_MAX_ROWS < 800 < mid.form.num_eq <= 1600
    for name in ("entropy", "binary_entropy"):
        assert select_backend(mid, get_regularizer(name), "auto") is relax_torch
    # ... and every regularizer beyond, up to TORCH_AUTO_MAX_BANDED_ROWS, where the rows are
    # banded (factored by blocks): correlated k-subsets, users' chains; not where they are not
    # (the arborescences above, spanning trees). Banded rows that are a flow's (no dense QR in
    # the standard form) have no bound
    large, huge = cs.load_polytope("correlated_k_subset", n=70, k=12), cs.load_polytope("correlated_k_subset", n=250, k=10)
    assert 1600 < large.form.num_eq <= TORCH_AUTO_MAX_BANDED_ROWS < huge.form.num_eq
    for name in ("entropy", "binary_entropy"):
        assert select_backend(large, get_regularizer(name), "auto") is relax_torch
        assert select_backend(huge, get_regularizer(name), "auto") is relax_torch
    monkeypatch.setattr(solver, "network_rows", lambda P: False)  # as if they were not a flow's
    assert select_backend(huge, get_regularizer("entropy"), "auto") is not relax_torch
    assert select_backend(large, get_regularizer("entropy"), "auto") is relax_torch
    mid_copy = cs.load_polytope(user_copy(tmp_path, "correlated_k_subset"), n=50, k=8)
    assert select_backend(mid_copy, reg, "auto") is relax_torch  # the quadratic too, banded
    assert standard_form(mid_copy, reg).band > 0 and standard_form(big, reg).band == 0
    assert not solver.looks_banded(cs.load_polytope(user_copy(tmp_path, "spanning_tree"), n=16))
    # a fast path always wins; a regularizer without elementwise derivatives goes to cvxpylayers
    assert select_backend(cs.load_polytope("birkhoff", n=4), get_regularizer("entropy"), "auto") is not relax_torch


@pytest.mark.parametrize("name,reg", [("spanning_tree", "quadratic"), ("spanning_tree", "entropy"),
                                      ("arborescence", "quadratic"), ("matching", "entropy")])
def test_flow_formulations_are_accurate_or_reported(name, reg, gen):
    # on inequality-row formulations some samples stall near 1e-7: they must be flagged, and every
    # sample reported as converged must be accurate
    P = cs.load_polytope(name, **({"n": 5} if name == "spanning_tree" else RELAX_CASES[name]))
    u = torch.randn((32,) + P.shape, generator=gen, dtype=torch.float64)
    x, report = solve_torch(u, P, get_regularizer(reg))
    ref = cs.relax(u, P, reg, 1.0, backend="generic", **TIGHT)
    err = (x - ref).reshape(32, -1).abs().amax(1)
    assert bool((err[report.converged] < 1e-6).all()), err[report.converged].max()


def test_float32_inputs():
    P = cs.load_polytope("k_subset", n=5, k=2)
    u = torch.randn(3, 5)
    x = cs.relax(u, P, "entropy", 0.5, backend="torch")
    assert x.dtype == torch.float32
    assert (x.double() - cs.relax(u.double(), P, "entropy", 0.5, backend="fast")).abs().max() < 1e-6


@CUDA
def test_torch_solver_on_cuda(gen):
    P = cs.load_polytope("birkhoff", n=4)
    u = torch.randn(4, 4, 4, generator=gen, dtype=torch.float64)
    x = cs.relax(u.cuda(), P, "quadratic", 0.5, backend="torch")
    assert (x.cpu() - cs.relax(u, P, "quadratic", 0.5, backend="torch")).abs().max() < 1e-9


@pytest.mark.parametrize("name, params", [("spanning_tree", {"n": 5}), ("arborescence", {"n": 4})])
def test_star_blocks_invert_exactly(name, params, gen):
    # flow formulations: every inequality row is a capacity f <= y sharing the arc's y, so the
    # Newton blocks are stars and are inverted in closed form; check against a dense solve with
    # entries spread over 16 orders of magnitude, as the barrier produces
    from convex_sst.solver import _Newton, _tensors, standard_form

    P = cs.load_polytope(name, **params)
    sf = standard_form(P, get_regularizer("entropy"))
    assert sf.structure == "star"
    T = _tensors(sf, torch.float64, torch.device("cpu"))
    n, p = sf.G.shape[1], sf.G.shape[0]
    D = torch.rand(3, n, generator=gen, dtype=torch.float64) * 10 ** (8 * torch.rand(3, n, generator=gen, dtype=torch.float64) - 4)
    Sig = torch.rand(3, p, generator=gen, dtype=torch.float64) * 10 ** (8 * torch.rand(3, p, generator=gen, dtype=torch.float64) - 4)
    G = torch.as_tensor(sf.G.toarray())
    M = torch.diag_embed(D) + G.T @ torch.diag_embed(Sig) @ G
    v = torch.randn(3, n, generator=gen, dtype=torch.float64)
    ref = torch.linalg.solve(M, v[..., None])[..., 0]
    # the variables are laid out as [outputs and other singletons, stars by size]: M⁻¹ v on one
    # reshaped view per star size; the gather/scatter path (any star structure) must agree
    assert sf.layout is not None and sf.layout[0] + sum(k * size for k, size in sf.layout[1]) == n
    assert len(sf.layout[1]) > 1  # the arcs into the root and out of it have smaller stars
    for TT in (T, dict(T, layout=None)):
        got = _Newton(TT, D, Sig).minv(v)
        assert ((got - ref).abs().amax(1) / ref.abs().amax(1)).max() < 1e-9
    # the structure test rejects blocks that are not stars (matching: 4 variables per row)
    assert standard_form(cs.load_polytope("matching", n=4, m=6), get_regularizer("entropy")).structure == "dense"


def test_block_structure_falls_back_to_cholesky_without_a_shared_hub():
    # inequality rows in a chain (x0 - x1, x1 - x2, x2 - x3 <= .) share no variable: not a star
    import scipy.sparse as sp

    from convex_sst.solver import _block_structure

    G = sp.csr_matrix(np.array([[1.0, -1.0, 0, 0], [0, 1.0, -1.0, 0], [0, 0, 1.0, -1.0]]))
    assert _block_structure(G, [[0, 1, 2, 3]])[0] == "dense"
    star, groups, rows = _block_structure(G[:2], [[0, 1, 2]])
    assert star == "star" and groups == [[1, 0, 2]] and rows == [[0, 1]]


@pytest.mark.parametrize("shape,density", [((40, 60), 0.03), ((7, 9), 0.8), ((0, 5), 0.0)])
def test_constraint_products_sparse_and_dense(shape, density, gen):
    """The solver's ``v Kᵀ`` and ``w K`` equal the dense products whichever storage K gets."""
    import scipy.sparse as sp

    from convex_sst.solver import _LinOp

    rng = np.random.default_rng(0)
    K = rng.standard_normal(shape) * (rng.random(shape) < density)
    op = _LinOp(sp.csr_matrix(K), torch.float64, torch.device("cpu"))
    assert op.sparse == (0 < K.size and density < 0.1)
    v = torch.randn(5, shape[1], dtype=torch.float64, generator=gen)
    w = torch.randn(5, shape[0], dtype=torch.float64, generator=gen)
    Kt = torch.as_tensor(K)
    torch.testing.assert_close(op.fwd(v), v @ Kt.T, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(op.adj(w), w @ Kt, rtol=1e-13, atol=1e-13)
    # the solver's batch-last iterates ((B, k) views of (k, B) arrays) give batch-last results
    vb, wb = v.T.contiguous().T, w.T.contiguous().T
    fb, ab = op.fwd(vb), op.adj(wb)
    torch.testing.assert_close(fb, v @ Kt.T, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(ab, w @ Kt, rtol=1e-13, atol=1e-13)
    assert fb.T.is_contiguous() and ab.T.is_contiguous()


@pytest.mark.parametrize("name,reg", SEPARABLE)
def test_torch_solver_accepts_an_empty_batch(name, reg):
    P = cs.load_polytope(name, **RELAX_CASES[name])
    u = torch.zeros((0,) + P.shape, dtype=torch.float64, requires_grad=True)
    x = cs.relax(u, P, reg, 1.0, backend="torch")
    x.sum().backward()
    assert x.shape == u.shape and u.grad.shape == u.shape


def _newton_and_kkt_solve(sf, gen):
    """``(newton, r1, r2, ref)``: the solver's factorization of ``[[M, Aᵀ], [A, 0]]`` for three
    random M (weights over six orders of magnitude) and right-hand sides, and a dense solve."""
    from convex_sst.solver import _Newton, _tensors

    T = _tensors(sf, torch.float64, torch.device("cpu"))
    (m, n), p = sf.A.shape, sf.G.shape[0]
    D = torch.rand(3, n, generator=gen, dtype=torch.float64) * 10 ** (6 * torch.rand(3, n, generator=gen, dtype=torch.float64) - 3)
    Sig = torch.rand(3, p, generator=gen, dtype=torch.float64) * 10 ** (6 * torch.rand(3, p, generator=gen, dtype=torch.float64) - 3)
    A, G = torch.as_tensor(sf.A.toarray()), torch.as_tensor(sf.G.toarray())
    M = torch.diag_embed(D) + G.T @ torch.diag_embed(Sig) @ G
    K = torch.cat([torch.cat([M, A.expand(3, m, n).mT], 2), torch.cat([A.expand(3, m, n), torch.zeros(3, m, m, dtype=torch.float64)], 2)], 1)
    r1 = torch.randn(3, n, generator=gen, dtype=torch.float64)
    r2 = torch.randn(3, m, generator=gen, dtype=torch.float64)
    rhs = torch.cat([r1, r2], 1)
    # one matrix at a time: after an explicit torch.set_num_threads (tests that check it ran
    # before), torch's batched LU of order >= 150 is wrong (pytorch/pytorch#142815)
    ref = torch.stack([torch.linalg.solve(K[i], rhs[i]) for i in range(3)])
    return _Newton(T, D, Sig if p else None), r1, r2, ref


@pytest.mark.parametrize("name, params, reg, m1", [
    ("spanning_tree", {"n": 5}, "binary_entropy", 10),  # the rows x = C y: one per edge
    ("birkhoff", {"n": 4}, "entropy", 4),               # the row sums (disjoint variables)
    ("k_subset", {"n": 6, "k": 2}, "quadratic", 1),      # one row: S is 1 x 1, no Cholesky
    ("matching", {"n": 4, "m": 6}, "entropy", 1),        # dense blocks
])
def test_newton_solve_with_eliminated_diagonal_rows(name, params, reg, m1, gen):
    """Equality rows in disjoint blocks are eliminated from S = A M⁻¹ Aᵀ in closed form; the
    Newton solve must still equal a dense solve of [[M, Aᵀ], [A, 0]]."""
    from convex_sst.solver import standard_form

    P = cs.load_polytope(name, **params)
    sf = standard_form(P, get_regularizer(reg))
    assert sf.m1 == m1
    newton, r1, r2, ref = _newton_and_kkt_solve(sf, gen)
    for refine in (False, True):  # without refinement: the elimination alone must be exact
        got = torch.cat(newton.solve(r1, r2, refine=refine), 1)
        assert ((got - ref).abs().amax(1) / ref.abs().amax(1)).max() < 1e-8


BANDED_CASES = [("correlated_k_subset", {"n": 10, "k": 3}), ("arborescence", {"n": 5}),
                ("spanning_tree", {"n": 6, "edges": [[i, i + 1] for i in range(5)] + [[i, i + 2] for i in range(4)]}),
                ("dag_path", {"n": 14, "edges": [[i, j] for i in range(14) for j in (i + 1, i + 2) if j < 14],
                              "source": 0, "target": 13})]


def _banded_copy(monkeypatch, tmp_path, name, params, reg):
    """A user copy of the built-in whose reduced Schur complement is factored block by block
    (the rule that decides it forced, so small problems take it), and its standard form."""
    from convex_sst.solver import standard_form

    monkeypatch.setattr(solver, "_BAND_SHARE", math.inf)
    monkeypatch.setattr(solver, "_BAND_MIN_BLOCKS", 2)
    P = cs.load_polytope(user_copy(tmp_path, name), **params)
    sf = standard_form(P, get_regularizer(reg))
    assert sf.band > 0 and sf.m1 > 0 and -(-(sf.A.shape[0] - sf.m1) // sf.band) >= 2
    return P, sf


@pytest.mark.parametrize("name, params", BANDED_CASES)
@pytest.mark.parametrize("reg", ["entropy", "quadratic"])
def test_newton_solve_with_a_banded_schur_complement(name, params, reg, gen, monkeypatch, tmp_path):
    """The reduced matrix ``S22 − W Wᵀ`` of rows in a reverse Cuthill-McKee order, assembled and
    factored block by block (block tridiagonal), against a dense solve of [[M, Aᵀ], [A, 0]],
    with weights spread over six orders of magnitude. Without the refinement step the dense
    factorization is off by up to 1.2e-6 on these draws (correlated k-subsets), the blocks by
    1.3e-6; with it, 1.3e-10 and 1.6e-10."""
    _, sf = _banded_copy(monkeypatch, tmp_path, name, params, reg)
    newton, r1, r2, ref = _newton_and_kkt_solve(sf, gen)
    assert newton.band == sf.band
    for refine, tol in ((False, 1e-5), (True, 1e-8)):
        got = torch.cat(newton.solve(r1, r2, refine=refine), 1)
        assert ((got - ref).abs().amax(1) / ref.abs().amax(1)).max() < tol


@pytest.mark.parametrize("name, params", BANDED_CASES)
@pytest.mark.parametrize("reg", ["entropy", "quadratic"])
def test_banded_schur_complement_gives_the_dense_relaxation(name, params, reg, gen, monkeypatch, tmp_path):
    """The torch solver with the block-tridiagonal factorization equals it with the dense one
    (values and VJPs, t = 1 and 0.1, a forbidden entry in some rows): the same iterates up to
    rounding."""
    P0 = cs.load_polytope(name, **params)
    u = torch.randn((8,) + P0.shape, generator=gen, dtype=torch.float64)
    u.view(8, -1)[::3, 1] = -math.inf
    v = torch.randn_like(u)

    def run(P, t):
        w = u.clone().requires_grad_(True)
        with warnings.catch_warnings():
            warnings.simplefilter("error", cs.SolverWarning)
            x = cs.relax(w, P, reg, t, backend="torch")
        return x.detach(), torch.autograd.grad((x * v.masked_fill(~torch.isfinite(u), 0.0)).sum(), w)[0]

    dense = {t: run(P0, t) for t in (1.0, 0.1)}
    P, _ = _banded_copy(monkeypatch, tmp_path, name, params, reg)
    for t in (1.0, 0.1):
        x, g = run(P, t)
        assert (x - dense[t][0]).abs().max() < 1e-9 and (g - dense[t][1]).abs().max() < 1e-7, t


@pytest.mark.parametrize("name, params", [("spanning_tree", {"n": 5}), ("arborescence", {"n": 4})])
@pytest.mark.parametrize("reg", ["entropy", "binary_entropy", "quadratic"])
def test_flow_formulations_converge_on_every_row(name, params, reg):
    """A regression guard: on these 128 rows every sample converges (a Schur complement scaled
    by its own cancelled diagonal once left 1-2 rows per batch at the iteration cap, with
    gradients off by O(1)); the gradients match the previous release's to 1e-6."""
    P = cs.load_polytope(name, **params)
    u = torch.randn((128,) + P.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x, report = solve_torch(u, P, get_regularizer(reg))
    assert bool(report.converged.all()), (~report.converged).nonzero().reshape(-1).tolist()
    assert int(report.iterations.max()) < 40


@pytest.mark.parametrize("reg", ["entropy", "binary_entropy"])
@pytest.mark.parametrize("temperature", [1.0, 0.1])
def test_flow_formulation_without_constant_variables_converges_at_n8(reg, temperature):
    """Spanning trees on 8 vertices: the flows on arcs into the root (and the capacity rows they
    sat in) are constant on P, 98 of 476 variables; left in as degenerate complementarity pairs
    they made 1-2 % of the rows stall above the accepted residual (at t = 0.1: 3 of these 128
    with binary entropy). They are eliminated, and every row converges."""
    from convex_sst.solver import standard_form

    P = cs.load_polytope("spanning_tree", n=8)
    sf = standard_form(P, get_regularizer(reg))
    assert sf.A.shape[1] == P.form.num_z - 98 and sf.structure == "star"
    u = torch.randn((128,) + P.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64) / temperature
    _, report = solve_torch(u, P, get_regularizer(reg))
    assert bool(report.converged.all()), (~report.converged).nonzero().reshape(-1).tolist()


def test_rows_stalled_near_the_tolerance_stop_and_are_reported():
    """Two rows of this batch (spanning trees n = 8, quadratic, t = 1) stall at a KKT residual of
    2e-8, above `accept` (1e-8): without the stall rule for rows within 1e4·accept they ran to
    the 100-iteration cap. They now stop after 8 steps without halving, and cost the batch no
    more iterations than its converging rows; the polish then brings both below 1e-9 (x within
    1e-9 of SCS at 1e-12, from 2e-7 and 5e-7). A row the polish cannot improve is reported.

    Which rows stall depends on which of the dependent equality rows (one per commodity) the
    rank test drops. Since that test runs per component of rows, row 110 stalls at 1.7e-8
    (x within 1.3e-7 of SCS) and is reported; over 108 batches of 128 flow problems (spanning
    trees and arborescences, four regularizer settings) 14 rows were reported, against 13 before."""
    P = cs.load_polytope("spanning_tree", n=8)
    g = torch.Generator().manual_seed(1)
    u = torch.randn((128,) + P.shape, generator=g, dtype=torch.float64)
    _, report = solve_torch(u, P, get_regularizer("quadratic"))
    assert int(report.iterations.max()) <= 40, report.iterations.max()
    assert report.status[22] == report.status[50] == "converged"   # the two rows that stalled
    reported = (~report.converged).nonzero().reshape(-1).tolist()
    assert len(reported) <= 1 and all(report.status[i] == "max_iter" and report.kkt_residual[i] < 1e-7 for i in reported)


@pytest.mark.parametrize("n", [4, 5])
@pytest.mark.parametrize("reg", ["entropy", "quadratic"])
def test_arborescences_with_nearly_uniform_utilities_converge_exactly(n, reg, gen):
    """At u = 0 the answer is the uniform point, 1/(n − 1) on every arc, where the root's cut
    holds with equality and a zero multiplier (weakly active). The interior point stalled there
    on every row (x off by 8e-6 to 3e-5, a warning); the active-set polish now converges. Against
    a closed form (tests/oracles.py), with the root's arcs favoured (cut slack) or disfavoured
    (cut held by a positive multiplier) at scales 0 to 1e-3."""
    import numpy as np
    from oracles import arborescence_cut_slack, near_uniform_arborescence

    P = cs.load_polytope("arborescence", n=n, root=0)
    for delta in (0.0, 1e-6, 1e-4, 1e-3):
        for sign in (1.0, -1.0):
            v = torch.randn(8, n, n, generator=gen, dtype=torch.float64)
            v[:, 0] += 2.0 * sign
            u = delta * v
            ref = np.stack([near_uniform_arborescence(r, 0, reg) for r in u.numpy()])
            assert min(arborescence_cut_slack(r, 0) for r in ref) > 0.1   # the closed form is exact here
            x = cs.relax(u, P, reg, 1.0, backend="torch", on_failure="raise")
            err = np.abs(x.numpy() - ref).max()
            assert err < (1e-10 if delta <= 1e-6 else 5e-8), (delta, sign, err)


@pytest.mark.parametrize("name, params", [("spanning_tree", {"n": 5}), ("arborescence", {"n": 4}), ("birkhoff", {"n": 3}),
                                          ("correlated_k_subset", {"n": 4, "k": 4}), ("dag_path", {})])
def test_constant_variables_match_range_lps(name, params):
    """The shortcut (a feasible point, LPs that move the variables at a bound off it together,
    two LPs for any others) finds exactly the variables whose range over P is a point, with
    their values."""
    import numpy as np

    P = cs.load_polytope(name, **params)
    mask, values = P.lp.constant_variables()
    ranges = np.array([P.lp.z_range(j) for j in range(P.form.num_z)])
    expect = np.abs(ranges[:, 1] - ranges[:, 0]) <= 1e-9
    assert (mask == expect).all() and np.allclose(values[mask], ranges[mask, 0])
    assert mask.any() == (name not in ("birkhoff", "dag_path"))


@pytest.mark.parametrize("seed", range(3))
def test_constant_variables_of_random_user_polytopes_match_range_lps(seed, tmp_path):
    # user configs of random polytopes (not integral; some coordinates pinned at an interior
    # value by tight rows, which only the range LPs test): exactly the variables whose range is
    # a point (the first version also pinned interior ones the capped LP could not move)
    import numpy as np
    from oracles import random_constraint_config

    pinned = 0
    for P, ranges in _random_polytopes(random_constraint_config, seed, tmp_path):
        mask, values = P.lp.constant_variables()
        expect = np.abs(ranges[:, 1] - ranges[:, 0]) <= 1e-9
        assert (mask == expect).all() and np.allclose(values[mask], ranges[mask, 0]), P
        pinned += int(mask.any())
    assert pinned >= 3


def _random_polytopes(make_config, seed: int, folder, count: int = 40):
    """``(P, ranges)`` for the loadable ones of ``count`` random user configs
    (``make_config(rng, name)``), ``ranges: (num_z, 2)`` each variable's range LPs."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        path = folder / f"random_{i}.yaml"
        path.write_text(make_config(rng, f"random_{make_config.__name__}_{seed}_{i}"))
        try:
            P = cs.load_polytope(path)
        except cs.PolytopeError:
            continue
        yield P, np.array([P.lp.z_range(j) for j in range(P.form.num_z)])


def _aux_config(rng, name: str) -> str:
    """A user config (YAML text) with auxiliary variables z, some declared in [0, 1], the others
    bounded (if at all) only through the rows: k·x_r = Σ of some z, a few random rows through an
    interior point, Σz ≤ len(z)."""
    nx, nz = int(rng.integers(2, 6)), int(rng.integers(2, 7))
    z0 = rng.uniform(0.1, 0.9, nz)
    lines = [f"name: {name}", f"output: {{name: x, shape: [{nx}]}}", "variables:", f"  z: [{nz}]", "constraints:",
             "  - 0 <= x <= 1", f"  - sum(z) <= {nz}"]
    lines += [f"  - 0 <= z[{j}] <= 1" for j in range(nz) if rng.random() < 0.4]
    for r in range(nx):
        cols = np.flatnonzero(rng.random(nz) < 0.5)
        cols = cols if cols.size else [int(rng.integers(0, nz))]
        lines.append(f"  - {len(cols)} * x[{r}] == " + " + ".join(f"z[{c}]" for c in cols))
    for kind in ["=="] * int(rng.integers(0, 2)) + ["<="] * int(rng.integers(0, 3)):
        a = rng.integers(-2, 3, nz) * (rng.random(nz) < 0.6)
        if a.any():
            rhs = a @ z0 + (0.0 if kind == "==" or rng.random() < 0.3 else rng.uniform(0, 0.5))
            lines.append("  - " + " + ".join(f"{int(v)} * z[{j}]" for j, v in enumerate(a) if v) + f" {kind} {rhs:.15g}")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("seed", range(2))
def test_implied_bounds_contain_the_ranges_over_P(seed, tmp_path):
    # bound propagation must never cut into P: against the range LPs of every variable, on user
    # configs whose auxiliary variables are bounded only through their rows; the search for
    # constant variables, which uses these bounds, against the same ranges
    closed = pinned = 0
    for P, ranges in _random_polytopes(_aux_config, seed, tmp_path):
        lo, hi = P.form.implied_bounds()
        assert (lo <= ranges[:, 0] + 1e-9).all() and (hi >= ranges[:, 1] - 1e-9).all(), P
        assert (lo >= P.form.lb).all() and (hi <= P.form.ub).all()
        free = ~np.isfinite(P.form.lb) & ~np.isfinite(P.form.ub)
        closed += int((free & np.isfinite(lo) & np.isfinite(hi)).sum())
        mask, values = P.lp.constant_variables()
        expect = np.abs(ranges[:, 1] - ranges[:, 0]) <= 1e-9
        assert (mask == expect).all() and np.allclose(values[mask], ranges[mask, 0]), P
        pinned += int((mask & free).any())
    assert closed >= 20 and pinned >= 1


@pytest.mark.parametrize("seed", range(2))
@pytest.mark.parametrize("network", [False, True])
def test_independent_rows_per_component_span_the_rows(seed, network, monkeypatch):
    # the rank test of the equality rows is done per connected component of rows (the flow
    # formulations: one per commodity): the rows kept must be independent and span all rows, as
    # one pivoted QR of the whole matrix finds; on built-ins and random configs with several
    # components, dependent rows included (a sum of others, a copy). With `network`, every
    # component first tries the exact rule for rows with a column of their own and flow
    # conservation (_network_rows, else the QR), which large components take
    import scipy.sparse as sp

    from convex_sst.solver import _independent_rows, _network_rows

    if network:
        monkeypatch.setattr(solver, "_QR_MAX_ROWS", 0)
    rng = np.random.default_rng(seed)
    flows = [cs.load_polytope(name, **params).form.A_eq for name, params in
             [("correlated_k_subset", {"n": 12, "k": 4}), ("spanning_tree", {"n": 6}), ("arborescence", {"n": 5}),
              ("dag_path", {"n": 7, "edges": [[i, j] for i in range(7) for j in range(i + 1, 7)], "source": 0, "target": 6})]]
    for A in flows:  # these take the exact rule, not the QR
        assert _network_rows(sp.csr_matrix(A)) is not None
    cases = flows + [cs.load_polytope(name, **params).form.A_eq for name, params in
                     [("birkhoff", {"n": 4}), ("correlated_k_subset", {"n": 6, "k": 3}), ("matching", {"n": 3, "m": 4})]]
    for _ in range(20):
        blocks = []
        for _ in range(int(rng.integers(1, 4))):
            B = rng.integers(-2, 3, (int(rng.integers(1, 5)), int(rng.integers(2, 7)))).astype(float)
            if rng.random() < 0.5:
                B = np.vstack([B, B[:1] + B[-1:], 2.0 * B[:1]])
            blocks.append(B)
        A = sp.block_diag(blocks, format="csr")
        A = A[rng.permutation(A.shape[0])][:, rng.permutation(A.shape[1])]
        cases.append(A[np.diff(A.tocsr().indptr) > 0])
    for A in cases:
        A = sp.csr_matrix(A)
        sel = _independent_rows(A)
        rank = np.linalg.matrix_rank(A.toarray())
        assert len(sel) == rank == np.linalg.matrix_rank(A.toarray()[sel])
        assert (np.diff(sel) > 0).all()


@pytest.mark.parametrize("reg", ["entropy", "quadratic"])
def test_standard_form_of_flow_formulations_needs_no_range_lps(reg, monkeypatch):
    """The arc variables y of the flow formulations have no declared bounds; the torch solver's
    standard form gave each free one its range over P, two LPs (38 arcs of spanning trees on 20
    vertices: 14 s of a first call of 22 s). Bound propagation finds y ∈ [0, 1] (from
    0 ≤ f ≤ y, then Σ_in y = 1), the ranges themselves; for the arcs into the root, y ∈ [0, 0]:
    constant without the two LPs each that the search for constant variables gave them."""
    from convex_sst.lp import LinearProgram

    for name, params in [("spanning_tree", {"n": 7}), ("arborescence", {"n": 6})]:
        P = cs.load_polytope(name, **params)
        lo, hi = P.form.implied_bounds()
        aux = slice(P.form.out_size, None)
        assert np.isfinite(lo).all() and np.isfinite(hi).all()
        assert (lo[aux] == 0).all() and np.isin(hi[aux], [0.0, 1.0]).all()  # 0: arcs into the root
        P.cache.pop(("torch_form", get_regularizer(reg)), None)
        monkeypatch.setattr(P, "_lp", LinearProgram(P.form))  # constant variables found afresh: the
        monkeypatch.setattr(P._lp, "z_range", lambda j: pytest.fail(f"range LP for z[{j}]"))  # root's arcs too
        sf = solver.standard_form(P, get_regularizer(reg))
        assert (np.isfinite(sf.L[sf.d:]) | np.isfinite(sf.U[sf.d:])).all()
        u = torch.randn((4,) + P.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        _, report = solve_torch(u, P, get_regularizer(reg))
        assert bool(report.converged.all())


def test_auxiliary_variables_that_propagation_cannot_bound_get_their_ranges(tmp_path):
    # z[0] + z[1] = x[0] and z[0] − z[1] = x[1]: each row has two free variables, so propagation
    # leaves z unbounded; the range LPs bound it (z[0] in [0, 1/2], z[1] in [-1/2, 1/2]), and the
    # torch solver agrees with the generic path
    path = tmp_path / "rotated.yaml"
    path.write_text("name: rotated\noutput: {name: x, shape: [3]}\nvariables:\n  z: [2]\nconstraints:\n"
                    "  - z[0] + z[1] == x[0]\n  - z[0] - z[1] == x[1]\n  - sum(x) == 1\n  - 0 <= x <= 1\n")
    P = cs.load_polytope(path)
    lo, hi = P.form.implied_bounds()
    assert not np.isfinite(lo[3:]).any() and not np.isfinite(hi[3:]).any()
    sf = solver.standard_form(P, get_regularizer("entropy"))
    assert np.allclose(sf.L[sf.d:], [-1.0, -1.5]) and np.allclose(sf.U[sf.d:], [1.5, 1.5])
    u = torch.randn(4, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = cs.relax(u, P, "entropy", backend="torch", on_failure="raise")
    assert (x - torch.softmax(u, -1)).abs().max() < 1e-8  # P is the simplex


@pytest.mark.parametrize("name, params", [("k_subset", {"n": 3, "k": 3}), ("spanning_tree", {"n": 2}),
                                          ("arborescence", {"n": 2})])
def test_single_point_polytopes_work_in_every_backend(name, params):
    # k = n, the tree on two vertices: P is one point (the torch solver's presolve leaves no
    # free coordinate, and it raised IndexError; exp_family returned a tensor outside the graph)
    import warnings

    P = cs.load_polytope(name, **params)
    point = P.argmax(torch.zeros(P.shape, dtype=torch.float64))
    for reg in P.regularizers:
        for backend in ("auto", "torch", "generic"):
            if reg == "exp_family" and backend != "auto":  # no torch or generic path
                continue
            u = torch.randn((2,) + P.shape, dtype=torch.float64, requires_grad=True)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                x = cs.relax(u, P, reg, 0.5, backend=backend)
            assert (x - point).abs().max() < 1e-6, (reg, backend)
            (g,) = torch.autograd.grad((x * torch.randn_like(x)).sum(), u)
            assert g.abs().max() < 1e-6, (reg, backend)


def test_spanning_trees_of_a_sparse_graph_converge_where_the_active_set_cycles():
    # A row from a fuzz over random 8-vertex graphs (entropy, t = 1, 4800 rows: 4 warned, x off
    # by up to 1.2e-4 from SCS): its interior point stalls at a KKT residual of 8e-8, and the
    # polish's active set needs 4 rounds to settle (3 were allowed; now at most 8)
    E = [(0, 1), (0, 6), (1, 2), (2, 3), (3, 4), (3, 6), (4, 5), (4, 7), (5, 6), (6, 7)]
    P = cs.load_polytope("spanning_tree", n=8, edges=E)
    u = torch.tensor([[0.8076693001592299, 0.1506596596660957, -0.017338961354023942, -1.5765100594079122,
                       0.7731442616505235, -1.1976211524521163, -0.295383636461089, -0.5251374131355846,
                       -0.07756933899723172, -0.03552874420531355]], dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", cs.SolverWarning)
        x = cs.relax(u, P, "entropy", 1.0, backend="torch")
    ref = cs.relax(u, P, "entropy", 1.0, backend="generic", solver="scs",
                   solver_args={"eps_abs": 1e-11, "eps_rel": 1e-11, "max_iters": 1_000_000})
    assert (x - ref).abs().max() < 1e-8


def test_polish_ignores_multipliers_left_at_the_rounding_floor():
    # Two rows of the same sparse-graph fuzz (quadratic, t = 1). Row 1 puts an edge exactly at
    # its bound 1, where float64 cannot represent the gap: the interior point's multiplier of
    # that bound reached 1.2e290 (hidden from the residual, which divides by zu / gap) and the
    # polish, which started its augmented Lagrangian from it, diverged (|z| ~ 1e279), leaving
    # the row reported as not converged
    E = [(0, 1), (1, 2), (1, 3), (2, 3), (3, 4), (3, 7), (4, 5), (5, 6), (6, 7)]
    P = cs.load_polytope("spanning_tree", n=8, edges=E)
    u = torch.tensor([[-1.2459542174992932, -2.354428356986766, -1.0673250331832682, 0.13129742597049512,
                       1.6975010003953692, -0.3753843058048364, -0.9002435159177389, -2.6901723994920226,
                       -0.8411294101827805],
                      [0.08486881549069626, -0.5026062801335801, -0.23339510349889922, -0.7442653196754081,
                       0.47529537448082537, 0.8236754850351727, 1.0289378142601278, 0.3409521423778785,
                       -0.3868626864584022]], dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", cs.SolverWarning)
        x = cs.relax(u, P, "quadratic", 1.0, backend="torch")
    ref = cs.relax(u, P, "quadratic", 1.0, backend="generic", solver="scs",
                   solver_args={"eps_abs": 1e-11, "eps_rel": 1e-11, "max_iters": 1_000_000})
    assert (x - ref).abs().max() < 1e-7  # 1.5e-8 measured (SCS itself is not exact here)


@pytest.mark.parametrize("seed", [0, 5])
def test_backward_holds_active_constraints_with_small_multipliers(seed):
    """An active inequality whose multiplier is small keeps a slack of μ_pair/λ, above the old
    1e-7 threshold: a matching's column at capacity with β = 5e-4 was dropped from the backward
    (gradients off by up to 0.08 on 4 and 5 of the 256 rows here; 19 of 1536 over seeds 0-5).
    Holding constraints with λ > 100 s left 2 of them (seed 0: a pair the iterations had not
    resolved, true dual 2e-5, slack 6e-6); counting the largest unresolved complementarity pair
    in the convergence test resolves it. The Sinkhorn fast path is the oracle."""
    g = torch.Generator().manual_seed(seed)
    P = cs.load_polytope("matching", n=20, m=30)
    u = torch.randn((256,) + P.shape, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn((256,) + P.shape, generator=g, dtype=torch.float64)
    xt = cs.relax(u, P, "entropy", 1.0, backend="torch")
    (gt,) = torch.autograd.grad((xt * w).sum(), u)
    xf = cs.relax(u, P, "entropy", 1.0, backend="fast")
    (gf,) = torch.autograd.grad((xf * w).sum(), u)
    assert (xt - xf).abs().max() < 1e-6
    err = (gt - gf).reshape(256, -1).abs().amax(1)
    assert bool((err <= 1e-5).all()), err.max()


def test_every_complementarity_pair_converges():
    """The convergence test bounded the mean complementarity over all pairs: one pair
    could lag at 1.6e-9 on a row reported converged, a column whose true dual is 1.3e-4 left
    at slack 1.2e-5 and x off by 5.9e-6. The largest unresolved pair (slack and multiplier
    within 1e4 of each other) now counts too."""
    g = torch.Generator().manual_seed(1)
    P = cs.load_polytope("matching", n=8, m=12)
    for _ in range(3):  # the draws of t = 1 (u, w), then u at t = 0.1
        u = torch.randn((256,) + P.shape, generator=g, dtype=torch.float64)
    x, rep = solve_torch(u / 0.1, P, get_regularizer("entropy"))
    assert bool(rep.converged.all())
    ref = cs.relax(u, P, "entropy", 0.1, backend="fast")
    assert (x - ref).abs().max() < 1e-7


GROUP_SUBSET = """
name: group_subset
params:
  n: {type: int, min: 1}
  k: {type: int, min: 1, max: n}
  groups: {type: int_list}
data:
  G: group_indicator(groups)
output: {name: x, shape: [n]}
constraints:
  - sum(x) == k
  - G @ x <= 1
  - 0 <= x <= 1
"""


@pytest.mark.parametrize("reg, row", [("entropy", 183), ("quadratic", 211)])
def test_backward_of_the_group_subset_example_matches_clarabel(reg, row, tmp_path):
    """The worked example of docs/polytope-config.md (k items, at most one per group): on these
    rows the old backward dropped a group constraint at capacity, gradients off by 0.19
    (entropy) and 4.2 (quadratic) from cvxpylayers with Clarabel at 1e-12; now 3e-6, 7e-7."""
    path = tmp_path / "group_subset.yaml"
    path.write_text(GROUP_SUBSET)
    P = cs.load_polytope(str(path), n=30, k=6, groups=[i // 3 for i in range(30)])
    g = torch.Generator().manual_seed(7)
    draws = {r: [torch.randn((256,) + P.shape, generator=g, dtype=torch.float64) for _ in range(6)]
             for r in ("entropy", "binary_entropy", "quadratic")}  # t = 1, 0.3, 0.1: (u, w) each
    u, w = draws[reg][2], draws[reg][3]                               # t = 0.3
    u = u.requires_grad_(True)
    x = cs.relax(u, P, reg, 0.3, backend="torch")
    (gt,) = torch.autograd.grad((x * w).sum(), u)
    ur = u[row:row + 1].detach().requires_grad_(True)
    xr = cs.relax(ur, P, reg, 0.3, backend="generic", solver="clarabel",
                  solver_args={"tol_gap_abs": 1e-12, "tol_gap_rel": 1e-12, "tol_feas": 1e-12})
    (gr,) = torch.autograd.grad((xr * w[row:row + 1]).sum(), ur)
    assert (gt[row] - gr[0]).abs().max() < 1e-4


def test_backward_does_not_hold_weakly_active_flow_constraints():
    """Holding every constraint whose multiplier exceeded its slack 100 times also held weakly
    active ones of the flow formulation: this entry of a spanning tree's gradient came out
    -1.2e-6 against -1.13e-5 by central differences. Held from 1e4 times (the ratio at which the
    convergence test calls a pair resolved), it matches them."""
    P = cs.load_polytope("spanning_tree", n=6)
    u = torch.tensor([[0.2223420676765549, 1.0131577595784498, 1.6216370261116975, -0.6470009602051291,
                       0.3785916482522874, 1.3414656406536491, 1.6122682927478813, 1.2384231232061784,
                       -0.08287647352901194, -1.1880425116994742, 0.05680529901881791, 0.09705323205234657,
                       0.5800709872279685, -0.5010264568046188, 1.0057732230200487]], dtype=torch.float64)
    w = torch.arange(P.size, dtype=torch.float64)
    ug = u.clone().requires_grad_(True)
    (g,) = torch.autograd.grad((cs.relax(ug, P, "binary_entropy", 0.1, backend="torch") * w).sum(), ug)
    h, e = 1e-5, torch.zeros_like(u)
    e[0, 3] = h
    fd = ((cs.relax(u + e, P, "binary_entropy", 0.1, backend="torch")
           - cs.relax(u - e, P, "binary_entropy", 0.1, backend="torch")) * w).sum() / (2 * h)
    assert abs(g[0, 3] - fd) < 1e-7, (g[0, 3].item(), fd.item())


@pytest.mark.parametrize("name, reg", SEPARABLE)
def test_torch_solver_ignores_a_common_offset_where_the_total_is_fixed(name, reg, gen):
    # where Σx is the same on all of P, θ + c has the same relaxation for every c; the solvers
    # centre each row. Before, the torch solver's tolerances (relative to max|θ|) loosened with c
    # (x off by up to 1.6e-6 at c = 1000), and at c = -1000 it took every entry for a manual mask
    # (raised them all, found the rows tied and solved every row again). Elsewhere (the cube, DAG
    # paths) an offset is a different problem and must not be removed.
    P = cs.load_polytope(name, **RELAX_CASES[name])
    u = torch.randn((8,) + P.shape, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn((8,) + P.shape, generator=gen, dtype=torch.float64)
    x = cs.relax(u, P, reg, 0.5, backend="torch")
    (g,) = torch.autograd.grad((x * w).sum(), u)
    fixed_total = name not in ("hypercube", "dag_path", "correlated_k_subset")  # pairs vary
    for c in (-1000.0, 1000.0):
        xc = cs.relax(u + c, P, reg, 0.5, backend="torch")
        (gc,) = torch.autograd.grad((xc * w).sum(), u)
        if fixed_total:
            assert (xc - x).abs().max() < 1e-9 and (gc - g).abs().max() < 1e-7, c
        else:
            assert (xc - x).abs().max() > 0.1, c


FAR_ABOVE_CASES = [(name, params, reg) for name, params in
                   (("simplex", {"n": 6}), ("k_subset", {"n": 6, "k": 2}), ("hypercube", {"n": 6}),
                    ("birkhoff", {"n": 4}), ("matching", {"n": 3, "m": 4}), ("dag_path", {"n": 5}),
                    ("spanning_tree", {"n": 4}), ("arborescence", {"n": 4}))
                   for reg in ("entropy", "binary_entropy", "quadratic")]


@pytest.mark.parametrize("name, params, reg", FAR_ABOVE_CASES)
def test_torch_solver_is_accurate_with_an_entry_far_above_the_others(name, params, reg, gen):
    # θ_j = u_j + 1e9 forces coordinate j to its largest value. Judged against one scale,
    # 1 + max|θ|, the tolerances let the other coordinates off by tol·1e9, with no warning: x off
    # by 2e-4 to 1.8e-2 at 1e9 (and up to 1e-4 at 1e6) against the same problem at u_j + 200,
    # whose solution is the same to e^-100; the flow formulations (spanning trees,
    # arborescences) lost x to rounding, off by up to 0.4. The binary entropy's iterate also
    # rounded onto x = 1, where its gradient is infinite. Reference: cvxpylayers at u_j + 200
    # (accurate to about 1e-6), and the solver itself there (where the row's scale is still
    # O(200)); cvxpylayers at 1e9 too (before: off by up to 6.6e-3, or a SolverError).
    P = cs.load_polytope(name, **params)
    u = torch.randn(6, P.size, generator=gen, dtype=torch.float64)
    w = torch.randn(6, P.size, generator=gen, dtype=torch.float64)

    def relax(offset: float, backend: str = "torch") -> tuple[torch.Tensor, torch.Tensor]:
        uu = u.clone()
        uu[:, 1] += offset
        uu = uu.reshape((6,) + P.shape).requires_grad_(True)
        with warnings.catch_warnings():
            warnings.simplefilter("error", cs.SolverWarning)
            x = cs.relax(uu, P, reg, 1.0, backend=backend).reshape(6, -1)
        (g,) = torch.autograd.grad((x * w).sum(), uu)
        return x.detach(), g.reshape(6, -1)

    xg, _ = relax(200.0, "generic")
    x200, g200 = relax(200.0)
    for offset in (1e6, 1e9):
        x, g = relax(offset)
        assert (x - xg).abs().max() < 1e-5, offset
        assert (x - x200).abs().max() < 1e-8 and (g - g200).abs().max() < 1e-7, offset
    if reg != "binary_entropy":  # (cvxpylayers' exponential cones: slow)
        assert (relax(1e9, "generic")[0] - xg).abs().max() < 2e-5


@pytest.mark.parametrize("name, params, forced, masked", [
    ("spanning_tree", {"n": 5}, [1, 2, 3, 6, 7, 8, 9, 1], [4, 5, 6, 2, 3, 4, 5, 7]),
    # arcs (i, j), j ≠ 0, i ≠ j, as flat indices i·4 + j
    ("arborescence", {"n": 4}, [1, 2, 3, 6, 7, 9, 11, 13], [6, 7, 9, 11, 13, 14, 1, 2])])
def test_torch_solver_with_forced_and_forbidden_entries_together(name, params, forced, masked, gen):
    # -inf entries reach the solver as stand-ins far below the others, computed from the entries
    # as given: with one at u_j + 1e9 they sat near -4e9 after it was lowered, and the flow
    # formulations lost x to them (spanning trees: 3 rows of 8 warned about, residuals up to
    # 1.6e-7; arborescences: no warning, x off by 4.7e-8). They are now
    # set to the level of the lowered entries. One forced entry per row (two would be compared
    # through 1e9 + u, which float64 rounds to 1e-7).
    P = cs.load_polytope(name, **params)
    B = 8
    u = torch.randn(B, P.size, generator=gen, dtype=torch.float64)
    rows, forced, masked = torch.arange(B), torch.tensor(forced), torch.tensor(masked)  # one of each per row
    u[rows, masked] = float("-inf")
    for reg in ("entropy", "binary_entropy", "quadratic"):
        def relax(offset: float) -> torch.Tensor:
            uu = u.clone()
            uu[rows, forced] += offset
            with warnings.catch_warnings():
                warnings.simplefilter("error", cs.SolverWarning)
                return cs.relax(uu.reshape((B,) + P.shape), P, reg, 1.0, backend="torch")
        assert (relax(1e9) - relax(200.0)).abs().max() < 1e-8, reg


@pytest.mark.parametrize("name, params", [("birkhoff", {"n": 5}), ("matching", {"n": 3, "m": 5})])
@pytest.mark.parametrize("reg", ["binary_entropy", "quadratic"])
def test_torch_solver_ignores_offsets_per_row_and_column(name, params, reg, gen):
    # θ_ij + r_i (+ c_j on a Birkhoff polytope) is the same problem: each row (column) sums to
    # one. The tolerances are relative to max|θ|, and offsets of 1e4·i (1e6·i) per row cost x up
    # to 3.6e-6 (1.2e-4, the quadratic, 16 rows); the solver now takes out the medians along the
    # equality rows first
    P = cs.load_polytope(name, **params)
    u = torch.randn((6,) + P.shape, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn((6,) + P.shape, generator=gen, dtype=torch.float64)
    x = cs.relax(u, P, reg, 1.0, backend="torch")
    (g,) = torch.autograd.grad((x * w).sum(), u)
    rows = torch.arange(P.shape[0], dtype=torch.float64)[:, None]
    cols = torch.arange(P.shape[1], dtype=torch.float64)[None, :] if name == "birkhoff" else 0.0
    for c in (1e4, 1e6):
        with warnings.catch_warnings():
            warnings.simplefilter("error", cs.SolverWarning)
            xc = cs.relax(u + c * rows - 0.7 * c * cols, P, reg, 1.0, backend="torch")
        (gc,) = torch.autograd.grad((xc * w).sum(), u)
        assert (xc - x).abs().max() < 1e-9 and (gc - g).abs().max() < 1e-7, c


@pytest.mark.parametrize("name, params", [("simplex", {"n": 6}), ("k_subset", {"n": 6, "k": 2}), ("hypercube", {"n": 6})])
def test_torch_solver_is_exact_on_tied_utilities_with_the_quadratic(name, params, gen):
    # small integer utilities tie, and the quadratic's projection then sits on bounds with zero
    # multipliers: the interior-point iterates approach those only like sqrt(μ), and rows were
    # reported converged with x off by up to 1.7e-6 (in 19 to 64 rows of 64). Such rows are now
    # polished, holding only the resolved active constraints. Reference: the exact fast paths
    # (sparsemax, the capped-simplex projection, clipping)
    P = cs.load_polytope(name, **params)
    u = torch.randint(-2, 3, (64, P.size), generator=gen).to(torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", cs.SolverWarning)
        x = cs.relax(u, P, "quadratic", 1.0, backend="torch")
    ref = u.clamp(0.0, 1.0) if name == "hypercube" else cs.relax(u, P, "quadratic", 1.0, backend="fast")
    assert (x - ref).abs().max() < 1e-9


WEAKLY_ACTIVE = {
    # x = min(1, exp(θ − 1 − τ)) with τ = 0: x_0 capped firmly, x_1 capped with multiplier δ
    "k_subset": ({"n": 8, "k": 3}, torch.tensor([1.0, 1.0, 0.4, 0.3, 0.15, 0.1, 0.04, 0.01], dtype=torch.float64),
                 (..., 1)),
    # x_ij = exp(θ_ij − 1 − a_i − b_j) with a = 0: column 0 full with multiplier b_0 = δ, the others not
    "matching": ({"n": 3, "m": 4}, torch.tensor([[0.5, 0.3, 0.1, 0.1], [0.3, 0.2, 0.4, 0.1], [0.2, 0.1, 0.1, 0.6]],
                              dtype=torch.float64),
                 (..., slice(None), 0)),
}


@pytest.mark.parametrize("name", sorted(WEAKLY_ACTIVE))
@pytest.mark.parametrize("t", [1.0, 0.1])
def test_torch_solver_resolves_weakly_active_constraints(name, t):
    # a constraint active with a small multiplier δ (a k-subset's x_1 <= 1, a matching's column
    # sum <= 1) left a slack and multiplier of similar size, both far above what the convergence
    # test bounds (their product): rows were reported converged with x off by up to 1.6e-6, and
    # the backward dropped the constraint (a matching's gradient off by 0.04, a k-subset's by 0.5).
    # Such rows are now polished. Reference: the entropy's closed form above, and the exact fast
    # paths' gradients (capped softmax, Sinkhorn)
    params, x_ref, where = WEAKLY_ACTIVE[name]
    P = cs.load_polytope(name, **params)
    deltas = torch.tensor([1e-6, 3e-6, 1e-5], dtype=torch.float64)
    theta = (1.0 + x_ref.log()).repeat(len(deltas), *(1,) * x_ref.dim())
    theta[where] += deltas[:, None] if name == "matching" else deltas
    if name == "k_subset":
        theta[:, 0] += 5.0  # firmly capped (at θ_0 = 1 it would sit on the kink, with multiplier 0)
    w = torch.linspace(-1.0, 1.0, P.size, dtype=torch.float64).reshape(P.shape)
    grads = []
    for backend in ("torch", "fast"):
        u = (t * theta).requires_grad_()
        with warnings.catch_warnings():
            warnings.simplefilter("error", cs.SolverWarning)
            x = cs.relax(u, P, "entropy", t, backend=backend)
        (x * w).sum().backward()
        grads.append(u.grad)
        assert (x.detach() - x_ref).abs().max() < 1e-9, backend
    assert (grads[0] - grads[1]).abs().max() < 1e-6 * max(1.0, 1.0 / t)


def test_torch_solver_resolves_a_nearly_full_column_next_to_tiny_entries():
    # Gaussian utilities (×5, t = 0.3) where column 0 of a matching is nearly full (slack 3e-7) or
    # full with a multiplier of 1e-4, beside entries down to 1e-33 and full columns whose slacks
    # reach 1e-13: the iterations stalled with column 0 unresolved, x off by up to 2.6e-6 (reported
    # converged), the gradient by 1.3e-3. The polish that resolves it needed per-coordinate steps
    # (one step length for the row let the tiny entries hold the others to 4 % steps) and the
    # held rows' slack counted as a primal residual, not a complementarity product
    P = cs.load_polytope("matching", n=5, m=6)
    theta = torch.tensor([[34.201, 30.198, -8.71, -16.936, 2.96, 8.623], [-4.371, -14.134, 3.551, 29.545, -14.092, -16.43],
                          [2.42, -1.897, 19.503, -14.661, -21.171, -0.212], [15.892, -5.041, 28.006, -19.193, 30.221, 0.628],
                          [-31.455, 7.596, 16.704, 18.918, 6.577, -19.872]], dtype=torch.float64).repeat(4, 1, 1)
    theta[:, :, 0] += torch.tensor([0.0, 3e-6, 1e-4, 1e-3], dtype=torch.float64)[:, None]
    w = torch.linspace(-1.0, 1.0, P.size, dtype=torch.float64).reshape(P.shape)
    out = []
    for backend in ("torch", "fast"):
        u = theta.clone().requires_grad_()
        with warnings.catch_warnings():
            warnings.simplefilter("error", cs.SolverWarning)
            x = cs.relax(u, P, "entropy", 1.0, backend=backend)
        (x * w).sum().backward()
        out.append((x.detach(), u.grad))
    assert (out[0][0] - out[1][0]).abs().max() < 1e-8
    assert (out[0][1] - out[1][1]).abs().max() < 1e-7


def test_torch_solver_resolves_ambiguous_capacity_rows_of_flow_formulations():
    # tied integer utilities with the quadratic on spanning trees (a flow formulation, auxiliary
    # variables): capacity rows f <= y stopped with slack and multiplier both ~1e-5, and these
    # rows were reported converged with x off by 1.4e-5 and 6.4e-6. Reference: OSQP with its
    # active-set polish on the subtour form (exact halves here)
    P = cs.load_polytope("spanning_tree", n=5)
    u = torch.tensor([[2.0, 1.0, 1.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0],
                      [0.0, -1.0, -2.0, 2.0, 0.0, 2.0, -2.0, 0.0, 0.0, -1.0]], dtype=torch.float64)
    ref = torch.tensor([[0.5, 0.0, 0.0, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5],
                        [0.5, 0.0, 0.0, 1.0, 0.5, 1.0, 0.0, 0.5, 0.5, 0.0]], dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", cs.SolverWarning)
        x = cs.relax(u, P, "quadratic", 1.0, backend="torch")
    assert (x - ref).abs().max() < 1e-9


@pytest.mark.parametrize("reg, t, row", [("entropy", 1.0, 31), ("entropy", 0.3, 58), ("binary_entropy", 0.3, 41)])
def test_torch_solver_holds_active_flow_bounds_with_small_multipliers(reg, t, row):
    """Correlated k-subsets (a flow formulation: the polish does not run under the entropies):
    in these rows of 64 Gaussian draws, flow bounds active with small multipliers stopped at
    slack 2e-8, above the backward's threshold, and were dropped; the directional derivative was
    off by 1.2e-2, 0.21 and 1.9e-2 (relative). Their unresolved pairs now count 1e4x in the
    residual (_PEND_WEIGHT_FLOWS) and the rows are within 1e-4. Reference: central differences
    of the forward at tol 1e-13 (stable from h = 1e-4 to 1e-6)."""
    P = cs.load_polytope("correlated_k_subset", n=30, k=6)
    gen = torch.Generator().manual_seed(3)
    u, v, d = (torch.randn(64, *P.shape, generator=gen, dtype=torch.float64)[row:row + 1] for _ in range(3))
    w = u.clone().requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", cs.SolverWarning)
        x = cs.relax(w, P, reg, t, backend="torch")
    got = (torch.autograd.grad((x * v).sum(), w)[0] * d).sum()
    h = 1e-5
    with torch.no_grad():
        fd = ((cs.relax(u + h * d, P, reg, t, backend="torch", tol=1e-13)
               - cs.relax(u - h * d, P, reg, t, backend="torch", tol=1e-13)) * v).sum() / (2 * h)
    assert abs(got - fd) < 1e-4 * max(1.0, abs(fd))

def _subtour_tree(tmp_path, n):
    """The spanning trees of K_n in their subtour form (tests/oracles.py), loaded."""
    from oracles import subtour_tree_config

    path = tmp_path / f"subtour{n}.yaml"
    path.write_text(subtour_tree_config(n))
    return cs.load_polytope(path)


def _cut_arborescence(tmp_path, n):
    """The arborescences of K_n rooted at 0 in Edmonds' cut form (tests/oracles.py), loaded."""
    from oracles import cut_arborescence_config

    path = tmp_path / f"cuts{n}.yaml"
    path.write_text(cut_arborescence_config(n))
    return cs.load_polytope(path)


@pytest.mark.parametrize("reg", ["entropy", "binary_entropy", "quadratic"])
def test_torch_solver_flow_formulation_agrees_with_the_subtour_form(tmp_path, reg):
    # the built-in spanning trees are a flow formulation (auxiliary variables, non-unique flows);
    # the same polytope in its subtour form is a second, independent formulation for the same
    # solver, sharper here than Clarabel (good to ~1e-6 with an entropy on these)
    n = 5
    Q, P = _subtour_tree(tmp_path, n), cs.load_polytope("spanning_tree", n=n)
    u = torch.randn(32, 10, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", cs.SolverWarning)
        for t in (1.0, 0.3):
            x_flow = cs.relax(u, P, reg, t, backend="torch")
            x_subtour = cs.relax(u, Q, reg, t, backend="torch")
            assert (x_flow - x_subtour).abs().max() < 5e-8, t


def test_torch_solver_keeps_the_most_accurate_iterate_on_flow_formulations(tmp_path):
    # tied integer utilities on spanning trees (flows: auxiliary variables). The dual residual of
    # the flows reaches its floor (~1e-8) while weakly active pairs are still ~1e-6 apart, and
    # the iterate with the smallest residual was kept: every row below was off by 1.3e-5 to
    # 6.5e-5, most reported converged. A later iterate now replaces it where it ranks 2x better
    # by max(residual, ambiguity). References: the same solver on the subtour form; OSQP (exact
    # here) for the quadratic
    from oracles import quadratic_on_form

    u = torch.tensor([[1, 0, -2, 0, 1, 1, -1, -1, -1, 0, 0, -1, -2, 1, 2],
                      [-1, -1, 2, 1, 2, -1, 0, -1, 1, -2, 1, -2, -2, -2, 0],
                      [-1, 1, -1, 2, 1, -1, -2, 1, 1, 0, 0, 0, 1, 0, -1],
                      [-2, -1, 2, 2, 2, 0, -1, 2, 1, 2, -1, 0, -2, 1, -1],
                      [0, 1, -1, 0, 2, 0, 2, 2, 2, -1, 1, -1, -2, 2, -1],
                      [-1, -1, 2, -1, 2, 2, 1, 0, -1, 2, -1, -2, 1, -1, -1]], dtype=torch.float64) / 0.3
    entropy = get_regularizer("entropy")
    x, report = solve_torch(u, cs.load_polytope("spanning_tree", n=6), entropy)
    ref, ref_report = solve_torch(u, _subtour_tree(tmp_path, 6), entropy)
    assert bool(ref_report.converged.all()) and int(report.converged.sum()) >= 4
    assert (x - ref)[report.converged].abs().max() < 5e-8
    x1, report1 = solve_torch(u[:1], cs.load_polytope("spanning_tree", n=6), entropy)  # alone
    assert bool(report1.converged.all()) and (x1 - ref[:1]).abs().max() < 5e-8

    uq = torch.tensor([[2, -1, 2, 2, 2, 0, 2, 1, -1, 1], [1, 2, 2, -1, -1, -1, 0, -2, 1, 2],
                       [-2, 1, 1, 0, -2, 1, 1, 0, -2, 1]], dtype=torch.float64)
    Q5 = _subtour_tree(tmp_path, 5)
    xq, report = solve_torch(uq, cs.load_polytope("spanning_tree", n=5), get_regularizer("quadratic"))
    ref = torch.stack([torch.as_tensor(quadratic_on_form(r.numpy(), Q5.form)) for r in uq])
    assert int(report.converged.sum()) >= 2 and (xq - ref)[report.converged].abs().max() < 1e-8


def test_torch_solver_falls_back_past_a_broken_last_step(tmp_path):
    # in this batch one row's residual rose from 5.9e-9 to 2e-7 while its last ambiguous pairs
    # resolved, and the last step then broke down (residual 8e260): the fallback has to take the
    # latest iterate before it (the row was off by 6.6e-6, reported converged; alone it is exact)
    u = torch.randint(-2, 3, (128, 10), generator=torch.Generator().manual_seed(5)).to(torch.float64)
    entropy = get_regularizer("entropy")
    x, report = solve_torch(u, cs.load_polytope("spanning_tree", n=5), entropy)
    ref, ref_report = solve_torch(u, _subtour_tree(tmp_path, 5), entropy)
    assert bool(ref_report.converged.all()) and bool(report.converged.all())
    assert (x - ref).abs().max() < 5e-8


def test_torch_solver_backward_drops_constraints_the_polish_found_inactive():
    # tied integer utilities on matchings with the entropy at t = 0.1: columns inactive at slack
    # 8.6e-10 to 6.3e-8 (Sinkhorn, exact). The polish drops them (multiplier exactly 0), but the
    # backward held every constraint with slack below 1e-7: t·grad was off by 0.05 to 0.46
    P = cs.load_polytope("matching", n=5, m=8)
    u = torch.tensor([[[2, 0, 1, -2, 0, -2, 0, 2], [1, 1, 2, -2, -2, -1, 2, 0], [-1, -2, -1, -2, -2, 1, 2, 2],
                       [1, 2, -2, -2, 2, 0, 1, 1], [-1, 1, -2, 1, 1, -2, -1, -1]],
                      [[2, -1, -1, -1, -2, 1, 2, 0], [-2, -2, 0, -2, 1, 0, -1, -2], [0, -2, -1, -1, 2, 0, -1, 0],
                       [0, -1, 1, 1, -2, -2, -2, 1], [0, -2, 1, -2, 0, 2, 2, -2]],
                      [[-2, -1, 2, 0, 2, 1, -1, -2], [1, 1, 1, 2, -1, 2, -1, 1], [-2, -1, 2, -2, 2, -1, 1, -1],
                       [1, 1, -1, 1, -2, -1, -1, -2], [-1, -1, -1, 1, 0, 0, 2, 2]]], dtype=torch.float64)
    w = torch.randn(u.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    grads, xs = [], []
    for backend in ("torch", "auto"):  # auto: Sinkhorn with capped columns
        uu = u.clone().requires_grad_()
        x = cs.relax(uu, P, "entropy", 0.1, backend=backend)
        grads.append(torch.autograd.grad((x * w).sum(), uu)[0])
        xs.append(x.detach())
    assert (xs[0] - xs[1]).abs().max() < 1e-10
    assert (0.1 * (grads[0] - grads[1])).abs().max() < 1e-6


@pytest.mark.parametrize("reg", ["entropy", "binary_entropy", "quadratic"])
def test_torch_solver_arborescence_flows_agree_with_the_cut_form(tmp_path, reg):
    # arborescences rooted at 0 in Edmonds' cut form (in-degree 1 off the root, at least one arc
    # into every vertex set without the root; no auxiliary variables), written out as a user's
    # config (tests/oracles.py), against the built-in flow formulation, in the same solver
    n = 4
    Q, P = _cut_arborescence(tmp_path, n), cs.load_polytope("arborescence", n=n)
    u = torch.randn(32, n, n, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", cs.SolverWarning)
        for t in (1.0, 0.3):
            assert (cs.relax(u, P, reg, t, backend="torch") - cs.relax(u, Q, reg, t, backend="torch")).abs().max() < 5e-8, t


def test_torch_solver_keeps_the_primal_residual_of_flows_at_low_temperature(tmp_path):
    # arborescences with the entropy at t = 0.1 (Gaussian plus Gumbel utilities): arcs pressed
    # against their bounds next to flows with curvature 1e-10 made the normal equations lose the
    # primal residual, which stalled at ~5e-8: 4 rows of 32 were reported not converged and
    # the batch was off by up to 1.2e-7 against the cut form (no auxiliary variables). Rows whose
    # primal residual stalls now get _AUX_PROX on the flows' curvature in their Newton matrix
    n = 5
    Q, P = _cut_arborescence(tmp_path, n), cs.load_polytope("arborescence", n=n)
    g = torch.Generator().manual_seed(0)
    u = torch.randn(32, n, n, generator=g, dtype=torch.float64) + cs.Gumbel().sample((32, n, n), g, torch.float64)
    x = cs.relax(u, P, "entropy", 0.1, backend="torch", on_failure="raise")
    ref = cs.relax(u, Q, "entropy", 0.1, backend="torch", on_failure="raise")
    assert (x - ref).abs().max() < 1e-8


def test_torch_solver_keeps_the_primal_residual_of_large_flow_graphs(monkeypatch):
    # correlated k-subsets (n = 50, k = 10: 1 700 variables) with the binary entropy: with 1e-6
    # as _AUX_PROX the primal residual of these two rows (t = 0.03) stalled at 1.6e-8 and 1.1e-8
    # (reported not converged: relax warned), and at t = 0.1 the four rows below, reported
    # converged, were off by up to 6.4e-7 (1e-4: 5.1e-7; 1e-3: 1e-8) against the same solver at
    # tol 1e-12 with 1e-2 on the flows (with 1e-6 that solve itself stalls, median residual 5e-10)
    P, reg = cs.load_polytope("correlated_k_subset", n=50, k=10), get_regularizer("binary_entropy")
    u = torch.randn(256, 99, generator=torch.Generator().manual_seed(1), dtype=torch.float64)[[49, 71]]
    x, report = solve_torch(u / 0.03, P, reg)
    ref, tight = solve_torch(u / 0.03, P, reg, tol=1e-12, max_iter=400)
    assert bool(report.converged.all()), report.kkt_residual
    assert float(tight.kkt_residual.max()) < 1e-10
    assert (x - ref).abs().max() < 1e-8
    g = torch.Generator().manual_seed(21)
    u = (torch.randn(64, 99, generator=g, dtype=torch.float64) + cs.Gumbel().sample((64, 99), g, torch.float64))[[6, 43, 7, 5]]
    x, report = solve_torch(u / 0.1, P, reg)
    monkeypatch.setattr(solver, "_AUX_PROX", 1e-2)
    ref, tight = solve_torch(u / 0.1, P, reg, tol=1e-12, max_iter=400)
    assert bool(report.converged.all()) and float(tight.kkt_residual.median()) < 1e-11
    assert (x - ref).abs().max() < 3e-8


def test_torch_solver_backward_on_flows_at_low_temperature(tmp_path):
    # an arborescence with the entropy at t = 0.3 (Gaussian plus Gumbel utilities): with only
    # ε = 1e-10 on the flows' curvature, the backward's system next to the 1e8 penalties left
    # t·grad off by 8e-6 on arcs with x ~ 2e-5 (30 % of their gradient), against the cut form
    # and finite differences of the flow form, which agree (_AUX_BACKWARD)
    u = torch.tensor([[1.34766389, 0.37175909, -0.00192640, 2.50424523, 2.14457694],
                      [1.81043806, 1.76407358, 0.80519880, 0.08986617, -0.86183071],
                      [1.65912754, 5.57748081, -0.59452641, 1.41100817, -0.67971016],
                      [-0.41614942, -1.20977555, -0.14119370, -0.59603588, 0.16466283],
                      [1.44783244, 4.19845106, 3.63581366, 4.16656180, -1.36622301]], dtype=torch.float64)
    w = torch.tensor([[-1.33604530, -0.10366874, -0.27648597, -0.77767628, -1.34172435],
                      [1.30203377, 1.00442192, 1.16276070, -1.78335479, -0.15639731],
                      [1.59262789, -0.08489148, 0.88966068, -0.10442488, 1.87984328],
                      [1.35886391, 0.34184281, 0.26987628, -1.55462113, 1.28912015],
                      [-0.90519634, -0.24749891, 0.42794815, -1.16683493, -0.33210144]], dtype=torch.float64)
    grads = []
    for P in (cs.load_polytope("arborescence", n=5), _cut_arborescence(tmp_path, 5)):
        uu = u.clone().requires_grad_()
        x = cs.relax(uu, P, "entropy", 0.3, backend="torch", on_failure="raise")
        grads.append(torch.autograd.grad((x * w).sum(), uu)[0])
    assert (0.3 * (grads[0] - grads[1])).abs().max() < 1e-6


def test_high_precision_hull_oracle_matches_the_k_subset_fast_path():
    # the oracle of the next test, against an exact fast path on a generic row
    import itertools

    from oracles import hull_relax_jvp_mp
    V = np.array([[int(i in S) for i in range(5)] for S in itertools.combinations(range(5), 2)])
    gen = torch.Generator().manual_seed(0)
    u, d = torch.randn(2, 1, 5, generator=gen, dtype=torch.float64)
    x, dx = hull_relax_jvp_mp(V, u[0].numpy(), d[0].numpy())
    P = cs.load_polytope("k_subset", n=5, k=2)
    xf, jf = torch.autograd.functional.jvp(lambda z: cs.relax(z, P, "entropy", 1.0, backend="fast"), (u,), (d,))
    assert np.abs(x - xf[0].numpy()).max() < 1e-12
    assert np.abs(dx - jf[0].numpy()).max() < 1e-12


def test_torch_solver_backward_near_a_vertex_against_a_high_precision_oracle():
    # correlated k-subsets (n = 7, k = 3) with the entropy at t = 0.1 and tied integer utilities:
    # x is within 1e-7 of a vertex, and two paths of weight 4e-8 tie ({0, 1, 5} and {0, 1, 6}),
    # so x_5 and x_6, both near 1 where the entropy's curvature is 1, trade at a rate ~0.5/t
    # until one weight reaches 0, about 1e-8 away in u: a kink. Central differences of the
    # float64 forward (which splits the tie to ~1e-10) need steps far below that and gave ~0,
    # which an earlier audit took for a wrong backward; a 60-digit barrier solve of the hull
    # (tests/oracles.py) agrees with the backward to 7 digits.
    from oracles import correlated_subsets, hull_relax_jvp_mp
    n, k, t = 7, 3, 0.1
    V = correlated_subsets(n, k)
    u = torch.tensor([[1.0, 1, -1, -1, 1, 2, 2, -1, -2, -2, -2, 2, 1]], dtype=torch.float64)
    gen = torch.Generator().manual_seed(7)
    d, w = torch.randn(2, 1, 13, generator=gen, dtype=torch.float64)
    x_ref, dx_ref = hull_relax_jvp_mp(V, u[0].numpy() / t, d[0].numpy() / t)
    uu = u.clone().requires_grad_()
    x = cs.relax(uu, cs.load_polytope("correlated_k_subset", n=n, k=k), "entropy", t, backend="torch")
    (g,) = torch.autograd.grad((x * w).sum(), uu)
    assert np.abs(x[0].detach().numpy() - x_ref).max() < 1e-8  # the tie's split is off by 6e-9
    ref = float(dx_ref @ w[0].numpy())
    assert abs(ref) > 1.0  # the tie's large derivative, not a vanishing one
    assert abs(float((g * d).sum()) - ref) < 1e-5 * abs(ref)


def test_torch_solver_backward_on_degenerate_flows_refines_its_preconditioned_solve():
    # correlated k-subsets (flows through the states of a dynamic program, not unique) with the
    # binary entropy at t = 0.1: with ε + 1e-9 on the flows' curvature, the backward's normal
    # equations next to the 1e8 penalties and the entropy's 1/x were too ill-conditioned for
    # float64, t·grad off by up to 5.8e-5 against central differences of tightly solved
    # forwards (which two formulations agree on to 1e-9). _AUX_PRECONDITION: within 1e-6
    P = cs.load_polytope("correlated_k_subset", n=7, k=2)
    gen = torch.Generator().manual_seed(4)
    u = torch.randn(16, 13, generator=gen, dtype=torch.float64) + cs.Gumbel().sample((16, 13), generator=gen).double()
    w, d = torch.randn(2, 16, 13, generator=gen, dtype=torch.float64)
    uu = u.clone().requires_grad_()
    x = cs.relax(uu, P, "binary_entropy", 0.1, backend="torch", on_failure="raise")
    (g,) = torch.autograd.grad((x * w).sum(), uu)
    h = 1e-4
    xp, xm = (cs.relax(u + s * h * d, P, "binary_entropy", 0.1, backend="torch", tol=1e-13, max_iter=200) for s in (1, -1))
    fd = ((xp - xm) * w).sum(1) / (2 * h)
    assert (0.1 * ((g * d).sum(1) - fd)).abs().max() < 1e-6


def _tree_gradients_and_face_oracle(tmp_path, u, w, reg, t):
    """``(ref, {name: ∂(w·x)/∂u})`` for the spanning trees of K_6, ``u, w: (B, 15)``: ref from the
    exact face Jacobian (tests/oracles.py face_vjp, the subtour form's active rows at a tightly
    solved x), the gradients from the torch solver on the built-in flow form and the subtour form."""
    from oracles import face_vjp

    S = _subtour_tree(tmp_path, 6)
    z = cs.relax(u, S, reg, t, backend="torch", tol=1e-13, max_iter=300).numpy()
    hinv = None if reg == "quadratic" else z if reg == "entropy" else z * (1 - z)
    ref = torch.stack([torch.as_tensor(face_vjp(z[r], w[r].numpy(), S.form, None if hinv is None else hinv[r]))
                       for r in range(len(z))]) / t
    grads = {}
    for P in (cs.load_polytope("spanning_tree", n=6), S):
        uu = u.clone().requires_grad_()
        x = cs.relax(uu, P, reg, t, backend="torch", on_failure="raise")
        grads[P.name] = torch.autograd.grad((x * w).sum(), uu)[0]
    return ref, grads


def test_torch_solver_backward_is_the_projection_jacobian_on_spanning_trees(tmp_path):
    # the quadratic's relaxation is the Euclidean projection onto P, whose Jacobian (away from
    # ties) projects onto the null space of the active constraints: an exact oracle, from the
    # subtour form's active rows at a tightly solved x. Held rows that depend on each other next
    # to the 1e8 penalties left t·grad off by more than 1e-7 on 76 of 128 rows of the subtour form
    # and 81 of the flow form (up to 3.3e-6); a refinement step in the backward (factored with
    # _AUX_PRECONDITION on auxiliary variables): within 1e-7
    gen = torch.Generator().manual_seed(3)
    u = 3 * torch.randn(32, 15, generator=gen, dtype=torch.float64)
    w = torch.randn(32, 15, generator=gen, dtype=torch.float64)
    ref, grads = _tree_gradients_and_face_oracle(tmp_path, u, w, "quadratic", 1.0)
    for name, g in grads.items():
        assert (g - ref).abs().max() < 1e-7, name


@pytest.mark.parametrize("reg", ["entropy", "binary_entropy"])
def test_torch_solver_backward_is_the_face_jacobian_with_entropies_on_spanning_trees(reg, tmp_path):
    # J = H^{-1/2} Π H^{-1/2} on the face of the active constraints (tests/oracles.py face_vjp,
    # from the subtour form's active rows at a tightly solved x). At t = 0.1 coordinates far below
    # the others bring inactive flow constraints within 1e-7 of their bounds; held, they left
    # t·grad off by up to 6.6e-7 (entropy) and 1.1e-6 (binary entropy) on the flow form, while
    # the subtour form was exact. Held only within 1e-8 under the entropies: within 1.5e-7
    gen = torch.Generator().manual_seed(7)
    u = torch.randn(64, 15, generator=gen, dtype=torch.float64) + cs.Gumbel().sample((64, 15), generator=gen).double()
    w = torch.randn(64, 15, generator=gen, dtype=torch.float64)
    ref, grads = _tree_gradients_and_face_oracle(tmp_path, u, w, reg, 0.1)
    for name, g in grads.items():
        assert 0.1 * (g - ref).abs().max() < 1.5e-7, name


def test_torch_solver_is_exact_on_tied_matchings_with_the_quadratic():
    # tied integer utilities on a matching (inequality rows: columns at most once): 5 rows of 32
    # were reported converged with x off by up to 8e-7 before ambiguous pairs were polished.
    # Reference: OSQP with its active-set polish on the same constraints (tests/oracles.py)
    from oracles import quadratic_on_form

    P = cs.load_polytope("matching", n=3, m=5)
    u = torch.randint(-2, 3, (32, 3, 5), generator=torch.Generator().manual_seed(7)).to(torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", cs.SolverWarning)
        x = cs.relax(u, P, "quadratic", 0.5, backend="torch").reshape(32, -1)
    ref = torch.stack([torch.as_tensor(quadratic_on_form((r / 0.5).reshape(-1).numpy(), P.form)) for r in u])
    assert (x - ref).abs().max() < 1e-9


@pytest.mark.parametrize("seed", range(4))
def test_torch_solver_matches_an_exact_dual_solve_on_random_constraint_systems(seed, tmp_path):
    # user configs of random polytopes (equality and inequality rows with integer coefficients,
    # some tight at an interior point; not integral): the torch solver against the dual solved to
    # rounding (tests/oracles.py dual_solve, certified per row), every separable regularizer
    import numpy as np
    from oracles import dual_solve, random_constraint_config

    rng = np.random.default_rng(seed)
    checked, worst = 0, 0.0
    for i in range(5):
        path = tmp_path / f"random_{i}.yaml"
        path.write_text(random_constraint_config(rng, f"random_{seed}_{i}"))
        try:
            P = cs.load_polytope(path)
        except cs.PolytopeError:  # empty, or a single point: not this test's subject
            continue
        for reg in ("entropy", "binary_entropy", "quadratic"):
            for t in (1.0, 0.1):
                theta = torch.as_tensor(2.0 * rng.normal(size=(6, P.size)) / t)
                x, report = solve_torch(theta, P, get_regularizer(reg))
                assert bool(report.converged.all())
                for b in range(6):
                    ref, certificate = dual_solve(theta[b].numpy(), P.form, reg)
                    assert certificate < 1e-12, (path.read_text(), reg, t, b)
                    worst = max(worst, float(np.abs(x[b].numpy() - ref).max()))
                    checked += 1
    assert checked >= 60 and worst < 1e-8


FRACTIONAL_FACE = """name: fractional_face
output: {name: x, shape: [4]}
constraints:
  - 0 <= x <= 1
  - x[3] == 0.25
  - x[0] + x[3] >= 0.5
"""


@pytest.mark.parametrize("backend", ["torch", "generic"])
@pytest.mark.parametrize("reg", ["entropy", "binary_entropy", "quadratic"])
def test_relax_over_a_config_that_is_not_integral_at_low_temperature(backend, reg, tmp_path, gen):
    # relax solves over the declared constraints, integral or not; hard samples need 0/1 vertices.
    # The solvers' handling of extreme utilities asked the exact argmax whether a structure avoids
    # some entries, and its LP raised 'not integral' from relax at t <= 0.01 (16 of 16 settings
    # at t = 0.003). Now it reads the LP vertex's support; argmax still raises.
    import numpy as np
    from oracles import dual_solve

    path = tmp_path / "fractional_face.yaml"
    path.write_text(FRACTIONAL_FACE)
    P = cs.load_polytope(path)
    u = 2.0 * torch.randn(16, 4, generator=gen, dtype=torch.float64)
    for t in (0.01, 0.003):
        x = cs.relax(u, P, reg, t, backend=backend)
        for b in range(16):
            ref, certificate = dual_solve((u[b] / t).numpy(), P.form, reg)
            assert certificate < 1e-12
            assert np.abs(x[b].numpy() - ref).max() < (1e-9 if backend == "torch" else 1e-6)
    with pytest.raises(cs.PolytopeError, match="not integral"):
        P.argmax(torch.tensor([0.0, 0.0, 0.0, 1.0]))


@pytest.mark.parametrize("backend", ["torch", "generic"])
def test_forbidding_a_coordinate_a_config_that_is_not_integral_needs_is_an_input_error(backend, tmp_path):
    # every point of this P has x[0] >= 0.25: -inf there leaves the face empty, as an integral
    # P's 'every structure uses it' does, but the solution puts 0.25 there, not >= 1/2, and
    # that was reported as a solver failure (SolverError, 'use a larger temperature')
    path = tmp_path / "fractional_face.yaml"
    path.write_text(FRACTIONAL_FACE)
    P = cs.load_polytope(path)
    u = torch.tensor([[-math.inf, 0.3, -0.2, 0.1], [0.5, -math.inf, 0.0, 1.0]], dtype=torch.float64)
    with pytest.raises(cs.InputError, match=r"no structure .* at batch index \(0,\) \(1 of 2"):
        with torch.no_grad():
            cs.relax(u, P, "quadratic", 1.0, backend=backend)
    with torch.no_grad():
        x = cs.relax(u[1:], P, "quadratic", 1.0, backend=backend)
    assert x[0, 1] == 0.0 and abs(float(x[0, 3]) - 0.25) < 1e-6 and float(x[0, 0] + x[0, 3]) > 0.5 - 1e-6


def test_large_batches_are_solved_in_chunks_with_the_same_results(monkeypatch, gen):
    # the dense Schur complements of a whole batch were held at once (a user's flow formulation
    # with 951 rows at B = 128: 7.2 GB peak, 2.2 GB in chunks); chunks give the same values,
    # reports and gradients, -inf masks included
    P = cs.load_polytope("spanning_tree", n=5)
    u = torch.randn(10, P.size, generator=gen, dtype=torch.float64)
    u[3, 2] = float("-inf")
    u = u.requires_grad_()
    c = torch.randn(10, P.size, generator=gen, dtype=torch.float64)
    x = cs.relax(u, P, "entropy", 0.5, backend="torch")
    g = torch.autograd.grad((x * c).sum(), u)[0]
    m = solver.standard_form(P, get_regularizer("entropy")).A.shape[0]
    calls = []
    real = solver._TorchSST.apply
    monkeypatch.setattr(solver._TorchSST, "apply", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    # the memory bound (any device), then the CPU's own (caches), which is tighter there; chunks
    # of about equal size (at most 4 rows: 4 + 4 + 2, not 4 + 4 + 1 + 1)
    for name, rows, expected in (("CHUNK_BYTES", 3, [3, 3, 3, 1]), ("CPU_CHUNK_BYTES", 4, [4, 4, 2]),
                                 ("CPU_CHUNK_BYTES", 6, [5, 5])):
        monkeypatch.setattr(solver, "CHUNK_BYTES", 256 * 2**20)
        monkeypatch.setattr(solver, name, rows * 8 * m * m)
        calls.clear()
        y = cs.relax(u, P, "entropy", 0.5, backend="torch")
        h = torch.autograd.grad((y * c).sum(), u)[0]
        assert calls == expected
        assert (x - y).abs().max() < 1e-12 and (g - h).abs().max() < 1e-10
    _, report = solver.solve_torch(torch.randn(10, P.size, generator=gen, dtype=torch.float64), P,
                                   get_regularizer("entropy"))
    assert report.converged.shape == report.iterations.shape == (10,) and bool(report.converged.all())


@pytest.mark.parametrize("retry", [True, False])
def test_rows_that_did_not_converge_are_solved_again_alone(retry, monkeypatch):
    """A row the batch leaves unconverged (on flow formulations, rows stall just above the
    accepted residual depending on the rounding of the batched products) is solved again alone,
    and its solution, report and backward state replace the batch's. Here the batch's solve of
    row 2 is spoilt on purpose (x, its backward state, its report); the retry must restore the
    values and the gradient of an unspoilt solve, and without it (_RETRY_ALONE = 0) they stay
    spoilt and relax warns."""
    P = cs.load_polytope("spanning_tree", n=5)
    reg = P.check_regularizer("entropy")
    gen = torch.Generator().manual_seed(4)
    u = torch.randn((6,) + P.shape, generator=gen, dtype=torch.float64)
    w = torch.randn(u.shape, generator=gen, dtype=torch.float64)

    def solve(theta):
        th = theta.clone().requires_grad_()
        x, report = solve_torch(th, P, reg)
        (g,) = torch.autograd.grad((x * w).sum(), th)
        return x.detach(), g, report

    x0, g0, rep0 = solve(u)
    assert bool(rep0.converged.all())
    real_ipm = solver._ipm

    def spoilt_ipm(theta, *args):
        z, (D, S), report = real_ipm(theta, *args)
        if theta.shape[0] > 1:
            z, D = z.clone(), D.clone()
            z[2] += 1e-3
            D[2] *= 2.0
            report.converged[2], report.kkt_residual[2] = False, 5e-8
        return z, (D, S), report

    monkeypatch.setattr(solver, "_ipm", spoilt_ipm)
    monkeypatch.setattr(solver, "_RETRY_ALONE", 8 if retry else 0)
    x, g, rep = solve(u)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cs.relax(u, P, "entropy", backend="torch")
    warned = any(issubclass(c.category, cs.SolverWarning) for c in caught)
    if retry:
        assert bool(rep.converged.all()) and not warned
        assert torch.allclose(x, x0, rtol=0, atol=1e-9) and torch.allclose(g, g0, rtol=0, atol=1e-8)
    else:
        assert not bool(rep.converged[2]) and warned
        assert (x[2] - x0[2]).abs().max() > 1e-4 and (g[2] - g0[2]).abs().max() > 1e-4
