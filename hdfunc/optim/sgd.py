"""SGD-HD and SGDN-HD (Baydin et al. 2018, Algorithms 1-2) as torch.optim optimizers: torch's SGD
step (``torch.optim.sgd.sgd``) with the rate adapted from h_t = -g_t · d_{t-1}."""

from __future__ import annotations

from typing import Any, Iterable, Optional

import torch
from torch.optim.sgd import sgd as torch_sgd

from hdfunc.hypergradient import HDState
from hdfunc.options import HDOptions
from hdfunc.optim import terms
from hdfunc.optim.base import (GROUP_CHECKS, GroupCheck, HDOptimizer, SchedulerComposition, Scope,
                               UNSUPPORTED_OPTIONS, _check_finite, _check_flag, _check_fraction,
                               _fused_supported)

__all__ = ["SGDHD", "SGDNHD"]


def _check_dampening(name: str, value: Any, group: Optional[dict] = None) -> None:
    _check_finite(name, value, high=1.0)


def _check_nesterov(name: str, value: Any, group: Optional[dict] = None) -> None:
    _check_flag(name, value)
    if value and (group["momentum"] <= 0 or group["dampening"] != 0):
        raise ValueError(f"{name}=True needs momentum > 0 and dampening = 0")


class SGDHD(HDOptimizer):
    """SGD-HD (Algorithm 1) and, with ``momentum`` and ``nesterov=True``, SGDN-HD (Algorithm 2);
    the step is ``torch.optim.SGD``'s (same ``momentum``, ``dampening``, ``nesterov``,
    ``weight_decay``, ``maximize``), with the rate adapted by

        h_t = -g_t · d_{t-1},   α_t = α_{t-1} - β h_t       (or the options below)

    where d is the step direction: g (plain SGD; one stored buffer ``hd_direction``),
    g + μ v (Nesterov; one stored buffer) or the momentum buffer v (heavy ball; none).
    g includes the coupled weight-decay term λθ (and the sign flip of ``maximize``).

    HD options (as in :func:`hdfunc.sgd_hd`): ``mode`` "additive" | "multiplicative" (Eqs. 7-8),
    ``final_lr`` (α_∞, §5.1) with ``transition`` δ(t), ``hyper_hypergrad_lr`` (κ, §5.2),
    ``lr_bounds=(low, high)`` (clamp α), ``skip_nonfinite`` (keep α when h_t is not finite and
    count it). Optimizer options: ``hypergrad_scope`` "global" (one h_t over all groups, the
    default) or "group" (one per group); ``process_group`` (sum h_t's dot products over the
    ranks of a sharded optimizer); ``scheduler_composition`` "scale" | "reset" (docs/optim.md).

    Args:
        params: the parameters to optimize, or dicts defining param groups.
        lr: α_0, the initial learning rate.
        hypergrad_lr: β, the hypergradient learning rate.
        momentum: μ (0: plain SGD).
        dampening: the dampening of the momentum (torch.optim.SGD's).
        weight_decay: λ of the coupled L2 term.
        nesterov: Nesterov momentum (needs ``momentum`` > 0 and ``dampening`` = 0).
        maximize: maximize the objective instead of minimizing it.
        hypergrad_scope: "global" (one h_t over all param groups) or "group" (one per group).
        process_group: the process group over which h_t's dot products are summed (a sharded
            optimizer over each rank's own parameters); None: no reduction across ranks.
        scheduler_composition: how a torch LR scheduler's write to a group's ``lr`` combines with
            the adapted rate: "scale" or "reset" (docs/optim.md).
        foreach: use torch's multi-tensor kernel (None: torch's default choice).
        fused: use torch's fused kernel (None: where supported).

    Raises:
        TypeError: an unknown or unsupported HD option, or an option of the wrong type.
        ValueError: an option's value is out of range.
    """

    _base_keys = ("momentum", "dampening", "weight_decay", "nesterov", "maximize", "foreach",
                  "fused")

    def __init__(self, params: Iterable, lr: float = 1e-3, hypergrad_lr: float = 1e-3,
                 momentum: float = 0.0, dampening: float = 0.0, weight_decay: float = 0.0,
                 nesterov: bool = False, *, maximize: bool = False, hypergrad_scope: Scope = "global",
                 process_group: Any = None, scheduler_composition: SchedulerComposition = "scale",
                 foreach: Optional[bool] = None, fused: Optional[bool] = None,
                 **hd_options: Any):
        super().__init__(params, self._defaults(locals()), hypergrad_scope=hypergrad_scope,
                         process_group=process_group,
                         scheduler_composition=scheduler_composition)

    _tensor_lr_when_compiling = True

    def _option_checks(self) -> dict[str, GroupCheck]:
        return {**GROUP_CHECKS, "momentum": _check_fraction, "dampening": _check_dampening,
                "nesterov": _check_nesterov}

    def _fused_by_default(self, params: list[torch.Tensor]) -> bool:
        # torch's foreach SGD takes a float rate: cheapest on CPU; on CUDA the fused kernel
        # takes the rate as a tensor and so avoids a device sync per step.
        return all(p.device.type == "cuda" for p in params) and _fused_supported(params)

    def _state_keys(self) -> tuple[frozenset, frozenset]:
        return frozenset(), frozenset({"momentum_buffer", "hd_direction"})

    def _torch_class(self, group: dict) -> type:
        return torch.optim.SGD

    @staticmethod
    def _stores_direction(group: dict) -> bool:
        return group["momentum"] == 0 or group["nesterov"]

    def _prepare(self, group: dict) -> dict:
        params, grads, buffers, directions = [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise TypeError("sparse gradients are not supported by SGDHD")
            params.append(p)
            grads.append(p.grad)
            state = self.state[p]
            if group["momentum"] != 0:
                buffers.append(state.get("momentum_buffer"))
            if self._stores_direction(group):
                if "hd_direction" not in state:  # d_0 = 0
                    state["hd_direction"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                directions.append(state["hd_direction"])
        return {"params": params, "grads": grads, "momentum_buffers": buffers,
                "directions": directions}

    def _terms_update_state(self, group: dict) -> bool:
        return self._stores_direction(group)

    def _hypergrad_terms(self, group: dict, lists: dict, state: HDState) -> terms.HypergradTerms:
        want_sq = group["mode"] == "multiplicative"
        # d_{t-1}: the stored direction, or the heavy-ball momentum buffer v_{t-1} (none at t=1);
        # a stored direction becomes d_t ← g_t in the same pass (Nesterov adds μ v_t after the
        # step, in _base_step)
        stores = self._stores_direction(group)
        previous = lists["directions"] if stores else lists["momentum_buffers"]
        if (stores and group["weight_decay"] == 0 and not group["maximize"]
                and self._streamed(lists["grads"])
                and all(g.is_contiguous() and d.is_contiguous()
                        for g, d in zip(lists["grads"], previous))):
            # CPU, g = ∇f: g·d_{t-1} (and the norms) and d_t ← g_t in one batched pass
            return terms.sgd_terms_streamed(
                lists["grads"], previous, want_sq=want_sq, like=state.lr,
                scratch_bytes=self._scratch_bytes, buffers=self._scratch(),
                update_directions=True)
        return terms.sgd_terms(lists["params"], lists["grads"], previous,
                               weight_decay=group["weight_decay"], maximize=group["maximize"],
                               want_sq=want_sq, like=state.lr, update_directions=stores)

    def _base_step(self, group: dict, lists: dict, state: HDState) -> None:
        stores = self._stores_direction(group)
        directions = lists["directions"]  # already d_t ← g_t, in the hypergradient pass
        buffers = lists["momentum_buffers"] if group["momentum"] != 0 else []
        torch_sgd(lists["params"], lists["grads"], buffers, foreach=group["foreach"],
                  fused=group["fused"], weight_decay=group["weight_decay"],
                  momentum=group["momentum"], lr=self._rate_for_kernel(group, state),
                  dampening=group["dampening"], nesterov=group["nesterov"],
                  maximize=group["maximize"])
        if group["momentum"] != 0:
            for p, buffer in zip(lists["params"], buffers):
                self.state[p]["momentum_buffer"] = buffer
        if stores and group["nesterov"]:  # d_t = g_t + μ v_t
            if group["foreach"] or group["fused"]:
                torch._foreach_add_(directions, buffers, alpha=group["momentum"])
            else:
                for d, v in zip(directions, buffers):
                    d.add_(v, alpha=group["momentum"])


def SGDNHD(params: Iterable, lr: float = 1e-3, hypergrad_lr: float = 1e-3,
           momentum: float = 0.9, weight_decay: float = 0.0, **options: Any) -> SGDHD:
    """SGDN-HD (Algorithm 2): :class:`SGDHD` with Nesterov momentum μ (dampening 0), the
    optimizer twin of :func:`hdfunc.sgdn_hd`.

    Args:
        params: the parameters to optimize, or dicts defining param groups.
        lr: α_0, the initial learning rate.
        hypergrad_lr: β, the hypergradient learning rate.
        momentum: μ, the Nesterov momentum.
        weight_decay: λ of the coupled L2 term.
        **options: the other options of :class:`SGDHD` (HD and optimizer options).

    Returns:
        An :class:`SGDHD` with ``nesterov=True``.
    """
    return SGDHD(params, lr, hypergrad_lr, momentum=momentum, weight_decay=weight_decay,
                 nesterov=True, **options)


SGDHD.__doc__ = (SGDHD.__doc__ or "") + HDOptions.docstring(
    exclude=UNSUPPORTED_OPTIONS, value_argument=False)
