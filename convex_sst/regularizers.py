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
exponential family on the structures, available as fast paths only (see
:mod:`convex_sst.fast`); its oracle for small instances is
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


def register_regularizer(reg: Regularizer) -> Regularizer:
    """Add a regularizer to the registry (rejects duplicates and wrong types)."""
    if not isinstance(reg, Regularizer):
        raise RegistrationError(f"register_regularizer expects a Regularizer, got {type(reg).__name__}")
    if reg.name in _REGISTRY:
        raise RegistrationError(f"a regularizer named {reg.name!r} is already registered")
    lo, hi = reg.domain
    if not lo < hi:
        raise RegistrationError(f"regularizer {reg.name!r}: domain {reg.domain} is empty")
    _REGISTRY[reg.name] = reg
    return reg


def get_regularizer(name: str | Regularizer) -> Regularizer:
    if isinstance(name, Regularizer):
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
    description="exponential-family entropy: X_t = marginals of p(x) ∝ exp(uᵀx/t) (fast paths only)",
    cvxpy=None,
    value=None,
    domain=(0.0, 1.0),
))
