"""The autodiff-HD oracle and the suite's verdicts on whole rules: every planted error in a
rule fails, with a diagnosis naming the part of the HD step that is wrong; correct hand-written
rules pass, in quick and full mode; an ill-conditioned or non-differentiable check is
INCONCLUSIVE (exit status 3), never a false failure."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import hdfunc
import verification
from hypothesis_profiles import PROFILE
from verification import checks as C
from verification import cli, examples
from verification.catalog import builtin_spec, user_spec
from verification.oracle import (APPLIED, HYPERGRAD, LAW, ORACLE, STEP, TRAJECTORY,
                                 declared_law)
from verification.problems import Problem, make_problem, quadratic, scaled
from verification.report import FAIL, INCONCLUSIVE, PASS, Report, judged
import verification_planted_rules as planted

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# The part of the HD step each planted error is in (tests/verification_planted_rules.py).
FAULTY_PART = {**{bug: HYPERGRAD for bug in planted.HYPERGRADIENT_BUGS},
               "ascent": LAW, "scaled_law": LAW, "previous_rate": APPLIED,
               "late_update": STEP, "per_tensor_drift": TRAJECTORY}
ADAM_ONLY = ("bias_correction", "eps_omitted", "eps_misplaced")
CASES = [(base, bug) for bug in planted.BUGS for base in ("sgd", "adam")
         if base == "adam" or bug not in ADAM_ONLY]


def assert_diagnosed(report: Report, rule: str, part: str, problems: tuple = ()) -> None:
    """``report`` FAILED ``rule`` and its diagnosis names ``part``, as the first faulty part."""
    assert report.verdict == "FAILED" and report.exit_status == 1
    (diagnosis,) = [d for d in report.diagnoses() if d.startswith(rule + ":")]
    assert f"differs from its definition is the {part}, first at step t=" in diagnosis, diagnosis
    failed = [o for o in report.failures if o.rule == rule and o.check == ORACLE]
    assert any(o.method == part for o in failed)
    for o in failed:
        assert o.verdict == FAIL and o.max_rel_err > o.tolerance and o.first_step is not None
        assert f"{ORACLE} ({o.method}) FAILED for rule {rule}" in o.message
        assert not problems or o.problem in problems


# ----------------------------------------------------------------------------- planted errors


@pytest.mark.parametrize("base, bug", CASES, ids=[f"{b}-{g}" for b, g in CASES])
def test_each_planted_error_fails_and_the_diagnosis_names_its_part(base, bug):
    factory = planted.planted(base, bug)
    report = verification.run([factory], quick=True, problems=["quadratic"])
    assert_diagnosed(report, factory.__name__, FAULTY_PART[bug], ("quadratic",))


@pytest.mark.parametrize("bug", ["ascent", "scaled_law", "previous_rate", "per_tensor_drift"])
def test_rule_errors_that_store_the_right_hypergradient_fail_only_the_oracle(bug):
    """These rules store the exact h_t, so every hypergradient check passes them: the oracle is
    what tells that they do the wrong thing with it (issue: α → -∞ by gradient ascent passed
    the whole suite)."""
    factory = planted.planted("sgd", bug)
    report = verification.run([factory], quick=True, problems=["quadratic", "mlp"])
    assert {o.check for o in report.failures} == {ORACLE}
    others = [o for o in report.outcomes if o.check != ORACLE]
    assert len(others) > 20 and all(o.verdict == PASS for o in others)
    # The oracle's hypergradient part agrees that h_t itself is right.
    assert all(o.verdict == PASS for o in report.outcomes
               if o.check == ORACLE and o.method == HYPERGRAD)


def test_ascent_really_is_ascent():
    """The planted error is the real thing: α_t grows where the paper's law shrinks it."""
    problem = make_problem("quadratic")
    rates = {}
    for bug in (None, "ascent"):
        rule = planted.planted("sgd", bug)(0.01, 1e-3)
        hist = C.run_trajectory(rule, problem.loss, problem.params, 20)
        rates[bug] = [float(s.lr) for _, s in hist[1:]]
    assert rates[None][-1] > 0.01 > rates["ascent"][-1]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("eps", [1e-8, 1e-12])
