"""Reference oracles for small instances, public so users can test their own structures."""

from __future__ import annotations

import torch

from .polytope import Polytope
from .relax import as_polytope, check_temperature


def brute_force_marginals(u: torch.Tensor, polytope: Polytope | str, temperature: float | torch.Tensor = 1.0,
                          limit: int = 10_000) -> torch.Tensor:
    """``Σ_{x∈𝒳} softmax_x(uᵀx / t) · x`` by enumerating the vertices: the ``exp_family`` SST.

    Args:
        u: ``(*batch, *shape)`` utilities.
        polytope: a small polytope (at most ``limit`` vertices).
        temperature: t > 0.

    Returns:
        ``(*batch, *shape)``, differentiable in ``u`` and ``t`` (autograd through the sum).
    """
    P = as_polytope(polytope)
    batch = P.check_input(u)
    t = check_temperature(temperature, batch, u)
    V = P.vertices(limit=limit, dtype=u.dtype).to(u.device).reshape(-1, P.size)
    t_rows = t.expand(batch).reshape(-1, 1) if t.dim() else t  # one temperature per structure
    scores = u.reshape(-1, P.size) @ V.T / t_rows
    probs = torch.softmax(scores, dim=-1)
    return (probs @ V).reshape(batch + P.shape)


def brute_force_argmax(u: torch.Tensor, polytope: Polytope | str) -> torch.Tensor:
    """``argmax_{x∈𝒳} uᵀx`` by enumerating the vertices: ``(*batch, *shape)``."""
    P = as_polytope(polytope)
    batch = P.check_input(u)
    V = P.vertices(dtype=u.dtype).to(u.device).reshape(-1, P.size)
    best = (u.reshape(-1, P.size) @ V.T).argmax(-1)
    return V[best].reshape(batch + P.shape)
