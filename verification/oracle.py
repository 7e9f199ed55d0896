"""The autodiff-HD oracle: the *definition* of hypergradient descent, replayed from a rule's frozen
step alone, against which the rule's whole trajectory is certified.

From the rule the oracle takes only the step with a given rate, u_t(γ) = the rule's update with
β frozen to 0 and the rate set to γ (:func:`hdfunc.freeze_lr`), and the rate law the rule
declares (its ``rate_law``, an :class:`hdfunc.HDOptions`; by default the paper's additive rule at
the granularity of the state's ``lr``). Everything else is the definition (docs/algorithms.md;
Baydin et al. 2018, §2 Eqs. 2-4 and 7-8, §5.1, §5.2), computed by autodiff:

    h_t      = d/dγ f(θ_{t-2} + u_{t-1}(γ)) at γ = γ_{t-1}             (reverse mode)
    ∂f/∂β    = d/dβ f(θ_{t-2} + u_{t-1}(γ_{t-1}(α_{t-1}(β))))           (higher order, §5.2)
    β_t      = β_{t-1} - κ ∂f/∂β                                         (or its normalised form)
    α_t      = α_{t-1} - β_t h_t                                         (additive, Eq. 3)
    α_t      = α_{t-1} (1 - β_t h_t / (‖g_t‖ ‖∇_γ u_{t-1}‖))             (multiplicative, Eq. 8)
    α_t      = clamp(α_t, low, high)                                     (bounds)
    γ_t      = δ(t) α_t + (1 - δ(t)) α_∞                                 (transition, §5.1)
    θ_t      = θ_{t-1} + u_t(γ_t)

With a schedule (``lr_schedule`` in the declared law, an extension: docs/algorithms.md) the step
at rate γ is u_t(γ) = -s(t-1) γ d_t, and the rule's frozen step applies exactly that (its
``freeze_lr`` sets the rate the schedule multiplies). The definition is unchanged, with γ the
rate HD adapts: h_t = d/dγ f(θ_{t-2} + u_{t-1}(γ)) = -s(t-2) g_t · d_{t-1}, and
‖∇_γ u_{t-1}‖ = s(t-2) ‖d_{t-1}‖ in Eq. 8, both by autodiff through the rule's step; the rate
the step applies, which the rule reports as ``applied_lr``, is s(t-1) γ_t.

Two comparisons, both in :func:`check_oracle`:

- **step by step**: at every step t, each part is recomputed from the rule's own state after
  step t-1 and compared with what the rule did at step t, in the order of the algorithm:
  the hypergradient h_t, the hyper-hypergradient, β_t, the rate law α_t, the applied rate γ_t,
  and the step θ_t. Each part is judged on the rule's own inputs, so a failure names the part
  that is wrong, not the ones downstream of it.
- **from θ_0**: the oracle runs on its own from the rule's initial state and the two
  trajectories (θ_t, α_t, γ_t, β_t) must agree. This catches what no single step shows: a
  state that carries something the definition does not (a hidden per-tensor rate, say).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch.func import grad, jvp

import hdfunc
from hdfunc.hypergradient import schedule_value
from hdfunc.options import HDOptions, Schedule
from hdfunc.tree import PyTree, tree_flatten, tree_leaves, tree_map, tree_unflatten

from verification.conditioning import (CONDITIONING_SAFETY, ILL_CONDITIONED, perturb,
                                       rounding_noises)

ORACLE = "autodiff-HD oracle"

# The parts of one HD step, in the order the algorithm computes them (the diagnosis names the
# earliest step at which a part differs and, within a step, the first part in this order).
HYPERGRAD = "hypergradient h_t"
HYPER_HYPERGRAD = "hyper-hypergradient df/dbeta"
BETA = "hypergradient rate beta_t"
LAW = "rate law alpha_t"
APPLIED = "applied rate gamma_t"
STEP = "step theta_t"
TRAJECTORY = "trajectory from theta_0"
PARTS = (HYPERGRAD, HYPER_HYPERGRAD, BETA, LAW, APPLIED, STEP, TRAJECTORY)

WHAT = {
    HYPERGRAD: "the rule's h_t and the exact d/dgamma f(theta_{t-2} + u_{t-1}(gamma)) at the "
               "rate step t-1 applied",
    HYPER_HYPERGRAD: "the rule's hyper_hypergrad and the exact d/dbeta f(theta_{t-1}) through "
                     "the rate law of step t-1",
    BETA: "the rule's beta_t and the declared higher-order law applied to its own beta_{t-1} "
          "and hyper-hypergradient",
    LAW: "the rule's alpha_t and the declared rate law applied to its own alpha_{t-1}, "
         "beta_t and h_t",
    APPLIED: "the rate the rule reports its step t applied (applied_lr, else lr) and the one "
             "the definition applies (alpha_t, or delta(t) alpha_t + (1 - delta(t)) alpha_inf; "
             "times s(t-1) under lr_schedule)",
    STEP: "the rule's theta_t and its own step from theta_{t-1} with the rate it reports it "
          "applied (its update with beta frozen to 0)",
    TRAJECTORY: "the rule's trajectory (theta_t, alpha_t, gamma_t, beta_t) and the oracle's, "
                "run from the same theta_0 and initial state",
}

HINT = {
    HYPERGRAD: "h_t is wrong: check the sign, the step it comes from (g_t with d_{t-1}), and "
               "every constant of the recomputed or stored d_{t-1} (eps, bias corrections)",
    HYPER_HYPERGRAD: "the hyper-hypergradient is wrong: it must be h_t * dgamma_{t-1}/dalpha "
                     "* dalpha_{t-1}/dbeta with the one-step freezing",
    BETA: "beta_t does not follow the declared higher-order law",
    LAW: "alpha_t does not follow the declared rate law (sign, scale, normalisation, bounds): "
         "declare the law the rule implements as its rate_law (docs/writing-a-rule.md)",
    APPLIED: "step t applied another rate than the definition's gamma_t (alpha_t itself "
             "without a transition; s(t-1) gamma_t under lr_schedule): a rate of the wrong step, "
             "or a schedule factor of the wrong step (or applied twice)?",
    STEP: "the parameters did not move by the rule's own step with the rate it reports: the "
          "step used another rate (alpha_{t-1}, or alpha updated after the step?) or the "
          "reported applied_lr is not the one applied",
    TRAJECTORY: "every step agrees with the definition given the rule's own state, but the "
                "trajectories from theta_0 part: the state carries something the definition "
                "does not (a hidden or per-tensor rate, state updated with the adapted rate)",
}

# Relative tolerances of the oracle's comparisons (max abs error / scale). The parts are
# computed by the same arithmetic up to the order of operations, so they agree to rounding;
# the trajectory's tolerance is at least CONDITIONING_SAFETY × the measured rounding
# sensitivity of the rule's own trajectory (:func:`trajectory_sensitivity`).
TOLERANCES = {torch.float64: {HYPERGRAD: 1e-10, HYPER_HYPERGRAD: 1e-10, BETA: 1e-12, LAW: 1e-12,
                              APPLIED: 1e-12, STEP: 1e-12, TRAJECTORY: 1e-12},
              torch.float32: {HYPERGRAD: 1e-4, HYPER_HYPERGRAD: 1e-3, BETA: 1e-5, LAW: 1e-5,
                              APPLIED: 1e-5, STEP: 1e-5, TRAJECTORY: 1e-5}}


# ----------------------------------------------------------------------------- the declared law


def declared_law(rule: Any, state: Any) -> HDOptions:
    """The rate law ``rule`` declares (``rule.rate_law``), or the paper's additive rule at the
    granularity of the state's ``lr``. A declared granularity must match the state's."""
    node = hdfunc.find_lr_state(state)
    granularity = rate_granularity(node.lr)
    law = getattr(rule, "rate_law", None)
    if law is None:
        return HDOptions(lr_granularity=granularity)
    if not isinstance(law, HDOptions):
        raise TypeError(f"rate_law must be an hdfunc.HDOptions, got {type(law).__name__}")
    if law.lr_granularity != granularity:
        raise ValueError(f"the rule declares lr_granularity={law.lr_granularity!r} but the lr in "
                         f"its state is a {granularity} rate")
    return law


def rate_granularity(lr: PyTree) -> str:
    """"global" (one 0-d tensor), "tensor" (a pytree of 0-d tensors) or "element"."""
    if isinstance(lr, torch.Tensor) and lr.dim() == 0:
        return "global"
    leaves = tree_leaves(lr)
    return "tensor" if leaves and all(x.dim() == 0 for x in leaves) else "element"


def reduce_at(granularity: str, xs: list, ys: list) -> list:
    """Σ x⊙y at a rate granularity, as a list of rate leaves (one, one per tensor, or per
    element), accumulated in at least float32."""
    def dtype(x: torch.Tensor) -> torch.dtype:
        return torch.promote_types(x.dtype, torch.float32)
    if granularity == "global":
        return [sum((x.to(dtype(x)) * y.to(dtype(x))).sum() for x, y in zip(xs, ys))]
    if granularity == "tensor":
        return [(x.to(dtype(x)) * y.to(dtype(x))).sum() for x, y in zip(xs, ys)]
    return [x.to(dtype(x)) * y.to(dtype(x)) for x, y in zip(xs, ys)]


def _sqrt_positive(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    positive = x > 0
    return positive, torch.where(positive, x, 1).sqrt()  # no sqrt'(0) = inf in autodiff


def rate_law(law: HDOptions, lr: list, beta: torch.Tensor, hypergrad: list, grad_sq: list,
             direction_sq: list) -> list:
    """α_t from α_{t-1}, β_t, h_t (and, for Eq. 8, ‖g_t‖², ‖∇_γ u_{t-1}‖²) at the rates'
    granularity: the paper's additive or multiplicative rule, then the bounds; a non-finite
    h_t or new α (before the bounds) leaves α unchanged when the law skips such steps."""
    out = []
    for a, h, gg, dd in zip(lr, hypergrad, grad_sq, direction_sq):
        b = beta.to(a.dtype)
        if law.mode == "additive":
            new = a - b * h
        else:
            positive, norms = _sqrt_positive(gg * dd)
            new = torch.where(positive, a * (1 - b * h / norms), a)
        finite = torch.isfinite(h) & torch.isfinite(new)  # judged before the bounds
        if law.lr_low is not None or law.lr_high is not None:
            new = torch.clamp(new, min=law.lr_low, max=law.lr_high)
        if law.skip_nonfinite:
            new = torch.where(finite, new, a)
        out.append(new)
    return out


def beta_law(law: HDOptions, beta: torch.Tensor, hyper: torch.Tensor, dloss_dlr: list,
             dlr_dbeta: list) -> torch.Tensor:
    """β_t from β_{t-1} and ∂f(θ_{t-1})/∂β (§5.2): additive, or normalised by the norms of
    ∂f/∂α_{t-1} and ∂α_{t-1}/∂β as in Eq. 8."""
    kappa = law.hyper_hypergrad_lr
    if law.mode == "additive":
        new = beta - kappa * hyper
    else:
        norm_a = sum((a.to(beta.dtype) ** 2).sum() for a in dloss_dlr)
        norm_b = sum((b.to(beta.dtype) ** 2).sum() for b in dlr_dbeta)
        positive, norms = _sqrt_positive(norm_a * norm_b)
        new = torch.where(positive, beta * (1 - kappa * hyper / norms), beta)
    if law.skip_nonfinite:
        new = torch.where(torch.isfinite(hyper) & torch.isfinite(new), new, beta)
    return new


def applied_rate(law: HDOptions, t: int, lr: list, final_lr: list) -> list:
    """γ_t = δ(t) α_t + (1 - δ(t)) α_∞ with a transition (§5.1), else α_t."""
    if not law.has_final_lr:
        return list(lr)
    delta = law.transition(torch.tensor(float(t), dtype=lr[0].dtype, device=lr[0].device))
    return [delta * a + (1 - delta) * f for a, f in zip(lr, final_lr)]


def schedule_factor(schedule: Optional[Schedule], count: int, like: torch.Tensor) -> Any:
    """s(count), the factor ``lr_schedule`` puts on the rate of step count + 1
    (u_t = -s(t-1) γ_t d_t), computed as the rules compute it; 1.0 without a schedule.

    Args:
        schedule: the declared ``lr_schedule``, or None.
        count: the step count c >= 0 (t - 1 for step t).
        like: a rate tensor whose dtype and device s takes.

    Returns:
        s(count) as a 0-d tensor, or 1.0.
    """
    if schedule is None:
        return 1.0
    count_tensor = torch.tensor(max(int(count), 0), dtype=torch.int64, device=like.device)
    return schedule_value(schedule, count_tensor, like)


def scheduled(schedule: Optional[Schedule], t: int, rates: list) -> list:
    """s(t-1) γ_t: the rate step t applies (what a rule reports as ``applied_lr``), from γ_t.

    Args:
        schedule: the declared ``lr_schedule``, or None.
        t: the step.
        rates: γ_t, as rate leaves.

    Returns:
        The applied rate's leaves (``rates`` itself without a schedule).
    """
    if schedule is None:
        return list(rates)
    factor = schedule_factor(schedule, t - 1, rates[0])
    return [factor.to(r.dtype) * r for r in rates]


def unscheduled(schedule: Optional[Schedule], t: int, applied: list, fallback: list) -> list:
    """γ_t from the rate step t applied, s(t-1) γ_t: the rate at which the rule's frozen step
    (:func:`hdfunc.freeze_lr`) repeats step t. Where s(t-1) = 0 every rate gives the same
    (null) step, and ``fallback`` is returned.

    Args:
        schedule: the declared ``lr_schedule``, or None.
        t: the step.
        applied: s(t-1) γ_t, as rate leaves.
        fallback: the rate leaves to use where s(t-1) = 0 (the adapted α_t, say).

    Returns:
        γ_t's leaves (``applied`` itself without a schedule).
    """
    if schedule is None:
        return list(applied)
    factor = schedule_factor(schedule, t - 1, applied[0])
    nonzero = factor != 0
    divisor = torch.where(nonzero, factor, torch.ones_like(factor))
    return [torch.where(nonzero, a / divisor.to(a.dtype), f.to(a.dtype))
            for a, f in zip(applied, fallback)]


def transition_slope(law: HDOptions, t: int, like: torch.Tensor) -> Any:
    """∂γ_t/∂α_t."""
    if not law.has_final_lr:
        return 1.0
    return law.transition(torch.tensor(float(t), dtype=like.dtype, device=like.device))


# ----------------------------------------------------------------------------- the exact parts


@dataclass
class Past:
    """What the oracle remembers of step t-1: where it started (θ_{t-2}, the rule's state
    before it, the gradient it read), the rate it applied, and its rate-law inputs."""

    t: int
    params: PyTree
    state: Any
    grads: PyTree  # ∇loss(θ_{t-2}), as fed to the rule
    applied: PyTree  # γ_{t-1}, with the rate structure (the step applied s(t-2) γ_{t-1})
    lr_before: list  # α_{t-2}
    beta: torch.Tensor  # β_{t-1}
    hypergrad: list  # h_{t-1}
    grad_sq: list
    direction_sq: list
    final_lr: list


@dataclass
class OracleProblem:
    """Everything the oracle needs about one rule run on one problem: the rule, the loss it
    is fed gradients of, the objective its hypergradients differentiate, its declared rate
    law, and the tree structure of its rates; with the rule's step at a frozen rate."""

    rule: Any
    loss: Callable[[PyTree], torch.Tensor]  # what the rule is fed the gradient of
    objective: Callable[[PyTree], torch.Tensor]  # what its hypergradients differentiate
    law: HDOptions
    rate_spec: Any  # tree structure of the rates

    def step(self, grads: PyTree, state: Any, params: PyTree, rate: PyTree) -> tuple[PyTree, Any]:
        """(θ, state) after the rule's step that applies exactly ``rate`` and adapts nothing."""
        updates, new_state = self.rule.update(grads, hdfunc.freeze_lr(state, rate), params)
        return hdfunc.apply_updates(params, updates), new_state

    def rates(self, leaves: list) -> PyTree:
        """Rate leaves in the structure of the rule's rates.

        Args:
            leaves: the rate leaves.

        Returns:
            The single leaf for a global rate, else the leaves unflattened with ``rate_spec``.
        """
        return leaves[0] if self.law.lr_granularity == "global" else tree_unflatten(
            leaves, self.rate_spec)