@pytest.mark.parametrize("bug", ["eps_omitted", "eps_misplaced"])
def test_eps_sized_errors_fail_where_gradients_are_near_eps(bug, eps, dtype):
    """On tiny_quadratic (gradients ~1e-8) ε is not negligible, so dropping or misplacing it
    changes h_t by far more than rounding, in float32 too; the correct rule with the same ε
    passes there (the control)."""
    broken = planted.planted("adam", bug, eps=eps)
    control = planted.planted("adam", None, eps=eps)
    report = verification.run([broken, control], quick=True, problems=["tiny_quadratic"],
                              dtype=dtype)
    assert_diagnosed(report, broken.__name__, HYPERGRAD, ("tiny_quadratic",))
    assert any(o.check == C.ONE_STEP for o in report.failures)
    assert all(o.verdict == PASS for o in report.outcomes if o.rule == control.__name__)


@pytest.mark.slow
def test_full_mode_diagnoses_every_rule_error_on_every_problem():
    """Full mode (longer trajectories, more seeds and problems): each rule error fails on every
    problem it runs on, and the diagnosis still names its part."""
    bugs = ("ascent", "scaled_law", "previous_rate", "late_update", "per_tensor_drift")
    factories = [planted.planted("sgd", bug) for bug in bugs]
    problems = ("quadratic", "rosenbrock")
    report = verification.run(factories, quick=False, problems=list(problems))
    for bug, factory in zip(bugs, factories):
        assert_diagnosed(report, factory.__name__, FAULTY_PART[bug], problems)
        failed_on = {o.problem for o in report.failures if o.rule == factory.__name__}
        assert failed_on == set(problems), (bug, failed_on)


# ----------------------------------------------------------------------------- correct rules


def _multiplicative(declared: bool):
    law = hdfunc.HDOptions(mode="multiplicative") if declared else None
    return planted.planted("sgd", None, law="multiplicative", rate_law=law)


def test_a_rule_declaring_its_rate_law_is_checked_against_that_law():
    """A hand-written multiplicative (Eq. 8) rule passes when it declares
    ``rate_law = HDOptions(mode="multiplicative")``, and fails the rate law when it does not
    (the oracle then holds it to the paper's additive law)."""
    good = verification.run([_multiplicative(True)], quick=True, problems=["quadratic", "mlp"])
    assert good.passed, "\n".join(o.message for o in good.failures)
    assert any(o.check == ORACLE and o.method == LAW and o.verdict == PASS for o in good.outcomes)
    undeclared = verification.run([_multiplicative(False)], quick=True, problems=["quadratic"])
    assert_diagnosed(undeclared, _multiplicative(False).__name__, LAW)


def test_a_declared_law_must_match_the_state():
    rule = planted.PlantedRule("sgd", None, 0.1, 0.01,
                               rate_law=hdfunc.HDOptions(lr_granularity="element"))
    state = rule.init({"w": torch.zeros(3, dtype=torch.float64)})
    with pytest.raises(ValueError, match="declares lr_granularity='element'"):
        declared_law(rule, state)
    with pytest.raises(TypeError, match="rate_law must be an hdfunc.HDOptions"):
        declared_law(rule._replace(rate_law="multiplicative"), state)
    assert declared_law(planted.sgd_hd_correct(0.1, 0.01), state) == hdfunc.HDOptions()


def test_hd_rule_carries_its_law_to_the_oracle():
    rule = hdfunc.hd_rule(hdfunc.scale_by_rms(0.99), 0.01, 1e-4, mode="multiplicative",
                          lr_granularity="tensor")
    assert rule.rate_law.mode == "multiplicative" and rule.rate_law.lr_granularity == "tensor"
    state = rule.init({"a": torch.ones(2, dtype=torch.float64), "b": torch.ones(3, dtype=torch.float64)})
    assert declared_law(rule, state) is rule.rate_law


@pytest.mark.parametrize("factory", [planted.sgd_hd_correct, planted.adam_hd_correct,
                                     examples.heavy_ball_hd, examples.adagrad_momentum_hd,
                                     examples.rmsprop_hd])
