"""Gradient estimators for ``d/dθ E[L(X)]``, ``X = argmax_{x∈𝒳} (θ + G)ᵀx``, and their ground truth.

Estimators (one call = one estimate, shape of θ):

* **relaxed SST** (:func:`sst_gradient`): ``(1/K) Σ_k dL(X_t^k)/dθ`` through the relaxation
  ``X_t = argmax_{x∈P} Uᵀx − t f(x)``; biased (it differentiates ``E[L(X_t)]``), low variance;
  the bias vanishes as ``t → 0`` while the variance grows.
* **straight-through SST** (``straight_through=True``): forward ``X``, backward ``∂X_t/∂U``:
  ``L`` is evaluated on hard structures; biased.
* **score function / REINFORCE** (:func:`score_function`): ``(1/K) Σ_k (L(X_k) − b_k) ∇θ log p_θ(U_k)``
  with ``p_θ(U) = Π_i f_G(U_i − θ_i)`` the density of the utilities (exact for Gumbel, Gaussian
  and logistic noise; works for any polytope because it never needs ``p_θ(X)``). Unbiased; high
  variance, reduced by a baseline ``b``: ``"loo"`` (mean loss of the other K − 1 samples),
  ``"ema"`` (exponential moving average of past losses), or a callable (NVIL-style learned
  baseline ``b(θ)``).

Ground truth for small structures: :func:`smt_distribution` gives ``p_θ(x)`` over the vertices
(closed form for one-hot and independent bits under Gumbel noise, and for independent bits
under logistic noise, ``σ(θ)``; exact enumeration of the
Plackett–Luce orderings of the utilities for top-k and spanning trees, whose argmax depends only
on the order of the utilities; Monte Carlo with a standard error otherwise), and
:func:`exact_gradient` differentiates ``Σ_x p_θ(x) L(x)`` by autograd.

The paper's VAEs regularize the utilities with :func:`gumbel_kl`.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, overload

import numpy as np
import torch

from ._scalars import as_int, as_real, positive_int
from ._unionfind import UnionFind
from ._forbidden import empty_face_error, fill_forbidden, is_forbidden
from .errors import InputError, PolytopeError
from .noise import Gumbel, Logistic, Noise, get_noise
from .polytope import Polytope
from .regularizers import Regularizer
from ._autograd import _differentiates, _explain_torch_func_per_theta
from .relax import as_polytope, relax
from .sst import perturb

LossFn = Callable[[torch.Tensor], torch.Tensor]


def gumbel_kl(theta: torch.Tensor) -> torch.Tensor:
    """``KL(Gumbel(θ, 1) ‖ Gumbel(0, 1)) = θ + e^{−θ} − 1``, elementwise (same shape as θ)."""
    return theta + torch.exp(-theta) - 1.0


# ------------------------------------------------------------------------------------------
# Checking user callables
# ------------------------------------------------------------------------------------------


def _check_masked_theta(theta: torch.Tensor, P: Polytope) -> torch.Tensor | None:
    """Validate ``theta`` of exactly the polytope's shape, ``-inf`` allowed (forbidden
    coordinates); return their mask (None when there are none)."""
    batch, forbidden = P._check_masked(theta, "theta")
    if batch:
        raise InputError(f"theta must have exactly the polytope's shape {P.shape} here, got {tuple(theta.shape)}")
    return forbidden


def utility_log_density(nz: Noise, u: torch.Tensor, theta: torch.Tensor, forbidden: torch.Tensor | None) -> torch.Tensor:
    """Elementwise ``log f_G(u − θ)``, 0 at forbidden coordinates (there U = -inf whatever G is:
    no density and no score; (-inf) − (-inf) = NaN is replaced before ``log_prob``)."""
    g = u - theta
    if forbidden is None:
        return nz.log_prob(g)
    return nz.log_prob(g.masked_fill(forbidden, 0.0)).masked_fill(forbidden, 0.0)


def _call_loss(loss_fn: LossFn, x: torch.Tensor, P: Polytope) -> torch.Tensor:
    batch = tuple(x.shape[: x.dim() - len(P.shape)])
    out = loss_fn(x)
    if not isinstance(out, torch.Tensor):
        raise InputError(f"loss_fn must return a tensor of shape {batch}, got {type(out).__name__}")
    if tuple(out.shape) != batch:
        raise InputError(
            f"loss_fn must map structures (*batch, {', '.join(map(str, P.shape))}) to losses (*batch,); "
            f"for input {tuple(x.shape)} it returned shape {tuple(out.shape)}, expected {batch}"
        )
    if not bool(torch.isfinite(out.detach()).all()):
        bad = (~torch.isfinite(out.detach())).reshape(-1).nonzero()[0, 0].item()
        raise InputError(f"loss_fn returned NaN or inf (first at flat index {bad})")
    return out


# ------------------------------------------------------------------------------------------
# Exact SMT distributions
# ------------------------------------------------------------------------------------------


class _TooManyOrderings(Exception):
    """Raised by :func:`_greedy_sequences` past ``limit``; the caller words the error."""


def _greedy_sequences(P: Polytope, limit: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Orderings that decide the argmax, for structures chosen greedily from sorted utilities.

    Returns ``(picks (S, r), relevant (S, r, d) bool, structure id per sequence)`` or None when
    the polytope's argmax is not a greedy rule over the order of the utilities.
    """
    if P.name == "simplex":
        r, can_add = 1, (lambda chosen, e: True)
    elif P.name == "k_subset":
        r, can_add = int(P.params["k"]), (lambda chosen, e: True)
    elif P.name == "spanning_tree":
        n = int(P.params["n"])
        E = np.asarray(P.data["E"])
        r = n - 1

        def can_add(chosen, e):
            sets = UnionFind(n)
            for c in chosen:
                sets.union(int(E[c, 0]), int(E[c, 1]))
            return sets.find(int(E[e, 0])) != sets.find(int(E[e, 1]))
    else:
        return None
    d = P.size
    picks, relevant = [], []

    def dfs(chosen: list[int], masks: list[np.ndarray]) -> None:
        if len(chosen) == r:
            picks.append(list(chosen))
            relevant.append(np.stack(masks))
            if len(picks) > limit:
                raise _TooManyOrderings
            return
        mask = np.array([e not in chosen and can_add(chosen, e) for e in range(d)])
        for e in np.flatnonzero(mask):
            dfs(chosen + [int(e)], masks + [mask])

    dfs([], [])
    picks_a = np.asarray(picks)
    keys: dict[tuple[int, ...], int] = {}
    ids = np.array([keys.setdefault(tuple(sorted(p)), len(keys)) for p in picks_a.tolist()])
    return picks_a, np.asarray(relevant), ids