def exact_hypergradient(pb: OracleProblem, past: Past) -> tuple[list, list]:
    """h_t = d/dγ f(θ_{t-2} + u_{t-1}(γ)) at γ_{t-1} (reverse mode), and ∇_γ u_{t-1} along a
    unit tangent per rate entry (forward mode): -d_{t-1}, params-shaped."""
    def moved(rate: PyTree) -> PyTree:
        return pb.step(past.grads, past.state, past.params, rate)[0]

    h = grad(lambda rate: pb.objective(moved(rate)))(past.applied)
    ones = tree_map(torch.ones_like, past.applied)
    _, dtheta = jvp(moved, (past.applied,), (ones,))
    return tree_leaves(h), tree_leaves(dtheta)


def exact_hyper_hypergradient(pb: OracleProblem, past: Past) -> tuple[torch.Tensor, list]:
    """∂f(θ_{t-1})/∂β with the one-step freezing (§5.2): the derivative through α_{t-1}(β) =
    law(α_{t-2}, β, h_{t-1}) and γ_{t-1}(α_{t-1}) of f after step t-1; with the vectors
    ∂f/∂α_{t-1} and ∂α_{t-1}/∂β that the normalised β rule uses."""
    law = pb.law

    def lr_of(beta: torch.Tensor) -> list:
        return rate_law(law, past.lr_before, beta, past.hypergrad, past.grad_sq,
                        past.direction_sq)

    def loss_of(beta: torch.Tensor) -> torch.Tensor:
        gamma = applied_rate(law, past.t, lr_of(beta), past.final_lr)
        return pb.objective(pb.step(past.grads, past.state, past.params, pb.rates(gamma))[0])

    hyper = grad(loss_of)(past.beta)
    _, dlr_dbeta = jvp(lr_of, (past.beta,), (torch.ones_like(past.beta),))
    return hyper, dlr_dbeta


