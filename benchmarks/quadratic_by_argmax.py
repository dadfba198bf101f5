"""The quadratic relaxation by Wolfe's minimum-norm-point algorithm (``convex_sst._min_norm_point``,
the fast path of arborescences and correlated k-subsets since 2026-12-06; for arborescences,
since 2026-12-07, of their rows at low temperature only, ``benchmarks/assignment_quadratic.py``)
against the torch
interior-point solver, which ``auto`` used for them up to 300 equality rows (above: cvxpylayers).
Birkhoff and matchings are measured too, through the same function called directly: they kept
the torch solver, and these numbers are why (they now have Newton's method on the dual,
``benchmarks/assignment_quadratic.py``).

For each case: forward + backward of a batch of utilities ``u ~ N(0, 1)``, float64, median of
``--repeats`` runs after one warm-up, both in the same process; the largest difference in x and
in a vector-Jacobian product, the directional derivative of each against central differences
of the minimum-norm-point forward (exact on a piece of this piecewise-affine map), and how many
rows the torch solver reported not converged (warned).

    python benchmarks/quadratic_by_argmax.py
    python benchmarks/quadratic_by_argmax.py --cases arborescence:24 --temperatures 1 --repeats 1
"""

from __future__ import annotations

import argparse
import warnings

import torch

import convex_sst as cs
from convex_sst.fast import projection_by_argmax
from setup_lps import median_time  # (this folder)

CASES = ["arborescence:6", "arborescence:10", "arborescence:16", "correlated_k_subset:30:6",
         "correlated_k_subset:45:9", "birkhoff:10", "matching:10:15"]


def load(case: str) -> cs.Polytope:
    name, *sizes = case.split(":")
    keys = {"correlated_k_subset": ("n", "k"), "matching": ("n", "m")}.get(name, ("n",))
    return cs.load_polytope(name, **{k: int(v) for k, v in zip(keys, sizes)})


def run(u: torch.Tensor, w: torch.Tensor, P: cs.Polytope, t: float, backend: str):
    uu = u.clone().requires_grad_()
    if backend == "fast":  # called directly: Birkhoff and matchings do not route here
        x = projection_by_argmax(uu / t, P)
    else:
        x = cs.relax(uu, P, "quadratic", t, backend=backend)
    (g,) = torch.autograd.grad((x * w).sum(), uu)
    return x.detach(), g


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=CASES, help="name:sizes (n; n:k; n:m)")
    ap.add_argument("--temperatures", type=float, nargs="+", default=[0.1, 1.0, 3.0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    gen = torch.Generator().manual_seed(args.seed)
    print(f"forward + backward, B = {args.batch}, float64, median of {args.repeats} (seconds)\n")
    print("| case | t | min-norm point | torch solver | ratio | max abs Δx | max abs Δ VJP "
          "| Jv − differences: min-norm point / torch | torch rows warned |")
    print("|---|---|---|---|---|---|---|---|---|")
    for case in args.cases:
        P = load(case)
        for t in args.temperatures:
            u = torch.randn((args.batch,) + P.shape, generator=gen, dtype=torch.float64)
            w = torch.randn(u.shape, generator=gen, dtype=torch.float64)
            run(u, w, P, t, "fast")  # warm-up
            tf, (xf, gf) = median_time(lambda: run(u, w, P, t, "fast"), args.repeats)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", cs.SolverWarning)
                run(u, w, P, t, "torch")  # warm-up: the solver builds its standard form once
                tt, (xt, gt) = median_time(lambda: run(u, w, P, t, "torch"), args.repeats)
            warned = max((len(str(c.message).split("[")[1].split("]")[0].split(","))
                          for c in caught if "did not converge" in str(c.message)), default=0)
            h = 1e-6  # the Jacobian is symmetric, so the VJP with w is also J w
            with torch.no_grad():
                fd = (projection_by_argmax((u + h * w) / t, P) - projection_by_argmax((u - h * w) / t, P)) / (2 * h)
            print(f"| {case} | {t:g} | {tf:.3f} | {tt:.3f} | {tt / tf:.2f}× | {(xf - xt).abs().max():.1e} | "
                  f"{(gf - gt).abs().max():.1e} | {(gf - fd).abs().max():.1e} / {(gt - fd).abs().max():.1e} | "
                  f"{warned} of {args.batch} |", flush=True)


if __name__ == "__main__":
    main()
