"""Heavy-ball momentum: the ``sgdm`` base rule (torch.optim.SGD(momentum=μ)), its HD variant
``sgdm_hd``, and the rules that adapt more than α (``sgdm_hd_lr_momentum``,
``adam_hd_lr_beta1``), each against a literal hand-written loop of its equations."""

from __future__ import annotations

import math

import pytest
import torch
from torch.func import grad

import hdfunc
from hdfunc.hyperdescent import get_hyperparams
from hdfunc.rules import adam_hd_lr_beta1, sgdm_hd, sgdm_hd_lr_momentum
from hdfunc.tree import tree_flatten, tree_unflatten
from helpers import make_problem

F64 = torch.float64
STEPS = 15


def flat_problem():
    params, loss = make_problem()
    leaves, spec = tree_flatten(params)
    sizes = [p.numel() for p in leaves]
    shapes = [p.shape for p in leaves]

    def unflatten(x: torch.Tensor):
        return tree_unflatten([c.reshape(s) for c, s in zip(x.split(sizes), shapes)], spec)

    def flat_grad(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([g.reshape(-1) for g in tree_flatten(grad(loss)(unflatten(x)))[0]])

    return torch.cat([p.reshape(-1) for p in leaves]), flat_grad, params, loss


def run_rule(rule, params, loss, steps=STEPS):
    state = rule.init(params)
    for _ in range(steps):
        updates, state = rule.update(grad(loss)(params), state, params)
        params = hdfunc.apply_updates(params, updates)
    return torch.cat([p.reshape(-1) for p in tree_flatten(params)[0]]), state


def test_sgdm_hd_is_the_literal_heavy_ball_hd_loop():
    """h_t = -g_t·v_{t-1}; α_t = α_{t-1} - β h_t; v_t = μ v_{t-1} + g_t; θ_t = θ_{t-1} - α_t v_t."""
    theta, flat_grad, params, loss = flat_problem()
    lr, beta, mu = 0.05, 0.01, 0.8
    v = torch.zeros_like(theta)
    for _ in range(STEPS):
        g = flat_grad(theta)
        lr = lr - beta * (-(g @ v))
        v = mu * v + g
        theta = theta - lr * v
    ours, state = run_rule(sgdm_hd(0.05, beta, momentum=mu), params, loss)
    torch.testing.assert_close(ours, theta, rtol=1e-12, atol=1e-14)
    assert math.isclose(float(hdfunc.get_lr(state)), float(lr), rel_tol=1e-12)


def test_sgdm_hd_at_zero_beta_is_torch_sgd_with_momentum_and_its_class_twin_matches():
    _, _, params, loss = flat_problem()
    ours, _ = run_rule(sgdm_hd(0.05, 0.0, momentum=0.8, weight_decay=0.01), params, loss)
    leaves, spec = tree_flatten(params)
    tensors = [p.clone().requires_grad_() for p in leaves]
    optimizer = torch.optim.SGD(tensors, lr=0.05, momentum=0.8, weight_decay=0.01)
    for _ in range(STEPS):
        optimizer.zero_grad()
        loss(tree_unflatten(tensors, spec)).backward()
        optimizer.step()
    torch.testing.assert_close(ours, torch.cat([t.detach().reshape(-1) for t in tensors]),
                               rtol=1e-12, atol=1e-14)
    # the optimizer class registered for sgdm_hd, with β > 0
    ours, state = run_rule(sgdm_hd(0.05, 0.01, momentum=0.8), params, loss)
    info = hdfunc.rule_info("sgdm_hd")
    tensors = [p.clone().requires_grad_() for p in leaves]
    optimizer = info.optimizer_class()(tensors, **{**info.optimizer_options, "lr": 0.05,
                                                   "hypergrad_lr": 0.01, "momentum": 0.8})
    for _ in range(STEPS):
        optimizer.zero_grad()
        loss(tree_unflatten(tensors, spec)).backward()
        optimizer.step()
    torch.testing.assert_close(ours, torch.cat([t.detach().reshape(-1) for t in tensors]),
                               rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(optimizer.adapted_lrs()[0], hdfunc.get_lr(state),
                               rtol=1e-10, atol=0)


@pytest.mark.parametrize("mode", ["additive", "multiplicative"])
def test_sgdm_hd_lr_momentum_is_the_literal_loop(mode):
    """h_α = -g_t·v_{t-1}, h_μ = -α_{t-1} g_t·v_{t-2} (the one-step derivatives of
    u_{t-1} = -α (μ v_{t-2} + g_{t-1})), each applied by Eq. 3 or Eq. 8, then projected."""
    theta, flat_grad, params, loss = flat_problem()
    lr, mu = 0.05, 0.5
    beta_lr, beta_mu = (0.02, 0.02) if mode == "multiplicative" else (0.01, 0.05)
    v_prev = v = torch.zeros_like(theta)  # v_{t-2}, v_{t-1}
    du_dlr = du_dmu = torch.zeros_like(theta)
    moved = False
    for _ in range(STEPS):
        g = flat_grad(theta)
        h_lr, h_mu = g @ du_dlr, g @ du_dmu
        if mode == "additive":
            new_lr, new_mu = lr - beta_lr * h_lr, mu - beta_mu * h_mu
        else:
            def scaled(value, rate, h, tangent):
                norms = g.norm() * tangent.norm()
                return value if norms == 0 else value * (1 - rate * h / norms)
            new_lr, new_mu = scaled(lr, beta_lr, h_lr, du_dlr), scaled(mu, beta_mu, h_mu, du_dmu)
        lr, mu = max(new_lr, 0.0), min(max(new_mu, 0.0), 1 - 1e-6)
        moved = moved or abs(float(mu) - 0.5) > 1e-4
        v_prev, v = v, mu * v + g
        du_dlr, du_dmu = -v, -lr * v_prev
        theta = theta - lr * v
    ours, state = run_rule(sgdm_hd_lr_momentum(0.05, beta_lr, beta_mu, momentum=0.5, mode=mode),
                           params, loss)
    assert moved  # μ was adapted, not only carried
    torch.testing.assert_close(ours, theta, rtol=1e-11, atol=1e-13)
    values = get_hyperparams(state)
    assert math.isclose(float(values["momentum"]), float(mu), rel_tol=1e-11)
    assert math.isclose(float(values["lr"]), float(lr), rel_tol=1e-11)


def test_adam_hd_lr_beta1_is_the_literal_loop():
    """Adam with α and β1 adapted: ∂u_{t-1}/∂β1 = -α ∂m̂_{t-1}/∂β1 / (√v̂_{t-1} + ε) with
    ∂m̂/∂β1 = (m_{t-2} - g_{t-1})/c1 + (t-1) β1^(t-2) m_{t-1}/c1² (c1 = 1 - β1^(t-1))."""
    theta, flat_grad, params, loss = flat_problem()
    lr, b1, b2, eps = 0.01, 0.8, 0.999, 1e-8
    beta_lr, beta_b1 = 1e-4, 1e-2
    m = v = torch.zeros_like(theta)
    du_dlr = du_db1 = torch.zeros_like(theta)
    start_b1 = b1
    for t in range(1, STEPS + 1):
        g = flat_grad(theta)
        lr = max(lr - beta_lr * (g @ du_dlr), 0.0)
        b1 = min(max(b1 - beta_b1 * (g @ du_db1), 0.0), 1 - 1e-6)
        m_prev = m
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        c1, c2 = 1 - b1 ** t, 1 - b2 ** t
        denom = (v / c2).sqrt() + eps
        dm_hat = (m_prev - g) / c1 + t * b1 ** (t - 1) * m / c1 ** 2
        du_dlr, du_db1 = -(m / c1) / denom, -lr * dm_hat / denom
        theta = theta - lr * (m / c1) / denom
    ours, state = run_rule(adam_hd_lr_beta1(0.01, beta_lr, beta_b1, betas=(0.8, 0.999)),
                           params, loss)
    assert abs(float(b1) - start_b1) > 1e-4
    torch.testing.assert_close(ours, theta, rtol=1e-10, atol=1e-12)
    assert math.isclose(float(get_hyperparams(state)["betas[0]"]), float(b1),
                        rel_tol=1e-10)
