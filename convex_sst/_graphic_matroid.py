"""Separable relaxations on the spanning-tree polytope, exactly: the decomposition algorithm.

The spanning trees of a connected graph ``G = (V, E)`` are the bases of its graphic matroid, of
rank ``r(A) = |V| − (number of components of (V, A))``; their convex hull is the base polytope
``B = {x : x(A) ≤ r(A) for all A ⊆ E, x(E) = |V| − 1}``. For a separable regularizer
``f(x) = Σ_e g(x_e)`` (entropy, binary entropy, quadratic), ``argmax_{x∈B} θᵀx − f(x)`` is found
exactly by the decomposition algorithm (Fujishige 1980; Groenevelt 1991; Fujishige,
*Submodular Functions and Optimization*, Sec. 8.2):

1. ``y = argmax θᵀx − f(x)`` over ``{x(E) = r(E), 0 ≤ x ≤ 1}`` (a capped simplex: one root);
2. ``A`` = a minimizer of ``r(A) − y(A)``. If the minimum is 0, ``y ∈ B`` and ``x = y``
   (``B`` lies in the set ``y`` was optimal on). Otherwise every minimizer is tight at the
   solution, ``x(A) = r(A)``, and the problem splits into the restriction to ``A`` and the
   contraction of ``A``: spanning trees of smaller graphs, solved the same way.

Why a minimizer is tight: the sets ``{e : λ_e < α}`` of the solution's multipliers
``λ_e = g'(x_e) − θ_e`` are tight, and ``L = {e : λ_e < λ⁰}`` (``λ⁰`` the multiplier of step 1)
holds every ``e`` with ``x_e < y_e`` and no ``e`` with ``x_e > y_e``, so for every ``S``
``r(S) − y(S) ≥ x(S) − y(S) ≥ x(L) − y(L) = r(L) − y(L)``: equality for a minimizer ``S`` needs
``r(S) = x(S)``.

For the graphic matroid, ``min_A r(A) − y(A)`` (``y ≥ 0``) is a minimum over partitions ``Π`` of
``V``, with ``A`` the edges inside the parts: ``min_Π Σ_{P∈Π} (|P| − 1 − y(E(P)))``. It is found
by adding the vertices one at a time (Cunningham 1985, "Optimal attack and reinforcement of a
network"): the new vertex joins a union of current parts chosen by one minimum cut (or, among
few parts, by trying every union), over the parts that two rules of supermodularity leave open.

The solution is a union of blocks, each with ``x_e = clamp(ψ(θ_e − τ_j), 0, 1)`` and an integer
sum, so its Jacobian is block diagonal: ``diag(d) − d dᵀ/Σd`` in each block, as for the capped
simplex. Combinatorial: it runs on the CPU in float64, the subproblems of all rows level by
level (each level's capped simplices and minimum partitions batched).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .errors import SolverError


def _min_cut_source_side(cap: np.ndarray, s: int, t: int, largest: bool = False) -> np.ndarray:
    """The source side ``(N,) bool`` of a minimum s–t cut of the capacities ``cap (N, N)``
    (Dinic's algorithm on dense float capacities; ``inf`` allowed out of ``s``): the vertices
    reachable from s in the residual graph of a maximum flow, the same for every maximum flow
    (the smallest source side); with ``largest``, the vertices that cannot reach t in it (the
    largest).

    Each phase's blocking flow is one depth-first search from s that splits the flow reaching a
    vertex over its arcs of the level graph (instead of one s–t path a search), and the level
    graph stops at t's level; on dense graphs the breadth-first search scans the vertices not
    reached yet instead of each vertex's arcs. On the 4 374 cuts of one relax (arborescences
    n = 30, entropy, t = 0.1, B = 64): 1.27 → 1.01 s with the search from s, 0.98 → 0.88 s with
    the scan; the same source sides."""
    N = cap.shape[0]
    scale = float(cap[np.isfinite(cap)].max(initial=0.0))
    eps = 1e-14 * max(scale, 1.0) * N
    linked = (cap > 0) | (cap.T > 0)
    res: list
    dense = N <= 64
    if dense:  # small: dense lists (0 where there is no arc)
        res = cap.tolist()
        adj = [[b for b, on in enumerate(row) if on] for row in linked.tolist()]
    else:  # the arcs present in either direction only: dense N × N lists cost more than the flow at N = 500
        rows, cols = np.nonzero(linked)
        ends = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=N))]).tolist()
        heads, caps = cols.tolist(), cap[rows, cols].tolist()
        adj = [heads[ends[a]:ends[a + 1]] for a in range(N)]
        res = [dict(zip(adj[a], caps[ends[a]:ends[a + 1]])) for a in range(N)]
    others = [b for b in range(N) if b != s]
    while True:
        level = [-1] * N
        level[s] = 0
        queue = [s]
        unseen = others
        for a in queue:
            up, ra = level[a] + 1, res[a]
            if dense:  # the vertices not reached yet, a shorter list than a's arcs once most are
                rest = []
                for b in unseen:
                    if ra[b] > eps:
                        level[b] = up
                        queue.append(b)
                    else:
                        rest.append(b)
                unseen = rest
            else:
                for b in adj[a]:
                    if level[b] < 0 and ra[b] > eps:
                        level[b] = up
                        queue.append(b)
        if level[t] < 0:
            if not largest:
                return np.array(level) >= 0
            reach = [False] * N  # the vertices that reach t along residual arcs
            reach[t] = True
            back = [t]
            for b in back:
                for a in (range(N) if dense else adj[b]):
                    if not reach[a] and res[a][b] > eps:
                        reach[a] = True
                        back.append(a)
            return ~np.array(reach)
        for a in queue:  # vertices at t's level or beyond lead nowhere in this phase
            if level[a] >= level[t] and a != t:
                level[a] = -1
        nxt = [0] * N

        def push(a: int, flow: float) -> float:
            """Sends up to ``flow`` from a (≠ t) to t along the level graph; returns how much went."""
            row, ra, up = adj[a], res[a], level[a] + 1
            sent, end = 0.0, len(row)
            while nxt[a] < end:
                b = row[nxt[a]]
                r = ra[b]
                if level[b] == up and r > eps:
                    want = flow - sent
                    if r < want:
                        want = r
                    got = want if b == t else push(b, want)
                    if got > 0:
                        ra[b] = r - got
                        res[b][a] += got
                        sent += got
                        if flow - sent <= eps:
                            return sent
                        if got < want or r - got <= eps:  # b is blocked, or the arc is full
                            nxt[a] += 1
                        continue
                nxt[a] += 1
            return sent

        while push(s, math.inf) > 0:
            pass


# batches of fewer rows take min_partition row by row (arborescences n = 10, t = 0.1: batching
# every round of separation, most with few rows, was 0.91-0.95x)
_BATCHED_ROWS = 16
# with at most this many parts, every union of them is tried at once (2^q rows) instead of a flow:
# spanning trees n = 10, B = 64, 0.18 -> 0.09 s; n = 20, 0.56-0.84 -> 0.33-0.44 s (8: less gain, 12: slower)
_ENUMERATE_PARTS = 10
_SUBSETS: dict[int, np.ndarray] = {}


def _subsets(q: int) -> np.ndarray:
    """``(2^q, q)`` 0/1 rows: every subset of q items."""
    if q not in _SUBSETS:
        _SUBSETS[q] = ((np.arange(1 << q)[:, None] >> np.arange(q)) & 1).astype(float)
    return _SUBSETS[q]


def _union_gains(Wp: np.ndarray, wv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every subset S of the q parts (``(2^q, q)`` rows) and its gain ``wv(S) + Wp(E(S)) − |S|``."""
    sub = _subsets(len(wv))
    return sub, sub @ wv + 0.5 * ((sub @ Wp) * sub).sum(1) - sub.sum(1)


