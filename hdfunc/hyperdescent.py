"""Hypergradient descent on any hyperparameter of any rule, by forward mode (issue 12, first slice).

    rule = hyperdescent(hdfunc.sgdn, {"lr": 1e-3, "momentum": 1e-4}, lr=0.1, momentum=0.9)
    state = rule.init(params)
    updates, state = rule.update(grads, state, params)

The paper's rule (Baydin et al. 2018, §2, Eq. 3) generalised from α to any hyperparameter λ of a
rule whose update u_t = u(g_t, s_{t-1}, θ_{t-1}; λ) is added to the params (θ_t = θ_{t-1} + u_t):

    h_λ,t = ∂f(θ_{t-1})/∂λ = g_t · ∂u_{t-1}/∂λ                   (g_t = ∇f(θ_{t-1}))
    λ_t   = λ_{t-1} - β_λ h_λ,t                                  (mode="additive")
    λ_t   = λ_{t-1} (1 - β_λ h_λ,t / (‖g_t‖ ‖∂u_{t-1}/∂λ‖))       (mode="multiplicative", Eq. 8)
    λ_t   = clamp(λ_t, bounds[λ])                                (projection)
    u_t, ∂u_t/∂λ = jvp(λ ↦ u(g_t, s_{t-1}, θ_{t-1}; λ), λ_t, 1)  (forward mode; jacfwd for several)

∂u_t/∂λ is carried in the state (one params-sized tangent per adapted hyperparameter) and used
at step t+1; no graph is kept. The derivative is **greedy (one-step)**, as HD's derivation: the
base state s_{t-1} (momentum buffer, Adam moments, ...) and θ_{t-1} are held fixed, so the
dependence of u_t on λ through the earlier steps is dropped. h_λ,t is then exactly
d/dλ f(θ_{t-2} + u_{t-1}(λ)) at λ = λ_{t-1} with s_{t-2}, θ_{t-2}, g_{t-1} frozen.

For λ = α this is the analytic HD rule: ∂u_{t-1}/∂α = -d_{t-1}, so h_t = -g_t · d_{t-1}, and
``hyperdescent(sgd, {"lr": β}, lr=α_0)`` reproduces ``sgd_hd(α_0, β)`` to rounding (likewise
sgdn, adam, adamw; see docs/hyperdescent.md and tests/test_hyperdescent.py).
"""

from __future__ import annotations

import inspect
import re
from typing import Any, Callable, Literal, NamedTuple, Optional

import torch
from torch.func import jacfwd, jvp

from hdfunc.base import Rule, Transform, check_hyperparameter, checked_rule
from hdfunc.hypergradient import (HDState, LRState, _multiplicative_factor, find_lr_state,
                                  replace_lr_state)
from hdfunc.tree import (PyTree, accumulation_dtype, first_leaf, leaf_vdot, tree_leaves,
                         tree_structure, tree_unflatten, tree_zeros_like)

Mode = Literal["additive", "multiplicative"]
MODES = ("additive", "multiplicative")

PROBABILITY_HIGH = 1.0 - 1e-6
"""The upper bound of the default projection of momentum-like hyperparameters (momentum, Adam's
betas, RMSprop's decay) onto [0, 1): [0, 1 - 1e-6]."""

Bounds = tuple[Optional[float], Optional[float]]

STATE_HELD = ("lr", "hypergrad_lr")
"""The hyperparameters the built-in rules keep in their state rather than their closure: the
fixed rate α (:class:`hdfunc.LRState`, so a grid of rates is a stacked state) and an HD rule's β
(:class:`hdfunc.HDState`). Adapted, they are written into that state before each step."""

_NAME = re.compile(r"^([A-Za-z_][A-Za-z_0-9]*)(?:\[(\d+)\])?$")


def default_bounds(name: str) -> Bounds:
    """The projection applied to ``name`` after each update unless ``bounds`` overrides it:
    ``lr``, ``weight_decay``, ``eps``, ``eps_root`` and unknown names ending in ``lr`` → [0, ∞);
    ``momentum``, ``betas[i]``, ``decay``, ``dampening`` → [0, 1 - 1e-6]; any other name: none.

    Args:
        name: an adapted hyperparameter's name (``"lr"``, ``"betas[0]"``, ...).

    Returns:
        ``(low, high)``, None where unbounded.
    """
    key = _NAME.match(name).group(1) if _NAME.match(name) else name
    if key in ("momentum", "betas", "decay", "dampening", "b1", "b2"):
        return (0.0, PROBABILITY_HIGH)
    if key in ("lr", "weight_decay", "eps", "eps_root") or key.endswith("lr"):
        return (0.0, None)
    return (None, None)


