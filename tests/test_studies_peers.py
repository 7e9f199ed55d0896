"""torch.optim optimizers in studies (the loop path): against hand-written loops, against the
vmapped functional rules, paired by seed across the two paths; the peers (Prodigy, D-Adaptation,
Schedule-Free, DoG) as optional extras with their own hyperparameters."""

from __future__ import annotations

import importlib.util
import inspect
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from hdfunc.studies import StudyConfig, minibatch_indices, run_study
from hdfunc.studies import cli, stats
from hdfunc.studies.engine import study_problem
from hdfunc.studies.torch_optimizers import (PEERS, TORCH_OPTIMIZERS, LoopTrainer,
                                             MissingPeerError, optimizer_state_bytes)

REPO = Path(__file__).resolve().parents[1]
TINY = {"dim": 6, "classes": 3, "n_samples": 120, "hidden": 5}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def peer_installed(name: str) -> bool:
    return TORCH_OPTIMIZERS[name].available()


needs_peers = pytest.mark.skipif(not all(p.available() for p in PEERS.values()),
                                 reason="the peers are not installed (pip install 'hdfunc[peers]')")


def config(**changes) -> StudyConfig:
    """float64 (so the two paths agree to ~1e-12), 96 training / 24 validation examples, batch
    32: epochs of 3 steps, so 14 steps cross four epoch boundaries."""
    base = dict(problem="classification", problem_options=dict(TINY), steps=14, batch_size=32,
                seeds=[3, 1], optimizers=["torch_adam"], lr0=[1e-2], dtype="float64",
                validation_fraction=0.2, weight_decay=1e-3, log_every=1)
    base.update(changes)
    return StudyConfig(**base)


def manual_loop(problem, make_optimizer, seed: int, steps: int, batch_size: int,
                eval_mode: bool = False):
    """The user's own training loop: the seed's model, the study's minibatch order
    (``minibatch_indices``), loss.backward(), optimizer.step(); validation after each epoch
    (Schedule-Free: between optimizer.eval() and optimizer.train()). Returns per-step losses, the
    last validation loss and the final loss over the whole training set, all float64."""
    model = problem.init_model(seed).double()
    optimizer = make_optimizer(model.parameters())
    if eval_mode:
        optimizer.train()
    per_epoch = -(-problem.num_examples // batch_size)
    losses, val = [], None

    def evaluate(x, y):
        if eval_mode:
            optimizer.eval()
        with torch.no_grad():
            value = float(problem.loss_fn(model(x.double()), y))
        if eval_mode:
            optimizer.train()
        return value

    for t, index in enumerate(minibatch_indices(seed, 0, steps, problem.num_examples, batch_size)):
        optimizer.zero_grad()
        loss = problem.loss_fn(model(problem.inputs[index].double()), problem.targets[index])
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        if (t + 1) % per_epoch == 0 or t == steps - 1:
            val = evaluate(problem.val_inputs, problem.val_targets)
    return np.array(losses), val, evaluate(problem.inputs, problem.targets)


def curve(results, label, lr0, beta, seed, which=0):
    return results.curves[(label, lr0, beta, seed)][which]


# ----------------------------------------------------------------------------- oracles


def test_torch_adam_in_a_study_equals_a_hand_written_loop():
    cfg = config(optimizers=["torch_adam"])
    results = run_study(cfg, progress=False)
    problem = study_problem(cfg)
    for seed in cfg.seed_list:
        losses, val, final = manual_loop(
            problem, lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-3), seed, 14, 32)
        np.testing.assert_allclose(curve(results, "torch_adam", 1e-2, 0.0, seed), losses,
                                   rtol=1e-12, atol=0)
        run = results.run("torch_adam", 1e-2, 0.0, seed)
        assert run.val_loss == pytest.approx(val, rel=1e-12)
        assert run.final_loss == pytest.approx(final, rel=1e-12)
    # the seeds train different trajectories (a loop ignoring the seed would fail above)
    first, second = (curve(results, "torch_adam", 1e-2, 0.0, s) for s in (3, 1))
    assert np.abs(first - second).max() > 1e-2


