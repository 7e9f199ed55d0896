"""The verification suite itself: it passes correct rules, catches each planted error with a
message naming the check, the error size and the problem, and reports in every format."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.func import grad, hessian

import hdfunc
import verification
from verification import checks as C
from verification import cli, examples
from verification.catalog import builtin_spec, quick_specs
from verification.problems import PROBLEM_NAMES, estimate_smoothness, flatten_params, make_problem
from verification.report import FAIL, PASS, Report, judged
import verification_planted_rules as planted

ROOT = Path(__file__).resolve().parents[1]



pytestmark = pytest.mark.usefixtures("one_torch_thread")

# ----------------------------------------------------------------------------- end to end


def test_quick_suite_end_to_end(tmp_path):
    """``python -m verification --quick`` exits 0 and its JSON/Markdown hold every check kind
    for every quick rule, with real (small) errors."""
    json_path, md_path = tmp_path / "report.json", tmp_path / "report.md"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "verification", "--quick", "--no-progress",
                           "--json", str(json_path), "--markdown", str(md_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(json_path.read_text())
    assert report["passed"] and report["counts"]["FAIL"] == 0 and report["counts"]["ERROR"] == 0
    checks = {o["check"] for o in report["outcomes"]}
    assert {C.ONE_STEP, C.SECOND_ORDER, C.UNROLLED, C.HYPER_BETA, C.HYPER_ALPHA0,
            C.HYPER_ANALYTIC, C.BETA_ZERO, C.TORCH_OPTIM, C.VMAP} <= checks
    one_step_rules = {o["rule"] for o in report["outcomes"] if o["check"] == C.ONE_STEP}
    assert one_step_rules == {s.name for s in quick_specs()}
    methods = {o["method"] for o in report["outcomes"] if o["check"] == C.ONE_STEP}
    assert methods == {C.REVERSE, C.FORWARD, C.FINITE, C.REVERSE_VMAP, C.FORWARD_VMAP}
    for o in report["outcomes"]:
        assert o["verdict"] == PASS and o["max_rel_err"] <= o["tolerance"]
    # The K=1 "finding" is an identity: the greedy hypergradient is the exact one.
    first = [f for f in report["findings"] if f["steps"] == 1]
    assert first and all(f["cosine"] > 1 - 1e-9 and f["sign_agreement"] == 1 for f in first)
    text = md_path.read_text()
    assert text.startswith("# Verification report") and "| one-step identity [reverse] |" in text
    assert "verification PASSED" in done.stdout and "max rel err" in done.stdout


# ----------------------------------------------------------------------------- planted errors


@pytest.mark.parametrize("factory, bug", [
    (planted.sgd_hd_wrong_sign, "wrong sign"),
    (planted.sgd_hd_stale_gradient, "off-by-one-step gradient"),
    (planted.adam_hd_grad_dot_grad, "g_t.g_t"),
    (planted.adam_hd_bias_correction, "bias correction of step t"),
])
def test_planted_errors_fail_the_one_step_identity(factory, bug):
    report = verification.run([factory], quick=True, problems=["quadratic"])
    assert not report.passed, f"the suite passed a rule with a planted {bug}"
    failed = [o for o in report.failures if o.check == C.ONE_STEP]
    assert {o.method for o in failed} == {C.REVERSE, C.FORWARD, C.FINITE, C.REVERSE_VMAP,
                                          C.FORWARD_VMAP}
    for o in failed:
        assert o.verdict == FAIL and o.max_rel_err > 1e-3 and o.problem == "quadratic"
        assert o.check in o.message and factory.__name__ in o.message
        assert "on problem quadratic" in o.message
        assert re.search(r"differ by [0-9.e+-]+ absolute, [0-9.e+-]+ relative", o.message)
    # Autodiff consistency checks do not depend on the rule's claim, so they still pass:
    assert all(o.verdict == PASS for o in report.outcomes if o.check in (C.UNROLLED, C.VMAP))


@pytest.mark.parametrize("factory", [planted.sgd_hd_correct, planted.adam_hd_correct,
                                     examples.heavy_ball_hd])
def test_correct_hand_written_rules_pass(factory):
    report = verification.run([factory], quick=True, problems=["quadratic"])
    assert report.passed, "\n".join(o.message for o in report.failures)
    assert {o.check for o in report.outcomes} >= {C.ONE_STEP, C.SECOND_ORDER, C.UNROLLED,
                                                   C.HYPER_BETA, C.VMAP}


def test_cli_rule_option_reports_a_planted_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "r.json"
    status = cli.main(["--quick", "--no-progress", "--problems", "quadratic", "--json", str(out),
                       "--rule", "tests.verification_planted_rules:sgd_hd_wrong_sign"])
    assert status == 1
    report = json.loads(out.read_text())
    assert not report["passed"] and report["counts"]["FAIL"] >= 3
    assert any("one-step identity (reverse) FAILED" in m and "quadratic" in m
               for m in report["failures"])
    captured = capsys.readouterr()
    assert "FAIL" in captured.out and "one-step identity" in captured.err


@pytest.mark.parametrize("argv, text", [
    (["--rule", "no_such_module_xyz:factory"], "cannot import"),
    (["--rule", "verification.examples"], "package.module:factory"),
    (["--rule", "verification.examples:missing"], "no attribute"),
    (["--only", "no-rule-matches-this"], "no rule matches"),
    (["--device", "no-such-device"], "is not available"),
    (["--threads", "0"], "threads must be >= 1"),
])
def test_cli_rejects_bad_arguments(argv, text, capsys):
    assert cli.main(["--quick", "--no-progress"] + argv) == 2
    assert text in capsys.readouterr().err


def test_a_state_without_hd_node_is_an_error_not_a_pass():
    report = verification.run([lambda lr, hypergrad_lr: hdfunc.sgd(lr)], quick=True,
                              problems=["quadratic"])
    assert not report.passed
    assert any("holds no HD node" in o.message for o in report.failures)


def test_non_finite_derivative_is_reported():
    outcome = judged(C.HYPER_ALPHA0, "reverse vs forward", "r", "p", "float64", math.nan, 1.0,
                     1e-9, "K=5", "two derivatives")
    assert outcome.verdict == FAIL and "non-finite" in outcome.message


# ----------------------------------------------------------------------------- the checks


def test_check_one_step_matches_the_core_example():
    """The check reproduces the context's exact identity by hand, independently."""
    problem = make_problem("logistic")
    case = C.make_case(builtin_spec("adam_hd"), problem, 6)
    (p4, s4), s5, s6 = case.hist[4], case.hist[5][1], case.hist[6][1]
    g4 = grad(problem.loss)(p4)

    def f(a):
        u, _ = case.rule.update(g4, hdfunc.freeze_lr(s4, a), p4)
        return problem.loss(hdfunc.apply_updates(p4, u))

    exact = grad(f)(hdfunc.find_lr_state(s5).applied_lr)
    assert torch.allclose(exact, hdfunc.find_lr_state(s6).hypergrad, rtol=1e-12, atol=0)
    outcomes = C.check_one_step(case, 6)
    assert [o.verdict for o in outcomes] == [PASS] * 3


