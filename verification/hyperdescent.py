"""Verification of rules that adapt any hyperparameter (:func:`hdfunc.hyperdescent`; state
:class:`hdfunc.HyperdescentState`): built-in (``sgdm_hd_lr_momentum``, ``sgdn_hd_lr_momentum``),
per-tensor / per-element ones with coupled weight decay (:data:`GRANULAR`) and ``--rule`` user
rules.

For each adapted hyperparameter λ, at steps t of the plan:

* **one-step identity**: the rule's h_λ,t equals the exact d/dλ f(θ_{t-2} + u_{t-1}(λ)) at
  λ = λ_{t-1}, with every other hyperparameter at its value of step t-1 and the rule's state
  frozen (the greedy derivative HD uses), by reverse mode, forward mode and float64 finite
  differences (the suite's comparator);
* **rate law**: λ_t = clamp(λ_{t-1} − β_λ h_λ,t) (additive) or
  clamp(λ_{t-1} (1 − β_λ h_λ,t / (‖g_t‖ ‖∂u_{t-1}/∂λ‖))) (multiplicative), from the rule's own
  λ_{t-1}, h_λ,t and stored tangent, with the rule's declared mode and bounds.

A per-tensor / per-element λ (the rule's declared ``granularity``) is checked entry by entry
(reverse mode; forward mode and finite differences along the relative direction |λ|), the rate
law with the norms at its granularity. f is the objective the rule descends: with a declared
coupled L2 term (``coupled_weight_decay``) f + (λ_wd/2)‖θ‖², masked as the rule masks it.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch.func import grad

import hdfunc
from hdfunc.hyperdescent import HyperdescentState
from hdfunc.tree import (mask_leaves, tree_flatten, tree_leaves, tree_map, tree_sq_norm,
                         tree_unflatten)

from verification.catalog import Calibration, RuleSpec, calibrate
from verification.derivatives import (FINITE, FORWARD, REVERSE, ROUNDING_FLOOR, Judge,
                                      compare_derivatives, dtype_name, tolerance)
from verification.problems import Problem
from verification.report import Outcome, judged
from verification.trajectories import run_trajectory, step_with

HYPERDESCENT = "hyperdescent one-step identity"
HYPERDESCENT_LAW = "hyperdescent rate law"


def hyperdescent_node(state: Any) -> Optional[HyperdescentState]:
    """The :class:`HyperdescentState` of a rule's state (the state itself for a rule built by
    :func:`hdfunc.hyperdescent`, or a node inside a chain), or None."""
    if isinstance(state, HyperdescentState):
        return state
    if isinstance(state, (tuple, list)) and not hasattr(state, "_fields"):
        for item in state:
            found = hyperdescent_node(item)
            if found is not None:
                return found
    return None


def _replace_node(state: Any, node: HyperdescentState) -> Any:
    if isinstance(state, HyperdescentState):
        return node
    return type(state)(_replace_node(item, node) if hyperdescent_node(item) is not None
                       else item for item in state)


# ----------------------------------------------------------------------------- built-in rules


def _extra_rate(mode: str, lr: float, scale: float, start: float) -> float:
    """β of a hyperparameter other than α: it moves by ~0.1 % of its starting value per step at
    the start (additive: h ≈ α ‖g‖‖d‖; multiplicative: the dimensionless 0.002), so that it stays
    inside its projection over the runs of the plan."""
    return 0.002 if mode == "multiplicative" else 0.001 * start / (lr * scale)


# name -> (the argument holding the second rate, its starting value). adam_hd_lr_beta1 is checked
# through verification.catalog.HYPERDESCENT_RULES (its t = 2 cancellation needs the comparator's
# rounding allowance, ``terms=`` below).
BUILTIN = {"sgdm_hd_lr_momentum": ("momentum_hypergrad_lr", 0.9),
           "sgdn_hd_lr_momentum": ("momentum_hypergrad_lr", 0.9)}


def hyperdescent_spec(name: str, mode: str = "additive") -> RuleSpec:
    """The spec of the built-in rule ``name`` (a key of :data:`BUILTIN`) in ``mode``."""
    info = hdfunc.rule_info(name)
    rate_arg, start = BUILTIN[name]
    eps_root = {"eps": 1e-8} if "betas" in info.example else {}

    def make(lr: float, beta: float, calibration: Optional[Calibration]) -> Any:
        scale = calibration.step_scale if calibration is not None else 1.0
        extra = 0.0 if beta == 0 else _extra_rate(mode, lr, scale, start)
        return info.factory(lr, beta, **{rate_arg: extra}, mode=mode, **eps_root)

    return RuleSpec(f"{name}[{mode}]", make, family=name, mode=mode, adapts=info.adapts)


# hdfunc.hyperdescent with per-tensor / per-element hyperparameters and coupled weight decay:
# name -> (factory, the second adapted name and its start (None: α only), granularity, fixed
# hyperparameters, coupled L2 coefficient)
GRANULAR = {
    "hyperdescent_sgdn[lr:element,momentum:tensor]": (
        hdfunc.sgdn, ("momentum", 0.9), {"lr": "element", "momentum": "tensor"},
        {"momentum": 0.9}, 0.0),
    "hyperdescent_adam[lr:tensor,l2]": (
        hdfunc.adam, None, "tensor", {"weight_decay": 1e-2}, 1e-2),
}


def granular_spec(name: str, mode: str = "additive") -> RuleSpec:
    """The spec of the rule ``name`` (a key of :data:`GRANULAR`) in ``mode``."""
    factory, second, granularity, fixed, l2 = GRANULAR[name]

    def make(lr: float, beta: float, calibration: Optional[Calibration]) -> Any:
        scale = calibration.step_scale if calibration is not None else 1.0
        rates = {"lr": beta}
        if second is not None:
            rates[second[0]] = 0.0 if beta == 0 else _extra_rate(mode, lr, scale, second[1])
        return hdfunc.hyperdescent(factory, rates, mode=mode, granularity=granularity, lr=lr,
                                   **fixed)

    adapts = ("lr",) + (() if second is None else (second[0],))
    return RuleSpec(f"{name}[{mode}]", make, family=name, mode=mode, adapts=adapts, l2=l2)


def hyperdescent_specs(quick: bool) -> list[RuleSpec]:
    """Every built-in rule in both modes, and the per-tensor / per-element ones of
    :data:`GRANULAR` (quick: one built-in, multiplicative, and the granular ones, additive)."""
    if quick:
        return [hyperdescent_spec("sgdn_hd_lr_momentum", "multiplicative")] + [
            granular_spec(name) for name in GRANULAR]
    return [hyperdescent_spec(name, mode) for name in BUILTIN
            for mode in ("additive", "multiplicative")] + [
        granular_spec(name, mode) for name in GRANULAR for mode in ("additive", "multiplicative")]


# ----------------------------------------------------------------------------- the checks


class HyperdescentCase:
    """A hyperdescent rule run on a problem: its trajectory ``hist`` [(θ_k, state_k)]."""

    def __init__(self, spec: RuleSpec, problem: Problem, steps: int, seed: int = 0):
        self.spec, self.problem, self.seed = spec, problem, seed
        self.calibration = calibrate(spec, problem)
        self.rule = spec.build(self.calibration)
        self.hist = run_trajectory(self.rule, problem.loss, problem.params, steps)
        if hyperdescent_node(self.hist[-1][1]) is None:
            raise TypeError(f"the state of {spec.name} holds no hdfunc.HyperdescentState")
        for leaf in tree_leaves(self.hist[-1][0]):
            if not bool(torch.isfinite(leaf).all()):
                raise FloatingPointError(f"the trajectory of {spec.name} on {problem.name} "
                                         f"diverged within {steps} steps")

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the problem's params."""
        return self.problem.dtype

    def node(self, k: int) -> HyperdescentState:
        """The :class:`HyperdescentState` in the rule's state after step k.

        Args:
            k: the step (an index into ``hist``).

        Returns:
            The node, as :func:`hyperdescent_node` finds it (None if there is none).
        """
        return hyperdescent_node(self.hist[k][1])


def _objective_grad(case: HyperdescentCase, params: Any, node: HyperdescentState) -> Any:
    """∇ of the objective the rule descends at ``params``: f, plus the coupled L2 term
    (λ_wd/2)‖θ‖² (masked) of a rule that declares one (``coupled_weight_decay``), with λ_wd at
    its value in ``node`` when adapted."""
    g = grad(case.problem.loss)(params)
    law = case.rule.hyperparams
    if not law.get("coupled_weight_decay"):
        return g
    wd = node.hyperparams.get("weight_decay", law.get("weight_decay"))
    mask = law.get("weight_decay_mask")
    leaves = tree_leaves(params)
    on = [True] * len(leaves) if mask is None else mask_leaves(mask, params)
    wds = tree_leaves(wd) if isinstance(wd, dict) else [wd] * len(leaves)
    flat, spec = tree_flatten(g)
    return tree_unflatten([gi + w * p if o else gi for gi, w, p, o in zip(flat, wds, leaves, on)],
                          spec)


def _penalty(case: HyperdescentCase, node: HyperdescentState) -> Any:
    """θ ↦ (λ_wd/2)‖θ‖² over the decayed tensors (λ_wd of step t-1, not differentiated), or None
    for a rule without a coupled L2 term."""
    law = case.rule.hyperparams
    if not law.get("coupled_weight_decay"):
        return None
    wd = node.hyperparams.get("weight_decay", law.get("weight_decay"))
    mask = law.get("weight_decay_mask")

    def penalty(params: Any) -> torch.Tensor:
        leaves = tree_leaves(params)
        on = [True] * len(leaves) if mask is None else mask_leaves(mask, params)
        wds = ([w.detach() for w in tree_leaves(wd)] if isinstance(wd, dict)
               else [wd.detach() if isinstance(wd, torch.Tensor) else wd] * len(leaves))
        return 0.5 * sum(w * (p * p).sum() for w, p, o in zip(wds, leaves, on) if o)

    return penalty


def check_hyperdescent(case: HyperdescentCase, t: int) -> list[Outcome]:
    """The one-step identity and the rate law of every adapted hyperparameter at step t (a
    per-tensor / per-element λ: every entry by reverse mode, their sum along a tangent by
    forward mode and finite differences; the law entry by entry)."""
    if not 2 <= t < len(case.hist):
        raise ValueError(f"step t={t} is outside 2..{len(case.hist) - 1}")
    params, state = case.hist[t - 2]
    g = grad(case.problem.loss)(params)
    before, after = case.node(t - 1), case.node(t)
    node = hyperdescent_node(state)
    out: list[Outcome] = []
    g_next = _objective_grad(case, case.hist[t - 1][0], before)  # g_t, of the law's norms
    grad_norm = math.sqrt(float(tree_sq_norm(g_next, torch.float64)))
    step_norm = math.sqrt(float(tree_sq_norm(
        [a - b for a, b in zip(tree_leaves(case.hist[t - 1][0]), tree_leaves(params))],
        torch.float64)))
    bounds = case.rule.hyperparams.get("bounds", {})
    grains = case.rule.hyperparams.get("granularity", {})
    penalty = _penalty(case, before)
    for name in before.hyperparams:
        grain = grains.get(name, "global")
        entries = torch.cat([x.reshape(-1).to(torch.float64)
                             for x in tree_leaves(before.hyperparams[name])])
        low, high = bounds.get(name, (None, None))
        # the size of u_{t-1}'s change for a relative change of λ (of 1 - λ for a λ below 1:
        # momentum, β1), which is what rounding makes of d/dλ f: ROUNDING_FLOOR of ‖g_t‖ times it
        # (for α this is the floor of the other checks, ROUNDING_FLOOR ‖g_t‖‖d_{t-1}‖); the
        # smallest entry's for a per-tensor / per-element λ
        probability = high is not None and high <= 1
        units = torch.minimum(entries.abs(), 1 - entries) if probability else entries.abs()
        unit = float(units.min())
        floor = ROUNDING_FLOOR * grad_norm * step_norm / unit if unit > 0 else 0.0
        at_bound = bool(((entries == low) if low is not None else entries != entries).any()
                        | ((entries == high) if high is not None else entries != entries).any())

        def phi(value: Any, name: str = name) -> torch.Tensor:
            frozen = node._replace(
                hyperparams={**before.hyperparams, name: value},
                hypergrad_lr={k: torch.zeros_like(v) for k, v in node.hypergrad_lr.items()})
            theta = step_with(case.rule, g, _replace_node(state, frozen), params)[0]
            if penalty is None:  # (a spec's own l2, if any)
                return case.spec.objective(case.problem.loss)(theta)
            return case.problem.loss(theta) + penalty(theta)  # the rule's declared L2 term

        judge = Judge(HYPERDESCENT, case.spec.name, case.problem.name, case.dtype,
                      f"seed {case.seed}, t={t}, {name}" + ("" if grain == "global"
                                                             else f", per {grain}"),
                      f"the rule's h_{name},t and the exact d/d{name} f(theta_(t-2)+u_(t-1))")
        methods = (REVERSE, FORWARD) if at_bound or case.dtype != torch.float64 else (
            REVERSE, FORWARD, FINITE)
        if grain == "global":
            out += compare_derivatives(phi, before.hyperparams[name], judge,
                                       claimed=after.hypergrad[name], methods=methods,
                                       floor=floor,  # rounding of the n-term h (issue 12)
                                       terms=sum(p.numel() for p in tree_leaves(params)))
        else:  # along the relative direction |λ| (|1 - λ| below 1), entry by entry reversed
            lam = before.hyperparams[name]
            direction = (lambda x: torch.minimum(x.abs(), 1 - x)) if probability else torch.abs
            out += compare_derivatives(phi, lam, judge, claimed=after.hypergrad[name],
                                       tangents=[tree_map(direction, lam)], methods=methods,
                                       floor=floor)
        if at_bound and case.dtype == torch.float64:
            out.append(judge.inconclusive(FINITE, (
                f"{name} = {entries.tolist()[:4]} is at its projection bound, where the replayed "
                "step clamps a perturbed value back: f is one-sided there and a central "
                "difference measures half the derivative (reverse and forward mode are "
                "checked)")))
        out.append(_rate_law(case, t, name, before, after, g_next, grain))
    return out


def _rate_law(case: HyperdescentCase, t: int, name: str, before: HyperdescentState,
              after: HyperdescentState, g_next: Any, grain: str = "global") -> Outcome:
    """λ_t from λ_{t-1}, β_λ, h_λ,t (and the norms, at λ's granularity) by the declared mode and
    bounds, entry by entry; the largest error over the entries."""
    law = case.rule.hyperparams
    beta = before.hypergrad_lr[name]
    lams, hs = tree_leaves(before.hyperparams[name]), tree_leaves(after.hypergrad[name])
    tangents, grads = tree_leaves(before.tangents[name]), tree_leaves(g_next)
    if grain == "global":
        norms_sq = [float(tree_sq_norm(g_next, torch.float64))
                    * float(tree_sq_norm(before.tangents[name], torch.float64))]
    elif grain == "tensor":
        norms_sq = [float((x.double() ** 2).sum()) * float((d.double() ** 2).sum())
                    for x, d in zip(grads, tangents)]
    else:
        norms_sq = [(x.double() ** 2) * (d.double() ** 2) for x, d in zip(grads, tangents)]
    low, high = law["bounds"][name]
    err, size = 0.0, 0.0
    for lam, h, nsq, actual in zip(lams, hs, norms_sq, tree_leaves(after.hyperparams[name])):
        if law["mode"] == "additive":
            expected = lam - beta * h
        else:
            nsq = torch.as_tensor(nsq, dtype=torch.float64)
            norms = torch.where(nsq > 0, nsq, 1).sqrt()
            expected = torch.where(nsq > 0, lam * (1 - beta * h / norms), lam)
        expected = torch.clamp(torch.as_tensor(expected, dtype=lam.dtype), min=low, max=high)
        err = max(err, float((actual.double() - expected.double()).abs().max()))
        size = max(size, float(actual.double().abs().max()), float(lam.double().abs().max()))
    return judged(HYPERDESCENT_LAW, "replay", case.spec.name, case.problem.name,
                  dtype_name(case.dtype), err, size, tolerance(case.dtype, REVERSE),
                  f"seed {case.seed}, t={t}, {name}" + ("" if grain == "global"
                                                         else f", per {grain}"),
                  f"the rule's {name}_t and the {law['mode']} law applied to its h_{name},t")