# ----------------------------------------------------------------------------- comparisons


@dataclass
class PartRecord:
    """The worst relative error of one part over the steps, and the first step it failed."""

    tolerance: float
    worst: float = 0.0
    worst_abs: float = 0.0
    worst_scale: float = 1.0
    worst_step: int = 0
    first_failure: Optional[int] = None
    compared: int = 0

    def add(self, t: int, abs_err: float, scale: float) -> None:
        """Record the error of step ``t``: ``t`` becomes the first failure if its relative
        error exceeds the tolerance and none failed before, and the worst if it is at least as
        large as the worst so far (or not finite).

        Args:
            t: the step.
            abs_err: the absolute error.
            scale: the scale the error is relative to.
        """
        self.compared += 1
        rel = _relative(abs_err, scale)
        if rel > self.tolerance and self.first_failure is None:
            self.first_failure = t
        if rel >= self.worst or not math.isfinite(rel):
            self.worst, self.worst_abs, self.worst_scale, self.worst_step = rel, abs_err, scale, t


def _relative(abs_err: float, scale: float) -> float:
    if not (math.isfinite(abs_err) and math.isfinite(scale)):
        return math.inf
    if scale > 0:
        return abs_err / scale
    return 0.0 if abs_err == 0 else math.inf


def max_abs(leaves: list) -> float:
    """The largest absolute entry of ``leaves`` (in float64; empty leaves are skipped).

    Args:
        leaves: tensors.

    Returns:
        max |x|, or 0.0 when there are no entries.
    """
    return max((float(x.detach().double().abs().max()) for x in leaves if x.numel()), default=0.0)


