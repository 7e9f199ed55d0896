"""The hypergradient terms of the HD optimizers: g_t · d_{t-1} (and, for the multiplicative rule,
‖g_t‖² and ‖d_{t-1}‖²) over one param group, as pure functions of lists of tensors.

h_t = -g_t · d_{t-1} (Baydin et al. 2018, §2) is the only computation the optimizer classes add
to torch's kernels (docs/optim.md, "Design"). ``g_t`` is the gradient as the HD rule sees it:
negated under ``maximize``, plus λθ_{t-1} under coupled weight decay. ``d_{t-1}`` is

* SGD-HD / SGDN-HD: the stored direction (g_{t-1}, or g_{t-1} + μ v_{t-1} with Nesterov
  momentum), or the heavy-ball momentum buffer v_{t-1} (:func:`sgd_terms`,
  :func:`sgd_terms_streamed`);
* Adam-HD / AdamW-HD: recomputed from Adam's moments with the bias corrections of step t-1,
  with no stored copy (:func:`adam_terms`, :func:`adam_terms_streamed`).

Each has two variants with the same result (to rounding): a plain one, one vector expression per
tensor (any device, traced by torch.compile), and a streamed one for eager CPU tensors, which
works through two cache-sized scratch buffers of ``scratch_bytes`` each, so that g, m, v (and θ)
are read once from memory, no tensor-sized temporary is made and many small tensors share one
batch. The classes dispatch between them (:func:`streamable`). All sums are in float32 or wider
whatever the parameter dtype; the totals are returned in the dtype and on the device of ``like``
(the group's rate, float64 where the device has it).
"""

from __future__ import annotations

import math
from typing import Iterator, NamedTuple, Optional

import torch

from hdfunc.tree import leaf_vdot

__all__ = ["LOW_PRECISION", "SCRATCH_BYTES", "STREAMED_DTYPES", "HypergradTerms", "adam_terms",
           "adam_terms_streamed", "effective_grad", "sgd_terms", "sgd_terms_streamed",
           "streamable"]

SCRATCH_BYTES = 1024 * 1024  # the default size of each of the two CPU scratch buffers
LOW_PRECISION = (torch.float16, torch.bfloat16)  # the hypergradient pass works in float32 for these
STREAMED_DTYPES = LOW_PRECISION + (torch.float32, torch.float64)

# (device, dtype) -> the two scratch buffers of that kind, kept by an optimizer between steps
ScratchBuffers = dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]]


class HypergradTerms(NamedTuple):
    """The sums one param group contributes to h_t and to the multiplicative rule (Eqs. 7-8).

    Attributes:
        dot: Σ g_t·d_{t-1} (h_t = -dot).
        grad_sq: ‖g_t‖² (0 unless asked for).
        direction_sq: ‖d_{t-1}‖² (0 unless asked for).
    """

    dot: torch.Tensor  # Σ g_t·d_{t-1}: h_t = -dot
    grad_sq: torch.Tensor  # ‖g_t‖² (0 unless asked for)
    direction_sq: torch.Tensor  # ‖d_{t-1}‖² (0 unless asked for)


# ----------------------------------------------------------------------------- helpers


def streamable(tensors: list[torch.Tensor]) -> bool:
    """Whether the streamed variants apply: eager mode (not under torch.compile) and CPU tensors
    of a floating dtype (an empty list qualifies).

    Args:
        tensors: the tensors of a param group.

    Returns:
        True if the streamed variants may be used.
    """
    return not torch.compiler.is_compiling() and all(
        t.device.type == "cpu" and t.dtype in STREAMED_DTYPES for t in tensors)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for float16/bfloat16, else ``dtype``: the precision of the hypergradient pass.

    Args:
        dtype: a parameter dtype.

    Returns:
        The dtype of the hypergradient pass.
    """
    return torch.promote_types(dtype, torch.float32)


def underflow_bound(dtype: torch.dtype) -> float:
    """The largest value that rounds to 0 in ``dtype`` (half its smallest subnormal).

    Adam's second moment is stored in the parameter dtype; in float16, v = (1-β2) g² underflows
    to 0 for |g| below ~8e-3 while m does not, and torch's fused kernel stepped with the
    unrounded v. The direction d_{t-1} = m̂/(√v̂+ε) recomputed with v = 0 would be m/ε (~1e5
    for ε = 1e-8); with v at this bound it is the smallest direction consistent with the stored
    state, and elements with m = v = 0 still give 0.

    Args:
        dtype: a floating dtype.

    Returns:
        Half the smallest subnormal of ``dtype``.
    """
    info = torch.finfo(dtype)
    return info.smallest_normal * info.eps / 2


def dot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Σ x⊙y, accumulated in the tensors' precision (at least float32, as the functional core;
    one BLAS dot product where the dtypes allow it).

    Args:
        x: a tensor.
        y: a tensor of ``x``'s shape.

    Returns:
        The 0-d sum, in the accumulation dtype.
    """
    if x.dtype == y.dtype and x.dtype in (torch.float32, torch.float64):
        return torch.dot(x.reshape(-1), y.reshape(-1))
    return leaf_vdot(x, y, torch.promote_types(torch.promote_types(x.dtype, y.dtype),
                                               torch.float32))


