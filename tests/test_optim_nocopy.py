"""SGD-HD without the copy of g_t (issue 13): on eager CPU tensors SGDHD keeps d_t = g_t as a
copy-on-write clone of ``p.grad`` (SGDN-HD: d_t = g_t + μ v_t written after the step), so the
hypergradient h_{t+1} = -g_{t+1}·d_t must stay exact however the training loop reuses the
gradient's storage before the next step. Each way of reusing it is run for many steps against

* an independent float64 loop written here (:func:`oracle`: h, α and θ by Algorithms 1-2), and
* the copying path (``_keeps_gradient`` forced off: d ← g copied in the hypergradient pass),
  which must give the same trajectory bit for bit.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad

from hdfunc.optim import SGDHD
from helpers import free_port, run_in_gloo_group, spawn, tanh_regression

STEPS = 30
LR, BETA, MU = 1e-2, 1e-2, 0.9


class CopyingSGDHD(SGDHD):
    """SGDHD on its copying path (d ← g copied into the stored buffer each step)."""

    def _keeps_gradient(self, group: dict, lists: dict) -> bool:
        return False


problem = tanh_regression


def loss_of(model, x, y):
    return ((model(x) - y) ** 2).mean()


def clip_factor(grads: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_'s factor: min(1, max_norm / (‖g‖ + 1e-6))."""
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    return torch.clamp(max_norm / (total + 1e-6), max=1.0)


def oracle(model, x, y, steps: int, *, nesterov: bool = False, max_norm: float | None = None):
    """SGD-HD / SGDN-HD (Baydin et al. 2018, Algorithms 1-2) written out in float64, the
    gradient by torch.func (optionally clipped as clip_grad_norm_ does): h_t = -g_t·d_{t-1},
    α_t = α_{t-1} - β h_t, v_t = μ v_{t-1} + g_t, d_t = g_t (+ μ v_t), θ_t = θ_{t-1} - α_t d_t.
    Returns the final parameters (in the model's order) and α."""
    names = [name for name, _ in model.named_parameters()]
    theta = {k: v.detach().clone() for k, v in model.named_parameters()}
    direction = {k: torch.zeros_like(v) for k, v in theta.items()}
    velocity: dict = {}
    alpha = torch.tensor(LR, dtype=torch.float64)

    def loss(p):
        return ((functional_call(model, p, (x,)) - y) ** 2).mean()

    for _ in range(steps):
        g = grad(loss)(theta)
        if max_norm is not None:
            factor = clip_factor([g[k] for k in names], max_norm)
            g = {k: v * factor for k, v in g.items()}
        h = -sum((g[k] * direction[k]).sum() for k in names)
        alpha = alpha - BETA * h
        for k in names:
            if nesterov:
                velocity[k] = g[k].clone() if k not in velocity else MU * velocity[k] + g[k]
                direction[k] = g[k] + MU * velocity[k]
            else:
                direction[k] = g[k]
            theta[k] = theta[k] - alpha * direction[k]
    return [theta[k] for k in names], alpha


def make(cls, model, nesterov: bool, **kernel):
    if nesterov:
        return cls(model.parameters(), lr=LR, hypergrad_lr=BETA, momentum=MU, nesterov=True,
                   **kernel)
    return cls(model.parameters(), lr=LR, hypergrad_lr=BETA, **kernel)


# Ways a training loop reuses the gradient's storage between steps. Each runs one step's
# zero_grad + backward(s) + optimizer.step(), and returns the clipping norm it applied (None).

def loop_set_to_none(model, optimizer, x, y):
    optimizer.zero_grad()  # set_to_none=True: the next backward allocates a new gradient
    loss_of(model, x, y).backward()
    optimizer.step()


def loop_optimizer_zero_grad_in_place(model, optimizer, x, y):
    optimizer.zero_grad(set_to_none=False)  # the same tensor, zeroed and accumulated into
    loss_of(model, x, y).backward()
    optimizer.step()


def loop_module_zero_grad_in_place(model, optimizer, x, y):
    model.zero_grad(set_to_none=False)  # a write the optimizer does not see
    loss_of(model, x, y).backward()
    optimizer.step()


