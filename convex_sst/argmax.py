"""Exact combinatorial argmax algorithms (the stochastic argmax trick), registered by name.

Each maps utilities ``u: (B, *shape)`` to the maximizing 0/1 structures of the same shape, dtype
and device. The computation runs on the CPU in float64 (these are combinatorial loops; the
relaxations are the GPU-friendly part). A config opts in with ``argmax: <name>``.

=====================  ==========================  =================================
name                   polytope                    algorithm, cost per sample
=====================  ==========================  =================================
``one_hot``            simplex                     argmax, O(n)
``threshold``          hypercube                   ``u > 0``, O(n)
``top_k``              k_subset                    top-k, O(n log n)
``hungarian``          birkhoff, matching          Jonker–Volgenant (scipy), O(n³)
``kruskal``            spanning_tree               Kruskal with union–find, O(m log m)
``chu_liu_edmonds``    arborescence                Chu–Liu/Edmonds (own; 16 rows or more
                                                   at once, dense contraction), O(n³)
``dag_longest_path``   dag_path                    DP in topological order over all rows, O(n + m)
``subset_chain_dp``    correlated_k_subset         DP over (count, last item chosen), O(n k)
=====================  ==========================  =================================
"""

from __future__ import annotations

import numpy as np
import torch

from ._unionfind import UnionFind
from .errors import PolytopeError, SolverError
from .graphs import topological_order
from .polytope import Polytope, register_argmax


def _apply(u: torch.Tensor, fn) -> torch.Tensor:
    arr = u.detach().cpu().double().numpy()
    out = np.stack([fn(a) for a in arr]) if len(arr) else np.zeros_like(arr)
    return torch.as_tensor(out, dtype=u.dtype, device=u.device)


@register_argmax("hungarian")
def hungarian(u: torch.Tensor, polytope: Polytope) -> torch.Tensor:
    """Max-weight assignment of every row (rows ≤ columns) by ``scipy.optimize.linear_sum_assignment``."""
    from scipy.optimize import linear_sum_assignment  # here: importing scipy.optimize costs 0.13 s

    def one(a: np.ndarray) -> np.ndarray:
        rows, cols = linear_sum_assignment(a, maximize=True)
        x = np.zeros_like(a)
        x[rows, cols] = 1.0
        return x

    return _apply(u, one)


