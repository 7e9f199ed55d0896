"""Small pytree helpers over ``torch.utils._pytree`` (the pytree library ``torch.func`` uses).

Params, gradients, updates and optimizer states are pytrees: dicts, lists, tuples and
NamedTuples nested in any way, with tensors at the leaves. ``None`` is an empty subtree.
"""

from __future__ import annotations

import functools

from typing import Any, Optional

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
    """The dtype in which reductions over ``tree`` are accumulated: at least float32.

    Args:
        tree: any pytree of tensors.

    Returns:
        float32 promoted with every leaf's dtype (float64 if a leaf is float64).
    """
    dtype = torch.float32
    for leaf in tree_leaves(tree):
        dtype = torch.promote_types(dtype, leaf.dtype)
    return dtype


def leaf_accumulation_dtype(leaf: torch.Tensor) -> torch.dtype:
    """The dtype in which optimizer arithmetic on ``leaf`` is done: at least float32.

    Args:
        leaf: a tensor.

    Returns:
        The leaf's dtype promoted with float32.
    """
    return torch.promote_types(leaf.dtype, torch.float32)


def first_leaf(tree: PyTree) -> torch.Tensor:
    """The first tensor of ``tree`` in its flattening order.

    Args:
        tree: a pytree with at least one tensor.

    Returns:
        Its first leaf.

    Raises:
        ValueError: the tree has no leaves.
    """
    leaves = tree_leaves(tree)
    if not leaves:
        raise ValueError("expected a pytree with at least one tensor, got an empty one")
    return leaves[0]


def tree_stack(trees: list) -> PyTree:
    """Pytrees of the same structure stacked leaf-wise along a new leading dimension (a batch
    for ``vmap``: seeds, or a grid of learning rates).

    Args:
        trees: pytrees of one structure, with leaves of equal shapes.

    Returns:
        One pytree of that structure whose leaves have a leading dimension ``len(trees)``.
    """
    return tree_map(lambda *leaves: torch.stack(leaves), *trees)


def tree_vdot(a: PyTree, b: PyTree, dtype: torch.dtype) -> torch.Tensor:
    """Σ over all leaves of Σ a⊙b, accumulated in ``dtype`` (a 0-d tensor).

    Args:
        a: a pytree of tensors.
        b: a pytree with the leaves of ``a``'s shapes, in the same order.
        dtype: the dtype of the accumulation.

    Returns:
        The 0-d inner product in ``dtype``.
    """
    return sum(leaf_vdot(x, y, dtype) for x, y in zip(tree_leaves(a), tree_leaves(b)))


