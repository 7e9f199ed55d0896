"""Reliability of the functional core (issue 9, parts 2-4).

* Low precision: HD keeps adapting α in float16 and bfloat16 (the hypergradient, the recomputed
  d_{t-1} and the rates are computed in at least float32), with no skipped step.
* Validation: rates, β, κ, α_∞ and lr_bounds must be finite, errors name the argument and the
  rule; the non-finite guard covers the new α and β, not only h_t.
* ``apply_updates`` checks the tree structure and the shapes of the updates.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.func import grad, vmap

import hdfunc
from hdfunc.tree import tree_leaves, tree_map, tree_stack
from helpers import make_problem, run

INF, NAN = float("inf"), float("nan")
LOW_PRECISION = [torch.float16, torch.bfloat16]


# ----------------------------------------------------------------------------- low precision

DEAD_UNITS = 4  # hidden units whose bias keeps them off on every sample: exactly zero gradients


def relu_net(dtype: torch.dtype, compute_dtype: torch.dtype | None = None, seed: int = 0):
    """A 6-32-1 ReLU regression net and its data, rounded to ``dtype`` and trained in
    ``compute_dtype`` (default ``dtype``): the float32 reference of a float16 run starts from the
    very same rounded values, so the two differ only by their arithmetic.

    Some hidden units are dead on every sample (their Adam moments stay exactly 0: d = 0/0 with
    an ε that underflows) and one input feature is tiny (the gradients g of its weights have
    (1-β2) g² below half of float16's smallest subnormal 2^-24: v would round to 0 if kept in
    float16, and m/(√v + ε) with ε rounded to 0 would be inf)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 6, generator=gen)
    x[:, -1] *= 1e-3
    y = torch.tanh(x[:, :3].sum(1, keepdim=True)) + 0.1 * torch.randn(256, 1, generator=gen)
    bias = torch.zeros(32)
    bias[:DEAD_UNITS] = -50.0
    params = {"hidden": {"weight": torch.randn(6, 32, generator=gen) / math.sqrt(6), "bias": bias},
              "out": {"weight": torch.randn(32, 1, generator=gen) / math.sqrt(32),
                      "bias": torch.zeros(1)}}
    compute_dtype = compute_dtype or dtype
    params, x, y = tree_map(lambda t: t.to(dtype).to(compute_dtype), (params, x, y))

    def loss(p):
        hidden = torch.relu(x @ p["hidden"]["weight"] + p["hidden"]["bias"])
        return ((hidden @ p["out"]["weight"] + p["out"]["bias"] - y) ** 2).mean()

    return params, loss


HD_RULES_LOW_PRECISION = {
    # α_0 and β chosen so that α moves by 35-300 % of α_0 in STEPS steps (seeds 0-4): the
    # comparison with float32 is about a real adaptation. α_0 = 5e-3 for Adam keeps its steps
    # (≈ α_0 per entry) above bfloat16's spacing near |θ| ≈ 0.3 (2^-9 ≈ 2e-3).
    "adam_hd": lambda: hdfunc.adam_hd(5e-3, 2e-5),
    "sgd_hd": lambda: hdfunc.sgd_hd(0.02, 2e-3),
}
STEPS = 100
SEEDS = [0, 1, 2]
# Largest |α_t(low) - α_t(float32)| over the run, relative to the float32 run's largest
# adaptation max_t |α_t - α_0|. h_t and α are float32 in both runs; what differs is that every
# step rounds θ_t to the parameter dtype (relative error up to 2^-11 in float16, 2^-8 in
# bfloat16) and the gradients are computed in that dtype, so the trajectories drift apart like a
# random walk of those roundings. Measured over seeds 0-4: float16 ≤ 0.15 % (Adam-HD) and
# ≤ 0.13 % (SGD-HD); bfloat16 ≤ 1.7 % and ≤ 1.8 %. The bounds leave a margin of ~5x.
ALPHA_TOLERANCE = {torch.float16: 0.01, torch.bfloat16: 0.08}
MIN_ADAPTATION = 0.3  # of α_0, in the float32 run


def alpha_trajectory(rule: hdfunc.Rule, params, loss, steps: int = STEPS):
    state = rule.init(params)
    alphas, finite = [], True
    for _ in range(steps):
        updates, state = rule.update(grad(loss)(params), state, params)
        params = hdfunc.apply_updates(params, updates)
        alphas.append(hdfunc.get_lr(state))
        finite = finite and all(bool(torch.isfinite(p).all()) for p in tree_leaves(params))
    return torch.stack(alphas).double(), hdfunc.find_lr_state(state), params, finite


