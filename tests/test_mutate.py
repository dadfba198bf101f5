"""The mutation-audit script (tests/mutate.py): the token changes it makes, and one short run."""

import subprocess
import sys
from pathlib import Path

import pytest

from mutate import mutants

SOURCE = '''def f(a, b, *args):
    if not a < -b and True:
        return max(a * 0.5, 0.0) - 1e-9
    return any(args)
'''


def test_mutants_are_the_documented_token_changes():
    got = {(row, old, new) for (row, _), _, old, new in mutants(SOURCE)}
    assert got == {
        (2, "not ", ""), (2, "<", "<="), (2, "-", ""), (2, "and", "or"), (2, "True", "False"),
        (3, "max", "min"), (3, "*", "/"), (3, "0.5", "0.5*1000"), (3, "0.5", "0.5/1000"), (3, "-", "+"),
        (3, "1e-9", "1e-9*1000"), (3, "1e-9", "1e-9/1000"),
        (4, "any", "all"),
    }  # not the * of *args, not the literal 0.0


@pytest.mark.slow
def test_a_short_audit_finds_the_mutants_a_test_catches(tmp_path):
    test = "tests/test_sst.py::test_noise_log_prob_and_moments_match_torch_distributions"
    out = tmp_path / "results.json"
    p = subprocess.run([sys.executable, "tests/mutate.py", "noise", "--count", "2", "--seed", "1", "--tests", test,
                        "--out", str(out)], cwd=Path(__file__).resolve().parent.parent, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    assert "2 killed, 0 timeout, 0 survived of 2 mutants" in p.stdout, p.stdout
    assert out.read_text().count('"status": "killed"') == 2
