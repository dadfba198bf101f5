"""log_partition: against enumeration, counting formulas, the exp_family relaxation (its gradient),
gradcheck, extreme temperatures, forbidden coordinates."""

import math

import numpy as np
import pytest
import torch
from conftest import SMALL_CASES

import convex_sst as cs
from convex_sst.relax import available_fast_paths
from convex_sst.testing import brute_force_marginals

NINF = -math.inf
ALL_SMALL = [(name, params) for name in sorted(SMALL_CASES) for params, _ in SMALL_CASES[name]]


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(3)


def enumerated(u, P, t):
    V = P.vertices(dtype=u.dtype).reshape(-1, P.size)
    return torch.logsumexp(u.reshape(-1, P.size) @ V.T / t, dim=1).reshape(u.shape[: u.dim() - len(P.shape)])


@pytest.mark.parametrize("name,params", ALL_SMALL)
def test_matches_enumeration_with_batch_dims_and_per_sample_temperatures(name, params, gen):
    P = cs.load_polytope(name, **params)
    u = 2 * torch.randn((2, 3) + P.shape, generator=gen, dtype=torch.float64)
    for t in (0.5, 2.0):
        torch.testing.assert_close(cs.log_partition(u, P, t), enumerated(u, P, t), atol=1e-12, rtol=0)
    t = torch.tensor([[0.3, 1.0, 3.0], [0.5, 0.7, 2.0]], dtype=torch.float64)
    want = torch.stack([enumerated(u[i, j], P, float(t[i, j])) for i in range(2) for j in range(3)]).reshape(2, 3)
    torch.testing.assert_close(cs.log_partition(u, P, t), want, atol=1e-12, rtol=0)


@pytest.mark.parametrize("name,params", ALL_SMALL)
def test_gradient_is_the_exp_family_marginals_over_t(name, params, gen):
    P = cs.load_polytope(name, **params)
    u = torch.randn((4,) + P.shape, generator=gen, dtype=torch.float64, requires_grad=True)
    t = 0.6
    (g,) = torch.autograd.grad(cs.log_partition(u, P, t).sum(), u)
    torch.testing.assert_close(g, brute_force_marginals(u.detach(), P, t) / t, atol=1e-10, rtol=0)
    if (name, "exp_family") in available_fast_paths():
        torch.testing.assert_close(g, cs.relax(u.detach(), P, "exp_family", t) / t, atol=1e-9, rtol=0)


@pytest.mark.parametrize("name,params", [
    ("simplex", {"n": 5}), ("hypercube", {"n": 4}), ("k_subset", {"n": 6, "k": 3}), ("spanning_tree", {"n": 4}),
    ("arborescence", {"n": 4, "root": 1}), ("dag_path", {}), ("birkhoff", {"n": 3})])
def test_gradcheck_and_gradgradcheck(name, params, gen):
    P = cs.load_polytope(name, **params)
    u = torch.randn((2,) + P.shape, generator=gen, dtype=torch.float64, requires_grad=True)
    t = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda u, t: cs.log_partition(u, P, t), (u, t))
    assert torch.autograd.gradgradcheck(lambda u, t: cs.log_partition(u, P, t), (u, t))


@pytest.mark.parametrize("name,params,count", [
    ("simplex", {"n": 1000}, 1000),
    ("hypercube", {"n": 50}, 2.0 ** 50),
    ("k_subset", {"n": 60, "k": 20}, math.comb(60, 20)),
    ("spanning_tree", {"n": 20}, 20.0 ** 18),                     # Cayley
    ("arborescence", {"n": 20, "root": 7}, 20.0 ** 18),            # rooted spanning arborescences of K20
    ("dag_path", {"n": 12, "edges": [[i, j] for i in range(12) for j in range(i + 1, 12)], "source": 0,
                  "target": 11}, 2.0 ** 10),                       # a path picks any subset of 1..10
])
def test_zero_scores_count_the_structures(name, params, count):
    P = cs.load_polytope(name, **params)
    got = cs.log_partition(torch.zeros(P.shape, dtype=torch.float64), P)
    assert abs(float(got) - math.log(count)) < 1e-9 * max(1.0, math.log(count))


@pytest.mark.parametrize("name,params", [("k_subset", {"n": 30, "k": 7}), ("spanning_tree", {"n": 12}),
                                         ("arborescence", {"n": 12}), ("simplex", {"n": 30})])
def test_low_temperature_tends_to_the_best_score_without_overflow(name, params, gen):
    P = cs.load_polytope(name, **params)
    u = 10 * torch.randn((3,) + P.shape, generator=gen, dtype=torch.float64)
    best = (P.argmax(u) * u).reshape(3, -1).sum(1)
    log_count = float(cs.log_partition(torch.zeros(P.shape, dtype=torch.float64), P))
    for t in (1e-2, 1e-3):
        z = t * cs.log_partition(u, P, t)
        assert bool(torch.isfinite(z).all())
        assert bool((z >= best - 1e-9).all()) and bool((z <= best + t * log_count + 1e-9).all())


