"""HDOptions: the one definition of the HD options that every front end takes and passes on."""

from __future__ import annotations

import dataclasses
import inspect
import math

import pytest
import torch

import hdfunc
from hdfunc.options import HDOptions
from helpers import make_problem, run

HD_FACTORIES = [info.factory for info in hdfunc.REGISTRY.values() if info.adapts == ("lr",)] + [
    hdfunc.hd_rule, hdfunc.hypergradient]

BAD_VALUES = [
    ("lr_granularity", "layer", ValueError, "lr_granularity must be one of"),
    ("mode", "sideways", ValueError, "mode must be one of"),
    ("final_lr", math.inf, ValueError, "final_lr must be finite"),
    ("final_lr", -0.1, ValueError, "final_lr must lie in"),
    ("transition", 0.5, TypeError, "transition must be a callable"),
    ("hyper_hypergrad_lr", math.nan, ValueError, "hyper_hypergrad_lr must lie in"),
    ("lr_bounds", (0.1, 0.01), ValueError, "lr_bounds must have low <= high"),
    ("lr_bounds", 5, TypeError, "lr_bounds must be None or a pair"),
    ("skip_nonfinite", 1, TypeError, "skip_nonfinite must be True or False"),
    ("lr_schedule", 0.5, TypeError, "lr_schedule must be None or a callable"),
]


@pytest.mark.parametrize("name, value, error, message", BAD_VALUES)
def test_a_bad_option_is_refused_where_it_is_made_and_by_every_rule(name, value, error, message):
    with pytest.raises(error, match=message):
        HDOptions(**{name: value})
    with pytest.raises(error, match=f"adam_hd: {message}"):
        hdfunc.adam_hd(1e-3, 1e-7, **{name: value})
    with pytest.raises(error, match=message):
        HDOptions().replace(**{name: value})


def test_every_field_is_checked():
    """Each option has a bad value in the table above (a new option without a check fails)."""
    assert {name for name, *_ in BAD_VALUES} == set(HDOptions.names())


def test_unknown_options_name_the_closest_valid_one():
    with pytest.raises(TypeError, match="unknown HD option 'modee' \\(did you mean 'mode'\\?\\)"):
        HDOptions.of(modee="multiplicative")
    with pytest.raises(TypeError, match="sgd_hd: unknown option 'modee' \\(did you mean 'mode'"):
        hdfunc.sgd_hd(0.1, 0.01, modee="multiplicative")
    with pytest.raises(TypeError, match="options must be an hdfunc.HDOptions"):
        HDOptions.of({"mode": "multiplicative"})


def test_derived_views_and_normalised_bounds():
    options = HDOptions(lr_bounds=(0, None), final_lr=0.01, hyper_hypergrad_lr=1e-3)
    assert options.lr_bounds == (0.0, None) and isinstance(options.lr_bounds[0], float)
    assert (options.lr_low, options.lr_high) == (0.0, None)
    assert options.has_final_lr and options.higher_order
    assert not HDOptions().has_final_lr and not HDOptions().higher_order
    assert hdfunc.HD_OPTIONS == HDOptions.names() and hdfunc.HDConfig is HDOptions


@pytest.mark.parametrize("factory", HD_FACTORIES, ids=lambda f: f.__name__)
def test_help_of_every_hd_rule_lists_every_option(factory):
    doc = inspect.getdoc(factory)
    assert "Keyword Args:" in doc
    for name in HDOptions.names():
        assert f"\n    {name}: " in doc, (factory.__name__, name)


def test_an_options_value_and_keywords_build_the_same_rule():
    """options=HDOptions(...) and the same keywords give the same law and the same trajectory;
    keywords override the value's fields."""
    params, loss = make_problem()
    options = HDOptions(mode="multiplicative", lr_granularity="tensor", final_lr=0.005)
    by_value = hdfunc.sgdn_hd(0.01, 0.02, options=options)
    by_keywords = hdfunc.sgdn_hd(0.01, 0.02, mode="multiplicative", lr_granularity="tensor",
                                 final_lr=0.005)
    assert by_value.rate_law == by_keywords.rate_law == options
    for (p1, s1), (p2, s2) in zip(run(by_value, params, loss, 6), run(by_keywords, params, loss, 6)):
        for a, b in zip(hdfunc.tree.tree_leaves((p1, s1)), hdfunc.tree.tree_leaves((p2, s2))):
            assert torch.equal(a, b)
    overridden = hdfunc.sgdn_hd(0.01, 0.02, options=options, mode="additive")
    assert overridden.rate_law == dataclasses.replace(options, mode="additive")
    # and the law differs from the default one (the options were not ignored)
    assert by_value.rate_law != hdfunc.sgdn_hd(0.01, 0.02).rate_law


def test_optimizer_classes_take_the_same_options():
    """The classes take the HD options as keywords (validated by HDOptions), refuse the two
    they do without, and list them in help()."""
    from hdfunc.optim import SGDHD, AdamHD

    params = [torch.nn.Parameter(torch.zeros(3))]
    optimizer = AdamHD(params, mode="multiplicative", lr_bounds=(0, 1))
    group = optimizer.param_groups[0]
    assert group["mode"] == "multiplicative" and group["lr_bounds"] == (0.0, 1.0)
    assert group["final_lr"] is None and group["skip_nonfinite"] is True  # HDOptions' defaults
    with pytest.raises(TypeError, match="unknown HD option 'modee' \\(did you mean 'mode'\\?\\)"):
        SGDHD(params, modee="multiplicative")
    with pytest.raises(TypeError, match="does not take lr_granularity"):
        SGDHD(params, lr_granularity="tensor")
    with pytest.raises(ValueError, match="mode must be one of"):
        AdamHD(params, mode="sideways")
    for cls in (SGDHD, AdamHD):
        doc = inspect.getdoc(cls)
        assert "\n    mode: " in doc and "\n    lr_bounds: " in doc and "lr_granularity:" not in doc
