"""hdfunc.optim: the torch.optim front end, against the functional rules and torch.optim."""

from __future__ import annotations

import copy
import io
from typing import NamedTuple

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad

import hdfunc
from hdfunc.base import Transform
from hdfunc.optim import SGDHD, SGDNHD, AdamHD, AdamWHD
from helpers import tanh_regression


make_model = tanh_regression


def train(model, optimizer, x, y, steps, sign=1.0):
    for _ in range(steps):
        optimizer.zero_grad()
        loss = sign * ((model(x) - y) ** 2).mean()
        loss.backward()
        optimizer.step()


def functional_run(rule, model, x, y, steps):
    params = {k: v.detach().clone() for k, v in model.named_parameters()}

    def loss(p):
        return ((functional_call(model, p, (x,)) - y) ** 2).mean()

    state = rule.init(params)
    for _ in range(steps):
        updates, state = rule.update(grad(loss)(params), state, params)
        params = hdfunc.apply_updates(params, updates)
    return params, state


def max_error(model, params):
    return max((params[k] - v.detach()).abs().max().item() for k, v in model.named_parameters())


CASES = {
    "adam_hd": (AdamHD, hdfunc.adam_hd, dict(lr=1e-2, hypergrad_lr=1e-3)),
    "adam_hd_l2": (AdamHD, hdfunc.adam_hd, dict(lr=1e-2, hypergrad_lr=1e-3, weight_decay=0.05)),
    "adam_hd_mult": (AdamHD, hdfunc.adam_hd, dict(lr=1e-2, hypergrad_lr=0.02,
                                                  mode="multiplicative")),
    "adam_hd_transition": (AdamHD, hdfunc.adam_hd, dict(lr=1e-2, hypergrad_lr=1e-3,
                                                        final_lr=5e-3)),
    "adamw_hd": (AdamWHD, hdfunc.adamw_hd, dict(lr=1e-2, hypergrad_lr=1e-3, weight_decay=0.1)),
    "adamw_hd_mult": (AdamWHD, hdfunc.adamw_hd, dict(lr=1e-2, hypergrad_lr=0.02,
                                                     weight_decay=0.1, mode="multiplicative")),
    "sgd_hd": (SGDHD, hdfunc.sgd_hd, dict(lr=1e-2, hypergrad_lr=1e-2)),
    "sgd_hd_l2_bounds": (SGDHD, hdfunc.sgd_hd, dict(lr=1e-2, hypergrad_lr=0.05, weight_decay=0.01,
                                                    lr_bounds=(0.0, 0.03))),
    "sgd_hd_higher_order": (SGDHD, hdfunc.sgd_hd, dict(lr=1e-2, hypergrad_lr=1e-2,
                                                       hyper_hypergrad_lr=1e-3)),
    "sgdn_hd": (SGDNHD, hdfunc.sgdn_hd, dict(lr=1e-2, hypergrad_lr=1e-2, momentum=0.9)),
    "sgdn_hd_mult": (SGDNHD, hdfunc.sgdn_hd, dict(lr=1e-2, hypergrad_lr=0.02, momentum=0.9,
                                                  mode="multiplicative")),
}
KERNELS = {"default": {}, "foreach": dict(foreach=True), "for_loop": dict(foreach=False,
                                                                          fused=False)}
ALL_KERNELS = {**KERNELS, "fused": dict(fused=True)}


MAIN_RULES = ("adam_hd", "adamw_hd", "sgd_hd", "sgdn_hd")


@pytest.mark.parametrize("case,kernel", [(c, "default") for c in CASES] + [
    (c, k) for c in MAIN_RULES for k in KERNELS if k != "default"] + [
    ("sgd_hd", "fused"), ("sgdn_hd", "fused")])
def test_matches_functional_rule(case, kernel):
    """A torch.nn training loop with the optimizer follows the functional rule's trajectory
    (params and α) to rounding, in float64, on every kernel path."""
    cls, rule_fn, kwargs = CASES[case]
    model, x, y = make_model()
    params, state = functional_run(rule_fn(**kwargs), model, x, y, steps=25)
    optimizer = cls(model.parameters(), **kwargs, **ALL_KERNELS[kernel])
    train(model, optimizer, x, y, steps=25)
    tolerance = 1e-13
    assert max_error(model, params) < tolerance
    alpha = optimizer.adapted_lrs()[0]
    torch.testing.assert_close(alpha, hdfunc.get_lr(state), rtol=tolerance, atol=0)
    assert float(hdfunc.get_lr(state)) != kwargs["lr"]  # α really moved


