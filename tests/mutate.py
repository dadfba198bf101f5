"""Mutation audit: does some test fail when one token of a module changes?

    python tests/mutate.py MODULE [--count N] [--seed S] [--tests FILE ...] [--timeout SEC] [--out FILE]

MODULE is a module of ``convex_sst`` (``noise``, ``config``, ``fast``, ...). The repository is
copied to a temporary directory (without ``.git``, ``.venv``, caches and example outputs); the
tests must pass there first. Then, one at a time, a randomly chosen token of the module is
changed and ``pytest -x`` runs the given test files (default: ``tests/``) in the copy:

- comparisons ``< <= > >= == !=`` to their neighbour or negation, ``+ -`` and ``* /`` swapped,
  a unary minus or a ``not`` dropped, ``and``/``or``, ``True``/``False``, ``min``/``max`` and
  ``any``/``all`` swapped;
- float literals other than 0 multiplied or divided by 1000.

A mutant no test notices (``SURVIVED``) is either equivalent (a threshold with an exact
fallback behind it, a tie-break between equal values, ``0.0 * 1000``) or a branch whose
behaviour no test pins down; the second kind wants a test. A mutant that runs past ``--timeout``
counts as noticed (``timeout``). Not run by the test suite (one survivor costs a full run of the
chosen tests); the results of the audit of 2026-12-07 are in docs/testing.md.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SWAP = {"<": ["<="], "<=": ["<"], ">": [">="], ">=": [">"], "==": ["!="], "!=": ["=="],
        "+": ["-"], "-": ["+"], "*": ["/"], "/": ["*"], "+=": ["-="], "-=": ["+="],
        "and": ["or"], "or": ["and"], "True": ["False"], "False": ["True"],
        "min": ["max"], "max": ["min"], "any": ["all"], "all": ["any"]}
# not copied: large, and no test reads them (.ci/run is read: the README's test command)
SKIP = {".git", ".venv", ".mypy_cache", ".pytest_cache", ".ruff_cache", "runs"}
# a '-' after one of these is a unary minus: it is dropped rather than swapped
UNARY_AFTER = {"(", "[", "{", ",", "=", "return", "**", "*", "/", "+", "-", ":", "<", ">", "==", "<=", ">="}


def mutants(source: str) -> list[tuple[tuple[int, int], tuple[int, int], str, str]]:
    """Every (start, end, old, new) token change of ``source`` (rows 1-based, columns 0-based)."""
    toks = list(tokenize.generate_tokens(io.StringIO(source).readline))
    out = []
    for i, t in enumerate(toks):
        s, prev = t.string, toks[i - 1].string if i else ""
        if t.type in (tokenize.OP, tokenize.NAME) and s in SWAP:
            if s == "-" and prev in UNARY_AFTER:
                out.append((t.start, t.end, s, ""))
            elif not (s in ("*", "**") and prev in ("(", ",")):  # not *args
                out.extend((t.start, t.end, s, r) for r in SWAP[s])
        elif t.type == tokenize.NAME and s == "not":
            out.append((t.start, (t.end[0], t.end[1] + 1), "not ", ""))
        elif t.type == tokenize.NUMBER and ("." in s or "e" in s.lower()) and not s.lower().startswith("0x") \
                and float(s.replace("_", "")) != 0.0:  # 0.0 * 1000 is 0.0
            out.extend((t.start, t.end, s, s + op) for op in ("*1000", "/1000"))
    return out


def run_tests(work: Path, tests: list[str], timeout: float) -> str:
    """``"passed"``, ``"failed"`` or ``"timeout"``: ``pytest -x`` on ``tests`` in ``work``."""
    try:
        p = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
                           cwd=work, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout"
    return "failed" if p.returncode else "passed"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("module", help="a module of convex_sst, e.g. noise or fast")
    ap.add_argument("--count", type=int, default=25, help="mutants to run, chosen at random (default 25)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tests", nargs="+", default=["tests"], help="test files or directories (default: tests)")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per mutant (default 300)")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args(argv)
    path = ROOT / "convex_sst" / f"{args.module}.py"
    if not path.is_file():
        ap.error(f"no module convex_sst/{args.module}.py")
    source = path.read_text()
    lines = source.splitlines(keepends=True)
    chosen = mutants(source)
    random.Random(args.seed).shuffle(chosen)
    chosen = chosen[:args.count]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) / "repo"
        work.mkdir()
        for entry in ROOT.iterdir():  # not .git, .venv, caches, build metadata or example outputs
            if entry.name in SKIP or entry.name.endswith(".egg-info"):
                continue
            if entry.is_dir():
                shutil.copytree(entry, work / entry.name, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy2(entry, work / entry.name)
        target = work / "convex_sst" / f"{args.module}.py"
        if run_tests(work, args.tests, args.timeout) != "passed":
            print("the tests do not pass on the unchanged copy; nothing to audit", file=sys.stderr)
            return 2
        results = []
        for (r0, c0), (_, c1), old, new in chosen:
            line = lines[r0 - 1]
            target.write_text("".join(lines[:r0 - 1] + [line[:c0] + new + line[c1:]] + lines[r0:]))
            start = time.perf_counter()
            status = {"failed": "killed", "passed": "SURVIVED"}.get(run_tests(work, args.tests, args.timeout), "timeout")
            results.append(dict(module=args.module, line=r0, old=old, new=new, status=status,
                                seconds=round(time.perf_counter() - start, 1), source=line.strip()))
            print(f"{status:8s} {args.module}:{r0} {old!r} -> {new!r} | {line.strip()[:100]}", flush=True)
        target.write_text(source)
    counts = {s: sum(r["status"] == s for r in results) for s in ("killed", "timeout", "SURVIVED")}
    print(", ".join(f"{v} {k.lower()}" for k, v in counts.items()), f"of {len(results)} mutants")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
