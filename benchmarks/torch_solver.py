"""Benchmark the batched torch interior-point solver (backend="torch") against cvxpylayers.

cvxpylayers runs at its best measured setting (Clarabel through diffcp, tight tolerances; the
project's default). Prints, per polytope and regularizer: forward+backward times at each batch
size, the ratio at the largest batch, and the largest value and gradient differences between
the two (the reference for those is the fast path where one exists, which is exact).

    python benchmarks/torch_solver.py
    python benchmarks/torch_solver.py --targets      # only the issue's three target problems
    python benchmarks/torch_solver.py --convergence  # only the table of per-row convergence
    python benchmarks/torch_solver.py --far-above    # only the tables of entries far above (and below) the others

The last table counts, per problem and temperature, the rows of a batch of 128 (3 seeds) that
the solver reports as converged (KKT residual ≤ 10·tol), inaccurate (stalled below 1e-8) or
not converged (stalled above; ``relax`` warns with their indices).
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

import convex_sst as cs
from convex_sst.regularizers import get_regularizer
from convex_sst.relax import available_fast_paths

SMALL = {"simplex": {"n": 10}, "hypercube": {"n": 10}, "k_subset": {"n": 10, "k": 3}, "birkhoff": {"n": 5},
         "matching": {"n": 4, "m": 6}, "spanning_tree": {"n": 5}, "arborescence": {"n": 4}, "dag_path": {}}
TARGETS = [("spanning_tree", {"n": 8}, "binary_entropy"), ("k_subset", {"n": 100, "k": 10}, "binary_entropy"),
           ("birkhoff", {"n": 10}, "entropy")]


def run(P, reg, backend, u, w):
    """One forward+backward: (ms, x, ∂(w·x)/∂u)."""
    uu = u.clone().requires_grad_()
    t0 = time.perf_counter()
    x = cs.relax(uu, P, reg, 1.0, backend=backend)
    (g,) = torch.autograd.grad((x * w).sum(), uu)
    return 1e3 * (time.perf_counter() - t0), x.detach(), g


def compare(P, reg, u, w, repeats):
    """Medians of the torch solver and cvxpylayers, timed in alternating rounds (so that slow
    spells of a shared machine hit both alike). Each timed torch call follows an untimed one:
    right after a cvxpylayers call (its solver threads, its allocations) the next torch call
    on this machine runs up to 1.6x slower, which a training loop calling one backend never
    sees."""
    tt, tg = [], []
    for _ in range(repeats):
        run(P, reg, "torch", u, w)
        dt, xt, gt = run(P, reg, "torch", u, w)
        dg, xg, gg = run(P, reg, "generic", u, w)
        tt.append(dt)
        tg.append(dg)
    return statistics.median(tt), xt, gt, statistics.median(tg), xg, gg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32, 128])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--targets", action="store_true", help="only the three target problems, batch 128")
    ap.add_argument("--convergence", action="store_true", help="only the per-row convergence table")
    ap.add_argument("--far-above", action="store_true", help="only the tables of an entry far above the others, alone and with one far below")
    args = ap.parse_args()
    if args.far_above:
        far_above_table()
        forced_and_masked_table()
        return
    warnings.simplefilter("ignore")
    if args.convergence:
        convergence_table()
        return
    torch.manual_seed(0)
    cases = list(TARGETS) if args.targets else [
        (n, p, r) for n, p in SMALL.items() for r in cs.load_polytope(n, **p).regularizers if get_regularizer(r).separable
    ] + TARGETS
    batches = [128] if args.targets else args.batches
    print(f"torch solver vs cvxpylayers (Clarabel), float64, t = 1, fwd+bwd ms, median of {args.repeats} "
          "(torch and cvxpylayers in alternating rounds, each timed torch call after an untimed one) "
          f"({'also' if args.targets else '1'} for the largest problems)\n")
    head = " | ".join(f"torch B={b} | cvxpylayers B={b}" for b in batches)
    print(f"| polytope | params | regularizer | rows | {head} | speed-up B={batches[-1]} | max |Δx| | max |Δgrad| |")
    print("|" + "---|" * (4 + 2 * len(batches) + 3))
    for name, params, reg in cases:
        P = cs.load_polytope(name, **params)
        rows = P.form.num_eq + P.form.num_ub
        cells, last = [], None
        for b in batches:
            u = torch.randn((b,) + P.shape, dtype=torch.float64)
            w = torch.randn((b,) + P.shape, dtype=torch.float64)
            reps = 1 if (rows > 200 or P.size > 60) and not args.targets else args.repeats
            cs.relax(u[:1], P, reg, 1.0, backend="torch")
            cs.relax(u[:1], P, reg, 1.0, backend="generic")
            tt, xt, gt, tg, xg, gg = compare(P, reg, u, w, reps)
            cells += [f"{tt:.1f}", f"{tg:.0f}"]
            last = (tt, tg, xt, gt, xg, gg, u, w)
        tt, tg, xt, gt, xg, gg, u, w = last
        if (name, reg) in cs.available_fast_paths():  # exact reference
            _, xr, gr = run(P, reg, "fast", u, w)
            err = f"torch {float((xt - xr).abs().max()):.0e} / cvx {float((xg - xr).abs().max()):.0e}"
            gerr = f"torch {float((gt - gr).abs().max()):.0e} / cvx {float((gg - gr).abs().max()):.0e}"
        else:
            err = f"{float((xt - xg).abs().max()):.0e} (between them)"
            gerr = f"{float((gt - gg).abs().max()):.0e} (between them)"
        ps = ", ".join(f"{k}={v}" for k, v in P.params.items() if v is not None and not hasattr(v, "shape"))
        print(f"| {name} | {ps} | {reg} | {rows} | " + " | ".join(cells) + f" | {tg / tt:.1f}× | {err} | {gerr} |", flush=True)
    if not args.targets:
        convergence_table()


CONVERGENCE = [("spanning_tree", {"n": 8}, r) for r in ("entropy", "binary_entropy", "quadratic")] + [
    ("arborescence", {"n": 5}, r) for r in ("entropy", "binary_entropy", "quadratic")] + [
    ("k_subset", {"n": 100, "k": 10}, "binary_entropy"), ("birkhoff", {"n": 10}, "entropy")]


def convergence_table(seeds: int = 3, batch: int = 128) -> None:
    from convex_sst.solver import solve_torch

    print(f"\nPer-row convergence of the torch solver (float64, default tol, B = {batch}, {seeds} seeds): "
          "converged / inaccurate / not converged, mean and largest iteration count\n")
    print("| polytope | params | regularizer | t = 1 | iterations | t = 0.1 | iterations |")
    print("|---|---|---|---|---|---|---|")
    for name, params, reg in CONVERGENCE:
        P = cs.load_polytope(name, **params)
        cells = []
        for t in (1.0, 0.1):
            counts = {"converged": 0, "inaccurate": 0, "max_iter": 0, "nan": 0}
            its = []
            for seed in range(seeds):
                g = torch.Generator().manual_seed(seed)
                u = torch.randn((batch,) + P.shape, generator=g, dtype=torch.float64) / t
                _, rep = solve_torch(u, P, get_regularizer(reg))
                for st in rep.status:
                    counts[st] += 1
                its += rep.iterations.tolist()
            cells += [f"{counts['converged']} / {counts['inaccurate']} / {counts['max_iter'] + counts['nan']}",
                      f"{statistics.mean(its):.1f}, {max(its)}"]
        ps = ", ".join(f"{k}={v}" for k, v in P.params.items() if v is not None and not hasattr(v, "shape"))
        print(f"| {name} | {ps} | {reg} | " + " | ".join(cells) + " |", flush=True)


FAR_ABOVE = [("simplex", {"n": 6}), ("k_subset", {"n": 6, "k": 2}), ("hypercube", {"n": 6}), ("birkhoff", {"n": 4}),
             ("matching", {"n": 3, "m": 4}), ("dag_path", {"n": 5}), ("spanning_tree", {"n": 4}),
             ("arborescence", {"n": 4})]


def _relax_counting_warnings(u: torch.Tensor, P: cs.Polytope, reg: str, backend: str) -> tuple[torch.Tensor, int]:
    """``relax`` of the rows ``u: (B, size)`` at t = 1, flattened, and how many rows it warned about."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", cs.SolverWarning)
        x = cs.relax(u.reshape((u.shape[0],) + P.shape), P, reg, 1.0, backend=backend)
    warned = [w for w in caught if issubclass(w.category, cs.SolverWarning)]
    rows = int(str(warned[0].message).split("element(s) [")[1].count(",") + 1) if warned else 0
    return x.reshape(u.shape[0], -1), rows


