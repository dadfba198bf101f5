"""Neural relational inference (NRI) for graph layout with a latent spanning tree.

Data (as in the SST paper and its official code, sizes reduced for a CPU): a latent spanning tree
``T`` on ``n`` vertices sampled by Gumbel-Kruskal, initial 2-D positions ``N(0, I)``, then ``T``
steps of networkx ``spring_layout`` with one iteration each. A VAE infers the tree from the
trajectory:

* encoder: an NRI-style GNN (node → edge → node → edge) mapping the trajectory to symmetric edge
  logits ``θ`` over the ``n(n−1)/2`` edges of ``K_n``;
* latent: ``X_t = SST(θ)`` — independent edges (per-edge Gumbel-softmax over {edge, no edge}),
  top-|V|−1 edges (``k_subset``, ``exp_family``) or a spanning tree (``spanning_tree``,
  ``exp_family``), relaxed or straight-through;
* decoder: a GNN predicting each step's position deltas from the previous positions, with one
  message function for edges and one for non-edges mixed by ``X_t`` (the NRI decoder);
* objective: ELBO = E[log N(p_{s+1} | p̂_{s+1}, σ²)] − KL, with the KL of the Gumbel utilities
  ``Σ θ + e^{−θ} − 1`` (``cs.gumbel_kl``).

Metrics: ELBO per graph and edge precision / recall of hard samples ``argmax (θ + G)ᵀx`` against
the true tree, on held-out graphs.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

import convex_sst as cs

METHODS = ("independent", "top_k", "spanning_tree")
VARIANCE = 5e-5  # the NRI decoder's fixed output variance σ²


# ----------------------------------------------------------------------------------------- data
def simulate(n: int, steps: int, num_graphs: int, seed: int) -> dict[str, np.ndarray]:
    """``num_graphs`` trees and their spring-layout trajectories.

    Returns ``{"traj": (N, steps + 1, n, 2) float32, "edges": (N, n(n−1)/2) float32}``, edges in
    ``triu_indices(n, 1)`` order (the ``spanning_tree`` polytope's order).
    """
    import networkx as nx

    P = cs.load_polytope("spanning_tree", n=n)
    gen = torch.Generator().manual_seed(seed)
    trees = P.argmax(cs.Gumbel().sample((num_graphs,) + P.shape, generator=gen, dtype=torch.float64))
    iu = np.stack(np.triu_indices(n, 1), 1)
    rng = np.random.default_rng(seed)
    traj = np.zeros((num_graphs, steps + 1, n, 2), np.float32)
    for g in range(num_graphs):
        G = nx.Graph()
        G.add_nodes_from(range(n))
        G.add_edges_from(map(tuple, iu[trees[g].numpy() > 0.5]))
        start = rng.normal(size=(n, 2))
        traj[g, 0] = start / np.abs(start).max()          # same scale as spring_layout's output
        pos = {i: start[i] for i in range(n)}
        for s in range(steps):
            pos = nx.spring_layout(G, pos=pos, iterations=1)
            traj[g, s + 1] = np.stack([pos[i] for i in range(n)])
    return {"traj": traj, "edges": trees.float().numpy()}


def load_data(n: int, steps: int, num_graphs: int, seed: int, cache: Path | None) -> dict[str, np.ndarray]:
    """:func:`simulate`, cached as ``.npz`` under ``cache`` when given."""
    if cache is not None:
        path = Path(cache) / f"nri_n{n}_T{steps}_N{num_graphs}_seed{seed}.npz"
        if path.exists():
            with np.load(path) as f:
                return {k: f[k] for k in f.files}
        data = simulate(n, steps, num_graphs, seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(path, **data)
        return data
    return simulate(n, steps, num_graphs, seed)


# --------------------------------------------------------------------------------------- models
def mlp(d_in: int, d_hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.ELU(), nn.Linear(d_hidden, d_hidden), nn.ELU(),
                         nn.Linear(d_hidden, d_out))


class Encoder(nn.Module):
    """Trajectory ``(B, S, n, 2)`` → symmetric edge logits ``θ`` ``(B, n(n−1)/2)``."""

    def __init__(self, n: int, steps: int, hidden: int = 64):
        super().__init__()
        self.register_buffer("iu", torch.triu_indices(n, n, 1), persistent=False)
        self.node = mlp(2 * (steps + 1), hidden, hidden)
        self.rel = mlp(3 * (steps + 1), hidden, hidden)        # relative trajectory of a pair
        self.edge1 = mlp(3 * hidden, hidden, hidden)
        self.node2 = mlp(hidden, hidden, hidden)
        self.edge2 = mlp(3 * hidden, hidden, hidden)
        self.out = nn.Linear(hidden, 1)

    def forward(self, traj: torch.Tensor) -> torch.Tensor:
        B, S, n, _ = traj.shape
        h = self.node(traj.permute(0, 2, 1, 3).reshape(B, n, 2 * S))          # (B, n, H)
        i, j = self.iu
        d = traj[:, :, i] - traj[:, :, j]                                     # (B, S, E, 2)
        r = torch.cat([d.abs(), d.norm(dim=-1, keepdim=True)], -1)            # symmetric in (i, j)
        r = self.rel(r.permute(0, 2, 1, 3).reshape(B, len(i), 3 * S))
        e = self.edge1(torch.cat([h[:, i], h[:, j], r], -1)) + self.edge1(torch.cat([h[:, j], h[:, i], r], -1))
        agg = torch.zeros_like(h).index_add_(1, i, e).index_add_(1, j, e)     # sum over incident edges
        v = self.node2(agg / (n - 1))
        e2 = self.edge2(torch.cat([v[:, i], v[:, j], e], -1)) + self.edge2(torch.cat([v[:, j], v[:, i], e], -1))
        return self.out(e2).squeeze(-1)


class Decoder(nn.Module):
    """Positions ``p_s`` ``(B, S, n, 2)`` and edge weights ``x`` ``(B, n(n−1)/2)`` → ``p̂_{s+1}``."""

    def __init__(self, n: int, hidden: int = 64):
        super().__init__()
        self.register_buffer("iu", torch.triu_indices(n, n, 1), persistent=False)
        msg = lambda: nn.Sequential(nn.Linear(6, hidden), nn.ELU(), nn.Linear(hidden, hidden), nn.ELU())  # noqa: E731
        self.msg_edge, self.msg_none = msg(), msg()
        self.out = mlp(hidden + 2, hidden, 2)

    def forward(self, pos: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        i, j = self.iu
        w = x[:, None, :, None]                                                # (B, 1, E, 1)
        pi, pj = pos[:, :, i], pos[:, :, j]
        fwd = torch.cat([pi, pj, pi - pj], -1)                                 # messages j → i
        bwd = torch.cat([pj, pi, pj - pi], -1)                                 # messages i → j
        m_i = w * self.msg_edge(fwd) + (1 - w) * self.msg_none(fwd)
        m_j = w * self.msg_edge(bwd) + (1 - w) * self.msg_none(bwd)
        agg = torch.zeros(pos.shape[:3] + (m_i.shape[-1],), dtype=pos.dtype, device=pos.device)
        agg = agg.index_add_(2, i, m_i).index_add_(2, j, m_j)
        return pos + self.out(torch.cat([pos, agg], -1))


class NRI(nn.Module):
    """Encoder + SST latent + decoder. ``forward`` returns ``(nll, kl, θ)`` per graph."""

    def __init__(self, n: int, steps: int, method: str, temperature: float, mode: str, hidden: int = 64):
        super().__init__()
        if method not in METHODS:
            raise cs.UnknownNameError(f"unknown method {method!r}; available: {', '.join(METHODS)}")
        self.n, self.method, self.temperature, self.mode = n, method, temperature, mode
        self.encoder = Encoder(n, steps, hidden)
        self.decoder = Decoder(n, hidden)
        E = n * (n - 1) // 2
        if method == "independent":        # per edge: one-hot over {edge, no edge}, entropy = Gumbel-softmax
            self.polytope, self.regularizer = cs.load_polytope("simplex", n=2), "entropy"
        elif method == "top_k":            # the n − 1 edges with the largest utilities
            self.polytope, self.regularizer = cs.load_polytope("k_subset", n=E, k=n - 1), "exp_family"
        else:
            self.polytope, self.regularizer = cs.load_polytope("spanning_tree", n=n), "exp_family"

    def utilities_to_theta(self, theta: torch.Tensor) -> torch.Tensor:
        """θ over edges → the polytope's parameters (independent edges: logits (θ, 0) per edge)."""
        if self.method == "independent":
            return torch.stack([theta, torch.zeros_like(theta)], -1)
        return theta

    def sample(self, theta: torch.Tensor, mode: str, generator: torch.Generator | None = None) -> torch.Tensor:
        x = cs.sst(self.utilities_to_theta(theta), self.polytope, self.regularizer, self.temperature,
                   mode=mode, generator=generator)
        return x[..., 0] if self.method == "independent" else x

    def forward(self, traj: torch.Tensor, generator: torch.Generator | None = None):
        theta = self.encoder(traj)
        x = self.sample(theta, self.mode, generator)
        pred = self.decoder(traj[:, :-1], x)
        nll = ((pred - traj[:, 1:]) ** 2).sum((1, 2, 3)) / (2 * VARIANCE)
        nll = nll + 0.5 * math.log(2 * math.pi * VARIANCE) * pred[0].numel()
        # KL of the Gumbel utilities; for independent edges the second logit is fixed at 0 (KL 0)
        kl = cs.gumbel_kl(theta).sum(-1)
        return nll, kl, theta


# ------------------------------------------------------------------------------------- training
@dataclass
class Config:
    method: str = "spanning_tree"
    mode: str = "relaxed"           # or "straight_through"
    temperature: float = 0.5
    lr: float = 1e-3
    epochs: int = 30
    batch_size: int = 64
    hidden: int = 64
    n: int = 10
    steps: int = 10
    num_train: int = 2000
    num_valid: int = 500
    num_test: int = 1000
    seed: int = 0
    data_seed: int = 1234

    def label(self) -> str:
        st = "+ST" if self.mode == "straight_through" else ""
        return f"{self.method}{st}"


@dataclass
class Result:
    config: dict
    curve: list = field(default_factory=list)    # per epoch: train ELBO, valid ELBO, valid precision
    valid: dict = field(default_factory=dict)
    test: dict = field(default_factory=dict)
    seconds: float = 0.0
    example: dict = field(default_factory=dict)  # one test graph: true and sampled edges, positions
    distributed: dict = field(default_factory=dict)  # world size and a replica-consistency check


def edge_scores(hard: torch.Tensor, true: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-graph precision and recall of the sampled edge set ``hard`` against ``true``."""
    tp = (hard * true).sum(-1)
    precision = tp / hard.sum(-1).clamp_min(1)
    recall = tp / true.sum(-1)
    return precision, recall


@torch.no_grad()
def evaluate(model: NRI, traj: torch.Tensor, edges: torch.Tensor, seed: int, batch_size: int = 250) -> dict:
    """Mean ELBO per graph (training sample mode) and precision / recall of hard samples."""
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    elbo, prec, rec = [], [], []
    for s in range(0, len(traj), batch_size):
        tb, eb = traj[s:s + batch_size], edges[s:s + batch_size]
        nll, kl, theta = model(tb, generator=gen)
        elbo.append(-(nll + kl))
        p, r = edge_scores(model.sample(theta, "hard", gen), eb)
        prec.append(p)
        rec.append(r)
    model.train()
    cat = lambda v: torch.cat(v).mean().item()  # noqa: E731
    return {"elbo": cat(elbo), "precision": cat(prec), "recall": cat(rec)}


def train(cfg: Config, cache: Path | None = None, progress: bool = True) -> Result:
    """Train one model; under ``torch.distributed`` (torchrun), wrap it in DDP and shard the data.

    Every rank returns the same :class:`Result` (evaluation is on the full valid / test sets).
    """
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    total = cfg.num_train + cfg.num_valid + cfg.num_test
    if distributed and cache is not None:          # rank 0 simulates and caches, the others wait
        if rank == 0:
            load_data(cfg.n, cfg.steps, total, cfg.data_seed, cache)
        dist.barrier()
    data = load_data(cfg.n, cfg.steps, total, cfg.data_seed, cache)
    traj, edges = torch.from_numpy(data["traj"]), torch.from_numpy(data["edges"])
    tr = slice(0, cfg.num_train)
    va = slice(cfg.num_train, cfg.num_train + cfg.num_valid)
    te = slice(cfg.num_train + cfg.num_valid, total)

    torch.manual_seed(cfg.seed)                              # same initial weights on every rank
    model = NRI(cfg.n, cfg.steps, cfg.method, cfg.temperature, cfg.mode, cfg.hidden)
    net = nn.parallel.DistributedDataParallel(model) if distributed else model
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + rank)   # noise and shuffling differ per rank
    per_rank = cfg.batch_size // world
    result = Result(config=asdict(cfg))
    start = time.perf_counter()
    try:
        from tqdm import tqdm
        bar = tqdm(range(cfg.epochs), desc=cfg.label(), disable=not progress or rank != 0, leave=False)
    except ImportError:  # pragma: no cover - tqdm is a dependency
        bar = range(cfg.epochs)
    for epoch in bar:
        order = torch.randperm(cfg.num_train, generator=torch.Generator().manual_seed(cfg.seed * 7919 + epoch))
        running = []
        for s in range(0, cfg.num_train - cfg.batch_size + 1, cfg.batch_size):
            idx = order[s:s + cfg.batch_size][rank * per_rank:(rank + 1) * per_rank]
            nll, kl, _ = net(traj[tr][idx], generator=gen)
            loss = (nll + kl).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            running.append(-loss.item())
        v = evaluate(model, traj[va], edges[va], seed=10_000 + epoch)
        result.curve.append({"epoch": epoch + 1, "train_elbo": float(np.mean(running)), **{f"valid_{k}": x for k, x in v.items()}})
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(elbo=f"{v['elbo']:.0f}", prec=f"{v['precision']:.2f}")
    result.seconds = time.perf_counter() - start
    if distributed:                                # DDP keeps the replicas identical: check it
        flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        ref = flat.clone()
        dist.broadcast(ref, 0)
        same = torch.tensor([float(torch.equal(flat, ref))])
        dist.all_reduce(same, op=dist.ReduceOp.MIN)
        result.distributed = {"world_size": world, "replicas_identical": bool(same.item() == 1.0)}
    result.valid = evaluate(model, traj[va], edges[va], seed=1)
    result.test = evaluate(model, traj[te], edges[te], seed=2)
    with torch.no_grad():
        g = cfg.num_train + cfg.num_valid
        theta = model.encoder(traj[g:g + 1])
        hard = model.sample(theta, "hard", torch.Generator().manual_seed(3))
    result.example = {"true": edges[g].tolist(), "sampled": hard[0].tolist(), "positions": traj[g, -1].tolist()}
    return result
