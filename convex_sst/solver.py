"""A batched primal-dual interior-point solver in torch for any declared polytope (``backend="torch"``).

Solves, for every row of ``θ = u / t``,

    min_w  −θᵀx + Σ_i f(x_i)   s.t.  Ā w = b̄,  L ≤ w ≤ U,      w = (z, s) = (x, aux, slacks)

which is the canonical form of the polytope with a slack per multi-variable inequality
(``A_ub z + s = b_ub``, ``s ≥ 0``) and equality rows reduced to an independent subset.
Bounds at the ends of an entropy's domain are dropped (its gradient keeps iterates strictly
inside); variables that have neither curvature nor a bound get their implied bounds from LPs
once, so degenerate formulations (free auxiliary variables, non-unique optimal aux) are fine.

Each iteration is a damped Newton step on the perturbed KKT conditions: with
``D = f''(x) ⊕ 0 + Z_L/(w − L) + Z_U/(U − w)`` diagonal, one batched Cholesky factorization of
the normal matrix ``Ā D⁻¹ Āᵀ`` (size: independent equalities + inequalities), assembled from a
sparsity pattern shared by the whole batch. The backward pass is implicit differentiation of
the KKT system at the solution: one more solve with the same factor, no unrolling.

Per-sample convergence (status, KKT residual, iterations) is returned by :func:`solve_torch`;
``relax(..., backend="torch")`` warns (or raises, ``on_failure="raise"``) naming the batch
indices that did not converge, and returns the others' solutions unchanged.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.linalg
import scipy.sparse as sp
import torch

from .errors import InputError, PolytopeError, SolverError, SolverWarning
from .polytope import Polytope
from .regularizers import Regularizer


@dataclass
class StandardForm:
    """``Ā w = b̄, L ≤ w ≤ U`` in numpy, with the pair pattern of ``Ā D⁻¹ Āᵀ``.

    ``w`` holds the free output coordinates first (``x[free] = w[:, :d]``), then auxiliary
    variables and slacks; output coordinates that are constant on P (``x_j`` = 0 on the diagonal
    of an arborescence, say) are eliminated and restored from ``fixed_values``.
    """

    A: np.ndarray          # (m, nw) dense
    b: np.ndarray          # (m,)
    L: np.ndarray          # (nw,)
    U: np.ndarray          # (nw,)
    d: int                 # number of free output coordinates
    free: np.ndarray       # (d,) their positions in x
    fixed: np.ndarray      # positions of constant output coordinates
    fixed_values: np.ndarray
    domain: tuple[float, float]  # open domain of f on x, enforced in the line search
    pairs: tuple[np.ndarray, np.ndarray, np.ndarray]  # flat index r1*m + r2, column, value
    cache: dict


def _true_x_range(P: Polytope) -> tuple[np.ndarray, np.ndarray]:
    key = ("true_x_range",)
    if key not in P.cache:
        lo, hi = zip(*(P.lp.z_range(j) for j in range(P.size)))
        P.cache[key] = (np.asarray(lo), np.asarray(hi))
    return P.cache[key]


def standard_form(P: Polytope, reg: Regularizer) -> StandardForm:
    """Build (once per polytope and regularizer) the solver's standard form."""
    key = ("torch_form", reg.name)
    if key in P.cache:
        return P.cache[key]
    form = P.form
    d, N = form.out_size, form.num_z
    m_ub = form.num_ub
    nw = N + m_ub
    m_eq = form.num_eq
    A = np.zeros((m_eq + m_ub, nw))
    A[:m_eq, :N] = form.A_eq.toarray()
    if m_ub:
        A[m_eq:, :N] = form.A_ub.toarray()
        A[m_eq:, N:] = np.eye(m_ub)
    b = np.concatenate([form.b_eq, form.b_ub])
    L = np.concatenate([form.lb, np.zeros(m_ub)])
    U = np.concatenate([form.ub, np.full(m_ub, np.inf)])
    if math.isfinite(reg.domain[0]):
        L[:d] = np.maximum(L[:d], reg.domain[0])
    if math.isfinite(reg.domain[1]):
        U[:d] = np.minimum(U[:d], reg.domain[1])
    # output coordinates that are constant on P, and variables with equal bounds, are eliminated
    xlo, xhi = _true_x_range(P)
    fixed_x = np.flatnonzero(np.abs(xhi - xlo) <= 1e-9)
    fixed_w = np.union1d(fixed_x, np.flatnonzero(np.abs(U - L) <= 1e-12))
    vals = np.where(np.isin(np.arange(nw), fixed_x), np.concatenate([xlo, np.zeros(nw - d)]), L)[fixed_w]
    b = b - A[:, fixed_w] @ vals
    keep = np.setdiff1d(np.arange(nw), fixed_w)
    A, L, U = A[:, keep], L[keep], U[keep]
    free = np.setdiff1d(np.arange(d), fixed_x)
    dfree = free.size
    nw = keep.size
    # drop empty rows, then dependent equality rows
    nonzero = np.abs(A).sum(1) > 0
    if np.any(~nonzero & (np.abs(b) > 1e-9)):  # pragma: no cover - P is non-empty
        raise PolytopeError(f"{P!r}: inconsistent constraints after eliminating fixed variables")
    is_eq = np.arange(A.shape[0]) < m_eq
    A_eq, b_eq = A[is_eq & nonzero], b[is_eq & nonzero]
    if A_eq.shape[0]:
        _, R, piv = scipy.linalg.qr(A_eq.T, mode="economic", pivoting=True)
        diag = np.abs(np.diag(R))
        rank = int((diag > 1e-9 * max(1.0, diag.max())).sum())
        sel = np.sort(piv[:rank])
        A_eq, b_eq = A_eq[sel], b_eq[sel]
    A = np.concatenate([A_eq, A[~is_eq & nonzero]], 0)
    b = np.concatenate([b_eq, b[~is_eq & nonzero]])
    dlo, dhi = reg.domain
    # finite ends of the regularizer's domain are kept as (barrier) bounds: the entropies'
    # gradients alone would let infeasible early iterates race to the domain's edge
    # every variable needs curvature or a bound: give free auxiliary variables their implied bounds
    for jj in range(dfree, nw):
        j = keep[jj]
        if j < N and not (np.isfinite(L[jj]) or np.isfinite(U[jj])):
            lo, hi = P.lp.z_range(int(j))
            if not (np.isfinite(lo) or np.isfinite(hi)):
                raise PolytopeError(
                    f"auxiliary variable z[{j}] of {P!r} is unbounded; the torch solver needs bounds "
                    "on auxiliary variables (add them to the config), or use backend='generic'"
                )
            L[jj], U[jj] = lo - 1.0, hi + 1.0  # strictly redundant: never active at the solution
    m = A.shape[0]
    Ac = sp.csc_matrix(A)
    r1, r2, col, val = [], [], [], []
    for j in range(nw):
        rows = Ac.indices[Ac.indptr[j]: Ac.indptr[j + 1]]
        vv = Ac.data[Ac.indptr[j]: Ac.indptr[j + 1]]
        if rows.size:
            rr1, rr2 = np.meshgrid(rows, rows, indexing="ij")
            r1.append(rr1.ravel())
            r2.append(rr2.ravel())
            col.append(np.full(rr1.size, j))
            val.append(np.outer(vv, vv).ravel())
    if r1:
        pairs = (np.concatenate(r1) * m + np.concatenate(r2), np.concatenate(col), np.concatenate(val))
    else:
        pairs = (np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), np.zeros(0))
    sf = StandardForm(A, b, L, U, dfree, free, fixed_x, xlo[fixed_x], (dlo, dhi) if reg.open_domain else (-math.inf, math.inf),
                      pairs, {})
    P.cache[key] = sf
    return sf


