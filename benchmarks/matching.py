"""Entropic partial assignments (``matching``, rows once, columns at most once): the Sinkhorn
fast path against the interior-point solver that ``backend="auto"`` used before it existed.

Prints a markdown table: forward+backward ms at batch --batch, float64, medians of --repeats
alternating rounds (each timed call after an untimed one), and the largest differences of the
two in x and in the gradient of ``(x * w).sum()`` (times t: the gradient scales with 1/t).

    python benchmarks/matching.py
    python benchmarks/matching.py --sizes 4:6 20:30 --temperatures 1 0.1 --repeats 7
"""

from __future__ import annotations

import argparse
import warnings

import torch

import convex_sst as cs
from fast_paths import interleaved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["4:6", "8:12", "10:20", "20:30"], help="n:m pairs")
    ap.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 0.1])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    print(f"Matching x entropy, float64, B = {args.batch}, fwd+bwd, medians of {args.repeats} alternating rounds "
          f"(threads={torch.get_num_threads()})\n")
    print("| n, m | t | Sinkhorn (ms) | torch solver (ms) | torch / Sinkhorn | max |Δx| | max t·|Δgrad| | rows t·|Δgrad| > 1e-5 |")
    print("|---|---|---|---|---|---|---|---|")
    for size in args.sizes:
        n, m = (int(v) for v in size.split(":"))
        P = cs.load_polytope("matching", n=n, m=m)
        for t in args.temperatures:
            u = torch.randn((args.batch, n, m), generator=g, dtype=torch.float64, requires_grad=True)
            w = torch.randn((args.batch, n, m), generator=g, dtype=torch.float64)

            def run(backend):
                def f():
                    x = cs.relax(u, P, "entropy", t, backend=backend)
                    return x, torch.autograd.grad((x * w).sum(), u)[0]
                return f

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a torch-solver row that does not converge: the table shows it
                (xf, gf), (xt, gt) = run("fast")(), run("torch")()
                ms = interleaved({"fast": run("fast"), "torch": run("torch")}, args.repeats)
            dg = (gf - gt).reshape(args.batch, -1).abs().amax(1) * t
            print(f"| {n}, {m} | {t:g} | {ms['fast']:.1f} | {ms['torch']:.1f} | {ms['torch'] / ms['fast']:.1f}× | "
                  f"{(xf - xt).abs().max():.0e} | {dg.max():.0e} | {int((dg > 1e-5).sum())} |", flush=True)


if __name__ == "__main__":
    main()