class HyperdescentState(NamedTuple):
    """State of :func:`hyperdescent` after step t-1 (count = t-1). The dicts are keyed by the
    adapted hyperparameters' names (``"lr"``, ``"betas[0]"``, ...).

    Attributes:
        count: t-1, the steps taken (int64).
        hyperparams: λ_{t-1}: 0-d tensors in the accumulation dtype of the params.
        hypergrad_lr: β_λ: 0-d tensors (in the state, so a vmapped grid of β works).
        tangents: ∂u_{t-1}/∂λ: pytrees like the params (in the updates' dtypes); 0 at t = 1.
        hypergrad: h_λ,t-1: the hypergradient the last step used.
        base: the base rule's state s_{t-1}.
        skipped: the steps where the non-finite guard kept some λ.
    """

    count: torch.Tensor  # t-1, int64
    hyperparams: dict  # λ_{t-1}: 0-d tensors in the accumulation dtype of the params
    hypergrad_lr: dict  # β_λ: 0-d tensors (in the state, so a vmapped grid of β works)
    tangents: dict  # ∂u_{t-1}/∂λ: pytrees like the params (in the updates' dtypes); 0 at t = 1
    hypergrad: dict  # h_λ,t-1: the hypergradient the last step used
    base: PyTree  # the base rule's state s_{t-1}
    skipped: torch.Tensor  # steps where the non-finite guard kept some λ


def parse_name(name: str) -> tuple[str, Optional[int]]:
    """``"lr"`` → ("lr", None); ``"betas[0]"`` → ("betas", 0): the factory's keyword and, for a
    tuple-valued hyperparameter, the index of the member to adapt.

    Args:
        name: a keyword of a factory (``"momentum"``) or a member of a tuple-valued one
            (``"betas[0]"``).

    Returns:
        ``(keyword, index)``, the index None for a plain keyword.

    Raises:
        ValueError: ``name`` is neither.
    """
    match = _NAME.match(name) if isinstance(name, str) else None
    if match is None:
        raise ValueError(f"cannot read hyperparameter name {name!r}: write a keyword of the "
                         "factory ('momentum') or a member of a tuple-valued one ('betas[0]')")
    return match.group(1), None if match.group(2) is None else int(match.group(2))


def _factory_defaults(factory: Callable) -> dict:
    try:
        parameters = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return {}
    return {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}


