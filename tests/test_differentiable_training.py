"""Differentiating the loss after K steps of Adam / Adam-HD / AdamW-HD / RMSprop-HD with respect to
the initial learning rate α_0 and the hypergradient learning rate β (``eps_root``).

Algorithm 3 of Baydin et al. (docs/algorithms.md, "Adam and Adam-HD") divides by √v̂_t + ε. A gradient
entry that has been exactly 0 at every step (a dead ReLU unit) has v̂ = 0, where √ has an infinite
derivative, and the chain rule through it makes d loss_K / d α_0 NaN (0 · ∞). With ``eps_root``
the rules divide by √(v̂_t + ε_root) + ε, which is differentiable at 0.

Oracles: forward mode (``torch.func.jvp``) against reverse mode; a float64 Richardson-extrapolated
central difference whose steps are checked not to cross a ReLU kink; torch.optim.Adam and a frozen
transcription of the previous arithmetic (eps_root = 0, bit for bit); an independent transcription
of m̂ / (√(v̂ + ε_root) + ε) (eps_root > 0).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.func import grad, jvp, vmap

import hdfunc
from hdfunc.tree import tree_flatten, tree_leaves, tree_unflatten
from helpers import make_problem, run

F64 = torch.float64
ROOT = hdfunc.DIFFERENTIABLE_EPS_ROOT

# ----------------------------------------------------------------------------- the network

N, D_IN, HIDDEN, CLASSES, DEAD = 32, 6, 16, 3, 4  # the first DEAD hidden units are dead
K = 20  # training steps
LR0, BETA0 = 1e-2, 1e-4
# Finite-difference steps: powers of two, so x0 ± h, x0 ± h/2, x0 ± h/4 are exact in float64
# (LR0 lies in [2^-7, 2^-6), BETA0 in [2^-14, 2^-13)); small enough that no ReLU kink is crossed
# (checked), large enough that rounding (~1e-16 / h) stays far below the tolerance.
H_LR, H_BETA = 2.0 ** -23, 2.0 ** -27


def make_net(seed: int = 0, dead: int = DEAD):
    """A float64 ReLU MLP (D_IN → HIDDEN → CLASSES, cross-entropy on N samples) whose first
    ``dead`` hidden units have a bias of -50: their pre-activation is < 0 on every sample, so
    their incoming weights and biases get exactly-zero gradients."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D_IN, generator=gen, dtype=F64)
    y = torch.randint(0, CLASSES, (N,), generator=gen)
    bias = torch.zeros(HIDDEN, dtype=F64)
    bias[:dead] = -50.0
    params = {"w1": torch.randn(D_IN, HIDDEN, generator=gen, dtype=F64) / D_IN ** 0.5,
              "b1": bias,
              "w2": torch.randn(HIDDEN, CLASSES, generator=gen, dtype=F64) / HIDDEN ** 0.5,
              "b2": torch.zeros(CLASSES, dtype=F64)}

    def preactivation(p):
        return x @ p["w1"] + p["b1"]

    def loss(p):
        hidden = torch.relu(preactivation(p))
        return torch.nn.functional.cross_entropy(hidden @ p["w2"] + p["b2"], y)

    return params, loss, preactivation


NET = make_net()

# name -> factory of (α_0, β, eps_root); "adam" has no β
RULES = {
    "adam_hd": lambda lr, beta, eps_root: hdfunc.adam_hd(lr, beta, eps_root=eps_root),
    "adam": lambda lr, beta, eps_root: hdfunc.adam(lr, eps_root=eps_root),
    "adamw_hd": lambda lr, beta, eps_root: hdfunc.adamw_hd(lr, beta, eps_root=eps_root),
    "rmsprop_hd": lambda lr, beta, eps_root: hdfunc.hd_rule(
        hdfunc.scale_by_rms(0.99, eps_root=eps_root), lr, beta, name="rmsprop_hd"),
}