@pytest.mark.parametrize("rule", ["adam_hd", "sgdn_hd"])
def test_vmapped_rule_equals_its_optim_class_on_the_loop_path(rule):
    """The strong cross-path oracle: the functional rule, vmapped over runs, and its
    hdfunc.optim class, trained run after run, take the same steps (losses and adapted rates)."""
    beta = {"adam_hd": 1e-3, "sgdn_hd": 1e-2}[rule]
    cfg = config(optimizers=[rule, f"optim_{rule}"], lr0=[1e-2], beta=[beta], seeds=[2, 0, 1])
    results = run_study(cfg, progress=False)
    for seed in cfg.seed_list:
        for which in (0, 1):  # losses, applied rates γ_t
            np.testing.assert_allclose(curve(results, f"optim_{rule}", 1e-2, beta, seed, which),
                                       curve(results, rule, 1e-2, beta, seed, which),
                                       rtol=1e-9, atol=1e-13)
        vmapped, looped = (results.run(o, 1e-2, beta, seed) for o in (rule, f"optim_{rule}"))
        assert looped.final_loss == pytest.approx(vmapped.final_loss, rel=1e-10)
        assert looped.val_loss == pytest.approx(vmapped.val_loss, rel=1e-10)
        rates = curve(results, rule, 1e-2, beta, seed, 1)
        assert abs(rates[-1] / 1e-2 - 1) > 0.01  # the rate did adapt: not a fixed-rate match


def test_paired_statistics_pair_by_seed_across_the_two_paths():
    """At β = 0 Adam-HD is Adam: the vmapped HD runs, torch.optim.Adam (loop) and AdamHD (loop)
    agree seed by seed, so the paired differences are rounding; pairing by position (the loop
    trains its seeds in other chunks) would pair different initialisations, differences of the
    size of the seed-to-seed spread."""
    seeds = [5, 2, 7, 0, 3, 9]
    cfg = config(optimizers=["adam_hd", "torch_adam", "adam", "optim_adam_hd"],
                 lr0=[1e-3, 3e-2], beta={"adam_hd": [0.0], "optim_adam_hd": [0.0]}, seeds=seeds,
                 chunk_size=4)
    results = run_study(cfg, progress=False)
    rows = results.statistics["paired"] + results.statistics["metrics"]["final_loss"]["peers"]
    hd_vs_base = [r for r in rows if r["base"] == "adam" and "setting" not in r]
    peer_rows = [r for r in rows if r.get("setting") and r["base"] == "torch_adam"]
    assert len(hd_vs_base) == 4 and len(peer_rows) == 4  # 2 HD × (2 α0 | best, worst)
    for row in hd_vs_base + peer_rows:
        assert row["seeds"] == sorted(seeds) and row["paired_by"] == "seed" and row["n"] == 6
        assert abs(row["median_difference"]) < 1e-10
    # best and worst are each optimizer's own: the same α0 here (the same trajectories)
    assert {(r["setting"], r["lr0"], r["base_lr0"]) for r in peer_rows} == {
        ("best", 3e-2, 3e-2), ("worst", 1e-3, 1e-3)}
    # a wrong pairing changes the verdict: pairing by position in the runs as listed
    hd = [r.final for r in results.runs if r.optimizer == "optim_adam_hd" and r.lr0 == 3e-2]
    base = [r.final for r in results.runs if r.optimizer == "adam" and r.lr0 == 3e-2]
    shifted = stats.paired_test("x", "y", 3e-2, 0.0, np.array(hd), np.array(base[1:] + base[:1]))
    assert abs(shifted["median_difference"]) > 1e-3
    # the statistics do not depend on the order of the runs (the loop's may differ)
    results.runs.reverse()
    assert stats.peer_comparisons(results) == results.statistics["metrics"]["final_loss"]["peers"]
    assert stats.paired_comparisons(results) == results.statistics["paired"]


