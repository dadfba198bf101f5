"""The k-subset exponential family (``relax(u, k_subset(n, k), "exp_family")``) by its routes.

For each (n, k), one markdown row: median ms of a forward + backward pass (a VJP) over a batch
of logits ``scale · N(0, 1)``, float64, this machine's CPU, --repeats interleaved runs, by

* *DFT*: the characteristic function of the tilted Bernoulli vector's size (``_KSubsetDFT``);
* *tree*: the linear-space product tree of the Bernoulli laws ``q_i + p_i z`` (of the
  complements' laws ``p_i + q_i z`` for k > n/2);
* *log-space tree*: ``μ = ∇ log e_k(e^θ)`` by autograd through the log-space product tree, the
  baseline: exact for any range, and what the product tree handed its rows to before
  (scaled by the k largest weights, it overflowed once C(n, k) did, e.g. n = 500, k = 250);
  skipped (``—``) where n·k > --log-max;
* which route ``relax`` takes, the log-space tree's time over it, and the largest difference
  of marginals and of VJPs between the routes.

With ``--api``, instead: what a user calls, ``relax(u, P, "exp_family")`` and
``log_partition(u, P)`` on float32 ``u`` (forward + backward, median of --repeats) and the peak
resident memory of a fresh process per size (sizes default to the large-k cases that once ran
out of memory).

    python benchmarks/k_subset.py
    python benchmarks/k_subset.py --batch 4 --repeats 1 --sizes 100:10 300:150
    python benchmarks/k_subset.py --api --repeats 3
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import time

import torch

import convex_sst as cs

from convex_sst import fast
from fast_paths import interleaved  # this folder's: median ms over alternating rounds

SIZES = ["128:10", "128:64", "256:16", "256:128", "500:10", "500:50", "500:250", "1000:10", "1000:50",
         "1000:200", "1000:500", "1000:990", "2000:20", "2000:200", "2000:1990"]
API_SIZES = ["1000:50", "1000:500", "2000:1000"]


def routes(k: int):
    return {"dft": lambda x: fast._k_subset_dft(x, k), "tree": lambda x: fast._k_subset_tree(x, k),
            "log": lambda x: fast._autograd_gradient(lambda y: fast._log_e_k_banded(y, k), x)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--scale", type=float, default=2.0, help="logits are scale · N(0, 1)")
    ap.add_argument("--sizes", nargs="+", metavar="N:K", help="default: %s; with --api: %s"
                    % (" ".join(SIZES), " ".join(API_SIZES)))
    ap.add_argument("--log-max", type=int, default=250_000, help="largest n·k timed by the log-space tree")
    ap.add_argument("--api", action="store_true", help="time relax and log_partition, one process per size")
    ap.add_argument("--one", metavar="N:K", help=argparse.SUPPRESS)  # --api's worker
    args = ap.parse_args()
    if args.one:
        api_row(args.one, args.batch, args.repeats)
        return
    if args.api:
        print(f"relax(u, k_subset(n, k), 'exp_family') and log_partition(u, ·), forward + backward, "
              f"batch {args.batch}, u float32 N(0, 1); median ms of {args.repeats}; peak memory of the process\n")
        print("| n, k | relax exp_family | log_partition | peak memory |\n|---|---|---|---|", flush=True)
        for size in args.sizes or API_SIZES:
            subprocess.run([sys.executable, __file__, "--one", size, "--batch", str(args.batch),
                            "--repeats", str(args.repeats)], check=True)
        return
    gen = torch.Generator().manual_seed(0)
    print(f"forward + backward, batch {args.batch}, logits {args.scale} · N(0, 1), float64; "
          f"median ms of {args.repeats} interleaved runs\n")
    print("| n | k | DFT | tree | log-space tree | relax takes | log-space / relax | max diff μ | max diff VJP |")
    print("|---|---|---|---|---|---|---|---|---|")
    for size in args.sizes or SIZES:
        n, k = (int(v) for v in size.split(":"))
        u = args.scale * torch.randn(args.batch, n, generator=gen, dtype=torch.float64)
        w = torch.randn(args.batch, n, generator=gen, dtype=torch.float64)
        fns = routes(k)
        if n * k > args.log_max:
            del fns["log"]
        out = {}
        for name, fn in fns.items():
            x = u.clone().requires_grad_()
            mu = fn(x)
            out[name] = (mu.detach(), torch.autograd.grad((mu * w).sum(), x)[0])

        def timed(fn):
            def run():
                x = u.clone().requires_grad_()
                (fn(x) * w).sum().backward()
            return run

        ms = interleaved({name: timed(fn) for name, fn in fns.items()}, args.repeats)
        takes = "dft" if fast._use_dft(n, k) else "tree"
        ref = out.get("log", out["tree"])
        dmu = max((o[0] - ref[0]).abs().max().item() for o in out.values())
        dg = max((o[1] - ref[1]).abs().max().item() for o in out.values())
        log = f"{ms['log']:.1f}" if "log" in ms else "—"
        ratio = f"{ms['log'] / ms[takes]:.0f}×" if "log" in ms else "—"
        print(f"| {n} | {k} | {ms['dft']:.1f} | {ms['tree']:.1f} | {log} | {'DFT' if takes == 'dft' else 'tree'} "
              f"| {ratio} | {dmu:.0e} | {dg:.0e} |")


def api_row(size: str, batch: int, repeats: int) -> None:
    n, k = (int(v) for v in size.split(":"))
    P = cs.load_polytope("k_subset", n=n, k=k)
    gen = torch.Generator().manual_seed(0)
    u, w = torch.randn(batch, n, generator=gen), torch.randn(batch, n, generator=gen)

    def median_ms(fn) -> float:
        times = []
        for _ in range(repeats):
            x = u.clone().requires_grad_()
            start = time.perf_counter()
            (fn(x) * w).sum().backward()
            times.append(time.perf_counter() - start)
        return 1e3 * statistics.median(times)

    relax = median_ms(lambda x: cs.relax(x, P, "exp_family"))
    log_z = median_ms(lambda x: cs.log_partition(x, P)[:, None])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    print(f"| {n}, {k} | {relax:.1f} ms | {log_z:.1f} ms | {peak:.2f} GB |", flush=True)


if __name__ == "__main__":
    main()