def test_correct_hand_written_rules_pass_the_oracle_on_every_quick_problem(factory):
    report = verification.run([factory], quick=True)
    assert report.passed and report.exit_status == 0, "\n".join(
        o.message for o in report.failures + report.inconclusives)
    parts = {o.method for o in report.outcomes if o.check == ORACLE}
    assert {HYPERGRAD, LAW, APPLIED, STEP, TRAJECTORY} <= parts


@pytest.mark.slow
def test_the_readme_rmsprop_one_liner_passes_in_full_mode():
    """The README's ``hd_rule(scale_by_rms(0.99), lr, hypergrad_lr)``, as a user verifies it:
    full mode, every default problem. It failed before (mlp, K=200: an ill-conditioned unroll
    judged as if it were exact); now K is halved to a well-conditioned unroll and it passes."""
    report = verification.run([examples.rmsprop_hd])
    assert report.passed and report.exit_status == 0, "\n".join(
        o.message for o in report.failures + report.inconclusives)
    unrolled = [o for o in report.outcomes if o.check == C.UNROLLED and o.problem == "mlp"]
    assert unrolled and all(o.verdict == PASS for o in unrolled)


# ----------------------------------------------------------------------------- INCONCLUSIVE


def chaotic_problem() -> Problem:
    """f(x) = -Σ cos x_i with a declared smoothness of 5e-4, so the calibrated rate is 1000:
    gradient descent x ← x - 1000 sin x is chaotic (its derivatives grow ~500× per step)."""
    x = torch.tensor([0.3, 1.1, 2.0, -0.7], dtype=torch.float64)
    return Problem("chaotic_sine", {"x": x}, lambda p: -torch.cos(p["x"]).sum(), 5e-4)


def test_a_chaotic_unroll_is_inconclusive_not_a_failure():
    case = C.make_case(builtin_spec("sgd_hd"), chaotic_problem(), 6)
    assert case.calibration.lr == pytest.approx(1000)
    (outcome,) = C.check_unrolled(case, 40)
    assert outcome.verdict == INCONCLUSIVE and not outcome.failed and outcome.inconclusive
    assert "K=5, halved from K=40" in outcome.where
    assert "ill-conditioned down to K=5" in outcome.message
    sensitivity = float(outcome.message.split("moves dL_K/dalpha by ")[1].split()[0])
    assert sensitivity > C.ILL_CONDITIONED[torch.float64]
    report = Report([outcome])
    assert report.verdict == "INCONCLUSIVE" and report.exit_status == 3 and not report.passed


def test_an_ill_conditioned_long_unroll_is_checked_at_a_shorter_k():
    """The README's RMSprop-HD on mlp through K=200 steps: rounding-sized noise moves the
    derivative by ~1e-4, so no comparison there is meaningful; K=100 is well-conditioned, and
    reverse mode, forward mode and finite differences agree there to the usual tolerances."""
    case = C.make_case(user_spec(examples.rmsprop_hd), make_problem("mlp"), 6)
    outcomes = C.check_unrolled(case, 200)
    assert [o.method for o in outcomes] == ["reverse vs forward", "fd vs forward"]
    for o in outcomes:
        assert o.verdict == PASS and "K=100, K=200 requested" in o.where
    assert outcomes[0].tolerance == pytest.approx(C.tolerance(torch.float64, "unrolled"))


def test_a_short_unroll_is_checked_where_asked():
    case = C.make_case(builtin_spec("adam_hd"), make_problem("quadratic"), 6)
    outcomes = C.check_unrolled(case, 12)
    assert all(o.verdict == PASS and "K=12, rounding sensitivity" in o.where for o in outcomes)


def test_cli_exits_3_when_a_derivative_through_training_does_not_exist(capsys):
    """RMSprop-HD without eps_root on the ReLU net with dead units: sqrt'(0) makes every
    derivative through training NaN. Not the rule's fault: INCONCLUSIVE, with the fix named,
    while every check that can decide passes."""
    status = cli.main(["--quick", "--no-progress", "--rule", "verification.examples:rmsprop_hd",
                       "--problems", "relu_mlp"])
    out = capsys.readouterr()
    assert status == 3
    assert "verification INCONCLUSIVE" in out.out and "0 failed, 3 inconclusive" in out.out
    assert "eps_root > 0 (hdfunc.DIFFERENTIABLE_EPS_ROOT)" in out.err