def test_peer_comparisons_take_each_methods_own_best_and_worst():
    """Against the medians computed here: best = the grid value of lowest median final loss."""
    cfg = config(optimizers=["adam_hd", "torch_sgd"], lr0=[1e-3, 1e-1],
                 lr0_by_optimizer={"torch_sgd": [1e-2, 3e-1, 3.0]}, seeds=[0, 1, 2])
    results = run_study(cfg, progress=False)
    rows = results.statistics["metrics"]["final_loss"]["peers"]

    def medians(label, grid, beta):
        return {lr0: np.median([r.final for r in results.runs if r.optimizer == label
                                and r.lr0 == lr0 and r.beta == beta]) for lr0 in grid}

    hd = medians("adam_hd", [1e-3, 1e-1], 1e-7)
    sgd = medians("torch_sgd", [1e-2, 3e-1, 3.0], 0.0)
    best = {r["setting"]: (r["lr0"], r["base_lr0"]) for r in rows}
    assert best["best"] == (min(hd, key=hd.get), min(sgd, key=sgd.get))
    assert best["worst"] == (max(hd, key=hd.get), max(sgd, key=sgd.get))
    lines = [line.split() for line in stats.format_table(results.statistics).splitlines()
             if line.startswith("adam_hd vs torch_sgd")]
    # columns: pair (3 words), setting, HD lr0, HD beta, peer lr0, ...
    assert [(w[3], float(w[4]), float(w[5]), float(w[6])) for w in lines] == [
        ("best", *best["best"][:1], 1e-7, best["best"][1]),
        ("worst", *best["worst"][:1], 1e-7, best["worst"][1])]
    spread = {r["optimizer"]: r for r in results.statistics["metrics"]["final_loss"]["sensitivity"]}
    assert spread["torch_sgd"]["settings"] == 3
    if math.isfinite(max(sgd.values())):
        assert spread["torch_sgd"]["spread"] == pytest.approx(max(sgd.values()) - min(sgd.values()))


def test_one_setting_each_prints_one_row_both():
    """With a grid of one setting on each side, the best and the worst are the same runs: the
    table prints them once, as "both", with the HD rule's β."""
    cfg = config(optimizers=["sgd_hd", "torch_adam"], lr0=[1e-2], seeds=[0, 1], beta=[3e-3])
    results = run_study(cfg, progress=False)
    rows = results.statistics["metrics"]["final_loss"]["peers"]
    assert [r["setting"] for r in rows] == ["best", "worst"]  # the statistics keep both
    lines = [line.split() for line in stats.format_table(results.statistics).splitlines()
             if line.startswith("sgd_hd vs torch_adam")]
    assert [(w[3], float(w[4]), float(w[5]), float(w[6])) for w in lines] == [
        ("both", 1e-2, 3e-3, 1e-2)]


# ----------------------------------------------------------------------------- the peers


@needs_peers
def test_schedule_free_evaluates_after_eval_and_trains_after_train():
    import schedulefree
    cfg = config(optimizers=["schedulefree_adamw"], lr0=[2e-2])
    results = run_study(cfg, progress=False)
    problem = study_problem(cfg)
    make = lambda p: schedulefree.AdamWScheduleFree(p, lr=2e-2, weight_decay=1e-3)  # noqa: E731
    for seed in cfg.seed_list:
        losses, val, final = manual_loop(problem, make, seed, 14, 32, eval_mode=True)
        np.testing.assert_allclose(curve(results, "schedulefree_adamw", 2e-2, 0.0, seed), losses,
                                   rtol=1e-12, atol=0)
        run = results.run("schedulefree_adamw", 2e-2, 0.0, seed)
        assert run.val_loss == pytest.approx(val, rel=1e-12)
        assert run.final_loss == pytest.approx(final, rel=1e-12)
    # the evaluated point (x, after eval()) is not the training point y: the test can fail
    model = problem.init_model(1).double()
    optimizer = make(model.parameters())
    optimizer.train()
    for index in minibatch_indices(1, 0, 14, problem.num_examples, 32):
        optimizer.zero_grad()
        problem.loss_fn(model(problem.inputs[index].double()), problem.targets[index]).backward()
        optimizer.step()
    with torch.no_grad():
        at_y = float(problem.loss_fn(model(problem.inputs.double()), problem.targets))
    assert abs(at_y - results.run("schedulefree_adamw", 2e-2, 0.0, 1).final_loss) > 1e-6


@needs_peers
@pytest.mark.parametrize("name", sorted(PEERS))
def test_documented_defaults_are_the_packages(name):
    info = PEERS[name]
    signature = inspect.signature(info.optimizer_class())
    assert signature.parameters[info.lr0_arg].default == info.lr0_default
    for key, value in info.defaults.items():
        assert signature.parameters[key].default == value, key


