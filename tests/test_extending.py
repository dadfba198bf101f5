"""Extending the library: fast paths for users' regularizers and polytopes, checked with
convex_sst.testing.check_relaxation."""

import importlib
import math
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import convex_sst as cs

_FAST = importlib.import_module("convex_sst.relax")._FAST
SMALL = {"simplex": dict(n=4), "hypercube": dict(n=4), "k_subset": dict(n=5, k=2), "birkhoff": dict(n=3),
         "spanning_tree": dict(n=4), "arborescence": dict(n=3), "dag_path": {},
         "correlated_k_subset": dict(n=5, k=2)}


@pytest.mark.parametrize("name, reg", sorted(_FAST))
def test_check_relaxation_passes_every_builtin_fast_path(name, reg):
    if name not in SMALL:
        pytest.skip(f"a user's fast path registered by another test ({name})")
    rows = cs.testing.check_relaxation(cs.load_polytope(name, **SMALL[name]), reg)
    assert [r["temperature"] for r in rows] == [0.5, 2.0]
    assert all(r["value_error"] < 1e-6 and r["grad_error"] < 1e-6 and r["forbidden_error"] < 1e-6 and r["gradcheck"]
               and r["in_polytope"] for r in rows)


def tsallis15(name):
    """f(x) = (Σ x^1.5 − 1) / 0.75, separable: the torch solver is the reference."""
    return cs.register_regularizer(cs.Regularizer(
        name, "Tsallis 1.5-entropy", None, lambda x: ((x.clamp_min(0) ** 1.5).sum(-1) - 1) / 0.75,
        domain=(0.0, math.inf), grad=lambda x: 2 * x.clamp_min(0).sqrt(), hess=lambda x: x.rsqrt()))


def entmax15(theta, implicit=True):
    """x = ((θ − τ) / 2)₊² on the simplex, τ by bisection (no gradient), then one Newton step in
    τ from the root: the value is unchanged and τ's gradient is the implicit function theorem's.
    Without that step (``implicit=False``) τ is a constant to autograd: a wrong gradient."""
    with torch.no_grad():
        top = theta.max(-1, keepdim=True).values
        lo, hi = top - 2.0, top
        for _ in range(100):
            mid = (lo + hi) / 2
            over = (((theta - mid) / 2).clamp_min(0) ** 2).sum(-1, keepdim=True) > 1
            lo, hi = torch.where(over, mid, lo), torch.where(over, hi, mid)
        tau = (lo + hi) / 2
    if implicit:
        r = (theta - tau).clamp_min(0)
        tau = tau + ((r / 2) ** 2).sum(-1, keepdim=True).sub(1) / (r / 2).sum(-1, keepdim=True)
    return ((theta - tau) / 2).clamp_min(0) ** 2


def test_check_relaxation_accepts_a_right_fast_path_and_catches_a_wrong_gradient():
    right, wrong = tsallis15("test_entmax_right"), tsallis15("test_entmax_wrong")
    cs.register_fast_path("simplex", right.name)(lambda theta, polytope: entmax15(theta))
    cs.register_fast_path("simplex", wrong.name)(lambda theta, polytope: entmax15(theta, implicit=False))
    P = cs.load_polytope("simplex", n=6)
    rows = cs.testing.check_relaxation(P, right.name)
    assert max(r["value_error"] for r in rows) < 1e-9 and max(r["grad_error"] for r in rows) < 1e-7
    with pytest.raises(AssertionError, match=r"fast relaxation of Polytope\('simplex'.*'test_entmax_wrong' at t = 0.5 "
                                             r"fails grad_error, forbidden_error, gradcheck against torch"):
        cs.testing.check_relaxation(P, wrong.name)


def test_check_relaxation_reports_the_largest_error_of_any_entry():
    # a fast path off in one sample, where most entries are 0 either way: the errors are maxima
    # over all entries
    off = tsallis15("test_entmax_off_in_one_sample")

    def one_sample_off(theta, polytope):  # sample 0 moved 1e-4 of the way to its best vertex
        x = entmax15(theta)
        best = torch.nn.functional.one_hot(theta[:1].argmax(-1), theta.shape[-1]).to(x.dtype)
        return torch.cat([x[:1] + 1e-4 * (best - x[:1]), x[1:]])

    cs.register_fast_path("simplex", off.name)(one_sample_off)
    with pytest.raises(AssertionError, match=r"fails value_error, (grad_error, )?forbidden_error against torch "
                                             r"\(value error \d\.\d\de-0[4-6],"):
        cs.testing.check_relaxation(cs.load_polytope("simplex", n=6), off.name)


MY_SIMPLEX = """\
name: test_my_simplex
params:
  n: {type: int, min: 1, default: 4}
output: {name: x, shape: [n]}
constraints:
  - sum(x) == 1
  - x >= 0
"""


