"""A complete user-written HD rule following the protocol (docs/writing-a-rule.md).

Heavy-ball (Polyak) momentum with hypergradient descent on its learning rate, written by hand:

    v_t = μ v_{t-1} + g_t                 (the base direction d_t = v_t)
    h_t = -g_t · d_{t-1}                  (the hypergradient: ∇f(θ_{t-1}) · ∇_α u_{t-1})
    α_t = α_{t-1} - β h_t
    u_t = -α_t d_t

Verify it with

    python -m verification --rule verification.examples:heavy_ball_hd
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from hdfunc.tree import PyTree, first_leaf, tree_leaves, tree_map, tree_zeros_like


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
        leaf = first_leaf(params)
        # α and β live in the state (0-d tensors), never read from self in update: the
        # verification suite replaces them there (hdfunc.freeze_lr / freeze_hypergrad_lr).
        return HeavyBallHDState(lr=leaf.new_full((), self.lr),
                                hypergrad_lr=leaf.new_full((), self.hypergrad_lr),
                                hypergrad=leaf.new_zeros(()),
                                velocity=tree_zeros_like(params))

    def update(self, grads: PyTree, state: HeavyBallHDState, params: PyTree
               ) -> tuple[PyTree, HeavyBallHDState]:
        # h_t = -g_t · d_{t-1}  (d_0 = 0, so h_1 = 0)
        hypergrad = -sum((g * d).sum() for g, d in zip(tree_leaves(grads),
                                                         tree_leaves(state.velocity)))
        lr = state.lr - state.hypergrad_lr * hypergrad
        velocity = tree_map(lambda v, g: self.momentum * v + g, state.velocity, grads)
        updates = tree_map(lambda v: -lr * v, velocity)
        return updates, HeavyBallHDState(lr, state.hypergrad_lr, hypergrad, velocity)


def heavy_ball_hd(lr: float, hypergrad_lr: float) -> Any:
    """The factory the suite calls: ``factory(lr, hypergrad_lr) -> rule``."""
    return HeavyBallHD(lr, hypergrad_lr, momentum=0.9)


def rmsprop_hd(lr: float, hypergrad_lr: float) -> Any:
    """The same protocol met by composition: HD over a built-in base direction."""
    import hdfunc
    return hdfunc.hd_rule(hdfunc.scale_by_rms(0.99), lr, hypergrad_lr, name="rmsprop_hd")
