"""The derivative comparator of the suite, and its tolerance model.

:func:`compare_derivatives` computes dφ at a point by reverse mode (``torch.func.grad``),
forward mode (``jvp``) and float64 finite differences (:func:`finite_difference`), and judges
them in one of two ways (as JAX builds ``check_grads`` from ``check_jvp`` and ``check_vjp``):

* against a ``claimed`` derivative (a rule's h_t): each method is a reference for the claim;
* without a claim: reverse mode and finite differences against forward mode (two exact
  computations through many steps must agree to within what rounding explains).

A derivative with respect to a pytree is compared leaf-wise (reverse mode) or along given
``tangents`` (forward mode and finite differences); one with respect to a 0-d tensor without
tangents is compared directly, and its finite difference is taken in the relative variable s,
x = x0 (1 + s), so that the step is scale-free.

The tolerance model: a relative error (max abs error / scale), the scale at least a rounding
floor; a tolerance from the tables below (:func:`tolerance`), at least ``conditioned`` (a
multiple of the measured rounding sensitivity); a finite difference's own error estimate and
rounding floor are forgiven up to ``FD_ALLOWANCE_CAP`` (beyond it the comparison is
INCONCLUSIVE).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from scipy.differentiate import derivative
from torch.func import grad, jvp, vmap

from hdfunc.tree import PyTree, tree_leaves

from verification.report import INCONCLUSIVE, Outcome, judged
from verification.trees import tree_abs_dot, tree_axpy, tree_dot, tree_max_abs, tree_max_diff

REVERSE, FORWARD, FINITE = "reverse", "forward", "finite differences"
REVERSE_VMAP, FORWARD_VMAP = "reverse, vmapped seeds", "forward, vmapped seeds"
# Method names of the comparisons without a claim (reverse mode / finite differences against
# forward mode).
REVERSE_VS_FORWARD, FD_VS_FORWARD = "reverse vs forward", "fd vs forward"

# ----------------------------------------------------------------------------- tolerances
# Relative tolerances (max abs error / scale of the quantity). Reverse and forward mode are
# exact up to rounding; the finite differences (scipy.differentiate, order 8 with Richardson
# steps) are limited by rounding of the loss, amplified ~1/step.

# A rule's derivative against an exact one, by method.
METHOD_TOLERANCES: dict[torch.dtype, dict[str, float]] = {
    torch.float64: {REVERSE: 1e-10, FORWARD: 1e-10, FINITE: 1e-10},
    torch.float32: {REVERSE: 1e-4, FORWARD: 1e-4, FINITE: math.inf},
}
# Two exact computations of one derivative: second order (hessian vs HVP), and through K steps
# reverse vs forward mode ("unrolled") and finite differences vs forward mode ("unrolled_fd").
AGREEMENT_TOLERANCES: dict[torch.dtype, dict[str, float]] = {
    torch.float64: {"second": 1e-10, "unrolled": 1e-9, "unrolled_fd": 1e-6},
    torch.float32: {"second": 1e-3, "unrolled": 1e-3, "unrolled_fd": math.inf},
}
# The tolerance keys of a comparison without a claim, by method.
AGREEMENT_KEYS = {REVERSE: "unrolled", FINITE: "unrolled_fd"}
# Equivalences of whole trajectories, by check.
EQUIVALENCE_TOLERANCES: dict[torch.dtype, dict[str, float]] = {
    torch.float64: {"beta_zero": 1e-12, "vmap": 1e-12, "torch_optim": 1e-10, "front_end": 1e-10},
    torch.float32: {"beta_zero": 1e-5, "vmap": 1e-5, "torch_optim": 1e-4, "front_end": 1e-3},
}
# Earlier names of equivalence keys, still understood by :func:`tolerance`.
KEY_ALIASES = {"equal": "beta_zero", "torch": "torch_optim"}
TOLERANCE_TABLES = (METHOD_TOLERANCES, AGREEMENT_TOLERANCES, EQUIVALENCE_TOLERANCES)

# The finite differences' error estimate excuses at most this much relative error.
FD_ALLOWANCE_CAP = 1e-4
# Errors are relative to at least this fraction of the problem's first hypergradient.
ROUNDING_FLOOR = 1e-6


# The roundings that form one term of a hypergradient's sum (:func:`sum_rounding`): the chain
# rule's products and quotients (Adam: α, the bias correction, √v̂ + ε, g) and their sum.
TERM_ROUNDINGS = 8


def unit_roundoff(dtype: torch.dtype) -> float:
    """u, the unit roundoff of ``dtype`` (half its machine epsilon: 2^-53 for float64)."""
    return torch.finfo(dtype).eps / 2


def gamma(n: int, dtype: torch.dtype) -> float:
    """γ_n = n u / (1 - n u), the bound of n roundings (Higham, *Accuracy and Stability of
    Numerical Algorithms*, 2nd ed., Lemma 3.1)."""
    nu = max(int(n), 0) * unit_roundoff(dtype)
    return nu / (1 - nu) if nu < 1 else math.inf


def sum_rounding(terms: int, size: float, dtype: torch.dtype) -> float:
    """The absolute rounding allowance of a comparison of two derivatives that are each a sum
    of ``terms`` products whose absolute values add up to at most ``size``:
    2 γ_{terms+k} × ``size`` with k = :data:`TERM_ROUNDINGS`.

    Derivation. A hypergradient is a dot product h = Σ_{i=1}^n g_i d_i (g = ∇f, d = ∂u/∂λ), and
    the exact reference computes the same sum in another order (reverse mode). Computed in
    floating point, |fl(Σ g_i d_i) - Σ g_i d_i| ≤ γ_n Σ|g_i d_i| (Higham, Eq. 3.5); an entry d_i
    that is itself a sum of terms c_ik carries γ_k Σ_k |c_ik| of its own, so with
    S = Σ_i |g_i| Σ_k |c_ik| (the size of everything summed) each value is within
    γ_{n+k} S of the exact sum, and the two within 2 γ_{n+k} S (k: the roundings that form
    one term, the chain rule's products and quotients and the sum of its terms). Where h is a cancellation (analytically 0: Adam's h_β1 at t = 2,
    whose two terms of ∂m̂_1/∂β1, (m_0 - g_1)/(1 - β1) and m_1/(1 - β1)², are ~|g_1|/(1 - β1)
    and cancel exactly), the difference of the two computations is this rounding and nothing
    else. ``size`` is the caller's natural scale of the terms (its ``floor`` / ROUNDING_FLOOR).

    Args:
        terms: n, the number of products summed (the number of parameters); 0: no allowance.
        size: S, the sum of the terms' absolute values (or a bound on it).
        dtype: the dtype the sums are computed in.

    Returns:
        The absolute allowance (0 when ``terms`` or ``size`` is 0).
    """
    if terms <= 0 or not size > 0:
        return 0.0
    return 2 * gamma(terms + TERM_ROUNDINGS, dtype) * size


def tolerance(dtype: torch.dtype, key: str) -> float:
    """The relative tolerance for ``key`` (a method, an agreement or an equivalence) at
    ``dtype``."""
    if dtype not in METHOD_TOLERANCES:
        raise ValueError(f"the suite checks float64 or float32 problems, not {dtype}")
    key = KEY_ALIASES.get(key, key)
    for table in TOLERANCE_TABLES:
        if key in table[dtype]:
            return table[dtype][key]
    raise KeyError(f"no tolerance named {key!r}")


def dtype_name(dtype: torch.dtype) -> str:
    """The name of ``dtype`` without ``torch.``, e.g. ``"float64"``.

    Args:
        dtype: the dtype.

    Returns:
        Its name.
    """
    return str(dtype).replace("torch.", "")


# ----------------------------------------------------------------------------- finite differences


@dataclass
class FiniteDifference:
    """scipy's estimate ``value``, its ``error`` estimate, and ``rounding``: the error that
    rounding the function values alone may cause, ~10 ε max|φ| / (final step)."""

    value: float
    error: float
    status: int
    evaluations: int
    rounding: float = 0.0

    @property
    def uncertainty(self) -> float:
        """How far off the estimate may be: 10 × ``error`` or ``rounding``, whichever is
        larger (inf when ``error`` is not finite)."""
        return max(10 * self.error, self.rounding) if math.isfinite(self.error) else math.inf


def finite_difference(phi: Callable[[torch.Tensor], torch.Tensor], *, device: Any,
                      initial_step: float = 0.5, batched: list | None = None) -> FiniteDifference:
    """dφ/ds at s = 0 by ``scipy.differentiate.derivative`` (central differences of order 8,
    step halved until the error estimate stops improving), evaluated in float64. Points are
    evaluated together under ``vmap`` when φ allows it (``batched`` remembers whether it does)."""
    batched = batched if batched is not None else [True]
    largest = [0.0]

    def f(x: np.ndarray) -> np.ndarray:
        flat = torch.as_tensor(np.asarray(x, dtype=np.float64).ravel(), device=device)
        ys = None
        if batched[0]:
            try:
                ys = vmap(phi)(flat)
            except Exception:  # noqa: BLE001 - a rule that does not vmap: evaluate point by point
                batched[0] = False
        if ys is None:
            ys = torch.stack([phi(s) for s in flat])
        values = ys.detach().double().cpu().numpy().reshape(np.shape(x))
        largest[0] = max(largest[0], float(np.max(np.abs(values), initial=0.0)))
        return values

    step_factor = 2.0
    res = derivative(f, np.float64(0.0), initial_step=initial_step, step_factor=step_factor,
                     maxiter=12, tolerances={"atol": 0.0, "rtol": 1e-15})
    final_step = initial_step / step_factor ** max(int(res.nit) - 1, 0)
    rounding = 10 * np.finfo(np.float64).eps * largest[0] / final_step
    return FiniteDifference(float(res.df), float(res.error), int(res.status), int(res.nfev),
                            float(rounding))


def one_step_fd_step(problem: Any) -> float:
    """The first relative step of a one-step finite difference: 0.5, or 1e-3 on a piecewise
    smooth problem (ReLU), where a larger change of the rate moves some pre-activation across
    its kink and no step size then resolves the derivative of the piece the point is on."""
    return 0.5 if problem.smooth else 1e-3


def fd_step(steps: int) -> float:
    """The first (largest) relative step of a finite difference through ``steps`` steps: the
    loss after K steps varies on a scale of α that shrinks like 1/K (a rate change of x moves
    θ_K by ~K x), and over a rugged stretch scipy's step halving stops early, so start at
    0.25 for up to 20 steps and at 5/K beyond."""
    return min(0.25, 5.0 / max(steps, 1))


# ----------------------------------------------------------------------------- judging


@dataclass(frozen=True)
class Judge:
    """What is compared (``check``, ``what``), for which rule, problem and dtype, ``where``; it
    turns errors into outcomes with the tolerance model."""

    check: str
    rule: str
    problem: str
    dtype: torch.dtype
    where: str
    what: str = ""

    def outcome(self, method: str, abs_err: float, scale: float, tol: float,
                fd: Optional[FiniteDifference] = None, what: Optional[str] = None,
                rounding: float = 0.0) -> Outcome:
        """``fd``: the finite difference compared. Its rounding floor (10 ε max|f| / step: below
        it no finite difference resolves a derivative) and its error estimate (×10, at most
        ``FD_ALLOWANCE_CAP`` × scale) are forgiven. ``rounding``: an absolute error that the
        rounding of the two sums compared explains (:func:`sum_rounding`), forgiven too."""
        where, allowance, reason = self.where, rounding, ""
        if fd is not None:
            estimate = 10 * fd.error if math.isfinite(fd.error) else 0.0
            allowance = max(min(estimate, FD_ALLOWANCE_CAP * scale), fd.rounding, rounding)
            where = where + f", fd uncertainty {fd.uncertainty:.1e}"
            if not fd.uncertainty <= FD_ALLOWANCE_CAP * scale:
                reason = (f"the finite difference cannot resolve this derivative: its own "
                          f"uncertainty is {fd.uncertainty / scale if scale > 0 else math.inf:.2g} "
                          "relative (the function is rugged at every step size tried)")
        return judged(self.check, method, self.rule, self.problem, dtype_name(self.dtype),
                      abs_err, scale, tol, where, self.what if what is None else what,
                      allowance, inconclusive_reason=reason)

    def inconclusive(self, method: str, reason: str) -> Outcome:
        """An INCONCLUSIVE outcome: the comparison cannot decide here, for ``reason``."""
        check, rule, problem, dtype = self.check, self.rule, self.problem, dtype_name(self.dtype)
        return Outcome(check, method, rule, problem, dtype, math.nan, math.nan, 0.0, INCONCLUSIVE,
                       self.where, f"{check} ({method}) INCONCLUSIVE for rule {rule} on problem "
                                   f"{problem} ({dtype}, {self.where}): {reason}")


# ----------------------------------------------------------------------------- the comparator


def compare_derivatives(phi: Callable[[PyTree], torch.Tensor], at: PyTree, judge: Judge, *,
                        claimed: PyTree = None, tangents: Optional[Sequence[PyTree]] = None,
                        methods: Sequence[str] = (REVERSE, FORWARD, FINITE), floor: float = 0.0,
                        fd_step: float = 0.5, reverse: PyTree = None,
                        forward: Optional[torch.Tensor] = None, conditioned: float = 0.0,
                        terms: int = 0) -> list[Outcome]:
    """Judge dφ(``at``) by ``methods`` (finite differences in float64 only).

    With ``claimed``: the claim against reverse mode (leaf-wise), forward mode (along each
    tangent) and finite differences (along the first), each with :data:`METHOD_TOLERANCES`.
    Without: reverse mode and finite differences against forward mode (along the first
    tangent), with :data:`AGREEMENT_TOLERANCES` (raised to ``conditioned``). Without
    ``tangents``, ``at`` is a 0-d tensor, forward mode gives the whole derivative and the
    finite difference runs along |at| (or 1). Scales are at least ``floor`` (× max|tangent|
    along a tangent). ``reverse`` and ``forward`` pass derivatives already computed (forward:
    along the first tangent, or the whole derivative). The scale of each comparison (the larger
    of the values compared, or for a claim along a tangent Σ|claim⊙w|) is formed exactly as the
    checks formed it before they shared this comparator, so that reported numbers did not
    change.

    ``terms``: with a claim, the number n of products the derivative sums (the length of the
    dot product g·∂u/∂λ: the number of parameters). The comparison then forgives the rounding
    of two such sums, :func:`sum_rounding` (2 γ_{n+2} S) with S = ``floor`` / ROUNDING_FLOOR
    (× max|tangent| along a tangent), the natural size of the terms that the floor is a
    fraction of: where the derivative is analytically 0, a cancellation of terms of size S,
    the floor alone leaves less than one rounding of them (1e-10 × 1e-6 S < u S)."""
    if claimed is not None:
        return _against_claim(phi, at, judge, claimed, tangents, methods, floor, fd_step, terms)
    return _against_forward(phi, at, judge, tangents, methods, floor, fd_step, reverse, forward,
                            conditioned)


def _fd_along(phi: Callable, at: PyTree, w: PyTree, step: float,
              device: Any) -> FiniteDifference:
    """dφ(at + s w)/ds at s = 0 by :func:`finite_difference`."""
    return finite_difference(lambda s: phi(tree_axpy(at, s, w)), device=device,
                             initial_step=step)


def _relative_size(at: torch.Tensor) -> tuple[float, torch.Tensor]:
    """The step unit |x0| (or 1) of a finite difference in the relative variable, as a number
    and as a tangent."""
    size = abs(float(at)) or 1.0
    return size, torch.full_like(at, size)


def _against_claim(phi: Callable, at: PyTree, judge: Judge, claimed: PyTree,
                   tangents: Optional[Sequence[PyTree]], methods: Sequence[str], floor: float,
                   step: float, terms: int = 0) -> list[Outcome]:
    dtype, out = judge.dtype, []
    device = _device(at)
    # the rounding of the two sums compared, on the natural size of their terms
    rounding = sum_rounding(terms, floor / ROUNDING_FLOOR, dtype)
    if REVERSE in methods:
        exact = grad(phi)(at)
        # a 0-d argument: the difference in its own dtype; a tree: leaf-wise in float64
        err = abs(float(claimed - exact)) if tangents is None else tree_max_diff(claimed, exact)
        out.append(judge.outcome(REVERSE, err, max(tree_max_abs(exact), floor),
                                 tolerance(dtype, REVERSE), rounding=rounding))
    if tangents is None:  # a 0-d argument: the whole derivative by forward mode
        if FORWARD in methods:
            _, exact = jvp(phi, (at,), (torch.ones_like(at),))
            out.append(judge.outcome(FORWARD, abs(float(claimed - exact)),
                                     max(abs(float(exact)), floor), tolerance(dtype, FORWARD),
                                     rounding=rounding))
        if FINITE in methods and dtype == torch.float64:
            size, w = _relative_size(at)
            fd = _fd_along(phi, at, w, step, device)
            out.append(judge.outcome(FINITE, abs(size * float(claimed) - fd.value),
                                     max(abs(fd.value), size * abs(float(claimed)), size * floor),
                                     tolerance(dtype, FINITE), fd, rounding=size * rounding))
        return out
    along = judge.what + " along a tangent"
    if FORWARD in methods:
        for w in tangents:
            _, exact_dir = jvp(phi, (at,), (w,))
            value = tree_dot(claimed, w)
            scale = max(tree_abs_dot(claimed, w), abs(float(exact_dir)), floor * tree_max_abs(w))
            out.append(judge.outcome(FORWARD, abs(float(value - exact_dir)), scale,
                                     tolerance(dtype, FORWARD), what=along,
                                     rounding=rounding * tree_max_abs(w)))
    if FINITE in methods and dtype == torch.float64:
        w = tangents[0]
        fd = _fd_along(phi, at, w, step, device)
        value = float(tree_dot(claimed, w))
        scale = max(tree_abs_dot(claimed, w), abs(fd.value), floor * tree_max_abs(w))
        out.append(judge.outcome(FINITE, abs(value - fd.value), scale, tolerance(dtype, FINITE),
                                 fd, what=along, rounding=rounding * tree_max_abs(w)))
    return out


def _against_forward(phi: Callable, at: PyTree, judge: Judge,
                     tangents: Optional[Sequence[PyTree]], methods: Sequence[str], floor: float,
                     step: float, reverse: PyTree, forward: Optional[torch.Tensor],
                     conditioned: float) -> list[Outcome]:
    dtype, out = judge.dtype, []
    w = tangents[0] if tangents is not None else torch.ones_like(at)
    if forward is None:
        forward = jvp(phi, (at,), (w,))[1]
    if reverse is None:
        reverse = grad(phi)(at)

    def tol(method: str) -> float:
        return max(tolerance(dtype, AGREEMENT_KEYS[method]), conditioned)

    def what(method: str) -> str:
        return f"{judge.what} by {'reverse mode' if method == REVERSE else 'finite differences'} " \
               "and by forward mode"

    if tangents is not None:
        scale = max(tree_abs_dot(reverse, w), abs(float(forward)), floor * tree_max_abs(w))
        if REVERSE in methods:
            out.append(judge.outcome(REVERSE_VS_FORWARD,
                                     abs(float(tree_dot(reverse, w) - forward)), scale,
                                     tol(REVERSE), what=what(REVERSE)))
        if FINITE in methods and dtype == torch.float64:
            fd = _fd_along(phi, at, w, step, _device(at))
            out.append(judge.outcome(FD_VS_FORWARD, abs(fd.value - float(forward)), scale,
                                     tol(FINITE), fd, what=what(FINITE)))
        return out
    if REVERSE in methods:
        out.append(judge.outcome(REVERSE_VS_FORWARD, abs(float(reverse - forward)),
                                 max(abs(float(reverse)), abs(float(forward)), floor),
                                 tol(REVERSE), what=what(REVERSE)))
    if FINITE in methods and dtype == torch.float64:
        size, unit = _relative_size(at)
        fd = _fd_along(phi, at, unit, step, _device(at))
        out.append(judge.outcome(FD_VS_FORWARD, abs(fd.value - size * float(forward)),
                                 size * max(abs(float(forward)), abs(fd.value) / size),
                                 tol(FINITE), fd, what=what(FINITE)))
    return out


def _device(at: PyTree) -> torch.device:
    return tree_leaves(at)[0].device
