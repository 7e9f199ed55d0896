"""The paper's rules (SGD, SGDN, Adam and their HD variants) and AdamW / AdamW-HD, as thin
compositions.

    base rule = [coupled L2] → base direction [→ decoupled decay] → u = -α d
    HD rule   = [coupled L2] → hypergradient(base direction [→ decoupled decay])

so an HD rule with ``hypergrad_lr=0`` computes exactly its base rule's updates. A bad argument
raises a ValueError/TypeError prefixed with the rule's name ("adam_hd: lr must be finite ...").
"""

from __future__ import annotations

from typing import Any

import torch

from hdfunc.base import Rule, Transform, chain, checked_rule, rule_factory
from hdfunc.directions import (WeightDecayMask, add_decayed_weights, add_l2, heavy_ball,
                               identity, nesterov, scale_by_adam)
from hdfunc.hyperdescent import hyperdescent
from hdfunc.hypergradient import hypergradient, scale_by_lr
from hdfunc.options import HD_OPTIONS, HDOptions, Schedule

Number = float | torch.Tensor


def hd_rule_factory(factory: Any) -> Any:
    """:func:`hdfunc.base.rule_factory` for an HD rule: it also takes the HD options (the
    fields of :class:`hdfunc.HDOptions`, or ``options=HDOptions(...)``), which are appended to
    its docstring so ``help(hdfunc.adam_hd)`` lists them.

    Args:
        factory: the HD rule factory to wrap.

    Returns:
        The wrapped factory, its docstring extended with the HD options.
    """
    factory.__doc__ = (factory.__doc__ or "") + HDOptions.docstring()
    return rule_factory(factory, extra_options=HD_OPTIONS + ("options",))


def _with_mask(hyperparams: dict, mask: WeightDecayMask) -> dict:
    return hyperparams if mask is None else {**hyperparams, "weight_decay_mask": mask}


def _has_decay(weight_decay: Number) -> bool:
    return isinstance(weight_decay, torch.Tensor) or float(weight_decay) != 0.0


@rule_factory
def base_rule(direction: Transform, lr: Number | Schedule, *, weight_decay: Number = 0.0,
              decoupled_weight_decay: bool = False, weight_decay_mask: WeightDecayMask = None,
              name: str | None = None, hyperparams: dict | None = None) -> Rule:
    """A fixed-rate rule u_t = -α d_t over any base ``direction`` (e.g. ``scale_by_rms()``).

    ``lr`` may be a schedule, a callable of the step count (see :func:`hdfunc.scale_by_lr`);
    ``weight_decay_mask`` (pytree of bools or callable params -> pytree) limits the decay to the
    tensors marked True (see :func:`hdfunc.add_l2`).

    Args:
        direction: the base direction d_t (a :class:`hdfunc.Transform`).
        lr: α (a number >= 0, a 0-d tensor or a schedule: a callable of the step count).
        weight_decay: λ of the L2 term λθ added to the gradient (coupled, as in the paper).
        decoupled_weight_decay: decay θ by αλθ apart from the gradient (AdamW) instead.
        weight_decay_mask: a pytree of bools like the params, or a callable params -> such a
            pytree: only the True leaves are decayed (None: all).
        name: the rule's name (default: the direction's).
        hyperparams: what the rule's ``repr`` shows (default: lr and weight_decay).

    Returns:
        A :class:`hdfunc.Rule` whose state holds α (:func:`hdfunc.get_lr`).
    """
    coupled, direction = _with_decay(direction, weight_decay, decoupled_weight_decay,
                                     weight_decay_mask)
    name = name or f"{direction.name}"
    return checked_rule(chain(*coupled, direction, scale_by_lr(lr), name=name), name=name,
                     hyperparams=_with_mask(hyperparams or {"lr": lr,
                                                            "weight_decay": weight_decay},
                                            weight_decay_mask))


