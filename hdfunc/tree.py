"""Small pytree helpers over ``torch.utils._pytree`` (the pytree library ``torch.func`` uses).

Params, gradients, updates and optimizer states are pytrees: dicts, lists, tuples and
NamedTuples nested in any way, with tensors at the leaves. ``None`` is an empty subtree.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils import _pytree as pytree

PyTree = Any

tree_map = pytree.tree_map
tree_leaves = pytree.tree_leaves
tree_flatten = pytree.tree_flatten
tree_unflatten = pytree.tree_unflatten
tree_structure = pytree.tree_structure


def accumulation_dtype(tree: PyTree) -> torch.dtype:
    """The dtype in which reductions over ``tree`` are accumulated: at least float32."""
    dtype = torch.float32
    for leaf in tree_leaves(tree):
        dtype = torch.promote_types(dtype, leaf.dtype)
    return dtype


def first_leaf(tree: PyTree) -> torch.Tensor:
    leaves = tree_leaves(tree)
    if not leaves:
        raise ValueError("expected a pytree with at least one tensor, got an empty one")
    return leaves[0]


def tree_stack(trees: list) -> PyTree:
    """Pytrees of the same structure stacked leaf-wise along a new leading dimension (a batch
    for ``vmap``: seeds, or a grid of learning rates)."""
    return tree_map(lambda *leaves: torch.stack(leaves), *trees)


def tree_vdot(a: PyTree, b: PyTree, dtype: torch.dtype) -> torch.Tensor:
    """Σ over all leaves of Σ a⊙b, accumulated in ``dtype`` (a 0-d tensor)."""
    return sum(leaf_vdot(x, y, dtype) for x, y in zip(tree_leaves(a), tree_leaves(b)))


def leaf_vdot(x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (x.to(dtype) * y.to(dtype)).sum()


def tree_sq_norm(a: PyTree, dtype: torch.dtype) -> torch.Tensor:
    return tree_vdot(a, a, dtype)


def tree_zeros_like(tree: PyTree) -> PyTree:
    return tree_map(torch.zeros_like, tree)