def train(name: str, lr, beta, eps_root: float, net=NET, steps: int = K):
    """``steps`` steps of a rule (a plain functional loop); returns the final loss, the
    pre-activations at every visited point (steps + 1, N, HIDDEN) and the final state."""
    params, loss, preactivation = net
    rule = RULES[name](lr, beta, eps_root)
    p, state = params, rule.init(params)
    visited = [preactivation(p)]
    for _ in range(steps):
        updates, state = rule.update(grad(loss)(p), state, p)
        p = hdfunc.apply_updates(p, updates)
        visited.append(preactivation(p))
    return loss(p), torch.stack(visited), state


def loss_after(name: str, eps_root: float):
    """α_0, β ↦ loss_K: the function whose derivatives are checked."""
    return lambda lr, beta: train(name, lr, beta, eps_root)[0]


def scalar(value: float) -> torch.Tensor:
    return torch.tensor(value, dtype=F64)


def central_difference(f, x0: float, h: float, reference_pattern: torch.Tensor):
    """f'(x0) by central differences at steps h, h/2, h/4, Richardson-extrapolated twice
    (error O(h^6)), and an estimate of its error (the gap between the two O(h^4) estimates, a
    bound for the O(h^4) one). ``f(x)`` returns (value, ReLU activation pattern along the
    trajectory); every evaluated point must have the pattern of x0, i.e. no kink lies within."""
    central = []
    for k in range(3):
        step = h / 2 ** k
        (up, up_pattern), (down, down_pattern) = f(x0 + step), f(x0 - step)
        assert torch.equal(up_pattern, reference_pattern) and torch.equal(
            down_pattern, reference_pattern), f"a ReLU kink lies within ±{step:g} of {x0:g}"
        central.append((up - down) / (2 * step))
    once = [(4 * central[k + 1] - central[k]) / 3 for k in range(2)]
    return (16 * once[1] - once[0]) / 15, abs(once[1] - once[0])


# ----------------------------------------------------------------------------- the problem


def test_the_net_has_dead_units_whose_adam_moments_stay_exactly_zero():
    params, loss, preactivation = NET
    g = grad(loss)(params)
    assert torch.equal(g["w1"][:, :DEAD], torch.zeros(D_IN, DEAD, dtype=F64))
    assert torch.equal(g["b1"][:DEAD], torch.zeros(DEAD, dtype=F64))
    assert (g["w1"][:, DEAD:] != 0).any(dim=0).all()  # every live unit learns
    for eps_root in (0.0, ROOT):
        _, visited, state = train("adam_hd", scalar(LR0), scalar(BETA0), eps_root)
        assert (visited[:, :, :DEAD] < -40).all()  # dead on every sample, all along
        nu = hdfunc.find_lr_state(state).base.nu
        assert torch.equal(nu["w1"][:, :DEAD], torch.zeros(D_IN, DEAD, dtype=F64))
        assert torch.equal(nu["b1"][:DEAD], torch.zeros(DEAD, dtype=F64))
        assert (nu["w1"][:, DEAD:] > 0).any(dim=0).all()


# ------------------------------------------------------------------------- eps_root = 0: NaN


@pytest.mark.parametrize("name", sorted(RULES))
def test_without_eps_root_the_derivative_through_training_is_nan(name, one_torch_thread):
    """The problem eps_root solves: √v̂ at v̂ = 0 puts 0 · ∞ into reverse and forward mode."""
    lr, beta = scalar(LR0), scalar(BETA0)
    f = loss_after(name, 0.0)
    assert torch.isfinite(f(lr, beta))  # training itself is fine
    assert torch.isnan(grad(f)(lr, beta))
    _, forward = jvp(lambda a: f(a, beta), (lr,), (torch.ones_like(lr),))
    assert torch.isnan(forward)
    if name != "adam":
        assert torch.isnan(grad(f, argnums=1)(lr, beta))


