"""Hypergradient descent on any hyperparameter of any rule, by forward mode (issue 12).

    rule = hyperdescent(hdfunc.sgdn, {"lr": 1e-3, "momentum": 1e-4}, lr=0.1, momentum=0.9)
    state = rule.init(params)
    updates, state = rule.update(grads, state, params)

The paper's rule (Baydin et al. 2018, §2, Eq. 3) generalised from α to any hyperparameter λ of a
rule whose update u_t = u(g_t, s_{t-1}, θ_{t-1}; λ) is added to the params (θ_t = θ_{t-1} + u_t):

    h_λ,t = ∂f(θ_{t-1})/∂λ = g_t · ∂u_{t-1}/∂λ                   (g_t = ∇f(θ_{t-1}))
    λ_t   = λ_{t-1} - β_λ h_λ,t                                  (mode="additive")
    λ_t   = λ_{t-1} (1 - β_λ h_λ,t / (‖g_t‖ ‖∂u_{t-1}/∂λ‖))       (mode="multiplicative", Eq. 8)
    λ_t   = clamp(λ_t, bounds[λ])                                (projection)
    u_t, ∂u_t/∂λ = jvp(λ ↦ u(g_t, s_{t-1}, θ_{t-1}; λ), λ_t, 1)  (forward mode; vmap-batched for several)

∂u_t/∂λ is carried in the state (one params-sized tangent per adapted hyperparameter) and used
at step t+1; no graph is kept. The derivative is **greedy (one-step)**, as HD's derivation: the
base state s_{t-1} (momentum buffer, Adam moments, ...) and θ_{t-1} are held fixed, so the
dependence of u_t on λ through the earlier steps is dropped. h_λ,t is then exactly
d/dλ f(θ_{t-2} + u_{t-1}(λ)) at λ = λ_{t-1} with s_{t-2}, θ_{t-2}, g_{t-1} frozen.

f is the objective the rule descends: with a coupled L2 term (weight decay added to g) the
penalised f + (λ_wd/2)‖θ‖², so g_t includes λ_wd θ_{t-1}, as in the analytic HD rules. λ may be
global, per tensor or (α) per element (``granularity``), the dot product then taken per tensor or
elementwise and the base rule applied tensor by tensor, each tensor with its own λ.

For λ = α this is the analytic HD rule: ∂u_{t-1}/∂α = -d_{t-1}, so h_t = -g_t · d_{t-1}, and
``hyperdescent(sgd, {"lr": β}, lr=α_0)`` reproduces ``sgd_hd(α_0, β)`` to rounding (likewise
sgdn, adam, adamw; per tensor and per element; with coupled weight decay: see
docs/hyperdescent.md and tests/test_hyperdescent.py).
"""

from __future__ import annotations

import inspect
import re
from typing import Any, Callable, Literal, NamedTuple, Optional

import torch
from torch.func import jvp, vmap

from hdfunc.base import EmptyState, Rule, Transform, check_hyperparameter, checked_rule
from hdfunc.directions import add_l2
from hdfunc.hypergradient import (HDState, LRState, _multiplicative_factor, as_rate,
                                  find_lr_state, replace_lr_state)