def _best_union(Wp: np.ndarray, wv: np.ndarray, larger: float | None = None) -> np.ndarray:
    """The parts S maximizing ``g(S) = wv(S) + Wp(E(S)) − |S|`` (``Wp (q, q)`` between parts,
    ``wv (q,)`` from the new vertex). Returns S's indices.

    g is supermodular (Wp ≥ 0), so a part's marginal gain only grows with the set it joins:
    a part whose gain on joining all parts still possible is ≤ 0 can be left out, and one whose
    gain on joining the parts already in is > 0 belongs to every maximizer. Both rules are
    applied until nothing changes (at n = 30 they settle a quarter of these calls outright and
    leave at most _ENUMERATE_PARTS parts in another quarter); the parts left are decided by
    trying all their unions, or by a minimum cut with the new vertex and the parts in on the
    source side. With ``larger`` (a tolerance), the largest maximizer instead, gains within it
    of the best counted as ties."""
    q = len(wv)
    open_ = np.ones(q, dtype=bool)  # not decided yet
    inside = np.zeros(q, dtype=bool)  # in every maximizer (with larger: in the largest)
    tie = 0.0 if larger is None else larger
    while True:
        out = open_ & (wv + Wp @ (open_ | inside) - 1.0 <= -tie)
        open_ &= ~out
        into = open_ & (wv + Wp @ inside - 1.0 > -tie)
        open_ &= ~into
        inside |= into
        if not (out.any() or into.any()):
            break
    R = np.flatnonzero(open_)
    if len(R):
        Wr = Wp[np.ix_(R, R)]
        wr = wv[R] + Wp[np.ix_(R, np.flatnonzero(inside))].sum(1)  # from v and the parts already in
        if len(R) <= _ENUMERATE_PARTS:
            sub, gains = _union_gains(Wr, wr)
            inside[R[sub[_pick(sub, gains, larger)] > 0]] = True
        else:
            c = 1.0 - 0.5 * (Wr.sum(1) + wr)  # cost of a part on v's side, less half its cut
            r = len(R)
            s, t = r + 1, r + 2
            cap = np.zeros((r + 3, r + 3))
            cap[:r, :r] = 0.5 * Wr
            cap[:r, r] = cap[r, :r] = 0.5 * wr
            cap[s, r] = math.inf
            cap[:r, t] = np.maximum(c, 0.0)
            cap[s, :r] = np.maximum(-c, 0.0)
            inside[R[_min_cut_source_side(cap, s, t, larger is not None)[:r]]] = True
    return np.flatnonzero(inside)


