"""Small shared test problems: a nested-pytree regression model and a step loop."""

from __future__ import annotations

import torch
from torch.func import grad

import hdfunc
from hdfunc.tree import tree_flatten, tree_unflatten


def make_problem(seed: int = 0, dtype: torch.dtype = torch.float64, n: int = 32):
    """A tiny two-layer regression problem with nested-dict/list params (smooth, non-convex)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=gen, dtype=torch.float64).to(dtype)
    y = torch.randn(n, generator=gen, dtype=torch.float64).to(dtype)
    params = {
        "hidden": {"weight": 0.5 * torch.randn(3, 4, generator=gen, dtype=torch.float64).to(dtype),
                   "bias": torch.zeros(4, dtype=dtype)},
        "out": [0.5 * torch.randn(4, generator=gen, dtype=torch.float64).to(dtype),
                torch.zeros((), dtype=dtype)],
    }

    def loss(p):
        hidden = torch.tanh(x @ p["hidden"]["weight"] + p["hidden"]["bias"])
        return ((hidden @ p["out"][0] + p["out"][1] - y) ** 2).mean()

    return params, loss


def run(rule: hdfunc.Rule, params, loss, steps: int):
    """Train ``steps`` steps; return the params and states after each step."""
    state = rule.init(params)
    history = []
    for _ in range(steps):
        updates, state = rule.update(grad(loss)(params), state, params)
        params = hdfunc.apply_updates(params, updates)
        history.append((params, state))
    return history


def flat_grad_fn(loss, params):
    """grad of ``loss`` as a function of the list of leaves (for the reference loop)."""
    spec = tree_flatten(params)[1]

    def fn(leaves):
        return tree_flatten(grad(loss)(tree_unflatten(leaves, spec)))[0]

    return fn
