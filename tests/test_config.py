"""Config format: the expression language, the canonical form, errors with file/key/line, docs."""

import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import convex_sst as cs
from convex_sst.expr import Affine, Evaluator, ExprError, parse

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "polytope-config.md"


def _blocks(path, lang):
    return re.findall(rf"```{lang}\n(.*?)```", path.read_text(), flags=re.S)


def write(tmp_path, text, name="p.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


# ---------------------------------------------------------------- expression language


def test_affine_ops_match_numpy():
    rng = np.random.default_rng(0)
    x_val = rng.normal(size=(3, 4))
    y_val = rng.normal(size=4)
    num_z = 16
    names = {
        "x": Affine.variable((3, 4), 0, num_z),
        "y": Affine.variable((4,), 12, num_z),
        "M": rng.normal(size=(2, 3)),
        "N": rng.normal(size=(4, 5)),
        "v": rng.normal(size=4),
    }
    z = np.concatenate([x_val.reshape(-1), y_val])
    ev = Evaluator(names, {}, num_z)
    env = {"x": x_val, "y": y_val, "M": names["M"], "N": names["N"], "v": names["v"]}
    cases = {
        "M @ x": env["M"] @ x_val,
        "x @ N": x_val @ env["N"],
        "x @ v": x_val @ env["v"],
        "v @ y": env["v"] @ y_val,
        "x.T": x_val.T,
        "2 * x - y / 4 + 1": 2 * x_val - y_val / 4 + 1,
        "sum(x, axis=0)": x_val.sum(0),
        "sum(x, axis=1)": x_val.sum(1),
        "sum(x)": x_val.sum(),
        "x[1]": x_val[1],
        "x[:, 2]": x_val[:, 2],
        "x[0:2, 1:3]": x_val[0:2, 1:3],
        "vec(x)": x_val.reshape(-1),
        "reshape(y, [2, 2])": y_val.reshape(2, 2),
        "-(x - y)": -(x_val - y_val),
    }
    for text, expected in cases.items():
        val = ev.evaluate(parse(text))
        got = (val.coef @ z + val.const).reshape(val.shape)
        assert got.shape == np.shape(expected), text
        assert np.allclose(got, expected), text


def test_comparisons_produce_rows():
    ev = Evaluator({"x": Affine.variable((3,), 0, 3)}, {}, 3)
    rows = ev.evaluate(parse("0 <= x <= 1"))
    assert [r.kind for r in rows] == ["le", "le"]
    assert ev.evaluate(parse("sum(x) == 2"))[0].expr.shape == ()
    assert ev.evaluate(parse("x[4 / 2] == 1"))[0].expr.coef.toarray().tolist() == [[0, 0, 1]]


@pytest.mark.parametrize("text,msg", [
    ("x * x == 1", "not linear"),
    ("x @ x == 1", "not linear"),
    ("1 / x == 1", "not linear"),
    ("__import__('os')", "unexpected character"),
    ("x ==", "expected a value"),
    ("foo(x) == 1", "unknown function 'foo'"),
    ("sum(xx) == 1", "Did you mean 'x'"),
    ("x + ones(2) == 1", "cannot broadcast"),
    ("x[3 / 2] == 1", "an index must evaluate to an integer, got 1.5"),  # was x[1], silently
    ("x[0:2.5] == 1", "a slice bound must evaluate to an integer, got 2.5"),
])
def test_expression_errors(text, msg):
    ev = Evaluator({"x": Affine.variable((3,), 0, 3)}, {"ones": lambda *s: np.ones(s)}, 3)
    with pytest.raises(ExprError, match=re.escape(msg)):
        ev.evaluate(parse(text))


def test_nesting_is_limited_whatever_the_recursion_limit():
    # the limit was Python's recursion limit, which torch.compile raises: 400 levels parsed when
    # the tests ran in reverse order (test_sst.py first) and the malformed-config test failed
    import sys

    from convex_sst.expr import MAX_NESTING

    deep = "(" * 400 + "1" + ")" * 400
    ok = "-(" * 45 + "x" + ")" * 45  # 91 levels
    before = sys.getrecursionlimit()
    for limit in (before, 100_000):
        sys.setrecursionlimit(limit)
        try:
            with pytest.raises(ExprError, match=f"nested too deeply to parse \\(801 characters, more than {MAX_NESTING} levels\\)"):
                parse(deep)
            assert parse(ok)[0] == "neg"
            for text in ("-" * MAX_NESTING + "1", "x" + "[0" * MAX_NESTING + "]" * MAX_NESTING):
                with pytest.raises(ExprError, match="nested too deeply"):
                    parse(text)
        finally:
            sys.setrecursionlimit(before)


def test_no_python_evaluation_is_possible():
    for text in ("().__class__", "x.__dict__", "lambda: 1", "open('f')", "x; y"):
        with pytest.raises(ExprError):
            Evaluator({"x": 1}, {}).evaluate(parse(text))


def _random_expression(rng, names, depth=0):
    """A random expression over ``names``, the config functions, literals (ragged and huge
    ones too), operators, subscripts and ``.T``: mostly nonsense, as typos are."""
    from convex_sst.graphs import CONFIG_FUNCTIONS

    atoms = list(names) + ["0", "1", "2", "0.5", "-1", "3", "1e300", "[1, 2]", "[[0, 1], [1, 2]]", "[0, 1, 1]",
                           "[]", "[[1, 2], [3]]"]
    r = rng.random()
    if depth > 3 or r < 0.3:
        return rng.choice(atoms)
    if r < 0.55:
        op = rng.choice(["+", "-", "*", "/", "@"])
        return f"{_random_expression(rng, names, depth + 1)} {op} {_random_expression(rng, names, depth + 1)}"
    if r < 0.8:
        args = ", ".join(_random_expression(rng, names, depth + 1) for _ in range(rng.choice([0, 1, 1, 2, 2, 3])))
        return f"{rng.choice(sorted(CONFIG_FUNCTIONS))}({args})"
    if r < 0.87:
        return f"({_random_expression(rng, names, depth + 1)}).T"
    if r < 0.95:
        sub = rng.choice(["0", "1", "-1", "5", "0:2", ":", "1:", "0, 1", ":, 0", "[0, 1]", "x", "1.5", "E"])
        return f"{_random_expression(rng, names, depth + 1)}[{sub}]"
    return f"-{_random_expression(rng, names, depth + 1)}"


def test_random_expressions_fail_only_with_expression_errors():
    # nonsense must be an ExprError (a ConfigError with file, key and line once in a config),
    # never numpy's ValueError or an inf: before, 40 kinds of raw numpy errors and warnings got
    # out of 20 000 such expressions (constant shapes that do not broadcast, a ragged list, 1 / 0,
    # a variable as an index, vertex indices of 1e300 or 1.5)
    import random
    import warnings

    from convex_sst.graphs import CONFIG_FUNCTIONS

    num_z = 12
    names = {"x": Affine.variable((3,), 0, num_z), "f": Affine.variable((2, 3), 3, num_z),
             "y": Affine.variable((3,), 9, num_z), "n": 3, "k": 2, "E": np.array([[0, 1], [1, 2]]),
             "S": CONFIG_FUNCTIONS["incidence"](np.array([[0, 1], [1, 2]]), 3), "A": np.arange(6.0).reshape(2, 3)}
    rng = random.Random(0)
    failed, kinds = 0, set()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a numpy RuntimeWarning would be a silent inf or NaN
        for _ in range(1500):
            text = _random_expression(rng, names)
            if rng.random() < 0.5:
                text += f" {rng.choice(['==', '<=', '>='])} {_random_expression(rng, names, 2)}"
            try:
                Evaluator(names, CONFIG_FUNCTIONS, num_z).evaluate(parse(text))
            except ExprError as exc:
                failed += 1
                kinds.add(str(exc)[:20])
            except Exception as exc:  # noqa: BLE001 - the finding
                raise AssertionError(f"{text!r} raised {type(exc).__name__}: {exc}") from exc
    assert failed > 900 and len(kinds) > 30  # the generator does reach the error paths


def test_constant_expressions_at_the_bounds_of_their_checks():
    from convex_sst.graphs import CONFIG_FUNCTIONS

    ev = Evaluator({}, CONFIG_FUNCTIONS)
    assert ev.evaluate(parse("complete_edges(0)")).shape == ev.evaluate(parse("complete_arcs(1)")).shape == (0, 2)
    assert ev.evaluate(parse("zeros(3, 0)")).shape == (3, 0) and ev.evaluate(parse("eye(0)")).shape == (0, 0)
    assert ev.evaluate(parse("both_orientations([[0, 9007199254740992]])")).tolist() == [[0, 2**53], [2**53, 0]]
    for n, k in [(10, 1), (10, 2), (10, 5), (10, 10), (40, 7)]:  # the cap's estimate 4n(k + 1) bounds the arcs
        assert 0 < len(ev.evaluate(parse(f"subset_chain_arcs({n}, {k})"))) <= 4 * n * (k + 1)


def test_random_configs_load_solve_or_fail_with_a_library_error(tmp_path):
    """30 seeded random configs (2 to 5 items, an auxiliary vector, 1 to 6 constraints drawn
    from a pool: sums, pairs, orderings, bounds, a slice; mostly nonsense, as drafts are): each
    loads, argmaxes and enumerates, and relaxes with the entropy and the quadratic on every
    backend to a point of P with finite gradients, or raises a ConvexSSTError (empty, unbounded,
    non-integral, ...). Runs of 150 to 250 such configs found the generic path raising
    cvxpylayers' ValueError for an auxiliary variable no constraint reads (these 30 do not
    reach it; test_generic.py pins it)."""
    import random
    import warnings

    rng = random.Random(0)
    pool = ["sum(x) == {k}", "sum(x) <= {k}", "sum(x) >= 1", "x[{i}] + x[{j}] <= 1", "x[{i}] >= x[{j}]",
            "x[{i}] == x[{j}]", "x[{i}] <= f[{a}]", "sum(f) == 1", "f >= 0", "f <= 1", "x[{i}] + x[{j}] >= 1",
            "x[{i}] == 0", "x[{i}] <= 0.5", "2 * x[{i}] <= 1 + x[{j}]", "x - f[0] <= 1", "x[0:2] <= 1", "0 <= x"]
    solved = 0
    for it in range(30):
        n, m = rng.randint(2, 5), rng.randint(1, 3)
        cons = [rng.choice(pool).format(k=rng.randint(1, n), i=rng.randrange(n), j=rng.randrange(n), a=rng.randrange(m))
                for _ in range(rng.randint(1, 5))] + (["0 <= x <= 1"] if rng.random() < 0.8 else [])
        path = write(tmp_path, f"name: draft{it}\noutput: {{name: x, shape: [{n}]}}\nvariables:\n  f: [{m}]\n"
                               "constraints:\n" + "".join(f"  - '{c}'\n" for c in cons))
        u = torch.randn(3, n, generator=torch.Generator().manual_seed(it), dtype=torch.float64, requires_grad=True)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                P = cs.load_polytope(path)
                P.argmax(u.detach())
                P.vertices(limit=100)
                for reg in ("entropy", "quadratic"):
                    for backend in ("auto", "torch", "generic"):
                        x = cs.relax(u, P, reg, 0.5, backend=backend)
                        assert bool(P.contains(x.detach(), atol=1e-4).all()), (cons, reg, backend)
                        (g,) = torch.autograd.grad((x * x.detach()).sum(), u)
                        assert bool(torch.isfinite(g).all()), (cons, reg, backend)
            solved += 1
        except cs.ConvexSSTError:
            continue
    assert solved >= 8  # the draws reach the solvers, not only the load-time checks


@pytest.mark.parametrize("text,msg", [
    ("[[1, 2], [3]]", "a list literal needs items of one shape (a rectangular array), got shapes [(2,), (1,)]"),
    ("[1, 2] + [1, 2, 3]", "cannot broadcast shapes (2,) and (3,) for '+'"),
    ("[1, 2] <= [1, 2, 3]", "cannot broadcast shapes (2,) and (3,) for '-'"),
    ("ones(2) @ ones(3)", "'@' shape mismatch: (2,) @ (3,)"),
    ("1 / 0", "arithmetic on constants failed: divide by zero"),
    ("1e200 * 1e200", "arithmetic on constants failed: overflow"),
    ("x / 0 == 1", "division by zero"),
    ("x / [1, 0, 1] == 1", "division by zero"),
    ("ones(3)[x] == 1", "an index must be a constant expression, not a variable expression"),
    ("x[0:x] == 1", "a slice bound must be a constant expression, not a variable expression"),
    ("reshape(ones(3), 2, 2)", "reshape(...) failed: _reshape() takes 2 positional arguments but 3 were given; "
                               "usage: reshape(value, shape)"),
    ("incidence([[0, 1.5]], 3)", "arcs[0] = [0.0, 1.5]: vertex indices must be whole numbers"),  # was [0, 1]
    ("incidence([0, 1], 3)", "arcs must be a list of integer pairs [i, j] (shape (m, 2)), got shape (2,)"),
    ("both_orientations([[0, 1e17]])", "edges[0] = [0.0, 1e+17]: a vertex index that large is a mistake"),
    ("num_vertices([[0, -1]])", "arcs hold a negative vertex index -1"),
    ("graph_edges(3, [[1, 1]])", "edges[0] = [1, 1] is a self-loop"),
    ("graph_edges(3, [[0, 1], [1, 0]])", "edges[1] = [0, 1] repeats an earlier edge"),
    ("graph_edges(3, [[0, 5]])", "edges[0] = [0, 5] has a vertex outside 0..2"),
    ("complete_edges(-2)", "n must be >= 0, got -2"),
    ("complete_arcs(2.5)", "n must be an integer, got 2.5"),
    ("eye(-1)", "n must be >= 0, got -1"),
    ("zeros(3, -1)", "a dimension must be >= 0, got -1"),
    ("onehot(3, 1e300)", "index = 1e+300 is too large to be a size or an index"),
    ("subset_chain_arcs(1e7, 5)", "subset_chain with n = 10000000, k = 5 would have about 2.4e+08 arcs; "
                                  "at most 10,000,000 are supported"),  # was a Python loop over 1e7 items
    ("subset_chain_arcs(500001, 4)", "would have about 1e+07 arcs"),  # 10 000 020 > 10⁷
])
def test_constant_expression_errors(text, msg):
    from convex_sst.graphs import CONFIG_FUNCTIONS

    ev = Evaluator({"x": Affine.variable((3,), 0, 3)}, CONFIG_FUNCTIONS, 3)
    with pytest.raises(ExprError, match=re.escape(msg)):
        ev.evaluate(parse(text))


# ---------------------------------------------------------------- config errors

GOOD = """\
name: tiny
params:
  n: {type: int, min: 2, default: 3}
output: {name: x, shape: [n]}
constraints:
  - sum(x) == 1
  - 0 <= x <= 1
"""


def test_canonical_form_moves_single_variable_rows_to_bounds(tmp_path):
    P = cs.load_polytope(write(tmp_path, GOOD))
    f = P.form
    assert f.num_eq == 1 and f.num_ub == 0
    assert np.all(f.lb == 0) and np.all(f.ub == 1)
    assert P.vertices().shape == (3, 3)
    # scaled rows: 2 x ≤ 2 is x ≤ 1, and 3 x_0 ≥ 3 is x_0 ≥ 1 (the only vertex is e_0)
    P = cs.load_polytope(write(tmp_path, GOOD.replace("0 <= x <= 1", "0 <= x\n  - 2 * x <= 2\n  - 3 * x[0] >= 3")))
    f = P.form
    assert f.num_ub == 0 and list(f.lb) == [1, 0, 0] and list(f.ub) == [1, 1, 1]
    assert P.vertices().tolist() == [[1, 0, 0]]


@pytest.mark.parametrize("text,pattern", [
    (GOOD.replace("name: tiny", "name: tiny\nbogus: 1"), r"p\.yaml:\d+: bogus: unknown top-level key 'bogus'"),
    (GOOD.replace("  - sum(x) == 1", "  - sum(y) == 1"), r"p\.yaml:6: constraints\[0\]: unknown name 'y'"),
    (GOOD.replace("  - sum(x) == 1", "  - sum(x) = 1"), r"p\.yaml:6: constraints\[0\]: unexpected '=' at column 8.*use '==' for equality"),
    (GOOD.replace("  - sum(x) == 1", "  - sum(x)"), r"p\.yaml:6: constraints\[0\]: a constraint must be a comparison"),
    (GOOD.replace("type: int", "type: integer"), r"p\.yaml:3: params\.n\.type: type must be one of"),
    (GOOD.replace("min: 2", "minimum: 2"), r"params\.n\.minimum: unknown parameter key 'minimum'.*'min'"),
    (GOOD.replace("output: {name: x, shape: [n]}", "output: {name: x, shape: [n - 5]}"), r"output\.shape\[0\]: dimension must be >= 1"),
    (GOOD.replace("name: tiny", "name: 2tiny"), r"p\.yaml:1: name: name must be an identifier"),
    (GOOD.replace("name: tiny", "name: tiny\nname: again"), r"p\.yaml:2: name: duplicate key"),
    (GOOD + "  - [unclosed\n", r"p\.yaml:\d+: not valid YAML"),
    (GOOD.replace("output: {name: x, shape: [n]}\n", ""), r"missing required key 'output'"),
    (GOOD + "regularizers: [entropi]\n", r"regularizers\[0\]: unknown regularizer 'entropi'.*Did you mean 'entropy'"),
    (GOOD + "argmax: kruskall_typo\n", r"argmax: unknown argmax algorithm"),
    (GOOD + "data:\n  sum: ones(2)\n", r"data\.sum: 'sum' is the name of a built-in function"),
    (GOOD + "regularizers: entropy\n", r"p\.yaml:8: regularizers: regularizers must be a list of names"),
    (GOOD.replace("  - sum(x) == 1", "  - {expr: sum(x) == 1, note: one}"),
     r"p\.yaml:6: constraints\[0\]: a constraint is a string or a mapping \{expr: \.\.\., doc: \.\.\.\}"),
    (GOOD.replace("  - sum(x) == 1", "  - {doc: one}"), r"p\.yaml:6: constraints\[0\]: a constraint is a string or a mapping"),
    (GOOD.replace("min: 2,", "min: 2 +,"), r"p\.yaml:3: params\.n\.min: expected a value at column 4 of '2 \+', got 'end of expression'"),
    (GOOD.replace("  - sum(x) == 1", "  - sum(x == 1"), r"p\.yaml:6: constraints\[0\]: expected '\)' at column 11 of 'sum\(x == 1', got 'end of expression'"),
    (GOOD.replace("  - sum(x) == 1", "  - sum(x) == 1\n  - n + 1 <= n"), r"p\.yaml:7: constraints\[1\]: a constraint between constants is violated"),
    (GOOD.replace("  - sum(x) == 1", "  - sum(x) == 1\n  - n == 4"), r"p\.yaml:7: constraints\[1\]: a constraint between constants is violated"),
    # every section of the wrong kind, and bad names
    ("- sum(x) == 1\n- 0 <= x <= 1\n", r"p\.yaml: a polytope config must be a mapping with keys \['constraints', 'name', 'output'\], got list"),
    (GOOD.replace("params:\n  n: {type: int, min: 2, default: 3}", "params: [n]").replace("[n]\n", "[3]\n"),
     r"p\.yaml:2: params: params must be a mapping name -> \{type, default, min, max, doc\}"),
    (GOOD.replace("n: {type: int, min: 2, default: 3}", "n: 3"), r"p\.yaml:3: params\.n: each parameter is a mapping"),
    (GOOD + "data: [1]\n", r"p\.yaml:8: data: data must be a mapping name -> expression"),
    (GOOD + "variables: [f]\n", r"p\.yaml:8: variables: variables must be a mapping name -> shape"),
    (GOOD + "variables:\n  2f: [n]\n", r"p\.yaml:9: variables\.2f: '2f' is not a valid identifier"),
    (GOOD + "variables:\n  n: [n]\n", r"p\.yaml:9: variables\.n: 'n' is already declared at params\.n"),
    (GOOD + "description: [1]\n", r"p\.yaml:8: description: description must be a string"),
    (GOOD + "argmax: 3\n", r"p\.yaml:8: argmax: argmax must be the name of a registered algorithm"),
    (GOOD.replace("output: {name: x, shape: [n]}", "output: [n]"), r"p\.yaml:4: output: output must be a mapping with keys name"),
    (GOOD.replace("shape: [n]}", "shape: [n], dtype: float}"), r"p\.yaml:4: output\.dtype: output keys are name, shape and doc"),
    (GOOD.replace("shape: [n]", "shape: {a: 1}"), r"p\.yaml:4: output\.shape: a shape is a list of dimension expressions"),
    (GOOD.replace("shape: [n]", "shape: [n +]"), r"p\.yaml:4: output\.shape\[0\]: expected a value at column 4 of 'n \+'"),
    (GOOD.replace("min: 2,", "min: 2, max: 2 +,"), r"p\.yaml:3: params\.n\.max: expected a value at column 4"),
    (GOOD.replace("  - sum(x) == 1\n  - 0 <= x <= 1\n", "  []\n"), r"p\.yaml:6: constraints: constraints must be a non-empty list"),
    (GOOD.replace("  - sum(x) == 1", "  - sum([x, x]) == 1"), r"p\.yaml:6: constraints\[0\]: list literals may only hold constants"),
    (GOOD + "data:\n  G: group_indicator([[0, 1], [2]])\n",  # was numpy's ValueError, with no file or key
     r"p\.yaml:9: data\.G: a list literal needs items of one shape \(a rectangular array\), got shapes \[\(2,\), \(1,\)\]"),
    (GOOD + "data:\n  E: incidence([[0, 1.5]], n)\n",  # was the arc (0, 1), silently
     r"p\.yaml:9: data\.E: arcs\[0\] = \[0\.0, 1\.5\]: vertex indices must be whole numbers"),
    (GOOD.replace("  - sum(x) == 1", "  - sum(x) == 1 / (n - 3)"), r"p\.yaml:6: constraints\[0\]: arithmetic on constants failed: divide by zero"),
    # resource limits: a clear ConfigError, not numpy's MemoryError or Python's RecursionError
    (GOOD.replace("default: 3", "default: 100000").replace("shape: [n]", "shape: [n, n]"),
     r"p\.yaml:4: output\.shape: 10,000,000,000 variables \(x \(100000, 100000\)\).*at most 10,000,000"),
    (GOOD.replace("0 <= x <= 1", "0 <= x <= " + "(" * 400 + "1" + ")" * 400),
     r"p\.yaml:7: constraints\[1\]: expression nested too deeply to parse"),
])
def test_malformed_configs_name_file_key_and_line(tmp_path, text, pattern):
    with pytest.raises(cs.ConfigError, match=pattern):
        cs.load_polytope(write(tmp_path, text))


def test_out_of_memory_names_the_key(tmp_path, monkeypatch):
    # numpy's MemoryError (e.g. outer(ones(m), ones(m)) for a large m) becomes a ConfigError;
    # simulated, so that no test ever asks the machine for that memory
    from convex_sst import config

    def outer(a, b):
        raise MemoryError

    monkeypatch.setitem(config.CONFIG_FUNCTIONS, "outer", outer)
    with pytest.raises(cs.ConfigError, match=r"p\.yaml:\d+: data\.Big: out of memory evaluating it with parameters \{'n': 3\}"):
        cs.load_polytope(write(tmp_path, GOOD + "data:\n  Big: outer(ones(9), ones(9))\n"))
    text = GOOD + "  - sum(outer(ones(2), ones(2))) * x[0] >= 0\n"
    with pytest.raises(cs.ConfigError, match=r"p\.yaml:\d+: constraints\[2\]: out of memory"):
        cs.load_polytope(write(tmp_path, text))


def test_empty_polytope_detected_at_load(tmp_path):
    text = GOOD.replace("  - sum(x) == 1", "  - sum(x) == n + 1")
    with pytest.raises(cs.PolytopeError, match="is empty"):
        cs.load_polytope(write(tmp_path, text))
    with pytest.raises(cs.PolytopeError, match="is empty"):
        cs.load_polytope("spanning_tree", n=4, edges=[[0, 1], [2, 3]])  # disconnected graph
    with pytest.raises(cs.PolytopeError, match="empty"):
        cs.load_polytope(write(tmp_path, GOOD.replace("  - sum(x) == 1", "  - 0 * sum(x) == 1")))


def test_empty_polytopes_name_the_constraint_or_the_entry(tmp_path):
    # a constraint whose variables cancel is named with its line (it was "an inequality reduces
    # to a false constant", with no hint which); contradictory bounds name the entry, not z[j]
    text = GOOD.replace("  - sum(x) == 1", "  - sum(x) == 1\n  - 0 * x >= [0, 1, 0]")
    with pytest.raises(cs.PolytopeError, match=r"p\.yaml:7: constraints\[1\]: every variable's coefficient is 0 in "
                                               r"entry \[1\], and what is left is false: the polytope is empty"):
        cs.load_polytope(write(tmp_path, text))
    text = GOOD.replace("  - sum(x) == 1", "  - sum(x) == 1\n  - 0 * sum(x) == 1")
    with pytest.raises(cs.PolytopeError, match=r"p\.yaml:7: constraints\[1\]: every variable's coefficient is 0, and"):
        cs.load_polytope(write(tmp_path, text))
    text = GOOD.replace("  - sum(x) == 1", "  - sum(x) == 1\n  - x[0] >= 1\n  - 2 * x[0] <= 1")
    with pytest.raises(cs.PolytopeError, match=r"the bounds on x\[0\] are contradictory \(1 > 0\.5\)"):
        cs.load_polytope(write(tmp_path, text))
    text = GOOD.replace("  - sum(x) == 1", "  - sum(x) == 1\n  - s >= 1\n  - s <= 0.5") + "variables:\n  s: []\n"
    with pytest.raises(cs.PolytopeError, match=r"the bounds on s are contradictory \(1 > 0\.5\)"):  # a scalar
        cs.load_polytope(write(tmp_path, text))
    text = GOOD + "variables:\n  f: [2, 2]\n"
    text = text.replace("  - sum(x) == 1", "  - sum(x) == 1\n  - f[1, 0] >= 0.75\n  - 2 * f[1, 0] <= 1\n  - 0 <= f <= 1")
    with pytest.raises(cs.PolytopeError, match=r"the bounds on f\[1, 0\] are contradictory \(0\.75 > 0\.5\): the polytope is empty"):
        cs.load_polytope(write(tmp_path, text))
    # a constraint with variables left that cancel in some entries only, and hold there, is fine
    P = cs.load_polytope(write(tmp_path, GOOD.replace("  - sum(x) == 1", "  - sum(x) == 1\n  - '[0, 1, 1] * x <= [0, 1, 1]'")))
    assert P.vertices().shape == (3, 3)


def test_data_entries_are_a_lazy_read_only_mapping():
    # a built-in's data entries are evaluated when first read (with the entries they name); a
    # fresh mapping, since the polytope itself is shared with the other tests
    from convex_sst.config import DataEntries

    P = cs.load_polytope("arborescence", n=4)
    data = DataEntries(P.config, P.params)
    assert len(data) == 5 and list(data) == ["A", "S", "In", "Inc", "R"] and "C" not in data
    assert repr(data) == "DataEntries({A: ..., S: ..., In: ..., Inc: ..., R: ...})"  # nothing read yet
    assert data["S"].shape == (16, 12)
    assert repr(data) == "DataEntries({A: ndarray, S: csr_array, In: ..., Inc: ..., R: ...})"  # S read A
    with pytest.raises(KeyError):
        data["C"]


def test_unreadable_config_files_and_unknown_names_in_shapes(tmp_path):
    with pytest.raises(cs.ConfigError, match=r"cannot read polytope config '.*': Is a directory"):
        cs.load_polytope(tmp_path)
    with pytest.raises(cs.ConfigError, match=r"p\.yaml:4: output\.shape\[0\]: unknown name 'm'; available: n"):
        cs.load_polytope(write(tmp_path, GOOD.replace("shape: [n]", "shape: [m]")))


def test_parameter_types_bool_and_lists(tmp_path):
    text = GOOD.replace("params:\n", "params:\n  flag: {type: bool, default: true}\n  g: {type: int_list, default: [0, 1]}\n"
                        "  e: {type: edge_list, default: []}\n")
    P = cs.load_polytope(write(tmp_path, text))
    assert P.params["flag"] is True and np.shape(P.params["e"]) == (0, 2) and list(P.params["g"]) == [0, 1]
    assert cs.load_polytope(write(tmp_path, text), flag=np.bool_(False)).params["flag"] is False
    with pytest.raises(cs.ConfigError, match=r"parameter flag=3 \(given\): expected true or false, got int"):
        cs.load_polytope(write(tmp_path, text), flag=3)
    with pytest.raises(cs.ConfigError, match=r"parameter g=\['a', 'b'\] \(given\): expected a list of integers"):
        cs.load_polytope(write(tmp_path, text), g=["a", "b"])
    with pytest.raises(cs.ConfigError, match=r"polytope 'tiny' needs parameter 'n' \(int: size\); pass it as n=\.\.\."):
        cs.load_polytope(write(tmp_path, GOOD.replace("default: 3", "doc: size")))


def test_unbounded_polytope_detected_at_load(tmp_path):
    with pytest.raises(cs.PolytopeError, match=r"polytope 'tiny' \(n=3\) from \S*p\.yaml is unbounded in x\[0\]; "
                                                r"a polytope must be bounded"):  # above only
        cs.load_polytope(write(tmp_path, GOOD.replace("  - 0 <= x <= 1", "  - x >= 0").replace("sum(x) == 1", "x[0] - x[1] == 0")))


def test_polytope_outside_the_unit_cube_detected_at_load(tmp_path):
    # an integral polytope whose vertices are not 0/1 (here (2, 0, 0)): `check` used to report
    # "integral: yes ... 0/1 vertices", count the 0/1 points as its vertices, and relax it
    with pytest.raises(cs.PolytopeError, match=r"reaches x\[0\] = 2: structures are 0/1 vectors.*'0 <= x <= 1'"):
        cs.load_polytope(write(tmp_path, GOOD.replace("  - 0 <= x <= 1", "  - 0 <= x <= 2").replace("sum(x) == 1", "sum(x) == 2")))


def test_non_integral_polytope_reported_by_argmax(tmp_path):
    text = GOOD.replace("sum(x) == 1", "2 * sum(x) == 3")  # vertices like (1, 0.5, 0)
    P = cs.load_polytope(write(tmp_path, text))
    with pytest.raises(cs.PolytopeError, match="fractional vertex"):
        P.lp_argmax(torch.tensor([1.0, 0.5, 0.0]))


def test_constraints_between_constants_that_hold_are_dropped(tmp_path):
    P = cs.load_polytope(write(tmp_path, GOOD.replace("  - sum(x) == 1", "  - sum(x) == 1\n  - n <= n\n  - n <= 5\n  - n == 3")))
    assert P.form.num_eq == 1 and P.form.num_ub == 0 and P.vertices().shape == (3, 3)


def test_parameter_errors():
    with pytest.raises(cs.ConfigError, match=r"parameter n=1 \(given\): out of range; expected 2 <= n$"):
        cs.load_polytope("simplex", n=1)
    with pytest.raises(cs.ConfigError, match=r"expected a list of integer \[i, j\] pairs, got shape \(1, 3\)"):
        cs.load_polytope("spanning_tree", n=4, edges=[[0, 1, 2]])
    with pytest.raises(cs.ConfigError, match=r"parameter k=7 \(given\): out of range; expected 1 <= k <= n \(with n = 5\)"):
        cs.load_polytope("k_subset", n=5, k=7)
    with pytest.raises(cs.ConfigError, match="expected an integer"):
        cs.load_polytope("k_subset", n=5, k="2")
    with pytest.raises(cs.UnknownNameError, match="unknown parameter of polytope 'k_subset' 'kk'.*Did you mean 'k'"):
        cs.load_polytope("k_subset", n=5, kk=2)
    with pytest.raises(cs.ConfigError, match=r"pair 0 = \[0, 9\] has a vertex outside 0..3"):
        cs.load_polytope("spanning_tree", n=4, edges=[[0, 9]])
    with pytest.raises(cs.ConfigError, match="directed cycle"):
        cs.load_polytope("dag_path", n=3, edges=[[0, 1], [1, 2], [2, 0]], target=2)


def test_array_indices_of_whole_numbers(tmp_path):
    # an index array computed with / (floats) selects like its integers; a fraction is an error
    for index, row in (("[0, 2]", [1, 0, 1]), ("[0.0, 2.0]", [1, 0, 1]), ("range(2) * 2 / 2", [1, 1, 0])):
        P = cs.load_polytope(write(tmp_path, GOOD.replace("sum(x) == 1", f"sum(x[{index}]) <= 1")))
        assert P.form.A_ub.toarray().tolist() == [row]
    with pytest.raises(cs.ConfigError, match=r"p\.yaml:6: constraints\[0\]: index error: arrays used as indices must be "
                                             "of integer"):
        cs.load_polytope(write(tmp_path, GOOD.replace("sum(x) == 1", "sum(x[[0.5, 1]]) <= 1")))


def test_float_parameters_and_a_one_dimension_shape(tmp_path):
    # type: float takes any finite number (numpy, 0-d tensors and ints too), not strings or bools;
    # a shape may be one expression instead of a list of them
    path = write(tmp_path, "name: capped\nparams:\n  n: {type: int, min: 2, default: 3}\n"
                           "  cap: {type: float, default: 2, min: 1}\noutput: {name: x, shape: n}\n"
                           "constraints:\n  - sum(x) <= cap\n  - 0 <= x <= 1\n")
    P = cs.load_polytope(path)
    assert P.params == {"n": 3, "cap": 2.0} and type(P.params["cap"]) is float and P.shape == (3,)
    assert P.vertices().shape == (7, 3)  # the subsets of at most 2 of 3 items
    for cap in (3, np.float32(1.0), torch.tensor(2.5)):
        Q = cs.load_polytope(path, cap=cap)
        assert type(Q.params["cap"]) is float and Q.params["cap"] == float(cap) and Q.form.b_ub.tolist() == [float(cap)]
    for cap, msg in (("2", "expected a number, got str"), (True, "expected a number, got bool"),
                     (math.inf, "expected a finite number"), (0.5, r"out of range; expected 1 <= cap")):
        with pytest.raises(cs.ConfigError, match=rf"parameter cap={cap!r} \(given\): {msg}"):
            cs.load_polytope(path, cap=cap)


def test_parameters_accept_numpy_and_0d_tensor_scalars():
    # sizes often come out of torch/numpy code (x.shape[-1], tensor.sum()): the same polytope
    ref = cs.load_polytope("k_subset", n=5, k=2)
    for n, k in [(np.int64(5), np.int32(2)), (torch.tensor(5), torch.tensor(2)), (np.array(5), 2.0)]:
        assert cs.load_polytope("k_subset", n=n, k=k) is ref
    with pytest.raises(cs.ConfigError, match=r"expected an integer, got float"):
        cs.load_polytope("k_subset", n=5, k=torch.tensor(2.5))
    with pytest.raises(cs.ConfigError, match="expected an integer, got bool"):
        cs.load_polytope("k_subset", n=5, k=torch.tensor(True))
    with pytest.raises(cs.ConfigError, match="expected an integer, got Tensor"):
        cs.load_polytope("k_subset", n=5, k=torch.tensor([2]))


def test_unknown_polytope_name_suggests_closest():
    with pytest.raises(cs.UnknownNameError, match=r"unknown polytope 'spaning_tree'.*Did you mean 'spanning_tree'"):
        cs.load_polytope("spaning_tree")
    with pytest.raises(cs.ConfigError, match="does not exist"):
        cs.load_polytope("no/such/file.yaml")


def test_user_config_cannot_shadow_builtin(tmp_path):
    with pytest.raises(cs.ConfigError, match="taken by a built-in"):
        cs.load_polytope(write(tmp_path, GOOD.replace("name: tiny", "name: simplex")))


def test_register_polytope_by_name(tmp_path):
    path = write(tmp_path, GOOD.replace("name: tiny", "name: tiny_registered"))
    assert cs.register_polytope(path) == "tiny_registered"
    assert "tiny_registered" in cs.available_polytopes()
    assert cs.load_polytope("tiny_registered", n=4).shape == (4,)
    assert cs.register_polytope(path) == "tiny_registered"  # the same file again: nothing changes
    other = tmp_path / "elsewhere"
    other.mkdir()
    with pytest.raises(cs.RegistrationError, match=r"a polytope named 'tiny_registered' is already registered from "
                                                    + re.escape(str(path.resolve()))):
        cs.register_polytope(write(other, GOOD.replace("name: tiny", "name: tiny_registered")))
    with pytest.raises(cs.ConvexSSTError, match="taken by a built-in"):
        cs.register_polytope(write(other, GOOD.replace("name: tiny", "name: simplex")))


# ---------------------------------------------------------------- packaging and docs


def test_builtin_configs_ship_as_package_data():
    import importlib.resources

    files = {p.name for p in importlib.resources.files("convex_sst.polytopes").iterdir()}
    from convex_sst.polytope import builtin_config_paths

    assert {f"{name}.yaml" for name in builtin_config_paths()} <= files
    assert len(files) >= 8


def test_docs_worked_example(tmp_path, monkeypatch):
    (yaml_text,) = _blocks(DOC, "yaml")
    (py_text, reg_text, fast_text, quadratic_text) = _blocks(DOC, "python")
    for template in (reg_text, fast_text, quadratic_text):  # templates (`...` bodies; a registration
        # that needs the one before it; test_extending runs it on a config of its own): they must parse
        compile(template, str(DOC), "exec")
    write(tmp_path, yaml_text, "group_subset.yaml")
    monkeypatch.chdir(tmp_path)
    exec(compile(py_text, str(DOC), "exec"), {})
    P = cs.load_polytope("group_subset.yaml", k=2)
    assert P.form.num_eq == 1 and P.form.num_ub == 3
    out = subprocess.run([sys.executable, "-m", "convex_sst.cli", "check", "group_subset.yaml", "--param", "k=2"],
                         capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "1 equalities, 3 inequalities, 12 bounds over 6 variables" in out.stdout
    assert "vertices     12" in out.stdout


def test_docs_error_example_is_real(tmp_path):
    (yaml_text,) = _blocks(DOC, "yaml")
    bad = yaml_text.replace("G @ x <= 1", "G2 @ x <= 1")
    with pytest.raises(cs.ConfigError, match=r"constraints\[1\]: unknown name 'G2'.*Did you mean 'G'"):
        cs.load_polytope(write(tmp_path, bad, "my_polytope.yaml"))


def test_builtin_polytopes_compile_their_constraints_when_first_needed():
    # a built-in polytope is shown non-empty by one hard structure at load; the data its fast
    # paths and argmax do not read and the constraints are evaluated when a solver needs them.
    # Arborescences on 300 vertices have 27M flow variables, over MAX_VARIABLES (a ConfigError at
    # load before), and their dense data would take tens of GB: they load, relax and sample.
    gen = torch.Generator().manual_seed(0)
    P = cs.load_polytope("arborescence", n=300)
    u = torch.randn(2, 300, 300, generator=gen, dtype=torch.float64)
    x = cs.relax(u, P, "exp_family", 1.0)
    assert torch.allclose(x.sum(1)[:, 1:], torch.ones(2, 299, dtype=torch.float64))  # one parent each
    hard = P.argmax(u)
    assert (hard.sum(1)[:, 1:] == 1).all() and hard.sum() == 2 * 299
    with pytest.raises(cs.ConfigError, match=r"arborescence.yaml:\d+: variables: 27,000,000 variables .* at most 10,000,000"):
        cs.relax(u, P, "entropy", 1.0, backend="torch")
    # on first use, the same constraints as compiled at once from the config
    S = cs.load_polytope("spanning_tree", n=4, edges=[[0, 1], [1, 2], [2, 3], [0, 3], [0, 2]])
    form = S.config.compile(S.params)[0]
    for a, b in [(S.form.A_eq, form.A_eq), (S.form.A_ub, form.A_ub)]:
        assert a.shape == b.shape and abs(a - b).max() == 0
    assert (S.form.b_eq == form.b_eq).all() and (S.form.lb == form.lb).all() and (S.form.ub == form.ub).all()


def test_regularizer_domains_narrower_than_the_unit_box_are_checked_against_the_constraints():
    # built-in structures lie in [0, 1]^d, which settles the usual domains without compiling the
    # constraints; a narrower domain is checked against the coordinate ranges they declare
    reg = cs.Regularizer(name="test_around_one", description="½‖x − 1‖² on [0.5, 1.5]", cvxpy=None,
                         value=lambda x: 0.5 * ((x - 1) ** 2).sum(-1), domain=(0.5, 1.5),
                         grad=lambda x: x - 1, hess=torch.ones_like)
    P = cs.load_polytope("spanning_tree", n=3)
    with pytest.raises(cs.PolytopeError, match=r"defined on \[0.5, 1.5\].*x\[0\] ranging over \[0, 1\]"):
        P.check_regularizer(reg)
    assert P.check_regularizer("entropy").name == "entropy"


@pytest.mark.parametrize("entries", ["  A: B + 1\n  B: 2\n", "  A: B + 1\n  B: A + 1\n"])
def test_a_data_entry_names_only_the_entries_above_it(tmp_path, entries):
    # entries are evaluated when first read (built-in polytopes read only what they use); a
    # forward reference stays an error, and a cycle is not a RecursionError
    with pytest.raises(cs.ConfigError, match=r"p\.yaml:\d+: data\.A: unknown name 'B'; available: n"):
        cs.load_polytope(write(tmp_path, GOOD + "data:\n" + entries))
    P = cs.load_polytope(write(tmp_path, GOOD + "data:\n  A: n + 1\n  B: A * 2\n", name="q.yaml"))
    assert dict(P.data) == {"A": 4, "B": 8}


def test_sparse_constants_behave_as_the_arrays_they_stand_for():
    # the incidence-like config functions return scipy sparse arrays: every expression gives what
    # the dense array gives (kept sparse through '@' with variables, '.T' and '-', densified
    # elsewhere)
    import scipy.sparse as sp

    rng = np.random.default_rng(1)
    K = rng.normal(size=(3, 4)) * (rng.random((3, 4)) < 0.5)
    num_z = 4 + 8 + 3
    variables = {"y": Affine.variable((4,), 0, num_z), "X": Affine.variable((4, 2), 4, num_z),
                 "w": Affine.variable((3,), 12, num_z)}
    z = rng.normal(size=num_z)
    functions = {"delete": lambda a, i, ax: np.delete(np.asarray(a), int(i), axis=int(ax)),
                 "len": lambda a: int(np.shape(a)[0])}
    dense = Evaluator({**variables, "K": K, "v": np.arange(4.0)}, functions, num_z)
    sparse = Evaluator({**variables, "K": sp.csr_array(K), "v": np.arange(4.0)}, functions, num_z)
    cases = ["K @ y", "K @ X", "w @ K", "X.T @ K.T", "-K @ y", "K.T @ w", "(2 * K) @ y", "K[1] @ y",
             "K.T", "-K", "2 * K", "K + 1", "K[1]", "K[:, 2]", "K[0, 1]", "sum(K, 0)", "sum(K)", "len(K)",
             "delete(K, 0, 0)", "K @ v", "v @ K.T", "[K, K]", "reshape(K, [4, 3])", "vec(K)", "K * y",
             "y + K[2]"]
    for text in cases:
        a, b = dense.evaluate(parse(text)), sparse.evaluate(parse(text))
        if isinstance(a, Affine):
            assert isinstance(b, Affine) and a.shape == b.shape, text
            assert np.allclose(a.coef @ z + a.const, b.coef @ z + b.const), text
        else:
            b = b.toarray() if sp.issparse(b) else b
            assert np.shape(a) == np.shape(b) and np.allclose(a, b), text
    rows_d, rows_s = (ev.evaluate(parse("K @ y <= 1")) for ev in (dense, sparse))
    assert (abs(rows_d[0].expr.coef - rows_s[0].expr.coef)).max() == 0


def test_incidence_like_config_functions_are_sparse_and_exact():
    import scipy.sparse as sp

    from convex_sst import graphs

    arcs = np.array([[0, 1], [1, 2], [2, 0], [0, 2], [3, 1]])
    n = 4
    inc, inn, out = (np.zeros((n, len(arcs))) for _ in range(3))
    scat = np.zeros((n * n, len(arcs)))
    for a, (h, m) in enumerate(arcs):
        out[h, a], inn[m, a], inc[h, a], inc[m, a] = 1, 1, 1, -1
        scat[h * n + m, a] = 1
    for got, want in [(graphs.incidence(arcs, n), inc), (graphs.in_incidence(arcs, n), inn),
                      (graphs.out_incidence(arcs, n), out), (graphs.arc_scatter(arcs, n), scat)]:
        assert sp.issparse(got) and got.shape == want.shape and (got.toarray() == want).all()
    edges = np.array([[0, 1], [1, 2], [0, 3]])
    both = graphs.both_orientations(edges)
    C = graphs.orientation_sum(edges, both)
    want = np.zeros((3, 6))
    want[[0, 1, 2, 0, 1, 2], range(6)] = 1
    assert sp.issparse(C) and (C.toarray() == want).all()
    G = graphs.group_indicator(np.array([1, 0, 1, 2]))
    assert sp.issparse(G) and (G.toarray() == [[0, 1, 0, 0], [1, 0, 1, 0], [0, 0, 0, 1]]).all()
    for bad in ([1, -1, 0], [], [[0, 1]], [0.5, 1]):
        with pytest.raises(ExprError, match="group labels must be a non-empty list of integers >= 0"):
            graphs.group_indicator(np.array(bad))
    with pytest.raises(ExprError, match="out of range 0..3"):
        graphs.incidence(np.array([[0, 4]]), n)
