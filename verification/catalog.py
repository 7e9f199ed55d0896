"""The rules the suite verifies: every built-in HD rule and variant, a composed base, and user
rules loaded from ``package.module:factory``.

A :class:`RuleSpec` builds a rule from a calibration (α_0, β and the size of the first step),
so that every rule starts on every problem with a sensible step: its first step is as long as a
gradient-descent step of 0.5/L (see :func:`calibrate`).
"""

from __future__ import annotations

import importlib
import inspect
import math
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch.func import grad

import hdfunc
from hdfunc.options import GRANULARITIES, MODES
from hdfunc.tree import tree_leaves, tree_sq_norm

from verification.problems import Problem


@dataclass(frozen=True)
class Calibration:
    """Per (rule, problem): α_0, β, and ``step_scale`` = ‖g_1‖·‖d_1‖ at the start (the size of
    the first nonzero hypergradient), from which κ is set for the higher-order variants.
    ``eps_root``: what the built-in rules with a square root of a second moment (Adam, AdamW,
    RMSprop, Adagrad) are built with: 0 (their default, bit for bit torch.optim) but on a
    problem with exactly-zero gradient entries, where differentiating through training needs
    ``hdfunc.DIFFERENTIABLE_EPS_ROOT``."""

    lr: float
    hypergrad_lr: float
    step_scale: float
    eps_root: float = 0.0


@dataclass(frozen=True, eq=False)
class RuleSpec:
    """A rule to verify. ``make(lr, hypergrad_lr, calibration)`` returns an object with
    ``init``/``update`` whose state holds an HD node (:func:`hdfunc.find_lr_state`).

    ``base`` (fixed-rate twin (lr, eps_root), for β = 0 equivalence) and ``torch_optimizer`` (for the
    torch.optim equivalence) are given for the built-in rules only.

    Attributes:
        name: the rule's name in the report.
        make: ``make(lr, hypergrad_lr, calibration) -> rule``.
        family: the built-in base (``"adam"``, ...), or ``"user"``.
        mode: "additive" or "multiplicative".
        granularity: "global", "tensor" or "element".
        higher_order: whether the rule adapts β too.
        transition: whether the rule transitions to α_∞.
        base: ``base(lr, eps_root) -> rule``, the fixed-rate twin, or None.
        torch_optimizer: ``torch_optimizer(params, lr) -> optimizer``, the torch.optim twin, or
            None.
        notes: remarks shown in the report.
        l2: the coupled weight decay λ the rule adds to g (it minimises f + ½λ‖θ‖²).
        smooth: False for a rule that is only piecewise smooth over several steps.
        adapts: for a hyperdescent rule, the hyperparameters it adapts.
        unsupported: why the suite cannot verify this rule yet (its checks are then
            INCONCLUSIVE), or empty.
        scheduled: whether the rule has an ``lr_schedule`` (a factor s(t-1) on its adapted
            rate; then it is not its base rule at β = 0).
    """

    name: str
    make: Callable[[float, float, Optional[Calibration]], Any]
    family: str = "user"
    mode: str = "additive"
    granularity: str = "global"
    higher_order: bool = False
    transition: bool = False
    base: Optional[Callable[[float, float], Any]] = None  # (lr, eps_root) -> fixed-rate twin
    torch_optimizer: Optional[Callable[[list, float], torch.optim.Optimizer]] = None
    notes: str = ""
    l2: float = 0.0  # coupled weight decay the rule adds to g: it minimises f + ½λ‖θ‖²
    smooth: bool = True  # False: piecewise smooth over several steps (see NONSMOOTH)
    adapts: tuple[str, ...] = ()  # a hyperdescent rule: the hyperparameters it adapts
    unsupported: str = ""  # why the suite cannot verify this rule yet (then INCONCLUSIVE)
    scheduled: bool = False  # with lr_schedule: u_t = -s(t-1) γ_t d_t

    def objective(self, loss: Callable[[Any], torch.Tensor]) -> Callable[[Any], torch.Tensor]:
        """The function the rule's hypergradient differentiates: the loss plus the rule's
        coupled L2 penalty (docs/algorithms.md: g_t includes the L2 term).

        Args:
            loss: the problem's loss, a function of the params.

        Returns:
            The loss plus ½λ‖θ‖² (the loss itself when the rule has no coupled L2 term).
        """
        if self.l2 == 0:
            return loss
        l2 = self.l2
        return lambda params: loss(params) + 0.5 * l2 * sum((p * p).sum() for p in tree_leaves(params))

    def build(self, calibration: Calibration) -> Any:
        """The rule made with the calibration's α_0 and β (``make`` also gets the calibration).

        Args:
            calibration: the calibration of this rule on a problem (:func:`calibrate`).

        Returns:
            The rule, an object with ``init``/``update``.
        """
        return self.make(calibration.lr, calibration.hypergrad_lr, calibration)


