"""Verification of rules that adapt any hyperparameter (:func:`hdfunc.hyperdescent`; state
:class:`hdfunc.HyperdescentState`): built-in (``sgdm_hd_lr_momentum``, ``sgdn_hd_lr_momentum``)
and ``--rule`` user rules.

For each adapted hyperparameter λ, at steps t of the plan:

* **one-step identity**: the rule's h_λ,t equals the exact d/dλ f(θ_{t-2} + u_{t-1}(λ)) at
  λ = λ_{t-1}, with every other hyperparameter at its value of step t-1 and the rule's state
  frozen (the greedy derivative HD uses), by reverse mode, forward mode and float64 finite
  differences (the suite's comparator);
* **rate law**: λ_t = clamp(λ_{t-1} − β_λ h_λ,t) (additive) or
  clamp(λ_{t-1} (1 − β_λ h_λ,t / (‖g_t‖ ‖∂u_{t-1}/∂λ‖))) (multiplicative), from the rule's own
  λ_{t-1}, h_λ,t and stored tangent, with the rule's declared mode and bounds.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch.func import grad

import hdfunc
from hdfunc.hyperdescent import HyperdescentState
from hdfunc.tree import tree_leaves, tree_sq_norm

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


# name -> (the argument holding the second rate, its starting value). adam_hd_lr_beta1 is not
# in the catalogue yet: at t = 2 its h_β1 is analytically 0 (m̂_1 = g_1 for every β1), a
# cancellation of terms ~1/(1-β1)² whose rounding the floor below does not yet bound (1.1e-10
# relative against a tolerance of 1e-10 on tiny_quadratic); tests/test_momentum_rules.py checks
# it against a literal loop of its equations.
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


def hyperdescent_specs(quick: bool) -> list[RuleSpec]:
    """Every built-in rule in both modes (quick: one, multiplicative)."""
    if quick:
        return [hyperdescent_spec("sgdn_hd_lr_momentum", "multiplicative")]
    return [hyperdescent_spec(name, mode) for name in BUILTIN
            for mode in ("additive", "multiplicative")]


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
        return self.problem.dtype

    def node(self, k: int) -> HyperdescentState:
        return hyperdescent_node(self.hist[k][1])


def check_hyperdescent(case: HyperdescentCase, t: int) -> list[Outcome]:
    """The one-step identity and the rate law of every adapted hyperparameter at step t."""
    if not 2 <= t < len(case.hist):
        raise ValueError(f"step t={t} is outside 2..{len(case.hist) - 1}")
    params, state = case.hist[t - 2]
    g = grad(case.problem.loss)(params)
    before, after = case.node(t - 1), case.node(t)
    node = hyperdescent_node(state)
    out: list[Outcome] = []
    g_next = grad(case.problem.loss)(case.hist[t - 1][0])  # g_t, of the rate law's norms
    grad_norm = math.sqrt(float(tree_sq_norm(g_next, torch.float64)))
    step_norm = math.sqrt(float(tree_sq_norm(
        [a - b for a, b in zip(tree_leaves(case.hist[t - 1][0]), tree_leaves(params))],
        torch.float64)))
    bounds = case.rule.hyperparams.get("bounds", {})
    for name in before.hyperparams:
        value = float(before.hyperparams[name])
        low, high = bounds.get(name, (None, None))
        # the size of u_{t-1}'s change for a relative change of λ (of 1 - λ for a λ below 1:
        # momentum, β1), which is what rounding makes of d/dλ f: ROUNDING_FLOOR of ‖g_t‖ times it
        # (for α this is the floor of the other checks, ROUNDING_FLOOR ‖g_t‖‖d_{t-1}‖)
        unit = min(abs(value), 1 - value) if high is not None and high <= 1 else abs(value)
        floor = ROUNDING_FLOOR * grad_norm * step_norm / unit if unit > 0 else 0.0
        at_bound = value in (low, high)

        def phi(value: torch.Tensor, name: str = name) -> torch.Tensor:
            frozen = node._replace(
                hyperparams={**before.hyperparams, name: value},
                hypergrad_lr={k: torch.zeros_like(v) for k, v in node.hypergrad_lr.items()})
            return case.spec.objective(case.problem.loss)(
                step_with(case.rule, g, _replace_node(state, frozen), params)[0])

        judge = Judge(HYPERDESCENT, case.spec.name, case.problem.name, case.dtype,
                      f"seed {case.seed}, t={t}, {name}",
                      f"the rule's h_{name},t and the exact d/d{name} f(theta_(t-2)+u_(t-1))")
        methods = (REVERSE, FORWARD) if at_bound or case.dtype != torch.float64 else (
            REVERSE, FORWARD, FINITE)
        out += compare_derivatives(phi, before.hyperparams[name], judge,
                                   claimed=after.hypergrad[name], methods=methods, floor=floor)
        if at_bound and case.dtype == torch.float64:
            out.append(judge.inconclusive(FINITE, (
                f"{name} = {value} is at its projection bound, where the replayed step clamps "
                "a perturbed value back: f is one-sided there and a central difference measures "
                "half the derivative (reverse and forward mode are checked)")))
        out.append(_rate_law(case, t, name, before, after, grad_sq=grad_norm ** 2))
    return out


def _rate_law(case: HyperdescentCase, t: int, name: str, before: HyperdescentState,
              after: HyperdescentState, grad_sq: float) -> Outcome:
    """λ_t from λ_{t-1}, β_λ, h_λ,t (and the norms) by the declared mode and bounds."""
    law = case.rule.hyperparams
    lam, beta, h = before.hyperparams[name], before.hypergrad_lr[name], after.hypergrad[name]
    dtype = lam.dtype
    if law["mode"] == "additive":
        expected = lam - beta * h
    else:
        norms = math.sqrt(grad_sq * float(tree_sq_norm(before.tangents[name], torch.float64)))
        expected = lam if norms == 0 else lam * (1 - beta * h / norms)
    low, high = law["bounds"][name]
    expected = torch.clamp(torch.as_tensor(expected, dtype=dtype), min=low, max=high)
    actual = after.hyperparams[name]
    err = abs(float(actual) - float(expected))
    return judged(HYPERDESCENT_LAW, "replay", case.spec.name, case.problem.name,
                  dtype_name(case.dtype), err,
                  max(abs(float(actual)), abs(float(lam))), tolerance(case.dtype, REVERSE),
                  f"seed {case.seed}, t={t}, {name}",
                  f"the rule's {name}_t and the {law['mode']} law applied to its h_{name},t")
