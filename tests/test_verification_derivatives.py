"""The suite's derivative comparator on a closed-form function: φ(a) = Σ sin(a x), dφ/da =
Σ x cos(a x)."""

from __future__ import annotations

import math

import pytest
import torch

from verification.derivatives import (FD_VS_FORWARD, FINITE, FORWARD, REVERSE,
                                      REVERSE_VS_FORWARD, Judge, compare_derivatives, tolerance)
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
    assert all(o.max_rel_err < 1e-12 for o in out)


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
