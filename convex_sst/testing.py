"""Reference oracles for small instances, public so users can test their own structures."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from ._forbidden import empty_face_error
from ._scalars import positive_int, positive_real
from .errors import InputError, unknown_name
from .polytope import Polytope
from .regularizers import Regularizer
from .relax import as_polytope, check_temperature, relax

__all__ = ["brute_force_argmax", "brute_force_marginals", "check_relaxation"]


def brute_force_marginals(u: torch.Tensor, polytope: Polytope | str, temperature: float | torch.Tensor = 1.0,
                          limit: int = 10_000) -> torch.Tensor:
    """``Σ_{x∈𝒳} softmax_x(uᵀx / t) · x`` by enumerating the vertices: the ``exp_family`` SST.

    Args:
        u: ``(*batch, *shape)`` utilities; ``-inf`` forbids a coordinate (the structures using it
            get probability 0), as in :func:`~convex_sst.relax`.
        polytope: a small polytope (at most ``limit`` vertices).
        temperature: t > 0.

    Returns:
        ``(*batch, *shape)``, differentiable in ``u`` and ``t`` (autograd through the sum).
    """
    P = as_polytope(polytope)
    batch, forbidden = P._check_masked(u)
    t = check_temperature(temperature, batch, u)
    V = P.vertices(limit=limit, dtype=u.dtype).to(u.device).reshape(-1, P.size)
    t_rows = t.expand(batch).reshape(-1, 1) if t.dim() else t  # one temperature per structure
    scores, uses = _vertex_scores(u, forbidden, V, P, batch)
    scores = scores / t_rows  # then -inf: no inf meets the temperature's backward
    probs = torch.softmax(scores if uses is None else scores.masked_fill(uses, -math.inf), dim=-1)
    return (probs @ V).reshape(batch + P.shape)


def _vertex_scores(u: torch.Tensor, forbidden: torch.Tensor | None, V: torch.Tensor, P: Polytope,
                   batch: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``uᵀv`` for every structure v ``(B, V)`` over the allowed coordinates, and which
    structures use a forbidden one ``(B, V)`` (None without forbidden coordinates)."""
    if forbidden is None:
        return u.reshape(-1, P.size) @ V.T, None
    mask = forbidden.reshape(-1, P.size)
    scores = u.masked_fill(forbidden, 0.0).reshape(-1, P.size) @ V.T
    uses = (mask.to(V.dtype) @ V.T) > 0
    empty = uses.all(1).nonzero().reshape(-1)
    if empty.numel():
        raise empty_face_error(empty, batch, P, "u")
    return scores, uses


def brute_force_argmax(u: torch.Tensor, polytope: Polytope | str) -> torch.Tensor:
    """``argmax_{x∈𝒳} uᵀx`` by enumerating the vertices: ``(*batch, *shape)`` (``-inf`` in u
    forbids a coordinate, as in :meth:`Polytope.argmax`)."""
    P = as_polytope(polytope)
    batch, forbidden = P._check_masked(u)
    V = P.vertices(dtype=u.dtype).to(u.device).reshape(-1, P.size)
    scores, uses = _vertex_scores(u.detach(), forbidden, V, P, batch)
    best = (scores if uses is None else scores.masked_fill(uses, -math.inf)).argmax(-1)
    return V[best].reshape(batch + P.shape)


