"""Built-in polytopes: exactly the intended structures as vertices; argmax equals brute force."""

import itertools
import math
import warnings

import numpy as np
import pytest
import torch
from conftest import SMALL_CASES, user_copy

import convex_sst as cs

CASES = [(name, params, count) for name, cases in SMALL_CASES.items() for params, count in cases]


def test_every_builtin_has_cases():
    from convex_sst.polytope import builtin_config_paths

    assert set(builtin_config_paths()) == set(SMALL_CASES)


def _is_structure(name, params, v):
    """Independent combinatorial characterisation of each built-in structure."""
    v = np.asarray(v).round().astype(int)
    if name == "simplex":
        return v.sum() == 1
    if name == "hypercube":
        return True
    if name == "k_subset":
        return v.sum() == params["k"]
    if name == "birkhoff":
        return (v.sum(0) == 1).all() and (v.sum(1) == 1).all()
    if name == "matching":
        return (v.sum(1) == 1).all() and (v.sum(0) <= 1).all()
    if name == "spanning_tree":
        n = params["n"]
        edges = params.get("edges")
        edges = list(itertools.combinations(range(n), 2)) if edges is None else np.asarray(edges).tolist()
        chosen = [tuple(sorted(e)) for e, b in zip(edges, v) if b]
        return len(chosen) == n - 1 and _connected(n, chosen)
    if name == "arborescence":
        n, root = params["n"], params.get("root", 0)
        if v[:, root].sum() != 0 or (np.delete(v.sum(0), root) != 1).any() or np.trace(v) != 0:
            return False
        arcs = [(h, m) for h in range(n) for m in range(n) if v[h, m]]
        return _connected(n, arcs)
    if name == "dag_path":
        return True  # counted below
    if name == "correlated_k_subset":
        n, items = params["n"], v[: params["n"]]
        return items.sum() == params["k"] and bool((v[n:] == items[:-1] * items[1:]).all())
    raise KeyError(name)


def _connected(n, edges):
    parent = list(range(n))

    def find(a):
        while parent[a] != a:
            a = parent[a]
        return a

    for i, j in edges:
        parent[find(i)] = find(j)
    return len({find(i) for i in range(n)}) == 1


@pytest.mark.parametrize("name,params,count", CASES)
def test_vertices_are_exactly_the_structures(name, params, count):
    P = cs.load_polytope(name, **params)
    V = P.vertices()
    assert V.shape == (count,) + P.shape
    assert len({tuple(v.reshape(-1).tolist()) for v in V}) == count
    assert all(_is_structure(name, P.params, v) for v in V)
    assert bool(P.contains(V).all())


