"""The same code on every available device: each test runs on the CPU and, where torch sees
one, on CUDA (``benchmarks/gpu_check.sh`` runs this file on a GPU). On a device the rules, the
optimizer classes, vmap, torch.compile and a study must give the CPU's numbers to rounding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.func import functional_call, grad, vmap

import hdfunc
from hdfunc.tree import tree_leaves, tree_map, tree_stack
from helpers import make_problem

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
HD_RULES = [name for name, info in hdfunc.REGISTRY.items() if info.is_hd]
CLASS_RULES = [name for name in HD_RULES if hdfunc.REGISTRY[name].optimizer is not None]
# float64 agrees to rounding everywhere; float32 reductions are ordered differently on a GPU
TOLERANCE = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=2e-4, atol=1e-6)}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    return torch.device(request.param)


def to(tree, device, dtype=None):
    return tree_map(lambda x: x.to(device=device, dtype=dtype or x.dtype), tree)


def make_rule(name: str):
    info = hdfunc.rule_info(name)
    options = {k: v for k, v in info.example.items() if k not in info.extra_rates}
    extra = {k: 1e-3 for k in info.extra_rates}
    return info.factory(0.02, 1e-3, **extra, **options)


def trajectory(rule, params, loss, steps=10):
    state = rule.init(params)
    out = []
    for _ in range(steps):
        updates, state = rule.update(grad(loss)(params), state, params)
        params = hdfunc.apply_updates(params, updates)
        out.append((params, hdfunc.get_lr(state)))
    return out


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", HD_RULES)
def test_rule_on_device_equals_the_cpu(name, dtype, device):
    """Every registered HD rule: the device's params and adapted rate equal the CPU's, and every
    state tensor lives on the device."""
    params, loss = make_problem(dtype=dtype)
    cpu = trajectory(make_rule(name), params, loss)
    moved_params, _ = make_problem(dtype=dtype)
    moved_params = to(moved_params, device)

    ours = trajectory(make_rule(name), moved_params, device_loss(dtype, device))
    for (p_cpu, lr_cpu), (p_dev, lr_dev) in zip(cpu, ours):
        for a, b in zip(tree_leaves(p_cpu), tree_leaves(p_dev)):
            assert b.device.type == device.type
            torch.testing.assert_close(b.cpu(), a, **TOLERANCE[dtype])
        torch.testing.assert_close(torch.as_tensor(lr_dev).cpu(), torch.as_tensor(lr_cpu),
                                   **TOLERANCE[dtype])
    state = make_rule(name).init(moved_params)
    assert all(t.device.type == device.type for t in tree_leaves(state))


def device_loss(dtype, device):
    """helpers.make_problem's loss with its data made on the CPU from the same seed, then moved
    to ``device`` (the same numbers)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(32, 3, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    y = torch.randn(32, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)

    def loss(p):
        hidden = torch.tanh(x @ p["hidden"]["weight"] + p["hidden"]["bias"])
        return ((hidden @ p["out"][0] + p["out"][1] - y) ** 2).mean()

    return loss


def test_device_loss_is_the_helpers_loss():
    params, loss = make_problem()
    assert device_loss(torch.float64, "cpu")(params) == loss(params)


KERNELS = {"foreach": dict(foreach=True), "fused": dict(fused=True), "for_loop": dict(foreach=False)}


@pytest.mark.parametrize("kernel", sorted(KERNELS))
@pytest.mark.parametrize("name", CLASS_RULES)
def test_optimizer_class_on_device_follows_the_functional_rule(name, kernel, device):
    """Each optimizer class, with each of torch's kernels, on the device, takes the steps of its
    functional rule there (float64)."""
    info = hdfunc.rule_info(name)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(),
                                torch.nn.Linear(7, 1)).double().to(device)
    x = torch.randn(40, 5, dtype=torch.float64, device=device)
    y = torch.randn(40, 1, dtype=torch.float64, device=device)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    hyper = dict(lr=0.02, hypergrad_lr=1e-3, **info.example)
    rule = info.factory(**hyper)
    state = rule.init(params)
    optimizer = info.optimizer_class()(model.parameters(),
                                       **{**info.optimizer_options, **hyper}, **KERNELS[kernel])

    def loss(p):
        return ((functional_call(model, p, (x,)) - y) ** 2).mean()

    for _ in range(8):
        optimizer.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        optimizer.step()
        updates, state = rule.update(grad(loss)(params), state, params)
        params = hdfunc.apply_updates(params, updates)
    for key, value in model.named_parameters():
        torch.testing.assert_close(value.detach(), params[key], rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(optimizer.adapted_lrs()[0].to(device),
                               hdfunc.get_lr(state).to(torch.float64), rtol=1e-9, atol=0)


def test_vmap_over_seeds_on_device_equals_a_loop(device):
    rule = hdfunc.adam_hd(0.02, 1e-4)
    starts = [to(make_problem(seed=s)[0], device) for s in range(3)]

    loss = device_loss(torch.float64, device)

    def step(params, state):
        updates, state = rule.update(grad(loss)(params), state, params)
        return hdfunc.apply_updates(params, updates), state

    params = tree_stack(starts)
    state = tree_stack([rule.init(p) for p in starts])
    for _ in range(5):
        params, state = vmap(step)(params, state)
    for i, start in enumerate(starts):
        single, single_state = start, rule.init(start)
        for _ in range(5):
            single, single_state = step(single, single_state)
        for a, b in zip(tree_leaves(single), tree_leaves(tree_map(lambda t: t[i], params))):
            torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-14)


