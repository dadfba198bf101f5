"""Benchmark the generic (cvxpylayers) SST path: compile time, forward and forward+backward.

Prints a markdown table: median of --repeats runs, per built-in polytope and batch size.

    python benchmarks/generic.py              # default sizes, one regularizer per polytope
    python benchmarks/generic.py --all-regularizers --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

import convex_sst as cs
from convex_sst.generic import GenericLayer
from convex_sst.regularizers import get_regularizer

SIZES = {
    "simplex": {"n": 10},
    "hypercube": {"n": 10},
    "k_subset": {"n": 10, "k": 3},
    "birkhoff": {"n": 5},
    "matching": {"n": 4, "m": 6},
    "spanning_tree": {"n": 6},
    "arborescence": {"n": 5},
    "dag_path": {},
}


def timeit(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32, 128])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--all-regularizers", action="store_true")
    ap.add_argument("--polytopes", nargs="+", default=list(SIZES))
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    print(f"generic path (cvxpylayers + diffcp, Clarabel), float64, median of {args.repeats}; times in ms")
    print("| polytope | params | regularizer | variables (x + aux) | compile | " +
          " | ".join(f"fwd B={b} | fwd+bwd B={b}" for b in args.batches) + " |")
    print("|" + "---|" * (5 + 2 * len(args.batches)))
    for name in args.polytopes:
        P = cs.load_polytope(name, **SIZES[name])
        regs = P.regularizers if args.all_regularizers else P.regularizers[:1]
        for reg in regs:
            t0 = time.perf_counter()
            GenericLayer(P, get_regularizer(reg))
            compile_ms = 1e3 * (time.perf_counter() - t0)
            cells = []
            for b in args.batches:
                u = torch.randn((b,) + P.shape, dtype=torch.float64)
                cs.relax(u, P, reg, 1.0, backend="generic")  # warm-up (compiles the cached layer)
                fwd = timeit(lambda: cs.relax(u, P, reg, 1.0, backend="generic"), args.repeats)
                uu = u.clone().requires_grad_()

                def fb():
                    cs.relax(uu, P, reg, 1.0, backend="generic").sum().backward()

                both = timeit(fb, args.repeats)
                cells += [f"{1e3 * fwd:.1f}", f"{1e3 * both:.1f}"]
            ps = ", ".join(f"{k}={v}" for k, v in P.params.items() if v is not None and not hasattr(v, "shape"))
            print(f"| {name} | {ps} | {reg} | {P.size} + {P.form.num_aux} | {compile_ms:.0f} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