@pytest.mark.parametrize("name,params", [("k_subset", {"n": 8, "k": 3}), ("spanning_tree", {"n": 5}),
                                         ("arborescence", {"n": 5})])
def test_float32_in_float32_out(name, params, gen):
    P = cs.load_polytope(name, **params)
    u = torch.randn((4,) + P.shape, generator=gen)
    z = cs.log_partition(u, P, 0.5)
    assert z.dtype == torch.float32
    torch.testing.assert_close(z.double(), cs.log_partition(u.double(), P, 0.5), atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precisions_are_computed_in_float32_and_rounded_back(dtype, gen):
    # autocast activations: float16 and bfloat16 in, the same dtype out, with the float32
    # value rounded to it, -inf entries and gradients included (as relax does)
    P = cs.load_polytope("k_subset", n=6, k=2)
    u = torch.randn(3, 6, generator=gen).to(dtype)
    u[1, 2] = NINF
    u.requires_grad_(True)
    z = cs.log_partition(u, P, 0.5)
    assert z.dtype == dtype
    want = cs.log_partition(u.detach().float(), P, 0.5)
    assert torch.equal(z.detach(), want.to(dtype))
    (g,) = torch.autograd.grad(z.sum(), u)
    assert g.dtype == dtype and bool(torch.isfinite(g).all()) and g[1, 2] == 0
    marg = cs.relax(u.detach().float(), P, "exp_family", 0.5) / 0.5
    torch.testing.assert_close(g.float(), marg, atol=0.02, rtol=0.02)
    if dtype == torch.float16:  # 1e5 does not fit (it was inf, silently)
        big = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], [1000.0, 2.0, 3.0, 4.0, 5.0, 6.0]], dtype=dtype)
        with pytest.raises(cs.InputError, match=r"log_partition is 1.006e\+05 at batch index \(1,\), beyond "
                                                r"torch.float16's range \(±65504\); hint: pass u as float32"):
            cs.log_partition(big, P, 0.01)


def test_log_likelihoods_of_all_structures_sum_to_one(gen):
    """The CRF use: log p(x) = θᵀx − log Z(θ)."""
    P = cs.load_polytope("arborescence", n=4)
    theta = torch.randn(4, 4, generator=gen, dtype=torch.float64)
    V = P.vertices()
    logp = (V * theta).sum((1, 2)) - cs.log_partition(theta, P)
    assert abs(float(logp.exp().sum()) - 1.0) < 1e-12


def test_forbidden_coordinates_sum_over_the_structures_that_avoid_them(gen):
    P = cs.load_polytope("spanning_tree", n=5)
    edges = torch.triu_indices(5, 5, 1).T.tolist()
    mask = torch.zeros(10, dtype=torch.bool)
    mask[[0, 4, 7, 9]] = True
    R = cs.load_polytope("spanning_tree", n=5, edges=[e for e, m in zip(edges, mask.tolist()) if not m])
    ua = torch.randn(3, R.size, generator=gen, dtype=torch.float64, requires_grad=True)
    u = torch.full((3, 10), NINF, dtype=torch.float64).masked_scatter(~mask.expand(3, 10), ua)
    z, zr = cs.log_partition(u, P, 0.7), cs.log_partition(ua, R, 0.7)
    torch.testing.assert_close(z, zr, atol=1e-12, rtol=0)
    (g,) = torch.autograd.grad(z.sum(), ua)
    (gr,) = torch.autograd.grad(zr.sum(), ua)
    torch.testing.assert_close(g, gr, atol=1e-12, rtol=0)
    K = cs.load_polytope("k_subset", n=6, k=2)
    v = torch.tensor([1.0, NINF, 0.5, NINF, NINF, 2.0], dtype=torch.float64)
    torch.testing.assert_close(cs.log_partition(v, K), torch.logsumexp(torch.tensor([1.5, 3.0, 2.5]).double(), 0))
    # one structure left, every utility negative: log Z = its score = −Σ|u| over the allowed
    # entries, the bound below which a row's face counts as empty
    for Q, w, want in [(cs.load_polytope("simplex", n=3), [-5.0, NINF, NINF], -5.0), (K, [-5.0, -3.0] + [NINF] * 4, -8.0)]:
        assert cs.log_partition(torch.tensor(w, dtype=torch.float64), Q).item() == want
    with pytest.raises(cs.InputError, match=r"no structure of Polytope\('k_subset'.* avoids the coordinates where "
                                            r"u = -inf, at batch index \(1,\)"):
        cs.log_partition(torch.tensor([[1.0, NINF, NINF, NINF, NINF, 2.0], [1.0] + [NINF] * 5]), K)
    for name, params, forbid in [("simplex", {"n": 3}, [0, 1, 2]), ("arborescence", {"n": 4}, [2, 6, 14]),
                                 ("dag_path", {}, [0, 1]), ("birkhoff", {"n": 3}, [3, 4, 5])]:
        Q = cs.load_polytope(name, **params)
        w = torch.randn(Q.shape, generator=gen, dtype=torch.float64)
        w.reshape(-1)[forbid] = NINF
        with pytest.raises(cs.InputError, match="avoids the coordinates where u = -inf"):
            cs.log_partition(w, Q)


