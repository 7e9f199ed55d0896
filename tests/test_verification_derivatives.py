"""The suite's derivative comparator on a closed-form function: φ(a) = Σ sin(a x), dφ/da =
Σ x cos(a x)."""

from __future__ import annotations

import math

import pytest
import torch

from torch.func import grad

from verification.derivatives import (FD_VS_FORWARD, FINITE, FORWARD, REVERSE,
                                      REVERSE_VS_FORWARD, ROUNDING_FLOOR, TERM_ROUNDINGS, Judge,
                                      compare_derivatives, gamma, sum_rounding, tolerance,
                                      unit_roundoff)
from verification.report import FAIL, PASS

X = torch.linspace(-1.5, 2.0, 7, dtype=torch.float64)


def phi(a: torch.Tensor) -> torch.Tensor:
    return torch.sin(a * X).sum()


def dphi(a: torch.Tensor) -> torch.Tensor:
    return (X * torch.cos(a * X)).sum()


def phi_tree(a: dict) -> torch.Tensor:
    return torch.sin(a["w"] * X).sum() + torch.sin(a["b"] * X).sum()


def judge(dtype: torch.dtype = torch.float64) -> Judge:
    return Judge("closed form", "rule", "problem", dtype, "a=0.7", "dphi/da")


def verdicts(outcomes: list) -> dict:
    return {o.method: o.verdict for o in outcomes}


A = torch.tensor(0.7, dtype=torch.float64)


def test_an_exact_derivative_passes_by_all_three_methods():
    out = compare_derivatives(phi, A, judge(), claimed=dphi(A))
    assert verdicts(out) == {REVERSE: PASS, FORWARD: PASS, FINITE: PASS}
    by_method = {o.method: o for o in out}
    assert by_method[REVERSE].max_rel_err < 1e-12 and by_method[FORWARD].max_rel_err < 1e-12
    # No bound on the finite difference's error beyond its PASS (the suite's tolerance plus its
    # own uncertainty): near its rounding floor the error follows the last bits of the sines,
    # which differ between CPUs and torch's kernels. At this a it was below 1e-12 relative in
    # earlier runs and 1.5e-12 to 2.8e-12 on 2026-12-01; over 300 points within 1.5e-7 of a, up
    # to 1.1e-10, every one PASS.


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_a_derivative_wrong_by_one_part_in_a_million_fails_by_all_three_methods(sign):
    wrong = dphi(A) * (1 + sign * 1e-6)
    out = compare_derivatives(phi, A, judge(), claimed=wrong)
    assert verdicts(out) == {REVERSE: FAIL, FORWARD: FAIL, FINITE: FAIL}
    for o in out:
        assert o.max_rel_err == pytest.approx(1e-6, rel=1e-3)
        assert "FAILED" in o.message and "dphi/da" in o.message


def test_a_pytree_derivative_is_compared_leafwise_and_along_tangents():
    at = {"w": A, "b": torch.tensor(-0.3, dtype=torch.float64)}
    exact = {"w": dphi(at["w"]), "b": dphi(at["b"])}
    tangents = [{"w": torch.tensor(0.5, dtype=torch.float64),
                 "b": torch.tensor(-2.0, dtype=torch.float64)}]
    out = compare_derivatives(phi_tree, at, judge(), claimed=exact, tangents=tangents)
    assert [o.method for o in out] == [REVERSE, FORWARD, FINITE]
    assert all(o.verdict == PASS for o in out)
    wrong = {"w": exact["w"], "b": exact["b"] * (1 + 1e-6)}
    out = compare_derivatives(phi_tree, at, judge(), claimed=wrong, tangents=tangents)
    assert all(o.verdict == FAIL for o in out)


def test_without_a_claim_reverse_mode_and_finite_differences_agree_with_forward_mode():
    out = compare_derivatives(phi, A, judge())
    assert verdicts(out) == {REVERSE_VS_FORWARD: PASS, FD_VS_FORWARD: PASS}
    assert out[0].tolerance == tolerance(torch.float64, "unrolled")


def test_a_wrong_reverse_mode_fails_against_forward_mode():
    out = compare_derivatives(phi, A, judge(), reverse=dphi(A) * (1 + 1e-6), methods=(REVERSE,))
    assert verdicts(out) == {REVERSE_VS_FORWARD: FAIL}


