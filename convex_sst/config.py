"""Polytope config files: parse, validate, and compile to a :class:`CanonicalForm`.

The format is documented in ``docs/polytope-config.md``. A config is YAML data; its
expressions are evaluated by the safe language of :mod:`convex_sst.expr`, never by Python.
Every error names the file, the key path and (where known) the line.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from .canonical import CanonicalForm
from .errors import ConfigError, PolytopeError, unknown_name
from .expr import Affine, Constraint, Evaluator, ExprError, parse, to_int
from .graphs import CONFIG_FUNCTIONS

TOP_KEYS = {"name", "description", "params", "data", "output", "variables", "constraints",
            "regularizers", "argmax"}
REQUIRED_KEYS = ("name", "output", "constraints")
PARAM_KEYS = {"type", "default", "min", "max", "doc", "vertices"}
PARAM_TYPES = ("int", "float", "bool", "int_list", "edge_list")
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z_0-9]*$")
_REQUIRED = object()

#: Largest stacked variable (output + auxiliary) a config may declare: beyond it the constraint
#: matrices alone take gigabytes, and a typo such as ``shape: [n, n, n]`` should fail fast.
MAX_VARIABLES = 10_000_000


# --------------------------------------------------------------------------------------------
# YAML with line numbers
# --------------------------------------------------------------------------------------------


def _walk_lines(node: yaml.Node, path: tuple, lines: dict, source: str) -> None:
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        seen: set = set()
        for key_node, value_node in node.value:
            key = key_node.value
            if key in seen:
                raise ConfigError(
                    f"{source}:{key_node.start_mark.line + 1}: {_path_str(path + (key,))}: "
                    "duplicate key; each key may appear once"
                )
            seen.add(key)
            _walk_lines(value_node, path + (key,), lines, source)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _walk_lines(item, path + (i,), lines, source)


def _path_str(path: tuple) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(top level)"


def read_config_text(text: str, source: str) -> tuple[dict, dict]:
    """Parse YAML text into ``(data, lines)``; ``lines`` maps key paths to 1-based lines."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{where}: not valid YAML: {problem}") from None
    lines: dict = {}
    if node is not None:
        _walk_lines(node, (), lines, source)
    if not isinstance(data, dict):
        raise ConfigError(
            f"{source}: a polytope config must be a mapping with keys {sorted(REQUIRED_KEYS)}, "
            f"got {type(data).__name__}"
        )
    return data, lines


# --------------------------------------------------------------------------------------------
# Config object
# --------------------------------------------------------------------------------------------


class _Layers(Mapping[str, Any]):
    """Names looked up in ``maps`` in order, read only; nothing is copied (or evaluated) ahead."""

    def __init__(self, *maps: Mapping[str, Any]):
        self.maps = maps

    def __getitem__(self, key: str) -> Any:
        for m in self.maps:
            if key in m:
                return m[key]
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return iter(dict.fromkeys(k for m in self.maps for k in m))

    def __len__(self) -> int:
        return len(dict.fromkeys(k for m in self.maps for k in m))


class _Restricted(Mapping[str, Any]):
    """The entries ``keys`` of ``data`` only."""

    def __init__(self, data: Mapping[str, Any], keys: list[str]):
        self._data = data
        self._keys = keys

    def __getitem__(self, key: str) -> Any:
        if key not in self._keys:
            raise KeyError(key)
        return self._data[key]

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


class DataEntries(Mapping[str, Any]):
    """A config's ``data:`` entries for given parameters, each evaluated when first read (with
    the entries it names) and kept. Built-in graph structures declare incidence-like matrices for
    their constraints (arborescences on n vertices: (n², n²), sparse; dense, on 160 vertices,
    one of 5 GB) that their fast paths and argmax never read."""

    def __init__(self, config: PolytopeConfig, params: Mapping[str, Any]):
        self._config = config
        self._params = params
        self._values: dict[str, Any] = {}

    def __getitem__(self, key: str) -> Any:
        if key not in self._values:
            if key not in self._config.data:
                raise KeyError(key)
            keys = list(self._config.data)
            earlier = _Restricted(self, keys[: keys.index(key)])  # an entry names only those above it
            self._values[key] = self._config._data_entry(key, self._params, earlier)
        return self._values[key]

    def __contains__(self, key: object) -> bool:
        return key in self._config.data

    def __iter__(self) -> Iterator[str]:
        return iter(self._config.data)

    def __len__(self) -> int:
        return len(self._config.data)

    def __repr__(self) -> str:
        shown = ", ".join(f"{k}: {'...' if k not in self._values else type(self._values[k]).__name__}" for k in self)
        return f"DataEntries({{{shown}}})"


