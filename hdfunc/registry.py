"""The rule registry: one entry per named rule, read by the tests, the verification catalogue,
the studies and the command line (modelled on torch.optim's ``optim_db``).

Each :class:`RuleInfo` pairs a rule with its fixed-rate twin (the base rule an HD rule equals at
β = 0), its torch.optim twin (the optimizer the base rule equals step for step) and its
:mod:`hdfunc.optim` class, and says which study hyperparameters it takes. Adding a rule is one
entry here (plus its tests, which are driven by this table).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from hdfunc import rules
from hdfunc.base import Rule


@dataclass(frozen=True)
class RuleInfo:
    """One named rule and its twins.

    Attributes:
        name: the rule's name (``"adam_hd"``), also its factory's name in :mod:`hdfunc`.
        factory: the rule factory (``hdfunc.adam_hd``).
        title: the name people use (``"Adam-HD"``).
        base: for an HD rule, the name of its fixed-rate twin (``"adam"``); None for a base rule.
        adapts: the hyperparameters the rule adapts (``("lr",)`` for the paper's HD rules,
            ``("lr", "momentum")`` for ``sgdn_hd_lr_momentum``); empty for a base rule. The rate
            of each beyond ``lr`` is the argument ``<name>_hypergrad_lr`` (``beta1_hypergrad_lr``
            for ``betas[0]``).
        torch_twin: for a base rule, ``torch_twin(params, **hyperparams)`` makes the torch.optim
            optimizer that takes the same steps (hyperparameters spelled as the rule spells
            them); None where torch has none.
        optimizer: for an HD rule, the name of its :mod:`hdfunc.optim` class; None if it has none.
        optimizer_options: options that make that class this rule (``momentum`` for the
            heavy-ball rule, whose class is SGDHD), besides the rule's hyperparameters.
        study_hyperparams: the hyperparameters a study passes on from its configuration
            (``weight_decay``, ``momentum``) that this rule takes.
        paper_hypergrad_lr: for an HD rule, the β the paper uses (§4).
        example: hyperparameters (besides lr and hypergrad_lr) that exercise every option of the
            rule, for the registry-driven tests.
    """

    name: str
    factory: Callable[..., Rule]
    title: str
    base: Optional[str] = None
    adapts: tuple[str, ...] = ()
    torch_twin: Optional[Callable[..., torch.optim.Optimizer]] = None
    optimizer: Optional[str] = None
    optimizer_options: dict = field(default_factory=dict)
    study_hyperparams: tuple[str, ...] = ("weight_decay",)
    paper_hypergrad_lr: Optional[float] = None
    example: dict = field(default_factory=dict)

    @property
    def is_hd(self) -> bool:
        """Whether this rule adapts hyperparameters (it has a fixed-rate twin)."""
        return bool(self.adapts)

    @property
    def extra_rates(self) -> tuple[str, ...]:
        """The arguments holding the hypergradient rates of the adapted hyperparameters other
        than ``lr`` (``("momentum_hypergrad_lr",)``)."""
        return tuple(k for k in self.example if k.endswith("_hypergrad_lr"))

    def optimizer_class(self) -> Optional[type]:
        """The :mod:`hdfunc.optim` class of this rule (imported on first use), or None.

        Returns:
            The optimizer class (``hdfunc.optim.AdamHD``), or None if the rule has none.
        """
        if self.optimizer is None:
            return None
        return getattr(importlib.import_module("hdfunc.optim"), self.optimizer)


def _sgd(params: list, lr: float, weight_decay: float = 0.0, **_: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)


def _sgdm(params: list, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
          **_: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


def _sgdn(params: list, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
          **_: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=True,
                           weight_decay=weight_decay)


def _adam(params: list, lr: float, betas: tuple = (0.9, 0.999), eps: float = 1e-8,
          weight_decay: float = 0.0, **_: Any) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


def _adamw(params: list, lr: float, betas: tuple = (0.9, 0.999), eps: float = 1e-8,
           weight_decay: float = 1e-2, **_: Any) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


SGD_FAMILY = ("weight_decay", "momentum")  # what a study passes to the momentum rules

REGISTRY: dict[str, RuleInfo] = {info.name: info for info in (
    RuleInfo("sgd", rules.sgd, "SGD", torch_twin=_sgd, example={"weight_decay": 0.05}),
    RuleInfo("sgd_hd", rules.sgd_hd, "SGD-HD", base="sgd", adapts=("lr",), optimizer="SGDHD",
             paper_hypergrad_lr=1e-3, example={"weight_decay": 0.05}),
    RuleInfo("sgdm", rules.sgdm, "SGDM", torch_twin=_sgdm, study_hyperparams=SGD_FAMILY,
             example={"momentum": 0.8, "weight_decay": 0.01}),
    RuleInfo("sgdm_hd", rules.sgdm_hd, "SGDM-HD", base="sgdm", adapts=("lr",),
             optimizer="SGDHD", optimizer_options={"momentum": 0.9},
             study_hyperparams=SGD_FAMILY, paper_hypergrad_lr=1e-3,
             example={"momentum": 0.8, "weight_decay": 0.01}),
    RuleInfo("sgdm_hd_lr_momentum", rules.sgdm_hd_lr_momentum, "SGDM-HD (α, μ)", base="sgdm",
             adapts=("lr", "momentum"), study_hyperparams=SGD_FAMILY, paper_hypergrad_lr=1e-3,
             example={"momentum_hypergrad_lr": 1e-3, "momentum": 0.8}),
    RuleInfo("sgdn", rules.sgdn, "SGDN", torch_twin=_sgdn, study_hyperparams=SGD_FAMILY,
             example={"momentum": 0.8, "weight_decay": 0.01}),
    RuleInfo("sgdn_hd", rules.sgdn_hd, "SGDN-HD", base="sgdn", adapts=("lr",),
             optimizer="SGDNHD", study_hyperparams=SGD_FAMILY, paper_hypergrad_lr=1e-3,
             example={"momentum": 0.8, "weight_decay": 0.01}),
    RuleInfo("sgdn_hd_lr_momentum", rules.sgdn_hd_lr_momentum, "SGDN-HD (α, μ)", base="sgdn",
             adapts=("lr", "momentum"), study_hyperparams=SGD_FAMILY, paper_hypergrad_lr=1e-3,
             example={"momentum_hypergrad_lr": 1e-3, "momentum": 0.8}),
    RuleInfo("adam", rules.adam, "Adam", torch_twin=_adam,
             example={"betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.01}),
    RuleInfo("adam_hd", rules.adam_hd, "Adam-HD", base="adam", adapts=("lr",),
             optimizer="AdamHD", paper_hypergrad_lr=1e-7,
             example={"betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.01}),
    RuleInfo("adam_hd_lr_beta1", rules.adam_hd_lr_beta1, "Adam-HD (α, β₁)", base="adam",
             adapts=("lr", "betas[0]"), paper_hypergrad_lr=1e-7,
             example={"beta1_hypergrad_lr": 1e-4, "betas": (0.8, 0.99), "eps": 1e-6}),
    RuleInfo("adamw", rules.adamw, "AdamW", torch_twin=_adamw, example={"weight_decay": 0.1}),
    RuleInfo("adamw_hd", rules.adamw_hd, "AdamW-HD", base="adamw", adapts=("lr",),
             optimizer="AdamWHD", paper_hypergrad_lr=1e-7, example={"weight_decay": 0.1}),
)}

RULES: dict[str, Callable[..., Rule]] = {name: info.factory for name, info in REGISTRY.items()}
"""Every named rule factory, by name."""

HD_VARIANTS: dict[str, str] = {info.base: name for name, info in REGISTRY.items()
                               if info.adapts == ("lr",)}
"""The HD rule (adapting α) of each base rule, by the base rule's name (``"adam" -> "adam_hd"``)."""

HD_OF = HD_VARIANTS  # the former name of HD_VARIANTS


def rule_info(name: str) -> RuleInfo:
    """The registry entry of the rule ``name``.

    Args:
        name: a rule name (``"adam_hd"``).

    Returns:
        Its :class:`RuleInfo`.

    Raises:
        ValueError: an unknown name, listing the known ones.
    """
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown rule {name!r}; choose one of {', '.join(REGISTRY)}") from None
