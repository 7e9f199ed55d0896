"""The checks: analytic quantities of a rule against exact ones computed by ``torch.func``.

Notation (ALGORITHMS.md): ``hist[k] = (θ_k, state_k)`` after k steps; step t reads
g_t = ∇f(θ_{t-1}) and state_{t-1}, and its HD node stores h_t (``hypergrad``), α_t (``lr``), the
applied rate γ_t (``applied_lr``) and, for the higher-order variant, ∂f(θ_{t-1})/∂β
(``hyper_hypergrad``).

Every check returns a list of :class:`~verification.report.Outcome`. Rates may be one 0-d
tensor (global) or a pytree like the params (per tensor / per element); derivatives with
respect to a pytree rate are compared leaf-wise (reverse mode) or along random tangents
(forward mode and finite differences).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from scipy.differentiate import derivative
from torch.func import grad, hessian, jvp, vmap

import hdfunc
from hdfunc.tree import (PyTree, tree_flatten, tree_leaves, tree_map, tree_stack, tree_unflatten,
                         tree_vdot)

from verification.catalog import Calibration, RuleSpec, calibrate
from verification.conditioning import (CONDITIONING_SAFETY, ILL_CONDITIONED, Noise, perturb,
                                       rounding_sensitivity)
from verification.oracle import HINT, ORACLE, TRAJECTORY, WHAT, run_oracle
from verification.problems import Problem, flatten_params, perturbed_params
from verification.report import INCONCLUSIVE, Finding, Outcome, judged

ONE_STEP = "one-step identity"
SECOND_ORDER = "second order"
UNROLLED = "K-step unrolled"
HYPER_BETA = "d loss_K / d beta"
HYPER_ALPHA0 = "d loss_K / d alpha_0"
HYPER_ANALYTIC = "hyper-hypergradient"
BETA_ZERO = "beta=0 == base rule"
TORCH_OPTIM = "base rule == torch.optim"
VMAP = "vmap over seeds == loop"
FRONT_END = "functional == hdfunc.optim"

REVERSE, FORWARD, FINITE = "reverse", "forward", "finite differences"
REVERSE_VMAP, FORWARD_VMAP = "reverse, vmapped seeds", "forward, vmapped seeds"

# Relative tolerances (max abs error / scale of the quantity). Reverse and forward mode are
# exact up to rounding; the finite differences (scipy.differentiate, order 8 with Richardson
# steps) are limited by rounding of the loss, amplified ~1/step.
TOLERANCES: dict[torch.dtype, dict[str, float]] = {
    torch.float64: {REVERSE: 1e-10, FORWARD: 1e-10, FINITE: 1e-10, "second": 1e-10,
                    "unrolled": 1e-9, "unrolled_fd": 1e-6, "equal": 1e-12, "torch": 1e-10,
                    "front_end": 1e-10},
    torch.float32: {REVERSE: 1e-4, FORWARD: 1e-4, FINITE: math.inf, "second": 1e-3,
                    "unrolled": 1e-3, "unrolled_fd": math.inf, "equal": 1e-5, "torch": 1e-4,
                    "front_end": 1e-3},
}


def tolerance(dtype: torch.dtype, key: str) -> float:
    if dtype not in TOLERANCES:
        raise ValueError(f"the suite checks float64 or float32 problems, not {dtype}")
    return TOLERANCES[dtype][key]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# ----------------------------------------------------------------------------- tree helpers


def node_of(state: Any, rule_name: str = "rule") -> Any:
    node = hdfunc.find_lr_state(state)
    if node is None or "hypergrad" not in getattr(node, "_fields", ()):
        raise TypeError(f"the state of {rule_name} holds no HD node (a NamedTuple with fields lr, "
                        "hypergrad_lr and hypergrad, such as hdfunc.HDState); see "
                        "docs/writing-a-rule.md")
    return node


def tree_dot(a: PyTree, b: PyTree) -> torch.Tensor:
    return tree_vdot(a, b, torch.float64)


def tree_abs_dot(a: PyTree, b: PyTree) -> float:
    return float(sum((x.double() * y.double()).abs().sum() for x, y in zip(tree_leaves(a),
                                                                          tree_leaves(b))))


def tree_max_abs(a: PyTree) -> float:
    leaves = tree_leaves(a)
    return max(float(x.double().abs().max()) for x in leaves) if leaves else 0.0


def tree_max_diff(a: PyTree, b: PyTree) -> float:
    la, lb = tree_leaves(a), tree_leaves(b)
    if len(la) != len(lb):
        raise ValueError(f"cannot compare trees with {len(la)} and {len(lb)} leaves")
    diffs = [float((x.double() - y.double()).abs().max()) for x, y in zip(la, lb)]
    return max(diffs) if diffs else 0.0


def tree_axpy(a: PyTree, s: torch.Tensor, w: PyTree) -> PyTree:
    """a + s·w for rates (s a 0-d tensor, possibly batched or traced)."""
    return tree_map(lambda x, y: x + s.to(x.dtype) * y, a, w)


def tangent_like(rate: PyTree, gen: torch.Generator, *, random: bool) -> PyTree:
    """A tangent for a rate: its own magnitude (plus the mean, so zeros move too) times a
    random normal (``random``) or times one."""
    def one(x: torch.Tensor) -> torch.Tensor:
        size = x.abs() + x.abs().mean() + 1e-300
        if not random:
            return size
        noise = torch.randn(x.shape, generator=gen, dtype=torch.float64).to(x)
        return size * noise
    return tree_map(one, rate)


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


NOT_DIFFERENTIABLE_AT_ZERO = (
    "the derivative through training is not finite on a problem with exactly-zero gradient "
    "entries (dead units): a second moment v = 0 there, and autodiff meets sqrt'(0) = inf; "
    "build the rule with eps_root > 0 (hdfunc.DIFFERENTIABLE_EPS_ROOT) to differentiate "
    "through it")

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


# ----------------------------------------------------------------------------- finite differences

@dataclass
class FiniteDifference:
    """scipy's estimate ``value``, its ``error`` estimate, and ``rounding``: the error that
    rounding the function values alone may cause, ~10 ε max|φ| / (final step)."""

    value: float
    error: float
    status: int
    evaluations: int
    rounding: float = 0.0

    @property
    def uncertainty(self) -> float:
        return max(10 * self.error, self.rounding) if math.isfinite(self.error) else math.inf


def finite_difference(phi: Callable[[torch.Tensor], torch.Tensor], *, device: Any,
                      initial_step: float = 0.5, batched: list | None = None) -> FiniteDifference:
    """dφ/ds at s = 0 by ``scipy.differentiate.derivative`` (central differences of order 8,
    step halved until the error estimate stops improving), evaluated in float64. Points are
    evaluated together under ``vmap`` when φ allows it (``batched`` remembers whether it does)."""
    batched = batched if batched is not None else [True]
    largest = [0.0]

    def f(x: np.ndarray) -> np.ndarray:
        flat = torch.as_tensor(np.asarray(x, dtype=np.float64).ravel(), device=device)
        ys = None
        if batched[0]:
            try:
                ys = vmap(phi)(flat)
            except Exception:  # noqa: BLE001 - a rule that does not vmap: evaluate point by point
                batched[0] = False
        if ys is None:
            ys = torch.stack([phi(s) for s in flat])
        values = ys.detach().double().cpu().numpy().reshape(np.shape(x))
        largest[0] = max(largest[0], float(np.max(np.abs(values), initial=0.0)))
        return values

    step_factor = 2.0
    res = derivative(f, np.float64(0.0), initial_step=initial_step, step_factor=step_factor,
                     maxiter=12, tolerances={"atol": 0.0, "rtol": 1e-15})
    final_step = initial_step / step_factor ** max(int(res.nit) - 1, 0)
    rounding = 10 * np.finfo(np.float64).eps * largest[0] / final_step
    return FiniteDifference(float(res.df), float(res.error), int(res.status), int(res.nfev),
                            float(rounding))


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
        return self.problem.dtype

    @property
    def device(self) -> torch.device:
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
        return self.spec.name, self.problem.name, dtype_name(self.dtype)


def make_case(spec: RuleSpec, problem: Problem, steps: int, seed: int = 0,
              params: PyTree = None) -> Case:
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


# The finite differences' error estimate excuses at most this much relative error.
FD_ALLOWANCE_CAP = 1e-4
# Errors are relative to at least this fraction of the problem's first hypergradient.
ROUNDING_FLOOR = 1e-6


def _outcome(case: Case, check: str, method: str, abs_err: float, scale: float, tol: float,
             where: str, what: str, fd: Optional["FiniteDifference"] = None) -> Outcome:
    """``fd``: the finite difference compared. Its rounding floor (10 ε max|f| / step: below
    it no finite difference resolves a derivative) and its error estimate (×10, at most
    ``FD_ALLOWANCE_CAP`` × scale) are forgiven."""
    rule, problem, dtype = case.label()
    allowance, reason = 0.0, ""
    if fd is not None:
        estimate = 10 * fd.error if math.isfinite(fd.error) else 0.0
        allowance = max(min(estimate, FD_ALLOWANCE_CAP * scale), fd.rounding)
        where = where + f", fd uncertainty {fd.uncertainty:.1e}"
        if not fd.uncertainty <= FD_ALLOWANCE_CAP * scale:
            reason = (f"the finite difference cannot resolve this derivative: its own "
                      f"uncertainty is {fd.uncertainty / scale if scale > 0 else math.inf:.2g} "
                      "relative (the function is rugged at every step size tried)")
    return judged(check, method, rule, problem, dtype, abs_err, scale, tol, where, what,
                  allowance, inconclusive_reason=reason)


# ----------------------------------------------------------------------------- 1. one step


def one_step_function(case: Case, t: int) -> tuple[Callable[[PyTree], torch.Tensor], PyTree,
                                                      PyTree]:
    """f(α) = loss(θ_{t-2} + u_{t-1}(α)) with the past frozen, α_{t-1}'s applied value γ_{t-1},
    and the analytic h_t the rule used at step t."""
    if not 2 <= t < len(case.hist):
        raise ValueError(f"step t={t} is outside 2..{len(case.hist) - 1}")
    params, state = case.hist[t - 2]
    g = grad(case.problem.loss)(params)
    rule, loss = case.rule, case.objective

    def f(rate: PyTree) -> torch.Tensor:
        return loss(step_with(rule, g, hdfunc.freeze_lr(state, rate), params)[0])

    rate = hdfunc.get_applied_lr(case.hist[t - 1][1])
    analytic = node_of(case.hist[t][1], case.spec.name).hypergrad
    return f, rate, analytic


def check_one_step(case: Case, t: int, *, methods: Sequence[str] = (REVERSE, FORWARD, FINITE),
                   tangents: int = 2) -> list[Outcome]:
    """h_t == d/dα f(θ_{t-2} + u_{t-1}(α)) at α = γ_{t-1}, by reverse mode, forward mode and
    finite differences."""
    f, rate, analytic = one_step_function(case, t)
    where = f"seed {case.seed}, t={t}"
    what = "the rule's h_t and the exact d/dalpha f(theta_{t-2}+u_{t-1}(alpha))"
    dtype = case.dtype
    gen = torch.Generator().manual_seed(1000 * case.seed + t)
    scalar = isinstance(rate, torch.Tensor) and rate.dim() == 0
    out = []
    if tree_flatten(analytic)[1] != tree_flatten(rate)[1]:
        raise TypeError(f"the rule's hypergrad has the structure {tree_flatten(analytic)[1]} "
                        f"but its rate has {tree_flatten(rate)[1]}")
    if REVERSE in methods:
        exact = grad(f)(rate)
        out.append(_outcome(case, ONE_STEP, REVERSE, tree_max_diff(analytic, exact),
                            max(tree_max_abs(exact), case.floor()), tolerance(dtype, REVERSE),
                            where, what))
    directions = [tangent_like(rate, gen, random=not scalar) for _ in range(1 if scalar else tangents)]
    if FORWARD in methods:
        for w in directions:
            _, exact_dir = jvp(f, (rate,), (w,))
            value = tree_dot(analytic, w)
            scale = max(tree_abs_dot(analytic, w), abs(float(exact_dir)), case.floor(w))
            out.append(_outcome(case, ONE_STEP, FORWARD, abs(float(value - exact_dir)), scale,
                                tolerance(dtype, FORWARD), where, what + " along a tangent"))
    if FINITE in methods and dtype == torch.float64:
        w = directions[0]
        fd = finite_difference(lambda s: f(tree_axpy(rate, s, w)), device=case.device,
                               initial_step=one_step_fd_step(case.problem))
        value = float(tree_dot(analytic, w))
        scale = max(tree_abs_dot(analytic, w), abs(fd.value), case.floor(w))
        out.append(_outcome(case, ONE_STEP, FINITE, abs(value - fd.value), scale,
                            tolerance(dtype, FINITE), where, what + " along a tangent", fd))
    return out


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


def check_one_step_vmapped(spec: RuleSpec, problem: Problem, states: Sequence[int],
                           seeds: int) -> list[Outcome]:
    """The one-step identity for many seeds at once: ``seeds`` perturbed starting points, each
    with its own (α_0, β) (:func:`grid_factors` of the calibrated values), run as
    one ``vmap``-ed trajectory; at each step t of ``states`` the exact d/dα f(θ_{t-2} +
    u_{t-1}(α)) is computed for every seed by one ``vmap(grad(...))`` (reverse mode) and one
    ``vmap(jvp(...))`` (forward mode, along the tangent |α| + mean|α|) and compared with the
    batched rule's h_t. This is how the full run batches seeds on a GPU."""
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
    name, dtype = dtype_name(problem.dtype), problem.dtype
    what = "the rule's h_t and the exact d/dalpha f(theta_{t-2}+u_{t-1}(alpha))"
    out = []
    for t in states:
        rate = hdfunc.get_applied_lr(hist[t - 1][1])
        analytic = node_of(hist[t][1], spec.name).hypergrad
        params, state = hist[t - 2]
        exact = vmap(exact_reverse)(params, state, rate)
        along, value, size = vmap(exact_forward)(params, state, rate, analytic)
        worst_rev = worst_fwd = (0.0, 1.0)
        for i in range(seeds):
            e_i = tree_map(lambda x: x[i], exact)
            a_i = tree_map(lambda x: x[i], analytic)
            err, sc = tree_max_diff(a_i, e_i), max(tree_max_abs(e_i), floor)
            if err / sc >= worst_rev[0] / worst_rev[1]:
                worst_rev = (err, sc)
            w_scale = max(tree_max_abs(tree_map(lambda x: x[i].abs() + x[i].abs().mean(), rate)), 1e-300)
            err = abs(float(value[i] - along[i]))
            sc = max(float(size[i]), abs(float(along[i])), floor * w_scale)
            if err / sc >= worst_fwd[0] / worst_fwd[1]:
                worst_fwd = (err, sc)
        where = f"{seeds} seeds × (alpha_0, beta) grid under vmap, t={t}"
        out.append(judged(ONE_STEP, REVERSE_VMAP, spec.name, problem.name, name, worst_rev[0],
                          worst_rev[1], tolerance(dtype, REVERSE), where, what))
        out.append(judged(ONE_STEP, FORWARD_VMAP, spec.name, problem.name, name, worst_fwd[0],
                          worst_fwd[1], tolerance(dtype, FORWARD), where, what + " along a tangent"))
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
    scalar = isinstance(rate, torch.Tensor) and rate.dim() == 0
    w = tangent_like(rate, gen, random=not scalar)
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
    where = f"seed {case.seed}, t={t}"
    tol = tolerance(case.dtype, "second")
    out = [_outcome(case, SECOND_ORDER, "hessian vs HVP", abs(float(second - predicted)), scale,
                    tol, where, "d2/dalpha2 f by torch.func.hessian and d.H.d by HVPs")]
    a, b = case.problem.hessian, case.problem.linear_term
    if a is not None:
        d_flat, c_flat, p_flat = (flatten_params(delta), flatten_params(curvature),
                                  flatten_params(point))
        a = a + case.spec.l2 * torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
        closed = d_flat @ (a @ d_flat) + (a @ p_flat - b) @ c_flat
        out.append(_outcome(case, SECOND_ORDER, "hessian vs dAd", abs(float(second - closed)),
                            scale, tol, where, "d2/dalpha2 f by torch.func.hessian and d.A.d"))
    return out


