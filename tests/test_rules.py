"""The functional rules against independent oracles: torch.optim, the literal algorithm boxes
(tests/reference.py), autodiff and finite differences."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import grad, jvp, vmap

import hdfunc
from hdfunc.tree import tree_flatten, tree_leaves, tree_map, tree_stack
from helpers import flat_grad_fn, make_problem, run
from reference import run_reference

F64 = torch.float64


def assert_trees_close(a, b, rtol=1e-10, atol=1e-12):
    for x, y in zip(tree_leaves(a), tree_leaves(b), strict=True):
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------- torch.optim

def _registered_case(info: hdfunc.RuleInfo, lr: float, **hyperparams):
    """(HD rule with every hypergradient rate 0, its base twin, the base's torch.optim twin)
    from the registry."""
    base = hdfunc.rule_info(info.base)
    hyperparams = {k: v for k, v in hyperparams.items() if k not in info.extra_rates}
    zero_rates = {k: 0.0 for k in info.extra_rates}
    return (lambda: info.factory(lr, 0.0, **zero_rates, **hyperparams),
            lambda: base.factory(lr, **hyperparams),
            lambda ps: base.torch_twin(ps, lr=lr, **hyperparams))


# name: (functional rule at β = 0, the same HD rule's base, torch.optim twin): every HD rule of
# the registry with the hyperparameters of its entry's example (and without them), plus rules
# composed with hd_rule from directions that torch.optim also has
TORCH_OPTIM_CASES = {
    **{info.name: _registered_case(info, 0.01 if "betas" in info.example else 0.05,
                                   **info.example)
       for info in hdfunc.REGISTRY.values() if info.is_hd},
    **{f"{info.name}_defaults": _registered_case(info, 0.1, **{k: 0.0 for k in info.extra_rates})
       for info in hdfunc.REGISTRY.values() if info.is_hd},
    "rmsprop": (lambda: hdfunc.hd_rule(hdfunc.scale_by_rms(0.9, 1e-8), 0.01, 0.0),
                lambda: hdfunc.base_rule(hdfunc.scale_by_rms(0.9, 1e-8), 0.01),
                lambda ps: torch.optim.RMSprop(ps, lr=0.01, alpha=0.9, eps=1e-8)),
    "adagrad": (lambda: hdfunc.hd_rule(hdfunc.scale_by_adagrad(1e-10), 0.1, 0.0),
                lambda: hdfunc.base_rule(hdfunc.scale_by_adagrad(1e-10), 0.1),
                lambda ps: torch.optim.Adagrad(ps, lr=0.1, eps=1e-10)),
}


def test_the_registry_pairs_every_rule():
    """Every HD rule has a registered base twin with a torch.optim twin and an optimizer class
    of that name in hdfunc.optim; every rule is exported from hdfunc under its name."""
    for name, info in hdfunc.REGISTRY.items():
        assert getattr(hdfunc, name) is info.factory and hdfunc.RULES[name] is info.factory
        if info.is_hd:
            base = hdfunc.rule_info(info.base)
            assert not base.is_hd and base.torch_twin is not None
            assert info.paper_hypergrad_lr is not None
            assert len(info.extra_rates) == len(info.adapts) - 1
        if info.adapts == ("lr",):  # the paper's HD rules: a class each, the base's HD variant
            assert hdfunc.HD_VARIANTS[info.base] == name
            assert info.optimizer_class().__name__ == info.optimizer
    with pytest.raises(ValueError, match="unknown rule 'adamm'; choose one of sgd, sgd_hd"):
        hdfunc.rule_info("adamm")


@pytest.mark.parametrize("case", sorted(TORCH_OPTIM_CASES))
def test_rules_at_zero_hypergrad_lr_match_torch_optim(case):
    make_hd, make_base, make_torch = TORCH_OPTIM_CASES[case]
    params, loss = make_problem()
    leaves, spec = tree_flatten(params)
    torch_params = [p.clone().requires_grad_() for p in leaves]
    optimizer = make_torch(torch_params)
    hd_history = run(make_hd(), params, loss, 40)
    base_history = run(make_base(), params, loss, 40)
    for (hd_params, _), (base_params, _) in zip(hd_history, base_history):
        optimizer.zero_grad()
        loss(tree_flatten_like(torch_params, spec)).backward()
        optimizer.step()
        assert_trees_close(hd_params, base_params, rtol=0, atol=0)  # HD at β=0 is bitwise its base
        assert_trees_close(hd_params, [p.detach() for p in torch_params])


def tree_flatten_like(leaves, spec):
    from hdfunc.tree import tree_unflatten

    return tree_unflatten(leaves, spec)


# ----------------------------------------------------------------------------- the algorithm boxes

REFERENCE_CASES = [
    # (base, rule factory of (β, variant options), reference options, additive β)
    ("sgd", lambda beta, **o: hdfunc.sgd_hd(0.02, beta, weight_decay=0.01, **o),
     dict(lr=0.02, weight_decay=0.01), 0.01),
    ("sgdn", lambda beta, **o: hdfunc.sgdn_hd(0.01, beta, momentum=0.9, **o),
     dict(lr=0.01, momentum=0.9), 0.003),
    ("adam", lambda beta, **o: hdfunc.adam_hd(0.01, beta, weight_decay=1e-3, **o),
     dict(lr=0.01, weight_decay=1e-3), 1e-4),
]
VARIANTS = [
    dict(),
    dict(lr_granularity="tensor"),
    dict(lr_granularity="element"),
    dict(mode="multiplicative"),
    dict(mode="multiplicative", lr_granularity="tensor"),
    dict(mode="multiplicative", lr_granularity="element"),
    dict(final_lr=0.005),
    dict(hyper_hypergrad_lr=1e-5),
    dict(hyper_hypergrad_lr=1e-5, final_lr=0.005, lr_granularity="element"),
]


@pytest.mark.parametrize("base,make_rule,options,beta", REFERENCE_CASES,
                         ids=[c[0] for c in REFERENCE_CASES])
@pytest.mark.parametrize("variant", VARIANTS,
                         ids=lambda v: ",".join(f"{k}={x}" for k, x in v.items()) or "plain")
def test_hd_rules_follow_the_algorithm_boxes(base, make_rule, options, beta, variant):
    if variant.get("mode") == "multiplicative":
        beta = 0.02  # β' of Eqs. 7-8 is a relative step; the paper uses 0.02
    params, loss = make_problem(seed=1)
    history = run(make_rule(beta, **variant), params, loss, 30)
    ref_theta, ref_alpha = run_reference(
        base, flat_grad_fn(loss, params), tree_flatten(params)[0], 30, beta=beta,
        granularity=variant.get("lr_granularity", "global"), mode=variant.get("mode", "additive"),
        final_lr=variant.get("final_lr"), kappa=variant.get("hyper_hypergrad_lr"), **options)
    moved = 0.0
    for (p, state), theta, alpha in zip(history, ref_theta, ref_alpha):
        assert_trees_close(tree_flatten(p)[0], theta)
        lr = hdfunc.get_lr(state)
        expected = alpha[:1] if variant.get("lr_granularity", "global") == "global" else alpha
        assert_trees_close(tree_leaves(lr), expected)
        moved = max(moved, max((a - options["lr"]).abs().max().item() for a in expected))
    assert moved > 1e-3 * options["lr"]  # the rate really adapted: the comparison is not vacuous


def test_first_step_has_zero_hypergradient_and_keeps_lr():
    params, loss = make_problem()
    for rule in [hdfunc.sgd_hd(0.1, 1.0), hdfunc.sgdn_hd(0.1, 1.0), hdfunc.adam_hd(0.1, 1.0)]:
        (_, state), = run(rule, params, loss, 1)
        node = hdfunc.find_lr_state(state)
        assert node.hypergrad.item() == 0.0
        assert hdfunc.get_lr(state).item() == 0.1


def test_sgd_hd_second_step_by_hand():
    """α_2 = α_1 + β g_2·g_1 is computed *before* it is used: θ_2 = θ_1 - α_2 g_2 (Alg. 1)."""
    params, loss = make_problem()
    lr, beta = 0.1, 0.5
    g1 = grad(loss)(params)
    theta1 = tree_map(lambda p, g: p - lr * g, params, g1)
    g2 = grad(loss)(theta1)
    dot = sum((a * b).sum() for a, b in zip(tree_leaves(g2), tree_leaves(g1)))
    alpha2 = lr + beta * dot
    theta2 = tree_map(lambda p, g: p - alpha2 * g, theta1, g2)
    history = run(hdfunc.sgd_hd(lr, beta), params, loss, 2)
    assert_trees_close(history[1][0], theta2)
    torch.testing.assert_close(hdfunc.get_lr(history[1][1]), alpha2)
    torch.testing.assert_close(hdfunc.find_lr_state(history[1][1]).hypergrad, -dot)
    assert dot.abs() > 1e-3  # the check is not vacuous


@settings(max_examples=25, deadline=None, derandomize=True)
@given(base=st.sampled_from(["sgd", "sgdn", "adam"]), log_lr=st.floats(-5, -1),
       log_beta=st.floats(-6, -1), seed=st.integers(0, 10_000),
       granularity=st.sampled_from(["global", "tensor", "element"]))
def test_property_random_problems_follow_the_algorithm_boxes(base, log_lr, log_beta, seed, granularity):
    params, loss = make_problem(seed=seed)
    lr, beta = 10.0**log_lr, 10.0**log_beta
    factory = {"sgd": hdfunc.sgd_hd, "sgdn": hdfunc.sgdn_hd, "adam": hdfunc.adam_hd}[base]
    history = run(factory(lr, beta, lr_granularity=granularity), params, loss, 8)
    ref_theta, _ = run_reference(base, flat_grad_fn(loss, params), tree_flatten(params)[0], 8,
                                 lr=lr, beta=beta, granularity=granularity)
    assert_trees_close(tree_flatten(history[-1][0])[0], ref_theta[-1], rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------- transforms


def test_rules_never_mutate_their_inputs():
    params, loss = make_problem()
    for name, info in hdfunc.REGISTRY.items():
        rule = (info.factory(0.01, 0.01, **{k: 1e-3 for k in info.extra_rates}) if info.is_hd
                else info.factory(0.01))
        state = rule.init(params)
        for _ in range(2):  # a state that is not all zeros
            updates, state = rule.update(grad(loss)(params), state, params)
        grads = grad(loss)(params)
        before = copy.deepcopy((grads, state, params))
        versions = [t._version for t in tree_leaves((grads, state, params))]
        rule.update(grads, state, params)
        hdfunc.apply_updates(params, updates)
        assert_trees_close((grads, state, params), before, rtol=0, atol=0)
        assert versions == [t._version for t in tree_leaves((grads, state, params))], name


@pytest.mark.parametrize("make_rule", [
    lambda: hdfunc.sgd_hd(0.05, 0.01), lambda: hdfunc.sgdn_hd(0.02, 0.001),
    lambda: hdfunc.adam_hd(0.01, 1e-4, lr_granularity="tensor"),
    lambda: hdfunc.sgd_hd(0.05, 0.01, lr_granularity="element", mode="multiplicative",
                          final_lr=0.02, hyper_hypergrad_lr=1e-3),
], ids=["sgd_hd", "sgdn_hd", "adam_hd_tensor", "sgd_hd_all_variants"])
def test_vmap_over_seeds_equals_a_loop(make_rule):
    rule = make_rule()
    problems = [make_problem(seed=s) for s in range(4)]
    loss = problems[0][1]  # the data are the same for the loss; vary the initial params
    stacked = tree_stack([p for p, _ in problems])
    state = vmap(rule.init)(stacked)
    params = stacked

    def step(p, s):
        u, s = rule.update(grad(loss)(p), s, p)
        return hdfunc.apply_updates(p, u), s

    batched_step = vmap(step)
    for _ in range(6):
        params, state = batched_step(params, state)
    for k, (p0, _) in enumerate(problems):
        p_loop, s_loop = run(rule, p0, loss, 6)[-1]
        assert_trees_close(tree_map(lambda x: x[k], params), p_loop)
        assert_trees_close(tree_map(lambda x: x[k], state), s_loop)


def test_lr_grid_by_stacking_states():
    """α and β are read from the state: one update function serves a grid of (α_0, β)."""
    params, loss = make_problem()
    grid = [(0.01, 0.0), (0.03, 0.01), (0.1, 0.001)]
    rules = [hdfunc.sgdn_hd(a, b) for a, b in grid]
    states = tree_stack([r.init(params) for r in rules])
    batch = tree_map(lambda x: torch.stack([x] * len(grid)), params)

    def step(p, s):
        u, s = rules[0].update(grad(loss)(p), s, p)
        return hdfunc.apply_updates(p, u), s

    for _ in range(5):
        batch, states = vmap(step)(batch, states)
    for k, rule in enumerate(rules):
        p_loop, _ = run(rule, params, loss, 5)[-1]
        assert_trees_close(tree_map(lambda x: x[k], batch), p_loop)


@pytest.mark.parametrize("factory", [hdfunc.sgd_hd, hdfunc.sgdn_hd, hdfunc.adam_hd])
def test_gradient_to_initial_lr_and_beta_through_steps_matches_finite_differences(factory):
    params, loss = make_problem()

    def loss_after(lr, beta):
        p = params
        rule = factory(lr, beta)
        state = rule.init(p)
        for _ in range(5):
            u, state = rule.update(grad(loss)(p), state, p)
            p = hdfunc.apply_updates(p, u)
        return loss(p)

    lr, beta = torch.tensor(0.02, dtype=F64), torch.tensor(1e-3, dtype=F64)
    d_lr, d_beta = grad(loss_after, argnums=(0, 1))(lr, beta)
    eps = 1e-6
    fd_lr = (loss_after(lr + eps, beta) - loss_after(lr - eps, beta)) / (2 * eps)
    fd_beta = (loss_after(lr, beta + eps) - loss_after(lr, beta - eps)) / (2 * eps)
    torch.testing.assert_close(d_lr, fd_lr, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(d_beta, fd_beta, rtol=1e-6, atol=1e-9)
    _, forward = jvp(lambda a: loss_after(a, beta), (lr,), (torch.ones_like(lr),))
    torch.testing.assert_close(forward, d_lr, rtol=1e-10, atol=1e-12)
    assert d_lr.abs() > 1e-4 and d_beta.abs() > 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("granularity", ["global", "tensor", "element"])
def test_dtype_and_device_are_preserved(dtype, granularity):
    params, loss = make_problem(dtype=dtype)
    rule = hdfunc.adam_hd(0.01, 1e-3, lr_granularity=granularity)
    (p, state), = run(rule, params, loss, 1)
    for x, x0 in zip(tree_leaves(p), tree_leaves(params)):
        assert x.dtype == dtype and x.device == x0.device
    rate_dtype = torch.promote_types(dtype, torch.float32)
    for rate in tree_leaves(hdfunc.get_lr(state)):
        assert rate.dtype == rate_dtype
    assert torch.isfinite(torch.stack([loss(p).float(), loss(params).float()])).all()


def test_bfloat16_hypergradient_is_accumulated_in_float32():
    params, loss = make_problem(dtype=torch.bfloat16, n=256)
    history = run(hdfunc.sgd_hd(0.05, 0.01), params, loss, 3)
    g1, g2 = grad(loss)(params), grad(loss)(history[0][0])
    exact = -sum((a.float() * b.float()).sum() for a, b in zip(tree_leaves(g2), tree_leaves(g1)))
    h2 = hdfunc.find_lr_state(history[1][1]).hypergrad
    assert h2.dtype == torch.float32
    torch.testing.assert_close(h2, exact, rtol=1e-6, atol=1e-6)


def test_state_can_move_between_devices_and_round_trip_through_torch_save(tmp_path):
    params, loss = make_problem()
    rule = hdfunc.adam_hd(0.01, 1e-3)
    params1, state1 = run(rule, params, loss, 3)[-1]
    torch.save(state1, tmp_path / "state.pt")
    loaded = torch.load(tmp_path / "state.pt", weights_only=False)
    moved = tree_map(lambda x: x.to("cpu"), loaded)
    a = rule.update(grad(loss)(params1), state1, params1)
    b = rule.update(grad(loss)(params1), moved, params1)
    assert_trees_close(a, b, rtol=0, atol=0)


def test_torch_compile_matches_eager():
    params, loss = make_problem()
    rule = hdfunc.adam_hd(0.01, 1e-3)
    state = rule.init(params)
    g = grad(loss)(params)
    updates, state = rule.update(g, state, params)
    params = hdfunc.apply_updates(params, updates)
    g = grad(loss)(params)
    compiled = torch.compile(rule.update, backend="aot_eager", fullgraph=False)
    assert_trees_close(compiled(g, state, params), rule.update(g, state, params))


# ----------------------------------------------------------------------------- guards and errors


def test_nonfinite_gradient_does_not_poison_the_rate():
    params, loss = make_problem()
    rule = hdfunc.sgd_hd(0.1, 0.01)
    _, state = run(rule, params, loss, 2)[-1]
    bad = tree_map(lambda p: torch.full_like(p, float("inf")), params)
    _, new_state = rule.update(bad, state, params)
    assert hdfunc.get_lr(new_state) == hdfunc.get_lr(state)
    assert hdfunc.find_lr_state(new_state).skipped.item() == 1
    unguarded = hdfunc.sgd_hd(0.1, 0.01, skip_nonfinite=False)
    _, poisoned = unguarded.update(bad, state, params)
    assert not torch.isfinite(hdfunc.get_lr(poisoned))


def test_lr_bounds_clamp_the_adapted_rate():
    params, loss = make_problem()
    free = run(hdfunc.sgd_hd(0.1, 10.0), params, loss, 6)
    rates = torch.stack([hdfunc.get_lr(s) for _, s in free])
    assert rates.max() > 0.2 or rates.min() < 0.05  # the unbounded rate does leave [0.05, 0.2]
    bounded = run(hdfunc.sgd_hd(0.1, 10.0, lr_bounds=(0.05, 0.2)), params, loss, 6)
    for _, s in bounded:
        assert 0.05 <= hdfunc.get_lr(s).item() <= 0.2


@pytest.mark.parametrize("call,error,match", [
    (lambda: hdfunc.sgd(-0.1), ValueError, "lr must lie"),
    (lambda: hdfunc.sgd_hd(0.1, -1e-3), ValueError, "hypergrad_lr must lie"),
    (lambda: hdfunc.adam(0.1, betas=(1.0, 0.999)), ValueError, r"betas\[0\]"),
    (lambda: hdfunc.adam(0.1, betas=(0.9, -0.1)), ValueError, r"betas\[1\]"),
    (lambda: hdfunc.adam(0.1, betas=0.9), TypeError, "betas must be a pair"),
    (lambda: hdfunc.sgdn(0.1, momentum=1.5), ValueError, "momentum"),
    (lambda: hdfunc.sgd(float("nan")), ValueError, "lr must lie"),
    (lambda: hdfunc.sgd("0.1"), TypeError, "lr must be a real number"),
    (lambda: hdfunc.sgd(torch.ones(2)), TypeError, "0-d floating tensor"),
    (lambda: hdfunc.sgd_hd(0.1, 0.1, lr_granularity="layer"), ValueError, "lr_granularity"),
    (lambda: hdfunc.sgd_hd(0.1, 0.1, mode="exp"), ValueError, "mode must be one of"),
    (lambda: hdfunc.sgd_hd(0.1, 0.1, lr_bounds=(1.0, 0.1)), ValueError, "lr_bounds"),
    (lambda: hdfunc.sgd(0.1, weight_decay=-1.0), ValueError, "weight_decay"),
])
def test_bad_hyperparameters_raise_clear_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_bad_grads_and_states_raise_clear_errors():
    params, loss = make_problem()
    rule = hdfunc.adam_hd(0.01, 1e-3)
    state = rule.init(params)
    g = grad(loss)(params)
    wrong_structure = {"hidden": g["hidden"], "out": g["out"][:1]}
    with pytest.raises(ValueError, match="different tree structures"):
        rule.update(wrong_structure, state, params)
    wrong_shape = copy.deepcopy(g)
    wrong_shape["hidden"]["bias"] = torch.zeros(5, dtype=F64)
    with pytest.raises(ValueError, match=r"grad shape \(5,\) != param shape \(4,\)"):
        rule.update(wrong_shape, state, params)
    wrong_dtype = tree_map(lambda x: x.float(), g)
    with pytest.raises(TypeError, match="grad dtype torch.float32 != param dtype torch.float64"):
        rule.update(wrong_dtype, state, params)
    with pytest.raises(TypeError, match="not made by sgd_hd.init"):
        hdfunc.sgd_hd(0.01, 1e-3).update(g, state, params)
    with pytest.raises(TypeError, match="not made by adam_hd.init"):
        hdfunc.adam_hd(0.01, 1e-3, lr_granularity="tensor").update(g, state, params)
    with pytest.raises(TypeError, match="floating-point"):
        rule.init({"w": torch.zeros(3, dtype=torch.int64)})
    with pytest.raises(ValueError, match="at least one tensor"):
        rule.init({})


def test_get_lr_has_the_rate_structure():
    params, _ = make_problem()
    assert hdfunc.get_lr(hdfunc.sgd(0.1).init(params)).shape == ()
    assert hdfunc.get_lr(hdfunc.sgd_hd(0.1, 0.1).init(params)).shape == ()
    per_tensor = hdfunc.get_lr(hdfunc.sgd_hd(0.1, 0.1, lr_granularity="tensor").init(params))
    assert [x.shape for x in tree_leaves(per_tensor)] == [()] * 4
    per_element = hdfunc.get_lr(hdfunc.sgd_hd(0.1, 0.1, lr_granularity="element").init(params))
    assert [x.shape for x in tree_leaves(per_element)] == [p.shape for p in tree_leaves(params)]
    with pytest.raises(TypeError, match="no learning rate"):
        hdfunc.get_lr((torch.zeros(()),))


def test_applied_lr_follows_the_transition_and_replace_keeps_the_rest():
    """γ_t = δ(t) α_t + (1 - δ(t)) α_∞ with δ(t) = 1/t² (§5.1); without a transition γ_t = α_t."""
    params, loss = make_problem()
    state = run(hdfunc.sgd_hd(0.1, 0.01, final_lr=0.02), params, loss, 2)[-1][1]
    expected = 0.25 * hdfunc.get_lr(state) + 0.75 * 0.02
    torch.testing.assert_close(hdfunc.get_applied_lr(state), expected, rtol=1e-15, atol=0)
    assert float(hdfunc.get_lr(state)) != 0.1  # α really moved, so γ ≠ α
    plain = run(hdfunc.sgd_hd(0.1, 0.01), params, loss, 2)[-1][1]
    assert hdfunc.get_applied_lr(plain) is hdfunc.get_lr(plain)
    replaced = hdfunc.replace_lr_state(state, lr=torch.tensor(0.5, dtype=torch.float64))
    assert float(hdfunc.get_lr(replaced)) == 0.5 and float(hdfunc.get_lr(state)) != 0.5
    node, new_node = hdfunc.find_lr_state(state), hdfunc.find_lr_state(replaced)
    assert new_node.hypergrad is node.hypergrad and new_node.count is node.count
    with pytest.raises(TypeError, match="no learning rate"):
        hdfunc.get_applied_lr((torch.zeros(()),))


def test_higher_order_sgd_hd_uses_the_closed_form_hyper_hypergradient():
    """§5.2 for SGD-HD: ∂f(θ_{t-1})/∂β = -(g_t·g_{t-1})(g_{t-1}·g_{t-2}); β_t = β_{t-1} - κ of it."""
    params, loss = make_problem()
    kappa, beta0 = 0.5, 0.01
    history = run(hdfunc.sgd_hd(0.1, beta0, hyper_hypergrad_lr=kappa), params, loss, 3)
    thetas = [params] + [p for p, _ in history]
    g = [tree_leaves(grad(loss)(th)) for th in thetas[:3]]  # g_1, g_2, g_3

    def dot(a, b):
        return sum((x * y).sum() for x, y in zip(a, b))

    expected = -dot(g[2], g[1]) * dot(g[1], g[0])
    node = hdfunc.find_lr_state(history[2][1])
    torch.testing.assert_close(node.hyper_hypergrad, expected)
    beta2 = hdfunc.find_lr_state(history[1][1]).hypergrad_lr
    torch.testing.assert_close(node.hypergrad_lr, beta2 - kappa * expected)
    assert (node.hypergrad_lr - beta0).abs() > 1e-6
