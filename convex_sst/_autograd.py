"""Autograd helpers shared by the solvers: autocast, inference mode, and first-order-only layers."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any, TypeVar, cast

import torch

from .errors import ConvexSSTError, NotSupportedError


F = TypeVar("F", bound=Callable[..., Any])


def _transformed(v: Any) -> bool:
    """Whether ``v`` is a tensor wrapped by a ``torch.func`` transform (vmap, grad, jacrev, jvp)."""
    check = getattr(getattr(torch._C, "_functorch", None), "is_functorch_wrapped_tensor", None)
    return isinstance(v, torch.Tensor) and check is not None and bool(check(v))


def _explain_torch_func(fn: F) -> F:
    """Decorator: where ``fn`` fails on a tensor that a ``torch.func`` transform wrapped, the
    failure is a :class:`NotSupportedError` that says so and what to do instead (torch's own
    message is about internals: ".item() on a Tensor", "a Tensor that doesn't have storage",
    "must override the setup_context staticmethod"). Calls that work under a transform (the
    pure-torch exp-family paths of ``log_partition`` under ``jacrev``) are left as they are."""
    return _explaining(fn, f"batch along the leading dimensions instead ({fn.__name__} takes inputs of "
                           f"shape (*batch, *polytope.shape) and solves every row at once)")


def _explain_torch_func_per_theta(fn: F) -> F:
    """:func:`_explain_torch_func` for the estimators, which take one θ of the polytope's shape a
    call (their hint is a loop over θ, not a batch dimension)."""
    return _explaining(fn, f"call {fn.__name__} once per θ (one θ of the polytope's shape a call, "
                           "one estimate each), or batch the samples through sst / relax, which take "
                           "inputs of shape (*batch, *polytope.shape)")


def _explaining(fn: F, hint: str) -> F:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except RuntimeError as e:
            if isinstance(e, ConvexSSTError) or not any(map(_transformed, (*args, *kwargs.values()))):
                raise
            raise NotSupportedError(
                f"{fn.__name__} does not support torch.func transforms (vmap, grad, jacrev, jvp, ...): its "
                f"solvers branch on values, and some run through NumPy. Hint: {hint}, and for Jacobians "
                "use torch.autograd.functional.jacobian"
            ) from e

    return cast(F, wrapper)


def graph_break(fn: F) -> F:
    """Decorator: under ``torch.compile``, ``fn`` runs eagerly as a graph break, as with
    ``torch.compiler.disable`` (the solvers branch on values and call SciPy and HiGHS). A
    failure under a ``torch.func`` transform is explained (:func:`_explain_torch_func`).

    ``torch.compiler.disable`` imports ``torch._dynamo`` when it decorates, which cost
    ``import convex_sst`` about 0.65 s (a third of its import time) in programs that never
    compile. Here ``fn`` is disabled lazily, the first time it is reached while compiling; dynamo
    then logs one extra graph break on that first trace ("function marked as skipped:
    disable"). Torch versions without ``torch.compiler.is_compiling`` are decorated at once.
    """
    fn = _explain_torch_func(fn)
    if not callable(getattr(torch.compiler, "is_compiling", None)):
        return cast(F, torch.compiler.disable(fn))
    # a dict with a constant key: dynamo traces its get and setitem (on torch 2.4 a list.append
    # here made it warn "Graph break due to unsupported builtin list.append")
    cache: dict[str, Callable[..., Any]] = {}

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not torch.compiler.is_compiling():
            return fn(*args, **kwargs)
        disabled = cache.get("disabled")
        if disabled is None:
            disabled = cache["disabled"] = torch.compiler.disable(fn)
        return disabled(*args, **kwargs)

    return cast(F, wrapper)


def autocast_off(device: torch.device):
    """A context in which autocast is off for ``device``'s type (a null context where it is off
    already): the solvers and their backward passes need the precision they were given, and
    autocast would run their matrix products in float16 / bfloat16."""
    try:
        on = torch.is_autocast_enabled(device.type)
    except TypeError:  # torch < 2.4: no device argument, one query per device type
        on = (torch.is_autocast_cpu_enabled() if device.type == "cpu" else
              torch.is_autocast_enabled() if device.type == "cuda" else False)
    except (RuntimeError, ValueError):  # a device type autocast does not know
        on = False
    return torch.autocast(device.type, enabled=False) if on else contextlib.nullcontext()


def _differentiates(fn: F) -> F:
    """Decorator for functions that run autograd inside (estimators, diagnostics, exact fallbacks): they
    run with inference mode off, since autograd cannot record inference tensors, and tensor
    arguments made under inference mode are copied first; also fine under ``no_grad``."""

    def plain(v):
        return v.clone() if isinstance(v, torch.Tensor) and v.is_inference() else v

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with torch.inference_mode(False):
            return fn(*map(plain, args), **{k: plain(v) for k, v in kwargs.items()})

    return cast(F, wrapper)


class _NoSecondDerivative(torch.autograd.Function):
    """Identity on a gradient that a first-order backward computed under ``create_graph=True``;
    differentiating it raises :class:`NotSupportedError`. Without it the gradient would be a
    constant to autograd, and a second derivative through it (a gradient penalty, a
    Hessian-vector product) would silently miss every term that goes through the solver."""

    @staticmethod
    def forward(ctx, g, what):
        ctx.what = what
        return g.clone()

    @staticmethod
    def backward(ctx, _):
        raise NotSupportedError(
            f"second derivatives through {ctx.what} are not supported: its backward pass gives exact first "
            "derivatives only, and a gradient computed from it with create_graph=True is being differentiated "
            "(double backward, a Hessian-vector product or a gradient penalty). Hint: the fast paths "
            "(backend='fast', the default where one is registered: convex_sst.available_fast_paths()) are twice "
            "differentiable; otherwise detach that gradient where its own derivative is not needed."
        )


def no_second_derivative(grads, what: str):
    """``grads`` (a tensor or a tuple with Nones) as they are, or, when the backward runs under
    ``create_graph=True``, routed through :class:`_NoSecondDerivative`."""
    if not torch.is_grad_enabled():
        return grads
    mark = lambda g: _NoSecondDerivative.apply(g.detach().requires_grad_(), what) if isinstance(g, torch.Tensor) else g  # noqa: E731
    return tuple(map(mark, grads)) if isinstance(grads, tuple) else mark(grads)


class _FirstOrderGuard(torch.autograd.Function):
    """Identity whose backward passes the gradient through :func:`no_second_derivative`: placed
    on the input of a layer whose backward is first-order only (the torch solver, cvxpylayers),
    it catches both what ``once_differentiable`` reports and the constant gradient it returns
    when the incoming gradient does not require grad."""

    @staticmethod
    def forward(ctx, x, what):
        ctx.what = what
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return no_second_derivative(g, ctx.what), None


def first_order_guard(x: torch.Tensor, what: str) -> torch.Tensor:
    """``x``, with second derivatives through what follows it reported as unsupported."""
    return _FirstOrderGuard.apply(x, what) if x.requires_grad else x
