"""optax-style building blocks that compose with the rules through :func:`hdfunc.chain`.

    rule = hdfunc.chain(clip_by_global_norm(1.0), hdfunc.adam_hd(1e-3, 1e-7))
    rule = partition({"decay": hdfunc.adamw_hd(1e-3, 1e-7), "no_decay": hdfunc.adam_hd(1e-3, 1e-7)},
                     labels=lambda ps: {k: "decay" if p.ndim > 1 else "no_decay"
                                        for k, p in ps.items()})

A transform placed before a rule changes the gradient g_t that the rule (and its hypergradient
h_t = -g_t · d_{t-1}) sees, exactly as the coupled L2 term does.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Optional, Union

import torch

from hdfunc.base import EmptyState, Transform, check_hyperparameter
from hdfunc.tree import (PyTree, accumulation_dtype, leaf_path, tree_flatten,
                         tree_flatten_with_path, tree_leaves, tree_map, tree_structure,
                         tree_unflatten)

CLIP_EPS = 1e-6
"""Added to the norm before dividing, as torch.nn.utils.clip_grad_norm_ does."""


def global_norm(tree: PyTree) -> torch.Tensor:
    """‖tree‖₂ over all leaves, as torch.nn.utils.clip_grad_norm_: the norm of the per-tensor
    norms, computed in at least float32 (a 0-d tensor).

    Args:
        tree: any pytree of tensors.

    Returns:
        The 0-d norm, in the tree's accumulation dtype (at least float32).
    """
    dtype = accumulation_dtype(tree)
    norms = [torch.linalg.vector_norm(leaf.to(dtype)) for leaf in tree_leaves(tree)]
    return torch.linalg.vector_norm(torch.stack(norms))


def clip_by_global_norm(max_norm: float | torch.Tensor) -> Transform:
    """g ← g · min(1, max_norm / (‖g‖₂ + 1e-6)), with ‖g‖₂ the norm over all leaves: the
    gradients after ``torch.nn.utils.clip_grad_norm_(params, max_norm)``.

    Put it first in a :func:`hdfunc.chain` (before a rule or base direction); an HD rule then
    adapts its rate with the clipped gradient. Stateless; vmap- and compile-safe (the factor is
    computed with ``torch.clamp``, never read back); ``params`` are not read.

    Args:
        max_norm: the largest global norm let through, finite and >= 0 (or a 0-d tensor).

    Returns:
        A stateless transform.

    Raises:
        ValueError: ``max_norm`` is negative or not finite.
    """
    check_hyperparameter("max_norm", max_norm)

    def update(g: PyTree, state: EmptyState,
               params: Optional[PyTree] = None) -> tuple[PyTree, EmptyState]:
        factor = torch.clamp(max_norm / (global_norm(g) + CLIP_EPS), max=1.0)
        return tree_map(lambda x: x * factor.to(x.dtype), g), state

    return Transform(lambda params: EmptyState(), update, "clip_by_global_norm")


# ----------------------------------------------------------------------------- partition

Labels = Union[PyTree, Callable[[PyTree], PyTree]]


class PartitionState(NamedTuple):
    """State of :func:`partition`: each label's transform state (over the list of its params,
    in the params' flattening order).

    Attributes:
        states: label -> the state of that label's transform.
    """

    states: dict


def partition(transforms: Mapping[str, Transform], labels: Labels,
              name: str = "partition") -> Transform:
    """Different transforms on different parts of the params (optax's ``multi_transform``).

    ``labels`` is a pytree of strings with the params' structure, or a callable params -> such a
    pytree; each label names a transform in ``transforms``. Each transform sees only its params,
    as a list of tensors in the params' flattening order, and keeps its own state:
    ``state.states[label]`` (e.g. ``hdfunc.get_lr(state.states["weights"])``).

    Two ways to adapt rates across groups, as the ``hdfunc.optim`` classes offer:

    - one HD rate per partition: ``partition({"a": adam_hd(...), "b": sgd_hd(...)}, labels)``;
    - one global hypergradient across partitions: partition the base directions and adapt one α
      with ``hd_rule(partition({"a": scale_by_adam(), "b": identity()}, labels), lr, beta)``
      (h_t = -Σ over all params of g_t · d_{t-1}).

    Every label in ``transforms`` must label at least one tensor, and every tensor's label must
    be in ``transforms``.

    Args:
        transforms: label -> the transform (a rule or a base direction) for the params so labelled.
        labels: a pytree of labels with the params' structure, or a callable params -> such a
            pytree.
        name: the transform's name, at the start of its error messages.

    Returns:
        A transform with state :class:`PartitionState`; it needs the params in ``update`` if
            one of ``transforms`` does.

    Raises:
        TypeError: ``transforms`` is empty or holds something that is not a ``Transform``.
        ValueError: (at ``init``/``update``) the labels do not match the params' structure, a
            label has no transform, or a transform labels no params.
    """
    if not isinstance(transforms, Mapping) or not transforms:
        raise TypeError("transforms must be a non-empty dict {label: transform}")
    for label, transform in transforms.items():
        if not isinstance(transform, Transform):
            raise TypeError(f"transforms[{label!r}] must be a Transform (a rule or a direction), "
                            f"got {type(transform).__name__}")

    def groups(params: PyTree) -> dict[str, list[int]]:
        """label -> the indices of its leaves in the params' flattening order."""
        keyed, spec = tree_flatten_with_path(params)
        tree = labels(params) if callable(labels) else labels
        try:
            flat_labels = spec.flatten_up_to(tree)
        except (ValueError, TypeError, KeyError):
            raise ValueError(f"{name}: labels must have the params' tree structure, got "
                             f"{str(tree_structure(tree))[:200]}") from None
        found: dict[str, list[int]] = {label: [] for label in transforms}
        for i, ((path, _), label) in enumerate(zip(keyed, flat_labels)):
            if label not in found:
                raise ValueError(f"{name}: label {label!r} of {leaf_path(path)} has no transform; "
                                 f"labels with one: {', '.join(map(repr, transforms))}")
            found[label].append(i)
        for label, indices in found.items():
            if not indices:
                raise ValueError(f"{name}: no params are labelled {label!r}")
        return found

    def select(leaves: list, indices: list[int]) -> list:
        return [leaves[i] for i in indices]

    def init(params: PyTree) -> PartitionState:
        leaves = tree_leaves(params)
        return PartitionState({label: transforms[label].init(select(leaves, indices))
                               for label, indices in groups(params).items()})

    def update(g: PyTree, state: PartitionState,
               params: Optional[PyTree] = None) -> tuple[PyTree, PartitionState]:
        g_leaves, spec = tree_flatten(g)
        # the labels are computed from the params, or from the grads (same structure) without
        param_leaves = None if params is None else tree_leaves(params)
        out: list[Any] = [None] * len(g_leaves)
        new_states = {}
        for label, indices in groups(g if params is None else params).items():
            sub_params = None if param_leaves is None else select(param_leaves, indices)
            sub_out, new_states[label] = transforms[label].update(
                select(g_leaves, indices), state.states[label], sub_params)
            for i, x in zip(indices, sub_out):
                out[i] = x
        return tree_unflatten(out, spec), PartitionState(new_states)

    return Transform(init, update, name,
                     needs_params=any(t.needs_params for t in transforms.values()))
