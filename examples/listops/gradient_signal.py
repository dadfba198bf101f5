"""Which way each relaxation's gradient moves the arc scores, at checkpoints of training.

    python examples/listops/gradient_signal.py --method independent_parents --seed 1 --epochs 10
    python examples/listops/gradient_signal.py --quick                   # smoke test, seconds

Trains a ListOps model of ``run.py`` (``--method``, same config and updates: nothing here changes
training) and, at the end of the epochs listed in ``--at``, freezes it and asks what the three
relaxations of one-parent-per-token structures would tell its arc scorer. On a fixed probe set of
training expressions, for ``--draws`` Gumbel draws G per expression, the same utilities
``U = θ + G`` are relaxed three ways and fed to the model's own GNN:

* ``per_token``: each token's softmax over its heads, ``softmax_h(U[h, m] / t)`` (independent
  parents' relaxation);
* ``entropy``: the arborescence SST with the entropy (that softmax, projected where relaxed
  cycles form);
* ``exp_family``: the arborescence SST with ``exp_family`` (marginals over whole trees).

Each gives the gradient ``g = ∂L/∂θ`` of the classification loss (summed over expressions, so an
expression's gradient is its own). Every column ``g[:, m]`` sums to 0 for all three (shifting
the scores of token m's heads changes none of them), so only how g ranks the heads matters. The
true parse's direction ``d`` has, per token m, the true parent's indicator minus its mean over
m's candidate heads; ``ḡ`` is the mean gradient over the draws. Per checkpoint:

* ``cyclic``: how often the tokens' best heads under ``θ + G`` close a cycle (where the per-token
  and the tree relaxations can differ most);

and per relaxation:

* the loss;
* the alignment: the cosine, per expression, between ``−ḡ`` and ``d``; the same for one draw's
  gradient; the fraction of tokens whose ``−ḡ[:, m]`` raises the true parent most;
* the mean gradient's norm;
* against the per-token softmax on the same expressions: the gain in alignment, and the
  alignment of the difference ``−(ḡ − ḡ_per_token)`` (negative: the relaxation deviates from the
  per-token softmax away from the parse);
* the cosine between the mean gradients of two relaxations.

Means over expressions come with their standard errors. Writes ``gradient_signal.json`` and
``gradient_signal.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from collections import defaultdict
from dataclasses import asdict, replace
from itertools import combinations
from pathlib import Path

import torch
from torch import nn

import convex_sst as cs

_spec = importlib.util.spec_from_file_location("listops_run", Path(__file__).resolve().parent / "run.py")
run = importlib.util.module_from_spec(_spec)
sys.modules["listops_run"] = run           # dataclasses look their module up here
_spec.loader.exec_module(run)  # type: ignore[union-attr]

RELAXATIONS = ("per_token", "entropy", "exp_family")


def relax(name: str, U: torch.Tensor, t: float) -> torch.Tensor:
    """Relaxed arcs ``(B, n, n)`` (``[h, m]``: arc h → m) of utilities ``U (B, n, n)``."""
    if name == "per_token":
        return run.per_token_softmax(U / t)
    return cs.relax(U, cs.load_polytope("arborescence", n=U.shape[-1], root=0), name, t)


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine between ``a`` and ``b`` over their last two dimensions (0 where either is 0)."""
    num = (a * b).sum((-2, -1))
    den = a.flatten(-2).norm(dim=-1) * b.flatten(-2).norm(dim=-1)
    return torch.where(den > 0, num / den.clamp_min(1e-300), torch.zeros_like(num))


def parse_direction(arcs: torch.Tensor) -> torch.Tensor:
    """``d (B, n, n)``: per token m > 0, its true parent's indicator minus the mean over its
    candidate heads h ≠ m (so every column sums to 0, as the gradients do); 0 for the root."""
    n = arcs.shape[-1]
    cand = 1.0 - torch.eye(n, dtype=arcs.dtype)
    d = (arcs - cand / (n - 1)) * cand
    d[:, :, 0] = 0.0
    return d


