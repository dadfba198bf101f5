"""The generic SST layer: ``max θᵀx − f(x) s.t. z in Q`` compiled once with cvxpylayers.

For every (polytope instance, regularizer) pair the program is built from the canonical form
as a DPP problem whose only parameter is ``θ = u / t`` (so the temperature's gradient flows
through torch), compiled by cvxpylayers once, cached on the polytope, and differentiated by
diffcp's implicit (adjoint) method.

Solver choice, measured on this project's problems (``benchmarks/generic_solvers.py``):
Clarabel (an interior-point method with exact exponential-cone support) at tight tolerances
reaches 1e-7 to 1e-6 on the relaxed samples at t = 1; SCS (first-order) 1e-5 to 1e-3 at similar
cost. Clarabel is the default; ``solver="scs"`` and ``solver_args`` are exposed.

diffcp does not report Clarabel's status ("AlmostSolved" is passed on silently), so every
returned sample is verified against the canonical constraints: a violation above ``1e-4``
raises :class:`SolverError` naming the batch elements; one above ``1e-6`` warns
(:class:`SolverWarning`). SCS's "Solved/Inaccurate", which diffcp reports as a plain
``UserWarning``, is re-issued as a :class:`SolverWarning` too.
"""

from __future__ import annotations

import warnings
from typing import Any

import cvxpy as cp
import numpy as np
import torch

from ._autograd import first_order_guard
from ._forbidden import rows_on, solve_again, tame_extremes
from .errors import PolytopeError, SolverError, unknown_name, warn_user
from .polytope import Polytope
from .regularizers import Regularizer

#: Default solver arguments passed to diffcp for each solver name.
SOLVER_DEFAULTS: dict[str, dict[str, Any]] = {
    "clarabel": {
        "solve_method": "Clarabel",
        "tol_gap_abs": 1e-12,
        "tol_gap_rel": 1e-12,
        "tol_feas": 1e-12,
        "tol_ktratio": 1e-10,
        "max_iter": 500,
    },
    "scs": {"solve_method": "SCS", "eps_abs": 1e-9, "eps_rel": 1e-9, "max_iters": 100_000},
}
ERROR_RESIDUAL = 1e-4
WARN_RESIDUAL = 1e-6


def build_problem(polytope: Polytope, reg: Regularizer) -> tuple[cp.Problem, cp.Parameter, list[cp.Variable]]:
    """The cvxpy program ``max θᵀx − f(x) s.t. z in Q`` with θ the only parameter."""
    if reg.cvxpy is None:
        raise SolverError(
            f"regularizer {reg.name!r} has no cvxpy form, so there is no generic path for it; "
            "use backend='fast' (see convex_sst.available_fast_paths())"
        )
    f = reg.cvxpy
    form = polytope.form
    d = form.out_size
    x = cp.Variable(d, name="x")
    theta = cp.Parameter(d, name="theta")
    variables = [x]
    aux = None
    if form.num_aux:
        aux = cp.Variable(form.num_aux, name="aux")
        variables.append(aux)

    def lin(A):  # A @ z for a sparse block over z = (x, aux)
        A = A.tocsc()
        expr = A[:, :d] @ x
        if aux is not None:
            expr = expr + A[:, d:] @ aux
        return expr

    cons = []
    if form.num_eq:
        cons.append(lin(form.A_eq) == form.b_eq)
    if form.num_ub:
        cons.append(lin(form.A_ub) <= form.b_ub)
    for var, lo, hi in ((x, form.lb[:d], form.ub[:d]), (aux, form.lb[d:], form.ub[d:])):
        if var is None:
            continue
        fin = np.flatnonzero(np.isfinite(lo))
        if fin.size:
            cons.append(var[fin] >= lo[fin])
        fin = np.flatnonzero(np.isfinite(hi))
        if fin.size:
            cons.append(var[fin] <= hi[fin])
    prob = cp.Problem(cp.Maximize(theta @ x - f(x)), cons)
    if not prob.is_dpp():  # pragma: no cover - a regularizer using parameters
        raise SolverError(f"the generic program for {polytope!r} with {reg.name!r} is not DPP")
    if aux is not None and aux.id not in {v.id for v in prob.variables()}:
        # auxiliary variables that no constraint reads (declared, not yet used): cvxpylayers
        # refuses a variable outside the problem; their value is free, the solve gives them 0
        variables = [x]
    return prob, theta, variables


