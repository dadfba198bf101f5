"""The paper experiments' ``--quick`` modes, DDP under torchrun, and the custom-polytope README.

The quick modes are smoke tests of the whole pipeline (data, model, SST layer, training loop,
metrics, JSON/markdown/PNG outputs); where a few seconds of training are enough to learn (sorting
n = 5, the custom line-up) the tests also check that it learned.
"""

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import convex_sst as cs
from convex_sst.cli import main as cli_main

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod                 # dataclasses look their module up here
    spec.loader.exec_module(mod)
    return mod


def _in_unit_interval(x) -> bool:
    return 0.0 <= x <= 1.0


def _resumes_without_training(run, argv, out, monkeypatch, stages=("search", "seeds")):
    """The same command with --resume reads every finished run back from OUT/jobs/ (one JSON per
    run, written as it ended) and trains nothing."""
    for stage in stages:
        assert list((out / "jobs" / stage).glob("*.json"))
    first = json.loads((out / "results.json").read_text())["table"]

    def trains(*args, **kwargs):
        raise AssertionError("trained again")

    monkeypatch.setattr(run, "train", trains)
    again = run.main(argv + ["--resume"])
    assert json.loads(json.dumps(again["table"])) == first


def test_graph_layout_quick(tmp_path, monkeypatch):
    pytest.importorskip("networkx")
    run = _load(EXAMPLES / "graph_layout" / "run.py", "graph_layout_run")
    argv = ["--quick", "--out", str(tmp_path), "--workers", "1"]
    out = run.main(argv)
    assert [(r["method"], r["mode"]) for r in out["table"]] == run.SETTINGS
    for r in out["table"]:
        assert _in_unit_interval(r["precision"][0]) and _in_unit_interval(r["recall"][0])
        assert r["elbo"][0] < 0
        if r["method"] != "independent":          # exactly |V| - 1 edges: precision = recall
            assert r["precision"][0] == pytest.approx(r["recall"][0])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert len(saved["runs"]) == 6 and len(saved["runs"][0]["curve"]) == 2
    assert "spanning tree" in (tmp_path / "results.md").read_text()
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "learning_curves.png").stat().st_size > 0 and (tmp_path / "trees.png").exists()
    _resumes_without_training(run, argv, tmp_path, monkeypatch)


def test_graph_layout_data_are_spring_layouts_of_trees():
    pytest.importorskip("networkx")
    nri = _load(EXAMPLES / "graph_layout" / "nri.py", "nri")
    data = nri.simulate(n=6, steps=3, num_graphs=4, seed=0)
    assert data["traj"].shape == (4, 4, 6, 2) and data["edges"].shape == (4, 15)
    P = cs.load_polytope("spanning_tree", n=6)
    assert bool(P.contains(torch.from_numpy(data["edges"]).double()).all())      # spanning trees
    assert abs(data["traj"][:, 1:]).max() <= 1.0 + 1e-6                          # spring_layout rescales


@pytest.mark.slow
def test_graph_layout_trains_under_torchrun_ddp(tmp_path):
    pytest.importorskip("networkx")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(EXAMPLES / "graph_layout" / "train.py"), "--quick", "--epochs", "1", "--threads", "1",
           "--out", str(tmp_path / "out"), "--cache", str(tmp_path / "data")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    res = json.loads((tmp_path / "out" / "run.json").read_text())
    assert res["world_size"] == 2
    assert res["distributed"] == {"world_size": 2, "replicas_identical": True}
    assert _in_unit_interval(res["test"]["precision"])


def test_subset_selection_quick(tmp_path, monkeypatch):
    run = _load(EXAMPLES / "subset_selection" / "run.py", "subset_selection_run")
    argv = ["--quick", "--out", str(tmp_path), "--workers", "1"]
    out = run.main(argv)
    assert {(r["task"], r["method"]) for r in out["table"]} == {(t, m) for t in run.TASKS for m in run.METHODS}
    for r in out["table"]:
        assert _in_unit_interval(r["accuracy"][0]) and _in_unit_interval(r["relevant_selected"][0])
        assert 1.0 <= r["median_rank"][0] <= 10.0
    assert (tmp_path / "results.md").exists()
    _resumes_without_training(run, argv, tmp_path, monkeypatch)