def _cell(ref: torch.Tensor, x: torch.Tensor, warned: int) -> str:
    """max |x − ref|, and the rows warned about."""
    return f"{(x - ref).abs().max().item():.1e}" + (f" ({warned} warned)" if warned else "")


def far_above_table(batch: int = 16) -> None:
    """θ_j = u_j + c (one entry forced, t = 1): max |Δx| over the batch against the same problem at
    c = 200 (the same solution to e^-100), and how many rows ``relax`` warned about."""
    print(f"\nOne entry far above the others (torch solver, float64, t = 1, B = {batch}): max |Δx| against "
          "c = 200, and the rows warned about (of the batch)\n")
    offsets = (1e3, 1e6, 1e9)
    print("| polytope | regularizer | " + " | ".join(f"c = {c:.0e}" for c in offsets) + " |")
    print("|---|---|" + "---|" * len(offsets))
    for name, params in FAR_ABOVE:
        P = cs.load_polytope(name, **params)
        for reg in ("entropy", "binary_entropy", "quadratic"):
            g = torch.Generator().manual_seed(0)
            u = torch.randn(batch, P.size, generator=g, dtype=torch.float64)

            def relax(c: float) -> tuple[torch.Tensor, int]:
                uu = u.clone()
                uu[:, 1] += c
                return _relax_counting_warnings(uu, P, reg, "torch")

            ref, _ = relax(200.0)
            cells = [_cell(ref, *relax(c)) for c in offsets]
            print(f"| {name} | {reg} | " + " | ".join(cells) + " |", flush=True)


