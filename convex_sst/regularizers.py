"""Strongly convex regularizers f, the second axis of an SST (polytope x regularizer).

A regularizer declares properties, not procedures: its cvxpy expression (for the generic
layer), its torch value, and the box that contains its domain (checked against the polytope
once, when a layer is compiled). Users register their own with :func:`register_regularizer`.

Built-ins (applied to the output block ``x`` only):

========================  ======================================  ===============
name                      f(x)                                    domain
========================  ======================================  ===============
``entropy``               Σ x log x                               x ≥ 0
``binary_entropy``        Σ x log x + (1 - x) log(1 - x)           0 ≤ x ≤ 1
``quadratic``             ½ ‖x‖²                                  ℝⁿ
``exp_family``            conjugate of A(η) = log Σ_{x∈𝒳} exp(ηᵀx)  conv(𝒳) ⊆ [0,1]
========================  ======================================  ===============

``exp_family`` has no cvxpy form: its relaxed sample is the mean parameter ``∇A(u/t)`` of the
exponential family on the structures, computed by fast paths (see :mod:`convex_sst.fast`) or,
for polytopes without one, by enumerating at most 10 000 structures
(:func:`convex_sst.relax.exp_family_by_enumeration`); its oracle for small instances is
:func:`convex_sst.testing.brute_force_marginals`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .errors import RegistrationError, unknown_name


@dataclass(frozen=True)
class Regularizer:
    """A strongly convex function f on the output block.

    Attributes:
        name: registry name.
        description: one line, shown by ``convex-sst list``.
        cvxpy: ``x -> f(x)``, a convex scalar cvxpy expression of the flattened output variable;
            ``None`` for regularizers with no cvxpy form (fast-path only).
        value: ``x -> f(x)`` in torch, ``x: (*batch, d) -> (*batch,)``; ``None`` where f has no
            closed form (``exp_family``).
        domain: ``(lo, hi)``: the domain of f contains the box ``[lo, hi]^d`` (its closure).
        grad, hess: elementwise ``f'`` and ``f''`` of the per-coordinate function, for the batched
            torch solver (``backend="torch"``); optional.
        open_domain: ``f'`` blows up at the finite ends of ``domain`` (entropies), so the
            solution is strictly inside and those bounds need no multipliers.
    """

    name: str
    description: str
    cvxpy: Callable[[Any], Any] | None  # cvxpy.Expression -> cvxpy.Expression
    value: Callable[[torch.Tensor], torch.Tensor] | None
    domain: tuple[float, float] = (-math.inf, math.inf)
    grad: Callable[[torch.Tensor], torch.Tensor] | None = None
    hess: Callable[[torch.Tensor], torch.Tensor] | None = None
    open_domain: bool = False

    def __reduce_ex__(self, protocol):
        # a registered regularizer pickles (and copies) as its name: its functions are lambdas,
        # which pickle cannot store, and the registry holds the one instance
        if _REGISTRY.get(self.name) is self:
            return (get_regularizer, (self.name,))
        return super().__reduce_ex__(protocol)

    @property
    def separable(self) -> bool:
        """Whether the batched torch solver can use it (elementwise f', f'' given)."""
        return self.grad is not None and self.hess is not None


_REGISTRY: dict[str, Regularizer] = {}


_BUILTIN: set[str] = set()  # filled at the end of this module


def register_regularizer(reg: Regularizer, replace: bool = False) -> Regularizer:
    """Add a regularizer to the registry, so that its name works wherever a regularizer is asked for.

    Checks what can be checked before any solve: the types, a non-empty domain, ``grad`` and
    ``hess`` given together, and, at a few points inside the domain (float64), that ``hess > 0``
    (f strictly convex) and that ``grad`` and ``hess`` are the slopes of ``value`` and ``grad``
    (central differences), which catches a wrong sign or factor where it is made.

    Args:
        reg: the :class:`Regularizer`.
        replace: redefine a regularizer you registered before under the same name (e.g. when a
            notebook cell is run again); built-in names cannot be replaced.

    Returns:
        ``reg``.
    """
    if not isinstance(reg, Regularizer):
        raise RegistrationError(f"register_regularizer expects a Regularizer, got {type(reg).__name__}")
    if not isinstance(reg.name, str) or not reg.name:
        raise RegistrationError(f"a regularizer's name must be a non-empty string, got {reg.name!r}")
    if reg.name in _BUILTIN or (reg.name in _REGISTRY and not replace):
        hint = "choose another name" if reg.name in _BUILTIN else "choose another name, or pass replace=True to redefine it"
        raise RegistrationError(f"a regularizer named {reg.name!r} is already registered; {hint}")
    for field in ("cvxpy", "value", "grad", "hess"):
        fn = getattr(reg, field)
        if fn is not None and not callable(fn):
            raise RegistrationError(f"regularizer {reg.name!r}: {field} must be a function or None, got {type(fn).__name__}")
    try:
        lo, hi = (float(v) for v in reg.domain)
    except (TypeError, ValueError):
        raise RegistrationError(f"regularizer {reg.name!r}: domain must be a pair of numbers (lo, hi), got {reg.domain!r}") from None
    if not lo < hi:
        raise RegistrationError(f"regularizer {reg.name!r}: domain {reg.domain} is empty")
    if (reg.grad is None) != (reg.hess is None):
        raise RegistrationError(f"regularizer {reg.name!r}: give both grad and hess (the torch solver needs f' and f''), "
                                "or neither (then only the generic backend or a fast path can use it)")
    if reg.grad is not None:
        _check_derivatives(reg, lo, hi)
    _REGISTRY[reg.name] = reg
    return reg


def _check_derivatives(reg: Regularizer, lo: float, hi: float) -> None:
    """``hess > 0``, ``grad = value'`` and ``hess = grad'`` at five points inside the domain."""
    if math.isfinite(lo) and math.isfinite(hi):
        x = lo + (hi - lo) * torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9], dtype=torch.float64)
    elif math.isfinite(lo):
        x = lo + torch.tensor([0.1, 0.5, 1.0, 2.0, 5.0], dtype=torch.float64)
    elif math.isfinite(hi):
        x = hi - torch.tensor([5.0, 2.0, 1.0, 0.5, 0.1], dtype=torch.float64)
    else:
        x = torch.tensor([-2.0, -0.5, 0.0, 0.5, 2.0], dtype=torch.float64)
    h = 1e-6 * x.abs().clamp_min(1.0)

    def call(field: str, at: torch.Tensor) -> torch.Tensor:
        fn = getattr(reg, field)
        arg = at.reshape(-1, 1) if field == "value" else at  # value maps (*batch, d) -> (*batch,)
        try:
            out = fn(arg)
        except Exception as exc:
            raise RegistrationError(f"regularizer {reg.name!r}: {field} failed on a float64 tensor of shape "
                                    f"{tuple(arg.shape)}: {type(exc).__name__}: {exc}") from exc
        if not isinstance(out, torch.Tensor) or out.shape not in (at.shape, torch.Size([at.numel()])):
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise RegistrationError(f"regularizer {reg.name!r}: {field} must return a tensor of shape "
                                    f"{tuple(at.shape)} for input {tuple(arg.shape)}, got {got}")
        return out.reshape(at.shape).double()

    g, hs = call("grad", x), call("hess", x)
    bad = ~(torch.isfinite(g) & torch.isfinite(hs) & (hs > 0))
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise RegistrationError(f"regularizer {reg.name!r}: at x = {float(x[i]):g}, grad = {float(g[i]):g} and "
                                f"hess = {float(hs[i]):g}; both must be finite and hess > 0 (f strictly convex) "
                                f"inside the domain {reg.domain}")
    pairs = [("hess", hs, "grad")] + ([("grad", g, "value")] if reg.value is not None else [])
    for name, d, of in pairs:
        slope = (call(of, x + h) - call(of, x - h)) / (2 * h)
        off = (slope - d).abs() > 1e-5 * (1.0 + d.abs())
        if bool(off.any()):
            i = int(off.nonzero()[0])
            raise RegistrationError(f"regularizer {reg.name!r}: {name}({float(x[i]):g}) = {float(d[i]):.6g}, but the "
                                    f"slope of {of} there is {float(slope[i]):.6g} (central difference); check "
                                    f"{name}'s sign and scale (elementwise: {name} of one coordinate)")


