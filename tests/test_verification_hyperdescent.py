"""The suite verifies every adapted hyperparameter of a hyperdescent rule (built-in and
``--rule``), and fails rules whose hypergradient or rate law is wrong, naming the part."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import hdfunc
import verification
from hdfunc.base import Rule
from verification import checks as C
from verification.catalog import (builtin_spec, hyperdescent_rule_spec, hyperdescent_rule_specs,
                                  quick_specs)
from verification.hyperdescent import HYPERDESCENT, HYPERDESCENT_LAW, hyperdescent_specs
from verification.oracle import APPLIED, HYPERGRAD, ORACLE
from verification.suite import QUICK

PROBLEMS = ["quadratic", "mlp"]


def sgdn_lr_momentum(lr: float, hypergrad_lr: float) -> Rule:
    """A user's rule: SGDN with α and μ adapted (what `--rule` would load)."""
    return hdfunc.hyperdescent(hdfunc.sgdn, {"lr": hypergrad_lr, "momentum": 1e-3}, lr=lr,
                               momentum=0.9)


def corrupted(corrupt):
    """sgdn_lr_momentum whose state is corrupted by ``corrupt(state)`` after each update."""
    def factory(lr: float, hypergrad_lr: float) -> Rule:
        rule = sgdn_lr_momentum(lr, hypergrad_lr)

        def update(grads, state, params=None):
            updates, state = rule.update(grads, state, params)
            return updates, corrupt(state)

        return dataclasses.replace(rule, update=update)

    factory.__name__ = corrupt.__name__
    return factory


def momentum_tangent_off_by_one_percent(state):
    return state._replace(tangents={**state.tangents, "momentum": hdfunc.tree.tree_map(
        lambda t: 1.01 * t, state.tangents["momentum"])})


def momentum_law_off(state):
    return state._replace(hyperparams={**state.hyperparams,
                                       "momentum": state.hyperparams["momentum"] * (1 + 1e-6)})


def test_builtin_and_user_hyperdescent_rules_pass():
    report = verification.run(rules=[sgdn_lr_momentum] + hyperdescent_specs(quick=True),
                              quick=True, problems=PROBLEMS)
    checks = {row.check for row in report.outcomes}
    assert {HYPERDESCENT, HYPERDESCENT_LAW} <= checks
    wheres = {row.where.split(", ")[2] for row in report.outcomes if row.check == HYPERDESCENT}
    assert wheres == {"lr", "momentum"}  # every adapted hyperparameter
    assert report.passed and not report.failures, report.summary()


@pytest.mark.parametrize("corrupt, part", [(momentum_tangent_off_by_one_percent, HYPERDESCENT),
                                           (momentum_law_off, HYPERDESCENT_LAW)])
def test_a_wrong_hypergradient_or_rate_law_fails_there(corrupt, part):
    """A tangent 1 % off makes h_μ wrong (α's checks still pass); a μ stored 1e-6 off the
    law fails the law (and every replay of a step from that state, α's included)."""
    report = verification.run(rules=[corrupted(corrupt)], quick=True, problems=PROBLEMS)
    assert not report.passed
    failing = {(row.check, row.where.split(", ")[2]) for row in report.outcomes
               if row.verdict == "FAIL"}
    assert (part, "momentum") in failing
    if part == HYPERDESCENT:
        assert not any(name == "lr" for _, name in failing)


# ----------------------------------------------------------------------------- Adam-HD (α, β₁)

# t = 2 is where h_β1 is analytically 0 (m̂_1 = g_1 for every β1): a cancellation of two terms
# ~|g_1|/(1 - β1) that only the rounding allowance of the comparator (sum_rounding) separates
# from a wrong value; tiny_quadratic is where it exceeded the floor alone.
BETA1_PLAN = dataclasses.replace(QUICK, states=(2, 3, 8))
BETA1_PROBLEMS = ["quadratic", "mlp", "tiny_quadratic"]


