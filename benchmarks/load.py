"""What loading a built-in polytope costs: ``load_polytope`` in a fresh process, then the first
fast-path relaxation (B = 4, exp_family, t = 1), the first exact sample, and the process's peak
memory. Built-in polytopes compile their constraints only when a solver first needs them.

Prints a markdown table (one fresh process per row, so nothing is cached).

    python benchmarks/load.py
    python benchmarks/load.py --cases arborescence:160 spanning_tree:60
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = """
import json, resource, sys, time
import torch
import convex_sst as cs
name, n = sys.argv[1], int(sys.argv[2])
t0 = time.perf_counter()
P = cs.load_polytope(name, n=n)
t1 = time.perf_counter()
u = torch.randn((4,) + P.shape, dtype=torch.float64)
cs.relax(u, P, "exp_family", 1.0)
t2 = time.perf_counter()
P.argmax(u)
t3 = time.perf_counter()
print(json.dumps({"load": t1 - t0, "relax": t2 - t1, "argmax": t3 - t2, "mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=["arborescence:20", "arborescence:60", "arborescence:160",
                                                   "spanning_tree:20", "spanning_tree:60", "spanning_tree:160"],
                    help="name:n pairs")
    args = ap.parse_args()
    print("| polytope | n | load (ms) | first relax, B = 4 (ms) | first argmax (ms) | peak memory (MB) |")
    print("|---|---|---|---|---|---|")
    for case in args.cases:
        name, n = case.split(":")
        out = subprocess.run([sys.executable, "-c", CHILD, name, n], capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"| {name} | {n} | {1e3 * r['load']:.1f} | {1e3 * r['relax']:.1f} | {1e3 * r['argmax']:.1f} | {r['mb']:.0f} |",
              flush=True)


if __name__ == "__main__":
    main()
