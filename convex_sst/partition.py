"""``log_partition``: the log-normalizer ``log Σ_{x∈𝒳} exp(uᵀx / t)`` of the Gibbs distribution.

Its gradient in ``u`` is ``relax(u, P, "exp_family", t) / t``, the marginals: the
exp-family SST is the gradient map of this function. With it, a structure is also a
conditional random field: ``log p(x) = uᵀx / t − log_partition(u, P, t)`` is the
log-likelihood of a given structure (supervised training), and ``log_partition − uᵀμ / t`` the
Gibbs distribution's entropy.

Exact algorithms per built-in structure (all in log space, differentiable twice by autograd):
logsumexp (simplex), softplus (cube), the elementary symmetric polynomial (k-subsets), the
matrix-tree theorem by log-space elimination (spanning trees, arborescences), a forward pass in
topological order (DAG paths), a forward pass over the items with states (count, last item
chosen) (correlated k-subsets). Other polytopes (Birkhoff: the permanent, #P-hard; matchings;
user configs) are enumerated when they have at most ``limit`` structures.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ._autograd import graph_break
from ._forbidden import empty_face_error, fill_forbidden, lower_forced
from ._scalars import positive_int
from .errors import InputError, NotSupportedError, PolytopeError
from .fast import (_neg, k_subset_marginals, log1p_exp, log_e_k, log_partition_arborescences, log_partition_dag_paths,
                   log_partition_subset_chain)
from .polytope import Polytope
from .relax import as_polytope, check_temperature

__all__ = ["log_partition"]

_Algorithm = Callable[[torch.Tensor, Polytope], torch.Tensor]  # θ: (B, d) -> (B,)


def _simplex(theta: torch.Tensor, P: Polytope) -> torch.Tensor:
    return torch.logsumexp(theta, dim=1)


def _hypercube(theta: torch.Tensor, P: Polytope) -> torch.Tensor:
    return log1p_exp(theta).sum(1)  # Π (1 + e^θ): each bit on or off


class _KSubsetLogPartition(torch.autograd.Function):
    """``log e_k(exp θ)`` by :func:`convex_sst.fast.log_e_k` (the DFT of the tilted subset size's
    law, or a product tree); its gradient is the marginals of the k-subset fast path
    (differentiable again, so second derivatives work)."""

    @staticmethod
    def forward(ctx, theta, P):
        ctx.P = P
        ctx.save_for_backward(theta)
        return log_e_k(theta.detach(), int(P.params["k"]))

    @staticmethod
    def backward(ctx, g):
        (theta,) = ctx.saved_tensors
        return g[:, None] * k_subset_marginals(theta, ctx.P), None


def _k_subset(theta: torch.Tensor, P: Polytope) -> torch.Tensor:
    k, n = int(P.params["k"]), int(P.params["n"])
    if k == n:
        return theta.sum(1)
    return _KSubsetLogPartition.apply(theta.double(), P).to(theta.dtype)


def _spanning_tree(theta: torch.Tensor, P: Polytope) -> torch.Tensor:
    # spanning trees of an undirected graph correspond one to one, with equal weight, to the
    # arborescences rooted at 0 of its symmetric digraph
    n = int(P.params["n"])
    E = torch.as_tensor(P.data["E"], device=theta.device)
    th = theta.double()
    B = th.shape[0]
    logw = torch.full((B, n, n), _neg(th.dtype), dtype=th.dtype, device=th.device)
    rows = torch.arange(B, device=th.device)[:, None]
    logw = logw.index_put((rows, E[None, :, 0], E[None, :, 1]), th)
    logw = logw.index_put((rows, E[None, :, 1], E[None, :, 0]), th)
    return log_partition_arborescences(logw, 0).to(theta.dtype)


def _arborescence(theta: torch.Tensor, P: Polytope) -> torch.Tensor:
    n, root = int(P.params["n"]), int(P.params["root"])
    th = theta.double().reshape(-1, n, n)
    absent = torch.eye(n, dtype=torch.bool, device=th.device)
    absent[:, root] = True  # no self-loops, no arcs into the root
    return log_partition_arborescences(th.masked_fill(absent, _neg(th.dtype)), root).to(theta.dtype)


_ALGORITHMS: dict[str, _Algorithm] = {
    "simplex": _simplex,
    "hypercube": _hypercube,
    "k_subset": _k_subset,
    "spanning_tree": _spanning_tree,
    "arborescence": _arborescence,
    "dag_path": log_partition_dag_paths,
    "correlated_k_subset": log_partition_subset_chain,
}

# algorithms whose scores at 1e9 lose their differences to rounding (forced entries come down first)
_LOWER_FORCED = {"spanning_tree", "arborescence", "dag_path", "correlated_k_subset"}


def _enumerate(theta: torch.Tensor, P: Polytope, limit: int) -> torch.Tensor:
    try:
        V = P.vertices(limit=limit, dtype=theta.dtype).to(theta.device).reshape(-1, P.size)
    except PolytopeError as exc:
        raise NotSupportedError(
            f"log_partition has no exact algorithm for {P!r}, and enumerating its structures failed: {exc}. "
            f"Built-in algorithms: {', '.join(sorted(_ALGORITHMS))}; raise limit to enumerate more"
        ) from exc
    return torch.logsumexp(theta @ V.T, dim=1)


@graph_break  # a graph break under torch.compile, like relax
def log_partition(u: torch.Tensor, polytope: Polytope | str, temperature: float | torch.Tensor = 1.0,
                  limit: int = 10_000) -> torch.Tensor:
    """Log-partition function ``log Σ_{x∈𝒳} exp(uᵀx / t)`` of the Gibbs distribution over structures.

    ``∂/∂u log_partition(u, P, t) = relax(u, P, "exp_family", t) / t`` (the marginals), so
    ``uᵀx / t − log_partition(u, P, t)`` is the log-probability of a structure ``x`` under
    ``p(x) ∝ exp(uᵀx / t)`` (a CRF's log-likelihood). Exact, in log space (no overflow at any
    temperature), differentiable twice; spanning trees, arborescences and k-subsets are computed
    in float64 whatever the input dtype.

    Args:
        u: scores ``(*batch, *polytope.shape)``; ``-inf`` forbids a coordinate (the sum runs
            over the structures that avoid it), as in :func:`relax`.
        polytope: a :class:`Polytope` or a built-in name.
        temperature: ``t > 0``, a float or a tensor broadcastable to ``batch``.
        limit: polytopes without an exact algorithm here (Birkhoff, matching, your configs) are
            enumerated if they have at most this many structures, else
            :class:`NotSupportedError`.

    Returns:
        ``(*batch,)`` tensor, ``u``'s dtype and device.

    Example:
        >>> P = load_polytope("spanning_tree", n=5)
        >>> log_partition(torch.zeros(10), P).exp()    # Cayley: 5³ = 125 spanning trees of K5
    """
    P = as_polytope(polytope)
    batch, forbidden = P._check_masked(u)
    limit = positive_int(limit, "limit")
    if u.dtype not in (torch.float32, torch.float64):
        u32 = u.float() if forbidden is None else u.float().masked_fill(forbidden, -math.inf)
        z = log_partition(u32, P, temperature, limit)
        over = z.detach().abs() > torch.finfo(u.dtype).max
        if bool(over.any()):  # rounding back would give ±inf, silently
            first = tuple(int(i) for i in over.nonzero()[0])
            raise InputError(f"log_partition is {float(z.detach()[first]):.4g} at batch index {first}, beyond "
                             f"{u.dtype}'s range (±{torch.finfo(u.dtype).max:g}); hint: pass u as float32 "
                             "(u.float()), or use a higher temperature")
        return z.to(u.dtype)
    t = check_temperature(temperature, batch, u)
    if forbidden is not None:
        u = u.masked_fill(forbidden, 0.0)  # before dividing by t: no inf in any backward pass
    theta = (u / t.reshape(tuple(t.shape) + (1,) * len(P.shape))).reshape(-1, P.size)
    if forbidden is not None:
        mask = forbidden.reshape(theta.shape)
        theta = fill_forbidden(theta, mask)
    # entries far above the others (u_j + 1e9 to force a choice) come down to where they are only
    # just far above, as in relax: every structure that carries weight then has the most of them
    # (a maximizer of the lowered scores does), so log Z drops by the shift times their count, and
    # the marginals move by less than e^-40. At 1e9, scores lost their differences to rounding
    # (ulp 1.2e-7): the gradient was off by up to 6e-8 (trees, arborescences, DAG paths,
    # enumeration; the closed forms of the simplex, cube and k-subsets keep full precision)
    algorithm = _ALGORITHMS.get(P.name) if P.builtin else None
    lowered, lift = theta, None
    if algorithm is None or P.name in _LOWER_FORCED:
        lowered = lower_forced(theta, None if forbidden is None else mask, P._flat_argmax)
        if lowered is not theta:
            lift = ((theta - lowered).detach() * P._flat_argmax(lowered.detach()).to(theta.dtype)).sum(1)
    if algorithm is not None:
        out = algorithm(lowered, P)
    else:
        out = _enumerate(lowered, P, limit)
    if lift is not None:
        out = out + lift
    if forbidden is not None:
        # a structure that avoids the forbidden coordinates scores at least −Σ|θ|; one that uses
        # one at most −Σ|θ| − 40 (d + 1), and there are at most 2^d of them
        floor = -torch.where(mask, 0.0, theta.detach().abs()).sum(1) - 1.0
        empty = (out.detach() < floor).nonzero().reshape(-1)
        if empty.numel():
            raise empty_face_error(empty, batch, P, "u")
    return out.reshape(batch)
