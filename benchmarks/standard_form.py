"""What the torch solver's standard form costs to build, once per polytope and regularizer
(``solver.standard_form``: constant variables eliminated, dependent rows removed, bounds for free
auxiliary variables, the block structure of the Newton system).

Free auxiliary variables (the arc variables y of the flow formulations, declared without
bounds) need a bound for the barrier. They get the bounds that propagation through the rows
implies (``CanonicalForm.implied_bounds``, milliseconds), and the two range LPs only where that
leaves a side open. The baseline, timed in the same process on the same polytope, gives every
one of them its range LPs, as before 2026-12-05. The variables constant on P (LPs, shared by
both) are found once beforehand and not timed. The script asserts that both give the same
standard form, up to the bounds of the free auxiliary variables, which enclose their ranges.

Prints a markdown table, median of ``--repeats`` builds.

    python benchmarks/standard_form.py
    python benchmarks/standard_form.py --cases spanning_tree:23 --repeats 1
"""

from __future__ import annotations

import argparse
import statistics
import time
from unittest import mock

import numpy as np

import convex_sst as cs
from convex_sst import solver
from convex_sst.canonical import CanonicalForm
from convex_sst.regularizers import get_regularizer
from setup_lps import parse_case  # (this folder: the same case syntax)

def build(P: cs.Polytope, reg, propagate: bool) -> tuple[float, solver.StandardForm]:
    P.cache.pop(("torch_form", reg), None)
    t0 = time.perf_counter()
    if propagate:
        sf = solver.standard_form(P, reg)
    else:  # no propagation: every free auxiliary variable gets its two range LPs
        with mock.patch.object(CanonicalForm, "implied_bounds", lambda form: (form.lb, form.ub)):
            sf = solver.standard_form(P, reg)
    return time.perf_counter() - t0, sf


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=["spanning_tree:12", "spanning_tree:16", "spanning_tree:20",
                                                   "arborescence:12", "arborescence:20", "correlated_k_subset:40:8"],
                    help="name:param[:param] (parameters in the order n, k or n, m)")
    ap.add_argument("--regularizer", default="entropy")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    reg = get_regularizer(args.regularizer)
    print("| polytope | variables | equality rows | auxiliary without bounds | standard form | with range LPs | ratio |")
    print("|---|---|---|---|---|---|---|")
    for case in args.cases:
        name, params = parse_case(case)
        P = cs.load_polytope(name, **params)
        P.lp.constant_variables()  # shared by both, found once
        form = P.form
        free = int((~np.isfinite(form.lb[form.out_size:]) & ~np.isfinite(form.ub[form.out_size:])).sum())
        fast = [build(P, reg, True) for _ in range(args.repeats)]
        slow = [build(P, reg, False) for _ in range(args.repeats)]
        a, b = fast[0][1], slow[0][1]
        for field in ("b", "h", "blocks", "domL", "domU", "m1"):
            assert np.array_equal(getattr(a, field), getattr(b, field)), field
        assert (a.A != b.A).nnz == 0 and (a.G != b.G).nnz == 0
        assert (a.L <= b.L + 1e-9).all() and (a.U >= b.U - 1e-9).all()  # propagated bounds enclose the ranges
        t_fast, t_slow = statistics.median(t for t, _ in fast), statistics.median(t for t, _ in slow)
        label = ", ".join(f"{k} = {v}" for k, v in params.items())
        print(f"| {name} {label} | {form.num_z} | {form.num_eq} | {free} | {t_fast:.3f} s | {t_slow:.3f} s "
              f"| {t_slow / max(t_fast, 1e-9):.0f}× |")


if __name__ == "__main__":
    main()
