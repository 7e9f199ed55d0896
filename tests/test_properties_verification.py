"""Property tests: the verification suite's checks over random problems and rules.

Random quadratics (random pytree layouts and dimensions, condition numbers up to 1e4), every
base direction, granularity and mode, α_0 over four decades, β including 0, float64 and
float32, random step counts and randomly perturbed optimizer states. Profiles: see
tests/hypothesis_profiles.py (HYPOTHESIS_PROFILE=ci|dev).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from hdfunc.tree import tree_map
from hypothesis_profiles import PROFILE
from verification import checks as C
from verification.catalog import BASES, Calibration, builtin_spec, calibrate
from verification.problems import quadratic

FAMILIES = sorted(BASES)

shapes = st.lists(st.integers(1, 4), min_size=0, max_size=2).map(tuple)
layouts = st.recursive(
    shapes,
    lambda children: st.one_of(
        st.dictionaries(st.sampled_from("abcd"), children, min_size=1, max_size=3),
        st.lists(children, min_size=1, max_size=3)),
    max_leaves=4)


@st.composite
def problems(draw, dtypes=(torch.float64,)):
    layout = draw(layouts)
    dtype = draw(st.sampled_from(dtypes))
    condition = 10 ** draw(st.floats(0, 4))
    seed = draw(st.integers(0, 2 ** 16))
    return quadratic(seed, dtype, structure=layout, condition=condition)


@st.composite
def rules(draw, higher_order: bool = False):
    spec = builtin_spec(draw(st.sampled_from(FAMILIES)),
                        granularity=draw(st.sampled_from(("global", "tensor", "element"))),
                        mode=draw(st.sampled_from(("additive", "multiplicative"))),
                        transition=draw(st.booleans()), higher_order=higher_order)
    lr_factor = 10 ** draw(st.floats(-3, 0.3))  # α_0 over several decades (× the safe 0.5/L)
    beta_factor = draw(st.sampled_from([0.0, 0.01, 0.1, 1.0]))
    return spec, lr_factor, beta_factor


def build_case(spec, problem, lr_factor, beta_factor, steps, seed=0):
    base = calibrate(spec, problem)
    calibration = Calibration(base.lr * lr_factor, base.hypergrad_lr * beta_factor, base.step_scale)
    rule = spec.build(calibration)
    hist = C.run_trajectory(rule, problem.loss, problem.params, steps)
    return C.Case(spec, problem, calibration, rule, hist, seed)


def assert_all_pass(outcomes):
    assert outcomes
    failures = [o.message for o in outcomes if o.failed]
    assert not failures, "\n".join(failures)



pytestmark = pytest.mark.usefixtures("one_torch_thread")

@PROFILE
@given(problems(dtypes=(torch.float64, torch.float32)), rules(), st.integers(2, 8))
def test_one_step_identity_holds_on_random_problems(problem, rule, t):
    spec, lr_factor, beta_factor = rule
    case = build_case(spec, problem, lr_factor, beta_factor, steps=t)
    methods = (C.REVERSE, C.FORWARD) + ((C.FINITE,) if problem.dtype == torch.float64 else ())
    assert_all_pass(C.check_one_step(case, t, methods=methods))


@PROFILE
@given(problems(), rules(higher_order=True), st.integers(3, 6))
def test_hyper_hypergradient_is_exact_on_random_problems(problem, rule, t):
    spec, lr_factor, _ = rule
    case = build_case(spec, problem, lr_factor, 1.0, steps=t)
    assert_all_pass(C.check_hyper_analytic(case, t))


@PROFILE
@given(problems(), rules(), st.integers(2, 6), st.integers(0, 2 ** 16))
def test_one_step_identity_from_random_optimizer_states(problem, rule, t, seed):
    """Perturb every float buffer of a mid-trajectory state by a random positive factor (so
    second moments stay positive), then check h of the next two steps taken from it."""
    spec, lr_factor, beta_factor = rule
    case = build_case(spec, problem, lr_factor, beta_factor, steps=t)
    gen = torch.Generator().manual_seed(seed)
    params, state = case.hist[t - 2]

    def jitter(x):
        if not x.is_floating_point():
            return x
        factor = 1 + 0.5 * torch.rand(x.shape, generator=gen, dtype=torch.float64)
        return x * factor.to(x)

    state = tree_map(jitter, state)
    hist = C.run_trajectory(case.rule, problem.loss, params, 2, state=state)
    perturbed = C.Case(spec, problem, case.calibration, case.rule, hist, seed)
    assert_all_pass(C.check_one_step(perturbed, 2, methods=(C.REVERSE, C.FORWARD)))


@PROFILE
@given(problems(), st.sampled_from(FAMILIES), st.sampled_from(("global", "tensor", "element")),
       st.integers(1, 12))
def test_unrolled_reverse_and_forward_agree(problem, family, granularity, steps):
    spec = builtin_spec(family, granularity=granularity)
    case = build_case(spec, problem, 1.0, 1.0, steps=2)
    outcomes = [o for o in C.check_unrolled(case, steps) if o.method == "reverse vs forward"]
    assert_all_pass(outcomes)


@PROFILE
@given(problems(dtypes=(torch.float64, torch.float32)), st.sampled_from(FAMILIES),
       st.sampled_from(("additive", "multiplicative")), st.integers(1, 10))
def test_zero_hypergrad_lr_is_the_base_rule(problem, family, mode, steps):
    spec = builtin_spec(family, granularity="element", mode=mode)
    assert_all_pass(C.check_beta_zero(spec, problem, steps))


@PROFILE
@given(problems(), st.sampled_from(FAMILIES), st.integers(1, 6))
def test_vmap_over_seeds_equals_loop(problem, family, steps):
    assert_all_pass(C.check_vmap(builtin_spec(family, granularity="tensor"), problem, steps, 2))


def test_profiles_are_registered():
    from hypothesis import settings
    assert settings.get_profile("ci").derandomize
    assert settings.get_profile("ci").max_examples <= 30
    assert settings.get_profile("dev").max_examples > settings.get_profile("ci").max_examples
    assert math.isfinite(PROFILE.max_examples)


@PROFILE
@given(problems(), st.sampled_from(["sgd_hd_wrong_sign", "sgd_hd_stale_gradient",
                                    "adam_hd_grad_dot_grad", "adam_hd_bias_correction"]),
       st.integers(3, 6))
def test_planted_errors_fail_on_random_problems(problem, bug, t):
    """The suite is not blind on some problems: every planted error fails the one-step
    identity on every random quadratic, at every step, by a relative error of order one."""
    import verification_planted_rules as planted
    from verification.catalog import user_spec

    spec = user_spec(getattr(planted, bug))
    case = C.make_case(spec, problem, t)
    outcomes = C.check_one_step(case, t, methods=(C.REVERSE, C.FORWARD))
    assert outcomes and all(o.failed and o.max_rel_err > 1e-3 for o in outcomes), [
        (o.method, o.max_rel_err) for o in outcomes]
    assert all(bug in o.message and "quadratic" in o.message for o in outcomes)