def _norm(tree: Any) -> float:
    return math.sqrt(float(tree_sq_norm(tree, torch.float64)))


def calibrate(spec: RuleSpec, problem: Problem, params: Any = None) -> Calibration:
    """α_0 so that the rule's first step has the length of a gradient-descent step 0.5/L on
    its objective (the loss plus its coupled L2 term); β so that α moves by ~10 % per step at
    the start (additive: β = 0.1 α_0/(‖g‖‖d‖); the
    multiplicative rule's β is dimensionless: 0.05)."""
    params = problem.params if params is None else params
    g = grad(problem.loss)(params)
    eps_root = hdfunc.DIFFERENTIABLE_EPS_ROOT if problem.exact_zeros else 0.0
    trial = spec.make(1.0, 0.0, Calibration(1.0, 0.0, 1.0, eps_root))
    updates, _ = trial.update(g, trial.init(params), params)
    direction_norm = _norm(updates)  # ‖d_1‖, since u_1 = -1·d_1
    # ‖g_1‖ of the objective the rule minimises: with coupled L2 the rule adds λθ to g itself,
    # and on a tiny loss that term dominates (tiny_quadratic: 0.05 against 4e-8)
    grad_norm = _norm(grad(spec.objective(problem.loss))(params))
    if not (math.isfinite(direction_norm) and direction_norm > 0 and grad_norm > 0):
        raise ValueError(f"rule {spec.name} makes a zero or non-finite first step on {problem.name}")
    gd_lr = 0.5 / (problem.smoothness + spec.l2)  # L of the objective, with the rule's L2 term
    lr = gd_lr * grad_norm / direction_norm
    scale = grad_norm * direction_norm
    beta = 0.05 if spec.mode == "multiplicative" else 0.1 * lr / scale
    return Calibration(lr, beta, scale, eps_root)


# ----------------------------------------------------------------------------- built-in rules

COUPLED_L2 = {"sgd_hd+l2": 1e-2}  # bases whose g_t includes an L2 term λθ

# base name -> (HD rule maker (lr, β, eps_root, **hd_options), fixed-rate twin (lr, eps_root),
# torch.optim maker). eps_root is passed only to the rules that take it (those with a square
# root of a second moment). The library's named rules come from its registry (hdfunc.REGISTRY,
# which pairs each HD rule with its base and torch.optim twins); the others are configurations
# of them (coupled L2) and directions composed with hdfunc.hd_rule.
Maker = Callable[..., Any]
Base = tuple[Maker, Callable[[float, float], Any], Optional[Callable[[list, float], Any]]]


def registered_base(name: str, **hyperparams: Any) -> Base:
    """The makers of the registered HD rule ``name`` with ``hyperparams`` (and its twins)."""
    info = hdfunc.rule_info(name)
    twin = hdfunc.rule_info(info.base)
    root = "eps_root" in inspect.signature(info.factory).parameters

    def extra(eps_root: float) -> dict:
        return {**hyperparams, "eps_root": eps_root} if root else dict(hyperparams)

    return (lambda lr, b, r, **o: info.factory(lr, b, **extra(r), **o),
            lambda lr, r: twin.factory(lr, **extra(r)),
            lambda ps, lr: twin.torch_twin(ps, lr=lr, **hyperparams))


BASES: dict[str, Base] = {
    "sgd_hd": registered_base("sgd_hd"),
    "sgd_hd+l2": registered_base("sgd_hd", weight_decay=1e-2),
    "sgdn_hd": registered_base("sgdn_hd", momentum=0.9),
    "adam_hd": registered_base("adam_hd"),
    "adamw_hd": registered_base("adamw_hd", weight_decay=1e-2),
    "sgdm_hd": registered_base("sgdm_hd", momentum=0.9),
    "rmsprop_hd": (lambda lr, b, r, **o: hdfunc.hd_rule(hdfunc.scale_by_rms(0.99, eps_root=r), lr,
                                                        b, name="rmsprop_hd", **o),
                   lambda lr, r: hdfunc.base_rule(hdfunc.scale_by_rms(0.99, eps_root=r), lr,
                                                  name="rmsprop"),
                   lambda ps, lr: torch.optim.RMSprop(ps, lr=lr, alpha=0.99, eps=1e-8)),
    "adagrad_hd": (lambda lr, b, r, **o: hdfunc.hd_rule(hdfunc.scale_by_adagrad(1e-10, eps_root=r),
                                                        lr, b, name="adagrad_hd", **o),
                   lambda lr, r: hdfunc.base_rule(hdfunc.scale_by_adagrad(1e-10, eps_root=r), lr,
                                                  name="adagrad"),
                   lambda ps, lr: torch.optim.Adagrad(ps, lr=lr, eps=1e-10)),
    # Lion: torch has no Lion optimizer to compare with (None), and its direction is the sign
    # of a gradient average: piecewise constant, so only the one-step checks apply (NONSMOOTH).
    "lion_hd": (lambda lr, b, r, **o: hdfunc.hd_rule(hdfunc.scale_by_lion(), lr, b,
                                                     name="lion_hd", **o),
                lambda lr, r: hdfunc.base_rule(hdfunc.scale_by_lion(), lr, name="lion"),
                None),
}

