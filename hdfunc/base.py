"""The rule protocol: a pair of pure functions ``init`` and ``update`` over pytrees of tensors.

    state = rule.init(params)
    updates, state = rule.update(grads, state, params)
    params = apply_updates(params, updates)

No function here mutates its inputs, so rules compose with ``torch.func.grad``, ``jvp``,
``vmap`` and ``torch.compile``.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple, Optional

import torch

from hdfunc.tree import PyTree, tree_flatten, tree_map, tree_structure

InitFn = Callable[[PyTree], PyTree]
UpdateFn = Callable[[PyTree, PyTree, PyTree], "tuple[PyTree, PyTree]"]


@dataclass(frozen=True, eq=False)
class Transform:
    """A pure gradient transformation (optax's ``GradientTransformation``, simplified).

    ``previous_output``, when given, recomputes from the state alone the output that the last
    ``update`` returned (Adam's direction m̂/(√v̂+ε) is such a function of m and v), so that
    hypergradient descent needs no stored copy of it.

    ``rate_law``, on a transform that adapts a learning rate, declares how it does so (an
    :class:`hdfunc.HDConfig`: granularity, additive or multiplicative rule, bounds, transition,
    higher order); the verification suite's oracle replays exactly that law.
    """

    init: InitFn
    update: UpdateFn
    name: str = "transform"
    previous_output: Optional[Callable[[PyTree], PyTree]] = None
    rate_law: Optional[Any] = None


@dataclass(frozen=True, eq=False)
class Rule(Transform):
    """A complete update rule: ``updates`` are added to the params by :func:`apply_updates`.

    ``update`` checks its inputs (tree structure, shapes and dtypes of grads against params; the
    state against the one this rule makes) and raises ``TypeError``/``ValueError`` naming the
    problem.
    """

    hyperparams: dict = field(default_factory=dict)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.hyperparams.items())
        return f"{self.name}({args})"


class EmptyState(NamedTuple):
    """State of a stateless transform."""


def chain(*transforms: Transform, name: str = "chain") -> Transform:
    """Apply ``transforms`` one after another; the state is the tuple of their states."""

    def init(params: PyTree) -> tuple:
        return tuple(t.init(params) for t in transforms)

    def update(updates: PyTree, state: tuple, params: PyTree) -> tuple[PyTree, tuple]:
        new_states = []
        for t, s in zip(transforms, state):
            updates, s = t.update(updates, s, params)
            new_states.append(s)
        return updates, tuple(new_states)

    previous_output = None
    if len(transforms) == 1 and transforms[0].previous_output is not None:
        only = transforms[0].previous_output
        previous_output = lambda state: only(state[0])  # noqa: E731
    laws = [t.rate_law for t in transforms if t.rate_law is not None]
    if len(laws) > 1:
        raise ValueError("a chain may adapt at most one learning rate (two transforms declare a "
                         "rate_law)")
    return Transform(init, update, name, previous_output, laws[0] if laws else None)


def apply_updates(params: PyTree, updates: PyTree) -> PyTree:
    """θ_t = θ_{t-1} + u_t, leaf by leaf, keeping each param's dtype. Returns new tensors."""
    return tree_map(lambda p, u: p + u.to(p.dtype), params, updates)


# ----------------------------------------------------------------------------- validation


def check_hyperparameter(name: str, value: Any, *, low: float = 0.0, high: float = math.inf,
                         high_inclusive: bool = True) -> None:
    """Reject a hyperparameter that is not a real number / 0-d float tensor in [low, high]."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 0 or not value.is_floating_point():
            raise TypeError(f"{name} must be a Python float or a 0-d floating tensor, "
                            f"got a tensor of shape {tuple(value.shape)} and dtype {value.dtype}")
        return  # the value of a tensor is not read: it may be traced by grad/vmap/compile
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number or a 0-d tensor, got {type(value).__name__}")
    value = float(value)
    too_high = value > high if high_inclusive else value >= high
    if math.isnan(value) or value < low or too_high:
        bracket = "]" if high_inclusive else ")"
        raise ValueError(f"{name} must lie in [{low}, {high}{bracket}, got {value}")


def _describe(spec: Any) -> str:
    text = str(spec)
    return text if len(text) < 300 else text[:297] + "..."


def check_grads(grads: PyTree, params: PyTree) -> None:
    """Grads must have the tree structure, shapes and dtypes of params."""
    g_leaves, g_spec = tree_flatten(grads)
    p_leaves, p_spec = tree_flatten(params)
    if g_spec != p_spec:
        raise ValueError("grads and params have different tree structures:\n"
                         f"  grads:  {_describe(g_spec)}\n  params: {_describe(p_spec)}")
    for i, (g, p) in enumerate(zip(g_leaves, p_leaves)):
        if not isinstance(g, torch.Tensor) or not isinstance(p, torch.Tensor):
            raise TypeError(f"leaf {i} of grads/params is not a tensor "
                            f"({type(g).__name__}/{type(p).__name__})")
        if g.shape != p.shape:
            raise ValueError(f"leaf {i}: grad shape {tuple(g.shape)} != param shape {tuple(p.shape)}")
        if g.dtype != p.dtype:
            raise TypeError(f"leaf {i}: grad dtype {g.dtype} != param dtype {p.dtype}")
        if not p.is_floating_point():
            raise TypeError(f"leaf {i}: params must be floating point, got {p.dtype}")


def validated(transform: Transform, *, name: str, hyperparams: dict) -> Rule:
    """Wrap a transform as a public :class:`Rule` whose ``update`` checks its inputs."""
    expected_spec: dict = {}

    def state_spec_for(params: PyTree) -> Any:
        p_spec = tree_structure(params)
        key = str(p_spec)
        if key not in expected_spec:
            meta = tree_map(lambda p: torch.empty_like(p, device="meta"), params)
            expected_spec.clear()
            expected_spec[key] = tree_structure(transform.init(meta))
        return expected_spec[key]

    def update(grads: PyTree, state: PyTree, params: PyTree) -> tuple[PyTree, PyTree]:
        if not torch.compiler.is_compiling():
            check_grads(grads, params)
            got = tree_structure(state)
            want = state_spec_for(params)
            if got != want:
                raise TypeError(f"this state was not made by {name}.init for these params "
                                f"(a state from another rule or other params?)\n"
                                f"  expected: {_describe(want)}\n  got:      {_describe(got)}")
        return transform.update(grads, state, params)

    def init(params: PyTree) -> PyTree:
        leaves = tree_flatten(params)[0]
        if not leaves:
            raise ValueError("params must contain at least one tensor")
        for i, p in enumerate(leaves):
            if not isinstance(p, torch.Tensor) or not p.is_floating_point():
                raise TypeError(f"params leaf {i} must be a floating-point tensor, got "
                                f"{getattr(p, 'dtype', type(p).__name__)}")
        return transform.init(params)

    return Rule(init, update, name, transform.previous_output, rate_law=transform.rate_law,
                hyperparams=dict(hyperparams))