# ----------------------------------------------------------------------------- 3. K steps


def unrolled_loss(rule: Any, loss: Callable, params: PyTree, state: Any, steps: int,
                  objective: Optional[Callable] = None, noise: Optional[Noise] = None
                  ) -> Callable[[PyTree], torch.Tensor]:
    """L(α) = f(θ_K) after ``steps`` steps that all apply the constant rate α (no adaptation);
    the steps are fed ∇``loss``, f is ``objective`` (default: ``loss``)."""
    objective = objective or loss

    def run(rate: PyTree) -> torch.Tensor:
        return objective(roll(rule, loss, params, state, steps, rate, noise)[0])
    return run


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
    scalar = isinstance(rate, torch.Tensor) and rate.dim() == 0
    w = tangent_like(rate, gen, random=not scalar)
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
    where = f"seed {case.seed}, K={k}, {note}"
    L = unrolled_loss(case.rule, case.problem.loss, params, state, k, objective)
    reverse = grad(L)(rate)
    along = tree_dot(reverse, w)
    scale = max(tree_abs_dot(reverse, w), abs(float(forward)), case.floor(w))
    conditioned = CONDITIONING_SAFETY * sensitivity
    out = [_outcome(case, UNROLLED, "reverse vs forward", abs(float(along - forward)), scale,
                    max(tolerance(dtype, "unrolled"), conditioned), where,
                    "dL_K/dalpha by reverse mode and by forward mode")]
    if dtype == torch.float64 and case.spec.smooth and case.problem.smooth:
        fd = finite_difference(lambda s: L(tree_axpy(rate, s, w)), device=case.device,
                               initial_step=fd_step(k))
        out.append(_outcome(case, UNROLLED, "fd vs forward", abs(fd.value - float(forward)),
                            scale, max(tolerance(dtype, "unrolled_fd"), conditioned),
                            where, "dL_K/dalpha by finite differences and by forward mode", fd))
    return out


