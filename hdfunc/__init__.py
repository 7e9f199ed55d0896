"""hdfunc: hypergradient descent (Baydin et al., ICLR 2018) as pure functional update rules.

    rule = hdfunc.adam_hd(lr=1e-3, hypergrad_lr=1e-7)
    state = rule.init(params)
    updates, state = rule.update(grads, state, params)
    params = hdfunc.apply_updates(params, updates)
"""

from hdfunc.base import EmptyState, Rule, Transform, apply_updates, chain
from hdfunc.directions import (DIFFERENTIABLE_EPS_ROOT, add_decayed_weights, add_l2, identity,
                               nesterov, scale_by_adagrad, scale_by_adam, scale_by_lion,
                               scale_by_rms)
from hdfunc.hypergradient import (HDConfig, HDState, LRState, adapt_rates, find_lr_state, freeze_hypergrad_lr,
                                  freeze_lr, get_applied_lr, get_lr, hypergradient, inverse_square,
                                  replace_lr_state, scale_by_lr)
from hdfunc.rules import (HD_OF, RULES, adam, adam_hd, adamw, adamw_hd, base_rule, hd_rule, sgd,
                          sgd_hd, sgdn, sgdn_hd)

__version__ = "0.1.0"

__all__ = [
    "DIFFERENTIABLE_EPS_ROOT", "EmptyState", "HDConfig", "HDState", "adapt_rates", "freeze_hypergrad_lr", "HD_OF", "LRState", "RULES", "Rule", "Transform", "adam", "adam_hd",
    "adamw", "adamw_hd", "add_decayed_weights", "add_l2", "apply_updates", "base_rule", "chain",
    "find_lr_state", "freeze_lr", "get_applied_lr", "get_lr", "hd_rule", "hypergradient", "identity",
    "inverse_square", "nesterov", "replace_lr_state", "scale_by_adagrad", "scale_by_adam", "scale_by_lion",
    "scale_by_lr", "scale_by_rms", "sgd", "sgd_hd", "sgdn", "sgdn_hd",
]
