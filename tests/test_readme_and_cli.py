"""README snippets, the README's commands, and the command line run in CI so they never rot."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import convex_sst as cs
from convex_sst.cli import main

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def _blocks(lang):
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(), flags=re.S)


def _run_snippet(marker):
    """Run the one README python block containing ``marker`` (seeded); return its namespace."""
    (snippet,) = [b for b in _blocks("python") if marker in b]
    env = {}
    torch.manual_seed(0)
    exec(compile(snippet, str(README), "exec"), env)
    return env


def test_readme_usage_snippet_runs():
    (usage,) = [b for b in _blocks("python") if "cs.SST" in b and "register_regularizer" not in b
                and "masked_fill" not in b and "log_partition" not in b and "correlated_k_subset" not in b]
    env = {}
    exec(compile(usage, str(README), "exec"), env)
    assert env["x"].shape == (8, 10)
    assert torch.allclose(env["x"].sum(-1), torch.full((8,), 4.0), atol=1e-4)
    assert env["theta"].grad is not None
    assert env["hard"].sum() == 4


def test_readme_padding_snippet_runs():
    env = _run_snippet("masked_fill")
    x, allowed, real, grad = env["x"], env["allowed"], env["real"], env["scores"].grad
    assert x.shape == (3, 6, 6) and bool((x[~allowed] == 0).all())
    assert torch.allclose(x.sum(1)[:, 1:], torch.ones(3, 5))       # one parent per non-root token
    assert torch.allclose(x[:, 0][~real], torch.ones(int((~real).sum())))  # padding hangs off the root
    assert bool(torch.isfinite(grad).all()) and bool((grad[~allowed] == 0).all())


def test_readme_correlated_k_subset_snippet_runs():
    env = _run_snippet("correlated_k_subset")
    x, chosen, n = env["x"], env["chosen"], env["n"]
    assert x.shape == (4, 15) and torch.allclose(x[:, :n].sum(-1), torch.full((4,), 3.0), atol=1e-6)
    assert torch.allclose(x[:, n:], x[:, n:].clamp(0, 1)) and bool((x[:, n:] <= x[:, :n - 1] + 1e-9).all())
    assert env["items"].grad is not None and env["pairs"].grad is not None
    assert torch.equal(chosen.sum(-1), torch.full((4,), 3.0))


def test_readme_log_partition_snippet_runs():
    env = _run_snippet("log_partition")
    scores, gold, P = env["scores"], env["gold"], env["P"]
    marginals = cs.relax(scores.detach(), P, "exp_family")
    assert torch.allclose(scores.grad, (marginals - gold) / 4, atol=1e-6)  # the mean over 4 sentences


def test_readme_regularizer_snippet_runs():
    env = _run_snippet("register_regularizer")
    x = env["x"]
    assert x.shape == (4, 6) and torch.allclose(x.sum(-1), torch.ones(4), atol=1e-5)
    assert int((x < 1e-9).sum()) > 0  # entmax is sparse: interior-point zeros are below 1e-9
    x.sum().backward()


def test_readme_yaml_snippet_is_a_valid_config(tmp_path):
    (yaml_text,) = _blocks("yaml")
    path = tmp_path / "group_subset.yaml"
    path.write_text(yaml_text)
    assert cs.load_polytope(path).vertices().shape == (12, 6)


def test_readme_catalogue_lists_every_builtin():
    text = README.read_text()
    from convex_sst.polytope import builtin_config_paths

    for name in builtin_config_paths():
        assert f"| `{name}` |" in text, f"README's catalogue misses {name}"


def test_ci_runs_the_readme_test_command():
    text = README.read_text()
    m = re.search(r"<!-- test-command -->\n```bash\n(.*?)\n```", text)
    assert m and "pytest" in m.group(1)
    ci = (ROOT / ".ci" / "run").read_text()
    assert "test-command" in ci  # .ci/run extracts and runs that exact line


def test_cli_version(capsys):
    # one line with what a bug report needs
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    assert out.startswith(f"convex_sst {cs.__version__} (torch {torch.__version__}, numpy ")
    assert f"Python {sys.version_info.major}.{sys.version_info.minor}" in out


def test_cli_list(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ("simplex", "spanning_tree", "arborescence", "entropy", "binary_entropy"):
        assert name in out
    assert "  arborescence    n=4, root=0\n" in out  # each polytope's parameters with their defaults
    # each description's first sentence, whole: "et al. 2020)" cut it short before
    assert "(the correlated top-k of Paulus et al. 2020).\n" in out
    assert "exactly one parent).\n" in out and "Multicommodity" not in out
    with pytest.raises(SystemExit):
        main([])
    assert "the following arguments are required: command" in capsys.readouterr().err


def test_cli_every_option_is_explained():
    """``--help`` of every command explains every option and names the defaults that are not off."""
    import argparse

    from convex_sst.cli import build_parser

    (commands,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    for name, sub in commands.choices.items():
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            where = f"convex-sst {name} {'/'.join(action.option_strings) or action.dest}"
            assert action.help, f"{where} has no help"
            if action.default not in (None, False, [], argparse.SUPPRESS):
                assert "default" in action.help, f"{where} does not name its default"
    (temps,) = [a for a in commands.choices["diagnose"]._actions if a.dest == "temperatures"]
    assert temps.help.endswith("(default: 0.1 0.2 0.5 1.0 2.0)") and temps.default == [0.1, 0.2, 0.5, 1.0, 2.0]


@pytest.mark.parametrize("text, first", [
    ("One. Two.", "One."), ("One sentence", "One sentence."), ("Ends here.\n", "Ends here."),
    ("Top-k (Paulus et al. 2020). More.", "Top-k (Paulus et al. 2020)."),
    ("As in Paulus et al. Their trick. More.", "As in Paulus et al. Their trick."),
    ("Sums, e.g. Kirchhoff's. Then, i.e. Tutte's. Else.", "Sums, e.g. Kirchhoff's."),
    ("Unit flow (cf. Dantzig).  Integral\n  by TU.", "Unit flow (cf. Dantzig)."),
    ("x = 1.5 or 2. Y.", "x = 1.5 or 2."), ("", ""), ("  \n", ""),
])
def test_cli_list_first_sentence(text, first):
    from convex_sst.cli import first_sentence

    assert first_sentence(text) == first


def test_cli_check_builtin(capsys):
    assert main(["check", "spanning_tree", "--param", "n=4"]) == 0
    from convex_sst.polytope import builtin_config_paths  # a built-in's own file, by path, is
    assert main(["check", str(builtin_config_paths()["k_subset"]), "--param", "n=4"]) == 0  # that built-in
    out = capsys.readouterr().out
    assert "vertices     16" in out and "integral     yes" in out and out.strip().endswith("OK")


def test_cli_check_of_a_large_polytope_and_a_param_without_a_value(capsys):
    assert main(["check", "spanning_tree", "--param", "n=4", "--max-vertices", "10"]) == 0
    out = capsys.readouterr().out
    assert "vertices     more than 10 (not enumerated)" in out and out.strip().endswith("OK")  # K4 has 16
    with pytest.raises(SystemExit, match=r"--param expects NAME=VALUE, got 'n'"):
        main(["check", "spanning_tree", "--param", "n"])


def test_cli_check_runs_the_feasibility_lp_on_builtins(monkeypatch, capsys):
    # built-in polytopes skip the LPs at load (one hard structure shows them non-empty); `check`
    # prints "non-empty ... (LP feasible)", so it runs the LP itself: here made to say infeasible
    from convex_sst.lp import LinearProgram

    monkeypatch.setattr(LinearProgram, "is_feasible", lambda self, *a, **k: False)
    assert main(["check", "k_subset", "--param", "n=5", "--param", "k=3"]) == 1
    assert "is empty" in capsys.readouterr().err


def test_cli_check_reports_errors(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\noutput: {shape: [3]}\nconstraints:\n  - sum(x) == 5\n  - 0 <= x <= 1\n")
    assert main(["check", str(bad)]) == 1
    assert "is empty" in capsys.readouterr().err
    frac = tmp_path / "frac.yaml"
    frac.write_text("name: frac\noutput: {shape: [3]}\nconstraints:\n  - 2 * sum(x) == 3\n  - 0 <= x <= 1\n")
    assert main(["check", str(frac)]) == 1
    assert "fractional vertex" in capsys.readouterr().err


def test_cli_check_says_how_each_regularizer_is_solved(tmp_path, capsys, monkeypatch):
    # a user's copy of a built-in keeps its `regularizers` list; exp_family there has no fast
    # path under the copy's own name, so relax enumerates its structures, up to a limit. `check`
    # said "ok" (the domain contains P) whatever relax would do; now it names the path of each
    # and fails where there is none
    import importlib

    relax_module = importlib.import_module("convex_sst.relax")  # the module (cs.relax is the function)
    from convex_sst.polytope import builtin_config_paths

    text = builtin_config_paths()["arborescence"].read_text().replace("name: arborescence", "name: my_arbs", 1)
    path = tmp_path / "my_arbs.yaml"
    path.write_text("\n".join(line for line in text.splitlines() if not line.startswith("argmax:")))
    assert main(["check", str(path), "--param", "n=3"]) == 0
    out = capsys.readouterr().out
    assert "regularizer  entropy: ok, torch solver" in out
    assert "regularizer  exp_family: ok, enumeration of its 3 structures (no fast path)" in out
    monkeypatch.setattr(relax_module, "ENUMERATION_LIMIT", 2)
    assert main(["check", str(path), "--param", "n=3"]) == 1
    captured = capsys.readouterr()
    assert "regularizer  exp_family: NOT OK: no fast path for 'my_arbs' with 'exp_family', and more than 2" in captured.out
    assert "register_fast_path('my_arbs', 'exp_family')" in captured.out
    assert "NOT OK: relax cannot use 'exp_family'" in captured.err
    assert main(["check", "arborescence", "--param", "n=3"]) == 0
    assert "regularizer  exp_family: ok, fast path" in capsys.readouterr().out


def test_cli_demo_small(capsys):
    assert main(["demo", "--n", "4", "--steps", "15", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "most likely tree after training" in out and "hidden tree edges" in out
    # Cayley: 4^2 = 16 spanning trees of K4, so a uniform sample is the hidden one 1/16 of the time
    assert "(one of 16 trees)" in out and "(uniform: 6.2%)" in out and out.count("of 3 edges right") == 2
    hidden = re.search(r"hidden tree edges: (.*)", out).group(1).split()
    assert len(hidden) == 3 and all(re.fullmatch(r"[0-3]-[0-3]", e) for e in hidden)


@pytest.mark.slow
@pytest.mark.parametrize("argv,msg", [
    (["demo", "--steps", "-1"], "argument --steps: expected an integer >= 1, got -1"),
    (["demo", "--n", "two"], "argument --n: expected an integer, got 'two'"),
    (["diagnose", "--num-estimates", "1"], "argument --num-estimates: expected an integer >= 2, got 1"),
])
def test_cli_rejects_bad_counts_as_usage_errors(argv, msg, capsys):
    # --steps -1 used to reach the demo and end in an IndexError traceback
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2 and msg in capsys.readouterr().err


def test_console_script_entry_point():
    out = subprocess.run([sys.executable, "-m", "convex_sst.cli", "list"], capture_output=True, text=True)
    assert out.returncode == 0 and "k_subset" in out.stdout


def test_cli_stops_quietly_when_the_reader_closes_the_pipe():
    # ``convex-sst list | head -1``: the reader is gone before the first write; no traceback
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        out = subprocess.run([sys.executable, "-m", "convex_sst.cli", "list"], stdout=write_end,
                             stderr=subprocess.PIPE, text=True)
    finally:
        os.close(write_end)
    assert out.returncode == 1 and out.stderr == ""


def test_demo_recovers_hidden_tree():
    from convex_sst.demo import run_demo

    res = run_demo(n=5, steps=40, seed=1, quiet=True)
    assert res["right_after"] == 4 and res["hit_after"] > 0.5 > res["hit_before"]


def test_quickstart_example_learns():
    import importlib.util

    spec = importlib.util.spec_from_file_location("quickstart", ROOT / "examples" / "quickstart.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(steps=100) > 0.6


def test_dependency_floors_are_the_checked_minimum_versions():
    # setup.cfg's lower bounds are what .ci/min-versions installs and tests: a floor raised or
    # lowered in one place only would claim support that was never checked
    import configparser

    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    floors = {}
    for req in cfg["options"]["install_requires"].split():
        name, _, version = req.partition(">=")
        floors[name.lower()] = version
    pins = {}
    for line in (ROOT / ".ci" / "min-versions.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==")
            pins[name.lower()] = version
    assert set(floors) == set(pins), (floors, pins)
    for name, floor in floors.items():
        assert pins[name] == floor or pins[name].startswith(floor + "."), (name, floor, pins[name])