@dataclass
class ParamSpec:
    name: str
    type: str
    default: Any = _REQUIRED
    min: Any = None
    max: Any = None
    doc: str = ""
    vertices: Any = None

    @property
    def required(self) -> bool:
        return self.default is _REQUIRED


@dataclass
class PolytopeConfig:
    """A validated, not yet instantiated, polytope declaration."""

    name: str
    description: str
    params: dict[str, ParamSpec]
    data: dict[str, tuple]
    output_name: str
    output_shape: list[tuple]
    variables: dict[str, list[tuple]]
    constraints: list[tuple]
    regularizers: tuple[str, ...]
    argmax: str | None
    source: str
    lines: dict = field(default_factory=dict, repr=False)

    def where(self, path: tuple) -> str:
        """``file:line: key`` for error messages."""
        line = None
        p = path
        while p and line is None:
            line = self.lines.get(p)
            p = p[:-1]
        loc = f"{self.source}:{line}" if line else self.source
        return f"{loc}: {_path_str(path)}"

    def error(self, path: tuple, msg: str) -> ConfigError:
        return ConfigError(f"{self.where(path)}: {msg}")

    # ------------------------------------------------------------------ parameters

    def resolve_params(self, overrides: Mapping[str, Any]) -> dict[str, Any]:
        """Fill defaults, check types and ranges (in declaration order)."""
        unknown = set(overrides) - set(self.params)
        if unknown:
            name = sorted(unknown)[0]
            raise unknown_name(
                f"parameter of polytope {self.name!r}", name, self.params,
                hint=f"(declared in {self.source})",
            )
        values: dict[str, Any] = {}
        for spec in self.params.values():
            if spec.name in overrides:
                raw = overrides[spec.name]
                origin = "given"
            elif spec.required:
                raise ConfigError(
                    f"polytope {self.name!r} needs parameter {spec.name!r} ({spec.type}"
                    f"{': ' + spec.doc if spec.doc else ''}); pass it as {spec.name}=..."
                )
            else:
                raw = spec.default
                origin = "default"
            values[spec.name] = self._check_param(spec, raw, values, origin)
        return values

    def _check_param(self, spec: ParamSpec, raw: Any, known: dict, origin: str) -> Any:
        where = f"polytope {self.name!r}: parameter {spec.name}={raw!r} ({origin})"
        if spec.type in ("int", "float", "bool") and getattr(raw, "ndim", None) == 0 and hasattr(raw, "item"):
            raw = raw.item()                         # a 0-d torch tensor or numpy array: its scalar
        if spec.type == "int":
            if isinstance(raw, bool) or not isinstance(raw, (int, np.integer)):
                if isinstance(raw, (float, np.floating)) and float(raw).is_integer():
                    raw = int(raw)
                else:
                    raise ConfigError(f"{where}: expected an integer, got {type(raw).__name__}")
            value: Any = int(raw)
        elif spec.type == "float":
            if isinstance(raw, bool) or not isinstance(raw, (int, float, np.integer, np.floating)):
                raise ConfigError(f"{where}: expected a number, got {type(raw).__name__}")
            value = float(raw)
            if not np.isfinite(value):
                raise ConfigError(f"{where}: expected a finite number")
        elif spec.type == "bool":
            if not isinstance(raw, (bool, np.bool_)):
                raise ConfigError(f"{where}: expected true or false, got {type(raw).__name__}")
            value = bool(raw)
        else:  # int_list or edge_list: integer arrays
            value = None if raw is None else self._int_array(spec.type, raw, where)
            if value is not None and spec.type == "edge_list" and spec.vertices is not None:
                nv = self._eval_bound(spec, "vertices", spec.vertices, known)
                bad = np.flatnonzero((value < 0).any(1) | (value >= nv).any(1))
                if bad.size:
                    raise ConfigError(
                        f"{where}: pair {bad[0]} = {value[bad[0]].tolist()} has a vertex outside 0..{nv - 1}"
                    )
        if spec.type in ("int", "float"):
            for key, bound, ok in (("min", spec.min, lambda v, b: v >= b), ("max", spec.max, lambda v, b: v <= b)):
                if bound is None:
                    continue
                b = self._eval_bound(spec, key, bound, known)
                if not ok(value, b):
                    lo = "" if spec.min is None else f"{spec.min} <= "
                    hi = "" if spec.max is None else f" <= {spec.max}"
                    ctx = ", ".join(f"{k} = {v}" for k, v in known.items() if np.ndim(v) == 0)
                    raise ConfigError(
                        f"{where}: out of range; expected {lo}{spec.name}{hi}"
                        + (f" (with {ctx})" if ctx else "")
                    )
        return value

    @staticmethod
    def _int_array(kind: str, raw: Any, where: str) -> np.ndarray:
        """Validate an ``int_list`` (flat) or ``edge_list`` (pairs) parameter value."""
        what = "a list of integers" if kind == "int_list" else "a list of integer [i, j] pairs"
        try:
            arr = np.asarray(raw, dtype=float)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected {what}") from None
        if kind == "edge_list" and arr.size == 0:
            arr = arr.reshape(0, 2)
        shape_ok = arr.ndim == 1 if kind == "int_list" else (arr.ndim == 2 and arr.shape[1] == 2)
        if not shape_ok or np.any(arr != np.round(arr)):
            raise ConfigError(f"{where}: expected {what}, got shape {arr.shape}")
        return arr.astype(np.int64)

    def _eval_bound(self, spec: ParamSpec, key: str, bound: Any, known: dict) -> Any:
        path = ("params", spec.name, key)
        try:
            node = parse(str(bound))
            return Evaluator(known, CONFIG_FUNCTIONS).evaluate(node)
        except ExprError as exc:
            raise self.error(path, str(exc)) from None

    # ------------------------------------------------------------------ compile

    def evaluate(self, params: dict[str, Any], lazy: bool = False) -> tuple[tuple[int, ...], DataEntries]:
        """The output shape and the ``data:`` entries, not the constraints: ``(output_shape, data)``.

        ``lazy``: an entry is evaluated when first read (by the output shape, a fast path, the
        argmax, or :meth:`compile`); otherwise all of them now, so that errors surface here."""
        data = DataEntries(self, params)
        if not lazy:
            for key in self.data:
                data[key]
        scope = Evaluator(_Layers(params, data), CONFIG_FUNCTIONS)
        return self._shape_of(scope, ("output", "shape"), self.output_shape, False), data

    def _data_entry(self, key: str, params: Mapping[str, Any], data: Mapping[str, Any]) -> Any:
        try:
            value = Evaluator(_Layers(params, data), CONFIG_FUNCTIONS).evaluate(self.data[key])
        except ExprError as exc:
            raise self.error(("data", key), str(exc)) from None
        except MemoryError:
            raise self.error(("data", key), f"out of memory evaluating it with parameters {dict(params)}") from None
        if isinstance(value, (Affine, list)):
            raise self.error(("data", key), "data entries must be constants")
        return value

    def _shape_of(self, const_eval: Evaluator, path: tuple, nodes: list, allow_zero: bool) -> tuple[int, ...]:
        dims = []
        for i, n in enumerate(nodes):
            try:
                d = to_int(const_eval.evaluate(n), "a dimension")
            except ExprError as exc:
                raise self.error(path + (i,), str(exc)) from None
            if d < (0 if allow_zero else 1):
                raise self.error(path + (i,), f"dimension must be >= {0 if allow_zero else 1}, got {d}")
            dims.append(d)
        return tuple(dims)

    def compile(self, params: dict[str, Any],
                evaluated: tuple[tuple[int, ...], Mapping[str, Any]] | None = None
                ) -> tuple[CanonicalForm, tuple[int, ...], Mapping[str, Any]]:
        """Evaluate data, shapes and constraints; return ``(form, output_shape, data)``.
        ``evaluated``: :meth:`evaluate`'s result for these parameters, if already computed."""
        out_shape, data = self.evaluate(params) if evaluated is None else evaluated
        const_eval = Evaluator(_Layers(params, data), CONFIG_FUNCTIONS)
        layout: dict[str, tuple[int, tuple[int, ...]]] = {}
        offset = 0
        for name, shp in [(self.output_name, out_shape)] + [
            (v, self._shape_of(const_eval, ("variables", v), s, True)) for v, s in self.variables.items()
        ]:
            layout[name] = (offset, shp)
            offset += int(np.prod(shp, dtype=np.int64))
        num_z = offset
        out_size = int(np.prod(out_shape, dtype=np.int64))
        if num_z > MAX_VARIABLES:
            sizes = ", ".join(f"{v} {shp}" for v, (_, shp) in layout.items())
            raise self.error(
                ("output", "shape") if out_size > MAX_VARIABLES else ("variables",),
                f"{num_z:,} variables ({sizes}) with parameters {params}; at most {MAX_VARIABLES:,} are "
                "supported (the constraint matrices and every solver scale with this)",
            )

        variables = {name: Affine.variable(shp, off, num_z) for name, (off, shp) in layout.items()}
        aff_eval = Evaluator(_Layers(variables, params, data), CONFIG_FUNCTIONS, num_z)
        rows: list[Constraint] = []
        for i, node in enumerate(self.constraints):
            try:
                res = aff_eval.evaluate(node)
            except ExprError as exc:
                raise self.error(("constraints", i), str(exc)) from None
            except MemoryError:
                raise self.error(("constraints", i), f"out of memory evaluating it with parameters {params}") from None
            if not isinstance(res, list):
                raise self.error(
                    ("constraints", i),
                    "a constraint must be a comparison (==, <=, >=), e.g. 'sum(x) == k'",
                )
            for c in res:  # an entry whose variables all cancelled (0 * x <= -1): name the constraint
                coef = c.expr.coef.copy()
                coef.eliminate_zeros()
                gone = np.diff(coef.indptr) == 0
                false = gone & ((np.abs(c.expr.const) > 1e-12) if c.kind == "eq" else (c.expr.const > 1e-12))
                if false.any():
                    where = np.unravel_index(int(np.flatnonzero(false)[0]), c.expr.shape) if c.expr.shape else ()
                    entry = f" in entry [{', '.join(str(int(k)) for k in where)}]" if where else ""
                    raise PolytopeError(
                        f"{self.where(('constraints', i))}: every variable's coefficient is 0{entry}, and what is left "
                        "is false: the polytope is empty"
                    )
            rows.extend(res)
        try:
            form = CanonicalForm.build(rows, num_z, out_size, layout)
        except PolytopeError as exc:
            raise PolytopeError(f"{self.source}: polytope {self.name!r} with {params}: {exc}") from None
        return form, out_shape, data


