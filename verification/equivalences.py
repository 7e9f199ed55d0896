"""Check 6: equivalences of whole trajectories (β = 0 ≡ base rule, base rule ≡ ``torch.optim``,
vmap over seeds ≡ a loop), each judged with its named tolerance."""

from __future__ import annotations

import hdfunc

from verification.catalog import RuleSpec, calibrate
from verification.derivatives import dtype_name, tolerance
from verification.problems import Problem, perturbed_params
from verification.report import Outcome, judged
from verification.trajectories import (batched_trajectory, grid_rules, optimizer_trajectory,
                                       run_trajectory, trajectory_error)
from verification.trees import tree_index, tree_max_abs, tree_max_diff

BETA_ZERO = "beta=0 == base rule"
TORCH_OPTIM = "base rule == torch.optim"
VMAP = "vmap over seeds == loop"


def check_beta_zero(spec: RuleSpec, problem: Problem, steps: int) -> list[Outcome]:
    """An HD rule with β = 0 takes exactly its base rule's steps."""
    calibration = calibrate(spec, problem)
    hd = run_trajectory(spec.make(calibration.lr, 0.0, calibration), problem.loss,
                        problem.params, steps)
    base = run_trajectory(spec.base(calibration.lr, calibration.eps_root), problem.loss,
                          problem.params, steps)
    abs_err, scale = trajectory_error(hd, base)
    return [judged(BETA_ZERO, "params", spec.name, problem.name, dtype_name(problem.dtype),
                   abs_err, scale, tolerance(problem.dtype, "beta_zero"), f"{steps} steps",
                   "the parameters of the HD rule with beta=0 and of its base rule")]


def check_torch_optim(spec: RuleSpec, problem: Problem, steps: int) -> list[Outcome]:
    """The base rule takes the steps of the matching ``torch.optim`` optimizer."""
    calibration = calibrate(spec, problem)
    ours = run_trajectory(spec.base(calibration.lr, 0.0), problem.loss, problem.params, steps)
    theirs, optimizer = optimizer_trajectory(
        problem, lambda tensors: spec.torch_optimizer(tensors, calibration.lr), steps)
    abs_err, scale = trajectory_error(ours, theirs)
    name = type(optimizer).__name__
    return [judged(TORCH_OPTIM, name, spec.name.split("[")[0].replace("_hd", ""), problem.name,
                   dtype_name(problem.dtype), abs_err, scale,
                   tolerance(problem.dtype, "torch_optim"), f"{steps} steps",
                   f"the parameters of the functional base rule and torch.optim.{name}")]


def check_vmap(spec: RuleSpec, problem: Problem, steps: int, seeds: int = 3) -> list[Outcome]:
    """One vmapped run over seeds (perturbed starting points) and a grid of (α_0, β) stacked
    from states of differently built rules equals a loop over the same seeds and rules
    (:func:`~verification.trajectories.grid_factors`)."""
    _, rules = grid_rules(spec, problem, seeds)
    starts = [perturbed_params(problem, 0.1, seed) for seed in range(seeds)]
    looped = [run_trajectory(r, problem.loss, p, steps)[-1] for r, p in zip(rules, starts)]
    params, state = batched_trajectory(rules, problem.loss, starts, steps)[-1]
    abs_err = scale = 0.0
    for i, (p_loop, s_loop) in enumerate(looped):
        p_i = tree_index(params, i)
        lr_i = tree_index(hdfunc.get_lr(state), i)
        abs_err = max(abs_err, tree_max_diff(p_i, p_loop),
                      tree_max_diff(lr_i, hdfunc.get_lr(s_loop)))
        scale = max(scale, tree_max_abs(p_loop), tree_max_abs(hdfunc.get_lr(s_loop)))
    return [judged(VMAP, "params and rates", spec.name, problem.name, dtype_name(problem.dtype),
                   abs_err, scale, tolerance(problem.dtype, "vmap"),
                   f"{seeds} seeds × (alpha_0, beta) grid, {steps} steps",
                   "the vmapped and the looped runs")]
