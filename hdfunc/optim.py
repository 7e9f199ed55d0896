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
the bias corrections of step t-1 (Adam-HD, AdamW-HD, heavy-ball SGD-HD: no extra buffer), in
float32 or wider whatever the parameter dtype. The tests prove each trajectory equal to the
functional rule (:func:`hdfunc.adam_hd`, ...).

After each step ``param_groups[i]["lr"]`` holds γ_t, the rate that step applied, so
loggers and schedulers read the adapted rate; a value written there (by a scheduler or by hand)
is where the next step's rate continues from (docs/optim.md, "Logging the rate and schedulers").

Options are validated at construction and, for values written into ``param_groups`` later, at
the next step; ``load_state_dict`` checks which optimizer wrote a state and takes over the state
of the torch.optim optimizer a class extends (``MIGRATES_FROM``); ``to_torch_state_dict`` hands
the adapted rate back to it (docs/optim.md).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Iterable, Literal, Optional

import torch
import torch.distributed as dist
from torch.optim import Optimizer
from torch.optim.adam import adam as torch_adam
from torch.optim.sgd import sgd as torch_sgd

from hdfunc.base import check_hyperparameter, check_lr_bounds
from hdfunc.directions import identity
from hdfunc.hypergradient import (MODES, HDConfig, HDState, adapt_rates, hypergradient,
                                  inverse_square)
from hdfunc.tree import leaf_vdot

__all__ = ["AdamHD", "AdamWHD", "HDOptimizer", "SGDHD", "SGDNHD"]

Scope = Literal["global", "group"]
SchedulerComposition = Literal["scale", "reset"]
SCOPES = ("global", "group")
SCRATCH_BYTES = 1024 * 1024  # the CPU hypergradient pass streams through buffers of this size
SCHEDULER_COMPOSITIONS = ("scale", "reset")
LOW_PRECISION = (torch.float16, torch.bfloat16)  # the hypergradient pass works in float32 for these
STREAMED_DTYPES = LOW_PRECISION + (torch.float32, torch.float64)

# The per-group HD options (the rest of a group is the base optimizer's), and the HD rate state.
HD_GROUP_KEYS = ("hypergrad_lr", "mode", "final_lr", "hyper_hypergrad_lr", "lr_bounds",
                 "skip_nonfinite")
HD_STATE_KEYS = ("count", "lr", "hypergrad_lr", "applied_lr", "hypergrad", "final_lr",
                 "lr_sensitivity", "hyper_hypergrad", "skipped", "scheduled_lr",
                 "scheduled_hypergrad_lr")
TORCH_ONLY_GROUP_KEYS = ("amsgrad", "capturable", "differentiable")
# the torch.optim optimizer whose running state each HD kind takes over (load_state_dict)
MIGRATES_FROM = {"AdamHD": "torch.optim.Adam", "AdamWHD": "torch.optim.AdamW",
                 "SGDHD": "torch.optim.SGD", "SGDNHD": "torch.optim.SGD(nesterov=True)"}

try:  # the dtype torch.optim uses for state["step"]
    from torch.optim.optimizer import _get_scalar_dtype
except ImportError:  # pragma: no cover - older/newer torch
    def _get_scalar_dtype(is_fused: Optional[bool] = None) -> torch.dtype:
        if is_fused:
            return torch.float32
        return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def _dot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Σ x⊙y, accumulated in the tensors' precision (at least float32, as the functional core;
    one BLAS dot product where the dtypes allow it)."""
    if x.dtype == y.dtype and x.dtype in (torch.float32, torch.float64):
        return torch.dot(x.reshape(-1), y.reshape(-1))
    return leaf_vdot(x, y, torch.promote_types(torch.promote_types(x.dtype, y.dtype),
                                               torch.float32))


def _is_dtensor(p: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(p, DTensor)


def _fused_supported(params: list[torch.Tensor]) -> bool:
    return all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float16, torch.bfloat16,
               torch.float32, torch.float64) for p in params)


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for float16/bfloat16, else ``dtype``: the precision of the hypergradient pass."""
    return torch.promote_types(dtype, torch.float32)


def _underflow_bound(dtype: torch.dtype) -> float:
    """The largest value that rounds to 0 in ``dtype`` (half its smallest subnormal).

    Adam's second moment is stored in the parameter dtype; in float16, v = (1-β2) g² underflows
    to 0 for |g| below ~8e-3 while m does not, and torch's fused kernel stepped with the
    unrounded v. The direction d_{t-1} = m̂/(√v̂+ε) recomputed with v = 0 would be m/ε (~1e5
    for ε = 1e-8); with v at this bound it is the smallest direction consistent with the stored
    state, and elements with m = v = 0 still give 0."""
    info = torch.finfo(dtype)
    return info.smallest_normal * info.eps / 2


# ----------------------------------------------------------------------------- validation
# Each check takes (name, value, group) and raises TypeError/ValueError naming ``name``.


def _check_finite(name: str, value: Any, group: Optional[dict] = None, *, low: float = 0.0,
                 high: float = math.inf, high_inclusive: bool = True) -> None:
    """A finite Python real number in [low, high]: the core's check (which refuses inf and nan),
    for plain numbers only (an optimizer's options are not tensors)."""
    if isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a Python number for an HD optimizer, got a Tensor")
    check_hyperparameter(name, value, low=low, high=high, high_inclusive=high_inclusive)


def _check_lr(name: str, value: Any, group: Optional[dict] = None) -> None:
    if isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a Python float for an HD optimizer (the adapted rate is "
                        "kept as a tensor in the optimizer's state); got a Tensor")
    _check_finite(name, value)