@_explain_torch_func_per_theta
def smt_distribution(polytope: Polytope | str, theta: torch.Tensor, noise: str | Noise = "gumbel",
                     method: str = "exact", num_samples: int | None = None,
                     generator: torch.Generator | None = None, limit: int = 200_000,
                     return_stderr: bool = False) -> tuple[torch.Tensor, ...]:
    """The distribution of ``X = argmax_{x∈𝒳} (θ + G)ᵀx`` over the vertices.

    Args:
        polytope: the structure.
        theta: ``polytope.shape`` (no batch), any float dtype; probabilities are differentiable
            in θ when ``method="exact"``. ``-inf`` forbids a coordinate: the structures using it
            have probability 0.
        noise: ``"gumbel"`` (exact methods need it; on the hypercube ``"logistic"`` too) or another
            noise (Monte Carlo only).
        method: ``"exact"`` (closed forms and ordering enumeration; raises where impossible or
            too large) or ``"monte_carlo"`` (needs ``num_samples``).
        limit: maximum number of utility orderings to enumerate.
        return_stderr: also return the standard error of each probability (zeros when exact).

    Returns:
        ``(vertices (V, *shape), probs (V,))`` (and ``stderr (V,)``). Exact vertices are all
        structures; Monte Carlo vertices are the ones observed.
    """
    P = as_polytope(polytope)
    _check_masked_theta(theta, P)
    nz = get_noise(noise)
    if method not in ("exact", "monte_carlo"):
        raise InputError(f"method must be 'exact' or 'monte_carlo', got {method!r}")
    limit = positive_int(limit, "limit")
    if method == "monte_carlo":
        count = as_int(num_samples)
        if count is None or count < 1:
            raise InputError(f"method='monte_carlo' needs num_samples >= 1, got {num_samples!r}")
        num_samples = count
        with torch.no_grad():
            u = perturb(theta.detach().expand((num_samples,) + P.shape), nz, generator)
            X = P.argmax(u).to(theta.dtype).reshape(num_samples, -1)
        verts, counts = torch.unique(X, dim=0, return_counts=True)
        probs = counts.to(theta.dtype) / num_samples
        out = (verts.reshape((-1,) + P.shape), probs)
        return out + ((probs * (1 - probs) / num_samples).sqrt(),) if return_stderr else out
    out = _exact_smt(P, theta, nz, limit)
    return out + (torch.zeros_like(out[1]),) if return_stderr else out


