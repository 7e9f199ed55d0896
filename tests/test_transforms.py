"""The optax-style building blocks against independent oracles: torch.nn.utils.clip_grad_norm_,
torch.optim with param groups and LR schedulers, and closed forms."""

from __future__ import annotations

import pytest
import torch
from torch.func import grad, vmap

import hdfunc
from hdfunc.directions import add_decayed_weights, add_l2, identity, scale_by_adam
from hdfunc.hypergradient import ScheduleState
from hdfunc.transforms import PartitionState, clip_by_global_norm, global_norm, partition
from hdfunc.tree import tree_flatten, tree_leaves, tree_map, tree_stack, tree_unflatten
from helpers import make_problem

STEPS = 6


def assert_trees_close(a, b, rtol=1e-10, atol=1e-12):
    for x, y in zip(tree_leaves(a), tree_leaves(b), strict=True):
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol)


def train(rule, params, loss, steps=STEPS, pass_params=True):
    state = rule.init(params)
    for _ in range(steps):
        updates, state = rule.update(grad(loss)(params), state,
                                     params if pass_params else None)
        params = hdfunc.apply_updates(params, updates)
    return params, state


def train_torch(make_optimizer, params, loss, steps=STEPS, clip=None, scheduler=None):
    """torch.optim on copies of the leaves; ``make_optimizer(leaves)`` builds it (param groups
    index the leaves in flattening order)."""
    leaves, spec = tree_flatten(params)
    leaves = [p.clone().requires_grad_(True) for p in leaves]
    optimizer = make_optimizer(leaves)
    schedule = scheduler(optimizer) if scheduler else None
    for _ in range(steps):
        optimizer.zero_grad()
        loss(tree_unflatten(leaves, spec)).backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(leaves, clip)
        optimizer.step()
        if schedule:
            schedule.step()
    return tree_unflatten([p.detach() for p in leaves], spec)


def is_matrix(params):
    """The usual weight-decay mask: decay weight matrices, not biases (a callable on params)."""
    return {"hidden": {"weight": True, "bias": False}, "out": [True, False]}


def matrix_leaves(params):
    """The flattening-order indices of the decayed / not decayed leaves (for torch groups)."""
    flags = tree_leaves(is_matrix(params))
    return ([i for i, f in enumerate(flags) if f], [i for i, f in enumerate(flags) if not f])


# ----------------------------------------------------------------------------- clip_by_global_norm


@pytest.mark.parametrize("max_norm", [0.05, 1e3])
def test_clip_by_global_norm_matches_clip_grad_norm(max_norm):
    params, loss = make_problem()
    grads = grad(loss)(params)
    clipped, _ = clip_by_global_norm(max_norm).update(grads, hdfunc.EmptyState())
    leaves = [g.clone() for g in tree_leaves(grads)]
    holders = [torch.zeros_like(g, requires_grad=True) for g in leaves]
    for h, g in zip(holders, leaves):
        h.grad = g
    total = torch.nn.utils.clip_grad_norm_(holders, max_norm)
    torch.testing.assert_close(global_norm(grads), total, rtol=1e-14, atol=0)
    assert_trees_close(clipped, [h.grad for h in holders], rtol=1e-14, atol=0)


@pytest.mark.parametrize("rule, torch_optimizer", [
    (lambda: hdfunc.sgd(0.1), lambda ps: torch.optim.SGD(ps, lr=0.1)),
    (lambda: hdfunc.adam_hd(0.01, 0.0), lambda ps: torch.optim.Adam(ps, lr=0.01)),
])
def test_clip_chained_before_a_rule_matches_torch(rule, torch_optimizer):
    params, loss = make_problem()
    ours, _ = train(hdfunc.chain(clip_by_global_norm(0.1), rule()), params, loss)
    theirs = train_torch(torch_optimizer, params, loss, clip=0.1)
    assert_trees_close(ours, theirs)


