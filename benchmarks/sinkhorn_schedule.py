"""When Sinkhorn switches from sweeps to Newton steps on the duals: the forward pass of
``convex_sst.fast.sinkhorn`` with ``newton_after`` sweeps before the first Newton finish (the
convergence test runs every 10 sweeps, so 10 is the earliest), on Gumbel-perturbed logits
``(N(0, 1) + G) / t``, float64 unless given.

Prints a markdown table: ms per call (medians of --repeats alternating rounds), the speed-up of
each setting against the first one, the samples left unconverged (each setting) and the largest
difference of X from the first setting's.

    python benchmarks/sinkhorn_schedule.py
    python benchmarks/sinkhorn_schedule.py --after 50 10 --sizes 10:128 50:32 --temperatures 1 0.1
"""

from __future__ import annotations

import argparse

import torch

from convex_sst.fast import sinkhorn
from fast_paths import interleaved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--after", type=int, nargs="+", default=[50, 10], help="newton_after values; the first is the baseline")
    ap.add_argument("--sizes", nargs="+", default=["5:128", "10:128", "20:128", "50:64", "100:32", "10:15:128"],
                    help="n:B (Birkhoff) or n:m:B (matching, columns at most once)")
    ap.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 0.3, 0.1, 0.03])
    ap.add_argument("--float32", action="store_true")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    dtype = torch.float32 if args.float32 else torch.float64
    base = args.after[0]
    print(f"Sinkhorn forward, {dtype}, medians of {args.repeats} alternating rounds, ms (threads={torch.get_num_threads()})\n")
    print("| n × m | B | t | " + " | ".join(f"after {a}" for a in args.after) + " | "
          + " | ".join(f"{base} / {a}" for a in args.after[1:]) + " | unconverged | max |ΔX| |")
    print("|" + "---|" * (4 + 2 * len(args.after) - 1 + 1))
    for size in args.sizes:
        parts = [int(v) for v in size.split(":")]
        n, m, B = (parts[0], parts[0], parts[1]) if len(parts) == 2 else tuple(parts)
        at_most = m > n
        for t in args.temperatures:
            u = torch.randn(B, n, m, generator=g, dtype=torch.float64)
            gumbel = -torch.log(-torch.log(torch.rand(B, n, m, generator=g, dtype=torch.float64)))
            theta = ((u + gumbel) / t).to(dtype)
            runs = {a: sinkhorn(theta, on_failure="silent", return_error=True, newton_after=a, at_most=at_most)
                    for a in args.after}
            ms = interleaved({a: (lambda a=a: sinkhorn(theta, on_failure="silent", newton_after=a, at_most=at_most))
                              for a in args.after}, args.repeats)
            diff = max(float((runs[a][0] - runs[base][0]).abs().max()) for a in args.after)
            print(f"| {n} × {m} | {B} | {t:g} | " + " | ".join(f"{ms[a]:.2f}" for a in args.after) + " | "
                  + " | ".join(f"{ms[base] / ms[a]:.2f}×" for a in args.after[1:]) + " | "
                  + ", ".join(str(int(runs[a][1].sum())) for a in args.after) + f" | {diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()