def forced_and_masked_table(batch: int = 16) -> None:
    """θ_j = u_j + c and θ_k = u_k − c in each row (j forced, k masked; a structure has j and
    avoids k), every pair through ``backend="auto"`` (fast paths included): max |Δx| over the
    batch against the same rows at u_j + 200, u_k − 300, and how many rows ``relax`` warned about."""
    print(f"\nA forced and a masked entry in one row (backend auto, float64, t = 1, B = {batch}): max |Δx| "
          "against u_j + 200, u_k - 300, and the rows warned about (of the batch)\n")
    offsets = (1e3, 1e6, 1e9)
    print("| polytope | regularizer | path | " + " | ".join(f"c = {c:.0e}" for c in offsets) + " |")
    print("|---|---|---|" + "---|" * len(offsets))
    fast_paths = set(available_fast_paths())
    for name, params in FAR_ABOVE:
        P = cs.load_polytope(name, **params)
        g = torch.Generator().manual_seed(0)
        u = torch.randn(batch, P.size, generator=g, dtype=torch.float64)
        forced = torch.ones(batch, dtype=torch.long)
        lifted = u.clone()
        lifted[:, 1] += 200.0
        best = P.argmax(lifted.reshape((batch,) + P.shape)).reshape(batch, -1)
        # the last coordinate that row's best structure avoids (the cube's may use all of them)
        masked = torch.tensor([([P.size - 1] + (best[b] == 0).nonzero()[:, 0].tolist())[-1] for b in range(batch)])
        rows = torch.arange(batch)
        for reg in P.regularizers:
            path = "fast" if (name, reg) in fast_paths else "torch"

            def relax(up: float, down: float) -> tuple[torch.Tensor, int]:
                uu = u.clone()
                uu[rows, forced] += up
                uu[rows, masked] -= down
                return _relax_counting_warnings(uu, P, reg, "auto")

            ref, _ = relax(200.0, 300.0)
            cells = [_cell(ref, *relax(c, c)) for c in offsets]
            print(f"| {name} | {reg} | {path} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
