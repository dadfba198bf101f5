"""Constant helpers available inside polytope configs (index sets, incidence matrices).

Every function here takes numpy arrays (or ints) and is exposed by name to the config
expression language (see :data:`CONFIG_FUNCTIONS`). The incidence-like matrices (one or two
nonzeros per column) are returned as scipy sparse arrays: dense, those of large graphs take
gigabytes (an arborescence on 160 vertices: 5 GB for ``arc_scatter``; correlated k-subsets of
200 items: 2.5 GB per incidence matrix of their program's DAG). The expression language keeps
them sparse through ``@`` with variables, and treats them as the arrays they stand for
elsewhere. Graph conventions:

* an undirected edge list ``E`` is an ``(m, 2)`` int array with ``i < j`` per row; for Kₙ it
  is lexicographic, the order of ``torch.triu_indices(n, n, 1)``;
* an arc list ``A`` is an ``(a, 2)`` int array of ``(tail, head)`` pairs;
* ``incidence(A, n)[v, a] = +1`` if arc ``a`` leaves ``v`` and ``-1`` if it enters ``v``, so
  ``incidence(A, n) @ flow`` is the net outflow at every vertex.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import scipy.sparse as sp

from .expr import ExprError, is_whole_number


#: the largest dynamic program ``subset_chain`` builds (as many variables as a config may have)
MAX_CHAIN_ARCS = 10_000_000


def _int(value: Any, what: str, minimum: int | None = None) -> int:
    arr = np.asarray(value)
    if not is_whole_number(arr):
        raise ExprError(f"{what} must be an integer, got {value!r}")
    if abs(float(arr)) > 2.0**53:
        raise ExprError(f"{what} = {float(arr):g} is too large to be a size or an index")
    if minimum is not None and int(arr) < minimum:
        raise ExprError(f"{what} must be >= {minimum}, got {int(arr)}")
    return int(arr)


def _int_pairs(pairs: Any, what: str) -> np.ndarray:
    """``pairs`` as an ``(a, 2)`` int64 array (``[]`` is ``(0, 2)``), or :class:`ExprError`:
    vertex indices are whole numbers, never truncated (``[0, 1.5]`` is not the arc ``(0, 1)``)."""
    try:
        arr = np.asarray(pairs, dtype=float)
    except (TypeError, ValueError):
        raise ExprError(f"{what} must be a list of integer pairs [i, j], got {pairs!r}") from None
    if arr.size == 0:
        return np.zeros((0, 2), dtype=np.int64)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ExprError(f"{what} must be a list of integer pairs [i, j] (shape (m, 2)), got shape {arr.shape}")
    bad = np.flatnonzero(~(np.isfinite(arr) & (arr == np.round(arr))).all(1))
    if bad.size:
        raise ExprError(f"{what}[{bad[0]}] = {arr[bad[0]].tolist()}: vertex indices must be whole numbers")
    bad = np.flatnonzero((np.abs(arr) > 2.0**53).any(1))
    if bad.size:
        raise ExprError(f"{what}[{bad[0]}] = {arr[bad[0]].tolist()}: a vertex index that large is a mistake")
    return arr.astype(np.int64)


def _pairs(pairs: Any, n: int, what: str) -> np.ndarray:
    arr = _int_pairs(pairs if pairs is not None else np.zeros((0, 2)), what)
    bad = np.flatnonzero((arr < 0).any(1) | (arr >= n).any(1))
    if bad.size:
        raise ExprError(f"{what}[{bad[0]}] = {arr[bad[0]].tolist()} has a vertex outside 0..{n - 1}")
    loops = np.flatnonzero(arr[:, 0] == arr[:, 1])
    if loops.size:
        raise ExprError(f"{what}[{loops[0]}] = {arr[loops[0]].tolist()} is a self-loop")
    return arr


def complete_edges(n: Any) -> np.ndarray:
    """Edges ``(i, j)``, ``i < j``, of Kₙ in lexicographic order: shape ``(n(n-1)/2, 2)``."""
    n = _int(n, "n", minimum=0)
    i, j = np.triu_indices(n, 1)
    return np.stack([i, j], 1).astype(np.int64)


def graph_edges(n: Any, edges: Any = None) -> np.ndarray:
    """The given undirected edges as ``i < j`` pairs (in the given order), or Kₙ's if None."""
    n = _int(n, "n")
    if edges is None:
        return complete_edges(n)
    arr = np.sort(_pairs(edges, n, "edges"), axis=1)
    _, first = np.unique(arr, axis=0, return_index=True)
    if first.size != len(arr):
        dup = sorted(set(range(len(arr))) - set(first.tolist()))[0]
        raise ExprError(f"edges[{dup}] = {arr[dup].tolist()} repeats an earlier edge")
    return arr


def complete_arcs(n: Any) -> np.ndarray:
    """Arcs ``(h, m)``, ``h != m``, of the complete digraph, ordered by ``h`` then ``m``."""
    n = _int(n, "n", minimum=0)
    h, m = np.nonzero(~np.eye(n, dtype=bool))
    return np.stack([h, m], 1).astype(np.int64)


