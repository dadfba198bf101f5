"""Spanning trees with the separable regularizers: the fast path (the decomposition algorithm,
``convex_sst._graphic_matroid``) against the torch interior-point solver, which ``auto`` used
for them before 2026-12-05 (the entropies up to 1 600 equality rows, the quadratic up to 300).

For each case: forward + backward of a batch of utilities ``u ~ scale · N(0, 1)`` on K_n, float64,
median of ``--repeats`` runs after one warm-up, both in the same process; the largest
difference in x and in a vector-Jacobian product, and how many rows the torch solver reported
not converged (warned).

    python benchmarks/spanning_tree_separable.py
    python benchmarks/spanning_tree_separable.py --n 20 26 --temperatures 0.1 --repeats 1
"""

from __future__ import annotations

import argparse
import warnings

import torch

import convex_sst as cs
from setup_lps import median_time  # (this folder)


def run(u: torch.Tensor, w: torch.Tensor, P: cs.Polytope, reg: str, t: float, backend: str):
    uu = u.clone().requires_grad_()
    x = cs.relax(uu, P, reg, t, backend=backend)
    (g,) = torch.autograd.grad((x * w).sum(), uu)
    return x.detach(), g


def timed(fn, repeats: int) -> tuple[float, tuple]:
    fn()  # warm-up (the torch solver builds its standard form once per polytope)
    return median_time(fn, repeats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[8, 12, 16, 20], help="vertices of K_n")
    ap.add_argument("--regularizers", nargs="+", default=["entropy", "binary_entropy", "quadratic"])
    ap.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 0.1])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--scale", type=float, default=2.0, help="standard deviation of the utilities")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    gen = torch.Generator().manual_seed(args.seed)
    print(f"forward + backward, B = {args.batch}, float64, median of {args.repeats} (seconds)\n")
    print("| case | fast path | torch solver | ratio | max abs Δx | max abs Δ VJP | torch rows warned |")
    print("|---|---|---|---|---|---|---|")
    for n in args.n:
        P = cs.load_polytope("spanning_tree", n=n)
        for reg in args.regularizers:
            for t in args.temperatures:
                u = args.scale * torch.randn((args.batch,) + P.shape, generator=gen, dtype=torch.float64)
                w = torch.randn(u.shape, generator=gen, dtype=torch.float64)
                tf, (xf, gf) = timed(lambda: run(u, w, P, reg, t, "fast"), args.repeats)
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always", cs.SolverWarning)
                    tt, (xt, gt) = timed(lambda: run(u, w, P, reg, t, "torch"), args.repeats)
                warned = max((len(str(c.message).split("[")[1].split("]")[0].split(","))
                              for c in caught if "did not converge" in str(c.message)), default=0)
                print(f"| n={n} {reg} t={t:g} | {tf:.3f} | {tt:.3f} | {tt / tf:.1f}× | "
                      f"{(xf - xt).abs().max():.1e} | {(gf - gt).abs().max():.1e} | {warned} of {args.batch} |",
                      flush=True)


if __name__ == "__main__":
    main()