def _exact_smt(P: Polytope, theta: torch.Tensor, nz: Noise, limit: int = 200_000, caller: str | None = None):
    """``(vertices, probs)`` of :func:`smt_distribution` with ``method="exact"``. Errors advise
    ``method='monte_carlo'``, or, for a ``caller`` without a ``method`` argument
    (``exact_gradient``, ``expected_loss``), the estimators."""

    def unavailable(cls: type[Exception], what: str, hint: str) -> Exception:
        if caller is None:
            return cls(f"{what}; {hint}")
        return cls(f"{caller} is exact: {what}; for an estimate, average score_function or sst_gradient "
                   "over many samples")

    logistic_bits = isinstance(nz, Logistic) and nz.scale == 1.0 and P.name == "hypercube"
    if not (isinstance(nz, Gumbel) and nz.scale == 1.0) and not logistic_bits:
        raise unavailable(InputError, "exact SMT probabilities are implemented for standard Gumbel noise, and "
                          f"for standard logistic noise on the hypercube, got {nz!r} on {P!r}",
                          "use method='monte_carlo'")
    flat = theta.reshape(-1)
    mask = is_forbidden(flat.detach())
    forbidden = mask if bool(mask.any()) else None
    if forbidden is not None:  # relax's stand-in utility: structures using these get e^-(hundreds), 0 below
        flat = fill_forbidden(flat.masked_fill(forbidden, 0.0)[None], forbidden[None])[0]
    if P.name == "hypercube":  # P(θ_i + G_i > 0)
        p1 = torch.sigmoid(flat) if logistic_bits else 1.0 - torch.exp(-torch.exp(flat))
        V = P.vertices(dtype=theta.dtype).to(theta.device).reshape(-1, P.size)
        probs = torch.where(V > 0.5, p1, 1 - p1).prod(1)
    else:
        try:
            seqs = _greedy_sequences(P, limit)
        except _TooManyOrderings:
            raise unavailable(PolytopeError, f"{P!r} needs more than {limit} utility orderings for exact "
                              "enumeration", "use method='monte_carlo' (with num_samples) or a smaller instance") from None
        if seqs is None:
            raise unavailable(PolytopeError, f"no exact SMT distribution for {P!r}: its argmax is not a greedy "
                              "rule over the order of the utilities", "use method='monte_carlo' with num_samples")
        picks, relevant, ids = seqs
        pk = torch.as_tensor(picks, device=theta.device)
        rel = torch.as_tensor(relevant, device=theta.device)
        logits = flat[pk]  # (S, r)
        masked = torch.where(rel, flat.expand(rel.shape), torch.full_like(flat, -math.inf).expand(rel.shape))
        logp = (logits - torch.logsumexp(masked, dim=-1)).sum(1)  # Plackett–Luce
        nstruct = int(ids.max()) + 1
        probs = torch.zeros(nstruct, dtype=theta.dtype, device=theta.device).index_add(
            0, torch.as_tensor(ids, device=theta.device), logp.exp())
        V = torch.zeros(nstruct, P.size, dtype=theta.dtype, device=theta.device)
        first = np.unique(ids, return_index=True)[1]
        V[torch.as_tensor(ids[first]).unsqueeze(1), pk[first]] = 1.0
    if forbidden is not None:
        uses = (V[:, forbidden] > 0).any(1)
        if bool(uses.all()):
            raise empty_face_error(torch.zeros(1, dtype=torch.long), (), P, "theta")
        probs = probs.masked_fill(uses, 0.0)
    return V.reshape((-1,) + P.shape), probs