def test_polytopes_without_an_algorithm_are_enumerated_up_to_the_limit():
    P = cs.load_polytope("birkhoff", n=5)  # 120 permutations: the permanent has no fast algorithm
    u = torch.randn(5, 5, dtype=torch.float64)
    torch.testing.assert_close(cs.log_partition(u, P), enumerated(u, P, 1.0))
    with pytest.raises(cs.NotSupportedError, match=r"no exact algorithm for Polytope\('birkhoff'.*raise limit"):
        cs.log_partition(u, P, limit=100)


def test_bad_inputs_are_input_errors():
    P = cs.load_polytope("simplex", n=3)
    with pytest.raises(cs.InputError, match=r"u has shape \(4,\), expected \(\*batch, 3\)"):
        cs.log_partition(torch.zeros(4), P)
    with pytest.raises(cs.InputError, match=r"u contains NaN or \+inf"):
        cs.log_partition(torch.tensor([0.0, math.nan, 1.0]), P)
    with pytest.raises(cs.InputError, match="temperature must be finite and > 0"):
        cs.log_partition(torch.zeros(3), P, 0.0)
    with pytest.raises(cs.InputError, match="limit"):
        cs.log_partition(torch.zeros(3), P, limit=0)


def test_trees_match_the_matrix_tree_determinant_at_a_larger_size(gen):
    """Independent of the log-space elimination: slogdet of the (in-degree) Laplacian minor."""
    n = 15
    P = cs.load_polytope("spanning_tree", n=n)
    i, j = torch.triu_indices(n, n, 1)
    theta = torch.randn(3, P.size, generator=gen, dtype=torch.float64)
    W = torch.zeros(3, n, n, dtype=torch.float64)
    W[:, i, j] = theta.exp()
    W = W + W.transpose(1, 2)
    L = torch.diag_embed(W.sum(2)) - W
    torch.testing.assert_close(cs.log_partition(theta, P), torch.linalg.slogdet(L[:, 1:, 1:])[1], atol=1e-10, rtol=0)
    A = cs.load_polytope("arborescence", n=n, root=3)
    theta = torch.randn(3, n, n, generator=gen, dtype=torch.float64)
    W = theta.exp() * (1 - torch.eye(n, dtype=torch.float64))
    W[:, :, 3] = 0                                     # no arcs into the root
    L = torch.diag_embed(W.sum(1)) - W                 # in-degree Laplacian
    keep = [v for v in range(n) if v != 3]
    torch.testing.assert_close(cs.log_partition(theta, A), torch.linalg.slogdet(L[:, keep][:, :, keep])[1],
                               atol=1e-10, rtol=0)


def test_large_k_uses_products_with_linear_memory_and_agrees_with_the_coefficient_map(monkeypatch, gen):
    """k = 200: the (a·b, k+1) coefficient maps would be cubic in k (n = 1000, k = 500 asked for
    2 GB per product and was killed at batch 32); large products loop over the shorter factor."""
    from convex_sst import fast

    n, k = 400, 200
    P = cs.load_polytope("k_subset", n=n, k=k)
    assert (k + 1) ** 3 > fast._MAP_MAX                 # this size takes the loops
    u = torch.randn(2, n, generator=gen, dtype=torch.float64)
    z0 = cs.log_partition(torch.zeros(n, dtype=torch.float64), P)
    assert abs(float(z0) - (math.lgamma(n + 1) - 2 * math.lgamma(k + 1))) < 1e-9
    x = cs.relax(u, P, "exp_family")
    torch.testing.assert_close(x.sum(1), torch.full((2,), float(k), dtype=torch.float64), atol=1e-8, rtol=0)
    z = cs.log_partition(u, P)
    monkeypatch.setattr(fast, "_MAP_MAX", 1 << 40)       # the coefficient maps, for comparison
    torch.testing.assert_close(cs.relax(u, P, "exp_family"), x, atol=1e-12, rtol=0)
    torch.testing.assert_close(cs.log_partition(u, P), z, atol=1e-10, rtol=0)
    A, B = torch.randn(3, 2, 40, generator=gen, dtype=torch.float64), torch.randn(3, 2, 30, generator=gen, dtype=torch.float64)

    def convolve(P, Q, deg):  # numpy's convolution of each pair of rows, truncated to degree deg
        return np.array([[np.convolve(a, b)[: deg + 1] for a, b in zip(ra, rb)] for ra, rb in zip(P.numpy(), Q.numpy())])

    for deg in (50, 20):  # truncated above both factors' degrees, and below the shorter one's
        monkeypatch.setattr(fast, "_MAP_MAX", 1 << 40)
        want, want_log = fast._poly_mul(A, B, deg), fast._log_poly_mul(A, B, deg)
        np.testing.assert_allclose(want.numpy(), convolve(A, B, deg), rtol=0, atol=1e-12)
        np.testing.assert_allclose(want_log.exp().numpy(), convolve(A.exp(), B.exp(), deg), rtol=1e-12, atol=0)
        monkeypatch.setattr(fast, "_MAP_MAX", 0)
        torch.testing.assert_close(fast._poly_mul(A, B, deg), want, atol=1e-12, rtol=0)
        torch.testing.assert_close(fast._log_poly_mul(A, B, deg), want_log, atol=1e-12, rtol=0)
        torch.testing.assert_close(fast._log_poly_mul(B, A, deg), want_log, atol=1e-12, rtol=0)  # shorter first