def test_second_order_closed_form_on_a_quadratic():
    problem = make_problem("quadratic", seed=3)
    a, b = problem.hessian, problem.linear_term
    theta = flatten_params(problem.params)
    assert torch.allclose(hessian(lambda x: 0.5 * x @ a @ x - b @ x)(theta), a)
    case = C.make_case(builtin_spec("sgd_hd", granularity="element"), problem, 6)
    outcomes = C.check_second_order(case, 4)
    assert {o.method for o in outcomes} == {"hessian vs HVP", "hessian vs dAd"}
    assert all(o.verdict == PASS for o in outcomes)


def test_smoothness_estimate_is_the_largest_eigenvalue():
    problem = make_problem("quadratic", seed=1)
    estimate = estimate_smoothness(problem.loss, problem.params, iterations=200)
    top = float(torch.linalg.eigvalsh(problem.hessian).max())
    assert estimate == pytest.approx(top, rel=1e-3)


@pytest.mark.parametrize("name", PROBLEM_NAMES)
def test_problems_are_deterministic_and_finite(name):
    a, b = make_problem(name, seed=5), make_problem(name, seed=5)
    assert torch.equal(flatten_params(a.params), flatten_params(b.params))
    assert torch.isfinite(a.loss(a.params)) and a.loss(a.params) == b.loss(b.params)
    assert a.smoothness > 0 and a.dtype == torch.float64


