"""The spanning-tree fast paths with separable regularizers (the decomposition algorithm): its
minimum-cut and partition oracles against enumeration, the relaxation against the torch solver,
a Frank–Wolfe optimality certificate where that solver stalls, derivatives against differences."""

import itertools
import math
import warnings

import numpy as np
import pytest
import torch

import convex_sst as cs
from convex_sst import _graphic_matroid
from convex_sst._graphic_matroid import _best_union, _capped, _min_cut_source_side, min_partition, min_partitions, spanning_tree_rows
from convex_sst.fast import capped_simplex
from convex_sst.regularizers import get_regularizer

SEPARABLE = ["entropy", "binary_entropy", "quadratic"]


def _set_partitions(items):
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for p in _set_partitions(rest):
        for i in range(len(p)):
            yield p[:i] + [[first] + p[i]] + p[i + 1:]
        yield [[first]] + p


def _partition_value(W, parts):
    return sum(len(P) - 1 - 0.5 * W[np.ix_(P, P)].sum() for P in parts)


def _random_weights(rng, k):
    W = rng.random((k, k)) * rng.choice([0.5, 1.0, 2.0, 3.0]) * (rng.random((k, k)) < rng.choice([0.3, 0.6, 1.0]))
    if rng.random() < 0.3:
        W = np.round(W * 2) / 2  # ties
    W = np.triu(W, 1)
    return W + W.T


@pytest.mark.parametrize("enumerate_parts", [0, 10])
def test_min_partition_matches_enumeration(enumerate_parts, monkeypatch):
    # the union of parts a new vertex joins: by a minimum cut (0), or by trying every union
    # where there are at most 10 parts (the default)
    monkeypatch.setattr(_graphic_matroid, "_ENUMERATE_PARTS", enumerate_parts)
    rng = np.random.default_rng(0)
    nontrivial = 0
    for _ in range(400):
        k = int(rng.integers(2, 8))
        W = _random_weights(rng, k)
        best = min(_partition_value(W, p) for p in _set_partitions(list(range(k))))
        parts, value = min_partition(W, 1e-12)
        assert sorted(v for P in parts for v in P) == list(range(k))
        assert abs(value - _partition_value(W, parts)) < 1e-12
        assert value <= best + 1e-12, (W, parts, value, best)
        nontrivial += 1 < len(parts) < k and value < -1e-9  # some parts merged, not all
    assert nontrivial > 50  # the incremental merges are exercised, not only the two extremes


def test_min_partition_by_cuts_and_by_unions_agree_on_larger_graphs(monkeypatch):
    rng = np.random.default_rng(9)
    for _ in range(30):
        k = int(rng.integers(9, 25))
        W = _random_weights(rng, k)
        value = min_partition(W, 1e-12)[1]
        monkeypatch.setattr(_graphic_matroid, "_ENUMERATE_PARTS", 0)
        assert abs(min_partition(W, 1e-12)[1] - value) < 1e-12
        monkeypatch.setattr(_graphic_matroid, "_ENUMERATE_PARTS", 10)


@pytest.mark.parametrize("enumerate_parts", [0, 10])
def test_best_union_matches_enumeration(enumerate_parts, monkeypatch):
    """The union of parts a new vertex joins, after the rules that leave parts out or take them
    in, by a minimum cut (0) or by trying the unions of the parts left (10), against all 2^q
    unions; ties and weights near the rules' thresholds included."""
    monkeypatch.setattr(_graphic_matroid, "_ENUMERATE_PARTS", enumerate_parts)
    cuts = []
    monkeypatch.setattr(_graphic_matroid, "_min_cut_source_side", lambda *a: cuts.append(1) or _min_cut_source_side(*a))
    rng = np.random.default_rng(11)
    decided = 0
    for _ in range(400):
        q = int(rng.integers(1, 13))
        Wp = _random_weights(rng, q) * rng.choice([1.0, 2.0, 4.0]) / q  # marginals near 1
        wv = rng.random(q) * rng.choice([0.5, 1.0, 1.5])
        if rng.random() < 0.3:
            wv = np.round(wv * 4) / 4  # gains of exactly 0 and marginals at the thresholds
        subsets = np.array(list(itertools.product([0.0, 1.0], repeat=q)))
        best = (subsets @ wv + 0.5 * ((subsets @ Wp) * subsets).sum(1) - subsets.sum(1)).max()
        S = _best_union(Wp, wv)
        assert abs(wv[S].sum() + 0.5 * Wp[np.ix_(S, S)].sum() - len(S) - best) < 1e-12
        decided += 0 < len(S) < q
    assert decided > 60  # proper unions, not only none or all of the parts
    assert len(cuts) > (100 if enumerate_parts == 0 else 0)  # parts the rules leave open, by a cut