def user_simplex(tmp_path, name, register=True):
    """MY_SIMPLEX under ``name``, written to ``tmp_path``; registered (load it by name) or not."""
    path = tmp_path / f"{name}.yaml"
    path.write_text(MY_SIMPLEX.replace("test_my_simplex", name))
    if register:
        cs.register_polytope(path)
    return path


def test_fast_path_for_a_users_polytope(tmp_path):
    # fast paths of user configs were never used (only built-ins were looked up)
    path = tmp_path / "my_simplex.yaml"
    path.write_text(MY_SIMPLEX)
    calls = []

    @cs.register_fast_path("test_my_simplex", "entropy")
    def softmax(theta, polytope):
        calls.append(theta.shape)
        return torch.softmax(theta, -1)

    u = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    P = cs.load_polytope(path)  # by path alone the name is not trusted: another file may use it
    with pytest.warns(UserWarning, match=r"a fast path is registered for \('test_my_simplex', 'entropy'\), but this "
                                         r"polytope was loaded from .*my_simplex.yaml without registering it.*register_polytope"):
        x = cs.relax(u, P, "entropy", 0.5)
    assert not calls and torch.allclose(x, torch.softmax(u / 0.5, -1), atol=1e-9)  # the torch solver
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cs.relax(u, P, "entropy", 0.5)  # warned once per polytope, not at every step
    with pytest.raises(cs.UnknownNameError, match="without registering it"):
        cs.relax(u, P, "entropy", 0.5, backend="fast")
    cs.register_polytope(path)
    for Q in (P, cs.load_polytope("test_my_simplex")):
        assert torch.equal(cs.relax(u, Q, "entropy", 0.5), torch.softmax(u / 0.5, -1))
    assert len(calls) == 2
    cs.testing.check_relaxation(P, "entropy")