def leaf_vdot(x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Σ x⊙y of two tensors, computed in ``dtype``.

    Args:
        x: a tensor.
        y: a tensor of ``x``'s shape.
        dtype: the dtype of the product and the sum.

    Returns:
        The 0-d inner product in ``dtype``.
    """
    return (x.to(dtype) * y.to(dtype)).sum()


def tree_sq_norm(a: PyTree, dtype: torch.dtype) -> torch.Tensor:
    """‖a‖₂² over all leaves, accumulated in ``dtype``.

    Args:
        a: a pytree of tensors.
        dtype: the dtype of the accumulation.

    Returns:
        The 0-d squared norm in ``dtype``.
    """
    return tree_vdot(a, a, dtype)


def leaf_path(keys: tuple) -> str:
    """A readable path to a leaf from the keys of ``tree_flatten_with_path``: ``hidden.weight``,
    ``out[0]`` (``<root>`` for a tree that is a single tensor).

    Args:
        keys: the key path of one leaf.

    Returns:
        The path as text, for error messages.
    """
    text = ""
    for key in keys:
        if isinstance(key, pytree.MappingKey) and isinstance(key.key, str):
            text += f".{key.key}"
        else:
            text += str(key)  # [0], ['a b'], .field
    return text.lstrip(".") or "<root>"


def tree_zeros_like(tree: PyTree) -> PyTree:
    """Zeros like ``tree``, in each leaf's own dtype.

    Args:
        tree: a pytree of tensors.

    Returns:
        A pytree of ``tree``'s structure with zero tensors of its leaves' shapes and dtypes.
    """
    return tree_map(torch.zeros_like, tree)


def tree_accumulator_zeros(tree: PyTree) -> PyTree:
    """Zeros like ``tree`` in each leaf's accumulation dtype (float32 for float16/bfloat16).

    Args:
        tree: a pytree of tensors.

    Returns:
        A pytree of ``tree``'s structure with zero tensors of its leaves' shapes.
    """
    return tree_map(lambda x: torch.zeros_like(x, dtype=leaf_accumulation_dtype(x)), tree)


def mask_leaves(mask: Any, params: PyTree, who: str = "mask") -> list[bool]:
    """The mask as one Python bool per leaf of ``params`` (in their flattening order).

    ``mask`` is a pytree of bools with the params' structure (dict keys in any order), or a
    callable ``params -> that pytree`` (e.g. ``lambda ps: {k: p.ndim > 1 for k, p in
    ps.items()}``). The bools are static choices (not tensors), so a mask is vmap- and
    compile-safe.

    Args:
        mask: a pytree of bools like the params, or a callable params -> such a pytree.
        params: the params the mask applies to.
        who: what the mask is called, at the start of the error messages.

    Returns:
        One bool per leaf of ``params``.

    Raises:
        ValueError: the mask does not have the params' tree structure.
        TypeError: a leaf of the mask is not a Python bool.
    """
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


def resolve_partial_sums(*groups: Optional[list]) -> list:
    """The lists in ``groups`` (None stays None) with every 0-d DTensor that holds a *partial*
    sum (``Partial`` placement: the local shards' sums of a sharded tensor's dot product) made
    the global sum on every rank, all in one all-reduce; anything else is returned as it is.

    Without it each later use of a partial sum (negation, comparison, arithmetic with the
    replicated rate) would make DTensor reduce it again, one collective each. For plain tensors
    (and under vmap/compile, which see plain tensors) this is the identity.

    Args:
        *groups: lists of 0-d tensors (or None).

    Returns:
        The lists, in order, with the partial sums resolved.
    """
    try:
        from torch.distributed.tensor import DTensor, Partial, Replicate
    except ImportError:  # pragma: no cover - torch without distributed
        return list(groups)
    where = [(i, j) for i, values in enumerate(groups) if values is not None
             for j, v in enumerate(values)
             if isinstance(v, DTensor) and v.dim() == 0
             and any(isinstance(pl, Partial) for pl in v.placements)]
    if not where:
        return list(groups)
    out = [None if values is None else list(values) for values in groups]
    first = out[where[0][0]][where[0][1]]
    same = [(i, j) for i, j in where if out[i][j].placements == first.placements
            and out[i][j].device_mesh == first.device_mesh]
    dtype = functools.reduce(torch.promote_types, (out[i][j].dtype for i, j in same))
    stacked = torch.stack([out[i][j].to(dtype) for i, j in same])
    total = stacked.redistribute(placements=[Replicate()] * len(first.placements))
    for (i, j), value in zip(same, total.unbind()):
        out[i][j] = value.to(groups[i][j].dtype)
    if len(same) < len(where):  # partial sums on another mesh or placement: once more
        return resolve_partial_sums(*out)
    return out


def total(values: list[torch.Tensor]) -> torch.Tensor:
    """Σ values (0-d tensors): Python's ``sum`` for plain tensors; for DTensors holding partial
    sums, the replicated terms are made partial first (a local operation: one rank keeps the
    value, the others 0), so the total stays one lazy partial sum, reduced later by
    :func:`resolve_partial_sums` in one collective instead of one per term.

    Args:
        values: 0-d tensors (or DTensors).

    Returns:
        Their sum.
    """
    try:
        from torch.distributed.tensor import DTensor, Partial, Replicate
    except ImportError:  # pragma: no cover - torch without distributed
        return sum(values)
    if not any(isinstance(v, DTensor) and any(isinstance(p, Partial) for p in v.placements)
               for v in values):
        return sum(values)
    def as_partial(v: Any) -> Any:
        if not isinstance(v, DTensor) or not any(isinstance(p, Replicate) for p in v.placements):
            return v
        coordinate = v.device_mesh.get_coordinate()
        keep = all(coordinate[d] == 0 for d, p in enumerate(v.placements)
                   if isinstance(p, Replicate))
        local = v.to_local() if keep else torch.zeros_like(v.to_local())
        return DTensor.from_local(local, v.device_mesh, [Partial() if isinstance(p, Replicate)
                                                         else p for p in v.placements],
                                  run_check=False)

    return functools.reduce(lambda a, b: a + b, [as_partial(v) for v in values])
