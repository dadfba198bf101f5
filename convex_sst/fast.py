"""Fast paths: exact structured relaxations in torch, keyed by (polytope, regularizer).

Every function here maps ``theta = u / t`` of shape ``(B, *polytope.shape)`` to the relaxed
sample, batched, on any device, in float32 or float64, with an exact backward pass (closed form,
implicit differentiation, or autograd through a fixed number of vectorized steps; never
finite differences, never autograd through solver iterations). The backward passes are
themselves differentiable (second derivatives under ``create_graph=True``): functions of the
output (capped simplex, spanning-tree decomposition, Sinkhorn), recomputed differentiably
(matrix-tree), linear with constant factors (the minimum-norm point: x is piecewise affine, its
second derivatives 0), or, for the k-subset exp family, autograd through the log-space product
tree (slower; only when asked for).

==================  ==================  ===================================================
polytope            regularizer         algorithm
==================  ==================  ===================================================
simplex             entropy             softmax
simplex, k_subset   entropy, binary     ``x = clamp(ψ(θ − τ), 0, 1)``, τ by safeguarded
                    entropy, quadratic  Newton–bisection; implicit Jacobian
                                        ``J = D − d dᵀ / Σd`` (sparsemax, LML, capped-simplex)
hypercube           binary_entropy      sigmoid
hypercube           quadratic           clamp to [0, 1]
simplex, hypercube  exp_family          softmax, sigmoid (the mean parameters)
k_subset            exp_family          marginals of p(x) ∝ exp(θᵀx) on k-subsets: a DFT of
                                        the size's characteristic function (n ≲ 128),
                                        closed-form backward; else (and for rows it cannot
                                        resolve) up/down passes of a polynomial product tree
                                        (⌈log₂ n⌉ batched steps, linear space; log space where
                                        that underflows), backward = forward-mode pass with
                                        tangents (Cov·g)
birkhoff            entropy             log-domain Sinkhorn with a convergence test, implicit
                                        backward (one (n×n) solve per sample)
matching            entropy             the same with columns capped at 1 (n rows to m ≥ n
                                        columns); backward on the columns at capacity
birkhoff, matching  quadratic           semismooth Newton on the dual multipliers of the row
                                        and column sums, ``X = [θ − a1ᵀ − 1bᵀ]₊`` (projected
                                        on ``b ≥ 0`` for capped columns), rows on a vertex
                                        found by two argmax calls, rows whose logits span more
                                        than 100 (low temperature) by Wolfe's minimum-norm
                                        point; Jacobian = projector onto the matrices on X's
                                        support with zero row and (tight) column sums
                                        (:mod:`convex_sst._assignment_projection`)
birkhoff, matching  binary_entropy      Newton on the same dual, ``X = σ(θ − a1ᵀ − 1bᵀ)``;
                                        implicit backward from X, weights X(1 − X)
spanning_tree       exp_family          matrix-tree theorem: μ from one batched Cholesky
                                        factorization of the Laplacian with its heaviest vertex
                                        grounded, closed-form backward; samples too
                                        ill-conditioned for it use a cancellation-free
                                        log-space elimination (GTH), μ = ∇ log Z by autograd;
                                        exact at any temperature
spanning_tree       entropy, binary     the decomposition algorithm on the graphic matroid's
                    entropy, quadratic  base polytope (Fujishige 1980; Groenevelt 1991): a
                                        capped-simplex step, split where a minimum cut finds a
                                        violated set of vertices (Cunningham 1985), exact;
                                        block-diagonal Jacobian ``D − d dᵀ/Σd`` per block; on
                                        the CPU in float64, the rows' subproblems level by
                                        level (:mod:`convex_sst._graphic_matroid`)
arborescence        exp_family          directed matrix-tree theorem (Koo et al. 2007), same
arborescence        entropy, binary     Newton on a dual with the in-degrees and a working set
                    entropy, quadratic  of forest constraints ``x(E[S]) ≤ |S| − 1`` as
                                        equalities, violated sets added by Cunningham's minimum
                                        partition, the most negative multiplier's set dropped;
                                        implicit Jacobian on the final sets; separation on the
                                        CPU (NumPy) (:mod:`convex_sst._arborescence_newton`);
                                        the quadratic's rows on a tree found by two argmax
                                        calls, and where θ spans more than 1 + n/3 (low
                                        temperature) Wolfe's minimum-norm point
correlated_k_subset quadratic           Wolfe's minimum-norm-point algorithm (SparseMAP's
                                        active set): the projection onto conv(𝒳) from the
                                        argmax alone, a few structures mixed, exact; Jacobian
                                        = projector onto the optimal face's affine hull; on
                                        the CPU in float64, row by row
                                        (:mod:`convex_sst._min_norm_point`)
dag_path            exp_family          forward pass in topological order, backward by autograd
dag_path            quadratic, binary   Newton on the vertex potentials, ``x = ψ(θ − Aᵀπ)``
                    entropy, entropy    (A: incidence; a graph Laplacian per step), arcs on no
                                        s–t path fixed at 0; from the reduced costs
                                        ``θ_e + d(u) − d(v)`` (d: longest-path lengths): the
                                        smooth ones; the quadratic's rows on a path as for
                                        Birkhoff, and where θ spans more than 50 (low
                                        temperature) Wolfe's minimum-norm point over longest
                                        paths (:mod:`convex_sst._flow_newton`)
correlated_k_subset exp_family          forward pass over the items with states (count, last
                                        item chosen), O(n k); backward by autograd
==================  ==================  ===================================================
"""

from __future__ import annotations

import math

import numpy as np
import torch

from . import _linalg
from ._graphic_matroid import spanning_tree_separable
from ._assignment_projection import (SEPARABLE, AssignmentProjection as _AssignmentProjection, at_a_vertex,
                                     row_extremes as _row_extremes)
from ._flow_newton import FlowRelaxation as _FlowRelaxation, flow_plan
from ._arborescence_newton import ArborescenceRelaxation as _ArborescenceRelaxation
from ._min_norm_point import TOL, project_onto_hull
from ._forbidden import (SLACK, avoidable_below, far_below, lower_far_above, lower_forced, needed_apart,
                         shift_far_below)
from .argmax import chu_liu_edmonds_trees as _chu_liu_edmonds_trees, dag_plan as _dag_plan
from .errors import InputError, SolverError, warn_user
from .polytope import Polytope
from ._autograd import _differentiates, autocast_off
from .relax import register_fast_path


def _default_tol(dtype: torch.dtype) -> float:
    return 1e-12 if dtype == torch.float64 else 1e-5


def _report(kind: str, bad: torch.Tensor, total: int, detail: str, on_failure: str) -> None:
    idx = bad.nonzero().reshape(-1)[:10].tolist()
    msg = f"{kind} did not converge for batch element(s) {idx} of {total}: {detail}"
    if on_failure == "raise":
        raise SolverError(msg)
    warn_user(msg + " (results for these elements are approximate)")


# ------------------------------------------------------------------------------------------
# Simple closed forms
# ------------------------------------------------------------------------------------------


@register_fast_path("simplex", "entropy")
@register_fast_path("simplex", "exp_family")
def simplex_softmax(theta: torch.Tensor, polytope: Polytope) -> torch.Tensor:
    """``softmax(θ)``: the entropic SST of the simplex (Gumbel-softmax). O(n)."""
    return torch.softmax(theta, dim=-1)


@register_fast_path("hypercube", "binary_entropy")
@register_fast_path("hypercube", "exp_family")
def hypercube_sigmoid(theta: torch.Tensor, polytope: Polytope) -> torch.Tensor:
    """``sigmoid(θ)``: independent bits with binary entropy. O(n)."""
    return torch.sigmoid(theta)


@register_fast_path("hypercube", "entropy")
def hypercube_entropy(theta: torch.Tensor, polytope: Polytope) -> torch.Tensor:
    """``min(1, exp(θ − 1))``: the cube with the entropy ``Σ x log x``, coordinate by coordinate
    (``argmax_{0≤x≤1} θx − x log x``). O(n); the clamp comes first, so huge θ never overflows."""
    return torch.exp((theta - 1.0).clamp(max=0.0))


@register_fast_path("hypercube", "quadratic")
def hypercube_clamp(theta: torch.Tensor, polytope: Polytope) -> torch.Tensor:
    """``clamp(θ, 0, 1)``: Euclidean projection on the cube. O(n)."""
    return theta.clamp(0.0, 1.0)


# ------------------------------------------------------------------------------------------
# Capped simplex {0 <= x <= 1, Σx = k} with a separable regularizer
# ------------------------------------------------------------------------------------------

# ψ = (f')⁻¹ per coordinate, its derivative, and ψ⁻¹ (for the initial bracket)
_PSI = {
    "entropy": (lambda v: torch.exp(v - 1.0), lambda v, x: x, lambda p: math.log(p) + 1.0),
    "binary_entropy": (torch.sigmoid, lambda v, x: x * (1.0 - x), lambda p: math.log(p / (1.0 - p))),
    "quadratic": (lambda v: v, lambda v, x: torch.ones_like(v), lambda p: p),
}


# ψ⁻¹ elementwise on tensors (for p in (0, 1])
_PSI_INV = {"entropy": lambda p: torch.log(p) + 1.0, "binary_entropy": torch.logit, "quadratic": lambda p: p}


def _capped_eval(theta: torch.Tensor, tau: torch.Tensor, reg: str) -> tuple[torch.Tensor, torch.Tensor]:
    psi, dpsi, _ = _PSI[reg]
    v = theta - tau[:, None]
    raw = psi(v)
    x = raw.clamp(0.0, 1.0)
    free = (raw > 0) & (raw < 1) if reg == "quadratic" else (raw < 1)
    d = torch.where(free, dpsi(v, x), torch.zeros_like(x))
    return x, d


def _topk_midpoint(theta: torch.Tensor, k: int) -> torch.Tensor:
    """``(B, 1)``: midway between the k-th and (k+1)-th largest entries of each row (1 ≤ k < n),
    halves first (no overflow near the dtype's range)."""
    top = theta.topk(k + 1, dim=1).values
    return 0.5 * top[:, k - 1 : k] + 0.5 * top[:, k : k + 1]


def _capped_root(theta: torch.Tensor, k: int, reg: str, tol: float, max_iter: int,
                 start: torch.Tensor | None = None) -> torch.Tensor:
    """τ with ``h(τ) = Σ_i clamp(ψ(θ_i − τ), 0, 1) − k`` within ``tol`` of 0 (as far as
    ``max_iter`` steps get), for ``theta: (B, n)``, 1 ≤ k < n. Returns ``(B,)``.

    τ is bracketed and refined by Newton steps on the monotone h (bisection whenever a Newton
    step leaves the bracket), from the bracket's midpoint or from ``start (B,)`` where that
    lies inside it."""
    B, n = theta.shape
    inv = _PSI[reg][2](k / n)
    lo = theta.min(1).values - inv   # every x_i >= k/n there, so Σx >= k
    hi = theta.max(1).values - inv   # every x_i <= k/n there, so Σx <= k
    # the m entries above the row's minimum have x_i >= k/m at τ = (smallest of them) − ψ⁻¹(k/m),
    # so Σx >= k: a much tighter lower end when some entries sit far below the rest (forbidden
    # coordinates get one very low utility, see convex_sst._forbidden)
    low = theta.min(1, keepdim=True).values
    above = theta > low
    m = above.sum(1)
    second = theta.masked_fill(~above, math.inf).min(1).values
    p = (k / m.clamp_min(1).to(theta.dtype)).clamp(max=1.0)
    lo = torch.where(m > k, torch.maximum(lo, second - _PSI_INV[reg](p)), lo)
    tau = 0.5 * (lo + hi)
    if start is not None:
        tau = torch.where((start > lo) & (start < hi), start, tau)
    for _ in range(max_iter):
        x, d = _capped_eval(theta, tau, reg)
        h = x.sum(1) - k
        done = h.abs() <= tol
        if bool(done.all()):
            break
        lo = torch.where(h > 0, tau, lo)
        hi = torch.where(h > 0, hi, tau)
        newton = tau + h / d.sum(1)
        ok = torch.isfinite(newton) & (newton > lo) & (newton < hi)
        tau = torch.where(done, tau, torch.where(ok, newton, 0.5 * (lo + hi)))
    return tau


def capped_simplex(theta: torch.Tensor, k: int, reg: str, tol: float | None = None, max_iter: int = 100,
                   on_failure: str = "warn") -> tuple[torch.Tensor, torch.Tensor]:
    """Solve ``argmax θᵀx − f(x) s.t. Σx = k, 0 ≤ x ≤ 1`` for a separable f; returns ``(x, d)``.

    ``x_i = clamp(ψ(θ_i − τ), 0, 1)`` with τ from :func:`_capped_root` (safeguarded Newton).
    Rows where that does not converge are redone on θ shifted by the midpoint of its k-th and
    (k+1)-th largest entries: τ is then found relative to them, to full precision even where
    |θ| is so large that τ ± 1 == τ (ties at |θ| ~ 1e20 got x ∈ {0, ½, 1} with Σx ≠ k). ``d``
    holds ``∂x_i/∂θ_i`` at fixed τ, which gives the Jacobian ``diag(d) − d dᵀ/Σd``.
    """
    B, n = theta.shape
    if k == n:
        return torch.ones_like(theta), torch.zeros_like(theta)
    tol = _default_tol(theta.dtype) * max(1, k) if tol is None else tol
    tau = _capped_root(theta, k, reg, tol, max_iter)
    x, d = _capped_eval(theta, tau, reg)
    h = x.sum(1) - k
    bad = h.abs() > 10 * tol
    if bool(bad.any()):  # redone relative to the top-k midpoint, where τ resolves at any |θ|
        rows = bad.nonzero()[:, 0]
        th = theta[rows] - _topk_midpoint(theta[rows], k)
        xr, dr = _capped_eval(th, _capped_root(th, k, reg, tol, max_iter), reg)
        x, d = x.index_put((rows,), xr), d.index_put((rows,), dr)
        h = x.sum(1) - k
        bad = h.abs() > 10 * tol
    if bool(bad.any()):
        _report(f"the capped-simplex root finder ({reg})", bad, B,
                f"|Σx − k| up to {h.abs().max().item():.1e} after {max_iter} iterations", on_failure)
    return x, d


# entries of the capped simplex within this of a bound count as at it (clamped) in the Jacobian:
# tied logits put entries exactly at the cap without clamping them (three edges forced with the
# same +1e4 share a block of rank 3: each x = 1, computed as 1 − 1e-16). Counted as free, they
# let mass move among them, which the cap forbids: gradients off by 0.5/t (spanning trees), where
# the torch solver and central differences agreed on 0. At the solvers' tolerance, not above:
# at low temperature entries 1 − e^(−20) = 1 − 2e-9 below the cap are free, and their exact
# derivative couples them (central differences with steps below 1e-10 agree)
_CAP_SLACK = 1e-12


def _capped_slope(x: torch.Tensor, reg: str) -> torch.Tensor:
    """``d = ∂x_i/∂θ_i`` at fixed τ from x itself (as :func:`_capped_eval` gives it), so that
    the backward is a differentiable function of the output: second derivatives by autograd.
    Entries within ``_CAP_SLACK`` (or 8 eps) of a bound are at it: d = 0."""
    slack = max(_CAP_SLACK, 8 * torch.finfo(x.dtype).eps)
    if reg == "entropy":                                 # ψ' = ψ; free where ψ < 1
        return torch.where(x < 1 - slack, x, torch.zeros_like(x))
    if reg == "binary_entropy":                          # ψ' = ψ (1 − ψ)
        return x * (1.0 - x)
    return ((x > slack) & (x < 1 - slack)).to(x.dtype)   # quadratic: ψ' = 1 where 0 < ψ < 1


