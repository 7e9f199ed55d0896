"""Adam-HD and AdamW-HD (Baydin et al. 2018, Algorithm 3) as torch.optim optimizers: torch's Adam
step (``torch.optim.adam.adam``) with the rate adapted from h_t = -g_t · d_{t-1}, d_{t-1}
recomputed from Adam's moments (no extra buffer)."""

from __future__ import annotations

from typing import Any, Iterable, Optional

import torch
from torch.optim.adam import adam as torch_adam

from hdfunc.hypergradient import HDState
from hdfunc.options import HDOptions
from hdfunc.optim import terms
from hdfunc.optim.base import (GROUP_CHECKS, GroupCheck, HDOptimizer, SchedulerComposition, Scope,
                               UNSUPPORTED_OPTIONS, _check_finite, _check_fraction,
                               _get_scalar_dtype)

__all__ = ["AdamHD", "AdamWHD"]


def _check_betas(name: str, value: Any, group: Optional[dict] = None) -> None:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise TypeError(f"{name} must be a pair (beta1, beta2), got {value!r}")
    for i, beta in enumerate(value):
        _check_fraction(f"{name}[{i}]", beta)


class AdamHD(HDOptimizer):
    """Adam-HD (Algorithm 3) with torch.optim.Adam's step (``weight_decay`` is the coupled L2
    term, as in the paper; :class:`AdamWHD` decouples it):

        h_t = -g_t · d_{t-1},  d_{t-1} = m̂_{t-1} / (√v̂_{t-1} + ε)   (bias corrections of step t-1)
        α_t = α_{t-1} - β h_t,   then torch's Adam step with rate γ_t (= α_t without transition)

    d_{t-1} is recomputed from ``exp_avg``/``exp_avg_sq``: no buffer beyond Adam's. HD and
    optimizer options as in :class:`SGDHD`. ``fused`` (default where supported) runs torch's fused
    Adam kernel with the adapted rate as a tensor; ``foreach`` its multi-tensor kernel.
    amsgrad is not supported.

    Args:
        params: the parameters to optimize, or dicts defining param groups.
        lr: α_0, the initial learning rate.
        hypergrad_lr: β, the hypergradient learning rate.
        betas: (β1, β2), the decay rates of the moments.
        eps: ε, added to √v̂.
        weight_decay: λ of the coupled L2 term.
        maximize: maximize the objective instead of minimizing it.
        hypergrad_scope: "global" (one h_t over all param groups) or "group" (one per group).
        process_group: the process group over which h_t's dot products are summed (a sharded
            optimizer over each rank's own parameters); None: no reduction across ranks.
        scheduler_composition: how a torch LR scheduler's write to a group's ``lr`` combines with
            the adapted rate: "scale" or "reset" (docs/optim.md).
        lr_as_tensor: what a step leaves in a group's ``lr``: γ_t as a Python float (False), as
            a 0-d tensor on the rates' device, with no host sync (True), or None: a tensor off
            the CPU, a float on the CPU (docs/optim.md).
        foreach: use torch's multi-tensor kernel (None: torch's default choice).
        fused: use torch's fused kernel (None: where supported).

    Raises:
        TypeError: an unknown or unsupported HD option, or an option of the wrong type.
        ValueError: an option's value is out of range.
    """

    decoupled_weight_decay = False
    _base_keys = ("betas", "eps", "weight_decay", "decoupled_weight_decay", "maximize", "foreach",
                  "fused")

    def __init__(self, params: Iterable, lr: float = 1e-3, hypergrad_lr: float = 1e-7,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, *, maximize: bool = False, hypergrad_scope: Scope = "global",
                 process_group: Any = None, scheduler_composition: SchedulerComposition = "scale",
                 lr_as_tensor: Optional[bool] = None, foreach: Optional[bool] = None,
                 fused: Optional[bool] = None, **hd_options: Any):
        betas = tuple(betas) if isinstance(betas, list) else betas
        decoupled_weight_decay = self.decoupled_weight_decay
        super().__init__(params, self._defaults(locals()), hypergrad_scope=hypergrad_scope,
                         process_group=process_group,
                         scheduler_composition=scheduler_composition, lr_as_tensor=lr_as_tensor)

    def _option_checks(self) -> dict[str, GroupCheck]:
        return {**GROUP_CHECKS, "betas": _check_betas, "eps": _check_finite}

    def _state_keys(self) -> tuple[frozenset, frozenset]:
        keys = frozenset({"step", "exp_avg", "exp_avg_sq"})
        return keys, keys

    def _torch_class(self, group: dict) -> type:
        return torch.optim.AdamW if group["decoupled_weight_decay"] else torch.optim.Adam

    def _low_precision_hint(self) -> Optional[str]:
        for group in self.param_groups:
            eps = group["eps"]
            for p in group["params"]:
                if (not group["fused"] and p.dtype in terms.LOW_PRECISION
                        and torch.tensor(eps, dtype=p.dtype).item() == 0 and eps != 0):
                    return (f"eps={eps} is 0 in {p.dtype}, so torch's foreach/for-loop Adam "
                            f"kernel, which computes in {p.dtype}, divides by zero where the "
                            "second moment is 0 or underflows, and the parameters become NaN; "
                            "use fused=True (it computes in float32), an eps representable in "
                            f"{p.dtype} (1e-4 is usual for float16), or float32 parameters "
                            "with torch.autocast")
        return None

    def _prepare(self, group: dict) -> dict:
        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise TypeError("AdamHD does not support sparse gradients")
            state = self.state[p]
            if len(state) == 0:  # as torch.optim.Adam: step on the device only for fused
                state["step"] = (torch.zeros((), dtype=_get_scalar_dtype(is_fused=True),
                                             device=p.device) if group["fused"]
                                 else torch.tensor(0.0, dtype=_get_scalar_dtype()))
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        return {"params": params, "grads": grads, "exp_avgs": exp_avgs,
                "exp_avg_sqs": exp_avg_sqs, "steps": steps}

    def _hypergrad_terms(self, group: dict, lists: dict, state: HDState) -> terms.HypergradTerms:
        arguments = (lists["params"], lists["grads"], lists["exp_avgs"], lists["exp_avg_sqs"],
                     lists["steps"])
        options = dict(betas=group["betas"], eps=group["eps"], weight_decay=group["weight_decay"],
                       decoupled_weight_decay=group["decoupled_weight_decay"],
                       maximize=group["maximize"], applied_lr=state.applied_lr,
                       want_sq=group["mode"] == "multiplicative", like=state.lr)
        if self._streamed(lists["params"]):
            return terms.adam_terms_streamed(*arguments, **options,
                                             scratch_bytes=self._scratch_bytes,
                                             buffers=self._scratch())
        return terms.adam_terms(*arguments, **options)

    def _base_step(self, group: dict, lists: dict, state: HDState) -> None:
        beta1, beta2 = group["betas"]
        # Under torch.compile the rate goes to torch's kernel as a tensor, through its capturable
        # path, where the step counts live with the params (on the CPU): a Python float would be
        # a graph break per step and a graph specialised to one value of α.
        capturable = (not group["fused"] and torch.compiler.is_compiling()
                      and lists["steps"][0].device == lists["params"][0].device)
        torch_adam(lists["params"], lists["grads"], lists["exp_avgs"], lists["exp_avg_sqs"], [],
                   lists["steps"], foreach=group["foreach"], capturable=capturable,
                   differentiable=False, fused=group["fused"], grad_scale=None, found_inf=None,
                   has_complex=False, decoupled_weight_decay=group["decoupled_weight_decay"],
                   amsgrad=False, beta1=beta1, beta2=beta2,
                   lr=state.applied_lr if capturable else self._rate_for_kernel(group, state),
                   weight_decay=group["weight_decay"], eps=group["eps"],
                   maximize=group["maximize"])


class AdamWHD(AdamHD):
    """AdamW-HD: :class:`AdamHD` with decoupled weight decay (torch.optim.AdamW's step), the
    optimizer twin of :func:`hdfunc.adamw_hd`. The decay is scaled by the rate, so it is part of
    d_t; d_{t-1} is still recomputed exactly from the moments, θ_{t-1} and γ_{t-1}
    (no extra buffer).

    Args:
        params: the parameters to optimize, or dicts defining param groups.
        lr: α_0, the initial learning rate.
        hypergrad_lr: β, the hypergradient learning rate.
        betas: (β1, β2), the decay rates of the moments.
        eps: ε, added to √v̂.
        weight_decay: λ of the decoupled weight decay.
        **options: the other options of :class:`AdamHD` (HD and optimizer options).
    """

    decoupled_weight_decay = True

    def __init__(self, params: Iterable, lr: float = 1e-3, hypergrad_lr: float = 1e-7,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, **options: Any):
        super().__init__(params, lr, hypergrad_lr, betas, eps, weight_decay, **options)


AdamHD.__doc__ = (AdamHD.__doc__ or "") + HDOptions.docstring(
    exclude=UNSUPPORTED_OPTIONS, value_argument=False)