def gradients(model: run.ListOpsModel, tok: torch.Tensor, val: torch.Tensor, theta: torch.Tensor, G: torch.Tensor,
              relaxation: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per draw and expression, the loss ``(K, B)`` of the model's GNN on the relaxed arcs of
    ``θ + G[k]`` and its gradient ``∂L/∂θ (K, B, n, n)``, for tokens ``(B, n)``, values ``(B,)``,
    scores ``θ (B, n, n)`` and noise ``G (K, B, n, n)``."""
    K, B, n, _ = G.shape
    th = theta.detach().expand(K, B, n, n).reshape(K * B, n, n).clone().requires_grad_()
    X = relax(relaxation, th + G.reshape(K * B, n, n), model.temperature)
    loss = nn.functional.cross_entropy(model.readout(tok.repeat(K, 1), X), val.repeat(K), reduction="none")
    (g,) = torch.autograd.grad(loss.sum(), th)        # each row's loss depends on its own θ copy only
    return loss.detach().reshape(K, B), g.reshape(K, B, n, n)


def probe(model: run.ListOpsModel, data: list[tuple], draws: int, seed: int) -> dict:
    """The gradient statistics of the module docstring on ``data``, ``draws`` Gumbel draws each:
    per statistic its mean over expressions and, under ``<key>_se``, the mean's standard error
    (``top_head``: over tokens, no error)."""
    gen = torch.Generator().manual_seed(seed)
    per_expression: dict[str, list[torch.Tensor]] = defaultdict(list)
    top, tokens = defaultdict(float), 0
    for tok, arcs, val in run.batches(data, 64, None):
        B, n = tok.shape
        with torch.no_grad():
            theta = model.arc_logits(model.lstm(model.embed(tok))[0])
        G = cs.Gumbel().sample((draws, B, n, n), generator=gen).to(theta.dtype)
        d = parse_direction(arcs)
        heads = run.best_heads(theta + G)                                          # (K, B, n, n)
        per_expression["cyclic"].append(1.0 - run.is_tree(heads.reshape(draws * B, n, n)).reshape(draws, B).mean(0))
        gbar, align = {}, {}
        for name in RELAXATIONS:
            loss, g = gradients(model, tok, val, theta, G, name)
            gbar[name] = g.mean(0)
            align[name] = cosine(-gbar[name], d)
            stats = {"loss": loss.mean(0), "align_mean": align[name], "align_single": cosine(-g, d).mean(0),
                     "grad_norm": gbar[name].flatten(1).norm(dim=1)}
            if name != RELAXATIONS[0]:                 # against the per-token softmax, same expressions
                stats["align_gain"] = align[name] - align[RELAXATIONS[0]]
                stats["align_difference"] = cosine(-(gbar[name] - gbar[RELAXATIONS[0]]), d)
            for k, v in stats.items():
                per_expression[f"{name}/{k}"].append(v)
            raised = (-gbar[name]).masked_fill(torch.eye(n, dtype=torch.bool), -torch.inf).argmax(1)   # (B, n)
            top[f"{name}/top_head"] += float((raised == arcs.argmax(1))[:, 1:].sum())
        for a, b in combinations(RELAXATIONS, 2):
            per_expression[f"cos/{a}-{b}"].append(cosine(gbar[a], gbar[b]))
        tokens += B * (n - 1)
    out = {k: v / tokens for k, v in top.items()}
    for k, vs in per_expression.items():
        v = torch.cat(vs).double()
        out[k], out[k + "_se"] = float(v.mean()), float(v.std() / len(v) ** 0.5) if len(v) > 1 else 0.0
    return out


def train_and_probe(cfg: run.Config, at: list[int], probe_set: int, draws: int) -> dict:
    """Train ``cfg`` as ``run.train`` does, probing at the end of each epoch in ``at``."""
    if cfg.method not in ("arborescence", "independent_parents"):
        raise ValueError(f"expected a one-parent-per-token method (arborescence, independent_parents), got {cfg.method!r}")
    if not 1 <= probe_set <= cfg.num_train:
        raise ValueError(f"probe_set must be between 1 and num_train = {cfg.num_train} (it probes training "
                         f"expressions), got {probe_set}")
    data = run.make_dataset(probe_set, 1234, cfg.max_depth, cfg.max_args, cfg.max_len)   # the first training expressions
    checkpoints = []
    evaluate = run.evaluate

    def per_epoch(model, data_, seed):                      # run.train evaluates once an epoch
        res = evaluate(model, data_, seed)
        epoch = seed - 99                                    # validation: seed 100 + epoch index
        if seed >= 100 and epoch in at:
            checkpoints.append({"epoch": epoch, "valid_precision": res["precision"],
                                "valid_accuracy": res["accuracy"], **probe(model, data, draws, 7)})
        return res

    run.evaluate = per_epoch
    try:
        result = run.train(cfg)
    finally:
        run.evaluate = evaluate
    return {"config": asdict(cfg), "probe_set": probe_set, "draws": draws, "checkpoints": checkpoints,
            "test": result["test"], "curve": result["curve"]}


def table_markdown(out: dict) -> str:
    cfg = out["config"]
    model = run.label(cfg["method"], cfg["regularizer"])
    pm = lambda c, k: f"{c[k]:.3f} ± {c[k + '_se']:.3f}"  # noqa: E731
    md = [f"ListOps {model}, seed {cfg['seed']}, t = {cfg['temperature']}: gradients of the loss in the arc scores θ "
          f"under three relaxations of the same θ + G ({out['probe_set']} training expressions, {out['draws']} draws "
          "each; mean ± standard error over expressions). Alignment: cosine between the descent direction −ḡ and the "
          "true parse's direction; gain: its difference from per_token's on the same expressions; difference: the "
          "alignment of −(ḡ − ḡ_per_token). Cyclic: the draws whose per-token argmax (each token's best head) closes a cycle.", "",
          "| epoch | valid precision | cyclic | relaxation | loss | alignment of the mean | of one draw | gain over per_token | "
          "alignment of the difference | true parent raised most | mean gradient's norm |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in out["checkpoints"]:
        for i, name in enumerate(RELAXATIONS):
            head = (f"| {c['epoch']} | {100 * c['valid_precision']:.1f} % | {100 * c['cyclic']:.1f} % " if i == 0
                    else "| | | ")
            versus = (f"{pm(c, name + '/align_gain')} | {pm(c, name + '/align_difference')}" if i else "— | —")
            md.append(head + f"| {name} | {c[name + '/loss']:.3f} | {pm(c, name + '/align_mean')} | "
                      f"{c[name + '/align_single']:.3f} | {versus} | {100 * c[name + '/top_head']:.1f} % | "
                      f"{c[name + '/grad_norm']:.4f} |")
    md += ["", "Cosine between the mean gradients of two relaxations:", "",
           "| epoch | " + " | ".join(f"{a} – {b}" for a, b in combinations(RELAXATIONS, 2)) + " |",
           "|---|" + "---|" * 3]
    for c in out["checkpoints"]:
        md.append(f"| {c['epoch']} | " + " | ".join(f"{c[f'cos/{a}-{b}']:.3f}" for a, b in combinations(RELAXATIONS, 2)) + " |")
    return "\n".join(md) + "\n"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small data, 1 epoch, a small probe")
    ap.add_argument("--method", default="independent_parents", choices=["independent_parents", "arborescence"],
                    help="the model trained (default: %(default)s)")
    ap.add_argument("--regularizer", default="exp_family", choices=run.TREE_REGULARIZERS,
                    help="the arborescence model's regularizer in training (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--at", type=int, nargs="+", default=[1, 2, 5, 10], help="epochs after which to probe")
    ap.add_argument("--probe-set", type=int, default=512, help="training expressions probed")
    ap.add_argument("--draws", type=int, default=32, help="Gumbel draws per probed expression")
    ap.add_argument("--out", type=Path, default=Path("runs/listops_gradient_signal"))
    a = ap.parse_args(argv)
    cfg = run.Config(method=a.method, regularizer=a.regularizer, epochs=a.epochs, seed=a.seed)
    if a.quick:
        cfg = replace(cfg, epochs=1, num_train=300, num_test=100, max_len=16)
        a.at, a.probe_set, a.draws = [1], 40, 4
    if min(a.at) < 1 or max(a.at) > cfg.epochs:
        ap.error(f"--at must name epochs between 1 and --epochs = {cfg.epochs}, got {a.at}")
    torch.set_num_threads(1)
    out = train_and_probe(cfg, sorted(set(a.at)), a.probe_set, a.draws)
    md = table_markdown(out)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "gradient_signal.json").write_text(json.dumps(out, indent=1))
    (a.out / "gradient_signal.md").write_text(md)
    print(md)
    return out


if __name__ == "__main__":
    main()