class _CappedSimplex(torch.autograd.Function):
    @staticmethod
    def forward(ctx, theta, k, reg, tol, max_iter, on_failure):
        # float32 runs the root finder in float64: in float32 Σx alone carries n·eps of rounding,
        # and |Σx − k| reached 9e-4 at n = 1000, k = 100 (1e-7 when computed in float64, rounded)
        th = theta.detach() if theta.dtype == torch.float64 else theta.detach().double()
        x, _ = capped_simplex(th, k, reg, tol, max_iter, on_failure)
        x = x.to(theta.dtype)
        ctx.reg = reg
        ctx.save_for_backward(x)
        return x

    @staticmethod
    def backward(ctx, g):
        # J = diag(d) − d dᵀ/Σd in terms of the output x: under create_graph=True autograd
        # differentiates it through x, whose own backward is this one (exact second derivatives)
        (x,) = ctx.saved_tensors
        d = _capped_slope(x, ctx.reg)
        s = d.sum(1, keepdim=True)
        coef = torch.where(s > 0, (d * g).sum(1, keepdim=True) / s.clamp_min(torch.finfo(d.dtype).tiny), torch.zeros_like(s))
        return d * (g - coef), None, None, None, None, None


def _capped_path(reg: str):
    def fn(theta: torch.Tensor, polytope: Polytope, tol: float | None = None, max_iter: int = 100,
           on_failure: str = "warn") -> torch.Tensor:
        k = int(polytope.params.get("k", 1))
        flat = theta.flatten(1)
        return _CappedSimplex.apply(flat, k, reg, tol, max_iter, on_failure).reshape(theta.shape)

    fn.__name__ = f"capped_simplex_{reg}"
    fn.__doc__ = (f"Capped-simplex SST with {reg}: τ by safeguarded Newton–bisection (O(n) per step), "
                  "implicit Jacobian diag(d) − d dᵀ/Σd; computed in float64 whatever the input dtype. "
                  "Options: tol, max_iter, on_failure ('warn'|'raise').")
    return fn


for _reg in ("entropy", "binary_entropy", "quadratic"):
    register_fast_path("k_subset", _reg)(_capped_path(_reg))
    if _reg != "entropy":
        register_fast_path("simplex", _reg)(_capped_path(_reg))


# ------------------------------------------------------------------------------------------
# k-subset exponential family: a DFT; polynomial product trees (linear space; log space as fallback)
# ------------------------------------------------------------------------------------------

_NEG = -1e30  # "log 0" that keeps gradients finite (exp underflows to exactly 0)


_MAP_MAX = 1 << 22  # entries of a (a·b, deg+1) coefficient map above which products loop over the shorter factor


def _log_poly_mul(P: torch.Tensor, Q: torch.Tensor, k: int) -> torch.Tensor:
    """Log-space product of polynomials (coefficients along the last dim), truncated to degree k."""
    a, b = P.shape[-1], Q.shape[-1]
    deg = min(a + b - 2, k)
    if a * b * (deg + 1) > _MAP_MAX:
        # large factors (k-subsets with large k): the mask below would be cubic in k; stack the
        # shifted copies P·z^j·q_j instead (memory b·(deg + 1) per pair)
        if a < b:
            P, Q = Q, P
            a, b = b, a
        lead = torch.broadcast_shapes(P.shape[:-1], Q.shape[:-1])
        P = P.expand(lead + (a,))
        terms = []
        for shift in range(min(b, deg + 1)):
            keep = min(a, deg + 1 - shift)
            terms.append(torch.nn.functional.pad(P[..., :keep] + Q[..., shift : shift + 1],
                                                 (shift, deg + 1 - shift - keep), value=_NEG))
        return torch.logsumexp(torch.stack(terms, -2), dim=-2)
    S = (P[..., :, None] + Q[..., None, :]).flatten(-2)  # (..., a*b)
    i = torch.arange(a, device=P.device)[:, None]
    j = torch.arange(b, device=P.device)[None, :]
    m = torch.arange(deg + 1, device=P.device)[:, None, None]
    mask = ((i + j) == m).reshape(deg + 1, a * b)
    bias = torch.where(mask, 0.0, _NEG).to(P.dtype)
    return torch.logsumexp(S[..., None, :] + bias, dim=-1)


def log_elementary_symmetric(theta: torch.Tensor, k: int) -> torch.Tensor:
    """``log e_k(exp θ)`` for ``theta: (B, n)``, in ⌈log₂ n⌉ batched steps. Returns ``(B,)``."""
    B, n = theta.shape
    shift = theta.max(1, keepdim=True).values.detach()
    th = theta - shift
    size = 1 << max(0, (n - 1).bit_length())
    pad = torch.full((B, size - n), _NEG, dtype=theta.dtype, device=theta.device)
    th = torch.cat([th, pad], 1)
    polys = torch.stack([torch.zeros_like(th), th], -1)  # (B, size, 2): 1 + exp(θ_i) z
    while polys.shape[1] > 1:
        polys = _log_poly_mul(polys[:, 0::2], polys[:, 1::2], k)
    return polys[:, 0, k] + k * shift[:, 0]


_SUM_MAPS: dict = {}


def _poly_mul(P: torch.Tensor, Q: torch.Tensor, deg: int) -> torch.Tensor:
    """Product of polynomials (coefficients along the last dim, low to high; leading dims
    broadcast) truncated to degree ``deg``: one outer product contracted with a 0/1
    anti-diagonal map (a matmul), or shift-and-add over the shorter factor when it is short or
    the map would be large (``a·b·(deg+1) > _MAP_MAX``)."""
    if P.shape[-1] < Q.shape[-1]:
        P, Q = Q, P
    a, b = P.shape[-1], Q.shape[-1]
    d = min(a + b - 2, deg)
    if b <= 3 or a * b * (d + 1) > _MAP_MAX:  # shift and add (the map would be cubic in k)
        out = P.new_zeros(torch.broadcast_shapes(P.shape[:-1], Q.shape[:-1]) + (d + 1,))
        for j in range(min(b, d + 1)):
            m = min(a, d + 1 - j)
            out[..., j : j + m].addcmul_(Q[..., j : j + 1], P[..., :m])
        return out
    key = (a, b, d, P.dtype, str(P.device))
    if key not in _SUM_MAPS:
        i = torch.arange(a, device=P.device)[:, None] + torch.arange(b, device=P.device)[None, :]
        _SUM_MAPS[key] = (i.reshape(-1, 1) == torch.arange(d + 1, device=P.device)[None, :]).to(P.dtype)
    return (P[..., :, None] * Q[..., None, :]).flatten(-2) @ _SUM_MAPS[key]


def _pairs(P: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Left and right members of consecutive pairs of ``P: (B, p, a)``; an odd last polynomial is
    paired with the constant 1."""
    if P.shape[1] % 2:
        one = torch.zeros_like(P[:, :1])
        one[..., 0] = 1.0
        P = torch.cat([P, one], 1)
    return P[:, 0::2], P[:, 1::2]


def _pad_to(O: torch.Tensor, k: int) -> torch.Tensor:
    return O if O.shape[-1] >= k else torch.nn.functional.pad(O, (0, k - O.shape[-1]))


def _bernoulli_tilt(theta: torch.Tensor, k: int, exact: bool) -> tuple[torch.Tensor, ...]:
    """``(m, τ, p, q)`` with ``p = σ(θ − m − τ)``, ``q = σ(m + τ − θ) = 1 − p`` (each to full
    relative precision) and m + τ such that ``Σ_i p_i ≈ k``: an independent Bernoulli(p) vector
    whose size S = Σx has mean about k. ``P(x | S = k)`` is the k-subset exponential family for
    every tilt; this one makes ``P(S = k)``, the normalizer the k-subset paths divide by, large
    (with mean k, k is the mode of S and ``P(S = k) ≳ 1/√(2π Σ p q)``).

    m ``(B, 1)`` is midway between the k-th and (k+1)-th largest θ, and τ ``(B, 1)`` is found
    relative to it (on θ − m, so that it resolves at any |θ|: at |θ| ~ 1e98, m + 2 == m);
    ``exact=False`` takes two Newton steps from 0 (at most ±2 each, no synchronization: enough
    for most rows, and cheap), ``exact=True`` solves ``Σp = k`` to within 0.1 (safeguarded
    Newton, :func:`_capped_root`)."""
    m = _topk_midpoint(theta, k)
    th = theta - m
    tau = torch.zeros_like(m)
    if exact:
        tau = _capped_root(th, k, "binary_entropy", 0.1, 60, tau[:, 0])[:, None]
    else:
        for _ in range(2):  # (the step needs no full relative precision: q as 1 − p)
            p = torch.sigmoid(th - tau)
            step = (p.sum(1, keepdim=True) - k) / (p - p * p).sum(1, keepdim=True)
            tau = tau + step.nan_to_num(0.0).clamp(-2.0, 2.0)
    return m, tau, torch.sigmoid(th - tau), torch.sigmoid(tau - th)


def _leaf_pairs(q: torch.Tensor, p: torch.Tensor, one: float = 1.0) -> tuple[torch.Tensor, ...]:
    """``(q_a, p_a, q_b, p_b)``: the leaves ``q_i + p_i z`` paired (even and odd items), an odd
    last item paired with the constant ``one`` (1; 0 for tangents)."""
    B, n = q.shape
    return (q[:, 0::2], p[:, 0::2], torch.cat([q[:, 1::2], q.new_full((B, n % 2), one)], 1),
            torch.cat([p[:, 1::2], p.new_zeros(B, n % 2)], 1))


def _up_pass(q: torch.Tensor, p: torch.Tensor, k: int) -> list[torch.Tensor]:
    """The levels of the product tree of ``Π_i (q_i + p_i z)`` truncated to degree k, leaves to
    root: the last is ``(B, 1, ≤ k+1)``. With ``q = 1 − p`` every node is the law of a sum of
    independent Bernoullis: coefficients in [0, 1], no overflow at any n and k."""
    qa, pa, qb, pb = _leaf_pairs(q, p)
    # leaves paired at once: (q_a + p_a z)(q_b + p_b z) = q_a q_b + (q_a p_b + p_a q_b) z + p_a p_b z²
    ups = [torch.stack([qa * qb, qa * pb + pa * qb, pa * pb], -1)[..., : k + 1]]
    while ups[-1].shape[1] > 1:
        ups.append(_poly_mul(*_pairs(ups[-1]), k))
    return ups


_TREE_MIN_PK = 1e-250  # P(S = k) below this: terms lost to underflow may matter (log-space tree)


def _tilted_log_e_k(theta: torch.Tensor, k: int, m: torch.Tensor, tau: torch.Tensor, Z: torch.Tensor) -> torch.Tensor:
    """``log e_k(exp θ) = k(m + τ) + log P(S = k) + Σ_i log(1 + e^{θ_i − m − τ})`` from
    ``Z = P(S = k)`` at the tilt of :func:`_bernoulli_tilt`, ``(B,)``."""
    return k * (m + tau)[:, 0] + torch.log(Z) + log1p_exp((theta - m) - tau).sum(1)


def log_e_k(theta: torch.Tensor, k: int) -> torch.Tensor:
    """``log e_k(exp θ)`` for ``theta: (B, n)``, 1 ≤ k < n, without gradient:
    ``kτ + log P(S = k) + Σ_i log(1 + e^{θ_i − τ})`` for the tilted Bernoulli vector of
    :func:`_bernoulli_tilt`, with P(S = k) by the DFT (where :func:`_use_dft`) or by the
    linear-space product tree of the laws ``q_i + p_i z`` (O(n k²)). Rows where that is not
    accurate go down the stages of :data:`_K_SUBSET_STAGES`, to the log-space tree
    (:func:`log_elementary_symmetric`) where P(S = k) underflows."""
    return _log_e_k(theta, k, 0 if _use_dft(theta.shape[1], k) else _TREE_STAGE)


def _log_e_k(theta: torch.Tensor, k: int, stage: int) -> torch.Tensor:
    if stage == len(_K_SUBSET_STAGES):
        return log_elementary_symmetric(theta, k)
    dft, exact = _K_SUBSET_STAGES[stage]
    m, tau, p, q = _bernoulli_tilt(theta, k, exact)
    if dft:
        _, om1, _, c0, *_ = _dft_consts(theta.shape[1], k, theta.dtype, theta.device)
        per = _dft_chunk_rows(theta.shape[1], k, p.device)
        Z = torch.cat([(_dft_phi(part, om1) * c0).real.sum(1) for part in p.split(per)])
        ok = Z >= _DFT_MIN_PK
    else:
        a, b, _, j = _tree_leaves(p, q, k)
        Z = _up_pass(a, b, j)[-1][:, 0, j]
        ok = torch.isfinite(Z) & (Z > _TREE_MIN_PK)
    out = _tilted_log_e_k(theta, k, m, tau, Z)
    if bool(ok.all()):
        return out
    rows = (~ok).nonzero()[:, 0]
    return out.index_put((rows,), _log_e_k(theta[rows], k, stage + 1))


def _tree_passes(q: torch.Tensor, p: torch.Tensor, k: int, dq: torch.Tensor | None = None,
                 dp: torch.Tensor | None = None, saved=None):
    """Up and down passes of the product tree of ``Π_i (q_i + p_i z)`` over ``(B, n)`` leaves, k ≥ 1.

    Returns ``(e, c, saved)``: ``e (B, k+1)`` the truncated product and ``c (B, n)`` with
    ``c[:, i]`` the coefficient of ``z^{k−1}`` in the other items' product (by the down pass of
    "outside" polynomials; the last level takes only the coefficients it needs). With tangents
    ``dq, dp`` (and the primal pass's ``saved``), the same for ``d/ds`` at ``(q + s·dq,
    p + s·dp)``: the forward-mode derivative, by the product rule.
    """
    B, n = q.shape
    qa, pa, qb, pb = _leaf_pairs(q, p)
    if dq is None or dp is None or saved is None:  # the primal pass (the tangent pass needs all three)
        ups = _up_pass(q, p, k)
        outs = [q.new_ones(B, 1, 1)]
        for P in reversed(ups[:-1]):
            L, R = _pairs(P)
            O = outs[-1][:, :, None, :]
            outs.append(_poly_mul(O, torch.stack([R, L], 2), k - 1).flatten(1, 2)[:, : P.shape[1]])
        O = _pad_to(outs[-1], k)                      # (B, p1, k): outside of each leaf pair
        hi, lo = O[..., k - 1], (O[..., k - 2] if k >= 2 else torch.zeros_like(O[..., 0]))
        c = torch.stack([qb * hi + pb * lo, qa * hi + pa * lo], -1).flatten(1)[:, :n]
        return ups[-1][:, 0], c, (ups, outs)
    ups, outs = saved
    dqa, dpa, dqb, dpb = _leaf_pairs(dq, dp, 0.0)
    dups = [torch.stack([dqa * qb + qa * dqb, dqa * pb + qa * dpb + dpa * qb + pa * dqb,
                         dpa * pb + pa * dpb], -1)[..., : k + 1]]
    for lvl in range(1, len(ups)):
        (L, R), (dL, dR) = _pairs(ups[lvl - 1]), _pairs(dups[lvl - 1])
        both = _poly_mul(torch.stack([dL, L]), torch.stack([R, dR]), k)
        dups.append(both[0] + both[1])
    douts = [q.new_zeros(B, 1, 1)]
    for lvl in range(len(ups) - 2, -1, -1):
        O, dO = outs[len(douts) - 1][:, :, None, :], douts[-1][:, :, None, :]
        (L, R), (dL, dR) = _pairs(ups[lvl]), _pairs(dups[lvl])
        both = _poly_mul(torch.stack([dO, O]), torch.stack([torch.stack([R, L], 2), torch.stack([dR, dL], 2)]), k - 1)
        douts.append((both[0] + both[1]).flatten(1, 2)[:, : ups[lvl].shape[1]])
    O, dO = _pad_to(outs[-1], k), _pad_to(douts[-1], k)
    zero = torch.zeros_like(O[..., 0])
    hi, lo = O[..., k - 1], (O[..., k - 2] if k >= 2 else zero)
    dhi, dlo = dO[..., k - 1], (dO[..., k - 2] if k >= 2 else zero)
    dc = torch.stack([dqb * hi + qb * dhi + dpb * lo + pb * dlo,
                      dqa * hi + qa * dhi + dpa * lo + pa * dlo], -1).flatten(1)[:, :n]
    return dups[-1][:, 0], dc, None


def _hessian_vjp(log_partition, theta: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``gᵀ ∇²A(θ)`` (the VJP of exp-family marginals ``μ = ∇A``) by autograd through a
    twice-differentiable log-partition ``A``, itself differentiable in θ and g: the backward of
    the closed-form k-subset paths under ``create_graph=True`` (second derivatives), slower."""
    with torch.enable_grad():
        x = theta if theta.requires_grad else theta.detach().requires_grad_(True)
        (mu,) = torch.autograd.grad(log_partition(x).sum(), x, create_graph=True)
        (out,) = torch.autograd.grad(mu, x, g, create_graph=True)
    return out