def _tensors(sf: StandardForm, dtype: torch.dtype, device: torch.device) -> dict:
    key = (dtype, str(device))
    if key not in sf.cache:
        t = lambda a: torch.as_tensor(a, dtype=dtype, device=device)  # noqa: E731
        sf.cache[key] = {
            "A": t(sf.A), "b": t(sf.b), "L": t(np.where(np.isfinite(sf.L), sf.L, 0.0)),
            "U": t(np.where(np.isfinite(sf.U), sf.U, 0.0)),
            "hasL": torch.as_tensor(np.isfinite(sf.L), device=device),
            "hasU": torch.as_tensor(np.isfinite(sf.U), device=device),
            "flat": torch.as_tensor(sf.pairs[0], dtype=torch.long, device=device),
            "col": torch.as_tensor(sf.pairs[1], dtype=torch.long, device=device),
            "val": t(sf.pairs[2]),
        }
    return sf.cache[key]


@dataclass
class SolveReport:
    """Per-sample convergence of :func:`solve_torch` (all tensors of shape ``(B,)``)."""

    converged: torch.Tensor
    iterations: torch.Tensor
    kkt_residual: torch.Tensor
    tol: float = 0.0

    @property
    def status(self) -> list[str]:
        """'converged' (residual ≤ tol), 'inaccurate' (stalled between tol and 1e-6; float32 1e-3),
        'max_iter' or 'nan'."""
        out = []
        for c, r in zip(self.converged.tolist(), self.kkt_residual.tolist()):
            if not math.isfinite(r):
                out.append("nan")
            elif not c:
                out.append("max_iter")
            else:
                out.append("converged" if r <= self.tol * 10 else "inaccurate")
        return out


