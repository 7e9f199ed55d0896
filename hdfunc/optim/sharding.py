"""DTensor (FSDP2 / tensor-parallel) parameters: one global hypergradient over the whole model.

A rank holds the local shard of each DTensor parameter. The dot products of h_t are summed over
the local shards and then over the ranks, in the one all-reduce per step that the optimizer
already makes for all its groups (docs/optim.md, "Scaling out"). An element must be counted
exactly once: a shard (``Shard`` placement) is counted by the rank that holds it; a replicated
tensor (``Replicate`` along some mesh dimension, e.g. HSDP's replica dimension, or a plain
tensor beside the DTensors) by the ranks at coordinate 0 of those dimensions only.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist

__all__ = ["Sharding", "local", "sharding_of"]


def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a DTensor.

    Args:
        t: anything.

    Returns:
        True if ``t`` is a DTensor.
    """
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(t, DTensor)


def local(t: Any) -> Any:
    """The local shard of a DTensor (a tensor sharing its storage), anything else as it is.

    Args:
        t: a tensor, a DTensor or anything else.

    Returns:
        The local shard of a DTensor, else ``t``.
    """
    return t.to_local() if is_dtensor(t) else t


def _counted_here(t: torch.Tensor, group_rank: int) -> bool:
    """Whether this rank counts ``t``'s local elements in the global dot products."""
    if not is_dtensor(t):
        return group_rank == 0  # a plain tensor is the same on every rank
    from torch.distributed.tensor import Replicate

    coordinate = t.device_mesh.get_coordinate()
    return all(coordinate[dim] == 0 for dim, placement in enumerate(t.placements)
               if isinstance(placement, Replicate))


class Sharding:
    """How an optimizer's parameters are distributed: the process group over which h_t's dot
    products are summed, and which parameters this rank counts.

    Args:
        group: the process group (None: the default WORLD group).
        counted: id(param) -> whether this rank counts that param's elements.
    """

    def __init__(self, group: Any, counted: dict[int, bool]):
        self.group = group  # None: the default (WORLD) group
        self.counted = counted  # id(param) -> counted on this rank

    def split(self, lists: dict) -> tuple[dict, dict]:
        """``lists`` (per-tensor lists aligned with ``lists["params"]``, as ``_prepare`` returns
        them) as local tensors, split into the tensors this rank counts and the others.

        Args:
            lists: per-tensor lists, by name.

        Returns:
            The pair (counted, rest) of dicts of lists of local tensors.
        """
        params = lists["params"]
        mask = [self.counted[id(p)] for p in params]
        counted, rest = {}, {}
        for key, values in lists.items():
            values = [local(v) for v in values]
            if len(values) == len(params):
                counted[key] = [v for v, keep in zip(values, mask) if keep]
                rest[key] = [v for v, keep in zip(values, mask) if not keep]
            else:  # a list not aligned with the params (empty: no momentum, say)
                counted[key], rest[key] = values, []
        return counted, rest

    def all_reduce(self, table: torch.Tensor) -> None:
        """Sum ``table`` over the ranks of the mesh, in place: one collective.

        Args:
            table: the tensor to sum, in place.
        """
        dist.all_reduce(table, op=dist.ReduceOp.SUM, group=self.group)


_GROUPS: dict[tuple[int, ...], Any] = {}


def sharding_of(params: list[torch.Tensor]) -> Optional[Sharding]:
    """The :class:`Sharding` of ``params``, or None when none of them is a DTensor. Every
    DTensor must live on a mesh over the same ranks (each a mesh of any shape). Collective the
    first time a mesh covers only some of the ranks (it makes a process group over them: call it
    on every rank, as an optimizer's first step is).

    Args:
        params: the parameters of an optimizer.

    Returns:
        Their :class:`Sharding`, or None.

    Raises:
        ValueError: the DTensors live on meshes over different ranks.
    """
    dtensors = [p for p in params if is_dtensor(p)]
    if not dtensors:
        return None
    rank_sets = {tuple(sorted(p.device_mesh.mesh.flatten().tolist())) for p in dtensors}
    if len(rank_sets) != 1:
        raise ValueError("the DTensor parameters of an HD optimizer must live on meshes over the "
                         f"same ranks (one hypergradient for the model); got {sorted(rank_sets)}")
    ranks = rank_sets.pop()
    if len(ranks) == dist.get_world_size():
        group = None
    else:
        if ranks not in _GROUPS:
            _GROUPS[ranks] = dist.new_group(list(ranks))
        group = _GROUPS[ranks]
    group_rank = ranks.index(dist.get_rank())
    return Sharding(group, {id(p): _counted_here(p, group_rank) for p in params})
