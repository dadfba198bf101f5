"""Accuracy of the torch interior-point solver on the flow formulations against second formulations.

The built-in spanning trees and arborescences are flow formulations: auxiliary variables (arcs
and flows) that are not unique, whose bounds and capacity rows make the problems degenerate.
The same polytopes have formulations without auxiliary variables, written as users' configs
(the tests' builders, tests/oracles.py): spanning trees of K_n in their subtour form (one row
per vertex subset), arborescences rooted at 0 in Edmonds' cut form (in-degree 1 off the root,
one arc into every vertex set without the root). The reference is the same solver on those, where its polish applies
(it agrees with OSQP's active-set polish to 2e-11 with the quadratic on tied utilities).

One markdown row per polytope, size, regularizer, kind of utilities (``gauss``: 3·N(0, 1);
``gumbel``: N(0, 1) plus Gumbel noise, an SST's perturbed utilities; ``int``: integers in
[-2, 2], which tie) and temperature:

* *reference*: rows of the reference that converged (the others are left out of the errors);
* *warned*: rows the solver reports as not converged (``relax`` warns), and their largest
  error in x;
* *silent*: rows reported converged but off by more than 1e-8, and the largest error of the
  rows reported converged;
* *grad*: rows whose vector-Jacobian product (a random cotangent, with respect to u/t, that is
  t·∂/∂u) differs from the reference's by more than 1e-6, and the largest difference;
* *ms*: the solve (forward only, float64, one run: a rough cost, not a timing).

    python benchmarks/flow_formulations.py
    python benchmarks/flow_formulations.py --rows 32 --sizes spanning_tree:5 arborescence:4
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import time
from pathlib import Path

import torch

import convex_sst as cs
from convex_sst.regularizers import get_regularizer
from convex_sst.solver import solve_torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from oracles import cut_arborescence_config, subtour_tree_config  # noqa: E402  (the tests' second formulations)

REGULARIZERS = ("entropy", "binary_entropy", "quadratic")


def second_form(name: str, n: int, folder: Path) -> cs.Polytope:
    """The subtour form (spanning trees) or the cut form (arborescences) of K_n, written and loaded
    as a user's config (the builders are the tests' oracles)."""
    text = subtour_tree_config(n) if name == "spanning_tree" else cut_arborescence_config(n)
    path = folder / f"{name}_{n}.yaml"
    path.write_text(text)
    return cs.load_polytope(path)


def largest(err: torch.Tensor, rows: torch.Tensor) -> str:
    """The largest error of the rows ``rows`` (a mask), or — where there are none."""
    return f"{err[rows].max().item():.1e}" if bool(rows.any()) else "—"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", nargs="+", default=["spanning_tree:5", "spanning_tree:6", "arborescence:4",
                                                    "arborescence:5"], help="polytope:n")
    ap.add_argument("--regularizers", nargs="+", default=list(REGULARIZERS), choices=REGULARIZERS)
    ap.add_argument("--kinds", nargs="+", default=["int", "gauss"], choices=["int", "gauss", "gumbel"])
    ap.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 0.3])
    ap.add_argument("--rows", type=int, default=128)
    ap.add_argument("--seed", type=int, default=5)
    args = ap.parse_args()
    print("| polytope | n | regularizer | utilities | t | reference | warned (largest error) "
          "| silent > 1e-8 (largest error) | grad > 1e-6 (largest) | ms |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for spec in args.sizes:
            name, n = spec.split(":")[0], int(spec.split(":")[1])
            P = cs.load_polytope(name, n=n)
            Q = second_form(name, n, Path(tmp))
            for reg, kind, t in itertools.product(args.regularizers, args.kinds, args.temperatures):
                R = get_regularizer(reg)
                gen = torch.Generator().manual_seed(args.seed)
                shape = (args.rows,) + P.shape
                if kind == "int":
                    u = torch.randint(-2, 3, shape, generator=gen).to(torch.float64)
                elif kind == "gauss":
                    u = 3.0 * torch.randn(shape, generator=gen, dtype=torch.float64)
                else:
                    u = torch.randn(shape, generator=gen, dtype=torch.float64) + cs.Gumbel().sample(shape, gen, torch.float64)
                w = torch.randn(shape, generator=gen, dtype=torch.float64)
                theta = (u / t).requires_grad_()
                start = time.perf_counter()
                x, report = solve_torch(theta, P, R)
                ms = 1e3 * (time.perf_counter() - start)
                grad = torch.autograd.grad((x * w).sum(), theta)[0]
                theta_q = (u / t).requires_grad_()
                ref, ref_report = solve_torch(theta_q, Q, R)
                ref_grad = torch.autograd.grad((ref * w).sum(), theta_q)[0]
                x, ref = x.detach(), ref.detach()
                err = (x - ref).flatten(1).abs().amax(1)
                gerr = (grad - ref_grad).flatten(1).abs().amax(1)
                ok = ref_report.converged
                warned, conv = ok & ~report.converged, ok & report.converged
                print(f"| {name} | {n} | {reg} | {kind} | {t:g} | {int(ok.sum())} / {args.rows} "
                      f"| {int(warned.sum())} ({largest(err, warned)}) "
                      f"| {int((conv & (err > 1e-8)).sum())} ({largest(err, conv)}) "
                      f"| {int((ok & (gerr > 1e-6)).sum())} ({largest(gerr, ok)}) | {ms:.0f} |", flush=True)


if __name__ == "__main__":
    main()