def _pick(sub: np.ndarray, gains: np.ndarray, larger: float | None) -> int:
    """The row of ``sub`` with the largest gain; with ``larger`` (a tolerance), the largest
    subset among those within it of the best."""
    if larger is None:
        return int(np.argmax(gains))
    return int(np.argmax(np.where(gains >= gains.max() - larger, sub.sum(1), -1.0)))


# from this many vertices on, Cunningham's partition sums the weights between parts over the
# edges (O(edges) a step) instead of by products of one-hot matrices (O(v² q) a step, most of the
# time on sparse graphs of hundreds of vertices). min_partitions alone, rows of edge density 0.1
# to 1: 0.98-1.11× at k = 16 and 40, 1.04-1.10× at k = 100 (B = 4); below, the products were as
# fast (k = 8, B = 128). Relax (forward) of spanning trees of sparse graphs, 3 edges a vertex:
# 500 vertices, B = 2, 3.35-3.41 → 1.76-1.92 s; 200, B = 16, 2.58-2.65 → 1.91-2.01 s; 100,
# B = 32, t = 0.1, 1.03-1.15 → 0.83-0.88 s
_EDGE_SUMS_FROM = 16


def _edges_by_later_vertex(W: np.ndarray) -> tuple[np.ndarray, ...]:
    """The edges of ``W (B, k, k)`` (nonzero above the diagonal) as ``(row, i, j, weight, ends)``,
    i < j, in the order of j: the edges among the first v vertices are the first ``ends[v]``."""
    j, b, i = np.nonzero(np.moveaxis(np.triu(W, 1), -1, 0))
    return b, i, j, W[b, i, j], np.searchsorted(j, np.arange(W.shape[-1] + 1))


