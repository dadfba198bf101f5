"""Estimators against exact gradients; exact SMT distributions against sampling."""

import math
import re

import numpy as np
import pytest
import torch

import convex_sst as cs
from convex_sst.cli import main
from convex_sst.diagnostics import diagnose, write_report


def lin_loss(c):
    return lambda x: (x.reshape(x.shape[0], -1) * c.reshape(-1)).sum(-1) ** 2


CASES = [("simplex", {"n": 4}), ("k_subset", {"n": 5, "k": 2}), ("spanning_tree", {"n": 4})]


def test_gumbel_kl_matches_monte_carlo():
    theta = torch.tensor([-1.0, 0.0, 0.7, 2.0], dtype=torch.float64)
    g = cs.Gumbel().sample((200000, 4), generator=torch.Generator().manual_seed(0), dtype=torch.float64) + theta
    noise = cs.Gumbel()
    mc = (noise.log_prob(g - theta) - noise.log_prob(g)).mean(0)
    assert torch.allclose(cs.gumbel_kl(theta), mc, atol=0.02)
    assert cs.gumbel_kl(torch.zeros(3)).abs().max() == 0


@pytest.mark.parametrize("name,params", CASES + [("hypercube", {"n": 3}), ("spanning_tree", {"n": 5})])
def test_exact_smt_distribution_matches_sampling(name, params):
    P = cs.load_polytope(name, **params)
    theta = torch.randn(P.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    V, p = cs.smt_distribution(P, theta)
    assert abs(p.sum().item() - 1) < 1e-12 and V.shape[0] == P.vertices().shape[0]
    N = 20000
    Vm, pm, se = cs.smt_distribution(P, theta, method="monte_carlo", num_samples=N,
                                     generator=torch.Generator().manual_seed(4), return_stderr=True)
    exact = {tuple(v.reshape(-1).tolist()): q for v, q in zip(V, p.tolist())}
    for v, q, s in zip(Vm, pm.tolist(), se.tolist()):
        assert abs(exact[tuple(v.reshape(-1).tolist())] - q) < 4 * max(s, 1 / N)


def test_one_hot_probabilities_are_softmax():
    P = cs.load_polytope("simplex", n=5)
    theta = torch.randn(5, dtype=torch.float64)
    V, p = cs.smt_distribution(P, theta)
    assert torch.allclose(p, torch.softmax(theta, 0)[V.argmax(1)], atol=1e-14)


def test_exact_gradient_matches_finite_differences():
    P = cs.load_polytope("spanning_tree", n=4)
    theta = torch.randn(6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    loss = lin_loss(torch.arange(6.0, dtype=torch.float64))
    g = cs.exact_gradient(loss, theta, P)
    eps = 1e-6
    fd = torch.stack([(cs.expected_loss(loss, theta + eps * e, P) - cs.expected_loss(loss, theta - eps * e, P)) / (2 * eps)
                      for e in torch.eye(6, dtype=torch.float64)])
    assert torch.allclose(g, fd, atol=1e-7)


@pytest.mark.parametrize("name,params", CASES)
@pytest.mark.parametrize("baseline", [None, "loo", "constant"])
def test_score_function_is_unbiased(name, params, baseline):
    P = cs.load_polytope(name, **params)
    gen = torch.Generator().manual_seed(11)
    theta = torch.randn(P.shape, generator=gen, dtype=torch.float64)
    loss = lin_loss(torch.randn(P.shape, generator=gen, dtype=torch.float64))
    exact = cs.exact_gradient(loss, theta, P)
    b = (lambda th: torch.tensor(0.3)) if baseline == "constant" else baseline
    est = torch.stack([cs.score_function(loss, theta, P, num_samples=50, baseline=b, generator=gen) for _ in range(200)])
    mean, se = est.mean(0), est.std(0) / math.sqrt(len(est))
    assert torch.all((mean - exact).abs() <= 3 * se + 1e-12), (mean, exact, se)


def test_loo_baseline_is_the_mean_of_the_other_losses():
    # b_k = mean_{j ≠ k} L(X_j): independent of X_k, hence unbiased (a b_k that counts L(X_k)
    # itself biases the estimate by a factor 1 − 2/(K − 1), −1 at K = 2)
    P = cs.load_polytope("k_subset", n=5, k=2)
    theta = torch.randn(5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    loss = lin_loss(torch.arange(5.0, dtype=torch.float64))
    for K in (2, 5):
        _, info = cs.score_function(loss, theta, P, num_samples=K, baseline="loo", return_info=True,
                                    generator=torch.Generator().manual_seed(K))
        others = torch.stack([torch.cat([info.losses[:k], info.losses[k + 1:]]).mean() for k in range(K)])
        torch.testing.assert_close(info.baseline, others, rtol=0, atol=1e-12)
        assert len(set(info.losses.tolist())) > 1  # the samples differ: b_k tells k apart


def test_ema_baseline_uses_past_losses_only():
    P = cs.load_polytope("simplex", n=3)
    ema = cs.EMABaseline(decay=0.5, initial=1.0)
    theta = torch.zeros(3, dtype=torch.float64)
    loss = lambda x: x[:, 0] * 2.0  # noqa: E731
    _, info = cs.score_function(loss, theta, P, num_samples=8, baseline=ema, return_info=True,
                                generator=torch.Generator().manual_seed(0))
    assert torch.all(info.baseline == 1.0)
    assert ema.value == pytest.approx(0.5 * 1.0 + 0.5 * info.losses.mean().item())
    g = cs.score_function(loss, theta, P, num_samples=8, baseline="ema")  # default state per loss_fn
    assert g.shape == (3,)
    default = cs.EMABaseline()  # decay 0.9 from 0
    assert default.update(torch.tensor([2.0, 4.0])) == 0.0 and default.value == pytest.approx(0.3)


def test_sst_gradient_approaches_exact_gradient_as_t_to_zero():
    P = cs.load_polytope("simplex", n=4)
    rows = diagnose(P, "entropy", temperatures=[0.2, 0.5, 1.0], num_estimates=2000, num_samples=4,
                    estimators=["sst"], seed=1)
    bias = [r["bias"] for r in rows]
    se = [r["bias_se"] for r in rows]
    assert bias[0] + 3 * se[0] < bias[2]
    assert bias[0] < bias[1] < bias[2]
    assert bias[0] < 0.25 * rows[0]["exact_norm"]


@pytest.mark.parametrize("straight_through", [False, True])
def test_sst_gradient_is_the_gradient_through_the_sst_layer(straight_through):
    # the same noise through cs.sst: the estimate is the mean of the per-sample gradients of L at
    # the layer's output (relaxed, or hard in the forward pass); a loss that is not linear in x
    # tells the point where L is evaluated apart
    P = cs.load_polytope("k_subset", n=5, k=2)
    theta = torch.tensor([0.4, -0.3, 1.1, 0.0, -0.8], dtype=torch.float64)
    c = torch.tensor([1.0, 0.0, 0.5, 0.0, 1.0], dtype=torch.float64)

    def loss(x):
        return ((x - c) ** 2).sum(-1)

    K = 6
    th = theta.expand(K, 5).clone().requires_grad_(True)
    mode = "straight_through" if straight_through else "relaxed"
    x = cs.sst(th, P, "binary_entropy", 0.5, mode=mode, generator=torch.Generator().manual_seed(5))
    (want,) = torch.autograd.grad(loss(x).sum(), th)
    got = cs.sst_gradient(loss, theta, P, "binary_entropy", 0.5, num_samples=K, straight_through=straight_through,
                          generator=torch.Generator().manual_seed(5), per_sample=True)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    assert got.abs().max() > 0.1


@pytest.mark.parametrize("name,params,reg", [
    ("simplex", {"n": 5}, "entropy"), ("k_subset", {"n": 6, "k": 2}, "exp_family"),
    ("spanning_tree", {"n": 4}, "exp_family"),
])
def test_diagnostics_show_the_expected_pattern(name, params, reg):
    P = cs.load_polytope(name, **params)
    rows = diagnose(P, reg, temperatures=[0.1, 1.0], num_estimates=300, num_samples=4,
                    estimators=["sst", "score_function", "score_function_loo"], seed=0)
    sst = {r["temperature"]: r for r in rows if r["estimator"] == "sst"}
    sf, loo = ([r for r in rows if r["estimator"] == est][0] for est in ("score_function", "score_function_loo"))
    assert sst[0.1]["variance"] > sst[1.0]["variance"]                         # variance rises as t -> 0
    assert sst[0.1]["bias"] < sst[1.0]["bias"]                                 # bias falls as t -> 0
    assert sst[1.0]["variance"] < 0.2 * sf["variance"]                         # far below REINFORCE
    assert sf["bias"] < 3 * sf["bias_se"] + 1e-12                              # REINFORCE is unbiased
    assert loo["bias"] < 3 * loo["bias_se"] + 1e-12                            # so is its leave-one-out baseline,
    assert loo["variance"] < 0.2 * sf["variance"]                              # which cuts the variance
    for r in rows:  # E‖ĝ − g‖² = E‖ĝ − mean ĝ‖² + ‖mean ĝ − g‖², and bias_se² = variance / R
        assert r["mse"] == pytest.approx(r["variance"] + r["bias"] ** 2, rel=1e-9)
        assert r["bias_se"] == pytest.approx(math.sqrt(r["variance"] / 300), rel=1e-12)


def test_monte_carlo_smt_distribution_needs_samples():
    P = cs.load_polytope("simplex", n=3)
    for bad in (0, -1, None):
        with pytest.raises(cs.InputError, match=rf"method='monte_carlo' needs num_samples >= 1, got {bad}"):
            cs.smt_distribution(P, torch.zeros(3), method="monte_carlo", num_samples=bad)


def test_estimator_input_errors():
    P = cs.load_polytope("k_subset", n=4, k=2)
    theta = torch.zeros(4, dtype=torch.float64)
    with pytest.raises(cs.InputError, match=r"loss_fn must map structures \(\*batch, 4\) to losses \(\*batch,\)"):
        cs.score_function(lambda x: x, theta, P, num_samples=3)
    with pytest.raises(cs.InputError, match="loss_fn returned NaN"):
        cs.exact_gradient(lambda x: x.sum(-1) * float("nan"), theta, P)
    with pytest.raises(cs.InputError, match="needs num_samples >= 2"):
        cs.score_function(lambda x: x.sum(-1), theta, P, num_samples=1, baseline="loo")
    with pytest.raises(cs.InputError, match=r"theta must have exactly the polytope's shape \(4,\)"):
        cs.exact_gradient(lambda x: x.sum(-1), torch.zeros(2, 4), P)
    with pytest.raises(cs.InputError, match="each temperature must be a finite number > 0, got 0.0"):
        diagnose(P, "exp_family", temperatures=[0.0])
    # counts: num_samples=0 gave a NaN gradient from sst_gradient; non-integers a bare TypeError
    for fn in (cs.sst_gradient, cs.score_function):
        for bad in (0, -1, 2.5, "2"):
            with pytest.raises(cs.InputError, match=rf"num_samples must be an integer >= 1, got {re.escape(repr(bad))}"):
                fn(lambda x: x.sum(-1), theta, P, num_samples=bad)
    with pytest.raises(cs.InputError, match="num_estimates must be an integer >= 2, got 1"):
        diagnose(P, "exp_family", num_estimates=1)
    with pytest.raises(cs.InputError, match="limit must be an integer >= 1, got 0"):
        cs.smt_distribution(P, theta, limit=0)
    for decay, initial, what in ((float("nan"), 0.0, "decay"), ("0.9", 0.0, "decay"), (0.9, float("nan"), "initial value")):
        with pytest.raises(cs.InputError, match=f"EMA {what} must be"):
            cs.EMABaseline(decay, initial)
    for bad in (True, 0, float("inf"), "1"):
        with pytest.raises(cs.InputError, match=f"Gumbel scale must be a finite number > 0, got {re.escape(repr(bad))}"):
            cs.Gumbel(bad)
    with pytest.raises(cs.PolytopeError, match=r"more than 100 utility orderings.*method='monte_carlo'"):
        cs.smt_distribution(cs.load_polytope("spanning_tree", n=5), torch.zeros(10), limit=100)
    with pytest.raises(cs.PolytopeError, match="not a greedy rule.*monte_carlo"):
        cs.smt_distribution(cs.load_polytope("birkhoff", n=3), torch.zeros(3, 3))
    with pytest.raises(cs.InputError, match="standard Gumbel noise, and for standard logistic noise on the hypercube"):
        cs.smt_distribution(P, theta, noise="gaussian")
    with pytest.raises(cs.InputError, match=r"got Logistic\(scale=1.0\) on .*k_subset"):
        cs.smt_distribution(P, theta, noise="logistic")
    # exact_gradient / expected_loss have no `method`: their errors point to the estimators instead
    loss = lambda x: x.sum(-1)  # noqa: E731
    for fn, args in [(cs.exact_gradient, (loss, torch.zeros(40), cs.load_polytope("k_subset", n=40, k=20))),
                     (cs.expected_loss, (loss, torch.zeros(3, 3), cs.load_polytope("birkhoff", n=3))),
                     (cs.exact_gradient, (loss, theta, P, "gaussian"))]:
        with pytest.raises(cs.ConvexSSTError, match=rf"{fn.__name__} is exact: .*average score_function or sst_gradient") as info:
            fn(*args)
        assert "method=" not in str(info.value)
    V, p = cs.smt_distribution(P, theta, noise="gaussian", method="monte_carlo", num_samples=500)
    assert abs(p.sum().item() - 1) < 1e-12


def test_numpy_and_tensor_scalars_are_accepted():
    # the usual ways of writing a number from NumPy or torch: np.int64 counts, np.float32 and
    # 0-d tensor scales, and one temperature for diagnose instead of a list
    P = cs.load_polytope("k_subset", n=4, k=2)
    theta = torch.linspace(-1, 1, 4, dtype=torch.float64)
    loss = lambda x: (x * theta).sum(-1)  # noqa: E731
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    assert torch.equal(cs.sst_gradient(loss, theta, P, num_samples=np.int64(3), generator=gen()),
                       cs.sst_gradient(loss, theta, P, num_samples=3, generator=gen()))
    assert torch.equal(cs.score_function(loss, theta, P, num_samples=torch.tensor(3), generator=gen()),
                       cs.score_function(loss, theta, P, num_samples=3, generator=gen()))
    assert cs.Gumbel(np.float32(0.5)).scale == 0.5 and cs.Gaussian(torch.tensor(2.0)).scale == 2.0
    rows = diagnose(P, "exp_family", temperatures=np.float64(0.5), num_estimates=np.int64(4), num_samples=2,
                    estimators=["sst"])
    assert [r["temperature"] for r in rows] == [0.5]


def test_cli_diagnose(tmp_path, capsys):
    assert main(["diagnose", "--polytope", "simplex", "--param", "n=3", "--regularizer", "entropy",
                 "--temperatures", "0.3", "1", "--num-estimates", "50", "--out-dir", str(tmp_path), "--no-plot"]) == 0
    assert (tmp_path / "diagnostics.csv").exists() and "score_function_loo" in (tmp_path / "diagnostics.md").read_text()


def test_cli_diagnose_plots_with_matplotlib(tmp_path, capsys):
    # the tests above pass --no-plot; the figure (bias, variance, MSE against t, the score
    # function's rows as horizontal lines) is drawn whenever matplotlib is installed (test extras)
    pytest.importorskip("matplotlib")
    assert main(["diagnose", "--polytope", "simplex", "--param", "n=3", "--regularizer", "entropy",
                 "--temperatures", "0.5", "2", "--num-estimates", "4", "--num-samples", "2",
                 "--out-dir", str(tmp_path)]) == 0
    png = tmp_path / "diagnostics.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and str(png) in capsys.readouterr().out
    md = (tmp_path / "diagnostics.md").read_text()
    assert "| sst | 0.5 |" in md and "| sst | 2 |" in md and "| score_function | — |" in md


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_estimators_work_in_evaluation_modes(mode):
    # they differentiate inside; under inference_mode autograd raised "element 0 of tensors does
    # not require grad" (theta made there is an inference tensor too)
    P = cs.load_polytope("k_subset", n=5, k=2)
    theta = torch.randn(5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def loss(x):
        return (x * torch.arange(5.0, dtype=x.dtype)).sum(-1)

    def run():
        gen = torch.Generator().manual_seed(1)
        return [cs.score_function(loss, theta.clone(), P, num_samples=4, generator=gen),
                cs.sst_gradient(loss, theta.clone(), P, num_samples=4, generator=gen),
                cs.exact_gradient(loss, theta.clone(), P)]

    want = run()
    with mode():
        got = run()
        rows = cs.diagnose("simplex", num_estimates=4, temperatures=(1.0,))
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert rows and all(math.isfinite(r["mse"]) for r in rows)


@pytest.mark.parametrize("temperatures, want", [(0.5, [0.5]), (torch.tensor(0.5), [0.5]), (np.array(0.5), [0.5]),
                                                ([0.5, 2.0], [0.5, 2.0]), (torch.tensor([0.5, 2.0]), [0.5, 2.0])])
def test_diagnose_takes_one_temperature_or_several(temperatures, want):
    # a 0-d tensor or array is one temperature (iterating it raised TypeError)
    rows = cs.diagnose("k_subset", "binary_entropy", temperatures=temperatures, num_estimates=2, num_samples=2,
                       estimators=["sst"])
    assert [r["temperature"] for r in rows] == want


def test_diagnose_defaults(tmp_path):
    # temperatures 0.1, 0.2, 0.5, 1 and 2, the command line's too (test_readme_and_cli); every
    # estimator; the report's folder is made with its parents
    rows = cs.diagnose("simplex", num_estimates=2, num_samples=2)
    assert [(r["estimator"], r["temperature"]) for r in rows] == [
        (name, t) for name in ("sst", "straight_through") for t in (0.1, 0.2, 0.5, 1.0, 2.0)
    ] + [("score_function", None), ("score_function_loo", None)]
    paths = write_report(rows, tmp_path / "a" / "b", "title", plot=False)
    assert [p.name for p in paths] == ["diagnostics.csv", "diagnostics.md"] and all(p.is_file() for p in paths)


def test_write_report_without_matplotlib_says_so(tmp_path, monkeypatch, capsys):
    import sys

    rows = cs.diagnose("simplex", temperatures=1.0, num_estimates=2, num_samples=2, estimators=["sst"])
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    paths = write_report(rows, tmp_path, "title")
    assert [p.name for p in paths] == ["diagnostics.csv", "diagnostics.md"] and not (tmp_path / "diagnostics.png").exists()
    assert "matplotlib is not installed: no plot (pip install 'convex_sst[examples]')" in capsys.readouterr().out
