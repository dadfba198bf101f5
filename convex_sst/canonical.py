"""The canonical H-representation that every consumer of a polytope reads.

A polytope config compiles to one :class:`CanonicalForm` over the stacked variable
``z = (x, aux_1, ..., aux_k)``::

    A_eq z = b_eq,    A_ub z <= b_ub,    lb <= z <= ub,    x = z[:out_size]

The cvxpy layer, the LP argmax, vertex enumeration, membership tests and ``convex-sst check``
all read this form, so a structure is declared once and every path agrees on what it is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

from .errors import PolytopeError
from .expr import Constraint


@dataclass(frozen=True)
class CanonicalForm:
    """Sparse linear description of ``Q = {z : A_eq z = b_eq, A_ub z <= b_ub, lb <= z <= ub}``.

    The polytope is the projection ``P = {z[:out_size] : z in Q}``.

    Attributes:
        num_z: length of the stacked variable.
        out_size: length of the output block ``x`` (the structure, flattened row-major).
        A_eq, b_eq: equality rows (CSR, dense).
        A_ub, b_ub: inequality rows with more than one variable (CSR, dense).
        lb, ub: bounds on every entry of ``z`` (``±inf`` where absent); single-variable
            inequalities of the config end up here.
        layout: variable name -> (offset into z, shape).
    """

    num_z: int
    out_size: int
    A_eq: sp.csr_matrix
    b_eq: np.ndarray
    A_ub: sp.csr_matrix
    b_ub: np.ndarray
    lb: np.ndarray
    ub: np.ndarray
    layout: dict[str, tuple[int, tuple[int, ...]]] = field(default_factory=dict)

    @property
    def num_aux(self) -> int:
        return self.num_z - self.out_size

    @property
    def num_eq(self) -> int:
        return self.A_eq.shape[0]

    @property
    def num_ub(self) -> int:
        return self.A_ub.shape[0]

    def residual(self, z: np.ndarray) -> np.ndarray:
        """Largest constraint violation of each row of ``z``: shape ``(B,)`` for ``z: (B, num_z)``."""
        z = np.atleast_2d(z)
        viol = np.zeros(z.shape[0])
        if self.num_eq:
            viol = np.maximum(viol, np.abs(z @ self.A_eq.T - self.b_eq).max(1))
        if self.num_ub:
            viol = np.maximum(viol, (z @ self.A_ub.T - self.b_ub).max(1))
        viol = np.maximum(viol, (self.lb - z).max(1))
        viol = np.maximum(viol, (z - self.ub).max(1))
        return viol

    def implied_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Bounds on every entry of ``z`` implied by the rows one at a time: ``(lo, hi)``, each
        at least as tight as ``lb``, ``ub``, valid on all of Q (weaker than the range over Q).

        Activity-based bound propagation (as in LP presolve): a row ``Σ_k a_k z_k ≤ c`` bounds
        ``a_j z_j ≤ c − Σ_{k≠j} min(a_k z_k)`` when the other terms' minima are finite; an
        equality is two such rows. Repeated while it makes an infinite bound finite (finite
        bounds are not tightened further, so it ends: the flow formulations need two to
        three rounds, y ≥ 0 from 0 ≤ f ≤ y, then y ≤ 1 from Σ_in y = 1).
        """
        M = sp.vstack([self.A_ub, self.A_eq, -self.A_eq], format="coo")
        c = np.concatenate([self.b_ub, self.b_eq, -self.b_eq])
        row, j, a = M.row, M.col, M.data
        keep = a != 0
        row, j, a = row[keep], j[keep], a[keep]
        lo, hi = self.lb.astype(float).copy(), self.ub.astype(float).copy()
        rows = c.size
        while row.size:
            low = np.where(a > 0, a * lo[j], a * hi[j])  # the smallest value of each term
            inf = ~np.isfinite(low)
            total = np.bincount(row, np.where(inf, 0.0, low), minlength=rows)
            count = np.bincount(row, inf, minlength=rows)
            others_inf = count[row] - inf
            rest = total[row] - np.where(inf, 0.0, low)
            with np.errstate(invalid="ignore", divide="ignore"):
                bound = np.where(others_inf == 0, (c[row] - rest) / a, np.nan)
            new_hi = (a > 0) & np.isfinite(bound) & ~np.isfinite(hi[j])
            new_lo = (a < 0) & np.isfinite(bound) & ~np.isfinite(lo[j])
            if not (new_hi.any() or new_lo.any()):
                break
            np.minimum.at(hi, j[new_hi], bound[new_hi])
            np.maximum.at(lo, j[new_lo], bound[new_lo])
        return lo, hi

    @staticmethod
    def build(
        constraints: Sequence[Constraint],
        num_z: int,
        out_size: int,
        layout: dict[str, tuple[int, tuple[int, ...]]],
    ) -> CanonicalForm:
        """Stack constraint blocks; move single-variable inequalities into bounds.

        Raises:
            PolytopeError: a row without variables is violated (the polytope is empty).
        """
        eq = [c.expr for c in constraints if c.kind == "eq"]
        le = [c.expr for c in constraints if c.kind == "le"]
        A_eq, c_eq = _stack(eq, num_z)
        A_le, c_le = _stack(le, num_z)
        lb = np.full(num_z, -np.inf)
        ub = np.full(num_z, np.inf)

        # rows with no variables are constant checks
        nnz_eq = np.diff(A_eq.indptr)
        if np.any((nnz_eq == 0) & (np.abs(c_eq) > 1e-12)):
            raise PolytopeError("an equality constraint reduces to a false constant: the polytope is empty")
        keep_eq = nnz_eq > 0
        A_eq, c_eq = A_eq[keep_eq], c_eq[keep_eq]

        nnz = np.diff(A_le.indptr)
        if np.any((nnz == 0) & (c_le > 1e-12)):
            raise PolytopeError("an inequality reduces to a false constant: the polytope is empty")
        single = np.flatnonzero(nnz == 1)
        for r in single:
            j = A_le.indices[A_le.indptr[r]]
            a = A_le.data[A_le.indptr[r]]
            bound = -c_le[r] / a
            if a > 0:
                ub[j] = min(ub[j], bound)
            else:
                lb[j] = max(lb[j], bound)
        if np.any(lb > ub + 1e-12):
            j = int(np.flatnonzero(lb > ub + 1e-12)[0])
            raise PolytopeError(f"the bounds on {entry_name(j, layout)} are contradictory ({lb[j]:g} > {ub[j]:g}): "
                                "the polytope is empty")
        multi = nnz > 1
        A_ub, c_ub = A_le[multi], c_le[multi]
        return CanonicalForm(
            num_z=num_z,
            out_size=out_size,
            A_eq=sp.csr_matrix(A_eq),
            b_eq=-c_eq,
            A_ub=sp.csr_matrix(A_ub),
            b_ub=-c_ub,
            lb=lb,
            ub=ub,
            layout=dict(layout),
        )


def entry_name(j: int, layout: dict[str, tuple[int, tuple[int, ...]]]) -> str:
    """The config's name of the stacked variable ``z[j]``: ``x[2]``, ``f[0, 3]``."""
    for name, (offset, shape) in layout.items():
        size = int(np.prod(shape, dtype=np.int64))
        if offset <= j < offset + size:
            if not shape:  # a scalar variable
                return name
            return f"{name}[{', '.join(str(int(i)) for i in np.unravel_index(j - offset, shape))}]"
    return f"z[{j}]"


def _stack(exprs: list, num_z: int) -> tuple[sp.csr_matrix, np.ndarray]:
    if not exprs:
        return sp.csr_matrix((0, num_z)), np.zeros(0)
    A = sp.vstack([e.coef for e in exprs], format="csr")
    A.eliminate_zeros()
    A.sort_indices()
    return A, np.concatenate([e.const for e in exprs])