@hd_rule_factory
def hd_rule(direction: Transform, lr: Number, hypergrad_lr: Number, *,
            weight_decay: Number = 0.0, decoupled_weight_decay: bool = False,
            weight_decay_mask: WeightDecayMask = None, name: str | None = None,
            hyperparams: dict | None = None, **hd_options: Any) -> Rule:
    """Hypergradient descent on the learning rate of any base ``direction``: a one-liner for
    RMSprop-HD, Adagrad-HD, Lion-HD, ... ``hd_options`` are the fields of
    :class:`hdfunc.HDOptions`.

    Args:
        direction: the base direction d_t (a :class:`hdfunc.Transform`).
        lr: α_0, the initial learning rate HD adapts from (a number >= 0 or a 0-d tensor).
        hypergrad_lr: β, the hypergradient learning rate (a number >= 0 or a 0-d tensor).
        weight_decay: λ of the L2 term λθ added to the gradient (coupled, as in the paper).
        decoupled_weight_decay: decay θ by αλθ apart from the gradient (AdamW) instead.
        weight_decay_mask: a pytree of bools like the params, or a callable params -> such a
            pytree: only the True leaves are decayed (None: all).
        name: the rule's name (default: the direction's, with ``_hd``).
        hyperparams: what the rule's ``repr`` shows.
        **hd_options: the HD options (below).

    Returns:
        A :class:`hdfunc.Rule` whose state holds an :class:`hdfunc.HDState` (α_t, β_t, h_t).
    """
    coupled, direction = _with_decay(direction, weight_decay, decoupled_weight_decay,
                                     weight_decay_mask)
    name = name or f"{direction.name}_hd"
    core = hypergradient(direction, lr, hypergrad_lr, **hd_options)
    params = hyperparams or {"lr": lr, "hypergrad_lr": hypergrad_lr, "weight_decay": weight_decay}
    return checked_rule(chain(*coupled, core, name=name), name=name,
                     hyperparams=_with_mask({**params, **hd_options}, weight_decay_mask))


def _with_decay(direction: Transform, weight_decay: Number, decoupled: bool,
                mask: WeightDecayMask = None) -> tuple[list[Transform], Transform]:
    if not _has_decay(weight_decay):
        add_l2(weight_decay, mask)  # validates the values
        return [], direction
    if decoupled:
        return [], chain(direction, add_decayed_weights(weight_decay, mask), name=direction.name)
    return [add_l2(weight_decay, mask)], direction


def _betas(betas: tuple[float, float]) -> tuple[float, float]:
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    return betas[0], betas[1]


# ----------------------------------------------------------------------------- SGD


@rule_factory
def sgd(lr: Number | Schedule, weight_decay: Number = 0.0, *,
        decoupled_weight_decay: bool = False, weight_decay_mask: WeightDecayMask = None) -> Rule:
    """SGD: u_t = -α g_t (Algorithm 1 without HD; torch.optim.SGD).

    Args:
        lr: α (a number >= 0, a 0-d tensor or a schedule: a callable of the step count).
        weight_decay: λ of the L2 term λθ added to the gradient (coupled, as in the paper).
        decoupled_weight_decay: decay θ by αλθ apart from the gradient (AdamW) instead.
        weight_decay_mask: a pytree of bools like the params, or a callable params -> such a
            pytree: only the True leaves are decayed (None: all).

    Returns:
        A :class:`hdfunc.Rule` whose state holds α (:func:`hdfunc.get_lr`).
    """
    return base_rule(identity(), lr, weight_decay=weight_decay,
                     decoupled_weight_decay=decoupled_weight_decay,
                     weight_decay_mask=weight_decay_mask, name="sgd",
                     hyperparams={"lr": lr, "weight_decay": weight_decay})


@hd_rule_factory
def sgd_hd(lr: Number, hypergrad_lr: Number, weight_decay: Number = 0.0, *,
           decoupled_weight_decay: bool = False,
           weight_decay_mask: WeightDecayMask = None, **hd_options: Any) -> Rule:
    """SGD-HD (Algorithm 1; Eqs. 2-4): h_t = -g_t·g_{t-1}; α_t = α_{t-1} - β h_t; u_t = -α_t g_t.

    Args:
        lr: α_0, the initial learning rate HD adapts from (a number >= 0 or a 0-d tensor).
        hypergrad_lr: β, the hypergradient learning rate (a number >= 0 or a 0-d tensor).
        weight_decay: λ of the L2 term λθ added to the gradient (coupled, as in the paper).
        decoupled_weight_decay: decay θ by αλθ apart from the gradient (AdamW) instead.
        weight_decay_mask: a pytree of bools like the params, or a callable params -> such a
            pytree: only the True leaves are decayed (None: all).

    Returns:
        A :class:`hdfunc.Rule` whose state holds an :class:`hdfunc.HDState` (α_t, β_t, h_t).
    """
    return hd_rule(identity(), lr, hypergrad_lr, weight_decay=weight_decay,
                   decoupled_weight_decay=decoupled_weight_decay,
                   weight_decay_mask=weight_decay_mask, name="sgd_hd", **hd_options)