@pytest.mark.parametrize("case", ["adam_hd", "adam_hd_l2", "adam_hd_mult", "adamw_hd",
                                  "adamw_hd_mult", "sgd_hd", "sgdn_hd_mult"])
def test_batched_cpu_pass_across_piece_boundaries(case):
    """The CPU hypergradient pass works through scratch buffers in pieces; with an 8-element
    buffer every tensor is split and small tensors share batches: still the functional rule.
    (The streamed terms themselves: tests/test_optim_terms.py.)"""
    cls, rule_fn, kwargs = CASES[case]
    model, x, y = make_model()
    params, state = functional_run(rule_fn(**kwargs), model, x, y, steps=12)
    optimizer = cls(model.parameters(), **kwargs)
    optimizer._scratch_bytes = 64  # the size of each scratch buffer (1 MiB by default)
    train(model, optimizer, x, y, steps=12)
    assert optimizer._scratch_buffers[(torch.device("cpu"), torch.float64)][0].numel() == 8
    assert max_error(model, params) < 1e-13
    torch.testing.assert_close(optimizer.adapted_lrs()[0], hdfunc.get_lr(state), rtol=1e-13,
                               atol=0)


class HeavyBallState(NamedTuple):
    velocity: dict


def heavy_ball(momentum):
    """Reference direction for SGD with plain (heavy-ball) momentum: v_t = μ v + g, d_t = v_t."""
    def init(params):
        return HeavyBallState({k: torch.zeros_like(v) for k, v in params.items()})

    def update(g, state, params):
        velocity = {k: momentum * state.velocity[k] + g[k] for k in g}
        return velocity, HeavyBallState(velocity)

    return Transform(init, update, "heavy_ball")


def test_heavy_ball_momentum_matches_hd_rule_without_extra_buffer():
    model, x, y = make_model()
    params, state = functional_run(hdfunc.hd_rule(heavy_ball(0.8), 1e-2, 1e-2), model, x, y, 20)
    optimizer = SGDHD(model.parameters(), lr=1e-2, hypergrad_lr=1e-2, momentum=0.8)
    train(model, optimizer, x, y, 20)
    assert max_error(model, params) < 1e-13
    for p in model.parameters():
        assert set(optimizer.state[p]) == {"momentum_buffer"}  # d_{t-1} is the momentum buffer


PAIRS = [
    (AdamHD, torch.optim.Adam, dict(lr=1e-2, weight_decay=0.01)),
    (AdamWHD, torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1)),
    (SGDHD, torch.optim.SGD, dict(lr=1e-2, weight_decay=0.01)),
    (SGDHD, torch.optim.SGD, dict(lr=1e-2, momentum=0.9, nesterov=True)),
    (SGDHD, torch.optim.SGD, dict(lr=1e-2, momentum=0.9, dampening=0.1)),
]


@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("kernel", [dict(foreach=True), dict(fused=True),
                                    dict(foreach=False, fused=False)])
@pytest.mark.parametrize("pair", range(len(PAIRS)))
def test_zero_hypergrad_lr_is_torch_optimizer(pair, kernel, maximize):
    """hypergrad_lr=0: bit for bit torch.optim's step on the same kernel (float32)."""
    hd_cls, torch_cls, kwargs = PAIRS[pair]
    model_a, x, y = make_model(torch.float32)
    model_b = copy.deepcopy(model_a)
    opt_a = hd_cls(model_a.parameters(), hypergrad_lr=0.0, maximize=maximize, **kwargs, **kernel)
    opt_b = torch_cls(model_b.parameters(), maximize=maximize, **kwargs, **kernel)
    sign = -1.0 if maximize else 1.0
    train(model_a, opt_a, x, y, 6, sign)
    train(model_b, opt_b, x, y, 6, sign)
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(a, b)
    assert opt_a.adapted_lrs()[0].item() == pytest.approx(kwargs["lr"], rel=1e-7)


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
@pytest.mark.parametrize("cls", [AdamHD, AdamWHD, SGDHD])
def test_maximize_equals_minimizing_the_negated_loss(cls, weight_decay):
    model_a, x, y = make_model()
    model_b = copy.deepcopy(model_a)
    opt_a = cls(model_a.parameters(), lr=1e-2, hypergrad_lr=1e-3, maximize=True,
                weight_decay=weight_decay)
    opt_b = cls(model_b.parameters(), lr=1e-2, hypergrad_lr=1e-3, weight_decay=weight_decay)
    train(model_a, opt_a, x, y, 10, sign=-1.0)
    train(model_b, opt_b, x, y, 10)
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)
    assert opt_a.adapted_lrs()[0].item() != 1e-2


