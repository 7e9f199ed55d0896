"""Hypergradient descent as drop-in ``torch.optim.Optimizer`` classes: :class:`SGDHD`,
:class:`AdamHD` and :class:`AdamWHD` (Baydin et al., ICLR 2018, Algorithms 1-3).

    optimizer = hdfunc.optim.AdamHD(model.parameters(), lr=1e-3, hypergrad_lr=1e-7)
    for x, y in loader:
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        optimizer.step()

One source of truth, split in two halves (docs/optim.md, "Design"):

* the learning-rate update β_t, α_t, γ_t from h_t is :func:`hdfunc.adapt_rates` of the functional
  core, called with an :class:`hdfunc.HDState` view of this optimizer's per-group rate state;
* the parameter step u_t = -γ_t d_t is torch's own optimizer kernel (``torch.optim.adam.adam`` /
  ``torch.optim.sgd.sgd``, fused or foreach) called with the adapted rate, so ``hypergrad_lr=0``
  is torch.optim.Adam / AdamW / SGD step for step.

What this module adds is only h_t = -g_t · d_{t-1}: one dot product per step over the stored
direction (SGD-HD, SGDN-HD: one extra buffer) or over d_{t-1} recomputed from Adam's moments with
the bias corrections of step t-1 (Adam-HD, AdamW-HD, heavy-ball SGD-HD: no extra buffer). The
tests prove each trajectory equal to the functional rule (:func:`hdfunc.adam_hd`, ...).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Literal, Optional

import torch
import torch.distributed as dist
from torch.optim import Optimizer
from torch.optim.adam import adam as torch_adam
from torch.optim.sgd import sgd as torch_sgd

from hdfunc.directions import identity, nesterov as nesterov_direction, scale_by_adam
from hdfunc.hypergradient import HDConfig, HDState, adapt_rates, hypergradient, inverse_square

__all__ = ["AdamHD", "AdamWHD", "HDOptimizer", "SGDHD", "SGDNHD"]

Scope = Literal["global", "group"]
SchedulerComposition = Literal["scale", "reset"]
SCOPES = ("global", "group")
SCRATCH_BYTES = 256 * 1024  # the CPU hypergradient pass streams through this much cache
SCHEDULER_COMPOSITIONS = ("scale", "reset")
HD_GROUP_KEYS = ("hypergrad_lr", "mode", "final_lr", "transition", "hyper_hypergrad_lr",
                 "lr_bounds", "skip_nonfinite")

try:  # the dtype torch.optim uses for state["step"]
    from torch.optim.optimizer import _get_scalar_dtype
except ImportError:  # pragma: no cover - older/newer torch
    def _get_scalar_dtype(is_fused: Optional[bool] = None) -> torch.dtype:
        if is_fused:
            return torch.float32
        return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def _dot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Σ x⊙y, accumulated in the tensors' precision (at least float32, as the functional core)."""
    if x.dtype == y.dtype and x.dtype in (torch.float32, torch.float64):
        return torch.dot(x.reshape(-1), y.reshape(-1))
    dtype = torch.promote_types(torch.promote_types(x.dtype, y.dtype), torch.float32)
    return (x.to(dtype) * y.to(dtype)).sum()


def _fused_supported(params: list[torch.Tensor]) -> bool:
    return all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float16, torch.bfloat16,
               torch.float32, torch.float64) for p in params)


