"""``lr_as_tensor`` (issue 10): a step leaves γ_t in ``param_groups[i]["lr"]`` as a new 0-d tensor
on the rates' device instead of a Python float, so that CUDA training makes no host sync per step
(the default off the CPU). Loggers and torch's LR schedulers still read and write ``lr``; the
schedulers fill a tensor ``lr`` in place, which the optimizer tells from its own value by the
tensor's version counter. Checked on the CPU with ``lr_as_tensor=True`` against the float path
(the default on the CPU), which must give the same run bit for bit."""

from __future__ import annotations

import copy
import io
from contextlib import contextmanager

import pytest
import torch
from torch.optim import lr_scheduler

from hdfunc.optim import SGDHD, AdamHD, AdamWHD
from helpers import SCHEDULER_STEPS as STEPS
from helpers import SCHEDULERS
from helpers import small_tanh_regression as make_model

OPTIMIZERS = {
    "AdamHD": (AdamHD, dict(lr=1e-2, hypergrad_lr=1e-3)),
    "AdamWHD_final_lr": (AdamWHD, dict(lr=1e-2, hypergrad_lr=1e-3, final_lr=5e-3)),
    "SGDHD": (SGDHD, dict(lr=5e-2, hypergrad_lr=1e-2, momentum=0.9)),
}




def one_step(model, optimizer, x, y) -> float:
    optimizer.zero_grad()
    loss = ((model(x) - y) ** 2).mean()
    loss.backward()
    optimizer.step()
    return loss.item()


def scheduler_step(scheduler, loss):
    if isinstance(scheduler, lr_scheduler.ReduceLROnPlateau):
        scheduler.step(loss)
    else:
        scheduler.step()


def test_lr_holds_a_new_tensor_equal_to_the_applied_rate():
    model, x, y = make_model()
    optimizer = AdamHD(model.parameters(), lr=1e-2, hypergrad_lr=1e-3, lr_as_tensor=True)
    seen = []
    for _ in range(3):
        one_step(model, optimizer, x, y)
        lr = optimizer.param_groups[0]["lr"]
        state = optimizer.param_groups[0]["hd_state"]
        assert isinstance(lr, torch.Tensor) and lr.shape == () and lr.dtype == torch.float64
        assert torch.equal(lr, state.applied_lr) and lr is not state.applied_lr
        assert lr._version == 0 and all(lr is not other for other in seen)
        seen.append(lr)
    assert float(seen[0]) != float(seen[-1])  # γ moved
    float_default = AdamHD(make_model()[0].parameters(), lr=1e-2)
    assert float_default.lr_as_tensor is None
    one_step(model, float_default, x, y)
    assert type(float_default.param_groups[0]["lr"]) is float  # the CPU default: a float


HOST_READS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__")


@contextmanager
def counted_host_reads():
    """Counts the Tensor methods that copy a value to the host (a sync off the CPU)."""
    counts = {name: 0 for name in HOST_READS}
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def counting(name):
        def method(self, *args, **kwargs):
            counts[name] += 1
            return originals[name](self, *args, **kwargs)
        return method

    for name in HOST_READS:
        setattr(torch.Tensor, name, counting(name))
    try:
        yield counts
    finally:
        for name, method in originals.items():
            setattr(torch.Tensor, name, method)