def test_unrolled_hypergradient_against_closed_form_for_gd_on_a_quadratic():
    """For plain GD on ½θᵀAθ - bᵀθ, θ_K = θ* + (I - αA)^K (θ_0 - θ*), so dL_K/dα has a closed
    form; the K-step machinery (reverse through the loop) must reproduce it."""
    problem = make_problem("quadratic", seed=2)
    a, b = problem.hessian, problem.linear_term
    rule = hdfunc.sgd_hd(0.3, 0.0)
    state = rule.init(problem.params)
    steps, alpha = 7, torch.tensor(0.3, dtype=torch.float64)
    L = C.unrolled_loss(rule, problem.loss, problem.params, state, steps)
    star = torch.linalg.solve(a, b)
    e0 = flatten_params(problem.params) - star

    def closed(al):
        m = torch.linalg.matrix_power(torch.eye(len(b), dtype=a.dtype) - al * a, steps)
        theta = star + m @ e0
        return 0.5 * theta @ a @ theta - b @ theta

    assert torch.allclose(grad(L)(alpha), grad(closed)(alpha), rtol=1e-12, atol=0)


def test_vmap_check_detects_a_rule_that_reads_rates_from_its_closure():
    """A rule that ignores the α stored in its state breaks the stacked (α_0, β) grid."""
    outcome = C.check_vmap(builtin_spec("sgd_hd"), make_problem("quadratic"), 5)[0]
    assert outcome.verdict == PASS  # the built-in rule reads α from the state
    broken = verification.RuleSpec("closure_lr", lambda lr, b, c: _ClosureRate(lr, b))
    outcome = C.check_vmap(broken, make_problem("quadratic"), 5)[0]
    assert outcome.verdict == FAIL and outcome.max_rel_err > 1e-6


class _ClosureRate:
    """SGD-HD whose step uses the α it was built with, not the state's (a protocol error)."""

    def __init__(self, lr, hypergrad_lr):
        self.lr, self.inner = lr, hdfunc.sgd_hd(lr, hypergrad_lr)

    def init(self, params):
        return self.inner.init(params)

    def update(self, grads, state, params):
        _, new_state = self.inner.update(grads, state, params)
        return hdfunc.tree.tree_map(lambda g: -self.lr * g, grads), new_state


# ----------------------------------------------------------------------------- report


def test_report_table_json_and_markdown(tmp_path):
    ok = judged(C.ONE_STEP, C.REVERSE, "r", "quadratic", "float64", 1e-17, 1.0, 1e-10, "t=2", "x")
    bad = judged(C.ONE_STEP, C.REVERSE, "r", "quadratic", "float64", 0.5, 2.0, 1e-10, "t=3", "x")
    assert ok.verdict == PASS and ok.max_rel_err == pytest.approx(1e-17)
    assert bad.verdict == FAIL and bad.max_rel_err == pytest.approx(0.25)
    assert "0.5 absolute, 0.25 relative" in bad.message and "t=3" in bad.message
    report = Report([ok, bad])
    rows = report.rows()
    assert len(rows) == 1 and rows[0]["verdict"] == FAIL and rows[0]["n"] == 2  # the worst one
    table = report.table()
    for column in ("check", "rule", "problem", "dtype", "max abs err", "max rel err",
                   "tolerance", "verdict"):
        assert column in table.splitlines()[0]
    report.write_json(tmp_path / "r.json")
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["passed"] is False and data["counts"] == {"PASS": 1, "FAIL": 1, "ERROR": 0, "INCONCLUSIVE": 0}
    report.write_markdown(tmp_path / "r.md")
    assert "## Failures" in (tmp_path / "r.md").read_text()
    assert not Report().passed  # an empty report is not a pass


# ----------------------------------------------------------------------------- later additions


def test_greedy_hypergradient_is_k_times_exact_for_sgd_on_a_quadratic():
    """An independent closed form for the finding: with a constant rate, plain GD on a
    quadratic has θ_K - θ* = (I - αA)^K e_0, so dL_K/dα = -K ∇f(θ_K)·∇f(θ_{K-1}) = K h_{K+1}:
    the greedy hypergradient points exactly along the exact one (cosine 1, all signs agree)
    and is K times smaller."""
    problem = make_problem("quadratic", seed=4)
    findings = C.greedy_vs_exact(builtin_spec("sgd_hd"), problem, (1, 4, 25), seeds=3)
    for f in findings:
        assert f.sign_agreement == 1.0 and f.cosine == pytest.approx(1.0, abs=1e-12)
        assert f.magnitude_ratio == pytest.approx(f.steps, rel=1e-9)
    # With momentum the powers no longer give a multiple of h: the ratio is not K.
    sgdn = C.greedy_vs_exact(builtin_spec("sgdn_hd"), problem, (25,), seeds=3)[0]
    assert abs(sgdn.magnitude_ratio - 25) > 1


