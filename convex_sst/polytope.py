"""Polytopes: loading configs, the :class:`Polytope` object, and the exact-argmax registry.

``load_polytope("k_subset", n=5, k=2)`` finds the built-in config (shipped as package data),
validates the parameters, compiles the constraints to a :class:`CanonicalForm`, checks that
the polytope is non-empty and bounded (a built-in one: by one hard structure, its constraints
compiled only when a solver first needs them), and caches the instance, so compiled layers
attached to it are reused by later calls with the same parameters. The cache holds the instances still in
use (referenced elsewhere: by a layer, a model, a variable) and the :data:`RECENT_POLYTOPES`
most recently loaded ones; others are freed, so a loop over many distinct graphs does not grow
without bound (each instance with compiled solvers holds about 1.4 MB).
"""

from __future__ import annotations

import importlib.resources
import math
import os
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._autograd import graph_break
from ._forbidden import clear_forbidden, far_below, fill_forbidden, is_forbidden
from ._scalars import as_real, positive_int
from .canonical import CanonicalForm
from .config import PolytopeConfig, load_config_file
from .errors import ConfigError, InputError, PolytopeError, RegistrationError, unknown_name
from .lp import LinearProgram, _too_many_vertices
from .regularizers import Regularizer, get_regularizer, regularizer_names

ArgmaxFn = Callable[[torch.Tensor, "Polytope"], torch.Tensor]
_ARGMAX: dict[str, ArgmaxFn] = {}
_USER_CONFIGS: dict[str, Path] = {}
_CONFIG_CACHE: dict[str, tuple[int, PolytopeConfig]] = {}
_INSTANCES: weakref.WeakValueDictionary[tuple, Polytope] = weakref.WeakValueDictionary()
_RECENT: OrderedDict[tuple, Polytope] = OrderedDict()  # strong references to the latest instances
RECENT_POLYTOPES = 64
"""How many of the most recently loaded polytopes :func:`load_polytope` keeps alive when nothing
else refers to them (so ``relax(u, "k_subset", ...)`` by name does not rebuild its polytope)."""
_LOCK = threading.Lock()


def register_argmax(name: str) -> Callable[[ArgmaxFn], ArgmaxFn]:
    """Register an exact combinatorial argmax under ``name`` (decorator).

    The function maps utilities ``u: (B, *shape)`` and the polytope to the maximizing
    structures ``(B, *shape)`` (0/1 values, same dtype and device). A config opts in with
    ``argmax: name``.
    """

    def deco(fn: ArgmaxFn) -> ArgmaxFn:
        if not callable(fn):
            raise RegistrationError(f"argmax {name!r} must be callable")
        if name in _ARGMAX:
            raise RegistrationError(f"an argmax named {name!r} is already registered")
        _ARGMAX[name] = fn
        return fn

    return deco


def available_argmax() -> list[str]:
    """Names of the registered combinatorial argmax algorithms (a config's ``argmax:`` key)."""
    return sorted(_ARGMAX)


# --------------------------------------------------------------------------------------------
# Finding configs
# --------------------------------------------------------------------------------------------


def _builtin_dir() -> Path:
    """Directory of the built-in configs: package data when installed, else the checkout."""
    try:
        res = importlib.resources.files("convex_sst.polytopes")
        path = Path(str(res))
        if path.is_dir() and any(path.glob("*.yaml")):
            return path
    except ModuleNotFoundError:
        pass
    checkout = Path(__file__).resolve().parent.parent / "polytopes"
    if checkout.is_dir():
        return checkout
    raise PolytopeError("built-in polytope configs not found; reinstall convex_sst")  # pragma: no cover


def builtin_config_paths() -> dict[str, Path]:
    return {p.stem: p for p in sorted(_builtin_dir().glob("*.yaml"))}


def available_polytopes() -> list[str]:
    """Names of the built-in and user-registered polytopes, sorted."""
    return sorted(set(builtin_config_paths()) | set(_USER_CONFIGS))


def _read_config(path: Path) -> PolytopeConfig:
    """Parse a config file once per modification time."""
    key = str(path.resolve())
    mtime = path.stat().st_mtime_ns if path.exists() else 0
    cached = _CONFIG_CACHE.get(key)
    if cached is not None and cached[0] == mtime:
        return cached[1]
    cfg = load_config_file(path, known_regularizers=regularizer_names(), known_argmax=_ARGMAX)
    _CONFIG_CACHE[key] = (mtime, cfg)
    return cfg


