"""SGD-HD and SGDN-HD (Baydin et al. 2018, Algorithms 1-2) as torch.optim optimizers: torch's SGD
step (``torch.optim.sgd.sgd``) with the rate adapted from h_t = -g_t · d_{t-1}."""

from __future__ import annotations

import weakref
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


_LAZY_CLONE = getattr(torch, "_lazy_clone", None)  # copy-on-write clone (torch >= 2.3)


def keep_gradient(grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """SGD-HD's d_t = g_t without a copy: a copy-on-write clone of each gradient
    (``torch._lazy_clone``). It shares the gradient's memory until either tensor is written;
    the first write to a shared storage (``zero_grad(set_to_none=False)``, an accumulating
    backward, an in-place clip, a DDP bucket's next reduction) copies it first, inside torch,
    whoever writes. So d_t keeps g_t exactly in every case, and the copy is paid only where the
    gradient's storage is reused (with ``zero_grad()``'s default ``set_to_none=True`` the next
    backward allocates a new gradient: never).

    Args:
        grads: the gradients g_t (plain tensors).

    Returns:
        One tensor per gradient, equal to it, that no later write to the gradient changes.
    """
    assert _LAZY_CLONE is not None
    return [_LAZY_CLONE(g) for g in grads]


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
        lr_as_tensor: what a step leaves in a group's ``lr``: γ_t as a Python float (False), as
            a 0-d tensor on the rates' device, with no host sync (True), or None: a tensor off
            the CPU, a float on the CPU (docs/optim.md).
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
                 lr_as_tensor: Optional[bool] = None, foreach: Optional[bool] = None,
                 fused: Optional[bool] = None, **hd_options: Any):
        super().__init__(params, self._defaults(locals()), hypergrad_scope=hypergrad_scope,
                         process_group=process_group,
                         scheduler_composition=scheduler_composition, lr_as_tensor=lr_as_tensor)

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

    def _keeps_gradient(self, group: dict, lists: dict) -> bool:
        """Whether this step keeps d_t without copying g_t (docs/optim.md, "The stored
        direction"): eager CPU tensors, g_t = ∇f (no weight decay, no maximize), contiguous,
        torch's foreach or for-loop kernel (the fused CPU kernel writes the gradient) and no
        DTensor sharding. Plain SGD-HD then keeps d_t = g_t as a copy-on-write clone of
        ``p.grad`` (:func:`keep_gradient`); SGDN-HD writes d_t = g_t + μ v_t in one pass after
        the step instead of a copy and an add."""
        if not (self._stores_direction(group) and group["weight_decay"] == 0
                and not group["maximize"] and not group["fused"] and _LAZY_CLONE is not None
                and not torch.compiler.is_compiling() and self._sharding() is None):
            return False
        for g, d in zip(lists["grads"], lists["directions"]):  # (one loop: a per-step cost)
            if not (type(g) is torch.Tensor and g.device.type == "cpu"
                    and g.dtype in terms.STREAMED_DTYPES and g.is_contiguous()
                    and d.is_contiguous()):
                return False
        return not self._gradients_reused(lists)

    def _gradients_reused(self, lists: dict) -> bool:
        """Whether some gradient is the very tensor the last step saw (its storage reused:
        ``zero_grad(set_to_none=False)``, DDP's bucket views), remembered (weakly) for the
        next step. Then the copy-on-write clone would be copied at every step anyway (at the
        zeroing, into newly allocated memory): the step copies into the stored buffer instead,
        as it would without :func:`keep_gradient`. Exact either way; this only picks the
        cheaper path."""
        seen = getattr(self, "_seen_gradients", None)
        if seen is None:
            seen = self._seen_gradients = {}
        reused = False
        for p, g in zip(lists["params"], lists["grads"]):
            last = seen.get(p)
            reused = reused or (last is not None and last() is g)
            seen[p] = weakref.ref(g)
        return reused

    def _hypergrad_terms(self, group: dict, lists: dict, state: HDState) -> terms.HypergradTerms:
        want_sq = group["mode"] == "multiplicative"
        # d_{t-1}: the stored direction, or the heavy-ball momentum buffer v_{t-1} (none at t=1);
        # a stored direction becomes d_t ← g_t in the same pass (Nesterov adds μ v_t after the
        # step, in _base_step)
        stores = self._stores_direction(group)
        previous = lists["directions"] if stores else lists["momentum_buffers"]
        if self._keeps_gradient(group, lists):
            # CPU, g = ∇f: g·d_{t-1} (and the norms) in one batched pass that only reads; d_t is
            # g_t itself (a copy-on-write clone), or g_t + μ v_t written after the step
            lists["keeps_gradient"] = True
            result = terms.sgd_terms_streamed(
                lists["grads"], previous, want_sq=want_sq, like=state.lr,
                scratch_bytes=self._scratch_bytes, buffers=self._scratch(),
                update_directions=False)
            if not group["nesterov"]:
                for p, d in zip(lists["params"], keep_gradient(lists["grads"])):
                    self.state[p]["hd_direction"] = d
            return result
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
        keeps = lists.get("keeps_gradient", False) and group["nesterov"]
        versions = [g._version for g in lists["grads"]] if keeps else []
        torch_sgd(lists["params"], lists["grads"], buffers, foreach=group["foreach"],
                  fused=group["fused"], weight_decay=group["weight_decay"],
                  momentum=group["momentum"], lr=self._rate_for_kernel(group, state),
                  dampening=group["dampening"], nesterov=group["nesterov"],
                  maximize=group["maximize"])
        if group["momentum"] != 0:
            for p, buffer in zip(lists["params"], buffers):
                self.state[p]["momentum_buffer"] = buffer
        if stores and group["nesterov"]:  # d_t = g_t + μ v_t
            if keeps:
                self._keep_nesterov_direction(group, lists, buffers, versions)
            elif group["foreach"] or group["fused"]:
                torch._foreach_add_(directions, buffers, alpha=group["momentum"])
            else:
                for d, v in zip(directions, buffers):
                    d.add_(v, alpha=group["momentum"])

    def _keep_nesterov_direction(self, group: dict, lists: dict, buffers: list[torch.Tensor],
                                 versions: list[int]) -> None:
        """SGDN-HD's d_t = g_t + μ v_t without a copy of g_t. torch's foreach kernel adds μ v_t
        into the gradient in place (``_foreach_add_``: the gradient's version counter moved
        during the step, where only torch's kernel ran), so the gradient then holds d_t, kept as
        a copy-on-write clone; a gradient left unwritten (the for-loop kernel: its version
        unchanged) is g_t still, and d_t is written into the stored buffer in one pass."""
        momentum = group["momentum"]
        for p, g, v, d, before in zip(lists["params"], lists["grads"], buffers,
                                      lists["directions"], versions):
            if g._version == before:
                torch.add(g, v, alpha=momentum, out=d)
            else:  # (views of one bucket share a counter: it may have moved more than once)
                self.state[p]["hd_direction"] = keep_gradient([g])[0]


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
