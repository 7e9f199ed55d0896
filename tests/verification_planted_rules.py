"""Hand-written HD rules with planted errors, for the verification suite's own tests.

Each follows the user-rule protocol (docs/writing-a-rule.md): ``factory(lr, hypergrad_lr)``
returns an object with ``init``/``update`` whose state is a NamedTuple with fields ``lr``,
``hypergrad_lr`` and ``hypergrad``. ``bug=None`` is the correct rule (the control: the suite
must pass it, so a failure of a buggy twin is caused by its bug alone).

Bugs in the hypergradient h_t (the one-step identity and the oracle's first part catch them):
- ``wrong_sign``:        h_t = +g_t · d_{t-1}
- ``stale_gradient``:    h_t = -g_{t-1} · d_{t-1}   (the gradient of the step before: off by one)
- ``current_direction``: h_t = -g_t · d_t           (the direction of this step, not the last)
- ``grad_dot_grad``:     h_t = -g_t · g_t
- ``bias_correction``:   Adam's d_{t-1} recomputed with the bias corrections of step t, not t-1
- ``eps_omitted``:       Adam's d_{t-1} recomputed as m̂/√v̂ (ε dropped)
- ``eps_misplaced``:     Adam's d_{t-1} recomputed as m̂/√(v̂ + ε) (ε inside the root)

Bugs in what the rule does with a right h_t (only the autodiff-HD oracle catches them):
- ``ascent``:          α_t = α_{t-1} + β h_t        (the rate law's sign: gradient ascent on α)
- ``scaled_law``:      α_t = α_{t-1} - β h_t / n    (n = the number of parameters)
- ``previous_rate``:   step t applies α_{t-1} and honestly reports it as ``applied_lr``
- ``late_update``:     step t applies α_{t-1} and updates α after the step (reports α_t)
- ``per_tensor_drift``: a "global" rate whose tensors drift apart: tensor j applies α + o_j with
                        hidden offsets o_j ← o_j - β(h_j - h/L) (Σ o_j = 0), one step late

``law="multiplicative"`` adapts α by the paper's Eq. 8 instead,
α_t = α_{t-1} (1 - β h_t / (‖g_t‖ ‖d_{t-1}‖)), and ``rate_law`` is what the rule declares to
the oracle (``None``: nothing, so the paper's additive law is assumed).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import torch

from hdfunc import HDOptions
from hdfunc.tree import (PyTree, first_leaf, tree_flatten, tree_leaves, tree_map, tree_unflatten,
                         tree_zeros_like)

HYPERGRADIENT_BUGS = ("wrong_sign", "stale_gradient", "current_direction", "grad_dot_grad",
                      "bias_correction", "eps_omitted", "eps_misplaced")
RULE_BUGS = ("ascent", "scaled_law", "previous_rate", "late_update", "per_tensor_drift")
BUGS = HYPERGRADIENT_BUGS + RULE_BUGS


class PlantedState(NamedTuple):
    count: torch.Tensor  # t-1
    lr: torch.Tensor
    hypergrad_lr: torch.Tensor
    hypergrad: torch.Tensor
    applied_lr: torch.Tensor  # the rate the last step applied, as the rule reports it
    previous_grad: PyTree  # g_{t-1}
    mu: PyTree  # Adam's m_{t-1} (SGD: d_{t-1} = g_{t-1} is previous_grad)
    nu: PyTree  # Adam's v_{t-1}
    offsets: list  # per-tensor offsets of the rate (zero but for per_tensor_drift)


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
    law: str = "additive"
    rate_law: Optional[HDOptions] = None

    def init(self, params: PyTree) -> PlantedState:
        leaf = first_leaf(params)
        zeros = tree_zeros_like(params)
        lr = leaf.new_full((), self.lr)
        return PlantedState(leaf.new_zeros((), dtype=torch.int64), lr,
                            leaf.new_full((), self.hypergrad_lr), leaf.new_zeros(()), lr,
                            zeros, zeros, zeros, [leaf.new_zeros(()) for _ in tree_leaves(params)])

    def adam_direction(self, count: torch.Tensor, mu: PyTree, nu: PyTree,
                       eps: str = "right") -> PyTree:
        t = count.to(torch.float64)
        c1 = torch.where(count > 0, 1 - self.b1 ** t, torch.ones_like(t))
        c2 = torch.where(count > 0, (1 - self.b2 ** t).sqrt(), torch.ones_like(t))

        def leaf(m: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            m_hat, v_hat = m / c1.to(m.dtype), v / (c2.to(m.dtype) ** 2)
            if eps == "omitted":
                # m̂/√v̂, and 0 where v = 0 (before the first step)
                return torch.where(v > 0, m_hat / torch.where(v > 0, v_hat, 1).sqrt(), 0)
            if eps == "inside":
                return m_hat / (v_hat + self.eps).sqrt()
            return m_hat / (v.sqrt() / c2.to(m.dtype) + self.eps)

        return tree_map(leaf, mu, nu)

    def update(self, grads: PyTree, state: PlantedState, params: PyTree) -> tuple[PyTree, PlantedState]:
        bug = self.bug
        if self.base == "sgd":
            previous_direction = state.previous_grad
        elif bug == "bias_correction":
            previous_direction = self.adam_direction(state.count + 1, state.mu, state.nu)
        else:
            eps = {"eps_omitted": "omitted", "eps_misplaced": "inside"}.get(bug, "right")
            previous_direction = self.adam_direction(state.count, state.mu, state.nu, eps)

        count = state.count + 1
        mu, nu = state.mu, state.nu
        if self.base == "sgd":
            direction = grads
        else:
            mu = tree_map(lambda m, g: self.b1 * m + (1 - self.b1) * g, mu, grads)
            nu = tree_map(lambda v, g: self.b2 * v + (1 - self.b2) * g * g, nu, grads)
            direction = self.adam_direction(count, mu, nu)

        if bug == "wrong_sign":
            hypergrad = _dot(grads, previous_direction)
        elif bug == "stale_gradient":
            hypergrad = -_dot(state.previous_grad, previous_direction)
        elif bug == "current_direction":
            hypergrad = -_dot(grads, direction)
        elif bug == "grad_dot_grad":
            hypergrad = -_dot(grads, grads)
        else:
            hypergrad = -_dot(grads, previous_direction)

        if bug == "ascent":
            lr = state.lr + state.hypergrad_lr * hypergrad
        elif bug == "scaled_law":
            size = sum(g.numel() for g in tree_leaves(grads))
            lr = state.lr - state.hypergrad_lr * hypergrad / size
        elif self.law == "multiplicative":
            norms_sq = _dot(grads, grads) * _dot(previous_direction, previous_direction)
            positive = norms_sq > 0
            norms = torch.where(positive, norms_sq, 1).sqrt()
            lr = torch.where(positive, state.lr * (1 - state.hypergrad_lr * hypergrad / norms),
                             state.lr)
        else:
            lr = state.lr - state.hypergrad_lr * hypergrad
        applied = state.lr if bug in ("previous_rate", "late_update") else lr
        reported = lr if bug == "late_update" else applied

        offsets = state.offsets
        if bug == "per_tensor_drift":
            per_tensor = [-(g * d).sum() for g, d in zip(tree_leaves(grads),
                                                         tree_leaves(previous_direction))]
            mean = sum(per_tensor) / len(per_tensor)
            offsets = [o - state.hypergrad_lr * (h - mean) for o, h in zip(offsets, per_tensor)]
        leaves, spec = tree_flatten(direction)
        updates = tree_unflatten([-(applied + o) * d for o, d in zip(state.offsets, leaves)], spec)
        return updates, PlantedState(count, lr, state.hypergrad_lr, hypergrad, reported, grads,
                                     mu, nu, offsets)


def planted(base: str, bug: Optional[str], **options: Any) -> Any:
    """A factory ``(lr, hypergrad_lr) -> rule`` for ``base`` with ``bug`` planted; ``options``
    are further :class:`PlantedRule` fields (``eps``, ``law``, ``rate_law``)."""
    if bug is not None and bug not in BUGS:
        raise ValueError(f"unknown bug {bug!r}")

    def factory(lr: float, hypergrad_lr: float) -> PlantedRule:
        return PlantedRule(base, bug, lr, hypergrad_lr, **options)

    suffix = "".join(f"_{k}_{v}" for k, v in options.items() if k != "rate_law")
    factory.__name__ = f"{base}_hd_{bug or 'correct'}{suffix}"
    return factory


# Module-level factories for ``python -m verification --rule tests.verification_planted_rules:NAME``.
sgd_hd_correct = planted("sgd", None)
adam_hd_correct = planted("adam", None)
sgd_hd_wrong_sign = planted("sgd", "wrong_sign")
sgd_hd_stale_gradient = planted("sgd", "stale_gradient")
adam_hd_grad_dot_grad = planted("adam", "grad_dot_grad")
adam_hd_bias_correction = planted("adam", "bias_correction")
adam_hd_current_direction = planted("adam", "current_direction")
adam_hd_eps_omitted = planted("adam", "eps_omitted")
adam_hd_eps_misplaced = planted("adam", "eps_misplaced")
sgd_hd_ascent = planted("sgd", "ascent")
sgd_hd_scaled_law = planted("sgd", "scaled_law")
adam_hd_previous_rate = planted("adam", "previous_rate")
sgd_hd_late_update = planted("sgd", "late_update")
sgd_hd_per_tensor_drift = planted("sgd", "per_tensor_drift")