def beta1_spec(corrupt=None, mode: str = "additive"):
    """The catalogue's Adam-HD (α, β₁), its state corrupted by ``corrupt(state)`` after each
    update (None: the rule itself)."""
    spec = hyperdescent_rule_spec("adam_hd_lr_beta1", mode)
    if corrupt is None:
        return spec

    def make(lr, beta, calibration):
        rule = spec.make(lr, beta, calibration)

        def update(grads, state, params=None):
            updates, state = rule.update(grads, state, params)
            return updates, corrupt(state)

        return dataclasses.replace(rule, update=update)

    return dataclasses.replace(spec, name=f"{spec.name}/{corrupt.__name__}", make=make)


def beta1_tangent_off_by_one_percent(state):
    return state._replace(tangents={**state.tangents, "betas[0]": hdfunc.tree.tree_map(
        lambda t: 1.01 * t, state.tangents["betas[0]"])})


def beta1_hypergradient_sign_flipped(state):
    return state._replace(hypergrad={**state.hypergrad, "betas[0]": -state.hypergrad["betas[0]"]})


@pytest.mark.parametrize("mode", ["additive", "multiplicative"])
def test_adam_hd_lr_beta1_is_in_the_catalogue_and_passes(mode):
    """Both adapted hyperparameters are checked, t = 2 (the cancellation) included, and pass."""
    assert "adam_hd_lr_beta1[additive]" in {s.name for s in hyperdescent_rule_specs(quick=True)}
    assert {s.name for s in hyperdescent_rule_specs(quick=False)} >= {
        "adam_hd_lr_beta1[additive]", "adam_hd_lr_beta1[multiplicative]"}
    report = verification.run(rules=[beta1_spec(mode=mode)], plan=BETA1_PLAN,
                              problems=BETA1_PROBLEMS)
    rows = [row for row in report.outcomes if row.check == HYPERDESCENT]
    assert {row.where.split(", ")[2] for row in rows} == {"lr", "betas[0]"}
    assert any("t=2, betas[0]" in row.where and row.problem == "tiny_quadratic" for row in rows)
    assert report.passed and not report.failures and not report.inconclusives, report.summary()


@pytest.mark.parametrize("corrupt", [beta1_tangent_off_by_one_percent,
                                     beta1_hypergradient_sign_flipped])
def test_a_wrong_beta1_hypergradient_fails(corrupt):
    """A tangent ∂u/∂β1 1 % off, or h_β1 stored with the wrong sign, fails the one-step identity
    of β1 (the rounding allowance does not hide it); α's one-step identity still passes."""
    report = verification.run(rules=[beta1_spec(corrupt)], plan=BETA1_PLAN,
                              problems=BETA1_PROBLEMS)
    assert report.verdict == "FAILED"
    failing = {(row.check, row.where.split(", ")[2]) for row in report.outcomes
               if row.verdict == "FAIL"}
    assert (HYPERDESCENT, "betas[0]") in failing
    assert (HYPERDESCENT, "lr") not in failing
    if corrupt is beta1_hypergradient_sign_flipped:  # the law replayed from the stored h_β1
        assert (HYPERDESCENT_LAW, "betas[0]") in failing


# ----------------------------------------------------------------------------- lr_schedule

SCHEDULE_PROBLEMS = ["quadratic", "mlp", "rosenbrock"]


def warm(count):
    """A schedule s(c) of the step count: 0.5 + 0.5 × 0.9^c."""
    return 0.5 + 0.5 * 0.9 ** count


def sgd_hd_warm(lr: float, hypergrad_lr: float) -> Rule:
    """A user's scheduled rule: SGD-HD whose adapted rate is multiplied by s(t-1)."""
    return hdfunc.sgd_hd(lr, hypergrad_lr, lr_schedule=warm)