def min_partition(W: np.ndarray, tol: float, larger: bool = False) -> tuple[list[list[int]], float]:
    """``min_Π Σ_{P∈Π} (|P| − 1 − W(E(P)))`` over the partitions Π of the vertices of a graph
    with symmetric nonnegative edge weights ``W (k, k)`` (zero diagonal); returns the parts and
    the value (0 for the partition into singletons).

    Vertices are added in order. With ``Π`` optimal on the first ``v`` vertices, an optimal
    partition on ``v + 1`` keeps the parts of ``Π`` and merges vertex ``v`` with the union of
    some of them, ``S``, maximizing ``W(v, S) + W(E(S)) − |S|`` (where merging parts without ``v``
    never gains, as ``Π`` is optimal): a minimum cut with ``v`` on the source side, or with at most
    :data:`_ENUMERATE_PARTS` parts, the best of all their unions. A vertex whose
    weight towards the earlier vertices is at most 1 cannot gain and starts a part of its own.
    (That the other parts stay whole is checked against enumeration of all partitions in
    ``tests/test_graphic_matroid.py``.) With ``larger``, unions whose gain is within ``tol`` of 0
    or of the best are merged too, the largest among ties: the parts are then the largest sets
    of a minimum partition (for a feasible point, its maximal tight sets)."""
    k = W.shape[0]
    cut = -tol if larger else tol  # the gain a merge needs
    edges = _edges_by_later_vertex(W[None]) if k >= _EDGE_SUMS_FROM else None
    label = np.zeros(k, dtype=np.int64)
    q = 0  # number of parts so far
    for v in range(k):
        wv = np.bincount(label[:v], weights=W[v, :v], minlength=q)  # weight from v to each part
        merge: list[int] = []
        if wv.sum() > 1.0 + cut:
            if edges is None:  # the weights between the parts
                M = np.zeros((v, q))
                M[np.arange(v), label[:v]] = 1.0
                Wp = M.T @ W[:v, :v] @ M
            else:
                _, i, j, w, ends = edges
                e = ends[v]
                Wp = np.bincount(label[i[:e]] * q + label[j[:e]], weights=w[:e], minlength=q * q).reshape(q, q)
                Wp = Wp + Wp.T
            np.fill_diagonal(Wp, 0.0)
            if q <= _ENUMERATE_PARTS:  # few parts: every union of them at once beats a flow
                subsets, gains = _union_gains(Wp, wv)
                best = _pick(subsets, gains, tol if larger else None)
                S, gain = np.flatnonzero(subsets[best]), float(gains[best])
            else:
                S = _best_union(Wp, wv, tol if larger else None)
                gain = 0.5 * Wp[np.ix_(S, S)].sum() + wv[S].sum() - len(S)
            if gain > cut and len(S):
                merge = S.tolist()
        if merge:
            keep = np.ones(q, dtype=bool)
            keep[merge] = False
            renumber = np.cumsum(keep) - 1
            new = int(keep.sum())
            old = label[:v]
            label[:v] = np.where(keep[old], renumber[old], new)
            label[v] = new
            q = new + 1
        else:
            label[v] = q
            q += 1
    parts = [np.flatnonzero(label == p).tolist() for p in range(q)]
    value = k - q - 0.5 * float(W[label[:, None] == label[None, :]].sum())
    return parts, value