class GenericLayer:
    """A compiled cvxpylayers layer for one (polytope instance, regularizer) pair."""

    def __init__(self, polytope: Polytope, reg: Regularizer):
        from cvxpylayers.torch import CvxpyLayer

        self.polytope = polytope
        self.reg = reg
        self.problem, self.theta, variables = build_problem(polytope, reg)
        self.layer = CvxpyLayer(self.problem, parameters=[self.theta], variables=variables)
        self.free_aux = polytope.form.num_aux if len(variables) == 1 else 0  # in no constraint: 0

    @staticmethod
    def solver_args(solver: str, solver_args: dict | None) -> dict:
        if solver not in SOLVER_DEFAULTS:
            raise unknown_name("generic solver", solver, SOLVER_DEFAULTS)
        return {**SOLVER_DEFAULTS[solver], **(solver_args or {})}

    def solve(self, theta: torch.Tensor, solver: str = "clarabel", solver_args: dict | None = None
              ) -> tuple[torch.Tensor, np.ndarray]:
        """``(x, residual)`` for ``theta: (B, d)`` float64 on the CPU: the solutions, unchecked
        (:meth:`check` them), and each row's constraint violation (``inf`` for NaN)."""
        args = self.solver_args(solver, solver_args)
        B = theta.shape[0]
        if B == 0:
            return theta * 0.0, np.zeros(0)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                sol = self.layer(theta, solver_args=args)
        except Exception as exc:  # diffcp/cvxpy raise plain exceptions; name the sample
            raise self._diagnose(theta, args, exc) from exc
        # diffcp reports SCS's inaccurate solves as a bare UserWarning("Solved/Inaccurate."): pass
        # them on as one SolverWarning (filterable with the library's other accuracy warnings)
        # and every other warning unchanged.
        n_inaccurate = 0
        for w in caught:
            if "inaccurate" in str(w.message).lower():
                n_inaccurate += 1
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
        if n_inaccurate:
            warn_user(
                f"generic solver ({solver}) reported {n_inaccurate} inaccurate solve(s) in a batch of {B} "
                f"({self.polytope!r}, {self.reg.name!r}); loosen the tolerances in solver_args, raise "
                "the iteration limit, or use the default solver='clarabel'",
            )
        z = torch.cat([s.detach() for s in sol] + [theta.new_zeros(B, self.free_aux)], dim=1).numpy()
        finite = np.isfinite(z).all(1)
        res = np.full(B, np.inf)
        if finite.any():
            res[finite] = self.polytope.form.residual(z[finite])
        return sol[0], res

    def check(self, res: np.ndarray, solver: str = "clarabel") -> None:
        """Raise :class:`SolverError` for rows that are NaN or violate the constraints by more
        than ``ERROR_RESIDUAL``; warn for those above ``WARN_RESIDUAL``."""
        B = res.shape[0]
        bad_nan = np.flatnonzero(~np.isfinite(res))
        if bad_nan.size:
            raise SolverError(
                f"generic solver ({solver}) returned NaN/inf for batch element(s) {bad_nan[:10].tolist()} "
                f"of {B} ({self.polytope!r}, {self.reg.name!r})"
            )
        bad = np.flatnonzero(res > ERROR_RESIDUAL)
        if bad.size:
            raise SolverError(
                f"generic solver ({solver}) returned infeasible solutions for batch element(s) "
                f"{bad[:10].tolist()} of {B}: constraint violation up to {res.max():.2e} "
                f"(> {ERROR_RESIDUAL:g}) for {self.polytope!r} with {self.reg.name!r}. "
                "Likely not converged: raise the iteration limit, use a higher temperature, or try "
                f"solver={'scs' if solver == 'clarabel' else 'clarabel'!r}."
            )
        inacc = np.flatnonzero(res > WARN_RESIDUAL)
        if inacc.size:
            warn_user(
                f"generic solver ({solver}) is inaccurate for batch element(s) {inacc[:10].tolist()} of {B}: "
                f"constraint violation up to {res.max():.2e} ({self.polytope!r}, {self.reg.name!r})",
            )

    def _diagnose(self, theta: torch.Tensor, args: dict, exc: Exception) -> SolverError:
        """Find which batch elements fail by solving them one at a time (error path only)."""
        failing = []
        detail = ""
        with torch.no_grad():
            for b in range(theta.shape[0]):
                try:
                    self.layer(theta[b : b + 1].detach(), solver_args=args)
                except Exception as e:  # noqa: BLE001 - we report it
                    failing.append(b)
                    detail = detail or f"{type(e).__name__}: {e}"
                if len(failing) >= 10:
                    break
        where = f"batch element(s) {failing}" if failing else "the batch (no single element fails alone)"
        return SolverError(
            f"generic solver ({args.get('solve_method')}) failed on {where} of {theta.shape[0]} for "
            f"{self.polytope!r} with {self.reg.name!r}: {detail or f'{type(exc).__name__}: {exc}'}"
        )