def test_min_partitions_of_a_batch_match_the_rows_one_by_one(monkeypatch):
    """The batched minimum partition (the arborescences' separation, the spanning trees' levels)
    against min_partition row by row: the same value, and labels that attain it; up to 14
    vertices, so that rows with more than _ENUMERATE_PARTS parts take the minimum cut; ties
    included. (Batches of any size here: by default those below _BATCHED_ROWS go row by row.)"""
    monkeypatch.setattr(_graphic_matroid, "_BATCHED_ROWS", 1)
    rng = np.random.default_rng(7)
    for _ in range(150):
        k, B = int(rng.integers(1, 15)), int(rng.integers(1, 7))
        W = np.stack([_random_weights(rng, k) for _ in range(B)])
        pad = int(rng.integers(0, 3))  # isolated vertices after the graph (the decomposition's levels)
        labels, values = min_partitions(np.pad(W, ((0, 0), (0, pad), (0, pad))), np.full(B, 1e-12))
        for b in range(B):
            _, value = min_partition(W[b], 1e-12)
            parts = [np.flatnonzero(labels[b, :k] == c).tolist() for c in np.unique(labels[b, :k])]
            assert abs(values[b] - value) < 1e-9
            assert abs(_partition_value(W[b], parts) - value) < 1e-9
            q = len(parts)  # parts numbered 0 .. q - 1, the padding's own parts after them
            assert sorted(set(labels[b, :k])) == list(range(q)) and labels[b, k:].tolist() == list(range(q, q + pad))


def test_weights_between_parts_by_edges_match_the_one_hot_products(monkeypatch):
    """From _EDGE_SUMS_FROM vertices on, the weights between parts are summed over the edges
    instead of by one-hot products: both ways on the same graphs (sparse and dense, 5 to 30
    vertices, ties), row by row and batched, must give the same partitions' values."""
    rng = np.random.default_rng(13)
    violated = 0
    for _ in range(40):
        k, B = int(rng.integers(5, 31)), int(rng.integers(1, 5))
        W = np.stack([_random_weights(rng, k) for _ in range(B)])
        W *= rng.uniform(1.5, 4.0, (B, 1, 1)) / np.maximum(W.sum(2).mean(1), 1e-9)[:, None, None]  # mean degree
        got = {}
        for way, first in (("edges", 0), ("one-hot", 10**9)):
            monkeypatch.setattr(_graphic_matroid, "_EDGE_SUMS_FROM", first)
            monkeypatch.setattr(_graphic_matroid, "_BATCHED_ROWS", 1)
            batched = min_partitions(W, np.full(B, 1e-12))[1]
            rows = [min_partition(W[b], 1e-12)[1] for b in range(B)]
            got[way] = np.concatenate([batched, rows])
        assert np.allclose(got["edges"], got["one-hot"], rtol=0, atol=1e-12)
        violated += (got["edges"] < -1e-9).sum()
    assert violated > 40  # rows above the forest polytope: parts were merged


