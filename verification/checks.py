"""The checks: analytic quantities of a rule against exact ones computed by ``torch.func``.

Notation (docs/algorithms.md): ``hist[k] = (θ_k, state_k)`` after k steps; step t reads
g_t = ∇f(θ_{t-1}) and state_{t-1}, and its HD node stores h_t (``hypergrad``), α_t (``lr``), the
applied rate γ_t (``applied_lr``) and, for the higher-order variant, ∂f(θ_{t-1})/∂β
(``hyper_hypergrad``).

Every check returns a list of :class:`~verification.report.Outcome`; the derivative checks
(1-4) build a function of a rate and hand it to the one comparator,
:func:`verification.derivatives.compare_derivatives`. The pieces live by concern:
:mod:`verification.derivatives` (comparator, finite differences, tolerances),
:mod:`verification.trajectories` (runs and losses after K steps), :mod:`verification.trees`
(pytree arithmetic), :mod:`verification.equivalences` (check 6) and
:mod:`verification.findings` (greedy vs exact); their names stay importable from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
from torch.func import grad, hessian, jvp, vmap

import hdfunc
from hdfunc.tree import PyTree, tree_flatten, tree_leaves, tree_map, tree_unflatten

from verification.catalog import Calibration, RuleSpec, calibrate
from verification.conditioning import (CONDITIONING_SAFETY, ILL_CONDITIONED, Noise,
                                       rounding_sensitivity)
from verification.derivatives import (  # noqa: F401 - re-exported
    AGREEMENT_TOLERANCES, EQUIVALENCE_TOLERANCES, FD_ALLOWANCE_CAP, FINITE, FORWARD,
    FORWARD_VMAP, METHOD_TOLERANCES, REVERSE, REVERSE_VMAP, ROUNDING_FLOOR, FiniteDifference,
    Judge, compare_derivatives, dtype_name, fd_step, finite_difference, one_step_fd_step,
    tolerance)
from verification.equivalences import (  # noqa: F401 - check 6, re-exported
    BETA_ZERO, TORCH_OPTIM, VMAP, check_beta_zero, check_torch_optim, check_vmap)
from verification.findings import greedy_vs_exact  # noqa: F401 - re-exported
from verification.oracle import HINT, ORACLE, TRAJECTORY, WHAT, run_oracle, unscheduled
from verification.problems import Problem, flatten_params, perturbed_params
from verification.report import Outcome, judged
from verification.trajectories import (  # noqa: F401 - re-exported
    batched_trajectory, grid_factors, grid_rules, hd_loss_of_beta, hd_loss_of_initial_lr,
    optimizer_trajectory, roll, run_trajectory, step_with, trajectory_error, unrolled_loss)
from verification.trees import (  # noqa: F401 - re-exported
    node_of, tangent_like, tangents_of, tree_abs_dot, tree_axpy, tree_dot, tree_index,
    tree_max_abs, tree_max_diff)

ONE_STEP = "one-step identity"
SECOND_ORDER = "second order"
UNROLLED = "K-step unrolled"
HYPER_BETA = "d loss_K / d beta"
HYPER_ALPHA0 = "d loss_K / d alpha_0"
HYPER_ANALYTIC = "hyper-hypergradient"
FRONT_END = "functional == hdfunc.optim"

NOT_DIFFERENTIABLE_AT_ZERO = (
    "the derivative through training is not finite on a problem with exactly-zero gradient "
    "entries (dead units): a second moment v = 0 there, and autodiff meets sqrt'(0) = inf; "
    "build the rule with eps_root > 0 (hdfunc.DIFFERENTIABLE_EPS_ROOT) to differentiate "
    "through it")

_trajectory_error = trajectory_error  # the earlier name


# ----------------------------------------------------------------------------- the context


@dataclass
class Case:
    """One rule on one problem and seed, with its trajectory ``hist``."""

    spec: RuleSpec
    problem: Problem
    calibration: Calibration
    rule: Any
    hist: list
    seed: int

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the problem's params."""
        return self.problem.dtype

    @property
    def device(self) -> torch.device:
        """The device of the problem's params (that of their first leaf)."""
        return tree_leaves(self.problem.params)[0].device

    @property
    def objective(self) -> Callable[[PyTree], torch.Tensor]:
        """The loss the rule's hypergradients refer to (with its coupled L2 penalty)."""
        return self.spec.objective(self.problem.loss)

    def floor(self, tangent: PyTree = None, hyper: bool = False) -> float:
        """The smallest scale errors are measured against: ROUNDING_FLOOR × the size of the
        first hypergradient, ‖g_1‖‖d_1‖ (× max|tangent| for a directional derivative; for
        ∂f/∂β × ‖g_1‖‖d_1‖ again (additive) or × α_0 (multiplicative)). Where h_t is itself
        a rounding-level cancellation (at a minimum), this keeps the relative error from
        measuring noise."""
        size = ROUNDING_FLOOR * self.calibration.step_scale
        if tangent is not None:
            size *= tree_max_abs(tangent)
        if hyper:
            size *= self.calibration.lr if self.spec.mode == "multiplicative" else (
                self.calibration.step_scale)
        return size

    def label(self) -> tuple[str, str, str]:
        """The case as the report names it.

        Returns:
            (rule name, problem name, dtype name).
        """
        return self.spec.name, self.problem.name, dtype_name(self.dtype)

    def judge(self, check: str, where: str, what: str = "") -> Judge:
        """The :class:`Judge` of ``check`` on this case."""
        return Judge(check, self.spec.name, self.problem.name, self.dtype, where, what)


