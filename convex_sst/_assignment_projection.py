"""Separable regularizers on Birkhoff polytopes and matchings: Newton's method on the dual.

For ``θ: (B, n, m)``, ``n ≤ m``, and the quadratic, the relaxation is the Euclidean projection

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
``tol``. Any separable f works the same way with its conjugate in place of ``½[v]₊²``
(:data:`SEPARABLE`): the binary entropy gives ``X = σ(θ − a1ᵀ − 1bᵀ)``, a smooth dual with
Hessian weights ``X(1 − X)`` in place of the support. (The entropy is Sinkhorn's, in fast.py.)

The Jacobian of X is the projector onto ``{Z : Z = 0 off the support S, Z1 = 0, Z_T ᵀ1 = 0}``
(``T``: the columns at capacity, all of them for Birkhoff): ``dX = dθ_S − (Aᵀ w)`` with
``A Aᵀ w = A dθ_S``, ``A`` the row and tight-column sums on S; with weights ``W``,
``dX = W ⊙ (dθ − Aᵀw)``, ``A diag(W) Aᵀ w = A (W ⊙ dθ)``. That system is singular along one
vector per connected block of the weights whose rows put no weight on free columns; those
blocks are found by label propagation, and ``1 1ᵀ`` on their columns makes the column Schur
complement positive definite without changing ``Aᵀ w``. For the quadratic the backward pass is
linear in the incoming gradient with constant factors (second derivatives are 0: X is
piecewise affine); for the binary entropy it is computed from the output X, so second
derivatives flow through X.

Everything runs in torch on the input's device, in float64.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

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
# steps past the floor 100 eps |θ| towards the tolerance itself (continuation's polish)
_POLISH_STEPS = 5
# Hessian weights below this are dropped from the Jacobian (binary entropy at saturated entries,
# x(1 − x) < 1e-12): kept, blocks joined only through them made the Schur complement singular to
# rounding (NaN gradients on matchings 6 × 9 at t = 1e-3); dropped, the Jacobian moves by about
# that much
_WEIGHT_FLOOR = 1e-12


def _softplus(v: torch.Tensor) -> torch.Tensor:
    """``log(1 + e^v)`` to full precision everywhere (torch's is linear beyond 20: 2e-9 off)."""
    return v.clamp_min(0.0) + torch.log1p(torch.exp(-v.abs()))


class Separable(NamedTuple):
    """A regularizer ``f`` for the dual: ``D = Σ conj(θ − a − b) + Σa + Σb`` with ``conj = f*``,
    ``X = conj'(V)`` and the Hessian weights ``conj''(V)``; ``init(θ)``: row multipliers that
    start the iteration; ``vertices``: whether X can be a structure (the quadratic);
    ``weight_of_x``: the weights as a function of X (the backward pass of the smooth ones)."""

    conj: Callable[[torch.Tensor], torch.Tensor]
    x: Callable[[torch.Tensor], torch.Tensor]
    weight: Callable[[torch.Tensor], torch.Tensor]
    weight_of_x: Callable[[torch.Tensor], torch.Tensor]
    init: Callable[[torch.Tensor], torch.Tensor]
    vertices: bool


def _exp1(v: torch.Tensor) -> torch.Tensor:
    return torch.exp(v - 1.0)


def _row_sparsemax_threshold(theta: torch.Tensor) -> torch.Tensor:
    """``τ: (B, n)`` with ``Σ_j [θ_ij − τ_i]₊ = 1`` (each row projected onto the simplex)."""
    z, _ = theta.sort(dim=-1, descending=True)
    cs = z.cumsum(-1) - 1.0
    k = torch.arange(1, theta.shape[-1] + 1, dtype=theta.dtype, device=theta.device)
    support = (z - cs / k > 0).sum(-1, keepdim=True).clamp_min(1)  # the condition holds on a prefix
    return (cs.gather(-1, support - 1) / support.to(theta.dtype))[..., 0]


SEPARABLE = {
    # ½‖x‖²: f*(v) = ½[v]₊², x = [v]₊, weights 1 on the support
    "quadratic": Separable(lambda v: 0.5 * v.clamp_min(0.0) ** 2, lambda v: v.clamp_min(0.0),
                           lambda v: (v > 0).to(v.dtype), lambda x: (x > 0).to(x.dtype), _row_sparsemax_threshold,
                           True),
    # Σ x log x + (1 − x) log(1 − x): f*(v) = log(1 + e^v), x = σ(v), weights σ(v) σ(−v)
    "binary_entropy": Separable(_softplus, torch.sigmoid, lambda v: torch.sigmoid(v) * torch.sigmoid(-v),
                                lambda x: x * (1.0 - x), lambda th: torch.logsumexp(th, dim=-1), False),
    # Σ x log x: f*(v) = x = weights = e^(v − 1) (DAG paths; Birkhoff's and matchings' is Sinkhorn)
    "entropy": Separable(_exp1, _exp1, _exp1, lambda x: x, lambda th: torch.logsumexp(th, dim=-1) - 1.0, False),
}


def _dual(theta: torch.Tensor, a: torch.Tensor, b: torch.Tensor, reg: Separable
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(D(a, b), X, V = θ − a − b, rounding scale of D)`` per sample."""
    V = theta - a[:, :, None] - b[:, None, :]
    conj = reg.conj(V).sum((1, 2))
    return conj + a.sum(1) + b.sum(1), reg.x(V), V, conj.abs() + a.abs().sum(1) + b.abs().sum(1)


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
                        low: torch.Tensor | None = None, reg: Separable = SEPARABLE["quadratic"]
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Newton's method on the dual (module docstring) for ``theta: (B, n, m)`` in float64.

    When the logits span more than ``_SPAN`` (``low``: entries left out of the span, such as
    stand-ins for forbidden ones), the duals are warm-started from the solutions at ``λθ`` for
    ``λ = _SPAN / span, 16λ, 256λ, ...`` (continuation: at low temperature a cold start crosses
    many pieces of D one Newton step at a time; Birkhoff n = 100 at t = 1e-3 took 127 steps).

    Returns ``(X, W, b, residual, bad, steps)``: the relaxation, the Hessian weights at the
    solution, the column multipliers, the final KKT residual per sample, the samples whose
    residual stayed above ``tol`` (floored at the arithmetic's resolution ``100 eps max(1,
    |θ|)``), and the number of Newton steps taken."""
    B, n, m = theta.shape

    def start(th: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return reg.init(th), th.new_zeros(B, m)

    def solve(th: torch.Tensor, z: tuple[torch.Tensor, ...], tol: float, max_iter: int):
        return damped_newton(z, *_assignment_newton(th, at_most, reg), tol, max_iter)

    (a, b), X, V, err, bad, steps = continuation(theta, low, tol, max_iter, start, solve)
    return X, solution_weights(reg, X, V, resolution(theta, low, tol)), b, err, bad, steps


def row_extremes(theta: torch.Tensor, low: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(max θ, min θ)`` of each sample of ``theta (B, ...)``, the entries ``low`` left out (none
    in a sample that has no other: its extremes stay finite, and so do the continuation's span
    and tolerance)."""
    if low is not None:
        low = low.flatten(1) & ~low.flatten(1).all(1, keepdim=True)
    kept = (theta.flatten(1) if low is None else theta.flatten(1).masked_fill(low, math.nan))
    return kept.nan_to_num(-math.inf).amax(1), kept.nan_to_num(math.inf).amin(1)


def spread_and_scale(theta: torch.Tensor, low: torch.Tensor | None) -> tuple[float, float]:
    """The largest span ``max θ − min θ`` and magnitude ``max |θ|`` over the samples of
    ``theta (B, ...)``, the entries ``low`` left out."""
    if theta.shape[0] == 0:
        return 0.0, 0.0
    top, bottom = row_extremes(theta, low)
    return float((top - bottom).max()), float(torch.maximum(top.abs(), bottom.abs()).max())


def resolution(theta: torch.Tensor, low: torch.Tensor | None, tol: float) -> float:
    """``tol`` floored at the arithmetic's resolution ``100 eps max(1, |θ|)`` (``low`` entries
    left out of |θ|): the residual the Newton paths accept."""
    return max(tol, 100 * torch.finfo(theta.dtype).eps * max(1.0, spread_and_scale(theta, low)[1]))


# the quadratic's support for its Jacobian: X above this times the solve's tolerance (entries
# that are 0 at the solution were left at 2e-16 by rounding, and at 1.1-1.3e-12 by a solve to
# 1e-12; counted as free, they changed the face, and gradients were off by O(1/t))
SUPPORT_FACTOR = 1e3


def solution_weights(reg: Separable, X: torch.Tensor, V: torch.Tensor, tol: float) -> torch.Tensor:
    """The Hessian weights at a solution for its Jacobian: ``reg.weight(V)``, but the quadratic's
    support is ``X > SUPPORT_FACTOR · tol`` (``tol``: the solve's tolerance), not ``X > 0`` (Birkhoff
    n = 5 and matchings with many tied logits; arborescences)."""
    return reg.weight(V) if not reg.vertices else (X > SUPPORT_FACTOR * tol).to(X.dtype)


def continuation(theta: torch.Tensor, low: torch.Tensor | None, tol: float, max_iter: int,
                 start: Callable[[torch.Tensor], tuple[torch.Tensor, ...]], solve: Callable[..., Any],
                 span: float = _SPAN, polish: bool = False
                 ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """``solve(λθ, z, tol, max_iter) → (z, X, V, residual, steps)`` for ``λ = span / (the span of
    θ)``, ``_GROWTH`` times more per stage up to 1 (one stage when the span of θ, ``low``
    entries left out, is at most ``span``; always with ``span = inf``), each stage warm-started
    from the last one's multipliers scaled along (``start(λθ)`` for the first), the stages to
    ``_STAGE_TOL`` in at most ``_STAGE_ITER`` steps. ``tol`` is floored at the arithmetic's
    resolution ``100 eps max(1, |θ|)``; with ``polish``, up to ``_POLISH_STEPS`` more steps go
    on to ``tol`` itself where the arithmetic allows (the floor still decides the rows reported
    unconverged). Returns ``(z, X, V, residual, bad, steps)``."""
    spread, _ = spread_and_scale(theta, low)
    target = tol
    tol = resolution(theta, low, tol)
    lam = 1.0 if not spread > span else span / spread
    z = start(theta * lam)
    total = 0
    while True:
        final = lam >= 1.0
        z, X, V, err, steps = solve(theta if final else theta * lam, z, tol if final else _STAGE_TOL,
                                    max_iter if final else min(max_iter, _STAGE_ITER))
        total += steps
        rows = ((err > target) & (err <= tol)).nonzero()[:, 0] if final and polish else None
        if rows is not None and rows.numel():  # the converged rows, past the floor
            zr, Xr, Vr, er, steps = solve(theta[rows], tuple(zi[rows] for zi in z), target, _POLISH_STEPS)
            z = tuple(zi.index_put((rows,), zri) for zi, zri in zip(z, zr))
            X, V, err = X.index_put((rows,), Xr), V.index_put((rows,), Vr), err.index_put((rows,), er)
            total += steps
        if final:
            return z, X, V, err, ~(err <= tol), total
        new = min(1.0, _GROWTH * lam)
        z, lam = tuple(zi * (new / lam) for zi in z), new


Evaluate = Callable[[tuple[torch.Tensor, ...]], tuple[torch.Tensor, ...]]
Direction = Callable[[tuple[torch.Tensor, ...], torch.Tensor, torch.Tensor, torch.Tensor],
                     tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]]


def damped_newton(z: tuple[torch.Tensor, ...], evaluate: Evaluate, direction: Direction,
                  project: Callable[[tuple[torch.Tensor, ...]], tuple[torch.Tensor, ...]], tol: float, max_iter: int
                  ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Minimize a dual D over multipliers ``z`` (a tuple of ``(B, ·)`` tensors) by damped Newton
    steps, per sample, until its KKT residual is within ``tol``; shared by the assignment and
    flow paths. ``evaluate(z) → (D, X, V, rounding scale of D, residual)``, ``direction(z, X, V,
    residual) → (step, ∇D)``, ``project(z)`` the feasible multipliers. Armijo line search by
    halving; where D's change is below its rounding, a smaller residual is accepted instead; a
    sample with no accepted step stops (the arithmetic's resolution). Returns ``(z, X, V,
    residual, steps)``."""
    D, X, V, Dscale, err = evaluate(z)
    eps = torch.finfo(D.dtype).eps
    B = D.shape[0]
    active = err > tol
    steps = 0

    def pick(keep: torch.Tensor, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
        return torch.where(keep.reshape((B,) + (1,) * (old.dim() - 1)), new, old)

    while steps < max_iter and bool(active.any()):
        steps += 1
        dz, grad = direction(z, X, V, err)
        step = torch.ones(B, 1, dtype=D.dtype, device=D.device)
        for _ in range(_HALVINGS):
            z1 = project(tuple(zi + step * di for zi, di in zip(z, dz)))
            D1, X1, V1, Ds1, err1 = evaluate(z1)
            decrease = sum((g * (new - old)).sum(1) for g, new, old in zip(grad, z1, z))
            ok = (D1 <= D + _ARMIJO * decrease) | ((err1 < err) & (D1 <= D + 1e3 * eps * Dscale))
            if bool((ok | ~active).all()):
                break
            step = torch.where(ok[:, None], step, step / 2)
        keep = ok & active
        z = tuple(pick(keep, new, old) for new, old in zip(z1, z))
        X, V, D, Dscale, err = (pick(keep, new, old) for new, old in ((X1, X), (V1, V), (D1, D), (Ds1, Dscale),
                                                                       (err1, err)))
        active = keep & (err > tol)
    return z, X, V, err, steps


def _assignment_newton(theta: torch.Tensor, at_most: bool, reg: Separable) -> tuple[Evaluate, Direction, Any]:
    """``(evaluate, direction, project)`` of :func:`damped_newton` for the row and column
    multipliers ``z = (a, b)`` at ``theta``; the step through the Schur complement on the
    columns, regularized by ``_MU`` times the residual."""
    m = theta.shape[2]
    eye = torch.eye(m, dtype=theta.dtype, device=theta.device)

    def evaluate(z: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        D, X, V, Dscale = _dual(theta, z[0], z[1], reg)
        return D, X, V, Dscale, _residual(X, z[1], at_most)

    def direction(z: tuple[torch.Tensor, ...], X: torch.Tensor, V: torch.Tensor, err: torch.Tensor):
        ga = 1.0 - X.sum(2)
        gb = 1.0 - X.sum(1)
        W = reg.weight(V)
        free = torch.ones_like(gb, dtype=torch.bool) if not at_most else (z[1] > 0) | (gb < 0)
        M = W * free[:, None, :]
        mu = _MU * err
        ra = W.sum(2) + mu[:, None]
        schur = torch.diag_embed(W.sum(1) + mu[:, None]) - M.transpose(1, 2) @ (M / ra[:, :, None])
        schur = torch.where(free[:, :, None] & free[:, None, :], schur, eye)
        rhs = (-gb + (M.transpose(1, 2) @ (ga / ra)[..., None])[..., 0]) * free
        db = _chol_solve(schur, rhs)
        da = (-ga - (M @ db[..., None])[..., 0]) / ra
        return (da, db), (ga, gb)

    def project(z: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        return (z[0], z[1].clamp_min(0.0)) if at_most else z  # capped columns: b ≥ 0

    return evaluate, direction, project


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


def jacobian_factors(W: torch.Tensor, T: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``(W, T, r, L)`` for :func:`assignment_vjp`, from the Hessian weights ``W`` at the
    solution (the support, for the quadratic) and the tight columns ``T`` (bool): the weights
    with those below ``_WEIGHT_FLOOR`` dropped, T as a float mask, the row sums of W and the
    Cholesky factor of the column Schur complement of ``A diag(W) Aᵀ`` (made definite on its
    null blocks). Differentiable in W (torch operations)."""
    W = torch.where((W > _WEIGHT_FLOOR) & torch.isfinite(W), W, 0.0)  # (rows a fallback replaced may be inf)
    M = W * T[:, None, :]
    r = W.sum(2).clamp_min(torch.finfo(W.dtype).tiny)  # a row without weights has a zero Jacobian
    schur = torch.diag_embed(M.sum(1)) - M.transpose(1, 2) @ (M / r[:, :, None])
    schur = schur + _null_blocks(W > 0, T).to(W.dtype)
    eye = torch.eye(W.shape[2], dtype=W.dtype, device=W.device)
    schur = torch.where(T[:, :, None] & T[:, None, :], schur, eye)
    L, _ = torch.linalg.cholesky_ex(schur)
    return W, T.to(W.dtype), r, L


def assignment_vjp(G: torch.Tensor, W: torch.Tensor, T: torch.Tensor, r: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    """``J G`` (J symmetric) for ``G: (B, n, m)``: ``W ⊙ (G − wa 1ᵀ − 1 wbᵀ)`` with
    ``A diag(W) Aᵀ w = A (W ⊙ G)`` (A: the row and tight-column sums)."""
    v = G * W
    pa = v.sum(2)
    M = W * T[:, None, :]
    rhs = v.sum(1) * T - (M.transpose(1, 2) @ (pa / r)[..., None])[..., 0]
    wb = torch.cholesky_solve(rhs[..., None], L)[..., 0] * T
    wa = (pa - (M @ wb[..., None])[..., 0]) / r
    return W * (G - wa[:, :, None] - wb[:, None, :])


class AssignmentProjection(torch.autograd.Function):
    """``X(θ)`` of :func:`project_assignments` with the exact Jacobian, for the regularizer
    ``SEPARABLE[reg]``. ``vertex: (B, n, m)`` and ``at_vertex: (B,)``: rows known to project
    onto a vertex (X = vertex, Jacobian 0; the quadratic) are not solved; ``low``: entries left
    out of the continuation's span; ``holder`` receives the unconverged samples' mask."""

    @staticmethod
    def forward(ctx: Any, theta: torch.Tensor, reg: str, at_most: bool, tol: float, max_iter: int,
                holder: list[torch.Tensor], low: torch.Tensor | None, vertex: torch.Tensor,
                at_vertex: torch.Tensor) -> torch.Tensor:
        th = theta.detach().double()
        X = vertex.double().clone()
        W = X.clone()  # a vertex's weights: its support (a zero Jacobian either way)
        b = torch.zeros_like(X[:, 0])
        bad = torch.zeros_like(at_vertex)
        rows = (~at_vertex).nonzero()[:, 0]
        if rows.numel():
            Xr, Wr, br, _, badr, _ = project_assignments(th[rows], at_most, tol, max_iter,
                                                         None if low is None else low[rows], SEPARABLE[reg])
            X[rows], W[rows], b[rows], bad[rows] = Xr, Wr, br, badr
        holder.append(bad)
        out = X.to(theta.dtype)
        ctx.smooth, ctx.reg = not SEPARABLE[reg].vertices, reg
        if ctx.needs_input_grad[0]:
            T = b > 0 if at_most else torch.ones_like(b, dtype=torch.bool)
            if at_most and not ctx.smooth and rows.numel():
                # the quadratic: a column at capacity with b = 0 is tight too. Its dual can be
                # degenerate (rows whose mass only such columns share: b is not unique, and the
                # column stays full under every small change of θ); left out of T, the
                # Jacobian let its sum move (matchings 4 × 6 with tied forced entries: gradients
                # off by 0.15 where Wolfe's algorithm and central differences agreed). (Not the
                # binary entropy: a column filled to 1 − 1e-300 by one entry near 1 has weights
                # near 0, and taken as tight it spoiled the solve: gradients off by 90 %.)
                full = X[rows].sum(1) >= 1.0 - SUPPORT_FACTOR * resolution(th[rows], None if low is None else low[rows], tol)
                T = T.index_put((rows,), T[rows] | full)
            if ctx.smooth:
                # J is a function of the output (w = X(1 − X)), so the backward computes it from
                # X: second derivatives by autograd through X, as for Sinkhorn
                ctx.save_for_backward(out, T)
            else:
                # x is piecewise affine: J is constant on a piece (second derivatives 0)
                ctx.save_for_backward(*jacobian_factors(W, T))
        return out

    @staticmethod
    def backward(ctx: Any, G: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        with autocast_off(G.device):  # backward runs under the caller's autocast state
            if ctx.smooth:
                X, T = ctx.saved_tensors
                Xd = X.double()
                W, Tf, r, L = jacobian_factors(SEPARABLE[ctx.reg].weight_of_x(Xd), T)
            else:
                W, Tf, r, L = ctx.saved_tensors
            out = assignment_vjp(G.double(), W, Tf, r, L).to(G.dtype)
        return out, None, None, None, None, None, None, None, None


def at_a_vertex(theta: torch.Tensor, argmax: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(v, at_vertex)`` for ``theta: (B, d)`` on any polytope with 0/1 vertices: ``v`` the
    argmax, and whether the projection of θ is ``v`` itself, i.e. ``v`` also maximizes
    ``(θ − v)ᵀw`` (θ − v in the normal cone at v). Two argmax calls; exact at any scale of θ
    (where ``x = θ − a − b`` would keep no digits)."""
    v = argmax(theta).to(theta.dtype)
    w = argmax(theta - v).to(theta.dtype)
    return v, ((theta - v) * v).sum(1) >= ((theta - v) * w).sum(1)