def get_regularizer(name: str | Regularizer) -> Regularizer:
    if isinstance(name, Regularizer):
        known = _REGISTRY.get(name.name)
        if known is not None and known is not name:
            # fast paths and compiled layers are found by name: another function under a
            # registered name would silently get that regularizer's fast path
            raise RegistrationError(f"a different regularizer named {name.name!r} is registered; give yours "
                                    "another name, or pass the name to use the registered one")
        return name
    if name not in _REGISTRY:
        raise unknown_name("regularizer", name, _REGISTRY, hint="Register new ones with convex_sst.register_regularizer.")
    return _REGISTRY[name]


# cvxpy forms of the built-in regularizers; cvxpy is imported on first use (only the generic
# backend needs it), which keeps it out of ``import convex_sst``


def _entropy_cvxpy(x):
    import cvxpy as cp

    return -cp.sum(cp.entr(x))


def _binary_entropy_cvxpy(x):
    import cvxpy as cp

    return -cp.sum(cp.entr(x)) - cp.sum(cp.entr(1 - x))


def _quadratic_cvxpy(x):
    import cvxpy as cp

    return 0.5 * cp.sum_squares(x)


def available_regularizers() -> list[str]:
    """Names of the registered regularizers, sorted."""
    return sorted(_REGISTRY)


def regularizer_names() -> set[str]:
    return set(_REGISTRY)


register_regularizer(Regularizer(
    name="entropy",
    description="negative Shannon entropy Σ x log x (softmax on the simplex, Sinkhorn on Birkhoff)",
    cvxpy=_entropy_cvxpy,
    value=lambda x: torch.special.xlogy(x, x).sum(-1),
    domain=(0.0, math.inf),
    grad=lambda x: torch.log(x) + 1.0,
    hess=lambda x: 1.0 / x,
    open_domain=True,
))
register_regularizer(Regularizer(
    name="binary_entropy",
    description="Σ x log x + (1-x) log(1-x) (sigmoid on the cube, LML layer on k-subsets)",
    cvxpy=_binary_entropy_cvxpy,
    value=lambda x: (torch.special.xlogy(x, x) + torch.special.xlogy(1 - x, 1 - x)).sum(-1),
    domain=(0.0, 1.0),
    grad=lambda x: torch.log(x) - torch.log1p(-x),
    hess=lambda x: 1.0 / x + 1.0 / (1.0 - x),
    open_domain=True,
))
register_regularizer(Regularizer(
    name="quadratic",
    description="½‖x‖² (Euclidean projection: sparsemax on the simplex)",
    cvxpy=_quadratic_cvxpy,
    value=lambda x: 0.5 * (x * x).sum(-1),
    grad=lambda x: x,
    hess=lambda x: torch.ones_like(x),
))
register_regularizer(Regularizer(
    name="exp_family",
    description="exponential-family entropy: X_t = marginals of p(x) ∝ exp(uᵀx/t) (fast paths; else enumeration)",
    cvxpy=None,
    value=None,
    domain=(0.0, 1.0),
))
_BUILTIN.update(_REGISTRY)