def schedule_missing_from_hypergradient(lr: float, hypergrad_lr: float) -> Rule:
    """A planted error: the step applies s(t-1) γ_t (and reports it), but h_t = -g_t · d_{t-1}
    lacks the factor s(t-2) of the step it differentiates (so α follows the wrong h_t)."""
    rule = hdfunc.sgd_hd(lr, hypergrad_lr)  # h_t and the rate law of the unscheduled rule

    def update(grads, state, params=None):
        factor = warm(hdfunc.find_lr_state(state).count.to(torch.float64))
        updates, state = rule.update(grads, state, params)
        applied = hdfunc.find_lr_state(state).applied_lr
        return (hdfunc.tree.tree_map(lambda u: factor.to(u.dtype) * u, updates),
                hdfunc.replace_lr_state(state, applied_lr=factor.to(applied.dtype) * applied))

    return dataclasses.replace(rule, update=update, rate_law=sgd_hd_warm(lr, hypergrad_lr).rate_law)


def schedule_applied_twice(lr: float, hypergrad_lr: float) -> Rule:
    """A planted error: the step applies s(t-1)² γ_t (and h_t is its derivative), but the rule
    declares the schedule s."""
    rule = hdfunc.sgd_hd(lr, hypergrad_lr, lr_schedule=lambda count: warm(count) ** 2)
    return dataclasses.replace(rule, rate_law=sgd_hd_warm(lr, hypergrad_lr).rate_law)


def test_scheduled_hd_rules_are_verified():
    """A user rule and a built-in one with lr_schedule get every check (one step at the rate HD
    adapts, γ_{t-1} = applied / s(t-2); the oracle's applied rate s(t-1) γ_t) and pass."""
    builtin = builtin_spec("adam_hd", granularity="tensor", mode="multiplicative",
                           scheduled=True)
    assert builtin.scheduled and builtin.name in {s.name for s in quick_specs()}
    report = verification.run(rules=[sgd_hd_warm, builtin], quick=True,
                              problems=SCHEDULE_PROBLEMS)
    checks = {(row.rule, row.check) for row in report.outcomes}
    for rule in ("sgd_hd_warm", builtin.name):
        assert {(rule, C.ONE_STEP), (rule, C.SECOND_ORDER), (rule, ORACLE)} <= checks
    assert report.passed and not report.failures and not report.inconclusives, report.summary()
    # the schedule really moves the rate the checks use: s(t-2) is not 1 at the steps checked
    assert all(abs(warm(torch.tensor(float(t - 2))) - 1) > 0.04 for t in QUICK.states)


@pytest.mark.parametrize("factory, part", [(schedule_missing_from_hypergradient, HYPERGRAD),
                                           (schedule_applied_twice, APPLIED)])
def test_a_wrong_schedule_fails(factory, part):
    """The schedule missing from h_t fails the one-step identity and the oracle's h_t; applied
    twice, it fails the one-step identity (the rate HD adapts is then not applied / s(t-2))
    and the oracle's applied rate."""
    report = verification.run(rules=[factory], quick=True, problems=SCHEDULE_PROBLEMS)
    assert report.verdict == "FAILED"
    failing = {(row.check, row.method) for row in report.outcomes if row.verdict == "FAIL"}
    assert (ORACLE, part) in failing
    assert any(check == C.ONE_STEP for check, _ in failing)


def test_a_rule_marked_unsupported_is_inconclusive_not_failed():
    """A spec the suite cannot verify (``unsupported``, the reason) gets one INCONCLUSIVE row
    with the reason, not a failure and no checks."""
    spec = dataclasses.replace(builtin_spec("sgd_hd"), unsupported="a reason, for the test")
    report = verification.run(rules=[spec], quick=True, problems=["quadratic"])
    assert report.verdict == "INCONCLUSIVE" and not report.failures
    assert [row.verdict for row in report.outcomes] == ["INCONCLUSIVE"]
    assert "a reason, for the test" in report.outcomes[0].message