# ----------------------------------------------------------------------------- SGD + Nesterov


@rule_factory
def sgdn(lr: Number | Schedule, momentum: Number = 0.9, weight_decay: Number = 0.0, *,
         decoupled_weight_decay: bool = False, weight_decay_mask: WeightDecayMask = None) -> Rule:
    """SGD with Nesterov momentum: v_t = μ v_{t-1} + g_t; u_t = -α (g_t + μ v_t)
    (Algorithm 2 without HD; torch.optim.SGD(momentum=μ, nesterov=True)).

    Args:
        lr: α (a number >= 0, a 0-d tensor or a schedule: a callable of the step count).
        momentum: μ in [0, 1).
        weight_decay: λ of the L2 term λθ added to the gradient (coupled, as in the paper).
        decoupled_weight_decay: decay θ by αλθ apart from the gradient (AdamW) instead.
        weight_decay_mask: a pytree of bools like the params, or a callable params -> such a
            pytree: only the True leaves are decayed (None: all).

    Returns:
        A :class:`hdfunc.Rule` whose state holds α (:func:`hdfunc.get_lr`).
    """
    return base_rule(nesterov(momentum), lr, weight_decay=weight_decay,
                     decoupled_weight_decay=decoupled_weight_decay,
                     weight_decay_mask=weight_decay_mask, name="sgdn",
                     hyperparams={"lr": lr, "momentum": momentum, "weight_decay": weight_decay})


@hd_rule_factory
def sgdn_hd(lr: Number, hypergrad_lr: Number, momentum: Number = 0.9,
            weight_decay: Number = 0.0, *, decoupled_weight_decay: bool = False,
            weight_decay_mask: WeightDecayMask = None, **hd_options: Any) -> Rule:
    """SGDN-HD (Algorithm 2): h_t = g_t·∇_α u_{t-1} with ∇_α u_{t-1} = -(g_{t-1} + μ v_{t-1});
    α_t = α_{t-1} - β h_t; v_t = μ v_{t-1} + g_t; u_t = -α_t (g_t + μ v_t).

    Args:
        lr: α_0, the initial learning rate HD adapts from (a number >= 0 or a 0-d tensor).
        hypergrad_lr: β, the hypergradient learning rate (a number >= 0 or a 0-d tensor).
        momentum: μ in [0, 1).
        weight_decay: λ of the L2 term λθ added to the gradient (coupled, as in the paper).
        decoupled_weight_decay: decay θ by αλθ apart from the gradient (AdamW) instead.
        weight_decay_mask: a pytree of bools like the params, or a callable params -> such a
            pytree: only the True leaves are decayed (None: all).

    Returns:
        A :class:`hdfunc.Rule` whose state holds an :class:`hdfunc.HDState` (α_t, β_t, h_t).
    """
    return hd_rule(nesterov(momentum), lr, hypergrad_lr, weight_decay=weight_decay,
                   decoupled_weight_decay=decoupled_weight_decay,
                   weight_decay_mask=weight_decay_mask, name="sgdn_hd",
                   hyperparams={"lr": lr, "hypergrad_lr": hypergrad_lr, "momentum": momentum,
                                "weight_decay": weight_decay}, **hd_options)


# ----------------------------------------------------------------------------- SGD + heavy ball


@rule_factory
def sgdm(lr: Number | Schedule, momentum: Number = 0.9, weight_decay: Number = 0.0, *,
         decoupled_weight_decay: bool = False, weight_decay_mask: WeightDecayMask = None) -> Rule:
    """SGD with heavy-ball momentum: v_t = μ v_{t-1} + g_t; u_t = -α v_t
    (torch.optim.SGD(momentum=μ), dampening 0, nesterov off).

    Args:
        lr: α (a number >= 0, a 0-d tensor or a schedule: a callable of the step count).
        momentum: μ in [0, 1).
        weight_decay: λ of the L2 term λθ added to the gradient (coupled).
        decoupled_weight_decay: decay θ by αλθ apart from the gradient (AdamW) instead.
        weight_decay_mask: a pytree of bools like the params, or a callable params -> such a
            pytree: only the True leaves are decayed (None: all).

    Returns:
        A :class:`hdfunc.Rule` whose state holds α (:func:`hdfunc.get_lr`).
    """
    return base_rule(heavy_ball(momentum), lr, weight_decay=weight_decay,
                     decoupled_weight_decay=decoupled_weight_decay,
                     weight_decay_mask=weight_decay_mask, name="sgdm",
                     hyperparams={"lr": lr, "momentum": momentum, "weight_decay": weight_decay})


