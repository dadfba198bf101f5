"""``relax``: the deterministic map U ↦ X_t = argmax_{x in P} Uᵀx − t f(x), and backend dispatch.

Backends:

* ``"fast"``: an exact algorithm registered for the (polytope name, regularizer) pair with
  :func:`register_fast_path` (softmax, Sinkhorn, matrix-tree, ...);
* ``"torch"``: the batched interior-point solver of :mod:`convex_sst.solver` (any polytope,
  any regularizer with elementwise derivatives; CPU and CUDA);
* ``"generic"``: the cvxpylayers program of :mod:`convex_sst.generic` (any pair with a cvxpy
  regularizer; the reference implementation);
* ``"auto"``: ``"fast"`` where registered, else ``"torch"`` where the regularizer allows it and
  the polytope has at most ``TORCH_AUTO_MAX_ROWS`` equality rows (1 600 for the entropies,
  ``TORCH_AUTO_MAX_ROWS_BY_REGULARIZER``; the solver factors a dense Schur complement of that
  size per sample) or at most ``TORCH_AUTO_MAX_BANDED_ROWS`` banded ones (factored by blocks;
  any number where they are also a flow's), else ``"generic"``.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import math
from collections.abc import Callable
from typing import Any, cast

import torch

from ._autograd import autocast_off, graph_break
from ._forbidden import clear_forbidden, fill_forbidden, lower_forced
from ._scalars import as_real, check_backend_options
from .errors import InputError, NotSupportedError, PolytopeError, UnknownNameError, unknown_name, warn_user
from .polytope import Polytope, load_polytope
from .regularizers import Regularizer

FastPath = Callable[..., torch.Tensor]
_FAST: dict[tuple[str, str], FastPath] = {}
BACKENDS = ("auto", "fast", "torch", "generic")
# above this many equality rows "auto" takes the generic path. Measured (forward + backward, t = 1,
# one run each; spanning trees n = 11 to 14, 176 to 287 rows; correlated k-subsets n = 20, k = 5,
# 211 rows): the torch solver 1.3x to 11x faster at B = 32 and 128 and, against the exact face
# Jacobian, ~100x more accurate; at B = 1 with the quadratic, 0.2x to 0.4x (hundreds of ms). At
# 379 rows (correlated, n = 30, k = 6) 0.9x to 2.6x, at 721 rows 0.5x to 3.4x
TORCH_AUTO_MAX_ROWS = 300
# the entropies' cvxpy forms are exponential cones, which cvxpylayers solves slowly and, at low
# temperature, inaccurately (values off by 2e-5 and infeasible rows at t = 0.02, gradients 0.5 %
# off at t = 0.1, a user's flow config of 633 rows); the torch solver, its batches chunked to
# bounded memory, was faster there: 633 rows 2.0x at B = 32 and 5.8x at B = 1, spanning trees
# n = 20 (590 rows) 1.2x at t = 1 and 16x at t = 0.1, even at 951 rows, 0.9x at 1 333. Above
# 1 000 rows cvxpylayers returned infeasible rows even at t = 1 (spanning trees n = 26 and 30),
# its gradients 0.02-0.3 % off; with its standard form built in seconds (2026-12-05), the torch
# solver (forward + backward, B = 16, t = 1, first call) took 14 s against 50 s at spanning
# trees n = 26 (1 001 rows), 38 s against 93 s at n = 30 (1 335), 8.5 s against 77 s at
# arborescences n = 24 (1 152), 34 s against 67 s at n = 32 (2 048, B = 8), but 6.2 s against
# 8.9 s and 16.4 s against 13.4 s at correlated k-subsets of 1 181 and 1 603 rows (sparser
# rows, where cvxpylayers' sparse factorization gains on the dense Schur complement): the bound
# sits there
TORCH_AUTO_MAX_ROWS_BY_REGULARIZER = {"entropy": 1600, "binary_entropy": 1600}
# ... except where the solver factors the reduced Schur complement by blocks (banded rows, as in
# formulations that follow a sequence: correlated k-subsets, users' chains; solver._band): its
# cost per sample grows like the rows there, not their cube, and it takes those up to this many
# equality rows with every regularizer. Correlated k-subsets (k = 10), fresh processes, forward +
# backward at t = 1, torch / cvxpylayers: 3 251 rows, B = 8: the entropy 1.5 / 36-53 s, the
# quadratic 1.3-1.7 / 6.1 s; 4 401 rows: 3.1-4.8 / 43-49 s and 3.1-3.6 / 7.1-7.3 s, with
# gradients 1e3x more accurate. The first call builds the standard form, whose rank test is a
# dense QR of Aᵀ for rows other than a flow's (solver._network_rows settles those in
# milliseconds): at 4 401 rows 17 s, at 9 001 146 s, against about 2-12 s for cvxpylayers' first
# call. The bound sits there, for those; banded rows that are a flow's (solver.network_rows:
# correlated k-subsets) have none (n = 400, 9 001 rows: standard form 2.9 s, B = 8 in 6-8 s)
TORCH_AUTO_MAX_BANDED_ROWS = 4500


def torch_auto_max_rows(reg: Regularizer) -> int:
    """The most equality rows for which ``backend="auto"`` takes the torch solver with ``reg``
    (unless they are banded: :data:`TORCH_AUTO_MAX_BANDED_ROWS`)."""
    return TORCH_AUTO_MAX_ROWS_BY_REGULARIZER.get(reg.name, TORCH_AUTO_MAX_ROWS)


def _torch_auto(P: Polytope, reg: Regularizer) -> bool:
    """Whether ``backend="auto"`` takes the torch solver for P (no fast path, ``reg`` separable)."""
    rows = P.form.num_eq
    if rows <= torch_auto_max_rows(reg):
        return _torch_form_exists(P, reg)
    from .solver import looks_banded, network_rows, standard_form

    if not looks_banded(P) or (rows > TORCH_AUTO_MAX_BANDED_ROWS and not network_rows(P)):
        return False
    return _torch_form_exists(P, reg) and standard_form(P, reg).band > 0


def register_fast_path(polytope: str, regularizer: str) -> Callable[[FastPath], FastPath]:
    """Register ``fn(theta, polytope, *, option=default, ...) -> x`` for a (polytope, regularizer) pair.

    ``theta = u / t`` has shape ``(B, *polytope.shape)``; ``fn`` returns the relaxed sample of
    the same shape, dtype and device, differentiable w.r.t. ``theta`` (twice, ideally: the
    built-in paths are, so second derivatives work through them; see :mod:`convex_sst.fast`).
    Options passed to :func:`relax` are checked against ``fn``'s keyword parameters (an
    unknown one is an :class:`InputError`); an ``fn`` taking ``**options`` checks them itself.
    ``polytope`` is a built-in name or the name of a config registered with
    :func:`register_polytope`. Check ``fn`` with :func:`convex_sst.testing.check_relaxation`.

    Forbidden coordinates (``u = -inf``) reach ``fn`` as a finite, very low utility, so any
    path handles them; one that can do better (Sinkhorn: exact zeros instead of ε-scaling over
    the low values) declares a keyword ``forbidden`` and receives their boolean mask
    ``(B, *polytope.shape)`` (None when there are none). Users cannot pass it as an option.
    """
    from .errors import RegistrationError

    def deco(fn: FastPath) -> FastPath:
        key = (polytope, regularizer)
        if not callable(fn):
            raise RegistrationError(f"fast path {key} must be callable")
        if key in _FAST:
            raise RegistrationError(f"a fast path for {key} is already registered")
        _FAST[key] = fn
        return fn

    return deco


@functools.lru_cache(maxsize=None)
def _takes_forbidden(fast: FastPath | None) -> bool:
    """Whether a fast path (or a backend function: the torch solver's does) declares the keyword
    ``forbidden`` (see :func:`register_fast_path`); cached: ``inspect.signature`` would otherwise
    run at every masked call."""
    if fast is None:
        return False
    try:
        return "forbidden" in inspect.signature(fast).parameters
    except (TypeError, ValueError):  # a builtin or C callable without a signature
        return False


def available_fast_paths() -> list[tuple[str, str]]:
    """Registered (polytope name, regularizer name) pairs, sorted."""
    return sorted(_FAST)


def as_polytope(polytope: Polytope | str) -> Polytope:
    if isinstance(polytope, Polytope):
        return polytope
    if isinstance(polytope, str):
        return load_polytope(polytope)
    if isinstance(polytope, torch.Tensor):  # the utilities, most likely: arguments swapped
        raise InputError("polytope must be a Polytope or a name, got a Tensor; hint: check the argument order: "
                         "relax(u, polytope), sst(theta, polytope), log_partition(u, polytope), but "
                         "smt_distribution(polytope, theta)")
    raise InputError(f"polytope must be a Polytope or a name, got {type(polytope).__name__}; "
                     "hint: convex_sst.load_polytope('k_subset', n=5, k=2)")


def _positive_number(temperature: int | float) -> float:
    t = float(temperature)
    if not (math.isfinite(t) and t > 0):
        raise InputError(f"temperature must be finite and > 0, got {t}; the hard limit t -> 0 is polytope.argmax(u)")
    return t


def _is_number(temperature: Any) -> bool:
    """A Python or NumPy real scalar (not a tensor, which may carry a gradient; not a bool)."""
    return not isinstance(temperature, torch.Tensor) and as_real(temperature) is not None


def check_temperature(temperature: Any, batch: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """Validate t > 0, finite, broadcastable to the batch shape; return it as a tensor."""
    if _is_number(temperature):
        return torch.as_tensor(_positive_number(temperature), dtype=like.dtype, device=like.device)
    if not isinstance(temperature, torch.Tensor):
        raise InputError(f"temperature must be a positive float or tensor, got {type(temperature).__name__}")
    t = torch.as_tensor(temperature, dtype=like.dtype, device=like.device)
    try:
        ok = t.dim() <= len(batch) and torch.broadcast_shapes(tuple(t.shape), batch) == torch.Size(batch)
    except RuntimeError:
        ok = False
    if not ok:
        hint = ""
        if t.numel() == math.prod(batch) and t.numel() > 1:
            hint = (
                f"; hint: one temperature per sample has the batch shape, without trailing dimensions "
                f"for the structure's: temperature.reshape{batch}"
            )
        raise InputError(
            f"temperature has shape {tuple(t.shape)}; expected a scalar or a shape broadcastable to the "
            f"batch shape {batch}{hint}"
        )
    td = t.detach()
    if not bool(torch.isfinite(td).all()) or not bool((td > 0).all()):
        bad = td[~(torch.isfinite(td) & (td > 0))].reshape(-1)[0].item()
        raise InputError(f"temperature must be finite and > 0, got {bad}; the hard limit t -> 0 is polytope.argmax(u)")
    return t


def _check_scaled(theta: torch.Tensor, u: torch.Tensor, t: float | torch.Tensor) -> None:
    """``u / t`` must be finite: a temperature that small in ``u``'s dtype is the hard limit."""
    if math.isfinite(float(theta.detach().sum())):  # one reduction in the common case
        return
    if bool(torch.isfinite(theta.detach()).all()):  # only the sum overflowed
        return
    tmin = float(t) if isinstance(t, float) else float(t.detach().min())
    umax = float(u.detach().abs().amax())
    need = umax / torch.finfo(u.dtype).max
    raise InputError(
        f"u / temperature overflows {u.dtype} (temperature {tmin:.3g}, max |u| = {umax:.3g}): at this "
        f"temperature the relaxation equals the hard sample to the dtype's precision. Use "
        f"polytope.argmax(u) (the t → 0 limit), a temperature above {need:.1g}, or float64 inputs"
    )


@graph_break  # a graph break under torch.compile: the solvers branch on values
def relax(
    u: torch.Tensor,
    polytope: Polytope | str,
    regularizer: str | Regularizer = "entropy",
    temperature: float | torch.Tensor = 1.0,
    backend: str = "auto",
    **options: Any,
) -> torch.Tensor:
    """Relaxed structure ``X_t = argmax_{x in P} uᵀx − t·f(x)`` (the stochastic softmax trick).

    Equivalently ``argmax (u/t)ᵀx − f(x)``; the map is differentiable in ``u`` and ``t`` (twice
    through the fast paths; the torch and generic backends give first derivatives).

    Args:
        u: utilities ``(*batch, *polytope.shape)``, float32 or float64, any device (float16 and
            bfloat16 are computed in float32 and the result rounded back). ``-inf`` (or
            ``torch.finfo(u.dtype).min``, as in ``masked_fill`` idioms) forbids a coordinate:
            ``X_t`` is then computed on the face of P where those coordinates are 0, and is 0
            there with zero gradient (an :class:`InputError` if no structure avoids them).
        polytope: a :class:`Polytope` (``load_polytope(...)``) or a built-in name (defaults).
        regularizer: name of a registered regularizer (``entropy``, ``binary_entropy``,
            ``quadratic``, ...) or a :class:`Regularizer`.
        temperature: ``t > 0``; a float or a tensor broadcastable to ``batch`` (per sample).
        backend: ``"auto"`` | ``"fast"`` | ``"torch"`` | ``"generic"``.
        **options: backend options: ``solver="scs"``, ``solver_args={...}`` (generic);
            ``tol``, ``max_iter``, ``on_failure`` (torch, and the iterative fast paths such as
            Sinkhorn); ``max_range``, ``method`` (tree fast paths). ``tol`` and ``max_range``
            must be finite and > 0, ``max_iter`` an integer >= 1; an unknown name is an
            :class:`InputError` listing the accepted ones.

    Returns:
        ``(*batch, *polytope.shape)`` tensor in P, same dtype and device as ``u``.

    Example:
        >>> P = load_polytope("simplex", n=3)
        >>> relax(torch.tensor([1.0, 2.0, 3.0]), P, "entropy", 1.0)   # == softmax
    """
    P = as_polytope(polytope)
    batch, forbidden = P._check_masked(u)
    reg = P.check_regularizer(regularizer)
    if u.dtype not in (torch.float32, torch.float64):
        # half precisions (autocast activations): too coarse for iterative solvers and matrix
        # factorizations (and some have no half kernels): computed in float32, rounded back
        u32 = u.float() if forbidden is None else u.float().masked_fill(forbidden, -math.inf)
        return relax(u32, P, reg, temperature, backend, **options).to(u.dtype)
    if forbidden is not None:
        if options.get("max_range") is not None:
            raise InputError("max_range clips the logits from below, which would give the coordinates where u = "
                             "-inf a positive weight; drop max_range (the tree paths are exact without it)")
        u = u.masked_fill(forbidden, 0.0)  # before dividing by t: no inf in any backward pass
    if _is_number(temperature):  # the common case, without a tensor round trip
        t = _positive_number(cast(float, temperature))
        theta = u if t == 1.0 else u / t  # u / 1 == u exactly: no op, no backward node
        if t < 1.0:
            _check_scaled(theta, u, t)
    else:
        tt = check_temperature(temperature, batch, u)
        theta = u / tt.reshape(tuple(tt.shape) + (1,) * len(P.shape))
        _check_scaled(theta, u, tt)
    theta = theta.reshape((-1,) + P.shape)
    route = _route(P, reg, backend)
    if forbidden is not None and route[0] == "generic" and theta.requires_grad and torch.is_grad_enabled():
        route = _generic_with_forbidden(P, reg, backend, options)
    options = _check_options(P, reg, route, options)
    if route[0] == "generic" and backend == "auto" and reg.separable and not options:
        options = {"torch_fallback": True}  # rows the conic solver fails on (see relax_generic)
    fn = _backend_fn(route)
    if forbidden is not None:
        mask = forbidden.reshape(theta.shape)
        theta = fill_forbidden(theta, mask)
        if _takes_forbidden(route[1] or fn):  # a fast path, or a backend function, declaring it
            options = {**options, "forbidden": mask}
    with autocast_off(theta.device):
        x = fn(theta, P, reg, **options)
    if forbidden is not None:
        x = clear_forbidden(x, mask, batch, P)
    return x.reshape(batch + P.shape)


def _generic_with_forbidden(P: Polytope, reg: Regularizer, backend: str, options: dict[str, Any]
                            ) -> tuple[str, FastPath | None]:
    """The route for a differentiated relaxation with forbidden coordinates that would use the
    generic backend: cvxpylayers' derivatives next to them are wrong (the stand-in utility makes
    the conic program's derivative ill-conditioned, and fixing those variables by bounds makes it
    degenerate: gradient errors up to 0.6 against the exact ones, simplex n = 40, quadratic), so
    ``"auto"`` takes the torch solver where it can, and otherwise this is an error."""
    if backend == "auto" and reg.separable and not options:
        return "torch", None
    raise NotSupportedError(
        f"the generic backend (cvxpylayers) does not differentiate accurately next to forbidden (-inf) "
        f"coordinates (gradient errors up to 0.6 measured) for {P!r} with {reg.name!r}. Use backend='torch' "
        f"(regularizers with elementwise grad and hess) or a fast path, or compute values only (torch.no_grad())"
    )


# options of the torch and generic backends (a fast path's are its keyword parameters)
BACKEND_OPTIONS = {"torch": ("tol", "max_iter", "on_failure"), "generic": ("solver", "solver_args")}


def check_options(P: Polytope, reg: Regularizer, backend: str, options: dict[str, Any]) -> dict[str, Any]:
    """The ``**options`` of :func:`relax`, checked for the backend it would use, normalised.

    A misspelt or foreign name is an :class:`InputError` naming what that backend accepts (not a
    bare ``TypeError``); the library's own options must have valid values (``tol`` finite > 0,
    ...). A user's fast path that takes ``**options`` checks them itself, and the values of
    its named options are its own business. :class:`SST` calls this when it is built.
    """
    return _check_options(P, reg, _route(P, reg, backend), options) if options else options


def _check_options(P: Polytope, reg: Regularizer, route: tuple[str, FastPath | None],
                   options: dict[str, Any]) -> dict[str, Any]:
    if not options:
        return options
    if "forbidden" in options:
        raise InputError("'forbidden' is not an option: relax derives it from u; put -inf in u where a coordinate "
                         "is forbidden")
    kind, fast = route
    if fast is not None:  # kind == "fast"
        params = list(inspect.signature(fast).parameters.values())
        if any(p.kind is p.VAR_KEYWORD for p in params):
            return options
        accepted = tuple(p.name for p in params[2:] if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
                         and p.name != "forbidden")  # relax's own (-inf in u), not an option
        where = f"the fast path {P.name}/{reg.name}"
        named = f"{where} ({fast.__name__})"
        ours = fast.__module__.startswith("convex_sst.")
    else:
        accepted, where, ours = BACKEND_OPTIONS[kind], f"the {kind} backend", True
        named = where
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        close = difflib.get_close_matches(unknown[0], accepted, n=1)
        others = "; ".join(f"backend={k!r} takes {', '.join(v)}" for k, v in BACKEND_OPTIONS.items() if k != kind)
        raise InputError(f"unknown option(s) {unknown} for {named}; it accepts {list(accepted) or 'none'}"
                         f"{f'. Did you mean {close[0]!r}?' if close else '.'} Hint: {others}")
    return check_backend_options(options, where) if ours else options


ENUMERATION_LIMIT = 10_000  # structures: exp_family by enumeration, as log_partition's default


def exp_family_by_enumeration(theta: torch.Tensor, polytope: Polytope,
                              forbidden: torch.Tensor | None = None) -> torch.Tensor:
    """Marginals ``E[X]`` of ``p(x) ∝ exp(θᵀx)`` over the structures, by enumerating them:
    ``softmax(V θ)ᵀ V`` for the ``(N, d)`` structures V (found once per polytope, at most
    :data:`ENUMERATION_LIMIT`). The ``exp_family`` relaxation of polytopes without an exact
    algorithm: Birkhoff and matchings (a permanent), and users' configs. ``theta: (B, *shape)``
    → ``(B, *shape)``, exact, computed in float64, differentiable twice (autograd).

    Entries far above the others (+1e9 to force a choice) are lowered first, as in
    :func:`~convex_sst.log_partition` (x moves by less than e⁻⁴⁰; at 1e9 the scores would keep
    only 1e-7 of their differences)."""
    P = polytope
    key = ("exp_family structures", ENUMERATION_LIMIT, theta.device)
    try:
        V = P.cache[key] if key in P.cache else P.vertices(limit=ENUMERATION_LIMIT)
    except PolytopeError as exc:
        raise NotSupportedError(
            f"no exact algorithm for the exp_family relaxation of {P!r}, and it has more than "
            f"{ENUMERATION_LIMIT} structures to enumerate; register one with "
            f"@convex_sst.register_fast_path({P.name!r}, 'exp_family'), or use another regularizer "
            "('entropy', 'binary_entropy', 'quadratic')"
        ) from exc
    flat = theta.reshape(theta.shape[0], P.size).double()
    mask = None if forbidden is None else forbidden.reshape(flat.shape)
    flat = lower_forced(flat, mask, P._flat_argmax)
    V = P.cache[key] = V.to(flat.device).reshape(-1, P.size)  # kept on the device
    x = torch.softmax(flat @ V.T, dim=1) @ V
    return x.to(theta.dtype).reshape(theta.shape)


def _torch_form_exists(P: Polytope, reg: Regularizer) -> bool:
    """Whether the torch solver can take P: it needs bounds on every auxiliary variable (a
    config with a free one, ``x[0] == z[0] - z[1]``, raised PolytopeError under ``"auto"``,
    which now takes the generic path for it). Builds the solver's standard form, once."""
    from .solver import standard_form

    key = ("torch form exists", reg)
    if key not in P.cache:
        try:
            standard_form(P, reg)
            P.cache[key] = True
        except PolytopeError:
            P.cache[key] = False
    return bool(P.cache[key])


def _route(P: Polytope, reg: Regularizer, backend: str) -> tuple[str, FastPath | None]:
    """Which backend :func:`relax` uses: ``("fast", fn)``, ``("torch", None)`` or ``("generic", None)``."""
    if backend not in BACKENDS:
        raise unknown_name("backend", backend, BACKENDS)
    fast = _FAST.get((P.name, reg.name)) if P.keyed else None
    if fast is None and (P.name, reg.name) in _FAST and backend in ("auto", "fast"):
        why = (f"a fast path is registered for ({P.name!r}, {reg.name!r}), but this polytope was loaded from "
               f"{P.config.source} without registering it, so the name may belong to another file")
        fix = f"call convex_sst.register_polytope({str(P.config.source)!r}) once, then load it by name or path"
        if backend == "fast":
            raise UnknownNameError(f"{why}; {fix}")
        if not P.cache.get(("unkeyed fast path warned", reg.name)):
            P.cache[("unkeyed fast path warned", reg.name)] = True
            warn_user(f"{why}: using the solvers instead; {fix}", UserWarning)
    # the torch solver factors a dense Schur complement (one row per equality) per sample and
    # the inequality rows block by block: it beats cvxpylayers in speed and accuracy on the
    # built-in formulations (benchmarks/torch_solver.py) while the equality system stays small
    if backend == "torch" or (backend == "auto" and fast is None and reg.separable and _torch_auto(P, reg)):
        return "torch", None
    if fast is None and reg.name == "exp_family" and backend in ("auto", "fast"):
        return "fast", exp_family_by_enumeration
    if backend == "auto" and fast is None and reg.cvxpy is None:
        have = sorted(p for (p, r) in _FAST if r == reg.name)
        torch_note = (f"the torch solver is used automatically only up to {torch_auto_max_rows(reg)} equality rows, "
                      f"{TORCH_AUTO_MAX_BANDED_ROWS} where they are banded, any number where they are also a flow's "
                      f"(this polytope has {P.form.num_eq}; "
                      "backend='torch' forces it)" if reg.separable else
                      f"{reg.name!r} gives no elementwise grad and hess for the torch solver")
        raise UnknownNameError(
            f"no fast path for polytope {P.name!r} with regularizer {reg.name!r}, {reg.name!r} has no "
            f"cvxpy form for the generic path, and {torch_note}; {reg.name!r} has fast paths for: "
            f"{', '.join(have) or '(none)'}. Register one for this polytope with "
            f"@convex_sst.register_fast_path({P.name!r}, {reg.name!r}), or give the regularizer "
            "elementwise grad and hess (the torch solver) or a cvxpy form (the generic path)."
        )
    if backend == "fast" or (backend == "auto" and fast is not None):
        if fast is None:
            have = [r for (p, r) in _FAST if p == P.name]
            raise UnknownNameError(
                f"no fast path for polytope {P.name!r} with regularizer {reg.name!r}; "
                f"fast paths for {P.name!r}: {', '.join(sorted(have)) or '(none)'}; "
                "use backend='generic' or 'auto'"
            )
        return "fast", fast
    return "generic", None


def select_backend(P: Polytope, reg: Regularizer, backend: str) -> Callable[..., torch.Tensor]:
    """``fn(theta, P, reg, **options)`` of the backend :func:`relax` uses (options unchecked)."""
    return _backend_fn(_route(P, reg, backend))


def _backend_fn(route: tuple[str, FastPath | None]) -> Callable[..., torch.Tensor]:
    kind, fast = route
    if kind == "torch":
        from .solver import relax_torch

        return relax_torch
    if fast is not None:  # kind == "fast"
        fast_fn = fast

        def run_fast(theta: torch.Tensor, P: Polytope, reg: Regularizer, **opt: Any) -> torch.Tensor:
            return fast_fn(theta, P, **opt)

        return run_fast
    from .generic import relax_generic  # imports cvxpy and cvxpylayers: only when used

    return relax_generic
