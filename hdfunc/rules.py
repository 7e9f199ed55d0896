"""The six rules of the paper (SGD, SGDN, Adam and their HD variants) as thin compositions.

    base rule = [coupled L2] → base direction [→ decoupled decay] → u = -α d
    HD rule   = [coupled L2] → hypergradient(base direction [→ decoupled decay])

so an HD rule with ``hypergrad_lr=0`` computes exactly its base rule's updates. A bad argument
raises a ValueError/TypeError prefixed with the rule's name ("adam_hd: lr must be finite ...").
"""

from __future__ import annotations

from typing import Any

import torch

from hdfunc.base import Rule, Transform, chain, rule_factory, validated
from hdfunc.directions import (WeightDecayMask, add_decayed_weights, add_l2, identity, nesterov,
                               scale_by_adam)
from hdfunc.hypergradient import HD_OPTIONS, Schedule, hypergradient, scale_by_lr

Number = float | torch.Tensor
hd_rule_factory = rule_factory(extra_options=HD_OPTIONS)


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
    tensors marked True (see :func:`hdfunc.add_l2`)."""
    coupled, direction = _with_decay(direction, weight_decay, decoupled_weight_decay,
                                     weight_decay_mask)
    name = name or f"{direction.name}"
    return validated(chain(*coupled, direction, scale_by_lr(lr), name=name), name=name,
                     hyperparams=_with_mask(hyperparams or {"lr": lr,
                                                            "weight_decay": weight_decay},
                                            weight_decay_mask))


@hd_rule_factory
def hd_rule(direction: Transform, lr: Number, hypergrad_lr: Number, *,
            weight_decay: Number = 0.0, decoupled_weight_decay: bool = False,
            weight_decay_mask: WeightDecayMask = None, name: str | None = None,
            hyperparams: dict | None = None, **hd_options: Any) -> Rule:
    """Hypergradient descent on the learning rate of any base ``direction``: a one-liner for
    RMSprop-HD, Adagrad-HD, Lion-HD, ... ``hd_options`` are those of
    :func:`hdfunc.hypergradient.hypergradient` (``lr_granularity``, ``mode``, ``final_lr``,
    ``transition``, ``hyper_hypergrad_lr``, ``lr_bounds``, ``skip_nonfinite``)."""
    coupled, direction = _with_decay(direction, weight_decay, decoupled_weight_decay,
                                     weight_decay_mask)
    name = name or f"{direction.name}_hd"
    core = hypergradient(direction, lr, hypergrad_lr, **hd_options)
    params = hyperparams or {"lr": lr, "hypergrad_lr": hypergrad_lr, "weight_decay": weight_decay}
    return validated(chain(*coupled, core, name=name), name=name,
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
    """SGD: u_t = -α g_t (Algorithm 1 without HD; torch.optim.SGD)."""
    return base_rule(identity(), lr, weight_decay=weight_decay,
                     decoupled_weight_decay=decoupled_weight_decay,
                     weight_decay_mask=weight_decay_mask, name="sgd",
                     hyperparams={"lr": lr, "weight_decay": weight_decay})


@hd_rule_factory
def sgd_hd(lr: Number, hypergrad_lr: Number, weight_decay: Number = 0.0, *,
           decoupled_weight_decay: bool = False,
           weight_decay_mask: WeightDecayMask = None, **hd_options: Any) -> Rule:
    """SGD-HD (Algorithm 1; Eqs. 2-4): h_t = -g_t·g_{t-1}; α_t = α_{t-1} - β h_t; u_t = -α_t g_t."""
    return hd_rule(identity(), lr, hypergrad_lr, weight_decay=weight_decay,
                   decoupled_weight_decay=decoupled_weight_decay,
                   weight_decay_mask=weight_decay_mask, name="sgd_hd", **hd_options)


# ----------------------------------------------------------------------------- SGD + Nesterov


@rule_factory
def sgdn(lr: Number | Schedule, momentum: Number = 0.9, weight_decay: Number = 0.0, *,
         decoupled_weight_decay: bool = False, weight_decay_mask: WeightDecayMask = None) -> Rule:
    """SGD with Nesterov momentum: v_t = μ v_{t-1} + g_t; u_t = -α (g_t + μ v_t)
    (Algorithm 2 without HD; torch.optim.SGD(momentum=μ, nesterov=True))."""
    return base_rule(nesterov(momentum), lr, weight_decay=weight_decay,
                     decoupled_weight_decay=decoupled_weight_decay,
                     weight_decay_mask=weight_decay_mask, name="sgdn",
                     hyperparams={"lr": lr, "momentum": momentum, "weight_decay": weight_decay})


@hd_rule_factory
def sgdn_hd(lr: Number, hypergrad_lr: Number, momentum: Number = 0.9,
            weight_decay: Number = 0.0, *, decoupled_weight_decay: bool = False,
            weight_decay_mask: WeightDecayMask = None, **hd_options: Any) -> Rule:
    """SGDN-HD (Algorithm 2): h_t = g_t·∇_α u_{t-1} with ∇_α u_{t-1} = -(g_{t-1} + μ v_{t-1});
    α_t = α_{t-1} - β h_t; v_t = μ v_{t-1} + g_t; u_t = -α_t (g_t + μ v_t)."""
    return hd_rule(nesterov(momentum), lr, hypergrad_lr, weight_decay=weight_decay,
                   decoupled_weight_decay=decoupled_weight_decay,
                   weight_decay_mask=weight_decay_mask, name="sgdn_hd",
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
    :func:`hdfunc.scale_by_adam`)."""
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

    With ``decoupled_weight_decay`` the decay λθ_{t-1} is part of d_t and is stored."""
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
    :func:`adam`)."""
    return adam(lr, betas, eps, weight_decay, decoupled_weight_decay=True, eps_root=eps_root,
                weight_decay_mask=weight_decay_mask)


@hd_rule_factory
def adamw_hd(lr: Number, hypergrad_lr: Number, betas: tuple[float, float] = (0.9, 0.999),
             eps: float = 1e-8, weight_decay: Number = 1e-2, *, eps_root: float = 0.0,
             weight_decay_mask: WeightDecayMask = None, **hd_options: Any) -> Rule:
    """AdamW-HD: Adam-HD with decoupled weight decay, which is part of ∇_α u_t (``eps_root`` as
    in :func:`adam_hd`)."""
    return adam_hd(lr, hypergrad_lr, betas, eps, weight_decay, decoupled_weight_decay=True,
                   eps_root=eps_root, weight_decay_mask=weight_decay_mask, **hd_options)


RULES = {"sgd": sgd, "sgd_hd": sgd_hd, "sgdn": sgdn, "sgdn_hd": sgdn_hd, "adam": adam,
         "adam_hd": adam_hd, "adamw": adamw, "adamw_hd": adamw_hd}
HD_OF = {"sgd": "sgd_hd", "sgdn": "sgdn_hd", "adam": "adam_hd", "adamw": "adamw_hd"}