from hdfunc.options import GRANULARITIES, Granularity
from hdfunc.tree import (PyTree, accumulation_dtype, first_leaf, leaf_vdot, mask_leaves,
                         tree_flatten, tree_leaves, tree_map, tree_unflatten, tree_zeros_like)

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
        hyperparams: λ_{t-1}: 0-d tensors in the accumulation dtype of the params (per tensor /
            per element: a pytree like the params, each entry in its param's accumulation dtype).
        hypergrad_lr: β_λ: 0-d tensors (in the state, so a vmapped grid of β works).
        tangents: ∂u_{t-1}/∂λ: pytrees like the params (in the updates' dtypes); 0 at t = 1
            (per tensor / per element: ∂u_{t-1,i}/∂λ_i, tensor by tensor).
        hypergrad: h_λ,t-1: the hypergradient the last step used (λ's structure).
        base: the base rule's state s_{t-1} (per tensor / per element: a tuple of one base
            state per tensor, in the params' flattening order).
        skipped: the steps where the non-finite guard kept some λ.
    """

    count: torch.Tensor  # t-1, int64
    hyperparams: dict  # λ_{t-1}: 0-d tensors (or pytrees like the params, per tensor/element)
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


def _factory_parameters(factory: Callable) -> set:
    try:
        return set(inspect.signature(factory).parameters)
    except (TypeError, ValueError):
        return set()


def _products(xs: list, ys: list, granularity: str, dtypes: list) -> list:
    """Σ x⊙y at a granularity, as a list of rate leaves: one total (global), one per tensor, or
    elementwise (the analytic rules' ``products``, hdfunc.hypergradient)."""
    if granularity == "global":
        return [sum(leaf_vdot(x, y, dtypes[0]) for x, y in zip(xs, ys))]
    if granularity == "tensor":
        return [leaf_vdot(x, y, dt) for x, y, dt in zip(xs, ys, dtypes)]
    return [x.to(dt) * y.to(dt) for x, y, dt in zip(xs, ys, dtypes)]


def hyperdescent(factory: Callable[..., Rule], hypergrad_lr: dict[str, float | torch.Tensor], /,
                 *, mode: Mode = "additive", bounds: Optional[dict[str, Bounds]] = None,
                 skip_nonfinite: bool = True,
                 granularity: Granularity | dict[str, Granularity] = "global",
                 coupled_weight_decay: Optional[bool] = None, **hyperparams: Any) -> Rule:
    """Hypergradient descent on the hyperparameters named in ``hypergrad_lr`` of the rule
    ``factory(**hyperparams)`` (module docstring for the equations).

    Granularity (``granularity``): one global λ per name (default), one λ per tensor, or (for
    ``lr``) one per element, with h_λ taken at that granularity (per-tensor dot products,
    elementwise products), as ``lr_granularity`` of the analytic HD rules. Per tensor or per
    element, the base rule is applied tensor by tensor (its state is one state per tensor, in the
    params' flattening order), each tensor's rule built with that tensor's λ: the same rule for
    every rule that acts on each tensor separately (all built-in rules), not for one that couples
    tensors (clipping by the global norm), which must stay global.

    Coupled weight decay: the hypergradient is that of the objective the rule descends. With a
    coupled L2 term (the rule adds λ_wd θ to g, ``weight_decay`` with ``decoupled_weight_decay``
    false) that is f + (λ_wd/2)‖θ‖² (masked by ``weight_decay_mask``), so h_λ,t uses
    g_t + λ_wd θ_{t-1}, computed by :func:`hdfunc.add_l2` as the rule computes it, as the
    analytic HD rules do (their coupled L2 comes before the hypergradient).

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
            step (and the rule is built once, not at every step, when only these are adapted).
            An HD rule's own options are passed as ``options=hdfunc.HDOptions(...)`` (``mode``,
            ``bounds``, ``skip_nonfinite`` and ``granularity`` here are this rule's).
        hypergrad_lr: ``{name: β_λ}``; a name is a keyword of the factory (``"lr"``,
            ``"momentum"``, ``"weight_decay"``, ``"eps"``, an HD rule's ``"hypergrad_lr"``) or a
            member of a tuple-valued one (``"betas[0]"``, ``"betas[1]"``). Its starting value is
            ``hyperparams[name]`` or the factory's default. (``factory`` and this dict are
            positional-only, so ``hypergrad_lr=β`` among ``hyperparams`` is the factory's.)
        mode: ``"additive"`` (Eq. 3) or ``"multiplicative"`` (Eq. 8: λ is left unchanged where a
            norm is zero, e.g. at t = 1), with the norms at λ's granularity.
        bounds: ``{name: (low, high)}`` (None: no bound), overriding :func:`default_bounds`
            (λ ≥ 0 for rates, weight decay and ε; [0, 1 - 1e-6] for momentum and betas). Pass
            ``{"lr": (None, None)}`` for the paper's unbounded α.
        skip_nonfinite: keep λ where h_λ or the new λ is not finite (before the projection;
            entry by entry for per-tensor / per-element λ); ``state.skipped`` counts the steps
            where any λ was kept.
        granularity: ``"global"``, ``"tensor"`` or ``"element"`` for every adapted name, or
            ``{name: granularity}`` (names left out are global). ``"element"`` is for ``lr``
            only (the factories take 0-d hyperparameters; α lives in the rule's state);
            ``hypergrad_lr`` (an HD rule's β) is global only.
        coupled_weight_decay: whether ``weight_decay`` is a coupled L2 term whose penalty the
            hypergradient includes (above). None: read from the factory, true when it takes
            ``weight_decay`` and ``decoupled_weight_decay`` and the latter is false (the
            built-in ``sgd``, ``sgdn``, ``sgdm``, ``adam``; ``adamw`` has no such argument: its
            decay is decoupled). True/False: a user factory's convention.
        **hyperparams: the factory's keyword arguments (the starting values of the adapted ones
            and the fixed values of the others).

    Returns:
        A rule named ``hyperdescent_<base rule>`` with state :class:`HyperdescentState`
            (:func:`get_hyperparams` reads the current λ).

    Raises:
        TypeError: ``factory`` is not callable or returns no rule, ``hypergrad_lr`` is not a
            non-empty dict, or an adapted hyperparameter is a callable (a schedule).
        ValueError: a bad ``mode`` or ``granularity``, a name that cannot be read, has no
            starting value or no such tuple member, bounds for a name that is not adapted, a bad
            β_λ, ``lr`` adapted for a rule whose rate is not fixed, ``hypergrad_lr`` for a rule
            that is not an HD rule or already adapts β (``hyper_hypergrad_lr``) (at ``init``),
            a per-tensor λ of a rule that adapts a rate itself, ``coupled_weight_decay=True``
            without a ``weight_decay``.
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
    grains = _granularities(granularity, names)
    per_leaf = any(grain != "global" for grain in grains.values())
    static = all(name in STATE_HELD for name in names)  # the factory's closure holds no λ
    in_state = [name for name in STATE_HELD if name in names]
    masked = hyperparams.get("weight_decay_mask") is not None

    def build(values: dict, mask: Any = None) -> Rule:
        """The rule at ``values`` (an element-wise α is written into the state only: the factory
        gets a 0-d placeholder); ``mask``: a per-tensor rule's own weight-decay mask."""
        kwargs = dict(hyperparams)
        for name, value in values.items():
            if grains[name] == "element":
                continue  # lr: the factory's value is its starting rate, replaced in the state
            key, index = parsed[name]
            if index is None:
                kwargs[key] = value
            else:
                members = list(kwargs.get(key, defaults.get(key)))
                members[index] = value
                kwargs[key] = type(kwargs.get(key, defaults.get(key)))(members)
        if mask is not None:
            kwargs["weight_decay_mask"] = mask
        return factory(**kwargs)

    probe = build(initial)  # validates the starting values (the factory's own errors)
    if not isinstance(probe, Transform):
        raise TypeError(f"factory returned {type(probe).__name__}, not a rule")
    # the rule as update builds it, with tensor hyperparameters (a tensor weight decay of 0
    # still reads the params)
    probe = build({name: torch.as_tensor(value, dtype=torch.float64)
                   for name, value in initial.items()})
    if per_leaf and probe.rate_law is not None:
        raise ValueError("per-tensor / per-element hyperparameters apply the base rule tensor by "
                         "tensor; this rule adapts a learning rate itself (an HD rule), whose "
                         "global rate would become a rate per tensor: use granularity='global' "
                         "(or the HD rule's own lr_granularity)")
    decay = _coupled_decay(factory, coupled_weight_decay, hyperparams, defaults, names)
    built: dict = {}  # static rules: built once, by per-tensor mask

    def rule_at(values: dict, mask: Any = None) -> Callable:
        """The update of the rule at ``values``: built once (per weight-decay mask) when only
        state-held hyperparameters are adapted, whose values are written into the state; else
        rebuilt with the λ of this step (the factory reads them from its closure)."""
        if not static:
            return build(values, mask).update
        key = None if mask is None else tuple(mask)
        if key not in built:  # built from the starting values: no traced λ in its closure
            built[key] = build(initial, mask).update
        return built[key]

    def with_state_held(base_state: PyTree, values: dict) -> PyTree:
        """The base state with the adapted α (and, for an HD rule, β) written into its rate node:
        the rule reads them there, not from its closure."""
        if not in_state:
            return base_state
        node = find_lr_state(base_state)
        return replace_lr_state(base_state, **{name: values[name].to(getattr(node, name).dtype)
                                               for name in in_state})

    def leaf_masks(params: PyTree) -> list:
        """Each tensor's own weight-decay mask ([True]/[False]), or None without a mask."""
        count = len(tree_leaves(params))
        if not masked:
            return [None] * count
        return [[on] for on in mask_leaves(hyperparams["weight_decay_mask"], params,
                                           "weight_decay_mask")]

    def leaf_values(values: dict, i: int) -> dict:
        """The hyperparameters of tensor i: its own λ for per-tensor/element names."""
        return {name: tree_leaves(value)[i] if grains[name] != "global" else value
                for name, value in values.items()}

    def init(params: PyTree) -> HyperdescentState:
        leaf = first_leaf(params)
        dtype = accumulation_dtype(params)
        leaves, spec = tree_flatten(params)

        def rates(name: str, value: Any) -> PyTree:
            if grains[name] == "global":
                return as_rate(value, leaf, dtype, name)
            per_tensor = [as_rate(value, p, accumulation_dtype(p), name) for p in leaves]
            if grains[name] == "element":
                per_tensor = [r * p.new_ones(p.shape, dtype=r.dtype)
                              for r, p in zip(per_tensor, leaves)]
            return tree_unflatten(per_tensor, spec)

        values = {name: rates(name, initial[name]) for name in names}
        if per_leaf:
            masks = leaf_masks(params)
            base = tuple(with_state_held(build(leaf_values(values, i), masks[i]).init([p]),
                                         leaf_values(values, i))
                         for i, p in enumerate(leaves))
            nodes = [find_lr_state(s) for s in base]
        else:
            base = build(values).init(params)
            nodes = [find_lr_state(base)]
        if "lr" in names and not all(isinstance(node, LRState) for node in nodes):
            raise ValueError("adapting 'lr' needs a rule with a fixed rate in its state "
                             "(hdfunc.LRState); this rule's rate is scheduled or already adapted")
        node = nodes[0]
        if "hypergrad_lr" in names and not isinstance(node, HDState):
            raise ValueError("adapting 'hypergrad_lr' needs an HD rule (its state holds an "
                             "hdfunc.HDState)")
        if "hypergrad_lr" in names and tree_leaves(node.lr_sensitivity):
            raise ValueError("adapting 'hypergrad_lr' of an HD rule that already adapts it "
                             "(hyper_hypergrad_lr is set): choose one of the two")
        if not per_leaf:
            base = with_state_held(base, values)
        return HyperdescentState(
            count=leaf.new_zeros((), dtype=torch.int64),
            hyperparams=values,
            hypergrad_lr={name: as_rate(hypergrad_lr[name], leaf, dtype, "hypergrad_lr")
                          for name in names},
            tangents={name: tree_zeros_like(params) for name in names},
            hypergrad={name: tree_zeros_like(values[name]) for name in names},
            base=base,
            skipped=leaf.new_zeros((), dtype=torch.int64),
        )

    def penalised(grads: PyTree, values: dict, params: PyTree) -> PyTree:
        """∇ of the objective the rule descends at θ_{t-1}: g_t, plus λ_wd θ_{t-1} (masked) with
        a coupled L2 term (the rule's own add_l2, at λ_wd's value of step t-1)."""
        if decay is None:
            return grads
        wd = values["weight_decay"] if "weight_decay" in values else decay
        mask = hyperparams.get("weight_decay_mask")
        if "weight_decay" not in values or grains["weight_decay"] == "global":
            return add_l2(wd, mask).update(grads, EmptyState(), params)[0]
        g_leaves, spec = tree_flatten(grads)
        masks = leaf_masks(params)
        return tree_unflatten([add_l2(w, m).update([g], EmptyState(), [p])[0][0]
                               for g, w, p, m in zip(g_leaves, tree_leaves(wd),
                                                     tree_leaves(params), masks)], spec)

    def update(grads: PyTree, state: HyperdescentState,
               params: Optional[PyTree] = None) -> tuple[PyTree, HyperdescentState]:
        g_leaves, spec = tree_flatten(grads)
        reference = grads if params is None else params
        objective = tree_leaves(penalised(grads, state.hyperparams, reference))
        new_values, hypergrads = {}, {}
        kept = torch.zeros((), dtype=torch.bool, device=g_leaves[0].device)
        for name in names:
            lam = tree_leaves(state.hyperparams[name])
            dtypes = [x.dtype for x in lam]
            beta = state.hypergrad_lr[name]
            grain = grains[name]
            tangent = tree_leaves(state.tangents[name])
            # h_λ,t = g_t · ∂u_{t-1}/∂λ at λ's granularity (g_t: the penalised gradient)
            h = _products(objective, tangent, grain, dtypes)
            if mode == "additive":
                new = [a - beta.to(a.dtype) * x for a, x in zip(lam, h)]
            else:
                grad_sq = _products(objective, objective, grain, dtypes)
                tangent_sq = _products(tangent, tangent, grain, dtypes)
                factor = _multiplicative_factor([beta.to(a.dtype) for a in lam], h, grad_sq,
                                                tangent_sq)
                new = [a * f for a, f in zip(lam, factor)]
            ok = [torch.isfinite(x) & torch.isfinite(a) for x, a in zip(h, new)]
            low, high = limits[name]
            if low is not None or high is not None:
                new = [torch.clamp(a, min=low, max=high) for a in new]
            if skip_nonfinite:
                new = [torch.where(o, a, a_old) for o, a, a_old in zip(ok, new, lam)]
            for o in ok:
                kept = kept | ~o.all()
            if grain == "global":
                new_values[name], hypergrads[name] = new[0], h[0]
            else:
                new_values[name] = tree_unflatten(new, spec)
                hypergrads[name] = tree_unflatten(h, spec)

        if per_leaf:
            p_leaves = tree_leaves(reference)
            masks = leaf_masks(reference)

            def step(*values: Any) -> tuple[list, tuple]:
                current = dict(zip(names, values))
                steps, states = [], []
                for i, (g, p, base) in enumerate(zip(g_leaves, p_leaves, state.base)):
                    mine = leaf_values(current, i)
                    u, s = rule_at(mine, masks[i])([g], with_state_held(base, mine), [p])
                    steps.append(u[0])
                    states.append(s)
                return steps, tuple(states)

            primals = tuple(tuple(tree_leaves(new_values[name])) if grains[name] != "global"
                            else new_values[name] for name in names)
        else:
            def step(*values: torch.Tensor) -> tuple[PyTree, PyTree]:
                current = dict(zip(names, values))
                return rule_at(current)(grads, with_state_held(state.base, current), reference)

            primals = tuple(new_values[name] for name in names)

        ones = tree_map(torch.ones_like, primals)
        if len(names) == 1:
            updates, tangent, base = jvp(step, primals, ones, has_aux=True)
            tangent = (tangent,)
        else:
            # all tangents in one forward pass, batched by vmap over the basis of the names (one
            # tangent of ones per name; jacfwd for global λ): the primal step is computed once
            # (returned in the aux, unbatched). (One jvp per name, the others held as plain
            # tensors, measured no faster in eager mode: it repeats the primal step.)
            k = len(names)

            def push(basis: tuple) -> tuple:
                out, tan, aux = jvp(step, primals, basis, has_aux=True)
                return tan, (out, aux)

            basis = tuple(tree_map(lambda x, j=j: _basis_row(x, j, k), ones[j]) for j in range(k))
            batched, (updates, base) = vmap(push)(basis)
            updates, base = tree_map(lambda x: x[0], (updates, base))
            tangent = tuple(tree_map(lambda x, j=j: x[j], batched) for j in range(k))
        if per_leaf:
            updates = tree_unflatten(updates, spec)
            tangent = tuple(tree_unflatten(t, spec) for t in tangent)
        new_state = HyperdescentState(
            count=state.count + 1,
            hyperparams=new_values,
            hypergrad_lr=state.hypergrad_lr,
            tangents=dict(zip(names, tangent)),
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
        "granularity": grains, "coupled_weight_decay": decay is not None,
        "skip_nonfinite": skip_nonfinite, **hyperparams})


def _basis_row(ones: torch.Tensor, j: int, k: int) -> torch.Tensor:
    """(k, *shape): ones in row j, zeros elsewhere (a broadcast view, not k copies)."""
    row = torch.zeros(k, dtype=ones.dtype, device=ones.device)
    row[j] = 1
    return row.reshape(k, *([1] * ones.dim())).expand(k, *ones.shape)


def _granularities(granularity: Any, names: tuple) -> dict:
    """{name: granularity} from a string or a dict (names left out: global), checked."""
    if isinstance(granularity, str):
        grains = {name: granularity for name in names}
    elif isinstance(granularity, dict):
        unknown = set(granularity) - set(names)
        if unknown:
            raise ValueError(f"granularity for hyperparameters that are not adapted: "
                             f"{sorted(unknown)}")
        grains = {name: granularity.get(name, "global") for name in names}
    else:
        raise TypeError("granularity must be 'global', 'tensor', 'element' or a dict "
                        f"{{name: granularity}}, got {granularity!r}")
    for name, grain in grains.items():
        if grain not in GRANULARITIES:
            raise ValueError(f"granularity of {name!r} must be one of {GRANULARITIES}, "
                             f"got {grain!r}")
        if grain == "element" and name != "lr":
            raise ValueError(f"granularity 'element' is for 'lr' only (held in the rule's "
                             f"state); {name!r} is passed to the factory, whose hyperparameters "
                             "are 0-d: use 'tensor' or 'global'")
        if grain != "global" and name == "hypergrad_lr":
            raise ValueError("'hypergrad_lr' (an HD rule's β) is adapted globally only")
    return grains


def _coupled_decay(factory: Callable, coupled: Optional[bool], hyperparams: dict,
                   defaults: dict, names: tuple) -> Any:
    """The coupled L2 coefficient the hypergradient's objective includes (its starting value,
    replaced by the adapted one when ``weight_decay`` is adapted), or None without one."""
    if coupled is None:
        accepted = _factory_parameters(factory)
        coupled = ("weight_decay" in accepted and "decoupled_weight_decay" in accepted
                   and not hyperparams.get("decoupled_weight_decay",
                                           defaults.get("decoupled_weight_decay", False)))
    elif not isinstance(coupled, bool):
        raise TypeError(f"coupled_weight_decay must be None, True or False, got {coupled!r}")
    if not coupled:
        return None
    if "weight_decay" in hyperparams:
        value = hyperparams["weight_decay"]
    elif "weight_decay" in defaults:
        value = defaults["weight_decay"]
    else:
        raise ValueError("coupled_weight_decay=True needs a weight_decay (pass weight_decay=...)")
    active = ("weight_decay" in names or isinstance(value, torch.Tensor)
              or float(value) != 0.0)
    return value if active else None


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