def _check_optional_rate(name: str, value: Any, group: Optional[dict] = None) -> None:
    if value is not None:
        _check_finite(name, value)


def _check_bounds(name: str, value: Any, group: Optional[dict] = None) -> None:
    """None, or a pair (low, high) of finite numbers or None (no bound), with low <= high: the
    core's check (the only key it is registered for is ``lr_bounds``)."""
    check_lr_bounds(value)


def _check_mode(name: str, value: Any, group: Optional[dict] = None) -> None:
    if value not in MODES:
        raise ValueError(f"{name} must be one of {MODES}, got {value!r}")


def _check_flag(name: str, value: Any, group: Optional[dict] = None) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")


def _check_callable(name: str, value: Any, group: Optional[dict] = None) -> None:
    if not callable(value):
        raise TypeError(f"{name} must be a callable δ(t) on a float tensor t, got {value!r}")


def _check_fraction(name: str, value: Any, group: Optional[dict] = None) -> None:
    """A finite number in [0, 1) (β1, β2, momentum)."""
    _check_finite(name, value, high=1.0, high_inclusive=False)


def _check_betas(name: str, value: Any, group: Optional[dict] = None) -> None:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise TypeError(f"{name} must be a pair (beta1, beta2), got {value!r}")
    for i, beta in enumerate(value):
        _check_fraction(f"{name}[{i}]", beta)


def _check_dampening(name: str, value: Any, group: Optional[dict] = None) -> None:
    _check_finite(name, value, high=1.0)


def _check_nesterov(name: str, value: Any, group: Optional[dict] = None) -> None:
    _check_flag(name, value)
    if value and (group["momentum"] <= 0 or group["dampening"] != 0):
        raise ValueError(f"{name}=True needs momentum > 0 and dampening = 0")


HD_OPTION_CHECKS: dict[str, Callable[[str, Any, Optional[dict]], None]] = {
    "lr": _check_lr, "hypergrad_lr": _check_finite, "final_lr": _check_optional_rate,
    "hyper_hypergrad_lr": _check_optional_rate, "lr_bounds": _check_bounds, "mode": _check_mode,
    "transition": _check_callable, "skip_nonfinite": _check_flag, "weight_decay": _check_finite,
    "maximize": _check_flag}


