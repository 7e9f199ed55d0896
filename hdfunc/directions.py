"""Base directions d_t: the part of an optimizer that turns gradients into a step direction.

Every rule in hdfunc is "base direction d_t; u_t = -α_t d_t" (docs/algorithms.md, "The general
form"). The transforms here produce d_t; :mod:`hdfunc.hypergradient` scales it by a fixed or an
adapted learning rate. Each is pure and reads its hyperparameters from its closure.

Precision: the directions that divide by a root of a second moment (Adam, RMSprop, Adagrad) keep
their moments and compute d_t in the accumulation dtype, at least float32 (the arithmetic of
torch's fused kernels). In float16 the default ε = 1e-8 rounds to 0 and (1-β2) g² underflows
for |g| < 8e-3, so the same formula evaluated in float16 gives 0/0 or m/0: NaN or inf steps
(torch.optim.Adam's for-loop and foreach kernels do exactly that). float32 and float64 params
keep their arithmetic bit for bit. d_t is then float32 for float16/bfloat16 params; the step
-α d_t is rounded to the param's dtype once, by the learning-rate transform.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Union

import torch

from hdfunc.base import EmptyState, Transform, check_hyperparameter, require_params
from hdfunc.tree import (PyTree, first_leaf, mask_leaves, tree_accumulator_zeros, tree_flatten,
                         tree_leaves, tree_map, tree_unflatten, tree_zeros_like)

DIFFERENTIABLE_EPS_ROOT = 1e-16
"""The ``eps_root`` to pass to ``adam``/``adam_hd``/``adamw``/``adamw_hd``/``scale_by_adam``/
``scale_by_rms``/``scale_by_adagrad`` when differentiating *through* training (e.g. the loss after
K steps with respect to α_0 or β by ``torch.func.grad``/``jvp``).

With ``eps_root = 0`` (the default: the paper's and torch.optim's formula, Algorithm 3 of Baydin
et al.; docs/algorithms.md, "Adam and Adam-HD") an entry whose gradient has been exactly 0 so far (a
dead ReLU unit) has v = 0, the derivative of √v at 0 is infinite and 0·∞ makes the derivative NaN.
√(v̂ + eps_root) is differentiable at v̂ = 0. It changes a step by a relative ≈ eps_root / (2 v̂):
negligible unless gradients are ~1e-8 or smaller (and in float32 1e-16 is below the rounding of
any v̂ larger than ~1e-9)."""


def check_eps_root(eps_root: float | torch.Tensor) -> None:
    """``eps_root`` must be a finite real number >= 0 (or a 0-d float tensor, not inspected).

    Args:
        eps_root: ε_root of a direction that divides by a root of a second moment.

    Raises:
        ValueError: ``eps_root`` is negative or not finite.
        TypeError: ``eps_root`` is not a real number or a 0-d float tensor.
    """
    check_hyperparameter("eps_root", eps_root)


def _shifts(eps_root: float | torch.Tensor) -> bool:
    """Whether ε_root enters the formula: a Python 0 keeps today's arithmetic (√v) bit for bit."""
    return isinstance(eps_root, torch.Tensor) or float(eps_root) != 0.0


def identity() -> Transform:
    """SGD's direction: d_t = g_t.

    Returns:
        A stateless transform that passes the gradients through unchanged.
    """
    return Transform(lambda params: EmptyState(), lambda g, state, params: (g, state), "identity")


WeightDecayMask = Optional[Union[PyTree, Callable[[PyTree], PyTree]]]


def _decay(name: str, weight_decay: float | torch.Tensor, mask: WeightDecayMask) -> Callable:
    """update(x, state, params) -> (x + λ θ where the mask is True, state); the one place that
    adds a weight-decay term, for :func:`add_l2` (x = g) and :func:`add_decayed_weights` (x = d)."""

    def update(x: PyTree, state: EmptyState,
               params: Optional[PyTree] = None) -> tuple[PyTree, EmptyState]:
        params = require_params(params, name)
        leaves, spec = tree_flatten(x)
        param_leaves = tree_leaves(params)
        decayed = [True] * len(leaves) if mask is None else mask_leaves(mask, params,
                                                                          f"{name} mask")
        return tree_unflatten([xi + weight_decay * p if on else xi
                               for xi, p, on in zip(leaves, param_leaves, decayed)],
                              spec), state

    return update


