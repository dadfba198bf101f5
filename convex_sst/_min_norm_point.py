"""The quadratic relaxation on any polytope with an argmax: Wolfe's minimum-norm-point algorithm.

With ``f(x) = ½‖x‖²`` the relaxation is a Euclidean projection,
``X_t = argmax_{x∈P} θᵀx − ½‖x‖² = argmin_{x∈P} ½‖x − θ‖²`` (``θ = u/t``), and
``P = conv(𝒳)`` needs no constraints: the argmax over 𝒳 (Hungarian, Chu–Liu/Edmonds, a
dynamic program) is enough. Wolfe's algorithm (Wolfe 1976, "Finding the nearest point in a
polytope"; the active-set solver of SparseMAP, Niculae et al. 2018) keeps a *corral*: affinely
independent vertices ``S = {s_0, …, s_{k−1}}`` with ``x = Σ λ_i s_i``, all ``λ_i > 0``, where x
is also the nearest point of their affine hull.

* major cycle: ``v = argmax_{v∈𝒳} (θ − x)ᵀv``. If the gap ``(θ − x)ᵀ(v − x)`` is 0 (to
  rounding), x is optimal (``(θ − x)ᵀ(y − x) ≤ 0`` for all ``y ∈ P``); else v joins S;
* minor cycle: ``μ`` = the affine weights of the nearest point of ``aff(S)``. If all ``μ_i > 0``,
  ``λ = μ``; else step from λ towards μ until a weight reaches 0, drop that vertex, repeat.

It ends after finitely many cycles with the exact solution, a convex combination of at most
``dim P + 1`` structures (typically few: the relaxation is sparse). The weights are found
from the Gram matrix of the corral (0/1 vertices: integer entries) and a Cholesky factor of its
directions' Gram matrix, updated as vertices come and go, so a cycle costs one argmax and
O(k²) (O(k³) when s_0 leaves).

Around the solution x is the projection onto the affine hull of the optimal face F, so the
Jacobian is the orthogonal projector ``∂x/∂θ = Dᵀ(DDᵀ)⁻¹D`` onto its directions, symmetric,
exact, constant between the (measure-zero) places where F changes. ``D = [s_i − s_0]`` are the
corral's directions once it spans F: Wolfe's algorithm can stop short of that, and the corral is
completed with further vertices of F (:func:`_span_the_face`). The backward pass is that linear
map in torch ops, so second derivatives work (they are 0: x is piecewise affine in θ).
Sequential: the argmax of all unfinished rows is one call per major cycle, the rest runs row by
row in NumPy, on the CPU in float64.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from scipy.linalg.lapack import dtrtrs

from ._autograd import autocast_off

_ZERO = 1e-14
"""Affine weights at or below this count as not positive (the vertex leaves the corral)."""
TOL = 1e-12
"""Default stopping gap, relative to its rounding scale: at 1e-14, corrals of hundreds of
structures (near-zero logits) ran to max_iter on gaps of 4e-14 that rounding kept from
closing; a corral that ends short of its face is completed for the Jacobian anyway."""


def _lower_solve(L: np.ndarray, b: np.ndarray, transposed: bool = False) -> np.ndarray:
    """``L⁻¹ b`` (or ``L⁻ᵀ b``) for a lower-triangular L with a positive diagonal, by LAPACK's
    trtrs directly (``scipy.linalg.solve_triangular`` validates its input: 20 µs a call, most
    of a cycle at small sizes)."""
    x, info = dtrtrs(L, b, lower=1, trans=int(transposed))
    if info != 0:
        raise np.linalg.LinAlgError(f"trtrs: info = {info}")
    return x


def _rank_one_update(L: np.ndarray, v: np.ndarray) -> None:
    """In place: the lower Cholesky factor of ``L Lᵀ + v vᵀ`` (Givens-like sweep, O(m²))."""
    for k in range(len(v)):
        r = np.hypot(L[k, k], v[k])
        c, s = r / L[k, k], v[k] / L[k, k]
        L[k, k] = r
        L[k + 1:, k] = (L[k + 1:, k] + s * v[k + 1:]) / c
        v[k + 1:] = c * v[k + 1:] - s * L[k + 1:, k]


class _Corral:
    """Vertices ``S (k, d)`` with their Gram matrix ``S Sᵀ``, the products ``S θ``, weights λ, and
    the Cholesky factor ``L`` of ``H = DDᵀ`` (``D = [s_i − s_0]``): a new vertex extends it in
    O(k²). S and the Gram matrix live in buffers that double when full (at k ≈ 1 000,
    arborescences n = 32 near zero logits, copying S at every vertex took a fifth of the time);
    L is a Fortran-ordered array of its own size, which LAPACK takes without a copy (a view of
    a larger buffer was copied at every solve: 3.4 s against 1.0 s there)."""

    def __init__(self, v: np.ndarray, theta: np.ndarray) -> None:
        cap = 8
        self._S = np.zeros((cap, len(v)))
        self._G = np.zeros((cap, cap))
        self._st = np.zeros(cap)
        self._L = np.zeros((0, 0), order="F")
        self._S[0] = v
        self._G[0, 0] = v @ v
        self._st[0] = v @ theta
        self.lam = np.ones(1)
        self.factored = True  # False: H singular to rounding (least squares instead of L)

    @property
    def k(self) -> int:
        """The number of vertices (the buffers hold more rows)."""
        return len(self.lam)

    @property
    def S(self) -> np.ndarray:
        return self._S[: self.k]

    @property
    def gram(self) -> np.ndarray:
        return self._G[: self.k, : self.k]

    @property
    def s_theta(self) -> np.ndarray:
        return self._st[: self.k]

    def _grow(self) -> None:
        cap = 2 * len(self._st)
        for name in ("_S", "_G", "_st"):
            old = getattr(self, name)
            new = np.zeros((cap,) + ((old.shape[1],) if name == "_S" else (cap,) * (old.ndim - 1)))
            new[tuple(slice(0, n) for n in old.shape)] = old
            setattr(self, name, new)

    def add(self, v: np.ndarray, theta: np.ndarray) -> bool:
        """Add the vertex v with weight 0, unless it lies in the corral's affine hull to rounding
        (its squared distance from it, the new pivot of L, below 1e-10 of ``‖v − s_0‖²``): it
        could not move x, and H would be singular. Returns whether v was added."""
        k = self.k
        sv = self.S @ v
        vv = v @ v
        G = self.gram
        h = sv[1:] - G[1:, 0] - sv[0] + G[0, 0]  # H's new column D (v − s_0), and ‖v − s_0‖²
        hkk = vv - 2.0 * sv[0] + G[0, 0]
        if not self.factored:  # H singular to rounding (a failed factorization after a drop)
            low = np.linalg.lstsq(self.directions(), h, rcond=None)[0] if k > 1 else h[:0]
            pivot = hkk - h @ low
        else:
            low = _lower_solve(self._L, h) if k > 1 else h[:0]
            pivot = hkk - low @ low
        if not pivot > 1e-10 * max(hkk, 1.0):
            return False
        if k == len(self._st):
            self._grow()
        self._S[k] = v
        self._G[k, :k] = self._G[:k, k] = sv
        self._G[k, k] = vv
        self._st[k] = v @ theta
        if self.factored:  # L with a new row
            L = np.zeros((k, k), order="F")
            L[: k - 1, : k - 1] = self._L
            L[k - 1, : k - 1] = low
            L[k - 1, k - 1] = np.sqrt(pivot)
            self._L = L
        self.lam = np.append(self.lam, 0.0)
        return True

    def keep(self, keep: np.ndarray) -> None:
        """Drop the vertices not in ``keep``. L loses the rows and columns of their directions,
        each by a rank-one update of the trailing block (O(k²)); dropping s_0 changes every
        direction, and H is factored anew (O(k³), as it was for every drop: at k ≈ 1 000,
        arborescences n = 32 near zero logits, those took most of the time)."""
        gone = np.flatnonzero(~keep)
        idx = np.flatnonzero(keep)
        m = len(idx)
        refactor = not self.factored or (len(gone) > 0 and gone[0] == 0)
        if not refactor and len(gone):
            L = self._L
            for j in gone[::-1] - 1:  # H's indices, highest first
                tail = L[j + 1:, j + 1:].copy()
                _rank_one_update(tail, L[j + 1:, j].copy())
                L = np.block([[L[:j, :j], np.zeros((j, len(tail)))], [L[j + 1:, :j], tail]])
            self._L = np.asfortranarray(L)
        self._S[:m] = self._S[idx]
        self._G[:m, :m] = self._G[np.ix_(idx, idx)]
        self._st[:m] = self._st[idx]
        self.lam = self.lam[idx]
        self.lam = self.lam / self.lam.sum()
        if refactor:
            try:
                self._L = np.asfortranarray(np.linalg.cholesky(self.directions()))
                self.factored = True
            except np.linalg.LinAlgError:
                self.factored = False

    def directions(self) -> np.ndarray:
        """``H = DDᵀ`` for ``D = [s_i − s_0]``, from the Gram matrix."""
        G = self.gram
        return G[1:, 1:] - G[1:, :1] - G[:1, 1:] + G[0, 0]

    def solve(self, rhs: np.ndarray) -> np.ndarray:
        """``H⁻¹ rhs`` (rhs ``(k−1,)`` or ``(k−1, m)``): two triangular solves with the factor,
        least squares where H is singular to rounding."""
        if self.factored:
            return _lower_solve(self._L, _lower_solve(self._L, rhs), transposed=True)
        return np.linalg.lstsq(self.directions(), rhs, rcond=None)[0]

    def affine_weights(self) -> np.ndarray:
        """The affine weights (summing to 1) of the point of ``aff(S)`` nearest to θ."""
        if len(self.lam) == 1:
            return np.ones(1)
        G = self.gram  # D(θ − s_0), from the Gram matrix and S θ
        beta = self.solve(self.s_theta[1:] - self.s_theta[0] - G[1:, 0] + G[0, 0])
        return np.concatenate([[1.0 - beta.sum()], beta])

    def point(self) -> np.ndarray:
        return self.lam @ self.S

    def settle(self) -> None:
        """Minor cycles: move λ to the nearest point of the affine hull, dropping the vertices
        whose weight would turn negative on the way."""
        while True:
            mu = self.affine_weights()
            if bool((mu > _ZERO).all()):
                self.lam = mu
                return
            out = mu <= _ZERO
            ratio = np.full(len(mu), np.inf)
            ratio[out] = self.lam[out] / np.maximum(self.lam[out] - mu[out], 1e-300)
            first = int(np.argmin(ratio))
            step = min(float(ratio[first]), 1.0)
            lam = self.lam + step * (mu - self.lam)
            keep = lam > _ZERO
            keep[first] = False
            self.lam = lam
            self.keep(keep)

    def jacobian_factors(self, d: int) -> tuple[np.ndarray, np.ndarray]:
        """``(D, A)`` with ``∂x/∂θ = Dᵀ A``: ``D = [s_i − s_0] (k−1, d)``, ``A = (DDᵀ)⁻¹ D``."""
        if len(self.lam) == 1:
            return np.zeros((0, d)), np.zeros((0, d))
        D = self.S[1:] - self.S[0]
        return D, self.solve(D)


def min_norm_point(theta: np.ndarray, argmax: Callable[[np.ndarray], np.ndarray], tol: float = TOL,
                   max_iter: int = 1000, span: bool = True
                   ) -> tuple[np.ndarray, list[_Corral], np.ndarray, np.ndarray]:
    """Wolfe's algorithm on every row of ``theta (B, d)``: ``argmin_{x∈P} ½‖x − θ‖²``.

    ``argmax`` maps scores ``(R, d)`` to maximizing vertices ``(R, d)`` (0/1). A row stops when
    its gap ``(θ − x)ᵀ(v − x)`` is at most ``tol`` times ``Σ_j |(θ − x)_j (v − x)_j|`` (the scale
    of its rounding error), or when x cannot move: the argmax returns a vertex already in the
    corral, or one that leaves it again at once.

    Returns ``(x (B, d), corrals, gaps (B,), failed (B,) bool)``: rows still above ``tol`` after
    ``max_iter`` major cycles, and rows stuck with a gap above ``1e-9`` times that scale, are
    ``failed``. With ``span`` (for the Jacobian only; x is the same without) each corral is
    completed to span the optimal face (:func:`_span_the_face`).
    """
    B, d = theta.shape
    x = np.zeros((B, d))
    gaps = np.zeros(B)
    if B == 0:
        return x, [], gaps, np.zeros(0, dtype=bool)
    first = argmax(theta)
    corrals = [_Corral(first[i], theta[i]) for i in range(B)]
    x[:] = first
    active = np.arange(B)
    stalled = np.zeros(B, dtype=bool)
    for _ in range(max_iter):
        g = theta[active] - x[active]
        V = argmax(g)
        still = []
        for j, i in enumerate(active):
            step = V[j] - x[i]
            terms = g[j] * step
            gap = float(terms.sum())
            gaps[i] = gap
            if gap <= tol * float(np.abs(terms).sum()):
                continue
            c = corrals[i]
            if bool((c.S == V[j]).all(1).any()):  # already in the corral: x cannot move further
                stalled[i] = gap > 1e-9 * float(np.abs(terms).sum())
                continue
            if not c.add(V[j], theta[i]):  # in the corral's affine hull: x cannot move either
                stalled[i] = gap > 1e-9 * float(np.abs(terms).sum())
                continue
            c.settle()
            moved = c.point()
            if np.array_equal(moved, x[i]):  # v left again at once: degenerate to rounding, x cannot move
                stalled[i] = gap > 1e-9 * float(np.abs(terms).sum())
                continue
            x[i] = moved
            still.append(i)
        active = np.asarray(still, dtype=np.int64)
        if not len(active):
            break
    failed = stalled
    failed[active] = True
    if span:
        _span_the_face(theta, x, corrals, argmax)
    return x, corrals, gaps, failed


def _span_the_face(theta: np.ndarray, x: np.ndarray, corrals: list[_Corral],
                   argmax: Callable[[np.ndarray], np.ndarray]) -> None:
    """Add to each corral, with weight 0, vertices of the optimal face ``F = argmax_v (θ − x)ᵀv``
    outside its affine hull, until the hull is ``aff(F)``: the Jacobian is the projector onto
    ``aff(F)``, and a corral can end short of it. Its last vertices would enter with weights at
    rounding level (the hull of a thin simplex passes within 1e-14 of x), so their gaps do not
    show: Birkhoff n = 20, t = 10, a corral of 184 vertices spanned 183 dimensions of a face of
    199, and its Jacobian was off by 0.03 (arborescences n = 16, t = 3: 1 row in 64).

    A direction ``r ⟂ aff(S)`` (random, fixed seed) tilts the scores, ``(θ − x) ± ε r``: the
    argmax is then a vertex of F (checked: its score is x's to rounding; else ε shrinks) that
    maximizes ±r, and if ``aff(F)`` is larger than ``aff(S)`` one of the two signs finds a vertex
    outside it (``r·(v − s_0) ≠ 0``)."""
    B, d = theta.shape
    rng = np.random.default_rng(0)
    r = np.zeros((B, d))
    eps = 1e-9 * np.maximum(1.0, np.abs(theta - x).max(1))
    sign = np.ones(B)
    fresh = np.ones(B, dtype=bool)  # rows whose direction r is to be drawn (again)
    todo = list(range(B))
    for _ in range(2 * d + 8):  # per row: one pass per new vertex, a sign flip, a few smaller tilts
        if not todo:
            return
        for i in todo:
            if fresh[i]:
                c = corrals[i]
                z = rng.standard_normal(d)
                if len(c.lam) > 1:  # z minus its projection on the directions D = S[1:] − s_0
                    S = c.S
                    w = c.solve(S[1:] @ z - S[0] @ z)
                    z = z - (w @ S[1:] - w.sum() * S[0])
                r[i] = z / max(float(np.abs(z).max()), 1e-300)
                fresh[i] = False
        rows = np.asarray(todo)
        V = argmax(theta[rows] - x[rows] + (sign[rows] * eps[rows])[:, None] * r[rows])
        still = []
        for v, i in zip(V, rows):
            g = theta[i] - x[i]
            step = v - x[i]
            deficit = -float(g @ step)
            if deficit > 1e-12 * (1.0 + float(np.abs(g * step).sum())):  # left F: tilt less
                eps[i] *= 1e-3
                if eps[i] > 1e-16 * max(1.0, float(np.abs(g).max())):
                    still.append(i)
                continue
            c = corrals[i]
            if abs(float(r[i] @ (v - c.S[0]))) > 1e-6 and c.add(v, theta[i]):  # a new direction of F
                sign[i] = 1.0
                fresh[i] = True
                still.append(i)
            elif sign[i] > 0:
                sign[i] = -1.0
                still.append(i)
        todo = still


class _MinNormPoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, theta, argmax, tol, max_iter, report):
        th = theta.detach().to("cpu", torch.float64).numpy()
        B, d = th.shape
        # the face completion and the Jacobian's factors only where a gradient is wanted (not in
        # evaluation under no_grad: at logits near 0 the completion was half of a forward pass)
        grad = bool(ctx.needs_input_grad[0])
        x, corrals, gaps, failed = min_norm_point(th, argmax, tol, max_iter, span=grad)
        if failed.any():
            report(torch.from_numpy(failed), B, f"optimality gap up to {gaps[failed].max():.1e} "
                   f"(stalled, or still open after max_iter = {max_iter} major cycles)")
        factors = [c.jacobian_factors(d) for c in corrals] if grad else []
        K = max((len(D) for D, _ in factors), default=0)
        Dp = np.zeros((B, K, d))
        Ap = np.zeros((B, K, d))
        for i, (D, A) in enumerate(factors):
            Dp[i, : len(D)] = D
            Ap[i, : len(A)] = A
        to = dict(device=theta.device, dtype=theta.dtype)
        ctx.save_for_backward(torch.from_numpy(Dp).to(**to), torch.from_numpy(Ap).to(**to))
        return torch.from_numpy(x).to(**to)

    @staticmethod
    def backward(ctx, g):
        # ∂x/∂θ = Dᵀ(DDᵀ)⁻¹D, symmetric: the VJP is Dᵀ (A g), linear in g with constant factors
        D, A = ctx.saved_tensors
        with autocast_off(g.device):  # backward runs under the caller's autocast state
            return torch.einsum("bkd,bk->bd", D, torch.einsum("bkd,bd->bk", A, g)), None, None, None, None


def project_onto_hull(theta: torch.Tensor, argmax: Callable[[torch.Tensor], torch.Tensor], tol: float,
                      max_iter: int, report: Callable[[torch.Tensor, int, str], None]) -> torch.Tensor:
    """``(B, d)``: the Euclidean projection of each row of ``theta (B, d)`` onto the convex hull
    of the vertices ``argmax`` (scores ``(R, d)`` → 0/1 rows) returns, by :func:`min_norm_point`
    (CPU, float64; the result in ``theta``'s dtype and device), with the exact Jacobian.
    ``report(failed, B, detail)`` is told about rows that did not converge."""

    def lmo(scores: np.ndarray) -> np.ndarray:
        return argmax(torch.from_numpy(scores)).to("cpu", torch.float64).numpy()

    return _MinNormPoint.apply(theta, lmo, tol, max_iter, report)
