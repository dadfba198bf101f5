"""Helpers shared by the example scripts (not part of the library)."""

from __future__ import annotations

from multiprocessing import get_context

import numpy as np


def parallel_map(fn, jobs: list, workers: int, desc: str) -> list:
    """``[fn(j) for j in jobs]`` with a tqdm bar, in ``workers`` spawned processes when > 1
    (``fn`` must be a module-level function)."""
    from tqdm import tqdm

    if workers <= 1:
        return [fn(j) for j in tqdm(jobs, desc=desc)]
    with get_context("spawn").Pool(workers) as pool:
        return list(tqdm(pool.imap(fn, jobs), total=len(jobs), desc=desc))


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
