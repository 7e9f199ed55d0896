"""The options of hypergradient descent, in one typed, self-validating value.

Every front end takes them (``hdfunc.adam_hd(..., mode="multiplicative")``,
``hdfunc.hypergradient(direction, lr, hypergrad_lr, options=HDOptions(...))``, the optimizer
classes of :mod:`hdfunc.optim`) and passes one :class:`HDOptions` on; the rate update
(:func:`hdfunc.adapt_rates`) and the verification suite's oracle read the same value. A new
option is one field here (with its documentation and check) plus its use in the rate update.
"""

from __future__ import annotations

import dataclasses
import difflib
import textwrap
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Optional

import torch

from hdfunc.base import check_hyperparameter, check_lr_bounds

Granularity = Literal["global", "tensor", "element"]
Mode = Literal["additive", "multiplicative"]
GRANULARITIES: tuple[str, ...] = ("global", "tensor", "element")
MODES: tuple[str, ...] = ("additive", "multiplicative")
Schedule = Callable[[torch.Tensor], Any]


def inverse_square(t: torch.Tensor) -> torch.Tensor:
    """δ(t) = 1/t², the transition schedule suggested in §5.1 (δ(1) = 1, t·δ(t) → 0).

    Args:
        t: the step number as a float tensor (1 at the first step).

    Returns:
        1/t², elementwise.
    """
    return 1.0 / (t * t)


def _option(default: Any, doc: str) -> Any:
    return field(default=default, metadata={"doc": doc})


