"""Separable regularizers on arborescences: Newton on a dual, sets added as needed.

The arborescences rooted at r are the common bases of two matroids (Edmonds), so their convex
hull is ``P = {x ≥ 0 : x(δ⁻(m)) = 1 for m ≠ r, x(E[S]) ≤ |S| − 1 for every S ⊆ V}`` over the
arcs ``h → m`` (m ≠ r, h ≠ m): one arc into every vertex but the root, and no set holding more
arcs than a forest can (with the in-degrees fixed, ``x(E[S]) ≤ |S| − 1`` for ``r ∉ S`` is
Edmonds' cut ``x(δ⁻(S)) ≥ 1``; for ``r ∈ S`` it is implied). The second family says that
``y = x + xᵀ`` lies in the forest polytope of Kₙ, so the most violated sets are found exactly by
:func:`convex_sst._graphic_matroid.min_partition` (Cunningham's minimum partition), the
separation that the spanning trees' decomposition algorithm uses, here for all rows at once
(:func:`~convex_sst._graphic_matroid.min_partitions`).

For a smooth separable regularizer (entropy, binary entropy: x > 0 on every arc, so no bound of
x is active) ``argmax ⟨θ, x⟩ − f(x)`` over P is found by an active-set method. Each row keeps a
working set of sets S, taken as equalities ``x(E[S]) = |S| − 1``, and Newton's method
(:func:`~convex_sst._assignment_projection.damped_newton`) minimizes the dual

    D(a, λ) = Σ_{h→m} f*(θ[h, m] − a_m − Σ_{S ∋ h, m} λ_S) + Σ_m a_m + Σ_S λ_S (|S| − 1),

``x = f*'(·)``, gradient ``(1 − x(δ⁻(m)), |S| − 1 − x(E[S]))``, Hessian ``A diag(w) Aᵀ`` with
``w = f*''`` and A the rows of the in-degrees and of the sets: smooth and unconstrained, so the
steps converge quadratically. Where multipliers came out negative, the row steps back from where
the round started towards Newton's point only as far as they stay ≥ 0, and the set that reaches
0 first leaves the working set (one a round; as in Lawson and Hanson's active-set method, the
dual then decreases from round to round, so no working set repeats: dropping every negative set
at once cycled, and so did dropping the most negative one at Newton's point); else the violated
sets of x join it, and those rows are solved again, until every multiplier is
≥ 0 and no set is violated: x is then in P (to the tolerance) and optimal, its multipliers
certify it. (Keeping ``λ ≥ 0`` inside Newton's method instead, by projected steps, stalled on
nested sets that are nearly dependent.) Logits that span more than 50 start with a continuation
in their scale, as for Birkhoff polytopes, the working sets carried from stage to stage.

The quadratic (``x = [θ − a_m − Σ λ_S]₊``, the dual piecewise quadratic) takes the same
semismooth steps, with weights 1 on the support and 0 off it. Its in-degree and set rows are
often dependent on the support, so its system keeps a floor _RIDGE on the regularization, and a
column or set with no arc on the support (no curvature) steps to where its best arc carries its
residual. (Its rows on a tree, and its rows at low temperature, are handled before:
:func:`convex_sst.fast.arborescence_dual_newton`.)

The Jacobian is that of the equality-constrained problem on the in-degrees and the final
working set (all tight, with ``λ_S ≥ 0``): ``√W ⊙ Π(√W ⊙ G)``, Π the projector onto the null
space of ``A diag(√W)``, by the pseudo-inverse of ``diag(√W) Aᵀ`` (:func:`arborescence_vjp`),
computed from the output x (``W = x`` for the entropy, ``x(1 − x)`` for the binary entropy, the
support for the quadratic), so second derivatives flow through x; rows on a tree have a zero
Jacobian. Separation runs on the CPU (NumPy; the rows of a round together,
:func:`~convex_sst._graphic_matroid.min_partitions`, where they are 16 or more); the Newton
steps are batched torch operations, in float64. (Rows at logits of 1e25 and beyond, where x
keeps no digits, are handled before: :func:`convex_sst.fast._arborescence_limit`.)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ._assignment_projection import (_GROWTH, _POLISH_STEPS, _SPAN, _STAGE_ITER, _STAGE_TOL, _WEIGHT_FLOOR,
                                     SEPARABLE, SUPPORT_FACTOR, Direction, Evaluate, Separable, _chol_solve,
                                     damped_newton, spread_and_scale)
from ._autograd import autocast_off
from ._graphic_matroid import min_partitions

# the Newton system's regularization, times the residual (as for DAG paths' smooth regularizers)
_MU = 1e-3
# the quadratic's Newton system: a floor on its regularization (its weights are 0 off the support,
# where the in-degree and set rows are often dependent: with μ = _MU·err alone, at residuals of
# 1e-12 the step went 0.1 to 1e16 along the null directions, and the row stalled)
_RIDGE = 1e-10
# the largest KKT residual (in x) accepted where the arithmetic cannot resolve the tolerance
_RESIDUAL_CAP = 1e-6
# singular values of the backward pass's M below this times the largest count as 0
_PINV_RTOL = 1e-12
# the backward pass forms diag(√W) Aᵀ for at most this many bytes of rows at a time
_VJP_BYTES = 1 << 26
# rounds of separation per stage at most (each changes the working set of the rows solved again;
# the dual decreases from round to round, so more rounds are progress, not a cycle): ListOps arc
# scores at t = 1, n = 16 to 30, took 30 to 145 rounds on the 26 rows that needed the most
_MAX_ROUNDS = 500
# from this many vertices on, the separation adds the vertices of y = x + xᵀ to Cunningham's
# partition in increasing order of their weight in y (leaves first; the algorithm is exact in any
# order): fewer of its steps need a minimum cut. The Y of one relax (entropy, B = 64, N(0, 2²)
# logits): n = 30, t = 0.1, 3 971 → 2 535 cuts, min_partitions 2.5 → 1.7 s; n = 40, t = 0.03,
# 6 686 → 4 444 cuts, 5.3 → 3.9 s; n = 20, binary entropy, 1 452 → 953. Below, where most steps
# try every union of at most 10 parts instead of a cut, it made those unions larger: relax at
# n = 12 to 14, t ∈ {0.3, 0.1}, six seeds of B = 32: 0.95-1.00×; n = 16 1.03-1.08×, n = 20
# 1.15-1.21×. (For spanning trees the given order needs fewer cuts: 2, 14 and 464 against 27, 48
# and 564 on K₂₀, K₃₀ and a sparse 40-vertex graph.)
_LOW_DEGREE_FIRST = 15


class _Cuts:
    """The working sets of a batch: ``S (B, J, n)`` float 0/1 (rows of zeros: unused slots),
    ``b (B, J)`` = ``|S| − 1`` (0 on unused slots) and ``used (B, J)``."""

    def __init__(self, S: torch.Tensor):
        self.S = S
        self.used = S.sum(2) > 0
        self.b = torch.where(self.used, S.sum(2) - 1.0, 0.0)

    def inside(self, x: torch.Tensor) -> torch.Tensor:
        """``x(E[S])`` for every set: ``(B, J)``."""
        return ((self.S @ x) * self.S).sum(2)

    def spread(self, lam: torch.Tensor) -> torch.Tensor:
        """``Σ_S λ_S 1[h, m ∈ S]``: ``(B, n, n)``."""
        return (self.S * lam[:, :, None]).mT @ self.S

    def rows(self, rows: torch.Tensor) -> "_Cuts":
        return _Cuts(self.S[rows])


def _evaluate(theta: torch.Tensor, valid: torch.Tensor, cols: torch.Tensor, cuts: _Cuts, reg: Separable):
    def evaluate(z: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        a, lam = z
        V = theta - a[:, None, :] - cuts.spread(lam)
        conj = torch.where(valid, reg.conj(V), 0.0).sum((1, 2))  # (not a product: ψ may overflow off P)
        x = torch.where(valid, reg.x(V), 0.0)
        lin = (a * cols).sum(1) + (lam * cuts.b).sum(1)
        err_cols = ((1.0 - x.sum(1)).abs() * cols).amax(1)
        err_cuts = torch.where(cuts.used, (cuts.inside(x) - cuts.b).abs(), 0.0)
        err = torch.maximum(err_cols, err_cuts.amax(1)) if lam.shape[1] else err_cols
        return conj + lin, x, V, conj.abs() + lin.abs(), err

    return evaluate


def _system(W: torch.Tensor, cuts: _Cuts) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The blocks of ``A diag(W) Aᵀ``: ``(colsum W (B, n), cross (B, n, J), sets (B, J, J))``."""
    S = cuts.S
    B, J, n = S.shape
    cross = (S * (S @ W)).mT  # [m, j] = S_j[m] Σ_h W[h, m] S_j[h]
    Q = (S[:, :, None, :] * S[:, None, :, :]).reshape(B, J * J, n)  # S_j ∘ S_k
    sets = ((Q @ W) * Q).sum(2).reshape(B, J, J)
    return W.sum(1), cross, sets


