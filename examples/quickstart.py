"""Quickstart: a k-subset SST layer inside a small torch model.

A linear scorer picks k = 3 of 10 features per example; the loss rewards picking the features
with the largest values. Training through the relaxed SST makes the hard top-k samples pick them.

    python examples/quickstart.py [--steps 200]
"""

import argparse

import torch

import convex_sst as cs


def main(steps: int = 200, seed: int = 0) -> float:
    gen = torch.Generator().manual_seed(seed)
    P = cs.load_polytope("k_subset", n=10, k=3)
    scorer = torch.nn.Linear(10, 10)
    layer = cs.SST(P, "exp_family", temperature=0.5)            # relaxed k-hot samples
    opt = torch.optim.Adam(scorer.parameters(), lr=0.05)
    for _ in range(steps):
        features = torch.randn(64, 10, generator=gen)
        x = layer(scorer(features), generator=gen)              # (64, 10), rows sum to 3
        loss = -(x * features).sum(-1).mean()                   # pick the largest features
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        features = torch.randn(1000, 10, generator=gen)
        picked = cs.SST(P, mode="hard")(scorer(features), generator=gen)
        best = P.argmax(features)                               # the 3 largest features
        overlap = (picked * best).sum(-1).mean().item() / 3
    print(f"hard samples pick {100 * overlap:.0f}% of the 3 largest features (random: 30%)")
    return overlap


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    main(a.steps, a.seed)
