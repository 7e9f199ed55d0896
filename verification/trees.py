"""Pytree arithmetic of the checks (in float64), the HD node of a state, and tangents of rates."""

from __future__ import annotations

from typing import Any

import torch

import hdfunc
from hdfunc.tree import PyTree, tree_leaves, tree_map, tree_vdot


def node_of(state: Any, rule_name: str = "rule") -> Any:
    """The HD node of ``state``; a TypeError naming ``rule_name`` where there is none."""
    node = hdfunc.find_lr_state(state)
    if node is None or "hypergrad" not in getattr(node, "_fields", ()):
        raise TypeError(f"the state of {rule_name} holds no HD node (a NamedTuple with fields lr, "
                        "hypergrad_lr and hypergrad, such as hdfunc.HDState); see "
                        "docs/writing-a-rule.md")
    return node


def tree_dot(a: PyTree, b: PyTree) -> torch.Tensor:
    """Σ a⊙b over all leaves, in float64 (a 0-d tensor)."""
    return tree_vdot(a, b, torch.float64)


def tree_abs_dot(a: PyTree, b: PyTree) -> float:
    """Σ |a⊙b| over all leaves, in float64: the size a dot product is measured against."""
    return float(sum((x.double() * y.double()).abs().sum() for x, y in zip(tree_leaves(a),
                                                                          tree_leaves(b))))


def tree_max_abs(a: PyTree) -> float:
    """max |a| over all leaves (0 for an empty tree)."""
    leaves = tree_leaves(a)
    return max(float(x.double().abs().max()) for x in leaves) if leaves else 0.0


def tree_max_diff(a: PyTree, b: PyTree) -> float:
    """max |a - b| over all leaves, in float64."""
    la, lb = tree_leaves(a), tree_leaves(b)
    if len(la) != len(lb):
        raise ValueError(f"cannot compare trees with {len(la)} and {len(lb)} leaves")
    diffs = [float((x.double() - y.double()).abs().max()) for x, y in zip(la, lb)]
    return max(diffs) if diffs else 0.0


def tree_axpy(a: PyTree, s: torch.Tensor, w: PyTree) -> PyTree:
    """a + s·w for rates (s a 0-d tensor, possibly batched or traced)."""
    return tree_map(lambda x, y: x + s.to(x.dtype) * y, a, w)


def tree_index(a: PyTree, i: int) -> PyTree:
    """Entry ``i`` of every leaf of a batched (stacked) tree."""
    return tree_map(lambda x: x[i], a)


def tangent_like(rate: PyTree, gen: torch.Generator, *, random: bool) -> PyTree:
    """A tangent for a rate: its own magnitude (plus the mean, so zeros move too) times a
    random normal (``random``) or times one."""
    def one(x: torch.Tensor) -> torch.Tensor:
        size = x.abs() + x.abs().mean() + 1e-300
        if not random:
            return size
        noise = torch.randn(x.shape, generator=gen, dtype=torch.float64).to(x)
        return size * noise
    return tree_map(one, rate)


def tangents_of(rate: PyTree, gen: torch.Generator, count: int = 1) -> list[PyTree]:
    """``count`` tangents of ``rate`` (:func:`tangent_like`), random unless the rate is one 0-d
    tensor (a global rate), which gets its single magnitude direction."""
    scalar = isinstance(rate, torch.Tensor) and rate.dim() == 0
    return [tangent_like(rate, gen, random=not scalar) for _ in range(1 if scalar else count)]