def _writer(group: dict) -> str:
    """Which optimizer wrote a saved param group (told from its keys): an HD kind (AdamHD,
    AdamWHD, SGDHD, SGDNHD), a torch.optim class, or a description of an unknown one."""
    if "hd_state" in group or any(key in group for key in HD_GROUP_KEYS):
        if "betas" in group:
            return "AdamWHD" if group.get("decoupled_weight_decay") else "AdamHD"
        if "momentum" in group:
            return "SGDNHD" if group.get("nesterov") else "SGDHD"
        return "an unknown HD optimizer"
    if "betas" in group and "amsgrad" in group:
        return "torch.optim.AdamW" if group.get("decoupled_weight_decay") else "torch.optim.Adam"
    if {"momentum", "dampening", "nesterov"} <= group.keys():
        return "torch.optim.SGD(nesterov=True)" if group["nesterov"] else "torch.optim.SGD"
    keys = set(group) - {"params", "initial_lr"}  # (initial_lr: added by lr schedulers)
    for name in sorted(vars(torch.optim)):
        candidate = getattr(torch.optim, name)
        if isinstance(candidate, type) and issubclass(candidate, Optimizer):
            try:
                if set(candidate([torch.nn.Parameter(torch.zeros(1))]).defaults) == keys:
                    return f"torch.optim.{name}"
            except Exception:  # an optimizer that needs other arguments: not this one
                continue
    return f"an unknown optimizer (param group keys {sorted(map(str, keys))})"


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
        for p in group["params"]:
            if _is_dtensor(p):
                raise TypeError(
                    "DTensor (FSDP2 / tensor-parallel) parameters are not supported by the HD "
                    "optimizers: shard the optimizer instead (torch's ZeroRedundancyOptimizer "
                    "with optimizer_class=functools.partial(AdamHD, process_group=...), or "
                    "process_group= on an optimizer over each rank's shard); see docs/optim.md")
            if p.is_complex():
                raise TypeError("complex parameters are not supported by the HD optimizers")
            if p.is_sparse:
                raise TypeError("sparse parameters are not supported by the HD optimizers")
        self._check_group(group)
        # The core validates every HD option as the functional rules do.
        hypergradient(identity(), group["lr"], group["hypergrad_lr"], mode=group["mode"],
                      final_lr=group["final_lr"], transition=group["transition"],
                      hyper_hypergrad_lr=group["hyper_hypergrad_lr"],
                      lr_bounds=group["lr_bounds"], skip_nonfinite=group["skip_nonfinite"])
        self._resolve_kernel(group)

    def _option_checks(self) -> dict[str, Callable[[str, Any, Optional[dict]], None]]:
        """key -> check of a param group's value (the HD options and the base optimizer's)."""
        return HD_OPTION_CHECKS

    def _check_group(self, group: dict, where: Optional[str] = None,
                     skip: tuple[str, ...] = ()) -> None:
        """Every option of ``group`` (but those in ``skip``) is valid. ``where`` (e.g.
        "param_groups[1]") prefixes the error with the group and key, for values written into a
        group after construction."""
        for key, check in self._option_checks().items():
            if key in skip:
                continue
            value = group.get(key)
            try:
                check(key, value, group)
            except (TypeError, ValueError) as error:
                if where is None:
                    raise
                raise type(error)(f"{where}[{key!r}] = {value!r} is invalid: {error}") from None

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

    def _anchor(self, group: dict) -> torch.Tensor:
        """The tensor whose device holds the group's rate state: its first parameter, or (a
        group left empty, e.g. by ZeroRedundancyOptimizer's partition on some rank) the first
        parameter of any group, so every rank reduces the same table on the same device."""
        for candidate in [group] + self.param_groups:
            if candidate["params"]:
                return candidate["params"][0]
        return torch.zeros(())

    def _rate_dtype(self, group: dict) -> torch.dtype:
        """Rates and the hypergradient in float64 (where the device has it): β h_t is often
        ~1e-10 of α (β = 1e-7 for Adam-HD), below float32's resolution, and a float lr of
        torch.optim is a double, so hypergrad_lr=0 reproduces torch.optim bit for bit."""
        if self._anchor(group).device.type == "mps":
            return torch.float32
        return torch.float64

    def _rate_state(self, group: dict) -> dict:
        """The group's HD rate state (created at its first step from the group's ``lr``), after
        applying any change a scheduler or the user made to ``lr`` / ``hypergrad_lr``."""
        hd = group.get("hd_state")
        if hd is None:
            like = self._anchor(group)
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
        written = hd["scheduled_lr"]  # the rate this optimizer last left in group["lr"]
        value = group["lr"]
        if value is not written and value != written:  # a scheduler (or the user) wrote lr
            new = float(value)
            if self.scheduler_composition == "scale" and written != 0.0:
                # the rate continues from the written value: α and α_∞ scaled by new/γ, as
                # new · (α/γ) so that α = γ (no final_lr) gives α = new exactly
                hd["lr"] = new * (hd["lr"] / written)
                if isinstance(hd["final_lr"], torch.Tensor):
                    hd["final_lr"] = new * (hd["final_lr"] / written)
            else:
                hd["lr"] = torch.full_like(hd["lr"], new)
            hd["scheduled_lr"] = value
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
        if not torch.compiler.is_compiling():  # (a compiled step is guarded on these values)
            for i, group in enumerate(self.param_groups):  # values set by hand since the last step
                hd = group.get("hd_state")
                own = hd is not None and group["lr"] is hd["scheduled_lr"]  # γ written by step
                self._check_group(group, where=f"param_groups[{i}]", skip=("lr",) if own else ())
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
        self._report_applied_rates(states, dtype)
        self._report_skipped_steps(states, prepared)
        return loss

    @torch.compiler.disable
    def _report_applied_rates(self, states: list[dict], dtype: torch.dtype) -> None:
        """group["lr"] ← γ_t (a Python float, as torch.optim keeps lr), for loggers and
        schedulers; remembered in the rate state so that the next step can tell a scheduler's
        (or the user's) write from its own. One device-to-host copy for all groups (a sync off
        the CPU). Under torch.compile this runs eagerly (a graph break at the end of the step):
        the floats then reach the next compiled step as dynamic values, not as constants baked
        into the graph, so a new γ every step causes no recompilation (tested)."""
        device = states[0]["applied_lr"].device
        rates = torch.stack([hd["applied_lr"].to(device=device, dtype=dtype)
                             for hd in states]).tolist()
        for group, hd, rate in zip(self.param_groups, states, rates):
            group["lr"] = rate
            hd["scheduled_lr"] = rate

    def _report_skipped_steps(self, states: list[dict], prepared: list[dict]) -> None:
        """Warn once (RuntimeWarning) when some step's h_t or new α was not finite: how many steps and
        the likely cause. Reading the counter syncs an accelerator, so off the CPU it is read
        at steps 1, 2, 4, 8, ... only; not under torch.compile (hd_stats() always has it)."""
        if getattr(self, "_skipped_steps_reported", False) or torch.compiler.is_compiling():
            return
        self._eager_steps = getattr(self, "_eager_steps", 0) + 1
        if (states[0]["skipped"].device.type != "cpu"
                and self._eager_steps & (self._eager_steps - 1)):
            return
        skipped = [int(hd["skipped"]) for hd in states]
        if not any(skipped):
            return
        self._skipped_steps_reported = True
        i = next(i for i, count in enumerate(skipped) if count)
        group = self.param_groups[i]
        outcome = ("left α unchanged" if group["skip_nonfinite"]
                   else "made α non-finite (skip_nonfinite=False)")
        warnings.warn(
            f"{_writer(group)}: {skipped[i]} of {int(states[i]['count'])} steps so far {outcome} "
            f"(param group {i}) because the hypergradient h_t = -g_t·d_(t-1) or the new rate "
            f"alpha_t - beta h_t was not finite. "
            f"Likely cause: {self._skip_cause(prepared)}. The count is in "
            f"hd_stats()[{i}]['skipped']; this warning is shown once.", RuntimeWarning,
            stacklevel=5)

    def _skip_cause(self, prepared: list[dict]) -> str:
        def finite(tensors: Iterable) -> bool:
            return all(bool(torch.isfinite(t).all()) for t in tensors
                       if isinstance(t, torch.Tensor))

        params_finite = all(finite(lists["params"]) for lists in prepared)
        hint = self._low_precision_hint()
        if hint is not None and not params_finite:
            return hint
        if not all(finite(lists["grads"]) for lists in prepared):
            return ("non-finite gradients (an overflow in the loss or the activations; in "
                    "float16, torch.amp.GradScaler skips such steps before the optimizer sees "
                    "them)")
        if not params_finite:
            return "non-finite parameters (the steps diverged: rate or gradients too large)"
        if not all(finite(self.state[p].values()) for lists in prepared
                   for p in lists["params"]):
            return "non-finite optimizer state (moments, momentum or stored direction)"
        return ("an overflow of the dot products g·d or of beta h_t (gradients or steps of "
                "enormous magnitude, or a hypergrad_lr too large)")

    def _low_precision_hint(self) -> Optional[str]:
        """A cause specific to the base optimizer's kernel in low precision, if any."""
        return None

    @staticmethod
    def _streamed(tensors: list[torch.Tensor]) -> bool:
        """Whether the hypergradient pass streams through the CPU scratch buffers (eager mode,
        CPU tensors of a floating dtype) rather than one vector expression per tensor."""
        return not torch.compiler.is_compiling() and all(
            t.device.type == "cpu" and t.dtype in STREAMED_DTYPES for t in tensors)

    def _rate_for_kernel(self, group: dict, hd: dict) -> float | torch.Tensor:
        """γ_t for torch's kernel: a tensor for fused kernels (no device sync), else a float."""
        if group["fused"] or (self._tensor_lr_when_compiling and torch.compiler.is_compiling()):
            return hd["applied_lr"]
        return float(hd["applied_lr"])  # foreach/for-loop kernels take a Python number

    @staticmethod
    def _effective_grad(group: dict, p: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """g_t as the HD rule sees it: maximize negates, coupled weight decay adds λθ_{t-1};
        float32 at least (float16/bfloat16 gradients are converted)."""
        g = grad.to(_accumulation_dtype(grad.dtype))
        g = g.neg() if group["maximize"] else g
        if group["weight_decay"] != 0 and not group.get("decoupled_weight_decay", False):
            g = g.add(p, alpha=group["weight_decay"])
        return g

    # ------------------------------------------------------------------ reporting, checkpoints

    def __repr__(self) -> str:
        """torch.optim's listing of each group's options, headed by the rates HD adapted:
        α_t (``adapted_lr``), γ_t (``applied_lr``, the last step's rate, also in ``lr``), β_t
        and the step count. Reads the rate tensors (a device sync off the CPU)."""
        lines = [f"{type(self).__name__} (hypergrad_scope={self.hypergrad_scope!r}, "
                 f"scheduler_composition={self.scheduler_composition!r})"]
        for i, group in enumerate(self.param_groups):
            lines.append(f"Parameter Group {i}")
            hd = group.get("hd_state")
            if hd is None:
                lines.append(f"    adapted_lr: {float(group['lr'])!r} (no step yet: lr)")
            else:
                lines.append(f"    adapted_lr: {float(hd['lr'])!r} (alpha_t)")
                lines.append(f"    applied_lr: {float(hd['applied_lr'])!r} (gamma_t, the last "
                             "step's rate)")
                lines.append(f"    adapted_hypergrad_lr: {float(hd['hypergrad_lr'])!r} (beta_t)")
                lines.append(f"    steps: {int(hd['count'])}")
            for key in sorted(group):
                if key in ("params", "hd_state"):
                    continue
                value = group[key]
                if key == "transition":
                    value = getattr(value, "__name__", value)
                lines.append(f"    {key}: {value}")
        return "\n".join(lines) + "\n)"

    def adapted_lrs(self) -> list[torch.Tensor]:
        """α_t of each group (the rate the next step adapts from); the group's ``lr`` before its
        first step. (``param_groups[i]["lr"]`` holds γ_t, the rate the last step applied, which
        is α_t unless ``final_lr`` is set; docs/optim.md, "Logging the rate and
        schedulers".)"""
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
        state: α, β, γ, h, counters and the scheduler bookkeeping. Only data is saved (tensors,
        numbers, strings), so ``torch.load(..., weights_only=True)`` (torch's default) reads it:
        the ``transition`` callable is code, not state, and is taken from the optimizer the
        checkpoint is loaded into."""
        sd = super().state_dict()
        for group in sd["param_groups"]:
            group.pop("transition", None)
            if "hd_state" in group:
                group["hd_state"] = dict(group["hd_state"])
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's ``load_state_dict``, after checking up front that each group was written by
        this kind of HD optimizer (AdamHD, AdamWHD, SGDHD or SGDNHD), with complete HD state,
        valid values and per-parameter state of the parameters' shapes; a wrong state dict
        raises a ValueError naming the optimizer that wrote it, before anything changes.

        A state of the torch.optim optimizer this class extends (``MIGRATES_FROM``: Adam for
        AdamHD, AdamW for AdamWHD, SGD for SGDHD, SGD with Nesterov momentum for SGDNHD) is
        taken over: its base options, moments, momentum buffers and step counts, with α starting
        from its ``lr``; the HD options and kernel are this optimizer's (docs/optim.md,
        "Switching a running optimizer to HD")."""
        super().load_state_dict(self._checked_state_dict(state_dict))
        for group in self.param_groups:
            hd = group.get("hd_state")
            if hd is None:
                continue
            device = self._anchor(group).device
            for key, value in list(hd.items()):
                if isinstance(value, torch.Tensor):
                    hd[key] = value.to(device)

    def _checked_state_dict(self, state_dict: Any) -> dict:
        """``state_dict`` checked (and, from a torch.optim optimizer, migrated) group by group,
        ready for torch's ``load_state_dict``."""
        if (not isinstance(state_dict, dict) or not isinstance(state_dict.get("state"), dict)
                or not isinstance(state_dict.get("param_groups"), list)):
            raise ValueError("not an optimizer state dict: expected a dict with 'state' (a dict) "
                             "and 'param_groups' (a list)")
        saved_groups, saved_state = state_dict["param_groups"], state_dict["state"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"the state dict has {len(saved_groups)} param groups, this "
                             f"optimizer {len(self.param_groups)}")
        suggestion = {source: kind for kind, source in MIGRATES_FROM.items()}
        groups, state = [], {}
        for i, (saved, own) in enumerate(zip(saved_groups, self.param_groups)):
            where = f"state_dict['param_groups'][{i}]"
            if not isinstance(saved, dict) or not isinstance(saved.get("params"), list):
                raise ValueError(f"{where} is not a param group (a dict with a 'params' list)")
            kind, writer = _writer(own), _writer(saved)
            migrating = writer == MIGRATES_FROM.get(kind)
            if writer != kind and not migrating:
                target = writer if writer in MIGRATES_FROM else suggestion.get(writer)
                raise ValueError(
                    f"{where} was written by {writer}; {kind} cannot load it ({kind} loads the "
                    f"states of {kind} and takes over those of {MIGRATES_FROM.get(kind)})"
                    + (f": load it into {target}" if target else ""))
            group = (self._migrated_group(saved, own, where) if migrating
                     else self._checked_hd_group(saved, own, where))
            if len(group["params"]) != len(own["params"]):
                raise ValueError(f"{where} has {len(group['params'])} parameters, param group {i} "
                                 f"of this optimizer {len(own['params'])}")
            self._check_group(group, where=where)
            required, allowed = self._state_keys()
            for index, p in zip(group["params"], own["params"]):
                entry = {key: value for key, value in saved_state.get(index, {}).items()
                         if value is not None}  # torch.optim.SGD may save momentum_buffer=None
                if not entry:
                    continue
                if set(entry) - allowed or required - set(entry):
                    raise ValueError(
                        f"the state of parameter {index} ({where}) has the keys {sorted(entry)}, "
                        f"but {kind} keeps {sorted(allowed)}" + (
                            f" (all of {sorted(required)})" if required else ""))
                for key, value in entry.items():
                    if key != "step" and isinstance(value, torch.Tensor) and value.shape != p.shape:
                        raise ValueError(
                            f"state_dict['state'][{index}][{key!r}] has shape "
                            f"{tuple(value.shape)}, but the parameter it loads into ({where}) "
                            f"has shape {tuple(p.shape)}: a state dict of another model?")
                if migrating and isinstance(entry.get("step"), torch.Tensor):
                    # as torch.optim keeps it without capturable/fused; torch's load moves it to
                    # the parameter's device for a fused group
                    entry["step"] = entry["step"].to("cpu", _get_scalar_dtype())
                state[index] = entry
            groups.append(group)
        return {**state_dict, "state": state, "param_groups": groups}

    @staticmethod
    def _checked_hd_group(saved: dict, own: dict, where: str) -> dict:
        """A saved HD group with every HD option and a complete rate state; ``transition``
        (code, not saved) comes from this optimizer."""
        missing = [key for key in HD_GROUP_KEYS if key not in saved]
        if missing:
            raise ValueError(f"{where} lacks the HD options {missing} (a damaged or hand-edited "
                             "state dict?)")
        hd = saved.get("hd_state")
        if hd is not None:
            missing = [key for key in HD_STATE_KEYS if not isinstance(hd, dict) or key not in hd]
            if missing:
                raise ValueError(f"{where}['hd_state'] lacks {missing} (a damaged or "
                                 "hand-edited state dict?)")
        return {"transition": own["transition"], **saved}

    @staticmethod
    def _migrated_group(saved: dict, own: dict, where: str) -> dict:
        """A torch.optim group as an HD group: its base options (lr, betas, momentum, ...),
        this optimizer's HD options and kernel, no rate state (α starts from lr)."""
        if saved.get("amsgrad"):
            raise ValueError(f"{where} was written with amsgrad=True, which the HD optimizers "
                             "do not offer")
        group = {key: value for key, value in saved.items()
                 if key not in TORCH_ONLY_GROUP_KEYS + ("foreach", "fused")}
        if isinstance(group.get("lr"), torch.Tensor):
            group["lr"] = group["lr"].item()
        for key in HD_GROUP_KEYS + ("transition", "foreach", "fused"):
            group[key] = own[key]
        for key, value in own.items():  # e.g. decoupled_weight_decay from an older torch
            if key != "hd_state":
                group.setdefault(key, value)
        return group

    def to_torch_state_dict(self) -> dict:
        """This optimizer's state as its torch.optim base optimizer (``MIGRATES_FROM``) saves
        it, with each group's ``lr`` the rate HD reached (γ_t: α_t, or its blend with α_∞ under
        ``final_lr``): ``torch.optim.Adam(...).load_state_dict(adam_hd.to_torch_state_dict())``
        continues as AdamHD with hypergrad_lr=0 would. (``state_dict()``'s ``lr`` is γ_t too,
        but it carries the HD keys and SGD-HD's direction buffers.)"""
        saved = self.state_dict()
        groups = []
        for group, saved_group in zip(self.param_groups, saved["param_groups"]):
            torch_class = self._torch_class(group)
            defaults = torch_class([torch.nn.Parameter(torch.zeros(1))]).defaults
            out = {**defaults, **{key: value for key, value in saved_group.items()
                                  if key not in HD_GROUP_KEYS + ("hd_state",)}}
            hd = group.get("hd_state")
            out["lr"] = float(hd["applied_lr"]) if hd is not None else float(group["lr"])
            groups.append(out)
        state = {index: {key: value for key, value in entry.items() if key != "hd_direction"}
                 for index, entry in saved["state"].items()}
        return {"state": {index: entry for index, entry in state.items() if entry},
                "param_groups": groups}

    def _scratch_pair(self, like: torch.Tensor, needed: int,
                      dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Two work buffers of ``dtype`` on ``like``'s device of SCRATCH_BYTES each, or of
        ``needed`` elements if fewer (not optimizer state: never saved)."""
        scratch = getattr(self, "_scratch_buffers", None)
        if scratch is None:
            scratch = self._scratch_buffers = {}
        key = (like.device, dtype)
        size = max(1, min(SCRATCH_BYTES // dtype.itemsize, needed))
        if key not in scratch or scratch[key][0].numel() < size:
            scratch[key] = (like.new_empty(size, dtype=dtype), like.new_empty(size, dtype=dtype))
        return scratch[key]

    # ------------------------------------------------------------------ subclass interface

    def _state_keys(self) -> tuple[frozenset, frozenset]:  # pragma: no cover - abstract
        """(required, allowed) keys of a parameter's non-empty state."""
        raise NotImplementedError

    def _torch_class(self, group: dict) -> type:  # pragma: no cover - abstract
        """The torch.optim optimizer whose step this group takes."""
        raise NotImplementedError

    def _prepare(self, group: dict) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def _hypergrad_terms(self, group: dict, lists: dict, hd: dict) -> list[torch.Tensor]:
        raise NotImplementedError  # pragma: no cover

    def _base_step(self, group: dict, lists: dict, hd: dict) -> None:
        raise NotImplementedError  # pragma: no cover


def _batches(sizes: list[int], capacity: int):
    """Split tensors of ``sizes`` elements into pieces (index, start, stop) and yield them in
    batches of at most ``capacity`` elements, in order. A large tensor (at least half the
    capacity) is cut into pieces that form batches of their own (used in place, no copy); small
    tensors are packed together."""
    batch, filled = [], 0
    for j, size in enumerate(sizes):
        if size >= capacity // 2:
            if batch:
                yield batch
                batch, filled = [], 0
            for start in range(0, size, capacity):
                yield [(j, start, min(start + capacity, size))]
            continue
        if filled + size > capacity:
            yield batch
            batch, filled = [], 0
        batch.append((j, 0, size))
        filled += size
    if batch:
        yield batch


def _total(values: list[torch.Tensor]) -> torch.Tensor:
    """Σ values in float64 (one operation fewer for the usual single value; 0 for none)."""
    if not values:
        return torch.zeros((), dtype=torch.float64)
    if len(values) == 1:
        return values[0].to(torch.float64)
    return torch.stack(values).to(torch.float64).sum()


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
        defaults = self._hd_defaults(lr, hypergrad_lr, mode, final_lr, transition,
                                     hyper_hypergrad_lr, lr_bounds, skip_nonfinite)
        defaults.update(momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, maximize=maximize, foreach=foreach, fused=fused)
        super().__init__(params, defaults, hypergrad_scope=hypergrad_scope,
                         process_group=process_group,
                         scheduler_composition=scheduler_composition)

    _tensor_lr_when_compiling = True

    def _option_checks(self) -> dict[str, Callable[[str, Any, Optional[dict]], None]]:
        return {**HD_OPTION_CHECKS, "momentum": _check_fraction, "dampening": _check_dampening,
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

    def _hypergrad_terms(self, group: dict, lists: dict, hd: dict) -> list[torch.Tensor]:
        multiplicative = group["mode"] == "multiplicative"
        # d_{t-1}: the stored direction, or the heavy-ball momentum buffer v_{t-1} (none at t=1)
        if self._stores_direction(group):
            previous = lists["directions"]
        else:
            previous = lists["momentum_buffers"]
        stores = self._stores_direction(group)
        like = hd["lr"]
        if (stores and group["weight_decay"] == 0 and not group["maximize"]
                and self._streamed(lists["grads"])
                and all(g.is_contiguous() and d.is_contiguous()
                        for g, d in zip(lists["grads"], previous))):
            # CPU, g = ∇f: g·d_{t-1} (and the norms) and d_t ← g_t in one batched pass
            return [x.to(like.dtype) for x in self._batched_dot_and_copy(
                lists["grads"], previous, multiplicative)]
        dots, grad_sq, dir_sq = [], [], []
        for p, grad, d in zip(lists["params"], lists["grads"], previous):
            g = self._effective_grad(group, p, grad)
            if multiplicative:
                grad_sq.append(_dot(g, g))
            if d is None:  # heavy ball before its first step: d_0 = 0
                continue
            dot = _dot(g, d)
            sq = _dot(d, d) if multiplicative else None
            if stores:
                d.copy_(g)  # d_t starts as g_t (Nesterov adds μ v_t after the step)
            dots.append(dot)
            if multiplicative:
                dir_sq.append(sq)
        return [_sum(dots, like), _sum(grad_sq, like), _sum(dir_sq, like)]

    def _batched_dot_and_copy(self, grads: list[torch.Tensor], directions: list[torch.Tensor],
                              want_sq: bool) -> list[torch.Tensor]:
        """[Σ g·d, Σ g·g, Σ d·d] in float64 (the norms only if ``want_sq``), then d ← g, in
        batches of SCRATCH_BYTES: a large tensor chunk by chunk while the chunk is in cache
        (g is read once), small tensors together (one dot product and one copy per batch).
        float16/bfloat16 pieces are converted to float32 in the scratch buffers first."""
        totals: list[list[torch.Tensor]] = [[], [], []]
        by_dtype: dict[torch.dtype, list[int]] = {}
        for i, g in enumerate(grads):
            by_dtype.setdefault(g.dtype, []).append(i)
        for dtype, members in by_dtype.items():
            work_dtype = _accumulation_dtype(dtype)
            buffer, other = self._scratch_pair(grads[members[0]],
                                               sum(grads[i].numel() for i in members), work_dtype)
            parts: list[list[torch.Tensor]] = [[], [], []]
            g_flat = [grads[i].view(-1) for i in members]
            d_flat = [directions[i].view(-1) for i in members]
            for pieces in _batches([g.numel() for g in g_flat], buffer.numel()):
                g_views = [g_flat[j][a:b] for j, a, b in pieces]
                d_views = [d_flat[j][a:b] for j, a, b in pieces]
                if len(pieces) == 1 and dtype == work_dtype:
                    g_all, d_all = g_views[0], d_views[0]
                else:
                    n = sum(b - a for _, a, b in pieces)
                    g_all = torch.cat(g_views, out=buffer[:n])
                    d_all = torch.cat(d_views, out=other[:n])
                parts[0].append(torch.dot(g_all, d_all))
                if want_sq:
                    parts[1].append(torch.dot(g_all, g_all))
                    parts[2].append(torch.dot(d_all, d_all))
                if len(pieces) == 1:
                    d_views[0].copy_(g_views[0])
                else:
                    torch._foreach_copy_(d_views, g_views)
            for k in range(3 if want_sq else 1):
                totals[k].append(_total(parts[k]))
        zero = torch.zeros((), dtype=torch.float64)
        return [_total(t) if t else zero for t in totals]

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
        defaults = self._hd_defaults(lr, hypergrad_lr, mode, final_lr, transition,
                                     hyper_hypergrad_lr, lr_bounds, skip_nonfinite)
        defaults.update(betas=tuple(betas) if isinstance(betas, list) else betas, eps=eps,
                        weight_decay=weight_decay,
                        decoupled_weight_decay=self.decoupled_weight_decay, maximize=maximize,
                        foreach=foreach, fused=fused)
        super().__init__(params, defaults, hypergrad_scope=hypergrad_scope,
                         process_group=process_group,
                         scheduler_composition=scheduler_composition)

    def _option_checks(self) -> dict[str, Callable[[str, Any, Optional[dict]], None]]:
        return {**HD_OPTION_CHECKS, "betas": _check_betas, "eps": _check_finite}

    def _state_keys(self) -> tuple[frozenset, frozenset]:
        keys = frozenset({"step", "exp_avg", "exp_avg_sq"})
        return keys, keys

    def _torch_class(self, group: dict) -> type:
        return torch.optim.AdamW if group["decoupled_weight_decay"] else torch.optim.Adam

    def _low_precision_hint(self) -> Optional[str]:
        for group in self.param_groups:
            eps = group["eps"]
            for p in group["params"]:
                if (not group["fused"] and p.dtype in LOW_PRECISION
                        and torch.tensor(eps, dtype=p.dtype).item() == 0 and eps != 0):
                    return (f"eps={eps} is 0 in {p.dtype}, so torch's foreach/for-loop Adam "
                            f"kernel, which computes in {p.dtype}, divides by zero where the "
                            "second moment is 0 or underflows, and the parameters become NaN; "
                            "use fused=True (it computes in float32), an eps representable in "
                            f"{p.dtype} (1e-4 is usual for float16), or float32 parameters "
                            "with torch.autocast")
        return None

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
        # with the corrections in double precision (as torch.optim.Adam); each tensor has its
        # own step count. With decoupled decay (AdamW):
        # d_{t-1} = a_{t-1} + λθ_{t-2} with θ_{t-2} = (θ_{t-1} + γa_{t-1}) / (1 - γλ), hence
        # d_{t-1} = (a_{t-1} + λθ_{t-1}) / (1 - γ_{t-1}λ): exact, with no stored copy.
        weight_decay = group["weight_decay"]
        if decoupled:
            shrink = 1 - hd["applied_lr"].to(torch.float64) * weight_decay
        if self._streamed(lists["params"]):
            # CPU: the corrections as Python floats (torch.optim.Adam's own arithmetic; steps
            # live on the CPU), then g·d (and d·d) batched through two cache-sized buffers
            corrections = {}
            for step in lists["steps"]:
                t = float(step)
                if t not in corrections:
                    c1, c2 = 1 - beta1 ** t, math.sqrt(1 - beta2 ** t)
                    corrections[t] = ((eps * c2, c2 / c1, weight_decay if decoupled else 0.0)
                                      if t > 0 else (eps, 0.0, 0.0))
            eps_list, scale_list, decay_list = zip(*(corrections[float(step)]
                                                     for step in lists["steps"]))
            dot, direction_sq = self._batched_adam_terms(
                group, lists, eps_list, scale_list, decay_list, decoupled, multiplicative)
            grad_sq = ([_dot(g, g) for g in (self._effective_grad(group, p, grad) for p, grad
                                              in zip(lists["params"], lists["grads"]))]
                       if multiplicative else [])
            if decoupled:
                dot = dot / shrink
                direction_sq = direction_sq / shrink ** 2 if multiplicative else None
            return [dot.to(like.dtype), _sum(grad_sq, like),
                    like.new_zeros(()) if direction_sq is None else direction_sq.to(like.dtype)]
        t = torch.stack(lists["steps"]).to(device=like.device, dtype=torch.float64)
        started = t > 0
        correction1 = torch.where(started, 1 - beta1 ** t, 1.0)
        correction2 = torch.where(started, (1 - beta2 ** t).sqrt(), 1.0)
        scale = torch.where(started, correction2 / correction1, 0.0)
        eps_scaled = eps * correction2
        decay = started.to(torch.float64) * weight_decay if decoupled else scale.new_zeros(
            scale.shape)
        eps_scaled, scale_list, decay = eps_scaled.unbind(), scale.unbind(), decay.unbind()
        dots, grad_sq, dir_sq = [], [], []
        for i, (p, grad, m, v) in enumerate(zip(lists["params"], lists["grads"],
                                                lists["exp_avgs"], lists["exp_avg_sqs"])):
            # at least float32: ε (1e-8) is 0 in float16, where d would be 0/0 or m/0
            work = _accumulation_dtype(p.dtype)
            g = self._effective_grad(group, p, grad)
            if multiplicative:
                grad_sq.append(_dot(g, g))
            # m / (√v + ε c2), times c2/c1 below (or here, with decoupled decay)
            v = v.to(work)
            if p.dtype in LOW_PRECISION:  # a v stored as 0 may have underflowed
                v = v.clamp(min=_underflow_bound(p.dtype))
            direction = m.to(work) / (v.sqrt() + eps_scaled[i].to(v.device, work))
            if decoupled:
                direction = (direction * scale_list[i].to(p.device, work)
                             + p.to(work) * decay[i].to(p.device, work))
            dots.append(_dot(g, direction))
            if multiplicative:
                dir_sq.append(_dot(direction, direction))
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

    def _batched_adam_terms(self, group: dict, lists: dict, eps_scaled: list[float],
                            scales: list[float], decays: list[float], decoupled: bool,
                            want_sq: bool) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Σ g·d_{t-1} (and Σ d·d) over the group on the CPU, in float64, with d_{t-1} made
        piece by piece in a cache-sized scratch buffer (float32 for float16/bfloat16 tensors,
        so ε never underflows): g, m, v (and θ) are read once from memory, no tensor-sized
        temporary is made, and many small tensors share one batch (a few
        vector ops per 256k elements instead of per tensor). Tensors are grouped by step count,
        so each batch has one ε·c2, scale c2/c1 and decay; the non-decoupled scale multiplies
        the batch's dot in float64 (as the functional rule's per-tensor dot products)."""
        coupled = group["weight_decay"] if not decoupled else 0.0
        by_key: dict[tuple, list[int]] = {}
        for i, p in enumerate(lists["params"]):
            if scales[i] != 0.0:  # d_{t-1} = 0 before a tensor's first step
                by_key.setdefault((p.dtype, scales[i], eps_scaled[i], decays[i]), []).append(i)
        dots, squares = [], []
        for (dtype, scale, eps, decay), members in by_key.items():
            work_dtype = _accumulation_dtype(dtype)
            buffer, other = self._scratch_pair(
                lists["params"][members[0]], sum(lists["params"][i].numel() for i in members),
                work_dtype)
            capacity = buffer.numel()
            batch_dots, batch_squares = [], []
            names = ["grads", "exp_avgs", "exp_avg_sqs"] + (
                ["params"] if decoupled or coupled else [])
            flat = {name: [lists[name][i].reshape(-1) for i in members] for name in names}
            for pieces in _batches([flat["grads"][j].numel() for j in range(len(members))],
                                   capacity):
                n = sum(b - a for _, a, b in pieces)
                d, x = buffer[:n], other[:n]

                def load(name: str) -> torch.Tensor:
                    """The batch's elements of lists[name]: a view (one piece in the work
                    dtype) or copied (converted) to x."""
                    if len(pieces) == 1 and dtype == work_dtype:
                        j, a, b = pieces[0]
                        return flat[name][j][a:b]
                    return torch.cat([flat[name][j][a:b] for j, a, b in pieces], out=x)

                if dtype in LOW_PRECISION:  # a v stored as 0 may have underflowed
                    torch.clamp(load("exp_avg_sqs"), min=_underflow_bound(dtype), out=d)
                    d.sqrt_()
                else:
                    torch.sqrt(load("exp_avg_sqs"), out=d)
                d.add_(eps)
                torch.div(load("exp_avgs"), d, out=d)  # m / (√v + ε c2)
                if decoupled:
                    d.mul_(scale).add_(load("params"), alpha=decay)
                if want_sq:
                    batch_squares.append(torch.dot(d, d))
                dot = torch.dot(d, load("grads"))
                if group["maximize"]:
                    dot = -dot
                if coupled:  # g = ±∇f + λθ
                    dot = dot + coupled * torch.dot(d, load("params"))
                batch_dots.append(dot)
            factor = 1.0 if decoupled else scale
            dots.append(_total(batch_dots) * factor)
            if want_sq:
                squares.append(_total(batch_squares) * factor ** 2)
        zero = torch.zeros((), dtype=torch.float64)
        dot = _total(dots) if dots else zero
        if not want_sq:
            return dot, None
        return dot, _total(squares) if squares else zero

    def _base_step(self, group: dict, lists: dict, hd: dict) -> None:
        beta1, beta2 = group["betas"]
        # Under torch.compile the rate goes to torch's kernel as a tensor, through its capturable
        # path, where the step counts live with the params (on the CPU): a Python float would be
        # a graph break per step and a graph specialised to one value of α.
        capturable = (not group["fused"] and torch.compiler.is_compiling()
                      and lists["steps"][0].device == lists["params"][0].device)
        torch_adam(lists["params"], lists["grads"], lists["exp_avgs"], lists["exp_avg_sqs"], [],
                   lists["steps"], foreach=group["foreach"], capturable=capturable,
                   differentiable=False, fused=group["fused"], grad_scale=None, found_inf=None,
                   has_complex=False, decoupled_weight_decay=group["decoupled_weight_decay"],
                   amsgrad=False, beta1=beta1, beta2=beta2,
                   lr=hd["applied_lr"] if capturable else self._rate_for_kernel(group, hd),
                   weight_decay=group["weight_decay"], eps=group["eps"],
                   maximize=group["maximize"])


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

