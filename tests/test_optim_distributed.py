"""hdfunc.optim under torch.distributed: 2 CPU processes on gloo over loopback.

* DDP (replicated params, averaged gradients): every rank holds the same α, equal to the
  single-process run on the whole batch.
* A ZeRO-style sharded optimizer (each rank owns a slice of the params; ``process_group`` sums the
  hypergradient's dot products over ranks): the same α on every rank and the same trajectory as
  the single-process optimizer over all params; without the reduction α would differ. Both a
  hand-written sharding and torch's ``ZeroRedundancyOptimizer`` over DDP (the HD optimizer
  passed as ``functools.partial(AdamHD, process_group=...)``).
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.optim import ZeroRedundancyOptimizer

from helpers import free_port, run_in_gloo_group, spawn
from hdfunc.optim import SGDHD, AdamHD

pytestmark = pytest.mark.distributed

STEPS = 6
WORLD = 2


def _problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4), nn.Tanh(),
                          nn.Linear(4, 1)).double()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, 6, generator=gen, dtype=torch.float64)
    y = torch.randn(64, 1, generator=gen, dtype=torch.float64)
    return model, x, y


OPTIMIZERS = {"adam_hd": (AdamHD, dict(lr=1e-2, hypergrad_lr=1e-3)),
              "sgd_hd": (SGDHD, dict(lr=1e-2, hypergrad_lr=1e-2)),
              "sgd_hd_mult": (SGDHD, dict(lr=1e-2, hypergrad_lr=0.02, mode="multiplicative"))}


def _single_process(name: str):
    cls, kwargs = OPTIMIZERS[name]
    model, x, y = _problem()
    optimizer = cls(model.parameters(), **kwargs)
    for _ in range(STEPS):
        optimizer.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        optimizer.step()
    return [p.detach().clone() for p in model.parameters()], optimizer.adapted_lrs()[0]


def _worker(rank: int, port: int, out_dir: str) -> None:
    run_in_gloo_group(rank, port, WORLD, _train, Path(out_dir) / f"rank{rank}.pt")


def _train(rank: int) -> dict:
    results = {}
    for name, (cls, kwargs) in OPTIMIZERS.items():
        # DDP: each rank a half of the batch; gradients averaged by DDP.
        model, x, y = _problem()
        ddp = nn.parallel.DistributedDataParallel(model)
        optimizer = cls(ddp.parameters(), **kwargs)
        half = slice(rank * 32, (rank + 1) * 32)
        for _ in range(STEPS):
            optimizer.zero_grad()
            ((ddp(x[half]) - y[half]) ** 2).mean().backward()
            optimizer.step()
        results[f"ddp/{name}"] = ([p.detach().clone() for p in model.parameters()],
                                  optimizer.adapted_lrs()[0])

        # torch's ZeroRedundancyOptimizer over DDP: it shards the params over the ranks and
        # builds the HD optimizer on each rank's shard.
        model, x, y = _problem()
        ddp = nn.parallel.DistributedDataParallel(model)
        zero = ZeroRedundancyOptimizer(
            ddp.parameters(),
            optimizer_class=functools.partial(cls, process_group=dist.group.WORLD), **kwargs)
        for _ in range(STEPS):
            zero.zero_grad()
            ((ddp(x[half]) - y[half]) ** 2).mean().backward()
            zero.step()
        owned = sum(len(g["params"]) for g in zero.optim.param_groups)
        results[f"zero/{name}"] = ([p.detach().clone() for p in model.parameters()],
                                   zero.optim.adapted_lrs()[0], owned)

        # ZeRO's checkpoint: consolidated on rank 0 (ZeRO gathers the local state dicts and
        # keeps the HD rate state of its own param groups), loaded into a fresh ZeRO on
        # every rank: the next steps equal the uninterrupted run's.
        zero.consolidate_state_dict(to=0)
        saved = [zero.state_dict() if rank == 0 else None]
        dist.broadcast_object_list(saved, src=0)
        resumed_model, _, _ = _problem()
        resumed_model.load_state_dict(model.state_dict())
        resumed_ddp = nn.parallel.DistributedDataParallel(resumed_model)
        resumed = ZeroRedundancyOptimizer(
            resumed_ddp.parameters(),
            optimizer_class=functools.partial(cls, process_group=dist.group.WORLD), **kwargs)
        # (a copy, as torch.load gives: on rank 0 the consolidated state dict shares the
        # moment tensors of the running optimizer, which its next steps change in place)
        resumed.load_state_dict(copy.deepcopy(saved[0]))
        for net, opt in ((ddp, zero), (resumed_ddp, resumed)):
            for _ in range(2):
                opt.zero_grad()
                ((net(x[half]) - y[half]) ** 2).mean().backward()
                opt.step()
        results[f"zero_resumed/{name}"] = (
            all(torch.equal(a, b) for a, b in zip(model.parameters(),
                                                  resumed_model.parameters())),
            all(torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
                for a, b in zip(zero.optim.param_groups[0]["hd_state"],
                                resumed.optim.param_groups[0]["hd_state"])),
            type(resumed.optim.param_groups[0]["hd_state"]).__name__)

        # ZeRO-style: rank r owns params r, r+2, ...; grads all-reduced by hand, each rank
        # steps its own shard, then owners broadcast their params.
        for reduce in (True, False):
            model, x, y = _problem()
            params = list(model.parameters())
            owner = [i % WORLD for i in range(len(params))]
            mine = [p for p, o in zip(params, owner) if o == rank]
            optimizer = cls(mine, process_group=dist.group.WORLD if reduce else None,
                            **kwargs)
            for _ in range(STEPS):
                optimizer.zero_grad()
                for p in params:
                    p.grad = None
                ((model(x[half]) - y[half]) ** 2).mean().backward()
                for p in params:
                    dist.all_reduce(p.grad)
                    p.grad /= WORLD
                optimizer.step()
                with torch.no_grad():
                    for p, o in zip(params, owner):
                        dist.broadcast(p, src=o)
            key = f"sharded/{name}" if reduce else f"sharded_local/{name}"
            results[key] = ([p.detach().clone() for p in params], optimizer.adapted_lrs()[0])
    return results


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("hd_dist")
    spawn(_worker, (free_port(), str(out_dir)), WORLD)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_ddp_ranks_hold_identical_alpha_equal_to_single_process(distributed_results, name):
    params0, alpha0 = distributed_results[0][f"ddp/{name}"]
    params1, alpha1 = distributed_results[1][f"ddp/{name}"]
    assert torch.equal(alpha0, alpha1)
    for a, b in zip(params0, params1):
        assert torch.equal(a, b)
    reference_params, reference_alpha = _single_process(name)
    torch.testing.assert_close(alpha0, reference_alpha, rtol=1e-12, atol=0)
    for a, b in zip(params0, reference_params):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_sharded_optimizer_reduces_the_hypergradient(distributed_results, name):
    params0, alpha0 = distributed_results[0][f"sharded/{name}"]
    params1, alpha1 = distributed_results[1][f"sharded/{name}"]
    assert torch.equal(alpha0, alpha1)
    reference_params, reference_alpha = _single_process(name)
    torch.testing.assert_close(alpha0, reference_alpha, rtol=1e-12, atol=0)
    for a, b in zip(params0, reference_params):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    # without the reduction each rank adapts α from its own shard: the ranks disagree
    local0 = distributed_results[0][f"sharded_local/{name}"][1]
    local1 = distributed_results[1][f"sharded_local/{name}"][1]
    assert not torch.allclose(local0, local1, rtol=1e-6, atol=0)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_zero_redundancy_optimizer_reduces_the_hypergradient(distributed_results, name):
    params0, alpha0, owned0 = distributed_results[0][f"zero/{name}"]
    params1, alpha1, owned1 = distributed_results[1][f"zero/{name}"]
    assert 0 < owned0 < 6 and owned0 + owned1 == 6  # each rank stepped a true shard
    assert torch.equal(alpha0, alpha1)
    reference_params, reference_alpha = _single_process(name)
    torch.testing.assert_close(alpha0, reference_alpha, rtol=1e-12, atol=0)
    for a, b, c in zip(params0, params1, reference_params):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_zero_redundancy_optimizer_checkpoint_resumes_exactly(distributed_results, name):
    """ZeRO's consolidated state dict (param groups deep-copied, pickled and broadcast, then
    copied into the local HD optimizers' groups by its load_state_dict) keeps the rate state an
    HDState, and training resumes bit for bit."""
    for rank_results in distributed_results:
        params_equal, state_equal, kind = rank_results[f"zero_resumed/{name}"]
        assert params_equal and state_equal and kind == "HDState"


