"""NRI graph layout: does a spanning-tree SST recover the latent tree better than independent edges?

    python examples/graph_layout/run.py              # full experiment (~30 min on 2 cores)
    python examples/graph_layout/run.py --quick      # smoke test (< 1 min)

For each method (independent edges, top-|V|−1 edges, spanning tree; relaxed and straight-through)
a small grid of temperatures and learning rates is searched with one seed, picking the setting with
the best *validation ELBO* (no edge labels used); that setting is then trained with ``--seeds``
fresh seeds and evaluated on held-out graphs. Writes ``results.json``, ``results.md``,
``learning_curves.png`` and ``trees.png`` under ``--out``. Runs go to ``--workers`` processes.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))      # examples/_common.py
from _common import mean_std, parallel_map, pyplot, savefig  # noqa: E402
from nri import Config, load_data, train  # noqa: E402

SETTINGS = [(m, mode) for mode in ("relaxed", "straight_through") for m in ("independent", "top_k", "spanning_tree")]


def _run(args: tuple[Config, str]) -> dict:
    import torch
    torch.set_num_threads(1)
    cfg, cache = args
    return asdict(train(cfg, cache=Path(cache), progress=False))




def label(method: str, mode: str) -> str:
    names = {"independent": "independent edges", "top_k": "top-|V|−1 edges", "spanning_tree": "spanning tree"}
    return names[method] + (" + ST" if mode == "straight_through" else "")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes and grid, 1 seed per setting")
    ap.add_argument("--out", type=Path, default=Path("runs/graph_layout"))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--num-train", type=int, default=2000)
    ap.add_argument("--temperatures", type=float, nargs="+", default=[0.5, 1.0])
    ap.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--resume", action="store_true",
                    help="read back the runs already finished under OUT/jobs/ (each run's result is written there "
                         "as soon as it ends) instead of training them again; only for runs of the same code")
    a = ap.parse_args(argv)
    base = Config(epochs=a.epochs, num_train=a.num_train, hidden=32)
    if a.quick:
        base = replace(base, epochs=2, num_train=256, num_valid=64, num_test=64)
        a.temperatures, a.lrs, a.seeds = a.temperatures[:1], a.lrs[-1:], 1
    a.out.mkdir(parents=True, exist_ok=True)
    cache = str(a.out / "data")
    load_data(base.n, base.steps, base.num_train + base.num_valid + base.num_test, base.data_seed, Path(cache))

    # 1. search: one seed per (setting, temperature, lr); select by validation ELBO
    grid = [replace(base, method=m, mode=mode, temperature=t, lr=lr, seed=0)
            for (m, mode), t, lr in itertools.product(SETTINGS, a.temperatures, a.lrs)]
    saved = dict(resume=a.resume, key=lambda job: job[0])   # a job is (config, data cache)
    search = parallel_map(_run, [(c, cache) for c in grid], a.workers, "search", a.out / "jobs" / "search", **saved)
    best = {}
    for r in search:
        key = (r["config"]["method"], r["config"]["mode"])
        if key not in best or r["valid"]["elbo"] > best[key]["valid"]["elbo"]:
            best[key] = r
    # 2. fresh seeds for the selected settings
    jobs = [replace(Config(**best[s]["config"]), seed=seed) for s in SETTINGS for seed in range(1, a.seeds + 1)]
    final = parallel_map(_run, [(c, cache) for c in jobs], a.workers, "seeds", a.out / "jobs" / "seeds", **saved)

    rows = []
    for m, mode in SETTINGS:
        runs = [r for r in final if (r["config"]["method"], r["config"]["mode"]) == (m, mode)]
        row = {"method": m, "mode": mode, "label": label(m, mode),
               "temperature": runs[0]["config"]["temperature"], "lr": runs[0]["config"]["lr"],
               "seeds": len(runs), "seconds_per_run": float(np.mean([r["seconds"] for r in runs]))}
        for metric in ("elbo", "precision", "recall"):
            row[metric] = mean_std([r["test"][metric] for r in runs])
        rows.append(row)
    out = {"config": asdict(base), "grid": {"temperatures": a.temperatures, "lrs": a.lrs},
           "table": rows, "search": search, "runs": final}
    (a.out / "results.json").write_text(json.dumps(out, indent=1))
    md = table_markdown(rows, base)
    (a.out / "results.md").write_text(md)
    print(md)
    plot(final, a.out)
    return out


def table_markdown(rows: list[dict], base: Config) -> str:
    lines = [f"NRI graph layout, n = {base.n} vertices, T = {base.steps} spring-layout steps, "
             f"{base.num_train} training / {base.num_test} test graphs, {base.epochs} epochs; "
             "test set, mean ± std over seeds (precision = recall for the tree and top-k, which always "
             "have |V|−1 edges).", "",
             "| method | t | lr | ELBO (per graph) | edge precision | edge recall | seeds |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['label'].replace('|', chr(92) + '|')} | {r['temperature']:g} | {r['lr']:g} | {r['elbo'][0]:.0f} ± {r['elbo'][1]:.0f} | "
                     f"{100 * r['precision'][0]:.1f} ± {100 * r['precision'][1]:.1f} % | "
                     f"{100 * r['recall'][0]:.1f} ± {100 * r['recall'][1]:.1f} % | {r['seeds']} |")
    return "\n".join(lines) + "\n"


def plot(final: list[dict], out: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for m, mode in SETTINGS:
        runs = [r for r in final if (r["config"]["method"], r["config"]["mode"]) == (m, mode)]
        ep = [c["epoch"] for c in runs[0]["curve"]]
        style = "--" if mode == "straight_through" else "-"
        for ax, key in zip(axes, ("valid_precision", "valid_elbo")):
            v = np.array([[c[key] for c in r["curve"]] for r in runs])
            ax.plot(ep, v.mean(0), style, label=label(m, mode))
            if len(runs) > 1:
                ax.fill_between(ep, v.mean(0) - v.std(0), v.mean(0) + v.std(0), alpha=0.15)
    axes[0].set(xlabel="epoch", ylabel="validation edge precision (hard samples)")
    axes[1].set(xlabel="epoch", ylabel="validation ELBO per graph")
    axes[0].legend(fontsize=8)
    savefig(fig, out / "learning_curves.png")

    # one held-out graph: true tree vs the hard sample of each relaxed method
    relaxed = [m for m, mode in SETTINGS if mode == "relaxed"]
    fig, axes = plt.subplots(1, len(relaxed) + 1, figsize=(3.2 * (len(relaxed) + 1), 3.2))
    ex = next(r for r in final if r["config"]["method"] == relaxed[0])["example"]
    pos = np.array(ex["positions"])
    n = len(pos)
    iu = np.stack(np.triu_indices(n, 1), 1)
    panels = [("true tree", ex["true"])] + [
        (label(m, "relaxed"), next(r for r in final if r["config"]["method"] == m and r["config"]["mode"] == "relaxed")["example"]["sampled"])
        for m in relaxed]
    true = np.array(ex["true"]) > 0.5
    for ax, (title, x) in zip(axes, panels):
        x = np.array(x) > 0.5
        for e, (i, j) in enumerate(iu):
            if x[e]:
                ax.plot(*pos[[i, j]].T, color="tab:green" if true[e] else "tab:red", lw=2)
        ax.scatter(*pos.T, color="black", zorder=3, s=20)
        ax.set_title(f"{title}\n{int((x & true).sum())}/{int(true.sum())} true edges", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    savefig(fig, out / "trees.png")


if __name__ == "__main__":
    main()
