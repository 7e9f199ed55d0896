"""Hypergradient descent as drop-in ``torch.optim.Optimizer`` classes: :class:`SGDHD`,
:class:`SGDNHD`, :class:`AdamHD` and :class:`AdamWHD` (Baydin et al., ICLR 2018, Algorithms 1-3).

    optimizer = hdfunc.optim.AdamHD(model.parameters(), lr=1e-3, hypergrad_lr=1e-7)
    for x, y in loader:
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        optimizer.step()

One source of truth, split in two halves (docs/optim.md, "Design"):

* the learning-rate update β_t, α_t, γ_t from h_t is :func:`hdfunc.adapt_rates` of the functional
  core, called with each group's rate state, an :class:`hdfunc.HDState`, and its options, an
  :class:`hdfunc.HDOptions`;
* the parameter step u_t = -γ_t d_t is torch's own optimizer kernel (``torch.optim.adam.adam`` /
  ``torch.optim.sgd.sgd``, fused or foreach) called with the adapted rate, so ``hypergrad_lr=0``
  is torch.optim.Adam / AdamW / SGD step for step.

What this package adds is only h_t = -g_t · d_{t-1}: one dot product per step over the stored
direction (SGD-HD, SGDN-HD: one extra buffer; on the CPU the last gradient itself, kept as a
copy-on-write clone instead of a copy) or over d_{t-1} recomputed from Adam's moments with
the bias corrections of step t-1 (Adam-HD, AdamW-HD, heavy-ball SGD-HD: no extra buffer), in
float32 or wider whatever the parameter dtype. The tests prove each trajectory equal to the
functional rule (:func:`hdfunc.adam_hd`, ...).

After each step ``param_groups[i]["lr"]`` holds γ_t, the rate that step applied (a float on
the CPU, a 0-d tensor elsewhere: no host sync; ``lr_as_tensor``), so
loggers and schedulers read the adapted rate; a value written there (by a scheduler or by hand)
is where the next step's rate continues from (docs/optim.md, "Logging the rate and schedulers").

Options are validated at construction and, for values written into ``param_groups`` later, at
the next step; ``load_state_dict`` checks which optimizer wrote a state and takes over the state
of the torch.optim optimizer a class extends (``MIGRATES_FROM``); ``to_torch_state_dict`` hands
the adapted rate back to it (docs/optim.md).

Modules: :mod:`~hdfunc.optim.base` (:class:`HDOptimizer`: param groups, option checks, rate state,
scheduler composition, all-reduce, reporting, checkpoints), :mod:`~hdfunc.optim.terms` (the
hypergradient terms g·d, ‖g‖², ‖d‖² as pure functions, plain and CPU-streamed),
:mod:`~hdfunc.optim.sgd` (:class:`SGDHD`, :func:`SGDNHD`), :mod:`~hdfunc.optim.adam`
(:class:`AdamHD`, :class:`AdamWHD`).
"""

from hdfunc.optim.adam import AdamHD, AdamWHD
from hdfunc.optim.base import HD_GROUP_KEYS, HD_STATE_KEYS, MIGRATES_FROM, HDOptimizer
from hdfunc.optim.sgd import SGDHD, SGDNHD

__all__ = ["AdamHD", "AdamWHD", "HDOptimizer", "SGDHD", "SGDNHD"]