def test_one_global_alpha_for_every_tensor_and_group():
    """The reference implementation updates α inside its per-tensor loop, so later tensors are
    stepped with a different α. Here every tensor of every group moves by exactly -α_t g_t with
    one α_t = α_{t-1} + β Σ_all g_t·g_{t-1}."""
    model, x, y = make_model()
    layers = [m for m in model if isinstance(m, nn.Linear)]
    groups = [{"params": list(layers[0].parameters())},
              {"params": list(layers[1].parameters()) + list(layers[2].parameters())}]
    beta = 0.5
    optimizer = SGDHD(groups, lr=0.05, hypergrad_lr=beta)
    train(model, optimizer, x, y, 1)
    previous = [p.grad.clone() for p in model.parameters()]
    alpha_before = optimizer.adapted_lrs()[0]
    optimizer.zero_grad()
    ((model(x) - y) ** 2).mean().backward()
    before = [p.detach().clone() for p in model.parameters()]
    current = [p.grad.clone() for p in model.parameters()]
    optimizer.step()
    total = sum((g * h).sum() for g, h in zip(current, previous))
    expected_alpha = alpha_before + beta * total
    assert abs(total.item()) * beta > 1e-3 * alpha_before.item()  # the update is not negligible
    for alpha in optimizer.adapted_lrs():
        torch.testing.assert_close(alpha, expected_alpha, rtol=1e-14, atol=0)
    for p, b, g in zip(model.parameters(), before, current):
        torch.testing.assert_close(p.detach(), b - expected_alpha * g, rtol=1e-14, atol=1e-16)
    # The reference implementation's loop (α updated tensor by tensor, each tensor stepped with
    # the partial α) ends with the same α but moves the earlier tensors differently; the check
    # above would see it by many orders of magnitude more than its tolerance.
    alpha, buggy = alpha_before.clone(), []
    for b, g, h in zip(before, current, previous):
        alpha = alpha + beta * (g * h).sum()
        buggy.append(b - alpha * g)
    torch.testing.assert_close(alpha, expected_alpha, rtol=1e-14, atol=0)
    worst = max(((q - p.detach()).abs().max() / p.detach().abs().max()).item()
                for q, p in zip(buggy, model.parameters()))
    assert worst > 1e-6


def test_group_scope_adapts_each_group_from_its_own_hypergradient():
    model, x, y = make_model()
    layers = [m for m in model if isinstance(m, nn.Linear)]
    groups = [{"params": list(layers[0].parameters()), "lr": 0.02},
              {"params": list(layers[1].parameters()) + list(layers[2].parameters())}]
    optimizer = SGDHD(groups, lr=0.05, hypergrad_lr=0.5, hypergrad_scope="group")
    train(model, optimizer, x, y, 1)
    previous = [[p.grad.clone() for p in g["params"]] for g in groups]
    alphas = optimizer.adapted_lrs()
    optimizer.zero_grad()
    ((model(x) - y) ** 2).mean().backward()
    current = [[p.grad.clone() for p in g["params"]] for g in groups]
    optimizer.step()
    for alpha, before, now, prev in zip(optimizer.adapted_lrs(), alphas, current, previous):
        dot = sum((a * b).sum() for a, b in zip(now, prev))
        torch.testing.assert_close(alpha, before + 0.5 * dot, rtol=1e-14, atol=0)
    assert optimizer.adapted_lrs()[0] != optimizer.adapted_lrs()[1]


@pytest.mark.parametrize("cls,kwargs", [
    (AdamHD, {}), (AdamHD, dict(foreach=True, final_lr=5e-3)), (AdamWHD, {}),
    (SGDNHD, dict(momentum=0.9)), (SGDHD, {}), (SGDHD, dict(mode="multiplicative",
                                                             hyper_hypergrad_lr=1e-4))])