def both_orientations(edges: Any) -> np.ndarray:
    """Arcs ``(i, j)`` for every edge, then ``(j, i)`` for every edge: shape ``(2m, 2)``."""
    e = _int_pairs(edges, "edges")
    return np.concatenate([e, e[:, ::-1]], 0)


def topological_order(n: int, arcs: np.ndarray) -> list[int]:
    """Vertices ``0..n-1`` in an order where every arc ``(i, j)`` of ``arcs (a, 2)`` has i before
    j (Kahn's algorithm); shorter than n when the arcs contain a directed cycle."""
    indeg = np.zeros(n, dtype=np.int64)
    np.add.at(indeg, arcs[:, 1], 1)
    order, stack = [], [v for v in range(n) if indeg[v] == 0]
    while stack:
        v = stack.pop()
        order.append(v)
        for w in arcs[arcs[:, 0] == v, 1]:
            indeg[w] -= 1
            if indeg[w] == 0:
                stack.append(int(w))
    return order


def dag_arcs(n: Any, arcs: Any) -> np.ndarray:
    """Validate that ``arcs`` form a directed acyclic graph on ``n`` vertices; return them."""
    n = _int(n, "n")
    a = _pairs(arcs, n, "edges")
    if len(topological_order(n, a)) != n:
        raise ExprError("edges contain a directed cycle; dag_path needs a DAG")
    return a


def _columns(rows: np.ndarray, num_rows: int, values: Any = 1.0, cols: np.ndarray | None = None,
             num_cols: int | None = None) -> sp.csr_array:
    """A sparse ``(num_rows, num_cols)`` array with ``values`` at ``[rows[i], cols[i]]``
    (``cols`` defaults to ``0, 1, 2, ...``; duplicates summed, zeros dropped)."""
    rows = np.asarray(rows, dtype=np.int64)
    if rows.size and (rows.min() < 0 or rows.max() >= num_rows):
        raise ExprError(f"vertex index out of range 0..{num_rows - 1}: found {rows.min()}..{rows.max()}")
    cols = np.arange(rows.size) if cols is None else cols
    vals = np.broadcast_to(np.asarray(values, dtype=float), rows.shape)
    out = sp.csr_array((vals, (rows, cols)), shape=(num_rows, rows.size if num_cols is None else num_cols))
    out.sum_duplicates()
    out.eliminate_zeros()
    return out


def _arcs(arcs: Any) -> np.ndarray:
    return _int_pairs(arcs, "arcs")


def incidence(arcs: Any, n: Any) -> sp.csr_array:
    """Node-arc incidence ``(n, a)`` (sparse): +1 where the arc leaves the vertex, -1 where it
    enters (0 for a loop)."""
    a = _arcs(arcs)
    ones = np.ones(len(a))
    return _columns(np.concatenate([a[:, 0], a[:, 1]]), _int(n, "n"), np.concatenate([ones, -ones]),
                    np.tile(np.arange(len(a)), 2), len(a))


def in_incidence(arcs: Any, n: Any) -> sp.csr_array:
    """``(n, a)`` (sparse) with 1 where arc ``a`` enters vertex ``v``."""
    return _columns(_arcs(arcs)[:, 1], _int(n, "n"))


def out_incidence(arcs: Any, n: Any) -> sp.csr_array:
    """``(n, a)`` (sparse) with 1 where arc ``a`` leaves vertex ``v``."""
    return _columns(_arcs(arcs)[:, 0], _int(n, "n"))


def orientation_sum(edges: Any, arcs: Any) -> sp.csr_array:
    """``(m, a)`` (sparse) with 1 where arc ``a`` is an orientation of edge ``e``: ``x = M @ y``."""
    e = np.sort(_int_pairs(edges, "edges"), axis=1)
    a = np.sort(_arcs(arcs), axis=1)
    rows: dict[tuple[int, int], list[int]] = {}
    for i, (u, v) in enumerate(e.tolist()):
        rows.setdefault((u, v), []).append(i)
    pairs = [(r, j) for j, (u, v) in enumerate(a.tolist()) for r in rows.get((u, v), ())]
    r, c = (np.asarray(p, dtype=np.int64) for p in zip(*pairs)) if pairs else (np.zeros(0, np.int64),) * 2
    return sp.csr_array((np.ones(len(r)), (r, c)), shape=(len(e), len(a)))


def arc_scatter(arcs: Any, n: Any) -> sp.csr_array:
    """``(n*n, a)`` (sparse) placing arc ``(h, m)`` at the row-major position of entry ``[h, m]``."""
    n = _int(n, "n")
    a = _arcs(arcs)
    return _columns(a[:, 0] * n + a[:, 1], n * n)


def onehot(n: Any, i: Any) -> np.ndarray:
    """The ``i``-th standard basis vector of length ``n``."""
    n, i = _int(n, "n"), _int(i, "index")
    if not 0 <= i < n:
        raise ExprError(f"onehot index {i} outside 0..{n - 1}")
    v = np.zeros(n)
    v[i] = 1.0
    return v