def check_relaxation(polytope: Polytope | str, regularizer: str | Regularizer, backend: str = "fast",
                     reference: str | None = None, temperatures: Sequence[float] = (0.5, 2.0), num_samples: int = 4,
                     scale: float = 2.0, atol: float | None = None, seed: int = 0, **options: Any) -> list[dict]:
    """Check a backend's relaxation ``X_t = argmax_{x in P} uᵀx − t f(x)`` against an independent one.

    Made for a fast path you register (``register_fast_path``): at each temperature, on
    ``num_samples`` utilities ``u ~ scale · N(0, 1)`` in float64, it compares ``X_t`` and a
    vector-Jacobian product with those of the reference, the same with about a third of the
    coordinates forbidden (``-inf``; the path sees relax's very low stand-in utilities, or the
    mask if it declares ``forbidden``), checks that ``X_t`` lies in P, and runs
    ``torch.autograd.gradcheck`` on the backend for the first sample.

    Args:
        polytope, regularizer: the pair to check.
        backend: the backend under test (``"fast"``, ``"torch"``, ...).
        reference: ``"torch"`` (the interior-point solver; the default when the regularizer gives
            ``grad`` and ``hess``), ``"generic"`` (cvxpylayers; the default when it has only a
            cvxpy form) or ``"brute_force"`` (enumeration, ``exp_family`` only; its default).
        temperatures: the temperatures t to test (a sequence of numbers > 0).
        num_samples, scale, seed: how many utilities to draw, their standard deviation, and the
            seed of the generator that draws them.
        atol: largest accepted absolute difference in values and gradients; default 1e-6
            (1e-5 against ``"generic"``, whose solves are less accurate).
        **options: backend options for the backend under test.

    Returns:
        One dict per temperature: ``temperature``, ``value_error``, ``grad_error``,
        ``forbidden_error`` (max abs differences; the last of values and gradients with about a
        third of the coordinates set to ``-inf``, see :func:`~convex_sst.relax`; values only
        when the generic backend is involved),
        ``in_polytope`` and ``gradcheck`` (bools).

    Raises:
        AssertionError: naming the first temperature and check that failed (pytest shows it).
    """
    P = as_polytope(polytope)
    reg = P.check_regularizer(regularizer)
    if reference is None:
        reference = ("torch" if reg.separable else "generic" if reg.cvxpy is not None
                     else "brute_force" if reg.name == "exp_family" else None)
        if reference is None:
            raise InputError(f"regularizer {reg.name!r} has no grad/hess, no cvxpy form and is not exp_family: "
                             "there is no reference to check against")
    if reference not in ("torch", "generic", "brute_force"):
        raise unknown_name("reference", reference, ["torch", "generic", "brute_force"])
    if reference == "brute_force" and reg.name != "exp_family":
        raise InputError(f"reference='brute_force' computes the exp_family relaxation, not {reg.name!r}")
    tol = positive_real(atol, "atol", allow_none=True) or (1e-5 if reference == "generic" else 1e-6)
    scale = positive_real(scale, "scale")
    if getattr(temperatures, "ndim", 0) == 1 and hasattr(temperatures, "tolist"):
        temperatures = temperatures.tolist()          # a 1-d NumPy array or tensor
    if isinstance(temperatures, (str, bytes)) or not isinstance(temperatures, Sequence) or not temperatures:
        raise InputError(f"temperatures must be a non-empty sequence of numbers > 0, e.g. (0.5, 2.0), got {temperatures!r}")
    temperatures = [positive_real(t, "each of temperatures") for t in temperatures]
    gen = torch.Generator().manual_seed(int(seed))
    u = scale * torch.randn((positive_int(num_samples, "num_samples"),) + P.shape, generator=gen, dtype=torch.float64)
    w = torch.randn(u.shape, generator=gen, dtype=torch.float64)  # cotangent of the VJP
    # about a third of the coordinates the best structure leaves at 0 forbidden (u = -inf): the
    # face stays non-empty, and the path sees relax's very low stand-in utilities there
    forbid = (P.argmax(u) == 0) & (torch.rand(u.shape, generator=gen, dtype=torch.float64) < 1 / 3)
    u_forbidden = u.masked_fill(forbid, -math.inf)

    def run(which: str, t: float, v: torch.Tensor) -> torch.Tensor:
        if which == "brute_force":
            return brute_force_marginals(v, P, t)
        return relax(v, P, reg, t, backend=which, **(options if which == backend else {}))

    rows = []
    for t in temperatures:
        got: list[torch.Tensor] = []
        want: list[torch.Tensor] = []
        for which, out in ((backend, got), (reference, want)):
            for start in (u, u_forbidden):
                if start is u_forbidden and "generic" in (backend, reference):
                    # the generic path's derivatives next to -inf are not accurate (relax
                    # refuses them): compare values only
                    with torch.no_grad():
                        out += [run(which, t, start), torch.zeros_like(start)]
                    continue
                v = start.clone().requires_grad_(True)
                x = run(which, t, v)
                (g,) = torch.autograd.grad((x * w).sum(), v)
                out += [x.detach(), g]
        first = u[:1].clone().requires_grad_(True)
        rows.append({
            "temperature": t,
            "value_error": float((got[0] - want[0]).abs().max()),
            "grad_error": float((got[1] - want[1]).abs().max()),
            "forbidden_error": float(max((got[2] - want[2]).abs().max(), (got[3] - want[3]).abs().max())),
            "in_polytope": bool(P.contains(got[0], atol=max(tol, 1e-6)).all()),
            "gradcheck": torch.autograd.gradcheck(lambda v: run(backend, t, v), (first,), atol=max(tol, 1e-6),
                                                  raise_exception=False),
        })
        row = rows[-1]
        failed = [k for k in ("value_error", "grad_error", "forbidden_error") if row[k] > tol] + \
                 [k for k in ("in_polytope", "gradcheck") if not row[k]]
        if failed:
            raise AssertionError(
                f"{backend} relaxation of {P!r} with {reg.name!r} at t = {t:g} fails {', '.join(failed)} against "
                f"{reference} (value error {row['value_error']:.2e}, gradient error {row['grad_error']:.2e}, "
                f"with forbidden coordinates {row['forbidden_error']:.2e}, "
                f"tolerance {tol:.0e}; in P: {row['in_polytope']}, gradcheck: {row['gradcheck']})"
            )
    return rows
