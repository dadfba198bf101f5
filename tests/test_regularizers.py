"""User-defined regularizers: registration checks, routing, and a worked one against its oracle."""

import math

import cvxpy as cp
import pytest
import torch

import convex_sst as cs


def tsallis15(name, cvxpy=True):
    """Tsallis 1.5-entropy f(x) = (Σ x^1.5 − 1) / 0.75: on the simplex its SST is entmax-1.5."""
    return cs.Regularizer(
        name=name,
        description="Tsallis 1.5-entropy",
        cvxpy=(lambda x: (cp.sum(cp.power(x, 1.5)) - 1) / 0.75) if cvxpy else None,
        value=lambda x: ((x.clamp_min(0) ** 1.5).sum(-1) - 1) / 0.75,
        domain=(0.0, math.inf),
        grad=lambda x: 2 * x.clamp_min(0).sqrt(),
        hess=lambda x: x.rsqrt(),
    )


def entmax15(theta):
    """Oracle: x_i = ((θ_i − τ) / 2)₊² with τ by bisection so that Σ x = 1 (KKT of max θᵀx − f(x))."""
    top = theta.max(-1, keepdim=True).values
    lo, hi = top - 2.0, top  # Σ x ≥ 1 at τ = max θ − 2, Σ x = 0 at τ = max θ
    for _ in range(200):
        mid = (lo + hi) / 2
        over = (((theta - mid) / 2).clamp_min(0) ** 2).sum(-1, keepdim=True) > 1
        lo, hi = torch.where(over, mid, lo), torch.where(over, hi, mid)
    return ((theta - (lo + hi) / 2) / 2).clamp_min(0) ** 2


@pytest.fixture(scope="module")
def tsallis():
    return cs.register_regularizer(tsallis15("test_tsallis15"))


def test_user_regularizer_matches_its_oracle(tsallis):
    P = cs.load_polytope("simplex", n=6)
    u = torch.randn(5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    want = entmax15(u / 0.5)
    assert int((want == 0).sum()) > 0  # sparse, unlike the softmax: the test sees the boundary
    torch.testing.assert_close(cs.relax(u, P, "test_tsallis15", 0.5), want, atol=1e-9, rtol=0)  # torch solver
    torch.testing.assert_close(cs.relax(u, P, tsallis, 0.5, backend="generic"), want, atol=1e-7, rtol=0)
    v = u[:2].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda w: cs.relax(w, P, "test_tsallis15", 0.5), (v,), atol=1e-6)
    layer = cs.SST(P, "test_tsallis15", temperature=0.5)
    theta = torch.zeros(6, requires_grad=True)
    (layer(theta.expand(4, 6)) * torch.arange(6.0)).sum().backward()
    assert theta.grad is not None and bool(torch.isfinite(theta.grad).all())