def group_indicator(labels: Any) -> sp.csr_array:
    """``(g, n)`` (sparse) with 1 where item ``i`` has label ``g`` (labels are 0..g-1), so ``G @ x``
    sums per group."""
    lab = np.asarray(labels)
    if lab.ndim != 1 or lab.size == 0 or lab.dtype.kind not in "iu" or lab.min() < 0:
        raise ExprError(f"group labels must be a non-empty list of integers >= 0, got {labels!r}")
    return _columns(lab, int(lab.max()) + 1)


def num_vertices(arcs: Any) -> int:
    """``1 + max`` vertex index of an arc list ``(a, 2)``: the vertex count of a built graph."""
    a = _arcs(arcs)
    if a.size and a.min() < 0:
        raise ExprError(f"arcs hold a negative vertex index {int(a.min())}")
    return int(a.max()) + 1 if a.size else 0


def subset_chain(n: Any, k: Any) -> tuple[np.ndarray, sp.csr_array]:
    """The dynamic program of k-subsets of a sequence as a layered DAG: ``(arcs, embedding)``.

    A vertex after item ``i`` is a state ``(count so far c, last bit b)``; vertex 0 is the
    source (no item decided), the last vertex the sink (after all ``n`` items, ``c = k``). Only
    states on some source–sink path are kept. An arc from a state after item ``i − 1`` decides
    item ``i`` (``b' = 1``: chosen). Source–sink paths are one-to-one with the k-subsets, and
    ``embedding (2n − 1, a)`` (sparse) maps a path's arc indicator to the structure: the chosen items
    ``x[:n]``, then the chosen adjacent pairs ``x[n + i] = x[i] · x[i + 1]``.
    """
    n, k = _int(n, "n"), _int(k, "k")
    if not 1 <= k <= n:
        raise ExprError(f"subset_chain needs 1 <= k <= n, got n = {n}, k = {k}")
    if 4 * n * (k + 1) > MAX_CHAIN_ARCS:  # about 2n(k + 1) states, each with up to two in-arcs
        raise ExprError(f"subset_chain with n = {n}, k = {k} would have about {4 * n * (k + 1):.3g} arcs; "
                        f"at most {MAX_CHAIN_ARCS:,} are supported")
    ids: dict[tuple[int, int, int], int] = {(0, 0, 0): 0}   # (items decided, c, b) -> vertex

    def alive(i: int, c: int, b: int) -> bool:   # reachable from the source and can reach the sink
        return c <= min(i, k) and k - c <= n - i and (c >= 1 if b else c <= i - 1)

    arcs, rows = [], []   # rows: the output coordinates an arc adds to (item, pair)
    for i in range(1, n + 1):
        for c in range(k + 1):
            for b in (0, 1):
                if not alive(i, c, b):
                    continue
                ids[(i, c, b)] = len(ids)
                for pb in (0, 1):   # the previous state: (i - 1, c - b, pb)
                    tail = ids.get((i - 1, c - b, pb))
                    if tail is None:
                        continue
                    arcs.append((tail, ids[(i, c, b)]))
                    rows.append(([i - 1] if b else []) + ([n + i - 2] if b and pb and i >= 2 else []))
    sink = len(ids)
    for b in (0, 1):
        if (n, k, b) in ids:
            arcs.append((ids[(n, k, b)], sink))
            rows.append([])
    cols = np.asarray([a for a, r in enumerate(rows) for _ in r], dtype=np.int64)
    M = _columns(np.asarray([i for r in rows for i in r], dtype=np.int64), 2 * n - 1, 1.0, cols, len(arcs))
    return np.asarray(arcs, dtype=np.int64), M


def _shape(args: tuple) -> tuple[int, ...]:
    return tuple(_int(a, "a dimension", minimum=0) for a in args)


def _delete(arr: Any, index: Any, axis: Any = 0) -> np.ndarray:
    return np.delete(np.asarray(arr), _int(index, "index"), axis=_int(axis, "axis"))


#: Constant functions exposed to config expressions (linear ones live in :mod:`expr`).
CONFIG_FUNCTIONS: dict[str, Callable[..., Any]] = {
    "range": lambda n: np.arange(_int(n, "range bound")),
    "eye": lambda n: np.eye(_int(n, "n", minimum=0)),
    "ones": lambda *shape: np.ones(_shape(shape)),
    "zeros": lambda *shape: np.zeros(_shape(shape)),
    "onehot": onehot,
    "outer": lambda a, b: np.outer(np.asarray(a), np.asarray(b)),
    "delete": _delete,
    "len": lambda a: int(np.shape(a)[0]) if np.ndim(a) else 0,
    "complete_edges": complete_edges,
    "graph_edges": graph_edges,
    "complete_arcs": complete_arcs,
    "both_orientations": both_orientations,
    "dag_arcs": dag_arcs,
    "incidence": incidence,
    "in_incidence": in_incidence,
    "out_incidence": out_incidence,
    "orientation_sum": orientation_sum,
    "arc_scatter": arc_scatter,
    "group_indicator": group_indicator,
    "num_vertices": num_vertices,
    "subset_chain_arcs": lambda n, k: subset_chain(n, k)[0],
    "subset_chain_embedding": lambda n, k: subset_chain(n, k)[1],
}
