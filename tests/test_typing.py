"""Static types: the library type-checks, it ships ``py.typed``, and user code is checked against
its public signatures (a wrong argument or result type is an error, not silently ``Any``)."""

import importlib.resources
import re
from pathlib import Path

import numpy as np
import pytest
import torch

mypy_api = pytest.importorskip("mypy.api")  # in the test extra; skipped where mypy is absent

# What mypy reports depends on the stubs of torch and numpy: torch 2.1's stubs lack
# torch.compiler.is_compiling, numpy 1.26's type array shapes differently. The check is pinned
# to the environment of the README's test command (and CI): torch 2.13, numpy 2.x.
pinned = pytest.mark.skipif(
    not (torch.__version__.startswith("2.13.") and int(np.__version__.split(".")[0]) >= 2),
    reason=f"the type check is pinned to torch 2.13 and numpy 2.x stubs (found {torch.__version__}, {np.__version__})",
)

ROOT = Path(__file__).resolve().parent.parent

USER_CODE_WITH_ERRORS = '''\
import torch
import convex_sst as cs

P = cs.load_polytope("k_subset", n=5, k=2)
x = cs.relax(torch.zeros(5), P, "entropy", temperature="hot")
y: int = P.argmax(torch.zeros(5))
g: str = cs.exact_gradient(lambda v: v.sum(-1), torch.zeros(5), P)
layer = cs.SST(P, "entropy", 0.5)
z: torch.Tensor = layer(torch.zeros(3, 5))
'''


@pytest.fixture(scope="module")
def mypy(tmp_path_factory):
    cache = tmp_path_factory.mktemp("mypy_cache")

    def run(*paths):
        out, err, rc = mypy_api.run([*map(str, paths), "--config-file", str(ROOT / "setup.cfg"),
                                     "--cache-dir", str(cache), "--no-error-summary"])
        return rc, out + err

    return run


@pinned
def test_library_type_checks(mypy, monkeypatch):
    monkeypatch.chdir(ROOT)
    rc, out = mypy("convex_sst")
    assert rc == 0, out


@pinned
def test_user_code_is_checked_against_the_public_signatures(mypy, monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)
    # the README's Python snippets and the quickstart are clean ...
    readme = (ROOT / "README.md").read_text()
    snippets = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert len(snippets) >= 2
    files = []
    for i, text in enumerate(snippets):
        files.append(tmp_path / f"readme_{i}.py")
        files[-1].write_text(text)
    rc, out = mypy(*files, ROOT / "examples" / "quickstart.py")
    assert rc == 0, out
    # ... and wrong types in user code are reported where they are, with the expected types
    bad = tmp_path / "user.py"
    bad.write_text(USER_CODE_WITH_ERRORS)
    rc, out = mypy(bad)
    lines = [ln for ln in out.splitlines() if ": error:" in ln]
    assert rc == 1, out
    assert [int(ln.split(":")[1]) for ln in lines] == [5, 6, 7], out
    assert 'Argument "temperature" to "relax" has incompatible type "str"; expected "float | Tensor"' in lines[0]
    assert 'expression has type "Tensor", variable has type "int"' in lines[1]
    assert 'expression has type "Tensor", variable has type "str"' in lines[2]


def test_package_ships_py_typed():
    # without the marker, type checkers treat an installed convex_sst as untyped (every call Any)
    assert importlib.resources.files("convex_sst").joinpath("py.typed").is_file()