def test_checkpoint_mid_training_continues_identically(cls, kwargs):
    """Saved mid-training, loaded with torch.load's default (weights_only=True) into a fresh
    model and optimizer built with other values: α, the stored direction (SGD-HD) or the moments
    (Adam-HD) and the counters come back, and training continues bit for bit."""
    model, x, y = make_model(torch.float32)
    optimizer = cls(model.parameters(), lr=1e-2, hypergrad_lr=1e-3, **kwargs)
    train(model, optimizer, x, y, 5)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    train(model, optimizer, x, y, 5)

    buffer.seek(0)
    saved = torch.load(buffer)
    resumed, _, _ = make_model(torch.float32, seed=7)
    resumed.load_state_dict(saved["model"])
    optimizer2 = cls(resumed.parameters(), lr=123.0, hypergrad_lr=0.0, **kwargs)
    optimizer2.load_state_dict(saved["optimizer"])
    train(resumed, optimizer2, x, y, 5)
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(optimizer.adapted_lrs()[0], optimizer2.adapted_lrs()[0])
    assert optimizer.adapted_lrs()[0].item() != 1e-2
    assert optimizer2.hd_stats()[0]["steps"].item() == 10
    if "hd_direction" in optimizer.state[next(model.parameters())]:
        for a, b in zip(model.parameters(), resumed.parameters()):
            assert torch.equal(optimizer.state[a]["hd_direction"],
                               optimizer2.state[b]["hd_direction"])


def test_state_dict_is_a_snapshot():
    model, x, y = make_model()
    optimizer = AdamHD(model.parameters(), lr=1e-2, hypergrad_lr=1e-3)
    train(model, optimizer, x, y, 3)
    saved = optimizer.state_dict()
    alpha = saved["param_groups"][0]["hd_state"]["lr"].clone()
    train(model, optimizer, x, y, 3)
    assert torch.equal(saved["param_groups"][0]["hd_state"]["lr"], alpha)
    assert not torch.equal(optimizer.adapted_lrs()[0], alpha)


def state_bytes(optimizer):
    """Bytes of the optimizer's state tensors: per-parameter state and the groups' HD state."""
    total = 0
    for state in optimizer.state.values():
        total += sum(v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v))
    for group in optimizer.param_groups:
        total += sum(v.numel() * v.element_size() for v in group.get("hd_state", ())
                     if torch.is_tensor(v))
    return total


@pytest.mark.parametrize("kernel", [dict(fused=True), dict(foreach=True)])
def test_extra_state_bytes(kernel):
    """Counted in bytes: Adam-HD/AdamW-HD keep torch.optim.Adam/AdamW's state plus a few 0-d
    rate tensors (α, β, γ, h, counters: under 100 bytes per group); SGD-HD exactly one
    parameter-sized buffer more than torch.optim.SGD, SGDN-HD one more than Nesterov SGD."""
    model, x, y = make_model(torch.float32)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    pairs = [(AdamHD(model.parameters(), lr=1e-3, **kernel),
              torch.optim.Adam(model.parameters(), lr=1e-3, **kernel), 0),
             (AdamWHD(model.parameters(), lr=1e-3, **kernel),
              torch.optim.AdamW(model.parameters(), lr=1e-3, **kernel), 0),
             (SGDHD(model.parameters(), lr=1e-3, **kernel),
              torch.optim.SGD(model.parameters(), lr=1e-3, **kernel), param_bytes),
             (SGDNHD(model.parameters(), lr=1e-3, **kernel),
              torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, nesterov=True,
                              **kernel), param_bytes)]
    for hd_optimizer, base, expected in pairs:
        for optimizer in (hd_optimizer, base):
            train(model, optimizer, x, y, 2)
        extra = state_bytes(hd_optimizer) - state_bytes(base)
        assert expected <= extra < expected + 100, (type(hd_optimizer).__name__, extra)


def test_extra_state_buffers():
    """Adam-HD keeps exactly torch.optim.Adam's state; SGD-HD one param-sized buffer."""
    model, x, y = make_model()
    adam_hd = AdamHD(model.parameters(), lr=1e-2)
    train(model, adam_hd, x, y, 2)
    reference = torch.optim.Adam(model.parameters(), lr=1e-2)
    train(model, reference, x, y, 1)
    for p in model.parameters():
        assert set(adam_hd.state[p]) == set(reference.state[p])
    sgd_hd = SGDHD(model.parameters(), lr=1e-2)
    train(model, sgd_hd, x, y, 2)
    for p in model.parameters():
        assert set(sgd_hd.state[p]) == {"hd_direction"}
        assert sgd_hd.state[p]["hd_direction"].shape == p.shape


