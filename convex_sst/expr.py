"""A small, safe expression language for polytope configs.

Config files are data, never Python: expressions such as ``f @ Inc.T == outer(ones(n - 1), e0) - R``
are tokenized and parsed here into a tiny AST and evaluated over a fixed table of names and
functions. Two kinds of values flow through the evaluator:

* constants: numpy arrays (and Python ints/floats), e.g. parameters and graph index sets, and
  scipy sparse matrices (the incidence-like matrices of :mod:`convex_sst.graphs`): they stay
  sparse through ``@`` with a variable expression, ``.T`` and negation, and are converted to
  arrays by any other operation (:func:`_as_array`), so they behave as the arrays they stand for;
* :class:`Affine` expressions in the stacked decision vector ``z = (x, aux...)``: a sparse
  coefficient matrix and a constant vector, one row per element of the expression (row-major).

Comparisons (``==``, ``<=``, ``>=``, chains like ``0 <= x <= 1``) produce :class:`Constraint`
objects, i.e. rows of ``A_eq z = b_eq`` or ``A_ub z <= b_ub``. Everything is vectorized: an
expression of shape ``(n - 1, m)`` becomes one sparse block, never ``(n - 1) * m`` cvxpy scalars.

Grammar (operators bind as in Python)::

    comparison := sum (('==' | '<=' | '>=') sum)*
    sum        := term (('+' | '-') term)*
    term       := unary (('*' | '/' | '@') unary)*
    unary      := ('-' | '+') unary | postfix
    postfix    := atom ('[' subscripts ']' | '.T')*
    atom       := NUMBER | NAME | NAME '(' args ')' | '(' comparison ')' | '[' items ']'
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import scipy.sparse as sp

from .errors import ConfigError


class ExprError(ConfigError):
    """An expression could not be parsed or evaluated (the config loader adds file/key/line)."""


# --------------------------------------------------------------------------------------------
# Affine expressions in the stacked variable z
# --------------------------------------------------------------------------------------------


class Affine:
    """An affine function ``coef @ z + const`` of the stacked variable, with an array shape.

    Attributes:
        shape: the logical shape; elements are stored row-major (C order).
        coef: sparse ``(size, num_z)`` matrix.
        const: dense ``(size,)`` vector.
    """

    __slots__ = ("shape", "coef", "const")

    def __init__(self, shape: tuple[int, ...], coef: sp.csr_matrix, const: np.ndarray):
        self.shape = tuple(int(s) for s in shape)
        self.coef = sp.csr_matrix(coef)
        self.const = np.asarray(const, dtype=float).reshape(-1)
        if self.coef.shape[0] != self.size or self.const.shape[0] != self.size:
            raise ExprError(f"internal shape mismatch in affine expression of shape {self.shape}")

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def num_z(self) -> int:
        return self.coef.shape[1]

    @staticmethod
    def variable(shape: tuple[int, ...], offset: int, num_z: int) -> Affine:
        size = int(np.prod(shape, dtype=np.int64))
        coef = sp.csr_matrix(
            (np.ones(size), (np.arange(size), offset + np.arange(size))), shape=(size, num_z)
        )
        return Affine(shape, coef, np.zeros(size))

    @staticmethod
    def constant(value: Any, num_z: int) -> Affine:
        arr = _as_array(value).astype(float)
        return Affine(arr.shape, sp.csr_matrix((arr.size, num_z)), arr.reshape(-1))

    def take(self, index: np.ndarray, shape: tuple[int, ...]) -> Affine:
        """Rows ``index`` (flat indices into this expression), arranged with ``shape``."""
        index = np.asarray(index, dtype=np.int64).reshape(-1)
        return Affine(shape, self.coef[index], self.const[index])

    def broadcast_to(self, shape: tuple[int, ...]) -> Affine:
        if tuple(shape) == self.shape:
            return self
        idx = np.broadcast_to(np.arange(self.size).reshape(self.shape), shape)
        return self.take(idx, tuple(shape))

    def scale(self, factor: np.ndarray) -> Affine:
        """Elementwise product with a constant of the same shape."""
        f = np.asarray(factor, dtype=float).reshape(-1)
        return Affine(self.shape, sp.diags(f) @ self.coef, f * self.const)

    def left_matmul(self, mat: Any) -> Affine:
        """``mat @ self`` for a constant ``mat`` (numpy semantics for 1-D and 2-D operands; a
        scipy sparse ``mat`` is used as it is)."""
        mat = sp.csr_matrix(mat, dtype=float) if sp.issparse(mat) else np.asarray(mat, dtype=float)
        if mat.ndim not in (1, 2) or len(self.shape) not in (1, 2):
            raise ExprError(
                f"'@' supports 1-D and 2-D operands, got {mat.shape} @ {self.shape}"
            )
        m2 = mat if mat.ndim == 2 else mat[None, :]
        if m2.shape[1] != self.shape[0]:
            raise ExprError(f"'@' shape mismatch: {mat.shape} @ {self.shape}")
        if len(self.shape) == 1:
            op = sp.csr_matrix(m2)
            out_shape: tuple[int, ...] = (m2.shape[0],)
        else:
            r = self.shape[1]
            op = sp.kron(sp.csr_matrix(m2), sp.identity(r), format="csr")
            out_shape = (m2.shape[0], r)
        if mat.ndim == 1:
            out_shape = out_shape[1:]
        return Affine(out_shape, op @ self.coef, op @ self.const)

    def transpose(self) -> Affine:
        if len(self.shape) < 2:
            return self
        idx = np.arange(self.size).reshape(self.shape).T
        return self.take(idx, idx.shape)

    def reshape(self, shape: tuple[int, ...]) -> Affine:
        shape = tuple(int(s) for s in shape)
        if int(np.prod(shape, dtype=np.int64)) != self.size:
            raise ExprError(f"cannot reshape an expression of shape {self.shape} to {shape}")
        return Affine(shape, self.coef, self.const)

    def sum(self, axis: int | None = None) -> Affine:
        if axis is None:
            op = sp.csr_matrix(np.ones((1, self.size)))
            return Affine((), op @ self.coef, op @ self.const)
        nd = len(self.shape)
        if not -nd <= axis < nd:
            raise ExprError(f"sum axis {axis} out of range for shape {self.shape}")
        axis %= nd
        idx = np.arange(self.size).reshape(self.shape)
        moved = np.moveaxis(idx, axis, -1)
        out_shape = moved.shape[:-1]
        rows = np.repeat(np.arange(int(np.prod(out_shape, dtype=np.int64))), moved.shape[-1])
        op = sp.csr_matrix(
            (np.ones(self.size), (rows, moved.reshape(-1))),
            shape=(int(np.prod(out_shape, dtype=np.int64)), self.size),
        )
        return Affine(out_shape, op @ self.coef, op @ self.const)

    def __neg__(self) -> Affine:
        return Affine(self.shape, -self.coef, -self.const)


@dataclass
class Constraint:
    """Rows ``expr == 0`` (kind ``"eq"``) or ``expr <= 0`` (kind ``"le"``)."""

    kind: str
    expr: Affine


def _is_affine(v: Any) -> bool:
    return isinstance(v, Affine)


def _as_array(v: Any) -> np.ndarray:
    """A constant as a numpy array (a scipy sparse matrix densified)."""
    return v.toarray() if sp.issparse(v) else np.asarray(v)


def _constant(v: Any) -> Any:
    """A constant operand of ``@``: a scipy sparse matrix kept sparse, anything else an array."""
    return v if sp.issparse(v) else np.asarray(v)


def _binary(op: str, a: Any, b: Any, num_z: int) -> Any:
    if not _is_affine(a) and not _is_affine(b):
        a, b = _as_array(a), _as_array(b)
        try:
            if op == "@":
                return a @ b
            if op == "/":
                return a / b
            return {"+": np.add, "-": np.subtract, "*": np.multiply}[op](a, b)
        except ValueError:
            if op == "@":
                raise ExprError(f"'@' shape mismatch: {a.shape} @ {b.shape}") from None
            raise ExprError(f"cannot broadcast shapes {a.shape} and {b.shape} for '{op}'") from None
    if op in "+-":
        A = a if _is_affine(a) else Affine.constant(a, num_z)
        B = b if _is_affine(b) else Affine.constant(b, num_z)
        try:
            shape = np.broadcast_shapes(A.shape, B.shape)
        except ValueError:
            raise ExprError(f"cannot broadcast shapes {A.shape} and {B.shape} for '{op}'") from None
        A, B = A.broadcast_to(shape), B.broadcast_to(shape)
        sign = 1.0 if op == "+" else -1.0
        return Affine(shape, A.coef + sign * B.coef, A.const + sign * B.const)
    if op == "*":
        if _is_affine(a) and _is_affine(b):
            raise ExprError("product of two variable expressions is not linear")
        A, c = (a, _as_array(b)) if _is_affine(a) else (b, _as_array(a))
        try:
            shape = np.broadcast_shapes(A.shape, c.shape)
        except ValueError:
            raise ExprError(f"cannot broadcast shapes {A.shape} and {c.shape} for '*'") from None
        return A.broadcast_to(shape).scale(np.broadcast_to(c, shape))
    if op == "/":
        if _is_affine(b):
            raise ExprError("division by a variable expression is not linear")
        c = _as_array(b).astype(float)
        if np.any(c == 0):
            raise ExprError("division by zero")
        return _binary("*", a, 1.0 / c, num_z)
    if op == "@":
        if _is_affine(a) and _is_affine(b):
            raise ExprError("matrix product of two variable expressions is not linear")
        if _is_affine(b):
            return b.left_matmul(_constant(a))
        # a @ M == (M.T @ a.T).T
        m = _constant(b)
        if m.ndim == 1:  # a @ v == v @ a.T (a.T is a itself for 1-D a)
            return a.transpose().left_matmul(m)
        if len(a.shape) == 1:
            return a.left_matmul(m.T)
        return a.transpose().left_matmul(m.T).transpose()
    raise ExprError(f"unsupported operator {op!r}")


def _compare(op: str, a: Any, b: Any, num_z: int) -> list[Constraint] | bool:
    diff = _binary("-", a, b, num_z) if op != ">=" else _binary("-", b, a, num_z)
    if not _is_affine(diff):
        arr = _as_array(diff).astype(float)
        return bool(np.all(arr == 0) if op == "==" else np.all(arr <= 0))
    return [Constraint("eq" if op == "==" else "le", diff)]


# --------------------------------------------------------------------------------------------
# Tokenizer and parser
# --------------------------------------------------------------------------------------------

_TOKEN = re.compile(
    r"\s*(?:(?P<num>\d+\.\d*(?:[eE][-+]?\d+)?|\d*\.\d+(?:[eE][-+]?\d+)?|\d+(?:[eE][-+]?\d+)?)"
    r"|(?P<name>[A-Za-z_][A-Za-z_0-9]*)|(?P<op>==|<=|>=|\.T\b|[-+*/@()\[\],:=]))"
)


def tokenize(text: str) -> list[tuple[str, str, int]]:
    tokens = []
    pos = 0
    text = text.rstrip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            bad = text[pos:].lstrip()[:1]
            raise ExprError(
                f"unexpected character {bad!r} at column {pos + 1} in {text!r}; "
                "expressions use numbers, names, + - * / @, comparisons ==, <=, >=, "
                "calls f(...), indexing a[...] and .T"
            )
        kind = cast(str, m.lastgroup)  # every alternative of _TOKEN is a named group
        tokens.append((kind, m.group(kind), m.start(kind)))
        pos = m.end()
    tokens.append(("end", "", len(text)))
    return tokens


#: levels of nesting (parentheses, brackets, calls, subscripts, signs) one expression may have:
#: counted, not left to Python's recursion limit, which other libraries raise (torch.compile
#: does, and 400 levels then parsed in some test orders but not in others)
MAX_NESTING = 100


class _Parser:
    def __init__(self, text: str):
        self.text = text
        self.toks = tokenize(text)
        self.i = 0
        self.depth = 0

    def peek(self) -> tuple[str, str, int]:
        return self.toks[self.i]

    def next(self) -> tuple[str, str, int]:
        tok = self.toks[self.i]
        self.i += 1
        return tok

    def expect(self, value: str) -> None:
        kind, val, pos = self.next()
        if val != value:
            got = val or "end of expression"
            raise ExprError(f"expected {value!r} at column {pos + 1} of {self.text!r}, got {got!r}")

    def parse(self) -> tuple:
        node = self.comparison()
        kind, val, pos = self.peek()
        if kind != "end":
            hint = "; use '==' for equality" if val == "=" else ""
            raise ExprError(f"unexpected {val!r} at column {pos + 1} of {self.text!r}{hint}")
        return node

    def comparison(self) -> tuple:
        first = self.sum()
        ops, rest = [], []
        while self.peek()[1] in ("==", "<=", ">="):
            ops.append(self.next()[1])
            rest.append(self.sum())
        if not ops:
            return first
        return ("cmp", first, tuple(ops), tuple(rest))

    def sum(self) -> tuple:
        node = self.term()
        while self.peek()[1] in ("+", "-"):
            op = self.next()[1]
            node = ("bin", op, node, self.term())
        return node

    def term(self) -> tuple:
        node = self.unary()
        while self.peek()[1] in ("*", "/", "@"):
            op = self.next()[1]
            node = ("bin", op, node, self.unary())
        return node

    def unary(self) -> tuple:
        # every level of nesting passes here once (a sign, or postfix -> atom -> a parenthesis,
        # list, call or subscript whose contents start again at unary)
        self.depth += 1
        try:
            if self.depth > MAX_NESTING:
                raise RecursionError
            if self.peek()[1] in ("-", "+"):
                op = self.next()[1]
                operand = self.unary()
                return ("neg", operand) if op == "-" else operand
            return self.postfix()
        finally:
            self.depth -= 1

    def postfix(self) -> tuple:
        node = self.atom()
        while True:
            val = self.peek()[1]
            if val == "[":
                self.next()
                subs = [self.subscript()]
                while self.peek()[1] == ",":
                    self.next()
                    subs.append(self.subscript())
                self.expect("]")
                node = ("index", node, tuple(subs))
            elif val == ".T":
                self.next()
                node = ("T", node)
            else:
                return node

    def subscript(self) -> tuple:
        parts: list[tuple | None] = [None]
        if self.peek()[1] not in (":", ",", "]"):
            parts[0] = self.sum()
        if self.peek()[1] != ":":
            return ("sub", parts[0])
        while self.peek()[1] == ":" and len(parts) < 3:
            self.next()
            parts.append(self.sum() if self.peek()[1] not in (":", ",", "]") else None)
        while len(parts) < 3:
            parts.append(None)
        return ("slice", *parts)

    def atom(self) -> tuple:
        kind, val, pos = self.next()
        if kind == "num":
            return ("num", float(val) if any(c in val for c in ".eE") else int(val))
        if kind == "name":
            if self.peek()[1] == "(":
                self.next()
                args, kwargs = [], {}
                while self.peek()[1] != ")":
                    if self.peek()[0] == "name" and self.toks[self.i + 1][1] == "=":
                        key = self.next()[1]
                        self.next()
                        kwargs[key] = self.comparison()
                    else:
                        args.append(self.comparison())
                    if self.peek()[1] != ",":
                        break
                    self.next()
                self.expect(")")
                return ("call", val, tuple(args), tuple(sorted(kwargs.items())))
            return ("name", val)
        if val == "(":
            node = self.comparison()
            self.expect(")")
            return node
        if val == "[":
            items = []
            while self.peek()[1] != "]":
                items.append(self.comparison())
                if self.peek()[1] != ",":
                    break
                self.next()
            self.expect("]")
            return ("list", tuple(items))
        got = val or "end of expression"
        raise ExprError(f"expected a value at column {pos + 1} of {self.text!r}, got {got!r}")


def parse(text: str) -> tuple:
    """Parse an expression into an AST of nested tuples (raises :class:`ExprError`)."""
    if not isinstance(text, str):
        raise ExprError(f"expected an expression string, got {type(text).__name__} {text!r}")
    try:
        return _Parser(text).parse()
    except RecursionError:  # more than MAX_NESTING levels (or, deep in a caller's stack, fewer)
        raise ExprError(
            f"expression nested too deeply to parse ({len(text)} characters, more than {MAX_NESTING} levels); "
            "split it into named 'data' entries"
        ) from None


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


def _sum(value: Any, axis: Any = None) -> Any:
    if axis is not None:
        axis = int(axis)
    if _is_affine(value):
        return value.sum(axis)
    return np.sum(_as_array(value), axis=axis)


def _reshape(value: Any, shape: Any) -> Any:
    shape = tuple(int(s) for s in np.atleast_1d(np.asarray(shape)))
    if _is_affine(value):
        return value.reshape(shape)
    return np.reshape(_as_array(value), shape)


def _vec(value: Any) -> Any:
    if _is_affine(value):
        return value.reshape((value.size,))
    return _as_array(value).reshape(-1)


#: Functions that work on both constants and variable expressions.
LINEAR_FUNCTIONS: dict[str, Callable[..., Any]] = {
    "sum": _sum,
    "reshape": _reshape,
    "vec": _vec,
}


def _usage(name: str, fn: Callable) -> str:
    """``"; usage: name(a, b)"`` from ``fn``'s signature, or ``""`` where it has none."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return ""
    plain = [p.replace(annotation=inspect.Parameter.empty) for p in sig.parameters.values()]
    return f"; usage: {name}{sig.replace(parameters=plain, return_annotation=inspect.Signature.empty)}"