# Bases whose direction is not differentiable in the gradient (a sign). With them, and with the
# per-element multiplicative rule (whose factor 1 - β h/(|g||d|) = 1 + β sign(g d) per element),
# the loss after several steps is only piecewise smooth in α_0 and β: autodiff gives the
# derivative of the smooth piece, finite differences across a jump do not, so the K-step and
# hyper checks compare reverse with forward mode only there. Every one-step check applies.
NONSMOOTH = ("lion_hd",)


def _kappa(mode: str, calibration: Optional[Calibration]) -> float:
    """κ for the higher-order variant: β moves by ~10 % per step at the start (additive:
    κ (‖g‖‖d‖)² ≈ 0.1 β) or by the dimensionless 0.02 (multiplicative)."""
    if mode == "multiplicative":
        return 0.02
    if calibration is None or calibration.hypergrad_lr == 0:
        return 0.0
    return 0.1 * calibration.hypergrad_lr / calibration.step_scale ** 2


# The schedule of the scheduled built-in variants: a cosine decay of the factor from 1 to 0.1
# over the full run's trajectory (20 steps), so that s(t-2) differs from 1 and from step to step
# at every step t the checks look at (s(1) = 0.994, s(6) = 0.81, s(18) = 0.11).
SCHEDULE_STEPS = 20


def cosine_schedule(count: torch.Tensor) -> torch.Tensor:
    """s(c) = 0.1 + 0.45 (1 + cos(π min(c, T)/T)), T = :data:`SCHEDULE_STEPS`: the factor
    ``lr_schedule`` puts on the adapted rate of step c + 1 (tensor operations only, so that it is
    traced by vmap and autodiff).

    Args:
        count: c, the step count (a 0-d float tensor).

    Returns:
        s(c), a 0-d tensor in [0.1, 1].
    """
    return 0.1 + 0.45 * (1 + torch.cos(math.pi * torch.clamp(count, max=SCHEDULE_STEPS)
                                       / SCHEDULE_STEPS))


def builtin_spec(base: str, *, granularity: str = "global", mode: str = "additive",
                 transition: bool = False, higher_order: bool = False,
                 scheduled: bool = False) -> RuleSpec:
    """The spec of a built-in HD rule ``base`` (a key of :data:`BASES`) in one variant.

    Args:
        base: the built-in rule, a key of :data:`BASES`.
        granularity: the rate granularity: "global", "tensor" or "element".
        mode: "additive" or "multiplicative".
        transition: with the transition to α_∞ (``final_lr = α_0/2``).
        higher_order: with the higher-order rule (κ from the calibration).
        scheduled: with ``lr_schedule=`` :func:`cosine_schedule` (u_t = -s(t-1) γ_t d_t).

    Returns:
        The :class:`RuleSpec`.

    Raises:
        ValueError: ``base`` is not a built-in rule.
    """
    if base not in BASES:
        raise ValueError(f"unknown built-in rule {base!r}; choose from {', '.join(BASES)}")
    maker, twin, optimizer = BASES[base]

    def make(lr: float, beta: float, calibration: Optional[Calibration]) -> Any:
        options: dict[str, Any] = {"lr_granularity": granularity, "mode": mode}
        if transition:
            options["final_lr"] = 0.5 * lr
        if higher_order:
            options["hyper_hypergrad_lr"] = _kappa(mode, calibration)
        if scheduled:
            options["lr_schedule"] = cosine_schedule
        return maker(lr, beta, calibration.eps_root if calibration else 0.0, **options)

    tags = [granularity, mode] + (["transition"] if transition else []) + (
        ["higher-order"] if higher_order else []) + (["cosine-schedule"] if scheduled else [])
    return RuleSpec(f"{base}[{','.join(tags)}]", make, family=base, mode=mode,
                    granularity=granularity, higher_order=higher_order, transition=transition,
                    base=twin, torch_optimizer=optimizer, l2=COUPLED_L2.get(base, 0.0),
                    smooth=base not in NONSMOOTH and not (
                        granularity == "element" and mode == "multiplicative"),
                    scheduled=scheduled)


