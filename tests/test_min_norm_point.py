"""The quadratic relaxation by Wolfe's minimum-norm-point algorithm (the fast path of arborescences
and correlated k-subsets): against the projection onto the hull of the enumerated structures, an
optimality certificate over every structure, derivatives against differences, and the Jacobian
where the final vertices do not span the optimal face."""

import warnings

import numpy as np
import pytest
import torch

import convex_sst as cs
import oracles
from convex_sst._min_norm_point import TOL, min_norm_point, project_onto_hull
from convex_sst.fast import projection_by_argmax

CASES = [("arborescence", {"n": 4}), ("arborescence", {"n": 5, "root": 2}), ("correlated_k_subset", {"n": 7, "k": 3})]


def _birkhoff_argmax(n):
    P = cs.load_polytope("birkhoff", n=n)
    return lambda s: P.argmax(s.reshape(-1, n, n)).reshape(s.shape[0], -1)


@pytest.mark.parametrize("name,params", CASES)
@pytest.mark.parametrize("t", [0.1, 1.0, 5.0])
@pytest.mark.parametrize("ties", [False, True])
def test_equals_the_projection_onto_the_hull_of_the_structures(name, params, t, ties, gen):
    P = cs.load_polytope(name, **params)
    V = P.vertices().reshape(-1, P.size).double().numpy()
    B = 12
    if ties:  # small integers: many structures tie, and the optimal face is degenerate
        u = torch.randint(-2, 3, (B,) + P.shape, generator=gen).double()
    else:
        u = torch.randn((B,) + P.shape, generator=gen, dtype=torch.float64)
    x = cs.relax(u, P, "quadratic", t, backend="fast")
    assert bool(P.contains(x).all())
    x = x.reshape(B, -1).numpy()
    theta = (u / t).reshape(B, -1).numpy()
    for i in range(B):
        g = theta[i] - x[i]
        # optimal over every structure: (θ − x)ᵀ(v − x) ≤ 0 for all v, to rounding
        assert (V @ g).max() - g @ x[i] < 1e-12 * (1 + np.abs(g).sum())
        assert np.abs(x[i] - oracles.hull_projection(V, theta[i])).max() < 1e-12


@pytest.mark.parametrize("name,params", [("arborescence", {"n": 7}), ("correlated_k_subset", {"n": 20, "k": 5})])
@pytest.mark.parametrize("t", [0.3, 3.0])
def test_directional_derivatives_match_differences_on_every_row(name, params, t, gen):
    # x is piecewise affine in u: central differences are exact up to rounding away from the
    # (measure-zero) places where the optimal face changes, so every row must agree
    P = cs.load_polytope(name, **params)
    B = 24
    u = torch.randn((B,) + P.shape, generator=gen, dtype=torch.float64, requires_grad=True)
    v = torch.randn(u.shape, generator=gen, dtype=torch.float64)
    x = cs.relax(u, P, "quadratic", t, backend="fast")
    (jv,) = torch.autograd.grad((x * v).sum(), u)  # the Jacobian is symmetric: Jᵀv = Jv
    h = 1e-6
    with torch.no_grad():
        fd = (cs.relax(u + h * v, P, "quadratic", t) - cs.relax(u - h * v, P, "quadratic", t)) / (2 * h)
    assert (jv - fd).abs().max() < 1e-6


