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
simplex. Combinatorial and sequential: it runs on the CPU in float64, row by row.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .errors import SolverError


def _min_cut_source_side(cap: np.ndarray, s: int, t: int) -> np.ndarray:
    """The source side ``(N,) bool`` of a minimum s–t cut of the capacities ``cap (N, N)``
    (Dinic's algorithm on dense float capacities; ``inf`` allowed out of ``s``)."""
    N = cap.shape[0]
    scale = float(cap[np.isfinite(cap)].max(initial=0.0))
    eps = 1e-14 * max(scale, 1.0) * N
    linked = (cap > 0) | (cap.T > 0)
    res: list
    if N <= 64:  # small: dense lists
        res = cap.tolist()
        adj = [[b for b, on in enumerate(row) if on] for row in linked.tolist()]
    else:  # the arcs present in either direction only: dense N × N lists cost more than the flow at N = 500
        rows, cols = np.nonzero(linked)
        adj = [a.tolist() for a in np.split(cols, np.cumsum(np.bincount(rows, minlength=N))[:-1])]
        res = [dict(zip(nb, cap[a, nb].tolist())) for a, nb in enumerate(adj)]
    while True:
        level = [-1] * N
        level[s] = 0
        queue = [s]
        for a in queue:
            for b in adj[a]:
                if level[b] < 0 and res[a][b] > eps:
                    level[b] = level[a] + 1
                    queue.append(b)
        if level[t] < 0:
            return np.array(level) >= 0
        nxt = [0] * N

        def push(a: int, flow: float) -> float:
            if a == t:
                return flow
            row = adj[a]
            while nxt[a] < len(row):
                b = row[nxt[a]]
                if level[b] == level[a] + 1 and res[a][b] > eps:
                    got = push(b, min(flow, res[a][b]))
                    if got > 0:
                        res[a][b] -= got
                        res[b][a] += got
                        return got
                nxt[a] += 1
            return 0.0

        while push(s, math.inf) > 0:
            pass


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


def _best_union(Wp: np.ndarray, wv: np.ndarray) -> np.ndarray:
    """The parts S maximizing ``g(S) = wv(S) + Wp(E(S)) − |S|`` (``Wp (q, q)`` between parts,
    ``wv (q,)`` from the new vertex). Returns S's indices.

    g is supermodular (Wp ≥ 0), so a part's marginal gain only grows with the set it joins:
    a part whose gain on joining all parts still possible is ≤ 0 can be left out, and one whose
    gain on joining the parts already in is > 0 belongs to every maximizer. Both rules are
    applied until nothing changes (at n = 30 they settle a quarter of these calls outright and
    leave at most _ENUMERATE_PARTS parts in another quarter); the parts left are decided by
    trying all their unions, or by a minimum cut with the new vertex and the parts in on the
    source side."""
    q = len(wv)
    open_ = np.ones(q, dtype=bool)  # not decided yet
    inside = np.zeros(q, dtype=bool)  # in every maximizer
    while True:
        out = open_ & (wv + Wp @ (open_ | inside) - 1.0 <= 0.0)
        open_ &= ~out
        into = open_ & (wv + Wp @ inside - 1.0 > 0.0)
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
            inside[R[sub[int(np.argmax(gains))] > 0]] = True
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
            inside[R[_min_cut_source_side(cap, s, t)[:r]]] = True
    return np.flatnonzero(inside)


