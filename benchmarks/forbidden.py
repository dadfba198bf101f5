"""Cost of forbidden coordinates (``u = -inf``) in ``relax``, against the same structure without them.

For each case, one markdown row (median ms of --repeats interleaved runs, float64, this
machine's CPU, forward only) in a first table of the default routes:

* *no mask*: the structure with every coordinate allowed;
* *forbidden*: the same structure with some coordinates set to ``-inf`` (the same ones in
  every row of the batch, so that the next column exists);
* *smaller structure*: what one would build without masks: the structure on the allowed
  coordinates only (a smaller simplex or k-subset, the arborescence of the real tokens without
  the padding, a graph without the forbidden edges); ``—`` where there is none (Birkhoff);
* the ratio *forbidden / smaller structure* and the largest difference of their values.

A second table times the interior-point solver (``backend="torch"``) with a different random
mask per row (30 % of the entries, none that the row's best structure uses), with its mean
iteration counts, and for spanning trees the largest difference from each row's own smaller
graph.

    python benchmarks/forbidden.py
    python benchmarks/forbidden.py --repeats 3 --batch 8
"""

from __future__ import annotations

import argparse
import math

import torch

import convex_sst as cs
from fast_paths import interleaved  # this folder's: median ms over alternating rounds

NINF = -math.inf


def cases(B: int, gen: torch.Generator):
    """(label, regularizer, P, u, forbidden mask (P.shape), R or None, u restricted to R, and the
    coordinates of P that are R's)."""
    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    for reg in ("entropy", "binary_entropy"):
        P = cs.load_polytope("k_subset", n=100, k=5)
        mask = torch.arange(100) % 3 == 0                     # a third forbidden
        R = cs.load_polytope("k_subset", n=int((~mask).sum()), k=5)
        u = randn(B, 100)
        yield "k_subset n=100, k=5, 34 forbidden", reg, P, u, mask, R, u[:, ~mask], ~mask
    P = cs.load_polytope("simplex", n=1000)
    mask = torch.arange(1000) % 2 == 0
    u = randn(B, 1000)
    yield "simplex n=1000, 500 forbidden", "entropy", P, u, mask, cs.load_polytope("simplex", n=500), u[:, ~mask], ~mask
    n, real = 20, 15                                          # the README's padding recipe
    P, R = cs.load_polytope("arborescence", n=n), cs.load_polytope("arborescence", n=real)
    mask = torch.zeros(n, n, dtype=torch.bool)
    mask[real:, :] = True
    mask[1:real, real:] = True
    u = randn(B, n, n)
    keep = torch.zeros(n, n, dtype=torch.bool)
    keep[:real, :real] = True
    yield f"arborescence n={n}, {n - real} padding tokens", "exp_family", P, u, mask, R, u[:, :real, :real], keep
    n = 12
    P = cs.load_polytope("spanning_tree", n=n)
    i, j = torch.triu_indices(n, n, 1)
    mask = ((i + j) % 3 == 0) & (i > 0)                        # vertex 0 keeps every edge: connected
    R = cs.load_polytope("spanning_tree", n=n, edges=[[a, b] for a, b, m in zip(i.tolist(), j.tolist(),
                                                                              mask.tolist()) if not m])
    u = randn(B, P.size)
    yield f"spanning_tree n={n}, {int(mask.sum())} of {P.size} edges forbidden", "exp_family", P, u, mask, R, u[:, ~mask], ~mask
    P = cs.load_polytope("birkhoff", n=10)
    mask = (torch.arange(10)[:, None] - torch.arange(10)[None, :]) % 3 == 1
    yield "birkhoff n=10, 30 forbidden", "entropy", P, randn(B, 10, 10), mask, None, None, None


def torch_cases(B: int, gen: torch.Generator):
    """(label, regularizer, polytope, u, per-row mask) for the interior-point solver's table."""
    dag = {"n": 8, "edges": [[i, j] for i in range(8) for j in range(i + 1, 8)], "source": 0, "target": 7}
    for name, params, reg in [("matching", {"n": 6, "m": 8}, "quadratic"), ("birkhoff", {"n": 8}, "binary_entropy"),
                              ("spanning_tree", {"n": 8}, "entropy"), ("spanning_tree", {"n": 8}, "binary_entropy"),
                              ("arborescence", {"n": 6}, "entropy"), ("dag_path", dag, "quadratic")]:
        P = cs.load_polytope(name, **params)
        u = torch.randn((B,) + P.shape, generator=gen, dtype=torch.float64)
        mask = (torch.rand((B,) + P.shape, generator=gen) < 0.3) & ~P.argmax(u).bool()
        ps = ", ".join(f"{k}={v}" for k, v in params.items() if not isinstance(v, list))
        yield f"{name} {ps}", reg, P, u, mask


