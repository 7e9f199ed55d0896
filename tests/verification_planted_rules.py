"""Hand-written HD rules with planted errors, for the verification suite's own tests.

Each follows the user-rule protocol (docs/writing-a-rule.md): ``factory(lr, hypergrad_lr)``
returns an object with ``init``/``update`` whose state is a NamedTuple with fields ``lr``,
``hypergrad_lr`` and ``hypergrad``. ``bug=None`` is the correct rule (the control: the suite
must pass it, so a failure of a buggy twin is caused by its bug alone).

Bugs:
- ``wrong_sign``:      h_t = +g_t · d_{t-1}
- ``stale_gradient``:  h_t = -g_{t-1} · d_{t-1}   (the gradient of the step before: off by one)
- ``grad_dot_grad``:   h_t = -g_t · g_t
- ``bias_correction``: Adam's d_{t-1} recomputed with the bias corrections of step t, not t-1
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import torch

from hdfunc.tree import PyTree, first_leaf, tree_leaves, tree_map, tree_zeros_like

BUGS = ("wrong_sign", "stale_gradient", "grad_dot_grad", "bias_correction")


class PlantedState(NamedTuple):
    count: torch.Tensor  # t-1
    lr: torch.Tensor
    hypergrad_lr: torch.Tensor
    hypergrad: torch.Tensor
    previous_grad: PyTree  # g_{t-1}
    mu: PyTree  # Adam's m_{t-1} (SGD: d_{t-1} = g_{t-1} is previous_grad)
    nu: PyTree  # Adam's v_{t-1}


def _dot(a: PyTree, b: PyTree) -> torch.Tensor:
    return sum((x * y).sum() for x, y in zip(tree_leaves(a), tree_leaves(b)))


class PlantedRule(NamedTuple):
    base: str  # "sgd" or "adam"
    bug: Optional[str]
    lr: float
    hypergrad_lr: float
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8

    def init(self, params: PyTree) -> PlantedState:
        leaf = first_leaf(params)
        zeros = tree_zeros_like(params)
        return PlantedState(leaf.new_zeros((), dtype=torch.int64), leaf.new_full((), self.lr),
                            leaf.new_full((), self.hypergrad_lr), leaf.new_zeros(()),
                            zeros, zeros, zeros)

    def adam_direction(self, count: torch.Tensor, mu: PyTree, nu: PyTree) -> PyTree:
        t = count.to(torch.float64)
        c1 = torch.where(count > 0, 1 - self.b1 ** t, torch.ones_like(t))
        c2 = torch.where(count > 0, (1 - self.b2 ** t).sqrt(), torch.ones_like(t))
        return tree_map(lambda m, v: (m / c1.to(m.dtype)) / (v.sqrt() / c2.to(m.dtype) + self.eps),
                        mu, nu)

    def update(self, grads: PyTree, state: PlantedState, params: PyTree) -> tuple[PyTree, PlantedState]:
        if self.base == "sgd":
            previous_direction = state.previous_grad
        elif self.bug == "bias_correction":
            previous_direction = self.adam_direction(state.count + 1, state.mu, state.nu)
        else:
            previous_direction = self.adam_direction(state.count, state.mu, state.nu)

        if self.bug == "wrong_sign":
            hypergrad = _dot(grads, previous_direction)
        elif self.bug == "stale_gradient":
            hypergrad = -_dot(state.previous_grad, previous_direction)
        elif self.bug == "grad_dot_grad":
            hypergrad = -_dot(grads, grads)
        else:
            hypergrad = -_dot(grads, previous_direction)
        lr = state.lr - state.hypergrad_lr * hypergrad

        count = state.count + 1
        mu, nu = state.mu, state.nu
        if self.base == "sgd":
            direction = grads
        else:
            mu = tree_map(lambda m, g: self.b1 * m + (1 - self.b1) * g, mu, grads)
            nu = tree_map(lambda v, g: self.b2 * v + (1 - self.b2) * g * g, nu, grads)
            direction = self.adam_direction(count, mu, nu)
        updates = tree_map(lambda d: -lr * d, direction)
        return updates, PlantedState(count, lr, state.hypergrad_lr, hypergrad, grads, mu, nu)


def planted(base: str, bug: Optional[str]) -> Any:
    """A factory ``(lr, hypergrad_lr) -> rule`` for ``base`` with ``bug`` planted."""
    if bug is not None and bug not in BUGS:
        raise ValueError(f"unknown bug {bug!r}")

    def factory(lr: float, hypergrad_lr: float) -> PlantedRule:
        return PlantedRule(base, bug, lr, hypergrad_lr)

    factory.__name__ = f"{base}_hd_{bug or 'correct'}"
    return factory


# Module-level factories for ``python -m verification --rule tests.verification_planted_rules:NAME``.
sgd_hd_correct = planted("sgd", None)
adam_hd_correct = planted("adam", None)
sgd_hd_wrong_sign = planted("sgd", "wrong_sign")
sgd_hd_stale_gradient = planted("sgd", "stale_gradient")
adam_hd_grad_dot_grad = planted("adam", "grad_dot_grad")
adam_hd_bias_correction = planted("adam", "bias_correction")