def make_case(spec: RuleSpec, problem: Problem, steps: int, seed: int = 0,
              params: PyTree = None) -> Case:
    """``spec`` calibrated on ``problem`` and run ``steps`` steps (from ``params``)."""
    params = problem.params if params is None else params
    calibration = calibrate(spec, problem, params)
    rule = spec.build(calibration)
    hist = run_trajectory(rule, problem.loss, params, steps)
    node_of(hist[-1][1], spec.name)
    for leaf in tree_leaves(hist[-1][0]):
        if not bool(torch.isfinite(leaf).all()):
            raise FloatingPointError(f"the trajectory of {spec.name} on {problem.name} diverged "
                                     f"within {steps} steps")
    return Case(spec, problem, calibration, rule, hist, seed)


def inconclusive(case: Case, check: str, method: str, where: str, reason: str) -> Outcome:
    """An INCONCLUSIVE outcome: the comparison cannot decide here, for ``reason``."""
    return case.judge(check, where).inconclusive(method, reason)


def _multi_step_methods(case: Case) -> tuple[str, ...]:
    """Reverse mode, and finite differences where the rule and the problem are smooth over
    several steps (compared with forward mode)."""
    smooth = case.spec.smooth and case.problem.smooth
    return (REVERSE, FINITE) if smooth else (REVERSE,)


# ----------------------------------------------------------------------------- 1. one step


def schedule_of(rule: Any) -> Any:
    """The ``lr_schedule`` a rule declares in its ``rate_law`` (None: no schedule)."""
    return getattr(getattr(rule, "rate_law", None), "lr_schedule", None)


def adapted_rate(rule: Any, state: Any, t: int) -> PyTree:
    """γ_t, the rate HD adapts, of the step t that led to ``state``: the rate it reports it
    applied (``applied_lr``), divided by the factor s(t-1) of a declared ``lr_schedule``
    (u_t = -s(t-1) γ_t d_t; the rule's frozen step applies s(t-1) × the rate it is given, so
    this is the point at which it repeats step t). Works on batched (vmapped) states too."""
    applied = hdfunc.get_applied_lr(state)
    schedule = schedule_of(rule)
    if schedule is None:
        return applied
    leaves, spec = tree_flatten(applied)
    lr = tree_leaves(hdfunc.find_lr_state(state).lr)
    return tree_unflatten(unscheduled(schedule, t, leaves, lr), spec)


def one_step_function(case: Case, t: int) -> tuple[Callable[[PyTree], torch.Tensor], PyTree,
                                                      PyTree]:
    """f(α) = loss(θ_{t-2} + u_{t-1}(α)) with the past frozen, the rate γ_{t-1} step t-1
    applied (÷ s(t-2) under ``lr_schedule``: the rate HD adapts, of which h_t is the
    derivative), and the analytic h_t the rule used at step t."""
    if not 2 <= t < len(case.hist):
        raise ValueError(f"step t={t} is outside 2..{len(case.hist) - 1}")
    params, state = case.hist[t - 2]
    g = grad(case.problem.loss)(params)
    rule, loss = case.rule, case.objective

    def f(rate: PyTree) -> torch.Tensor:
        return loss(step_with(rule, g, hdfunc.freeze_lr(state, rate), params)[0])

    rate = adapted_rate(rule, case.hist[t - 1][1], t - 1)
    analytic = node_of(case.hist[t][1], case.spec.name).hypergrad
    return f, rate, analytic


