"""The README's main job: learn a distribution over spanning trees through an SST layer.

A tree T* on n vertices is hidden. The model is a vector θ of edge scores; a structure is
sampled as ``X = argmax_{x spanning tree} (θ + G)ᵀx`` (Gumbel noise G). We minimise the
expected number of wrong edges ``E[‖X − T*‖² / 2]`` by gradient descent, using the spanning-tree
SST ``X_t`` (exponential-family regularizer: edge marginals by the matrix-tree theorem) to get
gradients through the discrete choice. At the start
every tree is about equally likely; at the end, samples are the hidden tree most of the time.
"""

from __future__ import annotations

import torch
from tqdm import tqdm

from .polytope import load_polytope
from .sst import SST


def _edges_str(x: torch.Tensor, edges) -> str:
    return " ".join(f"{int(i)}-{int(j)}" for (i, j), v in zip(edges, x.tolist()) if v > 0.5)


def _hit_rate(sampler: SST, theta: torch.Tensor, target: torch.Tensor, num: int, gen: torch.Generator) -> float:
    with torch.no_grad():
        x = sampler(theta.detach().expand(num, -1), generator=gen)
        return float(((x - target).abs().sum(-1) < 0.5).double().mean())


def run_demo(n: int = 8, steps: int = 150, batch: int = 32, temperature: float = 0.5, lr: float = 0.1,
             seed: int = 0, quiet: bool = False) -> dict:
    gen = torch.Generator().manual_seed(seed)
    P = load_polytope("spanning_tree", n=n)
    edges = P.data["E"].tolist()
    num_trees = n ** (n - 2)

    # the hidden tree: a uniformly random spanning tree (argmax of i.i.d. Gumbel scores)
    hidden = P.argmax(torch.randn(P.shape, generator=gen, dtype=torch.float64))

    theta = torch.zeros(P.shape, dtype=torch.float64, requires_grad=True)
    relaxed = SST(P, "exp_family", temperature=temperature)       # differentiable X_t
    hard = SST(P, "exp_family", mode="hard")                      # exact samples X (Kruskal)
    opt = torch.optim.Adam([theta], lr=lr)

    before_mode = P.argmax(theta.detach() + 1e-3 * torch.randn(P.shape, generator=gen, dtype=torch.float64))
    before_hit = _hit_rate(hard, theta, hidden, 500, gen)

    print(f"Hidden structure: a spanning tree of the complete graph K{n} (one of {num_trees} trees).")
    print(f"  hidden tree edges: {_edges_str(hidden, edges)}")
    print(f"Training edge scores θ for {steps} steps: loss = expected number of wrong edges,")
    print(f"gradients through the spanning-tree SST at temperature {temperature} ({batch} samples per step).")
    bar = tqdm(range(steps), disable=quiet, desc="training", unit="step")
    losses = []
    for _ in bar:
        x_t = relaxed(theta.expand(batch, -1), generator=gen)
        loss = 0.5 * ((x_t - hidden) ** 2).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")

    after_mode = P.argmax(theta.detach())
    after_hit = _hit_rate(hard, theta, hidden, 500, gen)
    right_before = int(round(float((before_mode * hidden).sum())))
    right_after = int(round(float((after_mode * hidden).sum())))
    print("\nWhat the model learned:")
    print(f"  most likely tree before training: {_edges_str(before_mode, edges)}  "
          f"({right_before} of {n - 1} edges right)")
    print(f"  most likely tree after training:  {_edges_str(after_mode, edges)}  "
          f"({right_after} of {n - 1} edges right)")
    print(f"  chance that a random sample is exactly the hidden tree: {100 * before_hit:.1f}% before "
          f"(uniform: {100 / num_trees:.2g}%), {100 * after_hit:.1f}% after")
    print(f"  loss (expected wrong edges, relaxed): {losses[0]:.2f} -> {losses[-1]:.2f}")
    return {
        "hidden": hidden, "theta": theta.detach(), "right_before": right_before, "right_after": right_after,
        "hit_before": before_hit, "hit_after": after_hit, "losses": losses,
    }
