"""Bias, variance and MSE of gradient estimators against the exact gradient, per temperature.

For a polytope small enough for :func:`~convex_sst.estimators.exact_gradient`, draw many
independent estimates of ``d/dθ E[L(X)]`` from each estimator and compare them with the truth:

* ``bias``: ``‖mean(ĝ) − g‖₂`` (with its Monte Carlo standard error ``bias_se``);
* ``variance``: ``E‖ĝ − mean(ĝ)‖²`` (total variance of one estimate);
* ``mse``: ``E‖ĝ − g‖²``.

``convex-sst diagnose`` runs this and writes a CSV, a markdown table and a PNG plot.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from ._scalars import as_int, positive_int, positive_real
from .errors import InputError
from .estimators import LossFn, _call_loss, _check_masked_theta, exact_gradient, sst_gradient, utility_log_density
from .noise import get_noise
from .polytope import Polytope
from .regularizers import Regularizer
from ._autograd import _differentiates
from .relax import as_polytope
from .sst import perturb

ESTIMATORS = ("sst", "straight_through", "score_function", "score_function_loo")


def default_loss(P: Polytope, generator: torch.Generator) -> LossFn:
    """``L(x) = ‖x − c‖² / d`` with a fixed random target ``c`` in [0, 1]^d (defined on P, not only on 𝒳)."""
    c = torch.rand(P.shape, generator=generator, dtype=torch.float64)

    def loss(x: torch.Tensor) -> torch.Tensor:
        diff = (x - c.to(x)).reshape(x.shape[: x.dim() - len(P.shape)] + (-1,))
        return (diff * diff).mean(-1)

    return loss


def _score_estimates(loss_fn, theta, P, R, K, loo, generator, noise, forbidden):
    nz = get_noise(noise)
    th = theta.detach().expand((R * K,) + P.shape).clone().requires_grad_(True)
    with torch.no_grad():
        u = perturb(th.detach(), nz, generator)
        losses = _call_loss(loss_fn, P.argmax(u).to(theta.dtype), P).to(theta.dtype).reshape(R, K)
    b = (losses.sum(1, keepdim=True) - losses) / (K - 1) if loo else torch.zeros_like(losses)
    with torch.enable_grad():
        logp = utility_log_density(nz, u, th, forbidden).reshape(R * K, -1).sum(1)
        (score,) = torch.autograd.grad(((losses - b).reshape(-1) * logp).sum(), th)
    return score.reshape((R, K, -1)).mean(1)


# the temperatures of diagnose and of `convex-sst diagnose` when none are given
DEFAULT_TEMPERATURES = (0.1, 0.2, 0.5, 1.0, 2.0)


@_differentiates
def diagnose(polytope: Polytope | str, regularizer: str | Regularizer = "entropy", loss_fn: LossFn | None = None,
             temperatures: float | Sequence[float] = DEFAULT_TEMPERATURES, theta: torch.Tensor | None = None,
             num_estimates: int = 400, num_samples: int = 4, estimators: Sequence[str] = ESTIMATORS,
             seed: int = 0, noise: str = "gumbel") -> list[dict]:
    """Estimate bias, variance and MSE of each estimator (and temperature) against the exact gradient.

    Args:
        polytope: a structure with an exact SMT distribution (one-hot, bits, k-subset, small trees).
        regularizer: the SST's regularizer.
        loss_fn: ``(*batch, *shape) -> (*batch,)``, defined on P (relaxed samples); default
            :func:`default_loss`.
        temperatures: SST temperatures (the score-function rows do not depend on it); the
            default, :data:`DEFAULT_TEMPERATURES`, is also ``convex-sst diagnose``'s.
        theta: parameters of shape ``polytope.shape``; default N(0, 1) from ``seed``.
        num_estimates: independent estimates per row (R).
        num_samples: samples per estimate (K; leave-one-out needs K >= 2).

    Returns:
        One dict per row: estimator, temperature, bias, bias_se, variance, mse, exact_norm.
    """
    P = as_polytope(polytope)
    unknown = set(estimators) - set(ESTIMATORS)
    if unknown:
        raise InputError(f"unknown estimator(s) {sorted(unknown)}; available: {', '.join(ESTIMATORS)}")
    num_estimates = positive_int(num_estimates, "num_estimates", minimum=2)
    num_samples = positive_int(num_samples, "num_samples")
    if "score_function_loo" in estimators and num_samples < 2:
        raise InputError("score_function_loo needs num_samples >= 2 (leave-one-out baseline)")
    if (isinstance(temperatures, Iterable) and not isinstance(temperatures, (str, bytes))
            and getattr(temperatures, "ndim", 1) != 0):  # a 0-d tensor or array is one temperature
        temps = [positive_real(t, "each temperature") for t in temperatures]
    else:  # one temperature
        temps = [positive_real(temperatures, "each temperature")]
    seed_int = as_int(seed)
    if seed_int is None:
        raise InputError(f"seed must be an integer, got {seed!r}")
    gen = torch.Generator().manual_seed(seed_int)
    if theta is None:
        theta = torch.randn(P.shape, generator=gen, dtype=torch.float64)
    forbidden = _check_masked_theta(theta, P)
    loss_fn = loss_fn or default_loss(P, gen)
    g = exact_gradient(loss_fn, theta, P, noise).reshape(-1)
    R, K = num_estimates, num_samples
    rows = []

    def summarize(name, temp, est):
        mean = est.mean(0)
        var = ((est - mean) ** 2).sum(1).mean().item()
        bias = (mean - g).norm().item()
        rows.append({
            "estimator": name, "temperature": temp, "bias": bias,
            "bias_se": math.sqrt(var / R), "variance": var,
            "mse": ((est - g) ** 2).sum(1).mean().item(), "exact_norm": g.norm().item(),
        })

    for name in estimators:
        if name in ("sst", "straight_through"):
            for t in temps:
                est = sst_gradient(loss_fn, theta, P, regularizer, t, R * K, straight_through=name == "straight_through",
                                   generator=gen, noise=noise, per_sample=True)
                summarize(name, t, est.reshape(R, K, -1).mean(1))
        else:
            summarize(name, None, _score_estimates(loss_fn, theta, P, R, K, name.endswith("loo"), gen, noise,
                                                       forbidden))
    return rows


def write_report(rows: list[dict], out_dir: str | Path, title: str, plot: bool = True) -> list[Path]:
    """Write ``diagnostics.csv``, ``diagnostics.md`` and (with matplotlib) ``diagnostics.png``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "diagnostics.csv", out / "diagnostics.md"]
    keys = ["estimator", "temperature", "bias", "bias_se", "variance", "mse", "exact_norm"]
    with open(paths[0], "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    lines = [f"# {title}", "", "| estimator | t | bias ± se | variance | MSE |", "|---|---|---|---|---|"]
    for r in rows:
        t = "—" if r["temperature"] is None else f"{r['temperature']:g}"
        lines.append(f"| {r['estimator']} | {t} | {r['bias']:.3g} ± {r['bias_se']:.2g} | {r['variance']:.3g} | {r['mse']:.3g} |")
    lines.append(f"\n‖exact gradient‖ = {rows[0]['exact_norm']:.3g}")
    paths[1].write_text("\n".join(lines) + "\n")
    if plot:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("matplotlib is not installed: no plot (pip install 'convex_sst[examples]')")
            return paths
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
        for ax, key in zip(axes, ("bias", "variance", "mse")):
            for name in dict.fromkeys(r["estimator"] for r in rows):
                rs = [r for r in rows if r["estimator"] == name]
                if rs[0]["temperature"] is None:
                    ax.axhline(rs[0][key], ls="--", label=name, color="gray" if name.endswith("loo") else "black")
                else:
                    ax.plot([r["temperature"] for r in rs], [r[key] for r in rs], "o-", label=name)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("temperature t")
            ax.set_title(key)
        axes[0].legend(fontsize=8)
        fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        paths.append(out / "diagnostics.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths
