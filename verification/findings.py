"""Findings (not tests): how HD's greedy one-step hypergradient compares with the exact
derivative of the loss after K steps."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch.func import grad, vmap

import hdfunc
from hdfunc.tree import PyTree, tree_leaves, tree_stack

from verification.catalog import RuleSpec, calibrate
from verification.problems import Problem, perturbed_params
from verification.report import Finding
from verification.trajectories import roll, run_trajectory, unrolled_loss


def greedy_vs_exact(spec: RuleSpec, problem: Problem, steps_list: Sequence[int], seeds: int,
                    warmup: int = 2) -> list[Finding]:
    """For each K: the exact dL_K/dα (constant α over K steps, reverse mode, vmapped over
    seeds) against HD's greedy one-step h_{K+1} = ∂f(θ_K)/∂α through step K only, over every
    rate entry of every seed: the fraction with the same sign, the cosine similarity and the
    median of |exact| / |greedy|. (With one global rate the entries are the seeds, whose values
    are alike, so the cosine then says little beyond the signs; per-element rates give a
    vector per seed.)"""
    starts = []
    for seed in range(seeds):
        params = perturbed_params(problem, 0.1, seed)
        calibration = calibrate(spec, problem)
        rule = spec.build(calibration)
        starts.append(run_trajectory(rule, problem.loss, params, warmup)[-1])
    rule = spec.build(calibrate(spec, problem))
    batch_params = tree_stack([p for p, _ in starts])
    batch_states = tree_stack([s for _, s in starts])
    findings = []
    for steps in steps_list:
        def exact_and_greedy(params: PyTree, state: Any) -> tuple[PyTree, PyTree]:
            rate = hdfunc.find_lr_state(state).lr
            exact = grad(unrolled_loss(rule, problem.loss, params, state, steps,
                                       spec.objective(problem.loss)))(rate)
            _, s = roll(rule, problem.loss, params, state, steps + 1, rate)
            return exact, hdfunc.find_lr_state(s).hypergrad

        exact, greedy = vmap(exact_and_greedy)(batch_params, batch_states)
        e = torch.cat([x.reshape(-1) for x in tree_leaves(exact)]).double()
        h = torch.cat([x.reshape(-1) for x in tree_leaves(greedy)]).double()
        cosine = float(e @ h / (e.norm() * h.norm()).clamp_min(1e-300))
        agree = float((torch.sign(e) == torch.sign(h)).double().mean())
        ratio = float((e.abs() / h.abs().clamp_min(1e-300)).median())
        findings.append(Finding(spec.name, problem.name, steps, agree, cosine, e.numel(), ratio))
    return findings