def test_vmapped_one_step_check_batches_seeds_and_catches_an_error():
    spec = builtin_spec("adam_hd", granularity="tensor", mode="multiplicative")
    outcomes = C.check_one_step_vmapped(spec, make_problem("mlp"), (2, 5), seeds=6)
    assert [o.method for o in outcomes] == [C.REVERSE_VMAP, C.FORWARD_VMAP] * 2
    assert all(o.verdict == PASS and o.max_rel_err < 1e-12 for o in outcomes)
    assert all("6 seeds" in o.where for o in outcomes)
    broken = verification.user_spec(planted.adam_hd_bias_correction)
    outcomes = C.check_one_step_vmapped(broken, make_problem("quadratic"), (3,), seeds=4)
    assert all(o.verdict == FAIL and o.max_rel_err > 1e-3 for o in outcomes)
    assert "adam_hd_bias_correction" in outcomes[0].message and "quadratic" in outcomes[0].message
    assert C.grid_factors(6) == pytest.approx([1, 2 / 3, 0.5, 0.4, 1, 2 / 3])


def test_nonsmooth_rules_skip_only_the_multi_step_finite_differences():
    lion = builtin_spec("lion_hd")
    assert not lion.smooth and lion.torch_optimizer is None
    assert not builtin_spec("sgd_hd", granularity="element", mode="multiplicative").smooth
    assert builtin_spec("sgd_hd", granularity="tensor", mode="multiplicative").smooth
    case = C.make_case(lion, make_problem("quadratic"), 6)
    assert {o.method for o in C.check_one_step(case, 4)} == {C.REVERSE, C.FORWARD, C.FINITE}
    unrolled = C.check_unrolled(C.make_case(lion, make_problem("quadratic"), 2), 8)
    assert [o.method for o in unrolled] == ["reverse vs forward"]
    assert all(o.verdict == PASS for o in unrolled)


def test_run_restores_torch_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        verification.run([examples.heavy_ball_hd], quick=True, problems=["quadratic"],
                         threads=1)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_finite_difference_allowance_raises_the_reported_tolerance():
    outcome = judged(C.ONE_STEP, C.FINITE, "r", "p", "float64", 3e-10, 1.0, 1e-10, "t=2", "x",
                     allowance=5e-10)
    assert outcome.verdict == PASS and outcome.max_rel_err == pytest.approx(3e-10)
    assert outcome.tolerance == pytest.approx(6e-10) and outcome.max_rel_err <= outcome.tolerance
    outcome = judged(C.ONE_STEP, C.FINITE, "r", "p", "float64", 3e-9, 1.0, 1e-10, "t=2", "x",
                     allowance=5e-10)
    assert outcome.verdict == FAIL and "tolerance 6e-10" in outcome.message


def test_report_summary_by_check_and_markdown_sections():
    ok = judged(C.ONE_STEP, C.REVERSE, "a", "quadratic", "float64", 1e-17, 1.0, 1e-10, "t=2", "x")
    worse = judged(C.ONE_STEP, C.REVERSE, "b", "mlp", "float64", 1e-14, 1.0, 1e-10, "t=3", "x")
    report = Report([ok, worse], meta={"mode": "quick"})
    (row,) = report.check_summary()
    assert row["n"] == 2 and row["rules"] == 2 and row["max rel err"] == pytest.approx(1e-14)
    assert "b on mlp (t=3)" == row["at"] and row["verdict"] == PASS
    text = report.markdown()
    for section in ("## Summary by check", "## All checks", "<details>"):
        assert section in text
    assert "one-step identity [reverse]" in report.summary_table()
    # The JSON holds everything: the Markdown can be re-rendered from it.
    report.findings.append(verification.Finding("a", "quadratic", 5, 1.0, 0.5, 8, math.nan))
    again = Report.from_dict(json.loads(json.dumps(report.to_dict(), allow_nan=False)))
    assert again.markdown() == report.markdown() and again.rows() == report.rows()


# ----------------------------------------------------------------------------- docs/writing-a-rule.md


DOC = ROOT / "docs" / "writing-a-rule.md"


def _documented_commands(quick: bool) -> list[list[str]]:
    """The ``python -m verification ...`` commands of docs/writing-a-rule.md (continuation
    lines joined), as argument lists."""
    text = DOC.read_text().replace("\\\n", " ")
    commands = re.findall(r"^\s*python -m verification (.+)$", text, flags=re.M)
    assert commands, "no documented command"
    commands = [c for c in commands if "package.module:factory" not in c]  # the placeholder
    return [c.split() for c in commands if ("--quick" in c.split()) == quick]