# --------------------------------------------------------------------------------------------
# Parsing a raw mapping into a PolytopeConfig
# --------------------------------------------------------------------------------------------


def parse_config(data: Mapping[str, Any], source: str, lines: dict | None = None,
                 known_regularizers: Any = None, known_argmax: Any = None) -> PolytopeConfig:
    """Validate the structure of a raw config mapping (types, keys, expression syntax)."""
    lines = lines or {}
    cfg = PolytopeConfig(
        name="", description="", params={}, data={}, output_name="x", output_shape=[],
        variables={}, constraints=[], regularizers=(), argmax=None, source=source,
        lines=lines,
    )
    unknown = set(data) - TOP_KEYS
    if unknown:
        key = sorted(unknown)[0]
        raise cfg.error((key,), str(unknown_name("top-level key", key, TOP_KEYS)))
    for key in REQUIRED_KEYS:
        if key not in data:
            raise cfg.error((), f"missing required key {key!r} (required: {', '.join(REQUIRED_KEYS)})")

    name = data["name"]
    if not isinstance(name, str) or not _IDENT.match(name):
        raise cfg.error(("name",), f"name must be an identifier like 'k_subset', got {name!r}")
    cfg.name = name
    desc = data.get("description", "")
    if not isinstance(desc, str):
        raise cfg.error(("description",), "description must be a string")
    cfg.description = desc.strip()

    reserved = set(CONFIG_FUNCTIONS) | {"sum", "reshape", "vec"}
    declared: dict[str, tuple] = {}

    def declare(ident: Any, path: tuple) -> str:
        if not isinstance(ident, str) or not _IDENT.match(ident):
            raise cfg.error(path, f"{ident!r} is not a valid identifier")
        if ident in reserved:
            raise cfg.error(path, f"{ident!r} is the name of a built-in function; pick another name")
        if ident in declared:
            raise cfg.error(path, f"{ident!r} is already declared at {_path_str(declared[ident])}")
        declared[ident] = path
        return ident

    params = data.get("params") or {}
    if not isinstance(params, dict):
        raise cfg.error(("params",), "params must be a mapping name -> {type, default, min, max, doc}")
    for pname, spec in params.items():
        path = ("params", pname)
        declare(pname, path)
        if not isinstance(spec, dict):
            raise cfg.error(path, "each parameter is a mapping with keys type, default, min, max, doc")
        bad = set(spec) - PARAM_KEYS
        if bad:
            raise cfg.error(path + (sorted(bad)[0],), str(unknown_name("parameter key", sorted(bad)[0], PARAM_KEYS)))
        ptype = spec.get("type")
        if ptype not in PARAM_TYPES:
            raise cfg.error(path + ("type",), f"type must be one of {', '.join(PARAM_TYPES)}, got {ptype!r}")
        for key in ("min", "max", "vertices"):
            if key in spec:
                try:
                    parse(str(spec[key]))
                except ExprError as exc:
                    raise cfg.error(path + (key,), str(exc)) from None
        cfg.params[pname] = ParamSpec(
            name=pname, type=ptype, default=spec.get("default", _REQUIRED),
            min=spec.get("min"), max=spec.get("max"), doc=str(spec.get("doc", "")),
            vertices=spec.get("vertices"),
        )

    def parse_at(text: Any, path: tuple) -> tuple:
        if isinstance(text, (int, float)) and not isinstance(text, bool):
            text = repr(text)
        try:
            return parse(text)
        except ExprError as exc:
            raise cfg.error(path, str(exc)) from None

    data_section = data.get("data") or {}
    if not isinstance(data_section, dict):
        raise cfg.error(("data",), "data must be a mapping name -> expression")
    for dname, text in data_section.items():
        declare(dname, ("data", dname))
        cfg.data[dname] = parse_at(text, ("data", dname))

    output = data["output"]
    if not isinstance(output, dict) or "shape" not in output:
        raise cfg.error(("output",), "output must be a mapping with keys name (default x) and shape, e.g. {name: x, shape: [n]}")
    bad = set(output) - {"name", "shape", "doc"}
    if bad:
        raise cfg.error(("output", sorted(bad)[0]), "output keys are name, shape and doc")
    cfg.output_name = declare(output.get("name", "x"), ("output", "name"))
    cfg.output_shape = _shape_nodes(output["shape"], ("output", "shape"), cfg, parse_at)

    variables = data.get("variables") or {}
    if not isinstance(variables, dict):
        raise cfg.error(("variables",), "variables must be a mapping name -> shape, e.g. {f: [n - 1, len(A)]}")
    for vname, shp in variables.items():
        declare(vname, ("variables", vname))
        cfg.variables[vname] = _shape_nodes(shp, ("variables", vname), cfg, parse_at)

    cons = data["constraints"]
    if not isinstance(cons, list) or not cons:
        raise cfg.error(("constraints",), "constraints must be a non-empty list of expressions such as 'sum(x) == k'")
    for i, c in enumerate(cons):
        if isinstance(c, dict):
            if set(c) - {"expr", "doc"} or "expr" not in c:
                raise cfg.error(("constraints", i), "a constraint is a string or a mapping {expr: ..., doc: ...}")
            cfg.constraints.append(parse_at(c["expr"], ("constraints", i, "expr")))
        else:
            cfg.constraints.append(parse_at(c, ("constraints", i)))

    regs = data.get("regularizers", None)
    if regs is not None:
        if not isinstance(regs, list) or not all(isinstance(r, str) for r in regs):
            raise cfg.error(("regularizers",), "regularizers must be a list of names, e.g. [entropy, quadratic]")
        if known_regularizers is not None:
            for i, r in enumerate(regs):
                if r not in known_regularizers:
                    raise cfg.error(("regularizers", i), str(unknown_name(
                        "regularizer", r, known_regularizers, hint="Register your own (convex_sst.register_regularizer) "
                        "before loading the config; for `convex-sst check`, put that in a module and pass --import MODULE.")))
        cfg.regularizers = tuple(regs)
    argmax = data.get("argmax")
    if argmax is not None:
        if not isinstance(argmax, str):
            raise cfg.error(("argmax",), "argmax must be the name of a registered algorithm")
        if known_argmax is not None and argmax not in known_argmax:
            raise cfg.error(("argmax",), str(unknown_name(
                "argmax algorithm", argmax, known_argmax, hint="Register your own (convex_sst.register_argmax) "
                "before loading the config; for `convex-sst check`, put that in a module and pass --import MODULE.")))
        cfg.argmax = argmax
    return cfg


def _shape_nodes(shape: Any, path: tuple, cfg: PolytopeConfig, parse_at) -> list[tuple]:
    if isinstance(shape, (str, int)) and not isinstance(shape, bool):
        shape = [shape]
    if not isinstance(shape, list):
        raise cfg.error(path, f"a shape is a list of dimension expressions like [n, n], got {shape!r}")
    return [parse_at(d, path + (i,)) for i, d in enumerate(shape)]


def load_config_file(path: str | Path, **kwargs: Any) -> PolytopeConfig:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read polytope config {str(path)!r}: {exc.strerror}") from None
    data, lines = read_config_text(text, str(path))
    return parse_config(data, str(path), lines, **kwargs)
