"""The SST module and function: noise, modes, reproducibility, gradients."""

import math
import subprocess
import sys

import pytest
import torch

import convex_sst as cs


def test_gumbel_max_frequencies_are_softmax():
    P = cs.load_polytope("simplex", n=4)
    theta = torch.tensor([0.5, -1.0, 1.0, 0.0], dtype=torch.float64)
    N = 20000
    x = cs.sst(theta.expand(N, 4), P, mode="hard", generator=torch.Generator().manual_seed(0))
    freq = x.mean(0)
    p = torch.softmax(theta, 0)
    se = (p * (1 - p) / N).sqrt()
    assert torch.all((freq - p).abs() < 4 * se)


def test_noise_is_reproducible_with_generator_and_noise_objects():
    P = cs.load_polytope("k_subset", n=5, k=2)
    theta = torch.zeros(3, 5, dtype=torch.float64)
    layer = cs.SST(P, "binary_entropy", 0.5)
    a = layer(theta, generator=torch.Generator().manual_seed(7))
    b = layer(theta, generator=torch.Generator().manual_seed(7))
    c = layer(theta, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    g = cs.Gumbel().sample((100000,), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert abs(g.mean().item() - 0.5772156649) < 0.02 and abs(g.var().item() - math.pi ** 2 / 6) < 0.05
    assert torch.isfinite(g).all()
    n = cs.Gaussian(2.0).sample((100000,), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert abs(n.std().item() - 2.0) < 0.03


def _dist(name, scale):
    zero = torch.tensor(0.0, dtype=torch.float64)
    return getattr(torch.distributions, name)(zero, zero + scale)


@pytest.mark.parametrize("noise, dist", [
    (cs.Gumbel(), _dist("Gumbel", 1.0)),
    (cs.Gumbel(0.5), _dist("Gumbel", 0.5)),
    (cs.Gaussian(), _dist("Normal", 1.0)),
    (cs.Gaussian(2.5), _dist("Normal", 2.5)),
])
def test_noise_log_prob_and_moments_match_torch_distributions(noise, dist, monkeypatch):
    # log_prob is the score-function estimator's score; a wrong scale there biases it silently
    g = torch.linspace(-4.0, 6.0, 21, dtype=torch.float64)
    assert torch.allclose(noise.log_prob(g), dist.log_prob(g), rtol=1e-13, atol=1e-13)
    N = 200000
    s = noise.sample((N,), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert abs(s.mean().item() - float(dist.mean)) < 5 * float(dist.stddev) / math.sqrt(N)
    assert abs(s.std().item() / float(dist.stddev) - 1) < 0.01
    _finite_at_the_ends_of_the_uniform_draw(noise, monkeypatch)


def _finite_at_the_ends_of_the_uniform_draw(noise, monkeypatch):
    """Samples are finite in every dtype even where the uniform draw is exactly 0 or 1 (torch.rand
    on the CPU never returns 1, but it returns 0 in 2 of 1 000 draws in bfloat16, 2.5 of 10 000
    in float16)."""
    def ends(shape, dtype=None, device=None, generator=None):
        return torch.tensor([0.0, 1.0], dtype=dtype, device=device).repeat(3)

    monkeypatch.setattr(torch, "rand", ends)
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        assert bool(torch.isfinite(noise.sample((6,), dtype=dtype)).all()), dtype
    monkeypatch.undo()


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_logistic_noise_log_prob_moments_and_independent_bits(scale, monkeypatch):
    # against torch's logistic distribution (the logit of a uniform, scaled), and its moments:
    # mean 0, standard deviation s·π/√3
    noise = cs.Logistic(scale)
    D = torch.distributions
    uniform = D.Uniform(torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))
    dist = D.TransformedDistribution(uniform, [D.SigmoidTransform().inv, D.AffineTransform(0.0, scale)])
    g = torch.linspace(-6.0, 6.0, 25, dtype=torch.float64)
    assert torch.allclose(noise.log_prob(g), dist.log_prob(g), rtol=1e-12, atol=1e-12)
    N = 200000
    s = noise.sample((N,), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    sd = scale * math.pi / math.sqrt(3)
    assert abs(s.mean().item()) < 5 * sd / math.sqrt(N) and abs(s.std().item() / sd - 1) < 0.01
    assert torch.isfinite(noise.sample((N,), dtype=torch.float32)).all()
    _finite_at_the_ends_of_the_uniform_draw(noise, monkeypatch)
    # independent bits: [θ + G > 0] is Bernoulli(σ(θ / s)), not Gumbel's 1 - exp(-e^θ)
    P = cs.load_polytope("hypercube", n=3)
    theta = torch.tensor([-1.0, 0.0, 2.0], dtype=torch.float64)
    freq = cs.sst(theta.expand(N, 3), P, mode="hard", noise=noise, generator=torch.Generator().manual_seed(2)).mean(0)
    p = torch.sigmoid(theta / scale)
    assert ((freq - p).abs() < 4 * (p * (1 - p) / N).sqrt()).all()
    assert abs(freq[1].item() - (1 - math.exp(-1))) > 0.1         # at θ = 0: 1/2 against 0.63
    # relaxed, with the binary entropy: the binary Concrete σ((θ + G)/t), G from the same stream
    x = cs.sst(theta.expand(4, 3), P, "binary_entropy", 0.5, noise=cs.Logistic(scale),
               generator=torch.Generator().manual_seed(3))
    G = noise.sample((4, 3), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert torch.allclose(x, torch.sigmoid((theta + G) / 0.5), rtol=1e-12, atol=1e-14)


def test_logistic_noise_by_name_exact_distribution_and_score():
    assert isinstance(cs.SST("hypercube", "binary_entropy", noise="logistic").noise, cs.Logistic)
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(cs.InputError, match="logistic scale"):
            cs.Logistic(bad)
    with pytest.raises(cs.UnknownNameError, match="available: None, gaussian, gumbel, logistic"):
        cs.SST("hypercube", noise="logstic")
    # exact: the product of σ(θ_i) over the bits; its gradient against the score function
    P = cs.load_polytope("hypercube", n=2)
    theta = torch.tensor([0.4, -0.7], dtype=torch.float64)
    V, probs = cs.smt_distribution(P, theta, noise="logistic")
    p1 = torch.sigmoid(theta)
    assert torch.allclose(probs, torch.where(V > 0.5, p1, 1 - p1).prod(1), rtol=1e-14)
    loss = lambda x: x[..., 0] * (1 + x[..., 1])  # noqa: E731
    exact = cs.exact_gradient(loss, theta, P, noise="logistic")
    assert torch.allclose(exact, torch.stack([p1[0] * (1 - p1[0]) * (1 + p1[1]), p1[0] * p1[1] * (1 - p1[1])]),
                          rtol=1e-13)
    est = cs.score_function(loss, theta, P, num_samples=200000, noise="logistic", baseline="loo",
                            generator=torch.Generator().manual_seed(4))
    assert (est - exact).abs().max() < 5e-3, (est, exact)   # 5 to 8 standard errors


@pytest.mark.parametrize("noise", [cs.Gumbel(2.0), cs.Gaussian(1.5)])
def test_score_function_with_scaled_noise_is_unbiased(noise):
    # two items: P(X = e0) = sigmoid((θ0 − θ1) / s) under Gumbel(s) noise (the Gumbel-max trick at
    # scale s), Φ((θ0 − θ1) / (s √2)) under N(0, s²); L(X) = X[0], so the gradient is its derivative
    P = cs.load_polytope("simplex", n=2)
    theta = torch.tensor([0.3, -0.2], dtype=torch.float64)
    d, s = float(theta[0] - theta[1]), noise.scale
    if isinstance(noise, cs.Gumbel):
        dp = torch.sigmoid(torch.tensor(d / s)).item() * torch.sigmoid(torch.tensor(-d / s)).item() / s
    else:
        dp = math.exp(-d * d / (4 * s * s)) / math.sqrt(2 * math.pi) / (s * math.sqrt(2))
    K = 200000
    est = cs.score_function(lambda x: x[:, 0], theta, P, num_samples=K, noise=noise,
                            generator=torch.Generator().manual_seed(2))
    assert abs(est[0].item() - dp) < 3e-3 and abs(est[1].item() + dp) < 3e-3, (est, dp)  # ~8 standard errors


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_noise_is_drawn_in_float32(dtype):
    # In bfloat16 the Gumbel noise took about 500 distinct values, so utilities tied and the
    # argmax took the first: over 1 000 items the first 10 were picked 8 times too often
    # (float16: 1.4 times). Now G and U = θ + G are float32 and results are rounded back
    n, N = 1000, 20000
    P = cs.load_polytope("simplex", n=n)
    x = cs.sst(torch.zeros(N, n, dtype=dtype), P, mode="hard", generator=torch.Generator().manual_seed(0))
    assert x.dtype == dtype and bool((x.sum(1) == 1).all())
    first = x[:, :10].sum().item()                      # Binomial(N, 1/100): 200 ± 14
    assert abs(first - 200) < 70, first
    # the same float32 stream as float32 θ gives, rounded back; every mode keeps θ's dtype and
    # passes gradients to θ
    K = cs.load_polytope("k_subset", n=6, k=2)
    theta = torch.randn(3, 6, generator=torch.Generator().manual_seed(1)).to(dtype)
    G = cs.Gumbel().sample((3, 6), generator=torch.Generator().manual_seed(2), dtype=torch.float32)
    hard = cs.sst(theta, K, mode="hard", generator=torch.Generator().manual_seed(2))
    assert torch.equal(hard, K.argmax(theta.float() + G).to(dtype))
    for mode in ("relaxed", "straight_through"):
        th = theta.clone().requires_grad_(True)
        x = cs.sst(th, K, "entropy", 0.5, mode=mode, generator=torch.Generator().manual_seed(2))
        assert x.dtype == dtype
        relaxed = cs.relax(theta.float() + G, K, "entropy", 0.5)
        want = relaxed if mode == "relaxed" else K.argmax(theta.float() + G)
        assert torch.allclose(x.float(), want, atol=1e-2)
        (x.float() * torch.arange(6.0)).sum().backward()
        assert th.grad.dtype == dtype and bool(torch.isfinite(th.grad.float()).all()) and th.grad.abs().sum() > 0
    # the estimators hand the loss θ's dtype
    seen = []
    loss = lambda x: seen.append(x.dtype) or x.float().sum(-1)  # noqa: E731
    cs.score_function(loss, theta[0], K, num_samples=4)
    cs.sst_gradient(loss, theta[0], K, "entropy", num_samples=2, straight_through=True)
    V, _ = cs.smt_distribution(K, theta[0], method="monte_carlo", num_samples=50)
    assert set(seen) == {dtype} and V.dtype == dtype


def test_custom_noise_and_no_noise():
    class Zero(cs.Noise):
        def sample(self, shape, generator=None, dtype=torch.float32, device=None):
            return torch.zeros(shape, dtype=dtype, device=device)

    P = cs.load_polytope("simplex", n=3)
    theta = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    x1 = cs.SST(P, "entropy", 1.0, noise=Zero())(theta)
    x2 = cs.SST(P, "entropy", 1.0, noise=None)(theta)
    assert torch.allclose(x1, torch.softmax(theta, 0), atol=1e-6) and torch.allclose(x1, x2)


def test_default_temperature_is_one():
    P = cs.load_polytope("k_subset", n=5, k=2)
    theta = torch.randn(3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    want = cs.sst(theta, P, "binary_entropy", 1.0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(cs.sst(theta, P, "binary_entropy", generator=torch.Generator().manual_seed(1)), want)
    assert torch.equal(cs.SST(P, "binary_entropy")(theta, generator=torch.Generator().manual_seed(1)), want)
    assert torch.equal(cs.relax(theta, P, "binary_entropy"), cs.relax(theta, P, "binary_entropy", 1.0))


def test_layer_checks_a_scalar_tensor_temperature_when_built():
    P = cs.load_polytope("simplex", n=3)
    for t in (torch.tensor(0.0), torch.tensor(-1.0), torch.tensor(float("nan"))):
        with pytest.raises(cs.InputError, match="temperature must be finite and > 0"):
            cs.SST(P, "entropy", t)
    cs.SST(P, "entropy", torch.tensor([1.0, -1.0]))  # per-sample temperatures: checked per call


def test_modes_hard_relaxed_straight_through():
    P = cs.load_polytope("k_subset", n=5, k=2)
    theta = torch.randn(4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    w = torch.randn(4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    outs, grads = {}, {}
    for mode in ("relaxed", "hard", "straight_through"):
        layer = cs.SST(P, "binary_entropy", 0.5, mode=mode)
        x = layer(theta, generator=torch.Generator().manual_seed(3))
        outs[mode] = x
        if mode != "hard":
            (grads[mode],) = torch.autograd.grad((x * w).sum(), theta)
    assert not outs["hard"].requires_grad
    assert torch.equal(outs["straight_through"].detach(), outs["hard"])      # forward: hard sample
    assert torch.all(outs["hard"].sum(-1) == 2)
    assert torch.allclose(grads["straight_through"], grads["relaxed"])       # backward: relaxed
    assert grads["relaxed"].abs().sum() > 0


def test_learnable_temperature_inside_a_model():
    P = cs.load_polytope("simplex", n=4)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.logits = torch.nn.Linear(3, 4).double()
            self.log_t = torch.nn.Parameter(torch.tensor(0.0, dtype=torch.float64))

        def forward(self, inp, gen):
            return cs.sst(self.logits(inp), P, "entropy", self.log_t.exp(), generator=gen)

    m = Model()
    x = m(torch.randn(5, 3, dtype=torch.float64), torch.Generator().manual_seed(0))
    (x[:, 0]).sum().backward()
    assert m.log_t.grad is not None and m.logits.weight.grad.abs().sum() > 0


def test_string_polytope_and_repr():
    layer = cs.SST("simplex", "entropy", 0.3)
    assert "polytope=Polytope('simplex', n=5, shape=(5,))" in repr(layer) and layer.polytope.shape == (5,)
    assert "temperature=0.3," in repr(layer)
    learnable = cs.SST("simplex", "entropy", torch.nn.Parameter(torch.tensor(0.5)))
    assert "temperature=0.5 (learnable)," in repr(learnable) and "Parameter containing" not in repr(learnable)
    per_sample = cs.SST("simplex", "entropy", torch.full((8,), 2.0))
    assert "temperature=tensor of shape (8,)," in repr(per_sample)
    with pytest.raises(cs.InputError, match="polytope must be a Polytope or a name"):
        cs.relax(torch.zeros(3), 3)
    P = cs.load_polytope("simplex", n=3)
    with pytest.raises(cs.InputError, match="got a Tensor; hint: check the argument order.*smt_distribution"):
        cs.smt_distribution(torch.zeros(3), P)  # (polytope, theta) the other way round


@pytest.mark.skipif(torch.__version__ < "2.4", reason="torch 2.1's dynamo fails on this model with dynamic "
                    "shapes (an AssertionError in symbolic_shapes); checked on 2.4.1 and 2.13")
@pytest.mark.parametrize("name, reg", [("k_subset", "exp_family"), ("birkhoff", "entropy")])
def test_sst_layer_under_torch_compile(name, reg):
    # relax and argmax are graph breaks (their solvers branch on values; dynamo tracing into the
    # k-subset path's autograd.Function failed), and the noise is drawn without an explicit
    # generator=None, which dynamo cannot trace with dynamic shapes. Straight-through mode runs
    # both the relaxation and the hard argmax.
    torch._dynamo.reset()
    P = cs.load_polytope(name, **({"n": 6} if name != "k_subset" else {"n": 6, "k": 2}))
    lin = torch.nn.Linear(P.size, P.size).double()
    weights = torch.arange(P.size, dtype=torch.float64).reshape(P.shape)

    def model(x, noise):
        layer = cs.SST(P, reg, 0.5, mode="straight_through", noise=noise)
        return (layer(lin(x).reshape((-1,) + P.shape)) * weights).sum()

    noisy = torch.compile(lambda x: model(x, "gumbel"), backend="aot_eager", dynamic=True)
    exact = torch.compile(lambda x: model(x, None), backend="aot_eager", dynamic=True)
    for batch in (3, 4):
        x = torch.randn(batch, P.size, dtype=torch.float64)
        loss = noisy(x)
        loss.backward()
        assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in lin.parameters())
        got = torch.autograd.grad(exact(x), list(lin.parameters()))
        want = torch.autograd.grad(model(x, None), list(lin.parameters()))
        assert all(torch.allclose(a, b, rtol=1e-12, atol=1e-12) for a, b in zip(got, want))


@pytest.mark.skipif(not callable(getattr(torch.compiler, "is_compiling", None)),
                    reason="torch < 2.3 has no torch.compiler.is_compiling: relax and argmax are disabled at import")
def test_eager_use_does_not_import_dynamo():
    # torch.compiler.disable imports torch._dynamo when it decorates (about 0.65 s, a third of
    # `import convex_sst`); relax and argmax are disabled lazily, on the first compiled call
    # (that path is test_sst_layer_under_torch_compile)
    code = ("import sys, torch, convex_sst as cs; P = cs.load_polytope('k_subset', n=5, k=2); "
            "u = torch.randn(3, 5); cs.relax(u, P, 'exp_family'); P.argmax(u); "
            "cs.SST(P, 'entropy', mode='straight_through')(u); print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_import_leaves_heavy_modules_for_first_use():
    # cvxpy and cvxpylayers load with the generic path, scipy.optimize with the Hungarian argmax
    code = ("import sys, convex_sst; "
            "print(sorted(m for m in ('cvxpy', 'cvxpylayers', 'scipy.optimize') if m in sys.modules)); "
            "import torch; P = convex_sst.load_polytope('birkhoff', n=3); P.argmax(torch.randn(3, 3)); "
            "print('scipy.optimize' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["[]", "True"]


@pytest.mark.parametrize("name, reg", [("k_subset", "exp_family"), ("birkhoff", "entropy"),
                                       ("spanning_tree", "binary_entropy")])
def test_models_with_sst_layers_copy_and_pickle(name, reg):
    # copy.deepcopy (EMA and target networks), torch.save(model) and worker processes pickle
    # the layer; its polytope holds a HiGHS handle and caches, its regularizer lambdas
    import copy
    import io
    import pickle

    P = cs.load_polytope(name, **({"n": 5} if name != "k_subset" else {"n": 5, "k": 2}))
    layer = cs.SST(P, reg, torch.nn.Parameter(torch.tensor(0.5, dtype=torch.float64)), mode="straight_through")
    x = torch.randn((3,) + P.shape, dtype=torch.float64)
    layer(x)  # fills the caches (compiled solver state, device tensors)

    def saved(m):
        buf = io.BytesIO()
        torch.save(m, buf)
        buf.seek(0)
        return torch.load(buf, weights_only=False)

    for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer)), saved(layer)):
        assert clone.regularizer is layer.regularizer  # registered regularizers travel by name
        assert clone.polytope is not layer.polytope and clone.polytope.shape == P.shape
        got = clone(x, generator=torch.Generator().manual_seed(1))
        assert torch.equal(got, layer(x, generator=torch.Generator().manual_seed(1)))