def test_the_net_has_dead_units_and_gradients_whose_square_underflows_in_float16():
    params, loss = relu_net(torch.float32)
    g = grad(loss)(params)
    assert torch.equal(g["hidden"]["bias"][:DEAD_UNITS], torch.zeros(DEAD_UNITS))
    tiny = g["hidden"]["weight"][-1, DEAD_UNITS:].abs()
    assert ((1 - 0.999) * tiny ** 2 < 2.0 ** -25).any() and (tiny > 0).all()


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("name", sorted(HD_RULES_LOW_PRECISION))
def test_hd_adapts_alpha_in_low_precision_like_float32(name, dtype, seed):
    rule = HD_RULES_LOW_PRECISION[name]()
    alpha32, node32, _, finite32 = alpha_trajectory(rule, *relu_net(dtype, torch.float32, seed))
    alpha, node, params, finite = alpha_trajectory(rule, *relu_net(dtype, seed=seed))
    assert finite32 and finite, "parameters stay finite"
    assert int(node32.skipped) == 0 and int(node.skipped) == 0, "no step is skipped"
    assert node.lr.dtype == torch.float32 and node.hypergrad.dtype == torch.float32
    assert all(p.dtype == dtype for p in tree_leaves(params))
    alpha0 = alpha32.new_tensor(float(rule.hyperparams["lr"]))
    adaptation = (alpha32 - alpha0).abs().max()
    assert adaptation > MIN_ADAPTATION * alpha0, "α really adapts in float32"
    worst = (alpha - alpha32).abs().max() / adaptation
    assert worst <= ALPHA_TOLERANCE[dtype], f"α drifts from float32 by {worst:.2%}"


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_the_first_adam_hd_hypergradient_is_zero_not_nan(dtype):
    """h_1 = -g_1 · d_0 with d_0 = m̂_0/(√v̂_0 + ε) = 0/(0 + 1e-8): 0/0 if ε is rounded to the
    parameter dtype (1e-8 is 0 in float16)."""
    params, loss = relu_net(dtype)
    rule = hdfunc.adam_hd(1e-3, 1e-7)
    _, state = rule.update(grad(loss)(params), rule.init(params), params)
    node = hdfunc.find_lr_state(state)
    assert float(node.hypergrad) == 0.0 and int(node.skipped) == 0


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("base,hd", [(lambda: hdfunc.adam(1e-3), lambda: hdfunc.adam_hd(1e-3, 0.0)),
                                     (lambda: hdfunc.adamw(1e-3),
                                      lambda: hdfunc.adamw_hd(1e-3, 0.0))],
                         ids=["adam", "adamw"])
def test_low_precision_adam_steps_are_finite_and_hd_at_zero_beta_is_the_base(dtype, base, hd):
    """The base step itself: torch.optim.Adam's for-loop and foreach kernels round ε = 1e-8 to 0
    in float16 and give NaN/inf parameters here; the fused kernel (and hdfunc) compute the
    direction in float32. β = 0 still gives the base rule's updates bit for bit."""
    params, loss = relu_net(dtype)
    history_base = run(base(), params, loss, 20)
    history_hd = run(hd(), params, loss, 20)
    for (pb, _), (ph, _) in zip(history_base, history_hd):
        for x, y in zip(tree_leaves(pb), tree_leaves(ph)):
            assert torch.equal(x, y)
    final = history_base[-1][0]
    assert all(bool(torch.isfinite(p).all()) and p.dtype == dtype for p in tree_leaves(final))
    assert float(loss(final)) < float(loss(params))


STATE_DTYPE_RULES = {
    "adam_hd": lambda: hdfunc.adam_hd(1e-3, 1e-7),
    "adamw_hd": lambda: hdfunc.adamw_hd(1e-3, 1e-7),  # stores d_t = m̂/(√v̂+ε) + λθ
    "sgdn_hd": lambda: hdfunc.sgdn_hd(1e-2, 1e-3),
    "rmsprop_hd": lambda: hdfunc.hd_rule(hdfunc.scale_by_rms(), 1e-3, 1e-7),
    "adagrad_hd": lambda: hdfunc.hd_rule(hdfunc.scale_by_adagrad(), 1e-2, 1e-5,
                                         lr_granularity="element"),
}


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("name", sorted(STATE_DTYPE_RULES))
def test_low_precision_states_keep_their_dtypes_and_updates_have_the_params_dtype(name, dtype):
    """Moments are float32 (the accumulation dtype) from init on; a stored d_{t-1} keeps the
    params' dtype; so the state's dtypes do not change from step to step (no recompilation, a
    stackable state) and h_t stays finite."""
    params, loss = relu_net(dtype)
    rule = STATE_DTYPE_RULES[name]()
    state = rule.init(params)
    dtypes = [x.dtype for x in tree_leaves(state)]
    for _ in range(3):
        updates, state = rule.update(grad(loss)(params), state, params)
        assert [x.dtype for x in tree_leaves(state)] == dtypes
        assert [u.dtype for u in tree_leaves(updates)] == [dtype] * 4
        params = hdfunc.apply_updates(params, updates)
    node = hdfunc.find_lr_state(state)
    assert int(node.skipped) == 0
    assert all(bool(torch.isfinite(p).all()) for p in tree_leaves(params))