def test_large_score_gaps_keep_full_precision():
    """log(1 + e^x) terms to full precision: torch's softplus returns x above 20, which lost
    e^-x (here up to 6e-10) in the cube's and the k-subset's log-partition and the cube's gradient."""
    u = torch.tensor([[22.0, 1.0, 0.0, -1.0, -2.0], [25.0, 21.5, -3.0, 0.5, 30.0]], dtype=torch.float64)
    for name, params in (("hypercube", {"n": 5}), ("k_subset", {"n": 5, "k": 2})):
        P = cs.load_polytope(name, **params)
        torch.testing.assert_close(cs.log_partition(u, P), enumerated(u, P, 1.0), atol=1e-13, rtol=0)
    x = u.clone().requires_grad_()
    (g,) = torch.autograd.grad(cs.log_partition(x, cs.load_polytope("hypercube", n=5)).sum(), x)
    torch.testing.assert_close(g, torch.sigmoid(u), atol=1e-15, rtol=0)
    # and finite second derivatives at any score (logaddexp's are NaN below -710)
    x = torch.tensor([[-1e4, -800.0, -30.0, 0.0, 800.0]], dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(cs.log_partition(x, cs.load_polytope("hypercube", n=5)).sum(), x, create_graph=True)
    (h,) = torch.autograd.grad(g.sum(), x)
    s = torch.sigmoid(x.detach())
    torch.testing.assert_close(h, s * (1 - s), atol=1e-15, rtol=0)


@pytest.mark.parametrize("name,params", ALL_SMALL)
def test_forced_entries_keep_full_precision(name, params, gen):
    """u_j + 1e9 forcing a choice (and, in half the rows, another entry at -1e9 masking one):
    at 1e9 the scores lost their differences to rounding (ulp 1.2e-7), and the gradient was off by
    up to 6e-8 (trees, arborescences, DAG paths, enumeration). Such entries now come down first,
    as in relax. Reference: enumeration over the structures that use the forced entry, in a frame
    where it is not added (exact), and the value's 1e9 added last."""
    P = cs.load_polytope(name, **params)
    V = P.vertices(dtype=torch.float64).reshape(-1, P.size)
    B = 16
    u = 2.0 * torch.randn(B, P.size, generator=gen, dtype=torch.float64)
    pick = torch.randint(0, V.shape[0], (B,), generator=gen)
    j = torch.multinomial(V[pick] + 1e-12, 1, generator=gen)[:, 0]  # an entry of some structure
    rows = torch.arange(B)
    # a masked entry that the picked structure avoids (where it avoids any), in the odd rows
    k = torch.multinomial((1.0 - V[pick]) + 1e-12, 1, generator=gen)[:, 0]
    masked = (rows % 2 == 1) & (V[pick, k] == 0)
    base = u.clone()
    base[rows[masked], k[masked]] -= 1e9
    scores = base @ V.T + 1e9 * (V[:, j].T - 1.0)  # the forced entry's 1e9 left out where it is used
    x = base.clone()
    x[rows, j] += 1e9
    x.requires_grad_()
    lz = cs.log_partition(x.reshape(B, *P.shape), P)
    (g,) = torch.autograd.grad(lz.sum(), x)
    torch.testing.assert_close(lz, torch.logsumexp(scores, 1) + 1e9, atol=0, rtol=1e-15)
    torch.testing.assert_close(g, torch.softmax(scores, 1) @ V, atol=1e-12, rtol=0)
