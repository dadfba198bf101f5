"""Helpers shared by the example scripts (not part of the library)."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from multiprocessing import get_context
from pathlib import Path

import numpy as np


def parallel_map(fn, jobs: list, workers: int, desc: str, checkpoints: Path | None = None,
                 resume: bool = False, key=None) -> list:
    """``[fn(j) for j in jobs]`` with a tqdm bar, in ``workers`` spawned processes when > 1
    (``fn`` must be a module-level function).

    With ``checkpoints`` (a folder; results JSON-serializable), each result is written to
    ``checkpoints/<job>.json`` as soon as its job ends, so a run that dies keeps what it finished.
    With ``resume`` too, a job whose file holds an equal job is read back instead of run again
    (the files do not record the code: resume only runs of the same code). A job is identified by
    ``key(job)``, a dataclass (default: the job itself).
    """
    from tqdm import tqdm

    config = (lambda job: job) if key is None else key  # noqa: E731

    results: dict[int, object] = {}
    files = {}
    if checkpoints is not None:
        checkpoints.mkdir(parents=True, exist_ok=True)
        for i, job in enumerate(jobs):
            files[i] = checkpoints / f"{_job_name(config(job))}.json"
            if resume and files[i].exists():
                saved = json.loads(files[i].read_text())
                if saved.get("job") == _jsonable(config(job)):
                    results[i] = saved["result"]
        if resume:
            print(f"{desc}: {len(results)} of {len(jobs)} jobs read back from {checkpoints}")
    todo = [(i, fn, job) for i, job in enumerate(jobs) if i not in results]

    def keep(i: int, result) -> None:
        results[i] = result
        if checkpoints is not None:
            tmp = files[i].with_suffix(".tmp")
            tmp.write_text(json.dumps({"job": _jsonable(config(jobs[i])), "result": result}, indent=1))
            os.replace(tmp, files[i])                   # never a half-written file

    if workers <= 1 or not todo:
        for item in tqdm(todo, desc=desc):
            keep(*_indexed(item))
    else:
        with get_context("spawn").Pool(workers) as pool:
            for i, result in tqdm(pool.imap_unordered(_indexed, todo), total=len(todo), desc=desc):
                keep(i, result)
    return [results[i] for i in range(len(jobs))]


def _indexed(item):
    i, fn, job = item
    return i, fn(job)


def _jsonable(job) -> dict:
    """A dataclass job as the JSON it is stored as (tuples become lists, as they come back)."""
    return json.loads(json.dumps(asdict(job)))


def _job_name(job) -> str:
    """``<method>-seed<seed>-<hash of every field>``: readable, and distinct for distinct jobs."""
    digest = hashlib.sha256(json.dumps(asdict(job), sort_keys=True).encode()).hexdigest()[:12]
    parts = [str(job.method)] if hasattr(job, "method") else []
    parts += [f"seed{job.seed}"] if hasattr(job, "seed") else []
    return "-".join(parts + [digest])


def mean_std(values) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    v = np.asarray(values, float)
    return float(v.mean()), (float(v.std(ddof=1)) if len(v) > 1 else 0.0)


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend, or None (with a hint) when it is not installed."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plot (pip install 'convex_sst[examples]')")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def savefig(fig, path) -> None:
    """Lay out, save (100 dpi) and close a figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
