"""Train a model whose output is a structure declared only in a config file (``lineup.yaml``).

    python examples/custom_polytope/train.py            # ~1 minute
    python examples/custom_polytope/train.py --quick    # a few seconds

Each round, a squad of 12 players in 3 positions (``groups``) comes with 4 features per player;
a player's (unknown) performance is a fixed linear function of the features plus noise. A scorer
(``Linear(4, 1)``, shared by the players) outputs logits ``θ``; the SST layer on the ``lineup``
polytope (exactly ``quota[g]`` players per position) turns ``θ + Gumbel`` into a relaxed line-up
``X_t`` (binary entropy, solved by the library's batched torch solver since the polytope has only
equalities and bounds); the loss is ``−X_t · performance``. After training, the hard line-up
``argmax θᵀx`` (an LP on the declared polytope) is compared with the best line-up in hindsight and
with a random one. Writes ``results.json`` and ``learning_curve.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

import convex_sst as cs

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))      # examples/_common.py
from _common import pyplot, savefig  # noqa: E402

HERE = Path(__file__).resolve().parent


def squads(batch: int, gen: torch.Generator, w_true: torch.Tensor, n: int):
    features = torch.randn(batch, n, 4, generator=gen, dtype=torch.float64)
    performance = features @ w_true + 0.5 * torch.randn(batch, n, generator=gen, dtype=torch.float64)
    return features, performance


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="20 steps (a smoke test)")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("runs/custom_polytope"))
    a = ap.parse_args(argv)
    steps = 20 if a.quick else a.steps

    P = cs.load_polytope(HERE / "lineup.yaml")            # the structure, declared in the config
    n = P.shape[0]
    gen = torch.Generator().manual_seed(a.seed)
    torch.manual_seed(a.seed)
    w_true = torch.tensor([1.0, -0.5, 0.25, 0.0], dtype=torch.float64)
    scorer = torch.nn.Linear(4, 1).double()
    layer = cs.SST(P, "binary_entropy", temperature=a.temperature)
    opt = torch.optim.Adam(scorer.parameters(), lr=0.05)

    def evaluate(num: int = 500) -> dict:
        g = torch.Generator().manual_seed(10_000 + a.seed)
        with torch.no_grad():
            f, perf = squads(num, g, w_true, n)
            chosen = P.argmax(scorer(f).squeeze(-1))                          # the model's line-ups
            best = P.argmax(perf)                                             # best in hindsight
            rand = P.argmax(torch.randn(num, n, generator=g, dtype=torch.float64))
        value = lambda x: (x * perf).sum(-1).mean().item()  # noqa: E731
        return {"model": value(chosen), "best": value(best), "random": value(rand),
                "overlap_with_best": ((chosen * best).sum(-1) / best.sum(-1)).mean().item()}

    curve = []
    try:
        from tqdm import trange
    except ImportError:  # pragma: no cover
        trange = range
    for step in trange(steps, desc="lineup"):
        f, perf = squads(a.batch_size, gen, w_true, n)
        x = layer(scorer(f).squeeze(-1), generator=gen)                      # (B, 12) relaxed line-ups
        loss = -(x * perf).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        curve.append({"step": step + 1, "relaxed_value": -loss.item()})
    result = {"polytope": repr(P), "vertices": int(P.vertices().shape[0]), "steps": steps,
              "test": evaluate(), "curve": curve}
    t = result["test"]
    print(f"{result['vertices']} line-ups; mean performance of the chosen line-up {t['model']:.2f} "
          f"(best in hindsight {t['best']:.2f}, random {t['random']:.2f}); "
          f"{100 * t['overlap_with_best']:.0f}% of the best line-up's players picked")
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "results.json").write_text(json.dumps(result, indent=1))
    plt = pyplot()
    if plt is not None:
        fig, ax = plt.subplots(figsize=(5, 3.2))
        ax.plot([c["step"] for c in curve], [c["relaxed_value"] for c in curve])
        ax.axhline(t["best"], ls="--", color="gray", label="best line-up (test)")
        ax.axhline(t["random"], ls=":", color="gray", label="random line-up (test)")
        ax.set(xlabel="step", ylabel="performance of relaxed line-up")
        ax.legend(fontsize=8)
        savefig(fig, a.out / "learning_curve.png")
    return result


if __name__ == "__main__":
    main()