def _log_e_k_at(theta: torch.Tensor, k: int, m: torch.Tensor, tau: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    """``log e_k(exp θ) = kτ + log P(S = k) + Σ_i log(1 + e^{θ_i − τ})`` at a fixed tilt ``m + tau``
    (an identity in θ for every τ, so its autograd derivatives of every order are those of
    log e_k), with P(S = k) by the product tree in plain torch ops: the twice-differentiable
    log-partition behind the second derivatives of the k-subset paths. Rows not ``ok`` (where
    the first-order pass handed the row on) get ``log P(S = k) := 0``: finite, and their
    incoming gradients are zero."""
    d = (theta - m) - tau
    a, b, _, j = _tree_leaves(torch.sigmoid(d), torch.sigmoid(-d), k)
    Z = _up_pass(a, b, j)[-1][:, 0, j]
    return _tilted_log_e_k(theta, k, m, tau, torch.where(ok, Z, torch.ones_like(Z)))


def _tree_leaves(p: torch.Tensor, q: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """``(a, b, K, j)``: the product tree of the leaves ``a_i + b_i z`` truncated at degree K
    gives ``P(S = k)`` as its coefficient j, and as the coefficient of ``z^{K−1}`` in the other
    items' product ``P(S₋ᵢ = k − 1)``. For k ≤ n/2, the laws of x: ``(q, p, k, k)``; beyond,
    the laws of y = 1 − x, whose size T = n − S must reach only n − k:
    ``(p, q, n − k + 1, n − k)`` (``P(S₋ᵢ = k − 1) = P(T₋ᵢ = n − k)``), which costs
    O(n (n − k)²) instead of O(n k²)."""
    n = p.shape[1]
    return (p, q, n - k + 1, n - k) if 2 * k > n else (q, p, k, k)


class _KSubsetMarginals(torch.autograd.Function):
    """``μ_i = p_i P(S₋ᵢ = k − 1) / P(S = k)`` for independent ``Bernoulli(p)``, ``p = σ(θ − τ)``
    (τ from :func:`_bernoulli_tilt`; μ does not depend on it), by the up/down product tree of
    the laws ``Π_i (q_i + p_i z)`` in linear space (of the complements' laws ``p_i + q_i z``
    for k > n/2: :func:`_tree_leaves`), and its vector-Jacobian product ``Cov·g`` (the Jacobian
    is the covariance, symmetric) as the forward-mode derivative of μ along g at fixed τ
    (``ṗ = p q g``, ``q̇ = −ṗ``): a second pass over the tree with tangents.

    The tree only adds and multiplies numbers in [0, 1], so its relative error is a few ulps per
    level whatever the logits' range, unless the terms that matter underflow: ``ok`` flags the
    rows with ``P(S = k) > _TREE_MIN_PK``, the others must be recomputed in log space.
    """

    @staticmethod
    def forward(ctx, theta, k, exact):
        m, tau, p, q = _bernoulli_tilt(theta, k, exact)
        a, b, K, j = _tree_leaves(p, q, k)
        e, c, saved = _tree_passes(a, b, K)
        Z = e[:, j]
        ok = torch.isfinite(Z) & (Z > _TREE_MIN_PK)
        Zs = torch.where(ok, Z, torch.ones_like(Z))
        mu = torch.where(ok[:, None], p * c / Zs[:, None], torch.zeros_like(p))
        ctx.k, ctx.saved = k, saved
        ctx.save_for_backward(p, q, c, mu, Zs, ok, theta, m, tau)
        ctx.mark_non_differentiable(ok)
        return mu, ok

    @staticmethod
    def backward(ctx, g, _):
        p, q, c, mu, Z, ok, theta, m, tau = ctx.saved_tensors
        k = ctx.k
        g = torch.where(ok[:, None], g, torch.zeros_like(g))
        if torch.is_grad_enabled():  # create_graph=True
            return _hessian_vjp(lambda x: _log_e_k_at(x, k, m, tau, ok), theta, g), None, None
        dp = p * q * g
        a, b, K, j = _tree_leaves(p, q, k)
        da, db, _, _ = _tree_leaves(dp, -dp, k)  # the tangents of the same leaves
        de, dc, _ = _tree_passes(a, b, K, da, db, ctx.saved)
        return (dp * c + p * dc - mu * de[:, j : j + 1]) / Z[:, None], None, None


_DFT_CONSTS: dict = {}
_DFT_MIN_PK = 1e-3      # rows with P(S = k) below this go to the product tree (error ~ 2e-16 / P(S = k))
_DFT_MAX_SIZE = 8192    # n · (number of frequencies M) up to which the DFT is used for any k
_DFT_PER_K = 5          # and beyond, while M ≤ 5·min(k, n − k): O(n·M) against the tree's O(n·k·log(n)) (benchmarks/k_subset.py)
_DFT_CHUNK = 1 << 23    # rows · M · n entries of the kernel K per call (64 MiB in float64)
# ... and on CPU at most this many (16 MiB), where the kernel and its products then stay near the
# caches: forward + backward, exp_family, t = 1, medians of 3 interleaved (2 cores, 32 MB L3):
# n = 500, k = 50: B = 64 203 → 46 ms, B = 256 708 → 200 ms; n = 1000, k = 100, B = 128 762 →
# 325 ms; n = 200, k = 20, B = 256 122 → 49 ms. At 2^20 some were faster, others slower (n = 500,
# B = 256: 339 ms; n = 1000: 615 ms)
_DFT_CHUNK_CPU = 1 << 21
# ... and the product tree on CPU in chunks of rows of at most this many coefficients (4 MiB):
# its time per row grew with the batch too. Forward + backward of _k_subset_tree, medians of 3
# interleaved, against no chunks: n = 1000, k = 50, B = 128 933 → 708 ms; n = 2000, k = 20, B = 128
# 656 → 328 ms; n = 1000, k = 10, B = 256 165 → 140 ms; n = 500, k = 10, B = 128 (not split)
# 36 → 39 ms. 2^18 did better on the first (446 ms) but cost n = 500, k = 10 25 % (45 ms)
_TREE_CHUNK_CPU = 1 << 19
_DFT_KEEP = 1 << 20     # kernels up to this many entries (8 MiB) are saved for the backward, not recomputed


def _dft_frequencies(n: int, k: int) -> int:
    """Odd number N of DFT points: S = Σx ∈ [0, n] has no alias of k (nor S₋ᵢ of k − 1) when
    N > max(k, n − k); odd, so no frequency sits at ω = −1 (where 1 + p(ω − 1) vanishes)."""
    N = max(k, n - k) + 1
    return N + 1 - N % 2


def _dft_consts(n: int, k: int, dtype: torch.dtype, device: torch.device):
    key = (n, k, dtype, str(device))
    if key not in _DFT_CONSTS:
        N = _dft_frequencies(n, k)
        m = torch.arange((N + 1) // 2, dtype=dtype, device=device)  # conjugate half of the spectrum
        ang = 2 * math.pi * m / N
        weight = torch.where(m == 0, 1.0, 2.0).to(dtype) / N            # Re Σ over all N points
        one = torch.ones_like(ang)
        om = torch.polar(one, ang)
        omk = torch.polar(one, -ang * k) * weight
        # 2(1 − cos), ω − 1, ω̄, ω^{−k} w, ω^{1−k} w, ω^{−k} (ω − 1) w, ω^{1−k} (ω − 1) w
        _DFT_CONSTS[key] = (2.0 - 2.0 * torch.cos(ang), om - 1.0, om.conj(), omk, omk * om, omk * (om - 1.0), omk * om * (om - 1.0))
    return _DFT_CONSTS[key]


def _dft_phi(p: torch.Tensor, om1: torch.Tensor) -> torch.Tensor:
    """The characteristic function ``φ(ω) = Π_i (1 + p_i (ω − 1))`` of S = Σx at the DFT's
    frequencies, ``(B, M)``."""
    return torch.addcmul(torch.ones((), dtype=om1.dtype), p.to(om1.dtype)[:, None, :], om1[:, None]).prod(2)


def _dft_kernel(pq: torch.Tensor, D2: torch.Tensor) -> torch.Tensor:
    """``K_i(ω) = |f_i(ω)|⁻² = 1 / (1 − 2 p_i q_i (1 − cos ω))``, laid out ``(B, M, n)``."""
    return torch.addcmul(torch.ones((), dtype=pq.dtype), pq[:, None, :], D2[:, None], value=-1.0).reciprocal_()


class _KSubsetDFT(torch.autograd.Function):
    """k-subset marginals through the characteristic function of S = Σx (a DFT).

    With ``p = σ(θ − τ)`` for any τ, ``μ_i = p_i P(S₋ᵢ = k − 1) / P(S = k)`` where S (S₋ᵢ) sums
    independent Bernoulli(p) (without item i): the ratio does not depend on τ, which is only
    chosen (:func:`_bernoulli_tilt`: Σp ≈ k) to make P(S = k) large, so that the DFT's
    rounding error (about 2e-16 / P(S = k)) stays small. With
    ``f_i(ω) = 1 + p_i(ω − 1)``, ``φ = Π_i f_i`` and ``K_i = |f_i|⁻² = 1 / (1 − 2p_i(1 − p_i)(1 − cos))``:

        P(S = k) = (1/N) Σ_ω φ(ω) ω^{−k},   P(S₋ᵢ = k − 1) = (1/N) Re Σ_ω φ(ω) ω^{1−k} conj(f_i(ω)) K_i(ω)

    over N points (half of them by conjugate symmetry): one batched product and one batched
    matrix product with the real kernel K. The backward is the covariance (symmetric) applied
    to g, i.e. the derivative of μ along ``θ + s g`` at fixed τ, in closed form (the same
    kernel and its square). ``ok`` flags the rows where P(S = k) ≥ 1e-3; the caller must
    replace the others (their μ is not meaningful).
    """

    @staticmethod
    def forward(ctx, theta, k, exact):
        B, n = theta.shape
        D2, om1, omc, c0, c1, h0, h1 = _dft_consts(n, k, theta.dtype, theta.device)
        m, tau, p, q = _bernoulli_tilt(theta, k, exact)
        pq = p * q
        # (B, M, n) layout, frequencies before items: the products below take the form
        # (B, c, M) @ (B, M, n), which batched matmul runs ~2× faster than (B, n, M) @ (B, M, c)
        phi = _dft_phi(p, om1)
        K = _dft_kernel(pq, D2)
        Pk = (phi * c0).real.sum(1)
        y = phi * c1                                                 # conj(f_i) = 1 − p_i + p_i ω̄
        S = torch.bmm(torch.stack([y.real, (y * omc).real], 1), K)   # (B, 2, n)
        t = torch.lerp(S[:, 0], S[:, 1], p)                          # P(S₋ᵢ = k − 1)
        ok = Pk >= _DFT_MIN_PK                                       # (NaN compares False)
        Pk = torch.where(ok, Pk, 1.0)
        mu = p * t / Pk[:, None]
        ctx.k = k
        kept = [K] if K.numel() <= _DFT_KEEP else []  # K (B, M, n) is recomputed when large
        ctx.save_for_backward(p, pq, phi, t, Pk, mu, ok, theta, m, tau, *kept)
        ctx.mark_non_differentiable(ok)
        return mu, ok

    @staticmethod
    def backward(ctx, g, _):
        p, pq, phi, t, Pk, mu, ok, theta, m, tau, *kept = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: the tree at the same τ (P(S = k) ≥ 1e-3 on ok rows)
            g = torch.where(ok[:, None], g, torch.zeros_like(g))
            return _hessian_vjp(lambda x: _log_e_k_at(x, ctx.k, m, tau, ok), theta, g), None, None
        D2, om1, omc, c0, c1, h0, h1 = _dft_consts(p.shape[1], ctx.k, p.dtype, p.device)
        K = kept[0] if kept else _dft_kernel(pq, D2)
        v = pq * g                                                   # ṗ along g
        # R(ω) = Σ_j ṗ_j / f_j(ω);  φ̇ = φ (ω − 1) R;  Ṗ(S = k) = Re Σ φ ω^{−k} (ω − 1) R
        RR = torch.bmm(torch.stack([v - v * p, v * p], 1), K.transpose(1, 2))
        R = RR[:, 0] + omc * RR[:, 1]
        Pdot = (phi * h0 * R).real.sum(1, keepdim=True)
        # p_i Ṗ(S₋ᵢ = k − 1) = p_i Re Σ e (R / f_i − ṗ_i / f_i²),  e = φ ω^{1−k} (ω − 1)
        e = phi * h1
        eR = e * R
        e1 = e * omc
        S1 = torch.bmm(torch.stack([eR.real, (eR * omc).real], 1), K)
        S2 = torch.bmm(torch.stack([e.real, e1.real, (e1 * omc).real], 1), K * K)
        q = 1.0 - p
        T1 = torch.lerp(S1[:, 0], S1[:, 1], p)
        T2 = q * q * S2[:, 0] + 2.0 * pq * S2[:, 1] + p * p * S2[:, 2]
        out = (v * t + p * (T1 - v * T2) - mu * Pdot) / Pk[:, None]
        return torch.where(ok[:, None], out, 0.0), None, None


_BAND = 800.0  # e^-800 underflows float64 (the k-subset exp family always runs in float64)


def _log_e_k_banded(theta: torch.Tensor, k: int) -> torch.Tensor:
    """``log e_k(exp θ̃)`` with ``θ̃ = clamp(θ − m, −C, C)``, ``m`` midway between the k-th and
    (k+1)-th largest θ per row, ``C = 800``, differentiated as if ``θ̃ = θ``: its gradient (the
    marginals) and Hessian equal those of ``log e_k(exp θ)`` to within ``2n·e^{−C}`` (0 in
    float64), for any range of θ. Its value is not ``log e_k(exp θ)``.

    An item above ``m + C`` lies ``C`` above the (k+1)-th largest, so swapping it into a subset
    that lacks it (for one of the at least one items there at or below the (k+1)-th largest)
    multiplies the weight by ``e^C``: it is in the subset with probability ``1 − n·e^{−C}``
    before and after clamping; symmetrically below ``m − C``. Without the clamp, logits spread
    wider than the log-space tree's "log 0" (``−1e30``) would give wrong marginals.
    """
    n = theta.shape[-1]
    if k >= n:
        return log_elementary_symmetric(theta, k)
    th = theta.detach()
    m = _topk_midpoint(th, k)
    # the clamped value with the identity's derivatives: μ and the Hessian are evaluated at θ̃
    # (differentiating through the clamp would zero the marginals of clamped items, which are ~1
    # above the band); θ − θ.detach() is exactly 0 for finite θ, so θ̃'s value is exact
    # (θ − m first: near 1e20, m ± 800 would round to m itself)
    banded = torch.clamp(th - m, -_BAND, _BAND) + (theta - th)
    return log_elementary_symmetric(banded, k)


_K_SUBSET_STAGES = ((True, False), (True, True), (False, False), (False, True))
"""The k-subset routes in the order rows fall back through them, as ``(dft, exact)``: the DFT
(accurate where P(S = k) ≥ 1e-3) at the cheap, then at the exact tilt of
:func:`_bernoulli_tilt`; the product tree (accurate unless P(S = k) underflows) at the cheap,
then at the exact tilt; past the last, the log-space tree. The cheap tilt comes first for the
tree too: it costs no synchronization, and the tree is accurate at any tilt that keeps P(S = k)
above underflow."""
_TREE_STAGE = 2


def _k_subset_route(th: torch.Tensor, k: int, stage: int) -> torch.Tensor:
    """Marginals by stage ``stage`` of :data:`_K_SUBSET_STAGES`; rows where it is not accurate
    by the next stages (the last: μ = ∇ log e_k by autograd through the log-space tree)."""
    if stage == len(_K_SUBSET_STAGES):
        return _autograd_gradient(lambda x: _log_e_k_banded(x, k), th)
    dft, exact = _K_SUBSET_STAGES[stage]
    mu, ok = (_KSubsetDFT if dft else _KSubsetMarginals).apply(th, k, exact)
    if bool(ok.all()):
        return mu
    rows = (~ok).nonzero()[:, 0]
    return mu.index_put((rows,), _k_subset_route(th[rows], k, stage + 1))


def _k_subset_tree(th: torch.Tensor, k: int) -> torch.Tensor:
    """Marginals by the product tree (:func:`_k_subset_route`), on CPU in chunks of rows of at
    most ``_TREE_CHUNK_CPU`` tree coefficients (:func:`_tree_size`)."""
    per = max(1, _TREE_CHUNK_CPU // _tree_size(th.shape[1], k)) if th.device.type == "cpu" else th.shape[0]
    if th.shape[0] <= per:
        return _k_subset_route(th, k, _TREE_STAGE)
    per = -(-th.shape[0] // -(-th.shape[0] // per))  # chunks of about equal size
    return torch.cat([_k_subset_route(part, k, _TREE_STAGE) for part in th.split(per)])


def _tree_size(n: int, k: int) -> int:
    """Coefficients of one row's product tree: level l holds ⌈n / 2^l⌉ polynomials of degree
    at most min(2^l, k)."""
    total, nodes, width = 0, n, 1
    while True:
        total += nodes * (min(width, k) + 1)
        if nodes == 1:
            return total
        nodes, width = -(-nodes // 2), 2 * width


def _autograd_gradient(fn, x: torch.Tensor) -> torch.Tensor:
    """``∇ₓ Σ fn(x)`` by autograd; differentiable (``create_graph``) when ``x`` requires grad
    and grad mode is on, otherwise a plain tensor, also under ``no_grad`` and ``inference_mode``.
    Grad mode is read here, before :func:`_differentiates` turns inference mode off (which
    turns grad mode on): under ``no_grad``, a view of a parameter still reports
    ``requires_grad`` but is not recorded, and taking it as the leaf raised "not used in the
    graph"."""
    return _gradient_of(fn, x, x.requires_grad and torch.is_grad_enabled())


@_differentiates
def _gradient_of(fn, x: torch.Tensor, track: bool) -> torch.Tensor:
    leaf = x if track else x.detach().requires_grad_(True)
    with torch.enable_grad():
        (g,) = torch.autograd.grad(fn(leaf).sum(), leaf, create_graph=track)
    return g


def _dft_half(n: int, k: int) -> int:
    """M, the number of DFT frequencies evaluated (half of N, by conjugate symmetry)."""
    return (_dft_frequencies(n, k) + 1) // 2


def _dft_chunk_rows(n: int, k: int, device: torch.device) -> int:
    """Rows per DFT call: the kernel (rows, M, n) stays within ``_DFT_CHUNK`` entries
    (``_DFT_CHUNK_CPU`` on CPU)."""
    budget = min(_DFT_CHUNK, _DFT_CHUNK_CPU) if device.type == "cpu" else _DFT_CHUNK
    return max(1, budget // (n * _dft_half(n, k)))


def _use_dft(n: int, k: int) -> bool:
    M = _dft_half(n, k)
    return n * M <= _DFT_MAX_SIZE or M <= _DFT_PER_K * min(k, n - k)


def _k_subset_dft(th: torch.Tensor, k: int) -> torch.Tensor:
    """Marginals by the DFT (:func:`_k_subset_route`) in chunks of rows: its kernel is (rows, M, n)."""
    parts = [_k_subset_route(part, k, 0) for part in th.split(_dft_chunk_rows(th.shape[1], k, th.device))]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


@register_fast_path("k_subset", "exp_family")
def k_subset_marginals(theta: torch.Tensor, polytope: Polytope) -> torch.Tensor:
    """Marginals ``μ = ∇_θ log Σ_{|x|=k} exp(θᵀx)``: ``μ_i = w_i e_{k−1}(w_{−i}) / e_k(w)``, ``w = e^θ``.

    Both routes work with the tilted Bernoulli vector ``p = σ(θ − τ)``, ``Σp ≈ k``
    (:func:`_bernoulli_tilt`): ``μ_i = p_i P(S₋ᵢ = k − 1) / P(S = k)`` for its size S = Σx.

    - For small problems (n · N/2 ≤ 8192, N ≈ max(k, n − k) DFT points; n up to about 128) and
      for k not far from n/2 (N/2 ≤ 5 min(k, n − k)), through the characteristic function of S
      (:class:`_KSubsetDFT`): a handful of batched ops of size (B, N/2, n), closed-form
      backward.
    - Otherwise (large n with k or n − k small), and for rows where the DFT is not accurate
      to ~1e-13 (P(S = k) < 1e-3), by up and down passes of a polynomial product tree over the
      laws ``q_i + p_i z`` (of their complements for k > n/2; ⌈log₂ n⌉ batched levels,
      O(n min(k, n − k)²) work) in linear space, with a closed-form backward: the Jacobian is
      the covariance (symmetric), so the vector-Jacobian product is the forward-mode
      derivative of μ along the incoming gradient, one more pass over the tree with tangents
      (:class:`_KSubsetMarginals`). The tree's numbers are
      probabilities, so any range of u/t works; rows where P(S = k) underflows (none seen)
      use the log-space tree (:func:`log_elementary_symmetric`, μ by autograd).

    Computed in float64 whatever the input dtype; the result has the input's dtype.
    """
    k = int(polytope.params["k"])
    n = theta.shape[-1]
    if k == n:  # one point: ∂x/∂θ = 0, but x stays in the graph like any relaxation's
        return 0.0 * theta + 1.0
    # lower precisions run in float64 (p = σ(θ − τ) keeps ~e^-745 instead of ~e^-103) and are cast back
    th = theta if theta.dtype == torch.float64 else theta.double()
    if th.shape[0] == 0 or not _use_dft(n, k):
        return _k_subset_tree(th, k).to(theta.dtype)
    return _k_subset_dft(th, k).to(theta.dtype)


# ------------------------------------------------------------------------------------------
# Birkhoff polytope with entropy: Sinkhorn
# ------------------------------------------------------------------------------------------


def _column_error(c: torch.Tensor, log_b: torch.Tensor, at_most: bool) -> torch.Tensor:
    """Per column, how far the column sums ``c`` are from the constraint: ``|c − 1|``, or for
    ``c ≤ 1`` (dual ``β = −log b ≥ 0``) the KKT residual ``max(c − 1, min(β, 1 − c))``: over
    capacity, or a positive dual on a column with room left."""
    if not at_most:
        return (c - 1.0).abs()
    return torch.maximum(c - 1.0, torch.minimum(-log_b, 1.0 - c))


def _marginal_error(X: torch.Tensor, log_b: torch.Tensor, at_most: bool = False) -> torch.Tensor:
    """Per sample, the largest deviation of a row sum of ``X`` from 1 or of a column sum from
    its constraint (a sweep leaves the columns exact, a Newton step the rows: the error sits on
    the other side)."""
    return torch.maximum((X.sum(2) - 1.0).abs().amax(1), _column_error(X.sum(1), log_b, at_most).amax(1))


def _newton_duals(theta: torch.Tensor, log_b: torch.Tensor, tol: float, max_iter: int, at_most: bool = False):
    """Damped Newton on the column duals ``β``: rows are normalised exactly (``α(β)``), and
    ``c(β) = Xᵀ1 = 1`` is solved with the Jacobian ``dc/d log b = diag(c) − XᵀX`` (+ ``11ᵀ/n``
    for the shift invariance), halving the step per sample until the column error decreases.
    ``at_most``: columns sum to at most 1 (``log b ≤ 0``); the step moves only the columns over
    capacity or with a positive dual (projected Newton: the others' rows and columns of the
    Jacobian are the identity's, and the step is clipped at ``log b = 0``)."""
    B, n, m = theta.shape
    eye = torch.eye(m, dtype=theta.dtype, device=theta.device)
    ridge = 1e3 * torch.finfo(theta.dtype).eps * m

    def state(lb):
        la = -torch.logsumexp(theta + lb[:, None, :], dim=2)
        X = torch.exp(theta + la[:, :, None] + lb[:, None, :])
        c = X.sum(1)
        return la, X, c, _column_error(c, lb, at_most).amax(1)

    log_a, X, c, err = state(log_b)
    active = err > tol                        # samples still being improved
    steps = 0
    for steps in range(1, max_iter + 1):
        if not bool(active.any()):
            break
        J = torch.diag_embed(c) + ridge * eye - X.transpose(1, 2) @ X
        rhs = c - 1.0
        if at_most:
            moving = (log_b < 0) | (c > 1.0)  # (B, m): the other columns keep log b = 0
            J = torch.where(moving[:, :, None] & moving[:, None, :], J, eye)
            rhs = rhs * moving
            J = J + moving.all(1).to(J.dtype)[:, None, None] / m  # every column moving: singular along 1
        else:
            J = J + 1.0 / n
        delta = _linalg.solve(J, rhs[..., None])[..., 0]
        step = torch.ones(B, 1, dtype=theta.dtype, device=theta.device)
        for _ in range(12):
            lb = log_b - step * delta
            if at_most:
                lb = lb.clamp_max(0.0)
            la, Xn, cn, errn = state(lb)
            worse = ~(errn < err) & active
            if not bool(worse.any()):
                break
            step = torch.where(worse[:, None], step / 2, step)
        improved = (errn < err) & active
        active = improved & (errn > tol)      # no progress: at the arithmetic's resolution, stop
        keep = improved[:, None]              # accept per sample only where it improved
        log_b = torch.where(keep, lb, log_b)
        log_a = torch.where(keep, la, log_a)
        X = torch.where(keep[..., None], Xn, X)
        c = torch.where(keep, cn, c)
        err = torch.where(keep[:, 0], errn, err)
    return log_a, log_b, steps


# Sinkhorn's schedule: the convergence test every _CHECK_EVERY sweeps, and from the first test
# that fails after _NEWTON_AFTER sweeps, up to _NEWTON_ITER Newton steps. Starting Newton after 10
# sweeps instead of 50: forward passes 1.4-2.6x faster for Birkhoff n = 5 to 100 and matchings at
# t = 1 to 0.03, no sample left unconverged either way (benchmarks/sinkhorn_schedule.py).
_CHECK_EVERY, _NEWTON_AFTER, _NEWTON_ITER = 10, 10, 30


def sinkhorn(theta: torch.Tensor, tol: float | None = None, max_iter: int = 2000, check_every: int = _CHECK_EVERY,
             on_failure: str = "warn", return_error: bool = False, newton_after: int = _NEWTON_AFTER,
             newton_iter: int = _NEWTON_ITER, forbidden: bool = False, at_most: bool = False):
    """Log-domain Sinkhorn: the doubly stochastic ``X = diag(a) exp(θ) diag(b)``, ``θ: (B, n, n)``.

    ``at_most=True``: ``θ: (B, n, m)``, rows sum to 1 and columns to at most 1 (the entropic
    assignment of n rows to m ≥ n columns, ``argmax ⟨θ, X⟩ − Σ X log X`` on that polytope):
    the column step is ``b = min(1, 1 / Σ_i a_i exp(θ_ij))``, exact coordinate ascent on the dual
    with ``β = −log b ≥ 0``, and a column with room left keeps ``b = 1``.

    Stops when every row and column sum is within ``tol`` of 1; the
    tolerance is floored at ``100·eps·max|θ|``, the resolution of the log-domain arithmetic. When
    the logits span more than 50, ε-scaling warm-starts the duals from ``θ/4^j`` (a few hundred
    sweeps at most per stage), which keeps low temperatures from stalling. When a stage has not
    converged after ``newton_after`` sweeps, up to ``newton_iter`` damped Newton steps on the
    duals finish it (linear convergence becomes quadratic); in the last stage, sweeps resume if
    they do not. ``forbidden=True``: θ has ``-inf`` entries (zeros of X), left out of the
    tolerance floor and of the spread.
    """
    X, bad, _ = _sinkhorn_duals(theta, tol, max_iter, on_failure, check_every, newton_after, newton_iter,
                                forbidden, at_most)
    return (X, bad) if return_error else X


def _sinkhorn_tol(dtype: torch.dtype, tol: float | None) -> float:
    """Sinkhorn's row/column-sum tolerance as asked for (the default of the dtype for None),
    before :func:`_sinkhorn_duals` floors it at the arithmetic's resolution."""
    return (1e-12 if dtype == torch.float64 else 1e-6) if tol is None else tol


def _sinkhorn_duals(theta: torch.Tensor, tol: float | None, max_iter: int, on_failure: str,
                    check_every: int = _CHECK_EVERY, newton_after: int = _NEWTON_AFTER, newton_iter: int = _NEWTON_ITER,
                    forbidden: bool = False, at_most: bool = False):
    """:func:`sinkhorn`'s iterations and report: ``(X, bad, log_b)``."""
    B, n, m = theta.shape
    eps = torch.finfo(theta.dtype).eps
    tol = _sinkhorn_tol(theta.dtype, tol)
    # θ may hold -inf (forbidden entries: exact zeros of X); every row and column needs a finite one
    low = theta.masked_fill(theta == -math.inf, math.inf).amin((1, 2)) if forbidden else theta.amin((1, 2))
    scale = float(torch.maximum(theta.amax((1, 2)).abs(), low.abs()).max()) if theta.numel() else 0.0
    tol = max(tol, 100 * eps * scale)
    # the spread in float64: in float32 the difference of logits near the dtype's range overflows
    spread = float((theta.amax((1, 2)).double() - low.double()).max()) if theta.numel() else 0.0
    lam = 1.0 if spread <= 50 else 50.0 / spread
    log_a = torch.zeros(B, n, dtype=theta.dtype, device=theta.device)
    log_b = torch.zeros(B, m, dtype=theta.dtype, device=theta.device)
    err = torch.full((B,), math.inf, dtype=theta.dtype, device=theta.device)
    total = 0
    while True:
        final = lam >= 1.0
        th = theta if final else theta * lam
        stage_tol = tol if final else 1e-3
        budget = max_iter if final else min(300, max_iter)
        for it in range(1, budget + 1):
            total += 1
            log_a = -torch.logsumexp(th + log_b[:, None, :], dim=2)
            log_b = -torch.logsumexp(th + log_a[:, :, None], dim=1)
            if at_most:
                log_b = log_b.clamp_max(0.0)
            if it % check_every == 0 or it == budget:
                X = torch.exp(th + log_a[:, :, None] + log_b[:, None, :])
                err = _marginal_error(X, log_b, at_most)
                if bool((err <= stage_tol).all()):
                    break
                if it >= newton_after:
                    # Sinkhorn converges linearly, slowly when X is near a permutation: finish
                    # with Newton's method on the column duals (quadratic convergence)
                    log_a, log_b, newton_steps = _newton_duals(th, log_b, stage_tol, newton_iter, at_most)
                    total += newton_steps
                    X = torch.exp(th + log_a[:, :, None] + log_b[:, None, :])
                    err = _marginal_error(X, log_b, at_most)
                    if bool((err <= stage_tol).all()):
                        break
                    if final:
                        newton_after = budget + 1      # Newton did not finish: keep sweeping
        if final:
            break
        new_lam = min(1.0, 4.0 * lam)
        log_a, log_b = log_a * (new_lam / lam), log_b * (new_lam / lam)
        lam = new_lam
    X = torch.exp(theta + log_a[:, :, None] + log_b[:, None, :])
    err = _marginal_error(X, log_b, at_most)
    bad = ~(err <= tol)  # NaN included
    if bool(bad.any()) and on_failure in ("warn", "raise"):
        _report("Sinkhorn", bad, B, f"row/column-sum error up to {err.max().item():.1e} after {total} sweeps "
                "(raise max_iter, or use a higher temperature)", on_failure)
    return X, bad, log_b


class _Sinkhorn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, theta, tol, max_iter, on_failure, holder, forbidden=None, at_most=False):
        th = theta.detach() if forbidden is None else theta.detach().masked_fill(forbidden, -math.inf)
        X, bad, log_b = _sinkhorn_duals(th, tol, max_iter, on_failure, forbidden=forbidden is not None,
                                        at_most=at_most)
        holder.append(bad)
        # columns at capacity: a positive dual β = −log b, or full to the tolerance with β = 0,
        # where forced entries that tie fill a column exactly (x has a kink there: this takes the
        # side the interior-point solver takes). Columns with room left of 1e-9 are not full: at
        # t = 0.1 with tied integer utilities their slack is e^(−20) and real
        # (test_torch_solver_backward_drops_constraints_the_polish_found_inactive)
        if at_most:
            full = 1.0 - 10 * max(_sinkhorn_tol(X.dtype, tol), 100 * torch.finfo(X.dtype).eps)
            ctx.tight = (log_b < 0) | (X.sum(1) >= full)
        else:
            ctx.tight = None
        ctx.save_for_backward(X)
        return X

    @staticmethod
    def backward(ctx, G):
        # a differentiable function of the output X: second derivatives by autograd through X
        # dX = X ⊙ (dθ − dα 1ᵀ − 1 dβᵀ) with the marginal constraints; J is symmetric, so
        # the VJP is X ⊙ (G − u 1ᵀ − 1 vᵀ) with (I − XᵀX + 11ᵀ/n) v = c − Xᵀ r, u = r − X v.
        # Columns with room left (at_most) have dβ = 0: v = 0 there, the system on the others.
        (X,) = ctx.saved_tensors
        with autocast_off(X.device):  # backward runs under the caller's autocast state
            if X.dtype == torch.float64:
                return _Sinkhorn._vjp(X, G, ctx.tight), None, None, None, None, None, None
            # in float32 the ridge below (1e3·eps·n: 6e-3 at n = 50) and the cancellation in
            # I − XᵀX cost 1e-3 relative error in the gradient; one n × n solve in float64 does not
            vjp = _Sinkhorn._vjp(X.double(), G.double(), ctx.tight)
            return vjp.to(G.dtype), None, None, None, None, None, None

    @staticmethod
    def _vjp(X: torch.Tensor, G: torch.Tensor, tight: torch.Tensor | None = None) -> torch.Tensor:
        m = X.shape[-1]
        XG = X * G
        r = XG.sum(2)
        c = XG.sum(1)
        eye = torch.eye(m, dtype=X.dtype, device=X.device)
        # (I − XᵀX) is singular along 1 (fixed by + 11ᵀ/n) and, when X is (nearly) a permutation,
        # along more directions, where the VJP does not depend on v; a tiny ridge picks one v.
        ridge = 1e3 * torch.finfo(X.dtype).eps * m
        M = eye * (1.0 + ridge) - X.transpose(1, 2) @ X
        rhs = c - (X.transpose(1, 2) @ r[..., None])[..., 0]
        if tight is None:
            M = M + 1.0 / m
        else:
            # rows put mass on the columns with room left, so the tight block is diagonally
            # dominant (nonsingular) whenever m > n; the other columns' v is 0
            M = torch.where(tight[:, :, None] & tight[:, None, :], M, eye)
            rhs = rhs * tight
        v = _linalg.solve(M, rhs[..., None])[..., 0]
        u = r - (X @ v[..., None])[..., 0]
        return X * (G - u[:, :, None] - v[:, None, :])


_SINKHORN_FLOAT32_FLOOR = 1e-4  # coarsest row/column-sum accuracy accepted in float32


@register_fast_path("birkhoff", "entropy")
def birkhoff_sinkhorn(theta: torch.Tensor, polytope: Polytope, tol: float | None = None, max_iter: int = 2000,
                      on_failure: str = "fallback", forbidden: torch.Tensor | None = None) -> torch.Tensor:
    """Gumbel-Sinkhorn: log-domain Sinkhorn (O(n²) per sweep) with an implicit backward (one
    (n × n) linear solve per sample). Sinkhorn slows down sharply at low temperature; rows that
    have not converged after ``max_iter`` sweeps are, by default (``on_failure="fallback"``),
    re-solved by the batched interior-point solver (``backend="torch"``, exact to ~1e-10);
    ``"warn"`` keeps the approximate rows with a warning, ``"raise"`` raises. float32 inputs
    run in float32 while its resolution allows row/column sums within 1e-4 (``max|θ| ≲ 8``),
    otherwise in float64. Options: tol, max_iter, on_failure. Forbidden entries (``forbidden``,
    from ``-inf`` in u) are exact zeros of the kernel: no ε-scaling over their stand-in value."""
    return _sinkhorn_path(theta, polytope, tol, max_iter, on_failure, forbidden, at_most=False)


@register_fast_path("matching", "entropy")
def matching_sinkhorn(theta: torch.Tensor, polytope: Polytope, tol: float | None = None, max_iter: int = 2000,
                      on_failure: str = "fallback", forbidden: torch.Tensor | None = None) -> torch.Tensor:
    """Entropic assignment of n rows to m ≥ n columns: ``X = diag(a) exp(θ) diag(b)`` with rows
    summing to 1 and columns to at most 1, ``b ≤ 1`` (Sinkhorn whose column step is capped at
    ``b = 1``: exact coordinate ascent on the dual, ε-scaling and a projected Newton finish as for
    Birkhoff); implicit backward on the columns at capacity (one (m × m) solve per sample).
    Options, fallback to the interior-point solver, float32 and forbidden entries as for
    :func:`birkhoff_sinkhorn`; ``m = n`` is the Birkhoff polytope and takes its algorithm."""
    return _sinkhorn_path(theta, polytope, tol, max_iter, on_failure, forbidden, at_most=theta.shape[2] > theta.shape[1])


def _sinkhorn_path(theta: torch.Tensor, polytope: Polytope, tol: float | None, max_iter: int, on_failure: str,
                   forbidden: torch.Tensor | None, at_most: bool) -> torch.Tensor:
    if on_failure not in ("fallback", "warn", "raise"):
        raise InputError(f"on_failure must be 'fallback', 'warn' or 'raise', got {on_failure!r}")
    # a common offset off (Σx = n on P): the tolerance floor is relative to max |θ| (Birkhoff n = 5
    # at u + 1e7: X off by 4e-8)
    theta = polytope._centered(theta.flatten(1), None if forbidden is None else forbidden.flatten(1)).reshape(theta.shape)
    # entries as far below the others as relax's stand-in for -inf (a manual mask: -1e9) are
    # kernel zeros too: their weight is below e^-40 either way, and left in, they set the
    # tolerance floor and the ε-scaling's range (Birkhoff n = 8 at -1e9: sums resolved to 4e-5,
    # x off by 2e-5, 3x the time)
    zeros = forbidden
    low = far_below(theta.detach().flatten(1))[0].reshape(theta.shape)
    # and so are entries far below the others once those far above are left out (a pair forced
    # by +1e9 in a row masked by -1e9; needed_apart checks a permutation avoids them all)
    apart = needed_apart(theta.detach().flatten(1), None if forbidden is None else forbidden.flatten(1),
                         polytope._flat_argmax, known=low.flatten(1))
    if apart is not None:
        low = low | apart.reshape(theta.shape)
    if bool(low.any()):
        zeros = low if forbidden is None else forbidden | low
    if theta.dtype != torch.float64 and theta.numel():
        # the log-domain arithmetic resolves row/column sums to ~100·eps·max|θ| (the tolerance
        # floor in `sinkhorn`): in float32 that passes 1e-4 once max|θ| > 8 (t ≲ 0.3 at unit
        # logits) and reached 5e-2 at t = 1e-3 for n = 50; such inputs are computed in float64
        th = theta.detach() if zeros is None else theta.detach().masked_fill(zeros, 0.0)
        floor = 100 * torch.finfo(theta.dtype).eps * float(th.abs().max())
        if floor > _SINKHORN_FLOAT32_FLOOR:
            # float64's default tolerance too: the result is rounded to float32, but the backward
            # amplifies the error of X near a permutation (n = 50, t = 1e-3: at 1e-7 the gradient
            # was off by 1.2 %, at 1e-12 by 2e-5, in the same time)
            return _sinkhorn_path(theta.double(), polytope, tol, max_iter, on_failure, forbidden,
                                  at_most).to(theta.dtype)
    if zeros is not None:
        # a sample with a whole row forbidden (or column, where every column is used) has no
        # structure left: it keeps the finite utilities (relax then reports the empty face, or
        # far-below entries get their exact weights), not a kernel row of zeros
        empty = zeros.all(2).any(1)
        if not at_most:
            empty = empty | zeros.all(1).any(1)
        if bool(empty.any()):
            zeros = zeros & ~empty[:, None, None]
            # their far-below entries, raised together to just below the others (the relaxation
            # is unchanged, to e^-40): left at -1e9 / t they cost x its low digits (Birkhoff n = 3
            # at t = 0.1 with 60 % masked: off by 9.1e-7)
            rows = (empty & low.flatten(1).any(1)).nonzero()[:, 0]
            if rows.numel():
                fr = None if forbidden is None else forbidden[rows].flatten(1)
                shifted = shift_far_below(theta[rows].flatten(1), low[rows].flatten(1), fr)
                theta = theta.index_put((rows,), shifted.reshape((-1,) + theta.shape[1:]))
    # entries far above the others (u = 1e9 to force a pair) come down to where they are only just
    # far above (x moves by less than e^-40): at 1e9 the log-domain sums resolved x to 9e-7. (After
    # the empty rows are restored: their far-below entries are needed, so not negligible. The
    # fallback below solves the original θ.)
    lowered = lower_far_above(theta.flatten(1), None if zeros is None else zeros.flatten(1)).reshape(theta.shape)
    holder: list[torch.Tensor] = []
    X = _Sinkhorn.apply(lowered, tol, max_iter, "silent" if on_failure == "fallback" else on_failure, holder,
                        zeros, at_most)
    bad = holder[0]
    if on_failure == "fallback" and bool(bad.any()):
        from .regularizers import get_regularizer
        from .solver import relax_torch

        idx = bad.nonzero().reshape(-1)
        X = X.index_put((idx,), relax_torch(theta[idx], polytope, get_regularizer("entropy"),
                                            forbidden=None if forbidden is None else forbidden[idx]))
    return X


# ------------------------------------------------------------------------------------------
# Birkhoff polytope and matchings with the quadratic and the binary entropy: Newton on the dual
# ------------------------------------------------------------------------------------------


@register_fast_path("birkhoff", "quadratic")
def birkhoff_projection(theta: torch.Tensor, polytope: Polytope, tol: float | None = None, max_iter: int = 100,
                        on_failure: str = "fallback", forbidden: torch.Tensor | None = None) -> torch.Tensor:
    """Euclidean projection onto the doubly stochastic matrices, ``argmin ½‖X − θ‖²`` (a sparse
    relaxed permutation): semismooth Newton on the dual multipliers of the row and column sums,
    ``X = [θ − a1ᵀ − 1bᵀ]₊``, one (n × n) Cholesky factorization per step, quadratic
    convergence to rows and columns summing to 1 within ``tol`` (default 1e-12;
    :mod:`convex_sst._assignment_projection`). Exact Jacobian: the projector onto the matrices
    supported on X's support whose rows and columns sum to 0. Batched, any device, computed in
    float64. Rows on a permutation are found by two argmax calls; rows whose logits span more
    than 100 (low temperature, where Newton needs a continuation) are projected by Wolfe's
    minimum-norm-point algorithm over Hungarian argmaxes instead (CPU, row by row; exact).
    Options: tol, max_iter (Newton steps per continuation stage), on_failure: rows not
    converged after ``max_iter`` are by default (``"fallback"``) solved again by the
    interior-point solver; ``"warn"`` keeps them with a warning, ``"raise"`` raises."""
    return _assignment_dual_newton(theta, polytope, "quadratic", tol, max_iter, on_failure, forbidden)


@register_fast_path("matching", "quadratic")
def matching_projection(theta: torch.Tensor, polytope: Polytope, tol: float | None = None, max_iter: int = 100,
                        on_failure: str = "fallback", forbidden: torch.Tensor | None = None) -> torch.Tensor:
    """Euclidean projection onto the n × m assignments (rows sum to 1, columns to at most 1,
    ``m ≥ n``): :func:`birkhoff_projection` with the column multipliers kept ``≥ 0`` (projected
    Newton: a column with room left keeps ``b = 0``); the Jacobian's column constraints are
    those at capacity. Options as for :func:`birkhoff_projection`."""
    return _assignment_dual_newton(theta, polytope, "quadratic", tol, max_iter, on_failure, forbidden)


@register_fast_path("birkhoff", "binary_entropy")
@register_fast_path("matching", "binary_entropy")
def assignment_binary_entropy(theta: torch.Tensor, polytope: Polytope, tol: float | None = None, max_iter: int = 100,
                              on_failure: str = "fallback", forbidden: torch.Tensor | None = None) -> torch.Tensor:
    """``argmax ⟨θ, X⟩ − Σ X log X + (1 − X) log(1 − X)`` over the doubly stochastic matrices or
    the n × m assignments: Newton's method on the same dual as :func:`birkhoff_projection`, with
    ``X = σ(θ − a1ᵀ − 1bᵀ)`` (a smooth dual, log(1 + e^v) per entry); implicit Jacobian
    ``diag(w) − diag(w) Aᵀ (A diag(w) Aᵀ)⁺ A diag(w)``, ``w = X(1 − X)``. Batched, any device,
    computed in float64. Options as for :func:`birkhoff_projection`."""
    return _assignment_dual_newton(theta, polytope, "binary_entropy", tol, max_iter, on_failure, forbidden)


def _assignment_dual_newton(theta: torch.Tensor, polytope: Polytope, reg: str, tol: float | None, max_iter: int,
                            on_failure: str, forbidden: torch.Tensor | None) -> torch.Tensor:
    at_most = theta.shape[2] > theta.shape[1]  # a matching with more columns than rows: capped columns

    def solve(flat, tol, holder, low, vertex, at_vertex):
        shape = (-1,) + tuple(theta.shape[1:])
        return _AssignmentProjection.apply(flat.reshape(shape), reg, at_most, tol, int(max_iter), holder,
                                           low.reshape(shape), vertex.reshape(shape), at_vertex)

    return _dual_newton_path(theta, polytope, reg, tol, max_iter, on_failure, forbidden, solve,
                             ("Newton's method on the assignment duals", "row/column sums"),
                             hull_span=_ASSIGNMENT_HULL_SPAN if reg == "quadratic" else None)


# the same for Birkhoff polytopes and matchings (their own crossing: at t = 0.1, n = 30, where
# logits span about 65, Wolfe's algorithm was 0.65x): B = 128 (n = 100: 32), fwd+bwd, 1.6-3.9x
# faster at t <= 0.03 on n = 5 to 100 and matchings 10 x 15 (1.0x at t = 0.03 for n = 5)
_ASSIGNMENT_HULL_SPAN = 100.0


def _dual_newton_path(theta: torch.Tensor, polytope: Polytope, reg: str, tol: float | None, max_iter: int,
                      on_failure: str, forbidden: torch.Tensor | None, solve, names: tuple[str, str],
                      hull_span: float | None = None, hull_band: float = 1.0) -> torch.Tensor:
    """What the Newton paths on a dual (assignments, DAG paths, arborescences) share around ``solve(flat, tol,
    holder, low, vertex, at_vertex)`` (any subset of the rows): the options, forced entries and
    manual masks brought to moderate numbers, the quadratic's rows on a vertex, the entries left
    out of the continuation's span, and the rows that did not converge (``names``: the method and
    what it balances, for the report). With ``hull_span``, the rows not on a vertex whose logits
    (those entries left out) span more than it go to Wolfe's minimum-norm-point algorithm
    instead (:func:`_newton_or_hull`, with ``hull_band``)."""
    if on_failure not in ("fallback", "warn", "raise"):
        raise InputError(f"on_failure must be 'fallback', 'warn' or 'raise', got {on_failure!r}")
    if theta.shape[0] == 0:
        return theta * 0.0
    fb = None if forbidden is None else forbidden.flatten(1)
    # forced entries (+1e9) down to just far above, manual masks that every structure needs up to
    # just below the others (as for projection_by_argmax): the multipliers then stay moderate
    # numbers, which X = ψ(θ − a − b) needs for its digits
    flat = _shift_masks(lower_forced(theta.flatten(1), fb, polytope._flat_argmax), fb)
    # a common offset off (Σx constant on P): the tolerances are relative to |θ| (Birkhoff, the
    # quadratic, θ = u + 1e7: x off by 6e-7)
    flat = polytope._centered(flat, fb)
    th = flat.detach().double()
    # the quadratic: rows that project onto a structure (most of them at low temperature) by two
    # argmax calls, exact at any scale of θ (at 1e10 and beyond, x = θ − a − b keeps no digits); a
    # vertex needs logits at least 1 apart
    if SEPARABLE[reg].vertices and float((th.amax(1) - th.amin(1)).max()) >= 1.0:
        vertex, at_vertex = at_a_vertex(th, polytope._flat_argmax)
    else:
        vertex, at_vertex = torch.zeros_like(th), torch.zeros_like(th[:, 0], dtype=torch.bool)
    low = avoidable_below(th, polytope._flat_argmax, fb)
    low = low if fb is None else low | fb
    x, bad = _newton_or_hull(flat, polytope, solve, _default_tol(torch.float64) if tol is None else float(tol), low,
                             vertex, at_vertex, hull_span, on_failure, hull_band)
    x = x.reshape(theta.shape)
    if bool(bad.any()):
        if on_failure == "fallback":
            from .regularizers import get_regularizer
            from .solver import relax_torch

            idx = bad.nonzero().reshape(-1)
            return x.index_put((idx,), relax_torch(theta[idx], polytope, get_regularizer(reg),
                                                   forbidden=None if forbidden is None else forbidden[idx]))
        _report(names[0], bad, theta.shape[0], f"{names[1]} not within the tolerance after max_iter = {max_iter} steps",
                on_failure)
    return x


def _newton_or_hull(flat: torch.Tensor, polytope: Polytope, solve, tol: float, low: torch.Tensor, vertex: torch.Tensor,
                    at_vertex: torch.Tensor, hull_span: float | None, on_failure: str,
                    hull_band: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, bad)``: ``solve`` on the rows (as in :func:`_dual_newton_path`), but rows not at a
    vertex whose logits span more than ``hull_span`` (low temperature, where Newton would need a
    continuation) projected by Wolfe's algorithm over the polytope's argmax
    (:func:`~convex_sst._min_norm_point.project_onto_hull`; exact, its own ``max(1000, 3·size)``
    major cycles). Its failures join ``bad`` (for the fallback) or are reported under its name.
    With ``hull_band > 1``, where the rows split between the two, those that span within a
    factor ``hull_band`` of ``hull_span`` go with the larger group (each method costs a batch
    something whatever its number of rows, so a batch near the threshold paid for both)."""
    hull = torch.zeros_like(at_vertex)
    if hull_span is not None:
        top, bottom = _row_extremes(flat.detach(), low)
        span = top - bottom
        hull = ~at_vertex & (span > hull_span)
        newton = ~at_vertex & ~hull
        if hull_band > 1.0 and bool(hull.any()) and bool(newton.any()):
            near = ~at_vertex & (span > hull_span / hull_band) & (span <= hull_span * hull_band)
            hull = (hull & ~near) | (near if int(hull.sum()) >= int(newton.sum()) else torch.zeros_like(near))
    holder: list[torch.Tensor] = []
    if not bool(hull.any()):
        x = solve(flat, tol, holder, low, vertex, at_vertex)
        return x, holder[0]
    rows, rest = hull.nonzero()[:, 0], (~hull).nonzero()[:, 0]
    bad = torch.zeros_like(at_vertex)
    x = torch.zeros_like(flat)
    if rest.numel():
        xr = solve(flat[rest], tol, holder, low[rest], vertex[rest], at_vertex[rest])
        x = x.index_put((rest,), xr.reshape(len(rest), -1))
        bad = bad.index_put((rest,), holder[0])
    failed: list[torch.Tensor] = []

    def report(b: torch.Tensor, total: int, detail: str) -> None:  # b: of `rows`
        if on_failure == "fallback":  # to the torch solver, with Newton's rows
            failed.append(b.to(bad.device))
        else:
            _report("Wolfe's minimum-norm-point algorithm (the quadratic at low temperature)",
                    torch.zeros_like(bad).index_put((rows,), b.to(bad.device)), len(bad), detail, on_failure)

    shape = tuple(polytope.shape)
    xh = project_onto_hull(flat[rows], lambda s: polytope._argmax_rows(s.reshape((-1,) + shape)).reshape(s.shape),
                           TOL, max(1000, 3 * polytope.size), report)
    if failed:
        bad = bad.index_put((rows,), failed[0])
    return x.index_put((rows,), xh), bad


# ------------------------------------------------------------------------------------------
# Matrix-tree theorems
# ------------------------------------------------------------------------------------------


def log_partition_arborescences(logw: torch.Tensor, root: int) -> torch.Tensor:
    """``log Σ_T Π_{(h→m)∈T} w[h, m]`` over arborescences rooted at ``root``: ``(B, n, n) -> (B,)``.

    ``logw`` holds log arc weights, with a very negative finite value for absent arcs. The
    directed matrix-tree theorem gives ``det L̂`` (in-degree Laplacian without the root); we
    compute it by Gaussian elimination of the non-root vertices in the style of
    Grassmann–Taksar–Heyman: the Schur complement of a Laplacian is a Laplacian with weights
    ``w'[h, m] = w[h, m] + w[h, k] w[k, m] / d_k``, and each pivot ``d_k`` is the sum of the
    current weights into ``k``, never a difference. In log space this is ``logaddexp`` and
    ``logsumexp`` only: no cancellation, no overflow, any range of logits.
    """
    B, n, _ = logw.shape
    perm = [root] + [v for v in range(n) if v != root]
    lw = logw[:, perm][:, :, perm]  # root first; eliminate from the last vertex backwards
    total = torch.zeros(B, dtype=logw.dtype, device=logw.device)
    for m in range(n, 1, -1):
        k = m - 1
        col = lw[:, :k, k]  # weights into k from the other remaining vertices (no self-loop)
        logd = torch.logsumexp(col, dim=1)
        total = total + logd
        # diagonal entries pick up self-loops here, but they are never read (see above)
        upd = col[:, :, None] + lw[:, None, k, :k] - logd[:, None, None]
        lw = _log_add(lw[:, :k, :k], upd)
    return total


def _log_add(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``log(eᵃ + eᵇ)`` elementwise, as a log-sum-exp with the (detached) max shifted out rather
    than ``logaddexp``: its (double) backward is a softmax, which stays finite next to the
    "log 0" entries of absent arcs; and elementwise ops rather than ``logsumexp`` over a stacked
    pair, whose reduction costs ~10x more on these small arrays."""
    m = torch.maximum(a, b).detach()
    return m + torch.log(torch.exp(a - m) + torch.exp(b - m))


# Samples whose reduced Laplacian has a condition estimate above this go to the log-space
# elimination: the explicit-inverse / Cholesky routes lose about cond · 1e-16 (measured on K₁₀,
# 1e-11 at the limit). The matrix-tree paths run in float64 whatever the input dtype: with
# float32's 1e-7 the same error bound would need a limit near 1e2, which even near-uniform
# logits exceed (n = 20, θ ~ N(0, 1): 1011 of 1024 samples), and every batch with one such
# sample pays the elimination's fixed cost.
_COND_LIMIT = 1e5


class _Log1pExp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.logaddexp(x, torch.zeros((), dtype=x.dtype, device=x.device))

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * torch.sigmoid(x)  # differentiable again: sigmoid's derivatives are finite everywhere


def log1p_exp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 + e^x)`` elementwise, to full precision at any x, with derivatives of every order
    finite at any x. (``softplus`` returns x itself above its threshold 20, an error of up to
    e⁻²⁰ ≈ 2e-9 in value and in gradient; ``logaddexp(x, 0)`` has a NaN second derivative
    below x ≈ −710.)"""
    return _Log1pExp.apply(x)


def _neg(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).min / 1e4  # "log 0" that keeps sums and gradients finite


def _checked_inverse(L: torch.Tensor, limit: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L⁻¹, bad)`` for ``L: (B, r, r)``; ``bad`` flags samples that are singular or whose
    1-norm condition number exceeds ``limit``; their inverse is set to zero."""
    K, info = _linalg.inv_ex(L)
    cond = L.abs().sum(1).amax(1) * K.abs().sum(1).amax(1)
    bad = (info != 0) | ~torch.isfinite(cond) | (cond > limit)
    return torch.where(bad[:, None, None], torch.zeros_like(K), K), bad


def _laplacian_vjp(g, w, K, mu, laplacian, pairs) -> torch.Tensor:
    """``gᵀ ∂μ/∂θ`` for matrix-tree marginals ``μ = w ∘ pairs(K)``, ``K = L(w)⁻¹``:
    ``g ∘ μ − w ∘ pairs(K L(g ∘ w) K)`` (the Laplacian is linear in the weights)."""
    Y = K @ laplacian(g * w) @ K
    return g * mu - w * pairs(Y)


class _ArcMarginals(torch.autograd.Function):
    """``μ[h, m] = w[h, m] (K[m, m] − K[m, h])`` with ``K`` the inverse of the reduced in-degree
    Laplacian (zero row and column at the root), and its closed-form vector-Jacobian product.

    With ``∂L̂/∂w[h, m] = (e_m − e_h) e_mᵀ``, the Jacobian of μ in θ = log w is
    ``δ μ[h, m] − w[h, m] w[h', m'] (K[m, m'] − K[m, h']) (K[m', m] − K[m', h])``; contracted with
    ``g`` it is ``g ∘ μ − w ∘ (Y[m', m'] − Y[m', h'])`` with ``Y = K X K`` and
    ``X = diag(colsum G) − G``, ``G = g ∘ w``: two (n × n) products per sample.
    """

    @staticmethod
    def forward(ctx, logw, mask, root, limit):
        w, K, mu, bad = _ArcMarginals.marginals(logw.detach(), mask, root, limit)
        ctx.root, ctx.limit = root, limit
        ctx.save_for_backward(w, K, mu, logw, mask)
        ctx.mark_non_differentiable(bad)
        return mu, bad

    @staticmethod
    def marginals(logw: torch.Tensor, mask: torch.Tensor, root: int, limit: float):
        """``(w, K, μ, bad)``; differentiable by autograd in ``logw`` (used for second derivatives)."""
        n = logw.shape[-1]
        # columns shifted to max 0 (exact: every arborescence has one arc into each non-root vertex)
        w = torch.exp(logw - logw.amax(1, keepdim=True).detach()) * mask
        keep = torch.tensor([v for v in range(n) if v != root], device=logw.device)
        Lr = (torch.diag_embed(w.sum(1)) - w)[:, keep][:, :, keep]
        Kr, bad = _checked_inverse(Lr, limit)
        K = Kr.new_zeros(w.shape)
        K[:, keep[:, None], keep[None, :]] = Kr
        return w, K, w * _ArcMarginals.pairs(K), bad

    @staticmethod
    def pairs(Y: torch.Tensor) -> torch.Tensor:
        """``Y[m, m] − Y[m, h]`` at ``[h, m]``."""
        return torch.diagonal(Y, dim1=1, dim2=2)[:, None, :] - Y.transpose(1, 2)

    @staticmethod
    def backward(ctx, g, _):
        w, K, mu, logw, mask = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: the same formula, recomputed differentiably from logw
            w, K, mu, _ = _ArcMarginals.marginals(logw, mask, ctx.root, ctx.limit)
        return _laplacian_vjp(g, w, K, mu, lambda G: torch.diag_embed(G.sum(1)) - G, _ArcMarginals.pairs), None, None, None


_CUT_MARGIN = 50.0
"""Weights within e^50 above :class:`_EdgeMarginals`' cut to 0 (log(1/tiny) below the largest),
next to weights below it, send a sample to the exact elimination."""

# :class:`_EdgeMarginals` keeps the rows D̂_e of every edge, B·|E|·n numbers, from the forward
# pass to the backward up to this many (64 MB in float64); beyond, it keeps Y (B·n²) and forms
# them in blocks of about _EDGE_BLOCK numbers, twice in the backward pass. Measured (spanning
# trees, exp_family, B = 128, forward + backward): n = 100 held 1.5 GB and took 2.1 + 1.3 s,
# in blocks 60 MB and 0.2 + 1.2 s; below the cut, blocks made the backward 1.5-6x slower
_EDGE_ROWS_KEPT = 1 << 23
_EDGE_BLOCK = 1 << 19


class _EdgeMarginals(torch.autograd.Function):
    """Undirected edge marginals ``μ_e = w_e b_eᵀ L⁺ b_e`` (``b_e = e_i − e_j``, ``L`` the
    Laplacian of ``w = exp θ``) and their closed-form vector-Jacobian product.

    The vertex ``v`` of largest weighted degree is grounded: ``K = (L + e_v e_vᵀ)⁻¹`` satisfies
    ``K b = L⁺ b + α 1`` for ``b ⊥ 1``, so ``b_eᵀ K b_e = b_eᵀ L⁺ b_e``. With the Cholesky factor
    ``K⁻¹ = C Cᵀ`` and ``Z = C⁻¹``, ``μ_e = ‖√w_e D_e‖²`` for the columns ``D_e = Z b_e`` (a
    difference of two columns of Z): no ``K_ii + K_jj − 2 K_ij``, whose cancellation is what
    limits accuracy at low temperature. (Grounding a heavy vertex rather than a fixed one, and
    the difference form, cut the samples of K₁₀ at t = 0.1 that need the slow exact fallback
    by 4x, and the kept ones' vector-Jacobian products are exact to 1e-11 instead of 1e-7.)

    The Jacobian in θ = log w is ``δ_ef μ_e − (D̂_eᵀ D̂_f)²`` (``D̂_e = √w_e D_e``), so
    ``gᵀJ = g ∘ μ − (D̂_fᵀ H D̂_f)_f`` with ``H = Σ_e g_e D̂_e D̂_eᵀ``: two small products.
    Samples whose Jacobi-scaled condition estimate exceeds ``limit`` (or whose factorization
    fails) are flagged; their μ is zero. O(n³ + n²·|E|) time per sample; the rows D̂_e are kept
    for the backward pass up to _EDGE_ROWS_KEPT numbers, beyond that formed in blocks of edges.
    """

    @staticmethod
    def forward(ctx, theta, index, n, limit):
        Y, sw, bad = _EdgeMarginals.factor(theta.detach(), index, n, limit)
        ctx.index, ctx.n, ctx.limit = index, n, limit
        ctx.blocks = Y.shape[0] * sw.shape[1] * n > _EDGE_ROWS_KEPT
        ctx.mark_non_differentiable(bad)
        if not ctx.blocks:  # the rows D̂_e for the backward pass, all at once
            Dh = _EdgeMarginals.rows(Y, sw, index, 0, sw.shape[1])
            mu = Dh.square().sum(2)
            ctx.save_for_backward(Dh, mu, theta)
            return mu, bad
        mu = torch.cat([Dh.square().sum(2) for Dh in _EdgeMarginals.chunks(Y, sw, index)], 1)
        ctx.save_for_backward(Y, sw, mu, theta)
        return mu, bad

    @staticmethod
    def factor(theta: torch.Tensor, index, n: int, limit: float):
        """``(Y, √w, bad)`` with ``Y = Zᵀ`` (``D_e`` = its rows i − j); differentiable by autograd
        in ``theta`` (used for second derivatives)."""
        B = theta.shape[0]
        d = theta - theta.amax(1, keepdim=True).detach()
        # √w (D_e √w_e stays O(1)); weights that would be subnormal are 0: μ_e = (√w_e)² R_e must
        # see the same w_e as the Laplacian, and a subnormal keeps too few bits for that. A sample
        # with weights on both sides of that cut, the kept ones within e^50 of it, is flagged:
        # dropped next to kept weights of about their size, they moved μ by up to 0.7 under a good
        # condition estimate (one edge 700 above the rest). Further apart, a dropped edge's μ is
        # below n·e^-50 (its endpoints are joined by kept edges e^50 heavier, or not at all, and
        # the factorization fails)
        log_tiny = math.log(torch.finfo(theta.dtype).tiny)
        kept = d.detach() > log_tiny
        straddle = (~kept).any(1) & (kept & (d.detach() <= log_tiny + _CUT_MARGIN)).any(1)
        sw = torch.where(kept, torch.exp(0.5 * d), 0.0)
        w = sw * sw
        L = _EdgeMarginals.laplacian(w, index, n)
        dg = torch.diagonal(L, dim1=1, dim2=2)
        dg.scatter_add_(1, dg.argmax(1, keepdim=True), torch.ones(B, 1, dtype=w.dtype, device=w.device))  # ground
        C, info = torch.linalg.cholesky_ex(L)
        eye = torch.eye(n, dtype=theta.dtype, device=theta.device)
        Y = torch.linalg.solve_triangular(C.mT, eye.expand_as(L), upper=True)  # Zᵀ: D_e = its rows i − j
        # condition number of the Jacobi-scaled matrix S L S (S = diag(L)^(-1/2); Cholesky's
        # accuracy is scaling invariant): ‖S L S‖₁ times ‖S⁻¹ K S⁻¹‖₂ ≤ ‖Z S⁻¹‖_F²
        sq = dg.sqrt()[:, :, None]
        cond = ((L.abs() @ (1.0 / sq)) / sq).amax((1, 2)) * (Y * sq).square().sum((1, 2))
        bad = (info != 0) | ~(cond <= limit) | straddle  # NaN counts as bad
        if bool(bad.any()):
            Y = torch.where(bad[:, None, None], 0.0, Y)
        # row-major (solve_triangular returns Y column-major): the rows D̂_e gather rows of Y, in
        # blocks twice more in the backward pass (n = 100, B = 128: 0.36 + 1.33 s column-major,
        # 0.13 + 0.82 s row-major, forward + backward)
        return Y.contiguous(), sw, bad

    @staticmethod
    def rows(Y: torch.Tensor, sw: torch.Tensor, index, lo: int, hi: int) -> torch.Tensor:
        """The rows ``√w_e D_eᵀ = √w_e (Y[i] − Y[j])`` of the edges ``lo:hi``: ``(B, hi − lo, n)``."""
        i, j = index[1][lo:hi], index[2][lo:hi]
        return (Y.index_select(1, i) - Y.index_select(1, j)) * sw[:, lo:hi, None]

    @staticmethod
    def chunks(Y: torch.Tensor, sw: torch.Tensor, index):
        """:meth:`rows` for consecutive blocks of edges of about _EDGE_BLOCK numbers each."""
        B, n = Y.shape[0], Y.shape[1]
        m = sw.shape[1]
        c = max(1, min(m, _EDGE_BLOCK // max(1, B * n)))
        for lo in range(0, m, c):
            yield _EdgeMarginals.rows(Y, sw, index, lo, lo + c)

    @staticmethod
    def laplacian(G: torch.Tensor, index, n: int) -> torch.Tensor:
        """The Laplacian of edge weights ``G: (B, m)``: ``(B, n, n)``."""
        return G.new_zeros(G.shape[0], n * n).index_add_(1, index[0], torch.cat([G, G, -G, -G], 1)).view(-1, n, n)

    @staticmethod
    def backward(ctx, g, _):
        if torch.is_grad_enabled():  # create_graph=True: the same formula, recomputed differentiably from θ
            Y, sw, _ = _EdgeMarginals.factor(ctx.saved_tensors[-1], ctx.index, ctx.n, ctx.limit)
            Dh = _EdgeMarginals.rows(Y, sw, ctx.index, 0, sw.shape[1])
            return _EdgeMarginals.pullback(g, Dh.square().sum(2), lambda: (Dh,)), None, None, None
        if not ctx.blocks:
            Dh, mu, _ = ctx.saved_tensors
            return _EdgeMarginals.pullback(g, mu, lambda: (Dh,)), None, None, None
        Y, sw, mu, _ = ctx.saved_tensors  # by blocks of edges, each formed twice
        return _EdgeMarginals.pullback(g, mu, lambda: _EdgeMarginals.chunks(Y, sw, ctx.index)), None, None, None

    @staticmethod
    def pullback(g: torch.Tensor, mu: torch.Tensor, blocks) -> torch.Tensor:
        """``gᵀJ = g ∘ μ − (D̂_fᵀ H D̂_f)_f`` with ``H = Σ_e g_e D̂_e D̂_eᵀ`` (n × n; O(n² m)), from
        ``blocks()``: the rows D̂_e in consecutive blocks of edges (called twice)."""
        H, lo = g.new_zeros(()), 0
        for Dh in blocks():
            H = H + (Dh * g[:, lo:lo + Dh.shape[1], None]).mT @ Dh
            lo += Dh.shape[1]
        return g * mu - torch.cat([((Dh @ H) * Dh).sum(2) for Dh in blocks()], 1)


def _edge_index(polytope: Polytope, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Index arrays of :class:`_EdgeMarginals` for the polytope's edge list (cached per device):
    flat positions ``[ii, jj, ij, ji]`` in ``(n, n)`` for the Laplacian, and the endpoints i, j."""
    key = ("edge_marginal_index", str(device))
    if key not in polytope.cache:
        n = int(polytope.params["n"])
        E = torch.as_tensor(polytope.data["E"], device=device)
        i, j = E[:, 0], E[:, 1]
        polytope.cache[key] = (torch.cat([i * (n + 1), j * (n + 1), i * n + j, j * n + i]), i, j)
    return polytope.cache[key]


def _inverse_marginals(logw: torch.Tensor, mask: torch.Tensor, root: int, limit: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Arc marginals from the explicit inverse (fast), and which samples are too ill-conditioned.

    ``μ[h, m] = w[h, m] (L̂⁻¹[m, m] − L̂⁻¹[m, h])`` (Koo et al. 2007), one batched inverse, the
    backward in closed form (:class:`_ArcMarginals`). Samples whose
    1-norm condition number exceeds ``limit`` (or that are singular in floating point) are
    flagged; their rows of μ are zero and must be replaced.
    """
    return _ArcMarginals.apply(logw, mask.to(logw.dtype), root, limit)


def _clip_range(theta: torch.Tensor, max_range: float | None) -> torch.Tensor:
    """Logits of each sample clipped from below at ``max θ − max_range`` (none when None)."""
    if max_range is None:
        return theta
    top = theta.flatten(1).amax(1).detach()
    return theta.clamp_min((top - float(max_range)).reshape((-1,) + (1,) * (theta.dim() - 1)))


def _shift_masks(flat: torch.Tensor, exclude: torch.Tensor | None) -> torch.Tensor:
    """``flat: (B, d)`` with its manual masks (entries far below the others; ``exclude``:
    forbidden stand-ins and coordinates unused on P, left out and refilled) raised together to
    just below the others (:func:`~convex_sst._forbidden.shift_far_below`; no gradient). Where
    every structure needs some, log Z sat near -1e9/t and the log-space marginals kept only
    ulp(1e10) = 2e-6 (t = 0.1: correlated k-subsets off by 1.3e-6, arborescences by 4.8e-7,
    spanning trees by 2.4e-7; now ~1e-12); elsewhere their weight stays below e^-40."""
    if not bool((flat.detach() <= -SLACK * (flat.shape[1] + 1)).any()):  # no entry that low: the common case
        return flat
    probe = flat.detach() if exclude is None else flat.detach().masked_fill(exclude, 0.0)
    low = far_below(probe)[0]
    low = low if exclude is None else low & ~exclude
    return shift_far_below(flat, low, exclude) if bool(low.any()) else flat


def _tree_marginals(theta: torch.Tensor, mask: torch.Tensor, root: int, max_range: float | None,
                    pack, method: str) -> torch.Tensor:
    """Arc marginals ``μ = ∇_θ log Z(θ)`` (exact autograd; double backward when θ requires grad).

    ``method="auto"`` uses the explicit inverse where the reduced Laplacian is well conditioned
    (condition estimate below :data:`_COND_LIMIT`, so the error stays near 1e-11; callers pass
    float64) and the log-space elimination for the remaining samples.
    """
    if method not in ("auto", "inverse", "elimination"):
        raise InputError(f"method must be 'auto', 'inverse' or 'elimination', got {method!r}")
    t = _clip_range(theta, max_range)
    logw = pack(t).masked_fill(~mask, _neg(theta.dtype))

    def eliminate(logw: torch.Tensor) -> torch.Tensor:
        return _autograd_gradient(lambda x: log_partition_arborescences(x, root), logw) * mask

    if method == "elimination":
        return eliminate(logw)
    mu, bad = _inverse_marginals(logw, mask, root, _COND_LIMIT if method == "auto" else math.inf)
    if bool(bad.any()):
        mu_e = eliminate(logw[bad])
        mu = mu_e if bool(bad.all()) else mu.index_put((bad.nonzero()[:, 0],), mu_e)
    return mu


@register_fast_path("spanning_tree", "exp_family")
def spanning_tree_marginals(theta: torch.Tensor, polytope: Polytope, max_range: float | None = None,
                            method: str = "auto", forbidden: torch.Tensor | None = None) -> torch.Tensor:
    """Edge marginals of ``p(x) ∝ exp(θᵀx)`` over spanning trees (matrix-tree theorem).

    ``μ_e = w_e b_eᵀ L⁺ b_e`` with ``L`` the Laplacian of ``w = exp θ`` and ``b_e = e_i − e_j``,
    through one batched Cholesky factorization of the Laplacian with its heaviest vertex
    grounded, the backward in closed form (:class:`_EdgeMarginals`). ``method="auto"``
    (default) uses that where the scaled matrix's condition number is below 1e5 and, for the
    remaining samples, the cancellation-free log-space elimination
    :func:`log_partition_arborescences` on the symmetric digraph (spanning trees are the
    arborescences rooted at 0, ``μ_e = μ_{i→j} + μ_{j→i}``), so it is exact at any temperature
    (no clipping needed; tested at t = 1e-3 with |u| ~ 1e3); ``"inverse"`` / ``"elimination"``
    force one. ``max_range`` optionally clips logits to within that distance of their max, as
    the paper's code does; default None. Cost O(n³) per sample. Computed in float64 whatever
    the input dtype (see :data:`_COND_LIMIT`); the result has the input's dtype. ``forbidden``
    (from relax): the edges whose θ is the stand-in for -inf.
    """
    n = int(polytope.params["n"])
    if method not in ("auto", "inverse", "elimination"):
        raise InputError(f"method must be 'auto', 'inverse' or 'elimination', got {method!r}")
    if theta.dtype != torch.float64:
        return spanning_tree_marginals(theta.double(), polytope, max_range, method, forbidden).to(theta.dtype)
    # edges far above the others (u = 1e9 to force one) come down to where they are only just
    # far above (the marginals move by less than e^-40): at 1e9 the other weights underflowed
    # next to theirs, and the elimination resolved the marginals to 1e-8
    theta = _clip_range(_shift_masks(lower_forced(theta, forbidden, polytope._flat_argmax), forbidden), max_range)
    if method != "elimination":
        limit = _COND_LIMIT if method == "auto" else math.inf
        mu, bad = _EdgeMarginals.apply(theta, _edge_index(polytope, theta.device), n, limit)
        if not bool(bad.any()):
            return mu
        rows = bad.nonzero()[:, 0]
        return mu.index_put((rows,), spanning_tree_marginals(theta[rows], polytope, method="elimination",
                                                             forbidden=None if forbidden is None else forbidden[rows]))
    E = torch.as_tensor(polytope.data["E"], device=theta.device)
    i, j = E[:, 0], E[:, 1]
    # log-space elimination on the symmetric digraph: spanning trees correspond one-to-one, with
    # equal weight, to arborescences rooted at 0, so μ_e = μ_{i→j} + μ_{j→i}
    mask = torch.zeros(n, n, dtype=torch.bool, device=theta.device)
    mask[i, j] = True
    mask[j, i] = True

    def pack(t: torch.Tensor) -> torch.Tensor:
        sym = torch.zeros(t.shape[0], n, n, dtype=t.dtype, device=t.device)
        sym = sym.index_put((torch.arange(t.shape[0], device=t.device)[:, None], i[None, :], j[None, :]), t)
        return sym.index_put((torch.arange(t.shape[0], device=t.device)[:, None], j[None, :], i[None, :]), t)

    mu = _tree_marginals(theta, mask, 0, None, pack, "elimination")
    return mu[:, i, j] + mu[:, j, i]


def _spanning_tree_path(reg: str):
    def fn(theta: torch.Tensor, polytope: Polytope) -> torch.Tensor:
        n = int(polytope.params["n"])
        return spanning_tree_separable(theta.flatten(1), polytope.data["E"], n, reg).reshape(theta.shape)

    fn.__name__ = f"spanning_tree_{reg}"
    fn.__doc__ = (f"Spanning-tree SST with {reg}, exactly: the decomposition algorithm on the graphic matroid's "
                  "base polytope (capped-simplex roots and minimum cuts, see convex_sst._graphic_matroid), "
                  "block-diagonal Jacobian diag(d) − d dᵀ/Σd. Runs on the CPU in float64, the rows' "
                  "subproblems level by level.")
    return fn


for _reg in ("entropy", "binary_entropy", "quadratic"):
    register_fast_path("spanning_tree", _reg)(_spanning_tree_path(_reg))


# ------------------------------------------------------------------------------------------
# The quadratic on polytopes with a combinatorial argmax: Wolfe's minimum-norm-point algorithm
# ------------------------------------------------------------------------------------------

def projection_by_argmax(theta: torch.Tensor, polytope: Polytope, tol: float | None = None,
                         max_iter: int | None = None, on_failure: str = "warn",
                         forbidden: torch.Tensor | None = None) -> torch.Tensor:
    """Quadratic SST ``argmin_{x∈P} ½‖x − θ‖²`` with the polytope's argmax as the only oracle:
    Wolfe's minimum-norm-point algorithm (an active set of vertices; SparseMAP's solver), exact,
    with the Jacobian ``Dᵀ(DDᵀ)⁻¹D``, the projector onto the optimal face's affine hull (``D``:
    the final vertices' directions, completed to span that face). On the CPU in float64, row by
    row, one batched argmax per cycle (:mod:`convex_sst._min_norm_point`). Any polytope with a
    registered argmax can use it: ``register_fast_path(name, "quadratic")(projection_by_argmax)``.
    Options: tol (the gap relative to its rounding scale, default 1e-12), max_iter (major
    cycles; default 1000 or 3 per coordinate, whichever is more: near zero logits the solution
    mixes as many structures as P has dimensions, one cycle each), on_failure ('warn'|'raise')."""
    B = theta.shape[0]
    shape = tuple(polytope.shape)
    fb = None if forbidden is None else forbidden.flatten(1)
    # entries far above the others (u + 1e9 forcing a choice) come down to where they are only just
    # far above, and manual masks (-1e9) that every structure needs come up together: both leave the
    # projection unchanged (a vertex with fewer forced entries loses more than the quadratic can
    # gain; a common shift of entries whose sum is constant on the optimal face moves nothing), and
    # the affine weights are then solved among moderate numbers
    flat = _shift_masks(lower_forced(theta.flatten(1), fb, polytope._flat_argmax), fb)

    def argmax(scores: torch.Tensor) -> torch.Tensor:
        return polytope._argmax_rows(scores.reshape((-1,) + shape)).reshape(scores.shape[0], -1)

    def report(bad: torch.Tensor, total: int, detail: str) -> None:
        _report("Wolfe's minimum-norm-point algorithm", bad, total, detail, on_failure)

    cycles = max(1000, 3 * polytope.size) if max_iter is None else int(max_iter)
    x = project_onto_hull(flat, argmax, TOL if tol is None else float(tol), cycles, report)
    return x.reshape((B,) + shape)


# where the torch solver's flow formulations are large. Birkhoff, matchings, DAG paths and
# arborescences have Newton's method on their duals (above and below), faster than this from t = 1 on
register_fast_path("correlated_k_subset", "quadratic")(projection_by_argmax)


@register_fast_path("arborescence", "exp_family")
def arborescence_marginals(theta: torch.Tensor, polytope: Polytope, max_range: float | None = None,
                           method: str = "auto") -> torch.Tensor:
    """Arc marginals of ``p(x) ∝ exp(θᵀx)`` over arborescences of the complete digraph rooted at
    ``root`` (directed matrix-tree theorem, Tutte; Koo et al. 2007), ``μ = ∇ log Z`` with ``log Z``
    from :func:`log_partition_arborescences` (stable at any temperature). ``method="auto"``
    (default) takes the explicit inverse of the reduced Laplacian (:class:`_ArcMarginals`, closed-
    form backward) where it is well conditioned and the elimination elsewhere, as in
    :func:`spanning_tree_marginals`; ``max_range`` likewise. Cost O(n³) per sample. Computed in
    float64 whatever the input dtype; the result has the input's dtype.
    """
    if theta.dtype != torch.float64:
        return arborescence_marginals(theta.double(), polytope, max_range, method).to(theta.dtype)
    n = int(polytope.params["n"])
    r = int(polytope.params["root"])
    mask = torch.ones(n, n, dtype=torch.bool, device=theta.device)
    mask.fill_diagonal_(False)
    mask[:, r] = False  # no arcs into the root
    B = theta.shape[0]
    theta = _shift_masks(theta.reshape(B, n * n), (~mask).reshape(1, -1).expand(B, -1)).reshape(theta.shape)
    return _tree_marginals(theta, mask, r, max_range, lambda t: t, method)


# ------------------------------------------------------------------------------------------
# Paths in a DAG: dynamic programming
# ------------------------------------------------------------------------------------------


def _dag_flow_plan(polytope: Polytope, device: torch.device):
    key = ("dag flow plan", device)
    if key not in polytope.cache:
        polytope.cache[key] = flow_plan(int(polytope.params["n"]), polytope.data["A"], int(polytope.params["source"]),
                                        int(polytope.params["target"]), device)
    return polytope.cache[key]


# the quadratic's rows (not at a vertex) whose logits span more than this go to Wolfe's algorithm,
# where Newton would need its continuation: complete DAGs, B = 128, fwd+bwd, 1.7-7.9x faster at
# t <= 0.03 (n = 10, 30, 60) and 5.5x at t = 0.1 for n = 60; 0.87-1.0x at t = 0.1 for n = 10 and 30
_DAG_HULL_SPAN = 50.0


def dag_path_dual_newton(theta: torch.Tensor, polytope: Polytope, tol: float | None = None, max_iter: int = 100,
                         on_failure: str = "fallback", forbidden: torch.Tensor | None = None, *,
                         reg: str = "quadratic") -> torch.Tensor:
    """Separable regularizers on DAG paths (``argmax ⟨θ, x⟩ − f(x)`` over unit s–t flows): Newton's
    method on the vertex potentials, ``x = ψ(θ − Aᵀπ)`` with A the incidence matrix, one
    (k × k) Cholesky factorization of a weighted graph Laplacian per step
    (:mod:`convex_sst._flow_newton`); arcs on no s–t path are 0. The quadratic's rows that
    project onto a path are found by two argmax calls, as for :func:`birkhoff_projection`, and
    its rows whose logits span more than 50 (low temperature, where Newton would need a
    continuation) are projected by Wolfe's minimum-norm-point algorithm over longest paths
    (:func:`projection_by_argmax`'s solver; exact, its own ``max(1000, 3·#arcs)`` major cycles);
    the entropy and the binary entropy solve the reduced costs ``θ_e + d(u) − d(v)`` (d: the
    longest-path lengths from s; the same x), exact at any scale of θ. Implicit Jacobian;
    batched, any device, computed in float64. Options as for :func:`birkhoff_projection`."""
    plan = _dag_flow_plan(polytope, theta.device)

    def solve(flat, tol, holder, low, vertex, at_vertex):
        x = _FlowRelaxation.apply(flat[:, plan.arcs], plan, reg, tol, int(max_iter), holder, low[:, plan.arcs],
                                  vertex[:, plan.arcs], at_vertex)
        return torch.zeros_like(flat).index_copy(1, plan.arcs, x)  # arcs on no s–t path: 0

    return _dual_newton_path(theta, polytope, reg, tol, max_iter, on_failure, forbidden, solve,
                             ("Newton's method on the flow potentials", "flow conservation"),
                             hull_span=_DAG_HULL_SPAN if reg == "quadratic" else None)


def _for_regularizer(solver, polytope_name: str, reg: str):
    """``solver(..., reg=reg)`` as a fast path of ``(polytope_name, reg)`` (its options in the
    signature, where relax validates them)."""
    def path(theta: torch.Tensor, polytope: Polytope, tol: float | None = None, max_iter: int = 100,
             on_failure: str = "fallback", forbidden: torch.Tensor | None = None) -> torch.Tensor:
        return solver(theta, polytope, tol, max_iter, on_failure, forbidden, reg=reg)

    path.__name__ = f"{polytope_name}_{reg}"
    path.__doc__ = solver.__doc__
    return register_fast_path(polytope_name, reg)(path)


for _reg in ("entropy", "binary_entropy", "quadratic"):
    _for_regularizer(dag_path_dual_newton, "dag_path", _reg)


def arborescence_dual_newton(theta: torch.Tensor, polytope: Polytope, tol: float | None = None, max_iter: int = 100,
                             on_failure: str = "fallback", forbidden: torch.Tensor | None = None, *,
                             reg: str = "entropy") -> torch.Tensor:
    """The entropy, the binary entropy and the quadratic on arborescences (``argmax ⟨θ, x⟩ −
    f(x)`` over their convex hull): Newton's method on a dual with one multiplier per in-degree
    and one per set ``S`` of a working set of constraints ``x(E[S]) ≤ |S| − 1``, the violated
    sets found by Cunningham's minimum partition and added, the one with the most negative
    multiplier dropped (one a round), until x is in the polytope and optimal
    (:mod:`convex_sst._arborescence_newton`). Implicit Jacobian on the in-degrees and the final
    sets (the quadratic: on its support); the Newton steps batched (any device), the separation
    on the CPU (NumPy); computed in float64. Rows whose best tree beats the second best by more
    than 2e17 n² (logits of 1e25 and beyond) are that tree, proven to rounding
    (:func:`_arborescence_limit`). The quadratic's rows that project onto a tree are found by two
    argmax calls, and its rows whose logits span more than ``_ARBORESCENCE_HULL_SPAN + n / 3``
    (low temperature, where Wolfe's algorithm needs few trees) go to :func:`projection_by_argmax`.
    Options as for :func:`birkhoff_projection`."""
    root = int(polytope.params["root"])
    n = int(polytope.params["n"])

    def solve(flat, tol, holder, low, vertex, at_vertex):  # (vertex, at_vertex: the quadratic's)
        th = flat.detach().double().reshape(-1, n, n)
        if not SEPARABLE[reg].vertices:
            vertex, at_vertex = _arborescence_limit(th, root)
        x = _ArborescenceRelaxation.apply(flat.reshape(-1, n, n), root, reg, tol, int(max_iter), holder,
                                          low.reshape(-1, n, n), vertex.reshape(-1, n, n), at_vertex)
        return x.reshape(flat.shape)

    return _dual_newton_path(theta, polytope, reg, tol, max_iter, on_failure, forbidden, solve,
                             ("Newton's method on the arborescence duals", "in-degrees and forest constraints"),
                             hull_span=_ARBORESCENCE_HULL_SPAN + n / 3 if reg == "quadratic" else None,
                             hull_band=_ARBORESCENCE_HULL_BAND)


# the quadratic's rows (not at a tree) whose logits span more than this + n / 3 go to Wolfe's
# algorithm: where the two took the same time (fwd+bwd, B = 32, N(0, 1) logits over t), spans of
# about 4.5 at n = 10, 7-8 at n = 20, 11 at n = 30 and 16 at n = 50; at span 4 Newton was 1.6x,
# 2.8x, 4.5x and 12.8x faster, at span 24 (n = 10 to 30) 3-5x slower
_ARBORESCENCE_HULL_SPAN = 1.0
# where a batch's rows split between the two, those within this factor of the threshold go with
# the larger group: both methods cost a batch a fixed amount (Newton's steps and Wolfe's argmax
# calls are batched), and n = 10 at t = 1 (a quarter of the rows above the threshold) took 46 ms
# forward, against 27 by Newton alone and 35 by Wolfe alone
_ARBORESCENCE_HULL_BAND = 2.0


# logits spanning more than this are checked for rows that are the best tree to rounding
_LIMIT_SPAN = 1e12


def _arborescence_limit(theta: torch.Tensor, root: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tree, at_tree)`` for ``theta: (B, n, n)``: rows whose smooth relaxation is the best tree
    to rounding. Writing x ∈ P as a mix of trees with weight μ on the best one,
    ``⟨θ, tree − x⟩ ≥ Δ (1 − μ)`` (Δ: the best score less the second best) and
    ``|x − tree| ≤ 1 − μ``; optimality bounds ``⟨θ, tree − x⟩`` by f's range on P (below 2n²
    for both entropies), so ``|x − tree| ≤ 2n² / Δ``. Where that is below 1e-17 the tree is the
    answer in float64 (with a zero Jacobian): at logits of 1e25 and beyond ``x = ψ(θ − a − Λ)``
    would keep no digits. The second best is the best tree without one of the best one's arcs
    (n − 1 more trees, in one batched Chu–Liu/Edmonds call per row whose logits span more than
    _LIMIT_SPAN)."""
    B, n, _ = theta.shape
    tree = torch.zeros_like(theta)
    at = torch.zeros(B, dtype=torch.bool, device=theta.device)
    span = theta.flatten(1).amax(1) - theta.flatten(1).amin(1)
    rows = (span > _LIMIT_SPAN).nonzero()[:, 0].tolist()
    if not rows:
        return tree, at

    def score(W: np.ndarray, parent: np.ndarray) -> np.ndarray:  # -inf where a tree needs a removed arc
        b, m = np.nonzero(parent >= 0)
        return np.bincount(b, W[b, parent[b, m], m], minlength=len(W))

    W = theta.cpu().numpy()[rows]
    best = _chu_liu_edmonds_trees(W, root)
    for i, Wi, parent in zip(rows, W, best):
        mods = np.flatnonzero(parent >= 0)
        heads = parent[mods]
        top = float(Wi[heads, mods].sum())
        without = np.repeat(Wi[None], len(mods), 0)  # the best tree without one of its arcs, each
        without[np.arange(len(mods)), heads, mods] = -math.inf
        second = float(score(without, _chu_liu_edmonds_trees(without, root)).max())
        if top - second > 2e17 * n ** 2:
            tree[i, torch.as_tensor(heads), torch.as_tensor(mods)] = 1.0
            at[i] = True
    return tree, at


for _reg in ("entropy", "binary_entropy", "quadratic"):
    _for_regularizer(arborescence_dual_newton, "arborescence", _reg)


def log_partition_dag_paths(theta: torch.Tensor, polytope: Polytope) -> torch.Tensor:
    """``log Σ_{paths source→target} exp(θᵀx)`` for ``theta: (B, #arcs)``: the forward pass
    ``α[v] = logsumexp_{(u→v)} α[u] + θ_{u→v}``, ``α[source] = 0``, over the vertices in
    topological order (O(#arcs) per sample). Differentiable (twice) by autograd; its gradient,
    the backward pass of this dynamic program, is the arc marginals."""
    source, steps = _dag_plan(polytope)
    target = int(polytope.params["target"])
    B = theta.shape[0]
    alpha = {source: torch.zeros(B, dtype=theta.dtype, device=theta.device)}
    for v, arcs, tails in steps:
        idx = torch.as_tensor(arcs, device=theta.device)
        terms = torch.stack([alpha[u] for u in tails], 1) + theta[:, idx]
        alpha[v] = torch.logsumexp(terms, dim=1)
    return alpha[target]  # reachable: P would have been rejected as empty when it was loaded


@register_fast_path("dag_path", "exp_family")
def dag_path_marginals(theta: torch.Tensor, polytope: Polytope, forbidden: torch.Tensor | None = None) -> torch.Tensor:
    """Arc marginals ``μ = ∇_θ log Σ_paths exp(θᵀx)`` of ``p(path) ∝ exp(θᵀx)`` over the
    source–target paths of a DAG: the forward pass :func:`log_partition_dag_paths` and its
    backward pass by autograd (the forward–backward algorithm), O(#arcs) per sample, exact
    second derivatives. ``forbidden`` (from relax): the arcs whose θ is the stand-in for -inf.
    Computed in float64 whatever the input dtype. Path scores add up to
    ``n − 1`` logits, so logits beyond ``1e300 / n`` (the hard limit, to float64's precision)
    are scaled down to that first."""
    return _dp_marginals(log_partition_dag_paths, theta, polytope, forbidden, int(polytope.params["n"]))


def _dp_marginals(log_partition, theta: torch.Tensor, polytope: Polytope, forbidden: torch.Tensor | None,
                  terms: int) -> torch.Tensor:
    """``∇_θ log_partition(θ, polytope)`` by autograd through a log-space dynamic program
    (differentiable twice), in float64 whatever the input dtype. A structure's score adds up
    ``terms`` logits, so logits beyond ``1e300 / terms`` (the hard limit, to float64's
    precision) are scaled down to that first."""
    if theta.dtype != torch.float64:
        return _dp_marginals(log_partition, theta.double(), polytope, forbidden, terms).to(theta.dtype)
    # entries far above the others (u = 1e9 to force one) come down to where they are only just
    # far above (the marginals move by less than e^-40): at 1e9 the log-space sums resolved them
    # to 6e-8. Forbidden entries are left out of the rule (a row needing one is an error in
    # relax); entries far below the others are not (manual masks may be needed: every structure
    # uses one), except where needed_apart finds a structure with the most forced entries that
    # avoids them all
    fb = None if forbidden is None else forbidden.flatten(1)
    theta = _shift_masks(lower_forced(theta.flatten(1), fb, polytope._flat_argmax), fb).reshape(theta.shape)
    top = float(theta.detach().abs().max()) if theta.numel() else 0.0
    terms = max(terms, 1)
    if top > 1e300 / terms:
        theta = theta * ((1e300 / terms) / top)  # in this order: top · terms may overflow
    return _autograd_gradient(lambda x: log_partition(x, polytope), theta)


# ------------------------------------------------------------------------------------------
# Correlated k-subsets (k items of a sequence and their adjacent pairs): dynamic programming
# ------------------------------------------------------------------------------------------


def log_partition_subset_chain(theta: torch.Tensor, polytope: Polytope) -> torch.Tensor:
    """``log Σ_x exp(θᵀx)`` over the correlated k-subsets, ``theta: (B, 2n − 1)`` (items
    ``θ[:, :n]``, adjacent pairs ``θ[:, n:]``): the forward pass over the items with states
    (count c = 0..k, last item chosen or not),

        off_i[c] = logaddexp(off_{i−1}[c], on_{i−1}[c])
        on_i[c]  = θ_i + logaddexp(off_{i−1}[c − 1], on_{i−1}[c − 1] + θ_{n+i−1}),

    O(n k) per sample, differentiable twice by autograd; its gradient is the marginals of the
    items and pairs (the forward–backward algorithm)."""
    n, k = int(polytope.params["n"]), int(polytope.params["k"])
    B = theta.shape[0]
    neg = _neg(theta.dtype)
    items, pairs = theta[:, :n], theta[:, n:]
    off = torch.full((B, k + 1), neg, dtype=theta.dtype, device=theta.device)
    off[:, 0] = 0.0
    on = torch.full_like(off, neg)
    none = on[:, :1]
    for i in range(n):
        prev_on = on + pairs[:, i - 1:i] if i else on
        new_on = _logaddexp(off[:, :-1], prev_on[:, :-1]) + items[:, i:i + 1]
        off, on = _logaddexp(off, on), torch.cat([none, new_on], 1)
    return _logaddexp(off[:, k], on[:, k])


def _logaddexp(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``log(e^a + e^b)`` with finite derivatives of every order at "log 0" (``torch.logaddexp``'s
    second derivative is NaN where both are ``_neg``)."""
    return torch.logsumexp(torch.stack([a, b]), 0)


@register_fast_path("correlated_k_subset", "exp_family")
def correlated_k_subset_marginals(theta: torch.Tensor, polytope: Polytope,
                                  forbidden: torch.Tensor | None = None) -> torch.Tensor:
    """Marginals ``μ = ∇_θ log Σ_x exp(θᵀx)`` of ``p(x) ∝ exp(θᵀx)`` over the k-subsets of a
    sequence with their adjacent pairs, ``theta: (B, 2n − 1)``: ``μ[:, i]`` is the probability
    that item i is chosen, ``μ[:, n + i]`` that items i and i + 1 both are. The forward pass
    :func:`log_partition_subset_chain` and its backward pass by autograd, O(n k) per sample,
    exact second derivatives; computed in float64 whatever the input dtype."""
    return _dp_marginals(log_partition_subset_chain, theta, polytope, forbidden, 2 * int(polytope.params["n"]) - 1)