@needs_peers
def test_peer_hyperparameters_reach_the_optimizer():
    cfg = config(optimizers=[{"name": "prodigy", "d_coef": 0.5, "lr": 0.7},
                             {"name": "schedulefree_adamw", "warmup_steps": 5},
                             "dog", "dadapt_adam"], lr0=[1e-5])
    problem = study_problem(cfg)
    key = cfg.runs()[0]
    groups = {}
    for spec in cfg.optimizer_specs:
        _, optimizer = LoopTrainer(problem, spec, cfg).build(key._replace(optimizer=spec.label))
        groups[spec.name] = optimizer.param_groups[0]
    assert groups["prodigy"]["d"] == 1e-5 and groups["prodigy"]["d_coef"] == 0.5
    assert groups["prodigy"]["lr"] == 0.7 and groups["prodigy"]["weight_decay"] == 1e-3
    assert groups["schedulefree_adamw"]["lr"] == 1e-5
    assert groups["schedulefree_adamw"]["warmup_steps"] == 5
    assert groups["dog"]["reps_rel"] == 1e-5 and groups["dadapt_adam"]["d"] == 1e-5
    with pytest.raises(ValueError, match="set d0 through the study's lr0"):
        config(optimizers=[{"name": "prodigy", "d0": 1e-3}])


@needs_peers
@pytest.mark.parametrize("name", ["prodigy", "dog"])
def test_a_loop_chunk_interrupted_and_resumed_ends_identical(name, tmp_path):
    """Mid-run checkpoints hold the model's and the optimizer's state_dict (Prodigy's d and DoG's
    running sums live in the param groups)."""
    cfg = config(optimizers=[name], lr0=[1e-4], seeds=[4, 6], checkpoint_every=2)
    problem = study_problem(cfg)
    spec = cfg.optimizer_specs[0]
    keys = tuple(cfg.runs())
    whole = LoopTrainer(problem, spec, cfg).run(keys)

    class Stop:
        def __init__(self, after):
            self.left = after

        def reset(self, total):
            pass

        def update(self, n):
            self.left -= n
            if self.left < 0:
                raise KeyboardInterrupt

    checkpoint = tmp_path / "chunk.pt"
    with pytest.raises(KeyboardInterrupt):
        LoopTrainer(problem, spec, cfg).run(keys, checkpoint=checkpoint, progress=Stop(20))
    assert checkpoint.is_file()
    resumed = LoopTrainer(problem, spec, cfg).run(keys, checkpoint=checkpoint)
    np.testing.assert_array_equal(resumed.losses, whole.losses)
    np.testing.assert_array_equal(resumed.rates, whole.rates)
    np.testing.assert_array_equal(resumed.final_loss, whole.final_loss)
    np.testing.assert_array_equal(resumed.val_loss, whole.val_loss)


def test_a_missing_peer_names_the_extra(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "prodigyopt" else real(name, *a))
    cfg = config(optimizers=["adam_hd", "prodigy"])  # a study may name it; training needs it
    with pytest.raises(MissingPeerError, match=r"pip install 'hdfunc\[peers\]'"):
        run_study(cfg, progress=False)
    status = cli.main(["--problem", "classification", "--optimizers", "adam_hd,prodigy",
                       "--steps", "2", "--quiet"])
    error = capsys.readouterr().err
    assert status == 2 and error.count("\n") == 1 and "hdfunc[peers]" in error


# ----------------------------------------------------------------------------- bookkeeping


def test_state_memory_and_throughput_per_path(tmp_path):
    cfg = config(optimizers=["adam", "torch_adam"], seeds=[0, 1])
    run_study(cfg, tmp_path / "out", progress=False, plots=False)
    records = json.loads((tmp_path / "out" / "performance.json").read_text())
    paths = {r["optimizer"]: r for r in records.values()}
    problem = study_problem(cfg)
    sizes = [p.numel() for p in problem.init_model(0).parameters()]
    # torch.optim.Adam: exp_avg and exp_avg_sq (float64 here) and a float32 step per tensor
    assert paths["torch_adam"]["state_bytes"] == sum(16 * n + 4 for n in sizes)
    assert paths["torch_adam"]["path"] == "loop" and paths["adam"]["path"] == "vmap"
    assert paths["torch_adam"]["run_steps"] == 2 * 14 == paths["adam"]["run_steps"]
    model = problem.init_model(0).double()
    optimizer = torch.optim.Adam(model.parameters())
    model(problem.inputs[:4].double()).sum().backward()
    optimizer.step()
    assert optimizer_state_bytes(optimizer) == paths["torch_adam"]["state_bytes"]
    table = cli_table = None
    from hdfunc.studies.results import load_results
    table = load_results(tmp_path / "out").summary_table()
    cli_table = table.split("throughput")[1]
    assert "loop" in cli_table and "vmap" in cli_table