def test_float32_skips_finite_differences():
    a = A.float()
    out = compare_derivatives(lambda s: torch.sin(s * X.float()).sum(), a, judge(torch.float32),
                              claimed=(X.float() * torch.cos(a * X.float())).sum())
    assert verdicts(out) == {REVERSE: PASS, FORWARD: PASS}


def test_the_tolerance_tables_and_their_lookup():
    assert tolerance(torch.float64, REVERSE) == 1e-10
    assert tolerance(torch.float32, FINITE) == math.inf
    assert tolerance(torch.float64, "unrolled_fd") == 1e-6
    assert tolerance(torch.float64, "equal") == tolerance(torch.float64, "beta_zero") == 1e-12
    assert tolerance(torch.float32, "torch") == tolerance(torch.float32, "torch_optim") == 1e-4
    with pytest.raises(KeyError):
        tolerance(torch.float64, "nonsense")
    with pytest.raises(ValueError):
        tolerance(torch.float16, REVERSE)


# ----------------------------------------------------------------------------- rounding allowance

# ψ(b) = Σ y_i m̂_i(b) with m = (1 - b) g and m̂ = m/(1 - b) = g for every b (Adam's m̂_1): dψ/db
# is analytically 0, and autodiff computes it as a cancellation of terms of total size
# S = Σ |y_i| 2|g_i|/(1 - b), to a few units of rounding of S.
_GEN = torch.Generator().manual_seed(0)
G_CANCEL = torch.randn(12, generator=_GEN, dtype=torch.float64)
Y_CANCEL = torch.randn(12, generator=_GEN, dtype=torch.float64)
B = torch.tensor(0.9, dtype=torch.float64)
S_CANCEL = float((Y_CANCEL.abs() * G_CANCEL.abs()).sum() * 2 / (1 - B))


def psi(b: torch.Tensor) -> torch.Tensor:
    return (Y_CANCEL * ((1 - b) * G_CANCEL / (1 - b))).sum()


def test_gamma_and_the_sum_rounding_bound():
    u = 2.0 ** -53
    assert unit_roundoff(torch.float64) == u and unit_roundoff(torch.float32) == 2.0 ** -24
    assert gamma(12, torch.float64) == pytest.approx(12 * u / (1 - 12 * u), rel=1e-15)
    assert sum_rounding(12, 3.0, torch.float64) == 2 * gamma(12 + TERM_ROUNDINGS,
                                                             torch.float64) * 3.0
    assert sum_rounding(0, 3.0, torch.float64) == 0.0  # no terms given: no allowance


def test_a_cancellation_to_rounding_passes_with_its_allowance_and_a_real_error_fails():
    """A claim 4 u S off the exact derivative (the rounding of two sums of terms of total size
    S, where the derivative itself cancels to 0) fails against the floor alone (1e-10 × 1e-6 S
    is less than one rounding of S) and passes with the allowance of ``terms`` = 12 products;
    a claim 1e-12 S off is no rounding and fails with it."""
    exact = grad(psi)(B)
    assert abs(float(exact)) <= 4 * 2.0 ** -53 * S_CANCEL  # the cancellation, to rounding
    floor = ROUNDING_FLOOR * S_CANCEL
    rounded = exact + 4 * 2.0 ** -53 * S_CANCEL
    methods = (REVERSE, FORWARD)
    without = compare_derivatives(psi, B, judge(), claimed=rounded, methods=methods, floor=floor)
    assert verdicts(without) == {REVERSE: FAIL, FORWARD: FAIL}
    allowed = compare_derivatives(psi, B, judge(), claimed=rounded, methods=methods, floor=floor,
                                  terms=12)
    assert verdicts(allowed) == {REVERSE: PASS, FORWARD: PASS}
    # the reported tolerance is the table's plus the allowance relative to the scale
    allowance = sum_rounding(12, S_CANCEL, torch.float64)
    assert allowed[0].tolerance == pytest.approx(tolerance(torch.float64, REVERSE)
                                                 + allowance / floor, rel=1e-12)
    wrong = exact + 1e-12 * S_CANCEL
    assert verdicts(compare_derivatives(psi, B, judge(), claimed=wrong, methods=methods,
                                        floor=floor, terms=12)) == {REVERSE: FAIL, FORWARD: FAIL}
