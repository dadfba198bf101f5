"""Instance-wise feature selection (L2X, Chen et al. 2018) with k-subset SSTs.

    python examples/subset_selection/run.py            # full experiment (~10 min on 2 cores)
    python examples/subset_selection/run.py --quick    # smoke test (< 1 minute)

The four synthetic tasks of L2X, ``X ~ N(0, I₁₀)``, ``Y ∈ {0, 1}`` with ``P(Y = 1) = 1 / (1 + e^{f(X)})``:

=================  =========================================================  ==================
task               f(X)                                                       relevant features
=================  =========================================================  ==================
xor                X₁X₂                                                       1, 2
orange_skin        Σ_{i≤4} X_i² − 4                                           1-4
nonlinear_additive −100 sin(2X₁) + 2|X₂| + X₃ + e^{−X₄}                       1-4
switch             X₁ ~ ±3 + N(0,1); orange skin on X₂₋₅ if X₁ > 0,           1-5 or 1, 6-9
                   nonlinear additive on X₆₋₉ otherwise
=================  =========================================================  ==================

An explainer MLP maps ``X`` to logits ``θ`` over the 10 features, a sampler picks ``k`` of them
(``k`` = the number of relevant features) and a predictor MLP sees only ``x ⊙ X``. Samplers:

* ``sst_exp_family`` / ``sst_binary_entropy``: ``X_t = relax(θ + G)`` on the ``k_subset`` polytope;
* ``l2x``: L2X's relaxation, k independent Gumbel-softmax draws over the features, combined by an
  elementwise max (the same library's ``simplex`` + ``entropy`` SST, drawn k times);
* ``score_function``: a hard top-k sample of ``θ + G``, REINFORCE through the Gumbel density of the
  utilities with a leave-one-out baseline over the batch (the predictor trains on the hard sample).

At test time every method selects the top-k logits (deterministic, as in L2X). Metrics: test
accuracy of the predictor on the selected features, the fraction of the truly relevant features
selected, and the median rank of the relevant features among the logits (the lower median, as
``torch.median``; ideal: ⌈k/2⌉).
The temperature of each relaxation is picked by validation accuracy from ``--temperatures``.
Writes ``results.json``, ``results.md`` and ``learning_curves.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

import convex_sst as cs

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))      # examples/_common.py
from _common import mean_std, parallel_map, pyplot, savefig  # noqa: E402

TASKS = {"xor": 2, "orange_skin": 4, "nonlinear_additive": 4, "switch": 5}   # task -> k
METHODS = ("sst_exp_family", "sst_binary_entropy", "l2x", "score_function")
D = 10


# ----------------------------------------------------------------------------------------- data
def make_task(task: str, num: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(X (num, 10), y (num,), relevant (num, 10) 0/1)`` for one of :data:`TASKS`."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(num, D))
    rel = np.zeros((num, D))

    def orange(Z):
        return np.sum(Z ** 2, 1) - 4.0

    def additive(Z):
        return -100 * np.sin(2 * Z[:, 0]) + 2 * np.abs(Z[:, 1]) + Z[:, 2] + np.exp(-Z[:, 3])

    if task == "xor":
        f = X[:, 0] * X[:, 1]
        rel[:, :2] = 1
    elif task == "orange_skin":
        f = orange(X[:, :4])
        rel[:, :4] = 1
    elif task == "nonlinear_additive":
        f = additive(X[:, :4])
        rel[:, :4] = 1
    elif task == "switch":
        pos = rng.random(num) < 0.5
        X[:, 0] += np.where(pos, 3.0, -3.0)
        f = np.where(pos, orange(X[:, 1:5]), additive(X[:, 5:9]))
        rel[:, 0] = 1
        rel[pos, 1:5] = 1
        rel[~pos, 5:9] = 1
    else:
        raise cs.UnknownNameError(f"unknown task {task!r}; available: {', '.join(TASKS)}")
    p1 = 1.0 / (1.0 + np.exp(np.clip(f, -50, 50)))
    y = (rng.random(num) < p1).astype(np.int64)
    return X.astype(np.float32), y, rel.astype(np.float32)


# --------------------------------------------------------------------------------------- models
def mlp(d_in: int, hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, d_out))


@dataclass
class Config:
    task: str = "xor"
    method: str = "sst_exp_family"
    temperature: float = 0.5
    lr: float = 1e-3
    epochs: int = 10
    batch_size: int = 100
    num_train: int = 10000
    num_valid: int = 2000
    num_test: int = 5000
    seed: int = 0


class Selector(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg, self.k = cfg, TASKS[cfg.task]
        self.explainer = mlp(D, 100, D)
        self.predictor = mlp(D, 200, 2)
        self.subsets = cs.load_polytope("k_subset", n=D, k=self.k)
        self.simplex = cs.load_polytope("simplex", n=D)

    def select(self, theta: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """A training-time (relaxed, or hard for the score function) selection mask ``(B, 10)``."""
        m, t = self.cfg.method, self.cfg.temperature
        if m == "sst_exp_family":
            return cs.sst(theta, self.subsets, "exp_family", t, generator=gen)
        if m == "sst_binary_entropy":
            return cs.sst(theta, self.subsets, "binary_entropy", t, generator=gen)
        if m == "l2x":   # k one-hot relaxations, elementwise max
            draws = cs.sst(theta.expand((self.k,) + theta.shape), self.simplex, "entropy", t, generator=gen)
            return draws.max(0).values
        raise ValueError(m)

    def loss(self, X: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        theta = self.explainer(X)
        ce = nn.functional.cross_entropy
        if self.cfg.method != "score_function":
            return ce(self.predictor(self.select(theta, gen) * X), y)
        noise = cs.Gumbel()
        u = theta.detach() + noise.sample(theta.shape, generator=gen)
        hard = self.subsets.argmax(u)                                  # exact top-k sample
        losses = ce(self.predictor(hard * X), y, reduction="none")
        L = losses.detach()
        baseline = (L.sum() - L) / (len(L) - 1)                       # leave-one-out
        logp = noise.log_prob(u - theta).sum(-1)                      # log density of U given θ
        return losses.mean() + ((L - baseline) * logp).mean()

    @torch.no_grad()
    def evaluate(self, X: torch.Tensor, y: torch.Tensor, rel: torch.Tensor) -> dict:
        theta = self.explainer(X)
        hard = self.subsets.argmax(theta)                              # top-k logits
        acc = (self.predictor(hard * X).argmax(-1) == y).float().mean().item()
        found = ((hard * rel).sum(-1) / rel.sum(-1)).mean().item()
        rank = theta.argsort(-1, descending=True).argsort(-1).float() + 1   # 1 = largest logit
        med = torch.nanmedian(torch.where(rel > 0, rank, torch.nan), dim=-1).values.mean().item()
        return {"accuracy": acc, "relevant_selected": found, "median_rank": med}


def train(cfg: Config) -> dict:
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    X, y, rel = (torch.from_numpy(a) for a in make_task(cfg.task, cfg.num_train + cfg.num_valid + cfg.num_test, 100 + list(TASKS).index(cfg.task)))
    tr, va = slice(0, cfg.num_train), slice(cfg.num_train, cfg.num_train + cfg.num_valid)
    te = slice(cfg.num_train + cfg.num_valid, None)
    model = Selector(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    curve, start = [], time.perf_counter()
    for epoch in range(cfg.epochs):
        order = torch.randperm(cfg.num_train, generator=gen)
        for s in range(0, cfg.num_train, cfg.batch_size):
            idx = order[s:s + cfg.batch_size]
            loss = model.loss(X[tr][idx], y[tr][idx], gen)
            opt.zero_grad()
            loss.backward()
            opt.step()
        curve.append({"epoch": epoch + 1, **{f"valid_{k}": v for k, v in model.evaluate(X[va], y[va], rel[va]).items()}})
    return {"config": asdict(cfg), "curve": curve, "valid": model.evaluate(X[va], y[va], rel[va]),
            "test": model.evaluate(X[te], y[te], rel[te]), "seconds": time.perf_counter() - start}


def _run(cfg: Config) -> dict:
    torch.set_num_threads(1)
    return train(cfg)




def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small data, 2 epochs, 1 seed")
    ap.add_argument("--out", type=Path, default=Path("runs/subset_selection"))
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--temperatures", type=float, nargs="+", default=[0.1, 0.5])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--resume", action="store_true",
                    help="read back the runs already finished under OUT/jobs/ (each run's result is written there "
                         "as soon as it ends) instead of training them again; only for runs of the same code")
    a = ap.parse_args(argv)
    base = Config(epochs=a.epochs)
    if a.quick:
        base = replace(base, epochs=2, num_train=1000, num_valid=500, num_test=500)
        a.seeds, a.temperatures = 1, a.temperatures[-1:]
    a.out.mkdir(parents=True, exist_ok=True)

    # temperature search (seed 0, validation accuracy); the score function has no temperature
    grid = [replace(base, task=task, method=m, temperature=t, seed=0)
            for task, m, t in itertools.product(a.tasks, a.methods, a.temperatures)
            if m != "score_function" or t == a.temperatures[0]]
    search = parallel_map(_run, grid, a.workers, "search", a.out / "jobs" / "search", a.resume)
    best = {}
    for r in search:
        key = (r["config"]["task"], r["config"]["method"])
        if key not in best or r["valid"]["accuracy"] > best[key]["valid"]["accuracy"]:
            best[key] = r
    jobs = [replace(Config(**best[(task, m)]["config"]), seed=s)
            for task in a.tasks for m in a.methods for s in range(1, a.seeds + 1)]
    final = parallel_map(_run, jobs, a.workers, "seeds", a.out / "jobs" / "seeds", a.resume)

    rows = []
    for task in a.tasks:
        for m in a.methods:
            runs = [r for r in final if (r["config"]["task"], r["config"]["method"]) == (task, m)]
            row = {"task": task, "method": m, "k": TASKS[task], "seeds": len(runs),
                   "temperature": runs[0]["config"]["temperature"] if m != "score_function" else None}
            for metric in ("accuracy", "relevant_selected", "median_rank"):
                row[metric] = mean_std([r["test"][metric] for r in runs])
            rows.append(row)
    out = {"config": asdict(base), "table": rows, "search": search, "runs": final}
    (a.out / "results.json").write_text(json.dumps(out, indent=1))
    md = table_markdown(rows, base)
    (a.out / "results.md").write_text(md)
    print(md)
    plot(final, a.tasks, a.methods, a.out)
    return out


def table_markdown(rows: list[dict], base: Config) -> str:
    lines = [f"L2X synthetic tasks, d = {D}, {base.num_train} training / {base.num_test} test samples, "
             f"{base.epochs} epochs; test set, mean ± std over seeds. Median rank: lower median of the relevant "
             "features' ranks among the logits, ideal ⌈k/2⌉.", "",
             "| task | k | method | t | accuracy | relevant features selected | median rank | seeds |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        t = "—" if r["temperature"] is None else f"{r['temperature']:g}"
        lines.append(f"| {r['task']} | {r['k']} | {r['method']} | {t} | {100 * r['accuracy'][0]:.1f} ± {100 * r['accuracy'][1]:.1f} % | "
                     f"{100 * r['relevant_selected'][0]:.1f} ± {100 * r['relevant_selected'][1]:.1f} % | "
                     f"{r['median_rank'][0]:.2f} ± {r['median_rank'][1]:.2f} | {r['seeds']} |")
    return "\n".join(lines) + "\n"


def plot(final: list[dict], tasks, methods, out: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.6 * len(tasks), 3.4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for m in methods:
            runs = [r for r in final if (r["config"]["task"], r["config"]["method"]) == (task, m)]
            v = np.array([[c["valid_relevant_selected"] for c in r["curve"]] for r in runs])
            ep = np.arange(1, v.shape[1] + 1)
            ax.plot(ep, v.mean(0), label=m)
            ax.fill_between(ep, v.min(0), v.max(0), alpha=0.15)
        ax.set(title=task, xlabel="epoch", ylim=(0, 1.02))
    axes[0, 0].set_ylabel("validation: relevant features selected")
    axes[0, 0].legend(fontsize=8)
    savefig(fig, out / "learning_curves.png")


if __name__ == "__main__":
    main()