def inconclusive(case: Case, check: str, method: str, where: str, reason: str) -> Outcome:
    """An INCONCLUSIVE outcome: the comparison cannot decide here, for ``reason``."""
    rule, problem, dtype = case.label()
    return Outcome(check, method, rule, problem, dtype, math.nan, math.nan, 0.0, INCONCLUSIVE,
                   where, f"{check} ({method}) INCONCLUSIVE for rule {rule} on problem {problem} "
                          f"({dtype}, {where}): {reason}")


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


# ----------------------------------------------------------------------------- 4. hyper-hypergradients


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


def one_step_fd_step(problem: Problem) -> float:
    """The first relative step of a one-step finite difference: 0.5, or 1e-3 on a piecewise
    smooth problem (ReLU), where a larger change of the rate moves some pre-activation across
    its kink and no step size then resolves the derivative of the piece the point is on."""
    return 0.5 if problem.smooth else 1e-3


def fd_step(steps: int) -> float:
    """The first (largest) relative step of a finite difference through ``steps`` steps: the
    loss after K steps varies on a scale of α that shrinks like 1/K (a rate change of x moves
    θ_K by ~K x), and over a rugged stretch scipy's step halving stops early, so start at
    0.25 for up to 20 steps and at 5/K beyond."""
    return min(0.25, 5.0 / max(steps, 1))


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
    conditioned = CONDITIONING_SAFETY * sensitivity
    out = [_outcome(case, check, "reverse vs forward", abs(float(reverse - forward)), scale,
                    max(tolerance(dtype, "unrolled"), conditioned), where,
                    "the derivative by reverse mode and by forward mode")]
    if dtype == torch.float64 and case.spec.smooth and case.problem.smooth:
        size = abs(float(x0)) or 1.0
        fd = finite_difference(lambda s: L(x0 + s.to(x0.dtype) * size), device=case.device,
                               initial_step=fd_step(steps))
        out.append(_outcome(case, check, "fd vs forward", abs(fd.value - size * float(forward)),
                            size * max(abs(float(forward)), abs(fd.value) / size),
                            max(tolerance(dtype, "unrolled_fd"), conditioned),
                            where, "the derivative by finite differences and by forward mode", fd))
    return out


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
    where = f"seed {case.seed}, t={t}"
    what = "the rule's hyper_hypergrad and the exact d/dbeta f(theta_{t-1})"
    exact = grad(F)(beta)
    _, forward = jvp(F, (beta,), (torch.ones_like(beta),))
    floor = case.floor(hyper=True)
    out = [_outcome(case, HYPER_ANALYTIC, REVERSE, abs(float(analytic - exact)),
                    max(abs(float(exact)), floor), tolerance(case.dtype, REVERSE), where, what),
           _outcome(case, HYPER_ANALYTIC, FORWARD, abs(float(analytic - forward)),
                    max(abs(float(forward)), floor), tolerance(case.dtype, FORWARD), where, what)]
    if case.dtype == torch.float64:
        size = abs(float(beta)) or 1.0
        fd = finite_difference(lambda s: F(beta + s.to(beta.dtype) * size), device=case.device,
                               initial_step=one_step_fd_step(case.problem))
        out.append(_outcome(case, HYPER_ANALYTIC, FINITE, abs(size * float(analytic) - fd.value),
                            max(abs(fd.value), size * abs(float(analytic)), size * floor),
                            tolerance(case.dtype, FINITE),
                            where, what, fd))
    return out


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
        where = f"seed {case.seed}, {record.compared} comparisons over t=1..{result.steps}, worst at t={record.worst_step}"
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


