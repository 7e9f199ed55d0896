"""Base directions d_t: the part of an optimizer that turns gradients into a step direction.

Every rule in hdfunc is "base direction d_t; u_t = -α_t d_t" (ALGORITHMS.md, "The general
form"). The transforms here produce d_t; :mod:`hdfunc.hypergradient` scales it by a fixed or an
adapted learning rate. Each is pure and reads its hyperparameters from its closure.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from hdfunc.base import EmptyState, Transform, check_hyperparameter
from hdfunc.tree import PyTree, first_leaf, tree_map, tree_zeros_like


def identity() -> Transform:
    """SGD's direction: d_t = g_t."""
    return Transform(lambda params: EmptyState(), lambda g, state, params: (g, state), "identity")


def add_l2(weight_decay: float | torch.Tensor) -> Transform:
    """Coupled weight decay (an L2 penalty in the objective): g_t ← g_t + λ θ_{t-1}.

    Placed before the hypergradient transform, so h_t uses the gradient of the penalised
    objective, as in the paper's experiments.
    """
    check_hyperparameter("weight_decay", weight_decay)

    def update(g: PyTree, state: EmptyState, params: PyTree) -> tuple[PyTree, EmptyState]:
        return tree_map(lambda gi, p: gi + weight_decay * p, g, params), state

    return Transform(lambda params: EmptyState(), update, "add_l2")


def add_decayed_weights(weight_decay: float | torch.Tensor) -> Transform:
    """Decoupled (AdamW-style) weight decay: d_t ← d_t + λ θ_{t-1}, so u_t = -α_t (d_t + λ θ_{t-1}).

    The decay is scaled by α and is therefore part of ∇_α u_t.
    """
    check_hyperparameter("weight_decay", weight_decay)

    def update(d: PyTree, state: EmptyState, params: PyTree) -> tuple[PyTree, EmptyState]:
        return tree_map(lambda di, p: di + weight_decay * p, d, params), state

    return Transform(lambda params: EmptyState(), update, "add_decayed_weights")


class MomentumState(NamedTuple):
    velocity: PyTree  # v_{t-1}


def nesterov(momentum: float | torch.Tensor = 0.9) -> Transform:
    """Nesterov momentum: v_t = μ v_{t-1} + g_t;  d_t = g_t + μ v_t.

    With dampening 0 this is torch.optim.SGD(momentum=μ, nesterov=True).
    """
    check_hyperparameter("momentum", momentum, high=1.0, high_inclusive=False)

    def init(params: PyTree) -> MomentumState:
        return MomentumState(tree_zeros_like(params))

    def update(g: PyTree, state: MomentumState, params: PyTree) -> tuple[PyTree, MomentumState]:
        velocity = tree_map(lambda v, gi: momentum * v + gi, state.velocity, g)
        direction = tree_map(lambda gi, v: gi + momentum * v, g, velocity)
        return direction, MomentumState(velocity)

    return Transform(init, update, "nesterov")


class AdamState(NamedTuple):
    count: torch.Tensor  # t-1: steps taken
    mu: PyTree  # m_{t-1}
    nu: PyTree  # v_{t-1}