def _exact_distribution(P: Polytope, theta: torch.Tensor, noise: str | Noise, caller: str):
    """:func:`smt_distribution`'s exact ``(vertices, probs)`` for ``exact_gradient`` and ``expected_loss``."""
    _check_masked_theta(theta, P)
    return _exact_smt(P, theta, get_noise(noise), caller=caller)


@_explain_torch_func_per_theta
@_differentiates
def exact_gradient(loss_fn: LossFn, theta: torch.Tensor, polytope: Polytope | str,
                   noise: str | Noise = "gumbel") -> torch.Tensor:
    """``d/dθ E[L(X)] = d/dθ Σ_x p_θ(x) L(x)`` by autograd through :func:`smt_distribution`."""
    P = as_polytope(polytope)
    th = theta.detach().requires_grad_(True)
    with torch.enable_grad():
        V, probs = _exact_distribution(P, th, noise, "exact_gradient")
        losses = _call_loss(loss_fn, V, P).to(probs.dtype)
        (g,) = torch.autograd.grad((probs * losses).sum(), th)
    return g


@_explain_torch_func_per_theta
def expected_loss(loss_fn: LossFn, theta: torch.Tensor, polytope: Polytope | str, noise: str | Noise = "gumbel") -> torch.Tensor:
    """``E[L(X)]`` exactly (small structures), differentiable in θ."""
    P = as_polytope(polytope)
    V, probs = _exact_distribution(P, theta, noise, "expected_loss")
    return (probs * _call_loss(loss_fn, V, P).to(probs.dtype)).sum()


# ------------------------------------------------------------------------------------------
# Estimators
# ------------------------------------------------------------------------------------------


class EMABaseline:
    """Exponential moving average of past mean losses: ``b ← decay·b + (1 − decay)·mean(L)``.

    The value used for a batch is the one from *before* that batch, so the estimator stays
    unbiased. The first call uses ``initial``.
    """

    def __init__(self, decay: float = 0.9, initial: float = 0.0):
        rate, start = as_real(decay), as_real(initial)
        if rate is None or not 0.0 <= rate < 1.0:
            raise InputError(f"EMA decay must be a number in [0, 1), got {decay!r}")
        if start is None or not math.isfinite(start):
            raise InputError(f"EMA initial value must be a finite number, got {initial!r}")
        self.decay, self.value = rate, start

    def update(self, losses: torch.Tensor) -> float:
        used = self.value
        self.value = self.decay * self.value + (1 - self.decay) * float(losses.detach().mean())
        return used


_EMA_STATE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass
class EstimateInfo:
    """Extras of :func:`score_function` with ``return_info=True``."""

    losses: torch.Tensor     # (K,) L(X_k)
    baseline: torch.Tensor   # (K,) the b_k used
    structures: torch.Tensor  # (K, *shape) the hard samples X_k


@overload
def score_function(loss_fn: LossFn, theta: torch.Tensor, polytope: Polytope | str, num_samples: int = 1,
                   baseline: str | EMABaseline | Callable | None = "loo", generator: torch.Generator | None = None,
                   noise: str | Noise = "gumbel", return_info: Literal[False] = False) -> torch.Tensor: ...
@overload
def score_function(loss_fn: LossFn, theta: torch.Tensor, polytope: Polytope | str, num_samples: int = 1,
                   baseline: str | EMABaseline | Callable | None = "loo", generator: torch.Generator | None = None,
                   noise: str | Noise = "gumbel", *, return_info: Literal[True]) -> tuple[torch.Tensor, EstimateInfo]: ...


