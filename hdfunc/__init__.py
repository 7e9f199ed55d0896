"""hdfunc: hypergradient descent (Baydin et al., ICLR 2018) as pure functional update rules.

    rule = hdfunc.adam_hd(lr=1e-3, hypergrad_lr=1e-7)
    state = rule.init(params)
    updates, state = rule.update(grads, state, params)
    params = hdfunc.apply_updates(params, updates)

The names below are imported on first use (PEP 562), so ``import hdfunc`` and the ``hdfunc``
command line start without importing torch; ``hdfunc.optim`` (the torch.optim classes) and
``hdfunc.studies`` (batched studies) are loaded the same way on first access.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

from hdfunc._version import __version__

# Public names by the module that defines them. A new public name: add it here (and to the
# TYPE_CHECKING imports below, for type checkers and editors).
_EXPORTS: dict[str, tuple[str, ...]] = {
    "hdfunc.base": ("EmptyState", "Rule", "Transform", "apply_updates", "chain"),
    "hdfunc.directions": ("DIFFERENTIABLE_EPS_ROOT", "add_decayed_weights", "add_l2",
                          "heavy_ball", "identity", "nesterov", "scale_by_adagrad", "scale_by_adam", "scale_by_lion",
                          "scale_by_rms"),
    "hdfunc.hyperdescent": ("HyperdescentState", "get_hyperparams", "hyperdescent"),
    "hdfunc.hypergradient": ("HDState", "LRState", "ScheduleState", "adapt_rates",
                             "find_lr_state", "freeze_hypergrad_lr", "freeze_lr",
                             "get_applied_lr", "get_lr", "hypergradient", "replace_lr_state",
                             "scale_by_lr"),
    "hdfunc.options": ("HD_OPTIONS", "HDConfig", "HDOptions", "inverse_square"),
    "hdfunc.registry": ("HD_OF", "HD_VARIANTS", "REGISTRY", "RULES", "RuleInfo", "rule_info"),
    "hdfunc.rules": ("adam", "adam_hd", "adam_hd_lr_beta1", "adamw", "adamw_hd", "base_rule",
                     "hd_rule", "sgd", "sgd_hd", "sgdm", "sgdm_hd", "sgdm_hd_lr_momentum", "sgdn",
                     "sgdn_hd", "sgdn_hd_lr_momentum"),
    "hdfunc.transforms": ("PartitionState", "clip_by_global_norm", "global_norm", "partition"),
}
#: Submodules reachable as attributes of ``hdfunc`` without importing them first.
_SUBMODULES = ("base", "cli", "demo", "directions", "hyperdescent", "hypergradient", "optim",
               "options", "registry", "rules", "studies", "transforms", "tree")

_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_WHERE)

if TYPE_CHECKING:  # what the lazy loader provides, spelled out for static analysis
    from hdfunc import optim, studies
    from hdfunc.base import EmptyState, Rule, Transform, apply_updates, chain
    from hdfunc.directions import (DIFFERENTIABLE_EPS_ROOT, add_decayed_weights, add_l2,
                                   heavy_ball, identity, nesterov, scale_by_adagrad, scale_by_adam,
                                   scale_by_lion, scale_by_rms)
    from hdfunc.hyperdescent import HyperdescentState, get_hyperparams, hyperdescent
    from hdfunc.hypergradient import (HDState, LRState, ScheduleState, adapt_rates,
                                      find_lr_state, freeze_hypergrad_lr, freeze_lr,
                                      get_applied_lr, get_lr, hypergradient, replace_lr_state,
                                      scale_by_lr)
    from hdfunc.options import HD_OPTIONS, HDConfig, HDOptions, inverse_square
    from hdfunc.registry import HD_OF, HD_VARIANTS, REGISTRY, RULES, RuleInfo, rule_info
    from hdfunc.rules import (adam, adam_hd, adam_hd_lr_beta1, adamw, adamw_hd, base_rule,
                              hd_rule, sgd, sgd_hd, sgdm, sgdm_hd, sgdm_hd_lr_momentum, sgdn,
                              sgdn_hd, sgdn_hd_lr_momentum)
    from hdfunc.transforms import PartitionState, clip_by_global_norm, global_norm, partition


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is not None:
        value = getattr(importlib.import_module(module), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    if name in _SUBMODULES:
        try:
            return importlib.import_module(f"hdfunc.{name}")
        except ModuleNotFoundError as error:
            if error.name != f"hdfunc.{name}":
                raise
    raise AttributeError(f"module 'hdfunc' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(_WHERE) | set(_SUBMODULES) | {n for n in globals() if n.startswith("__")})


class _Package(types.ModuleType):
    """``hdfunc`` itself. Importing a submodule sets it as an attribute of its package; where a
    public name equals a submodule's (``hdfunc.hypergradient``, the function), the name wins."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _WHERE and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