def max_diff(a: list, b: list) -> float:
    """The largest entrywise absolute difference of two lists of leaves (in float64).

    Args:
        a: tensors.
        b: tensors of the same shapes as ``a``'s.

    Returns:
        max |a - b| over the pairs of nonempty leaves (0.0 when there are none), or inf when
        the lists differ in length.
    """
    if len(a) != len(b):
        return math.inf
    diffs = [float((x.detach().double() - y.detach().double()).abs().max())
             for x, y in zip(a, b) if x.numel()]
    return max(diffs, default=0.0)


@dataclass
class OracleResult:
    """The oracle's comparisons over one trajectory.

    Attributes:
        parts: a :class:`PartRecord` per part compared.
        steps: the steps of the trajectory.
        trajectory_sensitivity: the rounding sensitivity of the rule's own trajectory.
        dtype: the dtype of the params.
    """
    parts: dict = field(default_factory=dict)  # part -> PartRecord
    steps: int = 0
    trajectory_sensitivity: float = 0.0  # rounding sensitivity of the rule's own trajectory

    @property
    def ill_conditioned(self) -> bool:
        """Whether the trajectory's rounding sensitivity exceeds :data:`ILL_CONDITIONED` for
        ``dtype``: then a comparison cannot tell a wrong value from rounding."""
        return self.trajectory_sensitivity > ILL_CONDITIONED[self.dtype]

    dtype: torch.dtype = torch.float64


