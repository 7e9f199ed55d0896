"""hdfunc.optim with torch's LR schedulers: param_groups[i]["lr"] holds the rate each step applied
(γ_t), a scheduler's (or the user's) write is where the next step's rate continues from, the
schedulers' semantics are torch's when HD is off, checkpoints round-trip exactly, and repr shows
the adapted rates (docs/optim.md, "Logging the rate and schedulers")."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn
from torch.optim import lr_scheduler

from hdfunc.optim import SGDHD, AdamHD
from helpers import SCHEDULER_STEPS as STEPS
from helpers import SCHEDULERS, small_tanh_regression


make_model = small_tanh_regression


def loss_of(model, x, y):
    return ((model(x) - y) ** 2).mean()



# name -> (HD class, its options, the torch optimizer it extends, the shared base options)
OPTIMIZERS = {
    "AdamHD": (AdamHD, dict(hypergrad_lr=1e-3), torch.optim.Adam, dict(lr=1e-2)),
    "SGDHD": (SGDHD, dict(hypergrad_lr=1e-2), torch.optim.SGD, dict(lr=5e-2, momentum=0.9)),
}


def scheduler_step(scheduler, loss):
    if isinstance(scheduler, lr_scheduler.ReduceLROnPlateau):
        scheduler.step(loss)
    else:
        scheduler.step()


def one_step(model, optimizer, x, y):
    optimizer.zero_grad()
    loss = loss_of(model, x, y)
    loss.backward()
    optimizer.step()
    return loss.item()


@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("sched_name", sorted(SCHEDULERS))
def test_logged_rate_is_the_applied_rate(sched_name, opt_name):
    """At every step param_groups[0]["lr"] == hd_stats()[0]["applied_lr"] (γ_t, the rate torch's
    kernel took) as a Python float; the scheduler's write (get_last_lr() == group["lr"]) is the
    rate the next step adapts from: α_(t+1) = w - β h_(t+1) exactly; and HD really moved the rate
    away from the schedule (so the equality is not the schedule's)."""
    factory, hd_options, _, base = OPTIMIZERS[opt_name]
    model, x, y = make_model()
    optimizer = factory(model.parameters(), **base, **hd_options)
    scheduler = SCHEDULERS[sched_name](optimizer)
    writes = []
    for _ in range(STEPS):
        written = optimizer.param_groups[0]["lr"]  # by the scheduler (or its construction)
        loss = one_step(model, optimizer, x, y)
        stats = optimizer.hd_stats()[0]
        logged = optimizer.param_groups[0]["lr"]
        assert type(logged) is float
        assert logged == stats["applied_lr"].item()
        assert logged == optimizer.adapted_lrs()[0].item()  # γ_t = α_t without final_lr
        expected_alpha = (torch.tensor(written, dtype=torch.float64)
                          - stats["hypergrad_lr"] * stats["hypergrad"])
        assert torch.equal(stats["lr"], expected_alpha)
        scheduler_step(scheduler, loss)
        assert scheduler.get_last_lr()[0] == optimizer.param_groups[0]["lr"]
        writes.append((logged, optimizer.param_groups[0]["lr"]))
    # HD moved the rate: at some step the applied rate differs from what was written before it
    moved = [abs(a - w) / w for (a, _), w in zip(writes[1:], [w for _, w in writes[:-1]])]
    assert max(moved) > 1e-6
    changed = sum(1 for logged, w in writes if w != logged)
    assert changed >= 2, "the scheduler changed the rate"


def reference_schedule(sched_name, base_lr, steps):
    """The lr values torch's scheduler writes on a plain torch optimizer (closed-form ones)."""
    param = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=base_lr, momentum=0.9)
    scheduler = SCHEDULERS[sched_name](optimizer)
    values = []
    for _ in range(steps):
        optimizer.step()
        scheduler.step()
        values.append(scheduler.get_last_lr()[0])
    return values