class Evaluator:
    """Evaluate ASTs over a name table, a function table and the stacked variable size."""

    def __init__(self, names: Mapping[str, Any], functions: Mapping[str, Callable], num_z: int = 0):
        self.names = names  # read only, not copied: a mapping of entries evaluated on demand stays lazy
        self.functions = {**LINEAR_FUNCTIONS, **functions}
        self.num_z = num_z

    def evaluate(self, node: tuple) -> Any:
        """The value of ``node``: a constant, an :class:`Affine` or a list of :class:`Constraint`.
        Arithmetic on constants that overflows or divides by zero is an :class:`ExprError`, not
        an ``inf`` or NaN in the polytope."""
        with np.errstate(divide="raise", over="raise", invalid="raise"):
            try:
                return self._evaluate(node)
            except FloatingPointError as exc:
                raise ExprError(f"arithmetic on constants failed: {exc}") from None

    def _evaluate(self, node: tuple) -> Any:
        tag = node[0]
        if tag == "num":
            return node[1]
        if tag == "name":
            name = node[1]
            if name not in self.names:
                from .errors import unknown_name

                raise ExprError(str(unknown_name("name", name, self.names)))
            return self.names[name]
        if tag == "list":
            items = [self._evaluate(n) for n in node[1]]
            if any(_is_affine(v) for v in items):
                raise ExprError("list literals may only hold constants")
            try:
                return np.asarray([_as_array(v) for v in items])
            except ValueError:
                shapes = [np.shape(_as_array(v)) for v in items]
                raise ExprError(f"a list literal needs items of one shape (a rectangular array), got shapes {shapes}") from None
        if tag == "neg":
            v = self._evaluate(node[1])
            return -v if _is_affine(v) or sp.issparse(v) else -np.asarray(v)
        if tag == "bin":
            return _binary(node[1], self._evaluate(node[2]), self._evaluate(node[3]), self.num_z)
        if tag == "T":
            v = self._evaluate(node[1])
            return v.transpose() if _is_affine(v) or sp.issparse(v) else np.asarray(v).T
        if tag == "index":
            return self._index(self._evaluate(node[1]), node[2])
        if tag == "call":
            name, args, kwargs = node[1], node[2], node[3]
            if name not in self.functions:
                from .errors import unknown_name

                raise ExprError(str(unknown_name("function", name, self.functions)))
            # functions get arrays (a sparse matrix densified), except ``len``, which reads a shape
            keep = name == "len"
            vals = [v if keep or not sp.issparse(v) else v.toarray() for v in map(self._evaluate, args)]
            kw = {k: (v.toarray() if sp.issparse(v) else v) for k, v in ((k, self._evaluate(n)) for k, n in kwargs)}
            try:
                return self.functions[name](*vals, **kw)
            except ConfigError:
                raise
            except (TypeError, ValueError, IndexError, ArithmeticError) as exc:
                raise ExprError(f"{name}(...) failed: {exc}{_usage(name, self.functions[name])}") from None
        if tag == "cmp":
            values = [self._evaluate(node[1])] + [self._evaluate(n) for n in node[3]]
            out: list[Constraint] = []
            for op, a, b in zip(node[2], values[:-1], values[1:]):
                res = _compare(op, a, b, self.num_z)
                if res is False:
                    raise ExprError("a constraint between constants is violated")
                if isinstance(res, list):
                    out.extend(res)
            return out
        raise ExprError(f"internal: unknown node {tag!r}")

    def _index(self, value: Any, subs: tuple) -> Any:
        key: list[Any] = []
        for s in subs:
            if s[0] == "sub":
                v = _as_array(self._evaluate(s[1]))  # a variable: a 0-d object array, refused by to_int
                if v.ndim == 0:  # a non-integer index is an error, not silently truncated
                    key.append(to_int(v.item(), "an index"))
                    continue
                if v.dtype.kind == "f" and np.all(v == np.round(v)):
                    v = v.astype(np.int64)
                key.append(v)
            else:
                parts = [None if p is None else to_int(self._evaluate(p), "a slice bound") for p in s[1:]]
                key.append(slice(*parts))
        key_t = tuple(key)
        try:
            if _is_affine(value):
                idx = np.arange(value.size).reshape(value.shape)[key_t]
                return value.take(idx, np.shape(idx))
            return _as_array(value)[key_t]
        except IndexError as exc:
            raise ExprError(f"index error: {exc}") from None


def is_whole_number(arr: np.ndarray) -> bool:
    """Whether ``arr`` is a 0-d, finite, whole int or float (``2.0`` is, ``2.5``, ``inf`` and
    ``True`` are not): what indices, slice bounds and the config functions' sizes accept."""
    return arr.ndim == 0 and arr.dtype.kind in "iuf" and bool(np.isfinite(arr)) and float(arr) == math.floor(float(arr))


def to_int(value: Any, what: str) -> int:
    """Convert an evaluated constant to an int, or raise :class:`ExprError` naming ``what``."""
    if _is_affine(value):
        raise ExprError(f"{what} must be a constant expression, not a variable expression")
    arr = _as_array(value)
    if not is_whole_number(arr):
        raise ExprError(f"{what} must evaluate to an integer, got {value!r}")
    return int(arr)