def _node(state: Any) -> Any:
    node = hdfunc.find_lr_state(state)
    if node is None or "hypergrad" not in getattr(node, "_fields", ()):
        raise TypeError("the state holds no HD node (a NamedTuple with fields lr, hypergrad_lr "
                        "and hypergrad); see docs/writing-a-rule.md")
    return node


def _applied_of(node: Any) -> PyTree:
    return node.applied_lr if "applied_lr" in node._fields else node.lr


def _final_of(node: Any) -> list:
    return tree_leaves(node.final_lr) if "final_lr" in node._fields else []


def run_oracle(rule: Any, loss: Callable, objective: Callable, hist: list,
               hypergrad_floor: float = 0.0) -> OracleResult:
    """Both comparisons over the rule's trajectory ``hist[k] = (θ_k, state_k)``, k = 0..T.
    ``hypergrad_floor``: the smallest scale an error of h_t is measured against."""
    params0, state0 = hist[0]
    node0 = _node(state0)
    law = declared_law(rule, state0)
    dtype = tree_leaves(params0)[0].dtype
    tol = TOLERANCES[torch.float64 if dtype == torch.float64 else torch.float32]
    pb = OracleProblem(rule, loss, objective, law, tree_flatten(node0.lr)[1])
    higher = law.hyper_hypergrad_lr is not None
    records = {part: PartRecord(tol[part]) for part in PARTS
               if higher or part not in (HYPER_HYPERGRAD, BETA)}
    result = OracleResult(records, len(hist) - 1)

    # ---- step by step, on the rule's own states
    past: Optional[Past] = None
    for t in range(1, len(hist)):
        (params, state), (params_t, state_t) = hist[t - 1], hist[t]
        node, node_t = _node(state), _node(state_t)
        feed = grad(loss)(params)
        g = tree_leaves(grad(objective)(params))
        lr_leaves = tree_leaves(node.lr)
        if past is None:
            h_exact = [torch.zeros_like(x) for x in lr_leaves]
            direction = [torch.zeros_like(x) for x in g]
        else:
            h_exact, direction = exact_hypergradient(pb, past)
        h_rule = tree_leaves(node_t.hypergrad)
        records[HYPERGRAD].add(t, max_diff(h_rule, h_exact),
                               max(max_abs(h_exact), hypergrad_floor))
        grad_sq = reduce_at(law.lr_granularity, g, g)
        direction_sq = reduce_at(law.lr_granularity, direction, direction)

        beta_rule = node_t.hypergrad_lr
        if higher:
            if past is None:  # ∂α_0/∂β = 0
                hyper_exact = torch.zeros_like(node.hypergrad_lr)
                beta_law_value = node.hypergrad_lr
            else:
                hyper_exact, dlr_dbeta = exact_hyper_hypergradient(pb, past)
                slope = transition_slope(law, past.t, lr_leaves[0])
                hyper_rule = node_t.hyper_hypergrad
                beta_law_value = beta_law(law, node.hypergrad_lr, hyper_rule,
                                          [h * slope for h in h_rule], dlr_dbeta)
            records[HYPER_HYPERGRAD].add(t, max_diff([node_t.hyper_hypergrad], [hyper_exact]),
                                         abs(float(hyper_exact)))
            records[BETA].add(t, max_diff([beta_rule], [beta_law_value]),
                              max(abs(float(node.hypergrad_lr)), abs(float(beta_law_value))))
        else:
            # a rule without the higher-order law keeps β: it is part of its rate law
            records[LAW].add(t, 0.0 if torch.equal(beta_rule, node.hypergrad_lr) else
                             abs(float(beta_rule - node.hypergrad_lr)),
                             max(abs(float(node.hypergrad_lr)), 1e-300))

        lr_law = rate_law(law, lr_leaves, beta_rule, h_rule, grad_sq, direction_sq)
        lr_rule = tree_leaves(node_t.lr)
        records[LAW].add(t, max_diff(lr_rule, lr_law), max(max_abs(lr_law), max_abs(lr_leaves)))
        gamma_law = applied_rate(law, t, lr_rule, _final_of(node))
        gamma_rule = tree_leaves(_applied_of(node_t))
        applied_law = scheduled(law.lr_schedule, t, gamma_law)  # s(t-1) γ_t
        records[APPLIED].add(t, max_diff(gamma_rule, applied_law), max_abs(applied_law))
        # the rate the rule's frozen step repeats step t at: the one it reports (÷ s(t-1))
        point = (_applied_of(node_t) if law.lr_schedule is None else
                 pb.rates(unscheduled(law.lr_schedule, t, gamma_rule, gamma_law)))
        moved, _ = pb.step(feed, state, params, point)
        step_size = max_diff(tree_leaves(params_t), tree_leaves(params))
        records[STEP].add(t, max_diff(tree_leaves(params_t), tree_leaves(moved)),
                          max(step_size, max_diff(tree_leaves(moved), tree_leaves(params))))
        past = Past(t, params, state, feed, point, lr_leaves, beta_rule, h_rule,
                    grad_sq, direction_sq, _final_of(node))

    # ---- from θ_0, on the oracle's own states
    trajectory = free_run(pb, params0, state0, len(hist) - 1)
    record = records[TRAJECTORY]
    result.dtype = dtype
    result.trajectory_sensitivity = trajectory_sensitivity(rule, loss, hist)
    record.tolerance = max(record.tolerance, CONDITIONING_SAFETY * result.trajectory_sensitivity)
    for t in range(1, len(hist)):
        params_t, state_t = hist[t]
        node_t = _node(state_t)
        o_params, o_lr, o_applied, o_beta = trajectory[t]
        errors = [(max_diff(tree_leaves(params_t), tree_leaves(o_params)),
                   max_abs(tree_leaves(o_params))),
                  (max_diff(tree_leaves(node_t.lr), o_lr), max_abs(o_lr)),
                  (max_diff(tree_leaves(_applied_of(node_t)), o_applied), max_abs(o_applied)),
                  (max_diff([node_t.hypergrad_lr], [o_beta]), abs(float(o_beta)))]
        worst = max(errors, key=lambda e: _relative(*e))
        record.add(t, *worst)
    return result