@pytest.mark.parametrize("argv", _documented_commands(quick=True), ids=" ".join)
def test_documented_quick_commands_run_as_written(argv, monkeypatch, capsys):
    """Each quick command of the page, run exactly as documented (in process, from the
    repository root): the example rules pass, the planted rule fails as shown."""
    monkeypatch.chdir(ROOT)
    status = cli.main(argv + ["--no-progress"])
    out = capsys.readouterr()
    if "planted" in " ".join(argv):
        assert status == 1
        assert ("one-step identity (reverse) FAILED for rule "
                "tests.verification_planted_rules:sgd_hd_wrong_sign on problem quadratic") in out.err
        assert re.search(r"differ by [0-9.]+ absolute, 2 relative \(tolerance 1e-10\)", out.err)
    else:
        assert status == 0, out.out[-3000:] + out.err[-3000:]
        assert "verification PASSED" in out.out


@pytest.mark.slow
@pytest.mark.parametrize("argv", _documented_commands(quick=False), ids=" ".join)
def test_documented_full_commands_run_as_written(argv):
    """The full (non --quick) documented commands, as a subprocess (about 40 s each)."""
    done = subprocess.run([sys.executable, "-m", "verification", "--no-progress"] + argv,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "verification PASSED" in done.stdout


def test_documented_python_blocks_run_and_print_what_the_page_says(capsys):
    text = DOC.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 4
    namespace: dict = {"__name__": "__docs__"}
    for block in blocks:
        exec(compile(block, str(DOC), "exec"), namespace)
    printed = capsys.readouterr().out
    assert "beta 0: loss 1.90e+00, lr 0.0010" in printed and "beta 0: loss 1.90e+00" in text
    assert "beta 1e-05: loss 3.56e-03, lr 0.0152" in printed and "beta 1e-05: loss 3.56e-03" in text
    assert "True verification PASSED" in printed
    # The page's module is the shipped one: the same rules, line for line where shown.
    assert "def heavy_ball_hd(lr: float, hypergrad_lr: float) -> HeavyBallHD:" in text
    hb = namespace["heavy_ball_hd"](0.1, 0.01)
    assert type(hb).__name__ == type(examples.heavy_ball_hd(0.1, 0.01)).__name__ == "HeavyBallHD"


def test_a_wrong_previous_output_of_a_composed_direction_fails():
    """docs/writing-a-rule.md: a base direction whose ``previous_output`` is not d_{t-1}
    (here 0.9 d_{t-1}) gives HD a wrong hypergradient, and the suite says so."""
    good = examples.scale_by_adagrad_momentum()
    bad = hdfunc.Transform(good.init, good.update, "bad",
                           previous_output=lambda s: hdfunc.tree.tree_map(lambda m: 0.9 * m,
                                                                          s.momentum))

    def factory(lr, hypergrad_lr):
        return hdfunc.hd_rule(bad, lr, hypergrad_lr, name="bad_previous_output")

    report = verification.run([factory], quick=True, problems=["quadratic"])
    failed = {o.method for o in report.failures if o.check == C.ONE_STEP}
    assert {C.REVERSE, C.FORWARD, C.FINITE} <= failed
    assert all(o.max_rel_err > 1e-3 for o in report.failures if o.check == C.ONE_STEP)
    assert verification.run([examples.adagrad_momentum_hd], quick=True,
                            problems=["quadratic"]).passed


def test_a_user_rule_can_declare_itself_piecewise_smooth():
    """signSGD-HD (d_t = sign(g_t)) with ``factory.smooth = False``: every check passes and the
    multi-step checks skip their finite differences; without the flag they would run them."""
    def sign_sgd_hd(lr, hypergrad_lr):
        return hdfunc.hd_rule(hdfunc.Transform(lambda p: hdfunc.EmptyState(),
                                               lambda g, s, p: (hdfunc.tree.tree_map(torch.sign, g), s),
                                               "sign"), lr, hypergrad_lr, name="sign_sgd_hd")

    sign_sgd_hd.smooth = False
    assert not verification.user_spec(sign_sgd_hd).smooth
    report = verification.run([sign_sgd_hd], quick=True, problems=["quadratic"])
    assert report.passed, "\n".join(o.message for o in report.failures)
    multi = [o for o in report.outcomes if o.check in (C.UNROLLED, C.HYPER_BETA, C.HYPER_ALPHA0)]
    assert multi and all(o.method == "reverse vs forward" for o in multi)
    assert any(o.method == C.FINITE for o in report.outcomes if o.check == C.ONE_STEP)
    sign_sgd_hd.smooth = "no"
    with pytest.raises(TypeError, match="smooth must be True or False"):
        verification.user_spec(sign_sgd_hd)