def effective_grad(p: torch.Tensor, grad: torch.Tensor, *, maximize: bool,
                   coupled_weight_decay: float) -> torch.Tensor:
    """g_t as the HD rule sees it: maximize negates, coupled weight decay adds λθ_{t-1};
    float32 at least (float16/bfloat16 gradients are converted).

    Args:
        p: θ_{t-1}, read for the coupled weight decay.
        grad: ∇f(θ_{t-1}).
        maximize: negate the gradient.
        coupled_weight_decay: λ of the coupled L2 term (0: none).

    Returns:
        g_t, at least float32.
    """
    g = grad.to(accumulation_dtype(grad.dtype))
    g = g.neg() if maximize else g
    if coupled_weight_decay != 0:
        g = g.add(p, alpha=coupled_weight_decay)
    return g


def sum_as(values: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """Σ values in ``like``'s dtype (each converted first), on ``like``'s device; 0 for none.

    Args:
        values: 0-d tensors.
        like: a tensor whose dtype and device the sum takes.

    Returns:
        The 0-d sum.
    """
    if not values:
        return like.new_zeros(())
    return torch.stack([v.to(like.dtype) for v in values]).sum()


def sum_float64(values: list[torch.Tensor]) -> torch.Tensor:
    """Σ values in float64 (one operation fewer for the usual single value; 0 for none).

    Args:
        values: 0-d tensors.

    Returns:
        The 0-d float64 sum.
    """
    if not values:
        return torch.zeros((), dtype=torch.float64)
    if len(values) == 1:
        return values[0].to(torch.float64)
    return torch.stack(values).to(torch.float64).sum()


def batches(sizes: list[int], capacity: int,
            split_large: bool = True) -> Iterator[list[tuple[int, int, int]]]:
    """Split tensors of ``sizes`` elements into pieces (index, start, stop) and yield them in
    batches of at most ``capacity`` elements, in order. A large tensor (at least half the
    capacity) is cut into pieces that form batches of their own (used in place, no copy); small
    tensors are packed together.

    Args:
        sizes: the number of elements of each tensor.
        capacity: the most elements in a batch.
        split_large: cut large tensors into pieces of ``capacity`` (False: a large tensor is
            one piece, of any size: for a pass that only reads it, where cache-sized pieces
            gain nothing and cost one operation each).

    Returns:
        An iterator over batches, each a list of pieces (index, start, stop).
    """
    batch, filled = [], 0
    for j, size in enumerate(sizes):
        if size >= capacity // 2:
            if batch:
                yield batch
                batch, filled = [], 0
            step = capacity if split_large else size
            for start in range(0, size, step):
                yield [(j, start, min(start + step, size))]
            continue
        if filled + size > capacity:
            yield batch
            batch, filled = [], 0
        batch.append((j, 0, size))
        filled += size
    if batch:
        yield batch


def scratch_pair(like: torch.Tensor, needed: int, dtype: torch.dtype, scratch_bytes: int,
                 buffers: Optional[ScratchBuffers] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Two work buffers of ``dtype`` on ``like``'s device of ``scratch_bytes`` each, or of
    ``needed`` elements if fewer; taken from (and kept in) ``buffers`` when given, so an
    optimizer reuses them from step to step (they are not optimizer state: never saved).

    Args:
        like: a tensor on the buffers' device.
        needed: the most elements a batch needs.
        dtype: the buffers' dtype.
        scratch_bytes: the size of a buffer in bytes, at most.
        buffers: a cache of scratch buffers, or None.

    Returns:
        Two 1-d work buffers.
    """
    size = max(1, min(scratch_bytes // dtype.itemsize, needed))
    if buffers is None:
        return like.new_empty(size, dtype=dtype), like.new_empty(size, dtype=dtype)
    key = (like.device, dtype)
    if key not in buffers or buffers[key][0].numel() < size:
        buffers[key] = (like.new_empty(size, dtype=dtype), like.new_empty(size, dtype=dtype))
    return buffers[key]


# ============================================================================= SGD


def sgd_terms(params: list[torch.Tensor], grads: list[torch.Tensor],
              directions: list[Optional[torch.Tensor]], *, weight_decay: float, maximize: bool,
              want_sq: bool, like: torch.Tensor,
              update_directions: bool = False) -> HypergradTerms:
    """Σ g_t·d_{t-1} (and ‖g_t‖², ‖d_{t-1}‖² if ``want_sq``) of SGD-HD/SGDN-HD, tensor by tensor.

    Args:
        params: θ_{t-1}, read for the coupled weight decay.
        grads: ∇f(θ_{t-1}) (before maximize and weight decay).
        directions: d_{t-1} of each tensor: the stored direction, or the heavy-ball momentum
            buffer v_{t-1} (None before that tensor's first step: d_0 = 0).
        weight_decay: λ of the coupled L2 term (g_t = ±∇f + λθ_{t-1}).
        maximize: negate the gradient.
        want_sq: also return the two norms (the multiplicative rule).
        like: a tensor whose dtype and device the totals take (the group's rate).
        update_directions: then overwrite each direction with g_t (SGD-HD's d_t before any
            Nesterov term), in the same pass so that g is read once.

    Returns:
        :class:`HypergradTerms` (norms 0 unless ``want_sq``).
    """
    dots, grad_sq, dir_sq = [], [], []
    for p, grad, d in zip(params, grads, directions):
        g = effective_grad(p, grad, maximize=maximize, coupled_weight_decay=weight_decay)
        if want_sq:
            grad_sq.append(dot(g, g))
        if d is None:  # heavy ball before its first step: d_0 = 0
            continue
        g_dot_d = dot(g, d)
        sq = dot(d, d) if want_sq else None
        if update_directions:
            d.copy_(g)  # d_t starts as g_t (Nesterov adds μ v_t after the step)
        dots.append(g_dot_d)
        if want_sq:
            dir_sq.append(sq)
    return HypergradTerms(sum_as(dots, like), sum_as(grad_sq, like), sum_as(dir_sq, like))


def sgd_terms_streamed(grads: list[torch.Tensor], directions: list[torch.Tensor], *,
                       want_sq: bool, like: torch.Tensor, scratch_bytes: int = SCRATCH_BYTES,
                       buffers: Optional[ScratchBuffers] = None,
                       update_directions: bool = False) -> HypergradTerms:
    """:func:`sgd_terms` on eager CPU tensors for g_t = ∇f (no weight decay, no maximize) and a
    stored direction for every tensor, all contiguous: [Σ g·d, Σ g·g, Σ d·d] in float64, then
    (``update_directions``) d ← g, in batches of ``scratch_bytes``: a large tensor chunk by chunk
    while the chunk is in cache (g is read once), small tensors together (one dot product and
    one copy per batch). float16/bfloat16 pieces are converted to float32 in the scratch
    buffers first; without ``update_directions`` (a pass that only reads) a large tensor of the
    work dtype is one piece. ``buffers``: a cache of scratch buffers (see :func:`scratch_pair`).

    Args:
        grads: ∇f(θ_{t-1}) of each tensor.
        directions: the stored direction d_{t-1} of each tensor.
        want_sq: also return the two norms (the multiplicative rule).
        like: a tensor whose dtype and device the totals take (the group's rate).
        scratch_bytes: the size of a scratch buffer in bytes.
        buffers: a cache of scratch buffers, or None.
        update_directions: then overwrite each direction with g_t.

    Returns:
        :class:`HypergradTerms` (norms 0 unless ``want_sq``).
    """
    totals: list[list[torch.Tensor]] = [[], [], []]
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, g in enumerate(grads):
        by_dtype.setdefault(g.dtype, []).append(i)
    for dtype, members in by_dtype.items():
        work_dtype = accumulation_dtype(dtype)
        buffer, other = scratch_pair(grads[members[0]], sum(grads[i].numel() for i in members),
                                     work_dtype, scratch_bytes, buffers)
        parts: list[list[torch.Tensor]] = [[], [], []]
        g_flat = [grads[i].view(-1) for i in members]
        d_flat = [directions[i].view(-1) for i in members]
        for pieces in batches([g.numel() for g in g_flat], buffer.numel(),
                              split_large=update_directions or dtype != work_dtype):
            g_views = [g_flat[j][a:b] for j, a, b in pieces]
            d_views = [d_flat[j][a:b] for j, a, b in pieces]
            if len(pieces) == 1 and dtype == work_dtype:
                g_all, d_all = g_views[0], d_views[0]
            else:
                n = sum(b - a for _, a, b in pieces)
                g_all = torch.cat(g_views, out=buffer[:n])
                d_all = torch.cat(d_views, out=other[:n])
            parts[0].append(torch.dot(g_all, d_all))
            if want_sq:
                parts[1].append(torch.dot(g_all, g_all))
                parts[2].append(torch.dot(d_all, d_all))
            if update_directions:
                if len(pieces) == 1:
                    d_views[0].copy_(g_views[0])
                else:
                    torch._foreach_copy_(d_views, g_views)
        for k in range(3 if want_sq else 1):
            totals[k].append(sum_float64(parts[k]))
    zero = torch.zeros((), dtype=torch.float64)
    return HypergradTerms(*((sum_float64(t) if t else zero).to(like.dtype) for t in totals))


# ============================================================================= Adam
# Adam's direction of step t-1 (0 before the first step, where m = v = 0):
#   a_{t-1} = m̂/(√v̂ + ε) = (c2/c1) · m / (√v + ε c2),  c1 = 1-β1^(t-1), c2 = √(1-β2^(t-1)),
# with the corrections in double precision (as torch.optim.Adam); each tensor has its own step
# count. With decoupled decay (AdamW):
#   d_{t-1} = a_{t-1} + λθ_{t-2} with θ_{t-2} = (θ_{t-1} + γa_{t-1}) / (1 - γλ), hence
#   d_{t-1} = (a_{t-1} + λθ_{t-1}) / (1 - γ_{t-1}λ): exact, with no stored copy.


def adam_terms(params: list[torch.Tensor], grads: list[torch.Tensor],
               exp_avgs: list[torch.Tensor], exp_avg_sqs: list[torch.Tensor],
               steps: list[torch.Tensor], *, betas: tuple[float, float], eps: float,
               weight_decay: float, decoupled_weight_decay: bool, maximize: bool,
               applied_lr: torch.Tensor, want_sq: bool, like: torch.Tensor) -> HypergradTerms:
    """Σ g_t·d_{t-1} (and ‖g_t‖², ‖d_{t-1}‖² if ``want_sq``) of Adam-HD/AdamW-HD, with d_{t-1}
    recomputed from each tensor's moments and step count, one vector expression per tensor.

    Args:
        params: θ_{t-1} (coupled decay: part of g_t; decoupled: part of d_{t-1}).
        grads: ∇f(θ_{t-1}) (before maximize and weight decay).
        exp_avgs: m_{t-1} of each tensor (torch.optim.Adam's ``exp_avg``).
        exp_avg_sqs: v_{t-1} of each tensor (``exp_avg_sq``).
        steps: t-1 of each tensor (Adam's ``step``: 0-d tensors; 0 gives d_0 = 0).
        betas: (β1, β2).
        eps: ε.
        weight_decay: λ.
        decoupled_weight_decay: AdamW's decay (part of d) instead of the coupled L2 term.
        maximize: negate the gradient.
        applied_lr: γ_{t-1}, the rate the last step applied (read only with decoupled decay).
        want_sq: also return the two norms (the multiplicative rule).
        like: a tensor whose dtype and device the totals take (the group's rate).

    Returns:
        :class:`HypergradTerms` (norms 0 unless ``want_sq``).
    """
    if not params:
        return HypergradTerms(*[like.new_zeros(())] * 3)
    beta1, beta2 = betas
    decoupled = decoupled_weight_decay and weight_decay != 0
    coupled = 0.0 if decoupled_weight_decay else weight_decay
    t = torch.stack(steps).to(device=like.device, dtype=torch.float64)
    started = t > 0
    correction1 = torch.where(started, 1 - beta1 ** t, 1.0)
    correction2 = torch.where(started, (1 - beta2 ** t).sqrt(), 1.0)
    scale = torch.where(started, correction2 / correction1, 0.0)
    eps_scaled = eps * correction2
    decay = started.to(torch.float64) * weight_decay if decoupled else scale.new_zeros(
        scale.shape)
    eps_scaled, scale_list, decay = eps_scaled.unbind(), scale.unbind(), decay.unbind()
    dots, grad_sq, dir_sq = [], [], []
    for i, (p, grad, m, v) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs)):
        # at least float32: ε (1e-8) is 0 in float16, where d would be 0/0 or m/0
        work = accumulation_dtype(p.dtype)
        g = effective_grad(p, grad, maximize=maximize, coupled_weight_decay=coupled)
        if want_sq:
            grad_sq.append(dot(g, g))
        # m / (√v + ε c2), times c2/c1 below (or here, with decoupled decay)
        v = v.to(work)
        if p.dtype in LOW_PRECISION:  # a v stored as 0 may have underflowed
            v = v.clamp(min=underflow_bound(p.dtype))
        direction = m.to(work) / (v.sqrt() + eps_scaled[i].to(v.device, work))
        if decoupled:
            direction = (direction * scale_list[i].to(p.device, work)
                         + p.to(work) * decay[i].to(p.device, work))
        dots.append(dot(g, direction))
        if want_sq:
            dir_sq.append(dot(direction, direction))
    dots = torch.stack(dots).to(torch.float64)
    if decoupled:
        shrink = 1 - applied_lr.to(torch.float64) * weight_decay
        total = dots.sum() / shrink
        direction_sq = (torch.stack(dir_sq).to(torch.float64).sum() / shrink ** 2
                        if want_sq else None)
    else:
        total = (dots * scale).sum()
        direction_sq = ((torch.stack(dir_sq).to(torch.float64) * scale ** 2).sum()
                        if want_sq else None)
    return HypergradTerms(total.to(like.dtype), sum_as(grad_sq, like),
                          like.new_zeros(()) if direction_sq is None
                          else direction_sq.to(like.dtype))


def adam_terms_streamed(params: list[torch.Tensor], grads: list[torch.Tensor],
                        exp_avgs: list[torch.Tensor], exp_avg_sqs: list[torch.Tensor],
                        steps: list[torch.Tensor], *, betas: tuple[float, float], eps: float,
                        weight_decay: float, decoupled_weight_decay: bool, maximize: bool,
                        applied_lr: torch.Tensor, want_sq: bool, like: torch.Tensor,
                        scratch_bytes: int = SCRATCH_BYTES,
                        buffers: Optional[ScratchBuffers] = None) -> HypergradTerms:
    """:func:`adam_terms` on eager CPU tensors (same arguments), streamed: the corrections as
    Python floats (torch.optim.Adam's own arithmetic; steps live on the CPU), then Σ g·d_{t-1}
    (and Σ d·d) in float64 with d_{t-1} made piece by piece in two scratch buffers of
    ``scratch_bytes`` (float32 for float16/bfloat16 tensors, so ε never underflows): g, m, v
    (and θ) are read once, no tensor-sized temporary is made, and many small tensors share one
    batch (a few vector ops per 256k elements instead of per tensor). Tensors are grouped by
    step count, so each batch has one ε·c2, scale c2/c1 and decay; the non-decoupled scale
    multiplies the batch's dot in float64 (as the functional rule's per-tensor dot products).
    ``buffers``: a cache of scratch buffers (see :func:`scratch_pair`).

    Args:
        params: θ_{t-1} (coupled decay: part of g_t; decoupled: part of d_{t-1}).
        grads: ∇f(θ_{t-1}) (before maximize and weight decay).
        exp_avgs: m_{t-1} of each tensor.
        exp_avg_sqs: v_{t-1} of each tensor.
        steps: t-1 of each tensor (0-d tensors on the CPU).
        betas: (β1, β2).
        eps: ε.
        weight_decay: λ.
        decoupled_weight_decay: AdamW's decay (part of d) instead of the coupled L2 term.
        maximize: negate the gradient.
        applied_lr: γ_{t-1}, the rate the last step applied (read only with decoupled decay).
        want_sq: also return the two norms (the multiplicative rule).
        like: a tensor whose dtype and device the totals take (the group's rate).
        scratch_bytes: the size of a scratch buffer in bytes.
        buffers: a cache of scratch buffers, or None.

    Returns:
        :class:`HypergradTerms` (norms 0 unless ``want_sq``).
    """
    if not params:
        return HypergradTerms(*[like.new_zeros(())] * 3)
    beta1, beta2 = betas
    decoupled = decoupled_weight_decay and weight_decay != 0
    coupled = 0.0 if decoupled_weight_decay else weight_decay
    corrections = {}
    for step in steps:
        t = float(step)
        if t not in corrections:
            c1, c2 = 1 - beta1 ** t, math.sqrt(1 - beta2 ** t)
            corrections[t] = ((eps * c2, c2 / c1, weight_decay if decoupled else 0.0)
                              if t > 0 else (eps, 0.0, 0.0))
    by_key: dict[tuple, list[int]] = {}
    for i, (p, step) in enumerate(zip(params, steps)):
        eps_scaled, scale, decay = corrections[float(step)]
        if scale != 0.0:  # d_{t-1} = 0 before a tensor's first step
            by_key.setdefault((p.dtype, scale, eps_scaled, decay), []).append(i)
    lists = {"grads": grads, "exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs, "params": params}
    dots, squares = [], []
    for (dtype, scale, eps_scaled, decay), members in by_key.items():
        work_dtype = accumulation_dtype(dtype)
        buffer, other = scratch_pair(params[members[0]], sum(params[i].numel() for i in members),
                                     work_dtype, scratch_bytes, buffers)
        capacity = buffer.numel()
        batch_dots, batch_squares = [], []
        names = ["grads", "exp_avgs", "exp_avg_sqs"] + (["params"] if decoupled or coupled
                                                        else [])
        flat = {name: [lists[name][i].reshape(-1) for i in members] for name in names}
        for pieces in batches([flat["grads"][j].numel() for j in range(len(members))],
                              capacity):
            n = sum(b - a for _, a, b in pieces)
            d, x = buffer[:n], other[:n]

            def load(name: str) -> torch.Tensor:
                """The batch's elements of the list ``name``: a view (one piece in the work
                dtype) or copied (converted) to x."""
                if len(pieces) == 1 and dtype == work_dtype:
                    j, a, b = pieces[0]
                    return flat[name][j][a:b]
                return torch.cat([flat[name][j][a:b] for j, a, b in pieces], out=x)

            if dtype in LOW_PRECISION:  # a v stored as 0 may have underflowed
                torch.clamp(load("exp_avg_sqs"), min=underflow_bound(dtype), out=d)
                d.sqrt_()
            else:
                torch.sqrt(load("exp_avg_sqs"), out=d)
            d.add_(eps_scaled)
            torch.div(load("exp_avgs"), d, out=d)  # m / (√v + ε c2)
            if decoupled:
                d.mul_(scale).add_(load("params"), alpha=decay)
            if want_sq:
                batch_squares.append(torch.dot(d, d))
            g_dot_d = torch.dot(d, load("grads"))
            if maximize:
                g_dot_d = -g_dot_d
            if coupled:  # g = ±∇f + λθ
                g_dot_d = g_dot_d + coupled * torch.dot(d, load("params"))
            batch_dots.append(g_dot_d)
        factor = 1.0 if decoupled else scale
        dots.append(sum_float64(batch_dots) * factor)
        if want_sq:
            squares.append(sum_float64(batch_squares) * factor ** 2)
    zero = torch.zeros((), dtype=torch.float64)
    total = sum_float64(dots) if dots else zero
    direction_sq = (sum_float64(squares) if squares else zero) if want_sq else None
    grad_sq = ([dot(g, g) for g in (effective_grad(p, grad, maximize=maximize,
                                                   coupled_weight_decay=coupled)
                                    for p, grad in zip(params, grads))]
               if want_sq else [])
    if decoupled:
        shrink = 1 - applied_lr.to(torch.float64) * weight_decay
        total = total / shrink
        direction_sq = direction_sq / shrink ** 2 if want_sq else None
    return HypergradTerms(total.to(like.dtype), sum_as(grad_sq, like),
                          like.new_zeros(()) if direction_sq is None
                          else direction_sq.to(like.dtype))