@hd_rule_factory
def sgdm_hd(lr: Number, hypergrad_lr: Number, momentum: Number = 0.9,
            weight_decay: Number = 0.0, *, decoupled_weight_decay: bool = False,
            weight_decay_mask: WeightDecayMask = None, **hd_options: Any) -> Rule:
    """Heavy-ball SGD-HD (the general form with d = v): h_t = -g_t·v_{t-1};
    α_t = α_{t-1} - β h_t; v_t = μ v_{t-1} + g_t; u_t = -α_t v_t. d_{t-1} = v_{t-1} is the
    momentum buffer itself, so no direction is stored (:class:`hdfunc.optim.SGDHD` with
    ``momentum=μ`` is its optimizer twin).

    Args:
        lr: α_0, the initial learning rate HD adapts from (a number >= 0 or a 0-d tensor).
        hypergrad_lr: β, the hypergradient learning rate (a number >= 0 or a 0-d tensor).
        momentum: μ in [0, 1).
        weight_decay: λ of the L2 term λθ added to the gradient (coupled).
        decoupled_weight_decay: decay θ by αλθ apart from the gradient (AdamW) instead.
        weight_decay_mask: a pytree of bools like the params, or a callable params -> such a
            pytree: only the True leaves are decayed (None: all).

    Returns:
        A :class:`hdfunc.Rule` whose state holds an :class:`hdfunc.HDState` (α_t, β_t, h_t).
    """
    return hd_rule(heavy_ball(momentum), lr, hypergrad_lr, weight_decay=weight_decay,
                   decoupled_weight_decay=decoupled_weight_decay,
                   weight_decay_mask=weight_decay_mask, name="sgdm_hd",
                   hyperparams={"lr": lr, "hypergrad_lr": hypergrad_lr, "momentum": momentum,
                                "weight_decay": weight_decay}, **hd_options)


# ----------------------------------------------------------------------------- Adam


@rule_factory
def adam(lr: Number | Schedule, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
         weight_decay: Number = 0.0, *, decoupled_weight_decay: bool = False,
         eps_root: float = 0.0, weight_decay_mask: WeightDecayMask = None) -> Rule:
    """Adam: u_t = -α m̂_t / (√(v̂_t + ε_root) + ε) (Algorithm 3 without HD; torch.optim.Adam, and
    torch.optim.AdamW with ``decoupled_weight_decay=True``).

    ``eps_root`` = 0 (default) is the paper's Adam, arithmetic unchanged bit for bit; pass
    ``hdfunc.DIFFERENTIABLE_EPS_ROOT`` to differentiate through training (see
    :func:`hdfunc.scale_by_adam`).

    Args:
        lr: α (a number >= 0, a 0-d tensor or a schedule: a callable of the step count).
        betas: (β1, β2), the decay rates of the moments, each in [0, 1) (torch.optim's
            spelling; :func:`hdfunc.scale_by_adam` takes them as ``b1, b2``, optax's).
        eps: ε added to √v̂.
        weight_decay: λ of the L2 term λθ added to the gradient (coupled, as in the paper).
        decoupled_weight_decay: decay θ by αλθ apart from the gradient (AdamW) instead.
        eps_root: ε_root added under the square root (0: the paper's Adam).
        weight_decay_mask: a pytree of bools like the params, or a callable params -> such a
            pytree: only the True leaves are decayed (None: all).

    Returns:
        A :class:`hdfunc.Rule` whose state holds α (:func:`hdfunc.get_lr`).
    """
    b1, b2 = _betas(betas)
    return base_rule(scale_by_adam(b1, b2, eps, eps_root=eps_root), lr, weight_decay=weight_decay,
                     decoupled_weight_decay=decoupled_weight_decay,
                     weight_decay_mask=weight_decay_mask,
                     name="adamw" if decoupled_weight_decay else "adam",
                     hyperparams={"lr": lr, "betas": (b1, b2), "eps": eps,
                                  "weight_decay": weight_decay, "eps_root": eps_root})