def test_float32_adam_still_follows_torch_optim_adam():
    """Directions are computed in float32 only for narrower params: float32 keeps its arithmetic."""
    params, loss = relu_net(torch.float32)
    history = run(hdfunc.adam(1e-2), params, loss, 5)
    leaves = [p.clone().requires_grad_() for p in tree_leaves(params)]
    spec = torch.utils._pytree.tree_structure(params)
    opt = torch.optim.Adam(leaves, lr=1e-2, foreach=False)
    for p_ours, _ in history:
        opt.zero_grad()
        loss(torch.utils._pytree.tree_unflatten(leaves, spec)).backward()
        opt.step()
        for x, y in zip(tree_leaves(p_ours), leaves):
            torch.testing.assert_close(x, y.detach(), rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- validation

# every factory of hdfunc.rules: the named rules and the generic ones (over RMSprop's direction)
BASE_RULES = ["sgd", "sgdn", "adam", "adamw", "base_rule"]
HD_RULES = ["sgd_hd", "sgdn_hd", "adam_hd", "adamw_hd", "hd_rule"]
GENERIC = {"base_rule": lambda **kw: hdfunc.base_rule(hdfunc.scale_by_rms(), **kw),
           "hd_rule": lambda **kw: hdfunc.hd_rule(hdfunc.scale_by_rms(), **kw)}


def build(name: str, **overrides):
    kwargs = {"lr": 0.01}
    if name in HD_RULES:
        kwargs["hypergrad_lr"] = 1e-3
    factory = GENERIC.get(name) or hdfunc.RULES[name]
    return factory(**{**kwargs, **overrides})


BAD_RATES = [(INF, ValueError, "must be finite"), (-INF, ValueError, "must be finite"),
             (NAN, ValueError, "must lie in"), (-1.0, ValueError, "must lie in")]
BAD_RATE_IDS = ["inf", "-inf", "nan", "negative"]


@pytest.mark.parametrize("value,error,match", BAD_RATES, ids=BAD_RATE_IDS)
@pytest.mark.parametrize("argument", ["lr", "weight_decay"])
@pytest.mark.parametrize("name", BASE_RULES + HD_RULES)
def test_bad_lr_and_weight_decay_are_rejected_naming_the_rule(name, argument, value, error,
                                                              match):
    with pytest.raises(error, match=rf"^{name}: {argument} {match}"):
        build(name, **{argument: value})


@pytest.mark.parametrize("value,error,match", BAD_RATES, ids=BAD_RATE_IDS)
@pytest.mark.parametrize("argument", ["hypergrad_lr", "hyper_hypergrad_lr", "final_lr"])
@pytest.mark.parametrize("name", HD_RULES)
def test_bad_hd_rates_are_rejected_naming_the_rule(name, argument, value, error, match):
    with pytest.raises(error, match=rf"^{name}: {argument} {match}"):
        build(name, **{argument: value})


BAD_BOUNDS = [
    (5, TypeError, "lr_bounds must be None or a pair"),
    ("ab", TypeError, "lr_bounds must be None or a pair"),
    ((0.1,), TypeError, "lr_bounds must be None or a pair"),
    ((0.1, 0.2, 0.3), TypeError, "lr_bounds must be None or a pair"),
    (("a", None), TypeError, r"lr_bounds\[0\] must be None or a real number"),
    ((None, True), TypeError, r"lr_bounds\[1\] must be None or a real number"),
    ((None, torch.tensor(1.0)), TypeError, r"lr_bounds\[1\] must be None or a real number"),
    ((NAN, None), ValueError, r"lr_bounds\[0\] must be finite"),
    ((None, NAN), ValueError, r"lr_bounds\[1\] must be finite"),
    ((-INF, None), ValueError, r"lr_bounds\[0\] must be finite"),
    ((None, INF), ValueError, r"lr_bounds\[1\] must be finite"),
    ((0.2, 0.1), ValueError, r"lr_bounds must have low <= high"),
]


@pytest.mark.parametrize("bounds,error,match", BAD_BOUNDS,
                         ids=["int", "str", "one", "three", "str-low", "bool-high", "tensor-high",
                              "nan-low", "nan-high", "-inf-low", "inf-high", "low>high"])
@pytest.mark.parametrize("name", HD_RULES)
def test_bad_lr_bounds_are_rejected_naming_the_rule(name, bounds, error, match):
    with pytest.raises(error, match=rf"^{name}: {match}"):
        build(name, lr_bounds=bounds)


@pytest.mark.parametrize("bounds,expected", [
    (None, (None, None)), ((None, None), (None, None)), ((0, None), (0.0, None)),
    ((None, 1), (None, 1.0)), ((-1.0, 1.0), (-1.0, 1.0)), ([0.01, 0.1], (0.01, 0.1)),
    ((0.05, 0.05), (0.05, 0.05))])
def test_good_lr_bounds_are_accepted(bounds, expected):
    law = build("sgd_hd", lr_bounds=bounds).rate_law
    assert (law.lr_low, law.lr_high) == expected


def test_generic_factories_name_themselves_and_wrappers_name_the_outermost_rule():
    with pytest.raises(ValueError, match=r"^hd_rule: hypergrad_lr must be finite"):
        hdfunc.hd_rule(hdfunc.scale_by_rms(), 0.01, INF)
    with pytest.raises(ValueError, match=r"^base_rule: lr must lie in"):
        hdfunc.base_rule(hdfunc.scale_by_rms(), -0.01)
    with pytest.raises(ValueError, match=r"^adamw_hd: lr must be finite"):
        hdfunc.adamw_hd(INF, 1e-7)  # built by adam_hd, named after the rule called


@pytest.mark.parametrize("argument", ["lr", "hypergrad_lr", "final_lr"])
def test_a_rate_that_overflows_the_rate_dtype_is_rejected_at_init(argument):
    rule = build("sgd_hd", **{argument: 1e39})  # finite as a Python float, inf in float32
    params32 = {"w": torch.ones(3)}
    with pytest.raises(ValueError, match=rf"{argument}=1e\+39 overflows the torch.float32 rates"):
        rule.init(params32)
    rule.init({"w": torch.ones(3, dtype=torch.float64)})  # fine in float64


def test_tensor_rates_are_not_inspected_but_the_guard_counts_their_steps():
    """A tensor rate may be traced (vmap over a grid, grad with respect to α_0): its value is
    not read at construction; a non-finite one is caught by the rate update's guard."""
    params, loss = make_problem()
    rule = hdfunc.sgd_hd(0.01, torch.tensor(INF, dtype=torch.float64))
    history = run(rule, params, loss, 3)
    node = hdfunc.find_lr_state(history[-1][1])
    assert float(node.lr) == 0.01 and int(node.skipped) == 3


# ----------------------------------------------------------------------------- the guard


def quadratic():
    """f(w) = ½‖w‖², g = w: h_2 = -g_2·g_1 ≈ -24.5, so β h_2 overflows float64 for β = 1e308."""
    params = {"w": torch.tensor([3.0, 4.0], dtype=torch.float64)}
    return params, lambda p: 0.5 * (p["w"] ** 2).sum()


def test_an_overflowing_rate_update_is_skipped_and_counted():
    params, loss = quadratic()
    history = run(hdfunc.sgd_hd(0.01, 1e308), params, loss, 3)
    for _, state in history:
        node = hdfunc.find_lr_state(state)
        assert float(node.lr) == 0.01 and torch.isfinite(node.hypergrad)
    assert [int(hdfunc.find_lr_state(s).skipped) for _, s in history] == [0, 1, 2]
    unguarded = run(hdfunc.sgd_hd(0.01, 1e308, skip_nonfinite=False), params, loss, 2)
    assert not torch.isfinite(hdfunc.get_lr(unguarded[-1][1]))


def test_an_overflowing_bound_clamp_does_not_hide_the_overflow():
    params, loss = quadratic()
    history = run(hdfunc.sgd_hd(0.01, 1e308, lr_bounds=(0.0, 0.1)), params, loss, 2)
    node = hdfunc.find_lr_state(history[-1][1])
    assert float(node.lr) == 0.01 and int(node.skipped) == 1


def test_an_overflowing_higher_order_update_keeps_beta_and_is_counted():
    params, loss = quadratic()
    history = run(hdfunc.sgd_hd(0.01, 1e-3, hyper_hypergrad_lr=1e308), params, loss, 4)
    betas = [float(hdfunc.find_lr_state(s).hypergrad_lr) for _, s in history]
    assert betas == [1e-3] * 4  # ∂f/∂β = 0 at steps 1-2, κ ∂f/∂β overflows at steps 3-4
    for _, state in history:
        assert torch.isfinite(hdfunc.get_lr(state))
    assert int(hdfunc.find_lr_state(history[-1][1]).skipped) == 2


@pytest.mark.parametrize("granularity", ["global", "tensor", "element"])
def test_skipped_counts_steps_not_tensors(granularity):
    params, loss = make_problem()  # four tensors
    rule = hdfunc.sgd_hd(0.1, 0.01, lr_granularity=granularity)
    _, state = run(rule, params, loss, 2)[-1]
    bad = tree_map(lambda p: torch.full_like(p, INF), params)
    _, state = rule.update(bad, state, params)
    assert int(hdfunc.find_lr_state(state).skipped) == 1


def test_the_guard_is_vmap_safe():
    params, loss = quadratic()
    rules = [hdfunc.sgd_hd(0.01, beta) for beta in (1e-3, 1e308)]
    rule = rules[0]
    states = tree_stack([r.init(params) for r in rules])
    batched = tree_stack([params, params])
    for _ in range(3):
        grads = vmap(grad(loss))(batched)
        updates, states = vmap(rule.update)(grads, states, batched)
        batched = vmap(hdfunc.apply_updates)(batched, updates)
    node = hdfunc.find_lr_state(states)
    assert node.skipped.tolist() == [0, 2]
    assert float(node.lr[1]) == 0.01 and float(node.lr[0]) != 0.01


# ----------------------------------------------------------------------------- apply_updates


def test_apply_updates_refuses_a_wrong_shape_naming_the_leaf():
    with pytest.raises(ValueError, match=r"update shape \(1,\) != param shape \(3,\) at w"):
        hdfunc.apply_updates({"w": torch.ones(3)}, {"w": torch.ones(1)})
    params = {"hidden": {"weight": torch.ones(2, 3)}, "out": [torch.ones(3), torch.ones(())]}
    updates = {"hidden": {"weight": torch.ones(2, 3)}, "out": [torch.ones(3), torch.ones(1)]}
    with pytest.raises(ValueError, match=r"update shape \(1,\) != param shape \(\) at out\[1\]"):
        hdfunc.apply_updates(params, updates)


def test_apply_updates_refuses_a_different_structure_or_a_non_tensor():
    with pytest.raises(ValueError, match="updates and params have different tree structures"):
        hdfunc.apply_updates({"w": torch.ones(3)}, {"v": torch.ones(3)})
    with pytest.raises(ValueError, match="updates and params have different tree structures"):
        hdfunc.apply_updates({"w": torch.ones(3)}, [torch.ones(3)])
    with pytest.raises(TypeError, match="update at w is a float, not a tensor"):
        hdfunc.apply_updates({"w": torch.ones(3)}, {"w": 1.0})


def test_apply_updates_keeps_working_for_good_input():
    params = {"a": torch.ones(2, dtype=torch.float16), "b": torch.zeros(3)}
    out = hdfunc.apply_updates(params, {"b": torch.ones(3), "a": torch.ones(2)})  # key order
    assert out["a"].dtype == torch.float16 and out["a"].tolist() == [2.0, 2.0]
    assert out["b"].tolist() == [1.0, 1.0, 1.0]


def test_apply_updates_under_vmap_checks_per_example_shapes():
    params = {"w": torch.ones(4, 3)}
    out = vmap(hdfunc.apply_updates)(params, {"w": torch.ones(4, 3)})
    assert out["w"].shape == (4, 3)
    shared = vmap(hdfunc.apply_updates, in_dims=(None, 0))({"w": torch.ones(3)},
                                                           {"w": torch.ones(4, 3)})
    assert shared["w"].shape == (4, 3)
    with pytest.raises(ValueError, match=r"update shape \(1,\) != param shape \(3,\) at w"):
        vmap(hdfunc.apply_updates)(params, {"w": torch.ones(4, 1)})


def test_apply_updates_compiles_without_graph_breaks():
    compiled = torch.compile(hdfunc.apply_updates, backend="eager", fullgraph=True)
    out = compiled({"w": torch.ones(3)}, {"w": torch.full((3,), 2.0)})
    assert out["w"].tolist() == [3.0, 3.0, 3.0]