def _trajectory_distance(a: tuple, b: tuple) -> float:
    """The larger relative difference of θ and of α between two points of trajectories."""
    (pa, sa), (pb_, sb) = a, b
    la, lb = tree_leaves(_node(sa).lr), tree_leaves(_node(sb).lr)
    return max(_relative(max_diff(tree_leaves(pa), tree_leaves(pb_)), max_abs(tree_leaves(pb_))),
               _relative(max_diff(la, lb), max_abs(lb)))


def trajectory_sensitivity(rule: Any, loss: Callable, hist: list) -> float:
    """How far rounding alone can move the rule's trajectory: the largest relative change of
    (θ_t, α_t) over the steps when θ is perturbed after every step by rounding-sized noise
    (:mod:`verification.conditioning`)."""
    params0, state0 = hist[0]
    dtype = tree_leaves(params0)[0].dtype
    worst = 0.0
    for noise in rounding_noises(dtype):
        gen = noise.generator()
        params, state = params0, state0
        for t in range(1, len(hist)):
            updates, state = rule.update(grad(loss)(params), state, params)
            params = perturb(hdfunc.apply_updates(params, updates), noise, gen)
            distance = _trajectory_distance((params, state), hist[t])
            worst = max(worst, distance if math.isfinite(distance) else math.inf)
    return worst