@hd_rule_factory
def adam_hd(lr: Number, hypergrad_lr: Number, betas: tuple[float, float] = (0.9, 0.999),
            eps: float = 1e-8, weight_decay: Number = 0.0, *,
            decoupled_weight_decay: bool = False, eps_root: float = 0.0,
            weight_decay_mask: WeightDecayMask = None, **hd_options: Any) -> Rule:
    """Adam-HD (Algorithm 3): h_t = g_t·∇_α u_{t-1} with
    ∇_α u_{t-1} = -m̂_{t-1}/(√(v̂_{t-1} + ε_root) + ε) (bias corrections of step t-1, recomputed
    from m_{t-1}, v_{t-1}: no extra buffer); α_t = α_{t-1} - β h_t;
    u_t = -α_t m̂_t / (√(v̂_t + ε_root) + ε).

    ``eps_root`` = 0 (default) is the paper's Algorithm 3, arithmetic unchanged bit for bit;
    pass ``hdfunc.DIFFERENTIABLE_EPS_ROOT`` to differentiate the loss after training with
    respect to α_0 or β (with 0 that derivative is NaN as soon as some gradient entry has been
    exactly 0 at every step, e.g. a dead ReLU unit: √v̂ has an infinite derivative at 0).

    With ``decoupled_weight_decay`` the decay λθ_{t-1} is part of d_t and is stored.

    Args:
        lr: α_0, the initial learning rate HD adapts from (a number >= 0 or a 0-d tensor).
        hypergrad_lr: β, the hypergradient learning rate (a number >= 0 or a 0-d tensor).
        betas: (β1, β2), the decay rates of the moments, each in [0, 1) (torch.optim's
            spelling; :func:`hdfunc.scale_by_adam` takes them as ``b1, b2``, optax's).
        eps: ε added to √v̂.
        weight_decay: λ of the L2 term λθ added to the gradient (coupled, as in the paper).
        decoupled_weight_decay: decay θ by αλθ apart from the gradient (AdamW) instead.
        eps_root: ε_root added under the square root (0: the paper's Adam).
        weight_decay_mask: a pytree of bools like the params, or a callable params -> such a
            pytree: only the True leaves are decayed (None: all).

    Returns:
        A :class:`hdfunc.Rule` whose state holds an :class:`hdfunc.HDState` (α_t, β_t, h_t).
    """
    b1, b2 = _betas(betas)
    return hd_rule(scale_by_adam(b1, b2, eps, eps_root=eps_root), lr, hypergrad_lr,
                   weight_decay=weight_decay, decoupled_weight_decay=decoupled_weight_decay,
                   weight_decay_mask=weight_decay_mask,
                   name="adamw_hd" if decoupled_weight_decay else "adam_hd",
                   hyperparams={"lr": lr, "hypergrad_lr": hypergrad_lr, "betas": (b1, b2),
                                "eps": eps, "weight_decay": weight_decay, "eps_root": eps_root},
                   **hd_options)


@rule_factory
def adamw(lr: Number | Schedule, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
          weight_decay: Number = 1e-2, *, eps_root: float = 0.0,
          weight_decay_mask: WeightDecayMask = None) -> Rule:
    """AdamW (torch.optim.AdamW): Adam with decoupled weight decay (``eps_root`` as in
    :func:`adam`).

    Args:
        lr: α (a number >= 0, a 0-d tensor or a schedule: a callable of the step count).
        betas: (β1, β2), the decay rates of the moments, each in [0, 1) (torch.optim's
            spelling; :func:`hdfunc.scale_by_adam` takes them as ``b1, b2``, optax's).
        eps: ε added to √v̂.
        weight_decay: λ of the decoupled decay αλθ.
        eps_root: ε_root added under the square root (0: the paper's Adam).
        weight_decay_mask: a pytree of bools like the params, or a callable params -> such a
            pytree: only the True leaves are decayed (None: all).

    Returns:
        A :class:`hdfunc.Rule` whose state holds α (:func:`hdfunc.get_lr`).
    """
    return adam(lr, betas, eps, weight_decay, decoupled_weight_decay=True, eps_root=eps_root,
                weight_decay_mask=weight_decay_mask)