def test_per_optimizer_grids_and_the_command_line(tmp_path, capsys):
    with pytest.raises(ValueError, match="not an optimizer of this study"):
        config(optimizers=["adam_hd"], lr0_by_optimizer={"prodigy": [1e-6]})
    status = cli.main(["--problem", "classification", "-P", "n_samples=64", "-P", "dim=4",
                       "--optimizers", "adam_hd,torch_sgd", "--lr0", "1e-3,1e-2",
                       "--lr0-of", "torch_sgd=1e-2:1:3", "--seeds", "2", "--steps", "4",
                       "--out", str(tmp_path / "s"), "--quiet"])
    assert status == 0
    summary = json.loads((tmp_path / "s" / "summary.json").read_text())
    grids = {(r["optimizer"], r["lr0"]) for r in summary["runs"]}
    assert grids == {("adam_hd", 1e-3), ("adam_hd", 1e-2), ("torch_sgd", 1e-2),
                     ("torch_sgd", 0.1), ("torch_sgd", 1.0)}
    assert sorted(p.name for p in (tmp_path / "s" / "plots").iterdir()) == [
        "best_loss.png", "best_lr.png", "sensitivity.png"]
    assert "HD vs peer" in capsys.readouterr().out


@pytest.mark.parametrize("path", sorted((REPO / "studies").glob("peers_*.toml")),
                         ids=lambda p: p.name)
def test_the_peer_study_files_are_valid(path):
    cfg = StudyConfig.from_toml(path)
    specs = cfg.optimizer_specs
    assert len(cfg.seed_list) >= 8
    for spec in specs:
        grid = cfg.lr0_for(spec)
        assert len(grid) >= 4 and max(grid) / min(grid) == pytest.approx(1e6)  # six decades
        default = TORCH_OPTIMIZERS[spec.name].lr0_default if spec.is_torch else 1e-3
        assert any(x == pytest.approx(default) for x in grid)  # the package's default is on it
    assert any(s.is_hd for s in specs) and {"prodigy", "dadapt_adam", "schedulefree_adamw",
                                            "dog"} <= {s.name for s in specs}


def test_a_study_with_loop_and_vmap_paths_interrupted_and_resumed_is_identical(tmp_path,
                                                                                monkeypatch):
    """End to end through the files: interrupted mid-run on the loop path (after a mid-run
    checkpoint), ``resume=True`` ends with the rows and summary of an uninterrupted study."""
    cfg = config(optimizers=["adam_hd", "torch_adam", "optim_adam_hd"], seeds=[0, 1, 2],
                 checkpoint_every=2, chunk_size=2)
    run_study(cfg, tmp_path / "whole", progress=False, plots=False)
    calls = {"n": 0}
    evaluate = LoopTrainer._evaluate

    def interrupting(self, *args):
        calls["n"] += 1
        if calls["n"] == 9:  # torch_adam's first chunk (0002), seed 1, validating after step 9
            raise KeyboardInterrupt
        return evaluate(self, *args)

    monkeypatch.setattr(LoopTrainer, "_evaluate", interrupting)
    with pytest.raises(KeyboardInterrupt):
        run_study(cfg, tmp_path / "cut", progress=False, plots=False)
    assert list((tmp_path / "cut" / "checkpoints").glob("chunk-*.pt"))
    monkeypatch.setattr(LoopTrainer, "_evaluate", evaluate)
    run_study(cfg, tmp_path / "cut", resume=True, progress=False, plots=False)
    whole, cut = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("whole", "cut"))
    assert (tmp_path / "cut" / "steps.csv").read_bytes() == (tmp_path / "whole" / "steps.csv").read_bytes()
    assert cut["runs"] == whole["runs"] and cut["statistics"] == whole["statistics"]
    records = json.loads((tmp_path / "cut" / "performance.json").read_text())
    assert {k: r["resumed"] for k, r in records.items()} == {
        "0000": False, "0001": False, "0002": True, "0003": False, "0004": False, "0005": False}