def test_torch_solver_agrees(gen):
    P = cs.load_polytope("arborescence", n=6)
    u = torch.randn((8,) + P.shape, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(u.shape, generator=gen, dtype=torch.float64)
    out = {}
    for backend in ("fast", "torch"):
        x = cs.relax(u, P, "quadratic", 0.5, backend=backend)
        out[backend] = (x.detach(), torch.autograd.grad((x * w).sum(), u)[0])
    assert (out["fast"][0] - out["torch"][0]).abs().max() < 1e-6
    assert (out["fast"][1] - out["torch"][1]).abs().max() < 1e-5


def test_the_jacobian_spans_the_optimal_face_when_the_vertices_do_not():
    # equal utilities on Birkhoff n = 3: Wolfe's corral is {I, C, C²} (C a 3-cycle), whose
    # average is already the optimum J/3, but they span 2 of the polytope's 4 dimensions. x is
    # in the interior, so the Jacobian is the projector onto the whole tangent space
    # {row and column sums 0}: (I − J/3) ⊗ (I − J/3)
    n = 3
    argmax = _birkhoff_argmax(n)
    theta = torch.zeros(1, n * n, dtype=torch.float64)
    x, corrals, _, failed = min_norm_point(theta.numpy(), lambda s: argmax(torch.from_numpy(s)).numpy())
    assert not failed.any() and np.allclose(x, 1 / 3)
    D = corrals[0].S[1:] - corrals[0].S[0]
    assert np.linalg.matrix_rank(D) == (n - 1) ** 2
    theta.requires_grad_(True)
    x = project_onto_hull(theta, argmax, TOL, 100, lambda *a: None)
    J = torch.stack([torch.autograd.grad(x[0, j], theta, retain_graph=True)[0][0] for j in range(n * n)])
    c = torch.eye(n, dtype=torch.float64) - 1 / n
    assert (J - torch.kron(c, c)).abs().max() < 1e-12


def test_large_corrals_on_birkhoff_match_differences(gen):
    # high temperature on Birkhoff n = 12 (t = 12): corrals of over 100 vertices in faces of high
    # dimension, where they often end short of their face (without the completion, 2 rows of
    # these 24 were off by up to 0.4; at n = 14 and t = 20, 14 of 24)
    n = 12
    argmax = _birkhoff_argmax(n)
    theta = torch.randn(24, n * n, generator=gen, dtype=torch.float64) / 12.0
    v = torch.randn(theta.shape, generator=gen, dtype=torch.float64)
    th = theta.clone().requires_grad_(True)
    x = project_onto_hull(th, argmax, TOL, 1000, lambda *a: None)
    (jv,) = torch.autograd.grad((x * v).sum(), th)
    h = 1e-6
    with torch.no_grad():
        fd = (project_onto_hull(theta + h * v, argmax, TOL, 1000, lambda *a: None)
              - project_onto_hull(theta - h * v, argmax, TOL, 1000, lambda *a: None)) / (2 * h)
    assert (jv - fd).abs().max() < 1e-6


def test_unconverged_rows_are_reported(gen):
    P = cs.load_polytope("arborescence", n=6)
    u = torch.randn((4,) + P.shape, generator=gen, dtype=torch.float64)
    with pytest.warns(cs.SolverWarning, match="minimum-norm-point.*batch element"):
        cs.relax(u, P, "quadratic", 2.0, max_iter=1)
    with pytest.raises(cs.SolverError, match="minimum-norm-point"):
        cs.relax(u, P, "quadratic", 2.0, max_iter=1, on_failure="raise")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cs.relax(u, P, "quadratic", 2.0)


def test_fast_path_is_registered_for_the_flow_formulations():
    for name in ("arborescence", "correlated_k_subset"):
        assert ("quadratic" in [r for p, r in cs.available_fast_paths() if p == name])
    P = cs.load_polytope("arborescence", n=4)
    x = projection_by_argmax(torch.zeros((0,) + P.shape, dtype=torch.float64), P)
    assert x.shape == (0,) + P.shape


def test_the_corrals_factor_after_drops_equals_a_fresh_factorization():
    # vertices leave the corral by rank-one updates of its Cholesky factor (s_0 by a fresh one)
    from convex_sst._min_norm_point import _Corral

    rng = np.random.default_rng(0)
    checked = 0
    for trial in range(200):
        d = int(rng.integers(5, 40))
        theta = rng.standard_normal(d)
        c = _Corral((rng.random(d) < 0.5).astype(float), theta)
        for _ in range(int(rng.integers(2, 25))):
            c.add((rng.random(d) < 0.5).astype(float), theta)  # refused where affinely dependent
        c.lam = rng.random(c.k) + 0.1
        keep = rng.random(c.k) < 0.7
        keep[int(rng.integers(c.k))] = True
        keep[0] |= trial % 3 == 0  # s_0 kept in every third trial, at random in the others
        c.keep(keep)
        if c.k > 1:
            fresh = np.linalg.cholesky(c.directions())
            assert c.factored and np.abs(np.tril(c._L) - fresh).max() < 1e-12 * max(1.0, np.abs(fresh).max())
            checked += 1
    assert checked > 150
