"""Separable regularizers on DAG paths (unit s–t flows): Newton on vertex potentials.

The polytope is ``P = {x ∈ [0, 1]^E : out_v(x) − in_v(x) = [v = s] − [v = t]}`` over the arcs
``e = (u → v)`` of a DAG (``x ≤ 1`` is implied: a unit flow in a DAG is a mix of s–t paths).
With a separable f, the dual is a convex function of one potential per vertex::

    D(π) = Σ_e f*(θ_e − π_u + π_v) + π_s − π_t,      x_e = f*'(θ_e − π_u + π_v),

i.e. ``x = ψ(θ − Aᵀπ)`` for the incidence matrix A (+1 at an arc's tail, −1 at its head), with
gradient ``b − A x`` and Hessian ``A diag(w) Aᵀ``, a graph Laplacian with weights ``w = f*''``.
``π_t = 0`` grounds it (D is invariant to a common shift). Arcs on no s–t path are 0 on P and
are left out first (their potentials would run off to infinity), and so are the vertices they
leave without arcs. The iteration is the one of :mod:`convex_sst._assignment_projection`:
Newton steps regularized by ``0.1 ×`` the residual, Armijo line search, a start from the LP
dual's potentials (the smooth regularizers, and the quadratic at low temperature; else the
continuation; :func:`solve_flows`), with a dense ``(k × k)`` Cholesky factorization per step
(k: the vertices on an s–t path, less t). The Jacobian is ``W ⊙ (G − Aᵀw)`` with
``A diag(W) Aᵀ w = A (W ⊙ G)``; blocks of the weights cut off from t (isolated vertices, once
weights below 1e-12 are left out) get ``1 1ᵀ``. For the quadratic it has constant factors (x
is piecewise affine); for the binary entropy and the entropy (``x = σ(v)``, ``e^(v − 1)``) it
is computed from the output x in the backward pass, so second derivatives flow through x.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
import torch

from ._assignment_projection import (_SPAN, _WEIGHT_FLOOR, SEPARABLE, Separable, _chol_solve, continuation,
                                     damped_newton, resolution, solution_weights, spread_and_scale)
from ._autograd import autocast_off
from ._forbidden import far_below
from .graphs import topological_order


class FlowPlan(NamedTuple):
    """The usable arcs (on some s–t path) and their ends as potential indices (``k`` = t,
    whose potential is 0), the incidence rows of the other vertices ``A (k, E')``, the
    supplies ``b (k,)``, and the vertices but s in topological order, each with the positions
    of its usable arcs in and their tails."""

    arcs: torch.Tensor
    tail: torch.Tensor
    head: torch.Tensor
    A: torch.Tensor
    b: torch.Tensor
    order: tuple[tuple[int, torch.Tensor, torch.Tensor], ...]


def flow_plan(n: int, arcs: np.ndarray, s: int, t: int, device: torch.device) -> FlowPlan:
    """:class:`FlowPlan` of the DAG with arcs ``(E, 2)`` from ``s`` to ``t``."""
    reach_s = {s}
    reach_t = {t}
    changed = True
    while changed:  # fixed points (n is small; no topological order needed)
        changed = False
        for u, v in arcs.tolist():
            if u in reach_s and v not in reach_s:
                reach_s.add(v)
                changed = True
            if v in reach_t and u not in reach_t:
                reach_t.add(u)
                changed = True
    usable = [e for e, (u, v) in enumerate(arcs.tolist()) if u in reach_s and v in reach_t]
    on_path = sorted({int(w) for e in usable for w in arcs[e]} - {t})
    index = {v: i for i, v in enumerate(on_path)}
    k = len(on_path)
    index[t] = k
    tail = [index[int(arcs[e, 0])] for e in usable]
    head = [index[int(arcs[e, 1])] for e in usable]
    A = np.zeros((k, len(usable)))
    for j, (u, v) in enumerate(zip(tail, head)):
        if u < k:
            A[u, j] += 1.0
        if v < k:
            A[v, j] -= 1.0
    b = np.zeros(k)
    if s in index and index[s] < k:
        b[index[s]] = 1.0

    def as_index(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=device)

    into: dict[int, list[int]] = {v: [] for v in range(k + 1)}
    for j, v in enumerate(head):
        into[v].append(j)
    order = [(v, as_index(into[v]), as_index([tail[j] for j in into[v]]))
             for v in topological_order(k + 1, np.array([tail, head], dtype=np.int64).T) if into[v]]
    return FlowPlan(as_index(usable), as_index(tail), as_index(head), torch.tensor(A, dtype=torch.float64, device=device),
                    torch.tensor(b, dtype=torch.float64, device=device), tuple(order))


def reduced_costs(theta: torch.Tensor, plan: FlowPlan) -> torch.Tensor:
    """``θ_e + d(u) − d(v)`` for the usable arcs ``e = (u → v)``, ``theta: (B, E')``, with ``d``
    the longest-path lengths from s (the LP dual's potentials): ``≤ 0``, and exactly 0 on a
    longest path, whose sums are rounded as in d. ``⟨θ', x⟩ = ⟨θ, x⟩ − d(t)`` on P, so the
    relaxation is the same."""
    d = theta.new_zeros(theta.shape[0], plan.A.shape[0] + 1)
    for v, arcs, tails in plan.order:
        d[:, v] = (d[:, tails] + theta[:, arcs]).amax(1)
    return (theta + d[:, plan.tail]) - d[:, plan.head]


def _laplacian(W: torch.Tensor, plan: FlowPlan) -> torch.Tensor:
    """``A diag(W) Aᵀ (B, k, k)`` by scattering each arc's weight to its four entries (O(B E),
    where the product ``(A W) Aᵀ`` costs O(B k² E))."""
    B = W.shape[0]
    k = plan.A.shape[0]
    u, v = plan.tail, plan.head  # index k is t: its row and column are cut off below
    n1 = k + 1
    flat = torch.cat([u * n1 + u, v * n1 + v, u * n1 + v, v * n1 + u]).expand(B, -1)
    H = W.new_zeros(B, n1 * n1).scatter_add_(1, flat, torch.cat([W, W, -W, -W], 1))
    return H.reshape(B, n1, n1)[:, :k, :k]


def _potentials(p: torch.Tensor) -> torch.Tensor:
    return torch.cat([p, torch.zeros_like(p[:, :1])], 1)  # π_t = 0


def _dual(theta: torch.Tensor, p: torch.Tensor, plan: FlowPlan, reg: Separable) -> tuple[torch.Tensor, ...]:
    """``(D, x, V, rounding scale of D)`` per sample for potentials ``p (B, k)``."""
    pz = _potentials(p)
    V = theta - pz[:, plan.tail] + pz[:, plan.head]
    conj = reg.conj(V).sum(1)
    pb = p @ plan.b
    return conj + pb, reg.x(V), V, conj.abs() + pb.abs()


def _residual(x: torch.Tensor, plan: FlowPlan) -> torch.Tensor:
    """Largest violation of flow conservation per sample (t's row is implied by the others)."""
    return (x @ plan.A.T - plan.b).abs().amax(1) if plan.A.shape[0] else x.new_zeros(x.shape[0])


# the quadratic starts from the reduced costs, without the continuation, where θ spans more than
# this: on complete DAGs (n = 30, 60; t = 1e-3 and 1e-2) 1.3-3.1× faster, and the continuation left
# rows unconverged at n = 60 (1 of 32 at t = 1e-3, 4 at 1e-2); at t = 1 (a span of about 7) the
# reduced costs took 27 steps where the continuation took 19 (n = 30): x = [θ' − Aᵀπ]₊ starts at
# 0 on every arc, with no weights, and at t = 0.1 (a span of 60-70) they gained nothing. So does
# θ of more than this magnitude (a common offset, u − 1e4: from π = 0 Newton moved the potentials
# that far, 2x the time on the default DAG)
_REDUCED_SPAN = 200.0
# the Newton system's regularization, times the residual (Birkhoff's 0.1 was too strong here:
# from the reduced costs most weights start near 0). Steps over a grid (complete DAGs n = 10, 30,
# 60; t = 1e-3 to 10; Gaussian and tied utilities; μ = 0.1, 0.01, 1e-3, 1e-4): the smooth ones
# at 1e-3 took 38 where 0.1 took 103 (binary entropy, n = 60, t = 0.01; the entropy 30 against
# 43), no fewer at 1e-4; the quadratic at 0.01 took 44 where 0.1 took 75 (n = 60, t = 0.1), and
# at 1e-3 more than at 0.01 at t = 1 (38 against 14, n = 30)
_MU_SMOOTH, _MU_QUADRATIC = 1e-3, 1e-2


def solve_flows(theta: torch.Tensor, plan: FlowPlan, reg: Separable, tol: float, max_iter: int,
                low: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Newton's method on the potentials for ``theta: (B, E')`` (the usable arcs), float64:
    ``(x, weights, bad, steps)``.

    The smooth regularizers start from the LP dual's potentials, which the continuation of
    :func:`convex_sst._assignment_projection.project_assignments` approaches: θ becomes its
    :func:`reduced_costs` (the same x, and the same Jacobian, which is 0 along the shift), and
    ``π = 0``. So does the quadratic where θ spans or reaches more than ``_REDUCED_SPAN`` (low
    temperature, an offset); below that it starts from ``π = 0`` with the continuation.

    This keeps the entropy's digits: ``x = e^(v − 1)`` needs v to 1e-12 on the path's arcs,
    which potentials of size |θ| gave only to eps |θ| (x off by 2e-4 at logits of 1e10); arcs
    whose reduced cost ends far below the others' (:func:`far_below`) leave the tolerance's
    floor. It also takes fewer steps at low temperature: at t = 0.01 (B = 128, complete DAGs
    n = 10 and 30) the entropy took 30 and 30 where the continuation (with μ = 0.1) took 69 and
    83, the binary entropy 31 and 34 against 49 and 130. For the smooth ones, up to 5 more steps go on to
    ``tol`` itself where the arithmetic allows (the continuation's ``polish``): stopped at the
    floor ``100 eps |θ|``, x was off by up to 7e-11 at t = 0.01, against 3e-12 now."""
    B = theta.shape[0]
    k = plan.A.shape[0]
    smooth = not reg.vertices
    reduce = smooth or max(spread_and_scale(theta, low)) > _REDUCED_SPAN
    if reduce:
        theta = reduced_costs(theta, plan)
        low = far_below(theta)[0] if low is None else far_below(theta)[0] | low
    eye = torch.eye(k, dtype=theta.dtype, device=theta.device)
    mu = _MU_SMOOTH if smooth else _MU_QUADRATIC

    def solve(th: torch.Tensor, z: tuple[torch.Tensor, ...], tol: float, max_iter: int):
        def evaluate(z: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
            D, x, V, Dscale = _dual(th, z[0], plan, reg)
            return D, x, V, Dscale, _residual(x, plan)

        def direction(z: tuple[torch.Tensor, ...], x: torch.Tensor, V: torch.Tensor, err: torch.Tensor):
            g = plan.b - x @ plan.A.T
            H = _laplacian(reg.weight(V), plan) + (mu * err)[:, None, None] * eye
            return (-_chol_solve(H, g),), (g,)

        return damped_newton(z, evaluate, direction, lambda z: z, tol, max_iter)

    _, x, V, _, bad, steps = continuation(theta, low, tol, max_iter, lambda th: (th.new_zeros(B, k),), solve,
                                          span=math.inf if reduce else _SPAN, polish=smooth)
    return x, solution_weights(reg, x, V, resolution(theta, low, tol)), bad, steps


def _cut_off_blocks(W: torch.Tensor, plan: FlowPlan) -> torch.Tensor:
    """``(B, k, k)`` boolean: vertices in the same block of the weighted arcs, for the blocks
    without t (where ``A diag(W) Aᵀ`` is singular along the block's indicator)."""
    B = W.shape[0]
    k = plan.A.shape[0]
    on = W > 0
    big = k + 1
    label = torch.arange(k + 1, device=W.device).expand(B, k + 1).clone()
    while True:  # label propagation: the smallest label of each block
        lt = torch.where(on, label[:, plan.tail], big)
        lh = torch.where(on, label[:, plan.head], big)
        new = label.scatter_reduce(1, plan.tail.expand(B, -1), lh, "amin")
        new = new.scatter_reduce(1, plan.head.expand(B, -1), lt, "amin")
        if torch.equal(new, label):
            break
        label = new
    free = label[:, :k] != label[:, k:]  # not in t's block
    lab = label[:, :k]
    return free[:, :, None] & free[:, None, :] & (lab[:, :, None] == lab[:, None, :])


def flow_factors(W: torch.Tensor, plan: FlowPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W, L)``: the weights with those below ``_WEIGHT_FLOOR`` left out and the Cholesky factor
    of ``A diag(W) Aᵀ`` made definite on the blocks cut off from t (differentiable in W)."""
    W = torch.where((W > _WEIGHT_FLOOR) & torch.isfinite(W), W, 0.0)  # (rows a fallback replaced may be inf)
    H = _laplacian(W, plan) + _cut_off_blocks(W, plan).to(W.dtype)
    L, _ = torch.linalg.cholesky_ex(H)
    return W, L


def flow_vjp(G: torch.Tensor, W: torch.Tensor, L: torch.Tensor, plan: FlowPlan) -> torch.Tensor:
    """``J G = W ⊙ (G − Aᵀw)`` with ``A diag(W) Aᵀ w = A (W ⊙ G)``, ``G: (B, E')``."""
    w = torch.cholesky_solve(((G * W) @ plan.A.T)[..., None], L)[..., 0]
    return W * (G - w @ plan.A)


class FlowRelaxation(torch.autograd.Function):
    """x over the usable arcs, ``theta: (B, E')``; rows with ``at_vertex`` return ``vertex``."""

    @staticmethod
    def forward(ctx: Any, theta: torch.Tensor, plan: FlowPlan, reg: str, tol: float, max_iter: int,
                holder: list[torch.Tensor], low: torch.Tensor | None, vertex: torch.Tensor,
                at_vertex: torch.Tensor) -> torch.Tensor:
        th = theta.detach().double()
        x = vertex.double().clone()
        W = x.clone()
        bad = torch.zeros_like(at_vertex)
        rows = (~at_vertex).nonzero()[:, 0]
        if rows.numel():
            xr, Wr, badr, _ = solve_flows(th[rows], plan, SEPARABLE[reg], tol, max_iter,
                                          None if low is None else low[rows])
            x[rows], W[rows], bad[rows] = xr, Wr, badr
        holder.append(bad)
        out = x.to(theta.dtype)
        ctx.plan, ctx.reg = plan, reg
        ctx.smooth = not SEPARABLE[reg].vertices
        if ctx.needs_input_grad[0]:
            if ctx.smooth:  # J from the output: second derivatives through x
                ctx.save_for_backward(out)
            else:
                ctx.save_for_backward(*flow_factors(W, plan))
        return out

    @staticmethod
    def backward(ctx: Any, G: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        with autocast_off(G.device):
            if ctx.smooth:
                (x,) = ctx.saved_tensors
                W, L = flow_factors(SEPARABLE[ctx.reg].weight_of_x(x.double()), ctx.plan)
            else:
                W, L = ctx.saved_tensors
            out = flow_vjp(G.double(), W, L, ctx.plan).to(G.dtype)
        return out, None, None, None, None, None, None, None, None