def test_min_cut_matches_enumeration():
    rng = np.random.default_rng(1)
    for _ in range(300):
        N = int(rng.integers(3, 8))
        cap = rng.random((N, N)) * (rng.random((N, N)) < 0.6)
        np.fill_diagonal(cap, 0.0)
        s, t = 0, N - 1
        if rng.random() < 0.5:
            cap[s, 1] = np.inf
        side = _min_cut_source_side(cap, s, t)
        assert side[s] and not side[t]

        def cut(S):
            mask = np.zeros(N, dtype=bool)
            mask[list(S)] = True
            return cap[np.ix_(mask, ~mask)].sum()

        inner = range(1, N - 1)
        best = min(cut((s,) + c) for r in range(N - 1) for c in itertools.combinations(inner, r))
        assert cut(np.flatnonzero(side)) <= best + 1e-12


def test_min_cut_of_large_sparse_graphs_matches_scipy_max_flow():
    # above 64 vertices the residual graph is kept sparse; integer capacities, so that scipy's
    # maximum flow (integers only) is an exact reference
    from scipy.sparse import csr_array
    from scipy.sparse.csgraph import maximum_flow

    rng = np.random.default_rng(8)
    for N in (65, 90, 140):
        cap = rng.integers(1, 20, (N, N)) * (rng.random((N, N)) < 4 / N)
        np.fill_diagonal(cap, 0)
        side = _min_cut_source_side(cap.astype(float), 0, N - 1)
        value = cap[np.ix_(side, ~side)].sum()
        assert side[0] and not side[N - 1]
        assert value == maximum_flow(csr_array(cap.astype(np.int32)), 0, N - 1).flow_value


def test_min_cut_source_side_is_the_smallest_one():
    """The source side must be the vertices reachable from s in the residual graph of a maximum
    flow (the smallest minimum cut, the same for every maximum flow), not just some minimum cut.
    Integer capacities, so that scipy's maximum flow is an exact reference, with many ties:
    graphs of the sizes the separation cuts (10 to 40 vertices, each tied to s or to t, half
    with symmetric inner arcs; the blocking flow splits the flow reaching a vertex over its
    arcs), the same capacities times π (floats) and with an infinite arc out of s (against a
    finite one above the total capacity); then small sparse digraphs."""
    from scipy.sparse import csr_array
    from scipy.sparse.csgraph import maximum_flow

    def reachable(cap: np.ndarray, s: int, t: int) -> np.ndarray:
        residual = cap - maximum_flow(csr_array(cap.astype(np.int32)), s, t).flow.toarray()
        reach = np.zeros(len(cap), dtype=bool)
        reach[s] = True
        while True:
            more = reach | (residual[reach] > 0).any(0)
            if (more == reach).all():
                return reach
            reach = more

    rng = np.random.default_rng(12)
    split = 0
    for _ in range(60):
        N = int(rng.integers(10, 41))
        s, t = 0, N - 1
        cap = rng.integers(0, 4, (N, N)) * (rng.random((N, N)) < rng.choice([0.3, 0.7, 1.0]))
        if rng.random() < 0.5:  # symmetric inner arcs, as in the separation's cuts
            cap = np.triu(cap, 1) + np.triu(cap, 1).T
        source = rng.random(N) < 0.5  # each vertex tied to s or to t
        cap[s] = np.where(source, rng.integers(0, 2 * N, N), 0)
        cap[:, t] = np.where(source, 0, rng.integers(0, 2 * N, N))
        cap[:, s] = cap[t] = 0
        np.fill_diagonal(cap, 0)
        reach = reachable(cap, s, t)
        split += 1 < reach.sum() < N - 1
        assert (_min_cut_source_side(cap.astype(float), s, t) == reach).all()
        assert (_min_cut_source_side(cap * math.pi, s, t) == reach).all()
        big = cap.copy()
        big[s, 1] = cap.sum() + 1
        infinite = cap * 1.0
        infinite[s, 1] = math.inf
        assert (_min_cut_source_side(infinite, s, t) == reachable(big, s, t)).all()
    assert split > 20  # cuts that split the inner vertices, not only s or everything but t alone
    # the largest source side: the vertices that cannot reach t in the residual graph
    for _ in range(200):
        N = int(rng.integers(4, 12))
        cap = rng.integers(0, 3, (N, N)) * (rng.random((N, N)) < 0.5)
        np.fill_diagonal(cap, 0)
        cap[:, 0] = cap[N - 1] = 0
        residual = cap - maximum_flow(csr_array(cap.astype(np.int32)), 0, N - 1).flow.toarray()
        to_t = np.zeros(N, dtype=bool)
        to_t[N - 1] = True
        while True:
            more = to_t | (residual[:, to_t] > 0).any(1)
            if (more == to_t).all():
                break
            to_t = more
        largest = _min_cut_source_side(cap.astype(float), 0, N - 1, True)
        assert (largest == ~to_t).all() and (largest >= reachable(cap, 0, N - 1)).all()
    # small sparse digraphs, where a maximum flow has to send flow back along arcs it used (without
    # the reverse arcs' residuals, 116 of 20 000 such graphs came out wrong)
    for _ in range(1500):
        N = int(rng.integers(4, 9))
        cap = rng.integers(0, 3, (N, N)) * (rng.random((N, N)) < 0.5)
        np.fill_diagonal(cap, 0)
        cap[:, 0] = cap[N - 1] = 0
        assert (_min_cut_source_side(cap.astype(float), 0, N - 1) == reachable(cap, 0, N - 1)).all()