@pytest.mark.parametrize("composition", ["scale", "reset"])
def test_scheduler_composes_with_the_adapted_rate(composition):
    """StepLR multiplies group['lr'] by r at its milestones; group['lr'] holds the adapted rate
    γ_t after each step (docs/optim.md, "Logging the rate and schedulers"), so StepLR's write is
    r·α_t and the next step adapts from it, under either composition (they differ only for
    α_∞). The trajectory equals the functional rule with α multiplied by r at that step.
    (Before group['lr'] showed γ_t, StepLR scaled the scheduled value and ``reset`` set α to
    it: that encoded the old convention, where loggers saw the schedule, not the rate.)"""
    model, x, y = make_model()
    optimizer = AdamHD(model.parameters(), lr=1e-2, hypergrad_lr=1e-3,
                       scheduler_composition=composition)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    rule = hdfunc.adam_hd(1e-2, 1e-3)
    state = rule.init(params)

    def loss(p):
        return ((functional_call(model, p, (x,)) - y) ** 2).mean()

    for step in range(7):
        if step in (3, 6):  # StepLR halves lr before these steps
            node = hdfunc.find_lr_state(state)
            state = hdfunc.freeze_lr(state, node.lr * 0.5)
            state = hdfunc.freeze_hypergrad_lr(state, torch.tensor(1e-3, dtype=torch.float64))
        updates, state = rule.update(grad(loss)(params), state, params)
        params = hdfunc.apply_updates(params, updates)
        train(model, optimizer, x, y, 1)
        scheduler.step()
    torch.testing.assert_close(optimizer.adapted_lrs()[0], hdfunc.get_lr(state), rtol=1e-12,
                               atol=0)
    assert max_error(model, params) < 1e-13
    assert optimizer.param_groups[0]["lr"] == optimizer.hd_stats()[0]["applied_lr"].item()
    assert optimizer.param_groups[0]["lr"] != pytest.approx(2.5e-3, rel=1e-3)  # not the schedule


def test_nonfinite_hypergradient_is_skipped_and_counted():
    model, x, y = make_model()
    optimizer = SGDHD(model.parameters(), lr=1e-2, hypergrad_lr=1e-2)
    train(model, optimizer, x, y, 3)
    alpha = optimizer.adapted_lrs()[0]
    optimizer.zero_grad()
    ((model(x) - y) ** 2).mean().backward()
    first = next(model.parameters())
    first.grad[0, 0] = float("inf")
    with pytest.warns(RuntimeWarning, match=r"SGDHD: 1 of 4 steps so far left α unchanged"):
        optimizer.step()
    stats = optimizer.hd_stats()[0]
    assert torch.equal(optimizer.adapted_lrs()[0], alpha)
    assert not torch.isfinite(stats["hypergrad"])
    assert stats["skipped"].item() == 1 and stats["steps"].item() == 4

    unguarded = SGDHD(model.parameters(), lr=1e-2, hypergrad_lr=1e-2, skip_nonfinite=False)
    train(model, unguarded, x, y, 1)
    with torch.no_grad():
        first.grad[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match=r"made α non-finite \(skip_nonfinite=False\)"):
        unguarded.step()
    assert torch.isnan(unguarded.adapted_lrs()[0])  # the guard is what kept α finite above


def test_lr_bounds_clamp_alpha():
    model, x, y = make_model()
    optimizer = SGDHD(model.parameters(), lr=1e-2, hypergrad_lr=100.0, lr_bounds=(1e-3, 2e-2))
    train(model, optimizer, x, y, 4)
    assert optimizer.adapted_lrs()[0].item() in (1e-3, 2e-2)


def test_closure_and_zero_grad():
    model, x, y = make_model()
    twin = copy.deepcopy(model)
    optimizer = AdamHD(model.parameters(), lr=1e-2, hypergrad_lr=1e-3)
    reference = AdamHD(twin.parameters(), lr=1e-2, hypergrad_lr=1e-3)

    def closure():
        optimizer.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        return loss

    for _ in range(4):
        loss = optimizer.step(closure)
        assert torch.is_tensor(loss) and loss.requires_grad
    train(twin, reference, x, y, 4)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)
    optimizer.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_params_without_grad_are_left_alone():
    model, x, y = make_model()
    frozen = model[-1].weight
    frozen.requires_grad_(False)
    before = frozen.detach().clone()
    optimizer = SGDHD(model.parameters(), lr=1e-2, hypergrad_lr=1e-2)
    train(model, optimizer, x, y, 3)
    assert torch.equal(frozen, before) and frozen not in optimizer.state