def test_regularizer_without_cvxpy_form_uses_the_torch_solver():
    # "auto" used to refuse it (no fast path, no cvxpy form) although the torch solver handles it
    reg = cs.register_regularizer(tsallis15("test_tsallis15_torch_only", cvxpy=False))
    P = cs.load_polytope("k_subset", n=5, k=2)
    u = torch.randn(3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert torch.equal(cs.relax(u, P, reg, 0.5), cs.relax(u, P, reg, 0.5, backend="torch"))
    assert torch.allclose(cs.relax(u, P, reg, 0.5).sum(-1), torch.full((3,), 2.0, dtype=torch.float64), atol=1e-9)
    with pytest.raises(cs.ConvexSSTError, match="no cvxpy form"):
        cs.relax(u, P, reg, 0.5, backend="generic")


def scaled_quadratic(name, c):
    return cs.Regularizer(name, f"{c}/2 ‖x‖²", lambda x: c / 2 * cp.sum_squares(x), lambda x: c / 2 * (x * x).sum(-1),
                          grad=lambda x: c * x, hess=lambda x: torch.full_like(x, c))


def test_replace_redefines_a_users_regularizer():
    # on the cube, argmax uᵀx − (c/2)‖x‖² is clip(u / c, 0, 1): the layers compiled for the old
    # definition must not be reused for the new one
    P = cs.load_polytope("hypercube", n=3)
    u = torch.tensor([0.5, 1.5, -1.0], dtype=torch.float64)
    for c in (1.0, 4.0):
        cs.register_regularizer(scaled_quadratic("test_scaled_quadratic", c), replace=c != 1.0)
        for backend in ("torch", "generic"):
            x = cs.relax(u, P, "test_scaled_quadratic", 1.0, backend=backend)
            torch.testing.assert_close(x, (u / c).clamp(0, 1), atol=1e-9 if backend == "torch" else 2e-6, rtol=0)
    with pytest.raises(cs.RegistrationError, match="already registered; choose another name, or pass replace=True"):
        cs.register_regularizer(scaled_quadratic("test_scaled_quadratic", 2.0))
    with pytest.raises(cs.RegistrationError, match="'quadratic' is already registered; choose another name$"):
        cs.register_regularizer(scaled_quadratic("quadratic", 2.0), replace=True)


def test_an_unregistered_regularizer_cannot_borrow_a_registered_name():
    # fast paths are found by name: this "entropy" would have been computed by the softmax
    P = cs.load_polytope("simplex", n=3)
    with pytest.raises(cs.RegistrationError, match="a different regularizer named 'entropy' is registered"):
        cs.relax(torch.zeros(3), P, scaled_quadratic("entropy", 2.0))


@pytest.mark.parametrize("change, message", [
    (dict(grad=lambda x: -2 * x.clamp_min(0).sqrt()), r"hess\(0.1\) = 3.16228, but the slope of grad there is -3.16228"),
    (dict(value=lambda x: ((x.clamp_min(0) ** 1.5).sum(-1) - 1) / 1.5), r"grad\(0.1\) = 0.632456, but the slope of value there is 0.316228"),
    (dict(hess=lambda x: -x.rsqrt()), r"hess = -3.16228; both must be finite and hess > 0 \(f strictly convex\)"),
    # slips in part of the domain only (the probe points are 0.1, 0.5, 1, 2 and 5)
    (dict(grad=lambda x: torch.where(x > 1.5, 3.0, 2.0) * x.clamp_min(0).sqrt()),
     r"hess\(2\) = 0.707107, but the slope of grad there is 1.06066"),
    (dict(hess=lambda x: torch.where(x > 1.5, 0.0, 1.0) * x.rsqrt()), r"at x = 2, grad = 2.82843 and hess = 0;"),
    (dict(hess=None), "give both grad and hess"),
    (dict(grad=lambda x: x.sum()), r"grad must return a tensor of shape \(5,\) for input \(5,\), got \(\)"),
    (dict(grad=lambda x: x.numpy()), "grad must return a tensor of shape"),
    (dict(value=lambda x: math.sqrt(x)), r"value failed on a float64 tensor of shape \(5, 1\): ValueError"),
    (dict(value="x ** 1.5"), "value must be a function or None, got str"),
    (dict(domain=(1.0, 0.0)), "is empty"),
    (dict(domain=(0.5, 0.5)), "is empty"),
    (dict(domain="positive"), r"domain must be a pair of numbers \(lo, hi\)"),
    (dict(name=""), "name must be a non-empty string"),
])
def test_registration_catches_slips_where_they_are_made(change, message):
    fields = {f: getattr(tsallis15("test_bad"), f) for f in ("name", "description", "cvxpy", "value", "domain", "grad", "hess")}
    with pytest.raises(cs.RegistrationError, match=message):
        cs.register_regularizer(cs.Regularizer(**{**fields, **change}))
    assert "test_bad" not in cs.available_regularizers()


def test_a_domain_bounded_only_above_is_probed_below_its_end():
    # f(x) = −log(2 − x) on (−inf, 2): registration probes x = −3, 0, 1, 1.5, 1.9 (a slip in
    # hess is caught there), and on the cube x_i = clip(2 − t / u_i, 0, 1), where u − t f'(x) = 0
    def barrier(name, hess):
        return cs.Regularizer(name=name, description="−log(2 − x)", cvxpy=lambda x: -cp.sum(cp.log(2 - x)),
                              value=lambda x: -torch.log(2 - x).sum(-1), domain=(-math.inf, 2.0),
                              grad=lambda x: 1 / (2 - x), hess=hess)

    with pytest.raises(cs.RegistrationError, match=r"hess\(-3\) = 0.08, but the slope of grad there is 0.04"):
        cs.register_regularizer(barrier("test_barrier_bad", lambda x: 2 / (2 - x) ** 2))
    reg = cs.register_regularizer(barrier("test_barrier", lambda x: 1 / (2 - x) ** 2), replace=True)
    P = cs.load_polytope("hypercube", n=5)
    u = torch.tensor([-1.0, 0.2, 0.5, 0.8, 3.0], dtype=torch.float64)
    t = 0.5
    want = (2 - t / u).clamp(0, 1).where(u > 0, torch.zeros_like(u))
    torch.testing.assert_close(cs.relax(u, P, reg, t), want, atol=1e-8, rtol=0)


def test_a_polytope_used_with_an_unregistered_regularizer_still_pickles():
    # the polytope remembers which regularizers passed its domain check; a user's unregistered
    # one holds lambdas, which must not end up in pickles of the polytope (torch.save(model))
    import pickle

    P = cs.load_polytope("hypercube", n=3)
    reg = scaled_quadratic("test_unregistered_quadratic", 2.0)
    x = cs.relax(torch.tensor([0.5, 1.5, -1.0], dtype=torch.float64), P, reg, 1.0)
    torch.testing.assert_close(x, torch.tensor([0.25, 0.75, 0.0], dtype=torch.float64), atol=1e-9, rtol=0)
    assert pickle.loads(pickle.dumps(P)).shape == (3,)