@_explain_torch_func_per_theta
@_differentiates
def score_function(loss_fn: LossFn, theta: torch.Tensor, polytope: Polytope | str, num_samples: int = 1,
                   baseline: str | EMABaseline | Callable | None = "loo", generator: torch.Generator | None = None,
                   noise: str | Noise = "gumbel", return_info: bool = False
                   ) -> torch.Tensor | tuple[torch.Tensor, EstimateInfo]:
    """One score-function (REINFORCE) estimate of ``d/dθ E[L(X)]``, shape of θ.

    ``ĝ = (1/K) Σ_k (L(X_k) − b_k) ∇θ Σ_i log f_G(U_{k,i} − θ_i)``, ``X_k = argmax U_kᵀx``.

    Args:
        loss_fn: maps structures ``(K, *shape)`` to losses ``(K,)`` (hard structures only).
        theta: ``polytope.shape``; ``-inf`` forbids a coordinate (as in :func:`relax`): the
            samples avoid it and its score (and estimate) is 0.
        num_samples: K.
        baseline: ``"loo"`` (needs K ≥ 2), ``"ema"`` (state kept per ``loss_fn``), an
            :class:`EMABaseline`, a callable ``b(theta) -> scalar or (K,)`` (learned baseline; it
            receives no gradient from here, train it on ``(L − b)²`` with ``return_info``), or None.
        generator, noise: the noise of the utilities (its ``log_prob`` gives the score).
        return_info: also return an :class:`EstimateInfo`.
    """
    P = as_polytope(polytope)
    forbidden = _check_masked_theta(theta, P)
    num_samples = positive_int(num_samples, "num_samples")
    nz = get_noise(noise)
    if nz is None:
        raise InputError("the score-function estimator needs a noise distribution (got noise=None)")
    th = theta.detach().expand((num_samples,) + P.shape).clone().requires_grad_(True)
    with torch.no_grad():
        u = perturb(th.detach(), nz, generator)
        X = P.argmax(u).to(theta.dtype)
        losses = _call_loss(loss_fn, X, P).to(theta.dtype)
    K = num_samples
    if baseline is None:
        b = torch.zeros_like(losses)
    elif baseline == "loo":
        if K < 2:
            raise InputError("baseline='loo' (leave-one-out) needs num_samples >= 2")
        b = (losses.sum() - losses) / (K - 1)
    elif baseline == "ema" or isinstance(baseline, EMABaseline):
        state = baseline if isinstance(baseline, EMABaseline) else _EMA_STATE.setdefault(loss_fn, EMABaseline())
        b = torch.full_like(losses, state.update(losses))
    elif callable(baseline):
        b = torch.as_tensor(baseline(theta.detach()), dtype=theta.dtype).detach().expand(K)
    else:
        raise InputError(f"baseline must be None, 'loo', 'ema', an EMABaseline or a callable, got {baseline!r}")
    with torch.enable_grad():
        logp = utility_log_density(nz, u, th, forbidden).reshape(K, -1).sum(1)
        (score,) = torch.autograd.grad(((losses - b) * logp).sum(), th)
    g = score.sum(0) / K
    return (g, EstimateInfo(losses, b, X)) if return_info else g


@_explain_torch_func_per_theta
@_differentiates
def sst_gradient(loss_fn: LossFn, theta: torch.Tensor, polytope: Polytope | str,
                 regularizer: str | Regularizer = "entropy",
                 temperature: float = 1.0, num_samples: int = 1, straight_through: bool = False,
                 generator: torch.Generator | None = None, noise: str | Noise = "gumbel",
                 backend: str = "auto", per_sample: bool = False) -> torch.Tensor:
    """One (relaxed or straight-through) SST estimate of ``d/dθ E[L(X)]``: the average of
    ``dL(X̃_k)/dθ`` over K samples, X̃ the relaxed (or straight-through) sample. With
    ``per_sample=True`` returns the K single-sample estimates ``(K, *shape)`` instead.
    ``-inf`` in θ forbids a coordinate, as in :func:`relax` (its estimate is 0)."""
    P = as_polytope(polytope)
    _check_masked_theta(theta, P)
    num_samples = positive_int(num_samples, "num_samples")
    th = theta.detach().expand((num_samples,) + P.shape).clone().requires_grad_(True)
    with torch.enable_grad():
        u = perturb(th, get_noise(noise), generator)
        x = relax(u, P, regularizer, temperature, backend).to(th.dtype)
        if straight_through:
            x = x + (P.argmax(u.detach()).to(th.dtype) - x).detach()
        losses = _call_loss(loss_fn, x, P)
        (g,) = torch.autograd.grad(losses.sum(), th)
    return g if per_sample else g.mean(0)