@pytest.mark.parametrize("cls", [SGDHD, AdamHD])
def test_reporting_and_scheduler_composition_read_nothing_to_the_host(cls):
    """The two per-step pieces of the mechanism, with OneCycleLR writing lr every step: taking
    the scheduler's write into the rate state and leaving γ_t in lr read no tensor value to the
    host with lr_as_tensor=True (the float path reads one per step: the test can fail), and a
    whole step calls no ``tolist``/``item`` (its other CPU-only reads, e.g. the step counters of
    the streamed Adam pass, are not reads off the CPU)."""
    counts_by_mode = {}
    for as_tensor in (True, False):
        model, x, y = make_model()
        optimizer = cls(model.parameters(), lr=1e-2, hypergrad_lr=1e-3, fused=True,
                        lr_as_tensor=as_tensor)
        scheduler = SCHEDULERS["OneCycleLR"](optimizer)
        one_step(model, optimizer, x, y)
        scheduler.step()
        group = optimizer.param_groups[0]
        options = optimizer._check_group(group, where="param_groups[0]", tensor_lr=as_tensor)
        with counted_host_reads() as counts:
            state = optimizer._rate_state(group, options)
            optimizer._report_applied_rates([state], state.lr.dtype)
        counts_by_mode[as_tensor] = sum(counts.values())
        scheduler.step()
        optimizer.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        with counted_host_reads() as step_counts:
            optimizer.step()
        if as_tensor:
            assert step_counts["tolist"] == 0 and step_counts["item"] == 0
    assert counts_by_mode[True] == 0
    assert counts_by_mode[False] > 0


@pytest.mark.parametrize("composition", ["scale", "reset"])
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("sched_name", list(SCHEDULERS))
def test_schedulers_compose_as_with_float_lr(sched_name, opt_name, composition):
    """Each scheduler family writes the tensor lr in place; the run (params, α, the logged
    rate at every step) is the float path's bit for bit."""
    cls, kwargs = OPTIMIZERS[opt_name]
    runs = []
    for as_tensor in (True, False):
        model, x, y = make_model()
        optimizer = cls(model.parameters(), **kwargs, scheduler_composition=composition,
                        lr_as_tensor=as_tensor)
        scheduler = SCHEDULERS[sched_name](optimizer)
        logged = []
        for _ in range(STEPS):
            loss = one_step(model, optimizer, x, y)
            logged.append(float(optimizer.param_groups[0]["lr"]))
            scheduler_step(scheduler, loss)
            logged.append(float(optimizer.param_groups[0]["lr"]))
        runs.append((model, optimizer, logged))
    (model, optimizer, logged), (twin, reference, reference_logged) = runs
    assert logged == reference_logged
    assert len(set(logged)) > 2
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(optimizer.adapted_lrs()[0], reference.adapted_lrs()[0])


def test_a_missed_scheduler_write_would_be_caught():
    """The comparison above can fail: an optimizer that ignores in-place writes to its tensor lr
    (an identity check without the version counter) misses StepLR's halving."""

    class IdentityOnly(AdamHD):
        @staticmethod
        def _lr_is_own(value, scheduled):
            return value is scheduled.scheduled_lr

    logged = {}
    for cls, as_tensor in ((IdentityOnly, True), (AdamHD, False)):
        model, x, y = make_model()
        optimizer = cls(model.parameters(), lr=1e-2, hypergrad_lr=1e-3, lr_as_tensor=as_tensor)
        scheduler = SCHEDULERS["StepLR"](optimizer)
        for _ in range(STEPS):
            one_step(model, optimizer, x, y)
            scheduler.step()
        logged[cls] = float(optimizer.adapted_lrs()[0])
    assert logged[IdentityOnly] != pytest.approx(logged[AdamHD], rel=0.1)