def min_partitions(W: np.ndarray, tol: float | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`min_partition` of a batch ``W (B, k, k)``: ``(labels (B, k), values (B,))``, the
    part of each vertex (``0 .. q − 1`` for q parts) and the minimum; ``tol`` a float or one
    per row. With at least :data:`_BATCHED_ROWS` rows, the same algorithm for all rows at once,
    its vertices added in step: a row whose new vertex may gain tries every union of its parts
    in one batched product while it has at most :data:`_ENUMERATE_PARTS` of them, else a minimum
    cut (row by row). Ties may be broken otherwise than :func:`min_partition` does; the values
    agree (tested). A row padded with isolated vertices (zero weights) keeps its partition,
    each padding vertex a part of its own after it."""
    B, k, _ = W.shape
    tol = np.broadcast_to(np.asarray(tol, dtype=float), (B,))
    if B < _BATCHED_ROWS:  # few rows: one by one costs less than the batch's fixed steps
        label = np.zeros((B, k), dtype=np.int64)
        values = np.zeros(B)
        for b in range(B):
            parts, values[b] = min_partition(W[b], float(tol[b]))
            for c, part in enumerate(parts):
                label[b, part] = c
        return label, values
    label = np.zeros((B, k), dtype=np.int64)
    q = np.zeros(B, dtype=np.int64)
    edges = _edges_by_later_vertex(W) if k >= _EDGE_SUMS_FROM else None
    where = np.full(B, -1)  # a row's place among the rows that need their parts' weights
    for v in range(k):
        Q = int(q.max(initial=0))
        merge = np.zeros((B, Q), dtype=bool)
        if v and Q:
            if edges is None:
                M = (label[:, :v, None] == np.arange(Q)).astype(float)  # (B, v, Q) one-hot
                wv = np.einsum("bu,buq->bq", W[:, v, :v], M)
            else:
                wv = np.bincount((np.arange(B)[:, None] * Q + label[:, :v]).reshape(-1),
                                 weights=W[:, v, :v].reshape(-1), minlength=B * Q).reshape(B, Q)
            need = np.flatnonzero(wv.sum(1) > 1.0 + tol)
            if need.size:
                if edges is None:  # the weights between the parts
                    Wp = M[need].transpose(0, 2, 1) @ W[need][:, :v, :v] @ M[need]
                else:  # the edges among the first v vertices of the rows in need
                    e = edges[-1][v]
                    where[:] = -1
                    where[need] = np.arange(need.size)
                    on = where[edges[0][:e]] >= 0
                    eb, ei, ej, ew = (a[:e][on] for a in edges[:4])
                    Wp = np.bincount((where[eb] * Q + label[eb, ei]) * Q + label[eb, ej], weights=ew,
                                     minlength=need.size * Q * Q).reshape(need.size, Q, Q)
                    Wp = Wp + Wp.transpose(0, 2, 1)
                Wp[:, np.arange(Q), np.arange(Q)] = 0.0
                few = q[need] <= _ENUMERATE_PARTS
                if few.any():
                    e = need[few]
                    Qe = int(q[e].max())
                    sub = _subsets(Qe)  # (2^Qe, Qe)
                    We, we = Wp[few][:, :Qe, :Qe], wv[e][:, :Qe]
                    # (parts a row does not have carry no weight: each costs 1, so no best union holds one)
                    gains = we @ sub.T + 0.5 * ((sub @ We) * sub).sum(2) - sub.sum(1)
                    best = gains.argmax(1)
                    ok = gains[np.arange(len(e)), best] > tol[e]
                    merge[e[ok], :Qe] = sub[best[ok]] > 0
                for j in np.flatnonzero(~few):
                    b = need[j]
                    qb = int(q[b])
                    S = _best_union(Wp[j][:qb, :qb], wv[b, :qb])
                    if 0.5 * Wp[j][np.ix_(S, S)].sum() + wv[b, S].sum() - len(S) > tol[b]:
                        merge[b, S] = True
        merged = merge.any(1)
        keep = ~merge & (np.arange(Q) < q[:, None])
        renumber = np.cumsum(keep, 1) - 1
        new = keep.sum(1)
        if v and merged.any():
            old = label[merged, :v]
            kept = np.take_along_axis(keep[merged], old, 1)
            label[merged, :v] = np.where(kept, np.take_along_axis(renumber[merged], old, 1), new[merged, None])
        label[:, v] = np.where(merged, new, q)
        q = np.where(merged, new + 1, q + 1)
    same = label[:, :, None] == label[:, None, :]
    values = k - q - 0.5 * (W * same).sum((1, 2))
    return label, values


def _capped_entropy(theta: np.ndarray, k: np.ndarray) -> np.ndarray:
    """``x = min(1, exp(θ − τ − 1))`` with ``Σx = k`` in closed form, for each row of ``theta
    (S, m)`` (``-inf`` padding allowed, at least k + 1 finite entries) and its ``k (S,)``: with
    the j largest entries at 1, ``τ = log Σ_{rest} exp(θ − 1) − log(k − j)``; j is the smallest
    count for which the rest stay below 1 (exact to rounding, tiny entries to relative
    precision). Computed as differences from the log-sums, so that at |θ| ~ 1e25, where
    ``log(k − j)`` vanishes next to θ, the j largest entries still come out at 1 (the top k)."""
    S, m = theta.shape
    r = np.arange(S)
    order = np.argsort(-theta, axis=1, kind="stable")
    s = np.take_along_axis(theta, order, 1)
    suffix = np.logaddexp.accumulate(s[:, ::-1], axis=1)[:, ::-1]  # log Σ_{i ≥ j} exp(θ_(i))
    left = k[:, None] - np.arange(m)                               # k − j, used for j < k only
    logs = np.log(np.maximum(left, 1))
    with np.errstate(invalid="ignore"):                            # (−inf − −inf in the padding)
        j = np.argmax((s - suffix + logs <= 0.0) & (left > 0), 1)  # the largest remaining entry ≤ 1
    xs = np.exp(np.minimum((s - suffix[r, j][:, None]) + logs[r, j][:, None], 0.0))  # min(1, ·) without overflow
    xs[np.arange(m) < j[:, None]] = 1.0
    x = np.empty_like(theta)
    np.put_along_axis(x, order, xs, 1)
    return x


def _capped_quadratic(theta: np.ndarray, k: np.ndarray) -> np.ndarray:
    """``x = clamp(θ − τ, 0, 1)`` with ``Σx = k``, for each row as in :func:`_capped_entropy`: τ
    between two consecutive breakpoints (``θ_i``, ``θ_i − 1``) found by bisection, then exactly
    from the entries strictly between 0 and 1. (Padding sits below every breakpoint: x = 0.)"""
    S, m = theta.shape
    r = np.arange(S)
    finite = np.isfinite(theta)
    floor = np.where(finite, theta, np.inf).min(1) - 2.0
    th = np.where(finite, theta, floor[:, None])

    def h(tau: np.ndarray) -> np.ndarray:
        return np.clip(th - tau[:, None], 0.0, 1.0).sum(1) - k

    b = np.sort(np.concatenate([th, th - 1.0], 1), 1)
    lo, hi = np.zeros(S, dtype=np.int64), np.full(S, 2 * m - 1)  # h(b[lo]) ≥ 0 > h(b[hi]) (k < m)
    while True:
        open_ = hi - lo > 1
        if not open_.any():
            break
        mid = (lo + hi) // 2
        up = h(b[r, mid]) >= 0
        lo = np.where(open_ & up, mid, lo)
        hi = np.where(open_ & ~up, mid, hi)
    mid = 0.5 * (b[r, lo] + b[r, hi])
    free = (th - mid[:, None] > 0) & (th - mid[:, None] < 1)
    ones = (th - mid[:, None] >= 1).sum(1)
    count = free.sum(1)
    tau = np.where(count > 0, ((th * free).sum(1) + ones - k) / np.maximum(count, 1), mid)
    return np.clip(th - tau[:, None], 0.0, 1.0)


def _capped_binary_entropy(theta: np.ndarray, k: np.ndarray, max_iter: int = 60) -> tuple[np.ndarray, np.ndarray]:
    """``x = sigmoid(θ − τ)`` with ``Σx = k``, for each row as in :func:`_capped_entropy`, by Newton
    steps on τ kept inside a bracket (bisection where a step leaves it); returns x and the rows
    that reached ``|Σx − k| ≤ 1e-13 k``."""
    finite = np.isfinite(theta)
    logit = np.log(k / (finite.sum(1) - k))
    lo = np.where(finite, theta, np.inf).min(1) - logit   # Σx ≥ k here
    hi = np.where(finite, theta, -np.inf).max(1) - logit  # Σx ≤ k here
    tau = 0.5 * (lo + hi)
    x = np.zeros_like(theta)
    done = np.zeros(len(k), dtype=bool)
    for _ in range(max_iter):
        live = ~done
        xl = 0.5 * (1.0 + np.tanh(0.5 * (theta[live] - tau[live, None])))  # sigmoid without overflow
        x[live] = xl
        h = xl.sum(1) - k[live]
        ok = np.abs(h) <= 1e-13 * k[live]
        done[live] = ok
        if done.all():
            break
        lo[live] = np.where(h > 0, tau[live], lo[live])
        hi[live] = np.where(h > 0, hi[live], tau[live])
        slope = (xl * (1.0 - xl)).sum(1)
        with np.errstate(divide="ignore", invalid="ignore"):
            step = np.where(slope > 0, tau[live] + h / slope, np.nan)
        inside = (lo[live] < step) & (step < hi[live])
        tau[live] = np.where(inside, step, 0.5 * (lo[live] + hi[live]))
    return x, done


def _capped(theta: np.ndarray, k: np.ndarray, reg: str) -> np.ndarray:
    """Step 1 for each row of ``theta (S, m)`` (``-inf`` padding allowed) and its ``k (S,)``
    (``1 ≤ k <`` the row's finite entries): ``argmax θᵀx − f(x)`` over ``{Σx = k, 0 ≤ x ≤ 1}``.
    Closed forms for the entropy and the quadratic, Newton steps for the binary entropy, and
    where those do not converge the capped simplex's root finder (which resolves τ at any |θ|)."""
    if reg == "entropy":
        return _capped_entropy(theta, k)
    if reg == "quadratic":
        return _capped_quadratic(theta, k)
    x, done = _capped_binary_entropy(theta, k)
    if not done.all():
        from .fast import capped_simplex

        for i in np.flatnonzero(~done):
            row = np.isfinite(theta[i])
            xt, _ = capped_simplex(torch.from_numpy(theta[i, row])[None], int(k[i]), reg, on_failure="raise")
            x[i] = 0.0
            x[i, row] = xt[0].numpy()
    return x


def _tied_tight_set(W: np.ndarray, tol: float) -> np.ndarray | None:
    """A set P of vertices, ``2 ≤ |P| < k``, with ``y(E(P)) = |P| − 1`` (tight, to ``tol``) for the
    feasible y of a block with weights ``W (k, k)``, or None. The caller asks only where the
    logits of y's free edges tie: otherwise y(E(P)) = |P| − 1 holds only where y's edges in P
    are at their bounds (0 or 1, a zero derivative), and splitting changes nothing. Each vertex
    is left out in turn, and the largest tight sets of the others are found by
    :func:`min_partition` (``larger``): every proper tight set misses some vertex."""
    k = W.shape[0]
    if k <= 2:
        return None
    for v in range(k):
        keep = np.flatnonzero(np.arange(k) != v)
        parts, _ = min_partition(W[np.ix_(keep, keep)], tol, larger=True)
        for part in parts:
            if len(part) >= 2:
                return keep[part]
    return None


def spanning_tree_rows(theta: np.ndarray, edges: np.ndarray, n: int, reg: str) -> tuple[np.ndarray, np.ndarray]:
    """``argmax_{x∈B} θᵀx − f(x)`` for each row of ``theta (B, m)`` float64, ``edges (m, 2)`` of
    a connected graph on ``n`` vertices. Returns ``x (B, m)`` and the block of each edge
    ``(B, m) int64`` (−1 for edges fixed at 1 with zero derivative: bridges of a subproblem).

    The subproblems of all rows are solved level by level: each level's capped simplices and
    minimum partitions together (:func:`_capped`, :func:`min_partitions`; the smaller problems
    padded), then each one split into its restriction and contraction."""
    B, m = theta.shape
    x = np.zeros((B, m))
    block = np.full((B, m), -1, dtype=np.int64)
    blocks = np.zeros(B, dtype=np.int64)
    uv0 = np.asarray(edges, dtype=np.int64).reshape(-1, 2)
    level = [(b, n, uv0, np.arange(m)) for b in range(B)]
    while level:
        todo = []
        for b, k, uv, idx in level:
            if len(idx) < k - 1:
                raise SolverError(f"the spanning-tree decomposition reached a disconnected subgraph ({k} vertices, "
                                  f"{len(idx)} edges); the graph must be connected")
            if len(idx) == k - 1:  # a tree: every edge is a bridge
                x[b, idx] = 1.0
            else:
                todo.append((b, k, uv, idx))
        if not todo:
            break
        ks = np.array([k for _, k, _, _ in todo])
        sizes = np.array([len(idx) for *_, idx in todo])
        cols = np.concatenate([np.arange(c) for c in sizes])
        rows = np.repeat(np.arange(len(todo)), sizes)
        th = np.full((len(todo), int(sizes.max())), -math.inf)
        th[rows, cols] = theta[np.repeat([b for b, *_ in todo], sizes), np.concatenate([idx for *_, idx in todo])]
        ys = _capped(th, ks - 1, reg)
        W = np.zeros((len(todo), int(ks.max()), int(ks.max())))
        uv = np.concatenate([u for _, _, u, _ in todo])
        np.add.at(W, (rows, uv[:, 0], uv[:, 1]), ys[rows, cols])
        W = W + W.transpose(0, 2, 1)
        # an exact minimizer (merges on any gain above rounding), split only on a violation
        # above the roots' tolerance: a near-minimizer found with 1.6e-11 for both put a block of
        # 1e-12 masses on the wrong side of a split (levels out of order; x off by ~1e-12 only)
        labels, values = min_partitions(W, 1e-14 * ks)
        # rows whose free edges (0 < y < 1) have tied logits: only there can a proper set be tight
        # without a violation and with free edges in it (_tied_tight_set)
        with np.errstate(invalid="ignore"):
            srt = np.sort(np.where((ys > 0) & (ys < 1) & np.isfinite(th), th, np.nan), axis=1)
        tied = (srt[:, 1:] == srt[:, :-1]).any(1)
        level = []
        for j, ((b, k, uv, idx), y, label, value) in enumerate(zip(todo, ys, labels, values)):
            y, label = y[:len(idx)], label[:k]  # (the padding's parts come after the graph's)
            q = int(label.max()) + 1
            if value >= -4e-12 * k or q == 1:
                tight = _tied_tight_set(W[j][:k, :k], 4e-12 * k) if tied[j] else None
                if tight is None:
                    x[b, idx] = y
                    block[b, idx] = blocks[b]
                    blocks[b] += 1
                    continue
                # y is feasible, but a proper set is tight with no violation: the solution keeps it
                # tight (x(E(P)) = |P| − 1 under every small change of θ, where ties made it so),
                # so the Jacobian must split there, as the algorithm does on a violated set
                label = np.full(k, -1, dtype=np.int64)
                label[tight] = 0
                rest = label < 0
                label[rest] = np.arange(1, int(rest.sum()) + 1)
                q = int(label.max()) + 1
            lu, lv = label[uv[:, 0]], label[uv[:, 1]]
            inside = lu == lv
            local = np.empty(k, dtype=np.int64)
            for p in range(q):  # restriction: the edges inside each part
                P = np.flatnonzero(label == p)
                if len(P) > 1:
                    local[P] = np.arange(len(P))
                    sel = inside & (lu == p)
                    level.append((b, len(P), local[uv[sel]], idx[sel]))
            cross = ~inside  # contraction: the parts become vertices
            level.append((b, q, np.stack([lu[cross], lv[cross]], 1), idx[cross]))
    return x, block


def _slope(x: torch.Tensor, block: torch.Tensor, reg: str) -> torch.Tensor:
    """``d = ∂x_e/∂θ_e`` at fixed block multipliers, from the output (differentiable in it):
    0 on fixed edges and where the capped simplex clamps."""
    from .fast import _capped_slope

    return torch.where(block >= 0, _capped_slope(x, reg), torch.zeros_like(x))


class _SpanningTreeSeparable(torch.autograd.Function):
    @staticmethod
    def forward(ctx, theta, edges, n, reg):
        th = theta.detach().to("cpu", torch.float64).numpy()
        xs, blocks = spanning_tree_rows(th, edges, n, reg)
        x = torch.from_numpy(xs).to(theta.device, theta.dtype)
        block = torch.from_numpy(blocks).to(theta.device)
        ctx.reg = reg
        ctx.save_for_backward(x, block)
        ctx.mark_non_differentiable(block)
        return x, block

    @staticmethod
    def backward(ctx, g, _):
        # J = diag(d) − d dᵀ/Σd in each block, in terms of the output x: under create_graph=True
        # autograd differentiates it through x, whose own backward is this one
        x, block = ctx.saved_tensors
        d = _slope(x, block, ctx.reg)
        B, m = x.shape
        ids = (torch.arange(B, device=x.device)[:, None] * m + block.clamp_min(0)).reshape(-1)
        dg = x.new_zeros(B * m).index_add(0, ids, (d * g).reshape(-1))
        ds = x.new_zeros(B * m).index_add(0, ids, d.reshape(-1))
        mean = torch.where(ds > 0, dg / ds.clamp_min(torch.finfo(x.dtype).tiny), torch.zeros_like(ds))
        return d * (g - mean[ids].reshape(B, m)), None, None, None


def spanning_tree_separable(theta: torch.Tensor, edges: np.ndarray, n: int, reg: str) -> torch.Tensor:
    """``(B, m)``: the rows of ``theta (B, m)`` solved by :func:`spanning_tree_rows` (on the CPU in
    float64; the result in ``theta``'s dtype and device), with the block-diagonal Jacobian."""
    x, _ = _SpanningTreeSeparable.apply(theta, edges, n, reg)
    return x
