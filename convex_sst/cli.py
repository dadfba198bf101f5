"""The ``convex-sst`` command line: ``list``, ``check FILE``, ``diagnose``, ``demo``, ``--version``."""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Sequence

import numpy as np
import torch
import yaml

from .diagnostics import DEFAULT_TEMPERATURES
from .errors import ConvexSSTError, NotSupportedError, PolytopeError


def _at_least(lo: int):
    """An argparse type: an integer >= ``lo`` (argparse reports anything else as a usage error)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < lo:
            raise argparse.ArgumentTypeError(f"expected an integer >= {lo}, got {value}")
        return value
    return parse


# a period that ends a sentence: followed by a capital, not the end of "et al.", "e.g.", "i.e." or "cf."
_SENTENCE_END = re.compile(r"(?<!\bal)(?<!\be\.g)(?<!\bi\.e)(?<!\bcf)\.\s+(?=[A-Z])")


def first_sentence(text: str) -> str:
    """The first sentence of ``text`` with its whitespace collapsed, ending in one period ("" for
    a blank text)."""
    text = " ".join(text.split())
    end = _SENTENCE_END.search(text)
    return (text if end is None else text[:end.start()]).rstrip(".") + "." if text else ""


def _parse_params(items: Sequence[str]) -> dict:
    params = {}
    for item in items or []:
        if "=" not in item:
            raise SystemExit(f"convex-sst: --param expects NAME=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        params[key.strip()] = yaml.safe_load(value)
    return params


def cmd_list(args: argparse.Namespace) -> int:
    from .polytope import _read_config, _resolve, available_polytopes
    from .regularizers import available_regularizers, get_regularizer
    from .relax import available_fast_paths

    print("Polytopes (load_polytope(name, **params)):")
    for name in available_polytopes():
        cfg = _read_config(_resolve(name)[0])
        ps = ", ".join(
            f"{p.name}={p.default!r}" if not p.required else f"{p.name} (required)" for p in cfg.params.values()
        )
        print(f"  {name:<15} {ps}")
        print(f"  {'':<15} {first_sentence(cfg.description)}")
        print(f"  {'':<15} regularizers: {', '.join(cfg.regularizers) or '-'}; exact argmax: {cfg.argmax or 'LP (HiGHS)'}")
    print("\nRegularizers:")
    for r in available_regularizers():
        print(f"  {r:<15} {get_regularizer(r).description}")
    fast = available_fast_paths()
    print("\nFast paths (polytope, regularizer):")
    print("  " + (", ".join(f"({p}, {r})" for p, r in fast) if fast else "(none registered)"))
    return 0


def _import_modules(names: Sequence[str]) -> None:
    """Import the user's modules named by ``--import`` (run for their registrations)."""
    import importlib

    if names and "" not in sys.path and "." not in sys.path:
        sys.path.insert(0, "")                     # as `python -m` does: the current directory
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise SystemExit(f"convex-sst: --import {name}: {exc}; give a module name (my_regs for "
                             "my_regs.py in the current directory), not a path") from None


