"""Studies (issue 11): epochs as torch's DataLoader defines them, the paper's per-epoch and
validation metrics, iterations to a target loss, pairing by seed, readable figures — each
checked against an independent oracle (a hand loop over a DataLoader, a direct evaluation, a
hand count, results where a wrong pairing changes the verdict)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

import hdfunc
from hdfunc.studies import StudyConfig, cli, run_study
from hdfunc.studies.config import RunKey
from hdfunc.studies.engine import epoch_permutation, study_problem
from hdfunc.studies.plots import BAND_MIN_SEEDS, median_band
from hdfunc.studies.results import (FORMAT_VERSION, RunSummary, StudyResults,
                                    iterations_to_target)
from hdfunc.studies.stats import paired_comparisons, study_statistics

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# 62 examples, 12 held out: 50 to train on in minibatches of 8 -> 7 steps per epoch, the last of 2
SMALL = {"dim": 5, "classes": 3, "n_samples": 62, "hidden": 4}


def small_config(**changes) -> StudyConfig:
    base = dict(problem="classification", problem_options=dict(SMALL), epochs=3, batch_size=8,
                seeds=[0, 3], optimizers=["sgd_hd"], lr0=[5e-2], beta=[1e-2],
                validation_fraction=0.2, log_every=1)
    base.update(changes)
    return StudyConfig(**base)


def test_epochs_are_dataloader_epochs():
    """⌈N/B⌉ steps per epoch by default (torch's drop_last=False); ⌊N/B⌋ with drop_last."""
    paper = StudyConfig(problem="logreg", epochs=60)
    assert paper.steps_per_epoch(10_000) == 79 and paper.num_steps(10_000) == 4740
    assert len(DataLoader(range(10_000), batch_size=128)) == 79  # the oracle
    dropped = StudyConfig(problem="logreg", epochs=60, drop_last=True)
    assert dropped.steps_per_epoch(10_000) == 78 and dropped.num_steps(10_000) == 4680
    assert len(DataLoader(range(10_000), batch_size=128, drop_last=True)) == 78
    assert StudyConfig(epochs=2.5, batch_size=8).num_steps(50) == 18  # 7 + 7 + half of 7, up
    assert StudyConfig(epochs=1, batch_size=8).num_steps(64) == 8


def dataloader_oracle(problem, rule, seed: int, epochs: int, batch_size: int):
    """The run trained as a plain PyTorch script would: a DataLoader over the training set with
    the seed's permutation of each epoch as its sampler (drop_last=False), autograd gradients,
    the core rule; the per-epoch means and the validation set evaluated directly after each
    epoch."""
    torch.manual_seed(seed)
    model = problem.build_model()
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    state = rule.init(params)
    dataset = TensorDataset(problem.inputs, problem.targets)
    steps, epoch_loss, epoch_lr, val_loss, val_acc = [], [], [], [], []
    for epoch in range(epochs):
        order = epoch_permutation(seed, epoch, problem.num_examples).tolist()
        loader = DataLoader(dataset, batch_size=batch_size, sampler=order, drop_last=False)
        losses, rates = [], []
        for x, y in loader:
            p = {k: v.clone().requires_grad_(True) for k, v in params.items()}
            loss = problem.loss_fn(functional_call(model, p, (x,)), y)
            grads = dict(zip(p, torch.autograd.grad(loss, list(p.values()))))
            updates, state = rule.update(grads, state, params)
            params = hdfunc.apply_updates(params, updates)
            losses.append(loss.item())
            rates.append(hdfunc.get_lr(state).item())
        steps += losses
        epoch_loss.append(sum(losses) / len(losses))
        epoch_lr.append(sum(rates) / len(rates))
        with torch.no_grad():
            out = functional_call(model, params, (problem.val_inputs,))
            val_loss.append(problem.loss_fn(out, problem.val_targets).item())
            val_acc.append((out.argmax(-1) == problem.val_targets).double().mean().item())
    with torch.no_grad():
        final = problem.loss_fn(functional_call(model, params, (problem.inputs,)),
                                problem.targets).item()
    return np.array(steps), epoch_loss, epoch_lr, val_loss, val_acc, final


def test_epoch_and_validation_metrics_equal_a_dataloader_loop(tmp_path):
    config = small_config()
    problem = study_problem(config)
    # the held-out split: disjoint, complete, fixed
    assert problem.num_examples == 50 and problem.num_validation == 12
    rows = {tuple(r.tolist()) for r in torch.cat([problem.inputs, problem.val_inputs])}
    assert len(rows) == 62
    results = run_study(config, tmp_path / "out", progress=False, plots=False)
    assert list(results.steps) == list(range(1, 22))  # 3 epochs × 7 steps
    for seed in config.seed_list:
        rule = hdfunc.RULES["sgd_hd"](5e-2, 1e-2, weight_decay=1e-4)
        steps, epoch_loss, epoch_lr, val_loss, val_acc, final = dataloader_oracle(
            problem, rule, seed, 3, 8)
        key = RunKey("sgd_hd", 5e-2, 1e-2, seed)
        np.testing.assert_allclose(results.curves[key][0], steps, rtol=1e-5, atol=1e-6)
        run = results.run(*key)
        metrics = run.epoch_metrics
        assert metrics["step"] == [7, 14, 21] and run.epochs == 3
        np.testing.assert_allclose(metrics["train_loss"], epoch_loss, rtol=1e-5)
        np.testing.assert_allclose(metrics["lr"], epoch_lr, rtol=1e-5)
        np.testing.assert_allclose(metrics["val_loss"], val_loss, rtol=1e-5)
        np.testing.assert_allclose(metrics["val_accuracy"], val_acc, rtol=1e-12)
        assert run.epoch_loss == pytest.approx(epoch_loss[-1], rel=1e-5)
        assert run.val_loss == pytest.approx(val_loss[-1], rel=1e-5)
        assert run.best_val_loss == pytest.approx(min(val_loss), rel=1e-5)
        assert run.final_loss == pytest.approx(final, rel=1e-5)
    # the CSV carries the epoch of each step; the summary the format and metrics
    lines = (tmp_path / "out" / "steps.csv").read_text().splitlines()
    assert lines[0] == "optimizer,lr0,beta,seed,step,epoch,loss,lr"
    assert [line.split(",")[5] for line in lines[1:22]] == ["1"] * 7 + ["2"] * 7 + ["3"] * 7
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["format"] == FORMAT_VERSION == 3
    assert set(summary["statistics"]["metrics"]) >= {"final_loss", "epoch_loss", "val_loss",
                                                     "val_accuracy"}
    assert not (tmp_path / "out" / "checkpoints").exists()  # no empty folder left behind


def test_resume_mid_epoch_keeps_the_validation_metrics(tmp_path):
    """A chunk interrupted after its first checkpoint (step 10: one epoch validated, the second
    half done) resumes to the same losses and epoch metrics as an uninterrupted one."""
    from hdfunc.studies.engine import BatchedTrainer
    config = small_config(checkpoint_every=10)
    problem = study_problem(config)
    keys = tuple(config.runs())
    whole = BatchedTrainer(problem, config.optimizer_specs[0], config).run(keys)
    checkpoint = tmp_path / "c.pt"
    stopped = BatchedTrainer(problem, config.optimizer_specs[0], config)
    save = stopped._save

    def save_then_interrupt(*args):
        save(*args)
        raise KeyboardInterrupt

    stopped._save = save_then_interrupt
    with pytest.raises(KeyboardInterrupt):
        stopped.run(keys, checkpoint=checkpoint)
    resumed = BatchedTrainer(problem, config.optimizer_specs[0], config).run(keys, checkpoint=checkpoint)
    np.testing.assert_allclose(resumed.losses, whole.losses, rtol=1e-6)
    np.testing.assert_allclose(resumed.val_loss, whole.val_loss, rtol=1e-6)
    np.testing.assert_allclose(resumed.val_accuracy, whole.val_accuracy, rtol=1e-12)
    assert np.all(np.isfinite(resumed.val_loss))


def test_iterations_to_target_is_a_hand_count():
    losses = np.array([5.0, 4.0, 3.0, 2.0, 1.0, 1.0])
    # trailing means over 2 steps: 5, 4.5, 3.5, 2.5, 1.5, 1.0
    assert iterations_to_target(losses, 2.5, 2) == 4
    assert iterations_to_target(losses, 2.4, 2) == 5
    assert iterations_to_target(losses, 5.0, 2) == 1
    assert iterations_to_target(losses, 0.5, 2) is None
    assert iterations_to_target(losses, 3.0, 1) == 3
    assert iterations_to_target(np.array([3.0, np.nan, 0.1]), 1.0, 1) is None  # diverged
    # in a study: the hand count over the logged (every step) minibatch losses
    config = small_config(target_loss=0.9, target_window=4, seeds=[0, 1, 2], epochs=4)
    results = run_study(config, progress=False)
    counted = 0
    for run in results.runs:
        curve = results.curves[run.key][0]
        expected = None
        for t in range(1, len(curve) + 1):
            window = curve[max(0, t - 4):t]
            if sum(window) / len(window) <= 0.9:
                expected = t
                break
        assert run.iterations_to_target == expected
        counted += expected is not None
    assert counted >= 1  # the target is reached somewhere
    assert "iterations_to_target" in results.statistics["metrics"]


def fake_results(base: dict[int, float], hd: dict[int, float], order=None) -> StudyResults:
    config = StudyConfig(problem="classification", optimizers=["sgd", "sgd_hd"], lr0=[1e-3],
                         beta=[1e-3], seeds=sorted(base), steps=10)
    runs = [RunSummary("sgd", 1e-3, 0.0, s, v, v, 1e-3, False, None) for s, v in base.items()]
    runs += [RunSummary("sgd_hd", 1e-3, 1e-3, s, v, v, 1e-3, False, None) for s, v in hd.items()]
    if order is not None:
        runs = [runs[i] for i in order]
    return StudyResults(config, "fake", runs, np.zeros(0, dtype=np.int64))


def test_pairing_is_by_seed_and_a_wrong_pairing_changes_the_verdict():
    """HD beats the base run of its own seed on every seed, by 1, while the seeds themselves
    differ by 10: pairing HD seed s with base seed 7 - s (the reversed order) would give 4/8."""
    base = {s: 10.0 * s + 1.0 for s in range(8)}
    hd = {s: 10.0 * s for s in range(8)}
    for order in (None, list(range(15, -1, -1)), [3, 9, 0, 12, 7, 1, 15, 4, 2, 8, 10, 5, 14, 6, 11, 13]):
        row = paired_comparisons(fake_results(base, hd, order))[0]
        assert (row["hd_better"], row["base_better"], row["n"]) == (8, 0, 8)
        assert row["median_difference"] == -1.0 and row["sign_test_p"] == pytest.approx(2 ** -8)
        assert row["paired_by"] == "seed" and row["seeds"] == list(range(8))
    wrong = {s: hd[7 - s] for s in range(8)}  # what the mutation would compare
    row = paired_comparisons(fake_results(base, wrong))[0]
    assert row["hd_better"] == 4 and row["sign_test_p"] > 0.5
    # a seed missing on one side is left out, never paired with another seed
    row = paired_comparisons(fake_results(base, {s: v for s, v in hd.items() if s != 3}))[0]
    assert row["n"] == 7 and row["seeds"] == [0, 1, 2, 4, 5, 6, 7] and row["hd_better"] == 7


def test_pairing_survives_the_files(tmp_path):
    """End to end: in a real study the paired row lists the seeds, and editing one base run's
    final loss on disk changes exactly that seed's comparison."""
    config = small_config(optimizers=["sgd", "sgd_hd"], seeds=[0, 1, 2, 3], epochs=1)
    results = run_study(config, tmp_path / "s", progress=False, plots=False)
    row = results.statistics["paired"][0]
    assert row["seeds"] == [0, 1, 2, 3] and row["paired_by"] == "seed"
    hd = results.final_losses("sgd_hd", 5e-2, 1e-2)
    base = results.final_losses("sgd", 5e-2)
    expected = sum(hd[s] < base[s] for s in hd)
    assert row["hd_better"] == expected
    flipped = dict(base)
    flipped[2] = hd[2] - 1.0 if hd[2] < base[2] else hd[2] + 1.0  # reverse seed 2's verdict
    runs = [RunSummary(**{**r.__dict__, "final_loss": flipped[r.seed]})
            if r.optimizer == "sgd" else r for r in results.runs]
    edited = StudyResults(results.config, "", runs, results.steps)
    assert paired_comparisons(edited)[0]["hd_better"] == expected + (1 if hd[2] > base[2] else -1)


def test_accuracy_is_higher_better_and_diverged_runs_are_worst():
    config = StudyConfig(problem="classification", optimizers=["sgd", "sgd_hd"], lr0=[1e-3],
                         beta=[1e-3], seeds=3, steps=10)
    runs = [RunSummary("sgd", 1e-3, 0.0, s, 1.0, 1.0, 1e-3, False, None, val_accuracy=0.5,
                       epoch_metrics={"val_accuracy": [0.5]}) for s in range(3)]
    runs += [RunSummary("sgd_hd", 1e-3, 1e-3, s, 1.0, 1.0, 1e-3, s == 2, None,
                        val_accuracy=0.7 if s < 2 else None, epoch_metrics={"val_accuracy": [0.7]})
             for s in range(3)]
    results = StudyResults(config, "", runs, np.zeros(0, dtype=np.int64))
    row = paired_comparisons(results, "val_accuracy")[0]
    assert (row["hd_better"], row["base_better"]) == (2, 1)  # the diverged HD run counts as worse
    assert row["median_difference"] == pytest.approx(0.2)
    results.statistics = study_statistics(results)
    table = results.statistics["metrics"]["val_accuracy"]["table"]
    assert table[1]["median"] == pytest.approx(0.7)
    text = results.summary_table("val_accuracy")
    assert "HD higher" in text and "beta" in text


def test_table_shows_beta_on_every_row(tmp_path):
    config = small_config(optimizers=["sgd", "sgd_hd"], beta=[1e-2, 1e-3], seeds=[0, 1], epochs=1)
    results = run_study(config, progress=False)
    lines = results.summary_table().splitlines()
    paired = [line for line in lines if line.startswith("sgd_hd vs sgd")]
    assert len(paired) == 2 and len(set(paired)) == 2
    assert "1e-02" in paired[0] and "1e-03" in paired[1]


def test_median_band_only_with_enough_seeds_and_inside_the_data():
    rng = np.random.default_rng(0)
    few = rng.normal(size=(2, 50))
    median, low, high = median_band(few)
    assert low is None and high is None
    np.testing.assert_allclose(median, np.median(few, axis=0))
    many = rng.normal(size=(BAND_MIN_SEEDS, 50))
    median, low, high = median_band(many)
    assert np.all(low <= median + 1e-12) and np.all(median <= high + 1e-12)
    assert np.all(low >= many.min(axis=0)) and np.all(high <= many.max(axis=0))


def test_figures_are_large_and_plot_only_redraws_them(tmp_path, capsys):
    from PIL import Image
    config = small_config(optimizers=["sgd", "sgd_hd"], lr0=[1e-2, 5e-2], beta=[1e-2, 1e-3],
                          seeds=[0, 1], epochs=2, target_loss=1.0, name="small")
    run_study(config, tmp_path / "s", progress=False)
    plots = tmp_path / "s" / "plots"
    names = sorted(p.name for p in plots.glob("*.png"))
    assert names == ["epochs.png", "final_vs_lr0.png", "grid_sgd_hd.png", "loss.png", "lr.png"]
    for path in plots.glob("*.png"):
        assert Image.open(path).size[0] >= 1000, path
        path.unlink()
    status = cli.main(["--plot-only", str(tmp_path / "s"), "--metric", "val_loss"])
    out = capsys.readouterr().out
    assert status == 0 and "median validation loss" in out
    assert sorted(p.name for p in plots.glob("*.png")) == names
    assert cli.main(["--plot-only", str(tmp_path / "nothing")]) == 2
    assert cli.main(["--plot-only", str(tmp_path / "s"), "--metric", "nonsense"]) == 2


def test_symlog_when_the_rate_goes_negative():
    import matplotlib.pyplot as plt
    from hdfunc.studies.plots import _set_value_scale
    fig, ax = plt.subplots()
    ax.plot([1, 2, 3], [1e-3, 1e-2, -1e-4])
    _set_value_scale(ax, np.array([1e-3, 1e-2, -1e-4]))
    assert ax.get_yscale() == "symlog"
    fig2, ax2 = plt.subplots()
    ax2.plot([1, 2], [1e-3, 1e-2])
    _set_value_scale(ax2, np.array([1e-3, 1e-2]))
    assert ax2.get_yscale() == "log"
    plt.close(fig2)
    plt.close(fig)


def test_mnist_trains_on_60k_and_validates_on_the_test_split(tmp_path):
    from test_studies import write_idx
    rng = np.random.default_rng(1)
    for stem, n in (("train", 40), ("t10k", 12)):
        write_idx(tmp_path / f"{stem}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), False)
        write_idx(tmp_path / f"{stem}-labels-idx1-ubyte", rng.integers(0, 10, n, dtype=np.uint8), False)
    config = StudyConfig(problem="logreg", problem_options={"data_dir": str(tmp_path)},
                         optimizers=["sgd"], seeds=1, epochs=1, batch_size=16)
    problem = study_problem(config)
    assert problem.num_examples == 40 and problem.num_validation == 12
    assert config.num_steps(problem.num_examples) == 3  # 16 + 16 + 8
    none = study_problem(StudyConfig(**{**config.to_dict(), "validation_fraction": 0}))
    assert none.num_validation == 0
    results = run_study(config, progress=False)
    assert len(results.runs[0].epoch_metrics["val_loss"]) == 1


def test_old_format_folders_load_and_refuse_to_resume(tmp_path):
    from hdfunc.studies.storage import read_summary, write_summary
    config = small_config(epochs=1, seeds=[0])
    run_study(config, tmp_path / "s", progress=False, plots=False)
    summary = read_summary(tmp_path / "s" / "summary.json", "")
    summary["format"] = 2
    write_summary(tmp_path / "s" / "summary.json", summary)
    with pytest.raises(Exception, match="format 2, this hdfunc writes format 3"):
        run_study(config, tmp_path / "s", resume=True, progress=False)


def test_command_line_options_of_issue_11():
    args = cli.build_parser().parse_args(
        ["--problem", "classification", "--epochs", "2", "--drop-last", "--validation-fraction",
         "0.25", "--target-loss", "0.5", "--target-window", "7", "--metric", "val_loss"])
    config = cli.config_from_args(args)
    assert (config.drop_last, config.validation_fraction, config.target_loss,
            config.target_window, config.metric, config.epochs) == (True, 0.25, 0.5, 7, "val_loss", 2.0)
    assert config.identity() == StudyConfig(**{**config.to_dict(), "metric": "final_loss"}).identity()
    with pytest.raises(ValueError, match="unknown metric"):
        StudyConfig(metric="accuracy", steps=1)
    with pytest.raises(ValueError, match="validation_fraction"):
        StudyConfig(validation_fraction=1.5, steps=1)