def check_one_step(case: Case, t: int, *, methods: Sequence[str] = (REVERSE, FORWARD, FINITE),
                   tangents: int = 2) -> list[Outcome]:
    """h_t == d/dα f(θ_{t-2} + u_{t-1}(α)) at α = γ_{t-1}, by reverse mode, forward mode and
    finite differences."""
    f, rate, analytic = one_step_function(case, t)
    if tree_flatten(analytic)[1] != tree_flatten(rate)[1]:
        raise TypeError(f"the rule's hypergrad has the structure {tree_flatten(analytic)[1]} "
                        f"but its rate has {tree_flatten(rate)[1]}")
    gen = torch.Generator().manual_seed(1000 * case.seed + t)
    judge = case.judge(ONE_STEP, f"seed {case.seed}, t={t}",
                       "the rule's h_t and the exact d/dalpha f(theta_{t-2}+u_{t-1}(alpha))")
    return compare_derivatives(f, rate, judge, claimed=analytic,
                               tangents=tangents_of(rate, gen, tangents), methods=methods,
                               floor=case.floor(), fd_step=one_step_fd_step(case.problem))


def check_one_step_vmapped(spec: RuleSpec, problem: Problem, states: Sequence[int],
                           seeds: int) -> list[Outcome]:
    """The one-step identity for many seeds at once: ``seeds`` perturbed starting points, each
    with its own (α_0, β) (:func:`grid_factors` of the calibrated values), run as
    one ``vmap``-ed trajectory; at each step t of ``states`` the exact d/dα f(θ_{t-2} +
    u_{t-1}(α)) is computed for every seed by one ``vmap(grad(...))`` (reverse mode) and one
    ``vmap(jvp(...))`` (forward mode, along the tangent |α| + mean|α|) and compared with the
    batched rule's h_t; the worst seed is judged. This is how the full run batches seeds on a
    GPU."""
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    if not states or min(states) < 2:
        raise ValueError(f"states must be steps t >= 2, got {tuple(states)}")
    calibration, rules = grid_rules(spec, problem, seeds)
    rule = rules[0]  # α and β live in the states: one update function serves the whole grid
    starts = [perturbed_params(problem, 0.1, 100 + seed) for seed in range(seeds)]
    loss, objective = problem.loss, spec.objective(problem.loss)
    hist = batched_trajectory(rules, loss, starts, max(states))

    def one_step(params: PyTree, state: Any) -> Callable[[PyTree], torch.Tensor]:
        g = grad(loss)(params)

        def f(rate: PyTree) -> torch.Tensor:
            return objective(step_with(rule, g, hdfunc.freeze_lr(state, rate), params)[0])
        return f

    def exact_reverse(params: PyTree, state: Any, rate: PyTree) -> PyTree:
        return grad(one_step(params, state))(rate)

    def exact_forward(params: PyTree, state: Any, rate: PyTree, analytic: PyTree
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        w = tree_map(lambda x: x.abs() + x.abs().mean(), rate)
        _, along = jvp(one_step(params, state), (rate,), (w,))
        value = sum((a * b).sum() for a, b in zip(tree_leaves(analytic), tree_leaves(w)))
        size = sum((a * b).abs().sum() for a, b in zip(tree_leaves(analytic), tree_leaves(w)))
        return along, value, size

    floor = ROUNDING_FLOOR * calibration.step_scale
    dtype = problem.dtype
    what = "the rule's h_t and the exact d/dalpha f(theta_{t-2}+u_{t-1}(alpha))"
    out = []
    for t in states:
        rate = adapted_rate(rule, hist[t - 1][1], t - 1)
        analytic = node_of(hist[t][1], spec.name).hypergrad
        params, state = hist[t - 2]
        exact = vmap(exact_reverse)(params, state, rate)
        along, value, size = vmap(exact_forward)(params, state, rate, analytic)
        worst_rev = worst_fwd = (0.0, 1.0)
        for i in range(seeds):
            e_i, a_i = tree_index(exact, i), tree_index(analytic, i)
            err, sc = tree_max_diff(a_i, e_i), max(tree_max_abs(e_i), floor)
            if err / sc >= worst_rev[0] / worst_rev[1]:
                worst_rev = (err, sc)
            w_i = tree_map(lambda x: x[i].abs() + x[i].abs().mean(), rate)
            w_scale = max(tree_max_abs(w_i), 1e-300)
            err = abs(float(value[i] - along[i]))
            sc = max(float(size[i]), abs(float(along[i])), floor * w_scale)
            if err / sc >= worst_fwd[0] / worst_fwd[1]:
                worst_fwd = (err, sc)
        judge = Judge(ONE_STEP, spec.name, problem.name, dtype,
                      f"{seeds} seeds × (alpha_0, beta) grid under vmap, t={t}", what)
        out.append(judge.outcome(REVERSE_VMAP, *worst_rev, tolerance(dtype, REVERSE)))
        out.append(judge.outcome(FORWARD_VMAP, *worst_fwd, tolerance(dtype, FORWARD),
                                 what=what + " along a tangent"))
    return out


# ----------------------------------------------------------------------------- 2. second order


def check_second_order(case: Case, t: int) -> list[Outcome]:
    """d²/ds² f(γ_{t-1} + s w) by ``torch.func.hessian`` (forward over reverse) equals
    δᵀHδ + ∇f·θ'' from Hessian-vector products, where θ(s) is the point after the step,
    δ = θ'(0) (θ'' = 0 when u is linear in α, as for every HD rule); and on a quadratic equals the
    closed form δᵀAδ + (Aθ - b)·θ''."""
    f, rate, _ = one_step_function(case, t)
    params, state = case.hist[t - 2]
    g = grad(case.problem.loss)(params)
    rule, loss = case.rule, case.objective
    gen = torch.Generator().manual_seed(2000 + 1000 * case.seed + t)
    w = tangents_of(rate, gen)[0]
    zero = torch.zeros((), dtype=torch.float64, device=case.device)
    one = torch.ones_like(zero)

    def theta(s: torch.Tensor) -> PyTree:
        return step_with(rule, g, hdfunc.freeze_lr(state, tree_axpy(rate, s, w)), params)[0]

    second = hessian(lambda s: loss(theta(s)))(zero)
    point, delta = jvp(theta, (zero,), (one,))
    _, curvature = jvp(lambda s: jvp(theta, (s,), (one,))[1], (zero,), (one,))
    gradient, h_delta = jvp(grad(loss), (point,), (delta,))
    quadratic_part = tree_dot(delta, h_delta)
    linear_part = tree_dot(gradient, curvature)
    predicted = quadratic_part + linear_part
    scale = max(abs(float(quadratic_part)) + abs(float(linear_part)), abs(float(second)))
    judge = case.judge(SECOND_ORDER, f"seed {case.seed}, t={t}")
    tol = tolerance(case.dtype, "second")
    out = [judge.outcome("hessian vs HVP", abs(float(second - predicted)), scale, tol,
                         what="d2/dalpha2 f by torch.func.hessian and d.H.d by HVPs")]
    a, b = case.problem.hessian, case.problem.linear_term
    if a is not None:
        d_flat, c_flat, p_flat = (flatten_params(delta), flatten_params(curvature),
                                  flatten_params(point))
        a = a + case.spec.l2 * torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
        closed = d_flat @ (a @ d_flat) + (a @ p_flat - b) @ c_flat
        out.append(judge.outcome("hessian vs dAd", abs(float(second - closed)), scale, tol,
                                 what="d2/dalpha2 f by torch.func.hessian and d.A.d"))
    return out


# ----------------------------------------------------------------------------- 3. K steps


def _conditioning_note(requested: int, used: int, sensitivity: float) -> str:
    if used == requested:
        return f"rounding sensitivity {sensitivity:.1e}"
    return (f"K={requested} requested, but the unroll is ill-conditioned there (rounding-sized "
            f"noise moves the derivative by {sensitivity:.1e} relative): checked at the longest "
            f"well-conditioned K")


def check_unrolled(case: Case, steps: int, start: int = 2) -> list[Outcome]:
    """dL/dα for the loss after K steps with a constant α: reverse mode through the whole
    loop, forward mode (one jvp, memory flat in K) and finite differences agree, to within what
    rounding can explain. The rounding sensitivity of the derivative is measured first
    (:func:`rounding_sensitivity`); where the unroll is too ill-conditioned for any comparison
    to mean something (a chaotic trajectory), K is halved down to K/8 to the longest
    well-conditioned unroll, and the check is INCONCLUSIVE if there is none."""
    params, state = case.hist[start]
    rate = hdfunc.find_lr_state(state).lr
    gen = torch.Generator().manual_seed(3000 + case.seed)
    w = tangents_of(rate, gen)[0]
    dtype, objective = case.dtype, case.objective
    shortest = max(1, min(steps, max(steps // 8, 5)))

    def forward_at(k: int, noise: Optional[Noise] = None) -> torch.Tensor:
        L = unrolled_loss(case.rule, case.problem.loss, params, state, k, objective, noise)
        return jvp(L, (rate,), (w,))[1]

    k, first_sensitivity = steps, None
    while True:
        forward = forward_at(k)
        if not torch.isfinite(forward) and case.problem.exact_zeros:
            return [inconclusive(case, UNROLLED, "reverse vs forward", f"seed {case.seed}, K={k}",
                                 NOT_DIFFERENTIABLE_AT_ZERO)]
        scale = max(abs(float(forward)), case.floor(w))
        sensitivity = rounding_sensitivity(lambda noise: forward_at(k, noise), float(forward),
                                           scale, dtype)
        if first_sensitivity is None:
            first_sensitivity = sensitivity
        if sensitivity <= ILL_CONDITIONED[dtype] or k <= shortest:
            break
        k = max(k // 2, shortest)
    if sensitivity > ILL_CONDITIONED[dtype]:
        halved = f", halved from K={steps}" if k != steps else ""
        return [inconclusive(case, UNROLLED, "reverse vs forward",
                             f"seed {case.seed}, K={k}{halved}",
                             f"the unroll is ill-conditioned down to K={k}: rounding-sized noise "
                             f"moves dL_K/dalpha by {sensitivity:.1e} relative, so no comparison "
                             "can tell a wrong derivative from rounding")]
    note = _conditioning_note(steps, k, first_sensitivity)
    judge = case.judge(UNROLLED, f"seed {case.seed}, K={k}, {note}", "dL_K/dalpha")
    L = unrolled_loss(case.rule, case.problem.loss, params, state, k, objective)
    return compare_derivatives(L, rate, judge, tangents=[w], methods=_multi_step_methods(case),
                               floor=case.floor(), fd_step=fd_step(k), forward=forward,
                               conditioned=CONDITIONING_SAFETY * sensitivity)


# ----------------------------------------------------------------------------- 4. hyper-hypergradients


def _scalar_derivatives(case: Case, check: str,
                        make_L: Callable[[Optional[Noise]], Callable[[torch.Tensor], torch.Tensor]],
                        x0: torch.Tensor, where: str, steps: int) -> list[Outcome]:
    """dL/dx at x0 for a scalar x by reverse, forward and finite differences (in the relative
    variable s, x = x0 (1 + s), so the step is scale-free), with the tolerance raised to what
    the measured rounding sensitivity explains (INCONCLUSIVE past ``ILL_CONDITIONED``).
    ``make_L(noise)`` builds L, with rounding-sized noise in its loop when asked."""
    L = make_L(None)
    one = torch.ones_like(x0)
    reverse = grad(L)(x0)
    _, forward = jvp(L, (x0,), (one,))
    dtype = case.dtype
    if not torch.isfinite(forward) and case.problem.exact_zeros:
        return [inconclusive(case, check, "reverse vs forward", where, NOT_DIFFERENTIABLE_AT_ZERO)]
    scale = max(abs(float(reverse)), abs(float(forward)))
    sensitivity = rounding_sensitivity(
        lambda noise: jvp(make_L(noise), (x0,), (one,))[1], float(forward), scale, dtype)
    where = f"{where}, rounding sensitivity {sensitivity:.1e}"
    if sensitivity > ILL_CONDITIONED[dtype]:
        return [inconclusive(case, check, "reverse vs forward", where,
                             f"rounding-sized noise moves the derivative by {sensitivity:.1e} "
                             "relative: the unroll is too ill-conditioned to check")]
    return compare_derivatives(L, x0, case.judge(check, where, "the derivative"),
                               methods=_multi_step_methods(case), fd_step=fd_step(steps),
                               reverse=reverse, forward=forward,
                               conditioned=CONDITIONING_SAFETY * sensitivity)


def check_hyper(case: Case, steps: int, start: int = 2) -> list[Outcome]:
    """d f(θ_K)/dβ and d f(θ_K)/dα_0 through K steps of the HD updates themselves."""
    params, state = case.hist[start]
    node = hdfunc.find_lr_state(state)
    beta = node.hypergrad_lr
    rule, loss = case.rule, case.problem.loss
    out = _scalar_derivatives(
        case, HYPER_BETA, lambda noise: hd_loss_of_beta(rule, loss, params, state, steps, noise),
        beta, f"seed {case.seed}, from t={start}, K={steps}", steps)
    params0, state0 = case.hist[0]
    lr0 = torch.as_tensor(case.calibration.lr, dtype=torch.float64, device=case.device)
    out += _scalar_derivatives(
        case, HYPER_ALPHA0, lambda noise: hd_loss_of_initial_lr(rule, loss, params0, steps, noise),
        lr0, f"seed {case.seed}, K={steps}", steps)
    return out


def check_hyper_analytic(case: Case, t: int) -> list[Outcome]:
    """The higher-order variant's ∂f(θ_{t-1})/∂β (state_t.hyper_hypergrad) equals the exact
    d/dβ f(θ_{t-2} + u_{t-1}(β)) with the past frozen, at β = β_{t-1}."""
    if not 3 <= t < len(case.hist):
        raise ValueError(f"step t={t} is outside 3..{len(case.hist) - 1}")
    node = node_of(case.hist[t][1], case.spec.name)
    analytic = getattr(node, "hyper_hypergrad", ())
    if not tree_leaves(analytic):
        raise TypeError(f"{case.spec.name} is not a higher-order rule (no hyper_hypergrad)")
    params, state = case.hist[t - 2]
    g = grad(case.problem.loss)(params)
    rule, loss = case.rule, case.objective

    def F(beta: torch.Tensor) -> torch.Tensor:
        return loss(step_with(rule, g, hdfunc.freeze_hypergrad_lr(state, beta), params)[0])

    beta = hdfunc.find_lr_state(case.hist[t - 1][1]).hypergrad_lr
    judge = case.judge(HYPER_ANALYTIC, f"seed {case.seed}, t={t}",
                       "the rule's hyper_hypergrad and the exact d/dbeta f(theta_{t-1})")
    return compare_derivatives(F, beta, judge, claimed=analytic, floor=case.floor(hyper=True),
                               fd_step=one_step_fd_step(case.problem))


# ----------------------------------------------------------------------------- 5. the whole rule


def check_oracle(case: Case) -> list[Outcome]:
    """The rule's whole trajectory against the autodiff-HD oracle (:mod:`verification.oracle`):
    step by step, each part of every step (h_t, the higher-order β_t, the rate law α_t, the
    applied rate γ_t, the step θ_t) against the definition computed from the rule's own
    state, and the trajectory from θ_0 against the oracle's own. One outcome per part: the
    worst step, and the first step at which it failed."""
    result = run_oracle(case.rule, case.problem.loss, case.objective, case.hist, case.floor())
    rule, problem, dtype = case.label()
    out = []
    step_failed = any(r.first_failure is not None for p, r in result.parts.items()
                      if p != TRAJECTORY)
    for part, record in result.parts.items():
        hint = HINT[part]
        if part == TRAJECTORY and step_failed:
            hint = ("the trajectories part because a step-by-step part above differs from the "
                    "definition: mend that first")
        where = (f"seed {case.seed}, {record.compared} comparisons over t=1..{result.steps}, "
                 f"worst at t={record.worst_step}")
        if record.first_failure is not None:
            where += f", first failure at t={record.first_failure}"
        reason = ""
        if part == TRAJECTORY:
            where += f", rounding sensitivity {result.trajectory_sensitivity:.1e}"
            if result.ill_conditioned:
                reason = ("the trajectory is ill-conditioned: rounding-sized noise moves it by "
                          f"{result.trajectory_sensitivity:.1e} relative, so two runs that are "
                          "each right up to rounding may part by as much")
        out.append(judged(ORACLE, part, rule, problem, dtype, record.worst_abs,
                          record.worst_scale, record.tolerance, where, WHAT[part],
                          first_step=record.first_failure, hint=hint,
                          inconclusive_reason=reason))
    return out