def cmd_check(args: argparse.Namespace) -> int:
    from .polytope import load_polytope

    _import_modules(args.imports)
    params = _parse_params(args.param)
    P = load_polytope(args.file, **params)
    form = P.form
    P._check_nonempty_bounded()  # the LPs (built-in polytopes skip them at load)
    print(f"{P.name}: {P.description.splitlines()[0] if P.description else ''}")
    print(f"  source       {P.config.source}")
    print(f"  parameters   {', '.join(f'{k}={v}' for k, v in P.params.items()) or '-'}")
    print(f"  output       {P.config.output_name}: shape {P.shape} ({P.size} entries)")
    for name, (off, shp) in form.layout.items():
        if name != P.config.output_name:
            print(f"  auxiliary    {name}: shape {shp}")
    nb = int(np.isfinite(form.lb).sum() + np.isfinite(form.ub).sum())
    print(f"  constraints  {form.num_eq} equalities, {form.num_ub} inequalities, {nb} bounds over {form.num_z} variables")
    print("  non-empty    yes (LP feasible); bounded: yes")
    gen = torch.Generator().manual_seed(args.seed)
    u = torch.randn((args.directions,) + P.shape, generator=gen, dtype=torch.float64)
    x = P.lp_argmax(u)  # raises PolytopeError if some vertex is fractional
    print(f"  integral     yes: LP argmax over {args.directions} random directions returned 0/1 vertices")
    if P.argmax_name is not None:  # the config's own algorithm must find what the LP finds
        gap = ((x - P.argmax(u)) * u).reshape(args.directions, -1).sum(1)  # ties may pick other vertices
        worst = int(gap.abs().argmax())
        if float(gap[worst].abs()) > 1e-9 * (1 + float(u[worst].abs().sum())):
            raise PolytopeError(f"argmax {P.argmax_name!r} disagrees with the LP on direction {worst} of {args.directions}: "
                                f"its structure scores {float((P.argmax(u[worst]) * u[worst]).sum()):.6g}, the LP's "
                                f"{float((x[worst] * u[worst]).sum()):.6g}; the algorithm is not an exact argmax over this polytope")
        print(f"  argmax       {P.argmax_name}: same scores as the LP on the {args.directions} directions")
    try:
        V = P.vertices(limit=args.max_vertices)
        print(f"  vertices     {V.shape[0]}")
    except ConvexSSTError:
        print(f"  vertices     more than {args.max_vertices} (not enumerated)")
    from .relax import ENUMERATION_LIMIT, _route, exp_family_by_enumeration

    paths = {"fast": "fast path", "torch": "torch solver", "generic": "generic path (cvxpylayers)"}
    failed = []
    for r in P.regularizers:
        try:  # its domain contains P, and relax has a way to solve it (exp_family without a
            # fast path: enumeration, up to a limit)
            kind, fn = _route(P, P.check_regularizer(r), "auto")
            if fn is exp_family_by_enumeration:
                try:
                    count = P.vertices(limit=ENUMERATION_LIMIT).shape[0]
                except ConvexSSTError as exc:
                    raise NotSupportedError(f"no fast path for {P.name!r} with {r!r}, and more than "
                                            f"{ENUMERATION_LIMIT} structures to enumerate; register one with "
                                            f"@convex_sst.register_fast_path({P.name!r}, {r!r})") from exc
                status = f"ok, enumeration of its {count} structures (no fast path)"
            else:
                status = f"ok, {paths[kind]}"
        except ConvexSSTError as exc:
            status = f"NOT OK: {exc}"
            failed.append(r)
        print(f"  regularizer  {r}: {status}")
    if failed:
        print(f"NOT OK: relax cannot use {', '.join(map(repr, failed))} with this polytope (see above)", file=sys.stderr)
        return 1
    print("OK")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(n=args.n, steps=args.steps, seed=args.seed, quiet=args.quiet)
    return 0


def cmd_diagnose(args: argparse.Namespace) -> int:
    import time

    from .diagnostics import diagnose, write_report
    from .polytope import load_polytope

    P = load_polytope(args.polytope, **_parse_params(args.param))
    t0 = time.perf_counter()
    rows = diagnose(P, args.regularizer, temperatures=args.temperatures, num_estimates=args.num_estimates,
                    num_samples=args.num_samples, seed=args.seed)
    title = (f"{P!r}, {args.regularizer}, loss ‖x − c‖²/d, {args.num_estimates} estimates of "
             f"{args.num_samples} samples each")
    paths = write_report(rows, args.out_dir, title, plot=not args.no_plot)
    print(paths[1].read_text())
    print(f"({time.perf_counter() - t0:.1f} s) wrote " + ", ".join(str(p) for p in paths))
    return 0


