import os
import sys
import warnings

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

import convex_sst as cs  # noqa: E402

# Small instances of every built-in, with the number of structures theory predicts.
# test_every_builtin_has_cases fails if a built-in polytope is added without an entry here.
SMALL_CASES = {
    "simplex": [({"n": 4}, 4), ({"n": 2}, 2)],
    "hypercube": [({"n": 3}, 8)],
    "k_subset": [({"n": 5, "k": 2}, 10), ({"n": 6, "k": 3}, 20), ({"n": 4, "k": 4}, 1)],
    "birkhoff": [({"n": 3}, 6), ({"n": 4}, 24)],
    "matching": [({"n": 2, "m": 3}, 6), ({"n": 2, "m": 4}, 12)],
    "spanning_tree": [({"n": 4}, 16), ({"n": 5}, 125),
                      ({"n": 4, "edges": [[0, 1], [1, 2], [2, 3], [3, 0], [0, 2]]}, 8)],
    "arborescence": [({"n": 3}, 3), ({"n": 4}, 16), ({"n": 4, "root": 3}, 16), ({"n": 5}, 125)],
    "dag_path": [({}, 3), ({"n": 5, "edges": [[0, 1], [0, 2], [1, 3], [2, 3], [3, 4], [1, 4]],
                         "source": 0, "target": 4}, 3)],
    "correlated_k_subset": [({"n": 5, "k": 2}, 10), ({"n": 6, "k": 3}, 20), ({"n": 4, "k": 4}, 1),
                            ({"n": 3, "k": 1}, 3)],
}

# One small instance per built-in for the (slower) relaxation tests.
RELAX_CASES = {
    "simplex": {"n": 4},
    "hypercube": {"n": 3},
    "k_subset": {"n": 5, "k": 2},
    "birkhoff": {"n": 3},
    "matching": {"n": 2, "m": 3},
    "spanning_tree": {"n": 4},
    "arborescence": {"n": 3},
    "dag_path": {},
    "correlated_k_subset": {"n": 4, "k": 2},
}


def relax_pairs():
    """Every (built-in polytope, declared regularizer with a cvxpy form) pair."""
    pairs = []
    from convex_sst.polytope import builtin_config_paths

    for name in builtin_config_paths():
        P = cs.load_polytope(name, **RELAX_CASES.get(name, {}))
        for reg in P.regularizers:
            from convex_sst.regularizers import get_regularizer

            if get_regularizer(reg).cvxpy is not None:
                pairs.append((name, reg))
    return pairs


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)


def user_copy(tmp_path, name):
    """A built-in config saved as a user's file without its registered argmax (so every
    question about P goes to the LPs)."""
    from convex_sst.polytope import builtin_config_paths

    text = builtin_config_paths()[name].read_text()
    text = "\n".join(line for line in text.splitlines() if not line.startswith("argmax:"))
    path = tmp_path / f"my_{name}.yaml"
    path.write_text(text.replace(f"name: {name}", f"name: my_{name}", 1))
    return path


def check_newton_against_wolfe(P, u, w, t: float, constant: str, monkeypatch, h: float, fd_tol: float) -> None:
    """The quadratic's gradient of ``(relax(u) * w).sum()`` by a Newton path (``fast.<constant>``,
    its hull span, set to inf) equals Wolfe's algorithm's (set to -inf) to 1e-9, and its
    directional derivative central differences (step h, a random direction) to ``fd_tol``."""
    import math

    grads = []
    for span in (math.inf, -math.inf):  # Newton, then Wolfe's algorithm
        monkeypatch.setattr(cs.fast, constant, span)
        v = u.clone().requires_grad_()
        grads.append(torch.autograd.grad((cs.relax(v, P, "quadratic", t) * w).sum(), v)[0])
    d = torch.randn(u.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        fd = ((cs.relax(u + h * d, P, "quadratic", t) - cs.relax(u - h * d, P, "quadratic", t)) * w).sum() / (2 * h)
    assert (grads[0] - grads[1]).abs().max() < 1e-9
    assert abs(float((grads[0] * d).sum() - fd)) < fd_tol


def check_unconverged_rows(P, u, reg: str, t: float, method: str, balance: str) -> None:
    """A Newton dual path stopped after one step (``max_iter=1``): by default its rows fall back
    to the interior-point solver silently and agree with the converged result; with
    ``on_failure="warn"`` / ``"raise"`` the message names the ``method`` and what did not
    ``balance``."""
    exact = cs.relax(u, P, reg, t)
    with warnings.catch_warnings():
        warnings.simplefilter("error", cs.SolverWarning)
        fallback = cs.relax(u, P, reg, t, max_iter=1)  # the interior-point solver
    assert (fallback - exact).abs().max() < 1e-7
    with pytest.warns(cs.SolverWarning, match=rf"{method} did not converge for batch element"):
        cs.relax(u, P, reg, t, max_iter=1, on_failure="warn")
    with pytest.raises(cs.SolverError, match=rf"{balance} not within the tolerance after max_iter = 1"):
        cs.relax(u, P, reg, t, max_iter=1, on_failure="raise")
