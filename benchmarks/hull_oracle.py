"""Accuracy of ``relax`` on correlated k-subsets against a 60-digit oracle over the enumerated hull.

Correlated k-subsets with the entropy and the binary entropy are the built-in pairs that
``auto`` sends to the torch interior-point solver (flows through a dynamic program's states,
not unique). The reference is ``tests/oracles.py`` ``hull_relax_jvp_mp``: a barrier method over
the weights of the C(n, k) enumerated vertices in mpmath, then the derivative of that barrier
problem. It uses none of the library's code or float64. ``--regularizers quadratic`` checks
``auto``'s path for the quadratic, Wolfe's minimum-norm-point algorithm.

One markdown row per regularizer, kind of utilities and temperature. Kinds: ``gumbel`` is
N(0, 1) plus Gumbel noise, an SST's perturbed utilities; ``int`` is integers in [-2, 2], which
tie. Columns:

* *x*: the largest error of x;
* *grad > 1e-6*: rows whose directional derivative wᵀ (dx/du) d, times t, differs from the
  oracle's by more than 1e-6, and the largest difference;
* *at kinks*: how many of those rows are at (or within 1e-9 of) a kink, where the oracle's
  one-sided differences (steps of 1e-9 in u/t) disagree with each other by more than 1e-6·t
  relative (then no single derivative is right, and the solver's is one of several);
* *largest off a kink*: the largest difference on the other rows.

    python benchmarks/hull_oracle.py                     # n = 6, k = 3: about 4 minutes
    python benchmarks/hull_oracle.py --n 7 --k 3 --rows 12
    python benchmarks/hull_oracle.py --regularizers quadratic
"""

from __future__ import annotations

import argparse
import itertools
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

import convex_sst as cs

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from oracles import correlated_subsets, hull_relax_jvp_mp  # noqa: E402  (the tests' independent oracle)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=6)
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--rows", type=int, default=24)
    ap.add_argument("--regularizers", nargs="+", default=["entropy", "binary_entropy"],
                    choices=["entropy", "binary_entropy", "quadratic"])
    ap.add_argument("--kinds", nargs="+", default=["gumbel", "int"], choices=["gumbel", "int"])
    ap.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 0.3, 0.1])
    ap.add_argument("--seed", type=int, default=5)
    args = ap.parse_args()
    V = correlated_subsets(args.n, args.k)
    D = V.shape[1]
    P = cs.load_polytope("correlated_k_subset", n=args.n, k=args.k)
    print(f"correlated k-subsets n = {args.n}, k = {args.k} ({len(V)} vertices), {args.rows} rows each, "
          f"backend auto")
    print()
    print("| regularizer | utilities | t | x (largest error) | grad > 1e-6 (largest) | at kinks | largest off a kink |")
    print("|---|---|---|---|---|---|---|")
    for reg, kind, t in itertools.product(args.regularizers, args.kinds, args.temperatures):
        gen = torch.Generator().manual_seed(args.seed)
        shape = (args.rows, D)
        if kind == "int":
            u = torch.randint(-2, 3, shape, generator=gen).to(torch.float64)
        else:
            u = torch.randn(shape, generator=gen, dtype=torch.float64) + cs.Gumbel().sample(shape, gen, torch.float64)
        d, w = torch.randn(2, *shape, generator=gen, dtype=torch.float64)
        uu = u.clone().requires_grad_()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            x = cs.relax(uu, P, reg, t)
        (grad,) = torch.autograd.grad((x * w).sum(), uu)
        jvp = (grad * d).sum(1).numpy()
        x = x.detach().numpy()
        xerr, off, kinks, smooth, worst = 0.0, 0, 0, 0.0, 0.0
        for r in range(args.rows):
            th, dd, ww = u[r].numpy() / t, d[r].numpy() / t, w[r].numpy()
            x_ref, dx = hull_relax_jvp_mp(V, th, dd, reg=reg)
            xerr = max(xerr, float(np.abs(x_ref - x[r]).max()))
            err = t * abs(float(jvp[r]) - float(dx @ ww))
            worst = max(worst, err)
            if err <= 1e-6:
                continue
            off += 1
            h = 1e-9
            plus = float((hull_relax_jvp_mp(V, th + h * dd, dd, reg=reg)[0] - x_ref) @ ww) / h
            minus = float((x_ref - hull_relax_jvp_mp(V, th - h * dd, dd, reg=reg)[0]) @ ww) / h
            if t * abs(plus - minus) > 1e-6 * (1.0 + t * abs(plus)):
                kinks += 1
            else:
                smooth = max(smooth, err)
            print(f"  {reg} {kind} t={t:g} row {r}: t·Δ = {err:.1e}, one-sided differences {plus:.6g} / "
                  f"{minus:.6g}, oracle {float(dx @ ww):.6g}, relax {float(jvp[r]):.6g}", file=sys.stderr)
        rest = f"{smooth:.1e}" if off > kinks else "—"
        print(f"| {reg} | {kind} | {t:g} | {xerr:.1e} | {off} / {args.rows} ({worst:.1e}) | {kinks} | {rest} |", flush=True)


if __name__ == "__main__":
    main()
