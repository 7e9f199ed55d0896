"""Small shared test problems (a nested-pytree regression model, a small torch.nn regression model),
a step loop, the torch LR scheduler families, and the set-up of gloo test processes."""

from __future__ import annotations

import gc
import os
import socket
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.func import grad
from torch.optim import lr_scheduler

import hdfunc
from hdfunc.tree import tree_flatten, tree_unflatten


def make_problem(seed: int = 0, dtype: torch.dtype = torch.float64, n: int = 32):
    """A tiny two-layer regression problem with nested-dict/list params (smooth, non-convex)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=gen, dtype=torch.float64).to(dtype)
    y = torch.randn(n, generator=gen, dtype=torch.float64).to(dtype)
    params = {
        "hidden": {"weight": 0.5 * torch.randn(3, 4, generator=gen, dtype=torch.float64).to(dtype),
                   "bias": torch.zeros(4, dtype=dtype)},
        "out": [0.5 * torch.randn(4, generator=gen, dtype=torch.float64).to(dtype),
                torch.zeros((), dtype=dtype)],
    }

    def loss(p):
        hidden = torch.tanh(x @ p["hidden"]["weight"] + p["hidden"]["bias"])
        return ((hidden @ p["out"][0] + p["out"][1] - y) ** 2).mean()

    return params, loss


def run(rule: hdfunc.Rule, params, loss, steps: int):
    """Train ``steps`` steps; return the params and states after each step."""
    state = rule.init(params)
    history = []
    for _ in range(steps):
        updates, state = rule.update(grad(loss)(params), state, params)
        params = hdfunc.apply_updates(params, updates)
        history.append((params, state))
    return history


def flat_grad_fn(loss, params):
    """grad of ``loss`` as a function of the list of leaves (for the reference loop)."""
    spec = tree_flatten(params)[1]

    def fn(leaves):
        return tree_flatten(grad(loss)(tree_unflatten(leaves, spec)))[0]

    return fn


def tanh_regression(dtype: torch.dtype = torch.float64, seed: int = 0):
    """A 5-7-3-1 tanh network and a regression batch of 48 (model, inputs, targets)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3), nn.Tanh(),
                          nn.Linear(3, 1)).to(dtype)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(48, 5, generator=gen, dtype=torch.float64).to(dtype)
    y = torch.randn(48, 1, generator=gen, dtype=torch.float64).to(dtype)
    return model, x, y


def small_tanh_regression(seed: int = 0):
    """A 5-7-1 tanh network (float64) and a regression batch of 32 (model, inputs, targets)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 1)).double()
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(32, 5, generator=gen, dtype=torch.float64)
    y = torch.randn(32, 1, generator=gen, dtype=torch.float64)
    return model, x, y


SCHEDULER_STEPS = 12

# name -> scheduler factory (the six families of issue 10), for runs of SCHEDULER_STEPS steps;
# ReduceLROnPlateau steps on the loss
SCHEDULERS = {
    "StepLR": lambda opt: lr_scheduler.StepLR(opt, step_size=3, gamma=0.5),
    "OneCycleLR": lambda opt: lr_scheduler.OneCycleLR(opt, max_lr=2e-2,
                                                      total_steps=SCHEDULER_STEPS + 1),
    "CosineAnnealingLR": lambda opt: lr_scheduler.CosineAnnealingLR(opt, T_max=SCHEDULER_STEPS,
                                                                    eta_min=1e-4),
    "ReduceLROnPlateau": lambda opt: lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=0,
                                                                    threshold=0.05),
    "LambdaLR": lambda opt: lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1.0 + t)),
    "SequentialLR": lambda opt: lr_scheduler.SequentialLR(
        opt, [lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=3),
              lr_scheduler.ExponentialLR(opt, gamma=0.9)], milestones=[3]),
}


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_gloo(rank: int, port: int, world: int) -> None:
    """Join a gloo process group over the loopback interface (one torch thread per process)."""
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)


def run_in_gloo_group(rank: int, port: int, world: int, body: Callable[[int], object],
                      out_file: Path | str) -> None:
    """In a spawned test process: join the gloo group, run ``body(rank)``, save what it returns to
    ``out_file`` once every rank is done, and end the process without tearing the group down.

    torch 2.13 can deadlock in that teardown: ``~ProcessGroupGloo`` joins its work thread while
    holding the GIL, and the work thread may be releasing a finished collective whose
    thread-local state holds a Python object (it waits for the GIL). It was seen here once in
    about 8 runs of a DDP test (main thread in ``Reducer`` dealloc -> ``~ProcessGroupGloo`` ->
    ``thread::join``; ``pt_gloo_runloop`` in ``~AsyncAllreduceWork`` -> ``take_gil``) and hung a CI
    run. So the body's objects (DDP reducers, FSDP modules) are freed while the group is alive,
    the ranks meet at a barrier, and the process leaves with ``os._exit``: no destructor runs.
    A failure prints its traceback and exits with status 1, which ``spawn`` reports."""
    try:
        init_gloo(rank, port, world)
        results = body(rank)
        gc.collect()
        dist.barrier()
        torch.save(results, out_file)
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


SPAWN_DEADLINE_S = 600.0


def spawn(worker: Callable, args: tuple, nprocs: int,
          deadline_s: float = SPAWN_DEADLINE_S) -> None:
    """``mp.spawn`` of a test module's ``worker`` (called as ``worker(rank, *args)``), with the
    tests folder on ``sys.path`` (the child processes import the worker's module by name) and a
    deadline: processes still running after ``deadline_s`` are killed and the test fails with
    ``TimeoutError`` instead of hanging the test run."""
    tests_dir = str(Path(__file__).resolve().parent)
    if tests_dir not in sys.path:
        sys.path.insert(0, tests_dir)
    context = mp.start_processes(worker, args=args, nprocs=nprocs, join=False,
                                 start_method="spawn")
    started = time.monotonic()
    while not context.join(timeout=1.0):
        if time.monotonic() - started > deadline_s:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            raise TimeoutError(f"{worker.__name__}: {nprocs} processes still running after "
                               f"{deadline_s:.0f} s; killed")
