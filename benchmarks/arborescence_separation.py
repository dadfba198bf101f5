"""The entropies on arborescences at larger n: the separation's minimum cuts, and the order in
which Cunningham's partition takes the vertices (``_arborescence_newton._LOW_DEGREE_FIRST``:
from 15 vertices on, by increasing weight in ``y = x + xᵀ``; below, as given).

For each case: forward + backward of a batch of utilities ``u ~ scale · N(0, 1)`` on the
arborescences of n vertices (root 0), float64, with the vertices in the given order and by
weight, alternating in the same process, median of ``--repeats`` runs after one warm-up each;
then one more run of each that counts the minimum cuts and the time spent in them, and the
largest difference in x between the two orders (the partition is exact in either: rounding).

    python benchmarks/arborescence_separation.py
    python benchmarks/arborescence_separation.py --n 20 --temperatures 0.1 --repeats 1
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import convex_sst as cs
from convex_sst import _arborescence_newton, _graphic_matroid

ORDERS = {"given": 10**9, "weight": 0}  # _LOW_DEGREE_FIRST: never reorder, always reorder


def relax(u: torch.Tensor, w: torch.Tensor, P: cs.Polytope, reg: str, t: float) -> torch.Tensor:
    uu = u.clone().requires_grad_()
    x = cs.relax(uu, P, reg, t)
    torch.autograd.grad((x * w).sum(), uu)
    return x.detach()


def counted(fn) -> tuple[torch.Tensor, int, float, float]:
    """``fn()`` with the minimum cuts counted and timed: (x, cuts, seconds in cuts, seconds)."""
    cut = _graphic_matroid._min_cut_source_side
    tally = [0, 0.0]

    def timed_cut(*args):
        t0 = time.perf_counter()
        side = cut(*args)
        tally[0] += 1
        tally[1] += time.perf_counter() - t0
        return side

    _graphic_matroid._min_cut_source_side = timed_cut
    try:
        t0 = time.perf_counter()
        x = fn()
        total = time.perf_counter() - t0
    finally:
        _graphic_matroid._min_cut_source_side = cut
    return x, int(tally[0]), float(tally[1]), total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[12, 20, 30, 40], help="vertices")
    ap.add_argument("--regularizers", nargs="+", default=["entropy", "binary_entropy"],
                    choices=["entropy", "binary_entropy"])
    ap.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 0.1])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--scale", type=float, default=1.0, help="standard deviation of the utilities")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    gen = torch.Generator().manual_seed(args.seed)
    default = _arborescence_newton._LOW_DEGREE_FIRST
    print(f"forward + backward, B = {args.batch}, float64, median of {args.repeats} (ms); "
          f"the default takes the vertices by weight from n = {default} on\n")
    print("| case | given order | by weight | given / weight | cuts (given, by weight) "
          "| share of the time in cuts (given, by weight) | max abs Δx |")
    print("|---|---|---|---|---|---|---|")
    try:
        for n in args.n:
            P = cs.load_polytope("arborescence", n=n)
            for reg in args.regularizers:
                for t in args.temperatures:
                    u = args.scale * torch.randn((args.batch,) + P.shape, generator=gen, dtype=torch.float64)
                    w = torch.randn(u.shape, generator=gen, dtype=torch.float64)
                    times: dict[str, list[float]] = {k: [] for k in ORDERS}
                    for name, first in ORDERS.items():  # warm-up
                        _arborescence_newton._LOW_DEGREE_FIRST = first
                        relax(u, w, P, reg, t)
                    for _ in range(args.repeats):
                        for name, first in ORDERS.items():
                            _arborescence_newton._LOW_DEGREE_FIRST = first
                            t0 = time.perf_counter()
                            relax(u, w, P, reg, t)
                            times[name].append(time.perf_counter() - t0)
                    runs = {}
                    for name, first in ORDERS.items():
                        _arborescence_newton._LOW_DEGREE_FIRST = first
                        runs[name] = counted(lambda: relax(u, w, P, reg, t))
                    tg, tw = (statistics.median(times[k]) for k in ORDERS)
                    (xg, cg, sg, ag), (xw, cw, sw, aw) = runs["given"], runs["weight"]
                    print(f"| n={n} {reg} t={t:g} | {1e3 * tg:.1f} | {1e3 * tw:.1f} | {tg / tw:.2f}× "
                          f"| {cg}, {cw} | {100 * sg / ag:.0f} %, {100 * sw / aw:.0f} % "
                          f"| {(xg - xw).abs().max().item():.1e} |", flush=True)
    finally:
        _arborescence_newton._LOW_DEGREE_FIRST = default


if __name__ == "__main__":
    main()