def all_builtin_specs() -> list[RuleSpec]:
    """Every built-in base in every variant: granularity × mode, the transition to α_∞, and
    the higher-order rule (additive and multiplicative); and the :func:`scheduled_specs`.

    Returns:
        The :class:`RuleSpec` of every built-in variant.
    """
    specs = []
    for base in BASES:
        for granularity in GRANULARITIES:
            for mode in MODES:
                specs.append(builtin_spec(base, granularity=granularity, mode=mode))
        specs.append(builtin_spec(base, transition=True))
        specs.append(builtin_spec(base, granularity="tensor", mode="multiplicative", transition=True))
        specs.append(builtin_spec(base, higher_order=True))
        specs.append(builtin_spec(base, granularity="element", mode="multiplicative",
                                  higher_order=True))
    return specs + scheduled_specs()


def scheduled_specs() -> list[RuleSpec]:
    """The variants with ``lr_schedule`` (:func:`cosine_schedule`) of the full run: SGD-HD and
    Adam-HD additive (global, per element), Adam-HD multiplicative per tensor (the schedule in
    Eq. 8's norm), and with the transition and the higher-order rule.

    Returns:
        Their :class:`RuleSpec`.
    """
    return [
        builtin_spec("sgd_hd", scheduled=True),
        builtin_spec("adam_hd", granularity="element", scheduled=True),
        builtin_spec("adam_hd", granularity="tensor", mode="multiplicative", scheduled=True),
        builtin_spec("adam_hd", granularity="tensor", mode="multiplicative", transition=True,
                     scheduled=True),
        builtin_spec("sgd_hd", higher_order=True, scheduled=True),
    ]


def quick_specs() -> list[RuleSpec]:
    """A representative subset: every base direction family (SGD with and without coupled L2,
    SGDN, Adam, AdamW and the composed RMSprop, Adagrad and Lion), every granularity, both
    modes, the transition and the higher-order variants, and a scheduled one.

    Returns:
        The :class:`RuleSpec` of the quick subset.
    """
    return [
        builtin_spec("sgd_hd"),
        builtin_spec("sgd_hd+l2", granularity="tensor"),
        builtin_spec("sgdn_hd", granularity="tensor", mode="multiplicative"),
        builtin_spec("adam_hd", granularity="element"),
        builtin_spec("adamw_hd", mode="multiplicative"),
        builtin_spec("rmsprop_hd", granularity="tensor"),
        builtin_spec("adagrad_hd", granularity="element", mode="multiplicative"),
        builtin_spec("lion_hd"),
        builtin_spec("sgd_hd", transition=True),
        builtin_spec("adam_hd", granularity="tensor", mode="multiplicative", transition=True),
        builtin_spec("sgd_hd", higher_order=True),
        builtin_spec("adam_hd", granularity="element", mode="multiplicative", higher_order=True),
        builtin_spec("adam_hd", granularity="tensor", mode="multiplicative", scheduled=True),
    ]


# ----------------------------------------------------------------------------- hyperdescent rules

# Rules built by hdfunc.hyperdescent that adapt, besides α, a hyperparameter λ in (0, 1) whose
# one-step derivative grows like 1/(1 - λ) (Adam's β1, through the bias correction m̂ =
# m/(1 - β1^t)): name -> (the argument holding λ's hypergradient rate, λ's name, λ_0). The
# built-in momentum rules are in verification.hyperdescent.BUILTIN.
HYPERDESCENT_RULES = {"adam_hd_lr_beta1": ("beta1_hypergrad_lr", "betas[0]", 0.9)}


