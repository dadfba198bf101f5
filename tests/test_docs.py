"""The API reference (docs/api.md) is generated from the docstrings and kept current, and the
docstrings' examples run."""

import inspect
import re
import runpy
from pathlib import Path

import pytest
import torch

import convex_sst as cs

ROOT = Path(__file__).resolve().parent.parent
MAKE_API = ROOT / "docs" / "make_api.py"


def _make_api():
    return runpy.run_path(str(MAKE_API), run_name="make_api")


def test_api_reference_is_current(capsys):
    # fails when a public docstring or signature changed without `python docs/make_api.py`
    assert _make_api()["main"](["--check"]) == 0, capsys.readouterr().err


def test_api_reference_covers_every_public_name():
    text = (ROOT / "docs" / "api.md").read_text()
    headings = set(re.findall(r"^### `([\w.]+)`", text, flags=re.M))
    want = (set(cs.__all__) - {"__version__", "testing"}) | {f"testing.{n}" for n in cs.testing.__all__}
    assert headings == want


def _examples():
    for name in cs.__all__:
        obj = getattr(cs, name)
        doc = inspect.getdoc(obj) or ""
        lines = [ln.strip()[4:] for ln in doc.splitlines() if ln.strip().startswith(">>> ")]
        if lines:
            yield name, "\n".join(lines)


@pytest.mark.parametrize("name, code", list(_examples()), ids=[n for n, _ in _examples()])
def test_docstring_examples_run(name, code):
    env = {"torch": torch, **{n: getattr(cs, n) for n in cs.__all__}}
    torch.manual_seed(0)
    exec(compile(code, f"<docstring of {name}>", "exec"), env)


def test_docstring_examples_found():
    assert {n for n, _ in _examples()} >= {"relax", "SST"}