def hyperdescent(factory: Callable[..., Rule], hypergrad_lr: dict[str, float | torch.Tensor], /,
                 *, mode: Mode = "additive", bounds: Optional[dict[str, Bounds]] = None,
                 skip_nonfinite: bool = True, **hyperparams: Any) -> Rule:
    """Hypergradient descent on the hyperparameters named in ``hypergrad_lr`` of the rule
    ``factory(**hyperparams)`` (module docstring for the equations).

    Granularity: one global λ per name (per-tensor λ are not built yet). The hypergradient uses
    the incoming gradient g_t: with *coupled* weight decay (an L2 term the rule adds to g), the
    analytic HD rules use g_t + λθ instead, so they agree with this only at weight_decay = 0 (or
    with decoupled decay).

    Args:
        factory: any rule factory taking its hyperparameters as keyword arguments
            (``hdfunc.sgd``, ``hdfunc.sgdn``, ``hdfunc.adam``, ``hdfunc.adamw``,
            ``hdfunc.base_rule`` with a ``functools.partial``, a user's); each adapted
            hyperparameter is passed to it as a 0-d tensor, so the factory (and the transforms it
            builds) must accept 0-d tensors and read the hyperparameter from its closure at
            ``update``. The exceptions are the hyperparameters in :data:`STATE_HELD`: ``lr``
            when the rule keeps its fixed rate in its state (:class:`hdfunc.LRState`, as every
            built-in base rule does) and ``hypergrad_lr``, the β of an HD rule
            (:class:`hdfunc.HDState`): the adapted value is written into that state before each
            step. An HD rule's own options are passed as ``options=hdfunc.HDOptions(...)``
            (``mode``, ``bounds`` and ``skip_nonfinite`` here are this rule's).
        hypergrad_lr: ``{name: β_λ}``; a name is a keyword of the factory (``"lr"``,
            ``"momentum"``, ``"weight_decay"``, ``"eps"``, an HD rule's ``"hypergrad_lr"``) or a
            member of a tuple-valued one (``"betas[0]"``, ``"betas[1]"``). Its starting value is
            ``hyperparams[name]`` or the factory's default. (``factory`` and this dict are
            positional-only, so ``hypergrad_lr=β`` among ``hyperparams`` is the factory's.)
        mode: ``"additive"`` (Eq. 3) or ``"multiplicative"`` (Eq. 8: λ is left unchanged where a
            norm is zero, e.g. at t = 1).
        bounds: ``{name: (low, high)}`` (None: no bound), overriding :func:`default_bounds`
            (λ ≥ 0 for rates, weight decay and ε; [0, 1 - 1e-6] for momentum and betas). Pass
            ``{"lr": (None, None)}`` for the paper's unbounded α.
        skip_nonfinite: keep λ where h_λ or the new λ is not finite (before the projection);
            ``state.skipped`` counts the steps where any λ was kept.
        **hyperparams: the factory's keyword arguments (the starting values of the adapted ones
            and the fixed values of the others).

    Returns:
        A rule named ``hyperdescent_<base rule>`` with state :class:`HyperdescentState`
            (:func:`get_hyperparams` reads the current λ).

    Raises:
        TypeError: ``factory`` is not callable or returns no rule, ``hypergrad_lr`` is not a
            non-empty dict, or an adapted hyperparameter is a callable (a schedule).
        ValueError: a bad ``mode``, a name that cannot be read, has no starting value or no such
            tuple member, bounds for a name that is not adapted, a bad β_λ, ``lr`` adapted
            for a rule whose rate is not fixed, or ``hypergrad_lr`` for a rule that is not an HD
            rule or already adapts β (``hyper_hypergrad_lr``) (at ``init``).
    """
    if not callable(factory):
        raise TypeError(f"factory must be a rule factory (a callable), got {factory!r}")
    if not isinstance(hypergrad_lr, dict) or not hypergrad_lr:
        raise TypeError("hypergrad_lr must be a non-empty dict {hyperparameter name: rate}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    names = tuple(hypergrad_lr)
    defaults = _factory_defaults(factory)
    parsed = {}
    initial: dict[str, Any] = {}
    for name in names:
        key, index = parse_name(name)
        check_hyperparameter(f"hypergrad_lr[{name!r}]", hypergrad_lr[name])
        if key in hyperparams:
            value = hyperparams[key]
        elif key in defaults:
            value = defaults[key]
        else:
            raise ValueError(f"{name!r}: no starting value; pass {key}=... (the factory "
                             f"{getattr(factory, '__name__', factory)!r} has no default for it)")
        if index is not None:
            if not isinstance(value, (tuple, list)) or not 0 <= index < len(value):
                raise ValueError(f"{name!r}: {key} is {value!r}, which has no member {index}")
            value = value[index]
        if callable(value) and not isinstance(value, torch.Tensor):
            raise TypeError(f"{name!r} is a callable (a schedule?); only a number or a 0-d "
                            "tensor can be adapted")
        parsed[name] = (key, index)
        initial[name] = value
    bounds = dict(bounds or {})
    unknown = set(bounds) - set(names)
    if unknown:
        raise ValueError(f"bounds for hyperparameters that are not adapted: {sorted(unknown)}")
    limits = {name: bounds.get(name, default_bounds(name)) for name in names}

    def build(values: dict) -> Rule:
        kwargs = dict(hyperparams)
        for name, value in values.items():
            key, index = parsed[name]
            if index is None:
                kwargs[key] = value
            else:
                members = list(kwargs.get(key, defaults.get(key)))
                members[index] = value
                kwargs[key] = type(kwargs.get(key, defaults.get(key)))(members)
        return factory(**kwargs)

    probe = build(initial)  # validates the starting values (the factory's own errors)
    if not isinstance(probe, Transform):
        raise TypeError(f"factory returned {type(probe).__name__}, not a rule")
    # the rule as update builds it, with tensor hyperparameters (a tensor weight decay of 0
    # still reads the params)
    probe = build({name: torch.as_tensor(value, dtype=torch.float64)
                   for name, value in initial.items()})
    in_state = [name for name in STATE_HELD if name in names]

    def with_state_held(base_state: PyTree, values: dict) -> PyTree:
        """The base state with the adapted α (and, for an HD rule, β) written into its rate node:
        the rule reads them there, not from its closure."""
        if not in_state:
            return base_state
        node = find_lr_state(base_state)
        return replace_lr_state(base_state, **{name: values[name].to(getattr(node, name).dtype)
                                               for name in in_state})

    def init(params: PyTree) -> HyperdescentState:
        leaf = first_leaf(params)
        dtype = accumulation_dtype(params)

        def rate(value: Any) -> torch.Tensor:
            if isinstance(value, torch.Tensor):
                return value.to(device=leaf.device, dtype=dtype)
            return leaf.new_full((), float(value), dtype=dtype)

        values = {name: rate(initial[name]) for name in names}
        base = build(values).init(params)
        node = find_lr_state(base)
        if "lr" in names and not isinstance(node, LRState):
            raise ValueError("adapting 'lr' needs a rule with a fixed rate in its state "
                             "(hdfunc.LRState); this rule's rate is scheduled or already adapted")
        if "hypergrad_lr" in names and not isinstance(node, HDState):
            raise ValueError("adapting 'hypergrad_lr' needs an HD rule (its state holds an "
                             "hdfunc.HDState)")
        if "hypergrad_lr" in names and tree_leaves(node.lr_sensitivity):
            raise ValueError("adapting 'hypergrad_lr' of an HD rule that already adapts it "
                             "(hyper_hypergrad_lr is set): choose one of the two")
        base = with_state_held(base, values)
        zero = leaf.new_zeros((), dtype=dtype)
        return HyperdescentState(
            count=leaf.new_zeros((), dtype=torch.int64),
            hyperparams=values,
            hypergrad_lr={name: rate(hypergrad_lr[name]) for name in names},
            tangents={name: tree_zeros_like(params) for name in names},
            hypergrad={name: zero for name in names},
            base=base,
            skipped=leaf.new_zeros((), dtype=torch.int64),
        )

    def update(grads: PyTree, state: HyperdescentState,
               params: Optional[PyTree] = None) -> tuple[PyTree, HyperdescentState]:
        g_leaves = tree_leaves(grads)
        new_values, hypergrads = {}, {}
        kept = torch.zeros((), dtype=torch.bool, device=g_leaves[0].device)
        for name in names:
            lam = state.hyperparams[name]
            beta = state.hypergrad_lr[name]
            dtype = lam.dtype
            tangent = tree_leaves(state.tangents[name])
            # h_λ,t = g_t · ∂u_{t-1}/∂λ
            h = sum(leaf_vdot(g, d, dtype) for g, d in zip(g_leaves, tangent))
            if mode == "additive":
                new = lam - beta * h
            else:
                grad_sq = sum(leaf_vdot(g, g, dtype) for g in g_leaves)
                tangent_sq = sum(leaf_vdot(d, d, dtype) for d in tangent)
                new = lam * _multiplicative_factor([beta], [h], [grad_sq], [tangent_sq])[0]
            ok = torch.isfinite(h) & torch.isfinite(new)
            low, high = limits[name]
            if low is not None or high is not None:
                new = torch.clamp(new, min=low, max=high)
            if skip_nonfinite:
                new = torch.where(ok, new, lam)
            kept = kept | ~ok
            new_values[name] = new
            hypergrads[name] = h

        def step(*values: torch.Tensor) -> tuple[PyTree, PyTree]:
            current = dict(zip(names, values))
            rule = build(current)
            return rule.update(grads, with_state_held(state.base, current), params)

        primals = tuple(new_values[name] for name in names)
        if len(names) == 1:
            updates, tangent, base = jvp(step, primals, (torch.ones_like(primals[0]),),
                                         has_aux=True)
            tangents = {names[0]: tangent}
        else:
            # all tangents in one forward pass, batched over the basis of λ by vmap (jacfwd):
            # the primal step is computed once (it is returned in the aux)
            def with_primal(*values: torch.Tensor) -> tuple[PyTree, tuple]:
                out, aux = step(*values)
                return out, (out, aux)

            jacobian, (updates, base) = jacfwd(with_primal, argnums=tuple(range(len(names))),
                                               has_aux=True)(*primals)
            spec = tree_structure(updates)
            per_leaf = spec.flatten_up_to(jacobian)  # one tuple (∂/∂λ_1, ..., ∂/∂λ_k) per leaf
            tangents = {name: tree_unflatten([leaf[i] for leaf in per_leaf], spec)
                        for i, name in enumerate(names)}
        new_state = HyperdescentState(
            count=state.count + 1,
            hyperparams=new_values,
            hypergrad_lr=state.hypergrad_lr,
            tangents=tangents,
            hypergrad=hypergrads,
            base=base,
            skipped=state.skipped + kept.to(torch.int64),
        )
        return updates, new_state

    name = f"hyperdescent_{probe.name}"
    transform = Transform(init, update, name, needs_params=probe.needs_params)
    return checked_rule(transform, name=name, hyperparams={
        "factory": getattr(factory, "__name__", repr(factory)),
        "hypergrad_lr": dict(hypergrad_lr), "mode": mode, "bounds": limits,
        "skip_nonfinite": skip_nonfinite, **hyperparams})


def get_hyperparams(state: HyperdescentState) -> dict:
    """The current values λ_t of the adapted hyperparameters, by name.

    Args:
        state: the state of a :func:`hyperdescent` rule.

    Returns:
        ``{name: λ_t}``, 0-d tensors.
    """
    return dict(state.hyperparams)


__all__ = ["HyperdescentState", "PROBABILITY_HIGH", "default_bounds", "get_hyperparams",
           "hyperdescent", "parse_name"]