def hyperdescent_rule_spec(name: str, mode: str = "additive") -> RuleSpec:
    """The spec of the hyperdescent rule ``name`` (a key of :data:`HYPERDESCENT_RULES`) in
    ``mode``, checked per adapted hyperparameter (one-step identity and rate law).

    λ's rate is set so that its first step moves it by ~1 % of 1 - λ_0: h_λ ≈ ‖g‖ ‖∂u/∂λ‖ ≈
    ‖g_1‖‖d_1‖ α_0 / (1 - λ_0), so additive β_λ = 0.01 (1 - λ_0)² / (α_0 ‖g_1‖‖d_1‖) (a rate
    scaled by λ_0 instead, as for momentum, drives β1 to its bounds within 20 steps on the
    quadratics, where the finite differences cannot check it); multiplicative: 0.002.

    Args:
        name: the rule, a key of :data:`HYPERDESCENT_RULES`.
        mode: ``"additive"`` or ``"multiplicative"``.

    Returns:
        The :class:`RuleSpec` (``adapts`` = the rule's adapted hyperparameters).
    """
    info = hdfunc.rule_info(name)
    rate_arg, _, start = HYPERDESCENT_RULES[name]

    def make(lr: float, beta: float, calibration: Optional[Calibration]) -> Any:
        scale = calibration.step_scale if calibration is not None else 1.0
        extra = 0.0 if beta == 0 else (0.002 if mode == "multiplicative" else
                                       0.01 * (1 - start) ** 2 / (lr * scale))
        return info.factory(lr, beta, **{rate_arg: extra}, mode=mode)

    return RuleSpec(f"{name}[{mode}]", make, family=name, mode=mode, adapts=info.adapts)


def hyperdescent_rule_specs(quick: bool) -> list[RuleSpec]:
    """The rules of :data:`HYPERDESCENT_RULES` in both modes (quick: additive only).

    Args:
        quick: the quick run's subset.

    Returns:
        Their :class:`RuleSpec`.
    """
    return [hyperdescent_rule_spec(name, mode) for name in HYPERDESCENT_RULES
            for mode in (("additive",) if quick else MODES)]


# ----------------------------------------------------------------------------- user rules


def user_spec(factory: Callable[[float, float], Any], name: Optional[str] = None) -> RuleSpec:
    """Wrap a user factory ``factory(lr, hypergrad_lr) -> rule`` (the documented protocol: the
    rule's state holds an HD node, an :class:`hdfunc.HDState` or any NamedTuple with fields
    ``lr``, ``hypergrad_lr`` and ``hypergrad``). A factory with the attribute ``smooth =
    False`` (a sign-based direction, say) skips the finite differences of the multi-step
    checks, as the built-in Lion does (see NONSMOOTH).

    Args:
        factory: the user's factory ``factory(lr, hypergrad_lr) -> rule``.
        name: the rule's name in the report (default: the factory's ``__name__``).

    Returns:
        The :class:`RuleSpec` of family "user".

    Raises:
        TypeError: ``factory`` is not callable, or its ``smooth`` attribute is not a bool.
    """
    if not callable(factory):
        raise TypeError(f"a rule factory must be callable, got {type(factory).__name__}")
    name = name or getattr(factory, "__name__", "user_rule")
    hyper, adapts, scheduled = False, (), False
    try:  # one probe of the rule and its state
        from verification.hyperdescent import hyperdescent_node
        probe = factory(1e-3, 1e-3)
        state = probe.init({"x": torch.zeros(2, dtype=torch.float64)})
        # a rule whose HD node carries a nonempty hyper_hypergrad is higher order
        node = hdfunc.find_lr_state(state)
        hyper = node is not None and bool(tree_leaves(getattr(node, "hyper_hypergrad", ())))
        # a rule built by hdfunc.hyperdescent is checked per adapted hyperparameter
        found = hyperdescent_node(state)
        adapts = () if found is None else tuple(found.hyperparams)
        scheduled = getattr(getattr(probe, "rate_law", None), "lr_schedule", None) is not None
    except Exception:  # noqa: BLE001 - the checks themselves report a broken factory
        pass
    smooth = getattr(factory, "smooth", True)
    if not isinstance(smooth, bool):
        raise TypeError(f"{name}.smooth must be True or False, got {smooth!r}")
    return RuleSpec(name, lambda lr, beta, calibration: factory(lr, beta), family="user",
                    higher_order=hyper, smooth=smooth, adapts=adapts, scheduled=scheduled)


def load_factory(target: str) -> Callable[[float, float], Any]:
    """Import ``package.module:factory`` (the current directory is importable, as with
    ``python -m``)."""
    if ":" not in target:
        raise ValueError(f"--rule must look like package.module:factory, got {target!r}")
    module_name, attribute = target.split(":", 1)
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"cannot import module {module_name!r} for --rule {target}: {error}") from error
    factory = module
    for part in attribute.split("."):
        if not hasattr(factory, part):
            raise ValueError(f"module {module_name!r} has no attribute {attribute!r}")
        factory = getattr(factory, part)
    if not callable(factory):
        raise TypeError(f"{target} is not callable")
    return factory