def test_subset_selection_tasks_have_the_stated_relevant_features():
    run = _load(EXAMPLES / "subset_selection" / "run.py", "subset_selection_run")
    for task, k in run.TASKS.items():
        X, y, rel = run.make_task(task, 2000, 0)
        assert X.shape == (2000, 10) and set(y.tolist()) == {0, 1}
        assert (rel.sum(1) == k).all()
    X, y, rel = run.make_task("switch", 2000, 0)
    assert ((X[:, 0] > 0) == (rel[:, 1] == 1)).mean() > 0.99      # the switch feature decides the group


def test_listops_quick_and_parses(tmp_path):
    run = _load(EXAMPLES / "listops" / "run.py", "listops_run")
    import random

    tokens, parents, value = run.generate(random.Random(3), max_depth=3, max_args=4)
    assert parents[0] == -1 and tokens[0] in run.OPS
    arcs = torch.zeros(len(tokens), len(tokens))
    for m, h in enumerate(parents[1:], 1):
        arcs[h, m] = 1
    P = cs.load_polytope("arborescence", n=len(tokens), root=0)
    assert bool(P.contains(arcs.double()).all())                    # the parse is an arborescence
    # the value is the evaluation of the parse tree
    def ev(i):
        kids = [m for m in range(len(tokens)) if parents[m] == i and tokens[m] != "]"]
        return int(tokens[i]) if not kids and tokens[i].isdigit() else run._apply(tokens[i], [ev(m) for m in kids])
    assert ev(0) == value
    # head accuracy: 1 for scores peaked on the parse, the chain's precision for chain scores
    n = len(tokens)
    assert run.head_accuracy(5.0 * arcs[None], arcs[None]).item() == 1.0
    chain = torch.diag_embed(torch.ones(n - 1), 1)[None]
    assert run.head_accuracy(chain, arcs[None]).item() == pytest.approx((chain * arcs).sum().item() / (n - 1))
    out = run.main(["--quick", "--out", str(tmp_path), "--workers", "1"])
    assert [r["method"] for r in out["table"]] == list(run.METHODS)
    for r in out["table"]:
        assert _in_unit_interval(r["accuracy"][0])
        if r["method"] in ("arborescence", "independent_parents"):
            assert r["precision"][0] == pytest.approx(r["recall"][0])
        assert ("head_accuracy" in r) == (r["method"] not in ("spanning_tree", "lstm"))
        assert ("tree_rate" in r) == ("head_accuracy" in r)
    assert next(r for r in out["table"] if r["method"] == "arborescence")["tree_rate"][0] == 1.0
    for method in ("independent_parents", "arborescence"):
        (res,) = [r["test"] for r in out["runs"] if r["config"]["method"] == method]
        assert all(_in_unit_interval(res[k]) for k in ("paired_precision_heads", "paired_precision_tree",
                                                       "paired_tree_rate"))


def test_listops_is_tree_is_membership_in_the_arborescence_polytope():
    """is_tree (pointer jumping) against the library's own test of x ∈ P (arborescences rooted at
    0): random parent choices with and without cycles, a second parent, an arc into the root."""
    run = _load(EXAMPLES / "listops" / "run.py", "listops_run")
    gen = torch.Generator().manual_seed(0)
    for n in (2, 3, 6, 9):
        B = 400
        parent = torch.randint(0, n, (B, n), generator=gen)
        parent[:, 1:] = torch.where(parent[:, 1:] == torch.arange(1, n), 0, parent[:, 1:])   # no self-loop
        hard = torch.zeros(B, n, n)
        hard[torch.arange(B)[:, None], parent[:, 1:], torch.arange(1, n)] = 1.0
        odd = torch.rand(B, generator=gen) < 0.2                      # a second parent or an arc into 0
        hard[odd, 1 % n if n > 2 else 0, 0] = 1.0
        hard[odd & (torch.rand(B, generator=gen) < 0.5), :, n - 1] = 1.0
        hard[:, torch.arange(n), torch.arange(n)] = 0.0
        want = cs.load_polytope("arborescence", n=n, root=0).contains(hard.double()).float()
        got = run.is_tree(hard)
        assert torch.equal(got, want)
        if n >= 3:
            assert 0 < want.mean() < 1                                 # both kinds occur