@pytest.mark.parametrize("reg", SEPARABLE)
def test_capped_step_matches_the_root_finder(reg, monkeypatch):
    """Step 1 in closed form (entropy, quadratic) or by NumPy Newton steps (binary entropy),
    for padded batches of rows with their own k (the decomposition's levels), against the capped
    simplex's safeguarded root finder on each row's entries; ties and large |θ| included."""
    rng = np.random.default_rng(7)
    for _ in range(60):
        S, width = int(rng.integers(1, 8)), int(rng.integers(2, 30))
        theta = np.full((S, width), -np.inf)  # each row's entries, then -inf padding
        m = rng.integers(2, width + 1, size=S)
        k = np.array([int(rng.integers(1, mi)) for mi in m])
        for i in range(S):
            theta[i, :m[i]] = rng.normal(size=m[i]) * rng.choice([0.1, 1.0, 10.0, 100.0])
            if rng.random() < 0.3:
                theta[i, :m[i]] = np.round(theta[i, :m[i]])
        x = _capped(theta, k, reg)
        for i in range(S):
            ref = capped_simplex(torch.from_numpy(theta[i, :m[i]])[None], int(k[i]), reg)[0][0].numpy()
            assert abs(x[i].sum() - k[i]) < 1e-10 * k[i] and x[i].min() >= 0 and x[i].max() <= 1
            assert np.abs(x[i, :m[i]] - ref).max() < 1e-10 and (x[i, m[i]:] == 0).all()
    if reg == "binary_entropy":  # where Newton gives up, the root finder answers
        monkeypatch.setattr(_graphic_matroid, "_capped_binary_entropy",
                            lambda theta, k: (np.zeros_like(theta), np.zeros(len(k), dtype=bool)))
        assert np.abs(_capped(theta, k, reg) - x).max() < 1e-10


def _random_graph(rng, n):
    """A connected graph on n vertices: a random spanning tree plus random edges."""
    perm = rng.permutation(n)
    edges = {tuple(sorted((int(perm[i]), int(perm[rng.integers(0, i)])))) for i in range(1, n)}
    edges |= {(i, j) for i in range(n) for j in range(i + 1, n) if rng.random() < 0.5}
    return sorted(edges)


