"""Compare the generic path's solvers (Clarabel vs SCS through diffcp): accuracy and speed.

Errors are measured against closed forms computed independently in float64: softmax
(simplex, entropy), sparsemax (simplex, quadratic), bisection (k-subset, binary entropy) and
Sinkhorn (Birkhoff, entropy). Prints median / max absolute error of X_t over a batch, and the
forward time.

    python benchmarks/generic_solvers.py
"""

from __future__ import annotations

import os
import sys
import time
import warnings

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
import oracles  # noqa: E402

import convex_sst as cs  # noqa: E402

CASES = [
    ("simplex", {"n": 10}, "entropy", lambda th, P: oracles.softmax(th)),
    ("simplex", {"n": 10}, "quadratic", lambda th, P: np.stack([oracles.sparsemax(r) for r in th])),
    ("k_subset", {"n": 10, "k": 3}, "binary_entropy", lambda th, P: np.stack([oracles.lml(r, 3) for r in th])),
    ("birkhoff", {"n": 4}, "entropy",
     lambda th, P: np.stack([oracles.sinkhorn(r.reshape(4, 4)).reshape(-1) for r in th])),
]
SOLVERS = [
    ("clarabel (default)", "clarabel", {}),
    ("scs eps=1e-9 (default)", "scs", {}),
    ("scs eps=1e-12", "scs", {"eps_abs": 1e-12, "eps_rel": 1e-12}),
]


def main(batch: int = 64) -> None:
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    print(f"| polytope | regularizer | t | solver | median err | max err | fwd ms (B={batch}) |")
    print("|---|---|---|---|---|---|---|")
    for name, params, reg, oracle in CASES:
        P = cs.load_polytope(name, **params)
        for t in (1.0, 0.1):
            u = torch.randn((batch,) + P.shape, dtype=torch.float64)
            ref = oracle(u.reshape(batch, -1).numpy() / t, P)
            for label, solver, extra in SOLVERS:
                try:
                    cs.relax(u[:1], P, reg, t, backend="generic", solver=solver, solver_args=extra)
                    t0 = time.perf_counter()
                    x = cs.relax(u, P, reg, t, backend="generic", solver=solver, solver_args=extra)
                    ms = 1e3 * (time.perf_counter() - t0)
                    err = np.abs(x.reshape(batch, -1).numpy() - ref).max(1)
                    print(f"| {name} | {reg} | {t} | {label} | {np.median(err):.1e} | {err.max():.1e} | {ms:.0f} |", flush=True)
                except cs.ConvexSSTError as exc:
                    print(f"| {name} | {reg} | {t} | {label} | failed: {str(exc)[:60]} | | |", flush=True)


if __name__ == "__main__":
    main()
