"""How much can rounding alone move a quantity computed through many optimizer steps?

A derivative through an unrolled optimizer (or a whole trajectory) can be ill-conditioned: on a
chaotic stretch (a rate at the edge of stability, RMSprop bouncing around a minimum) rounding
errors of 1e-16 grow to 1e-4 or more, and two computations that are each exact up to their own
rounding (reverse and forward mode, a rule and its oracle) disagree by as much. The suite
measures this instead of guessing: it reruns the computation with θ perturbed after every
step by rounding-sized noise and takes the relative change as the *rounding sensitivity*. A
comparison's tolerance is then at least ``CONDITIONING_SAFETY`` times it, and past
``ILL_CONDITIONED`` the comparison cannot tell a wrong value from rounding and is reported
INCONCLUSIVE (or, for the K-step checks, run on a shorter, well-conditioned unroll).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from hdfunc.tree import PyTree, tree_map

# Rounding-sized noise: this many machine epsilons (relative) per step.
ROUNDING_NOISE = 4.0
# A quantity that rounding-sized noise moves by more than this (relative) is too
# ill-conditioned to check.
ILL_CONDITIONED = {torch.float64: 1e-8, torch.float32: 1e-2}
# A tolerance is at least this multiple of the measured rounding sensitivity.
CONDITIONING_SAFETY = 10.0


@dataclass(frozen=True)
class Noise:
    """A relative perturbation of θ after every step, θ ← θ + size·|θ|·N(0, 1) (``seed``)."""

    size: float
    seed: int

    def generator(self) -> torch.Generator:
        """A fresh CPU generator seeded with ``seed``: every call restarts the same draws.

        Returns:
            The generator.
        """
        return torch.Generator().manual_seed(self.seed)


def perturb(params: PyTree, noise: Noise, gen: torch.Generator) -> PyTree:
    """``params`` plus the next draw of ``noise`` (no derivative flows through the noise)."""
    return tree_map(lambda x: x + noise.size * x.detach().abs() * torch.randn(
        x.shape, generator=gen, dtype=torch.float64).to(x), params)


def rounding_noises(dtype: torch.dtype, seeds: int = 2) -> list[Noise]:
    """Rounding-sized noises: :data:`ROUNDING_NOISE` machine epsilons of ``dtype``
    (relative), with fixed seeds.

    Args:
        dtype: the dtype whose machine epsilon sets the size.
        seeds: how many noises (seeds 7919, 7920, ...).

    Returns:
        The :class:`Noise` of each seed.
    """
    size = ROUNDING_NOISE * torch.finfo(dtype).eps
    return [Noise(size, 7919 + seed) for seed in range(seeds)]


def rounding_sensitivity(value_with: Callable[[Optional[Noise]], float], reference: float,
                         scale: float, dtype: torch.dtype, seeds: int = 2) -> float:
    """The largest relative change of ``value_with(noise)`` from ``reference`` (its value
    without noise), relative to ``scale``, over ``seeds`` draws of rounding-sized noise."""
    worst = 0.0
    for noise in rounding_noises(dtype, seeds):
        change = abs(float(value_with(noise)) - reference) / scale if scale > 0 else math.inf
        worst = max(worst, change if math.isfinite(change) else math.inf)
    return worst