@pytest.mark.parametrize("reg", SEPARABLE)
def test_levels_solved_together_equal_rows_solved_alone(reg, monkeypatch):
    """The decomposition's subproblems of a level go to one batched minimum partition (the smaller
    graphs padded with isolated vertices) where there are _BATCHED_ROWS or more: against every
    partition taken row by row, on 24 rows of a sparse graph at temperatures from 0.05 to 3, so
    that a level mixes subproblems of many sizes."""
    rng = np.random.default_rng(5)
    n = 12
    edges = np.array(_random_graph(rng, n))
    theta = rng.normal(size=(24, len(edges))) / rng.choice([0.05, 0.3, 1.0, 3.0], size=(24, 1))
    calls = []
    batched = _graphic_matroid.min_partitions
    monkeypatch.setattr(_graphic_matroid, "min_partitions", lambda W, tol: calls.append(len(W)) or batched(W, tol))
    x, block = spanning_tree_rows(theta, edges, n, reg)
    assert max(calls) >= 16 and len(calls) >= 3  # several levels, batched
    monkeypatch.setattr(_graphic_matroid, "_BATCHED_ROWS", 10 ** 9)
    x1, block1 = spanning_tree_rows(theta, edges, n, reg)
    assert np.abs(x - x1).max() < 1e-12
    for b in range(24):  # the same blocks, numbered alike or not
        same = block[b][:, None] == block[b][None, :]
        assert (same == (block1[b][:, None] == block1[b][None, :])).all() and ((block[b] < 0) == (block1[b] < 0)).all()
    assert (block.max(1) >= 1).sum() >= 8  # rows split into several blocks


@pytest.mark.parametrize("reg", SEPARABLE)
def test_equals_the_torch_solver_on_random_graphs(reg):
    from convex_sst.relax import _route

    assert _route(cs.load_polytope("spanning_tree", n=30), get_regularizer(reg), "auto")[0] == "fast"
    rng = np.random.default_rng(2)
    gen = torch.Generator().manual_seed(2)
    splits = 0
    for n in (4, 6, 8, 9):
        P = cs.load_polytope("spanning_tree", n=n, edges=_random_graph(rng, n))
        for t in (0.2, 1.0):
            u = 2 * torch.randn((4,) + P.shape, generator=gen, dtype=torch.float64, requires_grad=True)
            w = torch.randn(u.shape, generator=gen, dtype=torch.float64)
            x = cs.relax(u, P, reg, t, backend="fast")
            ref = cs.relax(u, P, reg, t, backend="torch")
            assert (x - ref).abs().max() < 1e-7
            (g,) = torch.autograd.grad((x * w).sum(), u)
            (gr,) = torch.autograd.grad((ref * w).sum(), u)
            assert (g - gr).abs().max() < 1e-6
            splits += int((spanning_tree_rows((u.detach() / t).numpy(), P.data["E"], n, reg)[1].max(1) > 0).sum())
    assert splits >= 8  # rows solved in several blocks: the decomposition is exercised


def _frank_wolfe_gap(u, x, P, reg, t):
    """``max_{v∈𝒳} gᵀ(v − x)`` with ``g = u − t ∇f(x)``, the gradient of the objective: ≥ 0 for x
    in P, and 0 only at the optimum (``v`` by Kruskal)."""
    grad = {"entropy": torch.log(x) + 1, "binary_entropy": torch.log(x) - torch.log1p(-x), "quadratic": x}[reg]
    g = u - t * grad
    return ((P.argmax(g) - x) * g).sum(-1)


