"""Studies: batched runs equal single runs (against independent oracles), data, stats, CLI."""

from __future__ import annotations

import dataclasses
import gzip
import json
import math
import pickle
import struct

import numpy as np
import pytest
import torch
from torch.func import functional_call
from torch.nn import functional as F

import hdfunc
from hdfunc.studies import (StudyConfig, make_problem, minibatch_indices,
                            parse_optimizer, run_study)
from hdfunc.studies import cli, data, stats
from hdfunc.studies.engine import BatchedTrainer

TINY = {"dim": 6, "classes": 3, "n_samples": 96, "hidden": 5}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_config(**changes) -> StudyConfig:
    base = dict(problem="classification", problem_options=dict(TINY), steps=12, batch_size=16,
                seeds=[0, 1, 2], optimizers=["sgdn_hd", "adam_hd"], lr0=[1e-2], beta=[1e-3],
                eval_final=True)
    base.update(changes)
    return StudyConfig(**base)


def oracle_run(problem, rule, seed: int, steps: int, batch_size: int):
    """One run without vmap or stacking: autograd gradients, the core rule, the seed's init and
    minibatches. Returns per-step losses and applied rates."""
    torch.manual_seed(seed)
    model = problem.build_model()
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    state = rule.init(params)
    losses, rates = [], []
    for t in range(steps):
        idx = minibatch_indices(seed, t, 1, problem.num_examples, batch_size)[0]
        p = {k: v.clone().requires_grad_(True) for k, v in params.items()}
        loss = problem.loss_fn(functional_call(model, p, (problem.inputs[idx],)), problem.targets[idx])
        grads = dict(zip(p, torch.autograd.grad(loss, list(p.values()))))
        updates, state = rule.update(grads, state, params)
        params = hdfunc.apply_updates(params, updates)
        losses.append(loss.item())
        rates.append(hdfunc.get_lr(state).item())
    return np.array(losses), np.array(rates), params