def generic_layer(polytope: Polytope, reg: Regularizer) -> GenericLayer:
    """The cached :class:`GenericLayer` of a (polytope instance, regularizer) pair."""
    key = ("generic", reg)  # the object: a redefined (replace=True) regularizer compiles anew
    layer = polytope.cache.get(key)
    if layer is None:
        layer = GenericLayer(polytope, reg)
        polytope.cache[key] = layer
    return layer


def relax_generic(theta: torch.Tensor, polytope: Polytope, reg: Regularizer, forbidden: torch.Tensor | None = None,
                  torch_fallback: bool = False, **options: Any) -> torch.Tensor:
    """Generic backend: ``theta: (B, *shape)`` any float dtype/device -> same dtype/device
    (``forbidden``, the mask of ``-inf`` entries, comes from ``relax``, not from users).

    ``torch_fallback`` (set by ``relax`` when ``backend="auto"`` chose this path for a
    regularizer with elementwise grad and hess, on more equality rows than the torch solver is
    used for by default): rows the conic solver leaves inaccurate or infeasible are solved again
    by the torch solver. At low temperature the exponential cones fail on such rows: a user's
    flow formulation of correlated k-subsets (n = 40, k = 8, 633 rows) with the entropy raised
    "infeasible solutions" on 2 of 8 rows at t = 0.02 and was off by 2e-5 at t = 0.1."""
    # relax() has checked the options' names and values (check_options)
    layer = generic_layer(polytope, reg)
    B = theta.shape[0]
    mask = None if forbidden is None else forbidden.reshape(B, polytope.size).cpu()
    flat = polytope._centered(theta.reshape(B, polytope.size).to(device="cpu", dtype=torch.float64), mask)
    flat = first_order_guard(flat, "the generic backend (cvxpylayers)")
    # entries far below or far above the others (manual masks at -1e9, choices forced by +1e9)
    # wreck the conic solver's scaling (spanning trees of K5 at -1e9: x off by 0.6): brought to
    # their levels (tame_extremes); rows that put mass on the raised ones anyway (every
    # structure uses one) are solved again with them shifted together (solve_again)
    tamed, low, _ = tame_extremes(flat, mask, polytope._support_argmax)
    x, residual = layer.solve(tamed, **options)
    # (and rows with such entries that failed: where every structure needs one, the raised
    # entries make the problem hard for the conic solver, which returned infeasible points)
    failed = torch.as_tensor(~(residual <= ERROR_RESIDUAL))
    redo = torch.unique(torch.cat([rows_on(x, low), (failed & low.any(1)).nonzero()[:, 0]]))
    if redo.numel():
        x2, res2 = layer.solve(solve_again(flat[redo], low[redo], None if mask is None else mask[redo]), **options)
        x, residual = x.index_put((redo,), x2), residual.copy()
        residual[redo.numpy()] = res2
    if torch_fallback:
        bad = np.flatnonzero(~(residual <= WARN_RESIDUAL))
        if bad.size:
            from .solver import relax_torch

            rows = torch.as_tensor(bad, device=theta.device)
            try:
                x_rows = relax_torch(theta[rows], polytope, reg, forbidden=None if forbidden is None else forbidden[rows])
            except PolytopeError:  # no standard form (an unbounded auxiliary variable): as before
                x_rows = None
            if x_rows is not None:
                x = x.index_put((torch.as_tensor(bad),), x_rows.reshape(bad.size, polytope.size).to("cpu", torch.float64))
                residual = residual.copy()
                residual[bad] = 0.0  # the torch solver warns itself about rows it does not converge on
    layer.check(residual, options.get("solver", "clarabel"))
    return x.to(device=theta.device, dtype=theta.dtype).reshape(theta.shape)
