"""Unsupervised parsing on simplified ListOps with a latent arborescence (SST paper, Sec. 8).

    python examples/listops/run.py              # 6 models x 3 seeds (~50 min on 2 cores)
    python examples/listops/run.py --quick      # smoke test (< 1 minute)

Data: prefix expressions over MIN, MAX and MED (median; of an even count, the upper middle
value) and the digits 0-9, e.g. ``[MAX 2 9 [MIN 4 7 ] 0 ]`` = 9, with bounded depth and length.
Each token's parent in the ground-truth parse is the operator whose list it belongs to (an
operator's closing ``]`` included); the outermost operator (the first token) is the root, so the
parse is an arborescence rooted at token 0. The model never sees the parse, only the value.

Models (all classify the value, 10 classes, from the root token's representation):

* ``arborescence``: bi-LSTM → biaffine arc logits θ[h, m] → SST on the ``arborescence`` polytope
  rooted at 0 with ``exp_family`` (marginals by the directed matrix-tree theorem) → a GNN whose
  messages follow the (relaxed) arcs, child → parent and parent → child. The GNN starts from
  token embeddings only (not the LSTM states), so the value can only reach the root through
  the latent structure;
* ``independent``: the same, each arc an independent Gumbel-sigmoid (``hypercube`` +
  ``binary_entropy``), arcs into the root and self-loops masked;
* ``independent_sparse``: independent arcs with a tree-sized prior: the logits are offset by
  ``−log(n − 2)``, so at θ = 0 each arc is on with probability ``1 − exp(−1/(n − 2)) ≈ 1/(n − 1)``
  (``cs.sst``'s default Gumbel noise G: the hard arc is ``[θ + G > 0]``) and a token expects about
  one parent, as in a tree (1.06 at n = 10); plain ``independent`` starts with each arc on with
  probability ``1 − 1/e``, 5.7 parents per token at n = 10;
* ``independent_parents``: the same, every token but the root picks its parent independently
  (Gumbel-softmax over the other tokens: ``simplex`` + ``entropy``), so cycles are possible;
* ``spanning_tree``: undirected: SST on ``spanning_tree`` (``exp_family``) over token pairs,
  symmetric messages;
* ``lstm``: the bi-LSTM alone (no latent structure).

``--regularizer`` replaces ``exp_family`` in the two tree SSTs by another regularizer with a fast
path on both polytopes: with ``entropy`` the arborescence's relaxed parents are each token's
softmax over its candidate heads wherever those contain no heavy cycle (the in-degree rows are
the per-token simplices; the sets ``x(E[S]) ≤ |S| − 1`` bind only on cycles), rather than
marginals over whole trees. The hard samples, and so the arc metrics, do not depend on it.

``--per-token-weight W`` and ``--cycle-penalty λ`` (arborescence only) are probes of why independent
parents parse better than the arborescence (docs/results.md), not recommended settings. Both use
independent parents' relaxation A of the same utilities θ + G (each token's softmax over its heads).
The first trains on ``(1 − W)·loss(X_t) + W·loss(A)``: the GNN also reads A, and the scorer gets A's
gradient too. The second adds ``λ·(tr exp(A) − n)``, A's relaxed cycle weight (:func:`cycle_weight`):
a push away from cyclic scores that, unlike A's loss, does not say which arc of a cycle is wrong.

Metrics on held-out expressions: accuracy, and precision / recall of the hard sample's arcs
``argmax (θ + G)ᵀx`` against the true parse (undirected edges for the spanning tree), and head
accuracy: each token's best-scoring head ``argmax_h θ[h, m]`` against its true parent (one arc per
token for every model, so it cannot be raised by keeping more arcs, unlike recall), and for the
directed models the fraction of hard samples that are trees (arborescences rooted at 0: always
for ``arborescence``; independent parents and arcs can close cycles). For independent parents
and the arborescence also ``paired_*``: the same scores under one fresh noise draw decoded per token and
as the best arborescence (:func:`decode_as_trees`), to tell a better scorer from cycles
(``paired_tree_rate``: how often the per-token decoding is a tree, i.e. closes no cycle). Batches are
bucketed by length so each batch uses one polytope size. Writes ``results.json``, ``results.md``
and ``learning_curves.png`` under ``--out`` when every job has ended, and each job's result to
``--out``/jobs/ as soon as it ends; ``--resume`` reads those back instead of training again.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import random
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

import convex_sst as cs

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))      # examples/_common.py
from _common import mean_std, parallel_map, pyplot, savefig  # noqa: E402

OPS = ("[MIN", "[MAX", "[MED")
VOCAB = {t: i for i, t in enumerate(OPS + ("]",) + tuple(str(d) for d in range(10)))}
TREE_REGULARIZERS = ("exp_family", "entropy", "binary_entropy", "quadratic")   # fast paths on both trees
METHODS = ("arborescence", "independent", "independent_sparse", "independent_parents", "spanning_tree", "lstm")


# ----------------------------------------------------------------------------------------- data
def _apply(op: str, args: list[int]) -> int:
    if op == "[MIN":
        return min(args)
    if op == "[MAX":
        return max(args)
    return sorted(args)[len(args) // 2]


def generate(rng: random.Random, max_depth: int, max_args: int, p_leaf: float = 0.6):
    """One expression: ``(tokens, parents, value)``; ``parents[0] = -1`` (the root)."""
    tokens: list[str] = []
    parents: list[int] = []

    def expr(depth: int, parent: int) -> int:
        if depth > 0 and (depth >= max_depth or rng.random() < p_leaf):
            d = rng.randrange(10)
            tokens.append(str(d))
            parents.append(parent)
            return d
        op = rng.choice(OPS)
        me = len(tokens)
        tokens.append(op)
        parents.append(parent)
        args = [expr(depth + 1, me) for _ in range(rng.randint(2, max_args))]
        tokens.append("]")
        parents.append(me)
        return _apply(op, args)

    value = expr(0, -1)
    return tokens, parents, value


def make_dataset(num: int, seed: int, max_depth: int, max_args: int, max_len: int) -> list[tuple]:
    rng = random.Random(seed)
    out = []
    while len(out) < num:
        t, p, v = generate(rng, max_depth, max_args)
        if len(t) <= max_len:
            out.append((t, p, v))
    return out


def batches(data: list[tuple], batch_size: int, rng: random.Random | None):
    """Length-bucketed batches ``(tokens (B, n) long, true arcs (B, n, n), values (B,))``."""
    buckets = defaultdict(list)
    for ex in data:
        buckets[len(ex[0])].append(ex)
    out = []
    for n, exs in sorted(buckets.items()):
        if rng is not None:
            rng.shuffle(exs)
        for s in range(0, len(exs), batch_size):
            chunk = exs[s:s + batch_size]
            tok = torch.tensor([[VOCAB[t] for t in ex[0]] for ex in chunk])
            arcs = torch.zeros(len(chunk), n, n)
            for b, ex in enumerate(chunk):
                for m, h in enumerate(ex[1]):
                    if h >= 0:
                        arcs[b, h, m] = 1.0
            out.append((tok, arcs, torch.tensor([ex[2] for ex in chunk])))
    if rng is not None:
        rng.shuffle(out)
    return out


# --------------------------------------------------------------------------------------- models
@dataclass
class Config:
    method: str = "arborescence"
    mode: str = "relaxed"           # or "straight_through": hard structure forward, relaxed backward
    temperature: float = 1.0
    regularizer: str = "exp_family"   # of the arborescence and spanning-tree SSTs
    final_temperature: float | None = None   # anneal geometrically per update to this (None: constant t)
    lr: float = 5e-4                # 2e-3 left two of six arborescence seeds at their first-epoch structure
    epochs: int = 10
    batch_size: int = 64
    hidden: int = 64
    rounds: int = 4                 # message-passing rounds (≥ depth)
    num_train: int = 20000
    num_test: int = 1000
    max_depth: int = 3
    max_args: int = 4
    max_len: int = 30
    seed: int = 0
    # Interventions on the arborescence's training (a probe of why independent parents parse better,
    # docs/results.md; not recommended settings): both act on independent parents' relaxation of the
    # same utilities θ + G, each token's softmax over its heads (:func:`per_token_softmax`).
    per_token_weight: float = 0.0   # w: train on (1 − w)·loss(X_t) + w·loss(per-token softmax)
    cycle_penalty: float = 0.0      # λ: add λ·(relaxed cycle weight of the per-token softmax, :func:`cycle_weight`)


class ListOpsModel(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg, H = cfg, cfg.hidden
        self.embed = nn.Embedding(len(VOCAB), H)
        self.node_embed = nn.Embedding(len(VOCAB), H)   # the GNN sees tokens only: structure must carry the rest
        self.lstm = nn.LSTM(H, H, batch_first=True, bidirectional=True)
        self.head = nn.Linear(2 * H, H)
        self.mod = nn.Linear(2 * H, H)
        self.node = nn.Linear(H, H)
        self.up = nn.Linear(H, H)            # child → parent messages
        self.down = nn.Linear(H, H)          # parent → child messages
        self.gru = nn.GRUCell(H, H)
        self.classify = nn.Sequential(nn.Linear(H if cfg.method != "lstm" else 2 * H, H), nn.ReLU(), nn.Linear(H, 10))
        self._polytopes: dict[int, cs.Polytope] = {}
        self.temperature = cfg.temperature   # the SST temperature now (train() anneals it)

    def polytope(self, n: int) -> cs.Polytope:
        if n not in self._polytopes:
            m = self.cfg.method
            self._polytopes[n] = (cs.load_polytope("arborescence", n=n, root=0) if m == "arborescence"
                                  else cs.load_polytope("spanning_tree", n=n) if m == "spanning_tree"
                                  else cs.load_polytope("simplex", n=n) if m == "independent_parents"
                                  else cs.load_polytope("hypercube", n=n * n))
        return self._polytopes[n]

    def arc_logits(self, states: torch.Tensor) -> torch.Tensor:
        """Biaffine scores ``θ[b, h, m]`` for arc h → m."""
        return torch.einsum("bhd,bmd->bhm", self.head(states), self.mod(states)) / self.cfg.hidden ** 0.5

    def structure(self, theta: torch.Tensor, mode: str, gen: torch.Generator | None) -> torch.Tensor:
        """A (relaxed / hard) adjacency ``(B, n, n)``: ``A[h, m]`` = weight of arc h → m."""
        B, n, _ = theta.shape
        P, t, m = self.polytope(n), self.temperature, self.cfg.method
        if m == "arborescence":
            return cs.sst(theta, P, self.cfg.regularizer, t, mode=mode, generator=gen)
        if m == "spanning_tree":
            i, j = torch.triu_indices(n, n, 1)
            w = cs.sst(theta[:, i, j] + theta[:, j, i], P, self.cfg.regularizer, t, mode=mode, generator=gen)
            A = torch.zeros_like(theta)
            A[:, i, j] = w
            return A + A.transpose(1, 2)              # undirected: both directions
        mask = torch.ones(n, n)
        mask.fill_diagonal_(0)
        mask[:, 0] = 0                                # no arc into the root, no self-loop
        if m == "independent_parents":                # row m of x: the parent of token m
            logits = theta.transpose(1, 2).masked_fill(torch.eye(n, dtype=torch.bool), -1e4)
            x = cs.sst(logits, P, "entropy", t, mode=mode, generator=gen)
            return x.transpose(1, 2) * mask
        if m == "independent_sparse":                 # P(arc) ≈ 1/(n − 1) at θ = 0: about one parent per token
            theta = theta - float(np.log(max(n - 2, 1)))
        x = cs.sst(theta.reshape(B, n * n), P, "binary_entropy", t, mode=mode, generator=gen)
        return x.reshape(B, n, n) * mask

    def forward(self, tok: torch.Tensor, mode: str = "relaxed", gen: torch.Generator | None = None):
        states, _ = self.lstm(self.embed(tok))
        if self.cfg.method == "lstm":
            B, n, _ = states.shape
            H = self.cfg.hidden
            summary = torch.cat([states[:, -1, :H], states[:, 0, H:]], -1)
            return self.classify(summary), None, None
        theta = self.arc_logits(states)
        A = self.structure(theta, mode, gen)
        return self.readout(tok, A), theta, A

    def readout(self, tok: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
        """Class logits ``(B, 10)`` of tokens ``(B, n)`` by the GNN over the adjacency ``A (B, n, n)``."""
        h = torch.tanh(self.node(self.node_embed(tok)))
        B, n, H = h.shape
        for _ in range(self.cfg.rounds):
            msg = A @ self.up(h) + A.transpose(1, 2) @ self.down(h)
            h = self.gru(torch.relu(msg).reshape(B * n, H), h.reshape(B * n, H)).reshape(B, n, H)
        return self.classify(h[:, 0])


def per_token_softmax(u: torch.Tensor) -> torch.Tensor:
    """Independent parents' relaxation of utilities ``u (B, n, n)`` (already divided by t): each
    column m > 0 a softmax over the heads h ≠ m; nothing into the root."""
    n = u.shape[-1]
    root = torch.zeros(n, n, dtype=torch.bool)
    root[:, 0] = True
    return u.masked_fill(torch.eye(n, dtype=torch.bool), -torch.inf).softmax(1).masked_fill(root, 0.0)   # differentiable


def cycle_weight(A: torch.Tensor) -> torch.Tensor:
    """The relaxed cycle weight ``tr(exp(A)) − n = Σ_{k ≥ 1} tr(Aᵏ) / k!`` of nonnegative arc
    weights ``A (B, n, n)``, per expression ``(B,)``: the weight of closed walks, 0 exactly when
    the arcs of positive weight close no cycle (as for any arborescence), bounded by ``n(e^ρ − 1)``
    with ρ the spectral radius (ρ ≤ 1 for a per-token softmax: each column sums to at most 1)."""
    n = A.shape[-1]
    return torch.linalg.matrix_exp(A).diagonal(dim1=-2, dim2=-1).sum(-1) - n


def arc_scores(model: ListOpsModel, theta: torch.Tensor, arcs: torch.Tensor, gen: torch.Generator):
    """Precision and recall of a hard sample's arcs against the true parse, per expression, and
    whether each sample is an arborescence rooted at 0 (:func:`is_tree`; None for the
    undirected spanning tree)."""
    hard = model.structure(theta, "hard", gen)
    trees = is_tree(hard) if model.cfg.method != "spanning_tree" else None
    if model.cfg.method == "spanning_tree":            # compare undirected edges
        hard = torch.triu(hard, 1)
        arcs = torch.triu(arcs + arcs.transpose(1, 2), 1)
    tp = (hard * arcs).sum((1, 2))
    return tp / hard.sum((1, 2)).clamp_min(1), tp / arcs.sum((1, 2)), trees


def is_tree(hard: torch.Tensor) -> torch.Tensor:
    """Per expression, 1.0 where the hard arcs ``(B, n, n)`` form an arborescence rooted at 0
    (every other token exactly one parent, and following parents from any token reaches 0,
    so no cycle), else 0.0."""
    B, n, _ = hard.shape
    one_parent = (hard.sum(1)[:, 1:] == 1).all(1) & (hard[:, :, 0] == 0).all(1)
    parent = hard.argmax(1)
    parent[:, 0] = 0
    up = parent
    for _ in range(max(1, (n - 1).bit_length())):     # pointer jumping: 2^k steps up after k rounds
        up = up.gather(1, up)
    return (one_parent & (up == 0).all(1)).float()


def decode_as_trees(theta: torch.Tensor, arcs: torch.Tensor, gen: torch.Generator):
    """Arc scores ``θ (B, n, n)`` decoded two ways under the same Gumbel noise G: every token's best
    head ``argmax_h (θ + G)[h, m]`` (independent parents' hard sample) and the best arborescence
    rooted at 0, ``argmax_x (θ + G)ᵀx`` (the arborescence SST's). Returns, per expression, the
    precision of each against the true ``arcs`` and whether the heads form a tree (then the two
    are the same structure)."""
    B, n, _ = theta.shape
    U = theta + cs.Gumbel().sample(theta.shape, generator=gen).to(theta.dtype)
    heads = best_heads(U)
    tree = cs.load_polytope("arborescence", n=n, root=0).argmax(U)
    precision = lambda x: (x * arcs).sum((1, 2)) / (n - 1)  # noqa: E731
    return precision(heads), precision(tree), is_tree(heads)


def best_heads(U: torch.Tensor) -> torch.Tensor:
    """Every token's best head under utilities ``U (..., n, n)`` as a 0/1 adjacency ``[h, m]``: one
    arc ``argmax_{h ≠ m} U[h, m]`` into each token m > 0, none into the root (independent
    parents' hard sample of ``U``)."""
    n = U.shape[-1]
    best = U.masked_fill(torch.eye(n, dtype=torch.bool), -torch.inf).argmax(-2, keepdim=True)
    heads = torch.zeros_like(U).scatter_(-2, best, 1.0)
    heads[..., 0] = 0.0
    return heads


def head_accuracy(theta: torch.Tensor, arcs: torch.Tensor) -> torch.Tensor:
    """Per expression, the fraction of non-root tokens whose best-scoring head ``argmax_h θ[h, m]``
    (h ≠ m, no noise) is the true parent: one arc per token for every model, so unlike arc
    recall it cannot be raised by keeping more arcs."""
    n = theta.shape[-1]
    head = theta.masked_fill(torch.eye(n, dtype=torch.bool), -torch.inf).argmax(1)   # (B, n)
    return (head == arcs.argmax(1))[:, 1:].float().mean(1)


@torch.no_grad()
def evaluate(model: ListOpsModel, data: list[tuple], seed: int) -> dict:
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    paired = torch.Generator().manual_seed(seed + 10_000)     # its own noise: the metrics above stay as they were
    correct, prec, rec, heads, trees, decoded = [], [], [], [], [], []
    for tok, arcs, val in batches(data, 250, None):
        logits, theta, _ = model(tok, "hard", gen)
        correct.append((logits.argmax(-1) == val).float())
        if theta is not None:
            p, r, tr = arc_scores(model, theta, arcs, gen)
            prec.append(p)
            rec.append(r)
            if model.cfg.method != "spanning_tree":   # directed heads only
                heads.append(head_accuracy(theta, arcs))
                trees.append(tr)
            if model.cfg.method in ("independent_parents", "arborescence"):
                decoded.append(torch.stack(decode_as_trees(theta, arcs, paired), 1))
    model.train()
    res = {"accuracy": torch.cat(correct).mean().item()}
    if prec:
        res.update(precision=torch.cat(prec).mean().item(), recall=torch.cat(rec).mean().item())
        if heads:
            res["head_accuracy"] = torch.cat(heads).mean().item()
            res["tree_rate"] = torch.cat(trees).mean().item()
        if decoded:  # the same scores decoded per token and as a tree, under one noise draw
            d = torch.cat(decoded).mean(0).tolist()
            res.update(paired_precision_heads=d[0], paired_precision_tree=d[1], paired_tree_rate=d[2])
    return res


def train(cfg: Config) -> dict:
    if (cfg.per_token_weight > 0 or cfg.cycle_penalty > 0) and cfg.method != "arborescence":
        raise ValueError(f"per_token_weight and cycle_penalty act on the arborescence only, got method={cfg.method!r}")
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    data = make_dataset(cfg.num_train + 2 * cfg.num_test, 1234, cfg.max_depth, cfg.max_args, cfg.max_len)
    tr, va, te = data[:cfg.num_train], data[cfg.num_train:cfg.num_train + cfg.num_test], data[cfg.num_train + cfg.num_test:]
    model = ListOpsModel(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    curve, start = [], time.perf_counter()
    t0, t1 = cfg.temperature, cfg.final_temperature
    per_epoch = sum(-(-c // cfg.batch_size) for c in Counter(len(ex[0]) for ex in tr).values())   # as batches()
    updates, step = cfg.epochs * per_epoch, 0
    intervene = cfg.per_token_weight > 0 or cfg.cycle_penalty > 0
    for epoch in range(cfg.epochs):
        losses = []
        for tok, _, val in batches(tr, cfg.batch_size, rng):
            if t1 is not None:                       # geometric: t0 at the first update, t1 at the last
                model.temperature = t0 * (t1 / t0) ** (step / max(1, updates - 1))
                step += 1
            noise_state = gen.get_state() if intervene else None
            logits, theta, _ = model(tok, cfg.mode, gen)
            loss = nn.functional.cross_entropy(logits, val)
            if intervene:                            # the same θ + G: replay the noise cs.sst drew
                replay = torch.Generator().set_state(noise_state)
                U = theta + cs.Gumbel().sample(theta.shape, generator=replay).to(theta.dtype)
                per_token = per_token_softmax(U / model.temperature)
                if cfg.per_token_weight > 0:
                    w = cfg.per_token_weight
                    loss = (1 - w) * loss + w * nn.functional.cross_entropy(model.readout(tok, per_token), val)
                if cfg.cycle_penalty > 0:
                    loss = loss + cfg.cycle_penalty * cycle_weight(per_token).mean()
            opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            losses.append(loss.item())
        curve.append({"epoch": epoch + 1, "train_loss": float(np.mean(losses)),
                      **{f"valid_{k}": v for k, v in evaluate(model, va, 100 + epoch).items()}})
    return {"config": asdict(cfg), "curve": curve, "valid": evaluate(model, va, 1), "test": evaluate(model, te, 2),
            "seconds": time.perf_counter() - start}


def reference_precisions(data: list[tuple], seed: int = 0) -> dict:
    """Arc precision of two structure-free references on ``data``: the left-to-right chain
    ``i − 1 → i`` (what a locality bias gives) and a uniformly random arborescence rooted at 0."""
    gen = torch.Generator().manual_seed(seed)
    chain, rand = [], []
    for tok, arcs, _ in batches(data, 250, None):
        B, n, _ = arcs.shape
        c = torch.diag_embed(torch.ones(n - 1), 1).expand(B, n, n)
        chain.append((c * arcs).sum((1, 2)) / (n - 1))
        P = cs.load_polytope("arborescence", n=n, root=0)
        r = cs.sst(torch.zeros(B, n, n), P, mode="hard", generator=gen)   # Gumbel argmax, θ = 0
        rand.append((r * arcs).sum((1, 2)) / (n - 1))
    return {"chain": torch.cat(chain).mean().item(), "random_arborescence": torch.cat(rand).mean().item()}


def _run(cfg: Config) -> dict:
    torch.set_num_threads(1)
    return train(cfg)




LABELS = {"arborescence": "arborescence SST (exp_family)", "independent": "independent arcs (Gumbel-sigmoid)",
          "independent_sparse": "independent arcs, tree-sized prior (Gumbel-sigmoid, logits − log(n − 2))",
          "independent_parents": "independent parents (Gumbel-softmax per token)",
          "spanning_tree": "undirected spanning-tree SST (exp_family)", "lstm": "bi-LSTM, no latent structure"}


def label(method: str, regularizer: str = Config.regularizer, per_token_weight: float = 0.0,
          cycle_penalty: float = 0.0) -> str:
    """The table's name of ``method``; the tree SSTs name their regularizer, the arborescence its
    interventions (:class:`Config`)."""
    name = LABELS[method].replace("(exp_family)", f"({regularizer})")
    if per_token_weight > 0:
        name += f", per-token loss weight {per_token_weight:g}"
    if cycle_penalty > 0:
        name += f", cycle penalty {cycle_penalty:g}"
    return name


def _positive(text: str) -> float:
    value = float(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small data, 1 epoch, 1 seed")
    ap.add_argument("--out", type=Path, default=Path("runs/listops"))
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--first-seed", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=Config.epochs)
    ap.add_argument("--num-train", type=int, default=Config.num_train)
    ap.add_argument("--temperature", type=_positive, default=Config.temperature)
    ap.add_argument("--final-temperature", type=_positive, default=None,
                    help="anneal the temperature geometrically, per update, from --temperature to this")
    ap.add_argument("--regularizer", default=Config.regularizer, choices=TREE_REGULARIZERS,
                    help="regularizer of the arborescence and spanning-tree SSTs (default: %(default)s); the "
                         "hard samples, which the arc metrics score, are exact trees with any")
    ap.add_argument("--lr", type=float, default=Config.lr, help="Adam learning rate")
    ap.add_argument("--mode", default=Config.mode, choices=["relaxed", "straight_through"])
    ap.add_argument("--max-depth", type=int, default=Config.max_depth, help="operator nesting depth (paper: 5)")
    ap.add_argument("--max-len", type=int, default=Config.max_len, help="tokens per expression (paper: 50)")
    ap.add_argument("--rounds", type=int, default=Config.rounds,
                    help="message-passing rounds (at least --max-depth: a value climbs one level per round)")
    ap.add_argument("--per-token-weight", type=float, default=0.0, metavar="W",
                    help="arborescence only, a probe: train on (1 - W) x its loss + W x the loss on the per-token "
                         "softmax of the same scores and noise (0 <= W <= 1; default 0)")
    ap.add_argument("--cycle-penalty", type=float, default=0.0, metavar="LAMBDA",
                    help="arborescence only, a probe: add LAMBDA x the per-token softmax's relaxed cycle weight "
                         "tr(exp(A)) - n to the loss (LAMBDA >= 0; default 0)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--resume", action="store_true",
                    help="read back the jobs already finished under OUT/jobs/ (each job's result is written there "
                         "as soon as it ends) instead of training them again; only for runs of the same code")
    a = ap.parse_args(argv)
    for name in ("max_depth", "max_len", "rounds"):
        if getattr(a, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(a, name)}")
    if not 0 <= a.per_token_weight <= 1:
        ap.error(f"--per-token-weight must be in [0, 1], got {a.per_token_weight}")
    if not 0 <= a.cycle_penalty < float("inf"):
        ap.error(f"--cycle-penalty must be >= 0 and finite, got {a.cycle_penalty}")
    if (a.per_token_weight > 0 or a.cycle_penalty > 0) and a.methods != ["arborescence"]:
        ap.error(f"--per-token-weight and --cycle-penalty act on the arborescence only; got --methods "
                 f"{' '.join(a.methods)}. Hint: --methods arborescence")
    base = Config(epochs=a.epochs, num_train=a.num_train, temperature=a.temperature, mode=a.mode,
                  regularizer=a.regularizer,
                  lr=a.lr, final_temperature=a.final_temperature, max_depth=a.max_depth, max_len=a.max_len,
                  rounds=a.rounds, per_token_weight=a.per_token_weight, cycle_penalty=a.cycle_penalty)
    if a.quick:
        base = replace(base, epochs=1, num_train=300, num_test=100, max_len=16)
        a.seeds = 1
    a.out.mkdir(parents=True, exist_ok=True)
    jobs = [replace(base, method=m, seed=s) for m, s in itertools.product(a.methods, range(a.first_seed, a.first_seed + a.seeds))]
    runs = parallel_map(_run, jobs, a.workers, "listops", checkpoints=a.out / "jobs", resume=a.resume)
    rows = []
    for m in a.methods:
        rs = [r for r in runs if r["config"]["method"] == m]
        row = {"method": m, "label": label(m, base.regularizer, base.per_token_weight, base.cycle_penalty), "seeds": len(rs), "accuracy": mean_std([r["test"]["accuracy"] for r in rs])}
        if "precision" in rs[0]["test"]:
            for k in ("precision", "recall", "head_accuracy", "tree_rate"):
                if k in rs[0]["test"]:
                    row[k] = mean_std([r["test"][k] for r in rs])
        rows.append(row)
    data = make_dataset(base.num_train + 2 * base.num_test, 1234, base.max_depth, base.max_args, base.max_len)
    refs = reference_precisions(data[base.num_train + base.num_test:])
    md = table_markdown(rows, base, refs)
    print(md)
    out = {"config": asdict(base), "table": rows, "references": refs, "runs": runs}
    (a.out / "results.json").write_text(json.dumps(out, indent=1))
    (a.out / "results.md").write_text(md)
    plot(runs, a.methods, a.out)
    return out


def table_markdown(rows: list[dict], base: Config, refs: dict) -> str:
    md = [f"Simplified ListOps (MIN, MAX, MED; depth ≤ {base.max_depth}, ≤ {base.max_args} arguments, length ≤ "
          f"{base.max_len}), {base.num_train} training / {base.num_test} test expressions, {base.epochs} epochs, "
          f"t = {base.temperature}"
          f"{'' if base.final_temperature is None else f' → {base.final_temperature} (geometric, per update)'}; test set, mean ± std over seeds. Arcs of hard samples vs the true parse "
          "(undirected edges for the spanning tree); head accuracy: each token's best-scoring head argmax_h θ[h, m] "
          "vs its true parent; trees: the fraction of hard samples that are arborescences rooted at 0 (no cycle).", "",
          "| model | accuracy | arc precision | arc recall | head accuracy | trees | seeds |", "|---|---|---|---|---|---|---|"]
    pct = lambda ms: f"{100 * ms[0]:.1f} ± {100 * ms[1]:.1f} %"  # noqa: E731
    cell = lambda r, k: pct(r[k]) if k in r else "—"  # noqa: E731
    for r in rows:
        md.append(f"| {r['label']} | {pct(r['accuracy'])} | {cell(r, 'precision')} | {cell(r, 'recall')} | "
                  f"{cell(r, 'head_accuracy')} | {cell(r, 'tree_rate')} | {r['seeds']} |")
    md.append(f"| *reference: left-to-right chain i−1 → i* | — | {100 * refs['chain']:.1f} % | {100 * refs['chain']:.1f} % | "
              f"{100 * refs['chain']:.1f} % | 100 % | — |")
    md.append(f"| *reference: uniformly random arborescence* | — | {100 * refs['random_arborescence']:.1f} % | "
              f"{100 * refs['random_arborescence']:.1f} % | — | 100 % | — |")
    return "\n".join(md) + "\n"


def plot(runs: list[dict], methods, out: Path) -> None:
    plt = pyplot()
    if plt is not None:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
        for m in methods:
            rs = [r for r in runs if r["config"]["method"] == m]
            ep = [c["epoch"] for c in rs[0]["curve"]]
            for ax, key in zip(axes, ("valid_accuracy", "valid_precision")):
                if key in rs[0]["curve"][0]:
                    c = rs[0]["config"]
                    ax.plot(ep, np.mean([[e[key] for e in r["curve"]] for r in rs], 0),
                            label=label(m, c["regularizer"], c.get("per_token_weight", 0.0), c.get("cycle_penalty", 0.0)))
        axes[0].set(xlabel="epoch", ylabel="validation accuracy")
        axes[1].set(xlabel="epoch", ylabel="validation arc precision (hard samples)")
        axes[0].legend(fontsize=7)
        savefig(fig, out / "learning_curves.png")


if __name__ == "__main__":
    main()
