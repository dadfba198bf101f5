"""Write docs/api.md, the API reference, from the docstrings and signatures of the public names.

    python docs/make_api.py          # rewrite docs/api.md
    python docs/make_api.py --check  # exit 1 if docs/api.md is out of date (run by the tests)
"""

from __future__ import annotations

import argparse
import inspect
import re
import sys
from pathlib import Path

import convex_sst as cs

OUT = Path(__file__).resolve().parent / "api.md"

SECTIONS = [
    ("Relaxations and samples", ["relax", "sst", "SST", "log_partition"]),
    ("Structures", ["load_polytope", "Polytope", "available_polytopes", "register_polytope",
                    "available_argmax", "register_argmax"]),
    ("Regularizers and fast paths", ["Regularizer", "available_regularizers", "register_regularizer",
                                     "available_fast_paths", "register_fast_path"]),
    ("Noise", ["Noise", "Gumbel", "Gaussian", "Logistic"]),
    ("Gradient estimators and diagnostics", ["sst_gradient", "score_function", "EMABaseline",
                                             "smt_distribution", "exact_gradient", "expected_loss",
                                             "gumbel_kl", "diagnose"]),
    ("Testing oracles (`convex_sst.testing`)", [f"testing.{n}" for n in cs.testing.__all__]),
    ("Errors and warnings", ["ConvexSSTError", "ConfigError", "PolytopeError", "InputError",
                             "UnknownNameError", "RegistrationError", "SolverError", "NotSupportedError",
                             "SolverWarning"]),
]


def _get(name: str):
    obj = cs
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def _signature(name: str, obj) -> str:
    """``name(params) -> result`` with the annotations as written (they are strings under
    ``from __future__ import annotations``) and defaults as ``repr``."""
    if inspect.isclass(obj) and issubclass(obj, BaseException):
        return f"class {name}({', '.join(b.__name__ for b in obj.__bases__)})"
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return name

    def fmt(ann) -> str:
        return ann if isinstance(ann, str) else inspect.formatannotation(ann)

    params = []
    star_done = False
    for p in sig.parameters.values():
        ann = "" if p.annotation is p.empty else f": {fmt(p.annotation)}"
        if p.kind is p.KEYWORD_ONLY and not star_done:
            params.append("*")
            star_done = True
        prefix = {p.VAR_POSITIONAL: "*", p.VAR_KEYWORD: "**"}.get(p.kind, "")
        star_done |= p.kind is p.VAR_POSITIONAL
        default = "" if p.default is p.empty else (f" = {p.default!r}" if ann else f"={p.default!r}")
        params.append(f"{prefix}{p.name}{ann}{default}")
    text = f"{name}({', '.join(params)})"
    ret = sig.return_annotation
    if ret is not sig.empty and ret not in (None, "None"):
        text += f" -> {fmt(ret)}"
    return f"class {text}" if inspect.isclass(obj) else text


SECTION = re.compile(r"^(Args|Arguments|Returns|Raises|Example|Examples|Yields|Note|Notes):\s*$")
ITEM = re.compile(r"^(\*{0,2}[\w.]+(?:, \*{0,2}[\w.]+)*)(?: \(([^)]*)\))?:\s*(.*)$")


def _markdown(doc: str) -> str:
    """A Google-style docstring as Markdown: sections in bold, ``Args``/``Raises`` entries as
    bullet lists, examples as Python code blocks; the prose is kept as written."""
    out: list[str] = []
    section = None
    for line in doc.splitlines():
        head = SECTION.match(line)
        if head:
            section = head.group(1)
            out += ["", f"**{section}**", ""]
            if section.startswith("Example"):
                out.append("```python")
            continue
        if section is None:
            out.append(line)
            continue
        if not line.strip():
            if section.startswith("Example"):
                out += ["```", ""]
            section = None if not line.startswith(" ") else section
            continue
        body = line[4:] if line.startswith("    ") else line.lstrip()
        if section.startswith("Example"):
            out.append(body[4:] if body.startswith(">>> ") else body)
        elif (m := ITEM.match(body)) and section in ("Args", "Arguments", "Raises") and not body.startswith(" "):
            names = ", ".join(f"`{n.strip()}`" for n in m.group(1).split(","))
            kind = f" ({m.group(2)})" if m.group(2) else ""
            out.append(f"- {names}{kind}: {m.group(3)}")
        else:
            out.append("  " + body.strip())
    if section is not None and section.startswith("Example"):
        out.append("```")
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip()
    return re.sub(r":(?:class|func|meth|data|attr|mod):`~?([^`]+)`", r"`\1`", text)


def _entry(name: str, obj) -> list[str]:
    short = name.split(".")[-1]
    lines = [f"### `{name}`", "", "```python", _signature(short, obj), "```", ""]
    doc = inspect.getdoc(obj)
    if doc:
        lines += [_markdown(doc), ""]
    if inspect.isclass(obj) and not issubclass(obj, BaseException):
        # the class's own public methods and properties with their own docstrings (not the
        # ones inherited from torch.nn.Module)
        for attr, member in vars(obj).items():
            if attr.startswith("_"):
                continue
            if isinstance(member, property):
                if member.__doc__:
                    lines += [f"#### `{short}.{attr}` (property)", "", _markdown(inspect.cleandoc(member.__doc__)), ""]
                continue
            fn = member.__func__ if isinstance(member, (staticmethod, classmethod)) else member
            if callable(fn) and fn.__doc__:
                lines += [f"#### `{short}.{attr}`", "", "```python", _signature(attr, fn), "```", "",
                          _markdown(inspect.cleandoc(fn.__doc__)), ""]
    return lines


def render() -> str:
    names = {n for _, group in SECTIONS for n in group}
    public = set(cs.__all__) - {"__version__", "testing"}
    missing = public - names
    if missing:
        raise SystemExit(f"docs/make_api.py: public names without a section: {sorted(missing)}")
    lines = [
        "# API reference",
        "",
        "<!-- generated by docs/make_api.py from the docstrings; edit those, then run "
        "`python docs/make_api.py` -->",
        "",
        f"`convex_sst` {cs.__version__}. Everything below is importable from `convex_sst` "
        "(`import convex_sst as cs`); the oracles from `convex_sst.testing`.",
        "",
    ]
    for title, group in SECTIONS:
        lines += [f"## {title}", ""]
        for name in group:
            lines += _entry(name, _get(name))
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/api.md is out of date")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not OUT.exists() or OUT.read_text() != text:
            print("docs/api.md is out of date: run python docs/make_api.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT} ({len(text.splitlines())} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
