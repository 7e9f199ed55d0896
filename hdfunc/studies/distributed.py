"""Sharding a study over processes / GPUs / nodes with ``torch.distributed`` (``torchrun``).

    torchrun --nproc-per-node 2 -m hdfunc study --config studies/quick_mnist.toml --out runs/quick

Rank r of W trains the seeds ``seeds[r::W]`` (every optimizer, α_0 and β) into
``OUT/shards/rank-r/`` — a complete study folder of its own, so each shard resumes on its own with
``--resume`` — then all ranks meet at a barrier and rank 0 merges the shards into ``OUT/`` (CSV rows
and runs in the canonical order, statistics over all seeds, plots). Because a run depends only on
its seed, the merged results equal those of a single-process study (to rounding: the batch size
of the vmapped computation differs). With CUDA each rank uses ``cuda:LOCAL_RANK``.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from hdfunc.studies.config import StudyConfig


def shard_seeds(seeds: list[int], rank: int, world_size: int) -> list[int]:
    """The seeds of rank ``rank``: every ``world_size``-th seed starting at ``rank``.

    Args:
        seeds: all seeds of the study.
        rank: this process's rank, in [0, world_size).
        world_size: the number of processes.

    Returns:
        ``seeds[rank::world_size]``.

    Raises:
        ValueError: a bad rank, or fewer seeds than processes.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"bad rank {rank} for world size {world_size}")
    if len(seeds) < world_size:
        raise ValueError(f"{len(seeds)} seeds cannot be sharded over {world_size} processes "
                         f"(need at least one seed per process)")
    return list(seeds)[rank::world_size]


def shard_dir(out_dir: str | Path, rank: int) -> Path:
    """The study folder of one rank's shard.

    Args:
        out_dir: the folder of the merged study.
        rank: the rank.

    Returns:
        ``out_dir/shards/rank-<rank>``.
    """
    return Path(out_dir) / "shards" / f"rank-{rank}"


def run_distributed(config: StudyConfig, out_dir: str | Path, *, resume: bool = False,
                    progress: bool = True, plots: bool = True,
                    timeout: datetime.timedelta = datetime.timedelta(hours=12)) -> Any:
    """Run this process's shard of ``config`` and, on rank 0, merge all shards into ``out_dir``.
    Initialises the default process group from the torchrun environment if needed (gloo on CPU,
    nccl on CUDA). Returns the merged :class:`StudyResults` on rank 0, ``None`` elsewhere.

    Args:
        config: the whole study (all seeds).
        out_dir: the folder of the merged study; each rank writes its shard under
            ``out_dir/shards/``.
        resume: resume each shard where it stopped.
        progress: show rank 0's progress.
        plots: write the merged study's figures.
        timeout: the process group's timeout (the ranks wait for each other at the barriers).

    Returns:
        The merged ``StudyResults`` on rank 0, None on the other ranks.
    """
    from hdfunc.studies.engine import resolve_device, run_study
    from hdfunc.studies.results import merge_studies

    resolved = resolve_device(config.device)
    created = False
    if not dist.is_initialized():
        dist.init_process_group("nccl" if resolved.type == "cuda" else "gloo", timeout=timeout)
        created = True
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        device = str(resolved)
        if resolved.type == "cuda" and resolved.index is None:
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', rank % max(1, torch.cuda.device_count())))}"
        shard = dataclasses.replace(config, seeds=shard_seeds(config.seed_list, rank, world),
                                    device=device)
        run_study(shard, shard_dir(out_dir, rank), resume=resume, progress=progress and rank == 0,
                  plots=False)
        dist.barrier()
        results = None
        if rank == 0:
            merged = dataclasses.replace(config, seeds=config.seed_list)
            results = merge_studies(out_dir, [shard_dir(out_dir, r) for r in range(world)], merged,
                                    plots=plots)
        dist.barrier()
        return results
    finally:
        if created:
            dist.destroy_process_group()
