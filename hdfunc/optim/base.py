"""The base class of the HD optimizers: param groups and their option checks, the per-group rate
state, the hypergradient reduction (across groups and ranks), composition with torch's LR
schedulers, reporting and checkpoints. The maths of h_t is in :mod:`hdfunc.optim.terms`; the
algorithms in :mod:`hdfunc.optim.sgd` and :mod:`hdfunc.optim.adam`.

Each group's rate state is an :class:`hdfunc.HDState` (``group["hd_state"]``, with no
``direction`` and ``base``: those are torch's per-parameter state), passed as it is to
:func:`hdfunc.adapt_rates` and replaced (``_replace``) by each step, beside a
:class:`Scheduled` (``group["hd_scheduled"]``), the values this optimizer last left in the
group's ``lr`` and ``hypergrad_lr``. Both become one dict of tensors and numbers at the
``state_dict`` boundary (:data:`HD_STATE_KEYS`), so ``torch.load(weights_only=True)`` reads a
checkpoint.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Iterable, Literal, NamedTuple, Optional

import torch
import torch.distributed as dist
from torch.optim import Optimizer

from hdfunc.base import check_hyperparameter
from hdfunc.hypergradient import HDState, adapt_rates
from hdfunc.options import HDOptions
from hdfunc.optim import terms
from hdfunc.optim.sharding import Sharding, is_dtensor, sharding_of
from hdfunc.optim.terms import SCRATCH_BYTES, HypergradTerms

__all__ = ["HD_GROUP_KEYS", "HD_OPTION_KEYS", "HD_STATE_KEYS", "MIGRATES_FROM", "HDOptimizer",
           "Scheduled", "hd_options"]

Scope = Literal["global", "group"]
SchedulerComposition = Literal["scale", "reset"]
SCOPES = ("global", "group")
SCHEDULER_COMPOSITIONS = ("scale", "reset")

# The HD options a param group holds: those of HDOptions but the two the classes do without (one
# rate per group; torch's LR schedulers instead of lr_schedule).
UNSUPPORTED_OPTIONS = ("lr_granularity", "lr_schedule")
HD_OPTION_KEYS = tuple(name for name in HDOptions.names() if name not in UNSUPPORTED_OPTIONS)
# The per-group HD keys a state dict saves (the rest of a group is the base optimizer's):
# β and the options, but ``transition``, which is code, not state.
HD_GROUP_KEYS = ("hypergrad_lr",) + tuple(key for key in HD_OPTION_KEYS if key != "transition")
TORCH_ONLY_GROUP_KEYS = ("amsgrad", "capturable", "differentiable")
# the torch.optim optimizer whose running state each HD kind takes over (load_state_dict)
MIGRATES_FROM = {"AdamHD": "torch.optim.Adam", "AdamWHD": "torch.optim.AdamW",
                 "SGDHD": "torch.optim.SGD", "SGDNHD": "torch.optim.SGD(nesterov=True)"}


class Scheduled(NamedTuple):
    """The values of a group's ``lr`` and ``hypergrad_lr`` this optimizer last left there (or
    took its rates from), so a step tells a scheduler's or the user's write from its own.

    Attributes:
        scheduled_lr: γ of the last step, as written into ``group["lr"]`` (the same object: a
            float, or a new 0-d tensor with ``lr_as_tensor``).
        scheduled_hypergrad_lr: the group's ``hypergrad_lr`` that β was last set from.
    """

    scheduled_lr: float | torch.Tensor  # γ of the last step, the object left in group["lr"]
    scheduled_hypergrad_lr: float  # the group's hypergrad_lr that β was last set from


# The fields of HDState a group keeps (d_{t-1} and the base direction's state are torch's
# per-parameter state), and the keys of the rate state in a state dict (as saved since the first
# release: older checkpoints load).
HD_RATE_FIELDS = tuple(name for name in HDState._fields if name not in ("direction", "base"))
HD_STATE_KEYS = HD_RATE_FIELDS + Scheduled._fields
RATE_STATE_GROUP_KEYS = ("hd_state", "hd_scheduled")  # group keys holding state, not options

try:  # the dtype torch.optim uses for state["step"]
    from torch.optim.optimizer import _get_scalar_dtype
except ImportError:  # pragma: no cover - older/newer torch
    def _get_scalar_dtype(is_fused: Optional[bool] = None) -> torch.dtype:
        if is_fused:
            return torch.float32
        return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def _fused_supported(params: list[torch.Tensor]) -> bool:
    return all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float16, torch.bfloat16,
               torch.float32, torch.float64) for p in params)


# ----------------------------------------------------------------------------- the options


def hd_options(group: dict, where: Optional[str] = None) -> HDOptions:
    """A param group's HD options as a checked :class:`hdfunc.HDOptions` (one rate for the
    group): what construction validates, what a step validates again (values written into
    ``param_groups``) and the ``config`` of :func:`hdfunc.adapt_rates`.

    Args:
        group: a param group holding :data:`HD_OPTION_KEYS`.
        where: e.g. "param_groups[1]": a bad value then raises with the group and the key
            (``param_groups[1]['mode'] = 'sideways' is invalid: ...``).

    Raises:
        TypeError, ValueError: a bad value (HDOptions's message, naming the option).

    Returns:
        The group's checked :class:`hdfunc.HDOptions`.
    """
    values = {key: group[key] for key in HD_OPTION_KEYS}
    try:
        return HDOptions(**values)
    except (TypeError, ValueError):
        if where is None:
            raise
    for key, value in values.items():  # which one: each option is checked on its own
        try:
            HDOptions.of(**{key: value})
        except (TypeError, ValueError) as error:
            raise type(error)(f"{where}[{key!r}] = {value!r} is invalid: {error}") from None
    raise AssertionError("unreachable: HDOptions checks each option on its own")  # pragma: no cover


# Checks of the other keys of a group: each takes (name, value, group) and raises
# TypeError/ValueError naming ``name``. The classes take rates and options as Python numbers, not
# tensors (the adapted rate is kept as a tensor in the optimizer's state).


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


def _check_lr_tensor(name: str, value: Any, group: Optional[dict] = None) -> None:
    """A 0-d real floating tensor, finite and non-negative where it can be read without a host
    sync (on the CPU): the form of ``lr`` that ``lr_as_tensor`` leaves, after an LR scheduler
    filled it in place (or a checkpoint brought it). Off the CPU its value is not read (the
    rate update's non-finite guard still applies)."""
    if value.numel() != 1 or value.is_complex() or not value.is_floating_point():
        raise TypeError(f"{name} must be a Python float or a one-element real floating tensor, "
                        f"got a tensor of shape {tuple(value.shape)} and dtype {value.dtype}")
    if value.device.type == "cpu":
        _check_finite(name, float(value))


def _check_number_or_none(name: str, value: Any, group: Optional[dict] = None) -> None:
    """An optional rate of HDOptions (final_lr, hyper_hypergrad_lr), which HDOptions checks:
    here only not a tensor."""
    if isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a Python number for an HD optimizer, got a Tensor")


def _check_flag(name: str, value: Any, group: Optional[dict] = None) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")


def _check_fraction(name: str, value: Any, group: Optional[dict] = None) -> None:
    """A finite number in [0, 1) (β1, β2, momentum)."""
    _check_finite(name, value, high=1.0, high_inclusive=False)


GroupCheck = Callable[[str, Any, Optional[dict]], None]
GROUP_CHECKS: dict[str, GroupCheck] = {
    "lr": _check_lr, "hypergrad_lr": _check_finite, "final_lr": _check_number_or_none,
    "hyper_hypergrad_lr": _check_number_or_none, "weight_decay": _check_finite,
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


# ----------------------------------------------------------------------------- the rate state


def saved_rate_state(state: HDState, scheduled: Scheduled) -> dict:
    """A group's rate state as a state dict saves it (:data:`HD_STATE_KEYS`): a snapshot of
    tensors, ``()`` for an option that is off, and the two scheduled numbers.

    Args:
        state: the group's HD state.
        scheduled: the group's scheduler bookkeeping.

    Returns:
        A dict with the keys :data:`HD_STATE_KEYS`.
    """
    return {**{name: getattr(state, name) for name in HD_RATE_FIELDS}, **scheduled._asdict()}


def loaded_rate_state(saved: dict, device: torch.device) -> tuple[HDState, Scheduled]:
    """The inverse of :func:`saved_rate_state`, with the tensors on ``device``.

    Args:
        saved: a dict written by :func:`saved_rate_state`.
        device: the device the rate tensors go to.

    Returns:
        The pair (HD state, scheduler bookkeeping).
    """
    def moved(value: Any) -> Any:
        return value.to(device) if isinstance(value, torch.Tensor) else value

    state = HDState(direction=(), base=(), **{name: moved(saved[name])
                                              for name in HD_RATE_FIELDS})
    return state, Scheduled(*(saved[name] for name in Scheduled._fields))


class HDOptimizer(Optimizer):
    """Shared machinery of the HD optimizers: per-group rate state, the hypergradient reduction
    (across groups and, with ``process_group``, across ranks) and the call to
    :func:`hdfunc.adapt_rates`. Subclasses supply ``_prepare`` (gather tensors, lazy state),
    ``_hypergrad_terms`` (g·d, g·g, d·d at step t, from :mod:`hdfunc.optim.terms`) and
    ``_base_step`` (torch's kernel).

    Args:
        params: the parameters to optimize, or dicts defining param groups.
        defaults: the param groups' default options (rates, base options, HD options).
        hypergrad_scope: "global" (one h_t over all param groups) or "group" (one per group).
        process_group: the process group over which h_t's dot products are summed (a sharded
            optimizer over each rank's own parameters); None: no reduction across ranks.
        scheduler_composition: how a torch LR scheduler's write to a group's ``lr`` combines with
            the adapted rate: "scale" or "reset" (docs/optim.md).
        lr_as_tensor: what a step leaves in ``param_groups[i]["lr"]``: γ_t as a Python float
            (False: one device-to-host copy per step), as a new 0-d tensor on the rates' device
            (True: no host sync), or None: a tensor where the rates live off the CPU, a float
            on the CPU (docs/optim.md, "Logging the rate and schedulers").

    Raises:
        ValueError: ``hypergrad_scope`` or ``scheduler_composition`` is not one of its values.
        TypeError: ``lr_as_tensor`` is not True, False or None.
    """

    _tensor_lr_when_compiling = False  # torch's foreach kernel takes a tensor rate under compile
    _base_keys: tuple[str, ...] = ()  # the base optimizer's constructor options (group keys)
    _scratch_bytes = SCRATCH_BYTES  # the size of each CPU scratch buffer of the streamed terms

    def __init__(self, params: Iterable, defaults: dict, *, hypergrad_scope: Scope = "global",
                 process_group: Any = None, scheduler_composition: SchedulerComposition = "scale",
                 lr_as_tensor: Optional[bool] = None):
        if hypergrad_scope not in SCOPES:
            raise ValueError(f"hypergrad_scope must be one of {SCOPES}, got {hypergrad_scope!r}")
        if scheduler_composition not in SCHEDULER_COMPOSITIONS:
            raise ValueError(f"scheduler_composition must be one of {SCHEDULER_COMPOSITIONS}, "
                             f"got {scheduler_composition!r}")
        self.hypergrad_scope = hypergrad_scope
        self.process_group = process_group
        self.scheduler_composition = scheduler_composition
        if lr_as_tensor is not None and not isinstance(lr_as_tensor, bool):
            raise TypeError(f"lr_as_tensor must be True, False or None, got {lr_as_tensor!r}")
        self.lr_as_tensor = lr_as_tensor
        super().__init__(params, defaults)

    # ------------------------------------------------------------------ construction helpers

    @classmethod
    def _defaults(cls, arguments: dict) -> dict:
        """The defaults of the param groups from a constructor's ``locals()``: the rates, the
        base optimizer's options (``_base_keys``) and the HD options, given as ``**hd_options``
        (the fields of :class:`hdfunc.HDOptions` but :data:`UNSUPPORTED_OPTIONS`; the others
        take HDOptions' defaults). An unknown or unsupported option is a TypeError naming the
        valid ones."""
        hd_options = dict(arguments.get("hd_options") or {})
        unsupported = sorted(set(hd_options) & set(UNSUPPORTED_OPTIONS))
        if unsupported:
            raise TypeError(f"{cls.__name__} does not take {', '.join(unsupported)} (one rate per "
                            "param group; compose with torch's LR schedulers instead of "
                            "lr_schedule): see docs/optim.md")
        options = HDOptions.of(**hd_options)  # unknown names: TypeError with the valid ones
        return {**{key: arguments[key] for key in ("lr", "hypergrad_lr") + cls._base_keys},
                **{key: getattr(options, key) if key in hd_options else
                   HDOptions.__dataclass_fields__[key].default for key in HD_OPTION_KEYS}}

    def add_param_group(self, param_group: dict) -> None:
        """Add a param group (torch.optim's ``add_param_group``): the options it does not set
        take the optimizer's defaults; all are checked, and ``fused``/``foreach`` are resolved
        to booleans. Its rate state starts at its first step, from its ``lr`` (one α per group;
        with ``hypergrad_scope="global"`` adapted from the hypergradient of all groups).

        Args:
            param_group: a dict with ``params`` (a tensor or an iterable of tensors) and any of
                the optimizer's options (``lr``, ``hypergrad_lr``, the base optimizer's and the
                HD options).

        Raises:
            ValueError: a parameter is already in another group, an option is out of range,
                or DTensor parameters are given with ``process_group``.
            TypeError: an option of the wrong type, or complex or sparse parameters.
        """
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        for p in group["params"]:
            if is_dtensor(p) and self.process_group is not None:
                raise ValueError(
                    "process_group= is for an optimizer over each rank's own parameters "
                    "(ZeroRedundancyOptimizer); with DTensor (FSDP2) parameters the hypergradient "
                    "is reduced over their device mesh: leave process_group=None")
            if p.is_complex():
                raise TypeError("complex parameters are not supported by the HD optimizers")
            if p.is_sparse:
                raise TypeError("sparse parameters are not supported by the HD optimizers")
        self._check_group(group)
        self._resolve_kernel(group)

    def _option_checks(self) -> dict[str, GroupCheck]:
        """key -> check of a param group's value (the rates, the HD options' class-specific
        rule, and the base optimizer's options); the HD options are checked by HDOptions."""
        return GROUP_CHECKS

    def _check_group(self, group: dict, where: Optional[str] = None,
                     skip: tuple[str, ...] = (), tensor_lr: bool = False) -> HDOptions:
        """Every option of ``group`` (but those in ``skip``) is valid; returns its HD options.
        ``where`` (e.g. "param_groups[1]") prefixes the error with the group and key, for
        values written into a group after construction. ``tensor_lr``: a 0-d tensor ``lr``
        is valid too (``lr_as_tensor``, filled by a scheduler; or from a checkpoint)."""
        for key, check in self._option_checks().items():
            if key in skip:
                continue
            value = group.get(key)
            if key == "lr" and tensor_lr and isinstance(value, torch.Tensor):
                check = _check_lr_tensor  # a tensor lr left by lr_as_tensor, then written to
            try:
                check(key, value, group)
            except (TypeError, ValueError) as error:
                if where is None:
                    raise
                raise type(error)(f"{where}[{key!r}] = {value!r} is invalid: {error}") from None
        return hd_options(group, where)

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

    # ------------------------------------------------------------------ the rate state

    def _rate_home(self, group: dict) -> torch.Tensor:
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
        if self._rate_home(group).device.type == "mps":
            return torch.float32
        return torch.float64

    def _group_state(self, group: dict) -> Optional[tuple[HDState, Scheduled]]:
        """The group's rate state, or None before its first step. A saved (dict) form found in
        the group, put there without :meth:`load_state_dict` (ZeroRedundancyOptimizer's
        ``load_state_dict`` copies the groups it loads into this optimizer's), is converted."""
        state = group.get("hd_state")
        if state is None:
            return None
        if isinstance(state, dict):
            state, scheduled = loaded_rate_state(state, self._rate_home(group).device)
            group["hd_state"], group["hd_scheduled"] = state, scheduled
            return state, scheduled
        return state, group["hd_scheduled"]

    def _rate_state(self, group: dict, options: HDOptions) -> HDState:
        """The group's HD rate state (created at its first step from the group's ``lr``), after
        applying any change a scheduler or the user made to ``lr`` / ``hypergrad_lr``."""
        found = self._group_state(group)
        if found is None:
            like = self._rate_home(group)
            dtype = self._rate_dtype(group)

            def rate(value: float) -> torch.Tensor:
                return torch.tensor(float(value), dtype=dtype, device=like.device)

            state = HDState(
                count=torch.zeros((), dtype=torch.int64, device=like.device),
                lr=rate(group["lr"]),
                hypergrad_lr=rate(group["hypergrad_lr"]),
                applied_lr=rate(group["lr"]),
                hypergrad=rate(0.0),
                direction=(),
                base=(),
                final_lr=rate(options.final_lr) if options.has_final_lr else (),
                lr_sensitivity=rate(0.0) if options.higher_order else (),
                hyper_hypergrad=rate(0.0) if options.higher_order else (),
                skipped=torch.zeros((), dtype=torch.int64, device=like.device),
            )
            group["hd_state"] = state
            group["hd_scheduled"] = Scheduled(float(group["lr"]), float(group["hypergrad_lr"]))
            return state
        state, scheduled = found
        written = scheduled.scheduled_lr  # the rate this optimizer last left in group["lr"]
        value = group["lr"]
        if isinstance(value, torch.Tensor) or isinstance(written, torch.Tensor):
            if not self._lr_is_own(value, scheduled):  # lr_as_tensor: without a host sync
                state = self._composed_on_device(state, value)
                scheduled = scheduled._replace(scheduled_lr=value)
        elif value is not written and value != written:  # a scheduler (or the user) wrote lr
            new = float(value)
            if self.scheduler_composition == "scale" and written != 0.0:
                # the rate continues from the written value: α and α_∞ scaled by new/γ, as
                # new · (α/γ) so that α = γ (no final_lr) gives α = new exactly
                state = state._replace(lr=new * (state.lr / written))
                if isinstance(state.final_lr, torch.Tensor):
                    state = state._replace(final_lr=new * (state.final_lr / written))
            else:
                state = state._replace(lr=torch.full_like(state.lr, new))
            scheduled = scheduled._replace(scheduled_lr=value)
        if group["hypergrad_lr"] != scheduled.scheduled_hypergrad_lr:
            state = state._replace(hypergrad_lr=torch.full_like(
                state.hypergrad_lr, float(group["hypergrad_lr"])))
            scheduled = scheduled._replace(scheduled_hypergrad_lr=float(group["hypergrad_lr"]))
        group["hd_state"], group["hd_scheduled"] = state, scheduled
        return state

    @staticmethod
    def _lr_is_own(value: Any, scheduled: Scheduled) -> bool:
        """Whether ``value`` (a group's ``lr``) is still the γ this optimizer left there: the same
        object, and for a tensor not written since. A tensor left by ``lr_as_tensor`` is a new
        one (version counter 0, as is a tensor loaded from a checkpoint); torch's LR schedulers
        fill a tensor ``lr`` in place, which moves its version counter."""
        if isinstance(value, torch.Tensor):
            return value is scheduled.scheduled_lr and value._version == 0
        return value is scheduled.scheduled_lr or (
            not isinstance(scheduled.scheduled_lr, torch.Tensor)
            and value == scheduled.scheduled_lr)

    def _composed_on_device(self, state: HDState, value: Any) -> HDState:
        """The rate state after a write of ``value`` to a group's ``lr`` whose γ was left as a
        tensor: the composition of :meth:`_rate_state` ("scale": α and α_∞ times new/γ; "reset"
        or γ = 0: α = new) in tensor operations on the rates' device, so that no host sync
        happens (γ is the state's ``applied_lr``, the value that was left in ``lr``)."""
        if isinstance(value, torch.Tensor):
            new = value.detach().reshape(()).to(device=state.lr.device, dtype=state.lr.dtype,
                                                copy=True)
        else:
            new = torch.full_like(state.lr, float(value))
        gamma = state.applied_lr
        changed = new != gamma  # (a scheduler that keeps lr, e.g. StepLR between milestones,
        # still fills it in place: as a float write of the same value, no change)
        if self.scheduler_composition != "scale":
            return state._replace(lr=torch.where(changed, new, state.lr))
        nonzero = gamma != 0
        safe = torch.where(nonzero, gamma, torch.ones_like(gamma))
        lr = torch.where(nonzero, new * (state.lr / safe), new)
        state = state._replace(lr=torch.where(changed, lr, state.lr))
        if isinstance(state.final_lr, torch.Tensor):
            final_lr = torch.where(nonzero, new * (state.final_lr / safe), state.final_lr)
            state = state._replace(final_lr=torch.where(changed, final_lr, state.final_lr))
        return state

    def _lr_tensor(self, state: HDState) -> bool:
        """Whether a step leaves γ_t in ``lr`` as a tensor (``lr_as_tensor``; None: off the
        CPU)."""
        if self.lr_as_tensor is not None:
            return self.lr_as_tensor
        return state.applied_lr.device.type != "cpu"

    @staticmethod
    def _adapt(options: HDOptions, state: HDState, dot: torch.Tensor, grad_sq: torch.Tensor,
               direction_sq: torch.Tensor) -> HDState:
        """The state after α_t etc. from h_t = -g_t·d_{t-1}, by the core's single rate update."""
        hypergrad = (-dot).to(state.lr.dtype)
        multiplicative = options.mode == "multiplicative"
        rates = adapt_rates(options, state, [hypergrad],
                            [grad_sq.to(hypergrad.dtype)] if multiplicative else None,
                            [direction_sq.to(hypergrad.dtype)] if multiplicative else None)
        return state._replace(
            count=state.count + 1, lr=rates.lr[0], hypergrad_lr=rates.hypergrad_lr,
            applied_lr=rates.applied_lr[0], hypergrad=hypergrad,
            lr_sensitivity=(state.lr_sensitivity if rates.lr_sensitivity is None
                            else rates.lr_sensitivity[0]),
            hyper_hypergrad=rates.hyper_hypergrad, skipped=rates.skipped)

    # ------------------------------------------------------------------ the step

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """One HD step for every group: h_t (one reduction over all groups, or per group, and
        across ``process_group``), α_t by :func:`hdfunc.adapt_rates`, then torch's kernel.

        Args:
            closure: a callable that reevaluates the model and returns the loss (optional).

        Returns:
            The closure's loss, or None without a closure.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if torch.compiler.is_compiling():  # (a compiled step is guarded on these values)
            options = [hd_options(group) for group in self.param_groups]
        else:  # values set by hand since the last step are checked
            options = []
            for i, group in enumerate(self.param_groups):
                found = self._group_state(group)
                own = found is not None and self._lr_is_own(group["lr"], found[1])  # γ of step
                tensor_lr = (self._lr_tensor(found[0]) if found is not None
                             else self.lr_as_tensor is True)
                options.append(self._check_group(group, where=f"param_groups[{i}]",
                                                 skip=("lr",) if own else (),
                                                 tensor_lr=tensor_lr))
        prepared = [self._prepare(group) for group in self.param_groups]
        states = [self._rate_state(group, opts)
                  for group, opts in zip(self.param_groups, options)]
        sharding = self._sharding()
        if sharding is None:
            rows = [self._hypergrad_terms(group, lists, state)
                    for group, lists, state in zip(self.param_groups, prepared, states)]
        else:  # DTensor parameters: the terms of the local shards this rank counts
            rows = []
            for group, lists, state in zip(self.param_groups, prepared, states):
                counted, rest = sharding.split(lists)
                rows.append(self._hypergrad_terms(group, counted, state))
                if rest["params"] and self._terms_update_state(group):  # replicas counted on
                    self._hypergrad_terms(group, rest, state)  # another rank: their d_t only
        device = states[0].lr.device
        dtype = states[0].lr.dtype
        for state in states[1:]:
            dtype = torch.promote_types(dtype, state.lr.dtype)
        # rows: groups; columns: g·d, g·g, d·d (the two norms only for the multiplicative rule)
        table = torch.stack([torch.stack(row).to(device=device, dtype=dtype) for row in rows])
        if sharding is not None:
            sharding.all_reduce(table)
        elif self.process_group is not None:
            group_arg = None if self.process_group is dist.group.WORLD else self.process_group
            dist.all_reduce(table, op=dist.ReduceOp.SUM, group=group_arg)
        if self.hypergrad_scope == "global":
            table = table.sum(0, keepdim=True).expand_as(table)
        for i, (group, opts, lists, state) in enumerate(zip(self.param_groups, options, prepared,
                                                            states)):
            state = self._adapt(opts, state, table[i, 0], table[i, 1], table[i, 2])
            group["hd_state"] = states[i] = state
            if lists["params"]:
                self._base_step(group, lists, state)
        self._report_applied_rates(states, dtype)
        self._report_skipped_steps(states, prepared)
        return loss

    def _sharding(self) -> Optional[Sharding]:
        """How the parameters are distributed (None: no DTensor), found at the first step and
        again when the param groups change."""
        params = [p for group in self.param_groups for p in group["params"]]
        key = tuple(id(p) for p in params)
        if getattr(self, "_sharding_key", None) != key:
            self._sharding_cache = sharding_of(params)
            self._sharding_key = key
        return self._sharding_cache

    @torch.compiler.disable
    def _report_applied_rates(self, states: list[HDState], dtype: torch.dtype) -> None:
        """group["lr"] ← γ_t, for loggers and schedulers; remembered beside the rate state so
        that the next step can tell a scheduler's (or the user's) write from its own. A Python
        float, as torch.optim keeps lr: one device-to-host copy for all groups (a sync off the
        CPU); or, with ``lr_as_tensor`` (by default off the CPU), a new 0-d tensor, a copy of
        γ_t on the rates' device: no sync. Under torch.compile this runs eagerly (a graph break
        at the end of the step): the floats then reach the next compiled step as dynamic values,
        not as constants baked into the graph, so a new γ every step causes no recompilation
        (tested)."""
        as_tensor = [self._lr_tensor(state) for state in states]
        rates: list[Any] = [state.applied_lr.detach().clone() if tensor else None
                            for state, tensor in zip(states, as_tensor)]
        if not all(as_tensor):
            device = states[0].applied_lr.device
            floats = iter(torch.stack([state.applied_lr.to(device=device, dtype=dtype)
                                       for state, tensor in zip(states, as_tensor)
                                       if not tensor]).tolist())
            rates = [next(floats) if rate is None else rate for rate in rates]
        for group, rate in zip(self.param_groups, rates):
            group["lr"] = rate
            group["hd_scheduled"] = group["hd_scheduled"]._replace(scheduled_lr=rate)

    def _report_skipped_steps(self, states: list[HDState], prepared: list[dict]) -> None:
        """Warn once (RuntimeWarning) when some step's h_t or new α was not finite: how many
        steps and the likely cause. Reading the counter syncs an accelerator, so off the CPU it is read
        at steps 1, 2, 4, 8, ... only; not under torch.compile (hd_stats() always has it)."""
        if getattr(self, "_skipped_steps_reported", False) or torch.compiler.is_compiling():
            return
        self._eager_steps = getattr(self, "_eager_steps", 0) + 1
        if (states[0].skipped.device.type != "cpu"
                and self._eager_steps & (self._eager_steps - 1)):
            return
        skipped = [int(state.skipped) for state in states]
        if not any(skipped):
            return
        self._skipped_steps_reported = True
        i = next(i for i, count in enumerate(skipped) if count)
        group = self.param_groups[i]
        outcome = ("left α unchanged" if group["skip_nonfinite"]
                   else "made α non-finite (skip_nonfinite=False)")
        warnings.warn(
            f"{_writer(group)}: {skipped[i]} of {int(states[i].count)} steps so far {outcome} "
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
        """Whether the hypergradient terms take their streamed variant (eager mode, CPU tensors
        of a floating dtype) rather than one vector expression per tensor."""
        return terms.streamable(tensors)

    def _scratch(self) -> terms.ScratchBuffers:
        """This optimizer's cache of scratch buffers for the streamed terms (not state)."""
        scratch = getattr(self, "_scratch_buffers", None)
        if scratch is None:
            scratch = self._scratch_buffers = {}
        return scratch

    def _rate_for_kernel(self, group: dict, state: HDState) -> float | torch.Tensor:
        """γ_t for torch's kernel: a tensor for fused kernels (no device sync), else a float."""
        if group["fused"] or (self._tensor_lr_when_compiling and torch.compiler.is_compiling()):
            return state.applied_lr
        return float(state.applied_lr)  # foreach/for-loop kernels take a Python number

    # ------------------------------------------------------------------ reporting, checkpoints

    def __repr__(self) -> str:
        """torch.optim's listing of each group's options, headed by the rates HD adapted:
        α_t (``adapted_lr``), γ_t (``applied_lr``, the last step's rate, also in ``lr``), β_t
        and the step count. Reads the rate tensors (a device sync off the CPU)."""
        lines = [f"{type(self).__name__} (hypergrad_scope={self.hypergrad_scope!r}, "
                 f"scheduler_composition={self.scheduler_composition!r})"]
        for i, group in enumerate(self.param_groups):
            lines.append(f"Parameter Group {i}")
            found = self._group_state(group)
            if found is None:
                lines.append(f"    adapted_lr: {float(group['lr'])!r} (no step yet: lr)")
            else:
                state = found[0]
                lines.append(f"    adapted_lr: {float(state.lr)!r} (alpha_t)")
                lines.append(f"    applied_lr: {float(state.applied_lr)!r} (gamma_t, the last "
                             "step's rate)")
                lines.append(f"    adapted_hypergrad_lr: {float(state.hypergrad_lr)!r} (beta_t)")
                lines.append(f"    steps: {int(state.count)}")
            for key in sorted(group):
                if key == "params" or key in RATE_STATE_GROUP_KEYS:
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
        schedulers".)

        Returns:
            One 0-d tensor per param group.
        """
        out = []
        for group in self.param_groups:
            found = self._group_state(group)
            out.append(found[0].lr.detach().clone() if found is not None
                       else torch.tensor(float(group["lr"])))
        return out

    def hd_stats(self) -> list[dict]:
        """Per group: ``lr`` α_t, ``applied_lr`` γ_t, ``hypergrad`` h_t, ``hypergrad_lr`` β_t,
        ``steps`` and ``skipped`` (steps whose rate update the non-finite guard skipped).

        Returns:
            One dict per param group.
        """
        stats = []
        for group in self.param_groups:
            found = self._group_state(group)
            if found is None:
                stats.append({"lr": float(group["lr"]), "steps": 0, "skipped": 0})
                continue
            state = found[0]
            stats.append({"lr": state.lr.detach().clone(),
                          "applied_lr": state.applied_lr.detach().clone(),
                          "hypergrad": state.hypergrad.detach().clone(),
                          "hypergrad_lr": state.hypergrad_lr.detach().clone(),
                          "steps": state.count.clone(), "skipped": state.skipped.clone()})
        return stats

    def state_dict(self) -> dict:
        """torch's state dict, with a snapshot (not a live reference) of each group's HD rate
        state as a dict (:data:`HD_STATE_KEYS`): α, β, γ, h, counters and the scheduler
        bookkeeping. Only data is saved (tensors, numbers, strings), so
        ``torch.load(..., weights_only=True)`` (torch's default) reads it: the ``transition``
        callable is code, not state, and is taken from the optimizer the checkpoint is loaded
        into.

        Returns:
            The state dict (``state`` and ``param_groups``, with the HD keys in each group).
        """
        sd = super().state_dict()
        for group, own in zip(sd["param_groups"], self.param_groups):
            group.pop("transition", None)
            group.pop("hd_scheduled", None)
            found = self._group_state(own)
            if found is not None:
                group["hd_state"] = saved_rate_state(*found)
            if isinstance(own["lr"], torch.Tensor):  # (lr_as_tensor) a snapshot, not the live
                group["lr"] = own["lr"].detach().clone()  # tensor a scheduler fills in place
                if found is not None:  # γ left there: the same object; else γ, on its own
                    group["hd_state"]["scheduled_lr"] = (
                        group["lr"] if self._lr_is_own(own["lr"], found[1])
                        else found[0].applied_lr.detach().clone())
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
        "Switching a running optimizer to HD").

        Args:
            state_dict: a state dict from :meth:`state_dict` of the same kind of HD optimizer, or of
                its torch.optim base optimizer.

        Raises:
            ValueError: the state dict was written by another optimizer, or is incomplete or
                invalid.
        """
        super().load_state_dict(self._checked_state_dict(state_dict))
        for group in self.param_groups:
            found = self._group_state(group)  # the saved dict → HDState on the rates' device
            if found is not None and not self._lr_tensor(found[0]):
                self._lr_as_float(group, *found)

    @staticmethod
    def _lr_as_float(group: dict, state: HDState, scheduled: Scheduled) -> None:
        """A group's ``lr`` (and the γ it is told from) as Python floats, where a checkpoint
        saved with ``lr_as_tensor`` is loaded into an optimizer that keeps floats."""
        value, written = group["lr"], scheduled.scheduled_lr
        if not isinstance(value, torch.Tensor) and not isinstance(written, torch.Tensor):
            return
        own = HDOptimizer._lr_is_own(value, scheduled)
        value = float(value)
        group["lr"] = value
        group["hd_scheduled"] = scheduled._replace(
            scheduled_lr=value if own else float(state.applied_lr))

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
            self._check_group(group, where=where, tensor_lr=True)
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
        for key in ("hypergrad_lr",) + HD_OPTION_KEYS + ("foreach", "fused"):
            group[key] = own[key]
        for key, value in own.items():  # e.g. decoupled_weight_decay from an older torch
            if key not in RATE_STATE_GROUP_KEYS:
                group.setdefault(key, value)
        return group

    def to_torch_state_dict(self) -> dict:
        """This optimizer's state as its torch.optim base optimizer (``MIGRATES_FROM``) saves
        it, with each group's ``lr`` the rate HD reached (γ_t: α_t, or its blend with α_∞ under
        ``final_lr``): ``torch.optim.Adam(...).load_state_dict(adam_hd.to_torch_state_dict())``
        continues as AdamHD with hypergrad_lr=0 would. (``state_dict()``'s ``lr`` is γ_t too,
        but it carries the HD keys and SGD-HD's direction buffers.)

        Returns:
            A state dict that the torch.optim base optimizer loads.
        """
        saved = self.state_dict()
        groups = []
        for group, saved_group in zip(self.param_groups, saved["param_groups"]):
            torch_class = self._torch_class(group)
            defaults = torch_class([torch.nn.Parameter(torch.zeros(1))]).defaults
            out = {**defaults, **{key: value for key, value in saved_group.items()
                                  if key not in HD_GROUP_KEYS + RATE_STATE_GROUP_KEYS}}
            found = self._group_state(group)
            out["lr"] = float(found[0].applied_lr) if found is not None else float(group["lr"])
            groups.append(out)
        state = {index: {key: value for key, value in entry.items() if key != "hd_direction"}
                 for index, entry in saved["state"].items()}
        return {"state": {index: entry for index, entry in state.items() if entry},
                "param_groups": groups}

    # ------------------------------------------------------------------ subclass interface

    def _state_keys(self) -> tuple[frozenset, frozenset]:  # pragma: no cover - abstract
        """(required, allowed) keys of a parameter's non-empty state."""
        raise NotImplementedError

    def _torch_class(self, group: dict) -> type:  # pragma: no cover - abstract
        """The torch.optim optimizer whose step this group takes."""
        raise NotImplementedError

    def _prepare(self, group: dict) -> dict:  # pragma: no cover - abstract
        """The group's tensors with a gradient, as lists (creating their state lazily)."""
        raise NotImplementedError

    def _terms_update_state(self, group: dict) -> bool:
        """Whether ``_hypergrad_terms`` also updates per-parameter state (SGD-HD's stored
        direction d_t ← g_t), so that it must run on tensors whose terms are not counted."""
        return False

    def _hypergrad_terms(self, group: dict, lists: dict,
                         state: HDState) -> HypergradTerms:  # pragma: no cover - abstract
        """g_t·d_{t-1}, ‖g_t‖², ‖d_{t-1}‖² of the group (:mod:`hdfunc.optim.terms`)."""
        raise NotImplementedError

    def _base_step(self, group: dict, lists: dict,
                   state: HDState) -> None:  # pragma: no cover - abstract
        """θ_t: torch's kernel with the rate γ_t of ``state``."""
        raise NotImplementedError