def test_a_fast_path_taking_keyword_arguments_gets_every_option(tmp_path):
    # a fast path with **options receives relax's options as given (the check of option names
    # applies to fast paths that list theirs)
    user_simplex(tmp_path, "test_kw_simplex")
    seen = []

    @cs.register_fast_path("test_kw_simplex", "entropy")
    def softmax(theta, polytope, **options):
        seen.append(options)
        return torch.softmax(theta * options.get("sharpen", 1.0), -1)

    u = torch.randn(2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    P = cs.load_polytope("test_kw_simplex")
    torch.testing.assert_close(cs.relax(u, P, "entropy", 1.0, sharpen=3.0, note="x"), torch.softmax(3 * u, -1))
    assert seen == [{"sharpen": 3.0, "note": "x"}]
    cs.relax(u, P, "entropy", 1.0)
    assert seen[-1] == {}


def test_check_relaxation_against_the_generic_path_compares_values_next_to_minus_infinity():
    # cvxpylayers' derivatives next to -inf are refused by relax: with the generic backend as
    # the reference, the rows with forbidden coordinates compare values only
    P = cs.load_polytope("simplex", n=4)
    rows = cs.testing.check_relaxation(P, "quadratic", reference="generic", temperatures=(1.0,), num_samples=3)
    assert len(rows) == 1 and rows[0]["value_error"] < 1e-6 and rows[0]["forbidden_error"] < 1e-6
    assert rows[0]["grad_error"] < 1e-5 and rows[0]["gradcheck"] and rows[0]["in_polytope"]


def test_check_relaxation_argument_errors():
    P = cs.load_polytope("simplex", n=3)
    with pytest.raises(cs.UnknownNameError, match="unknown reference 'cvxpy'"):
        cs.testing.check_relaxation(P, "entropy", reference="cvxpy")
    with pytest.raises(cs.InputError, match="reference='brute_force' computes the exp_family relaxation, not 'entropy'"):
        cs.testing.check_relaxation(P, "entropy", reference="brute_force")
    with pytest.raises(cs.InputError, match="atol must be a finite number > 0"):
        cs.testing.check_relaxation(P, "entropy", atol=-1.0)
    with pytest.raises(cs.InputError, match="scale must be a finite number > 0"):
        cs.testing.check_relaxation(P, "entropy", scale=float("nan"))
    with pytest.raises(cs.InputError, match="temperatures must be a non-empty sequence"):
        cs.testing.check_relaxation(P, "entropy", temperatures=0.5)
    with pytest.raises(cs.InputError, match="each of temperatures must be a finite number > 0, got 0"):
        cs.testing.check_relaxation(P, "entropy", temperatures=(1.0, 0))
    rows = cs.testing.check_relaxation(P, "entropy", temperatures=torch.tensor([0.5, 2.0]), num_samples=2)
    assert [row["temperature"] for row in rows] == [0.5, 2.0]


PAIRS = """\
name: test_pairs_{tag}
params:
  n: {{type: int, min: 2, default: 5}}
output: {{name: x, shape: [n]}}
constraints:
  - sum(x) == 2
  - 0 <= x <= 1
argmax: {argmax}
"""


def test_check_command_compares_a_registered_argmax_with_the_lp(tmp_path, capsys):
    from convex_sst.cli import main

    def top(k):
        return lambda u, polytope: torch.zeros_like(u).scatter_(-1, u.topk(k, -1).indices, 1.0)

    cs.register_argmax("test_top2")(top(2))
    cs.register_argmax("test_top1")(top(1))  # a slip: one item where the structure has two
    for tag, algorithm in (("right", "test_top2"), ("wrong", "test_top1")):
        (tmp_path / f"{tag}.yaml").write_text(PAIRS.format(tag=tag, argmax=algorithm))
    assert main(["check", str(tmp_path / "right.yaml")]) == 0
    assert "argmax       test_top2: same scores as the LP on the 20 directions" in capsys.readouterr().out
    assert main(["check", str(tmp_path / "wrong.yaml")]) != 0
    assert "argmax 'test_top1' disagrees with the LP on direction" in capsys.readouterr().err


def test_a_registered_argmax_must_return_structures(tmp_path):
    outputs = {"bool": lambda u, p: u == u.max(-1, keepdim=True).values,
               "scores": lambda u, p: torch.softmax(u, -1),
               "flat": lambda u, p: u.reshape(-1)}
    for tag, fn in outputs.items():
        cs.register_argmax(f"test_returns_{tag}")(fn)
        (tmp_path / f"{tag}.yaml").write_text(PAIRS.format(tag=tag, argmax=f"test_returns_{tag}").replace(
            "sum(x) == 2", "sum(x) == 1"))
    u = torch.tensor([[0.1, 2.0, -1.0, 0.5, 0.3]])
    x = cs.load_polytope(tmp_path / "bool.yaml").argmax(u)  # a bool 0/1 result is fine, returned in u's dtype
    assert x.dtype == torch.float32 and x.tolist() == [[0.0, 1.0, 0.0, 0.0, 0.0]]
    with pytest.raises(cs.PolytopeError, match="returned values other than 0 and 1"):
        cs.load_polytope(tmp_path / "scores.yaml").argmax(u)
    with pytest.raises(cs.PolytopeError, match=r"returned \(5,\) for utilities of shape \(1, 5\)"):
        cs.load_polytope(tmp_path / "flat.yaml").argmax(u)


def test_check_command_imports_the_module_that_registers_a_regularizer(tmp_path, monkeypatch, capsys):
    import sys

    from convex_sst.cli import main

    (tmp_path / "test_cli_regs_module.py").write_text(
        "import math\nimport convex_sst as cs\n"
        "cs.register_regularizer(cs.Regularizer('test_cli_tsallis', 'Tsallis 1.5', None, None, (0.0, math.inf),\n"
        "    lambda x: 2 * x.clamp_min(0).sqrt(), lambda x: x.rsqrt()))\n")
    (tmp_path / "uses_it.yaml").write_text(MY_SIMPLEX.replace("test_my_simplex", "test_uses_cli_tsallis")
                                           + "regularizers: [entropy, test_cli_tsallis]\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".")])
    assert main(["check", "uses_it.yaml"]) == 1
    assert ("unknown regularizer 'test_cli_tsallis'" in (err := capsys.readouterr().err)
            and "pass --import MODULE" in err)
    with pytest.raises(SystemExit, match="--import no_such_module: No module named 'no_such_module'"):
        main(["check", "uses_it.yaml", "--import", "no_such_module"])
    assert main(["check", "uses_it.yaml", "--import", "test_cli_regs_module"]) == 0
    assert "regularizer  test_cli_tsallis: ok" in capsys.readouterr().out


def test_check_relaxation_catches_a_fast_path_that_misreads_the_forbidden_mask(tmp_path):
    user_simplex(tmp_path, "test_misread_mask_simplex")

    @cs.register_fast_path("test_misread_mask_simplex", "entropy")
    def softmax(theta, polytope, forbidden=None):  # forbidden read as "utility 0", not "x = 0"
        return torch.softmax(theta if forbidden is None else theta.masked_fill(forbidden, 0.0), -1)

    P = cs.load_polytope("test_misread_mask_simplex")
    with pytest.raises(cs.SolverError, match=r"puts mass .* on coordinates where u = -inf"):
        cs.testing.check_relaxation(P, "entropy")


GROUP_CAPS = """
name: test_group_capped_subset
description: k items in total, at most cap[g] from each group g.
params:
  groups: {type: int_list, default: [0, 0, 0, 1, 1, 1, 1, 2, 2, 2]}
  cap: {type: int_list, default: [1, 2, 1]}
  k: {type: int, default: 3}
data:
  G: group_indicator(groups)
output: {name: x, shape: [len(groups)]}
constraints:
  - G @ x <= cap
  - sum(x) == k
  - 0 <= x <= 1
regularizers: [entropy, binary_entropy, quadratic]
"""


@pytest.mark.parametrize("reg", ["entropy", "binary_entropy", "quadratic"])
def test_users_polytope_with_inequality_rows_matches_an_exact_oracle(tmp_path, reg):
    # a structure declared only in a config, with inequality rows (group caps): the torch
    # backend (the auto choice: no fast path) against nested bisection on its KKT conditions,
    # values to 1e-8, gradients against central differences of the oracle. The rows include caps
    # met with a small multiplier (θ of a capped group raised by 1e-5 to 1e-3 over the value
    # where it just fills its cap), which the interior-point iterates leave ambiguous
    from oracles import group_capped_subset
    path = tmp_path / "group_caps.yaml"
    path.write_text(GROUP_CAPS)
    P = cs.load_polytope(path)
    groups, cap, k = P.params["groups"], P.params["cap"], P.params["k"]
    gen = torch.Generator().manual_seed(3)
    theta = torch.cat([5.0 * torch.randn(16, P.size, generator=gen, dtype=torch.float64),
                       torch.randn(16, P.size, generator=gen, dtype=torch.float64)])
    # group 0 (cap 1) full, its multiplier λ_0 brought down to δ (x stays as it is)
    for i, delta in enumerate([1e-5, 1e-4, 1e-3] * 5 + [0.0]):
        theta[16 + i, :3] += 3.0
        lam0 = group_capped_subset(theta[16 + i].numpy(), groups, cap, k, reg)[1][0]
        assert lam0 > 0.1  # the cap binds
        theta[16 + i, :3] -= lam0 - delta
    u = theta.clone().requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("error", cs.SolverWarning)
        x = cs.relax(u, P, reg, 1.0)
    ref = np.stack([group_capped_subset(r, groups, cap, k, reg)[0] for r in theta.numpy()])
    assert np.abs(x.detach().numpy() - ref).max() < 1e-8
    w = torch.linspace(-1.0, 1.0, P.size, dtype=torch.float64)
    (x * w).sum().backward()
    h = 1e-6
    for i in (0, 16, 17, 18):  # one Gaussian row and the three weakly capped ones
        fd = np.empty(P.size)
        for j in range(P.size):
            e = np.zeros(P.size)
            e[j] = h
            fd[j] = (group_capped_subset(theta[i].numpy() + e, groups, cap, k, reg)[0]
                     - group_capped_subset(theta[i].numpy() - e, groups, cap, k, reg)[0]) @ w.numpy() / (2 * h)
        assert np.abs(u.grad[i].numpy() - fd).max() < 1e-5, i




def test_a_users_argmax_gives_the_quadratic_by_the_minimum_norm_point(tmp_path):
    # docs/polytope-config.md: with an argmax registered, the quadratic needs no algorithm of the
    # user's own; the minimum-norm-point path is checked against the torch solver on the config
    from convex_sst.fast import projection_by_argmax

    @cs.register_argmax("test_best_per_group")
    def best_per_group(u, polytope):  # the best item of each group, then the k best groups
        groups = torch.as_tensor(polytope.params["groups"])
        scores = torch.stack([torch.where(groups == j, u, -torch.inf) for j in range(int(groups.max()) + 1)])
        best, item = scores.max(-1)                                                  # (groups, B)
        top = best.topk(int(polytope.params["k"]), dim=0).indices                   # (k, B)
        items = item.gather(0, top)                                                 # (k, B)
        return torch.zeros_like(u).scatter(-1, items.T, 1.0)

    # the worked example's config (docs/polytope-config.md) under a name of its own, with the argmax
    doc = (Path(__file__).resolve().parent.parent / "docs" / "polytope-config.md").read_text()
    (config,) = re.findall(r"```yaml\n(.*?)```", doc, flags=re.S)
    path = tmp_path / "test_group_subset.yaml"
    path.write_text(config.replace("name: group_subset", "name: test_group_subset") + "argmax: test_best_per_group\n")
    cs.register_polytope(path)
    cs.register_fast_path("test_group_subset", "quadratic")(projection_by_argmax)
    P = cs.load_polytope("test_group_subset", k=2)
    assert cs.relax(torch.zeros(6), P, "quadratic", 1.0, backend="fast").sum().item() == pytest.approx(2.0)
    rows = cs.testing.check_relaxation(P, "quadratic")
    assert all(r["value_error"] < 1e-6 and r["grad_error"] < 1e-6 and r["forbidden_error"] < 1e-6 and r["gradcheck"]
               and r["in_polytope"] for r in rows)
