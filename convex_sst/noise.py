"""Noise distributions for the random utility ``U = θ + G``.

A noise is an object with ``sample(shape, generator=None, dtype=..., device=...)`` and an
elementwise ``log_prob(g)``; pass your own subclass of :class:`Noise` wherever a noise name
is accepted.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import overload

import torch

from ._scalars import positive_real
from .errors import unknown_name


def _draw(sampler, shape, generator, dtype, device) -> torch.Tensor:
    """``sampler(shape, ...)`` (``torch.rand`` / ``torch.randn``), passing ``generator`` only when
    there is one: torch.compile cannot trace an explicit ``generator=None`` with dynamic shapes."""
    extra = {} if generator is None else {"generator": generator}
    return sampler(tuple(shape), dtype=dtype, device=device, **extra)


def _open_uniform(shape, generator, dtype, device) -> torch.Tensor:
    """Uniform(0, 1) of ``shape``, clamped to ``[tiny, 1 − eps]`` of ``dtype`` so that its logs
    and those of ``1 − V`` are finite."""
    v = _draw(torch.rand, shape, generator, dtype, device)
    return v.clamp(min=torch.finfo(dtype).tiny, max=1.0 - torch.finfo(dtype).eps)


class Noise:
    """Base class: i.i.d. noise added to every utility."""

    name = "noise"

    def sample(self, shape: Sequence[int], generator: torch.Generator | None = None,
               dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
        """i.i.d. noise of ``shape``."""
        raise NotImplementedError

    def log_prob(self, g: torch.Tensor) -> torch.Tensor:
        """Elementwise log density of the noise at ``g``."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Gumbel(Noise):
    """Gumbel(0, scale): ``G = -scale · log(-log V)``, V ~ Uniform(0, 1) clamped away from 0 and 1.

    With scale 1, ``argmax_i θ_i + G_i`` is a sample of ``softmax(θ)`` (the Gumbel-max trick).
    """

    name = "gumbel"

    def __init__(self, scale: float = 1.0):
        self.scale = positive_real(scale, "Gumbel scale")

    def sample(self, shape: Sequence[int], generator: torch.Generator | None = None,
               dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
        v = _open_uniform(shape, generator, dtype, device)
        return -self.scale * torch.log(-torch.log(v))

    def log_prob(self, g: torch.Tensor) -> torch.Tensor:
        z = g / self.scale
        return -z - torch.exp(-z) - math.log(self.scale)

    def __repr__(self) -> str:
        return f"Gumbel(scale={self.scale})"


class Gaussian(Noise):
    """Normal(0, scale²) noise."""

    name = "gaussian"

    def __init__(self, scale: float = 1.0):
        self.scale = positive_real(scale, "Gaussian scale")

    def sample(self, shape: Sequence[int], generator: torch.Generator | None = None,
               dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
        return self.scale * _draw(torch.randn, shape, generator, dtype, device)

    def log_prob(self, g: torch.Tensor) -> torch.Tensor:
        z = g / self.scale
        return -0.5 * z * z - math.log(self.scale) - 0.5 * math.log(2 * math.pi)

    def __repr__(self) -> str:
        return f"Gaussian(scale={self.scale})"


class Logistic(Noise):
    """Logistic(0, scale): ``G = scale · (log V − log(1 − V))``, V ~ Uniform(0, 1) clamped away
    from 0 and 1; the difference of two independent Gumbel(0, scale).

    The noise of independent bits: on the ``hypercube``, ``[θ_i + G_i > 0]`` is
    Bernoulli(σ(θ_i / scale)), and the SST with the binary entropy, ``σ((θ + G)/t)``, is the
    binary Concrete (Gumbel-sigmoid) relaxation of Maddison et al. and Jang et al. (2017). Under
    Gumbel noise the same bits are Bernoulli(1 − exp(−e^θ)).
    """

    name = "logistic"

    def __init__(self, scale: float = 1.0):
        self.scale = positive_real(scale, "logistic scale")

    def sample(self, shape: Sequence[int], generator: torch.Generator | None = None,
               dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
        v = _open_uniform(shape, generator, dtype, device)
        return self.scale * (torch.log(v) - torch.log1p(-v))

    def log_prob(self, g: torch.Tensor) -> torch.Tensor:
        z = g / self.scale
        return -z - 2.0 * torch.nn.functional.softplus(-z) - math.log(self.scale)

    def __repr__(self) -> str:
        return f"Logistic(scale={self.scale})"


_NOISES = {"gumbel": Gumbel, "gaussian": Gaussian, "logistic": Logistic}


@overload
def get_noise(noise: str | Noise) -> Noise: ...
@overload
def get_noise(noise: None) -> None: ...
@overload
def get_noise(noise: str | Noise | None) -> Noise | None: ...


def get_noise(noise: str | Noise | None) -> Noise | None:
    """A :class:`Noise` from a name (``"gumbel"``, ``"gaussian"``, ``"logistic"``), an instance, or
    None (no noise)."""
    if noise is None or isinstance(noise, Noise):
        return noise
    if isinstance(noise, str) and noise in _NOISES:
        return _NOISES[noise]()
    raise unknown_name("noise", noise, list(_NOISES) + ["None"], hint="Or pass a convex_sst.Noise instance.")
