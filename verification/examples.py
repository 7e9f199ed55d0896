"""Complete user-written HD rules that follow the protocol of docs/writing-a-rule.md.

1. ``heavy_ball_hd``: heavy-ball (Polyak) momentum with hypergradient descent on its learning
   rate, written by hand from scratch (hdfunc ships Nesterov momentum, not heavy ball):

       v_t = μ v_{t-1} + g_t                 (the base direction d_t = v_t)
       h_t = -g_t · d_{t-1}                  (the hypergradient: ∇f(θ_{t-1}) · ∇_α u_{t-1})
       α_t = α_{t-1} - β h_t
       u_t = -α_t d_t

2. ``adagrad_momentum_hd``: a new *base direction* (Adagrad with momentum, which hdfunc does
   not ship) composed with the library's one implementation of HD, ``hdfunc.hd_rule``, which
   brings every variant (per-tensor / per-element rates, multiplicative rule, ...) with it:

       s_t = s_{t-1} + g_t²,   m_t = μ m_{t-1} + g_t / (√s_t + ε),   d_t = m_t

Verify them with

    python -m verification --rule verification.examples:heavy_ball_hd
    python -m verification --quick --rule verification.examples:adagrad_momentum_hd
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

import hdfunc
from hdfunc.tree import PyTree, first_leaf, tree_leaves, tree_map, tree_zeros_like

# ----------------------------------------------------------------------------- 1. by hand


class HeavyBallHDState(NamedTuple):
    """The protocol's HD node: fields ``lr`` (α_{t-1}), ``hypergrad_lr`` (β) and
    ``hypergrad`` (h_{t-1}, the hypergradient the last step used); the rest is the rule's own."""

    lr: torch.Tensor
    hypergrad_lr: torch.Tensor
    hypergrad: torch.Tensor
    velocity: PyTree  # v_{t-1} = d_{t-1}


class HeavyBallHD(NamedTuple):
    """A rule is any object with pure ``init(params)`` and ``update(grads, state, params)``."""

    lr: float
    hypergrad_lr: float
    momentum: float = 0.9

    def init(self, params: PyTree) -> HeavyBallHDState:
        """The state before the first step: α_0 and β as 0-d tensors (dtype and device of the
        first leaf of ``params``), h_0 = 0 and zero velocity.

        Args:
            params: the initial params.

        Returns:
            The :class:`HeavyBallHDState`.
        """
        leaf = first_leaf(params)
        # α and β live in the state (0-d tensors), never read from self in update: the
        # verification suite replaces them there (hdfunc.freeze_lr / freeze_hypergrad_lr).
        return HeavyBallHDState(lr=leaf.new_full((), self.lr),
                                hypergrad_lr=leaf.new_full((), self.hypergrad_lr),
                                hypergrad=leaf.new_zeros(()),
                                velocity=tree_zeros_like(params))

    def update(self, grads: PyTree, state: HeavyBallHDState, params: PyTree
               ) -> tuple[PyTree, HeavyBallHDState]:
        """One step: h_t = -g_t · d_{t-1}, α_t = α_{t-1} - β h_t, v_t = μ v_{t-1} + g_t and
        u_t = -α_t v_t (α and β are read from ``state``).

        Args:
            grads: g_t.
            state: the state after step t-1.
            params: θ_{t-1} (unused).

        Returns:
            The updates u_t and the new state.
        """
        # h_t = -g_t · d_{t-1}  (d_0 = 0, so h_1 = 0)
        hypergrad = -sum((g * d).sum() for g, d in zip(tree_leaves(grads),
                                                         tree_leaves(state.velocity)))
        lr = state.lr - state.hypergrad_lr * hypergrad  # α_t, used by this very step
        velocity = tree_map(lambda v, g: self.momentum * v + g, state.velocity, grads)
        updates = tree_map(lambda v: -lr * v, velocity)  # u_t = -α_t d_t
        return updates, HeavyBallHDState(lr, state.hypergrad_lr, hypergrad, velocity)


def heavy_ball_hd(lr: float, hypergrad_lr: float) -> HeavyBallHD:
    """The factory the suite calls: ``factory(lr, hypergrad_lr) -> rule``."""
    return HeavyBallHD(lr, hypergrad_lr, momentum=0.9)


# ----------------------------------------------------------------------------- 2. by composition


class AdagradMomentumState(NamedTuple):
    """The state of :func:`scale_by_adagrad_momentum`.

    Attributes:
        sum_sq: s_{t-1}, the running sum of squared gradients.
        momentum: m_{t-1}, which is also the last direction d_{t-1}.
    """
    sum_sq: PyTree  # s_{t-1}
    momentum: PyTree  # m_{t-1} = d_{t-1}


def scale_by_adagrad_momentum(momentum: float = 0.9, eps: float = 1e-10) -> hdfunc.Transform:
    """A base direction: d_t = m_t, m_t = μ m_{t-1} + g_t / (√s_t + ε), s_t = s_{t-1} + g_t².

    Pure, and reading its hyperparameters from its closure; ``hdfunc.hd_rule`` stores d_{t-1}
    for the hypergradient (or pass ``previous_output=lambda state: state.momentum`` to
    ``Transform`` to let it recompute d_{t-1} from the state instead of storing a copy)."""

    def init(params: PyTree) -> AdagradMomentumState:
        return AdagradMomentumState(tree_zeros_like(params), tree_zeros_like(params))

    def update(g: PyTree, state: AdagradMomentumState, params: PyTree
               ) -> tuple[PyTree, AdagradMomentumState]:
        sum_sq = tree_map(lambda s, gi: s + gi * gi, state.sum_sq, g)
        m = tree_map(lambda mi, gi, s: momentum * mi + gi / (s.sqrt() + eps),
                     state.momentum, g, sum_sq)
        return m, AdagradMomentumState(sum_sq, m)

    return hdfunc.Transform(init, update, "scale_by_adagrad_momentum",
                            previous_output=lambda state: state.momentum)


def adagrad_momentum_hd(lr: float, hypergrad_lr: float) -> Any:
    """Adagrad-with-momentum HD, one global rate: the factory for ``--rule``."""
    return hdfunc.hd_rule(scale_by_adagrad_momentum(), lr, hypergrad_lr,
                          name="adagrad_momentum_hd")


def adagrad_momentum_hd_per_tensor(lr: float, hypergrad_lr: float) -> Any:
    """The same direction with one rate per tensor and the multiplicative rule (any option
    of ``hdfunc.hypergradient`` works the same way)."""
    return hdfunc.hd_rule(scale_by_adagrad_momentum(), lr, hypergrad_lr,
                          lr_granularity="tensor", mode="multiplicative",
                          name="adagrad_momentum_hd_per_tensor")


def rmsprop_hd(lr: float, hypergrad_lr: float) -> Any:
    """HD over a base direction hdfunc ships (RMSprop): the one-line case."""
    return hdfunc.hd_rule(hdfunc.scale_by_rms(0.99), lr, hypergrad_lr, name="rmsprop_hd")