def test_listops_decode_as_trees_pairs_the_per_token_and_the_tree_decoding():
    """Under one noise draw the per-token heads bound the best tree's score from above, with
    equality exactly where the heads form a tree, which is then the same structure."""
    run = _load(EXAMPLES / "listops" / "run.py", "listops_run")
    B, n = 300, 7
    theta = 2 * torch.randn(B, n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    arcs = cs.load_polytope("arborescence", n=n, root=0).argmax(theta)               # some true trees
    p_heads, p_tree, is_tree = run.decode_as_trees(theta, arcs, torch.Generator().manual_seed(1))
    U = theta + cs.Gumbel().sample(theta.shape, generator=torch.Generator().manual_seed(1)).double()
    tree = cs.load_polytope("arborescence", n=n, root=0).argmax(U)
    eye = torch.eye(n, dtype=torch.bool)
    heads_score = U.masked_fill(eye, -torch.inf)[:, :, 1:].amax(1).sum(1)
    tree_score = (U * tree).sum((1, 2))
    assert bool((tree_score <= heads_score + 1e-9).all())
    same = (heads_score - tree_score).abs() < 1e-9
    assert torch.equal(same, is_tree.bool()) and 0 < is_tree.mean() < 1
    assert torch.equal(p_heads[same], p_tree[same]) and torch.equal(p_tree, (tree * arcs).sum((1, 2)) / (n - 1))


def test_listops_relaxation_gap_replays_the_noise_and_leaves_training_alone(tmp_path):
    """relaxation_gap.py: the noise it replays is the noise cs.sst drew (relaxing it again gives
    the model's X_t exactly), training is run.py's update for update (same test metrics), and with
    the entropy the relaxed arcs equal the per-token softmax on some expressions, not on others."""
    gap = _load(EXAMPLES / "listops" / "relaxation_gap.py", "listops_relaxation_gap")
    out = gap.main(["--quick", "--out", str(tmp_path)])
    assert out["replay_error"] == 0.0
    assert out["test"] == gap.run.train(gap.run.Config(**out["config"]))["test"]
    (epoch,) = out["epochs"]
    assert 0 < epoch["differ_0.1"] <= epoch["differ_1e-3"] < 1 and epoch["l1_per_token"] > 0
    assert (tmp_path / "relaxation_gap.md").read_text().count("\n| 1 |") == 1
    with pytest.raises(ValueError, match="arborescence"):
        gap.train_and_compare(gap.run.Config(method="independent_parents"))


def test_listops_gradient_signal_probes_without_changing_training(tmp_path):
    """gradient_signal.py: training is run.py's update for update (same test metrics); the
    per-token relaxation is independent parents' (the simplex SST of each token's heads); K draws
    at once give each draw its own gradient; every relaxation's gradient columns sum to 0 with
    nothing into the root, which the alignment statistics rely on."""
    gs = _load(EXAMPLES / "listops" / "gradient_signal.py", "listops_gradient_signal")
    run = gs.run
    out = gs.main(["--quick", "--out", str(tmp_path)])
    assert out["test"] == run.train(run.Config(**out["config"]))["test"]
    (c,) = out["checkpoints"]
    assert 0 < c["cyclic"] < 1                                   # short training: some best heads close cycles
    for name in gs.RELAXATIONS:
        assert c[f"{name}/loss"] > 0 and c[f"{name}/grad_norm"] > 0 and 0 <= c[f"{name}/top_head"] <= 1
        assert -1 <= c[f"{name}/align_single"] <= 1 and -1 <= c[f"{name}/align_mean"] <= 1
    assert (tmp_path / "gradient_signal.md").read_text().count("| per_token |") == 1
    with pytest.raises(ValueError, match="probe_set"):
        gs.train_and_probe(run.Config(num_train=10), [1], 11, 2)

    gen = torch.Generator().manual_seed(0)
    model = run.ListOpsModel(run.Config(method="independent_parents"))
    tok, arcs, val = run.batches(run.make_dataset(200, 1234, 3, 4, 30), 64, None)[3]
    B, n = tok.shape
    theta = 3 * torch.randn(B, n, n, generator=gen)
    G = cs.Gumbel().sample((3, B, n, n), generator=gen)
    U, t = theta + G[0], 0.7
    own = cs.relax(U.transpose(1, 2).masked_fill(torch.eye(n, dtype=torch.bool), -1e4), model.polytope(n), "entropy", t)
    assert torch.allclose(gs.relax("per_token", U, t), own.transpose(1, 2) * (torch.arange(n) > 0), atol=1e-6)
    grads = {}
    for name in gs.RELAXATIONS:
        loss, g = gs.gradients(model, tok, val, theta, G, name)
        single = [gs.gradients(model, tok, val, theta, G[k:k + 1], name) for k in range(3)]
        assert torch.allclose(loss, torch.cat([s[0] for s in single]), atol=1e-6)
        assert torch.allclose(g, torch.cat([s[1] for s in single]), atol=1e-7)
        assert float(g.sum(2).abs().max()) < 1e-4 * float(g.abs().max()) and not bool(g[..., 0].any())
        grads[name] = g
    assert not torch.allclose(grads["entropy"], grads["exp_family"], atol=1e-6)
    d = gs.parse_direction(arcs)
    assert torch.allclose(d.sum(1), torch.zeros(B, n), atol=1e-6) and not bool(d[..., 0].any())
    assert bool((gs.cosine(arcs, d) > 0).all()) and torch.allclose(gs.cosine(d, d), torch.ones(B))


def test_listops_tree_sized_prior_expects_one_parent_per_token():
    # hard arcs [θ + G > 0], G Gumbel: at θ = 0 plain independent arcs keep each arc with
    # probability 1 - 1/e, 5.7 parents per token at n = 10; the tree-sized prior (θ - log(n - 2))
    # with probability 1 - exp(-1/(n - 2)), about one parent per token (1.06)
    run = _load(EXAMPLES / "listops" / "run.py", "listops_run")
    n, B = 10, 2000
    for method, parents in (("independent", (n - 1) * (1 - math.exp(-1))),
                            ("independent_sparse", (n - 1) * (1 - math.exp(-1 / (n - 2))))):
        model = run.ListOpsModel(run.Config(method=method))
        hard = model.structure(torch.zeros(B, n, n), "hard", torch.Generator().manual_seed(0))
        assert set(hard.unique().tolist()) == {0.0, 1.0} and not bool(hard[:, :, 0].any())
        assert abs(hard.sum(1)[:, 1:].mean().item() - parents) < 0.05      # 5 (plain) and 7 standard errors


def test_listops_regularizer_option(tmp_path):
    """--regularizer swaps the tree SSTs' regularizer: the relaxed arborescence is then the entropy
    SST of the same noise, and on scores without a heavy cycle it is each token's softmax over its
    heads (the docstring's reading); hard samples are the same trees whatever the regularizer."""
    run = _load(EXAMPLES / "listops" / "run.py", "listops_run")
    n, B = 7, 3
    theta = torch.randn(B, n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    P = cs.load_polytope("arborescence", n=n, root=0)
    models = {reg: run.ListOpsModel(run.Config(method="arborescence", regularizer=reg))
              for reg in ("exp_family", "entropy")}
    relaxed = {reg: m.structure(theta, "relaxed", torch.Generator().manual_seed(1)) for reg, m in models.items()}
    want = cs.sst(theta, P, "entropy", 1.0, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(relaxed["entropy"], want, atol=1e-12)
    assert (relaxed["entropy"] - relaxed["exp_family"]).abs().max() > 1e-2
    hard = [m.structure(theta, "hard", torch.Generator().manual_seed(2)) for m in models.values()]
    assert torch.equal(hard[0], hard[1])
    chain = 4.0 * torch.diag_embed(torch.ones(n - 1, dtype=torch.float64), 1)     # i - 1 -> i: acyclic
    x = cs.relax(chain, P, "entropy", 1.0)
    soft = chain.masked_fill(torch.eye(n, dtype=torch.bool), -math.inf).softmax(0)  # over heads h of each m
    assert torch.allclose(x[:, 1:], soft[:, 1:], atol=1e-8)
    cycle = chain.clone()
    cycle[1, 2] = cycle[2, 1] = 8.0                                                  # 1 <-> 2 outweighs the rest
    x = cs.relax(cycle, P, "entropy", 1.0)
    assert x[1, 2] + x[2, 1] <= 1 + 1e-8 < (cycle.masked_fill(torch.eye(n, dtype=torch.bool), -math.inf)
                                              .softmax(0)[[1, 2], [2, 1]].sum())
    out = run.main(["--quick", "--methods", "arborescence", "spanning_tree", "--regularizer", "entropy",
                    "--workers", "1", "--out", str(tmp_path)])
    assert out["config"]["regularizer"] == "entropy"
    assert [r["label"] for r in out["table"]] == ["arborescence SST (entropy)", "undirected spanning-tree SST (entropy)"]
    with pytest.raises(SystemExit):
        run.main(["--quick", "--regularizer", "bogus"])


def test_listops_cycle_weight_counts_closed_walks():
    """cycle_weight = tr(exp(A)) − n: 0 on an arborescence (and any acyclic weights), 2(cosh 1 − 1)
    on a 2-cycle, the series Σ tr(Aᵏ)/k! on a per-token softmax, which always closes cycles."""
    run = _load(EXAMPLES / "listops" / "run.py", "listops_run")
    n = 6
    tree = cs.load_polytope("arborescence", n=n, root=0).argmax(torch.randn(3, n, n, dtype=torch.float64))
    assert torch.equal(run.cycle_weight(tree), torch.zeros(3, dtype=torch.float64))
    dag = torch.triu(torch.rand(n, n, dtype=torch.float64), 1)        # acyclic, several parents per token
    assert abs(run.cycle_weight(dag[None]).item()) < 1e-12
    two = torch.zeros(1, n, n, dtype=torch.float64)
    two[0, 1, 2] = two[0, 2, 1] = 1.0
    assert run.cycle_weight(two).item() == pytest.approx(2 * (math.cosh(1) - 1), rel=1e-12)
    A = run.per_token_softmax(torch.randn(4, n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    assert torch.allclose(A.sum(1)[:, 1:], torch.ones(4, n - 1, dtype=torch.float64)) and not bool(A[..., 0].any())
    series = sum(torch.linalg.matrix_power(A, k).diagonal(dim1=-2, dim2=-1).sum(-1) / float(math.factorial(k))
                 for k in range(1, 25))
    assert torch.allclose(run.cycle_weight(A), series, atol=1e-12) and bool((series > 0).all())


def test_listops_interventions_relax_the_noise_the_arborescence_used(tmp_path, monkeypatch):
    """--per-token-weight and --cycle-penalty: the per-token softmax they add is taken of the very
    utilities θ + G the arborescence SST relaxed (relaxing them again gives its X_t exactly); each
    changes training; both are refused for other methods and out of range."""
    run = _load(EXAMPLES / "listops" / "run.py", "listops_run")
    seen = {"X": [], "u": []}
    structure, per_token = run.ListOpsModel.structure, run.per_token_softmax

    def recording_structure(self, theta, mode, gen):
        x = structure(self, theta, mode, gen)
        if mode != "hard":
            seen["X"].append((x.detach(), self.cfg.regularizer, self.temperature))
        return x

    def recording_per_token(u):
        seen["u"].append(u.detach())
        return per_token(u)

    monkeypatch.setattr(run.ListOpsModel, "structure", recording_structure)
    monkeypatch.setattr(run, "per_token_softmax", recording_per_token)
    base = run.Config(method="arborescence", epochs=1, num_train=100, num_test=50, max_len=12, temperature=0.7)
    plain = run.train(base)
    assert seen["u"] == []                                   # off by default: nothing extra computed
    losses = {}
    for w, lam in ((0.5, 0.0), (0.0, 0.5)):
        seen["X"].clear()
        res = run.train(replace(base, per_token_weight=w, cycle_penalty=lam))
        losses[w, lam] = res["curve"][0]["train_loss"]
        assert len(seen["u"]) == len(seen["X"]) > 0
        for (X, reg, t), u in zip(seen["X"], seen["u"]):
            again = cs.relax(u * t, cs.load_polytope("arborescence", n=u.shape[-1], root=0), reg, t)
            assert torch.allclose(again, X, atol=1e-6, rtol=0)
        seen["u"].clear()
    assert len({plain["curve"][0]["train_loss"], *losses.values()}) == 3
    with pytest.raises(ValueError, match="arborescence only"):
        run.train(replace(base, method="lstm", cycle_penalty=1.0))
    out = run.main(["--quick", "--methods", "arborescence", "--per-token-weight", "0.25", "--cycle-penalty", "2",
                    "--workers", "1", "--out", str(tmp_path)])
    assert out["config"]["per_token_weight"] == 0.25 and out["config"]["cycle_penalty"] == 2.0
    assert out["table"][0]["label"] == "arborescence SST (exp_family), per-token loss weight 0.25, cycle penalty 2"
    for argv in (["--per-token-weight", "1.5"], ["--cycle-penalty", "-1"], ["--cycle-penalty", "nan"],
                 ["--methods", "arborescence", "independent_parents", "--cycle-penalty", "1"]):
        with pytest.raises(SystemExit):
            run.main(["--quick", "--out", str(tmp_path)] + argv)


def test_listops_temperature_schedule_runs_from_first_to_final(monkeypatch):
    run = _load(EXAMPLES / "listops" / "run.py", "listops_run")
    seen = []
    structure = run.ListOpsModel.structure

    def spy(self, theta, mode, gen):
        if mode != "hard":                       # training updates, not evaluation samples
            seen.append(self.temperature)
        return structure(self, theta, mode, gen)

    monkeypatch.setattr(run.ListOpsModel, "structure", spy)
    cfg = run.Config(epochs=2, num_train=120, num_test=20, max_len=12, seed=1)
    run.train(cfg)
    assert seen and set(seen) == {1.0}                                   # no schedule: constant
    seen.clear()
    run.train(run.replace(cfg, temperature=2.0, final_temperature=0.5))
    assert seen[0] == 2.0 and seen[-1] == pytest.approx(0.5)            # every update, first to last
    assert all(a > b for a, b in zip(seen, seen[1:]))
    ratios = [b / a for a, b in zip(seen, seen[1:])]
    assert max(ratios) == pytest.approx(min(ratios))                    # geometric
    with pytest.raises(SystemExit):                                     # argparse rejects t <= 0
        run.main(["--quick", "--final-temperature", "-1"])


def test_listops_data_size_options(tmp_path):
    """--max-depth, --max-len and --rounds reach the config (the paper's scale is depth 5, length
    50); the data respects them, and values below 1 are rejected."""
    run = _load(EXAMPLES / "listops" / "run.py", "listops_run")
    out = run.main(["--quick", "--methods", "arborescence", "--max-depth", "2", "--rounds", "2", "--workers", "1",
                    "--out", str(tmp_path)])
    assert out["config"]["max_depth"] == 2 and out["config"]["rounds"] == 2
    for tokens, parents, _ in run.make_dataset(200, 0, max_depth=2, max_args=4, max_len=20):
        assert len(tokens) <= 20
        hops = [0] * len(tokens)
        for m in range(1, len(tokens)):
            hops[m] = hops[parents[m]] + 1          # parents come before their children
        assert max(hops) <= 2
    for flag in ("--max-depth", "--max-len", "--rounds"):
        with pytest.raises(SystemExit):
            run.main(["--quick", flag, "0"])


def test_listops_writes_each_job_as_it_ends_and_resume_reads_them_back(tmp_path, monkeypatch):
    """A run that dies keeps the jobs it finished (OUT/jobs/, one JSON per job), and --resume
    reads back exactly the jobs whose stored config equals the new one, training only the rest."""
    run = _load(EXAMPLES / "listops" / "run.py", "listops_run")
    train, trained = run.train, []

    def dies_on_second_job(cfg):
        if trained:
            raise RuntimeError("killed")
        trained.append(cfg.method)
        return train(cfg)

    monkeypatch.setattr(run, "train", dies_on_second_job)
    argv = ["--quick", "--methods", "lstm", "independent_parents", "--workers", "1", "--out", str(tmp_path)]
    with pytest.raises(RuntimeError, match="killed"):
        run.main(argv)
    (kept,) = (tmp_path / "jobs").glob("*.json")
    assert kept.name.startswith("lstm-seed1-") and not (tmp_path / "results.json").exists()
    assert json.loads(kept.read_text())["job"]["method"] == "lstm"

    def spy(cfg):
        trained.append(cfg.method)
        return train(cfg)

    trained.clear()
    monkeypatch.setattr(run, "train", spy)
    out = run.main(argv + ["--resume"])
    assert trained == ["independent_parents"]                      # lstm was read back, not trained
    assert [r["config"]["method"] for r in out["runs"]] == ["lstm", "independent_parents"]
    assert len(list((tmp_path / "jobs").glob("*.json"))) == 2
    assert json.loads((tmp_path / "results.json").read_text())["runs"] == out["runs"]

    trained.clear()
    again = run.main(argv + ["--resume"])                           # everything read back
    assert trained == [] and again["table"] == out["table"]
    run.main(argv + ["--resume", "--lr", "1e-3"])                  # another config: trained again
    assert trained == ["lstm", "independent_parents"]
    trained.clear()
    run.main(argv)                                                   # no --resume: trained again
    assert trained == ["lstm", "independent_parents"]


def test_sorting_quick_learns_to_sort_five_numbers(tmp_path):
    run = _load(EXAMPLES / "sorting" / "run.py", "sorting_run")
    out = run.main(["--quick", "--out", str(tmp_path)])
    (row,) = out["table"]
    assert row["n"] == 5 and row["elements_correct"][0] > 0.6      # random placement: 20%
    assert (tmp_path / "results.md").exists()


# ------------------------------------------------------------------ custom polytope, README only
CUSTOM = EXAMPLES / "custom_polytope"


def _readme_blocks(lang):
    return re.findall(rf"```{lang}\n(.*?)```", (CUSTOM / "README.md").read_text(), flags=re.S)


def test_custom_polytope_readme_config_is_the_shipped_file():
    (shown,) = _readme_blocks("yaml")
    strip = lambda text: [ln.split("#")[0].rstrip() for ln in text.splitlines()  # noqa: E731
                          if ln.split("#")[0].strip()]
    assert strip(shown) == strip((CUSTOM / "lineup.yaml").read_text())


def test_custom_polytope_readme_commands(capsys, monkeypatch):
    commands = [c.strip() for c in _readme_blocks("bash")]
    assert any("pip install" in c for c in commands)
    monkeypatch.chdir(ROOT)                                           # the README runs from the root
    (check,) = [c for c in commands if c.startswith("convex-sst check")]
    assert cli_main(check.split()[1:]) == 0
    printed = capsys.readouterr().out
    assert "vertices     180" in printed and "integral     yes" in printed
    (snippet,) = _readme_blocks("python")
    env = {}
    exec(compile(snippet, str(CUSTOM / "README.md"), "exec"), env)
    hard = env["hard"]
    quota = torch.tensor([1, 2, 2], dtype=hard.dtype)
    groups = torch.tensor(env["P"].params["groups"])
    per_group = torch.stack([hard[:, groups == g].sum(-1) for g in range(3)], -1)
    assert torch.equal(per_group, quota.expand_as(per_group))


def test_custom_polytope_training_learns(tmp_path):
    train = _load(CUSTOM / "train.py", "custom_polytope_train")
    res = train.main(["--quick", "--out", str(tmp_path)])
    t = res["test"]
    assert res["vertices"] == 180
    assert t["model"] > 0.5 * t["best"] and t["model"] > t["random"] + 1.0
