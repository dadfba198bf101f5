"""Smoke runs of the benchmark scripts at their smallest settings, so that they never rot.

Timings are not checked (speed is measured by running the scripts, not asserted in tests); the
values each script compares (ours against the official strategies' re-implementations) are.
"""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(script: str, *args: str) -> str:
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def _rows(out: str, start: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in out.splitlines() if line.startswith(start)]


def test_fast_paths_benchmark_runs_and_agrees_with_the_official_strategies():
    out = _run("fast_paths.py", "--batches", "2", "--repeats", "1", "--skip-generic", "--official-repeats", "1")
    fast_rows = {(r[0], r[2]) for r in _rows(out, "| ") if len(r) > 3 and r[2] in ("entropy", "exp_family",
                                                                                  "binary_entropy", "quadratic")}
    assert ("spanning_tree", "exp_family") in fast_rows and ("birkhoff", "entropy") in fast_rows
    official = _rows(out, "| k_subset n=45") + _rows(out, "| spanning_tree n=10")
    assert len(official) == 4
    for row in official:
        assert re.fullmatch(r"[0-9.]+×", row[5])
        # same marginals as the official strategy: to rounding at t = 1 (float32: its rounding),
        # and the slogdet route's own error at t = 0.1
        limit = 1e-5 if "float32" in row[0] or "0.1" in row[0] else 1e-12
        assert float(row[6]) < limit, row


def test_generic_benchmark_runs():
    out = _run("generic.py", "--batches", "1", "--repeats", "1", "--polytopes", "simplex")
    rows = _rows(out, "| simplex")
    assert rows and all(float(r[-1]) > 0 for r in rows)


def test_forbidden_benchmark_runs_and_matches_the_smaller_structures():
    out = _run("forbidden.py", "--batch", "2", "--repeats", "1")
    first, second = out.split("backend='torch'")
    rows = _rows(first, "| ")[1:]  # after the header
    assert len(rows) == 6
    for row in rows:
        if row[6] != "—":
            assert float(row[6]) < 1e-9, row  # forbidden coordinates vs the structure without them
    rows = _rows(second, "| ")[1:]
    assert len(rows) == 6
    for row in rows:
        if row[7] != "—":
            assert float(row[7]) < 1e-7, row  # the interior-point solver, each row vs its smaller graph


def test_k_subset_benchmark_runs_and_its_routes_agree():
    out = _run("k_subset.py", "--batch", "2", "--repeats", "1", "--sizes", "60:6", "200:100")
    rows = _rows(out, "| ")[1:]
    assert [(r[0], r[1], r[5]) for r in rows] == [("60", "6", "DFT"), ("200", "100", "DFT")]
    for row in rows:
        assert row[4] != "—" and float(row[7]) < 1e-11 and float(row[8]) < 1e-10, row


def test_k_subset_benchmark_api_mode_runs():
    out = _run("k_subset.py", "--api", "--batch", "2", "--repeats", "1", "--sizes", "60:6", "200:100")
    rows = _rows(out, "| ")[1:]
    assert [r[0] for r in rows] == ["60, 6", "200, 100"]
    for row in rows:
        assert all(re.fullmatch(r"[0-9.]+ (ms|GB)", cell) for cell in row[1:]), row


def test_matching_benchmark_runs_and_its_solvers_agree():
    out = _run("matching.py", "--sizes", "3:5", "--temperatures", "1", "--batch", "4", "--repeats", "1")
    rows = _rows(out, "| 3, 5")
    assert len(rows) == 1 and float(rows[0][5]) < 1e-6, rows


def test_sinkhorn_schedule_benchmark_runs_and_its_settings_agree():
    out = _run("sinkhorn_schedule.py", "--sizes", "4:3", "3:5:2", "--temperatures", "1", "--repeats", "1")
    rows = _rows(out, "| ")[1:]
    assert [r[:3] for r in rows] == [["4 × 4", "3", "1"], ["3 × 5", "2", "1"]]
    for row in rows:
        assert row[-2] == "0, 0" and float(row[-1]) < 1e-10, row


def test_load_benchmark_runs():
    out = _run("load.py", "--cases", "arborescence:5", "spanning_tree:4")
    rows = _rows(out, "| ")[1:]
    assert [r[:2] for r in rows] == [["arborescence", "5"], ["spanning_tree", "4"]]
    for row in rows:
        assert all(float(cell) >= 0 for cell in row[2:]), row


def test_torch_solver_far_above_table_runs_and_is_accurate():
    out = _run("torch_solver.py", "--far-above")
    rows = [r for r in _rows(out, "| ") if r[0] not in ("polytope", "---")]
    alone, with_mask = [r for r in rows if len(r) == 5], [r for r in rows if len(r) == 6]
    assert len(alone) == 24 and len(with_mask) == 29 and len(rows) == 53
    for row in alone:  # an entry forced by u_j + 1e3, 1e6, 1e9 against u_j + 200: no warning, x to 1e-8
        assert all("warned" not in c and float(c) < 1e-8 for c in row[2:]), row
    for row in with_mask:  # and one masked by u_k - c in the same row, against u_k - 300, through "auto"
        assert row[2] in ("fast", "torch") and all("warned" not in c and float(c) < 1e-8 for c in row[3:]), row


def test_flow_formulations_benchmark_runs_and_agrees_on_gaussian_utilities():
    out = _run("flow_formulations.py", "--rows", "8", "--sizes", "spanning_tree:4", "arborescence:3",
               "--temperatures", "1")
    rows = _rows(out, "| spanning_tree") + _rows(out, "| arborescence")
    assert len(rows) == 12
    for row in rows:
        assert row[5] == "8 / 8", row  # the reference (second formulation) converged
        if row[3] == "gauss":  # every row converged, within 1e-8 of the second formulation (its gradient 1e-6)
            assert row[6] == "0 (—)" and row[7].startswith("0 (") and float(row[7][3:-1]) < 1e-8, row
            assert row[8].startswith("0 (") and float(row[8][3:-1]) < 1e-6, row