def test_clip_under_vmap_matches_a_loop():
    params, loss = make_problem()
    batch = tree_stack([tree_map_scale(grad(loss)(params), s) for s in (0.01, 1.0, 100.0)])
    clip = clip_by_global_norm(1.0)
    batched, _ = vmap(lambda g: clip.update(g, hdfunc.EmptyState()))(batch)
    for i, s in enumerate((0.01, 1.0, 100.0)):
        one, _ = clip.update(tree_map_scale(grad(loss)(params), s), hdfunc.EmptyState())
        assert_trees_close([x[i] for x in tree_leaves(batched)], one)


def tree_map_scale(tree, s):
    return tree_map(lambda x: s * x, tree)


# ----------------------------------------------------------------------------- masked decay


@pytest.mark.parametrize("mask_kind", ["tree", "callable"])
def test_masked_decoupled_decay_matches_adamw_param_groups(mask_kind):
    params, loss = make_problem()
    mask = is_matrix(params) if mask_kind == "tree" else is_matrix
    decayed, plain = matrix_leaves(params)
    ours, _ = train(hdfunc.adamw(0.01, weight_decay=0.1, weight_decay_mask=mask), params, loss)
    theirs = train_torch(lambda ps: torch.optim.AdamW(
        [{"params": [ps[i] for i in decayed]},
         {"params": [ps[i] for i in plain], "weight_decay": 0.0}], lr=0.01, weight_decay=0.1),
        params, loss)
    assert_trees_close(ours, theirs)
    # the HD rule at β = 0 is its base rule, mask included
    ours_hd, _ = train(hdfunc.adamw_hd(0.01, 0.0, weight_decay=0.1, weight_decay_mask=mask),
                       params, loss)
    assert_trees_close(ours_hd, theirs)


def test_masked_coupled_decay_matches_sgd_param_groups():
    params, loss = make_problem()
    decayed, plain = matrix_leaves(params)
    ours, _ = train(hdfunc.sgdn(0.05, 0.8, weight_decay=0.05, weight_decay_mask=is_matrix),
                    params, loss)
    theirs = train_torch(lambda ps: torch.optim.SGD(
        [{"params": [ps[i] for i in decayed]},
         {"params": [ps[i] for i in plain], "weight_decay": 0.0}],
        lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.05), params, loss)
    assert_trees_close(ours, theirs)


def test_decay_transforms_with_a_mask_are_closed_form():
    params, _ = make_problem()
    grads = tree_map(torch.ones_like, params)
    for transform in (add_l2(0.5, is_matrix), add_decayed_weights(0.5, is_matrix(params))):
        out, _ = transform.update(grads, hdfunc.EmptyState(), params)
        for o, p, on in zip(tree_leaves(out), tree_leaves(params), tree_leaves(is_matrix(params))):
            torch.testing.assert_close(o, 1 + 0.5 * p if on else torch.ones_like(p))


def test_a_mask_of_the_wrong_structure_is_refused():
    params, loss = make_problem()
    rule = hdfunc.adamw(0.01, weight_decay_mask={"hidden": True})
    with pytest.raises(ValueError, match="mask must have the params' tree structure"):
        rule.update(grad(loss)(params), rule.init(params), params)
    with pytest.raises(TypeError, match="Python bools"):
        bad = hdfunc.adamw(0.01, weight_decay_mask=lambda ps: tree_map(lambda p: 1, ps))
        bad.update(grad(loss)(params), bad.init(params), params)


# ----------------------------------------------------------------------------- option errors


def test_a_misspelled_option_names_the_rule_and_the_valid_options():
    with pytest.raises(TypeError) as error:
        hdfunc.adam_hd(0.01, 1e-4, modee="x")
    message = str(error.value)
    assert message.startswith("adam_hd: unknown option 'modee' (did you mean 'mode'?); "
                              "valid options: lr, hypergrad_lr, betas")
    assert "lr_granularity" in message and "weight_decay_mask" in message
    with pytest.raises(TypeError, match=r"^adamw_hd: unknown option 'lr_granularty' \(did you "
                                        r"mean 'lr_granularity'\?\)"):
        hdfunc.adamw_hd(0.01, 1e-4, lr_granularty="tensor")
    with pytest.raises(TypeError, match="^sgd: unknown option 'momentum'; valid options: lr, "):
        hdfunc.sgd(0.1, momentum=0.9)
    with pytest.raises(TypeError, match="^hd_rule: unknown option 'bounds'"):
        hdfunc.hd_rule(identity(), 0.1, 0.01, bounds=(0, 1))