def loop_hand_zeroed(model, optimizer, x, y):
    for p in model.parameters():  # e.g. a training framework's own zeroing
        if p.grad is not None:
            p.grad.detach_().zero_()
    loss_of(model, x, y).backward()
    optimizer.step()
    for p in model.parameters():  # and an in-place edit after the step (e.g. logging code)
        p.grad.mul_(-3.0)


def loop_micro_batches(model, optimizer, x, y, set_to_none: bool):
    optimizer.zero_grad(set_to_none=set_to_none)
    for part in range(3):  # gradient accumulation: backward accumulates in place
        rows = slice(16 * part, 16 * (part + 1))
        (loss_of(model, x[rows], y[rows]) / 3).backward()
    optimizer.step()


def loop_clipped_in_place(model, optimizer, x, y, max_norm=0.05):
    optimizer.zero_grad(set_to_none=False)
    loss_of(model, x, y).backward()
    nn.utils.clip_grad_norm_(model.parameters(), max_norm)  # scales p.grad in place
    optimizer.step()


def loop_grad_assigned_views(model, optimizer, x, y):
    """Gradients as views of one flat buffer that is refilled in place each step (as DDP's
    gradient_as_bucket_view=True and FSDP1's flat parameters do)."""
    params = list(model.parameters())
    flat = getattr(model, "_flat_grad", None)
    if flat is None:
        flat = model._flat_grad = torch.zeros(sum(p.numel() for p in params),
                                              dtype=params[0].dtype)
    grads = torch.autograd.grad(loss_of(model, x, y), params)
    offset = 0
    for p, g in zip(params, grads):
        view = flat[offset:offset + p.numel()].view_as(p)
        view.copy_(g)  # the bucket written in place
        p.grad = view
        offset += p.numel()
    optimizer.step()


def loop_alternating(model, optimizer, x, y):
    """set_to_none=True and False on alternate steps: the step switches between keeping a
    clone and copying into its buffer."""
    counter = getattr(model, "_steps", 0)
    model._steps = counter + 1
    optimizer.zero_grad(set_to_none=counter % 2 == 0)
    loss_of(model, x, y).backward()
    optimizer.step()


LOOPS: dict[str, Callable] = {
    "alternating_set_to_none": loop_alternating,
    "set_to_none": loop_set_to_none,
    "optimizer_zero_grad_in_place": loop_optimizer_zero_grad_in_place,
    "module_zero_grad_in_place": loop_module_zero_grad_in_place,
    "hand_zeroed_and_edited_after_step": loop_hand_zeroed,
    "micro_batches_set_to_none": lambda *a: loop_micro_batches(*a, set_to_none=True),
    "micro_batches_in_place": lambda *a: loop_micro_batches(*a, set_to_none=False),
    "clipped_in_place": loop_clipped_in_place,
    "bucket_views": loop_grad_assigned_views,
}
KERNELS = {"foreach": dict(foreach=True), "for_loop": dict(foreach=False, fused=False)}


def run(cls, loop: Callable, nesterov: bool, kernel: dict, dtype=torch.float64, steps=STEPS):
    model, x, y = problem(dtype)
    optimizer = make(cls, model, nesterov, **kernel)
    for _ in range(steps):
        loop(model, optimizer, x, y)
    return model, optimizer