def _normal_factor(T: dict, Dinv: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cholesky factor of the diagonally scaled normal matrix ``S (Ā D⁻¹ Āᵀ) S + δI``.

    The scaling ``S = diag(M)^{-1/2}`` makes the ridge δ relative to each row, so rows whose
    variables are all pinned at bounds (tiny diagonal) are still solved accurately.
    """
    B = Dinv.shape[0]
    M = torch.zeros(B, m * m, dtype=Dinv.dtype, device=Dinv.device)
    M.index_add_(1, T["flat"], T["val"] * Dinv[:, T["col"]])
    M = M.reshape(B, m, m)
    diag = torch.diagonal(M, dim1=1, dim2=2)
    scale = 1.0 / torch.sqrt(diag.clamp_min(torch.finfo(Dinv.dtype).tiny))
    M = M * scale[:, :, None] * scale[:, None, :]
    eye = torch.eye(m, dtype=Dinv.dtype, device=Dinv.device)
    ridge = 1e-14 if Dinv.dtype == torch.float64 else 1e-7
    Lc, info = torch.linalg.cholesky_ex(M + ridge * eye)
    if bool((info != 0).any()):
        Lc, _ = torch.linalg.cholesky_ex(M + 1e4 * ridge * eye)
    return Lc, scale


def _kkt(A: torch.Tensor, D: torch.Tensor, Dinv_reg: torch.Tensor, factor: tuple | None,
         a1: torch.Tensor, a2: torch.Tensor | None, refine: int = 3) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Solve ``[[D, Āᵀ], [Ā, 0]] [Δw; Δy] = [a1; a2]`` with the factor of the regularized normal
    matrix ``Ā (D + ρ)⁻¹ Āᵀ + δI``, then iterative refinement against the exact system."""
    if factor is None:  # no equality rows
        return a1 / D, None
    Lc, sc = factor

    def reg_solve(r1, r2):
        rhs = ((Dinv_reg * r1) @ A.T - r2) * sc
        dy = torch.cholesky_solve(rhs[..., None], Lc)[..., 0] * sc
        return Dinv_reg * (r1 - dy @ A), dy

    dw, dy = reg_solve(a1, a2)
    for _ in range(refine):
        e1 = a1 - (D * dw + dy @ A)
        e2 = a2 - dw @ A.T
        cw, cy = reg_solve(e1, e2)
        dw, dy = dw + cw, dy + cy
    return dw, dy


def _ipm(theta: torch.Tensor, sf: StandardForm, reg: Regularizer, tol: float | None, max_iter: int):
    """Run the interior-point iterations; returns the final state and the report."""
    B, d = theta.shape
    dtype, device = theta.dtype, theta.device
    T = _tensors(sf, dtype, device)
    A, b, Lb, Ub, hasL, hasU = T["A"], T["b"], T["L"], T["U"], T["hasL"], T["hasU"]
    m, nw = A.shape
    f64 = dtype == torch.float64
    tol = (1e-10 if f64 else 1e-5) if tol is None else tol
    accept = max(tol, 1e-6 if f64 else 1e-3)  # stalled rows below this count as converged (inaccurate)
    rho = 0.0
    # a tiny proximal term ε/2‖aux‖² on the auxiliary variables and slacks: it selects the
    # minimum-norm aux among optimal ones (degenerate formulations) and gives every variable
    # curvature; it moves x by O(ε)
    eps_aux = 1e-10 if f64 else 1e-6
    scale = 1.0 + theta.abs().amax(1)
    dlo, dhi = sf.domain
    # strictly interior start
    w = torch.zeros(B, nw, dtype=dtype, device=device)
    both = hasL & hasU
    lo = torch.where(hasL, Lb, torch.full_like(Lb, -math.inf))
    hi = torch.where(hasU, Ub, torch.full_like(Ub, math.inf))
    lo[:d] = lo[:d].clamp_min(dlo)
    hi[:d] = hi[:d].clamp_max(dhi)
    fl, fh = torch.isfinite(lo), torch.isfinite(hi)
    w0 = torch.where(fl & fh, 0.5 * (lo + hi), torch.where(fl, lo + 1.0, torch.where(fh, hi - 1.0, torch.zeros_like(lo))))
    w = w + w0
    y = torch.zeros(B, m, dtype=dtype, device=device)
    zl = hasL.to(dtype).expand(B, nw).clone()
    zu = hasU.to(dtype).expand(B, nw).clone()
    ncomp = max(1, int(hasL.sum() + hasU.sum()))
    active = torch.ones(B, dtype=torch.bool, device=device)
    iters = torch.zeros(B, dtype=torch.long, device=device)
    resid = torch.full((B,), math.inf, dtype=dtype, device=device)
    history: list[torch.Tensor] = []
    one = torch.ones((), dtype=dtype, device=device)

    def parts(w, y, zl, zu):
        x = w[:, :d]
        g = eps_aux * w
        g[:, :d] = reg.grad(x) - theta
        h = torch.full_like(w, eps_aux)
        h[:, :d] = reg.hess(x)
        rd = g + y @ A - zl + zu
        rp = w @ A.T - b
        gl = torch.where(hasL, w - Lb, one)
        gu = torch.where(hasU, Ub - w, one)
        mu = ((gl * zl).sum(1) + (gu * zu).sum(1)) / ncomp
        return h, rd, rp, gl, gu, mu

    def residual(h, rd, rp, gl, gu, mu, zl, zu):
        # dual residual measured as the primal displacement it implies where the curvature is
        # large (near the ends of an entropy's domain f' cannot be evaluated more accurately)
        D = h + torch.where(hasL, zl / gl, torch.zeros_like(h)) + torch.where(hasU, zu / gu, torch.zeros_like(h))
        r = (rd.abs() / D.clamp_min(1.0)).amax(1) / scale
        if m:
            r = torch.maximum(r, rp.abs().amax(1))
        # complementarity 1000x tighter: a weakly active bound's gap shrinks only like sqrt(mu)
        return torch.maximum(r, 1e3 * mu)

    for it in range(max_iter):
        h, rd, rp, gl, gu, mu = parts(w, y, zl, zu)
        resid = residual(h, rd, rp, gl, gu, mu, zl, zu)
        done = resid <= tol
        history.append(resid)
        if len(history) > 8:  # a row that stopped improving near its floating-point floor stops here
            stalled = (resid > 0.5 * history[-9]) & (resid <= accept)
            done = done | stalled
        active = active & ~done & torch.isfinite(resid)
        if not bool(active.any()):
            break
        sigma = torch.where(mu > 1e-2, 0.2, 0.05).to(dtype)
        # keep the barrier from collapsing while the equalities are still violated
        infeas = rp.abs().amax(1) if m else torch.zeros_like(mu)
        target = torch.maximum(sigma * mu, 0.1 * infeas * mu.sqrt())
        rcl = torch.where(hasL, gl * zl - target[:, None], torch.zeros_like(w))
        rcu = torch.where(hasU, gu * zu - target[:, None], torch.zeros_like(w))
        D = h + torch.where(hasL, zl / gl, torch.zeros_like(w)) + torch.where(hasU, zu / gu, torch.zeros_like(w))
        rhat = rd + rcl / gl - rcu / gu
        Dinv = 1.0 / (D + rho)  # primal regularization: keeps nearly free (degenerate) variables tame
        Lc = _normal_factor(T, Dinv, m) if m else None
        dw, dy = _kkt(A, D, Dinv, Lc, -rhat, -rp if m else None)
        if not m:
            dy = y
        dzl = torch.where(hasL, (-rcl - zl * dw) / gl, torch.zeros_like(w))
        dzu = torch.where(hasU, (-rcu + zu * dw) / gu, torch.zeros_like(w))
        # fraction to the boundary (bounds, multipliers, and the regularizer's open domain)
        inf = torch.full_like(w, math.inf)
        amax = torch.minimum(
            torch.where(hasL & (dw < 0), gl / -dw, inf).amin(1),
            torch.where(hasU & (dw > 0), gu / dw, inf).amin(1))
        amax = torch.minimum(amax, torch.where(dzl < 0, zl / -dzl, inf).amin(1))
        amax = torch.minimum(amax, torch.where(dzu < 0, zu / -dzu, inf).amin(1))
        x, dx = w[:, :d], dw[:, :d]
        if math.isfinite(dlo):
            amax = torch.minimum(amax, torch.where(dx < 0, (x - dlo) / -dx, inf[:, :d]).amin(1))
        if math.isfinite(dhi):
            amax = torch.minimum(amax, torch.where(dx > 0, (dhi - x) / dx, inf[:, :d]).amin(1))
        alpha = torch.clamp(0.99 * amax, max=1.0)
        finite = torch.isfinite(dw).all(1) & torch.isfinite(dzl).all(1) & torch.isfinite(dzu).all(1) & torch.isfinite(alpha)
        if m:
            finite = finite & torch.isfinite(dy).all(1)
        active = active & finite  # a row whose step broke down stops here (reported as not converged)
        alpha = torch.where(active, alpha, torch.zeros_like(alpha))[:, None]
        dw, dzl, dzu = [torch.nan_to_num(v) for v in (dw, dzl, dzu)]
        dy = torch.nan_to_num(dy)
        w = w + alpha * dw
        y = y + alpha * (dy if m else 0.0)
        zl = zl + alpha * dzl
        zu = zu + alpha * dzu
        iters = iters + active.long()
    h, rd, rp, gl, gu, mu = parts(w, y, zl, zu)
    resid = residual(h, rd, rp, gl, gu, mu, zl, zu)
    # the Jacobian of the limit problem: a bound is active if its multiplier exceeds its gap
    # (it then fixes the variable), inactive otherwise; the barrier's own D converges to this only
    # like z²/μ, which is slow for weakly active bounds
    big = torch.full_like(w, 1e24)
    active_l = hasL & (zl > gl)
    active_u = hasU & (zu > gu)
    D = h + torch.where(active_l | active_u, big, torch.zeros_like(w))
    report = SolveReport(converged=(resid <= accept) & torch.isfinite(resid), iterations=iters, kkt_residual=resid,
                         tol=tol)
    return w, D, report


def _kkt_solve(T: dict, D: torch.Tensor, rhs_w: torch.Tensor) -> torch.Tensor:
    """Solve ``[[D, Āᵀ], [Ā, 0]] [Δw; Δy] = [rhs_w; 0]`` for Δw (the implicit-function Jacobian)."""
    A = T["A"]
    m = A.shape[0]
    Dinv = 1.0 / (D + (1e-9 if D.dtype == torch.float64 else 1e-5))
    Lc = _normal_factor(T, Dinv, m) if m else None
    dw, _ = _kkt(A, D, Dinv, Lc, rhs_w, torch.zeros_like(rhs_w[:, :m]) if m else None)
    return dw


class _TorchSST(torch.autograd.Function):
    @staticmethod
    def forward(ctx, theta, sf, reg, tol, max_iter, holder):
        free = torch.as_tensor(sf.free, device=theta.device)
        w, D, report = _ipm(theta.detach()[:, free], sf, reg, tol, max_iter)
        holder.append(report)
        ctx.sf = sf
        ctx.save_for_backward(D)
        x = torch.zeros_like(theta)
        x[:, free] = w[:, : sf.d]
        if sf.fixed.size:
            x[:, torch.as_tensor(sf.fixed, device=theta.device)] = torch.as_tensor(sf.fixed_values, dtype=theta.dtype, device=theta.device)
        return x

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        (D,) = ctx.saved_tensors
        sf = ctx.sf
        free = torch.as_tensor(sf.free, device=g.device)
        T = _tensors(sf, D.dtype, D.device)
        rhs = torch.zeros_like(D)
        rhs[:, : sf.d] = g[:, free]
        out = torch.zeros_like(g)
        out[:, free] = _kkt_solve(T, D, rhs)[:, : sf.d]
        return out, None, None, None, None, None


def solve_torch(theta: torch.Tensor, polytope: Polytope, regularizer: Regularizer,
                tol: float | None = None, max_iter: int = 100) -> tuple[torch.Tensor, SolveReport]:
    """``x = argmax θᵀx − f(x)`` over the polytope for ``theta: (B, *shape)``; returns ``(x, report)``.

    Differentiable in θ (implicit backward). Works on CPU and CUDA; computes in float64 (float32
    inputs are converted and the result cast back).
    """
    if not regularizer.separable:
        raise InputError(
            f"regularizer {regularizer.name!r} has no elementwise derivatives (grad, hess), which the torch "
            "solver needs; use a fast path or backend='generic'"
        )
    sf = standard_form(polytope, regularizer)
    B = theta.shape[0]
    # the normal equations of an interior-point method are too ill-conditioned for float32:
    # float32 inputs are solved in float64 and the result cast back
    flat = theta.reshape(B, polytope.size).to(torch.float64)
    holder: list[SolveReport] = []
    x = _TorchSST.apply(flat, sf, regularizer, tol, max_iter, holder)
    return x.to(theta.dtype).reshape(theta.shape), holder[0]


def relax_torch(theta: torch.Tensor, polytope: Polytope, reg: Regularizer, tol: float | None = None,
                max_iter: int = 100, on_failure: str = "warn", **options: Any) -> torch.Tensor:
    """``backend="torch"`` for :func:`~convex_sst.relax`; options: tol, max_iter, on_failure."""
    if options:
        raise InputError(f"unknown option(s) {sorted(options)} for the torch backend; it accepts "
                         "['max_iter', 'on_failure', 'tol']")
    if on_failure not in ("warn", "raise"):
        raise InputError(f"on_failure must be 'warn' or 'raise', got {on_failure!r}")
    x, report = solve_torch(theta, polytope, reg, tol, max_iter)
    bad = ~report.converged
    if bool(bad.any()):
        idx = bad.nonzero().reshape(-1)[:10].tolist()
        msg = (f"torch solver did not converge for batch element(s) {idx} of {theta.shape[0]} "
               f"({polytope!r}, {reg.name!r}): KKT residual up to {report.kkt_residual[bad].max().item():.1e} "
               f"after {int(report.iterations.max())} iterations; the other elements are unaffected")
        if on_failure == "raise":
            raise SolverError(msg)
        warnings.warn(msg, SolverWarning, stacklevel=4)
    return x
