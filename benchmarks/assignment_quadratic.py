"""The quadratic and the binary entropy on Birkhoff polytopes, matchings and DAG paths, and the
entropy on DAG paths; every separable regularizer on arborescences: Newton's method on the dual
(their fast path since 2026-12-06, the arborescences' quadratic since 2026-12-07,
``convex_sst._assignment_projection``, ``convex_sst._flow_newton`` and
``convex_sst._arborescence_newton``) against the torch
interior-point solver, which ``auto`` used before, and, for the quadratic, Wolfe's
minimum-norm-point algorithm over the argmax (Hungarian, longest path, Chu–Liu/Edmonds;
``projection_by_argmax``, the arborescences' fast path for the quadratic before), called
directly. (The "Newton" column is the fast path: for the quadratic it sends rows not at a vertex
whose logits span more than ``fast._DAG_HULL_SPAN``, ``fast._ASSIGNMENT_HULL_SPAN`` or
``fast._ARBORESCENCE_HULL_SPAN + n / 3`` to that algorithm too; ``--newton-only`` turns that off.)

For each case: forward + backward of a batch of utilities ``u ~ N(0, 1)``, float64, median of
``--repeats`` interleaved rounds (each timed call after an untimed one), all in the same
process; the largest difference of the torch solver's x and vector-Jacobian product from
Newton's, and each method's directional derivative against central differences of Newton's
forward pass (exact on a piece of this piecewise-affine map).

    python benchmarks/assignment_quadratic.py
    python benchmarks/assignment_quadratic.py --cases birkhoff:100 --temperatures 1 --batch 32 --skip-argmax
    python benchmarks/assignment_quadratic.py --regularizers binary_entropy
    python benchmarks/assignment_quadratic.py --cases dag_path:10 dag_path:30 --regularizers quadratic binary_entropy
    python benchmarks/assignment_quadratic.py --cases dag_path:10 dag_path:30 --regularizers entropy
    python benchmarks/assignment_quadratic.py --cases arborescence:10 --regularizers entropy binary_entropy
    python benchmarks/assignment_quadratic.py --cases arborescence:10 arborescence:20 --temperatures 0.3 1 3 10 --batch 32
"""

from __future__ import annotations

import argparse
import math
import warnings

import torch

import convex_sst as cs
from convex_sst.fast import projection_by_argmax
from fast_paths import interleaved  # (this folder)

CASES = ["birkhoff:5", "birkhoff:10", "birkhoff:30", "birkhoff:100", "matching:10:15", "matching:30:50"]


def load(case: str) -> cs.Polytope:
    name, *sizes = case.split(":")
    if name == "dag_path":  # the complete DAG on n vertices, paths from 0 to n − 1
        n = int(sizes[0])
        return cs.load_polytope(name, n=n, edges=[[i, j] for i in range(n) for j in range(i + 1, n)], source=0,
                                target=n - 1)
    return cs.load_polytope(name, **dict(zip(("n", "m"), map(int, sizes))))


def run(u: torch.Tensor, w: torch.Tensor, P: cs.Polytope, t: float, method: str, reg: str):
    uu = u.clone().requires_grad_()
    if method == "argmax":
        x = projection_by_argmax(uu / t, P)
    else:
        x = cs.relax(uu, P, reg, t, backend=method)
    (g,) = torch.autograd.grad((x * w).sum(), uu)
    return x.detach(), g


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=CASES,
                    help="birkhoff:n, matching:n:m, dag_path:n (the complete DAG on n vertices) or arborescence:n")
    ap.add_argument("--temperatures", type=float, nargs="+", default=[0.01, 0.1, 1.0, 10.0])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--regularizers", nargs="+", default=["quadratic"], choices=["quadratic", "binary_entropy", "entropy"],
                    help="entropy: DAG paths and arborescences only (Birkhoff's and matchings' is Sinkhorn, "
                         "benchmarks/sinkhorn_schedule.py)")
    ap.add_argument("--skip-argmax", action="store_true", help="leave out the minimum-norm-point algorithm")
    ap.add_argument("--newton-only", action="store_true",
                    help="the fast path without its low-temperature rows by the minimum-norm-point algorithm")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    if "entropy" in args.regularizers and any(not c.startswith(("dag_path", "arborescence")) for c in args.cases):
        ap.error("--regularizers entropy takes dag_path and arborescence cases only")
    if args.newton_only:
        cs.fast._DAG_HULL_SPAN = cs.fast._ASSIGNMENT_HULL_SPAN = cs.fast._ARBORESCENCE_HULL_SPAN = math.inf
    gen = torch.Generator().manual_seed(args.seed)
    print(f"forward + backward, B = {args.batch}, float64, median of {args.repeats} interleaved rounds (ms; "
          f"threads = {torch.get_num_threads()})\n")
    print("| case | regularizer | t | Newton | torch solver | torch / Newton | min-norm point | min-norm / Newton "
          "| torch: max abs Δx, Δ VJP | Jv − differences: Newton / torch | torch rows warned |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for case in args.cases:
        P = load(case)
        for reg in args.regularizers:
            methods = ["fast", "torch"] + ([] if args.skip_argmax or reg != "quadratic" else ["argmax"])
            for t in args.temperatures:
                u = torch.randn((args.batch,) + P.shape, generator=gen, dtype=torch.float64)
                w = torch.randn(u.shape, generator=gen, dtype=torch.float64)
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always", cs.SolverWarning)
                    out = {m: run(u, w, P, t, m, reg) for m in methods}
                    ms = interleaved({m: (lambda m=m: run(u, w, P, t, m, reg)) for m in methods}, args.repeats)
                warned = max((len(str(c.message).split("[")[1].split("]")[0].split(","))
                              for c in caught if "did not converge" in str(c.message)), default=0)
                h = 1e-6 * t  # the Jacobian is symmetric, so the VJP with w is also J w
                with torch.no_grad():
                    fd = (cs.relax(u + h * w, P, reg, t) - cs.relax(u - h * w, P, reg, t)) / (2 * h)
                (xf, gf), (xt, gt) = out["fast"], out["torch"]
                argmax = f"{ms['argmax']:.1f} | {ms['argmax'] / ms['fast']:.1f}×" if "argmax" in ms else "— | —"
                print(f"| {case} | {reg} | {t:g} | {ms['fast']:.1f} | {ms['torch']:.1f} | {ms['torch'] / ms['fast']:.1f}× | "
                      f"{argmax} | {(xf - xt).abs().max():.1e}, {t * (gf - gt).abs().max():.1e} | "
                      f"{t * (gf - fd).abs().max():.1e} / {t * (gt - fd).abs().max():.1e} | {warned} of {args.batch} |",
                      flush=True)
    print("\nΔ VJP and the differences are scaled by t (the gradient scales with 1 / t).")


if __name__ == "__main__":
    main()