class HDOptimizer(Optimizer):
    """Shared machinery of the HD optimizers: per-group rate state, the hypergradient reduction
    (across groups and, with ``process_group``, across ranks) and the call to
    :func:`hdfunc.adapt_rates`. Subclasses supply ``_prepare`` (gather tensors, lazy state),
    ``_hypergrad_terms`` (g·d, g·g, d·d at step t) and ``_base_step`` (torch's kernel)."""

    _tensor_lr_when_compiling = False  # torch's foreach kernel takes a tensor rate under compile

    def __init__(self, params: Iterable, defaults: dict, *, hypergrad_scope: Scope = "global",
                 process_group: Any = None, scheduler_composition: SchedulerComposition = "scale"):
        if hypergrad_scope not in SCOPES:
            raise ValueError(f"hypergrad_scope must be one of {SCOPES}, got {hypergrad_scope!r}")
        if scheduler_composition not in SCHEDULER_COMPOSITIONS:
            raise ValueError(f"scheduler_composition must be one of {SCHEDULER_COMPOSITIONS}, "
                             f"got {scheduler_composition!r}")
        self.hypergrad_scope = hypergrad_scope
        self.process_group = process_group
        self.scheduler_composition = scheduler_composition
        super().__init__(params, defaults)

    # ------------------------------------------------------------------ construction helpers

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        lr = group["lr"]
        if isinstance(lr, torch.Tensor):
            raise TypeError("lr must be a Python float for an HD optimizer (the adapted rate is "
                            "kept as a tensor in the optimizer's state); got a Tensor")
        for p in group["params"]:
            if p.is_complex():
                raise TypeError("complex parameters are not supported by the HD optimizers")
            if p.is_sparse:
                raise TypeError("sparse parameters are not supported by the HD optimizers")
        # The core validates every HD option (names the bad one in its error).
        hypergradient(identity(), lr, group["hypergrad_lr"], mode=group["mode"],
                      final_lr=group["final_lr"], transition=group["transition"],
                      hyper_hypergrad_lr=group["hyper_hypergrad_lr"],
                      lr_bounds=group["lr_bounds"], skip_nonfinite=group["skip_nonfinite"])
        self._resolve_kernel(group)

    def _resolve_kernel(self, group: dict) -> None:
        """``fused``/``foreach`` → booleans stored in the group (torch.optim's convention)."""
        if group["fused"] and group["foreach"]:
            raise ValueError("fused=True and foreach=True cannot both be set")
        if group["fused"] is None:
            group["fused"] = (group["foreach"] is None and self._fused_by_default(group["params"]))
        if group["fused"] and not _fused_supported(group["params"]):
            raise ValueError("fused=True needs floating-point params on cpu or cuda")
        if group["foreach"] is None:
            group["foreach"] = not group["fused"]

    def _fused_by_default(self, params: list[torch.Tensor]) -> bool:
        return _fused_supported(params)

    @staticmethod
    def _hd_defaults(lr: float, hypergrad_lr: float, mode: str, final_lr: Optional[float],
                     transition: Callable, hyper_hypergrad_lr: Optional[float],
                     lr_bounds: Optional[tuple], skip_nonfinite: bool) -> dict:
        return dict(lr=lr, hypergrad_lr=hypergrad_lr, mode=mode, final_lr=final_lr,
                    transition=transition, hyper_hypergrad_lr=hyper_hypergrad_lr,
                    lr_bounds=lr_bounds, skip_nonfinite=skip_nonfinite)

    # ------------------------------------------------------------------ the rate state

    @staticmethod
    def _config(group: dict) -> HDConfig:
        low, high = group["lr_bounds"] if group["lr_bounds"] is not None else (None, None)
        return HDConfig("global", group["mode"], group["transition"],
                        group["final_lr"] is not None, group["hyper_hypergrad_lr"], low, high,
                        group["skip_nonfinite"])

    @staticmethod
    def _rate_dtype(group: dict) -> torch.dtype:
        """Rates and the hypergradient in float64 (where the device has it): β h_t is often
        ~1e-10 of α (β = 1e-7 for Adam-HD), below float32's resolution, and a float lr of
        torch.optim is a double, so hypergrad_lr=0 reproduces torch.optim bit for bit."""
        if group["params"][0].device.type == "mps":
            return torch.float32
        return torch.float64

    def _rate_state(self, group: dict) -> dict:
        """The group's HD rate state (created at its first step from the group's ``lr``), after
        applying any change a scheduler or the user made to ``lr`` / ``hypergrad_lr``."""
        hd = group.get("hd_state")
        if hd is None:
            like = group["params"][0]
            dtype = self._rate_dtype(group)

            def rate(value: float) -> torch.Tensor:
                return torch.tensor(float(value), dtype=dtype, device=like.device)

            hd = {
                "count": torch.zeros((), dtype=torch.int64, device=like.device),
                "lr": rate(group["lr"]),
                "hypergrad_lr": rate(group["hypergrad_lr"]),
                "applied_lr": rate(group["lr"]),
                "hypergrad": rate(0.0),
                "final_lr": () if group["final_lr"] is None else rate(group["final_lr"]),
                "lr_sensitivity": () if group["hyper_hypergrad_lr"] is None else rate(0.0),
                "hyper_hypergrad": () if group["hyper_hypergrad_lr"] is None else rate(0.0),
                "skipped": torch.zeros((), dtype=torch.int64, device=like.device),
                "scheduled_lr": float(group["lr"]),
                "scheduled_hypergrad_lr": float(group["hypergrad_lr"]),
            }
            group["hd_state"] = hd
            return hd
        if group["lr"] != hd["scheduled_lr"]:  # a scheduler (or the user) changed lr
            new, old = float(group["lr"]), hd["scheduled_lr"]
            if self.scheduler_composition == "scale" and old != 0.0:
                hd["lr"] = hd["lr"] * (new / old)
                if isinstance(hd["final_lr"], torch.Tensor):
                    hd["final_lr"] = hd["final_lr"] * (new / old)
            else:
                hd["lr"] = torch.full_like(hd["lr"], new)
            hd["scheduled_lr"] = new
        if group["hypergrad_lr"] != hd["scheduled_hypergrad_lr"]:
            hd["hypergrad_lr"] = torch.full_like(hd["hypergrad_lr"], float(group["hypergrad_lr"]))
            hd["scheduled_hypergrad_lr"] = float(group["hypergrad_lr"])
        return hd

    def _adapt(self, group: dict, hd: dict, dot: torch.Tensor, grad_sq: torch.Tensor,
               direction_sq: torch.Tensor) -> None:
        """α_t etc. from h_t = -g_t·d_{t-1} through the core's single rate update."""
        hypergrad = (-dot).to(hd["lr"].dtype)
        view = HDState(count=hd["count"], lr=hd["lr"], hypergrad_lr=hd["hypergrad_lr"],
                       applied_lr=hd["applied_lr"], hypergrad=hd["hypergrad"], direction=(),
                       base=(), final_lr=hd["final_lr"], lr_sensitivity=hd["lr_sensitivity"],
                       hyper_hypergrad=hd["hyper_hypergrad"], skipped=hd["skipped"])
        multiplicative = group["mode"] == "multiplicative"
        rates = adapt_rates(self._config(group), view, [hypergrad],
                            [grad_sq.to(hypergrad.dtype)] if multiplicative else None,
                            [direction_sq.to(hypergrad.dtype)] if multiplicative else None)
        hd["count"] = hd["count"] + 1
        hd["lr"] = rates.lr[0]
        hd["hypergrad_lr"] = rates.hypergrad_lr
        hd["applied_lr"] = rates.applied_lr[0]
        hd["hypergrad"] = hypergrad
        if rates.lr_sensitivity is not None:
            hd["lr_sensitivity"] = rates.lr_sensitivity[0]
        hd["hyper_hypergrad"] = rates.hyper_hypergrad
        hd["skipped"] = rates.skipped

    # ------------------------------------------------------------------ the step

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """One HD step for every group: h_t (one reduction over all groups, or per group, and
        across ``process_group``), α_t by :func:`hdfunc.adapt_rates`, then torch's kernel."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        prepared = [self._prepare(group) for group in self.param_groups]
        states = [self._rate_state(group) for group in self.param_groups]
        terms = [self._hypergrad_terms(group, lists, hd)
                 for group, lists, hd in zip(self.param_groups, prepared, states)]
        device = states[0]["lr"].device
        dtype = states[0]["lr"].dtype
        for hd in states[1:]:
            dtype = torch.promote_types(dtype, hd["lr"].dtype)
        # rows: groups; columns: g·d, g·g, d·d (the two norms only for the multiplicative rule)
        table = torch.stack([torch.stack(row).to(device=device, dtype=dtype) for row in terms])
        if self.process_group is not None:
            group_arg = None if self.process_group is dist.group.WORLD else self.process_group
            dist.all_reduce(table, op=dist.ReduceOp.SUM, group=group_arg)
        if self.hypergrad_scope == "global":
            table = table.sum(0, keepdim=True).expand_as(table)
        for i, (group, lists, hd) in enumerate(zip(self.param_groups, prepared, states)):
            self._adapt(group, hd, table[i, 0], table[i, 1], table[i, 2])
            if lists["params"]:
                self._base_step(group, lists, hd)
        return loss

    def _rate_for_kernel(self, group: dict, hd: dict) -> float | torch.Tensor:
        """γ_t for torch's kernel: a tensor for fused kernels (no device sync), else a float."""
        if group["fused"] or (self._tensor_lr_when_compiling and torch.compiler.is_compiling()):
            return hd["applied_lr"]
        return float(hd["applied_lr"])  # foreach/for-loop kernels take a Python number

    @staticmethod
    def _effective_grad(group: dict, p: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """g_t as the HD rule sees it: maximize negates, coupled weight decay adds λθ_{t-1}."""
        g = grad.neg() if group["maximize"] else grad
        if group["weight_decay"] != 0 and not group.get("decoupled_weight_decay", False):
            g = g.add(p, alpha=group["weight_decay"])
        return g

    # ------------------------------------------------------------------ reporting, checkpoints

    def adapted_lrs(self) -> list[torch.Tensor]:
        """α_t of each group (the rate the next step adapts from); the group's ``lr`` before its
        first step."""
        out = []
        for group in self.param_groups:
            hd = group.get("hd_state")
            out.append(hd["lr"].detach().clone() if hd is not None
                       else torch.tensor(float(group["lr"])))
        return out

    def hd_stats(self) -> list[dict]:
        """Per group: ``lr`` α_t, ``applied_lr`` γ_t, ``hypergrad`` h_t, ``hypergrad_lr`` β_t,
        ``steps`` and ``skipped`` (steps whose rate update the non-finite guard skipped)."""
        stats = []
        for group in self.param_groups:
            hd = group.get("hd_state")
            if hd is None:
                stats.append({"lr": float(group["lr"]), "steps": 0, "skipped": 0})
                continue
            stats.append({"lr": hd["lr"].detach().clone(),
                          "applied_lr": hd["applied_lr"].detach().clone(),
                          "hypergrad": hd["hypergrad"].detach().clone(),
                          "hypergrad_lr": hd["hypergrad_lr"].detach().clone(),
                          "steps": hd["count"].clone(), "skipped": hd["skipped"].clone()})
        return stats

    def state_dict(self) -> dict:
        """torch's state dict, with a snapshot (not a live reference) of each group's HD rate
        state: α, β, γ, h, counters and the scheduler bookkeeping."""
        sd = super().state_dict()
        for group in sd["param_groups"]:
            if "hd_state" in group:
                group["hd_state"] = dict(group["hd_state"])
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            hd = group.get("hd_state")
            if hd is None:
                continue
            device = group["params"][0].device
            for key, value in list(hd.items()):
                if isinstance(value, torch.Tensor):
                    hd[key] = value.to(device)

    # ------------------------------------------------------------------ subclass interface

    def _prepare(self, group: dict) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def _hypergrad_terms(self, group: dict, lists: dict, hd: dict) -> list[torch.Tensor]:
        raise NotImplementedError  # pragma: no cover

    def _base_step(self, group: dict, lists: dict, hd: dict) -> None:
        raise NotImplementedError  # pragma: no cover


def _sum(values: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    if not values:
        return like.new_zeros(())
    return torch.stack([v.to(like.dtype) for v in values]).sum()


# ============================================================================= SGD


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
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, hypergrad_lr: float = 1e-3,
                 momentum: float = 0.0, dampening: float = 0.0, weight_decay: float = 0.0,
                 nesterov: bool = False, *, maximize: bool = False, mode: str = "additive",
                 final_lr: Optional[float] = None, transition: Callable = inverse_square,
                 hyper_hypergrad_lr: Optional[float] = None,
                 lr_bounds: Optional[tuple] = None, skip_nonfinite: bool = True,
                 hypergrad_scope: Scope = "global", process_group: Any = None,
                 scheduler_composition: SchedulerComposition = "scale",
                 foreach: Optional[bool] = None, fused: Optional[bool] = None):
        if momentum != 0.0:
            nesterov_direction(momentum)  # the core validates μ ∈ [0, 1)
        if not 0.0 <= dampening <= 1.0:
            raise ValueError(f"dampening must lie in [0, 1], got {dampening}")
        if weight_decay < 0.0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("nesterov=True needs momentum > 0 and dampening = 0")
        defaults = self._hd_defaults(lr, hypergrad_lr, mode, final_lr, transition,
                                     hyper_hypergrad_lr, lr_bounds, skip_nonfinite)
        defaults.update(momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, maximize=maximize, foreach=foreach, fused=fused)
        super().__init__(params, defaults, hypergrad_scope=hypergrad_scope,
                         process_group=process_group,
                         scheduler_composition=scheduler_composition)

    _tensor_lr_when_compiling = True

    def _fused_by_default(self, params: list[torch.Tensor]) -> bool:
        # torch's foreach SGD takes a float rate: cheapest on CPU; on CUDA the fused kernel
        # takes the rate as a tensor and so avoids a device sync per step.
        return all(p.device.type == "cuda" for p in params) and _fused_supported(params)

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

    def _hypergrad_terms(self, group: dict, lists: dict, hd: dict) -> list[torch.Tensor]:
        multiplicative = group["mode"] == "multiplicative"
        # d_{t-1}: the stored direction, or the heavy-ball momentum buffer v_{t-1} (none at t=1)
        if self._stores_direction(group):
            previous = lists["directions"]
        else:
            previous = lists["momentum_buffers"]
        stores = self._stores_direction(group)
        streamed = not torch.compiler.is_compiling()
        dots, grad_sq, dir_sq = [], [], []
        effective = []
        for p, grad, d in zip(lists["params"], lists["grads"], previous):
            g = self._effective_grad(group, p, grad)
            effective.append(g)
            if multiplicative:
                grad_sq.append(_dot(g, g))
            if d is None:  # heavy ball before its first step: d_0 = 0
                continue
            if stores and streamed and d.device.type == "cpu" and g.is_contiguous() \
                    and d.is_contiguous():
                # h's dot product and d_t ← g_t in one pass through the cache
                dot, sq = self._streamed_dot_and_copy(g, d, multiplicative)
            else:
                dot = _dot(g, d)
                sq = _dot(d, d) if multiplicative else None
                if stores:
                    d.copy_(g)  # d_t starts as g_t (Nesterov adds μ v_t after the step)
            dots.append(dot)
            if multiplicative:
                dir_sq.append(sq)
        lists["effective_grads"] = effective
        like = hd["lr"]
        return [_sum(dots, like), _sum(grad_sq, like), _sum(dir_sq, like)]

    def _streamed_dot_and_copy(self, g: torch.Tensor, d: torch.Tensor, want_sq: bool
                               ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """g·d (and d·d), then d ← g, chunk by chunk while the chunk is in cache."""
        g_flat, d_flat = g.reshape(-1), d.view(-1)
        chunk = SCRATCH_BYTES // g.element_size()
        dots, squares = [], []
        for start in range(0, g_flat.numel(), chunk):
            g_c, d_c = g_flat[start:start + chunk], d_flat[start:start + chunk]
            dots.append(_dot(g_c, d_c))
            if want_sq:
                squares.append(_dot(d_c, d_c))
            d_c.copy_(g_c)
        dot = dots[0] if len(dots) == 1 else torch.stack(dots).sum()
        if not want_sq:
            return dot, None
        return dot, squares[0] if len(squares) == 1 else torch.stack(squares).sum()

    def _base_step(self, group: dict, lists: dict, hd: dict) -> None:
        stores = self._stores_direction(group)
        directions = lists["directions"]  # already d_t ← g_t, in the hypergradient pass
        buffers = lists["momentum_buffers"] if group["momentum"] != 0 else []
        torch_sgd(lists["params"], lists["grads"], buffers, foreach=group["foreach"],
                  fused=group["fused"], weight_decay=group["weight_decay"],
                  momentum=group["momentum"], lr=self._rate_for_kernel(group, hd),
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
    optimizer twin of :func:`hdfunc.sgdn_hd`."""
    return SGDHD(params, lr, hypergrad_lr, momentum=momentum, weight_decay=weight_decay,
                 nesterov=True, **options)


# ============================================================================= Adam


class AdamHD(HDOptimizer):
    """Adam-HD (Algorithm 3) with torch.optim.Adam's step (``weight_decay`` is the coupled L2
    term, as in the paper; :class:`AdamWHD` decouples it):

        h_t = -g_t · d_{t-1},  d_{t-1} = m̂_{t-1} / (√v̂_{t-1} + ε)   (bias corrections of step t-1)
        α_t = α_{t-1} - β h_t,   then torch's Adam step with rate γ_t (= α_t without transition)

    d_{t-1} is recomputed from ``exp_avg``/``exp_avg_sq``: no buffer beyond Adam's. HD and
    optimizer options as in :class:`SGDHD`. ``fused`` (default where supported) runs torch's fused
    Adam kernel with the adapted rate as a tensor; ``foreach`` its multi-tensor kernel.
    amsgrad is not supported.
    """

    decoupled_weight_decay = False

    def __init__(self, params: Iterable, lr: float = 1e-3, hypergrad_lr: float = 1e-7,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, *, maximize: bool = False, mode: str = "additive",
                 final_lr: Optional[float] = None, transition: Callable = inverse_square,
                 hyper_hypergrad_lr: Optional[float] = None,
                 lr_bounds: Optional[tuple] = None, skip_nonfinite: bool = True,
                 hypergrad_scope: Scope = "global", process_group: Any = None,
                 scheduler_composition: SchedulerComposition = "scale",
                 foreach: Optional[bool] = None, fused: Optional[bool] = None):
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise TypeError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        scale_by_adam(betas[0], betas[1], eps)  # the core validates betas and eps
        if weight_decay < 0.0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        defaults = self._hd_defaults(lr, hypergrad_lr, mode, final_lr, transition,
                                     hyper_hypergrad_lr, lr_bounds, skip_nonfinite)
        defaults.update(betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        decoupled_weight_decay=self.decoupled_weight_decay, maximize=maximize,
                        foreach=foreach, fused=fused)
        super().__init__(params, defaults, hypergrad_scope=hypergrad_scope,
                         process_group=process_group,
                         scheduler_composition=scheduler_composition)

    def _prepare(self, group: dict) -> dict:
        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise TypeError("AdamHD does not support sparse gradients")
            state = self.state[p]
            if len(state) == 0:  # as torch.optim.Adam: step on the device only for fused
                state["step"] = (torch.zeros((), dtype=_get_scalar_dtype(is_fused=True),
                                             device=p.device) if group["fused"]
                                 else torch.tensor(0.0, dtype=_get_scalar_dtype()))
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        return {"params": params, "grads": grads, "exp_avgs": exp_avgs,
                "exp_avg_sqs": exp_avg_sqs, "steps": steps}

    def _hypergrad_terms(self, group: dict, lists: dict, hd: dict) -> list[torch.Tensor]:
        like = hd["lr"]
        if not lists["params"]:
            return [like.new_zeros(())] * 3
        beta1, beta2 = group["betas"]
        eps = group["eps"]
        multiplicative = group["mode"] == "multiplicative"
        decoupled = group["decoupled_weight_decay"] and group["weight_decay"] != 0
        # Adam's direction of step t-1 (0 before the first step, where m = v = 0):
        #   a_{t-1} = m̂/(√v̂ + ε) = (c2/c1) · m / (√v + ε c2),  c1 = 1-β1^(t-1), c2 = √(1-β2^(t-1)),
        # with the corrections in double precision (as torch.optim.Adam), one vector op for all
        # tensors (each has its own step count).
        t = torch.stack(lists["steps"]).to(device=like.device, dtype=torch.float64)
        started = t > 0
        correction1 = torch.where(started, 1 - beta1 ** t, 1.0)
        correction2 = torch.where(started, (1 - beta2 ** t).sqrt(), 1.0)
        scale = torch.where(started, correction2 / correction1, 0.0)
        eps_scaled = eps * correction2
        decay = scale.new_zeros(scale.shape)
        if decoupled:
            # d_{t-1} = a_{t-1} + λθ_{t-2} with θ_{t-2} = (θ_{t-1} + γa_{t-1}) / (1 - γλ), hence
            # d_{t-1} = (a_{t-1} + λθ_{t-1}) / (1 - γ_{t-1}λ): exact, with no stored copy.
            weight_decay = group["weight_decay"]
            shrink = 1 - hd["applied_lr"].to(torch.float64) * weight_decay
            decay = started.to(torch.float64) * weight_decay  # float64 λ
        streamed = like.device.type == "cpu" and not torch.compiler.is_compiling()
        if streamed:  # per-tensor scalars as floats: one conversion (no device sync on CPU)
            eps_scaled, scale_list, decay = (eps_scaled.tolist(), scale.tolist(),
                                             decay.tolist())
        else:
            eps_scaled, scale_list, decay = eps_scaled.unbind(), scale.unbind(), decay.unbind()
        dots, grad_sq, dir_sq = [], [], []
        for i, (p, grad, m, v) in enumerate(zip(lists["params"], lists["grads"],
                                                lists["exp_avgs"], lists["exp_avg_sqs"])):
            g = self._effective_grad(group, p, grad)
            if multiplicative:
                grad_sq.append(_dot(g, g))
            if streamed:
                dot, sq = self._streamed_adam_terms(g, m, v, p, eps_scaled[i], decoupled,
                                                    scale_list[i], decay[i], multiplicative)
            else:
                # m / (√v + ε c2), times c2/c1 below (or here, with decoupled decay)
                direction = m / (v.sqrt() + eps_scaled[i].to(v.device, v.dtype))
                if decoupled:
                    direction = (direction * scale_list[i].to(p.device, p.dtype)
                                 + p * decay[i].to(p.device, p.dtype))
                dot = _dot(g, direction)
                sq = _dot(direction, direction) if multiplicative else None
            dots.append(dot)
            if multiplicative:
                dir_sq.append(sq)
        dots = torch.stack(dots).to(torch.float64)
        if decoupled:
            dot = dots.sum() / shrink
            direction_sq = (torch.stack(dir_sq).to(torch.float64).sum() / shrink ** 2
                            if multiplicative else None)
        else:
            dot = (dots * scale).sum()
            direction_sq = ((torch.stack(dir_sq).to(torch.float64) * scale ** 2).sum()
                            if multiplicative else None)
        return [dot.to(like.dtype), _sum(grad_sq, like),
                like.new_zeros(()) if direction_sq is None else direction_sq.to(like.dtype)]

    def _streamed_adam_terms(self, g, m, v, p, eps_scaled, decoupled, scale, decay,
                             want_sq) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """g·d and d·d for one tensor on the CPU, streamed through a small cache-resident
        scratch buffer: g, m, v (and θ) are read once and no tensor-sized temporary is made."""
        flat = [x.reshape(-1) for x in (g, m, v, p)]
        scratch = self._scratch(g)
        dots, squares = [], []
        for start in range(0, flat[0].numel(), scratch.numel()):
            g_c, m_c, v_c, p_c = (x[start:start + scratch.numel()] for x in flat)
            d_c = scratch[:g_c.numel()]
            torch.sqrt(v_c, out=d_c)
            d_c.add_(eps_scaled)
            torch.div(m_c, d_c, out=d_c)
            if decoupled:
                d_c.mul_(scale).add_(p_c, alpha=decay)
            dots.append(_dot(g_c, d_c))
            if want_sq:
                squares.append(_dot(d_c, d_c))
        dot = dots[0] if len(dots) == 1 else torch.stack(dots).sum()
        if not want_sq:
            return dot, None
        return dot, squares[0] if len(squares) == 1 else torch.stack(squares).sum()

    def _scratch(self, like: torch.Tensor) -> torch.Tensor:
        """A 256 KiB work buffer per dtype (not optimizer state: never saved)."""
        scratch = getattr(self, "_scratch_buffers", None)
        if scratch is None:
            scratch = self._scratch_buffers = {}
        key = (like.device, like.dtype)
        if key not in scratch:
            scratch[key] = like.new_empty(SCRATCH_BYTES // like.element_size())
        return scratch[key]

    def _base_step(self, group: dict, lists: dict, hd: dict) -> None:
        beta1, beta2 = group["betas"]
        torch_adam(lists["params"], lists["grads"], lists["exp_avgs"], lists["exp_avg_sqs"], [],
                   lists["steps"], foreach=group["foreach"], capturable=False,
                   differentiable=False, fused=group["fused"], grad_scale=None, found_inf=None,
                   has_complex=False, decoupled_weight_decay=group["decoupled_weight_decay"],
                   amsgrad=False, beta1=beta1, beta2=beta2,
                   lr=self._rate_for_kernel(group, hd), weight_decay=group["weight_decay"],
                   eps=group["eps"], maximize=group["maximize"])


class AdamWHD(AdamHD):
    """AdamW-HD: :class:`AdamHD` with decoupled weight decay (torch.optim.AdamW's step), the
    optimizer twin of :func:`hdfunc.adamw_hd`. The decay is scaled by the rate, so it is part of
    d_t; d_{t-1} is still recomputed exactly from the moments, θ_{t-1} and γ_{t-1}
    (no extra buffer)."""

    decoupled_weight_decay = True

    def __init__(self, params: Iterable, lr: float = 1e-3, hypergrad_lr: float = 1e-7,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, **options: Any):
        super().__init__(params, lr, hypergrad_lr, betas, eps, weight_decay, **options)

