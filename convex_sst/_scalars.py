"""Scalar arguments from Python, NumPy or torch: ``0.5``, ``np.float32(0.5)``, ``np.array(0.5)``,
``torch.tensor(0.5)`` and ``x.shape[-1]`` all count as the same number; ``True`` does not."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any, Literal, overload

import numpy as np

from .errors import InputError


def as_real(value: Any) -> float | None:
    """``value`` as a float if it is a real, non-boolean scalar (0-d arrays and tensors included), else None."""
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item") and not isinstance(value, numbers.Number):
        value = value.item()                        # a 0-d numpy array or torch tensor: its scalar
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        return None
    return float(value)


def as_int(value: Any) -> int | None:
    """``value`` as an int if it is an integer scalar (or an integral float such as ``1e3``), else None."""
    real = as_real(value)
    if real is None or not real.is_integer():
        return None
    return int(real)


@overload
def positive_real(value: Any, what: str, allow_none: Literal[False] = False) -> float: ...
@overload
def positive_real(value: Any, what: str, allow_none: bool) -> float | None: ...


def positive_real(value: Any, what: str, allow_none: bool = False) -> float | None:
    """``value`` as a finite float > 0; an :class:`InputError` naming ``what`` otherwise."""
    if value is None and allow_none:
        return None
    real = as_real(value)
    if real is None or not (math.isfinite(real) and real > 0):
        raise InputError(f"{what} must be a finite number > 0{' (or None)' if allow_none else ''}, got {value!r}")
    return real


def positive_int(value: Any, what: str, minimum: int = 1) -> int:
    """``value`` as an int ≥ ``minimum``; an :class:`InputError` naming ``what`` otherwise."""
    integer = as_int(value)
    if integer is None or integer < minimum:
        raise InputError(f"{what} must be an integer >= {minimum}, got {value!r}")
    return integer


def check_backend_options(options: dict[str, Any], where: str) -> dict[str, Any]:
    """The library's backend options with their values checked and normalised: ``tol`` and
    ``max_range`` finite > 0 or None, ``max_iter`` an integer >= 1, ``solver`` a name,
    ``solver_args`` a mapping or None. Other names pass through (their path checks them)."""
    out = dict(options)
    for name, value in options.items():
        what = f"option {name} of {where}"
        if name in ("tol", "max_range"):
            out[name] = positive_real(value, what, allow_none=True)
        elif name == "max_iter":
            out[name] = positive_int(value, what)
        elif name == "solver" and not isinstance(value, str):
            raise InputError(f"{what} must be a solver name (a string), got {value!r}")
        elif name == "solver_args" and value is not None and not isinstance(value, Mapping):
            raise InputError(f"{what} must be a dict of solver settings or None, got {type(value).__name__}; "
                             "hint: solver_args={'max_iter': 1000}")
    return out