def min_partition(W: np.ndarray, tol: float) -> tuple[list[list[int]], float]:
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
    ``tests/test_graphic_matroid.py``.)"""
    k = W.shape[0]
    label = np.zeros(k, dtype=np.int64)
    q = 0  # number of parts so far
    for v in range(k):
        M = np.zeros((v, q))
        M[np.arange(v), label[:v]] = 1.0
        wv = W[v, :v] @ M  # weight from v to each part
        merge: list[int] = []
        if wv.sum() > 1.0 + tol:
            Wp = M.T @ W[:v, :v] @ M
            np.fill_diagonal(Wp, 0.0)
            if q <= _ENUMERATE_PARTS:  # few parts: every union of them at once beats a flow
                subsets, gains = _union_gains(Wp, wv)
                best = int(np.argmax(gains))
                S, gain = np.flatnonzero(subsets[best]), float(gains[best])
            else:
                S = _best_union(Wp, wv)
                gain = 0.5 * Wp[np.ix_(S, S)].sum() + wv[S].sum() - len(S)
            if gain > tol:
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


def min_partitions(W: np.ndarray, tol: float) -> tuple[np.ndarray, np.ndarray]:
    """:func:`min_partition` of a batch ``W (B, k, k)`` at once: ``(labels (B, k), values (B,))``,
    the part of each vertex and the minimum. The same algorithm, its vertices added in step
    across the rows: a row whose new vertex may gain tries every union of its parts in one
    batched product while it has at most :data:`_ENUMERATE_PARTS` of them, else a minimum cut
    (row by row). Ties may be broken otherwise than :func:`min_partition` does; the values agree
    (tested)."""
    B, k, _ = W.shape
    label = np.zeros((B, k), dtype=np.int64)
    q = np.zeros(B, dtype=np.int64)
    for v in range(k):
        Q = int(q.max(initial=0))
        merge = np.zeros((B, Q), dtype=bool)
        if v and Q:
            M = (label[:, :v, None] == np.arange(Q)).astype(float)  # (B, v, Q) one-hot
            wv = np.einsum("bu,buq->bq", W[:, v, :v], M)
            need = np.flatnonzero(wv.sum(1) > 1.0 + tol)
            if need.size:
                Wp = M[need].transpose(0, 2, 1) @ W[need][:, :v, :v] @ M[need]
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
                    ok = gains[np.arange(len(e)), best] > tol
                    merge[e[ok], :Qe] = sub[best[ok]] > 0
                for j in np.flatnonzero(~few):
                    b = need[j]
                    qb = int(q[b])
                    S = _best_union(Wp[j][:qb, :qb], wv[b, :qb])
                    if 0.5 * Wp[j][np.ix_(S, S)].sum() + wv[b, S].sum() - len(S) > tol:
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


def _capped_entropy(theta: np.ndarray, k: int) -> np.ndarray:
    """``x = min(1, exp(θ − τ − 1))`` with ``Σx = k`` in closed form: with the j largest entries
    at 1, ``τ = log Σ_{rest} exp(θ − 1) − log(k − j)``; j is the smallest count for which the
    rest stay below 1 (exact to rounding, tiny entries to relative precision). Computed as
    differences from the log-sums, so that at |θ| ~ 1e25, where ``log(k − j)`` vanishes next to
    θ, the j largest entries still come out at 1 (the top k)."""
    order = np.argsort(-theta, kind="stable")
    s = theta[order]
    suffix = np.logaddexp.accumulate(s[::-1])[::-1][:k]      # log Σ_{i ≥ j} exp(θ_(i)), j < k
    logs = np.log(k - np.arange(k))
    j = int(np.argmax(s[:k] - suffix + logs <= 0.0))         # the largest remaining entry ≤ 1
    x = np.empty_like(theta)
    x[order] = np.exp(np.minimum((s - suffix[j]) + logs[j], 0.0))   # min(1, ·) without overflow
    x[order[:j]] = 1.0
    return x


def _capped_quadratic(theta: np.ndarray, k: int) -> np.ndarray:
    """``x = clamp(θ − τ, 0, 1)`` with ``Σx = k``: τ between two consecutive breakpoints
    (``θ_i``, ``θ_i − 1``) found by bisection, then exactly from the entries strictly between 0 and 1."""
    b = np.unique(np.concatenate([theta, theta - 1.0]))

    def h(tau: float) -> float:
        return float(np.clip(theta - tau, 0.0, 1.0).sum()) - k

    lo, hi = 0, len(b) - 1                                   # h(b[0]) ≥ 0 ≥ h(b[-1]) (k ≤ m)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if h(b[mid]) >= 0:
            lo = mid
        else:
            hi = mid
    mid = 0.5 * (b[lo] + b[hi])
    free = (theta - mid > 0) & (theta - mid < 1)
    ones = int((theta - mid >= 1).sum())
    tau = (theta[free].sum() + ones - k) / free.sum() if free.any() else mid
    return np.clip(theta - tau, 0.0, 1.0)


def _capped_binary_entropy(theta: np.ndarray, k: int, max_iter: int = 60) -> np.ndarray | None:
    """``x = sigmoid(θ − τ)`` with ``Σx = k`` by Newton steps on τ kept inside a bracket
    (bisection where a step leaves it); None where that does not reach ``|Σx − k| ≤ 1e-13 k``."""
    logit = math.log(k / (len(theta) - k))
    lo, hi = float(theta.min()) - logit, float(theta.max()) - logit  # Σx ≥ k at lo, ≤ k at hi
    tau = 0.5 * (lo + hi)
    for _ in range(max_iter):
        x = 0.5 * (1.0 + np.tanh(0.5 * (theta - tau)))  # sigmoid without overflow
        h = float(x.sum()) - k
        if abs(h) <= 1e-13 * k:
            return x
        if h > 0:
            lo = tau
        else:
            hi = tau
        slope = float((x * (1.0 - x)).sum())
        step = tau + h / slope if slope > 0 else math.nan
        tau = step if lo < step < hi else 0.5 * (lo + hi)
    return None


def _capped(theta: np.ndarray, k: int, reg: str) -> np.ndarray:
    """Step 1: ``argmax θᵀx − f(x)`` over ``{Σx = k, 0 ≤ x ≤ 1}`` (``1 ≤ k < len(θ)``): closed
    forms for the entropy and the quadratic, Newton steps for the binary entropy, and where
    those do not converge the capped simplex's root finder (which resolves τ at any |θ|)."""
    if reg == "entropy":
        return _capped_entropy(theta, k)
    if reg == "quadratic":
        return _capped_quadratic(theta, k)
    x = _capped_binary_entropy(theta, k)
    if x is not None:
        return x
    from .fast import capped_simplex

    xt, _ = capped_simplex(torch.from_numpy(theta)[None], k, reg, on_failure="raise")
    return xt[0].numpy()