def scale_by_adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> Transform:
    """Adam's direction d_t = m̂_t / (√v̂_t + ε), with
    m_t = β1 m_{t-1} + (1-β1) g_t,  v_t = β2 v_{t-1} + (1-β2) g_t²,
    m̂_t = m_t / (1-β1^t),  v̂_t = v_t / (1-β2^t).

    ``previous_output`` recomputes d_{t-1} from (t-1, m_{t-1}, v_{t-1}) with the bias corrections
    of step t-1, so Adam-HD stores no extra buffer (d_0 = 0).
    """
    check_hyperparameter("betas[0]", b1, high=1.0, high_inclusive=False)
    check_hyperparameter("betas[1]", b2, high=1.0, high_inclusive=False)
    check_hyperparameter("eps", eps)

    def init(params: PyTree) -> AdamState:
        count = params_count(params)
        return AdamState(count, tree_zeros_like(params), tree_zeros_like(params))

    def direction(count: torch.Tensor, mu: PyTree, nu: PyTree) -> PyTree:
        # count == 0 only before the first step, where m = v = 0 and the direction is 0.
        t = count.to(torch.float64)
        correction1 = torch.where(count > 0, 1 - b1 ** t, torch.ones_like(t))
        correction2_sqrt = torch.where(count > 0, (1 - b2 ** t).sqrt(), torch.ones_like(t))

        def leaf(m: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            c1 = correction1.to(m.dtype)
            c2 = correction2_sqrt.to(m.dtype)
            return (m / c1) / (v.sqrt() / c2 + eps)

        return tree_map(leaf, mu, nu)

    def update(g: PyTree, state: AdamState, params: PyTree) -> tuple[PyTree, AdamState]:
        mu = tree_map(lambda m, gi: b1 * m + (1 - b1) * gi, state.mu, g)
        nu = tree_map(lambda v, gi: b2 * v + (1 - b2) * gi * gi, state.nu, g)
        count = state.count + 1
        return direction(count, mu, nu), AdamState(count, mu, nu)

    def previous_output(state: AdamState) -> PyTree:
        return direction(state.count, state.mu, state.nu)

    return Transform(init, update, "scale_by_adam", previous_output)


class RMSState(NamedTuple):
    nu: PyTree  # running mean of g²


def scale_by_rms(decay: float = 0.99, eps: float = 1e-8) -> Transform:
    """RMSprop's direction (as torch.optim.RMSprop): v_t = ρ v_{t-1} + (1-ρ) g_t²; d_t = g_t / (√v_t + ε)."""
    check_hyperparameter("decay", decay, high=1.0, high_inclusive=False)
    check_hyperparameter("eps", eps)

    def update(g: PyTree, state: RMSState, params: PyTree) -> tuple[PyTree, RMSState]:
        nu = tree_map(lambda v, gi: decay * v + (1 - decay) * gi * gi, state.nu, g)
        return tree_map(lambda gi, v: gi / (v.sqrt() + eps), g, nu), RMSState(nu)

    return Transform(lambda params: RMSState(tree_zeros_like(params)), update, "scale_by_rms")


def scale_by_adagrad(eps: float = 1e-10) -> Transform:
    """Adagrad's direction (as torch.optim.Adagrad): s_t = s_{t-1} + g_t²; d_t = g_t / (√s_t + ε)."""
    check_hyperparameter("eps", eps)

    def update(g: PyTree, state: RMSState, params: PyTree) -> tuple[PyTree, RMSState]:
        total = tree_map(lambda s, gi: s + gi * gi, state.nu, g)
        return tree_map(lambda gi, s: gi / (s.sqrt() + eps), g, total), RMSState(total)

    return Transform(lambda params: RMSState(tree_zeros_like(params)), update, "scale_by_adagrad")


class LionState(NamedTuple):
    mu: PyTree


def scale_by_lion(b1: float = 0.9, b2: float = 0.99) -> Transform:
    """Lion's direction: d_t = sign(β1 m_{t-1} + (1-β1) g_t); m_t = β2 m_{t-1} + (1-β2) g_t."""
    check_hyperparameter("betas[0]", b1, high=1.0)
    check_hyperparameter("betas[1]", b2, high=1.0)

    def update(g: PyTree, state: LionState, params: PyTree) -> tuple[PyTree, LionState]:
        direction = tree_map(lambda m, gi: torch.sign(b1 * m + (1 - b1) * gi), state.mu, g)
        mu = tree_map(lambda m, gi: b2 * m + (1 - b2) * gi, state.mu, g)
        return direction, LionState(mu)

    return Transform(lambda params: LionState(tree_zeros_like(params)), update, "scale_by_lion")


def params_count(params: PyTree) -> torch.Tensor:
    """A 0-d int64 step counter on the params' device (a tensor, so it batches under vmap)."""
    return first_leaf(params).new_zeros((), dtype=torch.int64)
