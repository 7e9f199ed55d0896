"""The suite verifies every adapted hyperparameter of a hyperdescent rule (built-in and
``--rule``), and fails rules whose hypergradient or rate law is wrong, naming the part."""

from __future__ import annotations

import dataclasses

import pytest

import hdfunc
import verification
from hdfunc.base import Rule
from verification.hyperdescent import HYPERDESCENT, HYPERDESCENT_LAW, hyperdescent_specs

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


def test_a_scheduled_hd_rule_is_inconclusive_not_failed():
    """The checks take the applied rate to be the adapted one; a rule with lr_schedule (right
    or not) is reported as not verified yet, with the reason, rather than failed."""
    def sgd_hd_warm(lr: float, hypergrad_lr: float) -> Rule:
        return hdfunc.sgd_hd(lr, hypergrad_lr, lr_schedule=lambda count: 0.5 + 0.5 * 0.9 ** count)

    report = verification.run(rules=[sgd_hd_warm], quick=True, problems=PROBLEMS)
    assert not report.failures and not report.passed
    assert [row.verdict for row in report.outcomes] == ["INCONCLUSIVE"]
    assert "lr_schedule" in report.outcomes[0].message
