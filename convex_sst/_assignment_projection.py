"""The quadratic on Birkhoff polytopes and matchings: semismooth Newton on the dual.

For ``θ: (B, n, m)``, ``n ≤ m``, the relaxation is the Euclidean projection

    X = argmin ½‖X − θ‖²   s.t.   X ≥ 0,   X1 = 1 (rows),   Xᵀ1 = 1 (m = n) or ≤ 1 (m > n).

Its dual is a convex, piecewise quadratic function of the row and column multipliers
``(a, b) ∈ Rⁿ × Rᵐ`` (``b ≥ 0`` when the columns are capped)::

    D(a, b) = ½ Σ_ij [θ_ij − a_i − b_j]₊² + Σ a + Σ b,      X = [θ − a1ᵀ − 1bᵀ]₊,

with gradient ``(1 − X1, 1 − Xᵀ1)`` and generalized Hessian ``[[diag r, M], [Mᵀ, diag c]]``
(``M`` the support of X, ``r``, ``c`` its row and column counts). :func:`project_assignments`
minimizes D by Newton steps regularized by ``μ = 0.1 × residual`` (the Hessian is singular
along ``(1, −1)`` on every balanced block of the support), solved through the Schur complement
on the columns (one ``m × m`` Cholesky factorization per step), with an Armijo line search and,
for capped columns, a projection on ``b ≥ 0`` (projected Newton: a column at ``b = 0`` with room
left stays there). Once the support is right a step is exact, so the convergence is quadratic
and ends at the arithmetic's resolution: the rows and columns sum to 1 (or less, capped) within
``tol``.

The Jacobian of X is the projector onto ``{Z : Z = 0 off the support S, Z1 = 0, Z_T ᵀ1 = 0}``
(``T``: the columns at capacity, all of them for Birkhoff): ``dX = dθ_S − (Aᵀ w)`` with
``A Aᵀ w = A dθ_S``, ``A`` the row and tight-column sums on S. ``A Aᵀ`` is singular along one
vector per connected block of the support whose rows put no mass on free columns; those blocks
are found by label propagation, and ``1 1ᵀ`` on their columns makes the column Schur complement
positive definite without changing ``Aᵀ w``. The backward pass is linear in the incoming
gradient with constant factors, so second derivatives work (and are 0: X is piecewise affine).

Everything runs in torch on the input's device, in float64.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from ._autograd import autocast_off

_ARMIJO = 1e-4
_HALVINGS = 40
# continuation: logits spanning more than _SPAN are solved first at λθ, λ = _SPAN / span, then
# _GROWTH times more per stage, each stage to _STAGE_TOL in at most _STAGE_ITER steps; the Newton
# system is regularized by _MU times the residual. Chosen on Birkhoff n = 10 and 30, B = 128,
# t = 0.01 to 1, among _MU in {1e-3 .. 1}, _GROWTH in {4, 16}, _SPAN in {20, 50, 200}: 25 % less
# time than (0.01, 4, 50), fewer line-search halvings; the spread between choices was within 40 %
_SPAN, _STAGE_TOL, _STAGE_ITER = 50.0, 1e-6, 30
_MU, _GROWTH = 0.1, 16.0


def _row_sparsemax_threshold(theta: torch.Tensor) -> torch.Tensor:
    """``τ: (B, n)`` with ``Σ_j [θ_ij − τ_i]₊ = 1`` (each row projected onto the simplex)."""
    z, _ = theta.sort(dim=-1, descending=True)
    cs = z.cumsum(-1) - 1.0
    k = torch.arange(1, theta.shape[-1] + 1, dtype=theta.dtype, device=theta.device)
    support = (z - cs / k > 0).sum(-1, keepdim=True).clamp_min(1)  # the condition holds on a prefix
    return (cs.gather(-1, support - 1) / support.to(theta.dtype))[..., 0]


def _dual(theta: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(D(a, b), X, rounding scale of D)`` per sample."""
    X = (theta - a[:, :, None] - b[:, None, :]).clamp_min(0.0)
    half = 0.5 * (X * X).sum((1, 2))
    return half + a.sum(1) + b.sum(1), X, half + a.abs().sum(1) + b.abs().sum(1)


def _residual(X: torch.Tensor, b: torch.Tensor, at_most: bool) -> torch.Tensor:
    """The KKT residual per sample: row sums off 1, column sums off 1 (or over 1, or below 1 with
    a positive multiplier, for capped columns)."""
    rows = (X.sum(2) - 1.0).abs().amax(1)
    c = X.sum(1)
    cols = (c - 1.0).abs() if not at_most else torch.maximum(c - 1.0, torch.minimum(b, 1.0 - c))
    return torch.maximum(rows, cols.amax(1))