def _solve_system(W: torch.Tensor, cuts: _Cuts, cols: torch.Tensor, rhs_a: torch.Tensor, rhs_l: torch.Tensor,
                  mu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A diag(W) Aᵀ + μ I) v = rhs`` for the multipliers of the non-root columns and the used
    sets (v = 0 on the others, and on any without weight: a singular direction)."""
    diag_a, cross, sets = _system(W, cuts)
    B, n = diag_a.shape
    J = sets.shape[1]
    H = W.new_zeros(B, n + J, n + J)
    H[:, :n, :n] = torch.diag_embed(diag_a)
    H[:, :n, n:] = cross
    H[:, n:, :n] = cross.mT
    H[:, n:, n:] = sets
    free = torch.cat([cols > 0, cuts.used], 1)
    dg = torch.diagonal(H, dim1=1, dim2=2)
    free = free & (dg > 0)
    H = H + mu[:, None, None] * torch.eye(n + J, dtype=W.dtype, device=W.device)
    rhs = torch.cat([rhs_a, rhs_l], 1)
    pair = free[:, :, None] & free[:, None, :]
    H = torch.where(pair, H, torch.eye(n + J, dtype=W.dtype, device=W.device).expand_as(H))
    v = _chol_solve(H, rhs * free) * free
    return v[:, :n], v[:, n:]


def _newton(theta: torch.Tensor, valid: torch.Tensor, cols: torch.Tensor, cuts: _Cuts, reg: Separable
            ) -> tuple[Evaluate, Direction, Callable[[tuple[torch.Tensor, ...]], tuple[torch.Tensor, ...]]]:
    """``(evaluate, direction, project)`` of :func:`damped_newton` for ``z = (a, λ)`` with the
    working sets ``cuts`` as equalities (λ free; no projection)."""
    evaluate = _evaluate(theta, valid, cols, cuts, reg)

    def direction(z: tuple[torch.Tensor, ...], x: torch.Tensor, V: torch.Tensor, err: torch.Tensor):
        ga = (1.0 - x.sum(1)) * cols
        gl = torch.where(cuts.used, cuts.b - cuts.inside(x), 0.0)
        W = torch.where(valid, reg.weight(V), 0.0)
        if not reg.vertices:
            da, dl = _solve_system(W, cuts, cols, -ga, -gl, _MU * err)
            return (da, dl), (ga, gl)
        da, dl = _solve_system(W, cuts, cols, -ga, -gl, _MU * err + _RIDGE)
        # the quadratic: a column or a set with no arc on the support has no curvature, and the
        # system leaves its multiplier where it is (its residual would stay, up to |S| − 1); it
        # steps instead to where its best arc carries its residual, V = max V + g there
        Vv = V.masked_fill(~valid, -math.inf)
        dead_a = (cols > 0) & (W.sum(1) == 0)
        da = torch.where(dead_a, Vv.amax(1) - ga, da)
        if cuts.S.shape[1]:
            dead_l = cuts.used & (cuts.inside(W) == 0)
            if bool(dead_l.any()):
                inside = (cuts.S[:, :, :, None] * cuts.S[:, :, None, :]) > 0  # (B, J, n, n): arcs within S_j
                best = torch.where(inside, Vv[:, None], -math.inf).amax((2, 3))
                dl = torch.where(dead_l, best - gl, dl)
        return (da, dl), (ga, gl)

    return evaluate, direction, lambda z: z


def _separate(x: torch.Tensor, S: torch.Tensor, tol: float) -> list[list[np.ndarray]]:
    """The violated sets of each row not already in its working set ``S (B, J, n)``: the parts of
    its minimum partition (:func:`min_partitions`, all rows at once) that hold more than a forest."""
    Y = (x + x.mT).cpu().numpy()
    n = Y.shape[1]
    Y[:, np.arange(n), np.arange(n)] = 0.0
    have = S.bool().cpu().numpy()
    if n >= _LOW_DEGREE_FIRST:  # the vertices permuted by weight, and the parts' labels back
        order = np.argsort(Y.sum(2), axis=1, kind="stable")
        rows = np.arange(Y.shape[0])[:, None]
        perm_labels, values = min_partitions(Y[rows[:, :, None], order[:, :, None], order[:, None, :]], tol)
        labels = np.empty_like(perm_labels)
        labels[rows, order] = perm_labels
    else:
        labels, values = min_partitions(Y, tol)
    found = []
    for i in range(Y.shape[0]):
        new = []
        if values[i] < -tol:
            for c in np.unique(labels[i]):
                mask = labels[i] == c
                size = int(mask.sum())
                if size >= 2 and 0.5 * Y[i][np.ix_(mask, mask)].sum() - (size - 1) > tol:
                    if not (have[i] == mask).all(1).any():
                        new.append(mask)
        found.append(new)
    return found


def _add(S: torch.Tensor, lam: torch.Tensor, rows: list[int], sets: list[list[np.ndarray]]):
    """``S`` and ``λ`` with the new sets put in free slots of their rows (at ``λ = 0``; more
    slots added where needed)."""
    B, J, n = S.shape
    free = [(S[r].sum(1) == 0).nonzero()[:, 0].tolist() for r in rows]
    extra = max((len(s) - len(f) for f, s in zip(free, sets)), default=0)
    if extra > 0:
        S = torch.cat([S, S.new_zeros(B, extra, n)], 1)
        lam = torch.cat([lam, lam.new_zeros(B, extra)], 1)
    for r, f, s in zip(rows, free, sets):
        slots = f + list(range(J, J + extra))
        for j, mask in zip(slots, s):
            S[r, j] = torch.as_tensor(mask, dtype=S.dtype, device=S.device)
            lam[r, j] = 0.0
    return S, lam


def solve_arborescences(theta: torch.Tensor, root: int, reg: Separable, tol: float, max_iter: int,
                        low: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int, float]:
    """``theta: (B, n, n)`` float64 (``theta[h, m]``: arc h → m) → ``(x, S, λ, bad, steps, tol)``:
    the relaxation, the working sets ``(B, J, n)`` with their multipliers ``(B, J)``, the rows
    whose KKT residual stayed above ``tol`` (floored at ``100 eps |θ|``, but at most
    _RESIDUAL_CAP; the floored value is returned last) or whose working set still changed after
    _MAX_ROUNDS, and the Newton steps taken."""
    B, n, _ = theta.shape
    dev, dt = theta.device, theta.dtype
    valid = ~torch.eye(n, dtype=torch.bool, device=dev)
    valid[:, root] = False
    cols = torch.ones(n, dtype=dt, device=dev)
    cols[root] = 0.0
    cols = cols.expand(B, n)
    eps = torch.finfo(dt).eps
    vlow = ~valid if low is None else low | ~valid
    spread, scale = spread_and_scale(theta, vlow.expand(B, n, n))
    target = tol
    # the arithmetic's resolution, but a residual in x above _RESIDUAL_CAP is a failure whatever
    # the scale (at logits of 1e300 the floor would otherwise accept any x)
    tol = min(max(tol, 100 * eps * max(1.0, scale)), max(tol, _RESIDUAL_CAP))
    th = theta.masked_fill(~valid, 0.0)
    lam_scale = 1.0 if not spread > _SPAN else _SPAN / spread
    a = torch.where(cols > 0, reg.init((th * lam_scale).masked_fill(~valid, -math.inf).mT), 0.0)
    S = th.new_zeros(B, 0, n)
    lam = th.new_zeros(B, 0)
    total = 0
    err = th.new_zeros(B)
    x = th.new_zeros(B, n, n)
    while True:
        final = lam_scale >= 1.0
        stage = th if final else th * lam_scale
        stol = tol if final else _STAGE_TOL
        iters = max_iter if final else min(max_iter, _STAGE_ITER)
        rows = torch.arange(B, device=dev)
        pending = torch.zeros(B, dtype=torch.bool, device=dev)
        for _ in range(_MAX_ROUNDS):
            cuts = _Cuts(S[rows])
            evaluate, direction, keep = _newton(stage[rows], valid, cols[rows], cuts, reg)
            z0 = (a[rows], lam[rows])  # where this round starts (λ ≥ 0 unless a row's Newton stopped short)
            z, xr, _, er, steps = damped_newton(z0, evaluate, direction, keep, stol, iters)
            if final:
                polish = ((er > target) & (er <= tol)).nonzero()[:, 0]
                if polish.numel():
                    cp = cuts.rows(polish)
                    evaluate, direction, keep = _newton(stage[rows][polish], valid, cols[rows][polish], cp, reg)
                    zp, xp, _, ep, sp = damped_newton(tuple(zi[polish] for zi in z), evaluate, direction, keep, target,
                                                      _POLISH_STEPS)
                    z = tuple(zi.index_put((polish,), zpi) for zi, zpi in zip(z, zp))
                    xr, er = xr.index_put((polish,), xp), er.index_put((polish,), ep)
                    steps += sp
            total += steps
            a, lam = a.index_put((rows,), z[0]), lam.index_put((rows,), z[1])
            x, err = x.index_put((rows,), xr), err.index_put((rows,), er)
            ok = er <= stol
            # a row whose multipliers came out negative steps back from z0 towards z only as far as
            # its multipliers stay ≥ 0 (D is convex and D(z) ≤ D(z0), so D does not increase), and
            # the one set that reaches 0 first leaves the working set (at a tie, the most negative
            # at z): D then decreases from round to round, so no working set repeats. (Dropping
            # every negative set at once cycled: arborescences n = 30 to 40, entropies at t ≤ 0.1,
            # about 1 row in 64 repeated a 12-round cycle. Dropping the most negative one a round,
            # keeping z, was slow and could cycle: ListOps arc scores at t = 1, n = 16 to 30, 25 rows
            # of the 6·10⁵ of one training run went past 100 rounds to the torch solver (0.1 to 17 s
            # a row; 8 re-run without the cap needed 102 to 142), and a noisy copy of one repeated
            # 3 sets ~250 times each over 3 000 rounds.)
            lr, lp = lam[rows], z0[1].clamp(min=0.0)
            neg = (lr < 0) & ok[:, None] & (S[rows].sum(2) > 0)
            dropped = neg.any(1)
            if bool(dropped.any()):
                ratio = torch.where(neg, lp / (lp - lr), math.inf)  # where λ_j reaches 0, in [0, 1)
                alpha = ratio.amin(1, keepdim=True)
                first = neg & (ratio == alpha)
                first = first & (lr == torch.where(first, lr, math.inf).amin(1, keepdim=True))
                first = first & (first.cumsum(1) == 1)  # one set a row
                alpha = torch.where(dropped, alpha[:, 0], 1.0)
                shape = lambda w: (-1,) + (1,) * (w.dim() - 1)  # noqa: E731
                step = tuple(torch.where(dropped.reshape(shape(w)), w0 + alpha.reshape(shape(w)) * (w - w0), w)
                             for w0, w in zip(z0, z))  # rows that drop nothing keep Newton's z exactly
                Sr = S[rows]
                S = S.index_put((rows,), Sr.masked_fill(first[:, :, None], 0.0))
                a = a.index_put((rows,), step[0])
                lam = lam.index_put((rows,), step[1].masked_fill(first, 0.0))
            # violated by more than n × the tolerance (the rounding of x over a set's arcs)
            sets = _separate(xr[ok & ~dropped], S[rows][ok & ~dropped], max(stol, 1e-12) * n)
            idx = rows[ok & ~dropped].tolist()
            more = [(r, s) for r, s in zip(idx, sets) if s]
            if more:
                S, lam = _add(S, lam, [r for r, _ in more], [s for _, s in more])
            again = sorted(set(rows[dropped].tolist()) | {r for r, _ in more})
            pending[:] = False
            if not again:
                break
            rows = torch.tensor(again, device=dev, dtype=torch.long)
            pending[rows] = True
        if final:  # rows still changing their working set after _MAX_ROUNDS are not solved
            return x, S, lam, ~(err <= tol) | pending, total, tol
        new = min(1.0, _GROWTH * lam_scale)
        a, lam, lam_scale = a * (new / lam_scale), lam * (new / lam_scale), new


def arborescence_vjp(G: torch.Tensor, x: torch.Tensor, S: torch.Tensor, reg: str, root: int,
                     support_tol: float = 0.0) -> torch.Tensor:
    """``J G`` for the relaxation ``x`` with active sets ``S (B, J, n)`` (zero rows: none):
    ``√W ⊙ Π(√W ⊙ G)`` with Π the orthogonal projector onto the null space of ``A diag(√W)``
    (A: the rows of the in-degrees and the sets), through the pseudo-inverse of
    ``M = diag(√W) Aᵀ`` (an SVD of M, not a solve with ``A diag(W) Aᵀ``: at low temperature the
    weights are 1 on a tree and ~1e-10 elsewhere, and a set's row is then nearly the sum of
    in-degree rows; the normal equations square that conditioning, and their solve left
    columns of J G off zero sum by 9e-8). The quadratic's support is ``x > SUPPORT_FACTOR ·
    support_tol`` (the solve's tolerance: an arc at 2e-16, rounding, counted as free made the
    gradient of a row off by 30 at t = 0.1). In chunks of rows of at most _VJP_BYTES."""
    B, n, _ = x.shape
    per_row = n * n * (n + S.shape[1]) * x.element_size()
    step = max(1, _VJP_BYTES // per_row)
    if B > step:  # in chunks of rows: M holds B·n²·(n − 1 + J) numbers
        return torch.cat([arborescence_vjp(G[i:i + step], x[i:i + step], S[i:i + step], reg, root, support_tol)
                          for i in range(0, B, step)])
    W = SEPARABLE[reg].weight_of_x(x) if reg != "quadratic" else (x > SUPPORT_FACTOR * support_tol).to(x.dtype)
    valid = ~torch.eye(n, dtype=torch.bool, device=x.device)
    valid[:, root] = False
    sw = torch.where(valid & (W > _WEIGHT_FLOOR) & torch.isfinite(W), W, 0.0).sqrt()
    keep = torch.ones(n, dtype=torch.bool, device=x.device)
    keep[root] = False
    eye = torch.eye(n, dtype=x.dtype, device=x.device)[keep]  # in-degree rows: column m of the arcs
    rows_a = eye[None, :, None, :].expand(B, -1, n, -1)  # [b, m', h, m] = [m == m']
    rows_s = S[:, :, :, None] * S[:, :, None, :]  # [b, j, h, m] = [h, m ∈ S_j]
    M = (torch.cat([rows_a, rows_s], 1) * sw[:, None]).flatten(2).mT  # (B, n², n − 1 + J)
    y = (sw * G).flatten(1)[..., None]
    proj = M @ (torch.linalg.pinv(M, rtol=_PINV_RTOL) @ y)
    return sw * (y - proj)[..., 0].reshape(B, n, n)


class ArborescenceRelaxation(torch.autograd.Function):
    """x of :func:`solve_arborescences` for ``theta: (B, n, n)`` with the exact Jacobian; rows
    with ``at_vertex`` return ``vertex`` (the best tree, to rounding); ``holder`` receives the
    unconverged rows' mask."""

    @staticmethod
    def forward(ctx: Any, theta: torch.Tensor, root: int, reg: str, tol: float, max_iter: int,
                holder: list[torch.Tensor], low: torch.Tensor | None, vertex: torch.Tensor,
                at_vertex: torch.Tensor) -> torch.Tensor:
        th = theta.detach().double()
        x = vertex.double().clone()
        bad = torch.zeros_like(at_vertex)
        S = th.new_zeros(th.shape[0], 0, th.shape[1])
        rows = (~at_vertex).nonzero()[:, 0]
        ctx.support_tol = 0.0
        if rows.numel():
            xr, Sr, _, badr, _, ctx.support_tol = solve_arborescences(th[rows], root, SEPARABLE[reg], tol, max_iter,
                                                                        None if low is None else low[rows])
            S = th.new_zeros(th.shape[0], Sr.shape[1], th.shape[1])
            x[rows], S[rows], bad[rows] = xr, Sr, badr
        holder.append(bad)
        out = x.to(theta.dtype)
        ctx.reg, ctx.root = reg, root
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(out, S, at_vertex)
        return out

    @staticmethod
    def backward(ctx: Any, G: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        with autocast_off(G.device):
            x, S, at_vertex = ctx.saved_tensors
            out = torch.zeros_like(G)  # rows at a tree: a zero Jacobian
            rows = (~at_vertex).nonzero()[:, 0]
            if rows.numel():
                vjp = arborescence_vjp(G[rows].double(), x[rows].double(), S[rows], ctx.reg, ctx.root, ctx.support_tol)
                out = out.index_put((rows,), vjp.to(G.dtype))
        return out, None, None, None, None, None, None, None, None