def test_without_dead_units_the_derivative_is_finite_even_without_eps_root(one_torch_thread):
    """The cause is the exactly-zero gradient entries: the same net with every unit alive has a
    finite derivative with eps_root = 0, which eps_root = DIFFERENTIABLE_EPS_ROOT leaves
    unchanged to ~1e-12."""
    alive = make_net(dead=0)
    lr, beta = scalar(LR0), scalar(BETA0)
    plain = grad(lambda a: train("adam_hd", a, beta, 0.0, net=alive)[0])(lr)
    rooted = grad(lambda a: train("adam_hd", a, beta, ROOT, net=alive)[0])(lr)
    assert torch.isfinite(plain)
    torch.testing.assert_close(rooted, plain, rtol=1e-10, atol=0)


# ----------------------------------------------------------------------------- with eps_root


@pytest.mark.parametrize("name", sorted(RULES))
def test_derivatives_through_training_match_forward_mode_and_finite_differences(
        name, one_torch_thread):
    lr, beta = scalar(LR0), scalar(BETA0)
    f = loss_after(name, ROOT)
    d_lr, d_beta = grad(f, argnums=(0, 1))(lr, beta)
    _, forward_lr = jvp(lambda a: f(a, beta), (lr,), (torch.ones_like(lr),))
    _, forward_beta = jvp(lambda b: f(lr, b), (beta,), (torch.ones_like(beta),))
    assert torch.isfinite(d_lr) and torch.isfinite(d_beta)
    torch.testing.assert_close(forward_lr, d_lr, rtol=1e-10, atol=0)
    torch.testing.assert_close(forward_beta, d_beta, rtol=1e-10, atol=0)

    pattern = train(name, lr, beta, ROOT)[1] > 0

    def at_lr(a):
        value, visited, _ = train(name, scalar(a), beta, ROOT)
        return value.item(), visited > 0

    fd_lr, error_lr = central_difference(at_lr, LR0, H_LR, pattern)
    assert error_lr < 1e-8 * abs(fd_lr), (fd_lr, error_lr)
    assert abs(d_lr.item() - fd_lr) <= 1e-6 * abs(fd_lr), (d_lr.item(), fd_lr)
    assert abs(fd_lr) > 1.0  # α_0 matters: the check is not vacuous

    if name == "adam":
        assert d_beta.item() == 0.0  # no hypergradient descent: β is not used
        return

    def at_beta(b):
        value, visited, _ = train(name, lr, scalar(b), ROOT)
        return value.item(), visited > 0

    fd_beta, error_beta = central_difference(at_beta, BETA0, H_BETA, pattern)
    assert error_beta < 1e-8 * abs(fd_beta), (fd_beta, error_beta)
    assert abs(d_beta.item() - fd_beta) <= 1e-6 * abs(fd_beta), (d_beta.item(), fd_beta)
    assert abs(fd_beta) > 1.0


def test_derivative_through_training_batches_under_vmap(one_torch_thread):
    f = loss_after("adam_hd", ROOT)
    beta = scalar(BETA0)
    lrs = torch.tensor([LR0, 2 * LR0], dtype=F64)
    batched = vmap(grad(lambda a: f(a, beta)))(lrs)
    looped = torch.stack([grad(f)(a, beta) for a in lrs])
    torch.testing.assert_close(batched, looped, rtol=1e-12, atol=0)


# --------------------------------------------------------------------- eps_root = 0: unchanged


