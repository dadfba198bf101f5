"""Fast paths against the generic layer, brute force, gradcheck; combinatorial argmax vs LP."""

import math
import warnings
import zlib

import numpy as np
import pytest
import torch
from conftest import RELAX_CASES

import convex_sst as cs
from convex_sst.fast import sinkhorn
from convex_sst.regularizers import get_regularizer
from convex_sst.testing import brute_force_marginals

FAST = cs.available_fast_paths()
GENERIC_TWINS = [(p, r) for p, r in FAST if get_regularizer(r).cvxpy is not None]
EXP_FAMILY = [(p, r) for p, r in FAST if r == "exp_family"]
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")


def small(name):
    return cs.load_polytope(name, **RELAX_CASES[name])


def test_fast_paths_cover_the_issue_list():
    expected = {("simplex", "entropy"), ("simplex", "quadratic"), ("hypercube", "binary_entropy"),
                ("hypercube", "quadratic"), ("k_subset", "binary_entropy"), ("k_subset", "quadratic"),
                ("k_subset", "exp_family"), ("birkhoff", "entropy"), ("spanning_tree", "exp_family"),
                ("arborescence", "exp_family")}
    assert expected <= set(FAST)


@pytest.mark.parametrize("name,reg", GENERIC_TWINS)
@pytest.mark.parametrize("t", [1.0, 0.5])
def test_fast_equals_generic(name, reg, t, gen):
    P = small(name)
    u = torch.randn((4,) + P.shape, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn((4,) + P.shape, generator=gen, dtype=torch.float64)
    xf = cs.relax(u, P, reg, t, backend="fast")
    xg = cs.relax(u, P, reg, t, backend="generic")
    assert (xf - xg).abs().max() < 1e-5
    (gf,) = torch.autograd.grad((xf * w).sum(), u)
    (gg,) = torch.autograd.grad((xg * w).sum(), u)
    assert (gf - gg).abs().max() < 1e-4


@pytest.mark.parametrize("name,reg", EXP_FAMILY)
def test_exp_family_equals_brute_force(name, reg, gen):
    cases = {"k_subset": [{"n": 8, "k": 3}, {"n": 5, "k": 1}, {"n": 7, "k": 6}],
             "spanning_tree": [{"n": 4}, {"n": 5}, {"n": 5, "edges": [[0, 1], [1, 2], [2, 3], [3, 4], [4, 0], [0, 2]]}],
             "arborescence": [{"n": 4}, {"n": 5, "root": 3}],
             "simplex": [{"n": 5}], "hypercube": [{"n": 4}],
             "dag_path": [{}, {"n": 6, "edges": [[0, 1], [0, 2], [1, 2], [1, 3], [2, 3], [3, 4], [2, 4], [4, 5], [3, 5],
                                                 [0, 5], [1, 4]], "source": 0, "target": 5},
                          {"n": 5, "edges": [[0, 1], [1, 2], [3, 1], [2, 4], [3, 4]], "source": 0, "target": 4}],
             "correlated_k_subset": [{"n": 6, "k": 3}, {"n": 5, "k": 1}, {"n": 7, "k": 5}, {"n": 4, "k": 4}]}[name]
    for params in cases:
        P = cs.load_polytope(name, **params)
        u = torch.randn((3,) + P.shape, generator=gen, dtype=torch.float64, requires_grad=True)
        w = torch.randn((3,) + P.shape, generator=gen, dtype=torch.float64)
        x = cs.relax(u, P, reg, 0.7)
        ref = brute_force_marginals(u, P, 0.7)
        assert (x - ref).abs().max() < 1e-10
        (g,) = torch.autograd.grad((x * w).sum(), u)
        (gr,) = torch.autograd.grad((ref * w).sum(), u)
        assert (g - gr).abs().max() < 1e-8


@pytest.mark.parametrize("name,reg", FAST)
@pytest.mark.parametrize("check", [torch.autograd.gradcheck, torch.autograd.gradgradcheck])
def test_gradcheck(name, reg, check, gen):
    # gradgradcheck: second derivatives (double backward, Hessian-vector products, gradient
    # penalties). The closed-form backward passes are differentiable functions of the output
    # or are recomputed differentiably under create_graph=True; before, they were
    # once_differentiable and a gradient penalty silently missed every term through the solver
    P = small(name)
    u = torch.randn((2,) + P.shape, generator=gen, dtype=torch.float64, requires_grad=True)
    t = torch.tensor(0.9, dtype=torch.float64, requires_grad=True)
    assert check(lambda u, t: cs.relax(u, P, reg, t, backend="fast"), (u, t))


@pytest.mark.parametrize("name, params, method", [
    ("k_subset", {"n": 7, "k": 3}, "tree"),                # the product tree (rows the DFT hands over)
    ("k_subset", {"n": 7, "k": 5}, "tree"),                # the tree of the complements' laws
    ("spanning_tree", {"n": 4}, "inverse"), ("spanning_tree", {"n": 4}, "elimination"),
    ("arborescence", {"n": 4}, "inverse"), ("arborescence", {"n": 4}, "elimination")])
def test_gradgradcheck_of_every_exp_family_route(name, params, method, gen, monkeypatch):
    if method == "tree":
        import convex_sst.fast as fast

        monkeypatch.setattr(fast, "_DFT_MIN_PK", 2.0)   # P(S = k) ≤ 1: every row to the tree
        method = None
    P = cs.load_polytope(name, **params)
    u = torch.randn((2,) + P.shape, generator=gen, dtype=torch.float64, requires_grad=True)
    opts = {} if method is None else {"method": method}
    assert torch.autograd.gradgradcheck(lambda u: cs.relax(u, P, "exp_family", 0.8, **opts), (u,))


@pytest.mark.parametrize("n, k, scale", [(60, 20, 3.0), (60, 45, 3.0), (129, 5, 30.0), (160, 80, 1.0), (30, 10, 1e4),
                                         (30, 25, 1e120)])
def test_k_subset_second_derivatives_match_the_log_space_tree(n, k, scale, gen):
    """Double backward of both k-subset routes (the product tree at the forward's τ, by
    autograd) against Hessian-vector products through the log-space tree (which took 7.7 s at
    n = 300, k = 150 for 4 rows), including the gradient in the incoming vector; at scales
    1e4 and 1e120 too (logaddexp's second derivative was NaN below -710 there)."""
    import convex_sst.fast as fast

    u = scale * torch.randn(4, n, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, n, generator=gen, dtype=torch.float64, requires_grad=True)
    v = torch.randn(4, n, generator=gen, dtype=torch.float64)
    ref = fast._hessian_vjp(lambda x: fast._log_e_k_banded(x, k), u, w)
    ref_u, ref_w = torch.autograd.grad((ref * v).sum(), (u, w))
    for route in (fast._k_subset_tree, fast._k_subset_dft):
        (h,) = torch.autograd.grad((route(u, k) * w).sum(), u, create_graph=True)
        gu, gw = torch.autograd.grad((h * v).sum(), (u, w))
        assert (h - ref).abs().max() < 1e-11
        assert (gu - ref_u).abs().max() < 1e-10 and (gw - ref_w).abs().max() < 1e-11


def test_gradient_penalty_matches_brute_force(gen):
    # ‖∇_u (wᵀx)‖² with x linear in the loss: the incoming gradient w is a constant, the case
    # where once_differentiable returned a constant gradient and the penalty's gradient was 0
    P = cs.load_polytope("spanning_tree", n=4)
    u = torch.randn((3,) + P.shape, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn((3,) + P.shape, generator=gen, dtype=torch.float64)
    grads = []
    for f in (lambda v: cs.relax(v, P, "exp_family", 0.7), lambda v: brute_force_marginals(v, P, 0.7)):
        (g,) = torch.autograd.grad((f(u) * w).sum(), u, create_graph=True)
        grads.append(torch.autograd.grad(g.square().sum(), u)[0])
    assert grads[1].abs().max() > 1e-3
    assert (grads[0] - grads[1]).abs().max() < 1e-10


@pytest.mark.parametrize("backend", ["torch", "generic"])
def test_second_derivatives_through_solvers_raise(backend, gen):
    P = cs.load_polytope("k_subset", n=5, k=2)
    u = torch.randn(2, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    x = cs.relax(u, P, "binary_entropy", 0.7, backend=backend)
    (g,) = torch.autograd.grad((x * torch.randn(2, 5, generator=gen, dtype=torch.float64)).sum(), u, create_graph=True)
    with pytest.raises(cs.NotSupportedError, match=rf"second derivatives through the .*{backend}.* are not supported"):
        (g.square().sum() + u.square().sum()).backward()   # not silently the second term only
    x = cs.relax(u, P, "binary_entropy", 0.7, backend=backend)   # first derivatives are unaffected
    (g1,) = torch.autograd.grad(x[:, 0].sum(), u)
    (g2,) = torch.autograd.grad(cs.relax(u, P, "binary_entropy", 0.7, backend="fast")[:, 0].sum(), u)
    assert (g1 - g2).abs().max() < 1e-4


@pytest.mark.parametrize("name,reg", FAST)
def test_jacobian_symmetric_psd(name, reg, gen):
    P = small(name)
    u = torch.randn(P.shape, generator=gen, dtype=torch.float64)
    J = torch.autograd.functional.jacobian(lambda v: cs.relax(v, P, reg, 1.0, backend="fast").reshape(-1), u)
    J = J.reshape(P.size, P.size)
    assert (J - J.T).abs().max() < 1e-8
    assert torch.linalg.eigvalsh(0.5 * (J + J.T)).min() > -1e-8


@pytest.mark.parametrize("name,reg", FAST)
def test_float32_and_batch_shapes(name, reg, gen):
    P = small(name)
    u = torch.randn((2, 3) + P.shape, generator=gen, dtype=torch.float64)
    x64 = cs.relax(u, P, reg, 0.5, backend="fast")
    x32 = cs.relax(u.float(), P, reg, 0.5, backend="fast")
    assert x32.dtype == torch.float32 and x32.shape == (2, 3) + P.shape
    assert (x32.double() - x64).abs().max() < 1e-4
    loop = torch.stack([cs.relax(u[0, j], P, reg, 0.5, backend="fast") for j in range(3)])
    assert (loop - x64[0]).abs().max() < 1e-10


@pytest.mark.parametrize("name,reg", FAST)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_huge_range_tiny_temperature_is_finite(name, reg, dtype, gen):
    P = small(name)
    u = (1e3 * torch.randn((3,) + P.shape, generator=gen, dtype=torch.float64)).to(dtype).requires_grad_()
    x = cs.relax(u, P, reg, 1e-3, backend="fast")
    assert torch.isfinite(x).all()
    (g,) = torch.autograd.grad((x * torch.linspace(-1, 1, P.size, dtype=dtype).reshape(P.shape)).sum(), u)
    assert torch.isfinite(g).all()
    assert bool(P.contains(x.detach().double(), atol=1e-3).all())
    if name not in ("spanning_tree", "arborescence"):  # the matrix-tree paths clip at max_range
        assert (x.double() - P.argmax(u.detach()).double()).abs().max() < 1e-2


@pytest.mark.parametrize("name", ["spanning_tree", "arborescence"])
def test_max_range_clips_the_scaled_logits_from_below(name, gen):
    # max_range r (the paper's clipping, off by default) is the relaxation of
    # θ' = max(θ, max θ − r), θ = u / t per sample, the clipped entries without gradient; it had
    # only its argument checked
    P = small(name)
    t, r = 0.5, 2.0
    u = (2 * torch.randn((3,) + P.shape, generator=gen, dtype=torch.float64)).requires_grad_()
    c = torch.randn((3,) + P.shape, generator=gen, dtype=torch.float64)
    x = cs.relax(u, P, "exp_family", t, max_range=r)
    theta = u / t
    floor = theta.flatten(1).amax(1).detach().reshape((-1,) + (1,) * len(P.shape)) - r
    clipped = theta < floor
    assert 0 < int(clipped.sum()) < u.numel()
    ref = cs.relax(torch.maximum(theta, floor) * t, P, "exp_family", t)
    torch.testing.assert_close(x, ref, rtol=0, atol=1e-12)
    assert (x - cs.relax(u, P, "exp_family", t)).abs().max() > 1e-3  # the clipping matters here
    (g,) = torch.autograd.grad((x * c).sum(), u)
    (g_ref,) = torch.autograd.grad((ref * c).sum(), u)
    torch.testing.assert_close(g, g_ref, rtol=0, atol=1e-12)
    assert bool((g[clipped] == 0).all())


@pytest.mark.parametrize("name,reg", FAST)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_logits_near_the_dtype_range_give_the_hard_limit(name, reg, dtype, gen):
    # regressions: Sinkhorn divided by zero (its logit spread overflowed float32), and the
    # k-subset log-space tree returned subsets of the wrong size once logits spread past its
    # "log 0" (1e30); now every fast path reaches the hard limit up to the dtype's range, with no
    # warning (the entropy on arborescences by its proven limit from 1e25 on)
    P = small(name)
    fmax = torch.finfo(dtype).max
    for scale in (1e10, 1e25, fmax / 2**60, fmax / 16, fmax / 1.5):
        u = torch.randn((3,) + P.shape, generator=gen, dtype=torch.float64)
        u = (u / u.abs().max()).to(dtype).requires_grad_()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", cs.SolverWarning)
            x = cs.relax(u, P, reg, 1.0 / scale, backend="fast")
        (g,) = torch.autograd.grad((x * torch.randn(x.shape, generator=gen, dtype=dtype)).sum(), u)
        assert torch.isfinite(g).all(), (name, reg, scale)
        assert not caught, (name, reg, scale)
        assert (x.double() - P.argmax(u.detach()).double()).abs().max() < 1e-6, (name, reg, scale)


@pytest.mark.parametrize("reg", ["entropy", "binary_entropy", "quadratic"])
def test_capped_simplex_float32_sums_to_k(reg, gen):
    # the root finder ran in float32, where Σx alone carries n·eps of rounding: |Σx − k| reached
    # 9e-4 at n = 1000, k = 100; it now runs in float64 and the result is rounded
    P = cs.load_polytope("k_subset", n=1000, k=100)
    u = torch.randn(8, 1000, generator=gen)
    for t in (1.0, 0.01):
        x = cs.relax(u, P, reg, t)
        assert x.dtype == torch.float32
        assert (x.double().sum(-1) - 100).abs().max() < 2e-5, t
        # u / t itself is rounded to float32 (3e-5 in the logits at t = 0.01)
        assert (x.double() - cs.relax(u.double(), P, reg, t)).abs().max() < (1e-6 if t == 1.0 else 5e-5), t


@pytest.mark.parametrize("t", [1.0, 0.1, 1e-3])
def test_sinkhorn_float32_is_accurate(t, gen):
    # float32's log-domain resolution floored Sinkhorn's tolerance at 100·eps·max|θ|: at t = 1e-3
    # (n = 50) rows and columns summed to 1 ± 5e-2 with no warning; such inputs now run in float64.
    # At t = 1 (float32 throughout) the backward's ridge cost 2e-3 relative error in the gradient.
    P = cs.load_polytope("birkhoff", n=50)
    u = torch.randn(4, 50, 50, generator=gen, dtype=torch.float64)
    w = torch.randn(4, 50, 50, generator=gen, dtype=torch.float64)
    u32 = u.float().requires_grad_()
    x32 = cs.relax(u32, P, "entropy", t)
    (g32,) = torch.autograd.grad((x32 * w.float()).sum(), u32)
    u64 = u.float().double().requires_grad_()
    x64 = cs.relax(u64, P, "entropy", t)
    (g64,) = torch.autograd.grad((x64 * w).sum(), u64)
    assert x32.dtype == g32.dtype == torch.float32
    assert (x32.sum(-1) - 1).abs().max() < 1e-5 and (x32.sum(-2) - 1).abs().max() < 1e-5
    assert (x32.double() - x64).abs().max() < 1e-5
    # near a permutation (t = 1e-3) the Jacobian is ill-conditioned: float32's tolerance shows
    assert (g32.double() - g64).abs().max() < (1e-5 if t >= 0.1 else 1e-4) * g64.abs().max()


@pytest.mark.parametrize("n,k", [(12, 4), (200, 20)])
def test_k_subset_exp_family_any_logit_spread(n, k, gen):
    # the DFT (n = 12) and product-tree (n = 200) routes with logits spread far beyond the linear
    # tree's range: the log-space tree, banded around the k-th largest logit, against brute force
    # (n = 12) and against the hard top-k once the spread dwarfs every gap
    P = cs.load_polytope("k_subset", n=n, k=k)
    for scale in (3e2, 3e3, 1e30, 1e300):
        u = scale * torch.linspace(-1, 1, n, dtype=torch.float64)[torch.randperm(n, generator=gen)].repeat(2, 1)
        u[1] += torch.randn(n, generator=gen, dtype=torch.float64)  # ties broken by O(1) noise
        x = cs.relax(u, P, "exp_family")
        assert (x.sum(-1) - k).abs().max() < 1e-9
        if n <= 12:
            ref = cs.testing.brute_force_marginals(u, P)
            assert (x - ref).abs().max() < 1e-12, scale
        if scale >= 1e30:
            assert (x - P.argmax(u)).abs().max() < 1e-12, scale
    # where the band is active but the gaps are O(1): k-th and (k+1)-th close, the rest far away
    u = torch.cat([torch.full((k - 2,), 5e3), torch.tensor([0.3, 0.0, -0.2]), torch.full((n - k - 1,), -5e3)])
    u = (u + torch.linspace(0, 1, n)).double()[None]
    ref = torch.softmax(torch.stack([u[0, k - 2 : k + 1].sum() - u[0, j] for j in range(k - 2, k + 1)]), 0)
    x = cs.relax(u, P, "exp_family")[0]
    assert (x[: k - 2] - 1).abs().max() < 1e-12 and x[k + 1 :].abs().max() < 1e-12
    assert (x[k - 2 : k + 1] - (1 - ref)).abs().max() < 1e-12  # 2 of the 3 middle items, by their weights


@pytest.mark.parametrize("scale", [1.0, 10.0, 100.0])
def test_k_subset_exp_family_float32_matches_float64(gen, scale):
    # float32 (computed in float64) must never overflow in the backward: the last row (a
    # regression of the product tree) has two logits ~50 apart above the rest
    P = cs.load_polytope("k_subset", n=10, k=4)
    u = scale * torch.randn(64, 10, generator=gen, dtype=torch.float64)
    u = torch.cat([u, torch.tensor([[117.9, -6.4, -33.7, -23.4, -20.0, -7.4, -12.1, -9.6, 64.1, -8.5]],
                                   dtype=torch.float64)])
    w = torch.randn(u.shape, generator=gen, dtype=torch.float64)
    grads = []
    for dtype in (torch.float32, torch.float64):
        ud = u.to(dtype).requires_grad_()
        x = cs.relax(ud, P, "exp_family", 1.0)
        (g,) = torch.autograd.grad((x * w.to(dtype)).sum(), ud)
        assert torch.isfinite(x).all() and torch.isfinite(g).all()
        grads.append((x.double(), g.double()))
    assert (grads[0][0] - grads[1][0]).abs().max() < 2e-4
    assert (grads[0][1] - grads[1][1]).abs().max() < 1e-3


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_autograd_fallbacks_work_without_grad_mode(mode, gen, monkeypatch):
    # the exact fallbacks take μ = ∇ log Z by autograd; under inference_mode (evaluation loops)
    # autograd cannot record inference tensors, and these paths raised "element 0 of tensors
    # does not require grad"
    from convex_sst import fast

    calls = []
    for fn in ("log_partition_arborescences", "log_elementary_symmetric"):
        real = getattr(fast, fn)
        monkeypatch.setattr(fast, fn, lambda *a, real=real: calls.append(1) or real(*a))
    for name in ("spanning_tree", "arborescence"):
        P = cs.load_polytope(name, n=5)
        u = 30.0 * torch.randn((8,) + P.shape, generator=gen, dtype=torch.float64)
        ref = cs.relax(u, P, "exp_family")
        before = len(calls)
        with mode():
            x = cs.relax(u, P, "exp_family")
        assert len(calls) > before  # the fallback ran
        assert torch.equal(x, ref) and not x.requires_grad
    u = 3000.0 * torch.arange(6, dtype=torch.float64).repeat(2, 1)
    monkeypatch.setattr(fast, "_TREE_MIN_PK", 2.0)  # P(S = k) ≤ 1: every row to the log-space tree
    before = len(calls)
    with mode():
        x = fast._k_subset_tree(u, 3)
    assert len(calls) > before
    assert torch.equal(x, torch.tensor([[0.0, 0, 0, 1, 1, 1]] * 2, dtype=torch.float64))


@pytest.mark.parametrize("name, reg", FAST)
@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
@pytest.mark.parametrize("t", [1.0, 0.5])
def test_parameters_relax_without_grad_mode(name, reg, mode, t, gen):
    # evaluation loops call a layer on its parameters under no_grad: there u / 1 is u, and a
    # view of a parameter made under no_grad still reports requires_grad without being recorded;
    # the dynamic programs (dag paths, correlated k-subsets) took it as autograd's leaf and
    # raised "appears to not have been used in the graph"
    P = small(name)
    u = torch.nn.Parameter(torch.randn((3,) + P.shape, generator=gen, dtype=torch.float64))
    ref = cs.relax(u, P, reg, t, backend="fast")
    with mode():
        x = cs.relax(u, P, reg, t, backend="fast")
    assert not x.requires_grad
    torch.testing.assert_close(x, ref.detach(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("name, reg", FAST)
def test_autocast_does_not_reach_the_solvers(name, reg, gen):
    # under autocast, matrix products of float32 tensors would run in bfloat16 (Sinkhorn's
    # backward lost 2e-3): relax turns it off around the solve, and backward passes that use
    # products turn it off themselves (autograd runs them under the caller's autocast state)
    P = small(name)
    u = torch.randn((4,) + P.shape, generator=gen, requires_grad=True)
    w = torch.randn(u.shape, generator=gen)
    x0 = cs.relax(u, P, reg, 0.5)
    (g0,) = torch.autograd.grad((x0 * w).sum(), u)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x1 = cs.relax(u, P, reg, 0.5)
        (g1,) = torch.autograd.grad((x1 * w).sum(), u)
    assert x1.dtype == torch.float32 and torch.equal(x0, x1) and torch.equal(g0, g1)


@pytest.mark.parametrize("name, reg", FAST)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_are_computed_in_float32(name, reg, dtype, gen):
    # autocast activations: every path (Sinkhorn's linear solves have no half kernels) computes
    # in float32 and rounds back; the gradient reaches the half-precision input
    P = small(name)
    u = torch.randn((3,) + P.shape, generator=gen).to(dtype).requires_grad_()
    x = cs.relax(u, P, reg, 0.5)
    assert x.dtype == dtype
    assert torch.equal(x, cs.relax(u.detach().float(), P, reg, 0.5).to(dtype))
    (g,) = torch.autograd.grad(x.float().square().sum(), u)
    assert g.dtype == dtype and torch.isfinite(g).all()


@pytest.mark.parametrize("name, params, scale", [("spanning_tree", {"n": 20}, 1.0), ("arborescence", {"n": 10}, 3.0)])
def test_matrix_tree_float32_runs_in_float64_without_the_elimination(name, params, scale, gen, monkeypatch):
    # float32 inputs are computed in float64: with float32's own precision the condition test
    # would send most of these rows (K₂₀ with N(0, 1) logits: 99 %) to the slow elimination.
    # The result is the float64 one, rounded, and its gradient too.
    from convex_sst import fast

    calls = []
    real = fast.log_partition_arborescences
    monkeypatch.setattr(fast, "log_partition_arborescences", lambda *a: calls.append(1) or real(*a))
    P = cs.load_polytope(name, **params)
    # inputs that float32 holds exactly, so both runs see the same numbers
    u = (scale * torch.randn((64,) + P.shape, generator=gen, dtype=torch.float64)).float().double()
    w = torch.randn(u.shape, generator=gen, dtype=torch.float64).float().double()
    out = {}
    for dtype in (torch.float32, torch.float64):
        ud = u.to(dtype).requires_grad_()
        x = cs.relax(ud, P, "exp_family", 1.0)
        (g,) = torch.autograd.grad((x * w.to(dtype)).sum(), ud)
        assert x.dtype == g.dtype == dtype
        out[dtype] = (x, g)
    assert not calls
    x32, g32 = out[torch.float32]
    x64, g64 = out[torch.float64]
    assert torch.equal(x32, x64.float())
    assert (g32.double() - g64).abs().max() < 1e-6


def _dft_pk(u: torch.Tensor, k: int, exact: bool = False) -> torch.Tensor:
    """P(S = k) at the k-subset paths' τ (first try, or ``exact``), by brute force over the
    sizes (a Poisson-binomial law)."""
    from convex_sst import fast

    _, _, p, _ = fast._bernoulli_tilt(u, k, exact)
    law = torch.zeros(u.shape[0], u.shape[1] + 1, dtype=u.dtype)
    law[:, 0] = 1.0
    for j in range(u.shape[1]):
        law = torch.cat([law[:, :1] * (1 - p[:, j:j + 1]), law[:, 1:] * (1 - p[:, j:j + 1]) + law[:, :-1] * p[:, j:j + 1]], 1)
    return law[:, k]


@pytest.mark.parametrize("k", [3, 7])
@pytest.mark.parametrize("min_pk", [None, "median", 2.0])
def test_k_subset_dft_rows_and_tree_rows_agree(min_pk, k, gen, monkeypatch):
    """The DFT path hands rows with a small P(S = k) to the product tree: with the threshold
    raised (to the median P(S = k): half the rows; 2: every row) the marginals and gradients
    must not change (k = 7 > n/2: the tree of the complements' laws)."""
    import convex_sst.fast as fast

    P = cs.load_polytope("k_subset", n=9, k=k)
    u = 3 * torch.randn(16, 9, generator=gen, dtype=torch.float64)
    w = torch.randn(16, 9, generator=gen, dtype=torch.float64)
    ref = brute_force_marginals(u.requires_grad_(), P, 1.0)
    (gref,) = torch.autograd.grad((ref * w).sum(), u)
    if min_pk == "median":
        monkeypatch.setattr(fast, "_DFT_MIN_PK", float(_dft_pk(u.detach(), k).median()))
    elif min_pk is not None:
        monkeypatch.setattr(fast, "_DFT_MIN_PK", min_pk)
    _, ok = fast._KSubsetDFT.apply(u.detach(), k, False)
    assert bool(ok.all()) if min_pk is None else (not bool(ok.all()) and (min_pk == 2.0 or bool(ok.any())))
    x = cs.relax(u, P, "exp_family", 1.0)
    (g,) = torch.autograd.grad((x * w).sum(), u)
    assert (x - ref).abs().max() < 1e-12 and (g - gref).abs().max() < 1e-11


@pytest.mark.parametrize("n, k", [(100, 10), (60, 45), (200, 20), (600, 12), (300, 150), (600, 588)])
def test_k_subset_dft_equals_product_tree_at_larger_sizes(n, k, gen):
    """Sizes beyond brute force: the two routes (the DFT of S's law and the product tree of the
    Bernoulli laws, independent algorithms) against each other, values and vector-Jacobian
    products. relax takes the DFT except at (600, 12) and (600, 588), where it takes the tree
    (of the complements' laws at 588)."""
    import convex_sst.fast as fast

    u = 3 * torch.randn(16, n, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(16, n, generator=gen, dtype=torch.float64)
    P = cs.load_polytope("k_subset", n=n, k=k)
    x = cs.relax(u, P, "exp_family", 1.0)
    ref, other = fast._k_subset_tree(u, k), fast._k_subset_dft(u, k)
    assert fast._use_dft(n, k) == (n != 600)
    assert (x - ref).abs().max() < 1e-12 and (x - other).abs().max() < 1e-12
    assert (x.sum(1) - k).abs().max() < 1e-10
    (g,) = torch.autograd.grad((x * w).sum(), u)
    for y in (ref, other):
        (gr,) = torch.autograd.grad((y * w).sum(), u)
        assert (g - gr).abs().max() < 1e-11


@pytest.mark.parametrize("n, k, scale", [(200, 100, 3.0), (301, 150, 0.1), (129, 1, 30.0), (129, 128, 30.0), (64, 20, 1e3)])
def test_k_subset_large_k_stays_in_linear_space(n, k, scale, gen, monkeypatch):
    """k in the hundreds: the product tree used to scale by the k largest weights, and
    e_k(w) overflowed (C(n, k) terms: C(200, 100) ≈ e^135 times e^{spread}), so such rows went
    to the log-space tree (n = 500, k = 250: 21 s for 32 rows instead of 0.5 s). Over the
    tilted Bernoulli laws every number is a probability: both routes stay in linear space and
    agree with the log-space tree (μ = ∇ log e_k by autograd, the independent reference),
    for log e_k as well."""
    import convex_sst.fast as fast

    u = scale * torch.randn(4, n, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, n, generator=gen, dtype=torch.float64)
    ref = fast._autograd_gradient(lambda y: fast._log_e_k_banded(y, k), u)
    (gref,) = torch.autograd.grad((ref * w).sum(), u)
    log_ref = fast.log_elementary_symmetric(u.detach(), k)
    calls = []
    real = fast.log_elementary_symmetric
    monkeypatch.setattr(fast, "log_elementary_symmetric", lambda *a: calls.append(1) or real(*a))
    for route in (fast._k_subset_tree, fast._k_subset_dft):
        x = route(u, k)
        (g,) = torch.autograd.grad((x * w).sum(), u)
        assert (x - ref).abs().max() < 1e-11 and (g - gref).abs().max() < 1e-10
    for per_k in (0, 10**9):  # log e_k by the tree, then by the DFT
        monkeypatch.setattr(fast, "_DFT_PER_K", per_k)
        monkeypatch.setattr(fast, "_DFT_MAX_SIZE", 0 if per_k == 0 else 10**9)
        assert (fast.log_e_k(u.detach(), k) - log_ref).abs().max() < 1e-10 * log_ref.abs().max()
    assert not calls


def test_k_subset_exact_tilt_keeps_the_dft_on_its_rows(gen, monkeypatch):
    """Nearly equal logits, n = 3000, k = 10: the first τ (the top-k midpoint and two Newton
    steps of at most 2) stays far from Σp = k (it needs τ ≈ 5.7), so P(S = k) is far below
    the DFT's 1e-3 and every row is redone; the exact tilt (Σp = k ± 0.1) brings P(S = k) to
    about 0.13, and the DFT keeps the rows instead of handing them to the product tree."""
    import convex_sst.fast as fast

    u = 0.1 * torch.randn(4, 3000, generator=gen, dtype=torch.float64)
    assert (_dft_pk(u, 10) < 1e-6).all()                              # the regime is hard
    _, _, p, _ = fast._bernoulli_tilt(u, 10, True)
    assert (p.sum(1) - 10).abs().max() <= 0.1
    assert (_dft_pk(u, 10, True) >= 0.1).all()
    calls = []
    real = fast._KSubsetMarginals.apply
    monkeypatch.setattr(fast._KSubsetMarginals, "apply", lambda *a: calls.append(1) or real(*a))
    x = fast._k_subset_dft(u, 10)
    assert not calls
    monkeypatch.undo()
    assert (x - fast._k_subset_tree(u, 10)).abs().max() < 1e-13
    # log e_k by the DFT likewise: redone at the exact tilt, not in log space
    ref = fast.log_elementary_symmetric(u, 10)
    real_log = fast.log_elementary_symmetric
    monkeypatch.setattr(fast, "log_elementary_symmetric", lambda *a: calls.append(1) or real_log(*a))
    monkeypatch.setattr(fast, "_DFT_PER_K", 10**9)
    assert (fast.log_e_k(u, 10) - ref).abs().max() < 1e-12 * ref.abs().max() and not calls


def test_k_subset_ties_at_huge_scale_stay_exact_and_in_linear_space(gen, monkeypatch):
    """Logits in {-3..3}·1.02e98, k = n − 2: the two items left out come from the lowest group of
    ties, whose marginal is (m − 2)/m. At that scale τ ± 2 == τ: the cheap tilt left p = ½ on
    the group (P(S = k) ~ 1e-9, too small for the DFT), and the exact tilt's bisection could not
    land on the tie (P(S = k) = 0), so DFT rows went to the log-space tree, whose Σμ was off by
    4e-10. The tilt is now found relative to the top-k midpoint (exact on the tie): both tilts
    keep every row on the tree, and every route is exact to rounding (log e_k likewise)."""
    import convex_sst.fast as fast

    n, k = 231, 229
    u = 1.0187378944391326e98 * torch.randint(-3, 4, (3, n), generator=gen).double()  # a fuzz case's scale
    for exact in (False, True):
        assert fast._KSubsetMarginals.apply(u, k, exact)[1].all()
    low = u == u.min(1, keepdim=True).values
    want = torch.where(low, (low.sum(1, keepdim=True) - 2) / low.sum(1, keepdim=True).double(), 1.0)
    monkeypatch.setattr(fast, "_log_e_k_banded", lambda *a: pytest.fail("went to the log-space tree"))
    monkeypatch.setattr(fast, "log_elementary_symmetric", lambda *a: pytest.fail("went to the log-space tree"))
    for route in (fast._k_subset_dft, fast._k_subset_tree):
        assert (route(u, k) - want).abs().max() < 1e-14
    top = u.topk(k, 1).values.sum(1)  # log e_k = that + log C(m, 2), lost to rounding at 1e100
    for per_k in (10**9, 0):  # log e_k from the DFT's fallback, and by the tree
        monkeypatch.setattr(fast, "_DFT_PER_K", per_k)
        assert fast._use_dft(n, k) == (per_k > 0)
        assert ((fast.log_e_k(u, k) - top).abs() <= 1e-15 * u.abs().sum(1)).all()  # sums round to that


@pytest.mark.parametrize("reg", ["binary_entropy", "quadratic", "entropy"])
def test_capped_simplex_ties_at_huge_scale(reg, gen):
    """u in {-2..2}·1e20: τ ± 1 == τ there, and the root finder bracketed τ in absolute terms,
    so a tie group at the boundary got x ∈ {0, ½, 1} with Σx = 8.5 for k = 7 (with a warning).
    On θ shifted by the top-k midpoint, τ resolves: the group shares what is left equally."""
    P = cs.load_polytope("k_subset", n=20, k=7)
    u = 1e20 * torch.randint(-2, 3, (6, 20), generator=gen).double()
    v = u.topk(7, dim=1).values[:, -1:]                      # the k-th largest: the boundary group
    above, tied = (u > v).sum(1, keepdim=True), (u == v).sum(1, keepdim=True)
    want = torch.where(u > v, 1.0, torch.where(u == v, (7 - above) / tied.double(), 0.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x = cs.relax(u, P, reg)
    assert (x - want).abs().max() < 1e-12


def test_k_subset_dft_chunks_rows(gen, monkeypatch):
    # the DFT's kernel is (rows, N/2, n): rows are processed in chunks of bounded size, and the
    # kernel is recomputed in the backward when large; the result and its gradient must not
    # depend on either (here 1 to 3 rows a chunk, the kernel kept or recomputed)
    import convex_sst.fast as fast

    u = torch.randn(7, 40, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, 40, generator=gen, dtype=torch.float64)
    out = []
    for chunk, keep in ((1 << 23, 1 << 20), (40 * 21 * 3, 1 << 20), (40 * 21, 0)):
        monkeypatch.setattr(fast, "_DFT_CHUNK", chunk)
        monkeypatch.setattr(fast, "_DFT_KEEP", keep)
        x = fast._k_subset_dft(u, 20)
        out.append((x, *torch.autograd.grad((x * w).sum(), u)))
    assert all(torch.allclose(a, b, rtol=0, atol=1e-15) for o in out[1:] for a, b in zip(out[0], o))


def test_k_subset_dft_chunks_are_smaller_on_cpu(monkeypatch):
    # on CPU the kernels of a chunk stay near the caches (n = 500, k = 50, B = 256: 3.5x faster
    # than at the memory bound); other devices keep the memory bound alone
    import convex_sst.fast as fast

    per_row = 500 * fast._dft_half(500, 50)
    monkeypatch.setattr(fast, "_DFT_CHUNK", 64 * per_row)
    monkeypatch.setattr(fast, "_DFT_CHUNK_CPU", 16 * per_row)
    assert fast._dft_chunk_rows(500, 50, torch.device("cpu")) == 16
    assert fast._dft_chunk_rows(500, 50, torch.device("cuda")) == 64
    monkeypatch.setattr(fast, "_DFT_CHUNK", 8 * per_row)  # the memory bound still holds on CPU
    assert fast._dft_chunk_rows(500, 50, torch.device("cpu")) == 8


def test_k_subset_tree_chunks_rows_on_cpu(gen, monkeypatch):
    # on CPU the product tree takes rows in chunks of at most _TREE_CHUNK_CPU coefficients (time
    # per row grew with the batch); the result and its gradient must not depend on them
    import convex_sst.fast as fast

    assert fast._tree_size(5, 2) == 5 * 2 + 3 * 3 + 2 * 3 + 1 * 3  # degrees 1, 2, 2, 2
    u = torch.randn(7, 40, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, 40, generator=gen, dtype=torch.float64)
    calls = []
    real = fast._k_subset_route
    monkeypatch.setattr(fast, "_k_subset_route", lambda th, *a: calls.append(th.shape[0]) or real(th, *a))
    out = []
    for rows, expected in ((7, [7]), (3, [3, 3, 1]), (2, [2, 2, 2, 1])):
        monkeypatch.setattr(fast, "_TREE_CHUNK_CPU", rows * fast._tree_size(40, 6))
        calls.clear()
        x = fast._k_subset_tree(u, 6)
        assert calls == expected
        out.append((x, *torch.autograd.grad((x * w).sum(), u)))
    assert all(torch.allclose(a, b, rtol=0, atol=1e-15) for o in out[1:] for a, b in zip(out[0], o))


def test_sinkhorn_reports_non_convergence(gen):
    P = cs.load_polytope("birkhoff", n=5)
    u = 5 * torch.randn(2, 5, 5, generator=gen, dtype=torch.float64)
    with pytest.warns(cs.SolverWarning, match=r"Sinkhorn did not converge for batch element\(s\) \[0, 1\] of 2") as rec:
        cs.relax(u, P, "entropy", 0.1, backend="fast", max_iter=3, on_failure="warn")
    assert rec[0].filename == __file__  # attributed to the caller's line, not the library's
    with pytest.raises(cs.SolverError, match="Sinkhorn did not converge"):
        cs.relax(u, P, "entropy", 0.1, backend="fast", max_iter=3, on_failure="raise")


def test_sinkhorn_newton_finish_converges_where_sweeps_stall(gen):
    # logits spanning ~60 with near-ties: plain sweeps leave most rows at ~1e-3 after 2000
    # sweeps; the Newton finish on the duals reaches the float64 tolerance in a few steps
    P = cs.load_polytope("birkhoff", n=5)
    u = 10 * torch.randn(64, 5, 5, generator=gen, dtype=torch.float64)
    plain, bad = sinkhorn(u, max_iter=2000, newton_after=10**9, on_failure="ignore", return_error=True)
    assert int(bad.sum()) > 10                                     # the regime is really hard
    X, bad = sinkhorn(u, max_iter=2000, on_failure="ignore", return_error=True)
    assert not bool(bad.any())
    assert (X.sum(1) - 1).abs().max() < 1e-9 and (X.sum(2) - 1).abs().max() < 1e-9
    ref = cs.relax(u[:8], P, "entropy", 1.0, backend="torch")      # independent: interior point
    assert (X[:8] - ref).abs().max() < 1e-7


@pytest.mark.parametrize("name, params", [("birkhoff", {"n": 4}), ("matching", {"n": 4, "m": 6})])
def test_sinkhorn_falls_back_to_the_interior_point_solver(name, params, gen):
    P = cs.load_polytope(name, **params)
    u = torch.randn((6,) + P.shape, generator=gen, dtype=torch.float64, requires_grad=True)
    x = cs.relax(u, P, "entropy", 0.1, backend="fast", max_iter=3)  # default on_failure="fallback"
    ref = cs.relax(u, P, "entropy", 0.1, backend="torch")
    assert (x - ref).abs().max() < 1e-9
    (g,) = torch.autograd.grad(x.sum(), u)
    assert torch.isfinite(g).all()


@pytest.mark.parametrize("n, m", [(3, 5), (6, 10), (12, 13)])
@pytest.mark.parametrize("t", [1.0, 0.1, 0.02])
def test_matching_sinkhorn_matches_the_interior_point_solver(n, m, t, gen):
    """Partial assignments (rows sum to 1, columns to at most 1): columns at capacity and columns
    with room left, at temperatures down to where Newton finishes the sweeps."""
    P = cs.load_polytope("matching", n=n, m=m)
    u = torch.randn((32, n, m), generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn((32, n, m), generator=gen, dtype=torch.float64)
    xf = cs.relax(u, P, "entropy", t, backend="fast")
    xt = cs.relax(u, P, "entropy", t, backend="torch")
    assert (xf - xt).abs().max() < 1e-7
    assert (xf.sum(2) - 1).abs().max() < 1e-10 and xf.sum(1).max() < 1 + 1e-10
    full = (xf.sum(1) > 1 - 1e-9).sum(1)
    assert int((full >= 1).sum()) >= 8 and bool((full < m).all())  # both kinds of column
    (gf,) = torch.autograd.grad((xf * w).sum(), u)
    (gt,) = torch.autograd.grad((xt * w).sum(), u)
    err = (gf - gt).reshape(32, -1).abs().amax(1) * t
    assert bool((err <= 1e-5).all()), err


def test_matching_sinkhorn_newton_finish_and_kkt(gen):
    """Sweeps alone stall at logits spanning ~60 (as for Birkhoff); the projected Newton steps on
    the column duals finish. KKT of the result: X = exp(θ + α_i + log b_j) with log b ≤ 0, and
    log b = 0 on every column with room left."""
    from convex_sst.fast import _sinkhorn_duals

    u = 10 * torch.randn(64, 5, 8, generator=gen, dtype=torch.float64)
    _, bad = sinkhorn(u, max_iter=2000, newton_after=10**9, on_failure="ignore", return_error=True, at_most=True)
    assert int(bad.sum()) > 10                                     # the regime is really hard
    X, bad, log_b = _sinkhorn_duals(u, None, 2000, "ignore", at_most=True)
    assert not bool(bad.any())
    c = X.sum(1)
    assert (X.sum(2) - 1).abs().max() < 1e-9 and c.max() < 1 + 1e-9
    assert bool((log_b <= 0).all()) and bool((log_b[c < 1 - 1e-6] == 0).all())
    log_a = torch.logsumexp(u + log_b[:, None, :], 2).neg()
    torch.testing.assert_close(X, torch.exp(u + log_a[:, :, None] + log_b[:, None, :]), rtol=1e-12, atol=0)
    ref = cs.relax(u[:8], cs.load_polytope("matching", n=5, m=8), "entropy", 1.0, backend="torch")
    assert (X[:8] - ref).abs().max() < 1e-7


def test_square_matching_is_birkhoff(gen):
    u = torch.randn(4, 5, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    xm = cs.relax(u, cs.load_polytope("matching", n=5, m=5), "entropy", 0.5)
    xb = cs.relax(u, cs.load_polytope("birkhoff", n=5), "entropy", 0.5)
    torch.testing.assert_close(xm, xb, rtol=0, atol=0)
    torch.testing.assert_close(torch.autograd.grad(xm[..., 0].sum(), u)[0], torch.autograd.grad(xb[..., 0].sum(), u)[0],
                               rtol=0, atol=0)


def test_matching_forbidden_entries(gen):
    """-inf entries are kernel zeros; a whole column forbidden is fine (that column is never
    used), a whole row forbidden leaves no assignment."""
    P = cs.load_polytope("matching", n=4, m=6)
    u = torch.randn(3, 4, 6, generator=gen, dtype=torch.float64)
    u[:, :, 2] = -torch.inf
    u[0, 1, 4] = u[1, 0, 0] = -torch.inf
    x = cs.relax(u, P, "entropy", 0.5)
    assert bool((x[:, :, 2] == 0).all()) and x[0, 1, 4] == 0 and x[1, 0, 0] == 0
    torch.testing.assert_close(x, cs.relax(u, P, "entropy", 0.5, backend="torch"), atol=1e-7, rtol=0)
    u[2, 3, :] = -torch.inf
    with pytest.raises(cs.InputError, match=r"at batch index \(2,\)"):
        cs.relax(u, P, "entropy", 0.5)


@pytest.mark.parametrize("name, params", [("birkhoff", {"n": 5}), ("matching", {"n": 4, "m": 6})])
def test_sinkhorn_fallback_keeps_the_forbidden_mask(name, params, gen):
    """Rows handed to the interior-point solver keep their mask (its tolerances then ignore the
    stand-in utilities): the same values as the solver called on the masked input directly."""
    P = cs.load_polytope(name, **params)
    u = torch.randn((4,) + P.shape, generator=gen, dtype=torch.float64)
    mask = torch.zeros(P.shape, dtype=torch.bool)
    mask[0, 1] = mask[1, 2] = mask[2, 0] = True
    u = u.masked_fill(mask, -torch.inf)
    x = cs.relax(u, P, "entropy", 0.1, backend="fast", max_iter=3)
    ref = cs.relax(u, P, "entropy", 0.1, backend="torch")
    assert bool((x[:, mask] == 0).all())
    torch.testing.assert_close(x, ref, atol=1e-12, rtol=0)


def test_fast_path_options_are_validated():
    P = cs.load_polytope("simplex", n=3)
    with pytest.raises(cs.InputError, match=r"unknown option\(s\) \['tol'\] for the fast path simplex/entropy \(simplex_softmax\); it accepts none"):
        cs.relax(torch.zeros(3), P, "entropy", backend="fast", tol=1e-3)
    # every fast path: a misspelt option is an InputError naming the accepted ones, never a TypeError
    for name, reg in FAST:
        Q = small(name)
        with pytest.raises(cs.InputError, match=rf"unknown option\(s\) \['tool'\] for the fast path {name}/{reg}"):
            cs.relax(torch.zeros(Q.shape), Q, reg, backend="fast", tool=1e-3)
    T = small("spanning_tree")
    with pytest.raises(cs.InputError, match=r"accepts \['max_range', 'method'\]. Did you mean 'max_range'\?"):
        cs.relax(torch.zeros(T.shape), T, "exp_family", max_rang=30.0)


def test_exp_family_has_no_generic_path():
    P = cs.load_polytope("k_subset", n=4, k=2)
    with pytest.raises(cs.ConvexSSTError, match="no cvxpy form"):
        cs.relax(torch.zeros(4), P, "exp_family", backend="generic")
    M = cs.load_polytope("birkhoff", n=3)
    with pytest.raises(cs.ConvexSSTError, match="no cvxpy form"):
        cs.relax(torch.zeros(3, 3), M, "exp_family", backend="generic")


def _explicit_structures(name, n, m):
    """Permutation matrices (Birkhoff) or matchings of every row into distinct columns, listed
    with itertools: an oracle independent of the LPs that enumerate vertices."""
    import itertools

    rows = []
    for cols in itertools.permutations(range(m), n):
        X = torch.zeros(n, m, dtype=torch.float64)
        X[torch.arange(n), torch.tensor(cols)] = 1.0
        rows.append(X)
    return torch.stack(rows)


@pytest.mark.parametrize("name, params", [("birkhoff", {"n": 4}), ("matching", {"n": 2, "m": 4})])
def test_exp_family_without_an_exact_algorithm_is_computed_by_enumeration(name, params, gen):
    # Birkhoff and matchings have no exp_family fast path (a permanent): relax enumerates the
    # structures (it raised UnknownNameError, while log_partition enumerated them); against the
    # Gibbs marginals over structures listed with itertools, its gradient against log_partition's,
    # masks and forced entries against the same oracle on the face, gradcheck and gradgradcheck
    P = cs.load_polytope(name, **params)
    n, m = P.shape
    S = _explicit_structures(name, n, m)
    u = torch.randn((5,) + P.shape, generator=gen, dtype=torch.float64, requires_grad=True)
    t = 0.7
    x = cs.relax(u, P, "exp_family", t)
    w = torch.softmax((u.detach()[:, None] * S).sum((2, 3)) / t, dim=1)
    assert (x - torch.einsum("bs,sij->bij", w, S)).abs().max() < 1e-12
    g = torch.autograd.grad(cs.log_partition(u, P, t).sum(), u)[0]
    assert (g - x.detach() / t).abs().max() < 1e-12
    assert torch.autograd.gradcheck(lambda v: cs.relax(v, P, "exp_family", t), (u[:2],))
    assert torch.autograd.gradgradcheck(lambda v: cs.relax(v, P, "exp_family", t), (u[:2],))
    # -inf forbids entry (0, 0) of row 0, +1e9 forces entry (1, 1) of row 1; float32 too
    v = u.detach().clone()
    v[0, 0, 0] = float("-inf")
    v[1, 1, 1] = 1e9
    for dtype in (torch.float64, torch.float32):
        y = cs.relax(v.to(dtype), P, "exp_family", t)
        assert y.dtype == dtype and float(y[0, 0, 0]) == 0.0
        for b, keep in ((0, S[:, 0, 0] == 0), (1, S[:, 1, 1] == 1)):
            scores = (v[b].masked_fill(~torch.isfinite(v[b]) | (v[b] > 1e8), 0.0) * S[keep]).sum((1, 2)) / t
            ref = torch.einsum("s,sij->ij", torch.softmax(scores, 0), S[keep])
            assert (y[b].double() - ref).abs().max() < (1e-12 if dtype == torch.float64 else 1e-6)


def test_exp_family_by_enumeration_on_a_users_config_and_its_limit(tmp_path, monkeypatch):
    # a user's copy of arborescences (no fast path under its name) against the built-in's
    # matrix-tree path, values and gradients; above the limit a NotSupportedError that says how
    # to register a fast path
    from convex_sst.polytope import builtin_config_paths

    text = builtin_config_paths()["arborescence"].read_text().replace("name: arborescence", "name: enum_arbs", 1)
    path = tmp_path / "enum_arbs.yaml"
    path.write_text(text)
    P, B = cs.load_polytope(path, n=4), cs.load_polytope("arborescence", n=4)
    u = torch.randn(6, 4, 4, dtype=torch.float64, requires_grad=True)
    x, ref = cs.relax(u, P, "exp_family", 0.5), cs.relax(u, B, "exp_family", 0.5)
    assert (x - ref).abs().max() < 1e-12
    c = torch.randn(6, 4, 4, dtype=torch.float64)
    gx, gr = (torch.autograd.grad((y * c).sum(), u)[0] for y in (x, ref))
    assert (gx - gr).abs().max() < 1e-12
    sst = cs.SST(P, "exp_family", temperature=0.5)(u)
    assert sst.shape == u.shape and bool(torch.allclose(sst.sum((1, 2)), torch.full((6,), 3.0, dtype=torch.float64)))
    import importlib

    relax_module = importlib.import_module("convex_sst.relax")  # the module (cs.relax is the function)

    monkeypatch.setattr(relax_module, "ENUMERATION_LIMIT", 5)
    small = cs.load_polytope(path, n=3)  # 3 structures: fine
    assert cs.relax(torch.zeros(3, 3), small, "exp_family").shape == (3, 3)
    M = cs.load_polytope("birkhoff", n=3)  # 6 permutations
    with pytest.raises(cs.NotSupportedError, match=r"more than 5 structures.*register_fast_path\('birkhoff', 'exp_family'\)"):
        cs.relax(torch.zeros(3, 3), M, "exp_family")


@pytest.mark.parametrize("name,params", [
    ("arborescence", {"n": 7, "root": 2}), ("spanning_tree", {"n": 8}), ("birkhoff", {"n": 6}),
    ("matching", {"n": 3, "m": 6}), ("dag_path", {"n": 6, "edges": [[0, 1], [0, 2], [1, 2], [1, 3], [2, 4], [3, 4], [3, 5], [4, 5], [0, 5]], "target": 5}),
    ("correlated_k_subset", {"n": 12, "k": 5}), ("correlated_k_subset", {"n": 9, "k": 8}),
])
def test_combinatorial_argmax_equals_lp_on_larger_instances(name, params, gen):
    P = cs.load_polytope(name, **params)
    assert P.argmax_name is not None
    u = torch.randn((40,) + P.shape, generator=gen, dtype=torch.float64)
    assert torch.equal(P.argmax(u), P.lp_argmax(u))


def test_dag_longest_path_on_random_dags_with_ties(gen):
    # the DP runs over the rows at once, vertex by vertex in topological order: vertices
    # numbered out of that order, unreachable ones, ties (integer utilities) and the LP's score
    rng = np.random.default_rng(3)
    for _ in range(12):
        n = int(rng.integers(3, 11))
        perm = rng.permutation(n)
        edges = [[int(perm[i]), int(perm[j])] for i in range(n) for j in range(i + 1, n) if rng.random() < 0.5]
        edges.append([int(perm[0]), int(perm[-1])])
        P = cs.load_polytope("dag_path", n=n, edges=edges, source=int(perm[0]), target=int(perm[-1]))
        u = torch.randint(-2, 3, (24, P.size), generator=gen).double()
        x = P.argmax(u)
        assert bool(P.contains(x).all()) and set(x.unique().tolist()) <= {0.0, 1.0}
        assert torch.equal((x * u).sum(1), (P.lp_argmax(u) * u).sum(1))


@pytest.mark.parametrize("n,k", [(30, 8), (17, 1), (12, 11)])
def test_correlated_k_subset_is_the_image_of_dag_paths_of_its_program(n, k, gen):
    # independent oracle beyond enumeration: the same structures as source-sink paths of the
    # layered DAG its config builds, through the dag_path polytope's own fast path, argmax and
    # log-partition (a forward pass in topological order over ~2nk vertices): x = M f
    P = cs.load_polytope("correlated_k_subset", n=n, k=k)
    A, M = torch.as_tensor(P.data["A"]), torch.as_tensor(P.data["M"].toarray())
    D = cs.load_polytope("dag_path", n=int(A.max()) + 1, edges=A.tolist(), source=0, target=int(A.max()))
    u = (3 * torch.randn((6,) + P.shape, generator=gen, dtype=torch.float64)).requires_grad_(True)
    w = torch.randn((6,) + P.shape, generator=gen, dtype=torch.float64)
    for t in (1.0, 0.2):
        x = cs.relax(u, P, "exp_family", t)
        ref = cs.relax(u @ M, D, "exp_family", t) @ M.T
        assert (x - ref).abs().max() < 1e-11
        (g,) = torch.autograd.grad((x * w).sum(), u)
        (gr,) = torch.autograd.grad((ref * w).sum(), u)
        assert (g - gr).abs().max() < 1e-9
        assert (cs.log_partition(u, P, t) - cs.log_partition(u @ M, D, t)).abs().max() < 1e-10
    hard = P.argmax(u.detach())
    assert torch.equal(hard, D.argmax(u.detach() @ M) @ M.T)
    assert torch.equal(hard[:, n:], hard[:, :n - 1] * hard[:, 1:n])


@pytest.mark.parametrize("a", [0.0, 0.7, -1.3])
def test_correlated_k_subset_log_partition_counts_runs(a):
    # with utility a on every adjacent pair and 0 on the items, Z = Σ_x e^{a · #pairs}; a k-subset
    # in r runs has k - r adjacent pairs, and C(k - 1, r - 1) C(n - k + 1, r) subsets have r runs
    n, k = 40, 12
    P = cs.load_polytope("correlated_k_subset", n=n, k=k)
    u = torch.cat([torch.zeros(n, dtype=torch.float64), torch.full((n - 1,), a, dtype=torch.float64)])
    Z = sum(math.comb(k - 1, r - 1) * math.comb(n - k + 1, r) * math.exp(a * (k - r)) for r in range(1, k + 1))
    assert abs(cs.log_partition(u, P).item() - math.log(Z)) < 1e-11
    x = cs.relax(u, P, "exp_family")
    assert abs(x[:n].sum().item() - k) < 1e-11
    pairs = sum((k - r) * math.comb(k - 1, r - 1) * math.comb(n - k + 1, r) * math.exp(a * (k - r))
                for r in range(1, k + 1)) / Z
    assert abs(x[n:].sum().item() - pairs) < 1e-10   # expected number of adjacent pairs


def test_argmax_limit_of_fast_relaxations():
    for name, reg in FAST:
        P = small(name)
        # a generator per pair (draws that do not change when a pair is registered), and down to
        # t = 1e-6: at 1e-3 a random near-tie of two structures (a gap of 2e-3, seen) kept x mixed
        gen = torch.Generator().manual_seed(zlib.crc32(f"{name}/{reg}".encode()))
        u = torch.randn((3,) + P.shape, generator=gen, dtype=torch.float64)
        errs = []
        for t in (0.1, 0.01, 0.001, 1e-6):
            opts = {"max_range": None} if reg == "exp_family" and name in ("spanning_tree", "arborescence") else {}
            errs.append((cs.relax(u, P, reg, t, backend="fast", **opts) - P.argmax(u)).abs().max().item())
        assert errs[-1] < 1e-3 and errs[0] >= errs[-1], (name, reg, errs)


@CUDA
@pytest.mark.parametrize("name,reg", FAST)
def test_cuda_matches_cpu(name, reg, gen):
    P = small(name)
    u = torch.randn((4,) + P.shape, generator=gen, dtype=torch.float64)
    x = cs.relax(u.cuda(), P, reg, 0.5, backend="fast")
    assert x.device.type == "cuda"
    assert (x.cpu() - cs.relax(u, P, reg, 0.5, backend="fast")).abs().max() < 1e-10


@pytest.mark.parametrize("name,reg", FAST)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_finite_gradients_across_scales(name, reg, dtype):
    # regression: k-subset marginals had NaN double-backward at intermediate scales (|θ| ~ 20-200)
    P = small(name)
    g = torch.Generator().manual_seed(5)
    for scale in (1.0, 10.0, 100.0, 1000.0):
        u = (scale * torch.randn((64,) + P.shape, generator=g, dtype=torch.float64)).to(dtype).requires_grad_()
        x = cs.relax(u, P, reg, 0.5, backend="fast")
        (grad,) = torch.autograd.grad((x * torch.randn(x.shape, generator=g, dtype=torch.float64).to(dtype)).sum(), u)
        assert torch.isfinite(x).all() and torch.isfinite(grad).all(), (name, reg, scale)


@pytest.mark.parametrize("name, params", [("spanning_tree", {"n": 6}), ("arborescence", {"n": 5})])
def test_tree_closed_form_backward_matches_autograd_through_elimination(name, params, gen):
    # the inverse path's backward is a closed form (Y = K X K); the elimination path is plain
    # autograd through log det: both must give the same vector-Jacobian products
    from convex_sst import fast

    P = cs.load_polytope(name, **params)
    fn = fast.spanning_tree_marginals if name == "spanning_tree" else fast.arborescence_marginals
    u = torch.randn((4,) + P.shape, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn((4,) + P.shape, generator=gen, dtype=torch.float64)
    (ga,) = torch.autograd.grad((fn(u, P, method="inverse") * w).sum(), u)
    (gb,) = torch.autograd.grad((fn(u, P, method="elimination") * w).sum(), u)
    assert (fn(u, P, method="inverse") - fn(u, P, method="elimination")).abs().max() < 1e-12
    assert (ga - gb).abs().max() < 1e-10


def test_spanning_tree_edge_rows_in_blocks_match_the_rows_kept_whole(gen, monkeypatch):
    # beyond _EDGE_ROWS_KEPT numbers the rows D̂_e (B·|E|·n) are not kept for the backward pass but
    # formed in blocks of edges (n = 100 at B = 128 held 1.5 GB): values, vector-Jacobian products
    # and second derivatives must not change. Blocks of 4 edges of K_6 (15 edges, 4 blocks), a
    # row with a masked edge, and one ill-conditioned row (t = 0.05) that goes to the elimination
    from convex_sst import fast

    P = cs.load_polytope("spanning_tree", n=6)
    u = torch.randn((6,) + P.shape, generator=gen, dtype=torch.float64)
    u[1, 3] = -math.inf
    u[2] = u[2] / 0.05
    w = torch.randn((6,) + P.shape, generator=gen, dtype=torch.float64)
    out = []
    for kept, block in ((1 << 23, 1 << 19), (0, 4 * 6 * 6)):
        monkeypatch.setattr(fast, "_EDGE_ROWS_KEPT", kept)
        monkeypatch.setattr(fast, "_EDGE_BLOCK", block)
        x = u.clone().requires_grad_()
        mu = cs.relax(x, P, "exp_family", 1.0, backend="fast")
        (g,) = torch.autograd.grad((mu * w).sum(), x, create_graph=True)
        (h,) = torch.autograd.grad((g * w).sum(), x)
        (g1,) = torch.autograd.grad((cs.relax(x, P, "exp_family", 1.0, backend="fast") * w).sum(), x)
        out.append((mu.detach(), g1, h))
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, atol=1e-13, rtol=0)
    torch.testing.assert_close(out[0][0], brute_force_marginals(u, P), atol=1e-12, rtol=0)


@pytest.mark.parametrize("name, reg", sorted(FAST))
@pytest.mark.parametrize("backend", ["fast", "torch"])
def test_relax_at_unit_temperature_leaves_u_untouched(name, reg, backend, gen):
    # at t = 1, relax hands u itself (no division) to the backend
    P = small(name)
    if backend == "torch" and not get_regularizer(reg).separable:
        pytest.skip("the torch solver takes separable regularizers")
    u = torch.randn((3,) + P.shape, generator=gen, dtype=torch.float64, requires_grad=True)
    before = u.detach().clone()
    x = cs.relax(u, P, reg, 1.0, backend=backend)
    (x * torch.randn_like(x)).sum().backward()
    assert torch.equal(u.detach(), before) and x.data_ptr() != u.data_ptr()
    assert torch.allclose(x, cs.relax(u, P, reg, torch.tensor(1.0, dtype=torch.float64), backend=backend), atol=1e-12)


@pytest.mark.parametrize("name, reg", sorted(FAST))
def test_fast_paths_accept_an_empty_batch(name, reg):
    P = cs.load_polytope(name)
    u = torch.zeros((0,) + P.shape, dtype=torch.float64, requires_grad=True)
    x = cs.relax(u, P, reg, 1.0, backend="fast")
    assert x.shape == (0,) + P.shape
    x.sum().backward()
    assert u.grad.shape == u.shape


def test_spanning_tree_marginals_route_ill_conditioned_rows_to_elimination():
    # at t = 0.1 with unit logits some rows of K_8 are too ill-conditioned for the Cholesky route
    # (without the condition test, no row is flagged and this test fails): "auto" must send
    # those rows to the log-space elimination, and the rows it keeps must be exact, values and
    # vector-Jacobian products (the textbook K_ii + K_jj - 2 K_ij forms lose 1e-8 in the latter)
    from convex_sst import fast

    P = cs.load_polytope("spanning_tree", n=8)
    g = torch.Generator().manual_seed(0)
    u = (10.0 * torch.randn(128, 28, generator=g, dtype=torch.float64)).requires_grad_()
    w = torch.randn(128, 28, generator=g, dtype=torch.float64)
    _, bad = fast._EdgeMarginals.apply(u, fast._edge_index(P, u.device), 8, 1e5)
    assert 0 < int(bad.sum()) < 64
    ref = fast.spanning_tree_marginals(u, P, method="elimination")
    (gref,) = torch.autograd.grad((ref * w).sum(), u)
    auto = fast.spanning_tree_marginals(u, P)
    (gauto,) = torch.autograd.grad((auto * w).sum(), u)
    assert (auto - ref).abs().max() < 1e-10 and (gauto - gref).abs().max() < 1e-9
    kept = fast.spanning_tree_marginals(u[~bad], P, method="inverse")
    (gkept,) = torch.autograd.grad((kept * w[~bad]).sum(), u)
    assert (kept - ref[~bad]).abs().max() < 1e-10
    assert (gkept[~bad] - gref[~bad]).abs().max() < 1e-9


@pytest.mark.parametrize("gap", [700.0, 705.0, 710.0])
def test_spanning_tree_marginals_exact_with_weights_on_both_sides_of_the_underflow_cut(gap):
    # one or two edges `gap` above the rest: the others' weights straddle e^-708 (float64's
    # tiny) relative to the largest, where the Cholesky route drops them. Before the straddle
    # check such rows passed the condition test and were off by up to 0.7 against enumeration
    from convex_sst import fast

    P = cs.load_polytope("spanning_tree", n=6)
    g = torch.Generator().manual_seed(0)
    u = 3.0 * torch.randn(64, 15, generator=g, dtype=torch.float64)
    rows = torch.arange(64)
    u[rows, torch.randint(15, (64,), generator=g)] += gap
    u[rows[:32], torch.randint(15, (32,), generator=g)] += gap
    ref = brute_force_marginals(u, P)
    _, bad = fast._EdgeMarginals.apply(u, fast._edge_index(P, u.device), 6, 1e5)
    assert bool(bad.any())
    if not bool(bad.all()):  # at 710 every row straddles
        kept = fast.spanning_tree_marginals(u[~bad], P, method="inverse")
        assert (kept - ref[~bad]).abs().max() < 1e-10
    assert (fast.spanning_tree_marginals(u, P) - ref).abs().max() < 1e-10
    assert (cs.relax(u, P, "exp_family") - ref).abs().max() < 1e-10


@pytest.fixture
def explicit_threads():
    """``torch.set_num_threads(2)`` for the test (torch's batched LU on the CPU is wrong after an
    explicit call with k > 1 threads; see :mod:`convex_sst._linalg`), restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_batched_lu_is_correct_with_explicit_threads(explicit_threads, gen):
    from convex_sst import _linalg

    for n in (100, 160):
        M = torch.randn(3, n, n, generator=gen, dtype=torch.float64)
        A = M @ M.mT / n + torch.eye(n, dtype=torch.float64)
        b = torch.randn(3, n, 2, generator=gen, dtype=torch.float64)
        assert (A @ _linalg.solve(A, b) - b).abs().max() < 1e-10
        K, info = _linalg.inv_ex(A)
        assert (info == 0).all() and (A @ K - torch.eye(n, dtype=torch.float64)).abs().max() < 1e-10


def test_torch_solver_past_150_equality_rows_with_explicit_threads(explicit_threads, gen):
    # "auto" takes the torch solver up to 300 equality rows: its Schur complements are factored
    # by batched Cholesky, which the threading bug of batched LU does not affect (convex_sst._linalg)
    P = cs.load_polytope("spanning_tree", n=14)   # 287 equality rows
    u = torch.randn(4, P.size, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(P.size, generator=gen, dtype=torch.float64)
    x = cs.relax(u, P, "entropy", 0.3)
    (g,) = torch.autograd.grad((x * w).sum(), u)
    torch.set_num_threads(1)
    x1 = cs.relax(u, P, "entropy", 0.3)
    (g1,) = torch.autograd.grad((x1 * w).sum(), u)
    assert (x - x1).abs().max() < 1e-8 and (g - g1).abs().max() < 1e-8


@pytest.mark.parametrize("name, params, reg", [("birkhoff", {"n": 160}, "entropy"),
                                               ("matching", {"n": 150, "m": 160}, "entropy"),
                                               ("arborescence", {"n": 160}, "exp_family")])
def test_large_structures_with_explicit_threads(name, params, reg, explicit_threads, gen):
    # before convex_sst._linalg: "RuntimeError: Pivots given to lu_solve must all be greater or
    # equal to 1" (Sinkhorn's Newton step and backward, the arborescence Laplacian's inverse),
    # or wrong numbers without an error (the raw batched solve at B = 2: residuals ~1e17)
    P = cs.load_polytope(name, **params)
    u = torch.randn((2,) + P.shape, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(P.shape, generator=gen, dtype=torch.float64)
    x = cs.relax(u, P, reg, 0.3, backend="fast")
    (g,) = torch.autograd.grad((x * w).sum(), u)
    torch.set_num_threads(1)  # the reference: one thread, torch's batched calls
    x1 = cs.relax(u, P, reg, 0.3, backend="fast")
    (g1,) = torch.autograd.grad((x1 * w).sum(), u)
    assert (x - x1).abs().max() < 1e-9 and (g - g1).abs().max() < 1e-8


@pytest.mark.parametrize("reg", ["entropy", "binary_entropy", "quadratic"])
def test_matching_full_columns_count_as_at_capacity(reg):
    """Forced entries that tie fill column 3 exactly (rows 0 and 2 each split between it and
    another column) with a zero dual: x has a kink there. The Jacobian takes such full columns as
    at capacity, as the interior-point solver does (Sinkhorn took the other side before; central
    differences average the two)."""
    F = 1e4
    u = torch.tensor([[[-0.45, -0.89, F, F, -0.01], [F, -1.27, -1.12, 1.17, 0.93], [0.65, 0.15, -1.15, F, F]]],
                     dtype=torch.float64)
    P = cs.load_polytope("matching", n=3, m=5)
    x = cs.relax(u, P, reg, 1.0)
    assert abs(float(x[0, :, 3].sum()) - 1.0) < 1e-9
    J = torch.autograd.functional.jacobian(lambda v: cs.relax(v, P, reg, 1.0), u)
    Jt = torch.autograd.functional.jacobian(lambda v: cs.relax(v, P, reg, 1.0, backend="torch"), u)
    assert (J - Jt).abs().max() < 1e-5
