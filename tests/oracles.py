"""Independent reference implementations used by the tests (numpy / plain cvxpy, no library code)."""

from __future__ import annotations

import itertools

import cvxpy as cp
import numpy as np


def softmax(theta: np.ndarray) -> np.ndarray:
    z = np.exp(theta - theta.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def sparsemax(theta: np.ndarray) -> np.ndarray:
    """Euclidean projection onto the simplex (Martins & Astudillo 2016), one vector."""
    z = np.sort(theta)[::-1]
    cs = np.cumsum(z)
    k = np.arange(1, len(z) + 1)
    support = z - (cs - 1) / k > 0
    kk = k[support][-1]
    tau = (cs[kk - 1] - 1) / kk
    return np.maximum(theta - tau, 0)


def lml(theta: np.ndarray, k: int, iters: int = 200) -> np.ndarray:
    """argmax θᵀx − Σ binary entropy s.t. Σx = k: x = σ(θ − τ), τ by bisection."""
    lo, hi = theta.min() - 50, theta.max() + 50
    for _ in range(iters):
        tau = 0.5 * (lo + hi)
        s = (1 / (1 + np.exp(-(theta - tau)))).sum()
        lo, hi = (tau, hi) if s > k else (lo, tau)
    return 1 / (1 + np.exp(-(theta - 0.5 * (lo + hi))))


def sinkhorn(theta: np.ndarray, tol: float = 1e-13, max_iters: int = 200_000) -> np.ndarray:
    """argmax <θ, X> + H(X) over doubly stochastic X: Sinkhorn scaling of exp(θ) in log space."""
    logk = theta.copy()
    for _ in range(max_iters):
        logk = logk - np.logaddexp.reduce(logk, axis=1, keepdims=True)
        logk = logk - np.logaddexp.reduce(logk, axis=0, keepdims=True)
        if np.abs(np.exp(logk).sum(1) - 1).max() < tol:
            break
    return np.exp(logk)


def subtour_spanning_tree(theta: np.ndarray, n: int, regularizer: str) -> np.ndarray:
    """Solve the SST over Kₙ's spanning-tree polytope in its 2ⁿ subtour form with plain cvxpy."""
    edges = list(itertools.combinations(range(n), 2))
    x = cp.Variable(len(edges))
    cons = [cp.sum(x) == n - 1, x >= 0, x <= 1]
    for size in range(2, n):
        for S in itertools.combinations(range(n), size):
            idx = [e for e, (i, j) in enumerate(edges) if i in S and j in S]
            cons.append(cp.sum(x[idx]) <= size - 1)
    f = {
        "entropy": -cp.sum(cp.entr(x)),
        "binary_entropy": -cp.sum(cp.entr(x)) - cp.sum(cp.entr(1 - x)),
        "quadratic": 0.5 * cp.sum_squares(x),
    }[regularizer]
    prob = cp.Problem(cp.Maximize(theta @ x - f), cons)
    prob.solve(solver=cp.CLARABEL, tol_gap_abs=1e-10, tol_gap_rel=1e-10, tol_feas=1e-10)
    return np.asarray(x.value)


def f_value(x: np.ndarray, regularizer: str) -> np.ndarray:
    """Regularizer values for rows of x (numpy, with 0 log 0 = 0)."""
    def xlogx(v):
        v = np.clip(v, 0, None)
        return np.where(v > 0, v * np.log(np.where(v > 0, v, 1)), 0.0)

    if regularizer == "entropy":
        return xlogx(x).sum(-1)
    if regularizer == "binary_entropy":
        return (xlogx(x) + xlogx(1 - x)).sum(-1)
    if regularizer == "quadratic":
        return 0.5 * (x * x).sum(-1)
    raise KeyError(regularizer)