def previous_adam_direction(b1, b2, eps):
    """The arithmetic of scale_by_adam before eps_root (that of torch.optim.Adam's denominator,
    √v / √(1-β2^t) + ε), transcribed: d_t and the recomputed d_{t-1} must equal it bit for bit."""

    def direction(t, m, v):
        if t == 0:
            return torch.zeros_like(m)
        count = torch.tensor(float(t), dtype=F64)
        c1 = (1 - b1 ** count).to(m.dtype)
        c2_sqrt = (1 - b2 ** count).sqrt().to(m.dtype)
        return (m / c1) / (v.sqrt() / c2_sqrt + eps)

    return direction


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("b1,b2,eps", [(0.9, 0.999, 1e-8), (0.8, 0.99, 1e-6)])
def test_eps_root_zero_is_the_previous_adam_arithmetic_bit_for_bit(dtype, b1, b2, eps):
    params, loss = make_problem(dtype=dtype)
    transform = hdfunc.scale_by_adam(b1, b2, eps, eps_root=0.0)
    previous = previous_adam_direction(b1, b2, eps)
    state = transform.init(params)
    leaves = tree_flatten(params)[0]
    m = [torch.zeros_like(p) for p in leaves]
    v = [torch.zeros_like(p) for p in leaves]
    p = params
    for t in range(1, 8):
        g = grad(loss)(p)
        # previous_output (Adam-HD's d_{t-1}) before the step, the direction d_t after it
        recomputed = tree_leaves(transform.previous_output(state))
        for x, mi, vi in zip(recomputed, m, v, strict=True):
            assert torch.equal(x, previous(t - 1, mi, vi))
        d, state = transform.update(g, state, p)
        m = [b1 * mi + (1 - b1) * gi for mi, gi in zip(m, tree_leaves(g))]
        v = [b2 * vi + (1 - b2) * gi * gi for vi, gi in zip(v, tree_leaves(g))]
        for x, mi, vi in zip(tree_leaves(d), m, v, strict=True):
            assert torch.equal(x, previous(t, mi, vi))
        p = tree_unflatten([pi - 0.01 * di for pi, di in zip(tree_leaves(p), tree_leaves(d))],
                           tree_flatten(p)[1])


