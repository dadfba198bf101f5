"""Train one NRI graph-layout model; runs unchanged on one process or under torchrun (DDP).

    python examples/graph_layout/train.py --method spanning_tree --epochs 20
    torchrun --nproc_per_node=2 examples/graph_layout/train.py --method spanning_tree --epochs 20

Under ``torchrun`` every process joins a gloo process group (CPU),
the model is wrapped in ``DistributedDataParallel`` and each process trains on its share of every
batch (the global batch size stays ``--batch-size``). More machines: run the same command on
each with ``--nnodes``, ``--node_rank`` and ``--rdzv-endpoint`` (see ``torchrun --help``).
Rank 0 writes ``--out``/``run.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, fields
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from nri import Config, train  # noqa: E402


def parse_args(argv=None) -> tuple[Config, argparse.Namespace]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(Config):
        ap.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
    ap.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test)")
    ap.add_argument("--out", type=Path, default=Path("runs/graph_layout_single"))
    ap.add_argument("--cache", type=Path, default=Path("runs/data"), help="where simulated data is cached")
    ap.add_argument("--threads", type=int, default=0, help="torch threads per process (0: leave as is)")
    a = ap.parse_args(argv)
    cfg = Config(**{f.name: getattr(a, f.name) for f in fields(Config)})
    if a.quick:
        cfg.epochs, cfg.num_train, cfg.num_valid, cfg.num_test = 2, 128, 64, 64
    return cfg, a


def main(argv=None) -> dict:
    cfg, a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    distributed = "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1
    if distributed:
        import torch.distributed as dist
        dist.init_process_group("gloo")
    try:
        result = train(cfg, cache=a.cache)
        rank = int(os.environ.get("RANK", 0))
        out = asdict(result)
        out["world_size"] = int(os.environ.get("WORLD_SIZE", 1))
        if distributed and not result.distributed["replicas_identical"]:
            raise RuntimeError("DDP replicas diverged: parameters differ between ranks after training")
        if rank == 0:
            a.out.mkdir(parents=True, exist_ok=True)
            (a.out / "run.json").write_text(json.dumps(out, indent=1))
            print(f"{cfg.label()}: test ELBO {result.test['elbo']:.1f}, edge precision "
                  f"{result.test['precision']:.3f}, recall {result.test['recall']:.3f} "
                  f"({result.seconds:.1f} s, {out['world_size']} process(es)) -> {a.out / 'run.json'}")
        return out
    finally:
        if distributed:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