@hd_rule_factory
def adamw_hd(lr: Number, hypergrad_lr: Number, betas: tuple[float, float] = (0.9, 0.999),
             eps: float = 1e-8, weight_decay: Number = 1e-2, *, eps_root: float = 0.0,
             weight_decay_mask: WeightDecayMask = None, **hd_options: Any) -> Rule:
    """AdamW-HD: Adam-HD with decoupled weight decay, which is part of ∇_α u_t (``eps_root`` as
    in :func:`adam_hd`).

    Args:
        lr: α_0, the initial learning rate HD adapts from (a number >= 0 or a 0-d tensor).
        hypergrad_lr: β, the hypergradient learning rate (a number >= 0 or a 0-d tensor).
        betas: (β1, β2), the decay rates of the moments, each in [0, 1) (torch.optim's
            spelling; :func:`hdfunc.scale_by_adam` takes them as ``b1, b2``, optax's).
        eps: ε added to √v̂.
        weight_decay: λ of the decoupled decay αλθ.
        eps_root: ε_root added under the square root (0: the paper's Adam).
        weight_decay_mask: a pytree of bools like the params, or a callable params -> such a
            pytree: only the True leaves are decayed (None: all).

    Returns:
        A :class:`hdfunc.Rule` whose state holds an :class:`hdfunc.HDState` (α_t, β_t, h_t).
    """
    return adam_hd(lr, hypergrad_lr, betas, eps, weight_decay, decoupled_weight_decay=True,
                   eps_root=eps_root, weight_decay_mask=weight_decay_mask, **hd_options)


# ----------------------------------------------------------------------------- more than α


def sgdm_hd_lr_momentum(lr: Number, hypergrad_lr: Number, momentum_hypergrad_lr: Number,
                        momentum: Number = 0.9, weight_decay: Number = 0.0, *,
                        mode: str = "additive", bounds: dict | None = None,
                        skip_nonfinite: bool = True) -> Rule:
    """Heavy-ball SGD with the step size α *and* the momentum μ adapted by hypergradient
    descent (in the spirit of Chu et al., ICML 2025, HDM-HB), built by :func:`hdfunc.hyperdescent`
    on :func:`sgdm`. With u_t = -α v_t and v_t = μ v_{t-1} + g_t, the one-step derivatives are
    ∂u_{t-1}/∂α = -v_{t-1} and ∂u_{t-1}/∂μ = -α_{t-1} v_{t-2}, so at step t (g_t = ∇f(θ_{t-1}))

        h_α,t = -g_t · v_{t-1},              α_t = α_{t-1} - β_α h_α,t
        h_μ,t = -α_{t-1} g_t · v_{t-2},      μ_t = μ_{t-1} - β_μ h_μ,t
        v_t = μ_t v_{t-1} + g_t,             u_t = -α_t v_t

    (``mode="multiplicative"`` normalises each update as Eq. 8). α is projected onto [0, ∞)
    and μ onto [0, 1 - 1e-6] after each update (``bounds`` overrides). With β_μ = 0 this is
    :func:`sgdm_hd` with α ≥ 0.

    Args:
        lr: α_0.
        hypergrad_lr: β_α, the hypergradient rate of α.
        momentum_hypergrad_lr: β_μ, the hypergradient rate of μ.
        momentum: μ_0 in [0, 1).
        weight_decay: λ of the coupled L2 term (the hypergradients then use g_t without it;
            see :func:`hdfunc.hyperdescent`).
        mode: ``"additive"`` or ``"multiplicative"``.
        bounds: ``{"lr": (low, high), "momentum": (low, high)}`` overriding the projections.
        skip_nonfinite: keep a hyperparameter whose hypergradient or new value is not finite.

    Returns:
        A :class:`hdfunc.Rule` with state :class:`hdfunc.HyperdescentState`.
    """
    return _hd_on(sgdm, {"lr": hypergrad_lr, "momentum": momentum_hypergrad_lr}, mode, bounds,
                  skip_nonfinite, lr=lr, momentum=momentum, weight_decay=weight_decay)