@pytest.mark.parametrize("after_scheduler", [False, True])
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_checkpoint_round_trips_into_tensor_and_float_optimizers(opt_name, after_scheduler):
    """Saved mid-run (right after a step, or after the scheduler filled lr in place), through
    torch.save/torch.load(weights_only=True), loaded into an optimizer with lr_as_tensor=True
    or False: the rest of the run is the uninterrupted run's bit for bit."""
    cls, kwargs = OPTIMIZERS[opt_name]
    model, x, y = make_model()
    optimizer = cls(model.parameters(), **kwargs, lr_as_tensor=True)
    scheduler = SCHEDULERS["StepLR"](optimizer)
    for _ in range(4):
        one_step(model, optimizer, x, y)
        scheduler.step()
    if not after_scheduler:
        one_step(model, optimizer, x, y)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict()}, buffer)
    saved = optimizer.state_dict()
    lr_before = saved["param_groups"][0]["lr"].clone()
    resumed_runs = []
    for as_tensor in (True, False):
        buffer.seek(0)
        checkpoint = torch.load(buffer, weights_only=True)
        twin = copy.deepcopy(model)
        twin.load_state_dict(checkpoint["model"])
        resumed = cls(twin.parameters(), **kwargs, lr_as_tensor=as_tensor)
        resumed.load_state_dict(checkpoint["optimizer"])
        resumed_scheduler = SCHEDULERS["StepLR"](resumed)
        resumed_scheduler.load_state_dict(checkpoint["scheduler"])
        assert isinstance(resumed.param_groups[0]["lr"], torch.Tensor) == as_tensor
        resumed_runs.append((twin, resumed, resumed_scheduler))
    for _ in range(6):
        if after_scheduler:
            for m, opt, sched in [(model, optimizer, scheduler)] + resumed_runs:
                one_step(m, opt, x, y)
                sched.step()
        else:
            for m, opt, sched in [(model, optimizer, scheduler)] + resumed_runs:
                sched.step()
                one_step(m, opt, x, y)
    assert torch.equal(saved["param_groups"][0]["lr"], lr_before)  # a snapshot
    for twin, resumed, _ in resumed_runs:
        for a, b in zip(model.parameters(), twin.parameters()):
            assert torch.equal(a, b)
        assert torch.equal(optimizer.adapted_lrs()[0], resumed.adapted_lrs()[0])
        assert float(optimizer.param_groups[0]["lr"]) == float(resumed.param_groups[0]["lr"])


def test_a_tensor_lr_is_still_refused_at_construction_and_checked_when_written():
    with pytest.raises(TypeError):
        SGDHD(make_model()[0].parameters(), lr=torch.tensor(0.1), lr_as_tensor=True)
    with pytest.raises(TypeError, match="lr_as_tensor"):
        SGDHD(make_model()[0].parameters(), lr_as_tensor="yes")
    model, x, y = make_model()
    optimizer = SGDHD(model.parameters(), lr=1e-2, lr_as_tensor=True)
    one_step(model, optimizer, x, y)
    optimizer.param_groups[0]["lr"].fill_(float("nan"))
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['lr'\]"):
        one_step(model, optimizer, x, y)
    optimizer.param_groups[0]["lr"] = torch.ones(2)
    with pytest.raises(TypeError, match="one-element"):
        one_step(model, optimizer, x, y)


def test_compiled_step_with_a_tensor_lr_does_not_recompile():
    """torch.compile(optimizer.step) with lr_as_tensor=True and OneCycleLR (lr filled in place
    every step): no recompilation after the first steps, and the eager run's trajectory (to
    the float32 bias corrections of the compiled Adam step)."""
    torch._dynamo.reset()
    model, x, y = make_model()
    model, x, y = model.float(), x.float(), y.float()
    twin = copy.deepcopy(model)
    options = dict(lr=1e-2, hypergrad_lr=1e-3, foreach=True, lr_as_tensor=True)
    optimizer, reference = AdamHD(model.parameters(), **options), AdamHD(twin.parameters(),
                                                                         **options)
    schedulers = [SCHEDULERS["OneCycleLR"](opt) for opt in (optimizer, reference)]
    compiled_step = torch.compile(optimizer.step, backend="eager")

    def both(steps):
        for _ in range(steps):
            for m, opt, step in ((model, optimizer, compiled_step),
                                 (twin, reference, reference.step)):
                opt.zero_grad()
                ((m(x) - y) ** 2).mean().backward()
                step()
            assert isinstance(optimizer.param_groups[0]["lr"], torch.Tensor)
            assert float(optimizer.param_groups[0]["lr"]) == pytest.approx(
                float(reference.param_groups[0]["lr"]), rel=1e-5)
            for scheduler in schedulers:
                scheduler.step()

    both(3)
    with torch._dynamo.config.patch(error_on_recompile=True):
        both(STEPS - 3)
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