def _resolve(name_or_path: str | Path) -> tuple[Path, bool]:
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise InputError(
            f"load_polytope takes a polytope's name or the path of a .yaml config, got "
            f"{type(name_or_path).__name__}; parameters go by keyword: load_polytope('simplex', n=5)"
        )
    builtins = builtin_config_paths()
    s = str(name_or_path)
    if isinstance(name_or_path, str) and s in builtins:
        return builtins[s], True
    if isinstance(name_or_path, str) and s in _USER_CONFIGS:
        return _USER_CONFIGS[s], False
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.exists():
            raise ConfigError(f"polytope config file {s!r} does not exist")
        real = p.resolve()
        for q in builtins.values():  # a built-in's own file, given by path, is that built-in
            if real == q.resolve():
                return q, True
        return p, False
    raise unknown_name("polytope", s, available_polytopes(),
                       hint="Pass a path to a .yaml config to load your own.")


def register_polytope(path: str | Path) -> str:
    """Register a user config file under its ``name`` so ``load_polytope(name)`` finds it."""
    path = Path(path)
    cfg = _read_config(path)
    if cfg.name in builtin_config_paths():
        raise RegistrationError(f"{path}: name {cfg.name!r} is taken by a built-in polytope; choose another name")
    if cfg.name in _USER_CONFIGS and _USER_CONFIGS[cfg.name] != path.resolve():
        raise RegistrationError(f"{path}: a polytope named {cfg.name!r} is already registered from {_USER_CONFIGS[cfg.name]}")
    _USER_CONFIGS[cfg.name] = path.resolve()
    return cfg.name