def test_compiled_update_on_device_equals_eager(device):
    rule = hdfunc.sgdn_hd(0.02, 1e-3)
    params = to(make_problem()[0], device)
    grads = grad(device_loss(torch.float64, device))(params)
    state = rule.init(params)
    eager = rule.update(grads, state, params)
    compiled = torch.compile(rule.update, backend="aot_eager", fullgraph=True)
    for a, b in zip(tree_leaves(eager), tree_leaves(compiled(grads, state, params))):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-14)


def test_study_on_device_equals_the_cpu_study(device, tmp_path):
    """A small study on the device: the same CSV columns and rows, and losses equal to the CPU
    study's to float32 rounding."""
    from hdfunc.studies import StudyConfig, run_study

    settings = dict(problem="classification",
                    problem_options={"dim": 6, "classes": 3, "n_samples": 96, "hidden": 5},
                    steps=10, batch_size=16, seeds=[0, 1], optimizers=["sgdn_hd", "adam"],
                    lr0=[1e-2], beta=[1e-3], eval_final=True, log_every=1)
    cpu = run_study(StudyConfig(**settings), tmp_path / "cpu", progress=False, plots=False)
    ours = run_study(StudyConfig(**settings, device=str(device)), tmp_path / "dev",
                     progress=False, plots=False)
    header_cpu = (tmp_path / "cpu" / "steps.csv").read_text().splitlines()
    header_dev = (tmp_path / "dev" / "steps.csv").read_text().splitlines()
    assert header_cpu[0] == header_dev[0] and len(header_cpu) == len(header_dev)
    for key, (loss, lr) in cpu.curves.items():
        np.testing.assert_allclose(ours.curves[key][0], loss, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(ours.curves[key][1], lr, rtol=1e-4, atol=1e-10)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without CUDA")
def test_gpu_check_script_stops_at_once_without_cuda():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"
    done = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=60,
                          env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"})
    assert done.returncode == 2
    assert "no CUDA device visible to torch" in done.stderr and "nothing was run" in done.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run by benchmarks/gpu_check.sh)")
@pytest.mark.parametrize("name", CLASS_RULES)
def test_optimizer_step_on_cuda_does_not_synchronise(name):
    """With its CUDA defaults (fused kernel, ``lr_as_tensor``: γ_t left in ``lr`` as a 0-d
    tensor), a step of each optimizer class makes no host-device synchronisation: torch raises
    under ``set_sync_debug_mode("error")`` if one does (docs/optim.md, "lr as a tensor")."""
    info = hdfunc.rule_info(name)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(),
                                torch.nn.Linear(7, 1)).cuda()
    x, y = torch.randn(40, 5, device="cuda"), torch.randn(40, 1, device="cuda")
    optimizer = info.optimizer_class()(model.parameters(), **info.optimizer_options,
                                       lr=0.02, hypergrad_lr=1e-3, **info.example)
    for step in range(4):
        optimizer.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        if step == 0:
            optimizer.step()  # the first step allocates the state
            continue
        torch.cuda.set_sync_debug_mode("error")
        try:
            optimizer.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert isinstance(optimizer.param_groups[0]["lr"], torch.Tensor)
    assert optimizer.param_groups[0]["lr"].device.type == "cuda"
