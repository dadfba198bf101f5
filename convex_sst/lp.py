"""Linear programs over a :class:`CanonicalForm` with HiGHS (dual simplex, exact vertices).

Used for the generic hard argmax (an exact vertex of P for ``max uᵀx``), for emptiness and
boundedness checks at load time, for membership tests, and for vertex enumeration of small
0/1 polytopes by branch and bound (fix one coordinate of x at a time, prune infeasible
branches with an LP; the model is built once and only column bounds change).
"""

from __future__ import annotations

import os
import sys

import numpy as np
import scipy.sparse as sp

from .canonical import CanonicalForm
from .errors import PolytopeError, SolverError

try:  # highspy is a dependency of cvxpy >= 1.5
    import highspy
except ImportError as exc:  # pragma: no cover - environment problem
    raise ImportError("convex_sst needs highspy (installed with cvxpy); pip install highspy") from exc


def _new_highs() -> "highspy.Highs":
    """A silent HiGHS instance (the first construction prints a banner to fd 1)."""
    global _BANNER_DONE
    if _BANNER_DONE:
        h = highspy.Highs()
    else:
        sys.stdout.flush()
        saved = os.dup(1)
        try:
            with open(os.devnull, "wb") as devnull:
                os.dup2(devnull.fileno(), 1)
                h = highspy.Highs()
        finally:
            os.dup2(saved, 1)
            os.close(saved)
        _BANNER_DONE = True
    h.setOptionValue("output_flag", False)
    return h


_BANNER_DONE = False


