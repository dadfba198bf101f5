"""Stochastic softmax tricks as a function and an ``nn.Module``.

``U = θ + G`` with G from a :class:`~convex_sst.noise.Noise`, then one of

* ``mode="relaxed"``: ``X_t = argmax_{x in P} Uᵀx − t f(x)`` (SST, differentiable);
* ``mode="hard"``: ``X = argmax_{x in 𝒳} Uᵀx`` (SMT sample, no gradient);
* ``mode="straight_through"``: forward ``X``, backward through ``X_t``:
  ``X_st = X_t + (X − X_t).detach()``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ._autograd import _explain_torch_func
from .errors import InputError, unknown_name
from .noise import Noise, get_noise
from .polytope import Polytope
from .regularizers import Regularizer
from .relax import BACKENDS, as_polytope, check_options, check_temperature, relax

MODES = ("relaxed", "hard", "straight_through")


def perturb(theta: torch.Tensor, noise: Noise | None, generator: torch.Generator | None = None) -> torch.Tensor:
    """``U = θ + G`` with G i.i.d. from ``noise`` (``θ`` itself when noise is None).

    For float16 and bfloat16 ``theta``, G is drawn and U computed in float32, and U is float32:
    in bfloat16 the Gumbel noise took about 500 distinct values (float16: 4 000), so utilities
    tied and the argmax broke the ties by index; the Gumbel-max trick over 1 000 items picked
    the first ones 8 times too often (float16: 1.4 times). Callers round their results back."""
    if noise is None:
        return theta
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise InputError(f"generator must be a torch.Generator or None, got {type(generator).__name__}; "
                             "hint: torch.Generator().manual_seed(seed)")
        if generator.device.type != theta.device.type:
            raise InputError(f"generator is on {generator.device.type} but theta is on {theta.device}; the noise "
                             f"is drawn on theta's device. Hint: torch.Generator(device={str(theta.device)!r})")
    work = torch.float32 if theta.dtype in (torch.float16, torch.bfloat16) else theta.dtype
    g = noise.sample(theta.shape, generator=generator, dtype=work, device=theta.device)
    return theta.to(work) + g


@_explain_torch_func
def sst(
    theta: torch.Tensor,
    polytope: Polytope | str,
    regularizer: str | Regularizer = "entropy",
    temperature: float | torch.Tensor = 1.0,
    noise: str | Noise | None = "gumbel",
    mode: str = "relaxed",
    backend: str = "auto",
    generator: torch.Generator | None = None,
    **options: Any,
) -> torch.Tensor:
    """Sample a structure with a stochastic softmax trick.

    Args:
        theta: parameters (logits) ``(*batch, *polytope.shape)``; ``-inf`` forbids a
            coordinate (the sample is 0 there), as in :func:`relax`.
        polytope, regularizer, temperature, backend, **options: as in :func:`relax`.
        noise: ``"gumbel"`` (default), ``"gaussian"``, ``"logistic"`` (independent bits: with the
            ``hypercube`` and the binary entropy, the binary Concrete), a :class:`Noise`, or None.
        mode: ``"relaxed"`` | ``"hard"`` | ``"straight_through"``.
        generator: a ``torch.Generator`` for reproducible noise.

    Returns:
        ``(*batch, *polytope.shape)`` sample, same dtype and device as ``theta``.
    """
    if mode not in MODES:
        raise unknown_name("mode", mode, MODES)
    P = as_polytope(polytope)
    batch, _ = P._check_masked(theta, "theta")
    u = perturb(theta, get_noise(noise), generator)  # float32 for half-precision theta
    if mode == "hard":
        check_temperature(temperature, batch, theta)
        return P.argmax(u).to(theta.dtype)
    x_t = relax(u, P, regularizer, temperature, backend, **options).to(theta.dtype)
    if mode == "relaxed":
        return x_t
    hard = P.argmax(u.detach()).to(theta.dtype)
    return x_t + (hard - x_t).detach()


class SST(nn.Module):
    """A stochastic softmax trick layer: ``X_t = argmax_{x in P} (θ + G)ᵀx − t·f(x)``, G ~ noise.

    ``forward(theta, generator=None)`` maps ``theta: (*batch, *polytope.shape)`` to a sample of
    the same shape (relaxed, hard or straight-through, by ``mode``). Same keywords as
    :func:`sst`. The temperature may be a float or a tensor (pass an ``nn.Parameter`` to learn
    it); it can be reassigned between steps to anneal it (``layer.temperature = 0.5``). The layer
    samples after ``model.eval()`` too; the noiseless ``argmax θᵀx`` is ``polytope.argmax(theta)``.

    Example:
        >>> layer = SST(load_polytope("k_subset", n=10, k=3), "binary_entropy", temperature=0.5)
        >>> theta = torch.randn(32, 10, requires_grad=True)
        >>> x = layer(theta)            # (32, 10): relaxed 3-subsets, rows sum to 3
    """

    def __init__(
        self,
        polytope: Polytope | str,
        regularizer: str | Regularizer = "entropy",
        temperature: float | torch.Tensor = 1.0,
        noise: str | Noise | None = "gumbel",
        mode: str = "relaxed",
        backend: str = "auto",
        **options: Any,
    ):
        super().__init__()
        if mode not in MODES:
            raise unknown_name("mode", mode, MODES)
        if backend not in BACKENDS:
            raise unknown_name("backend", backend, BACKENDS)
        self.polytope = as_polytope(polytope)
        self.regularizer = self.polytope.check_regularizer(regularizer)
        if not (isinstance(temperature, torch.Tensor) and temperature.dim() > 0):
            check_temperature(temperature, (), torch.zeros(()))  # per-sample tensors are checked per call
        self.temperature = temperature
        self.noise = get_noise(noise)
        self.mode = mode
        self.backend = backend
        # a misspelt or invalid option fails here, where the layer is built, not at its first call
        self.options = check_options(self.polytope, self.regularizer, backend, options)

    def forward(self, theta: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Sample: ``theta: (*batch, *polytope.shape)`` → ``(*batch, *polytope.shape)``, theta's dtype and device."""
        return sst(theta, self.polytope, self.regularizer, self.temperature, self.noise, self.mode,
                   self.backend, generator, **self.options)

    def extra_repr(self) -> str:
        t = self.temperature
        shown = str(t)
        if isinstance(t, torch.Tensor):              # one line, not "Parameter containing:\n tensor(...)"
            value = f"{t.item():g}" if t.numel() == 1 else f"tensor of shape {tuple(t.shape)}"
            shown = value + (" (learnable)" if t.requires_grad else "")
        return (f"polytope={self.polytope!r}, regularizer={self.regularizer.name!r}, "
                f"temperature={shown}, noise={self.noise!r}, mode={self.mode!r}, "
                f"backend={self.backend!r}")