# ----------------------------------------------------------------------------- 6. equivalences


def _trajectory_error(a: list, b: list) -> tuple[float, float]:
    abs_err = max(tree_max_diff(pa, pb) for (pa, _), (pb, _) in zip(a, b))
    scale = max(tree_max_abs(pb) for pb, _ in b)
    return abs_err, scale


def check_beta_zero(spec: RuleSpec, problem: Problem, steps: int) -> list[Outcome]:
    """An HD rule with β = 0 takes exactly its base rule's steps."""
    calibration = calibrate(spec, problem)
    hd = run_trajectory(spec.make(calibration.lr, 0.0, calibration), problem.loss,
                        problem.params, steps)
    base = run_trajectory(spec.base(calibration.lr, calibration.eps_root), problem.loss,
                          problem.params, steps)
    abs_err, scale = _trajectory_error(hd, base)
    return [judged(BETA_ZERO, "params", spec.name, problem.name, dtype_name(problem.dtype),
                   abs_err, scale, tolerance(problem.dtype, "equal"), f"{steps} steps",
                   "the parameters of the HD rule with beta=0 and of its base rule")]


def check_torch_optim(spec: RuleSpec, problem: Problem, steps: int) -> list[Outcome]:
    """The base rule takes the steps of the matching ``torch.optim`` optimizer."""
    calibration = calibrate(spec, problem)
    ours = run_trajectory(spec.base(calibration.lr, 0.0), problem.loss, problem.params, steps)
    theirs, optimizer = optimizer_trajectory(
        problem, lambda tensors: spec.torch_optimizer(tensors, calibration.lr), steps)
    abs_err, scale = _trajectory_error(ours, theirs)
    name = type(optimizer).__name__
    return [judged(TORCH_OPTIM, name, spec.name.split("[")[0].replace("_hd", ""), problem.name,
                   dtype_name(problem.dtype), abs_err, scale, tolerance(problem.dtype, "torch"),
                   f"{steps} steps", f"the parameters of the functional base rule and torch.optim.{name}")]