@dataclass(frozen=True)
class HDOptions:
    """The static choices of hypergradient descent on the learning rate (Baydin et al. 2018):
    granularity, additive or multiplicative rule, transition to a fixed rate, higher order,
    bounds, the non-finite guard and a schedule factor. Checked when made (a bad value raises
    ``TypeError``/``ValueError`` naming the option); ``replace`` makes a checked copy.

    A rule declares the law by which it adapts α as its ``rate_law``, an ``HDOptions``; the
    verification suite's oracle replays exactly that law (docs/writing-a-rule.md).
    """

    lr_granularity: Granularity = _option(
        "global", "one rate for all parameters (``'global'``), one per tensor (``'tensor'``) "
        "or one per element (``'element'``), with the dot product h_t taken at that "
        "granularity (§2).")
    mode: Mode = _option(
        "additive", "``'additive'``: α_t = α_{t-1} - β h_t (Eq. 3); ``'multiplicative'``: "
        "α_t = α_{t-1} (1 - β h_t / (‖g_t‖ ‖d_{t-1}‖)) (Eqs. 7-8), which leaves α unchanged "
        "where a norm is 0 (t = 1).")
    final_lr: Optional[float | torch.Tensor] = _option(
        None, "α_∞ of the transition variant (§5.1): the step applies "
        "γ_t = δ(t) α_t + (1 - δ(t)) α_∞; None applies α_t.")
    transition: Callable[[torch.Tensor], torch.Tensor] = _option(
        inverse_square, "δ(t) of the transition, a callable on a float tensor t"
        "; used only with ``final_lr``.")
    hyper_hypergrad_lr: Optional[float | torch.Tensor] = _option(
        None, "κ of the higher-order variant (§5.2), which adapts β by "
        "β_t = β_{t-1} - κ ∂f(θ_{t-1})/∂β (normalised like α in the multiplicative mode); "
        "None keeps β fixed.")
    lr_bounds: Optional[tuple[Optional[float], Optional[float]]] = _option(
        None, "(low, high): α is clamped to this interval after each update (each bound None "
        "or a finite number); None: no bound, as in the paper, so α may turn "
        "negative.")
    skip_nonfinite: bool = _option(
        True, "keep α where h_t or the new α is not finite (and β where ∂f/∂β or the new β "
        "is not finite), counting such steps in the state's ``skipped``.")
    lr_schedule: Optional[Schedule] = _option(
        None, "a factor s(t-1) on the adapted rate, a callable of the step count (0 at the "
        "first step): the step is u_t = -s(t-1) γ_t d_t and h_t its exact derivative "
        "(functional rules only; the optimizer classes compose with torch's LR schedulers).")

    def __post_init__(self) -> None:
        if self.lr_granularity not in GRANULARITIES:
            raise ValueError(f"lr_granularity must be one of {GRANULARITIES}, "
                             f"got {self.lr_granularity!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.final_lr is not None:
            check_hyperparameter("final_lr", self.final_lr)
        if not callable(self.transition):
            raise TypeError("transition must be a callable δ(t) on a float tensor t, "
                            f"got {self.transition!r}")
        if self.hyper_hypergrad_lr is not None:
            check_hyperparameter("hyper_hypergrad_lr", self.hyper_hypergrad_lr)
        low, high = check_lr_bounds(self.lr_bounds)
        object.__setattr__(self, "lr_bounds",
                           None if self.lr_bounds is None else (low, high))
        if not isinstance(self.skip_nonfinite, bool):
            raise TypeError(f"skip_nonfinite must be True or False, got {self.skip_nonfinite!r}")
        if self.lr_schedule is not None and not callable(self.lr_schedule):
            raise TypeError("lr_schedule must be None or a callable s(count) of the step count")

    # ------------------------------------------------------------------ derived views

    @property
    def has_final_lr(self) -> bool:
        """Whether the step applies the transition γ_t to α_∞ (``final_lr`` is set)."""
        return self.final_lr is not None

    @property
    def higher_order(self) -> bool:
        """Whether β is adapted too (``hyper_hypergrad_lr`` is set)."""
        return self.hyper_hypergrad_lr is not None

    @property
    def lr_low(self) -> Optional[float]:
        """The lower bound on α (None: none)."""
        return None if self.lr_bounds is None else self.lr_bounds[0]

    @property
    def lr_high(self) -> Optional[float]:
        """The upper bound on α (None: none)."""
        return None if self.lr_bounds is None else self.lr_bounds[1]

    # ------------------------------------------------------------------ construction

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The option names, in declaration order.

        Returns:
            The names of the fields of :class:`HDOptions`.
        """
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def of(cls, options: Optional[HDOptions] = None, **values: Any) -> HDOptions:
        """``options`` (default: all defaults) with ``values`` replacing some fields.

        Args:
            options: an :class:`HDOptions` to start from, or None.
            **values: options by name (``mode="multiplicative"``, ...).

        Returns:
            A checked :class:`HDOptions`.

        Raises:
            TypeError: an unknown option name (the closest valid one is suggested), or
                ``options`` that is not an HDOptions.
        """
        if options is not None and not isinstance(options, HDOptions):
            raise TypeError(f"options must be an hdfunc.HDOptions, got {type(options).__name__}")
        valid = cls.names()
        for key in values:
            if key not in valid:
                close = difflib.get_close_matches(key, valid, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise TypeError(f"unknown HD option {key!r}{hint}; valid options: "
                                f"{', '.join(valid)}")
        base = options if options is not None else cls()
        return dataclasses.replace(base, **values) if values else base

    def replace(self, **values: Any) -> HDOptions:
        """A checked copy with ``values`` replacing some fields (see :meth:`of`).

        Args:
            **values: the options to change, by name.

        Returns:
            A new, checked :class:`HDOptions`.

        Raises:
            TypeError: an option is unknown or of the wrong type.
            ValueError: an option's value is out of range.
        """
        return HDOptions.of(self, **values)

    @classmethod
    def docstring(cls, indent: str = "    ", exclude: tuple[str, ...] = (),
                  value_argument: bool = True) -> str:
        """The options as a Google-style ``Keyword Args`` section (appended to the docstring of
        every HD rule and optimizer class, so ``help(hdfunc.adam_hd)`` lists them), without
        those in ``exclude``; ``value_argument``: also the ``options`` argument.

        Args:
            indent: the indentation of the section's heading.
            exclude: the option names to leave out.
            value_argument: whether to list the ``options`` argument too.

        Returns:
            The section's text, ending in a newline.
        """
        lines = ["", f"{indent}Keyword Args:"]
        entries = [(f.name, f"{f.metadata['doc']} Default: "
                    f"{f.default.__name__ if callable(f.default) else repr(f.default)}.")
                   for f in dataclasses.fields(cls) if f.name not in exclude]
        if value_argument:
            entries.append(("options", "an :class:`hdfunc.HDOptions` holding any of these (the "
                            "keywords above override it)."))
        for name, text in entries:
            lines.extend(textwrap.wrap(f"{name}: {text}", 96 - len(indent),
                                       initial_indent=indent + "    ",
                                       subsequent_indent=indent + "        "))
        return "\n".join(lines) + "\n"


HD_OPTIONS: tuple[str, ...] = HDOptions.names()
"""The names of the options of every HD rule (the fields of :class:`HDOptions`)."""

HDConfig = HDOptions
"""The former name of :class:`HDOptions` (a rule's declared ``rate_law``)."""
