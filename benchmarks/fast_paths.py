"""Benchmark the fast paths against the generic path and against the official SST code's strategies.

Prints two markdown tables (median of --repeats runs, times in ms, ratios measured in the same
run, float64, this machine's CPU):

1. every registered fast path vs the generic cvxpylayers path, forward and forward+backward;
2. the paper-size exp-family paths vs re-implementations of the official code's strategies:
   k-subset marginals by a NumPy DP looped over items and sizes with a central finite-difference
   backward; spanning-tree marginals by ``slogdet`` + ``autograd.grad(create_graph=True)``.

    python benchmarks/fast_paths.py
    python benchmarks/fast_paths.py --repeats 7 --skip-generic
    python benchmarks/fast_paths.py --polytopes spanning_tree --official-repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import numpy as np
import torch

import convex_sst as cs

SIZES = {
    "simplex": {"n": 10},
    "hypercube": {"n": 10},
    "k_subset": {"n": 45, "k": 9},
    "birkhoff": {"n": 10},
    "matching": {"n": 10, "m": 15},
    "spanning_tree": {"n": 10},
    "arborescence": {"n": 10},
    "dag_path": {"n": 10, "edges": [[i, j] for i in range(10) for j in range(i + 1, 10)], "source": 0, "target": 9},
    "correlated_k_subset": {"n": 45, "k": 9},
}


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def interleaved(fns: dict, repeats: int) -> dict:
    """Median ms of each function, run in alternating rounds (so that slow spells of a shared
    machine hit all of them alike); each timed call follows an untimed one of the same function
    (caches and thread pools warm)."""
    times: dict = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            fn()
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: 1e3 * statistics.median(ts) for name, ts in times.items()}


def fwd_and_both_fns(relax_fn, u: torch.Tensor):
    """A forward (no grad) and a forward+backward call of ``relax_fn`` on ``u``."""

    def fwd():
        with torch.no_grad():
            relax_fn(u)

    uu = u.clone().requires_grad_()
    w = torch.randn_like(u)

    def both():
        (relax_fn(uu) * w).sum().backward()

    return fwd, both


def fwd_and_both(relax_fn, u: torch.Tensor, repeats: int) -> tuple[float, float]:
    fwd, both = fwd_and_both_fns(relax_fn, u)
    return median_ms(fwd, repeats), median_ms(both, repeats)


# ---------------------------------------------------------------- official strategies (re-implemented)


def _np_logsumexp(a: np.ndarray) -> np.ndarray:
    m = a.max(axis=-1, keepdims=True)
    return m[..., 0] + np.log(np.exp(a - m).sum(axis=-1))


def _np_topk_marginals(logits: np.ndarray, k: int) -> np.ndarray:
    """The official code's steps: log-space forward and backward messages over (item, subset
    size), one NumPy op per (i, j), "log 0" = −(float32 max); then, per item, the log-sum-exp
    of the paths that skip it and of those that take it, normalized by their sum. (The official
    code takes SciPy's ``logsumexp`` there; current SciPy's costs ~3.6 ms per call on these
    arrays, which would double the baseline, so a plain NumPy one stands in for it.)"""
    B, n = logits.shape
    neg = -float(np.finfo(np.float32).max)
    fwd = np.full((B, n, k + 1), neg)
    fwd[:, 0, 0] = 0.0
    fwd[:, 0, 1] = logits[:, 0]
    for i in range(1, n):
        for j in range(k + 1):
            take = fwd[:, i - 1, j - 1] + logits[:, i] if j > 0 else neg
            fwd[:, i, j] = np.logaddexp(fwd[:, i - 1, j], take)
    bwd = np.full((B, n, k + 1), neg)
    bwd[:, n - 1, k] = 0.0
    for i in range(n - 2, -1, -1):
        for j in range(k + 1):
            take = bwd[:, i + 1, j + 1] + logits[:, i + 1] if j < k else neg
            bwd[:, i, j] = np.logaddexp(bwd[:, i + 1, j], take)
    start = np.full((B, 1, k + 1), neg)
    start[:, :, 0] = 0.0
    before = np.concatenate([start, fwd[:, :-1]], axis=1)    # messages up to item i − 1
    skip = _np_logsumexp(before + bwd)
    take = _np_logsumexp(before[:, :, :-1] + bwd[:, :, 1:]) + logits
    return np.exp(take - np.logaddexp(skip, take))


class _OfficialTopK(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, k, eps):
        ctx.save_for_backward(logits)
        ctx.k, ctx.eps = k, eps
        return torch.from_numpy(_np_topk_marginals(logits.detach().cpu().numpy(), k)).to(logits)

    @staticmethod
    def backward(ctx, g):
        (logits,) = ctx.saved_tensors
        x, d = logits.detach().cpu().numpy(), g.detach().cpu().numpy()
        plus = _np_topk_marginals(x + ctx.eps * d, ctx.k)
        minus = _np_topk_marginals(x - ctx.eps * d, ctx.k)
        return torch.from_numpy((plus - minus) / (2 * ctx.eps)).to(logits), None, None


def official_topk(theta: torch.Tensor, k: int) -> torch.Tensor:
    return _OfficialTopK.apply(theta, k, 1e-2)


def official_tree(theta: torch.Tensor, n: int) -> torch.Tensor:
    """log det of the Laplacian minus one vertex by slogdet; marginals by create_graph autograd."""
    i, j = torch.triu_indices(n, n, 1)
    with torch.enable_grad():
        th = theta if theta.requires_grad else theta.detach().requires_grad_(True)
        c = th.max(-1, keepdim=True).values
        w = torch.exp(th - c)
        W = torch.zeros(th.shape[0], n, n, dtype=th.dtype)
        W[:, i, j] = w
        W[:, j, i] = w
        L = torch.diag_embed(W.sum(-1)) - W
        drop = i[th.argmax(-1)]
        keep = torch.ones(th.shape[0], n, n, dtype=torch.bool)
        keep[torch.arange(th.shape[0]), drop, :] = False
        keep[torch.arange(th.shape[0]), :, drop] = False
        sub = L[keep].view(th.shape[0], n - 1, n - 1)
        logz = (torch.linalg.slogdet(sub)[1] + (n - 1) * c[:, 0]).sum()
        (mu,) = torch.autograd.grad(logz, th, create_graph=theta.requires_grad)
    return mu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32, 128])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--skip-generic", action="store_true")
    ap.add_argument("--polytopes", nargs="+", default=None, help="only these polytopes' fast paths (default: all)")
    ap.add_argument("--official-repeats", type=int, default=31,
                    help="repeats (at least --repeats) of the comparison with the official strategies")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    Bmax = max(args.batches)

    print(f"Fast paths vs the generic path (float64, t = 1, median of {args.repeats}, ms; threads={torch.get_num_threads()})\n")
    head = " | ".join(f"fast fwd B={b} | fast fwd+bwd B={b}" for b in args.batches)
    print(f"| polytope | params | regularizer | {head} | generic fwd+bwd B={Bmax} | generic / fast |")
    print("|" + "---|" * (3 + 2 * len(args.batches) + 2))
    for name, reg in cs.available_fast_paths():
        if name not in SIZES or (args.polytopes is not None and name not in args.polytopes):
            continue
        P = cs.load_polytope(name, **SIZES[name])
        cells = []
        fast_both = None
        for b in args.batches:
            u = torch.randn((b,) + P.shape, dtype=torch.float64)
            f, fb = fwd_and_both(lambda v: cs.relax(v, P, reg, 1.0, backend="fast"), u, args.repeats)
            cells += [f"{f:.3f}", f"{fb:.3f}"]
            fast_both = fb
        gen = ratio = "n/a"
        if not args.skip_generic and cs.regularizers.get_regularizer(reg).cvxpy is not None:
            u = torch.randn((Bmax,) + P.shape, dtype=torch.float64)
            _, g = fwd_and_both(lambda v: cs.relax(v, P, reg, 1.0, backend="generic"), u, max(1, args.repeats // 2))
            gen, ratio = f"{g:.0f}", f"{g / fast_both:.0f}×"
        ps = ", ".join(f"{k}={v}" if not isinstance(v, (list, tuple)) else f"{len(v)} {k}"
                       for k, v in P.params.items() if v is not None and not hasattr(v, "shape"))
        print(f"| {name} | {ps} | {reg} | " + " | ".join(cells) + f" | {gen} | {ratio} |", flush=True)

    reps = max(args.repeats, args.official_repeats)
    print(f"\nExp-family paths vs the official code's strategies (float64 unless marked, B={Bmax}, t = 1, ms; median of {reps}, "
          "ours and theirs in alternating rounds)\n")
    print("| structure | ours fwd | ours fwd+bwd | official fwd | official fwd+bwd | official / ours (fwd+bwd) | max abs diff |")
    print("|---|---|---|---|---|---|---|")

    def compare(ours, theirs, u):
        fns = dict(zip(("of", "ofb"), fwd_and_both_fns(ours, u)))
        fns.update(zip(("bf", "bfb"), fwd_and_both_fns(theirs, u)))
        r = interleaved(fns, reps)
        return r["of"], r["ofb"], r["bf"], r["bfb"]

    P = cs.load_polytope("k_subset", n=45, k=9)
    u = torch.randn(Bmax, 45, dtype=torch.float64)
    of, ofb, bf, bfb = compare(lambda v: cs.relax(v, P, "exp_family", 1.0), lambda v: official_topk(v, 9), u)
    diff = (cs.relax(u, P, "exp_family") - official_topk(u, 9)).abs().max().item()
    print(f"| k_subset n=45 k=9 (NumPy DP + finite differences) | {of:.2f} | {ofb:.2f} | {bf:.2f} | {bfb:.2f} | {bfb / ofb:.1f}× | {diff:.1e} |")
    # float32: the official code's dtype (ours computes in float64 and rounds)
    for temp, dtype in ((1.0, torch.float64), (0.1, torch.float64), (1.0, torch.float32)):
        P = cs.load_polytope("spanning_tree", n=10)
        u = (torch.randn(Bmax, 45, dtype=torch.float64) / temp).to(dtype)
        of, ofb, bf, bfb = compare(lambda v: cs.relax(v, P, "exp_family", 1.0), lambda v: official_tree(v, 10), u)
        diff = (cs.relax(u, P, "exp_family").double() - official_tree(u, 10).double()).abs().max().item()
        tag = "" if dtype == torch.float64 else ", float32"
        print(f"| spanning_tree n=10, logits/{temp:g}{tag} (slogdet + create_graph) | {of:.2f} | {ofb:.2f} | {bf:.2f} | {bfb:.2f} | {bfb / ofb:.2f}× | {diff:.1e} |")


if __name__ == "__main__":
    main()