def check_vmap(spec: RuleSpec, problem: Problem, steps: int, seeds: int = 3) -> list[Outcome]:
    """One vmapped run over seeds (perturbed starting points) and a grid of (α_0, β) stacked
    from states of differently built rules equals a loop over the same seeds and rules
    (:func:`grid_factors`)."""
    _, rules = grid_rules(spec, problem, seeds)
    starts = [perturbed_params(problem, 0.1, seed) for seed in range(seeds)]
    looped = [run_trajectory(r, problem.loss, p, steps)[-1] for r, p in zip(rules, starts)]
    params, state = batched_trajectory(rules, problem.loss, starts, steps)[-1]
    abs_err = scale = 0.0
    for i, (p_loop, s_loop) in enumerate(looped):
        p_i = tree_map(lambda x: x[i], params)
        lr_i = tree_map(lambda x: x[i], hdfunc.get_lr(state))
        abs_err = max(abs_err, tree_max_diff(p_i, p_loop), tree_max_diff(lr_i, hdfunc.get_lr(s_loop)))
        scale = max(scale, tree_max_abs(p_loop), tree_max_abs(hdfunc.get_lr(s_loop)))
    return [judged(VMAP, "params and rates", spec.name, problem.name, dtype_name(problem.dtype),
                   abs_err, scale, tolerance(problem.dtype, "equal"),
                   f"{seeds} seeds × (alpha_0, beta) grid, {steps} steps",
                   "the vmapped and the looped runs")]