class LinearProgram:
    """A HiGHS model of ``max cᵀx s.t. z in Q`` kept alive for repeated solves."""

    def __init__(self, form: CanonicalForm):
        self.form = form
        h = _new_highs()
        h.setOptionValue("random_seed", 0)
        A = sp.vstack([form.A_eq, form.A_ub], format="csc")
        m = A.shape[0]
        lp = highspy.HighsLp()
        lp.num_col_ = form.num_z
        lp.num_row_ = m
        lp.col_cost_ = np.zeros(form.num_z)
        lp.col_lower_ = form.lb.copy()
        lp.col_upper_ = form.ub.copy()
        lp.row_lower_ = np.concatenate([form.b_eq, np.full(form.num_ub, -highspy.kHighsInf)])
        lp.row_upper_ = np.concatenate([form.b_eq, form.b_ub])
        lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
        lp.a_matrix_.start_ = A.indptr.astype(np.int32)
        lp.a_matrix_.index_ = A.indices.astype(np.int32)
        lp.a_matrix_.value_ = A.data.astype(float)
        lp.a_matrix_.num_col_ = form.num_z
        lp.a_matrix_.num_row_ = m
        lp.sense_ = highspy.ObjSense.kMaximize
        h.passModel(lp)
        self._h = h
        self._x_idx = np.arange(form.out_size, dtype=np.int32)

    def _set_cost(self, c: np.ndarray) -> None:
        self._h.changeColsCost(len(self._x_idx), self._x_idx, np.asarray(c, dtype=float))

    def _set_x_bounds(self, lower: np.ndarray, upper: np.ndarray) -> None:
        self._h.changeColsBounds(len(self._x_idx), self._x_idx, lower.astype(float), upper.astype(float))

    def _reset_x_bounds(self) -> None:
        self._set_x_bounds(self.form.lb[: self.form.out_size], self.form.ub[: self.form.out_size])

    def _run(self) -> str:
        self._h.run()
        status = self._h.getModelStatus()
        if status == highspy.HighsModelStatus.kOptimal:
            return "optimal"
        if status == highspy.HighsModelStatus.kInfeasible:
            return "infeasible"
        if status in (highspy.HighsModelStatus.kUnbounded, highspy.HighsModelStatus.kUnboundedOrInfeasible):
            return "unbounded"
        return self._h.modelStatusToString(status)

    def solution(self) -> np.ndarray:
        return np.asarray(self._h.getSolution().col_value, dtype=float)

    def maximize(self, c: np.ndarray) -> tuple[str, np.ndarray | None]:
        """Solve ``max cᵀx``; returns ``(status, z)`` (z is None unless optimal).

        Warm-started from the previous solve; a status other than optimal, infeasible or
        unbounded is retried once from scratch (after a solve with costs of 1e9, the warm start
        ended in 'Unknown' on a problem that alone solves in one iteration)."""
        self._set_cost(c)
        status = self._run()
        if status not in ("optimal", "infeasible", "unbounded"):
            self._h.clearSolver()
            status = self._run()
        return status, (self.solution() if status == "optimal" else None)

    def z_range(self, j: int) -> tuple[float, float]:
        """Min and max of the stacked variable ``z[j]`` over Q (``±inf`` when unbounded)."""
        idx = np.arange(self.form.num_z, dtype=np.int32)
        out = []
        for sign in (-1.0, 1.0):
            c = np.zeros(self.form.num_z)
            c[j] = sign
            self._h.changeColsCost(len(idx), idx, c)
            status = self._run()
            if status == "optimal":
                out.append(float(self.solution()[j]))
            elif status == "unbounded":
                out.append(sign * np.inf)
            else:
                raise SolverError(f"HiGHS returned status {status!r} bounding z[{j}]")
        self._h.changeColsCost(len(idx), idx, np.zeros(self.form.num_z))
        return out[0], out[1]

    def constant_variables(self, samples: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Which stacked variables ``z[j]`` are constant over Q, and their values: ``(mask, values)``.

        Vertices maximizing a few random costs rule out most variables (any two that differ in
        ``z[j]``); of the rest, those at a bound are tested together (a few LPs), any others with
        two LPs each (``z_range``).
        """
        nz = self.form.num_z
        idx = np.arange(nz, dtype=np.int32)
        rng = np.random.default_rng(seed)
        points = []
        for _ in range(samples):
            self._h.changeColsCost(nz, idx, rng.standard_normal(nz))
            if self._run() == "optimal":
                points.append(self.solution())
        self._h.changeColsCost(nz, idx, np.zeros(nz))
        P = np.asarray(points) if points else np.zeros((0, nz))
        cand = np.ones(nz, dtype=bool) if len(points) < 2 else (P.max(0) - P.min(0)) <= 1e-9
        mask = np.zeros(nz, dtype=bool)
        values = np.zeros(nz)
        if len(points) >= 2:
            # candidates sitting at a bound: one LP moves all of them away from it at once
            # (max Σ ±z_j); those it cannot move are constant, the others are dropped; repeat
            lb, ub = self.form.lb, self.form.ub
            for bound, sign in ((lb, 1.0), (ub, -1.0)):
                group = cand & np.isfinite(bound) & (np.abs(P[0] - bound) <= 1e-9) & ~mask
                while group.any():
                    self._h.changeColsCost(nz, idx, np.where(group, sign, 0.0))
                    if self._run() != "optimal":
                        break  # left to the range LPs below
                    moved = group & (np.abs(self.solution() - bound) > 1e-9)
                    if not moved.any():
                        mask[group], values[group] = True, bound[group]
                        break
                    group &= ~moved
                    cand &= ~moved
            self._h.changeColsCost(nz, idx, np.zeros(nz))
        for j in np.flatnonzero(cand & ~mask):
            lo, hi = self.z_range(int(j))
            if hi - lo <= 1e-9:
                mask[j], values[j] = True, lo
        return mask, values

    def is_feasible(self, lower: np.ndarray | None = None, upper: np.ndarray | None = None) -> bool:
        """Whether some z in Q has ``lower <= x <= upper`` (defaults: the form's own bounds)."""
        n = self.form.out_size
        self._set_cost(np.zeros(n))
        bounded = lower is not None or upper is not None
        if bounded:
            self._set_x_bounds(self.form.lb[:n] if lower is None else lower,
                               self.form.ub[:n] if upper is None else upper)
        try:
            status = self._run()
        finally:
            if bounded:
                self._reset_x_bounds()
        if status not in ("optimal", "infeasible"):
            raise SolverError(f"HiGHS returned status {status!r} on a feasibility problem")
        return status == "optimal"

    def x_range(self) -> tuple[np.ndarray, np.ndarray]:
        """Coordinate-wise min and max of x over P (LPs only where bounds are not declared)."""
        n = self.form.out_size
        lo = self.form.lb[:n].copy()
        hi = self.form.ub[:n].copy()
        for j in range(n):
            for sign, arr in ((-1.0, lo), (1.0, hi)):
                if np.isfinite(arr[j]):
                    continue
                c = np.zeros(n)
                c[j] = sign
                status, z = self.maximize(c)
                if z is not None:  # optimal
                    arr[j] = z[j]
                elif status == "unbounded":
                    arr[j] = sign * np.inf
                else:
                    raise SolverError(f"HiGHS returned status {status!r} bounding x[{j}]")
        return lo, hi

    def enumerate_binary(self, limit: int) -> np.ndarray:
        """All 0/1 points of P, in lexicographic order; raise if there are more than ``limit``."""
        n = self.form.out_size
        lo0 = np.maximum(self.form.lb[:n], 0.0)
        hi0 = np.minimum(self.form.ub[:n], 1.0)
        lower, upper = lo0.copy(), hi0.copy()
        found: list[np.ndarray] = []
        self._set_cost(np.zeros(n))

        def feasible() -> bool:
            self._set_x_bounds(lower, upper)
            status = self._run()
            if status not in ("optimal", "infeasible"):
                raise SolverError(f"HiGHS returned status {status!r} during enumeration")
            return status == "optimal"

        def dfs(j: int) -> None:
            if j == n:
                found.append(lower.copy())
                if len(found) > limit:
                    raise PolytopeError(
                        f"more than {limit} vertices; vertices() is meant for small instances "
                        "(raise `limit` if you really want them all)"
                    )
                return
            for v in (0.0, 1.0):
                if v < lo0[j] or v > hi0[j]:
                    continue
                lower[j] = upper[j] = v
                if feasible():
                    dfs(j + 1)
            lower[j], upper[j] = lo0[j], hi0[j]

        try:
            if feasible():
                dfs(0)
        finally:
            self._reset_x_bounds()
        if not found:
            return np.zeros((0, n))
        return np.stack(found)