def version_line() -> str:
    """``convex_sst X (torch Y, numpy Z, cvxpy W, Python V)``: what a bug report needs."""
    from importlib.metadata import PackageNotFoundError, version

    from ._version import __version__

    # torch's own version string names its build (2.4.1+cu121), which the metadata's may not
    deps = [f"torch {torch.__version__}", f"numpy {np.__version__}"]
    for name in ("cvxpy", "cvxpylayers", "highspy"):
        try:
            deps.append(f"{name} {version(name)}")
        except PackageNotFoundError:  # pragma: no cover - install_requires has them all
            deps.append(f"{name} missing")
    py = ".".join(map(str, sys.version_info[:3]))
    return f"convex_sst {__version__} ({', '.join(deps)}, Python {py})"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="convex-sst",
        description="Stochastic softmax tricks over declarative polytopes.",
        formatter_class=argparse.RawDescriptionHelpFormatter,  # the version line unwrapped
    )
    parser.add_argument("--version", action="version", version=version_line(),
                        help="print the versions of convex_sst and its main dependencies, and exit")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("list", help="list built-in polytopes, regularizers and fast paths")
    p.set_defaults(fn=cmd_list)
    p = sub.add_parser("check", help="validate a polytope config and report its size")
    p.add_argument("file", help="config file path, or the name of a built-in polytope")
    p.add_argument("--param", action="append", metavar="NAME=VALUE", help="a parameter (repeatable)")
    p.add_argument("--directions", type=_at_least(0), default=20,
                   help="random LP directions for the integrality check (default: %(default)s)")
    p.add_argument("--max-vertices", type=_at_least(0), default=2000,
                   help="enumerate vertices up to this count (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random directions (default: %(default)s)")
    p.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                   help="import this Python module first (repeatable), e.g. the one that registers the "
                        "regularizers or argmax algorithm your config names; the current directory is searched")
    p.set_defaults(fn=cmd_check)
    p = sub.add_parser("diagnose", help="bias/variance/MSE of gradient estimators vs the exact gradient",
                       description="Bias, variance and MSE of the SST, straight-through, score-function and "
                                   "leave-one-out score-function estimators of the gradient of E[L(X)], "
                                   "L(x) = ‖x − c‖²/d with a random target c, at θ ~ N(0, 1): one row per "
                                   "estimator and temperature. The exact gradient sums over every structure, so "
                                   "the polytope must be small.")
    p.add_argument("--polytope", default="k_subset",
                   help="a structure with an exact SMT distribution (default: %(default)s)")
    p.add_argument("--param", action="append", metavar="NAME=VALUE",
                   help="a polytope parameter (repeatable); the polytope's defaults otherwise")
    p.add_argument("--regularizer", default="exp_family", help="the SST's regularizer (default: %(default)s)")
    p.add_argument("--temperatures", type=float, nargs="+", default=list(DEFAULT_TEMPERATURES),
                   help="SST temperatures, one row each (default: %s)" % " ".join(map(str, DEFAULT_TEMPERATURES)))
    p.add_argument("--num-estimates", type=_at_least(2), default=400,
                   help="independent gradient estimates per row (default: %(default)s)")
    p.add_argument("--num-samples", type=_at_least(1), default=4,
                   help="samples averaged in each estimate (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of θ, c and the noise (default: %(default)s)")
    p.add_argument("--out-dir", default="diagnostics",
                   help="where diagnostics.csv, diagnostics.md and diagnostics.png go (default: %(default)s)")
    p.add_argument("--no-plot", action="store_true", help="write no diagnostics.png")
    p.set_defaults(fn=cmd_diagnose)
    p = sub.add_parser("demo", help="learn a distribution over spanning trees through an SST layer")
    p.add_argument("--n", type=_at_least(3), default=8, help="number of vertices (default: %(default)s)")
    p.add_argument("--steps", type=_at_least(1), default=150, help="training steps (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the hidden tree and the noise (default: %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(fn=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        rc = args.fn(args)
        sys.stdout.flush()  # a closed pipe (``convex-sst list | head -1``) raises here, not at exit
        return rc
    except ConvexSSTError as exc:
        print(f"convex-sst {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # the reader went away: stop quietly, as Unix tools do, and keep Python's final flush
        # from reporting the same broken pipe again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