# ----------------------------------------------------------------------------- params optional


@pytest.mark.parametrize("make", [lambda: hdfunc.sgd_hd(0.1, 0.01),
                                  lambda: hdfunc.adam_hd(0.01, 1e-3, lr_granularity="tensor"),
                                  lambda: hdfunc.sgdn(0.1),
                                  lambda: hdfunc.sgd(lambda count: 0.1 / (1 + count))])
def test_params_may_be_left_out_where_the_rule_does_not_read_them(make):
    params, loss = make_problem()
    with_params = train(make(), params, loss)
    without = train(make(), params, loss, pass_params=False)
    assert_trees_close(with_params, without, rtol=0, atol=0)


@pytest.mark.parametrize("make, name", [(lambda: hdfunc.adamw_hd(0.01, 1e-3), "adamw_hd"),
                                        (lambda: hdfunc.sgd(0.1, weight_decay=0.1), "sgd")])
def test_a_rule_that_reads_params_says_so(make, name):
    params, loss = make_problem()
    rule = make()
    with pytest.raises(ValueError, match=rf"^{name} needs params in update\("):
        rule.update(grad(loss)(params), rule.init(params))


# ----------------------------------------------------------------------------- schedules


def test_a_schedule_matches_torch_exponential_lr():
    params, loss = make_problem()
    ours, state = train(hdfunc.sgdn(lambda count: 0.1 * 0.8 ** count, 0.9), params, loss)
    theirs = train_torch(lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True),
                         params, loss,
                         scheduler=lambda o: torch.optim.lr_scheduler.ExponentialLR(o, 0.8))
    assert_trees_close(ours, theirs)
    node = hdfunc.find_lr_state(state)
    assert isinstance(node, ScheduleState) and int(node.count) == STEPS
    torch.testing.assert_close(hdfunc.get_lr(state),
                               torch.tensor(0.1 * 0.8 ** STEPS, dtype=torch.float64))
    torch.testing.assert_close(hdfunc.get_applied_lr(state),
                               torch.tensor(0.1 * 0.8 ** (STEPS - 1), dtype=torch.float64))


def test_a_warmup_schedule_matches_torch_lambda_lr():
    def warmup(count):  # tensor operations only: vmap- and compile-safe
        return 0.01 * torch.clamp((count + 1) / 3, max=1.0)

    params, loss = make_problem()
    ours, _ = train(hdfunc.adam(warmup), params, loss)
    theirs = train_torch(lambda ps: torch.optim.Adam(ps, lr=0.01), params, loss,
                         scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(
                             o, lambda step: min((step + 1) / 3, 1.0)))
    assert_trees_close(ours, theirs)


def test_a_schedule_runs_under_vmap_and_compile():
    params, loss = make_problem()
    rule = hdfunc.sgd(lambda count: torch.where(count < 2, 0.1, 0.01))
    grads = grad(loss)(params)
    states = tree_stack([rule.init(params), rule.init(params)])
    step = vmap(lambda g, s: rule.update(g, s, None))
    for _ in range(3):
        updates, states = step(tree_stack([grads, grads]), states)
    torch.testing.assert_close(updates["out"][0][1], -0.01 * grads["out"][0])
    torch.testing.assert_close(hdfunc.get_applied_lr(states),
                               torch.tensor([0.01, 0.01], dtype=torch.float64))
    compiled = torch.compile(rule.update, backend="eager")
    state = rule.init(params)
    for _ in range(3):
        ours, state = compiled(grads, state, params)
    assert_trees_close(ours, tree_map(lambda u: u[0], updates), rtol=0, atol=0)