@pytest.mark.parametrize("name", ["sgdn_hd", "adam_hd", "sgd"])
def test_batched_grid_equals_single_unbatched_runs(name):
    """A batch mixing seeds, α_0 and β gives each run the trajectory of that run alone."""
    config = tiny_config(optimizers=[name], lr0=[3e-2, 1e-2], beta=[1e-3, 1e-2], seeds=[0, 2])
    problem = make_problem(config.problem, **config.problem_options)
    spec = config.optimizer_specs[0]
    keys = tuple(config.runs())
    result = BatchedTrainer(problem, spec, config).run(keys)
    assert len(keys) == (8 if spec.is_hd else 4)
    for i, key in enumerate(keys):
        kwargs = {"weight_decay": 1e-4, **({"momentum": 0.9} if name == "sgdn_hd" else {})}
        rule = (hdfunc.RULES[name](key.lr0, key.beta, **kwargs) if spec.is_hd
                else hdfunc.RULES[name](key.lr0, **kwargs))
        losses, rates, _ = oracle_run(problem, rule, key.seed, config.steps, config.batch_size)
        np.testing.assert_allclose(result.losses[i], losses, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(result.rates[i], rates, rtol=1e-5, atol=1e-9)
    if spec.is_hd:  # HD really adapted the rate, differently per β
        assert not np.allclose(result.rates[0], result.rates[1])


def test_study_adam_matches_torch_optim():
    """Whole pipeline (init, minibatch order, loss, coupled weight decay) against torch.optim.Adam."""
    config = tiny_config(optimizers=["adam"], seeds=[0, 1, 2], steps=10, weight_decay=1e-2)
    results = run_study(config, progress=False)
    problem = make_problem(config.problem, **config.problem_options)
    for seed in (1, 2):
        torch.manual_seed(seed)
        model = problem.build_model()
        opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-2)
        losses = []
        for t in range(config.steps):
            idx = minibatch_indices(seed, t, 1, problem.num_examples, config.batch_size)[0]
            loss = problem.loss_fn(model(problem.inputs[idx]), problem.targets[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        with torch.no_grad():
            final = problem.loss_fn(model(problem.inputs), problem.targets).item()
        curve = results.curves[("adam", 1e-2, 0.0, seed)][0]
        np.testing.assert_allclose(curve, losses, rtol=1e-5, atol=1e-6)
        assert results.run("adam", 1e-2, 0.0, seed).final_loss == pytest.approx(final, rel=1e-5)


def test_seed_k_alone_equals_seed_k_in_a_batch():
    batched = run_study(tiny_config(seeds=[0, 1, 2, 3]), progress=False)
    alone = run_study(tiny_config(seeds=[2]), progress=False)
    for key, (loss, lr) in alone.curves.items():
        np.testing.assert_allclose(batched.curves[key][0], loss, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(batched.curves[key][1], lr, rtol=1e-5, atol=1e-12)
    assert len(batched.curves) == 8 and len(alone.curves) == 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_vmap_cross_entropy_is_f_cross_entropy_under_vmap_bit_for_bit(dtype):
    """The engine's cross-entropy under vmap (problems.vmap_loss) gives exactly the losses and
    gradients of F.cross_entropy under vmap (torch's nll_loss decomposition), for batches of any
    size (a mean over 40 or 71 is not a power of two) and batched or shared targets."""
    from torch.func import grad_and_value, vmap

    from hdfunc.studies.problems import vmap_loss
    problem = make_problem("classification", **TINY)
    fast = vmap_loss(problem.loss_fn)
    assert fast is not problem.loss_fn
    assert vmap_loss(make_problem("quadratic", dim=3, n_samples=8).loss_fn).__name__ == \
        "_half_squared_error"  # other losses as they are
    g = torch.Generator().manual_seed(0)
    for runs, batch, classes in [(3, 128, 10), (4, 40, 10), (2, 71, 3), (5, 16, 7), (3, 1, 4)]:
        w = torch.randn(runs, classes, 9, generator=g, dtype=dtype)
        x = 3 * torch.randn(runs, batch, 9, generator=g, dtype=dtype)
        y = torch.randint(0, classes, (runs, batch), generator=g)

        def loss(fn):
            return lambda w_, x_, y_: fn(x_ @ w_.T, y_)

        for shared in (False, True):  # each run its own minibatch (training), or one for all
            xs, ys = (x[0], y[0]) if shared else (x, y)
            in_dims = (0, None, None) if shared else (0, 0, 0)
            ref_grad, ref_loss = vmap(grad_and_value(loss(F.cross_entropy)), in_dims)(w, xs, ys)
            new_grad, new_loss = vmap(grad_and_value(loss(fast)), in_dims)(w, xs, ys)
            assert torch.equal(new_loss, ref_loss) and torch.equal(new_grad, ref_grad)
            # and run 0's loss is the fused kernel's outside vmap (summed in another order)
            first = F.cross_entropy(x[0] @ w[0].T, y[0])
            torch.testing.assert_close(new_loss[0], first, rtol=1e-6, atol=0)


def test_minibatch_order_is_a_fresh_permutation_each_epoch():
    n, b = 50, 8  # drop_last: 6 full batches per epoch, 2 examples unused
    idx = torch.stack(minibatch_indices(7, 0, 18, n, b, drop_last=True))
    for epoch in range(3):
        block = idx[6 * epoch:6 * (epoch + 1)].reshape(-1)
        assert block.unique().numel() == 48
    assert not torch.equal(idx[:6], idx[6:12])
    assert torch.equal(torch.stack(minibatch_indices(7, 5, 4, n, b, drop_last=True)), idx[5:9])
    assert not torch.equal(torch.stack(minibatch_indices(8, 0, 6, n, b, drop_last=True)), idx[:6])
    with pytest.raises(ValueError, match="larger than the dataset"):
        minibatch_indices(0, 0, 1, 4, 8, drop_last=True)
    # default (torch DataLoader's drop_last=False): 7 steps per epoch, the last of 2 examples,
    # every example exactly once per epoch, reshuffled each epoch
    rows = minibatch_indices(7, 0, 21, n, b)
    assert [len(r) for r in rows] == [8] * 6 + [2] + [8] * 6 + [2] + [8] * 6 + [2]
    for epoch in range(3):
        assert sorted(torch.cat(rows[7 * epoch:7 * (epoch + 1)]).tolist()) == list(range(n))
    assert not torch.equal(torch.cat(rows[:7]), torch.cat(rows[7:14]))
    assert [len(r) for r in minibatch_indices(0, 0, 1, 4, 8)] == [4]  # one small batch


def test_init_is_the_seed_and_leaves_the_global_rng_alone():
    problem = make_problem("classification", **TINY)
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    p1 = problem.init_params(5)
    after = torch.rand(1)
    assert torch.equal(before, after)
    torch.manual_seed(5)
    model = problem.build_model()
    for name, value in model.named_parameters():
        assert torch.equal(p1[name], value.detach())


def test_divergence_is_recorded_not_raised(tmp_path):
    config = StudyConfig(problem="quadratic", problem_options={"dim": 4, "n_samples": 64},
                         optimizers=["sgd", "sgd_hd"], lr0=[1e3, 1e-3], seeds=2, steps=30,
                         batch_size=16)
    results = run_study(config, tmp_path / "out", progress=False)
    blown = results.run("sgd", 1e3, 0.0, 0)
    assert blown.diverged and blown.final_loss is None and blown.diverged_step >= 2
    fine = results.run("sgd", 1e-3, 0.0, 0)
    assert not fine.diverged and math.isfinite(fine.final_loss)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["complete"]
    row = next(r for r in summary["statistics"]["final_loss"] if r["lr0"] == 1e3 and r["optimizer"] == "sgd")
    assert row["diverged"] == 2 and row["median"] is None
    assert "nan" in (tmp_path / "out" / "steps.csv").read_text() or "inf" in (tmp_path / "out" / "steps.csv").read_text()
    assert (tmp_path / "out" / "plots" / "final_vs_lr0.png").is_file()
    assert "inf" in results.summary_table()


# ----------------------------------------------------------------------------- data


def write_idx(path, array: np.ndarray, compress: bool) -> None:
    code = {np.uint8: 0x08}[array.dtype.type]
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.tobytes()
    if compress:
        with gzip.open(path, "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


@pytest.mark.parametrize("compress", [True, False])
def test_mnist_idx_reader_and_normalisation(tmp_path, compress):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (20, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, 20, dtype=np.uint8)
    suffix = ".gz" if compress else ""
    write_idx(tmp_path / f"t10k-images-idx3-ubyte{suffix}", images, compress)
    write_idx(tmp_path / f"t10k-labels-idx1-ubyte{suffix}", labels, compress)
    dataset = data.load_mnist(tmp_path)
    assert dataset.name == "mnist-test" and len(dataset) == 20
    expected = (images.reshape(20, -1) / 255.0 - 0.1307) / 0.3081
    np.testing.assert_allclose(dataset.inputs.numpy(), expected, rtol=1e-5, atol=1e-6)
    assert dataset.labels.tolist() == labels.tolist()
    problem = make_problem("logreg", data_dir=str(tmp_path))
    assert problem.num_parameters() == 7850


def test_missing_and_corrupt_data_errors_name_the_folder(tmp_path):
    with pytest.raises(data.DatasetError, match=str(tmp_path)):
        data.load_mnist(tmp_path)
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(bytes([0, 0, 8, 3]) + struct.pack(">3I", 5, 28, 28) + b"x")
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", 5) + b"12345")
    with pytest.raises(data.DatasetError, match="corrupt or truncated"):
        data.load_mnist(tmp_path)
    with pytest.raises(data.DatasetError, match="CIFAR-10"):
        data.load_cifar10(tmp_path)
    assert cli.main(["--problem", "mlp", "--data-dir", str(tmp_path / "nowhere"), "--steps", "1",
                     "--quiet"]) == 2


def test_cifar10_batches_and_vgg_problem_train(tmp_path):
    rng = np.random.default_rng(1)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (8, 3072), dtype=np.uint8),
                 b"labels": rng.integers(0, 10, 8).tolist()}
        (folder / name).write_bytes(pickle.dumps(batch))
    dataset = data.load_cifar10(tmp_path)
    assert dataset.inputs.shape == (40, 3, 32, 32)
    first = pickle.loads((folder / "data_batch_1").read_bytes())[b"data"][0].reshape(3, 32, 32)
    expected = (first / 255.0 - np.array(data.CIFAR10_MEAN)[:, None, None]) / np.array(data.CIFAR10_STD)[:, None, None]
    np.testing.assert_allclose(dataset.inputs[0].numpy(), expected, rtol=1e-5, atol=1e-5)
    config = StudyConfig(problem="vgg", problem_options={"config": "vgg11", "width_divisor": 32,
                                                         "data_dir": str(tmp_path)},
                         optimizers=["sgdn_hd"], seeds=2, steps=3, batch_size=8)
    results = run_study(config, progress=False)
    assert all(not r.diverged for r in results.runs) and len(results.runs) == 2


# ----------------------------------------------------------------------------- stats, config, CLI


def test_stats_against_closed_forms():
    values = np.array([3.0, 1.0, 2.0, 10.0, 4.0])
    median, low, high = stats.median_ci(values)
    assert median == 3.0 and 1.0 <= low <= 3.0 <= high <= 10.0
    median, low, high = stats.median_ci(np.array([1.0, math.inf, math.inf]))
    assert median == math.inf and high == math.inf
    row = stats.paired_test("h", "b", 1e-3, 1e-3, np.arange(8.0), np.arange(8.0) + 1)
    assert row["hd_better"] == 8 and row["sign_test_p"] == pytest.approx(0.5 ** 8)
    assert row["wilcoxon_p"] == pytest.approx(0.5 ** 8) and row["median_difference"] == -1.0
    row = stats.paired_test("h", "b", 1e-3, 1e-3, np.array([1.0, math.inf]), np.array([math.inf, 2.0]))
    assert (row["hd_better"], row["base_better"], row["wilcoxon_p"]) == (1, 1, None)


def test_config_validation_and_optimizer_specs(tmp_path):
    spec = parse_optimizer("sgd_hd:mode=multiplicative:lr_bounds=(0,1)")
    assert spec.is_hd and spec.base_name == "sgd" and spec.kwargs() == {"mode": "multiplicative", "lr_bounds": (0, 1)}
    with pytest.raises(ValueError, match="unknown optimizer"):
        StudyConfig(optimizers=["sgdd"], steps=1)
    with pytest.raises(ValueError, match="exactly one of steps and epochs"):
        StudyConfig()
    with pytest.raises(ValueError, match="lr0"):
        StudyConfig(lr0=[-1.0], steps=1)
    with pytest.raises(ValueError, match="unknown option"):
        make_problem("classification", hidn=3)
    assert StudyConfig(steps=1, lr0="1e-6:1e-1:6").lr0 == [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1]
    assert StudyConfig(steps=1, beta="1e-4:1e-2:3").beta == [1e-4, 1e-3, 1e-2]
    args = cli.build_parser().parse_args(["--lr0", "1e-3:1e-1:5", "--threads", "1"])
    assert cli.config_from_args(args).lr0 == pytest.approx([1e-3, 10**-2.5, 1e-2, 10**-1.5, 1e-1])
    with pytest.raises(ValueError, match="low:high:n"):
        StudyConfig(steps=1, lr0="1e-3:1e-1")
    with pytest.raises(ValueError, match="threads"):
        StudyConfig(steps=1, threads=0)
    with pytest.raises(ValueError, match="unknown device"):
        run_study(tiny_config(device="gpu0"), progress=False)
    config = StudyConfig(steps=1, beta={"sgd_hd": [1e-2, 1e-3]})
    assert config.betas_for(config.optimizer_specs[1]) == [1e-2, 1e-3]
    assert config.betas_for(config.optimizer_specs[3]) == [1e-7]  # the paper's Adam-HD β
    toml = tmp_path / "study.toml"
    toml.write_text('problem = "quadratic"\nseeds = [1, 4]\nepochs = 2\nbatch_size = 32\n'
                    'optimizers = ["sgd", {name = "sgd_hd", mode = "multiplicative", label = "sgd_hd_mult"}]\n'
                    '[problem_options]\nn_samples = 128\ndim = 3\n')
    args = cli.build_parser().parse_args(["--config", str(toml), "--lr0", "1e-2,1e-3", "--beta", "0.02"])
    config = cli.config_from_args(args)
    assert config.seed_list == [1, 4] and config.num_steps(128) == 8 and config.lr0 == [1e-2, 1e-3]
    assert [s.label for s in config.optimizer_specs] == ["sgd", "sgd_hd_mult"]
    results = run_study(config, progress=False)
    rate = results.curves[("sgd_hd_mult", 1e-2, 0.02, 4)][1]
    assert rate[0] == pytest.approx(1e-2) and rate[-1] != pytest.approx(1e-2)


def test_refuses_to_overwrite_or_resume_a_different_study(tmp_path):
    config = tiny_config(optimizers=["sgd"], steps=3, seeds=1)
    run_study(config, tmp_path, progress=False, plots=False)
    with pytest.raises(FileExistsError, match="--resume"):
        run_study(config, tmp_path, progress=False)
    with pytest.raises(ValueError, match="different study"):
        run_study(dataclasses.replace(config, steps=4), tmp_path, resume=True, progress=False)
    again = run_study(config, tmp_path, resume=True, progress=False, plots=False)  # nothing to do
    assert len(again.runs) == 1


def test_cpu_chunks_keep_the_stacked_parameters_small(monkeypatch):
    """On a CPU a chunk holds at most CPU_CHUNK_PARAMETER_BYTES of stacked parameters (the vmapped
    step slows down past it); on other devices only the memory bounds it."""
    from hdfunc.studies import engine
    config = tiny_config(optimizers=["sgd_hd"], seeds=list(range(8)), lr0=[1e-2], beta=[1e-3])
    problem = make_problem(config.problem, **config.problem_options)
    assert engine.choose_chunk_size(config, problem, torch.device("cpu")) == 8  # all fit
    per_run = 4 * problem.num_parameters()
    monkeypatch.setattr(engine, "CPU_CHUNK_PARAMETER_BYTES", 3 * per_run + 1)
    assert engine.choose_chunk_size(config, problem, torch.device("cpu")) == 3
    monkeypatch.setattr(engine, "CPU_CHUNK_PARAMETER_BYTES", 1)
    assert engine.choose_chunk_size(config, problem, torch.device("cpu")) == 1
    monkeypatch.setattr(engine, "available_memory", lambda device: 1 << 40)
    assert engine.choose_chunk_size(config, problem, torch.device("meta")) == 8
    assert engine.choose_chunk_size(dataclasses.replace(config, chunk_size=5), problem,
                                    torch.device("cpu")) == 5  # an explicit chunk size wins


def test_chunks_fit_the_memory_budget_and_change_nothing(monkeypatch):
    """With room for 2.5 runs the engine trains chunks of 2; results equal one big chunk."""
    from hdfunc.studies import engine
    config = tiny_config(optimizers=["sgd_hd"], seeds=[0, 1, 2], lr0=[1e-2, 3e-2], beta=[1e-3])
    problem = make_problem(config.problem, **config.problem_options)
    whole = run_study(config, progress=False)
    per_run = engine.bytes_per_run(problem, engine.make_rule(config.optimizer_specs[0], 1e-3, 1e-3, config),
                                   config.batch_size, 4)
    assert per_run > 4 * problem.num_parameters()  # params, grads, updates, state, activations
    monkeypatch.setattr(engine, "available_memory", lambda device: int(2.5 * per_run))
    assert engine.choose_chunk_size(config, problem, torch.device("cpu")) == 2
    sizes = []
    original = engine.BatchedTrainer.run
    monkeypatch.setattr(engine.BatchedTrainer, "run",
                        lambda self, keys, **kw: sizes.append(len(keys)) or original(self, keys, **kw))
    chunked = run_study(config, progress=False)
    assert sizes == [2, 2, 2]
    for key, (loss, lr) in whole.curves.items():
        np.testing.assert_allclose(chunked.curves[key][0], loss, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(chunked.curves[key][1], lr, rtol=1e-6, atol=1e-12)
