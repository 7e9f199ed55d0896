"""The rule protocol: a pair of pure functions ``init`` and ``update`` over pytrees of tensors.

    state = rule.init(params)
    updates, state = rule.update(grads, state, params)
    params = apply_updates(params, updates)

No function here mutates its inputs, so rules compose with ``torch.func.grad``, ``jvp``,
``vmap`` and ``torch.compile``.
"""

from __future__ import annotations

import functools
import math
import numbers
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple, Optional, TypeVar

import torch

from hdfunc.tree import (PyTree, leaf_path, tree_flatten, tree_flatten_with_path, tree_map,
                         tree_structure)

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
    """θ_t = θ_{t-1} + u_t, leaf by leaf, keeping each param's dtype. Returns new tensors.

    ``updates`` must have the tree structure and the shapes of ``params`` (checked, naming the
    leaf, except while ``torch.compile`` traces; under ``vmap`` the per-example shapes)."""
    if not torch.compiler.is_compiling():
        check_updates(updates, params)
    return tree_map(lambda p, u: p + u.to(p.dtype), params, updates)


def check_updates(updates: PyTree, params: PyTree) -> None:
    """Updates must have the structure of params (dict keys in any order) and, leaf by leaf,
    the shape of the param: no broadcasting (a (1,) update would move every entry of a (3,)
    param)."""
    keyed, spec = tree_flatten_with_path(params)
    try:
        flat_updates = spec.flatten_up_to(updates)
    except (ValueError, TypeError, KeyError):
        raise ValueError("updates and params have different tree structures:\n"
                         f"  updates: {_describe(tree_structure(updates))}\n"
                         f"  params:  {_describe(spec)}") from None
    for (path, p), u in zip(keyed, flat_updates):
        if not isinstance(u, torch.Tensor):
            raise TypeError(f"update at {leaf_path(path)} is a {type(u).__name__}, not a tensor")
        if u.shape != p.shape:
            raise ValueError(f"update shape {tuple(u.shape)} != param shape {tuple(p.shape)} at "
                             f"{leaf_path(path)}")


# ----------------------------------------------------------------------------- validation


def check_hyperparameter(name: str, value: Any, *, low: float = 0.0, high: float = math.inf,
                         high_inclusive: bool = True) -> None:
    """Reject a hyperparameter that is not a finite real number in [low, high] (or [low, high)),
    or a 0-d float tensor. A tensor's value is not read: it may be traced by grad/vmap/compile,
    and reading it would synchronise with the device (a non-finite tensor rate is caught at run
    time by the rate update's non-finite guard)."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 0 or not value.is_floating_point():
            raise TypeError(f"{name} must be a Python float or a 0-d floating tensor, "
                            f"got a tensor of shape {tuple(value.shape)} and dtype {value.dtype}")
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number or a 0-d tensor, got {type(value).__name__}")
    value = float(value)
    closing = "]" if high_inclusive and math.isfinite(high) else ")"
    interval = f"[{low}, {high}{closing}"
    if math.isinf(value):
        raise ValueError(f"{name} must be finite, got {value} (allowed: {interval})")
    too_high = value > high if high_inclusive else value >= high
    if math.isnan(value) or value < low or too_high:
        raise ValueError(f"{name} must lie in {interval}, got {value}")


def check_lr_bounds(lr_bounds: Any) -> tuple[Optional[float], Optional[float]]:
    """``lr_bounds`` as (low, high): None, or a pair of None-or-finite real numbers with
    low <= high (Python numbers: they are static choices of the rule, not traced values)."""
    if lr_bounds is None:
        return None, None
    if not isinstance(lr_bounds, (tuple, list)) or len(lr_bounds) != 2:
        raise TypeError(f"lr_bounds must be None or a pair (low, high) of None or real numbers, "
                        f"got {lr_bounds!r}")
    bounds = []
    for i, bound in enumerate(lr_bounds):
        if bound is None:
            bounds.append(None)
            continue
        if isinstance(bound, bool) or not isinstance(bound, numbers.Real):
            raise TypeError(f"lr_bounds[{i}] must be None or a real number, got "
                            f"{type(bound).__name__}")
        if not math.isfinite(bound):
            raise ValueError(f"lr_bounds[{i}] must be finite (None for no bound), got {bound}")
        bounds.append(float(bound))
    low, high = bounds
    if low is not None and high is not None and low > high:
        raise ValueError(f"lr_bounds must have low <= high, got {tuple(lr_bounds)}")
    return low, high


Factory = TypeVar("Factory", bound=Callable[..., Any])
_building = threading.local()  # whether a rule factory is already running in this thread


def rule_factory(factory: Factory) -> Factory:
    """Prefix the ValueError/TypeError of a bad argument with the rule's name
    (``"adam_hd: lr must be finite, got inf"``): the name of the outermost rule factory called,
    so ``adamw_hd`` (built by ``adam_hd``) names itself."""

    @functools.wraps(factory)
    def build(*args: Any, **kwargs: Any) -> Any:
        if getattr(_building, "active", False):
            return factory(*args, **kwargs)
        _building.active = True
        try:
            return factory(*args, **kwargs)
        except (ValueError, TypeError) as error:
            if error.args and isinstance(error.args[0], str):
                error.args = (f"{factory.__name__}: {error.args[0]}",) + error.args[1:]
            raise
        finally:
            _building.active = False

    return build  # type: ignore[return-value]


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