def test_an_hd_rule_takes_its_schedule_as_lr_schedule():
    with pytest.raises(TypeError, match="^adam_hd: lr must be a number .* pass lr_schedule="):
        hdfunc.adam_hd(lambda count: 1e-3, 1e-7)
    with pytest.raises(TypeError, match="^sgd_hd: lr_schedule must be None or a callable"):
        hdfunc.sgd_hd(0.1, 0.01, lr_schedule=0.5)


def warmup_then_decay(count):
    return torch.where(count < 2, (count + 1) / 3, 0.9 ** count)


HD_SCHEDULED = {
    "sgd_hd": lambda: hdfunc.sgd_hd(0.05, 0.01, lr_schedule=warmup_then_decay),
    "sgdn_hd_mult": lambda: hdfunc.sgdn_hd(0.02, 0.02, 0.8, mode="multiplicative",
                                           lr_schedule=warmup_then_decay),
    "adam_hd_tensor": lambda: hdfunc.adam_hd(0.01, 1e-3, lr_granularity="tensor",
                                             lr_schedule=warmup_then_decay),
    "adam_hd_transition": lambda: hdfunc.adam_hd(0.01, 1e-3, final_lr=0.005,
                                                 lr_schedule=warmup_then_decay),
}


@pytest.mark.parametrize("case", sorted(HD_SCHEDULED))
def test_scheduled_hd_keeps_the_one_step_identity(case):
    """h_t = d f(θ_{t-2} + u_{t-1}(γ))/dγ at the rate γ_{t-1} that the schedule multiplied
    (α_{t-1}, or δα_{t-1} + (1-δ)α_∞ with a transition), by autodiff through the frozen step
    (freeze_lr), with the schedule's factor s(t-2) in u_{t-1}."""
    rule = HD_SCHEDULED[case]()
    params, loss = make_problem()
    state = rule.init(params)
    for step in range(4):
        previous_params, previous_state = params, state
        updates, state = rule.update(grad(loss)(params), state, params)
        params = hdfunc.apply_updates(params, updates)
        _, next_state = rule.update(grad(loss)(params), state, params)

        def loss_after(rate):
            frozen = hdfunc.freeze_lr(previous_state, rate)
            u, _ = rule.update(grad(loss)(previous_params), frozen, previous_params)
            return loss(hdfunc.apply_updates(previous_params, u))

        factor = warmup_then_decay(torch.tensor(float(step), dtype=torch.float64))
        rate = tree_map(lambda r: r / factor, hdfunc.get_applied_lr(state))  # γ_{t-1} before s
        if "transition" not in case:
            assert_trees_close(rate, hdfunc.get_lr(state))
        expected = grad(loss_after)(rate)
        hypergrad = hdfunc.find_lr_state(next_state).hypergrad
        assert_trees_close(hypergrad, expected, rtol=1e-9, atol=1e-13)


def test_scheduled_hd_at_zero_hypergrad_lr_is_the_scheduled_base_rule():
    params, loss = make_problem()
    hd, state = train(hdfunc.adam_hd(0.01, 0.0, lr_schedule=warmup_then_decay), params, loss)
    base, _ = train(hdfunc.adam(lambda count: 0.01 * warmup_then_decay(count)), params, loss)
    assert_trees_close(hd, base)
    torch.testing.assert_close(hdfunc.get_applied_lr(state),
                               0.01 * warmup_then_decay(torch.tensor(STEPS - 1.0,
                                                                     dtype=torch.float64)))
    plain, _ = train(hdfunc.sgd_hd(0.05, 0.01), params, loss)
    ones, _ = train(hdfunc.sgd_hd(0.05, 0.01, lr_schedule=lambda count: 1.0), params, loss)
    assert_trees_close(plain, ones, rtol=0, atol=0)


# ----------------------------------------------------------------------------- partition


def labels_of(params):
    return {"hidden": {"weight": "adam", "bias": "sgd"}, "out": ["adam", "sgd"]}