@pytest.mark.parametrize("seed", range(3))
def test_vertices_of_random_user_polytopes_match_a_scan_of_the_cube(seed, tmp_path):
    # the enumeration (depth-first, LPs pruning, witness points and a probe that fixes the
    # coordinates a face forces) against all 2^d 0/1 vectors checked against the constraints
    # directly, on random user polytopes (not integral: the 0/1 points of P), some with a
    # cardinality row so that faces force coordinates
    import itertools

    from oracles import random_constraint_config

    rng = np.random.default_rng(seed)
    checked = 0
    for i in range(30):
        text = random_constraint_config(rng, f"scan_{i}")
        d = int(text.split("shape: [")[1].split("]")[0])
        if i % 2:
            text += f"  - sum(x) <= {int(rng.integers(1, d))}\n"
        if i % 5 == 0:  # a coordinate fixed by its bounds, at 1 or at a value no 0/1 point has
            value = (1.0, 0.25)[i % 10 // 5]
            text += f"  - {value} <= x[{d - 1}] <= {value}\n"
        path = tmp_path / f"scan_{i}.yaml"
        path.write_text(text)
        try:
            P = cs.load_polytope(path)
        except cs.PolytopeError:
            continue
        cube = np.array(list(itertools.product((0.0, 1.0), repeat=d)))  # lexicographic
        expected = cube[P.form.residual(cube) <= 1e-9]
        V = P.vertices().numpy()
        assert V.shape == expected.shape and (V == expected).all(), text
        checked += 1
    assert checked >= 20


@pytest.mark.parametrize("name, params, count", [("correlated_k_subset", {"n": 7, "k": 3}, 35), ("arborescence", {"n": 5}, 125),
                                                 ("birkhoff", {"n": 5}, 120), ("k_subset", {"n": 9, "k": 4}, 126)])
def test_vertices_of_user_copies_of_flow_formulations(name, params, count, tmp_path):
    # the same structures through a user's copy (no argmax, LPs only) as through the built-in
    # argmax's brute force: the probe fixes a face's forced coordinates (the pairs of a chosen
    # subset, the arcs of a finished tree) without branching on them
    P = cs.load_polytope(user_copy(tmp_path, name), **params)
    V = P.vertices()
    assert V.shape[0] == count
    builtin = cs.load_polytope(name, **params)
    assert torch.equal(V, builtin.vertices())
    assert bool(P.contains(V).all())


def test_theory_counts():
    # Cayley: n^(n-2) spanning trees of K_n and arborescences of K_n with a fixed root
    assert cs.load_polytope("spanning_tree", n=5).vertices().shape[0] == 5 ** 3
    assert cs.load_polytope("arborescence", n=5, root=2).vertices().shape[0] == 5 ** 3
    assert cs.load_polytope("birkhoff", n=4).vertices().shape[0] == math.factorial(4)
    assert cs.load_polytope("k_subset", n=7, k=3).vertices().shape[0] == math.comb(7, 3)


@pytest.mark.parametrize("name,params,count", CASES)
def test_argmax_equals_brute_force(name, params, count, gen):
    P = cs.load_polytope(name, **params)
    V = P.vertices()
    u = torch.randn((16,) + P.shape, generator=gen, dtype=torch.float64)
    scores = torch.einsum("bd,vd->bv", u.reshape(16, -1), V.reshape(len(V), -1))
    brute = V[scores.argmax(1)]
    assert torch.equal(P.argmax(u), brute)
    assert torch.equal(P.lp_argmax(u), brute)
    # float32 and unbatched inputs keep dtype and shape
    x32 = P.argmax(u[0].float())
    assert x32.dtype == torch.float32 and x32.shape == P.shape
    assert torch.equal(x32.double(), brute[0])
    # empty batches (e.g. the last, empty chunk of a dataset) give empty results
    for batch in [(0,), (2, 0)]:
        empty = torch.zeros(batch + P.shape, dtype=torch.float64)
        assert P.argmax(empty).shape == P.lp_argmax(empty).shape == batch + P.shape


def test_batched_chu_liu_edmonds_finds_best_arborescences():
    """The batched Chu–Liu/Edmonds (batches of 16 rows or more) against brute force over every
    arborescence up to n = 5 and against the row-by-row recursion up to n = 20 (which the
    brute-force test above checks): the same best score, a valid arborescence; any root, tied
    and huge scores (ties may be broken differently)."""
    from convex_sst.argmax import _chu_liu_edmonds_batched, chu_liu_edmonds_tree

    rng = np.random.default_rng(3)
    trees = {}
    for trial in range(120):
        n = int(rng.integers(2, 21)) if trial >= 40 else int(rng.integers(2, 6))
        root = int(rng.integers(0, n))
        W = rng.normal(size=(int(rng.integers(1, 24)), n, n)) * rng.choice([1.0, 1e6])
        if rng.random() < 0.5:
            W = np.round(W * rng.choice([0.5, 2.0]))  # ties
        parent = _chu_liu_edmonds_batched(W, root)
        for Wb, p in zip(W, parent):
            assert p[root] == -1 and (np.delete(p, root) >= 0).all()
            for v in range(n):  # every vertex reaches the root
                for _ in range(n):
                    v = p[v] if v != root else v
                assert v == root
            got = sum(Wb[p[m], m] for m in range(n) if m != root)
            if n <= 5:
                if (n, root) not in trees:
                    trees[n, root] = cs.load_polytope("arborescence", n=n, root=root).vertices().numpy()
                best = (trees[n, root] * Wb).sum((1, 2)).max()
            else:
                q = chu_liu_edmonds_tree(Wb, root)
                best = sum(Wb[q[m], m] for m in range(n) if m != root)
            assert abs(got - best) <= 1e-9 * max(1.0, np.abs(Wb).max())
    for n in (2, 3, 6):  # a vertex with every arc in at -inf: no finite tree, but still a tree, no NaN
        for root in range(n):
            W = rng.normal(size=(20, n, n))
            W[:, :, (root + 1) % n] = -np.inf
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                parent = _chu_liu_edmonds_batched(W, root)
            assert (parent[:, root] == -1).all() and (np.delete(parent, root, 1) >= 0).all()
    u = torch.randn(32, 9, 9, generator=torch.Generator().manual_seed(0), dtype=torch.float64)  # 16 rows or more
    P = cs.load_polytope("arborescence", n=9, root=4)
    assert torch.equal(P.argmax(u), torch.cat([P.argmax(u[i:i + 8]) for i in range(0, 32, 8)]))


def test_spanning_tree_edge_order_matches_triu_indices():
    P = cs.load_polytope("spanning_tree", n=5)
    i, j = torch.triu_indices(5, 5, 1)
    assert P.data["E"].tolist() == torch.stack([i, j], 1).tolist()


def test_contains_rejects_points_outside(gen):
    P = cs.load_polytope("birkhoff", n=3)
    inside = torch.full((3, 3), 1 / 3, dtype=torch.float64)
    outside = torch.eye(3, dtype=torch.float64) * 0.9
    assert P.contains(torch.stack([inside, outside])).tolist() == [True, False]
    T = cs.load_polytope("spanning_tree", n=4)
    assert not bool(T.contains(torch.ones(6, dtype=torch.float64)))
    assert bool(T.contains(torch.full((6,), 0.5, dtype=torch.float64)))


def test_polytope_instances_are_cached():
    assert cs.load_polytope("k_subset", n=6, k=2) is cs.load_polytope("k_subset", k=2, n=6)
    assert cs.load_polytope("k_subset", n=6, k=2) is not cs.load_polytope("k_subset", n=6, k=3)


def test_polytope_cache_is_bounded_but_keeps_instances_in_use():
    # a loop over many distinct graphs must not keep every polytope (each one with compiled
    # solvers holds about 1.4 MB): the cache keeps the ones in use and the most recent ones.
    # Sizes 198-290 are used by no other test, which may hold polytopes of its own.
    import gc

    from convex_sst import polytope as poly

    held = cs.load_polytope("k_subset", n=199, k=1)
    held.cache["marker"] = True
    cs.load_polytope("k_subset", n=198, k=1)  # not held
    sizes = range(200, 200 + poly.RECENT_POLYTOPES + 20)
    for n in sizes:
        cs.load_polytope("k_subset", n=n, k=1)
    gc.collect()
    alive = {P.params["n"] for P in list(poly._INSTANCES.values()) if P.name == "k_subset" and P.params["k"] == 1}
    assert 198 not in alive  # dropped from the recent ones and referenced nowhere: freed
    assert 199 in alive and cs.load_polytope("k_subset", n=199, k=1) is held and held.cache["marker"]
    assert len(alive & set(sizes)) == poly.RECENT_POLYTOPES  # the latest ones
    last = cs.load_polytope("k_subset", n=sizes[-1], k=1)
    assert last is cs.load_polytope("k_subset", n=sizes[-1], k=1)


def test_extended_formulations_compile_fast():
    import time

    t0 = time.perf_counter()
    cs.load_polytope("spanning_tree", n=10)
    cs.load_polytope("arborescence", n=10)
    assert time.perf_counter() - t0 < 5.0  # measured ~0.06 s; generous bound for slow CI


@pytest.mark.parametrize("name,params,count", CASES)
def test_constant_total_from_the_argmax_matches_the_lp(name, params, count, monkeypatch):
    # Σx constant on P (the centring of θ) comes from the registered argmax when there is one:
    # the same answer as the two LPs it replaces (None where Σx varies)
    P = cs.load_polytope(name, **params)
    expected = None
    lp_totals = [float(P.lp.maximize(s * np.ones(P.size))[1][: P.size].sum()) for s in (1.0, -1.0)]
    if abs(lp_totals[0] - lp_totals[1]) < 1e-9:
        expected = lp_totals[0]
    P.cache.pop("constant total", None)
    if P.argmax_name is not None:  # no LP then
        monkeypatch.setattr(type(P.lp), "maximize", lambda *a: pytest.fail("an LP was solved"))
    got = P._constant_total()
    assert (got is None) == (expected is None)
    assert got is None or abs(got - expected) < 1e-9


def _sum_constraint_configs(rng, tmp_path, count):
    """Random user polytopes (tests/oracles.py) with Σx made constant three ways: one equality
    row, two rows that add up to it, or two inequalities (an implicit equality, which only LPs
    see); yields ``(P, how)`` for the non-empty ones."""
    from oracles import random_constraint_config

    for i in range(count):
        text = random_constraint_config(rng, f"sum_{i}")
        d = int(text.split("shape: [")[1].split("]")[0])
        x0 = rng.uniform(0.1, 0.9, d)
        how = ("row", "rows", "inequalities")[i % 3]
        if how == "row":
            text += f"  - sum(x) == {x0.sum():.15g}\n"
        elif how == "rows":
            text += f"  - x[0] + x[1] == {x0[:2].sum():.15g}\n  - sum(x) - x[0] - x[1] == {x0[2:].sum():.15g}\n"
        else:
            text += f"  - sum(x) <= {x0.sum():.15g}\n  - sum(x) >= {x0.sum():.15g}\n"
        path = tmp_path / f"sum_{i}.yaml"
        path.write_text(text)
        try:
            yield cs.load_polytope(path), how
        except cs.PolytopeError:  # empty, or a single point
            continue


def _lp_total(P):
    from convex_sst.lp import LinearProgram

    lp = LinearProgram(P.form)  # a fresh model: no state shared with the code under test
    hi, lo = (float(lp.maximize(s * np.ones(P.size))[1][: P.size].sum()) for s in (1.0, -1.0))
    return hi if abs(hi - lo) < 1e-9 else None


@pytest.mark.parametrize("seed", range(3))
def test_constant_total_without_an_argmax_matches_the_lps(seed, tmp_path, monkeypatch):
    # user configs without an argmax: Σx constant on P is decided by known points (it varies)
    # or by the span of the equality rows (a certified constant) before any LP; the answers
    # are the LPs' (which took 4.7 s on a user's copy of correlated k-subsets, n = 120)
    from oracles import random_constraint_config

    from convex_sst.lp import LinearProgram

    rng = np.random.default_rng(seed)
    polytopes = list(_sum_constraint_configs(rng, tmp_path, 30))
    for i in range(10):
        path = tmp_path / f"plain_{i}.yaml"
        path.write_text(random_constraint_config(rng, f"plain_{i}"))
        try:
            polytopes.append((cs.load_polytope(path), "plain"))
        except cs.PolytopeError:
            pass
    if seed == 0:
        for name, params in [("k_subset", {"n": 6, "k": 2}), ("arborescence", {"n": 4}),
                             ("correlated_k_subset", {"n": 6, "k": 3}), ("matching", {"n": 2, "m": 3})]:
            polytopes.append((cs.load_polytope(user_copy(tmp_path, name), **params), "flow"))
    without_lp = {"row": 0, "rows": 0, "flow": 0}
    for P, how in polytopes:
        expected = _lp_total(P)
        P.lp.constant_variables()
        solved = []
        real_run = LinearProgram._run
        with monkeypatch.context() as m:
            m.setattr(LinearProgram, "_run", lambda self: solved.append(1) or real_run(self))
            got = P._constant_total()
        assert (got is None) == (expected is None), (how, P)
        assert got is None or abs(got - expected) < 1e-9
        if how in without_lp:
            without_lp[how] += not solved
            if how != "flow":
                assert expected is not None
    assert without_lp["row"] >= 3 and without_lp["rows"] >= 3
    assert without_lp["flow"] == (4 if seed == 0 else 0)


def test_constant_variables_of_a_user_flow_formulation_take_a_few_lps(tmp_path, monkeypatch):
    # the variables constant on P (presolve of the torch solver) on a user's copy of correlated
    # k-subsets (n = 40, k = 8: 1 241 flow variables, none constant): a maximum of Σ z over
    # those at a bound moved one path per LP (227 LPs, 35 s at n = 90); the capped LP moves
    # all of them at once
    import highspy

    P = cs.load_polytope(user_copy(tmp_path, "correlated_k_subset"), n=40, k=8)
    runs = []
    real_run = highspy.Highs.run
    monkeypatch.setattr(highspy.Highs, "run", lambda h: runs.append(1) or real_run(h))
    mask, _ = P.lp.constant_variables()
    assert not mask.any() and P.form.num_z > 1000
    assert len(runs) <= 4, len(runs)


def test_coordinate_ranges_of_a_config_without_bounds_on_x(tmp_path):
    # x bounded only through the flows (no '0 <= x <= 1'): its range is found with two LPs per
    # coordinate at load, now by primal simplex warm-started from the last vertex (a user's copy
    # of correlated k-subsets n = 90 loaded in 27 s, now 1 s); the ranges against scipy's HiGHS,
    # and the dual simplex is back for the LP argmax afterwards
    from scipy.optimize import linprog

    text = user_copy(tmp_path, "correlated_k_subset").read_text()
    path = tmp_path / "unbounded_x.yaml"
    path.write_text(text.replace("  - 0 <= x <= 1\n", "").replace("name: my_correlated_k_subset", "name: unbounded_x"))
    P = cs.load_polytope(path, n=7, k=3)
    assert not np.isfinite(P.form.ub[: P.size]).any()
    lo, hi = P.x_range()
    f = P.form
    for j in range(P.size):
        for sign, got in ((1.0, lo[j]), (-1.0, hi[j])):
            c = np.zeros(f.num_z)
            c[j] = sign
            res = linprog(c, A_eq=f.A_eq.toarray(), b_eq=f.b_eq, A_ub=f.A_ub.toarray() if f.num_ub else None,
                          b_ub=f.b_ub if f.num_ub else None, bounds=list(zip(f.lb, f.ub)))
            assert abs(sign * res.fun - got) < 1e-9
    assert np.allclose(lo, 0.0) and np.allclose(hi, 1.0)
    strategy = P.lp._h.getOptionValue("simplex_strategy")
    assert (strategy[1] if isinstance(strategy, tuple) else strategy) == 1  # a tuple in newer highspy
    u = torch.randn(4, P.size, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    best = cs.load_polytope("correlated_k_subset", n=7, k=3).argmax(u)
    assert torch.equal(P.argmax(u), best)


def test_large_dynamic_program_flows_compile_sparse_and_solve_without_lps(monkeypatch):
    # correlated k-subsets of 200 items: their DP's DAG has 10 400 states and 20 402 arcs. Its
    # incidence and embedding matrices were dense (2.5 GB each, 45 s and 3.6 GB for a generic
    # relax of 2 rows, 34 s of it in two LPs for the centring); now sparse, and no LP
    import scipy.sparse as sp
    from convex_sst.lp import LinearProgram

    monkeypatch.setattr(LinearProgram, "maximize", lambda *a: pytest.fail("an LP was solved"))
    n, k = 200, 30
    P = cs.load_polytope("correlated_k_subset", n=n, k=k)
    assert sp.issparse(P.data["Inc"]) and sp.issparse(P.data["M"])
    assert P.form.num_eq > 10_000 and P._constant_total() is None
    u = torch.randn(1, P.size, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = cs.relax(u, P, "quadratic", 1.0, backend="generic")[0]
    items, pairs = x[:n], x[n:]
    assert abs(float(items.sum()) - k) < 1e-5
    assert bool((pairs <= torch.minimum(items[:-1], items[1:]) + 1e-5).all())
    assert bool((pairs >= items[:-1] + items[1:] - 1 - 1e-5).all())