def _chol_solve(A: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    L, _ = torch.linalg.cholesky_ex(A)
    return torch.cholesky_solve(rhs[..., None], L)[..., 0]


def project_assignments(theta: torch.Tensor, at_most: bool, tol: float, max_iter: int,
                        low: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Newton's method on the dual (module docstring) for ``theta: (B, n, m)`` in float64.

    When the logits span more than ``_SPAN`` (``low``: entries left out of the span, such as
    stand-ins for forbidden ones), the duals are warm-started from the solutions at ``λθ`` for
    ``λ = _SPAN / span, 16λ, 256λ, ...`` (continuation: at low temperature a cold start crosses
    many pieces of D one Newton step at a time; Birkhoff n = 100 at t = 1e-3 took 127 steps).

    Returns ``(X, b, residual, bad, steps)``: the projection, the column multipliers, the final
    KKT residual per sample, the samples whose residual stayed above ``tol`` (floored at the
    arithmetic's resolution ``100 eps max(1, |θ|)``), and the number of Newton steps taken."""
    B, n, m = theta.shape
    eps = torch.finfo(theta.dtype).eps
    kept = theta if low is None else theta.masked_fill(low, math.nan)
    top = kept.nan_to_num(-math.inf).amax((1, 2)) if B else theta.new_zeros(0)
    bottom = kept.nan_to_num(math.inf).amin((1, 2)) if B else theta.new_zeros(0)
    span = float((top - bottom).max()) if B else 0.0
    scale = float(torch.maximum(top.abs(), bottom.abs()).max()) if B else 0.0
    tol = max(tol, 100 * eps * max(1.0, scale))
    lam = 1.0 if not span > _SPAN else _SPAN / span
    a = _row_sparsemax_threshold(theta * lam)
    b = torch.zeros(B, m, dtype=theta.dtype, device=theta.device)
    total = 0
    while True:
        final = lam >= 1.0
        th = theta if final else theta * lam
        a, b, X, err, steps = _newton(th, a, b, at_most, tol if final else _STAGE_TOL, max_iter if final else
                                      min(max_iter, _STAGE_ITER))
        total += steps
        if final:
            return X, b, err, ~(err <= tol), total
        new = min(1.0, _GROWTH * lam)
        a, b, lam = a * (new / lam), b * (new / lam), new


def _newton(theta: torch.Tensor, a: torch.Tensor, b: torch.Tensor, at_most: bool, tol: float, max_iter: int
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Damped, regularized Newton steps from ``(a, b)`` until the residual is within ``tol``:
    ``(a, b, X, residual, steps)``."""
    B, n, m = theta.shape
    eps = torch.finfo(theta.dtype).eps
    eye = torch.eye(m, dtype=theta.dtype, device=theta.device)
    D, X, Dscale = _dual(theta, a, b)
    err = _residual(X, b, at_most)
    active = err > tol
    steps = 0
    while steps < max_iter and bool(active.any()):
        steps += 1
        ga = 1.0 - X.sum(2)
        gb = 1.0 - X.sum(1)
        S = (X > 0).to(theta.dtype)
        free = torch.ones_like(b, dtype=torch.bool) if not at_most else (b > 0) | (gb < 0)
        M = S * free[:, None, :]
        mu = _MU * err
        ra = S.sum(2) + mu[:, None]
        schur = torch.diag_embed(S.sum(1) + mu[:, None]) - M.transpose(1, 2) @ (M / ra[:, :, None])
        schur = torch.where(free[:, :, None] & free[:, None, :], schur, eye)
        rhs = (-gb + (M.transpose(1, 2) @ (ga / ra)[..., None])[..., 0]) * free
        db = _chol_solve(schur, rhs)
        da = (-ga - (M @ db[..., None])[..., 0]) / ra
        step = torch.ones(B, 1, dtype=theta.dtype, device=theta.device)
        for _ in range(_HALVINGS):
            a1 = a + step * da
            b1 = b + step * db
            if at_most:
                b1 = b1.clamp_min(0.0)
            D1, X1, _ = _dual(theta, a1, b1)
            err1 = _residual(X1, b1, at_most)
            decrease = (ga * (a1 - a)).sum(1) + (gb * (b1 - b)).sum(1)
            # Armijo, or, where D's change is below its rounding, a smaller residual
            ok = (D1 <= D + _ARMIJO * decrease) | ((err1 < err) & (D1 <= D + 1e3 * eps * Dscale))
            if bool((ok | ~active).all()):
                break
            step = torch.where(ok[:, None], step, step / 2)
        keep = ok & active
        a = torch.where(keep[:, None], a1, a)
        b = torch.where(keep[:, None], b1, b)
        X = torch.where(keep[:, None, None], X1, X)
        D = torch.where(keep, D1, D)
        err = torch.where(keep, err1, err)
        Dscale = torch.where(keep, 0.5 * (X * X).sum((1, 2)) + a.abs().sum(1) + b.abs().sum(1), Dscale)
        active = keep & (err > tol)  # no step accepted: at the arithmetic's resolution, stop
    return a, b, X, err, steps


def _null_blocks(S: torch.Tensor, T: torch.Tensor) -> torch.Tensor:
    """``(B, m, m)`` boolean: tight columns ``j, j'`` in the same block of the support whose rows
    put no mass on a free column (where ``A Aᵀ`` is singular along rows 1, columns −1)."""
    B, n, m = S.shape
    big = n + m
    ST = S & T[:, None, :]
    rows = torch.arange(n, device=S.device).expand(B, n)
    cols = torch.where(T, torch.arange(n, n + m, device=S.device), big)
    while True:  # label propagation: each vertex ends with the smallest label of its block
        cols_new = torch.minimum(cols, torch.where(ST, rows[:, :, None], big).amin(1))
        rows_new = torch.minimum(rows, torch.where(ST, cols_new[:, None, :], big).amin(2))
        if torch.equal(rows_new, rows) and torch.equal(cols_new, cols):
            break
        rows, cols = rows_new, cols_new
    slack_rows = (S & ~T[:, None, :]).any(2)
    slack = torch.zeros(B, big + 1, dtype=torch.int64, device=S.device)
    slack.scatter_add_(1, rows, slack_rows.to(torch.int64))
    singular = T & (slack.gather(1, cols) == 0)
    return singular[:, :, None] & singular[:, None, :] & (cols[:, :, None] == cols[:, None, :])


def jacobian_factors(X: torch.Tensor, b: torch.Tensor, at_most: bool) -> tuple[torch.Tensor, ...]:
    """``(S, T, r, L)`` for :func:`assignment_vjp`: the support, the tight columns, the row
    counts and the Cholesky factor of the column Schur complement of ``A Aᵀ`` (made definite
    on its null blocks)."""
    Sb = X > 0
    S = Sb.to(X.dtype)
    T = b > 0 if at_most else torch.ones_like(b, dtype=torch.bool)
    M = S * T[:, None, :]
    r = S.sum(2).clamp_min(1.0)
    schur = torch.diag_embed(M.sum(1)) - M.transpose(1, 2) @ (M / r[:, :, None])
    schur = schur + _null_blocks(Sb, T).to(X.dtype)
    eye = torch.eye(X.shape[2], dtype=X.dtype, device=X.device)
    schur = torch.where(T[:, :, None] & T[:, None, :], schur, eye)
    L, _ = torch.linalg.cholesky_ex(schur)
    return S, T.to(X.dtype), r, L


def assignment_vjp(G: torch.Tensor, S: torch.Tensor, T: torch.Tensor, r: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    """``J G`` (J symmetric) for ``G: (B, n, m)``: ``S ⊙ (G − wa 1ᵀ − 1 wbᵀ)``, ``A Aᵀ w = A (S ⊙ G)``."""
    v = G * S
    pa = v.sum(2)
    M = S * T[:, None, :]
    rhs = v.sum(1) * T - (M.transpose(1, 2) @ (pa / r)[..., None])[..., 0]
    wb = torch.cholesky_solve(rhs[..., None], L)[..., 0] * T
    wa = (pa - (M @ wb[..., None])[..., 0]) / r
    return S * (G - wa[:, :, None] - wb[:, None, :])


class AssignmentProjection(torch.autograd.Function):
    """``X(θ)`` of :func:`project_assignments` with the exact Jacobian. ``vertex: (B, n, m)`` and
    ``at_vertex: (B,)``: rows known to project onto a vertex (X = vertex, Jacobian 0) are not
    solved; ``low``: entries left out of the continuation's span; ``holder`` receives the
    unconverged samples' mask."""

    @staticmethod
    def forward(ctx: Any, theta: torch.Tensor, at_most: bool, tol: float, max_iter: int, holder: list[torch.Tensor],
                low: torch.Tensor | None, vertex: torch.Tensor, at_vertex: torch.Tensor) -> torch.Tensor:
        th = theta.detach().double()
        X = vertex.double().clone()
        b = torch.zeros_like(X[:, 0])
        bad = torch.zeros_like(at_vertex)
        rows = (~at_vertex).nonzero()[:, 0]
        if rows.numel():
            Xr, br, _, badr, _ = project_assignments(th[rows], at_most, tol, max_iter,
                                                     None if low is None else low[rows])
            X[rows], b[rows], bad[rows] = Xr, br, badr
        holder.append(bad)
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(*jacobian_factors(X, b, at_most))
        return X.to(theta.dtype)

    @staticmethod
    def backward(ctx: Any, G: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        S, T, r, L = ctx.saved_tensors
        with autocast_off(G.device):  # backward runs under the caller's autocast state
            out = assignment_vjp(G.double(), S, T, r, L).to(G.dtype)
        return out, None, None, None, None, None, None, None


def at_a_vertex(theta: torch.Tensor, argmax: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(v, at_vertex)`` for ``theta: (B, d)`` on any polytope with 0/1 vertices: ``v`` the
    argmax, and whether the projection of θ is ``v`` itself, i.e. ``v`` also maximizes
    ``(θ − v)ᵀw`` (θ − v in the normal cone at v). Two argmax calls; exact at any scale of θ
    (where ``x = θ − a − b`` would keep no digits)."""
    v = argmax(theta).to(theta.dtype)
    w = argmax(theta - v).to(theta.dtype)
    return v, ((theta - v) * v).sum(1) >= ((theta - v) * w).sum(1)
