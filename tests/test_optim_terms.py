"""hdfunc.optim.terms: the hypergradient terms of the optimizer classes, called directly.

* Against the functional core (float64): after a few steps of a functional rule (sgd_hd, sgdn_hd,
  adam_hd, adamw_hd; with and without coupled weight decay; ``maximize`` as the rule on negated
  gradients), the term function's g_t·d_{t-1} is -h_t of the rule's next step, and ‖g_t‖²,
  ‖d_{t-1}‖² are the norms of the multiplicative rule (Eqs. 7-8) at that step.
* The streamed CPU variants against the plain ones, for scratch buffers of a few elements (every
  tensor split, small tensors packed together), of an exact multiple of the tensor sizes, and
  larger than all params; mixed step counts per tensor; float16/bfloat16/float32/float64 tensors
  (alone and mixed in one group); empty groups.
"""

from __future__ import annotations

import math

import pytest
import torch

import hdfunc
from hdfunc.directions import AdamState
from hdfunc.optim import terms

BETAS, EPS = (0.9, 0.999), 1e-8
SHAPES = [(3,), (16,), (4, 8), (7,), (2, 5), (1,)]  # 16 and 32 elements: multiples of 16
STEPS = 4  # functional steps before the one compared


def random_tensors(shapes, seed, dtype=torch.float64, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return [(scale * torch.randn(shape, generator=gen, dtype=torch.float64)).to(dtype)
            for shape in shapes]


# ============================================================================ against the core


def functional_step(rule, sign, seed):
    """Runs ``rule`` STEPS steps on random params and gradients, then draws g_t: returns
    (θ_{t-1}, the optimizer's gradient g_t, the HD node of the state after step t-1, that of the
    state after step t, the rule's state after step t-1). With ``sign`` = -1 the rule sees -g
    (an optimizer with maximize=True sees g)."""
    params = random_tensors(SHAPES, seed)
    state = rule.init(params)
    for k in range(STEPS):
        grads = random_tensors(SHAPES, seed + 100 + k)
        updates, state = rule.update([sign * g for g in grads], state, params)
        params = hdfunc.apply_updates(params, updates)
    grads = random_tensors(SHAPES, seed + 999)
    _, after = rule.update([sign * g for g in grads], state, params)
    return params, grads, hdfunc.find_lr_state(state), hdfunc.find_lr_state(after), state


def find_adam_state(tree):
    if isinstance(tree, AdamState):
        return tree
    if isinstance(tree, (tuple, list)):
        for item in tree:
            found = find_adam_state(item)
            if found is not None:
                return found
    return None


def norm_sq(tensors):
    return sum((t.double() ** 2).sum() for t in tensors)


RULES = {  # name -> (rule factory, weight_decay, decoupled)
    "sgd_hd": (hdfunc.sgd_hd, 0.0, False),
    "sgd_hd_l2": (hdfunc.sgd_hd, 0.05, False),
    "sgdn_hd": (lambda lr, beta, wd, **o: hdfunc.sgdn_hd(lr, beta, 0.9, wd, **o), 0.0, False),
    "sgdn_hd_l2": (lambda lr, beta, wd, **o: hdfunc.sgdn_hd(lr, beta, 0.9, wd, **o), 0.05, False),
    "adam_hd": (lambda lr, beta, wd, **o: hdfunc.adam_hd(lr, beta, BETAS, EPS, wd, **o), 0.0,
                False),
    "adam_hd_l2": (lambda lr, beta, wd, **o: hdfunc.adam_hd(lr, beta, BETAS, EPS, wd, **o), 0.05,
                   False),
    "adamw_hd": (lambda lr, beta, wd, **o: hdfunc.adamw_hd(lr, beta, BETAS, EPS, wd, **o), 0.1,
                 True),
}


def optimizer_terms(name, params, grads, node, rule_state, maximize, want_sq, variant):
    """The optimizer's terms at step t from the functional state after step t-1, through the
    term function of ``variant`` ("plain" or "streamed")."""
    _, weight_decay, decoupled = RULES[name]
    like = torch.zeros((), dtype=torch.float64)
    if name.startswith("sgd"):
        directions = [d.clone() for d in hdfunc.tree.tree_leaves(node.direction)]
        if variant == "streamed":
            return terms.sgd_terms_streamed(grads, directions, want_sq=want_sq, like=like,
                                            scratch_bytes=7 * 8)
        return terms.sgd_terms(params, grads, directions, weight_decay=weight_decay,
                               maximize=maximize, want_sq=want_sq, like=like)
    adam = find_adam_state(node.base)
    steps = [torch.tensor(float(adam.count)) for _ in params]
    function = terms.adam_terms if variant == "plain" else terms.adam_terms_streamed
    extra = {} if variant == "plain" else dict(scratch_bytes=7 * 8)
    return function(params, grads, list(adam.mu), list(adam.nu), steps, betas=BETAS, eps=EPS,
                    weight_decay=weight_decay, decoupled_weight_decay=decoupled,
                    maximize=maximize, applied_lr=node.applied_lr, want_sq=want_sq, like=like,
                    **extra)


# the streamed SGD terms take g = ∇f (no coupled decay, no maximize: the class dispatches those
# to the plain variant)
CORE_CASES = [(name, maximize, variant) for name in RULES for maximize in (False, True)
              for variant in ("plain", "streamed")
              if variant == "plain" or not name.startswith("sgd")
              or not (maximize or RULES[name][1])]


def previous_direction(name, node):
    """d_{t-1} as the functional rule holds it: stored, or recomputed from Adam's moments."""
    stored = hdfunc.tree.tree_leaves(node.direction)
    if stored:
        return stored
    return hdfunc.scale_by_adam(*BETAS, EPS).previous_output(find_adam_state(node.base))


@pytest.mark.parametrize("name,maximize,variant", CORE_CASES)
def test_dot_is_minus_the_hypergradient_of_the_functional_rule(name, maximize, variant):
    """g_t·d_{t-1} = -h_t of the functional rule, in float64 to 1e-12 (relative to ‖g‖‖d‖: the
    two sum the same products in another order; AdamW's d_{t-1} is recomputed from θ_{t-1} and
    γ_{t-1} where the rule stored it, which costs a few ulps more)."""
    factory, weight_decay, _ = RULES[name]
    rule = factory(1e-2, 1e-3, weight_decay)
    params, grads, node, after, state = functional_step(rule, -1.0 if maximize else 1.0, seed=3)
    assert int(node.count) == STEPS
    out = optimizer_terms(name, params, grads, node, state, maximize, True, variant)
    scale = math.sqrt(float(out.grad_sq) * float(out.direction_sq))
    assert scale > 0
    assert abs(float(out.dot) + float(after.hypergrad)) <= 1e-12 * scale
    assert out.dot.dtype == torch.float64


@pytest.mark.parametrize("name,maximize,variant", CORE_CASES)
def test_norms_are_those_of_the_multiplicative_rule(name, maximize, variant):
    """‖g_t‖² and ‖d_{t-1}‖² are the norms the multiplicative rule normalises by: each against
    g_t (after maximize and the L2 term) and the rule's d_{t-1}, and their product against the
    one the rule's step implies, ‖g‖‖d‖ = β h_t α_{t-1} / (α_{t-1} - α_t) (β is large enough
    that α moves by ~1%, so the cancellation costs about two digits: 1e-10)."""
    factory, weight_decay, _ = RULES[name]
    rule = factory(1e-2, 0.05, weight_decay, mode="multiplicative")
    sign = -1.0 if maximize else 1.0
    params, grads, node, after, state = functional_step(rule, sign, seed=5)
    out = optimizer_terms(name, params, grads, node, state, maximize, True, variant)
    decay = 0.0 if RULES[name][2] else weight_decay
    g_eff = [sign * g + decay * p for g, p in zip(grads, params)]
    torch.testing.assert_close(out.grad_sq, norm_sq(g_eff), rtol=1e-13, atol=0)
    torch.testing.assert_close(out.direction_sq, norm_sq(previous_direction(name, node)),
                               rtol=1e-12, atol=0)
    alpha0, alpha1 = float(node.lr), float(after.lr)
    assert abs(alpha1 - alpha0) > 1e-4 * alpha0
    implied = 0.05 * float(after.hypergrad) * alpha0 / (alpha0 - alpha1)
    assert implied == pytest.approx(math.sqrt(float(out.grad_sq) * float(out.direction_sq)),
                                    rel=1e-10)


def test_sgd_terms_store_the_gradient_as_the_next_direction():
    """``update_directions``: each direction becomes g_t (after maximize and the L2 term), in
    both variants; without it the directions are left alone (the functions are pure)."""
    params, grads = random_tensors(SHAPES, 1), random_tensors(SHAPES, 2)
    directions = random_tensors(SHAPES, 3)
    like = torch.zeros((), dtype=torch.float64)
    kept = [d.clone() for d in directions]
    terms.sgd_terms(params, grads, kept, weight_decay=0.1, maximize=True, want_sq=True,
                    like=like)
    assert all(torch.equal(a, b) for a, b in zip(kept, directions))
    stored = [d.clone() for d in directions]
    terms.sgd_terms(params, grads, stored, weight_decay=0.1, maximize=True, want_sq=False,
                    like=like, update_directions=True)
    assert all(torch.equal(d, (-g).add(p, alpha=0.1)) for d, g, p in zip(stored, grads, params))
    streamed = [d.clone() for d in directions]
    terms.sgd_terms_streamed(grads, streamed, want_sq=False, like=like, scratch_bytes=56,
                             update_directions=True)
    assert all(torch.equal(d, g) for d, g in zip(streamed, grads))


# ============================================================================ streamed == plain

# Scratch sizes in bytes. The work dtype is float64 for float64 tensors and float32 otherwise,
# so each size is a number of elements of one or the other: 7 float64 (14 float32) elements,
# 7 float32 (3 float64), 16 float32 or float64 elements (the tensors have 1 to 32 elements: 16
# and 32 are exact multiples), and 1 MiB (more than all params: one batch).
SCRATCH = {"7_float64": 56, "7_float32": 28, "16_float32": 64, "16_float64": 128,
           "1MiB": terms.SCRATCH_BYTES}
DTYPES = {"float64": [torch.float64], "float32": [torch.float32], "float16": [torch.float16],
          "bfloat16": [torch.bfloat16],
          "mixed": [torch.float64, torch.float32, torch.float16, torch.bfloat16]}
# Tolerance: the two variants sum the same products g_i d_i in another order (per tensor, or per
# batch of pieces), accumulating in the work dtype, so they differ by rounding: ~n u Σ|g_i d_i|
# <= n u ‖g‖‖d‖ (Cauchy-Schwarz) for n <= 32 elements per dot product, with u the unit roundoff
# of the work dtype; float32 also rounds d_{t-1} itself (ε c2 as a float32 scalar) and the
# float16/bfloat16 values are converted first. Hence 1e-13 relative for float64 tensors and 2e-5
# for float32 work (n u = 32 · 6e-8 = 2e-6, with a margin), relative to ‖g‖‖d‖ for the dot and
# to themselves for the sums of squares (no cancellation there).
TOLERANCE = {torch.float64: 1e-13, torch.float32: 2e-5}


def tolerance(dtypes):
    return TOLERANCE[torch.float32] if set(dtypes) - {torch.float64} else TOLERANCE[torch.float64]


def group_tensors(dtypes, seed, steps=None):
    """params, grads, m, v and step counts of a group of SHAPES tensors, cycling ``dtypes``; v is
    positive with some exact zeros (a v stored as 0 in low precision is clamped)."""
    kinds = [dtypes[i % len(dtypes)] for i in range(len(SHAPES))]

    def make(offset, scale=1.0):
        return [t.to(k) for t, k in zip(random_tensors(SHAPES, seed + offset, scale=scale),
                                        kinds)]

    params, grads, m = make(0), make(1), make(2, 0.1)
    v = [(t.double() ** 2 * 0.01).to(k) for t, k in zip(random_tensors(SHAPES, seed + 3), kinds)]
    for t in v:
        t.view(-1)[::5] = 0
    steps = steps or [3, 0, 10, 1, 3, 7]
    return params, grads, m, v, [torch.tensor(float(s)) for s in steps]


def assert_terms_close(streamed, plain, rtol):
    scale = math.sqrt(float(plain.grad_sq) * float(plain.direction_sq))
    assert abs(float(streamed.dot) - float(plain.dot)) <= rtol * scale, (streamed, plain)
    torch.testing.assert_close(streamed.grad_sq, plain.grad_sq, rtol=rtol, atol=0)
    torch.testing.assert_close(streamed.direction_sq, plain.direction_sq, rtol=rtol, atol=0)


ADAM_VARIANTS = {"plain": dict(weight_decay=0.0, decoupled_weight_decay=False, maximize=False),
                 "l2_maximize": dict(weight_decay=0.05, decoupled_weight_decay=False,
                                     maximize=True),
                 "decoupled": dict(weight_decay=0.1, decoupled_weight_decay=True, maximize=False),
                 "decoupled_off": dict(weight_decay=0.0, decoupled_weight_decay=True,
                                       maximize=True)}


@pytest.mark.parametrize("variant", list(ADAM_VARIANTS))
@pytest.mark.parametrize("dtypes", list(DTYPES))
@pytest.mark.parametrize("scratch", list(SCRATCH))
def test_adam_streamed_equals_plain(scratch, dtypes, variant):
    """Mixed step counts (0: d_0 = 0; 1, 3, 7, 10: each tensor its own bias corrections)."""
    params, grads, m, v, steps = group_tensors(DTYPES[dtypes], seed=11)
    options = dict(betas=BETAS, eps=EPS, applied_lr=torch.tensor(0.02, dtype=torch.float64),
                   like=torch.zeros((), dtype=torch.float64), **ADAM_VARIANTS[variant])
    for want_sq in (True, False):
        plain = terms.adam_terms(params, grads, m, v, steps, want_sq=want_sq, **options)
        streamed = terms.adam_terms_streamed(params, grads, m, v, steps, want_sq=want_sq,
                                             scratch_bytes=SCRATCH[scratch], **options)
        if want_sq:
            assert float(plain.dot) != 0 and float(plain.direction_sq) > 0
            assert_terms_close(streamed, plain, tolerance(DTYPES[dtypes]))
        else:
            assert float(streamed.grad_sq) == float(streamed.direction_sq) == 0
            assert float(plain.grad_sq) == float(plain.direction_sq) == 0


@pytest.mark.parametrize("dtypes", list(DTYPES))
@pytest.mark.parametrize("scratch", list(SCRATCH))
def test_sgd_streamed_equals_plain(scratch, dtypes):
    params, grads, directions, _, _ = group_tensors(DTYPES[dtypes], seed=21)
    like = torch.zeros((), dtype=torch.float64)
    plain = terms.sgd_terms(params, grads, [d.clone() for d in directions], weight_decay=0.0,
                            maximize=False, want_sq=True, like=like)
    streamed = terms.sgd_terms_streamed(grads, [d.clone() for d in directions], want_sq=True,
                                        like=like, scratch_bytes=SCRATCH[scratch])
    assert_terms_close(streamed, plain, tolerance(DTYPES[dtypes]))


def test_all_steps_zero_and_empty_groups_give_zero_terms():
    """A group without tensors (ZeroRedundancyOptimizer's partition can leave one empty) or whose
    tensors have not stepped yet (d_0 = 0) contributes 0, in ``like``'s dtype."""
    like = torch.zeros((), dtype=torch.float32)
    options = dict(betas=BETAS, eps=EPS, weight_decay=0.1, decoupled_weight_decay=True,
                   maximize=False, applied_lr=torch.tensor(1e-3), want_sq=True, like=like)
    for function in (terms.adam_terms, terms.adam_terms_streamed):
        out = function([], [], [], [], [], **options)
        assert all(float(x) == 0 and x.dtype == torch.float32 for x in out)
    params, grads, m, v, steps = group_tensors([torch.float32], seed=31, steps=[0] * 6)
    for function in (terms.adam_terms, terms.adam_terms_streamed):
        out = function(params, grads, m, v, steps, **options)
        assert float(out.dot) == float(out.direction_sq) == 0 and float(out.grad_sq) > 0
    out = terms.sgd_terms([], [], [], weight_decay=0.0, maximize=False, want_sq=True, like=like)
    assert all(float(x) == 0 and x.dtype == torch.float32 for x in out)
    out = terms.sgd_terms_streamed([], [], want_sq=True, like=like)
    assert all(float(x) == 0 and x.dtype == torch.float32 for x in out)


def test_batches_cover_every_element_once_within_the_capacity():
    sizes = [3, 16, 32, 7, 10, 1, 0, 40]
    for capacity in (1, 2, 7, 8, 16, 64, 1000):
        seen = {j: [] for j in range(len(sizes))}
        for batch in terms.batches(sizes, capacity):
            assert sum(b - a for _, a, b in batch) <= capacity  # (0 for a 0-element tensor)
            for j, a, b in batch:
                seen[j].append((a, b))
        for j, size in enumerate(sizes):
            covered = sorted(seen[j])
            assert sum(b - a for a, b in covered) == size
            assert all(x[1] == y[0] for x, y in zip(covered, covered[1:]))


def test_streamed_terms_reuse_the_given_scratch_buffers():
    params, grads, m, v, steps = group_tensors([torch.float64], seed=41)
    buffers = {}
    options = dict(betas=BETAS, eps=EPS, weight_decay=0.0, decoupled_weight_decay=False,
                   maximize=False, applied_lr=torch.tensor(1e-3, dtype=torch.float64),
                   want_sq=False, like=torch.zeros((), dtype=torch.float64), scratch_bytes=64)
    first = terms.adam_terms_streamed(params, grads, m, v, steps, buffers=buffers, **options)
    pair = buffers[(torch.device("cpu"), torch.float64)]
    assert pair[0].numel() == 8  # 64 bytes of float64
    again = terms.adam_terms_streamed(params, grads, m, v, steps, buffers=buffers, **options)
    assert buffers[(torch.device("cpu"), torch.float64)] is pair
    assert torch.equal(first.dot, again.dot)