def smaller_graph_diff(x: torch.Tensor, u: torch.Tensor, mask: torch.Tensor, P, reg: str, t: float) -> float:
    """Largest difference of masked spanning-tree rows from each row's graph without its
    forbidden edges."""
    n = P.params["n"]
    edges = torch.triu_indices(n, n, 1).T.tolist()
    diff = 0.0
    for b in range(u.shape[0]):
        keep = ~mask[b]
        R = cs.load_polytope("spanning_tree", n=n, edges=[e for e, k in zip(edges, keep.tolist()) if k])
        diff = max(diff, (x[b, keep] - cs.relax(u[b, keep], R, reg, t, backend="torch")).abs().max().item())
    return diff


def torch_table(B: int, repeats: int, t: float, gen: torch.Generator) -> None:
    from convex_sst._forbidden import fill_forbidden
    from convex_sst.regularizers import get_regularizer
    from convex_sst.solver import solve_torch

    print(f"\nbackend='torch', batch {B}, t = {t}, float64, a random mask per row (30 % of the entries, none in the "
          f"row's best structure); median ms of {repeats} interleaved runs, mean iterations\n")
    print("| case | regularizer | no mask | forbidden | forbidden / no mask | iterations no mask | iterations forbidden "
          "| max diff from the smaller graph |")
    print("|---|---|---|---|---|---|---|---|")
    for label, reg, P, u, mask in torch_cases(B, gen):
        um = u.masked_fill(mask, NINF)
        ms = interleaved({"plain": lambda: cs.relax(u, P, reg, t, backend="torch"),
                          "forbidden": lambda: cs.relax(um, P, reg, t, backend="torch")}, repeats)
        R = get_regularizer(reg)
        its = [solve_torch(u / t, P, R)[1].iterations.double().mean().item(),
               solve_torch(fill_forbidden(u.masked_fill(mask, 0.0) / t, mask), P, R, forbidden=mask)[1]
               .iterations.double().mean().item()]
        diff = "—"
        if P.name == "spanning_tree":
            diff = f"{smaller_graph_diff(cs.relax(um, P, reg, t, backend='torch'), u, mask, P, reg, t):.0e}"
        print(f"| {label} | {reg} | {ms['plain']:.1f} | {ms['forbidden']:.1f} | {ms['forbidden'] / ms['plain']:.2f} | "
              f"{its[0]:.1f} | {its[1]:.1f} | {diff} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--temperature", type=float, default=0.5)
    args = ap.parse_args()
    t = args.temperature
    gen = torch.Generator().manual_seed(0)
    print(f"relax forward, batch {args.batch}, t = {t}, float64; median ms of {args.repeats} interleaved runs\n")
    print("| case | regularizer | no mask | forbidden | smaller structure | forbidden / smaller | max diff |")
    print("|---|---|---|---|---|---|---|")
    for label, reg, P, u, mask, R, ur, keep in cases(args.batch, gen):
        um = u.masked_fill(mask, NINF)
        fns = {"plain": lambda: cs.relax(u, P, reg, t), "forbidden": lambda: cs.relax(um, P, reg, t)}
        if R is not None:
            fns["smaller"] = lambda: cs.relax(ur, R, reg, t)
        ms = interleaved(fns, args.repeats)
        if R is not None:
            x = cs.relax(um, P, reg, t).reshape(u.shape[0], -1)[:, keep.reshape(-1)]
            diff = f"{(x - cs.relax(ur, R, reg, t).reshape(u.shape[0], -1)).abs().max().item():.0e}"
            small, ratio = f"{ms['smaller']:.2f}", f"{ms['forbidden'] / ms['smaller']:.2f}"
        else:
            small = ratio = diff = "—"
        print(f"| {label} | {reg} | {ms['plain']:.2f} | {ms['forbidden']:.2f} | {small} | {ratio} | {diff} |")
    torch_table(args.batch, args.repeats, t, gen)


if __name__ == "__main__":
    main()