@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
def test_each_family_composes_as_documented(opt_name):
    """Chainable schedulers (StepLR, CosineAnnealingLR's recursive step, ReduceLROnPlateau,
    ExponentialLR after SequentialLR's milestone) compute from group["lr"], i.e. from γ_t: they
    scale the adapted rate. Closed-form ones (LambdaLR, OneCycleLR, SequentialLR's restart at a
    milestone) write the schedule's value: the rate is set to it."""
    factory, hd_options, _, base = OPTIMIZERS[opt_name]
    base_lr = base["lr"]
    for sched_name in SCHEDULERS:
        model, x, y = make_model()
        optimizer = factory(model.parameters(), **base, **hd_options)
        scheduler = SCHEDULERS[sched_name](optimizer)
        closed = (reference_schedule(sched_name, base_lr, STEPS)
                  if sched_name in ("LambdaLR", "OneCycleLR") else None)
        for t in range(1, STEPS + 1):
            loss = one_step(model, optimizer, x, y)
            gamma = optimizer.param_groups[0]["lr"]
            scheduler_step(scheduler, loss)
            w = optimizer.param_groups[0]["lr"]
            if sched_name == "StepLR":
                assert w == (gamma * 0.5 if t % 3 == 0 else gamma)
            elif sched_name == "CosineAnnealingLR":
                k = (1 + math.cos(math.pi * t / STEPS)) / (1 + math.cos(math.pi * (t - 1) / STEPS))
                assert w == k * (gamma - 1e-4) + 1e-4
            elif sched_name == "ReduceLROnPlateau":
                assert w in (gamma, max(gamma * 0.5, 0.0))
            elif sched_name in ("LambdaLR", "OneCycleLR"):
                assert w == closed[t - 1]
            elif sched_name == "SequentialLR":
                if t == 3:
                    assert w == base_lr  # ExponentialLR's closed form at the milestone
                elif t > 3:
                    assert w == gamma * 0.9


@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("sched_name", sorted(SCHEDULERS))
def test_zero_hypergrad_lr_is_torch_with_the_same_scheduler(sched_name, opt_name):
    """hypergrad_lr=0: parameters, group["lr"] and get_last_lr() equal torch.optim's optimizer
    under the same scheduler, bit for bit, at every step (same foreach kernel)."""
    factory, _, torch_class, base = OPTIMIZERS[opt_name]
    model, x, y = make_model()
    twin = copy.deepcopy(model)
    optimizer = factory(model.parameters(), **base, hypergrad_lr=0.0, foreach=True)
    reference = torch_class(twin.parameters(), **base, foreach=True)
    scheduler = SCHEDULERS[sched_name](optimizer)
    reference_scheduler = SCHEDULERS[sched_name](reference)
    lrs = []
    for _ in range(STEPS):
        loss = one_step(model, optimizer, x, y)
        reference_loss = one_step(twin, reference, x, y)
        assert loss == reference_loss
        assert optimizer.param_groups[0]["lr"] == reference.param_groups[0]["lr"]
        for a, b in zip(model.parameters(), twin.parameters()):
            assert torch.equal(a, b)
        scheduler_step(scheduler, loss)
        scheduler_step(reference_scheduler, reference_loss)
        assert scheduler.get_last_lr() == reference_scheduler.get_last_lr()
        assert optimizer.param_groups[0]["lr"] == reference.param_groups[0]["lr"]
        lrs.append(optimizer.param_groups[0]["lr"])
    assert len(set(lrs)) >= 2  # the schedule did change the rate


CHECKPOINTED = [("AdamHD", "OneCycleLR", {}), ("AdamHD", "ReduceLROnPlateau", {}),
                ("AdamHD", "SequentialLR", dict(final_lr=2e-3)),
                ("SGDHD", "CosineAnnealingLR", {}), ("SGDHD", "StepLR", dict(final_lr=1e-2))]


@pytest.mark.parametrize("opt_name,sched_name,extra", CHECKPOINTED,
                         ids=[f"{o}-{s}" + ("-final_lr" if e else "") for o, s, e in CHECKPOINTED])
