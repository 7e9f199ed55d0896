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
tree_flatten_with_path = pytree.tree_flatten_with_path


def accumulation_dtype(tree: PyTree) -> torch.dtype:
    """The dtype in which reductions over ``tree`` are accumulated: at least float32."""
    dtype = torch.float32
    for leaf in tree_leaves(tree):
        dtype = torch.promote_types(dtype, leaf.dtype)
    return dtype


def leaf_accumulation_dtype(leaf: torch.Tensor) -> torch.dtype:
    """The dtype in which optimizer arithmetic on ``leaf`` is done: at least float32."""
    return torch.promote_types(leaf.dtype, torch.float32)


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


def leaf_path(keys: tuple) -> str:
    """A readable path to a leaf from the keys of ``tree_flatten_with_path``: ``hidden.weight``,
    ``out[0]`` (``<root>`` for a tree that is a single tensor)."""
    text = ""
    for key in keys:
        if isinstance(key, pytree.MappingKey) and isinstance(key.key, str):
            text += f".{key.key}"
        else:
            text += str(key)  # [0], ['a b'], .field
    return text.lstrip(".") or "<root>"


def tree_zeros_like(tree: PyTree) -> PyTree:
    return tree_map(torch.zeros_like, tree)


def tree_accumulator_zeros(tree: PyTree) -> PyTree:
    """Zeros like ``tree`` in each leaf's accumulation dtype (float32 for float16/bfloat16)."""
    return tree_map(lambda x: torch.zeros_like(x, dtype=leaf_accumulation_dtype(x)), tree)


def mask_leaves(mask: Any, params: PyTree, who: str = "mask") -> list[bool]:
    """The mask as one Python bool per leaf of ``params`` (in their flattening order).

    ``mask`` is a pytree of bools with the params' structure (dict keys in any order), or a
    callable ``params -> that pytree`` (e.g. ``lambda ps: {k: p.ndim > 1 for k, p in
    ps.items()}``). The bools are static choices (not tensors), so a mask is vmap- and
    compile-safe."""
    tree = mask(params) if callable(mask) else mask
    spec = tree_structure(params)
    try:
        flat = spec.flatten_up_to(tree)
    except (ValueError, TypeError, KeyError):
        raise ValueError(f"{who} must have the params' tree structure (one bool per tensor), got "
                         f"{str(tree_structure(tree))[:200]}\n  params: {str(spec)[:200]}"
                         ) from None
    for value in flat:
        if not isinstance(value, bool):
            raise TypeError(f"{who} leaves must be Python bools, got {type(value).__name__}")
    return flat