def spanning_tree_row(theta: np.ndarray, edges: np.ndarray, n: int, reg: str) -> tuple[np.ndarray, np.ndarray]:
    """``argmax_{x∈B} θᵀx − f(x)`` for one row: ``theta (m,)`` float64, ``edges (m, 2)`` of a
    connected graph on ``n`` vertices. Returns ``x (m,)`` and the block of each edge
    ``(m,) int64`` (−1 for edges fixed at 1 with zero derivative: bridges of a subproblem)."""
    m = len(theta)
    x = np.zeros(m)
    block = np.full(m, -1, dtype=np.int64)
    blocks = 0
    stack = [(n, np.asarray(edges, dtype=np.int64), np.arange(m))]
    while stack:
        k, uv, idx = stack.pop()
        if len(idx) < k - 1:
            raise SolverError(f"the spanning-tree decomposition reached a disconnected subgraph ({k} vertices, "
                              f"{len(idx)} edges); the graph must be connected")
        if len(idx) == k - 1:  # a tree: every edge is a bridge
            x[idx] = 1.0
            continue
        y = _capped(theta[idx], k - 1, reg)
        W = np.zeros((k, k))
        np.add.at(W, (uv[:, 0], uv[:, 1]), y)
        W = W + W.T
        # an exact minimizer (merges on any gain above rounding), split only on a violation
        # above the roots' tolerance: a near-minimizer found with 1.6e-11 for both put a block of
        # 1e-12 masses on the wrong side of a split (levels out of order; x off by ~1e-12 only)
        parts, value = min_partition(W, 1e-14 * k)
        tol = 4e-12 * k
        if value >= -tol or len(parts) == 1:
            x[idx] = y
            block[idx] = blocks
            blocks += 1
            continue
        label = np.empty(k, dtype=np.int64)
        for p, P in enumerate(parts):
            label[P] = p
        lu, lv = label[uv[:, 0]], label[uv[:, 1]]
        inside = lu == lv
        local = np.empty(k, dtype=np.int64)
        for p, P in enumerate(parts):  # restriction: the edges inside each part
            if len(P) > 1:
                local[P] = np.arange(len(P))
                sel = inside & (lu == p)
                stack.append((len(P), local[uv[sel]], idx[sel]))
        cross = ~inside  # contraction: the parts become vertices
        stack.append((len(parts), np.stack([lu[cross], lv[cross]], 1), idx[cross]))
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
        m = theta.shape[1]
        xs, blocks = zip(*(spanning_tree_row(row, edges, n, reg) for row in th)) if len(th) else ((), ())
        x = torch.from_numpy(np.stack(xs)) if xs else torch.zeros(0, m, dtype=torch.float64)
        block = torch.from_numpy(np.stack(blocks)) if blocks else torch.zeros(0, m, dtype=torch.int64)
        x = x.to(theta.device, theta.dtype)
        block = block.to(theta.device)
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
    """``(B, m)``: the rows of ``theta (B, m)`` solved by :func:`spanning_tree_row` (on the CPU in
    float64; the result in ``theta``'s dtype and device), with the block-diagonal Jacobian."""
    x, _ = _SpanningTreeSeparable.apply(theta, edges, n, reg)
    return x