def _freeze(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return ("array", value.shape, tuple(value.reshape(-1).tolist()))
    return value


def load_polytope(name_or_path: str | Path, **params: Any) -> Polytope:
    """Load a polytope by built-in name, registered name, or config file path.

    Args:
        name_or_path: e.g. ``"k_subset"`` or ``"my/polytope.yaml"``.
        **params: the config's parameters, e.g. ``n=5, k=2``; omitted ones take their defaults.

    Returns:
        A cached :class:`Polytope`: the same object for the same file and parameters while it
        is in use or among the :data:`RECENT_POLYTOPES` most recently loaded.

    Raises:
        UnknownNameError: no such polytope (lists the available ones).
        ConfigError: malformed config, unknown or out-of-range parameter.
        PolytopeError: the polytope is empty or unbounded.
    """
    path, builtin = _resolve(name_or_path)
    cfg = _read_config(path)
    if not builtin and cfg.name in builtin_config_paths():
        raise ConfigError(
            f"{path}: name {cfg.name!r} is taken by a built-in polytope; choose another name "
            "(fast paths are keyed by name)"
        )
    values = cfg.resolve_params(params)
    key = (str(path.resolve()), _CONFIG_CACHE[str(path.resolve())][0], tuple((k, _freeze(v)) for k, v in values.items()))
    with _LOCK:
        inst = _INSTANCES.get(key)
        if inst is None:
            inst = Polytope(cfg, values, builtin=builtin)
            _INSTANCES[key] = inst
        _RECENT[key] = inst
        _RECENT.move_to_end(key)
        while len(_RECENT) > max(0, RECENT_POLYTOPES):
            _RECENT.popitem(last=False)
    return inst


# --------------------------------------------------------------------------------------------
# The Polytope object
# --------------------------------------------------------------------------------------------


class Polytope:
    """``P = conv(𝒳)`` for a finite set 𝒳 of 0/1 structures, declared by a config.

    Attributes:
        name: config name (``"spanning_tree"``); fast paths are keyed by it.
        params: the resolved parameters.
        shape: output shape, e.g. ``(n, n)`` for ``birkhoff``.
        size: number of entries of one structure, ``prod(shape)``.
        form: the :class:`CanonicalForm` over ``z = (x, aux)`` (a built-in polytope compiles its
            constraints when a solver or the LP first needs them).
        regularizers: the regularizers this structure declares (and the tests cover).
        data: the ``data:`` entries of the config (e.g. the edge list ``E``), a read-only
            mapping (a built-in polytope evaluates an entry when it is first read): numpy arrays,
            and scipy sparse arrays for the incidence-like matrices of the config functions
            (``incidence``, ``arc_scatter``, ...; ``.toarray()`` gives the dense array).
    """

    def __init__(self, config: PolytopeConfig, params: dict[str, Any], builtin: bool = False):
        self.config = config
        self.name = config.name
        self.description = config.description
        self.params = dict(params)
        self.builtin = builtin
        self.regularizers = config.regularizers
        self.argmax_name = config.argmax
        # built-in structures are bounded 0/1 vectors and their argmax is tested against the LP:
        # one hard structure shows that P is not empty, and the constraints (with the data
        # entries only they read) are evaluated when first needed (a solver, the LP argmax).
        # Arborescences on 160 vertices took 65 s and 11.5 GB to load with them; their fast paths
        # and argmax never need them.
        lazy = builtin and self.argmax_name is not None
        self.shape, self.data = config.evaluate(self.params, lazy=lazy)
        self.size = int(np.prod(self.shape, dtype=np.int64))
        self._form: CanonicalForm | None = None
        self._lp: LinearProgram | None = None
        self._x_range: tuple[np.ndarray, np.ndarray] | None = None
        self._domain_ok: set[Regularizer] = set()
        self._source: Path | None = None  # the config file, resolved (see ``keyed``)
        self.cache: dict[Any, Any] = {}  # compiled layers and fast-path state, keyed by their owners
        if lazy:
            try:
                self._argmax_rows(torch.zeros((1,) + self.shape, dtype=torch.float64))
            except PolytopeError as exc:
                raise PolytopeError(f"{self._where()} is empty: {exc}") from None
        else:
            self._check_nonempty_bounded()

    def __getstate__(self) -> dict[str, Any]:
        # copies and pickles (copy.deepcopy(model), torch.save(model), worker processes) leave
        # out what is rebuilt on demand: the LP solver (a HiGHS handle cannot be pickled) and
        # the cache of compiled layers and device tensors, and the regularizers already checked
        # (a user's unregistered one holds lambdas, which pickle cannot store)
        state = dict(self.__dict__)
        state["_lp"] = None
        state["cache"] = {}
        state["_domain_ok"] = set()
        state["_source"] = None
        return state

    def __repr__(self) -> str:
        ps = ", ".join(f"{k}={v.tolist() if isinstance(v, np.ndarray) else v}" for k, v in self.params.items())
        return f"Polytope({self.name!r}{', ' + ps if ps else ''}, shape={self.shape})"

    @property
    def form(self) -> CanonicalForm:
        """The constraints as a :class:`CanonicalForm` over ``z = (x, aux)``, compiled on first use
        for built-in polytopes (a :class:`ConfigError` there if it has too many variables)."""
        if self._form is None:
            self._form = self.config.compile(self.params, (self.shape, self.data))[0]
        return self._form

    @property
    def lp(self) -> LinearProgram:
        if self._lp is None:
            self._lp = LinearProgram(self.form)
        return self._lp

    def _where(self) -> str:
        ps = ", ".join(f"{k}={v}" for k, v in self.params.items() if np.ndim(v) == 0)
        return f"polytope {self.name!r} ({ps}) from {self.config.source}"

    def _check_nonempty_bounded(self) -> None:
        if not self.lp.is_feasible():
            raise PolytopeError(
                f"{self._where()} is empty: no point satisfies all constraints. "
                "Check the constraints (and, for graphs, that the graph is connected / has a path)."
            )
        lo, hi = self.x_range()
        if not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi))):
            j = int(np.flatnonzero(~(np.isfinite(lo) & np.isfinite(hi)))[0])
            raise PolytopeError(
                f"{self._where()} is unbounded in x[{j}]; a polytope must be bounded "
                "(add bounds such as '0 <= x <= 1')"
            )
        outside = (lo < -1e-9) | (hi > 1.0 + 1e-9)
        if outside.any():  # the hull of 0/1 structures lies in [0, 1]^n
            j = int(np.flatnonzero(outside)[0])
            raise PolytopeError(
                f"{self._where()} reaches x[{j}] = {lo[j] if lo[j] < -1e-9 else hi[j]:.6g}: structures are 0/1 "
                "vectors, so their convex hull lies in [0, 1] in every coordinate (add bounds '0 <= x <= 1')"
            )

    def _centered(self, theta: torch.Tensor, forbidden: torch.Tensor | None = None) -> torch.Tensor:
        """``θ − c`` for ``theta: (B, size)``, one constant per row, where Σx is the same value K
        at every point of P (simplex, k-subsets, permutations, matchings, trees): ``c·Σx`` is then
        constant on P, so the relaxation is the same for every c, and c carries no gradient.

        c is the row's K-th largest entry (leaving out ``forbidden``, relax's stand-ins for
        ``-inf``, and entries far below the others, manual masks): the level of the entries that compete for the last unit of mass, which the
        solution is most sensitive to. Rows are centred only where that level lies further from
        0 than twice (1 + the median distance of the entries to it); the others keep their
        rounding. (The midpoint of the range, used before, moved a +1e9 entry's magnitude onto
        all the others: θ = (1e9, u) became (0, u − 1e9).) The solvers' tolerances and rounding
        are relative to the magnitudes of the entries: a common offset cost them accuracy (torch
        solver, θ = u + 1000 at t = 0.5: x off by up to 1.6e-6 instead of 2e-9), and below about
        −40·(size + 1) they took every entry for a mask (raised all of them to the stand-in
        level, found the row tied and solved it again)."""
        total = self._constant_total()
        if total is None or theta.shape[0] == 0:
            return theta
        d = theta.detach()
        k = min(max(int(round(total)), 1), d.shape[1])
        # entries far below the others (manual masks at -1e9) are left out like forbidden ones:
        # as the level, -1e9 / t moved onto the others cost them their low digits (Birkhoff n = 3
        # with seven entries masked at -2e10: x off by 1e-6 with the quadratic, ulp(2e10) = 4e-6)
        # (measured from the row's largest entry: a common offset, θ = u − 1000, is not a mask)
        low = far_below(d - d.amax(1, keepdim=True))[0]
        skip = low if forbidden is None else low | forbidden
        masked = d.masked_fill(skip, -math.inf)
        level = masked.topk(k, dim=1).values[:, -1:]
        level = torch.where(torch.isfinite(level), level, torch.zeros_like(level))  # fewer than K allowed
        if not bool((level.abs() > 2.0).any()):  # no row to centre (the rule below needs |level| > 2)
            return theta
        dist = (d - level).abs().masked_fill(skip, math.nan)
        spread = dist.nanmedian(1, keepdim=True).values
        return theta - torch.where(level.abs() > 2.0 * (1.0 + spread), level, torch.zeros_like(level))

    def _constant_total(self) -> float | None:
        """Σx where it takes one value on P, else None (once per polytope): its largest and
        smallest value from the config's registered argmax (a structure maximizing ±Σx), or
        without one :meth:`LinearProgram.constant_objective` (known points of P, the span of
        the equality rows, and only then two LPs, which take seconds on large flow
        formulations: a user's copy of correlated k-subsets, n = 120, k = 20, 4.7 s)."""
        if "constant total" not in self.cache:
            if self.argmax_name is not None:
                u = torch.ones((2,) + self.shape, dtype=torch.float64)
                u[1] = -1.0
                X = self._argmax_rows(u)  # a structure with the largest Σx, one with the smallest
                hi, lo = float(X[0].sum()), float(X[1].sum())
                total = hi if abs(hi - lo) <= 1e-9 * (1.0 + abs(hi)) else None
            else:
                c = np.zeros(self.form.num_z)
                c[: self.size] = 1.0
                total = self.lp.constant_objective(c, self.lp.constant_variables())
            self.cache["constant total"] = total
        return self.cache["constant total"]

    def x_range(self) -> tuple[np.ndarray, np.ndarray]:
        """Coordinate-wise ``(min, max)`` of x over P, each of shape ``(size,)``."""
        if self._x_range is None:
            self._x_range = self.lp.x_range()
        return self._x_range

    def check_regularizer(self, regularizer: str | Regularizer) -> Regularizer:
        """Return the regularizer after checking that its domain contains P."""
        reg = get_regularizer(regularizer)
        if reg in self._domain_ok:
            return reg
        dlo, dhi = reg.domain
        if self.builtin and dlo <= 0.0 and dhi >= 1.0:  # P ⊂ [0, 1]^d: no need to compile the constraints
            self._domain_ok.add(reg)
            return reg
        lo, hi = self.x_range()
        bad = np.flatnonzero((lo < dlo - 1e-9) | (hi > dhi + 1e-9))
        if bad.size:
            j = int(bad[0])
            raise PolytopeError(
                f"regularizer {reg.name!r} is defined on [{dlo}, {dhi}] per coordinate, but "
                f"{self._where()} has x[{j}] ranging over [{lo[j]:g}, {hi[j]:g}]; "
                "use a regularizer whose domain contains P (e.g. 'quadratic')"
            )
        self._domain_ok.add(reg)
        return reg

    @property
    def keyed(self) -> bool:
        """Whether fast paths registered under this polytope's name apply to it: built-ins, and
        configs registered with :func:`register_polytope` (a file loaded by path alone may share
        its name with another file)."""
        if self.builtin:
            return True
        if self._source is None:
            self._source = Path(self.config.source).resolve()
        return _USER_CONFIGS.get(self.name) == self._source  # registered paths are stored resolved

    # ------------------------------------------------------------------ inputs

    def check_input(self, u: Any, argname: str = "u") -> tuple[int, ...]:
        """Validate a finite tensor of shape ``(*batch, *self.shape)``; return the batch shape."""
        batch = self._check_shape(u, argname)
        if math.isfinite(float(u.detach().sum())):  # one reduction in the common case
            return batch
        finite = torch.isfinite(u.detach())  # a NaN or inf, or a sum that overflowed
        if not bool(finite.all()):
            raise self._non_finite(~finite, batch, argname, "NaN or inf", "finite")
        return batch

    def _check_masked(self, u: Any, argname: str = "u") -> tuple[tuple[int, ...], torch.Tensor | None]:
        """Validate ``u: (*batch, *self.shape)`` that may forbid coordinates with ``-inf``.

        Returns the batch shape and the boolean mask of forbidden coordinates (``u == -inf`` or
        ``u == torch.finfo(u.dtype).min``), or None when there are none. NaN and +inf are errors.
        """
        batch = self._check_shape(u, argname)
        if u.numel() == 0:
            return batch, None
        lo, hi = torch.aminmax(u.detach())  # one reduction in the common case (NaN propagates)
        lo_v, hi_v = lo.item(), hi.item()
        if not hi_v < math.inf:  # NaN or +inf
            d = u.detach()
            plus = d == math.inf
            hint = ("; hint: to force a coordinate, add a large finite value such as 1e9 instead (entries that "
                    "far above the others are handled like -inf masks, to e^-40)") if bool(plus.any()) else ""
            raise self._non_finite(torch.isnan(d) | plus, batch, argname, "NaN or +inf",
                                   "finite or -inf (-inf forbids a coordinate)" + hint)
        if lo_v > torch.finfo(u.dtype).min:
            return batch, None
        return batch, is_forbidden(u.detach())  # at least one: lo_v is -inf or finfo.min

    def _check_shape(self, u: Any, argname: str) -> tuple[int, ...]:
        if not isinstance(u, torch.Tensor):
            raise InputError(f"{argname} must be a torch.Tensor, got {type(u).__name__}; hint: torch.as_tensor({argname})")
        if not u.is_floating_point():
            raise InputError(
                f"{argname} must be a floating-point tensor (float32 or float64), got {u.dtype}; "
                f"hint: {argname}.double()"
            )
        if u.layout != torch.strided:
            raise InputError(f"{argname} must be a dense tensor, got layout {u.layout}; hint: {argname}.to_dense()")
        if u.device.type == "meta":
            raise InputError(f"{argname} is on the meta device, which holds shapes but no values, and the solvers "
                             "need values; hint: materialize the model first (module.to_empty(device=...) and "
                             "initialize it)")
        k = len(self.shape)
        if u.dim() < k or tuple(u.shape[u.dim() - k:]) != self.shape:
            names = ", ".join(f"{p}=..." for p in self.params)
            raise InputError(
                f"{argname} has shape {tuple(u.shape)}, expected (*batch, {', '.join(map(str, self.shape))}) "
                f"for {self!r}; hint: the parameters fix the shape, so load the polytope for your size"
                + (f": convex_sst.load_polytope({self.name if self.builtin else str(self.config.source)!r}, {names})"
                   if names else "")
            )
        return tuple(u.shape[: u.dim() - k])

    def _non_finite(self, bad: torch.Tensor, batch: tuple[int, ...], argname: str, what: str,
                    expected: str) -> InputError:
        flat = bad.reshape(-1, self.size).any(1).nonzero().reshape(-1)
        first = int(flat[0])
        idx = np.unravel_index(first, batch) if batch else ()
        nbad = int(flat.numel())
        return InputError(
            f"{argname} contains {what} at batch index {tuple(int(i) for i in idx)} "
            f"({nbad} of {max(1, int(np.prod(batch)))} structures affected); {argname} must be {expected}"
        )

    # ------------------------------------------------------------------ SMT

    @graph_break  # a graph break under torch.compile (SciPy, LP solvers, union-find)
    def argmax(self, u: torch.Tensor) -> torch.Tensor:
        """Hard structure ``X = argmax_{x in 𝒳} uᵀx`` (the stochastic argmax trick).

        Args:
            u: utilities ``(*batch, *shape)``; ``-inf`` (or ``torch.finfo(u.dtype).min``)
                forbids a coordinate: the structure avoids it (an :class:`InputError` if no
                structure can).

        Returns:
            ``(*batch, *shape)`` 0/1 tensor, same dtype and device as ``u``, no gradient. Uses
            the config's registered combinatorial algorithm when there is one, else an LP.
        """
        return self._solve_masked(u, self._argmax_rows)

    def _flat_argmax(self, u: torch.Tensor) -> torch.Tensor:
        """:meth:`argmax` of rows ``u: (R, size)`` (flattened structures), as ``(R, size)``."""
        return self.argmax(u.reshape((-1,) + self.shape)).reshape(u.shape)

    def lp_argmax(self, u: torch.Tensor) -> torch.Tensor:
        """The generic argmax: one HiGHS LP per structure, result verified integral."""
        return self._solve_masked(u, self._lp_argmax_rows)

    def _solve_masked(self, u: torch.Tensor, solve: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """``solve`` on the rows of ``u``, a forbidden coordinate (``-inf``) replaced by a utility
        low enough that no structure using it wins (:mod:`convex_sst._forbidden`)."""
        batch, forbidden = self._check_masked(u)
        flat = u.detach().reshape((-1,) + self.shape)
        if flat.shape[0] == 0:                       # an empty batch: nothing to solve
            return torch.zeros_like(u.detach())
        if forbidden is None:
            return solve(flat).reshape(batch + self.shape)
        mask = forbidden.reshape(flat.shape)
        out = solve(fill_forbidden(flat.double(), mask))  # float64: room for the low utility
        return clear_forbidden(out, mask, batch, self).to(u.dtype).reshape(batch + self.shape)

    def _argmax_rows(self, flat: torch.Tensor) -> torch.Tensor:
        if self.argmax_name is None:
            return self._lp_argmax_rows(flat)
        fn = _ARGMAX[self.argmax_name]
        out = fn(flat, self)
        if fn.__module__.startswith("convex_sst."):  # the library's own: tested, and no sync on CUDA
            return out
        if not isinstance(out, torch.Tensor) or out.shape != flat.shape:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise PolytopeError(f"argmax {self.argmax_name!r} of {self._where()} returned {got} for utilities of "
                                f"shape {tuple(flat.shape)}; it must return a 0/1 tensor of the same shape")
        out = out.to(dtype=flat.dtype, device=flat.device)
        if not bool(((out == 0) | (out == 1)).all()):
            raise PolytopeError(f"argmax {self.argmax_name!r} of {self._where()} returned values other than 0 and 1; "
                                "an argmax returns structures (vertices), not scores or marginals")
        return out

    def _support_argmax(self, u: torch.Tensor) -> torch.Tensor:
        """:meth:`_flat_argmax` for the solvers' handling of extreme utilities
        (:func:`~convex_sst._forbidden.tame_extremes`, which asks whether a maximizer avoids
        given entries): the registered argmax, or without one the support (entries above 1e-7)
        of an optimal vertex of the LP, 0/1 or not. ``relax`` solves over the declared
        constraints, integral or not; only hard samples need a 0/1 vertex (:meth:`argmax` raises
        where the LP's is fractional). Through the exact argmax, ``relax`` raised that error at
        low temperatures on configs that are not integral."""
        if self.argmax_name is not None:
            return self._flat_argmax(u)
        return self._lp_argmax_rows(u, integral=False)

    def _lp_argmax_rows(self, u: torch.Tensor, integral: bool = True) -> torch.Tensor:
        """An LP vertex per row of ``u``, checked to be 0/1 (``integral=False``: its support)."""
        flat = u.reshape(-1, self.size).cpu().double().numpy()
        out = np.empty_like(flat)
        for b in range(flat.shape[0]):
            status, z = self.lp.maximize(flat[b])
            if z is None:  # not optimal
                raise PolytopeError(f"LP argmax failed on batch element {b} with status {status!r} for {self!r}")
            x = z[: self.size]
            if not integral:
                out[b] = np.abs(x) > 1e-7
                continue
            r = np.round(x)
            if np.abs(x - r).max() > 1e-6 or not np.all((r == 0) | (r == 1)):
                kind = ("fractional vertex", "not integral") if np.abs(x - r).max() > 1e-6 else (
                    "vertex that is not 0/1", "not inside [0, 1]")
                raise PolytopeError(
                    f"LP argmax returned a {kind[0]} for {self._where()} (batch element {b}, "
                    f"x = {np.array2string(x, precision=3)}): the constraints do not describe the "
                    f"convex hull of 0/1 structures (the polytope is {kind[1]})"
                )
            out[b] = r + 0.0  # no -0.0 (an LP value of -1e-12 rounded)
        return torch.as_tensor(out, dtype=u.dtype, device=u.device).reshape(u.shape)

    def vertices(self, limit: int = 10_000, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """All structures (0/1 points of P) in lexicographic order: ``(V, *shape)``.

        Found by LP-pruned branch and bound over the coordinates of x, so it is independent of
        any combinatorial algorithm. Raises :class:`PolytopeError` if there are more than
        ``limit``; that outcome is remembered, so asking again with a limit as low raises at
        once (finding it out took 16 s for Birkhoff n = 8 and ``exp_family`` asked at every call).
        """
        limit = positive_int(limit, "limit")
        if not isinstance(dtype, torch.dtype):
            raise InputError(f"dtype must be a torch.dtype such as torch.float64, got {dtype!r}")
        key = ("vertices", limit)
        if key not in self.cache:
            if limit <= self.cache.get("vertices exceed", 0):
                raise PolytopeError(_too_many_vertices(limit))
            try:
                self.cache[key] = self.lp.enumerate_binary(limit)
            except PolytopeError:
                self.cache["vertices exceed"] = max(limit, self.cache.get("vertices exceed", 0))
                raise
        v = self.cache[key]
        return torch.as_tensor(v, dtype=dtype).reshape((v.shape[0],) + self.shape)

    def contains(self, x: torch.Tensor, atol: float = 1e-6) -> torch.Tensor:
        """Whether each ``x: (*batch, *shape)`` lies in P up to ``atol`` (per coordinate)."""
        batch = self.check_input(x, "x")
        tol = as_real(atol)
        if tol is None or not (math.isfinite(tol) and tol >= 0):
            raise InputError(f"atol must be a finite number >= 0, got {atol!r}")
        flat = x.detach().reshape(-1, self.size).cpu().double().numpy()
        out = np.empty(flat.shape[0], dtype=bool)
        for b in range(flat.shape[0]):
            out[b] = self.lp.is_feasible(flat[b] - tol, flat[b] + tol)
        return torch.as_tensor(out).reshape(batch)


# ------------------------------------------------------------------------------------------
# Built-in exact argmax algorithms (more, e.g. Kruskal and Hungarian, in convex_sst.argmax)
# ------------------------------------------------------------------------------------------


@register_argmax("one_hot")
def _one_hot_argmax(u: torch.Tensor, polytope: Polytope) -> torch.Tensor:
    flat = u.flatten(1)
    return torch.zeros_like(flat).scatter_(1, flat.argmax(1, keepdim=True), 1.0).reshape(u.shape)


@register_argmax("threshold")
def _threshold_argmax(u: torch.Tensor, polytope: Polytope) -> torch.Tensor:
    return (u > 0).to(u.dtype)


@register_argmax("top_k")
def _top_k_argmax(u: torch.Tensor, polytope: Polytope) -> torch.Tensor:
    k = int(polytope.params["k"])
    flat = u.flatten(1)
    idx = flat.topk(k, dim=1).indices
    return torch.zeros_like(flat).scatter_(1, idx, 1.0).reshape(u.shape)