def add_l2(weight_decay: float | torch.Tensor, mask: WeightDecayMask = None) -> Transform:
    """Coupled weight decay (an L2 penalty in the objective): g_t ← g_t + λ θ_{t-1}.

    Placed before the hypergradient transform, so h_t uses the gradient of the penalised
    objective, as in the paper's experiments. ``mask`` (a pytree of bools like the params, or a
    callable params -> such a pytree) decays only the tensors marked True (e.g. not biases and
    norms: ``mask=lambda ps: {k: p.ndim > 1 for k, p in ps.items()}``); None decays all.

    Args:
        weight_decay: λ, finite and >= 0 (or a 0-d tensor).
        mask: which tensors to decay: a pytree of bools like the params, a callable params ->
            such a pytree, or None (all).

    Returns:
        A transform that needs the params in ``update(grads, state, params)``.

    Raises:
        ValueError: ``weight_decay`` is negative or not finite.
        TypeError: ``mask`` is neither None, a pytree nor a callable.
    """
    check_hyperparameter("weight_decay", weight_decay)
    _check_mask(mask)
    return Transform(lambda params: EmptyState(), _decay("add_l2", weight_decay, mask), "add_l2",
                     needs_params=True)


def add_decayed_weights(weight_decay: float | torch.Tensor,
                        mask: WeightDecayMask = None) -> Transform:
    """Decoupled (AdamW-style) weight decay: d_t ← d_t + λ θ_{t-1}, so u_t = -α_t (d_t + λ θ_{t-1}).

    The decay is scaled by α and is therefore part of ∇_α u_t. ``mask`` as in :func:`add_l2`.

    Args:
        weight_decay: λ, finite and >= 0 (or a 0-d tensor).
        mask: which tensors to decay: a pytree of bools like the params, a callable params ->
            such a pytree, or None (all).

    Returns:
        A transform that needs the params in ``update(grads, state, params)``.

    Raises:
        ValueError: ``weight_decay`` is negative or not finite.
        TypeError: ``mask`` is neither None, a pytree nor a callable.
    """
    check_hyperparameter("weight_decay", weight_decay)
    _check_mask(mask)
    return Transform(lambda params: EmptyState(),
                     _decay("add_decayed_weights", weight_decay, mask), "add_decayed_weights",
                     needs_params=True)


def _check_mask(mask: WeightDecayMask) -> None:
    if mask is not None and not callable(mask) and not tree_leaves(mask):
        raise TypeError(f"mask must be None, a pytree of bools like the params or a callable "
                        f"params -> such a pytree, got {mask!r}")


class MomentumState(NamedTuple):
    """The state of :func:`nesterov`.

    Attributes:
        velocity: v_{t-1}, a pytree like the params.
    """

    velocity: PyTree  # v_{t-1}


def nesterov(momentum: float | torch.Tensor = 0.9) -> Transform:
    """Nesterov momentum: v_t = μ v_{t-1} + g_t;  d_t = g_t + μ v_t.

    With dampening 0 this is torch.optim.SGD(momentum=μ, nesterov=True).

    Args:
        momentum: μ, in [0, 1) (or a 0-d tensor).

    Returns:
        A transform with state :class:`MomentumState`.

    Raises:
        ValueError: ``momentum`` is outside [0, 1).
    """
    return _momentum(momentum, nesterov=True)


def heavy_ball(momentum: float | torch.Tensor = 0.9) -> Transform:
    """Heavy-ball (Polyak) momentum: v_t = μ v_{t-1} + g_t;  d_t = v_t.

    With dampening 0 this is torch.optim.SGD(momentum=μ) (nesterov off). The direction of the
    last step is the velocity in the state, so HD needs no stored copy of it
    (``previous_output``).

    Args:
        momentum: μ, in [0, 1) (or a 0-d tensor).

    Returns:
        A transform with state :class:`MomentumState`.

    Raises:
        ValueError: ``momentum`` is outside [0, 1).
    """
    return _momentum(momentum, nesterov=False)


def _momentum(momentum: float | torch.Tensor, nesterov: bool) -> Transform:
    """v_t = μ v_{t-1} + g_t, and d_t = g_t + μ v_t (Nesterov) or d_t = v_t (heavy ball, whose
    last direction is the velocity in the state: ``previous_output``)."""
    check_hyperparameter("momentum", momentum, high=1.0, high_inclusive=False)

    def init(params: PyTree) -> MomentumState:
        return MomentumState(tree_zeros_like(params))

    def update(g: PyTree, state: MomentumState, params: PyTree) -> tuple[PyTree, MomentumState]:
        velocity = tree_map(lambda v, gi: momentum * v + gi, state.velocity, g)
        if not nesterov:
            return velocity, MomentumState(velocity)
        direction = tree_map(lambda gi, v: gi + momentum * v, g, velocity)
        return direction, MomentumState(velocity)

    if nesterov:
        return Transform(init, update, "nesterov")
    return Transform(init, update, "heavy_ball", previous_output=lambda state: state.velocity)