def test_setup_lps_benchmark_runs_and_agrees_with_the_two_lps():
    # the script asserts that Σx constant on P, decided without LPs where it can, is the two
    # LPs' answer; here: one user config where Σx varies and one where it is constant
    out = _run("setup_lps.py", "--cases", "correlated_k_subset:8:3", "arborescence:5", "--repeats", "1")
    rows = {r[0]: r for r in _rows(out, "| ") if r[0].startswith(("correlated", "arborescence"))}
    assert rows["correlated_k_subset n = 8, k = 3"][4] == "varies"
    assert rows["arborescence n = 5"][4] == "4" and int(rows["arborescence n = 5"][2]) > 0


def test_standard_form_benchmark_runs_and_agrees_with_the_range_lps():
    # the script asserts that propagated bounds give the same standard form as the range LPs,
    # up to bounds that enclose the ranges
    out = _run("standard_form.py", "--cases", "spanning_tree:6", "arborescence:5", "--repeats", "1")
    rows = {r[0]: r for r in _rows(out, "| ") if r[0].startswith(("spanning", "arborescence"))}
    assert rows["spanning_tree n = 6"][3] == "30" and rows["arborescence n = 5"][3] == "20"


def test_spanning_tree_separable_benchmark_runs_and_agrees_with_the_torch_solver():
    out = _run("spanning_tree_separable.py", "--n", "5", "--batch", "2", "--repeats", "1")
    rows = _rows(out, "| n=5")
    assert len(rows) == 6  # three regularizers, two temperatures
    for row in rows:
        assert re.fullmatch(r"[0-9.]+×", row[3])
        assert float(row[4]) < 1e-7 and float(row[5]) < 1e-5, row


def test_arborescence_separation_benchmark_runs_and_both_orders_agree():
    out = _run("arborescence_separation.py", "--n", "6", "16", "--batch", "2", "--repeats", "1",
               "--temperatures", "0.5")
    rows = _rows(out, "| n=")
    assert len(rows) == 4
    for row in rows:
        cuts = [int(c) for c in row[4].split(",")]
        assert float(row[6]) < 1e-9, row  # the partition is exact in either order
        assert (cuts[0] > 0) == row[0].startswith("n=16"), row  # K6 settles every step without a cut


def test_assignment_quadratic_benchmark_runs_and_agrees_with_the_torch_solver():
    cases = ("birkhoff:3", "matching:2:4", "dag_path:4", "arborescence:4")
    out = _run("assignment_quadratic.py", "--cases", *cases, "--temperatures", "0.5",
               "--regularizers", "quadratic", "binary_entropy", "--batch", "2", "--repeats", "1")
    rows = _rows(out, "| ")[1:]
    assert [r[:2] for r in rows] == [[c, r] for c in cases for r in ("quadratic", "binary_entropy")]
    for row in rows:
        assert re.fullmatch(r"[0-9.]+×", row[5])
        assert re.fullmatch(r"[0-9.]+×", row[7]) if row[1] == "quadratic" else row[7] == "—"
        dx, dg = (float(v) for v in row[8].split(","))
        assert dx < 1e-7 and dg < 1e-5, row
        assert float(row[9].split("/")[0]) < 1e-6, row  # Newton's against differences


def test_assignment_benchmark_takes_the_entropy_on_dag_paths_and_arborescences_only():
    out = _run("assignment_quadratic.py", "--cases", "dag_path:4", "arborescence:4", "--temperatures", "0.5",
               "--regularizers", "entropy", "--batch", "2", "--repeats", "1", "--newton-only")
    rows = _rows(out, "| ")[1:]
    assert [r[:2] for r in rows] == [["dag_path:4", "entropy"], ["arborescence:4", "entropy"]], rows
    assert all(float(r[8].split(",")[0]) < 1e-7 for r in rows), rows
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "assignment_quadratic.py"), "--cases", "birkhoff:3",
                           "--regularizers", "entropy"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 2 and "--regularizers entropy takes dag_path and arborescence cases only" in proc.stderr


def test_quadratic_by_argmax_benchmark_runs_and_agrees_with_the_torch_solver():
    out = _run("quadratic_by_argmax.py", "--cases", "arborescence:4", "correlated_k_subset:6:2", "birkhoff:3",
               "--temperatures", "0.5", "--batch", "2", "--repeats", "1")
    rows = _rows(out, "| ")[1:]
    assert [r[0] for r in rows] == ["arborescence:4", "correlated_k_subset:6:2", "birkhoff:3"]
    for row in rows:
        assert re.fullmatch(r"[0-9.]+×", row[4])
        assert float(row[5]) < 1e-7 and float(row[6]) < 1e-5, row
        assert float(row[7].split("/")[0]) < 1e-6, row  # ours against differences


def test_hull_oracle_benchmark_runs_and_agrees_on_gumbel_rows():
    out = _run("hull_oracle.py", "--n", "4", "--k", "2", "--rows", "3", "--kinds", "gumbel", "--temperatures", "0.3",
               "--regularizers", "entropy", "binary_entropy", "quadratic")
    rows = _rows(out, "| entropy") + _rows(out, "| binary_entropy") + _rows(out, "| quadratic")
    assert len(rows) == 3
    for row in rows:
        assert float(row[3]) < 1e-8, row          # x against the 60-digit hull
        assert row[4].startswith("0 / 3"), row    # no directional derivative off by more than 1e-6