@pytest.mark.parametrize("bad,error", [
    (dict(mode="sideways"), ValueError), (dict(hypergrad_lr=-1.0), ValueError),
    (dict(hypergrad_scope="tensor"), ValueError), (dict(lr=torch.tensor(0.1)), TypeError),
    (dict(nesterov=True), ValueError), (dict(lr_bounds=(1.0, 0.1)), ValueError),
    (dict(scheduler_composition="add"), ValueError), (dict(fused=True, foreach=True), ValueError),
])
def test_bad_options_are_rejected(bad, error):
    model, _, _ = make_model()
    with pytest.raises(error):
        SGDHD(model.parameters(), **{"lr": 1e-2, **bad})


def test_bad_adam_betas_are_rejected():
    model, _, _ = make_model()
    with pytest.raises(ValueError, match="betas"):
        AdamHD(model.parameters(), betas=(0.9, 1.5))


@pytest.mark.parametrize("cls,kwargs", [
    (AdamHD, {}), (AdamHD, dict(foreach=True)), (AdamWHD, dict(foreach=False, fused=False)),
    (SGDHD, dict(foreach=True)), (SGDNHD, dict(fused=True))])
def test_compiled_step_matches_eager(cls, kwargs):
    """torch.compile(optimizer.step) (dynamo with the eager backend, to keep CI fast) takes the
    eager steps, and α changing every step causes no recompilation (the rate reaches torch's
    kernel as a tensor, not as a Python float baked into the graph)."""
    torch._dynamo.reset()
    model, x, y = make_model(torch.float32)
    twin = copy.deepcopy(model)
    optimizer = cls(model.parameters(), lr=1e-2, hypergrad_lr=1e-3, **kwargs)
    reference = cls(twin.parameters(), lr=1e-2, hypergrad_lr=1e-3, **kwargs)
    compiled_step = torch.compile(optimizer.step, backend="eager")

    def compiled_train(steps):
        for _ in range(steps):
            optimizer.zero_grad()
            ((model(x) - y) ** 2).mean().backward()
            compiled_step()

    compiled_train(3)  # the first steps create the state: compiled graphs for both layouts
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled_train(3)
    train(twin, reference, x, y, 6)
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(optimizer.adapted_lrs()[0], reference.adapted_lrs()[0],
                               rtol=1e-5, atol=0)
    assert optimizer.adapted_lrs()[0].item() != 1e-2


@pytest.mark.parametrize("cls", [AdamHD, SGDHD])
def test_an_empty_param_group_shares_the_global_rate(cls):
    """A group left without parameters (ZeroRedundancyOptimizer's partition can do this on some
    rank) keeps a rate state and, under the global scope, the same α as the others."""
    model, x, y = make_model()
    optimizer = cls([{"params": list(model.parameters())}, {"params": []}], lr=1e-2,
                    hypergrad_lr=1e-3)
    train(model, optimizer, x, y, 4)
    alphas = optimizer.adapted_lrs()
    assert alphas[0].item() != 1e-2 and torch.equal(alphas[0], alphas[1])


@pytest.mark.parametrize("cls,kwargs", [(AdamHD, {}), (AdamWHD, dict(weight_decay=0.1)),
                                        (AdamHD, dict(foreach=False, fused=False))])