@pytest.mark.parametrize("reg, t", [("entropy", 0.5), ("entropy", 0.1), ("binary_entropy", 1.0), ("quadratic", 1.0)])
def test_optimal_on_large_trees(reg, t):
    # spanning trees n = 26, where the torch solver stalls on some rows (the quadratic: 6 of 16
    # reported, off by up to 1.6e-3): x is in P and the Frank–Wolfe gap is 0 to rounding. With
    # the entropy at t = 0.1 the gap weighs edges of x ~ 1e-12 by log x: it was 0.18 while the
    # partitions were minimal only to 1e-11, which put such edges on the wrong side of a split
    # (x itself off by 3e-12). The binary entropy stays at t = 1: its ∇f is infinite where x
    # rounds to 1.
    n = 26
    P = cs.load_polytope("spanning_tree", n=n)
    u = 3 * torch.randn((6,) + P.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = cs.relax(u, P, reg, t)
    blocks = spanning_tree_rows((u / t).numpy(), P.data["E"], n, reg)[1].max(1) + 1
    assert blocks.min() >= 3  # the capped simplex alone is not in P: the decomposition splits
    assert (x.sum(-1) - (n - 1)).abs().max() < 1e-10
    assert x.min() >= 0 and x.max() <= 1
    for row in x.numpy():  # x(E(S)) ≤ |S| − 1 for every vertex set S
        W = np.zeros((n, n))
        np.add.at(W, (P.data["E"][:, 0], P.data["E"][:, 1]), row)
        assert min_partition(W + W.T, 0.0)[1] > -1e-10
    gap = _frank_wolfe_gap(u, x, P, reg, t)
    assert gap.min() > -1e-9 and gap.max() < 1e-9
    # the certificate can fail: a slightly perturbed point in P has a visible gap
    y = 0.999 * x + 0.001 * P.argmax(torch.randn(u.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    assert _frank_wolfe_gap(u, y, P, reg, t).min() > 1e-6


@pytest.mark.parametrize("reg", SEPARABLE)
def test_directional_derivatives_match_central_differences(reg):
    n = 20
    P = cs.load_polytope("spanning_tree", n=n)
    gen = torch.Generator().manual_seed(3)
    u = torch.randn((4,) + P.shape, generator=gen, dtype=torch.float64)
    v, w = torch.randn(u.shape, generator=gen, dtype=torch.float64), torch.randn(u.shape, generator=gen, dtype=torch.float64)
    t = 0.3
    uu = u.clone().requires_grad_()
    (g,) = torch.autograd.grad((cs.relax(uu, P, reg, t) * w).sum(), uu)
    h = 1e-6
    fd = ((cs.relax(u + h * v, P, reg, t) - cs.relax(u - h * v, P, reg, t)) * w).sum(-1) / (2 * h)
    exact = (g * v).sum(-1)
    assert ((fd - exact).abs() / (1 + exact.abs())).max() < 1e-6


@pytest.mark.parametrize("reg", SEPARABLE)
def test_low_temperature_gives_the_spanning_tree_of_largest_weight(reg):
    # distinct integer utilities: every exchange of edges changes uᵀx by at least 1, so
    # at t = 0.02 the relaxation is within e^-50 of the hard argmax (the quadratic: equal), and
    # the fast path within its roots' tolerance (1e-12 per unit of Σx)
    P = cs.load_polytope("spanning_tree", n=10)
    gen = torch.Generator().manual_seed(4)
    for scale in (1.0, 1e3):
        u = scale * torch.stack([torch.randperm(P.size, generator=gen) for _ in range(5)]).double()
        x = cs.relax(u, P, reg, 0.02 * scale)
        assert (x - P.argmax(u)).abs().max() < 1e-10


def test_bridges_are_one_with_zero_gradient():
    # a triangle with a pendant path: edges (2, 3) and (3, 4) are in every spanning tree
    P = cs.load_polytope("spanning_tree", n=5, edges=[[0, 1], [1, 2], [0, 2], [2, 3], [3, 4]])
    u = torch.randn((3,) + P.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64, requires_grad=True)
    for reg in SEPARABLE:
        x = cs.relax(u, P, reg, 0.5)
        assert torch.equal(x[:, 3:], torch.ones(3, 2, dtype=torch.float64))
        assert (x[:, :3].sum(-1) - 2).abs().max() < 1e-12
        (g,) = torch.autograd.grad(x[:, 3:].sum() + (x[:, :3] ** 2).sum(), u)
        assert torch.equal(g[:, 3:], torch.zeros(3, 2, dtype=torch.float64))


def test_dtype_device_and_empty_batch():
    P = cs.load_polytope("spanning_tree", n=6)
    u = torch.randn(3, *P.shape, generator=torch.Generator().manual_seed(6))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x32 = cs.relax(u, P, "entropy", 0.5)
    assert x32.dtype == torch.float32 and x32.device == u.device
    assert (x32.double() - cs.relax(u.double(), P, "entropy", 0.5)).abs().max() < 1e-6
    assert cs.relax(u[:0], P, "quadratic", 0.5).shape == (0,) + P.shape
    assert cs.relax(u.reshape(3, 1, -1), P, "quadratic", 0.5).shape == (3, 1) + P.shape


@pytest.mark.parametrize("name, params, u", [
    ("spanning_tree", {"n": 5}, [1e4, 1e4, 1e4, 1.0, -0.88, -1.28, -0.62, -0.87, -1.30, 1.52]),  # 3 edges of K5 forced
    ("k_subset", {"n": 7, "k": 3}, [1e4, 1e4, 1e4, 0.3, -0.2, 0.5, 0.1]),                        # 3 items of 7 forced
])
@pytest.mark.parametrize("reg", ["entropy", "quadratic"])
def test_tied_entries_at_the_cap_have_a_zero_derivative(name, params, u, reg):
    """Tied logits put entries exactly at the cap x = 1 without clamping them (three edges forced
    with the same +1e4: the block of rank 3 gives each 1, computed as 1 − 1e-16). Counted as
    free, they let mass move among them, which the cap forbids: the gradient had ±0.5 between
    them, where the torch solver and central differences give 0."""
    P = cs.load_polytope(name, **params)
    theta = torch.tensor([u], dtype=torch.float64)
    J = torch.autograd.functional.jacobian(lambda v: cs.relax(v, P, reg, 1.0, backend="fast"), theta)[0, :, 0, :]
    assert J[:3].abs().max() < 1e-9 and J[:, :3].abs().max() < 1e-9
    Jt = torch.autograd.functional.jacobian(lambda v: cs.relax(v, P, reg, 1.0, backend="torch"), theta)[0, :, 0, :]
    assert (J - Jt).abs().max() < 1e-5
    h, d = 1e-6, torch.randn(theta.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with torch.no_grad():
        fd = (cs.relax(theta + h * d, P, reg, 1.0) - cs.relax(theta - h * d, P, reg, 1.0)) / (2 * h)
    assert (J @ d[0] - fd[0]).abs().max() < 1e-5


def test_tied_tight_sets_split_the_jacobian():
    """K5, u = (−1, −1, 1, 1, −1, 0, 0, 0, 0, 2) at t = 0.1, the quadratic: {0, 3, 4} is
    contracted to S, and in the contraction y = ½ on the four edges from 1 and from 2 to S is
    feasible, but {1, S} and {2, S} are tight with no violation, and they stay tight under
    every small change. Kept as one block, the gradient was off in every direction (0.75/t on
    the diagonal where the torch solver and one-sided differences give 0.5/t); the block now
    splits on such sets. min_partition with ``larger`` finds the largest tight parts."""
    from convex_sst._graphic_matroid import min_partition

    W = np.zeros((3, 3))
    W[0, 1] = W[1, 0] = W[0, 2] = W[2, 0] = 1.0
    assert min_partition(W, 1e-12)[0] == [[0], [1], [2]]  # smallest: no merge on a zero gain
    assert min_partition(W, 1e-12, larger=True)[0] == [[0, 1, 2]]
    assert min_partition(W[:2, :2], 1e-12, larger=True)[0] == [[0, 1]]  # {S, 1}
    P = cs.load_polytope("spanning_tree", n=5)
    u = torch.tensor([[-1.0, -1.0, 1.0, 1.0, -1.0, 0.0, 0.0, 0.0, 0.0, 2.0]], dtype=torch.float64)
    J = torch.autograd.functional.jacobian(lambda v: cs.relax(v, P, "quadratic", 0.1), u)[0, :, 0, :]
    Jt = torch.autograd.functional.jacobian(lambda v: cs.relax(v, P, "quadratic", 0.1, backend="torch"), u)[0, :, 0, :]
    assert (0.1 * (J - Jt)).abs().max() < 1e-6
    for k in range(4):
        d = torch.randn(u.shape, generator=torch.Generator().manual_seed(k), dtype=torch.float64)
        h = 1e-7
        x0 = cs.relax(u, P, "quadratic", 0.1)
        for sign in (1, -1):
            one_sided = sign * (cs.relax(u + sign * h * d, P, "quadratic", 0.1) - x0) / h
            assert (J @ d[0] - one_sided[0]).abs().max() < 1e-6
