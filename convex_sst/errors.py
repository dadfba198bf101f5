"""Exception hierarchy of convex_sst.

Every error raised on bad input is a :class:`ConvexSSTError`, so callers can catch the library's
errors as a group, and most also subclass the builtin that fits (``ValueError``,
``RuntimeError``), so generic handlers keep working. Messages say what was wrong, where, what
was expected, and give a hint.
"""

from __future__ import annotations

import difflib
import os
import sys
import types
import warnings
from collections.abc import Iterable


class ConvexSSTError(Exception):
    """Base class of every error raised by convex_sst."""


class ConfigError(ConvexSSTError, ValueError):
    """A polytope config file (or dict) is malformed: wrong key, type, expression or parameter."""


class PolytopeError(ConvexSSTError, ValueError):
    """A polytope is unusable: empty, unbounded, not integral, or too large to enumerate."""


class InputError(ConvexSSTError, ValueError):
    """A tensor or scalar argument has the wrong shape, dtype or value (NaN, inf, t <= 0)."""


class UnknownNameError(ConvexSSTError, ValueError):
    """A name (polytope, regularizer, noise, backend, argmax) is not registered."""


class RegistrationError(ConvexSSTError, ValueError):
    """A registration was rejected (duplicate name, wrong type)."""


class SolverError(ConvexSSTError, RuntimeError):
    """A numerical solver failed or returned a solution that does not pass verification."""


class NotSupportedError(ConvexSSTError, NotImplementedError):
    """An operation the library does not support, e.g. second derivatives through a solver
    whose backward pass is first-order only."""


class SolverWarning(UserWarning):
    """A solver returned a usable but possibly inaccurate result."""


def unknown_name(kind: str, name: object, available: Iterable[str], hint: str = "") -> UnknownNameError:
    """Build an :class:`UnknownNameError` listing the available names and the closest match."""
    available = sorted(available)
    msg = f"unknown {kind} {name!r}; available: {', '.join(available) or '(none)'}"
    close = difflib.get_close_matches(str(name), available, n=1)
    if close:
        msg += f". Did you mean {close[0]!r}?"
    if hint:
        msg += f" {hint}" if close else f". {hint}"
    return UnknownNameError(msg)


def _internal_dirs() -> tuple[str, ...]:
    dirs = [os.path.dirname(os.path.abspath(__file__))]
    torch_file = getattr(sys.modules.get("torch"), "__file__", None)
    if torch_file:
        dirs.append(os.path.dirname(os.path.abspath(torch_file)))
    return tuple(d + os.sep for d in dirs)


def warn_user(message: str, category: type[Warning] = SolverWarning) -> None:
    """``warnings.warn`` attributed to the caller's line, not to convex_sst or torch internals.

    The library's warnings are raised from solvers several calls (and torch wrappers such as
    ``torch.compiler.disable``) below the user's ``relax``/``SST`` call; a fixed ``stacklevel``
    would point into those frames, so the first frame outside both packages is found instead.
    """
    internal = _internal_dirs()
    frame: types.FrameType | None = sys._getframe(1)
    level = 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(internal):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level + 1 if frame is not None else 1)
