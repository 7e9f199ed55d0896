"""Hypergradient descent on the learning rate, written once for any base direction.

The general form (docs/algorithms.md; Baydin et al. 2018, §2, Eqs. 2-4 and Algorithms 1-3):

    h_t = ∇f(θ_{t-1}) · ∇_α u_{t-1} = -g_t · d_{t-1}        (hypergradient; d_0 = 0 so h_1 = 0)
    α_t = α_{t-1} - β h_t                                   (additive rule)
    u_t = -α_t d_t                                          (d_t: the base direction)

with the paper's variants: per-tensor / per-element rates (§2), the multiplicative rule
(Eqs. 7-8), the transition to a fixed rate α_∞ (§5.1) and higher-order adaptation of β (§5.2).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import torch

from hdfunc.base import Transform, check_hyperparameter
from hdfunc.options import (GRANULARITIES, HD_OPTIONS, MODES, Granularity, HDConfig, HDOptions,
                            Mode, Schedule, inverse_square)
from hdfunc.tree import (PyTree, accumulation_dtype, first_leaf, leaf_vdot, resolve_partial_sums,
                         total, tree_flatten, tree_leaves, tree_map, tree_unflatten,
                         tree_zeros_like)

__all__ = ["ABSENT", "GRANULARITIES", "HD_OPTIONS", "HDConfig", "HDOptions", "HDState", "LRState",
           "MODES", "Granularity", "Mode", "RateStep", "Schedule", "ScheduleState", "adapt_rates",
           "find_lr_state", "freeze_hypergrad_lr", "freeze_lr", "get_applied_lr", "get_lr",
           "hypergradient", "inverse_square", "replace_lr_state", "scale_by_lr", "scaled_step"]

ABSENT = ()  # an optional state field that is off: an empty subtree (vmap returns no None)


class LRState(NamedTuple):
    """State of a fixed learning rate: u_t = -α d_t.

    Attributes:
        lr: α, a 0-d tensor.
    """

    lr: torch.Tensor


class HDState(NamedTuple):
    """State of hypergradient descent after step t-1 (count = t-1).

    Rates (``lr``, ``applied_lr``, ``hypergrad``, ``final_lr``, ``lr_sensitivity``) have the
    "rate structure": one 0-d tensor (global), a pytree of 0-d tensors like the params
    (per tensor) or a pytree of tensors shaped like the params (per element).

    Attributes:
        count: t-1, a 0-d int64 tensor.
        lr: α_{t-1}, the adapted learning rate.
        hypergrad_lr: β_{t-1}.
        applied_lr: γ_{t-1}, the rate the last step applied (α_{t-1} unless transitioning).
        hypergrad: h_{t-1}, the hypergradient the last step used.
        direction: d_{t-1} = -∇_α u_{t-1}; ABSENT when the base recomputes it from its state.
        base: the base direction's state.
        final_lr: α_∞ (transition variant), or ABSENT.
        lr_sensitivity: ∂α_{t-1}/∂β (higher-order variant), or ABSENT.
        hyper_hypergrad: ∂f(θ_{t-1})/∂β used by the last step, or ABSENT.
        skipped: the steps whose rate update the non-finite guard skipped.
    """

    count: torch.Tensor  # t-1, int64
    lr: PyTree  # α_{t-1}, the adapted learning rate
    hypergrad_lr: torch.Tensor  # β_{t-1}
    applied_lr: PyTree  # γ_{t-1}: the rate the last step applied (α_{t-1} unless transitioning)
    hypergrad: PyTree  # h_{t-1}: the hypergradient the last step used
    direction: PyTree  # d_{t-1} = -∇_α u_{t-1}; ABSENT when the base recomputes it from its state
    base: PyTree  # the base direction's state
    final_lr: PyTree  # α_∞ (transition variant) or ABSENT
    lr_sensitivity: PyTree  # ∂α_{t-1}/∂β (higher-order variant) or ABSENT
    hyper_hypergrad: PyTree  # ∂f(θ_{t-1})/∂β used by the last step, or ABSENT
    skipped: torch.Tensor  # steps whose rate update the non-finite guard skipped (h_t, α_t or β_t)


def as_rate(value: float | torch.Tensor, like: torch.Tensor, dtype: torch.dtype,
            name: str = "lr") -> torch.Tensor:
    """A 0-d tensor on ``like``'s device; a tensor input keeps its autograd history. A Python
    number too large for ``dtype`` (1e39 in float32) is refused: it would be inf.

    Args:
        value: the rate, a Python number or a tensor (which keeps its autograd history).
        like: a tensor on the device the rate goes to.
        dtype: the rates' dtype.
        name: the rate's name, in the error message.

    Returns:
        The rate as a 0-d tensor of ``dtype`` on ``like``'s device.

    Raises:
        ValueError: ``value`` is a Python number that overflows ``dtype``.
    """
    if isinstance(value, torch.Tensor):
        return value.to(device=like.device, dtype=dtype)
    if abs(float(value)) > torch.finfo(dtype).max:
        raise ValueError(f"{name}={value} overflows the {dtype} rates of these params (rates "
                         "are float32 for float32/float16/bfloat16 params, float64 for float64)")
    return like.new_full((), float(value), dtype=dtype)



class ScheduleState(NamedTuple):
    """State of a scheduled learning rate α_t = s(t-1) (count = steps taken).

    Attributes:
        count: the steps taken, a 0-d int64 tensor.
        lr: s(count), the rate the next step applies.
        applied_lr: the rate the last step applied (s(0) before the first step).
    """

    count: torch.Tensor  # steps taken, int64
    lr: torch.Tensor  # s(count): the rate the next step applies
    applied_lr: torch.Tensor  # the rate the last step applied (s(0) before the first step)


def schedule_value(schedule: Schedule, count: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """s(count) as a 0-d tensor in ``like``'s dtype and device. ``count`` (int64 in the state)
    is passed as a 0-d tensor in that dtype, so ``0.9 ** count`` is computed at the rates'
    precision (float64 for float64 params) and the schedule is traced by vmap/compile, never
    read back to Python.

    Args:
        schedule: the schedule s, a callable of the step count.
        count: the step count, a 0-d int64 tensor.
        like: a 0-d tensor whose dtype and device the value takes (the current rate).

    Returns:
        s(count) as a 0-d tensor in ``like``'s dtype and device.
    """
    value = schedule(count.to(like.dtype))
    if isinstance(value, torch.Tensor):
        return value.to(device=like.device, dtype=like.dtype)
    return like.new_full((), float(value))


def scale_by_lr(lr: float | torch.Tensor | Schedule) -> Transform:
    """u_t = -α d_t with a fixed α (the base optimizers). α lives in the state, so one update
    function serves a whole grid of learning rates (stack the states).

    ``lr`` may be a schedule: a callable of the step count (a 0-d float tensor in the rates'
    dtype, holding an integer: 0 at the first step), e.g. ``lambda count: 0.1 * 0.99 ** count``.
    Step t then applies α_t = s(t-1) (optax's convention); the state (:class:`ScheduleState`)
    holds the count and s(count), the rate the next step applies, so :func:`freeze_lr` and
    :func:`get_lr` work as for a fixed rate. Write the schedule with tensor operations
    (``torch.where``, not ``if``) to keep it vmap- and compile-safe.

    ``params`` may be None: the step is then in the direction's dtype (``apply_updates`` rounds
    it to the param's).

    Args:
        lr: the fixed learning rate α (a Python number or a 0-d tensor), or a schedule of the step
            count.

    Returns:
        A transform with state :class:`LRState` (:class:`ScheduleState` for a schedule).
    """
    if callable(lr):
        schedule = lr

        def init_scheduled(params: PyTree) -> ScheduleState:
            leaf = first_leaf(params)
            count = leaf.new_zeros((), dtype=torch.int64)
            rate = schedule_value(schedule, count, leaf.new_zeros((), dtype=accumulation_dtype(
                params)))
            return ScheduleState(count, rate, rate)

        def update_scheduled(d: PyTree, state: ScheduleState,
                             params: Optional[PyTree] = None) -> tuple[PyTree, ScheduleState]:
            reference = d if params is None else params
            steps = tree_map(lambda di, p: scaled_step(state.lr, di, p.dtype), d, reference)
            count = state.count + 1
            return steps, ScheduleState(count, schedule_value(schedule, count, state.lr), state.lr)

        return Transform(init_scheduled, update_scheduled, "scale_by_schedule")

    check_hyperparameter("lr", lr)

    def init(params: PyTree) -> LRState:
        return LRState(as_rate(lr, first_leaf(params), accumulation_dtype(params)))

    def update(d: PyTree, state: LRState,
               params: Optional[PyTree] = None) -> tuple[PyTree, LRState]:
        reference = d if params is None else params
        return tree_map(lambda di, p: scaled_step(state.lr, di, p.dtype), d, reference), state

    return Transform(init, update, "scale_by_lr")


def scaled_step(rate: torch.Tensor, direction: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """u = -rate ⊙ d, computed in the dtype of rate ⊙ d (at least float32) and rounded once to
    the param's ``dtype``.

    Args:
        rate: the applied rate γ_t (0-d, or shaped like ``direction``).
        direction: the direction d.
        dtype: the param's dtype, to which the step is rounded.

    Returns:
        The step -rate ⊙ d in ``dtype``.
    """
    # (-γ) ⊙ d equals -(γ ⊙ d) bit for bit (rounding is sign-symmetric) and negates one number,
    # not a parameter-sized tensor, when γ is 0-d
    return ((-rate) * direction).to(dtype)


def hypergradient(direction: Transform, lr: float | torch.Tensor,
                  hypergrad_lr: float | torch.Tensor, options: Optional[HDOptions] = None,
                  **option_values: Any) -> Transform:
    """Hypergradient descent on the learning rate of any base ``direction`` (docs/algorithms.md,
    "The general form"). One step t, in the paper's order:

        h_t  = -g_t · d_{t-1}                                    (§2: Eq. 2 for SGD; Alg. 1-3)
        β_t  = β_{t-1} - κ ∂f(θ_{t-1})/∂β                        (§5.2; only if hyper_hypergrad_lr)
        α_t  = α_{t-1} - β_t h_t                                 (mode="additive", Eq. 3)
        α_t  = α_{t-1} (1 - β_t h_t / (‖g_t‖ ‖d_{t-1}‖))         (mode="multiplicative", Eqs. 7-8)
        d_t  = base direction of g_t                             (base state update)
        γ_t  = δ(t) α_t + (1 - δ(t)) α_∞                         (§5.1; only if final_lr, else γ_t = α_t)
        u_t  = -γ_t d_t,  store d_t = -∇_γ u_t

    ``lr_schedule=s`` (a callable of the step count, as for :func:`scale_by_lr`) multiplies the
    step: u_t = -s(t-1) γ_t d_t. The chain rule then gives the exact hypergradient of the rate
    that HD adapts, ∂f(θ_{t-1})/∂γ_{t-1} = -s(t-2) g_t · d_{t-1}, so with a schedule

        h_t  = -s(t-2) g_t · d_{t-1}     (and ‖∇_γ u_{t-1}‖ = s(t-2) ‖d_{t-1}‖ in Eqs. 7-8)

    and α stays in the units of an unscheduled rate: a warm-up s(t) = min(1, (t+1)/T) scales the
    first steps down while HD adapts the rate the schedule multiplies. ``state.applied_lr`` is
    then s(t-1) γ_t, the rate the step applied. Without a schedule, s = 1.

    ``g_t`` is the incoming gradient (after any coupled L2 term). ``lr_granularity`` picks one
    global α, one α per tensor (per-tensor dot products) or one per element (g_t ⊙ d_{t-1}).
    With the multiplicative rule α is left unchanged where a norm is zero (t = 1).

    Higher order: ∂f(θ_{t-1})/∂β = Σ_j h_{t,j} ∂γ_{t-1,j}/∂α_{t-1,j} · ∂α_{t-1,j}/∂β with the
    one-step freezing of the paper; ∂α_{t-1}/∂β = -h_{t-1} (additive) or
    -α_{t-2} h_{t-1}/(‖g_{t-1}‖‖d_{t-2}‖) (multiplicative). For SGD-HD this is
    -(g_t·g_{t-1})(g_{t-1}·g_{t-2}). The multiplicative mode adapts β by the same normalised rule.

    Guards: ``lr_bounds=(low, high)`` clamps α after each update (default: none, as in the
    paper, so α may turn negative; each bound None or a finite number); ``skip_nonfinite`` keeps
    α where h_t or the new α is not finite (and β where ∂f/∂β or the new β is not finite) and
    counts such steps in ``state.skipped``.

    Checked here: Python-number rates (α_0, β, α_∞, κ) are finite and >= 0, and ``lr_bounds``.
    Checked at ``init``: a Python-number α_0, β or α_∞ fits the rates' dtype. Tensor rates are
    not read (that would synchronise with the device, and they may be traced by vmap/grad): the
    non-finite guard catches them at run time. h_t, d_{t-1} and the rates are computed in at
    least float32 whatever the params' dtype.

    α, β and α_∞ are read from the state, never from this closure, so one update function
    serves a grid of (α_0, β) made by stacking states built with different values.

    Args:
        direction: the base direction d_t (``identity()`` for SGD, ``nesterov(μ)``,
            ``scale_by_adam(...)``, or any :class:`hdfunc.Transform`).
        lr: α_0, the initial learning rate (a number >= 0 or a 0-d tensor).
        hypergrad_lr: β, the hypergradient learning rate (a number >= 0 or a 0-d tensor).
        options: an :class:`hdfunc.HDOptions`; keyword options override its fields.
        **option_values: the HD options by name (below).

    Returns:
        A :class:`hdfunc.Transform` whose state is an :class:`HDState` and whose ``rate_law``
        is the :class:`hdfunc.HDOptions` it implements.
    """
    if callable(lr):
        raise TypeError("lr must be a number or a 0-d tensor for an HD rule, which adapts α "
                        "itself; to schedule it pass lr_schedule=<callable of the step count>, "
                        "a factor on the adapted rate (see hdfunc.hypergradient)")
    check_hyperparameter("lr", lr)
    check_hyperparameter("hypergrad_lr", hypergrad_lr)
    config = HDOptions.of(options, **option_values)
    lr_granularity, mode = config.lr_granularity, config.mode
    final_lr, lr_schedule = config.final_lr, config.lr_schedule
    hyper_hypergrad_lr = config.hyper_hypergrad_lr
    per_leaf = lr_granularity != "global"
    recompute = direction.previous_output

    def rate_dtypes(params: PyTree) -> list[torch.dtype]:
        if per_leaf:
            return [torch.promote_types(p.dtype, torch.float32) for p in tree_leaves(params)]
        return [accumulation_dtype(params)]

    def make_rates(value: float | torch.Tensor, params: PyTree, name: str) -> PyTree:
        leaves, spec = tree_flatten(params)
        dtypes = rate_dtypes(params)
        if lr_granularity == "global":
            return as_rate(value, leaves[0], dtypes[0], name)
        if lr_granularity == "tensor":
            return tree_unflatten([as_rate(value, p, dt, name) for p, dt in zip(leaves, dtypes)],
                                  spec)
        return tree_unflatten([as_rate(value, p, dt, name) * p.new_ones(p.shape, dtype=dt)
                               for p, dt in zip(leaves, dtypes)], spec)

    def init(params: PyTree) -> HDState:
        leaf = first_leaf(params)
        rates = make_rates(lr, params, "lr")
        return HDState(
            count=leaf.new_zeros((), dtype=torch.int64),
            lr=rates,
            hypergrad_lr=as_rate(hypergrad_lr, leaf, accumulation_dtype(params), "hypergrad_lr"),
            applied_lr=rates,
            hypergrad=tree_zeros_like(rates),
            direction=ABSENT if recompute is not None else tree_zeros_like(params),
            base=direction.init(params),
            final_lr=ABSENT if final_lr is None else make_rates(final_lr, params, "final_lr"),
            lr_sensitivity=ABSENT if hyper_hypergrad_lr is None else tree_zeros_like(rates),
            hyper_hypergrad=ABSENT if hyper_hypergrad_lr is None else leaf.new_zeros(
                (), dtype=accumulation_dtype(params)),
            skipped=leaf.new_zeros((), dtype=torch.int64),
        )

    def products(xs: list[torch.Tensor], ys: list[torch.Tensor], dtypes: list[torch.dtype]) -> list:
        """Σ x⊙y at the rates' granularity: one total, one per tensor, or elementwise."""
        if lr_granularity == "global":
            return [total([leaf_vdot(x, y, dtypes[0]) for x, y in zip(xs, ys)])]
        if lr_granularity == "tensor":
            return [leaf_vdot(x, y, dt) for x, y, dt in zip(xs, ys, dtypes)]
        return [x.to(dt) * y.to(dt) for x, y, dt in zip(xs, ys, dtypes)]

    def update(g: PyTree, state: HDState,
               params: Optional[PyTree] = None) -> tuple[PyTree, HDState]:
        # params are read for their dtypes only (the direction may read them: weight decay);
        # without them the grads, which have their dtypes, stand in
        reference = g if params is None else params
        g_leaves, spec = tree_flatten(g)
        dtypes = rate_dtypes(reference)
        # d_{t-1}; a recomputed one (Adam) is evaluated in the accumulation dtype by the base
        d_prev = state.direction if recompute is None else recompute(state.base)
        d_prev_leaves = tree_leaves(d_prev)

        # h_t = -g_t · d_{t-1}, at the rates' granularity, in at least float32 (times s(t-2),
        # the factor the last step applied, under a schedule)
        hypergrad = [-x for x in products(g_leaves, d_prev_leaves, dtypes)]
        if mode == "multiplicative":
            grad_sq = products(g_leaves, g_leaves, dtypes)
            direction_sq = products(d_prev_leaves, d_prev_leaves, dtypes)
        else:
            grad_sq = direction_sq = None
        if lr_schedule is not None:
            rate_like = tree_leaves(state.lr)[0]
            previous_factor = schedule_value(lr_schedule, torch.clamp(state.count - 1, min=0),
                                             rate_like)
            factor = schedule_value(lr_schedule, state.count, rate_like)
            hypergrad = [previous_factor.to(x.dtype) * x for x in hypergrad]
            if direction_sq is not None:
                direction_sq = [previous_factor.to(x.dtype) ** 2 * x for x in direction_sq]
        # sharded (DTensor) params: the partial sums of the local shards, reduced once
        hypergrad, grad_sq, direction_sq = resolve_partial_sums(hypergrad, grad_sq, direction_sq)
        rates_step = adapt_rates(config, state, hypergrad, grad_sq, direction_sq)

        # Base direction and the step with the rate actually applied.
        d, base_state = direction.update(g, state.base, params)
        d_leaves = tree_leaves(d)
        applied = rates_step.applied_lr
        if lr_schedule is not None:
            applied = [factor.to(a.dtype) * a for a in applied]
        param_dtypes = [p.dtype for p in tree_leaves(reference)]
        if per_leaf:
            steps = [scaled_step(r, x, dt) for r, x, dt in zip(applied, d_leaves, param_dtypes)]
        else:
            steps = [scaled_step(applied[0], x, dt) for x, dt in zip(d_leaves, param_dtypes)]

        def rates(leaves: list) -> PyTree:
            return tree_unflatten(leaves, spec) if per_leaf else leaves[0]

        new_lr_tree = rates(rates_step.lr)
        new_state = HDState(
            count=state.count + 1,
            lr=new_lr_tree,
            hypergrad_lr=rates_step.hypergrad_lr,
            applied_lr=(new_lr_tree if final_lr is None and lr_schedule is None
                        else rates(applied)),
            hypergrad=rates(hypergrad),
            # stored in each param's dtype, as made by init (d_t may be float32 for float16
            # params), so the state keeps its dtypes from step to step
            direction=ABSENT if recompute is not None else tree_map(
                lambda x, p: x.to(p.dtype), d, reference),
            base=base_state,
            final_lr=state.final_lr,
            lr_sensitivity=(ABSENT if rates_step.lr_sensitivity is None
                            else rates(rates_step.lr_sensitivity)),
            hyper_hypergrad=rates_step.hyper_hypergrad,
            skipped=rates_step.skipped,
        )
        return tree_unflatten(steps, spec), new_state

    return Transform(init, update, "hypergradient", rate_law=config,
                     needs_params=direction.needs_params)


hypergradient.__doc__ = (hypergradient.__doc__ or "") + HDOptions.docstring()


# ----------------------------------------------------------------------------- the rate update


class RateStep(NamedTuple):
    """The outcome of one rate update; rates are lists of rate leaves.

    Attributes:
        lr: α_t.
        hypergrad_lr: β_t.
        applied_lr: γ_t.
        lr_sensitivity: ∂α_t/∂β_t, or None without higher order.
        hyper_hypergrad: ∂f(θ_{t-1})/∂β, or ABSENT.
        skipped: the count of skipped rate updates, this step's included.
    """

    lr: list  # α_t
    hypergrad_lr: torch.Tensor  # β_t
    applied_lr: list  # γ_t
    lr_sensitivity: Optional[list]  # ∂α_t/∂β_t, or None without higher order
    hyper_hypergrad: PyTree  # ∂f(θ_{t-1})/∂β, or ABSENT
    skipped: torch.Tensor


def _multiplicative_factor(step: list, numer: list, gg: list, dd: list) -> list:
    """1 - step · numer / (‖g‖‖d‖), and exactly 1 where a norm is zero (Eq. 8)."""
    out = []
    for s, n, a, b in zip(step, numer, gg, dd):
        norms_sq = a * b
        positive = norms_sq > 0
        # sqrt of a guarded value: a zero norm must not put sqrt'(0) = inf into autodiff
        denom = torch.where(positive, norms_sq, 1).sqrt()
        out.append(torch.where(positive, 1 - s * n / denom, 1))
    return out


def adapt_rates(config: HDOptions, state: HDState, hypergrad: list,
                grad_sq: Optional[list] = None, direction_sq: Optional[list] = None) -> RateStep:
    """The learning-rate half of one HD step, given h_t (and, for the multiplicative rule,
    ‖g_t‖² and ‖d_{t-1}‖²) as lists of rate leaves: β_t, α_t, γ_t. The single implementation of
    the HD rate update, shared by the functional rules and :mod:`hdfunc.optim`.

    ``state`` supplies count (t-1), lr, hypergrad_lr, final_lr, lr_sensitivity and skipped.

    The non-finite guard (``config.skip_nonfinite``) keeps α where h_t or the new α is not
    finite (β h_t may overflow), before the bounds (so an overflow is not clamped away), and β
    where ∂f/∂β or the new β is not finite; ``skipped`` counts the steps where it did either.

    Args:
        config: the HD options (granularity, rule, bounds, transition, higher order, guard).
        state: the HD state after step t-1.
        hypergrad: h_t, a list of rate leaves.
        grad_sq: ‖g_t‖² as a list of rate leaves, for the multiplicative rule (else None).
        direction_sq: ‖d_{t-1}‖² as a list of rate leaves, for the multiplicative rule (else None).

    Returns:
        A :class:`RateStep` holding the new α, β, the applied rate γ_t, ∂α/∂β, the hypergradient
            of β and the count of skipped steps.
    """
    lr_leaves = tree_leaves(state.lr)
    beta = state.hypergrad_lr
    kappa = config.hyper_hypergrad_lr
    beta_kept = torch.zeros((), dtype=torch.bool, device=beta.device)

    # Higher order: β_t from ∂f(θ_{t-1})/∂β (before α_t, which uses β_t).
    hyper_hypergrad = state.hyper_hypergrad
    if kappa is not None:
        previous_t = torch.clamp(state.count, min=1).to(beta.dtype)
        dgamma_dalpha = config.transition(previous_t) if config.has_final_lr else 1.0
        dlr_dbeta = tree_leaves(state.lr_sensitivity)
        dloss_dlr = [h * dgamma_dalpha for h in hypergrad]
        hyper_hypergrad = sum((a.to(beta.dtype) * b.to(beta.dtype)).sum()
                              for a, b in zip(dloss_dlr, dlr_dbeta))
        if config.mode == "additive":
            new_beta = beta - kappa * hyper_hypergrad
        else:
            norm_a = sum((a.to(beta.dtype) ** 2).sum() for a in dloss_dlr)
            norm_b = sum((b.to(beta.dtype) ** 2).sum() for b in dlr_dbeta)
            new_beta = beta * _multiplicative_factor([kappa], [hyper_hypergrad], [norm_a],
                                                     [norm_b])[0]
        beta_ok = torch.isfinite(hyper_hypergrad) & torch.isfinite(new_beta)
        beta_kept = ~beta_ok
        if config.skip_nonfinite:
            new_beta = torch.where(beta_ok, new_beta, beta)
        beta = new_beta

    # α_t from α_{t-1} and h_t.
    sensitivity = None
    if config.mode == "additive":
        new_lr = [a - beta.to(a.dtype) * h for a, h in zip(lr_leaves, hypergrad)]
        if kappa is not None:
            sensitivity = [-h for h in hypergrad]
    else:
        factor = _multiplicative_factor([beta.to(a.dtype) for a in lr_leaves], hypergrad, grad_sq,
                                        direction_sq)
        new_lr = [a * f for a, f in zip(lr_leaves, factor)]
        if kappa is not None:
            unit = _multiplicative_factor([1.0] * len(lr_leaves), hypergrad, grad_sq, direction_sq)
            sensitivity = [a * (u - 1) for a, u in zip(lr_leaves, unit)]
    finite = [torch.isfinite(h) & torch.isfinite(a) for h, a in zip(hypergrad, new_lr)]
    if config.lr_low is not None or config.lr_high is not None:
        new_lr = [torch.clamp(a, min=config.lr_low, max=config.lr_high) for a in new_lr]
    if config.skip_nonfinite:
        new_lr = [torch.where(ok, a_new, a) for ok, a_new, a in zip(finite, new_lr, lr_leaves)]
        if sensitivity is not None:
            sensitivity = [torch.where(ok, s, 0) for ok, s in zip(finite, sensitivity)]
    lr_kept = torch.stack([(~ok).any() for ok in finite]).any()
    skipped = state.skipped + (lr_kept | beta_kept).to(torch.int64)

    # γ_t, the rate the step applies (§5.1).
    if config.has_final_lr:
        delta = config.transition((state.count + 1).to(lr_leaves[0].dtype))
        applied = [delta * a + (1 - delta) * a_inf
                   for a, a_inf in zip(new_lr, tree_leaves(state.final_lr))]
    else:
        applied = new_lr
    return RateStep(new_lr, beta, applied, sensitivity, hyper_hypergrad, skipped)


# ----------------------------------------------------------------------------- state access


def find_lr_state(state: Any) -> HDState | LRState | Any:
    """The learning-rate node inside a rule's (possibly chained) state.

    Args:
        state: a rule's state (a chain's tuple of states, nested).

    Returns:
        The :class:`HDState`, :class:`LRState` or :class:`ScheduleState` node, or None if the state
            holds none.
    """
    if isinstance(state, (HDState, LRState, ScheduleState)):
        return state
    if isinstance(state, tuple) and hasattr(state, "_fields") and {"lr", "hypergrad_lr"} <= set(
            state._fields):
        return state  # a user rule following the documented protocol
    if isinstance(state, (tuple, list)):
        for item in state:
            found = find_lr_state(item)
            if found is not None:
                return found
    return None


def _required_lr_state(state: Any) -> HDState | LRState | Any:
    """:func:`find_lr_state`, raising TypeError where the state holds no learning rate."""
    node = find_lr_state(state)
    if node is None:
        raise TypeError(f"no learning rate found in a state of type {type(state).__name__}")
    return node


def _replace_node(state: Any, old: Any, new: Any) -> Any:
    if state is old:
        return new
    if isinstance(state, (tuple, list)):
        items = [_replace_node(item, old, new) for item in state]
        return type(state)(*items) if hasattr(state, "_fields") else type(state)(items)
    return state


def replace_lr_state(state: Any, **changes: Any) -> Any:
    """A copy of ``state`` (rebuilt, nothing mutated) whose learning-rate node (see
    :func:`find_lr_state`) has the fields in ``changes`` replaced.

    Args:
        state: a rule's state.
        **changes: the fields of the learning-rate node to replace, by name.

    Returns:
        The rebuilt state.

    Raises:
        TypeError: ``state`` holds no learning rate.
    """
    node = _required_lr_state(state)
    return _replace_node(state, node, node._replace(**changes))


def get_lr(state: Any) -> PyTree:
    """The current learning rate α_t of a rule's state: a 0-d tensor (global rate) or a pytree
    like the params (per-tensor / per-element rates). With HD this is the rate the next step
    starts from (it applies α_{t+1} = α_t - β h_{t+1}); with a transition to α_∞ the rate a step
    actually applied is ``state.applied_lr`` of the HD node (see :func:`find_lr_state`).

    Args:
        state: a rule's state.

    Returns:
        α_t: a 0-d tensor or a pytree of rates like the params.

    Raises:
        TypeError: ``state`` holds no learning rate.
    """
    node = _required_lr_state(state)
    return node.lr


def get_applied_lr(state: Any) -> PyTree:
    """γ_t: the rate the step that made ``state`` applied (``applied_lr`` of the HD node; α_t
    itself for a rule without a transition or a fixed-rate rule).

    Args:
        state: a rule's state.

    Returns:
        γ_t: a 0-d tensor or a pytree of rates like the params.

    Raises:
        TypeError: ``state`` holds no learning rate.
    """
    node = _required_lr_state(state)
    return node.applied_lr if "applied_lr" in node._fields else node.lr


def freeze_lr(state: Any, lr: PyTree) -> Any:
    """A copy of ``state`` whose next step applies exactly ``lr`` and does not adapt it (times
    the schedule's factor s(t-1) under ``lr_schedule``, of which h_t is then the derivative).

    It sets α (and α_∞) to ``lr`` and β (and ∂α/∂β) to zero. The verification suite uses it to
    write step t-1 as a function u_{t-1}(α) of the applied rate, with everything else frozen.

    Args:
        state: a rule's state.
        lr: the rate the next step applies, with the rate structure of the state's α.

    Returns:
        The rebuilt state.

    Raises:
        TypeError: ``state`` holds no learning rate.
    """
    node = _required_lr_state(state)
    changes: dict[str, Any] = {"lr": lr}
    fields = node._fields
    if "hypergrad_lr" in fields:
        changes["hypergrad_lr"] = torch.zeros_like(node.hypergrad_lr)
    if "final_lr" in fields and tree_leaves(node.final_lr):
        changes["final_lr"] = lr
    if "lr_sensitivity" in fields and tree_leaves(node.lr_sensitivity):
        changes["lr_sensitivity"] = tree_zeros_like(node.lr_sensitivity)
    return replace_lr_state(state, **changes)


def freeze_hypergrad_lr(state: Any, hypergrad_lr: torch.Tensor) -> Any:
    """A copy of ``state`` whose next step adapts α with exactly β = ``hypergrad_lr`` (it zeroes
    ∂α/∂β, so the higher-order update leaves β unchanged for that step). The verification suite
    differentiates a step with respect to β through it.

    Args:
        state: a rule's state with an HD node.
        hypergrad_lr: the β the next step uses.

    Returns:
        The rebuilt state.

    Raises:
        TypeError: ``state`` holds no hypergradient state.
    """
    node = find_lr_state(state)
    if node is None or "hypergrad_lr" not in node._fields:
        raise TypeError(f"no hypergradient state found in a state of type {type(state).__name__}")
    changes: dict[str, Any] = {"hypergrad_lr": hypergrad_lr}
    if "lr_sensitivity" in node._fields and tree_leaves(node.lr_sensitivity):
        changes["lr_sensitivity"] = tree_zeros_like(node.lr_sensitivity)
    return replace_lr_state(state, **changes)