@pytest.mark.parametrize("kernel", list(KERNELS))
@pytest.mark.parametrize("nesterov", [False, True], ids=["sgd_hd", "sgdn_hd"])
@pytest.mark.parametrize("loop", list(LOOPS))
def test_kept_gradient_matches_the_float64_oracle(loop, nesterov, kernel):
    """Every way of reusing the gradient's storage: the trajectory (θ and α over 30 steps) is
    the oracle's to float64 rounding, and α really moved."""
    model, optimizer = run(SGDHD, LOOPS[loop], nesterov, KERNELS[kernel])
    max_norm = 0.05 if loop == "clipped_in_place" else None
    theta, alpha = oracle(*problem(), STEPS, nesterov=nesterov, max_norm=max_norm)
    for p, expected in zip(model.parameters(), theta):
        torch.testing.assert_close(p.detach(), expected, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(optimizer.adapted_lrs()[0], alpha, rtol=1e-12, atol=0)
    assert abs(float(alpha) - LR) > 1e-4  # the hypergradient moved α


@pytest.mark.parametrize("kernel", list(KERNELS))
@pytest.mark.parametrize("nesterov", [False, True], ids=["sgd_hd", "sgdn_hd"])
@pytest.mark.parametrize("loop", list(LOOPS))
def test_kept_gradient_equals_the_copying_path_bit_for_bit(loop, nesterov, kernel):
    """float32 (the dtype whose rounding would show a wrong d_{t-1} soonest): the same
    parameters and α as the copying path, exactly."""
    model, optimizer = run(SGDHD, LOOPS[loop], nesterov, KERNELS[kernel], torch.float32)
    twin, copying = run(CopyingSGDHD, LOOPS[loop], nesterov, KERNELS[kernel], torch.float32)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(optimizer.adapted_lrs()[0], copying.adapted_lrs()[0])
    assert optimizer.adapted_lrs()[0] != LR


def test_a_wrong_direction_is_caught():
    """The oracle comparison can fail: d_{t-1} taken from the storage after the next backward
    (what keeping a plain reference to p.grad would give with zero_grad(set_to_none=False))
    moves α elsewhere."""

    class PlainReference(SGDHD):
        def _hypergrad_terms(self, group, lists, state):
            result = super()._hypergrad_terms(group, lists, state)
            for p in lists["params"]:
                self.state[p]["hd_direction"] = p.grad  # aliases the gradient: no protection
            return result

    model, optimizer = run(PlainReference, loop_optimizer_zero_grad_in_place, False,
                           KERNELS["foreach"])
    _, alpha = oracle(*problem(), STEPS)
    assert not torch.allclose(optimizer.adapted_lrs()[0], alpha, rtol=1e-6, atol=0)


def is_cow(t: torch.Tensor) -> bool:
    return torch._C._is_cow_tensor(t)


def test_no_copy_with_set_to_none_and_a_copy_only_where_the_storage_is_reused():
    """The stored direction is a copy-on-write clone of p.grad (no copy at the step). With
    set_to_none=True it is never materialized: after the next backward the old gradient's
    memory is the direction's alone. With zero_grad(set_to_none=False) the zeroing copies the
    gradient (the copy that the copying path makes at every step)."""
    model, x, y = problem(torch.float32)
    optimizer = make(SGDHD, model, False)
    for _ in range(3):
        loop_set_to_none(model, optimizer, x, y)
        for p in model.parameters():
            direction = optimizer.state[p]["hd_direction"]
            assert is_cow(direction) and is_cow(p.grad)
            assert torch.equal(direction, p.grad)
    kept = {p: optimizer.state[p]["hd_direction"] for p in model.parameters()}
    before = {p: p.grad.clone() for p in model.parameters()}
    optimizer.zero_grad(set_to_none=False)
    for p in model.parameters():
        assert not is_cow(p.grad) and torch.equal(p.grad, torch.zeros_like(p))
        assert torch.equal(kept[p], before[p])
    # the storage is reused from now on (the same gradient tensor each step): the step copies
    # into one buffer of its own, as without the clone, instead of a clone copied at each zeroing
    loss_of(model, x, y).backward()
    optimizer.step()
    buffers = {p: optimizer.state[p]["hd_direction"] for p in model.parameters()}
    for _ in range(3):
        loop_optimizer_zero_grad_in_place(model, optimizer, x, y)
        for p in model.parameters():
            assert optimizer.state[p]["hd_direction"] is buffers[p]
            assert not is_cow(buffers[p]) and torch.equal(buffers[p], p.grad)
    loop_set_to_none(model, optimizer, x, y)  # back to new gradients: clones again
    assert all(is_cow(optimizer.state[p]["hd_direction"]) for p in model.parameters())


def test_nesterov_foreach_keeps_the_gradient_torch_wrote():
    """torch's foreach SGD adds μ v_t into the gradient in place (the version counter says so):
    the gradient then is d_t, kept without a pass; the for-loop kernel leaves it as it was and
    d_t is written into the stored buffer."""
    for kernel, kept in ((dict(foreach=True), True), (dict(foreach=False), False)):
        model, x, y = problem(torch.float32)
        optimizer = make(SGDHD, model, True, **kernel)
        for _ in range(2):
            loop_set_to_none(model, optimizer, x, y)
        for p in model.parameters():
            direction = optimizer.state[p]["hd_direction"]
            assert is_cow(direction) == kept
            expected = (p.grad if kept else torch.add(
                p.grad, optimizer.state[p]["momentum_buffer"], alpha=MU))
            assert torch.equal(direction, expected)


@pytest.mark.parametrize("nesterov", [False, True], ids=["sgd_hd", "sgdn_hd"])
def test_checkpoint_of_a_kept_gradient_resumes_exactly(nesterov, tmp_path):
    """A state dict saved while d_t is a clone of p.grad (then zeroed in place) holds g_t:
    loading it into a new optimizer continues the uninterrupted run bit for bit."""
    model, x, y = problem(torch.float32)
    twin = copy.deepcopy(model)
    optimizer = make(SGDHD, model, nesterov)
    for _ in range(5):
        loop_optimizer_zero_grad_in_place(model, optimizer, x, y)
    torch.save(optimizer.state_dict(), tmp_path / "opt.pt")
    twin.load_state_dict(model.state_dict())
    for _ in range(5):
        loop_optimizer_zero_grad_in_place(model, optimizer, x, y)
    resumed = make(SGDHD, twin, nesterov)
    resumed.load_state_dict(torch.load(tmp_path / "opt.pt"))
    for _ in range(5):
        loop_optimizer_zero_grad_in_place(twin, resumed, x, y)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(optimizer.adapted_lrs()[0], resumed.adapted_lrs()[0])


@pytest.mark.parametrize("options", [dict(weight_decay=0.01), dict(maximize=True),
                                     dict(fused=True)])
def test_paths_that_copy_still_copy(options):
    """Weight decay and maximize (g_t is not p.grad) and torch's fused CPU kernel (which writes
    the gradient) keep the copying path: a stored buffer of its own, not a clone."""
    model, x, y = problem(torch.float32)
    optimizer = SGDHD(model.parameters(), lr=LR, hypergrad_lr=BETA, **options)
    for _ in range(2):
        loop_set_to_none(model, optimizer, x, y)
    assert not any(is_cow(optimizer.state[p]["hd_direction"]) for p in model.parameters())


# ----------------------------------------------------------------------------- DDP bucket views

WORLD = 2


def _ddp_worker(rank: int, port: int, out_dir: str) -> None:
    run_in_gloo_group(rank, port, WORLD, _ddp_train, Path(out_dir) / f"rank{rank}.pt")


def _ddp_train(rank: int) -> dict:
    results = {}
    for nesterov in (False, True):
        for set_to_none in (False, True):
            model, x, y = problem()
            ddp = nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=True)
            optimizer = make(SGDHD, ddp, nesterov)
            rows = slice(rank * 24, (rank + 1) * 24)
            views = True
            for _ in range(STEPS):
                optimizer.zero_grad(set_to_none=set_to_none)
                loss_of(ddp, x[rows], y[rows]).backward()
                if not set_to_none:  # the gradients are views of DDP's reused buckets
                    views = views and all(p.grad._base is not None
                                          for p in model.parameters())
                optimizer.step()
            results[(nesterov, set_to_none)] = (
                [p.detach().clone() for p in model.parameters()],
                optimizer.adapted_lrs()[0], views)
    return results


@pytest.mark.distributed
def test_ddp_gradient_as_bucket_view_matches_the_oracle(tmp_path):
    """DDP with gradient_as_bucket_view=True (gradients are views of buckets that the next
    backward overwrites in place), 2 gloo processes, each half of the batch: the trajectory is
    the single-process oracle's over the whole batch, with and without set_to_none."""
    spawn(_ddp_worker, (free_port(), str(tmp_path)), WORLD)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    for nesterov in (False, True):
        theta, alpha = oracle(*problem(), STEPS, nesterov=nesterov)
        for set_to_none in (False, True):
            params, adapted, views = results[0][(nesterov, set_to_none)]
            assert views
            torch.testing.assert_close(adapted, alpha, rtol=1e-12, atol=0)
            for p, expected in zip(params, theta):
                torch.testing.assert_close(p, expected, rtol=1e-12, atol=1e-14)
            assert torch.equal(adapted, results[1][(nesterov, set_to_none)][1])