def test_adam_tensors_with_different_step_counts(cls, kwargs):
    """A tensor without a gradient at some steps keeps a smaller step count: its d_{t-1} uses its
    own bias corrections. Oracle: h_t = -Σ g·d_{t-1} written out from torch's Adam state."""
    model, x, y = make_model()
    beta = 1e-3
    optimizer = cls(model.parameters(), lr=1e-2, hypergrad_lr=beta, **kwargs)
    skipped = model[0].weight
    for step in range(5):
        optimizer.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        if step in (1, 2):
            skipped.grad = None  # steps 2 and 3 leave this tensor alone
        optimizer.step()
    counts = {optimizer.state[p]["step"].item() for p in model.parameters()}
    assert counts == {3.0, 5.0}
    optimizer.zero_grad()
    ((model(x) - y) ** 2).mean().backward()
    beta1, beta2 = 0.9, 0.999
    gamma = optimizer.hd_stats()[0]["applied_lr"]
    hypergrad = torch.zeros((), dtype=torch.float64)
    for p in model.parameters():
        state = optimizer.state[p]
        t = state["step"].item()
        d = ((state["exp_avg"] / (1 - beta1 ** t))
             / ((state["exp_avg_sq"] / (1 - beta2 ** t)).sqrt() + 1e-8))
        if cls is AdamWHD:  # u_{t-1} = -γ(a + λθ_{t-2}), θ_{t-2} = (θ_{t-1} + γa) / (1 - γλ)
            d = d + 0.1 * (p.detach() + gamma * d) / (1 - gamma * 0.1)
        hypergrad -= (p.grad * d).sum()
    alpha = optimizer.adapted_lrs()[0]
    optimizer.step()
    torch.testing.assert_close(optimizer.adapted_lrs()[0], alpha - beta * hypergrad,
                               rtol=1e-13, atol=0)
    assert abs(beta * hypergrad.item()) > 1e-9 * alpha.item()


# ----------------------------------------------------------------------------- the rate state

# The keys a state dict has saved since the first release (older checkpoints must load).
SAVED_RATE_KEYS = ("count", "lr", "hypergrad_lr", "applied_lr", "hypergrad", "final_lr",
                   "lr_sensitivity", "hyper_hypergrad", "skipped", "scheduled_lr",
                   "scheduled_hypergrad_lr")
SAVED_GROUP_KEYS = ("hypergrad_lr", "mode", "final_lr", "hyper_hypergrad_lr", "lr_bounds",
                    "skip_nonfinite")
RATE_STATE_CASES = [(AdamHD, dict(final_lr=5e-3, hyper_hypergrad_lr=1e-4)),
                    (AdamWHD, dict(mode="multiplicative", hypergrad_lr=2e-2)),
                    (SGDHD, dict(final_lr=5e-3, hyper_hypergrad_lr=1e-4)),
                    (SGDNHD, dict(momentum=0.9, lr_bounds=(0.0, 1.0)))]


def test_hd_keys_are_derived_from_hd_options():
    """The HD options of a group are HDOptions's fields but lr_granularity and lr_schedule; the
    saved keys are those of the first release."""
    from hdfunc.optim import base
    assert base.HD_OPTION_KEYS == tuple(name for name in hdfunc.HDOptions.names()
                                        if name not in ("lr_granularity", "lr_schedule"))
    assert base.HD_GROUP_KEYS == SAVED_GROUP_KEYS
    assert base.HD_STATE_KEYS == SAVED_RATE_KEYS
    model, _, _ = make_model()
    for cls in (SGDHD, AdamHD):
        defaults = cls(model.parameters()).defaults
        assert set(base.HD_OPTION_KEYS) | {"lr", "hypergrad_lr"} <= set(defaults)


def assert_same_rate_state(a, b):
    assert type(a) is type(b) is hdfunc.HDState
    for name, x, y in zip(hdfunc.HDState._fields, a, b):
        if isinstance(x, torch.Tensor):
            assert isinstance(y, torch.Tensor) and x.dtype == y.dtype and torch.equal(x, y), name
        else:
            assert x == y == (), name