class AdamState(NamedTuple):
    """The state of :func:`scale_by_adam`.

    Attributes:
        count: t-1, the steps taken (a 0-d int64 tensor).
        mu: m_{t-1}, the first moment, in the accumulation dtype.
        nu: v_{t-1}, the second moment, in the accumulation dtype.
    """

    count: torch.Tensor  # t-1: steps taken
    mu: PyTree  # m_{t-1}
    nu: PyTree  # v_{t-1}


def scale_by_adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, *,
                  eps_root: float = 0.0) -> Transform:
    """Adam's direction (Algorithm 3 of Baydin et al.; docs/algorithms.md, "Adam and Adam-HD")
    d_t = m̂_t / (√(v̂_t + ε_root) + ε), with
    m_t = β1 m_{t-1} + (1-β1) g_t,  v_t = β2 v_{t-1} + (1-β2) g_t²,
    m̂_t = m_t / (1-β1^t),  v̂_t = v_t / (1-β2^t).

    ``eps_root`` (ε_root, as optax's ``scale_by_adam(eps_root=...)``) is 0 in the paper and in
    torch.optim.Adam; with 0 (a Python number) the arithmetic is unchanged bit for bit (torch's
    order: √v / √(1-β2^t) + ε). Set it (to :data:`DIFFERENTIABLE_EPS_ROOT`) to differentiate
    through training: √v̂ has an infinite derivative at v̂ = 0, which any entry with an
    exactly-zero gradient history has, and the derivative of the loss after K steps with respect
    to α_0 or β is then NaN.

    ``previous_output`` recomputes d_{t-1} from (t-1, m_{t-1}, v_{t-1}) with the bias corrections
    of step t-1 and the same formula, so Adam-HD stores no extra buffer (d_0 = 0).

    m, v and d are in the accumulation dtype (float32 for float16/bfloat16 params; see the
    module's note on precision), so ε = 1e-8 is not rounded to 0 and d_0 = 0/(0 + ε) = 0.

    Args:
        b1: β1, the decay of the first moment, in [0, 1).
        b2: β2, the decay of the second moment, in [0, 1).
        eps: ε, added to the root, >= 0.
        eps_root: ε_root, added under the root, >= 0.

    Returns:
        A transform with state :class:`AdamState` and a ``previous_output`` (d_{t-1}).

    Raises:
        ValueError: a hyperparameter is out of its range or not finite.
    """
    check_hyperparameter("betas[0]", b1, high=1.0, high_inclusive=False)
    check_hyperparameter("betas[1]", b2, high=1.0, high_inclusive=False)
    check_hyperparameter("eps", eps)
    check_eps_root(eps_root)
    shift = _shifts(eps_root)

    def init(params: PyTree) -> AdamState:
        count = params_count(params)
        return AdamState(count, tree_accumulator_zeros(params), tree_accumulator_zeros(params))

    def direction(count: torch.Tensor, mu: PyTree, nu: PyTree) -> PyTree:
        # count == 0 only before the first step, where m = v = 0 and the direction is 0.
        t = count.to(torch.float64)
        correction1 = torch.where(count > 0, 1 - b1 ** t, torch.ones_like(t))
        if shift:
            correction2 = torch.where(count > 0, 1 - b2 ** t, torch.ones_like(t))
        else:
            correction2_sqrt = torch.where(count > 0, (1 - b2 ** t).sqrt(), torch.ones_like(t))

        def leaf(m: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            c1 = correction1.to(m.dtype)
            if shift:  # √(v̂ + ε_root), as written
                return (m / c1) / ((v / correction2.to(m.dtype) + eps_root).sqrt() + eps)
            c2 = correction2_sqrt.to(m.dtype)
            return (m / c1) / (v.sqrt() / c2 + eps)  # √v / √(1-β2^t): torch.optim.Adam's order

        return tree_map(leaf, mu, nu)

    def update(g: PyTree, state: AdamState, params: PyTree) -> tuple[PyTree, AdamState]:
        mu = tree_map(lambda m, gi: b1 * m + (1 - b1) * gi.to(m.dtype), state.mu, g)
        nu = tree_map(lambda v, gi: b2 * v + (1 - b2) * gi.to(v.dtype) * gi.to(v.dtype),
                      state.nu, g)
        count = state.count + 1
        return direction(count, mu, nu), AdamState(count, mu, nu)

    def previous_output(state: AdamState) -> PyTree:
        return direction(state.count, state.mu, state.nu)

    return Transform(init, update, "scale_by_adam", previous_output)


def _root(eps_root: float | torch.Tensor):
    """x ↦ √(x + ε_root); exactly x.sqrt() for a Python ε_root = 0."""
    if _shifts(eps_root):
        return lambda x: (x + eps_root).sqrt()
    return torch.sqrt


class RMSState(NamedTuple):
    """The state of :func:`scale_by_rms` and :func:`scale_by_adagrad`.

    Attributes:
        nu: the running mean (RMSprop) or sum (Adagrad) of g², in the accumulation dtype.
    """

    nu: PyTree  # running mean of g²


def scale_by_rms(decay: float = 0.99, eps: float = 1e-8, *, eps_root: float = 0.0) -> Transform:
    """RMSprop's direction (as torch.optim.RMSprop): v_t = ρ v_{t-1} + (1-ρ) g_t²;
    d_t = g_t / (√(v_t + ε_root) + ε), with v and d in the accumulation dtype (as Adam's).

    ``eps_root`` = 0 (default) keeps the arithmetic above bit for bit; pass
    :data:`DIFFERENTIABLE_EPS_ROOT` to differentiate through training (√v at v = 0 has an infinite
    derivative, see :func:`scale_by_adam`).

    Args:
        decay: ρ, the decay of the mean square, in [0, 1).
        eps: ε, added to the root, >= 0.
        eps_root: ε_root, added under the root, >= 0.

    Returns:
        A transform with state :class:`RMSState`.

    Raises:
        ValueError: a hyperparameter is out of its range or not finite.
    """
    check_hyperparameter("decay", decay, high=1.0, high_inclusive=False)
    check_hyperparameter("eps", eps)
    check_eps_root(eps_root)
    root = _root(eps_root)

    def update(g: PyTree, state: RMSState, params: PyTree) -> tuple[PyTree, RMSState]:
        nu = tree_map(lambda v, gi: decay * v + (1 - decay) * gi.to(v.dtype) * gi.to(v.dtype),
                      state.nu, g)
        return tree_map(lambda gi, v: gi.to(v.dtype) / (root(v) + eps), g, nu), RMSState(nu)

    return Transform(lambda params: RMSState(tree_accumulator_zeros(params)), update,
                     "scale_by_rms")


def scale_by_adagrad(eps: float = 1e-10, *, eps_root: float = 0.0) -> Transform:
    """Adagrad's direction (as torch.optim.Adagrad): s_t = s_{t-1} + g_t²;
    d_t = g_t / (√(s_t + ε_root) + ε), with s and d in the accumulation dtype (as Adam's).

    ``eps_root`` = 0 (default) keeps the arithmetic above bit for bit; pass
    :data:`DIFFERENTIABLE_EPS_ROOT` to differentiate through training (see
    :func:`scale_by_adam`).

    Args:
        eps: ε, added to the root, >= 0.
        eps_root: ε_root, added under the root, >= 0.

    Returns:
        A transform with state :class:`RMSState` (``nu`` holds the sum s_t).

    Raises:
        ValueError: a hyperparameter is negative or not finite.
    """
    check_hyperparameter("eps", eps)
    check_eps_root(eps_root)
    root = _root(eps_root)

    def update(g: PyTree, state: RMSState, params: PyTree) -> tuple[PyTree, RMSState]:
        total = tree_map(lambda s, gi: s + gi.to(s.dtype) * gi.to(s.dtype), state.nu, g)
        return tree_map(lambda gi, s: gi.to(s.dtype) / (root(s) + eps), g, total), RMSState(total)

    return Transform(lambda params: RMSState(tree_accumulator_zeros(params)), update,
                     "scale_by_adagrad")


class LionState(NamedTuple):
    """The state of :func:`scale_by_lion`.

    Attributes:
        mu: m_{t-1}, a pytree like the params.
    """

    mu: PyTree


def scale_by_lion(b1: float = 0.9, b2: float = 0.99) -> Transform:
    """Lion's direction: d_t = sign(β1 m_{t-1} + (1-β1) g_t); m_t = β2 m_{t-1} + (1-β2) g_t.

    Args:
        b1: β1, the interpolation of the direction, in [0, 1].
        b2: β2, the decay of the momentum, in [0, 1].

    Returns:
        A transform with state :class:`LionState`.

    Raises:
        ValueError: a beta is outside [0, 1].
    """
    check_hyperparameter("betas[0]", b1, high=1.0)
    check_hyperparameter("betas[1]", b2, high=1.0)

    def update(g: PyTree, state: LionState, params: PyTree) -> tuple[PyTree, LionState]:
        direction = tree_map(lambda m, gi: torch.sign(b1 * m + (1 - b1) * gi), state.mu, g)
        mu = tree_map(lambda m, gi: b2 * m + (1 - b2) * gi, state.mu, g)
        return direction, LionState(mu)

    return Transform(lambda params: LionState(tree_zeros_like(params)), update, "scale_by_lion")


def params_count(params: PyTree) -> torch.Tensor:
    """A 0-d int64 step counter on the params' device (a tensor, so it batches under vmap).

    Args:
        params: any pytree of tensors (at least one leaf).

    Returns:
        A 0-d int64 zero on the device of the first leaf.
    """
    return first_leaf(params).new_zeros((), dtype=torch.int64)