def assert_equal_and_matches_torch_optim(rule, default_rule, make_torch, steps: int = 10):
    """On ``make_problem()``, ``steps`` steps of ``rule`` equal those of ``default_rule`` bit for
    bit, and match the torch.optim optimizer ``make_torch(params)`` to rtol 1e-10, atol 1e-12,
    after every step."""
    params, loss = make_problem()
    leaves, spec = tree_flatten(params)
    torch_params = [p.clone().requires_grad_() for p in leaves]
    optimizer = make_torch(torch_params)
    history, default = run(rule, params, loss, steps), run(default_rule, params, loss, steps)
    for (p, _), (p_default, _) in zip(history, default, strict=True):
        optimizer.zero_grad()
        loss(tree_unflatten(torch_params, spec)).backward()
        optimizer.step()
        for x, y, z in zip(tree_leaves(p), tree_leaves(p_default), torch_params, strict=True):
            assert torch.equal(x, y)
            torch.testing.assert_close(x, z.detach(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("make_rule", [
    lambda: hdfunc.adam(0.01, betas=(0.8, 0.99), eps=1e-6, eps_root=0.0),
    lambda: hdfunc.adam_hd(0.01, 0.0, betas=(0.8, 0.99), eps=1e-6, eps_root=0.0),
], ids=["adam", "adam_hd"])
def test_eps_root_zero_matches_torch_optim_adam(make_rule):
    """The rule level (as tests/test_rules.py): bit for bit against Adam without eps_root, and
    against torch.optim.Adam to 1e-10 (torch's kernels order the arithmetic differently: lerp,
    addcdiv with lr / (1-β1^t), so equality there is to rounding, not bitwise)."""
    assert_equal_and_matches_torch_optim(
        make_rule(), hdfunc.adam(0.01, betas=(0.8, 0.99), eps=1e-6),
        lambda ps: torch.optim.Adam(ps, lr=0.01, betas=(0.8, 0.99), eps=1e-6))


@pytest.mark.parametrize("make_rule,make_torch", [
    (lambda er: hdfunc.base_rule(hdfunc.scale_by_rms(0.9, 1e-8, eps_root=er), 0.01),
     lambda ps: torch.optim.RMSprop(ps, lr=0.01, alpha=0.9, eps=1e-8)),
    (lambda er: hdfunc.base_rule(hdfunc.scale_by_adagrad(1e-10, eps_root=er), 0.1),
     lambda ps: torch.optim.Adagrad(ps, lr=0.1, eps=1e-10)),
], ids=["rmsprop", "adagrad"])
def test_eps_root_zero_keeps_rmsprop_and_adagrad(make_rule, make_torch):
    """eps_root=0.0 and eps_root=0 give the same steps bit for bit, and match torch.optim."""
    assert_equal_and_matches_torch_optim(make_rule(0.0), make_rule(0), make_torch)


# ------------------------------------------------------------------- eps_root > 0: the formula


def transcribed_adam_hd(params, loss, steps, lr, beta, b1, b2, eps, eps_root, weight_decay=0.0):
    """Algorithm 3 (global α, additive HD) with d_t = m̂_t / (√(v̂_t + ε_root) + ε) [+ λθ_{t-1},
    decoupled], written as a plain loop in float64: θ and α after each step."""
    spec = tree_flatten(params)[1]
    theta = [p.clone() for p in tree_leaves(params)]
    m = [torch.zeros_like(p) for p in theta]
    v = [torch.zeros_like(p) for p in theta]
    d_prev = [torch.zeros_like(p) for p in theta]
    alpha = torch.tensor(lr, dtype=F64)
    history = []
    for t in range(1, steps + 1):
        g = tree_leaves(grad(loss)(tree_unflatten(theta, spec)))
        h = -sum((gi * di).sum() for gi, di in zip(g, d_prev))
        alpha = alpha - beta * h
        m = [b1 * mi + (1 - b1) * gi for mi, gi in zip(m, g)]
        v = [b2 * vi + (1 - b2) * gi ** 2 for vi, gi in zip(v, g)]
        m_hat = [mi / (1 - b1 ** t) for mi in m]
        v_hat = [vi / (1 - b2 ** t) for vi in v]
        d = [mh / (torch.sqrt(vh + eps_root) + eps) + weight_decay * p
             for mh, vh, p in zip(m_hat, v_hat, theta)]
        theta = [p - alpha * di for p, di in zip(theta, d)]
        d_prev = d
        history.append((theta, alpha))
    return history


@pytest.mark.parametrize("eps_root", [1e-3, ROOT])
@pytest.mark.parametrize("decoupled", [False, True], ids=["adam_hd", "adamw_hd"])
def test_eps_root_follows_the_formula_in_adam_hd(eps_root, decoupled):
    """d_t and the recomputed d_{t-1} that h_t uses both are m̂ / (√(v̂ + ε_root) + ε)."""
    params, loss = make_problem(seed=2)
    wd = 0.05 if decoupled else 0.0
    rule = (hdfunc.adamw_hd(0.02, 1e-3, (0.8, 0.99), 1e-8, wd, eps_root=eps_root) if decoupled
            else hdfunc.adam_hd(0.02, 1e-3, (0.8, 0.99), 1e-8, eps_root=eps_root))
    history = run(rule, params, loss, 15)
    expected = transcribed_adam_hd(params, loss, 15, 0.02, 1e-3, 0.8, 0.99, 1e-8, eps_root, wd)
    for (p, state), (theta, alpha) in zip(history, expected, strict=True):
        for x, y in zip(tree_leaves(p), theta, strict=True):
            torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(hdfunc.get_lr(state), alpha, rtol=1e-12, atol=0)
    assert hdfunc.get_lr(history[-1][1]) != 0.02  # HD moved α, so h_t (and d_{t-1}) is checked
    if eps_root == 1e-3:  # large enough to change the trajectory: the option is not ignored
        plain = run(hdfunc.adam_hd(0.02, 1e-3, (0.8, 0.99), 1e-8), params, loss, 15)
        assert not torch.allclose(tree_leaves(plain[-1][0])[0], tree_leaves(history[-1][0])[0],
                                  rtol=1e-6, atol=0)


@pytest.mark.parametrize("kind", ["rms", "adagrad"])
def test_eps_root_follows_the_formula_in_rmsprop_and_adagrad(kind):
    params, loss = make_problem(seed=3)
    eps_root, eps, rho = 1e-3, 1e-8, 0.9
    direction = (hdfunc.scale_by_rms(rho, eps, eps_root=eps_root) if kind == "rms"
                 else hdfunc.scale_by_adagrad(eps, eps_root=eps_root))
    history = run(hdfunc.base_rule(direction, 0.01), params, loss, 10)
    spec = tree_flatten(params)[1]
    theta = [p.clone() for p in tree_leaves(params)]
    s = [torch.zeros_like(p) for p in theta]
    for p, _ in history:
        g = tree_leaves(grad(loss)(tree_unflatten(theta, spec)))
        if kind == "rms":
            s = [rho * si + (1 - rho) * gi ** 2 for si, gi in zip(s, g)]
        else:
            s = [si + gi ** 2 for si, gi in zip(s, g)]
        theta = [t - 0.01 * gi / (torch.sqrt(si + eps_root) + eps)
                 for t, gi, si in zip(theta, g, s)]
        for x, y in zip(tree_leaves(p), theta, strict=True):
            torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-14)


# ----------------------------------------------------------------------------- the API


FACTORIES = {
    "adam": lambda e: hdfunc.adam(1e-3, eps_root=e),
    "adam_hd": lambda e: hdfunc.adam_hd(1e-3, 1e-7, eps_root=e),
    "adamw": lambda e: hdfunc.adamw(1e-3, eps_root=e),
    "adamw_hd": lambda e: hdfunc.adamw_hd(1e-3, 1e-7, eps_root=e),
    "scale_by_adam": lambda e: hdfunc.scale_by_adam(eps_root=e),
    "scale_by_rms": lambda e: hdfunc.scale_by_rms(eps_root=e),
    "scale_by_adagrad": lambda e: hdfunc.scale_by_adagrad(eps_root=e),
}


@pytest.mark.parametrize("factory", sorted(FACTORIES))
@pytest.mark.parametrize("value,error,match", [
    (-1e-16, ValueError, "eps_root must lie"),
    (float("nan"), ValueError, "eps_root must lie"),
    (float("inf"), ValueError, "eps_root must be finite"),
    ("1e-16", TypeError, "eps_root must be a real number"),
    (True, TypeError, "eps_root must be a real number"),
    (torch.ones(2), TypeError, "eps_root must be a Python float or a 0-d floating tensor"),
], ids=["negative", "nan", "inf", "string", "bool", "vector"])
def test_bad_eps_root_raises_clear_errors(factory, value, error, match):
    with pytest.raises(error, match=match):
        FACTORIES[factory](value)


def test_eps_root_is_a_keyword_after_the_existing_parameters():
    assert hdfunc.DIFFERENTIABLE_EPS_ROOT == 1e-16 and "DIFFERENTIABLE_EPS_ROOT" in hdfunc.__all__
    rule = hdfunc.adam_hd(1e-3, 1e-7, (0.9, 0.99), 1e-6, 1e-4, eps_root=ROOT)  # positional order
    assert rule.hyperparams == {"lr": 1e-3, "hypergrad_lr": 1e-7, "betas": (0.9, 0.99),
                                "eps": 1e-6, "weight_decay": 1e-4, "eps_root": ROOT}
    assert "eps_root=1e-16" in repr(rule)
    assert hdfunc.adam(1e-3).hyperparams["eps_root"] == 0.0
    assert hdfunc.adamw(1e-3, (0.9, 0.999), 1e-8, 1e-2).hyperparams["eps_root"] == 0.0
    assert hdfunc.adamw_hd(1e-3, 1e-7, eps_root=1e-12).hyperparams["eps_root"] == 1e-12
    with pytest.raises(TypeError):
        hdfunc.adam(1e-3, (0.9, 0.999), 1e-8, 0.0, 1e-16)  # keyword only: no positional slot
    assert math.isfinite(hdfunc.adam(1e-3, eps_root=0).hyperparams["eps_root"])