@pytest.mark.parametrize("cls,kwargs", RATE_STATE_CASES)
def test_rate_state_is_an_hdstate_and_round_trips_through_a_checkpoint(cls, kwargs):
    """group["hd_state"] is an hdfunc.HDState (no direction, no base: torch's per-parameter
    state holds those); state_dict() saves it as a dict of the first release's keys, which
    torch.load(weights_only=True) reads, and load_state_dict makes the same HDState again:
    the next steps are identical."""
    kwargs = {"lr": 1e-2, "hypergrad_lr": 1e-3, **kwargs}
    model, x, y = make_model()
    optimizer = cls(model.parameters(), **kwargs)
    train(model, optimizer, x, y, 4)
    state = optimizer.param_groups[0]["hd_state"]
    assert isinstance(state, hdfunc.HDState) and state.direction == () and state.base == ()
    if "hyper_hypergrad_lr" in kwargs:
        assert all(isinstance(v, torch.Tensor) for v in (state.final_lr, state.lr_sensitivity,
                                                          state.hyper_hypergrad))
    saved = optimizer.state_dict()
    group = saved["param_groups"][0]
    assert isinstance(group["hd_state"], dict) and tuple(group["hd_state"]) == SAVED_RATE_KEYS
    assert "transition" not in group and "hd_scheduled" not in group
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": saved}, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    resumed, _, _ = make_model(seed=7)
    resumed.load_state_dict(loaded["model"])
    optimizer2 = cls(resumed.parameters(), **{**kwargs, "lr": 123.0, "hypergrad_lr": 0.0})
    optimizer2.load_state_dict(loaded["optimizer"])
    assert_same_rate_state(optimizer.param_groups[0]["hd_state"],
                           optimizer2.param_groups[0]["hd_state"])
    assert optimizer.param_groups[0]["hd_scheduled"] == optimizer2.param_groups[0]["hd_scheduled"]
    for _ in range(3):
        train(model, optimizer, x, y, 1)
        train(resumed, optimizer2, x, y, 1)
        assert all(torch.equal(a, b) for a, b in zip(model.parameters(), resumed.parameters()))
        assert_same_rate_state(optimizer.param_groups[0]["hd_state"],
                               optimizer2.param_groups[0]["hd_state"])
        assert optimizer.param_groups[0]["lr"] == optimizer2.param_groups[0]["lr"]


def old_format_state_dict(optimizer):
    """A state dict written out by hand as the first release saved it: the HD rate state a
    plain dict of SAVED_RATE_KEYS (tensors, () for an option that is off, two floats)."""
    groups = []
    index = 0
    for group in optimizer.param_groups:
        stats = optimizer.hd_stats()[len(groups)]
        state = group["hd_state"]
        hd_state = {"count": stats["steps"].clone(), "lr": stats["lr"],
                    "hypergrad_lr": stats["hypergrad_lr"], "applied_lr": stats["applied_lr"],
                    "hypergrad": stats["hypergrad"],
                    "final_lr": state.final_lr if state.final_lr == () else state.final_lr.clone(),
                    "lr_sensitivity": (() if state.lr_sensitivity == ()
                                       else state.lr_sensitivity.clone()),
                    "hyper_hypergrad": (() if state.hyper_hypergrad == ()
                                        else state.hyper_hypergrad.clone()),
                    "skipped": stats["skipped"].clone(), "scheduled_lr": float(group["lr"]),
                    "scheduled_hypergrad_lr": float(group["hypergrad_lr"])}
        saved = {key: value for key, value in group.items()
                 if key not in ("params", "hd_state", "hd_scheduled", "transition")}
        n = len(group["params"])
        groups.append({**saved, "hd_state": hd_state, "params": list(range(index, index + n))})
        index += n
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = {i: {key: value.clone() for key, value in optimizer.state[p].items()}
             for i, p in enumerate(params) if p in optimizer.state}
    return {"state": state, "param_groups": groups}


@pytest.mark.parametrize("cls,kwargs", RATE_STATE_CASES)
def test_a_checkpoint_of_the_first_release_format_loads(cls, kwargs):
    """A state dict whose rate state is the first release's dict loads through load_state_dict,
    and also where ZeroRedundancyOptimizer puts it (it copies loaded groups into the local
    optimizer's, bypassing load_state_dict): training continues bit for bit."""
    kwargs = {"lr": 1e-2, "hypergrad_lr": 1e-3, **kwargs}
    model, x, y = make_model()
    optimizer = cls(model.parameters(), **kwargs)
    train(model, optimizer, x, y, 4)
    saved = old_format_state_dict(optimizer)
    twins = []
    for route in ("load_state_dict", "into_the_group"):
        twin = copy.deepcopy(model)
        other = cls(twin.parameters(), **kwargs)
        if route == "load_state_dict":
            other.load_state_dict(copy.deepcopy(saved))
        else:
            train(twin, other, x, y, 1)  # per-parameter state as torch's load would leave it
            for key, value in copy.deepcopy(saved)["param_groups"][0].items():
                if key != "params":
                    other.param_groups[0][key] = value
            twin.load_state_dict(model.state_dict())
            for p, q in zip(model.parameters(), twin.parameters()):
                other.state[q] = {k: v.clone() for k, v in optimizer.state[p].items()}
        twins.append((twin, other))
    train(model, optimizer, x, y, 3)
    for twin, other in twins:
        train(twin, other, x, y, 3)
        assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))
        assert_same_rate_state(optimizer.param_groups[0]["hd_state"],
                               other.param_groups[0]["hd_state"])