def sgdn_hd_lr_momentum(lr: Number, hypergrad_lr: Number, momentum_hypergrad_lr: Number,
                        momentum: Number = 0.9, weight_decay: Number = 0.0, *,
                        mode: str = "additive", bounds: dict | None = None,
                        skip_nonfinite: bool = True) -> Rule:
    """SGD with Nesterov momentum, α *and* μ adapted by hypergradient descent
    (:func:`hdfunc.hyperdescent` on :func:`sgdn`). With u_t = -α (g_t + μ v_t) and
    v_t = μ v_{t-1} + g_t, the one-step derivatives are ∂u_{t-1}/∂α = -(g_{t-1} + μ v_{t-1}) (as
    SGDN-HD) and ∂u_{t-1}/∂μ = -α_{t-1} (v_{t-1} + μ_{t-1} v_{t-2}), and each λ ∈ {α, μ} follows
    λ_t = λ_{t-1} - β_λ g_t · ∂u_{t-1}/∂λ (Eq. 3; Eq. 8 with ``mode="multiplicative"``), α
    projected onto [0, ∞) and μ onto [0, 1 - 1e-6]. With β_μ = 0 this is :func:`sgdn_hd` with
    α ≥ 0.

    Args:
        lr: α_0.
        hypergrad_lr: β_α, the hypergradient rate of α.
        momentum_hypergrad_lr: β_μ, the hypergradient rate of μ.
        momentum: μ_0 in [0, 1).
        weight_decay: λ of the coupled L2 term (the hypergradients use g_t + λθ_{t-1}, the
            gradient of the penalised objective, as sgdn_hd).
        mode: ``"additive"`` or ``"multiplicative"``.
        bounds: ``{"lr": (low, high), "momentum": (low, high)}`` overriding the projections.
        skip_nonfinite: keep a hyperparameter whose hypergradient or new value is not finite.

    Returns:
        A :class:`hdfunc.Rule` with state :class:`hdfunc.HyperdescentState`.
    """
    return _hd_on(sgdn, {"lr": hypergrad_lr, "momentum": momentum_hypergrad_lr}, mode, bounds,
                  skip_nonfinite, lr=lr, momentum=momentum, weight_decay=weight_decay)


def _hd_on(factory: Any, rates: dict, mode: str, bounds: dict | None, skip_nonfinite: bool,
           **hyperparams: Any) -> Rule:
    return hyperdescent(factory, rates, mode=mode, bounds=bounds, skip_nonfinite=skip_nonfinite,
                        **hyperparams)


def adam_hd_lr_beta1(lr: Number, hypergrad_lr: Number, beta1_hypergrad_lr: Number,
                     betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                     weight_decay: Number = 0.0, *, mode: str = "additive",
                     bounds: dict | None = None, skip_nonfinite: bool = True) -> Rule:
    """Adam with the step size α *and* the first-moment decay β1 adapted by hypergradient
    descent, built by :func:`hdfunc.hyperdescent` on :func:`adam`. With
    u_t = -α m̂_t/(√v̂_t + ε), m_t = β1 m_{t-1} + (1 - β1) g_t, m̂_t = m_t/(1 - β1^t), the
    one-step derivatives (m_{t-2}, v_{t-1}, g_{t-1} held fixed) are

        ∂u_{t-1}/∂α  = -m̂_{t-1}/(√v̂_{t-1} + ε)
        ∂u_{t-1}/∂β1 = -α_{t-1} ∂m̂_{t-1}/∂β1 / (√v̂_{t-1} + ε),
        ∂m̂_{t-1}/∂β1 = (m_{t-2} - g_{t-1})/(1 - β1^(t-1)) + (t-1) β1^(t-2) m_{t-1}/(1 - β1^(t-1))²

    computed by forward mode, and each hyperparameter λ ∈ {α, β1} follows
    λ_t = λ_{t-1} - β_λ g_t · ∂u_{t-1}/∂λ (Eq. 3; Eq. 8 with ``mode="multiplicative"``);
    α is projected onto [0, ∞) and β1 onto [0, 1 - 1e-6]. With β_β1 = 0 this is :func:`adam_hd`
    with α ≥ 0.

    Args:
        lr: α_0.
        hypergrad_lr: β_α, the hypergradient rate of α.
        beta1_hypergrad_lr: the hypergradient rate of β1.
        betas: (β1_0, β2).
        eps: ε.
        weight_decay: λ of the coupled L2 term.
        mode: ``"additive"`` or ``"multiplicative"``.
        bounds: ``{"lr": ..., "betas[0]": ...}`` overriding the projections.
        skip_nonfinite: keep a hyperparameter whose hypergradient or new value is not finite.

    Returns:
        A :class:`hdfunc.Rule` with state :class:`hdfunc.HyperdescentState`.
    """
    return _hd_on(adam, {"lr": hypergrad_lr, "betas[0]": beta1_hypergrad_lr}, mode, bounds,
                  skip_nonfinite, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
