"""The rule protocol: a pair of pure functions ``init`` and ``update`` over pytrees of tensors.

    state = rule.init(params)
    updates, state = rule.update(grads, state, params)
    params = apply_updates(params, updates)

No function here mutates its inputs, so rules compose with ``torch.func.grad``, ``jvp``,
``vmap`` and ``torch.compile``.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import math
import numbers
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple, Optional, TypeVar

import torch

from hdfunc.tree import (PyTree, leaf_path, tree_flatten, tree_flatten_with_path, tree_map,
                         tree_structure)

InitFn = Callable[[PyTree], PyTree]
UpdateFn = Callable[[PyTree, PyTree, Optional[PyTree]], "tuple[PyTree, PyTree]"]


@dataclass(frozen=True, eq=False)
class Transform:
    """A pure gradient transformation (optax's ``GradientTransformation``, simplified).

    ``previous_output``, when given, recomputes from the state alone the output that the last
    ``update`` returned (Adam's direction m̂/(√v̂+ε) is such a function of m and v), so that
    hypergradient descent needs no stored copy of it.

    ``rate_law``, on a transform that adapts a learning rate, declares how it does so (an
    :class:`hdfunc.HDConfig`: granularity, additive or multiplicative rule, bounds, transition,
    higher order); the verification suite's oracle replays exactly that law.

    ``needs_params`` says whether ``update`` reads the values of ``params`` (weight decay does);
    a transform that does not accepts ``params=None`` (it may read only the grads' dtypes).

    Attributes:
        init: ``init(params) -> state``.
        update: ``update(updates, state, params=None) -> (updates, state)``.
        name: the transform's name, in its ``repr`` and error messages.
        previous_output: ``previous_output(state)``, the output of the last ``update``, or None.
        rate_law: the :class:`hdfunc.HDOptions` of a transform that adapts a learning rate, else
            None.
        needs_params: whether ``update`` reads the values of ``params``.
    """

    init: InitFn
    update: UpdateFn
    name: str = "transform"
    previous_output: Optional[Callable[[PyTree], PyTree]] = None
    rate_law: Optional[Any] = None
    needs_params: bool = False


@dataclass(frozen=True, eq=False)
class Rule(Transform):
    """A complete update rule: ``updates`` are added to the params by :func:`apply_updates`.

    ``update`` checks its inputs (tree structure, shapes and dtypes of grads against params; the
    state against the one this rule makes) and raises ``TypeError``/``ValueError`` naming the
    problem.

    Attributes:
        hyperparams: the rule's hyperparameters, by name (its ``repr``).
    """

    hyperparams: dict = field(default_factory=dict)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.hyperparams.items())
        return f"{self.name}({args})"


class EmptyState(NamedTuple):
    """State of a stateless transform."""


def chain(*transforms: Transform, name: str = "chain") -> Transform:
    """Apply ``transforms`` one after another; the state is the tuple of their states.

    Args:
        *transforms: the transforms, applied in this order.
        name: the chain's name.

    Returns:
        A transform whose state is the tuple of the transforms' states.

    Raises:
        ValueError: two of ``transforms`` adapt a learning rate (declare a ``rate_law``).
    """

    def init(params: PyTree) -> tuple:
        return tuple(t.init(params) for t in transforms)

    def update(updates: PyTree, state: tuple,
               params: Optional[PyTree] = None) -> tuple[PyTree, tuple]:
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
    return Transform(init, update, name, previous_output, laws[0] if laws else None,
                     needs_params=any(t.needs_params for t in transforms))


def require_params(params: Optional[PyTree], who: str) -> PyTree:
    """``params``, or a ValueError saying that ``who`` reads them (``params=None`` was given).

    Args:
        params: the params passed to ``update``, or None.
        who: the name of the transform that reads them, in the error message.

    Returns:
        ``params``.

    Raises:
        ValueError: ``params`` is None.
    """
    if params is None:
        raise ValueError(f"{who} needs params in update(grads, state, params): it reads the "
                         "parameter values (weight decay)")
    return params


def apply_updates(params: PyTree, updates: PyTree) -> PyTree:
    """θ_t = θ_{t-1} + u_t, leaf by leaf, keeping each param's dtype. Returns new tensors.

    ``updates`` must have the tree structure and the shapes of ``params`` (checked, naming the
    leaf, except while ``torch.compile`` traces; under ``vmap`` the per-example shapes).

    Args:
        params: the params θ_{t-1}, a pytree of tensors.
        updates: the updates u_t, a pytree like ``params``.

    Returns:
        The new params θ_t, a pytree of new tensors like ``params``.

    Raises:
        ValueError: ``updates`` and ``params`` differ in structure or shape.
        TypeError: a leaf of ``updates`` is not a tensor.
    """
    if not torch.compiler.is_compiling():
        check_updates(updates, params)
    return tree_map(lambda p, u: p + u.to(p.dtype), params, updates)


def check_updates(updates: PyTree, params: PyTree) -> None:
    """Updates must have the structure of params (dict keys in any order) and, leaf by leaf,
    the shape of the param: no broadcasting (a (1,) update would move every entry of a (3,)
    param).

    Args:
        updates: the updates, a pytree of tensors.
        params: the params, a pytree of tensors.

    Raises:
        ValueError: the tree structures differ, or an update's shape is not its param's.
        TypeError: a leaf of ``updates`` is not a tensor.
    """
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
    time by the rate update's non-finite guard).

    Args:
        name: the hyperparameter's name, in the error message.
        value: its value.
        low: the smallest value allowed.
        high: the largest value allowed (or the bound, when ``high_inclusive`` is False).
        high_inclusive: whether ``high`` itself is allowed.

    Raises:
        TypeError: ``value`` is not a real number or a 0-d floating tensor.
        ValueError: ``value`` is not finite or lies outside the interval.
    """
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
    low <= high (Python numbers: they are static choices of the rule, not traced values).

    Args:
        lr_bounds: None, or a pair (low, high) of None or real numbers.

    Returns:
        The pair (low, high) of None or floats; (None, None) for ``lr_bounds=None``.

    Raises:
        TypeError: ``lr_bounds`` is not None or a pair, or a bound is not None or a real number.
        ValueError: a bound is not finite, or low > high.
    """
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


def rule_factory(factory: Optional[Factory] = None, *,
                 extra_options: tuple[str, ...] = ()) -> Any:
    """Prefix the ValueError/TypeError of a bad argument with the rule's name
    (``"adam_hd: lr must be finite, got inf"``): the name of the outermost rule factory called,
    so ``adamw_hd`` (built by ``adam_hd``) names itself.

    A keyword the factory does not take is refused before it runs, naming the valid options (its
    own parameters, plus ``extra_options`` where it takes ``**options``) and the closest match:
    ``adam_hd: unknown option 'modee' (did you mean 'mode'?); valid options: lr, ...``.
    Use as ``@rule_factory`` or ``@rule_factory(extra_options=HD_OPTIONS)``.

    Args:
        factory: the rule factory to wrap (None when used as ``@rule_factory(...)``).
        extra_options: the option names accepted through the factory's ``**options``.

    Returns:
        The wrapped factory, or (with ``factory=None``) a decorator that wraps one.
    """
    if factory is None:
        return functools.partial(rule_factory, extra_options=extra_options)
    parameters = inspect.signature(factory).parameters.values()
    named = [p.name for p in parameters
             if p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)]
    takes_options = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)
    valid = tuple(named) + (tuple(extra_options) if takes_options else ())
    check_extra = takes_options and bool(extra_options)

    def check_options(kwargs: dict) -> None:
        for key in kwargs:
            if key in valid or (takes_options and not check_extra):
                continue
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise TypeError(f"unknown option {key!r}{hint}; valid options: {', '.join(valid)}")

    @functools.wraps(factory)
    def build(*args: Any, **kwargs: Any) -> Any:
        if getattr(_building, "active", False):
            check_options(kwargs)
            return factory(*args, **kwargs)
        _building.active = True
        try:
            check_options(kwargs)
            return factory(*args, **kwargs)
        except (ValueError, TypeError) as error:
            if error.args and isinstance(error.args[0], str):
                error.args = (f"{factory.__name__}: {error.args[0]}",) + error.args[1:]
            raise
        finally:
            _building.active = False

    build.valid_options = valid  # type: ignore[attr-defined]
    return build


def _describe(spec: Any) -> str:
    text = str(spec)
    return text if len(text) < 300 else text[:297] + "..."


def check_grad_structure(grads: PyTree, params: PyTree) -> None:
    """Grads must have the tree structure, shapes and dtypes of params.

    Args:
        grads: the grads, a pytree of tensors.
        params: the params, a pytree of floating-point tensors.

    Raises:
        ValueError: the tree structures or a leaf's shape differ.
        TypeError: a leaf is not a tensor, its dtype differs, or a param is not floating point.
    """
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


def checked_rule(transform: Transform, *, name: str, hyperparams: dict) -> Rule:
    """Wrap a transform as a public :class:`Rule` whose ``update`` checks its inputs.

    ``update(grads, state, params=None)``: params may be left out unless the transform reads
    their values (``needs_params``: weight decay), which raises ``"<name> needs params in
    update(...)"``.

    Args:
        transform: the transform to wrap.
        name: the rule's name, at the start of its error messages.
        hyperparams: the rule's hyperparameters, by name (for its ``repr`` and the registry).

    Returns:
        The checked :class:`Rule`.
    """
    expected_spec: dict = {}

    def state_spec_for(params: PyTree) -> Any:
        p_spec = tree_structure(params)
        key = str(p_spec)
        if key not in expected_spec:
            meta = tree_map(lambda p: torch.empty_like(p, device="meta"), params)
            expected_spec.clear()
            expected_spec[key] = tree_structure(transform.init(meta))
        return expected_spec[key]

    def update(grads: PyTree, state: PyTree,
               params: Optional[PyTree] = None) -> tuple[PyTree, PyTree]:
        if params is None and transform.needs_params:
            require_params(params, name)
        if not torch.compiler.is_compiling():
            # without params, the grads stand for their structure, shapes and dtypes
            check_grad_structure(grads, grads if params is None else params)
            got = tree_structure(state)
            want = state_spec_for(grads if params is None else params)
            if got != want:
                raise TypeError(f"this state was not made by {name}.init for these params "
                                f"(a state from another rule or other params?)\n"
                                f"  expected: {_describe(want)}\n  got:      {_describe(got)}")
        # a rule that reads only the params' dtypes gets them from the grads (checked alike)
        return transform.update(grads, state, grads if params is None else params)

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
                needs_params=transform.needs_params, hyperparams=dict(hyperparams))
