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
``chu_liu_edmonds``    arborescence                Chu–Liu/Edmonds (own), O(n³)
``dag_longest_path``   dag_path                    DP in topological order over all rows, O(n + m)
``subset_chain_dp``    correlated_k_subset         DP over (count, last item chosen), O(n k)
=====================  ==========================  =================================
"""

from __future__ import annotations

import numpy as np
import torch

from ._unionfind import UnionFind
from .errors import PolytopeError
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
    parent = W.argmax(0)
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
    """Maximum-weight arborescence rooted at ``polytope.params['root']`` (own implementation)."""
    root = int(polytope.params["root"])

    def one(a: np.ndarray) -> np.ndarray:
        parent = chu_liu_edmonds_tree(a, root)
        x = np.zeros_like(a)
        for m, h in enumerate(parent):
            if h >= 0:
                x[h, m] = 1.0
        return x

    return _apply(u, one)


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