def free_run(pb: OracleProblem, params: PyTree, state: Any, steps: int) -> list:
    """The oracle's own trajectory: ``out[t] = (θ_t, α_t, γ_t, β_t)`` (rates as leaf lists; γ_t
    as applied, s(t-1) γ_t under a schedule)."""
    law = pb.law
    node = _node(state)
    lr, beta = tree_leaves(node.lr), node.hypergrad_lr
    final = _final_of(node)
    out: list = [(params, lr, tree_leaves(_applied_of(node)), beta)]
    past: Optional[Past] = None
    for t in range(1, steps + 1):
        feed = grad(pb.loss)(params)
        g = tree_leaves(grad(pb.objective)(params))
        if past is None:
            h = [torch.zeros_like(x) for x in lr]
            direction = [torch.zeros_like(x) for x in g]
        else:
            h, direction = exact_hypergradient(pb, past)
        grad_sq = reduce_at(law.lr_granularity, g, g)
        direction_sq = reduce_at(law.lr_granularity, direction, direction)
        if law.hyper_hypergrad_lr is not None and past is not None:
            hyper, dlr_dbeta = exact_hyper_hypergradient(pb, past)
            slope = transition_slope(law, past.t, lr[0])
            beta = beta_law(law, beta, hyper, [x * slope for x in h], dlr_dbeta)
        new_lr = rate_law(law, lr, beta, h, grad_sq, direction_sq)
        gamma = applied_rate(law, t, new_lr, final)
        new_params, new_state = pb.step(feed, state, params, pb.rates(gamma))
        past = Past(t, params, state, feed, pb.rates(gamma), lr, beta, h, grad_sq, direction_sq,
                    final)
        params, state, lr = new_params, new_state, new_lr
        out.append((params, lr, scheduled(law.lr_schedule, t, gamma), beta))
    return out