def test_built_in_adam_hd_is_differentiable_on_the_relu_net():
    """The same net with the built-in Adam-HD, which the suite builds with
    eps_root = DIFFERENTIABLE_EPS_ROOT there: every multi-step check decides, and passes."""
    report = verification.run(quick=True, only="adam*_hd*", problems=["relu_mlp"])
    assert report.passed, "\n".join(o.message for o in report.failures + report.inconclusives)
    assert any(o.check == C.UNROLLED for o in report.outcomes)


def test_inconclusive_outcomes_are_reported_apart():
    ok = judged(C.ONE_STEP, C.REVERSE, "r", "p", "float64", 1e-17, 1.0, 1e-10, "t=2", "x")
    case = C.make_case(builtin_spec("sgd_hd"), chaotic_problem(), 6)
    undecided = C.check_unrolled(case, 40)[0]
    report = Report([ok, undecided])
    assert report.counts() == {PASS: 1, FAIL: 0, "ERROR": 0, INCONCLUSIVE: 1}
    assert report.inconclusives == [undecided] and not report.failures
    assert "1 inconclusive" in report.summary() and report.exit_status == 3
    again = Report.from_dict(json.loads(json.dumps(report.to_dict(), allow_nan=False)))
    assert again.verdict == "INCONCLUSIVE" and again.markdown() == report.markdown()
    assert math.isnan(again.outcomes[1].max_rel_err)  # undecided, not an infinite error
    bad = judged(C.ONE_STEP, C.REVERSE, "r", "p", "float64", 1.0, 1.0, 1e-10, "t=2", "x")
    assert Report([ok, undecided, bad]).exit_status == 1  # a failure outranks undecided checks


# ----------------------------------------------------------------------------- scale


@PROFILE
@given(st.floats(-10, 4), st.integers(0, 2 ** 16), st.sampled_from(["sgd_hd", "adam_hd"]))
def test_oracle_passes_correct_rules_at_every_problem_scale(log_scale, seed, name):
    """Built-in rules pass every part of the oracle on a quadratic whose loss is scaled by
    10^-10 … 10^4 (gradients from far below Adam's ε to large): the tolerances are relative to
    the problem, not absolute."""
    problem = scaled(quadratic(seed), 10 ** log_scale)
    case = C.make_case(builtin_spec(name), problem, 8)
    outcomes = C.check_oracle(case)
    assert outcomes and all(o.verdict == PASS for o in outcomes), [o.message for o in outcomes
                                                                   if o.verdict != PASS]


@PROFILE
@given(st.floats(-10, 4), st.integers(0, 2 ** 16),
       st.sampled_from(["wrong_sign", "ascent", "previous_rate", "late_update"]))
def test_oracle_catches_errors_at_every_problem_scale(log_scale, seed, bug):
    problem = scaled(quadratic(seed), 10 ** log_scale)
    base = "adam" if bug == "previous_rate" else "sgd"
    case = C.make_case(user_spec(planted.planted(base, bug)), problem, 8)
    failed = {o.method for o in C.check_oracle(case) if o.failed}
    assert FAULTY_PART[bug] in failed, (bug, failed)


@PROFILE
@given(st.floats(-9.5, -7), st.integers(0, 2 ** 16), st.sampled_from([1e-8, 1e-12]))
def test_eps_omitted_fails_whenever_gradients_are_near_eps(log_scale, seed, eps):
    """Gradients of 10^-9.5 … 10^-7 against ε = 1e-8 or 1e-12: dropping ε always shows."""
    problem = scaled(quadratic(seed), 10 ** log_scale)
    case = C.make_case(user_spec(planted.planted("adam", "eps_omitted", eps=eps)), problem, 6)
    outcomes = C.check_one_step(case, 6, methods=(C.REVERSE, C.FORWARD))
    assert all(o.failed for o in outcomes), [(o.max_rel_err, o.tolerance) for o in outcomes]
    assert math.isfinite(outcomes[0].max_rel_err)