def kruskal_tree(n: int, edges: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Maximum-weight spanning tree as an indicator over ``edges`` (Kruskal, union–find)."""
    sets = UnionFind(n)
    x = np.zeros(len(edges))
    taken = 0
    for e in np.argsort(-weights, kind="stable"):
        if sets.union(int(edges[e, 0]), int(edges[e, 1])):
            x[e] = 1.0
            taken += 1
            if taken == n - 1:
                break
    if taken != n - 1:
        raise PolytopeError("the graph is not connected: no spanning tree exists")
    return x


@register_argmax("kruskal")
def kruskal(u: torch.Tensor, polytope: Polytope) -> torch.Tensor:
    """Maximum spanning tree of the polytope's graph (``polytope.data['E']``)."""
    n = int(polytope.params["n"])
    E = np.asarray(polytope.data["E"])
    return _apply(u, lambda a: kruskal_tree(n, E, a))


# batches of at least this many score matrices take the batched Chu–Liu/Edmonds (below: one by
# one, whose fixed cost per row is less; even at 16 rows for n = 10, 1.2x at n = 30, 3.7x and
# 2.6x at 128 rows)
_CLE_BATCHED = 16


def chu_liu_edmonds_trees(W: np.ndarray, root: int) -> np.ndarray:
    """Maximum-weight spanning arborescences rooted at ``root`` of a batch: ``W (B, n, n)``,
    ``W[b, h, m]`` scores arc h → m. Returns the parents ``(B, n)`` int64 (``-1`` at the root):
    :func:`_chu_liu_edmonds_batched` for :data:`_CLE_BATCHED` rows or more, else
    :func:`chu_liu_edmonds_tree` row by row (the two may break ties between best trees
    differently)."""
    W = np.asarray(W, dtype=float)
    if W.shape[0] >= _CLE_BATCHED:
        return _chu_liu_edmonds_batched(W, root)
    return np.array([chu_liu_edmonds_tree(w, root) for w in W], dtype=np.int64).reshape(W.shape[:2])


def _chu_liu_edmonds_batched(W: np.ndarray, root: int) -> np.ndarray:
    """:func:`chu_liu_edmonds_trees` for all rows at once, contracting in place (the dense O(n²)
    form of Chu–Liu/Edmonds): every vertex keeps its best in-arc; at each step the cycles these
    arcs form (found by pointer jumping) are contracted into their smallest vertex, an arc into a
    cycle vertex m scored ``W[h, m] − W[parent(m), m]``, and only a contracted vertex needs a new
    best in-arc. Each entry of W keeps the original arc it stands for. Undone last step first: a
    contracted vertex's in-arc enters the cycle vertex that holds its head, which drops its cycle
    arc; the others keep theirs. The steps are the contraction depth (about n/2 for random scores
    at n = 50), each a few dozen array operations over the rows."""
    W = np.array(W, dtype=float)
    B, n, _ = W.shape
    if n == 1 or B == 0:
        return np.full((B, n), -1, dtype=np.int64)
    nodes = np.arange(n)
    W[:, nodes, nodes] = -np.inf
    W[:, :, root] = -np.inf
    arc = np.broadcast_to(nodes[:, None] * n + nodes, (B, n, n)).copy()  # the original arc h·n + m
    # vertices by global index b·n + v
    base = np.repeat(np.arange(B) * n, n)
    ids = np.arange(B * n)
    free = np.ones(B * n, dtype=bool)  # alive and not a root
    free[base[::n] + root] = False
    parent = _best_in_arcs(W, root).reshape(-1) + base
    label = ids  # the vertex that holds each original one
    bits = (n - 1).bit_length()
    steps = []
    for _ in range(n):  # each step removes a vertex at least
        jump = np.where(free, parent, ids)  # dead vertices and the roots map to themselves
        low = ids
        for _ in range(bits):  # jump = parent^(2^bits): on a cycle or fixed; low: a cycle's smallest
            low = np.minimum(low, low[jump])
            jump = jump[jump]
        cyc = np.zeros(B * n, dtype=bool)
        cyc[jump] = True
        cyc &= free
        if not cyc.any():
            break
        group = np.where(cyc, low, ids)
        u = np.flatnonzero(cyc)
        u = u[np.argsort(group[u], kind="stable")]  # by cycle
        ub, uv = u // n, u % n
        steps.append((group, u, arc[ub, parent[u] % n, uv], label))
        W[ub, :, uv] -= W[ub, parent[u] % n, uv][:, None]  # an arc into a cycle vertex replaces its cycle arc
        # each cycle's vertices side by side (C cycles, up to L vertices), to fold into its smallest
        g, first, size = np.unique(group[u], return_index=True, return_counts=True)
        rank = np.arange(len(u)) - np.repeat(first, size)
        slot = np.full((len(g), size.max()), -1)
        slot[np.repeat(np.arange(len(g)), size), rank] = uv
        gb, gv = g // n, g % n
        member = np.maximum(slot, 0)
        for axis in (2, 1):  # its columns (arcs in), then its rows (arcs out)
            take = (gb[:, None], slice(None), member) if axis == 2 else (gb[:, None], member)
            vals = np.where(slot[:, :, None] >= 0, W[take], -np.inf)  # (C, L, n)
            best = vals.argmax(1)
            pick = np.take_along_axis(slot, best, 1)  # the member each entry comes from
            if axis == 2:
                W[gb[:, None], nodes, gv[:, None]] = vals.max(1)
                arc[gb[:, None], nodes, gv[:, None]] = arc[gb[:, None], nodes, pick]
            else:
                W[gb[:, None], gv[:, None], nodes] = vals.max(1)
                arc[gb[:, None], gv[:, None], nodes] = arc[gb[:, None], pick, nodes]
        f = u[group[u] != u]  # the cycles' other vertices: gone
        W[f // n, f % n, :] = -np.inf
        W[f // n, :, f % n] = -np.inf
        free[f] = False
        W[gb, gv, gv] = -np.inf
        parent = group[parent]
        # only the contracted vertices need a new best in-arc
        parent[g] = _best_in_arcs(W[gb, :, gv][:, :, None], root)[:, 0] + gb * n
        label = group[label]
    else:
        raise SolverError(f"Chu–Liu/Edmonds still found cycles after {n} contraction steps (n = {n}); "
                          "each step removes a vertex, so this is a bug: please report it")
    a = arc[ids // n, parent % n, ids % n]  # each vertex's in-arc as an original arc
    for group, u, cycle_arc, label in reversed(steps):
        ga = a[group]  # a cycle's in-arc, from its vertex
        entry = label[base + ga % n] == ids  # the cycle vertex that holds its head takes it
        own = a.copy()
        own[u] = np.where(entry[u], ga[u], cycle_arc)  # the others keep their cycle arcs
        a = own
    return np.where(ids % n == root, -1, a // n).reshape(B, n)


def _best_in_arcs(W: np.ndarray, root: int) -> np.ndarray:
    """``W (B, N, M)`` → ``(B, M)``: the best tail of each column, the root where every arc in
    is ``-inf`` (no tree avoids them all; the root then ends the walk instead of a cycle of
    ``-inf`` arcs, whose differences would be NaN)."""
    return np.where(W.max(1) > -np.inf, W.argmax(1), root)


def chu_liu_edmonds_tree(W: np.ndarray, root: int) -> np.ndarray:
    """Maximum-weight spanning arborescence rooted at ``root``: ``W[h, m]`` scores arc h → m.

    Returns ``parent`` (``parent[root] = -1``). Chu–Liu/Edmonds with cycle contraction, O(n³).
    """
    W = W.astype(float).copy()
    np.fill_diagonal(W, -np.inf)
    W[:, root] = -np.inf
    return _cle(W, root)


def _cle(W: np.ndarray, root: int) -> np.ndarray:
    n = W.shape[0]
    parent = _best_in_arcs(W[None], root)[0]
    parent[root] = -1
    # find a cycle among the chosen in-arcs
    color = np.zeros(n, dtype=int)  # 0 unvisited, 1 on stack, 2 done
    cycle = None
    for start in range(n):
        path = []
        v = start
        while v != -1 and color[v] == 0:
            color[v] = 1
            path.append(v)
            v = parent[v]
        if v != -1 and color[v] == 1:
            cycle = path[path.index(v):]
        for p in path:
            color[p] = 2
        if cycle is not None:
            break
    if cycle is None:
        return parent
    in_cycle = np.zeros(n, dtype=bool)
    in_cycle[cycle] = True
    rest = [v for v in range(n) if not in_cycle[v]]
    c = len(rest)  # index of the contracted node
    index = {v: i for i, v in enumerate(rest)}
    m = c + 1
    W2 = np.full((m, m), -np.inf)
    rest_a = np.asarray(rest, dtype=np.intp)
    W2[:c, :c] = W[rest_a[:, None], rest_a]  # (not np.ix_: its dtype checks cost more than the copy)
    cyc = np.array(cycle)
    # arcs into the cycle: gain of replacing the cycle arc into v by h -> v
    into = W[rest_a[:, None], cyc] - W[parent[cyc], cyc][None, :]
    best_in = into.argmax(1)
    W2[:c, c] = into[np.arange(c), best_in]
    # arcs out of the cycle: the best cycle node as tail
    out = W[cyc[:, None], rest_a]
    best_out = out.argmax(0)
    W2[c, :c] = out[best_out, np.arange(c)]
    sub = _cle(W2, index[root])
    new_parent = parent.copy()
    for v in rest:
        p = sub[index[v]]
        if p == -1:
            new_parent[v] = -1
        elif p == c:
            new_parent[v] = cyc[best_out[index[v]]]
        else:
            new_parent[v] = rest[p]
    h = sub[c]  # the arc entering the contracted node comes from rest[h]
    entry = cyc[best_in[h]]
    new_parent[entry] = rest[h]
    return new_parent


@register_argmax("chu_liu_edmonds")
def chu_liu_edmonds(u: torch.Tensor, polytope: Polytope) -> torch.Tensor:
    """Maximum-weight arborescence rooted at ``polytope.params['root']`` (own implementation,
    :func:`chu_liu_edmonds_trees`)."""
    root = int(polytope.params["root"])
    W = u.detach().cpu().double().numpy()
    x = np.zeros_like(W)
    if len(W):
        parent = chu_liu_edmonds_trees(W, root)
        b, m = np.nonzero(parent >= 0)
        x[b, parent[b, m], m] = 1.0
    return torch.as_tensor(x, dtype=u.dtype, device=u.device)


def dag_plan(polytope: Polytope) -> tuple[int, list[tuple[int, list[int], list[int]]]]:
    """``(source, [(v, arcs into v, their tails), ...])`` for a ``dag_path`` polytope, in
    topological order from the source, cached on the polytope; vertices the source does not
    reach, and arcs out of them, are left out (the longest-path and log-partition passes)."""
    plan = polytope.cache.get("dag_plan")
    if plan is None:
        n, s = int(polytope.params["n"]), int(polytope.params["source"])
        A = polytope.data["A"]
        reached = {s}
        steps = []
        for v in topological_order(n, A):
            arcs = [a for a in range(len(A)) if int(A[a, 1]) == v and int(A[a, 0]) in reached]
            if v != s and arcs:
                reached.add(v)
                steps.append((v, arcs, [int(A[a, 0]) for a in arcs]))
        plan = (s, steps)
        polytope.cache["dag_plan"] = plan
    return plan


@register_argmax("dag_longest_path")
def dag_longest_path(u: torch.Tensor, polytope: Polytope) -> torch.Tensor:
    """Maximum-weight source → target path in the DAG: dynamic programming in topological order,
    each vertex's step vectorized over the rows (ties: the first of its incoming arcs), then the
    backtrack from the target, also over the rows."""
    n = int(polytope.params["n"])
    s, t = int(polytope.params["source"]), int(polytope.params["target"])
    A = np.asarray(polytope.data["A"])
    _, steps = dag_plan(polytope)
    w = u.detach().cpu().double().numpy().reshape(len(u), -1)
    B = len(w)
    best = np.full((B, n), -np.inf)
    best[:, s] = 0.0
    via = np.full((B, n), -1)
    for v, arcs, tails in steps:
        cand = best[:, tails] + w[:, arcs]
        k = cand.argmax(1)
        top = cand[np.arange(B), k]
        better = top > best[:, v]
        best[:, v] = np.where(better, top, best[:, v])
        via[:, v] = np.where(better, np.asarray(arcs)[k], via[:, v])
    x = np.zeros_like(w)
    rows = np.arange(B)
    at = np.full(B, t)  # each row's vertex on the way back
    for _ in range(n):
        on = at != s
        if not on.any():
            break
        a = via[rows[on], at[on]]
        if (a < 0).any():
            raise PolytopeError(f"no path from {s} to {t}")
        x[rows[on], a] = 1.0
        at[on] = A[a, 0]
    return torch.as_tensor(x, dtype=u.dtype, device=u.device).reshape(u.shape)


@register_argmax("subset_chain_dp")
def subset_chain_dp(u: torch.Tensor, polytope: Polytope) -> torch.Tensor:
    """Best k-subset of a sequence under item utilities ``u[:, :n]`` and adjacent-pair utilities
    ``u[:, n:]`` (``correlated_k_subset``): a max-plus dynamic program over the items with states
    (count so far, whether the last item is chosen), batched over the rows, O(n k) per row."""
    n, k = int(polytope.params["n"]), int(polytope.params["k"])
    w = u.detach().cpu().double().numpy().reshape(len(u), 2 * n - 1)
    items, pairs = w[:, :n], w[:, n:]
    B = len(w)
    off = np.full((B, k + 1), -np.inf)   # best score so far with c items chosen, the last one not
    on = np.full((B, k + 1), -np.inf)    # ... the last one chosen
    off[:, 0] = 0.0
    off_via_on = np.zeros((n, B, k + 1), dtype=bool)   # the state before item i was "on"
    on_via_on = np.zeros((n, B, k + 1), dtype=bool)
    for i in range(n):
        prev_on = on + pairs[:, i - 1, None] if i else on
        off_via_on[i] = on > off
        on_via_on[i, :, 1:] = prev_on[:, :-1] > off[:, :-1]
        new_on = np.full_like(on, -np.inf)
        new_on[:, 1:] = np.maximum(off[:, :-1], prev_on[:, :-1]) + items[:, i, None]
        off, on = np.maximum(off, on), new_on
    rows = np.arange(B)
    c = np.full(B, k)
    chosen = on[:, k] > off[:, k]
    x = np.zeros((B, n))
    for i in range(n - 1, -1, -1):   # backtrack: item i chosen, then the state before it
        x[:, i] = chosen
        before_on = np.where(chosen, on_via_on[i, rows, c], off_via_on[i, rows, c])
        c = c - chosen
        chosen = before_on
    out = np.concatenate([x, x[:, :-1] * x[:, 1:]], 1)
    return torch.as_tensor(out, dtype=u.dtype, device=u.device).reshape(u.shape)
