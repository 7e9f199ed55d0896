"""An independent, literal implementation of the algorithm boxes of docs/algorithms.md (Baydin et al.
2018, Algorithms 1-3 and §2.1/§5 variants), written as a plain loop over a list of tensors.

It shares no code with hdfunc: it is the oracle the functional rules are tested against.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch


def run_reference(
    base: str,
    grad_fn: Callable[[list[torch.Tensor]], list[torch.Tensor]],
    theta0: list[torch.Tensor],
    steps: int,
    lr: float,
    beta: float,
    *,
    momentum: float = 0.9,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    granularity: str = "global",
    mode: str = "additive",
    final_lr: Optional[float] = None,
    kappa: Optional[float] = None,
) -> tuple[list[list[torch.Tensor]], list[list[torch.Tensor]]]:
    """Run ``steps`` steps; return the parameters after each step and the rates α_t of each step
    (as a list with one entry per tensor: the global α repeated, per-tensor α, or per-element α)."""
    theta = [p.clone() for p in theta0]
    n = len(theta)
    alpha = [torch.full_like(p, lr) if granularity == "element" else torch.tensor(lr, dtype=p.dtype)
             for p in theta]
    grad_u_prev = [torch.zeros_like(p) for p in theta]  # ∇_α u_0 = 0
    v = [torch.zeros_like(p) for p in theta]
    m = [torch.zeros_like(p) for p in theta]
    dalpha_dbeta = [torch.zeros_like(a) for a in alpha]
    history_theta, history_alpha = [], []
    for t in range(1, steps + 1):
        g = grad_fn(theta)
        g = [gi + weight_decay * p for gi, p in zip(g, theta)]

        # h_t = g_t · ∇_α u_{t-1}
        if granularity == "global":
            total = sum((gi * ui).sum() for gi, ui in zip(g, grad_u_prev))
            h = [total] * n
            g_norm = [torch.sqrt(sum((gi * gi).sum() for gi in g))] * n
            u_norm = [torch.sqrt(sum((ui * ui).sum() for ui in grad_u_prev))] * n
        elif granularity == "tensor":
            h = [(gi * ui).sum() for gi, ui in zip(g, grad_u_prev)]
            g_norm = [gi.norm() for gi in g]
            u_norm = [ui.norm() for ui in grad_u_prev]
        else:
            h = [gi * ui for gi, ui in zip(g, grad_u_prev)]
            g_norm = [gi.abs() for gi in g]
            u_norm = [ui.abs() for ui in grad_u_prev]

        if kappa is not None:  # §5.2: β ← β - κ ∂f(θ_{t-1})/∂β, additive rule only
            previous = max(t - 1, 1)
            dgamma = 1.0 / previous**2 if final_lr is not None else 1.0
            if granularity == "global":
                dfdbeta = h[0] * dgamma * dalpha_dbeta[0]
            else:
                dfdbeta = sum((hi * dgamma * di).sum() for hi, di in zip(h, dalpha_dbeta))
            beta = beta - kappa * dfdbeta
            dalpha_dbeta = [-hi for hi in h]

        if mode == "additive":
            alpha = [a - beta * hi for a, hi in zip(alpha, h)]
        else:  # Eq. 8; α unchanged where a norm is zero
            new = []
            for a, hi, gn, un in zip(alpha, h, g_norm, u_norm):
                denom = gn * un
                ratio = torch.where(denom > 0, hi / torch.where(denom > 0, denom, 1.0), 0.0)
                new.append(a * (1 - beta * ratio))
            alpha = new

        if final_lr is not None:  # §5.1, δ(t) = 1/t²
            delta = 1.0 / t**2
            gamma = [delta * a + (1 - delta) * final_lr for a in alpha]
        else:
            gamma = alpha

        if base == "sgd":
            direction = g
        elif base == "sgdn":
            v = [momentum * vi + gi for vi, gi in zip(v, g)]
            direction = [gi + momentum * vi for gi, vi in zip(g, v)]
        elif base == "adam":
            b1, b2 = betas
            m = [b1 * mi + (1 - b1) * gi for mi, gi in zip(m, g)]
            v = [b2 * vi + (1 - b2) * gi * gi for vi, gi in zip(v, g)]
            m_hat = [mi / (1 - b1**t) for mi in m]
            v_hat = [vi / (1 - b2**t) for vi in v]
            direction = [mh / (vh.sqrt() + eps) for mh, vh in zip(m_hat, v_hat)]
        else:
            raise ValueError(base)
        u = [-gm * d for gm, d in zip(gamma, direction)]
        grad_u_prev = [-d for d in direction]
        theta = [p + ui for p, ui in zip(theta, u)]
        history_theta.append([p.clone() for p in theta])
        history_alpha.append([a.clone() for a in alpha])
    return history_theta, history_alpha
