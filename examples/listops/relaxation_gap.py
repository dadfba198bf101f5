"""How far the arborescence SST's relaxation is from independent parents', along training.

    python examples/listops/relaxation_gap.py --seed 1 --epochs 10      # ~5 min on one core
    python examples/listops/relaxation_gap.py --quick                   # smoke test, seconds

Trains the ListOps ``arborescence`` model of ``run.py`` (same config, same updates: nothing
here changes training) and, at every update, compares its relaxed structure ``X_t`` with what
independent parents would relax the same scores and the same Gumbel noise to: each token's
softmax over its heads, ``softmax_h((θ + G)[h, m] / t)``. With the entropy the two are equal
wherever no set of tokens closes a heavy relaxed cycle; with ``exp_family`` they differ on every
expression. Per epoch: the fraction of expressions whose relaxed arcs differ from the per-token
softmax by more than 1e-3 and 0.1 (largest entry), the mean L1 distance per token, and the
validation metrics of ``run.py``. Writes ``relaxation_gap.json`` and ``relaxation_gap.md``
under ``--out``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from collections import defaultdict
from dataclasses import asdict, replace
from pathlib import Path

import torch

import convex_sst as cs

_spec = importlib.util.spec_from_file_location("listops_run", Path(__file__).resolve().parent / "run.py")
run = importlib.util.module_from_spec(_spec)
sys.modules["listops_run"] = run           # dataclasses look their module up here
_spec.loader.exec_module(run)  # type: ignore[union-attr]


def train_and_compare(cfg: run.Config) -> dict:
    """Train ``cfg`` (an arborescence model) as ``run.train`` does, recording the gap each update."""
    if cfg.method != "arborescence":
        raise ValueError(f"expected an arborescence config, got method={cfg.method!r}")
    seen: dict[str, float] = defaultdict(float)
    structure = run.ListOpsModel.structure

    def recording(self, theta, mode, gen):
        if mode == "hard":                                   # evaluation samples: not compared
            return structure(self, theta, mode, gen)
        state = gen.get_state()
        x = structure(self, theta, mode, gen)
        replay = torch.Generator().set_state(state)          # the noise cs.sst drew
        U = theta.detach() + cs.Gumbel().sample(theta.shape, generator=replay).to(theta.dtype)
        if seen["checked"] < 3:                              # the replayed noise is the noise used
            same = cs.relax(U, self.polytope(theta.shape[-1]), self.cfg.regularizer, self.temperature)
            seen["replay_error"] = max(seen["replay_error"], float((same - x.detach()).abs().max()))
            seen["checked"] += 1
        d = (x.detach() - run.per_token_softmax(U / self.temperature)).abs()
        largest = d.amax((1, 2))
        n = theta.shape[-1]
        seen["rows"] += len(largest)
        seen["above_1e-3"] += float((largest > 1e-3).sum())
        seen["above_0.1"] += float((largest > 0.1).sum())
        seen["l1"] += float(d.sum((1, 2)).sum()) / (n - 1)
        return x

    epochs = []
    evaluate = run.evaluate

    def per_epoch(model, data, seed):                        # run.train evaluates once an epoch
        res = evaluate(model, data, seed)
        if seed >= 100:                                      # validation (test: seed 2)
            rows = max(seen["rows"], 1.0)
            epochs.append({"epoch": len(epochs) + 1, "differ_1e-3": seen["above_1e-3"] / rows,
                           "differ_0.1": seen["above_0.1"] / rows, "l1_per_token": seen["l1"] / rows,
                           "valid_precision": res["precision"], "valid_accuracy": res["accuracy"]})
            for k in ("rows", "above_1e-3", "above_0.1", "l1"):
                seen[k] = 0.0
        return res

    run.ListOpsModel.structure, run.evaluate = recording, per_epoch
    try:
        result = run.train(cfg)
    finally:
        run.ListOpsModel.structure, run.evaluate = structure, evaluate
    return {"config": asdict(cfg), "epochs": epochs, "replay_error": seen["replay_error"], "test": result["test"]}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small data, 1 epoch")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--regularizer", default="entropy", choices=run.TREE_REGULARIZERS)
    ap.add_argument("--out", type=Path, default=Path("runs/listops_relaxation_gap"))
    a = ap.parse_args(argv)
    cfg = run.Config(method="arborescence", regularizer=a.regularizer, epochs=a.epochs, seed=a.seed)
    if a.quick:
        cfg = replace(cfg, epochs=1, num_train=300, num_test=100, max_len=16)
    torch.set_num_threads(1)
    out = train_and_compare(cfg)
    md = [f"ListOps arborescence ({a.regularizer}, t = {cfg.temperature}), seed {cfg.seed}: relaxed arcs against "
          "the per-token softmax of the same scores and noise (training updates of each epoch)", "",
          "| epoch | expressions differing by > 1e-3 | by > 0.1 | L1 per token | valid precision |",
          "|---|---|---|---|---|"]
    md += [f"| {e['epoch']} | {100 * e['differ_1e-3']:.1f} % | {100 * e['differ_0.1']:.1f} % | "
           f"{e['l1_per_token']:.4f} | {100 * e['valid_precision']:.1f} % |" for e in out["epochs"]]
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "relaxation_gap.json").write_text(json.dumps(out, indent=1))
    (a.out / "relaxation_gap.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return out


if __name__ == "__main__":
    main()