def test_checkpoint_mid_run_continues_bit_for_bit(opt_name, sched_name, extra):
    """Model, optimizer and scheduler saved mid-run (torch.save, weights_only load) and restored
    into new objects continue with the parameters and logged rates of the uninterrupted run."""
    factory, hd_options, _, base = OPTIMIZERS[opt_name]

    def build():
        model, x, y = make_model()
        optimizer = factory(model.parameters(), **base, **hd_options, **extra)
        return model, optimizer, SCHEDULERS[sched_name](optimizer), x, y

    def run(model, optimizer, scheduler, x, y, steps):
        logged = []
        for _ in range(steps):
            loss = one_step(model, optimizer, x, y)
            logged.append(optimizer.param_groups[0]["lr"])
            scheduler_step(scheduler, loss)
            logged.append(optimizer.param_groups[0]["lr"])
        return logged

    model, optimizer, scheduler, x, y = build()
    uninterrupted = run(model, optimizer, scheduler, x, y, STEPS)
    final = [p.detach().clone() for p in model.parameters()]

    model, optimizer, scheduler, x, y = build()
    first = run(model, optimizer, scheduler, x, y, STEPS // 2)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    model, optimizer, scheduler, x, y = build()  # a fresh process would build these anew
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    assert optimizer.param_groups[0]["lr"] == first[-1]
    second = run(model, optimizer, scheduler, x, y, STEPS - STEPS // 2)
    assert first + second == uninterrupted
    for a, b in zip(model.parameters(), final):
        assert torch.equal(a, b)
    if extra:  # with α_∞ the logged γ_t differs from α_t
        assert optimizer.hd_stats()[0]["applied_lr"].item() != optimizer.adapted_lrs()[0].item()


def test_hand_written_lr_is_where_the_rate_continues_from():
    """group["lr"] = x between steps: the next step adapts from x (α = x - β h), and logs γ; a
    value left alone keeps adapting from the optimizer's own α."""
    model, x, y = make_model()
    optimizer = AdamHD(model.parameters(), lr=1e-2, hypergrad_lr=1e-3)
    for _ in range(3):
        one_step(model, optimizer, x, y)
    optimizer.param_groups[0]["lr"] = 3e-3
    one_step(model, optimizer, x, y)
    stats = optimizer.hd_stats()[0]
    assert torch.equal(stats["lr"], torch.tensor(3e-3, dtype=torch.float64)
                       - stats["hypergrad_lr"] * stats["hypergrad"])
    assert optimizer.param_groups[0]["lr"] == stats["lr"].item() != 3e-3
    alpha = stats["lr"]
    one_step(model, optimizer, x, y)
    stats = optimizer.hd_stats()[0]
    assert torch.equal(stats["lr"], alpha - stats["hypergrad_lr"] * stats["hypergrad"])


def test_final_lr_write_scales_alpha_and_alpha_infinity():
    """With final_lr, group["lr"] logs γ_t = δα_t + (1-δ)α_∞; a write w scales α and α_∞ by
    w/γ_t (scheduler_composition="scale"), so a β=0 step right after applies w (to rounding);
    "reset" sets α = w and keeps α_∞."""
    for composition in ("scale", "reset"):
        model, x, y = make_model()
        optimizer = AdamHD(model.parameters(), lr=1e-2, hypergrad_lr=1e-3, final_lr=1e-3,
                           scheduler_composition=composition)
        for _ in range(3):
            one_step(model, optimizer, x, y)
        gamma = optimizer.param_groups[0]["lr"]
        alpha = optimizer.adapted_lrs()[0].item()
        assert gamma == optimizer.hd_stats()[0]["applied_lr"].item() and gamma != alpha
        optimizer.param_groups[0]["lr"] = gamma * 0.5
        optimizer.param_groups[0]["hypergrad_lr"] = 0.0
        one_step(model, optimizer, x, y)
        if composition == "scale":
            assert optimizer.adapted_lrs()[0].item() == pytest.approx(alpha * 0.5, rel=1e-14)
            assert optimizer.param_groups[0]["final_lr"] == 1e-3  # the option is untouched
            final = optimizer.param_groups[0]["hd_state"].final_lr.item()
            assert final == pytest.approx(5e-4, rel=1e-14)
        else:
            assert optimizer.adapted_lrs()[0].item() == gamma * 0.5
            assert optimizer.param_groups[0]["hd_state"].final_lr.item() == 1e-3


def test_compiled_step_logs_the_applied_rate_without_recompiling():
    """torch.compile(optimizer.step) with OneCycleLR (a new lr every step): group["lr"] is γ_t
    at every step, no recompilation after the first steps, and the run agrees with the eager
    one (to the float32 bias corrections of the compiled Adam step)."""
    torch._dynamo.reset()
    model, x, y = make_model()
    model, x, y = model.float(), x.float(), y.float()
    twin = copy.deepcopy(model)
    options = dict(lr=1e-2, hypergrad_lr=1e-3, foreach=True)
    optimizer, reference = AdamHD(model.parameters(), **options), AdamHD(twin.parameters(),
                                                                         **options)
    scheduler = SCHEDULERS["OneCycleLR"](optimizer)
    reference_scheduler = SCHEDULERS["OneCycleLR"](reference)
    compiled_step = torch.compile(optimizer.step, backend="eager")

    moved = []

    def both(steps):
        for _ in range(steps):
            written = optimizer.param_groups[0]["lr"]
            for m, opt, step in ((model, optimizer, compiled_step), (twin, reference,
                                                                     reference.step)):
                opt.zero_grad()
                loss_of(m, x, y).backward()
                step()
            logged = optimizer.param_groups[0]["lr"]
            assert logged == optimizer.hd_stats()[0]["applied_lr"].item()
            assert logged == pytest.approx(reference.param_groups[0]["lr"], rel=1e-5)
            moved.append(abs(logged - written) / written)
            scheduler.step()
            reference_scheduler.step()

    both(3)
    with torch._dynamo.config.patch(error_on_recompile=True):
        both(STEPS - 3)
    assert max(moved) > 1e-5  # the logged rate is HD's, not OneCycleLR's value
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_repr_shows_the_adapted_rates_and_the_options():
    model, x, y = make_model()
    optimizer = AdamHD([{"params": model[0].parameters()},
                        {"params": model[2].parameters(), "lr": 2e-2}],
                       lr=1e-2, hypergrad_lr=1e-3, hypergrad_scope="group")
    before = repr(optimizer)
    assert before.startswith("AdamHD (hypergrad_scope='group', scheduler_composition='scale')")
    assert "    adapted_lr: 0.01 (no step yet: lr)" in before
    assert "    adapted_lr: 0.02 (no step yet: lr)" in before
    for _ in range(4):
        one_step(model, optimizer, x, y)
    text = repr(optimizer)
    for i, group in enumerate(optimizer.param_groups):
        stats = optimizer.hd_stats()[i]
        block = text.split(f"Parameter Group {i}\n")[1].split("Parameter Group")[0]
        assert f"    adapted_lr: {stats['lr'].item()!r} (alpha_t)\n" in block
        assert f"    applied_lr: {stats['applied_lr'].item()!r} (gamma_t" in block
        assert f"    lr: {group['lr']!r}\n" in block
        assert "    steps: 4\n" in block
        assert "    betas: (0.9, 0.999)\n" in block
        assert "    hypergrad_lr: 0.001\n" in block
        assert "    transition: inverse_square\n" in block
        assert "hd_state" not in block and "params" not in block
    alphas = [s["lr"].item() for s in optimizer.hd_stats()]
    assert alphas[0] != 1e-2 and alphas[1] != 2e-2 and alphas[0] != alphas[1]
    assert text.endswith("\n)")