def test_partition_matches_two_torch_optimizers():
    params, loss = make_problem()
    rule = partition({"adam": hdfunc.adam(0.01), "sgd": hdfunc.sgdn(0.05, 0.8)}, labels_of)
    ours, state = train(rule, params, loss)
    assert isinstance(state, PartitionState)
    adam_idx, sgd_idx = matrix_leaves(params)  # adam on the matrices, sgd on the rest

    class Both:
        def __init__(self, ps):
            self.a = torch.optim.Adam([ps[i] for i in adam_idx], lr=0.01)
            self.s = torch.optim.SGD([ps[i] for i in sgd_idx], lr=0.05, momentum=0.8,
                                     nesterov=True)

        def zero_grad(self):
            self.a.zero_grad()
            self.s.zero_grad()

        def step(self):
            self.a.step()
            self.s.step()

    theirs = train_torch(Both, params, loss)
    assert_trees_close(ours, theirs)


def test_partition_with_hd_per_partition_adapts_one_rate_per_partition():
    """Closed form after two steps of SGD-HD per partition: α_label = α_0 + β g_2·g_1, the dot
    product over that partition's params only."""
    params, loss = make_problem()
    rule = partition({"adam": hdfunc.sgd_hd(0.05, 0.01), "sgd": hdfunc.sgd_hd(0.05, 0.02)},
                     labels_of(params))
    _, state = train(rule, params, loss, steps=2)
    g1 = grad(loss)(params)
    g2 = grad(loss)(tree_map(lambda p, g: p - 0.05 * g, params, g1))
    flags = tree_leaves(is_matrix(params))  # the "adam" label marks the matrices
    for label, beta, on in (("adam", 0.01, True), ("sgd", 0.02, False)):
        dot = sum((a * b).sum() for a, b, f in zip(tree_leaves(g2), tree_leaves(g1), flags)
                  if f == on)
        torch.testing.assert_close(hdfunc.get_lr(state.states[label]), 0.05 + beta * dot)
    # at β = 0 each sub-rule is its base rule
    base, _ = train(partition({"adam": hdfunc.adam(0.01), "sgd": hdfunc.sgd(0.05)}, labels_of),
                    params, loss)
    hd0, _ = train(partition({"adam": hdfunc.adam_hd(0.01, 0.0), "sgd": hdfunc.sgd_hd(0.05, 0.0)},
                             labels_of), params, loss)
    assert_trees_close(base, hd0, rtol=0, atol=0)


def test_one_global_hypergradient_across_partitions_is_the_unpartitioned_rule():
    """hd_rule over a partition of directions adapts one α with h_t = -Σ g_t·d_{t-1} over all
    params: with the same direction everywhere it is SGD-HD exactly."""
    params, loss = make_problem()
    split = hdfunc.hd_rule(partition({"adam": identity(), "sgd": identity()}, labels_of),
                           0.05, 0.01)
    ours, state = train(split, params, loss)
    theirs, their_state = train(hdfunc.sgd_hd(0.05, 0.01), params, loss)
    assert_trees_close(ours, theirs)
    torch.testing.assert_close(hdfunc.get_lr(state), hdfunc.get_lr(their_state))


def test_partition_refuses_unknown_and_unused_labels():
    params, loss = make_problem()
    with pytest.raises(ValueError, match="label 'sgd' of hidden.bias has no transform"):
        partition({"adam": hdfunc.adam(0.01)}, labels_of).init(params)
    with pytest.raises(ValueError, match="no params are labelled 'extra'"):
        partition({"adam": hdfunc.adam(0.01), "sgd": hdfunc.sgd(0.1),
                   "extra": hdfunc.sgd(0.1)}, labels_of).init(params)
    with pytest.raises(TypeError, match="must be a Transform"):
        partition({"adam": "adam"}, labels_of)


def test_adam_partition_of_directions_keeps_adams_numbers():
    """A partition of base directions under one global α: at β = 0 it is Adam on one group and
    SGD on the other, each at the same fixed rate."""
    params, loss = make_problem()
    split = hdfunc.hd_rule(partition({"adam": scale_by_adam(), "sgd": identity()}, labels_of),
                           0.01, 0.0)
    ours, _ = train(split, params, loss)
    fixed, _ = train(partition({"adam": hdfunc.adam(0.01), "sgd": hdfunc.sgd(0.01)}, labels_of),
                     params, loss)
    assert_trees_close(ours, fixed)
