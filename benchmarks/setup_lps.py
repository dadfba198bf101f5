"""What the LPs a polytope needs once cost: the variables constant on P (the torch solver's
presolve, ``LinearProgram.constant_variables``) and whether Σx is constant on P (the centring of
θ in ``relax``, ``Polytope._constant_total``). Built-in structures answer the second with their
argmax; a user's config without one uses known points of P and the span of its equality rows
(``LinearProgram.constant_objective``), and only then the two LPs ``max ±Σx``, which are timed
here as the baseline (same process, same model).

User configs are the built-ins' files without their ``argmax:`` line. Prints a markdown table,
median of ``--repeats`` runs, each on a fresh LP model.

    python benchmarks/setup_lps.py
    python benchmarks/setup_lps.py --cases correlated_k_subset:120:20 arborescence:16 --repeats 1
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

import convex_sst as cs
from convex_sst.lp import LinearProgram
from convex_sst.polytope import builtin_config_paths

PARAMS = {"correlated_k_subset": ("n", "k"), "arborescence": ("n",), "spanning_tree": ("n",), "k_subset": ("n", "k"),
          "birkhoff": ("n",), "matching": ("n", "m"), "dag_path": ("n",)}


def parse_case(case: str) -> tuple[str, dict[str, int]]:
    """``"name:param[:param]"`` (parameters in the order of ``PARAMS[name]``) as ``(name, params)``."""
    name, *values = case.split(":")
    return name, dict(zip(PARAMS[name], map(int, values)))


def user_copy(name: str, folder: Path) -> Path:
    text = builtin_config_paths()[name].read_text()
    text = "\n".join(line for line in text.splitlines() if not line.startswith("argmax:"))
    path = folder / f"my_{name}.yaml"
    path.write_text(text.replace(f"name: {name}", f"name: my_{name}", 1))
    return path


def median_time(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=["correlated_k_subset:40:8", "correlated_k_subset:120:20",
                                                   "arborescence:12", "arborescence:16", "spanning_tree:12",
                                                   "k_subset:50:10"],
                    help="name:param[:param] (parameters in the order n, k or n, m)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    folder = Path(tempfile.mkdtemp())
    print("| user config (no argmax) | variables | constant variables | time | Σx constant | time | two LPs | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for case in args.cases:
        name, params = parse_case(case)
        P = cs.load_polytope(user_copy(name, folder), **params)
        c = np.zeros(P.form.num_z)
        c[: P.size] = 1.0

        def constant_variables():
            P._lp = LinearProgram(P.form)
            return P.lp.constant_variables()

        def constant_total():
            constant = constant_variables()  # its points and constants are what the test uses
            t0 = time.perf_counter()
            total = P.lp.constant_objective(c, constant)
            return time.perf_counter() - t0, total

        def two_lps():
            lp = LinearProgram(P.form)
            hi, lo = (float(lp.maximize(s * np.ones(P.size))[1][: P.size].sum()) for s in (1.0, -1.0))
            return hi if abs(hi - lo) <= 1e-9 * (1 + abs(hi)) else None

        t_cv, (mask, _) = median_time(constant_variables, args.repeats)
        runs = [constant_total() for _ in range(args.repeats)]
        t_tot, total = statistics.median(r[0] for r in runs), runs[0][1]
        t_lps, expected = median_time(two_lps, args.repeats)
        assert (total is None) == (expected is None) and (total is None or abs(total - expected) < 1e-9), (total, expected)
        label = ", ".join(f"{k} = {v}" for k, v in params.items())
        shown = "varies" if total is None else f"{total:g}"
        print(f"| {name} {label} | {P.form.num_z} | {int(mask.sum())} | {t_cv:.3f} s | {shown} | {t_tot:.3f} s "
              f"| {t_lps:.3f} s | {t_lps / max(t_tot, 1e-9):.0f}× |")


if __name__ == "__main__":
    main()
