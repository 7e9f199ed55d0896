"""Trajectories the checks differentiate and compare: a rule's own run, a vmapped run over
seeds, a ``torch.optim`` loop, and the losses after K steps as functions of α, β or α_0.

Notation (docs/algorithms.md): ``hist[k] = (θ_k, state_k)`` after k steps.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch
from torch.func import grad, vmap

import hdfunc
from hdfunc.tree import PyTree, tree_flatten, tree_map, tree_stack, tree_unflatten

from verification.catalog import Calibration, RuleSpec, calibrate
from verification.conditioning import Noise, perturb
from verification.problems import Problem
from verification.trees import tree_max_abs, tree_max_diff


def step_with(rule: Any, grads: PyTree, state: Any, params: PyTree) -> tuple[PyTree, Any]:
    """(θ, state) after one update of ``rule`` from (``params``, ``state``) with ``grads``."""
    updates, state = rule.update(grads, state, params)
    return hdfunc.apply_updates(params, updates), state


def roll(rule: Any, loss: Callable, params: PyTree, state: Any, steps: int,
         rate: PyTree = None, noise: Optional[Noise] = None) -> tuple[PyTree, Any]:
    """(θ_K, state_K) after ``steps`` steps of ``rule`` on ∇``loss``; with ``rate``, every step
    applies exactly that rate and does not adapt it (:func:`hdfunc.freeze_lr`); with ``noise``,
    θ is perturbed after every step."""
    gen = noise.generator() if noise is not None else None
    for _ in range(steps):
        frozen = state if rate is None else hdfunc.freeze_lr(state, rate)
        params, state = step_with(rule, grad(loss)(params), frozen, params)
        if noise is not None:
            params = perturb(params, noise, gen)
    return params, state


def run_trajectory(rule: Any, loss: Callable, params: PyTree, steps: int,
                   state: Any = None) -> list[tuple[PyTree, Any]]:
    """``hist[k] = (θ_k, state_k)`` for k = 0..steps, by the rule itself."""
    state = rule.init(params) if state is None else state
    hist = [(params, state)]
    for _ in range(steps):
        params, state = step_with(rule, grad(loss)(params), state, params)
        hist.append((params, state))
    return hist


def batched_trajectory(rules: Sequence[Any], loss: Callable, starts: Sequence[PyTree],
                       steps: int) -> list[tuple[PyTree, Any]]:
    """``hist[k]`` of every (rule, start) pair at once: one ``vmap``-ed trajectory over the
    stacked params and states. ``rules[0]``'s update serves them all: α and β live in the
    states, so rules built with different values differ only there."""
    rule = rules[0]
    batched_step = vmap(lambda params, state: step_with(rule, grad(loss)(params), state, params))
    params = tree_stack(list(starts))
    state = tree_stack([r.init(p) for r, p in zip(rules, starts)])
    hist = [(params, state)]
    for _ in range(steps):
        params, state = batched_step(params, state)
        hist.append((params, state))
    return hist


def optimizer_trajectory(problem: Problem, make_optimizer: Callable[[list], Any], steps: int,
                         after_step: Optional[Callable[[Any], None]] = None
                         ) -> tuple[list, Any]:
    """``hist[k] = (θ_k, None)`` of a ``torch.optim``-style optimizer in a plain training loop
    (``zero_grad``, ``backward``, ``step``) from the problem's start, and the optimizer;
    ``after_step(optimizer)`` is called after every step."""
    leaves, tree_spec = tree_flatten(problem.params)
    tensors = [x.detach().clone().requires_grad_(True) for x in leaves]
    optimizer = make_optimizer(tensors)
    hist = [(problem.params, None)]
    for _ in range(steps):
        optimizer.zero_grad()
        problem.loss(tree_unflatten(tensors, tree_spec)).backward()
        optimizer.step()
        hist.append((tree_unflatten([x.detach().clone() for x in tensors], tree_spec), None))
        if after_step is not None:
            after_step(optimizer)
    return hist, optimizer


def trajectory_error(a: list, b: list) -> tuple[float, float]:
    """(max |θ^a_k - θ^b_k| over k and entries, max |θ^b_k|) of two trajectories."""
    abs_err = max(tree_max_diff(pa, pb) for (pa, _), (pb, _) in zip(a, b))
    scale = max(tree_max_abs(pb) for pb, _ in b)
    return abs_err, scale


def grid_factors(seeds: int) -> list[float]:
    """Factors of the calibrated (α_0, β) for a batch of seeds: 1, 2/3, 1/2, 2/5, 1, ... Never
    above the calibration, whose α_0 is a safe 0.5/L step: larger rates let HD grow α past 2/L,
    where the trajectory is unstable and amplifies rounding differences exponentially (a
    vmapped and a looped run would then differ for no fault of vmap). κ, the higher-order
    rate, is the same for all (a closure constant of the rule, not a state field)."""
    return [1.0 / (1.0 + 0.5 * (i % 4)) for i in range(seeds)]


def grid_rules(spec: RuleSpec, problem: Problem, seeds: int) -> tuple[Calibration, list]:
    """The calibration and one rule per seed, built with the :func:`grid_factors` of the
    calibrated (α_0, β)."""
    calibration = calibrate(spec, problem)
    return calibration, [spec.make(calibration.lr * c, calibration.hypergrad_lr * c, calibration)
                         for c in grid_factors(seeds)]


# ----------------------------------------------------------------------------- losses after K steps


def unrolled_loss(rule: Any, loss: Callable, params: PyTree, state: Any, steps: int,
                  objective: Optional[Callable] = None, noise: Optional[Noise] = None
                  ) -> Callable[[PyTree], torch.Tensor]:
    """L(α) = f(θ_K) after ``steps`` steps that all apply the constant rate α (no adaptation);
    the steps are fed ∇``loss``, f is ``objective`` (default: ``loss``)."""
    objective = objective or loss

    def run(rate: PyTree) -> torch.Tensor:
        return objective(roll(rule, loss, params, state, steps, rate, noise)[0])
    return run


def hd_loss_of_beta(rule: Any, loss: Callable, params: PyTree, state: Any, steps: int,
                    noise: Optional[Noise] = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """f(θ_K) after K steps of the HD rule itself, as a function of β (set at the first step)."""
    def run(beta: torch.Tensor) -> torch.Tensor:
        return loss(roll(rule, loss, params, hdfunc.freeze_hypergrad_lr(state, beta), steps,
                         noise=noise)[0])
    return run


def hd_loss_of_initial_lr(rule: Any, loss: Callable, params: PyTree, steps: int,
                          noise: Optional[Noise] = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """f(θ_K) after K steps of the HD rule from its initial state, as a function of α_0."""
    state0 = rule.init(params)
    node = hdfunc.find_lr_state(state0)

    def run(lr0: torch.Tensor) -> torch.Tensor:
        rates = tree_map(lambda x: lr0.to(x.dtype) * torch.ones_like(x), node.lr)
        changes = {"lr": rates}
        if "applied_lr" in node._fields:
            changes["applied_lr"] = rates
        return loss(roll(rule, loss, params, hdfunc.replace_lr_state(state0, **changes),
                         steps, noise=noise)[0])
    return run
