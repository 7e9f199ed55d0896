"""hdfunc.hyperdescent: HD on any hyperparameter by forward mode (issue 12).

The analytic HD rules are reproduced to rounding (global, per tensor, per element, with coupled
weight decay), and every carried tangent / hypergradient is checked against reverse-mode autodiff
and finite differences of the frozen previous step (the greedy one-step definition) on the
objective the rule descends (with its coupled L2 penalty)."""

import functools
import re
from pathlib import Path

import pytest
import torch
from torch.func import grad, jacrev, vmap

import hdfunc
from hdfunc.hyperdescent import PROBABILITY_HIGH, hyperdescent, parse_name
from hdfunc.tree import tree_leaves, tree_map, tree_stack
from verification.problems import make_problem, perturbed_params


def run(rule, problem, steps, params=None):
    """[(params before step, state before step, grads)] and the final (params, state)."""
    params = problem.params if params is None else params
    state = rule.init(params)
    history = []
    for _ in range(steps):
        g = grad(problem.loss)(params)
        history.append((params, state, g))
        u, state = rule.update(g, state, params)
        params = hdfunc.apply_updates(params, u)
    history.append((params, state, None))
    return history


def max_diff(a, b):
    return max((x - y).abs().max().item() for x, y in zip(tree_leaves(a), tree_leaves(b)))


ANALYTIC = [
    (hdfunc.sgd, hdfunc.sgd_hd, {}, 1e-3),
    (hdfunc.sgdn, hdfunc.sgdn_hd, {"momentum": 0.9}, 1e-3),
    (hdfunc.rules.sgdm, hdfunc.rules.sgdm_hd, {"momentum": 0.9}, 1e-3),
    (hdfunc.adam, hdfunc.adam_hd, {"betas": (0.9, 0.999)}, 1e-4),
    (hdfunc.adamw, hdfunc.adamw_hd, {"weight_decay": 0.1}, 1e-4),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("mode", ["additive", "multiplicative"])
@pytest.mark.parametrize("problem_name", ["quadratic", "mlp"])
@pytest.mark.parametrize("base,analytic,options,beta", ANALYTIC,
                         ids=[a[0].__name__ for a in ANALYTIC])
def test_reproduces_analytic_hd_rule(base, analytic, options, beta, problem_name, mode, dtype):
    """hyperdescent(base, {"lr": β}) is the analytic <base>_hd: params and α agree to rounding
    (on CPU in fact bit for bit) over 20 steps, since ∂u_{t-1}/∂α = -d_{t-1} exactly."""
    problem = make_problem(problem_name, dtype=dtype)
    tol = 1e-13 if dtype == torch.float64 else 1e-6
    beta = 0.02 if mode == "multiplicative" else beta
    ours = run(hyperdescent(base, {"lr": beta}, mode=mode, lr=0.02, **options), problem, 20)
    theirs = run(analytic(lr=0.02, hypergrad_lr=beta, mode=mode, **options), problem, 20)
    alphas = []
    for (p1, s1, _), (p2, s2, _) in zip(ours[1:], theirs[1:]):
        assert max_diff(p1, p2) <= tol * (1 + max(p.abs().max().item() for p in
                                                  tree_leaves(p2)))
        assert abs(s1.hyperparams["lr"].item() - hdfunc.get_lr(s2).item()) <= tol * 0.02
        alphas.append(s1.hyperparams["lr"].item())
    assert alphas[-1] != 0.02  # α was adapted
    assert ours[-1][1].count.item() == 20 and ours[-1][1].skipped.item() == 0


@pytest.mark.parametrize("base,analytic,options,extra", [
    (hdfunc.sgdn, hdfunc.sgdn_hd, {"momentum": 0.9}, {"momentum": 0.0}),
    (hdfunc.adam, hdfunc.adam_hd, {}, {"betas[0]": 0.0, "betas[1]": 0.0, "eps": 0.0}),
])
def test_several_hyperparameters_share_one_primal_step(base, analytic, options, extra):
    """With several adapted hyperparameters (tangents batched by jacfwd), a zero rate on all but
    α still reproduces the analytic rule: the step is the primal of the batched pass."""
    problem = make_problem("mlp")
    ours = run(hyperdescent(base, {"lr": 1e-3, **extra}, lr=0.02, **options), problem, 15)
    theirs = run(analytic(lr=0.02, hypergrad_lr=1e-3, **options), problem, 15)
    for (p1, s1, _), (p2, s2, _) in zip(ours[1:], theirs[1:]):
        assert max_diff(p1, p2) <= 1e-13
        assert abs(s1.hyperparams["lr"].item() - hdfunc.get_lr(s2).item()) <= 1e-15
    assert set(ours[-1][1].tangents) == {"lr", *extra}


def test_zero_hypergrad_lr_is_the_base_rule():
    problem = make_problem("mlp")
    ours = run(hyperdescent(hdfunc.adam, {"betas[0]": 0.0, "lr": 0.0}, lr=0.01), problem, 10)
    theirs = run(hdfunc.adam(lr=0.01), problem, 10)
    assert max_diff(ours[-1][0], theirs[-1][0]) <= 1e-14


# ----------------------------------------------------------------------------- the oracle


def frozen_step(factory, values, base_state, g, params, fixed):
    """u_{t-1}(λ): the base rule's update at the hyperparameters ``values`` from the frozen state
    of step t-2 (α written into its fixed-rate state, as freeze_lr does), built independently of
    hdfunc.hyperdescent's own plumbing."""
    kwargs = dict(fixed)
    for name, value in values.items():
        key, index = parse_name(name)
        if index is None:
            kwargs[key] = value
        else:
            members = list(kwargs[key])
            members[index] = value
            kwargs[key] = tuple(members)
    if "lr" in values:
        base_state = hdfunc.freeze_lr(base_state, values["lr"])
    u, _ = factory(**kwargs).update(g, base_state, params)
    return u


def coupled_decay(factory, values, fixed):
    """The coupled L2 coefficient of the objective (0 for adamw, whose decay is decoupled)."""
    if factory is hdfunc.adamw:
        return 0.0
    value = values.get("weight_decay", fixed.get("weight_decay", 0.0))
    return value.detach() if isinstance(value, torch.Tensor) else value


ORACLE_CASES = [
    (hdfunc.sgdn, {"momentum": 1e-3}, {"lr": 0.02, "momentum": 0.9}),
    (hdfunc.sgdn, {"lr": 1e-3, "momentum": 1e-3}, {"lr": 0.02, "momentum": 0.8}),
    (hdfunc.adam, {"betas[0]": 1e-3}, {"lr": 0.01, "betas": (0.9, 0.999)}),
    (hdfunc.adam, {"lr": 1e-4, "betas[0]": 1e-3, "betas[1]": 1e-3},
     {"lr": 0.01, "betas": (0.8, 0.99)}),
    (hdfunc.adamw, {"weight_decay": 1e-2}, {"lr": 0.01, "weight_decay": 0.1}),
    (hdfunc.sgd, {"weight_decay": 1e-2}, {"lr": 0.02, "weight_decay": 0.05}),
    (hdfunc.adam, {"lr": 1e-4, "betas[0]": 1e-3},
     {"lr": 0.01, "betas": (0.9, 0.999), "weight_decay": 0.1}),
]


@pytest.mark.parametrize("factory,rates,fixed", ORACLE_CASES,
                         ids=[f"{c[0].__name__}-{'+'.join(c[1])}" for c in ORACLE_CASES])
def test_tangents_and_hypergradients_match_autodiff(factory, rates, fixed):
    """At every step: the carried ∂u_{t-1}/∂λ equals reverse-mode autodiff of the frozen step
    u_{t-1}(λ) at λ_{t-1}, and h_λ,t equals d/dλ f(θ_{t-2} + u_{t-1}(λ)) (reverse mode, and
    central finite differences)."""
    problem = make_problem("mlp")
    history = run(hyperdescent(factory, rates, **fixed), problem, 8)
    names = list(rates)
    for k in range(len(history) - 2):
        params, state, g = history[k]  # θ_{t-2}, state before step t-1, g_{t-1}
        after = history[k + 1][1]  # state after step t-1: λ_{t-1}, ∂u_{t-1}/∂λ
        following = history[k + 2][1]  # state after step t: h_λ,t
        values = dict(after.hyperparams)

        def u_of(*lams):
            return frozen_step(factory, dict(zip(names, lams)), state.base, g, params, fixed)

        primals = tuple(values[n] for n in names)
        for i, name in enumerate(names):
            expected = jacrev(u_of, argnums=i)(*primals)  # reverse mode
            got = after.tangents[name]
            scale = max(x.abs().max().item() for x in tree_leaves(expected))
            # (Adam's first step: ∂u_1/∂β1 = 0 exactly, both sides give rounding noise ~1e-17)
            assert max_diff(got, expected) <= 1e-10 * scale + 1e-15, (k, name)

        # the objective the rule descends: f, plus (c/2)‖θ‖² for a coupled L2 term c (sgd's
        # weight_decay; adamw's is decoupled), c at its value of step t-1 (not differentiated)
        c = coupled_decay(factory, values, fixed)

        def loss_at(*lams):
            theta = hdfunc.apply_updates(params, u_of(*lams))
            return problem.loss(theta) + 0.5 * c * sum((x * x).sum() for x in tree_leaves(theta))

        exact = grad(loss_at, argnums=tuple(range(len(names))))(*primals)
        for i, name in enumerate(names):
            h = following.hypergrad[name].item()
            assert abs(h - exact[i].item()) <= 1e-9 * abs(exact[i].item()) + 1e-15, (k, name)
            eps = 1e-6
            plus = list(primals)
            minus = list(primals)
            plus[i] = primals[i] + eps
            minus[i] = primals[i] - eps
            fd = (loss_at(*plus) - loss_at(*minus)).item() / (2 * eps)
            assert abs(h - fd) <= 1e-5 * abs(h) + 1e-10, (k, name, h, fd)


def test_rate_law_is_applied_to_the_hypergradient():
    """λ_t = clamp(λ_{t-1} - β h_λ,t) with the h the state reports."""
    problem = make_problem("mlp")
    history = run(hyperdescent(hdfunc.sgdn, {"momentum": 1e-2, "lr": 1e-3}, lr=0.02,
                               momentum=0.5), problem, 6)
    for (_, before, _), (_, after, _) in zip(history[:-1], history[1:]):
        for name, beta in (("momentum", 1e-2), ("lr", 1e-3)):
            expected = before.hyperparams[name] - beta * after.hypergrad[name]
            assert torch.equal(after.hyperparams[name], expected.clamp(min=0)
                               if name == "lr" else expected.clamp(0, PROBABILITY_HIGH))
    assert history[-1][1].hyperparams["momentum"].item() != 0.5


# ----------------------------------------------------------------------------- guards


def test_projections_keep_hyperparameters_in_range():
    problem = make_problem("mlp")
    wild = run(hyperdescent(hdfunc.sgdn, {"momentum": 1e6}, lr=0.02, momentum=0.5), problem, 8)
    momenta = [s.hyperparams["momentum"].item() for _, s, _ in wild]
    assert all(0.0 <= m <= PROBABILITY_HIGH for m in momenta)
    assert {0.0, PROBABILITY_HIGH} & set(momenta)  # a bound was hit
    free = run(hyperdescent(hdfunc.sgdn, {"momentum": 1e6}, bounds={"momentum": (None, None)},
                            lr=0.02, momentum=0.5), problem, 8)
    assert any(not 0.0 <= s.hyperparams["momentum"].item() < 1 for _, s, _ in free)
    lr = run(hyperdescent(hdfunc.sgd, {"lr": 1e6}, lr=0.02), problem, 5)
    assert all(s.hyperparams["lr"].item() >= 0 for _, s, _ in lr)
    free = run(hyperdescent(hdfunc.sgd, {"lr": 1e6}, bounds={"lr": (None, None)}, lr=0.02),
               problem, 5)
    assert any(s.hyperparams["lr"].item() < 0 for _, s, _ in free)  # the paper's unbounded α


def test_nonfinite_hypergradient_is_skipped_and_counted():
    problem = make_problem("quadratic")
    rule = hyperdescent(hdfunc.sgdn, {"lr": 1e-3, "momentum": 1e-3}, lr=0.02, momentum=0.9)
    params = problem.params
    state = rule.init(params)
    g = grad(problem.loss)(params)
    _, state = rule.update(g, state, params)
    bad = tree_map(lambda x: torch.full_like(x, float("inf")), g)
    _, after = rule.update(bad, state, params)
    assert after.skipped.item() == 1
    for name in ("lr", "momentum"):
        assert torch.equal(after.hyperparams[name], state.hyperparams[name])


# ----------------------------------------------------------------------------- transforms


def test_vmap_over_seeds_matches_a_loop():
    problem = make_problem("mlp")
    rule = hyperdescent(hdfunc.adam, {"lr": 1e-4, "betas[0]": 1e-3}, lr=0.01)
    starts = [perturbed_params(problem, 0.1, seed) for seed in range(3)]

    def train(params):
        state = rule.init(params)
        for _ in range(4):
            g = grad(problem.loss)(params)
            u, state = rule.update(g, state, params)
            params = hdfunc.apply_updates(params, u)
        return params, state.hyperparams

    batched_params, batched_hyper = vmap(train)(tree_stack(starts))
    for i, start in enumerate(starts):
        p, hyper = train(start)
        assert max_diff(tree_map(lambda x: x[i], batched_params), p) <= 1e-12
        for name in hyper:
            assert abs(batched_hyper[name][i].item() - hyper[name].item()) <= 1e-12


@pytest.mark.parametrize("rates", [{"lr": 1e-3, "momentum": 1e-3}, {"lr": 1e-3}],
                         ids=["rebuilt", "built-once"])
def test_torch_compile_matches_eager(rates):
    problem = make_problem("quadratic")
    rule = hyperdescent(hdfunc.sgdn, rates, lr=0.02)
    params = problem.params
    state = rule.init(params)
    g = grad(problem.loss)(params)
    _, state = rule.update(g, state, params)
    compiled = torch.compile(rule.update, backend="aot_eager", fullgraph=False)
    got = compiled(g, state, params)
    want = rule.update(g, state, params)
    assert max_diff(got, want) <= 1e-12


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("rates,options,message", [
    ({}, {}, "non-empty"),
    ({"betas[2]": 1e-3}, {}, "no member 2"),
    ({"beta1": 1e-3}, {}, "no starting value"),
    ({"lr[": 1e-3}, {}, "cannot read"),
    ({"lr": -1.0}, {}, "hypergrad_lr"),
    ({"lr": 1e-3}, {"bounds": {"momentum": (0, 1)}}, "not adapted"),
    ({"lr": 1e-3}, {"mode": "exp"}, "mode"),
])
def test_bad_arguments_are_refused(rates, options, message):
    with pytest.raises((TypeError, ValueError), match=message):
        hyperdescent(hdfunc.adam, rates, lr=0.01, **options)


def test_factory_errors_name_the_value():
    with pytest.raises(ValueError, match="momentum"):
        hyperdescent(hdfunc.sgdn, {"momentum": 1e-3}, lr=0.1, momentum=1.5)


def test_user_factory_and_partial():
    """A user's factory built on base_rule, adapting a hyperparameter of its direction."""
    def rms(lr, decay=0.9, eps=1e-8):
        return hdfunc.base_rule(hdfunc.scale_by_rms(decay, eps), lr, name="rms")

    problem = make_problem("mlp")
    history = run(hyperdescent(rms, {"decay": 1e-3, "lr": 1e-4}, lr=1e-3), problem, 5)
    assert history[-1][1].hyperparams["decay"].item() != 0.9
    frozen = functools.partial(hdfunc.sgdn, momentum=0.5)
    history = run(hyperdescent(frozen, {"lr": 1e-3}, lr=0.02), problem, 3)
    assert history[-1][1].count.item() == 3


def test_docs_example_runs(capsys):
    """docs/hyperdescent.md: its Python blocks run as written and print the adapted values."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "hyperdescent.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks
    namespace: dict = {"__name__": "__docs__"}
    for block in blocks:
        exec(compile(block, "hyperdescent.md", "exec"), namespace)
    out = capsys.readouterr().out
    assert "'momentum':" in out and "loss 7.0e-14" in out and "loss 1.2e-04" in out


def test_adapting_weight_decay_from_zero_reads_params():
    rule = hyperdescent(hdfunc.sgd, {"weight_decay": 1e-2}, lr=0.02, weight_decay=0.0)
    assert rule.needs_params
    problem = make_problem("quadratic")
    state = rule.init(problem.params)
    with pytest.raises(ValueError, match="needs params"):
        rule.update(grad(problem.loss)(problem.params), state)
    history = run(rule, problem, 4)
    assert history[-1][1].skipped.item() == 0


def test_vmap_over_a_grid_of_hypergradient_rates():
    """β_λ lives in the state: one update function serves a grid of rates (stacked states)."""
    problem = make_problem("mlp")
    rule = hyperdescent(hdfunc.sgdn, {"lr": 1e-3, "momentum": 1e-3}, lr=0.02, momentum=0.8)
    grid = [(0.0, 0.0), (1e-3, 1e-2), (1e-2, 1e-3)]
    params = problem.params
    states = [rule.init(params)._replace(hypergrad_lr={
        "lr": torch.tensor(a, dtype=torch.float64), "momentum": torch.tensor(m, dtype=torch.float64)})
        for a, m in grid]

    def train(state):
        p = params
        for _ in range(4):
            g = grad(problem.loss)(p)
            u, state = rule.update(g, state, p)
            p = hdfunc.apply_updates(p, u)
        return p, state.hyperparams

    batched_params, batched_hyper = vmap(train)(tree_stack(states))
    for i, (a, m) in enumerate(grid):
        p, hyper = train(states[i])
        assert max_diff(tree_map(lambda x: x[i], batched_params), p) <= 1e-12
        for name in hyper:
            assert abs(batched_hyper[name][i].item() - hyper[name].item()) <= 1e-12


@pytest.mark.parametrize("granularity", ["global", "tensor", "element"])
@pytest.mark.parametrize("base,options,beta,kappa", [
    (hdfunc.sgd_hd, {}, 1e-4, 1e-5), (hdfunc.sgdn_hd, {"momentum": 0.9}, 1e-5, 1e-7),
    (hdfunc.adam_hd, {}, 1e-4, 1e-3)], ids=["sgd", "sgdn", "adam"])
def test_adapting_beta_of_an_hd_rule_is_the_analytic_higher_order_rule(base, options, beta, kappa,
                                                                       granularity):
    """hyperdescent(<rule>_hd, {"hypergrad_lr": κ}) adapts β by h_β,t = g_t · ∂u_{t-1}/∂β with
    ∂u_{t-1}/∂β = d_{t-1} ⊙ h_{t-1} (u_{t-1} = -α_{t-1}(β) d_{t-1}, α_{t-1} = α_{t-2} - β h_{t-1}):
    h_β,t = -Σ_j h_t,j h_t-1,j, the analytic higher-order hypergradient (§5.2) in the additive
    mode, so the two rules take the same steps (docs/hyperdescent.md, "Adapting β")."""
    problem = make_problem("quadratic")
    hd_options = hdfunc.HDOptions(lr_granularity=granularity)
    ours = run(hyperdescent(base, {"hypergrad_lr": kappa}, lr=0.01, hypergrad_lr=beta,
                            options=hd_options, **options), problem, 15)
    theirs = run(base(0.01, beta, options=hd_options.replace(hyper_hypergrad_lr=kappa),
                      **options), problem, 15)
    (p1, s1, _), (p2, s2, _) = ours[-1], theirs[-1]
    assert max_diff(p1, p2) <= 1e-12 * max(x.abs().max().item() for x in tree_leaves(p2))
    beta_theirs = hdfunc.find_lr_state(s2).hypergrad_lr
    beta_ours = hdfunc.get_hyperparams(s1)["hypergrad_lr"]
    torch.testing.assert_close(beta_ours, beta_theirs, rtol=1e-12, atol=0)
    assert abs(beta_theirs.item() - beta) > 1e-3 * beta  # β did move


def test_adapting_beta_needs_an_hd_rule_without_higher_order():
    params = {"x": torch.zeros(2, dtype=torch.float64)}
    with pytest.raises(ValueError, match="adapting 'hypergrad_lr' needs an HD rule"):
        def not_hd(lr=0.1, hypergrad_lr=0.0):  # takes the name, keeps no HD state
            return hdfunc.sgd(lr)

        hyperdescent(not_hd, {"hypergrad_lr": 1e-3}).init(params)
    with pytest.raises(ValueError, match="already adapts it"):
        hyperdescent(hdfunc.sgd_hd, {"hypergrad_lr": 1e-3}, lr=0.1, hypergrad_lr=1e-3,
                     hyper_hypergrad_lr=1e-2).init(params)


# ----------------------------------------------------------------------------- granularity


GRANULAR = [
    (hdfunc.sgd, hdfunc.sgd_hd, {}, 1e-3),
    (hdfunc.sgdn, hdfunc.sgdn_hd, {"momentum": 0.9}, 1e-3),
    (hdfunc.adam, hdfunc.adam_hd, {"betas": (0.9, 0.999)}, 1e-4),
]


@pytest.mark.parametrize("mode", ["additive", "multiplicative"])
@pytest.mark.parametrize("granularity", ["tensor", "element"])
@pytest.mark.parametrize("base,analytic,options,beta", GRANULAR,
                         ids=[a[0].__name__ for a in GRANULAR])
def test_per_tensor_and_per_element_lr_reproduce_the_analytic_rule(base, analytic, options, beta,
                                                                   granularity, mode):
    """hyperdescent(base, {"lr": β}, granularity=g) is <base>_hd(lr_granularity=g) in float64:
    every rate and the params to rounding over 20 steps; the rates did separate (so a global
    rate could not pass)."""
    problem = make_problem("mlp")
    beta = 0.02 if mode == "multiplicative" else beta
    ours = run(hyperdescent(base, {"lr": beta}, mode=mode, granularity=granularity, lr=0.02,
                            **options), problem, 20)
    theirs = run(analytic(lr=0.02, hypergrad_lr=beta, mode=mode, lr_granularity=granularity,
                          **options), problem, 20)
    for (p1, s1, _), (p2, s2, _) in zip(ours[1:], theirs[1:]):
        assert max_diff(p1, p2) <= 1e-13 * (1 + max(p.abs().max().item()
                                                    for p in tree_leaves(p2)))
        assert max_diff(s1.hyperparams["lr"], hdfunc.get_lr(s2)) <= 1e-13 * 0.02
    rates = torch.cat([r.reshape(-1) for r in tree_leaves(ours[-1][1].hyperparams["lr"])])
    assert rates.numel() == (4 if granularity == "tensor" else 75)
    assert (rates.max() - rates.min()).item() > 1e-9  # separate rates (rounding: ~1e-15)
    assert ours[-1][1].skipped.item() == 0


GRANULAR_ORACLE = [
    (hdfunc.sgdn, {"momentum": 1e-3}, "tensor", {"lr": 0.02, "momentum": 0.9}),
    (hdfunc.sgdn, {"lr": 1e-3, "momentum": 1e-3}, {"momentum": "tensor"},
     {"lr": 0.02, "momentum": 0.8}),
    (hdfunc.adam, {"betas[0]": 1e-3, "betas[1]": 1e-3}, "tensor",
     {"lr": 0.01, "betas": (0.8, 0.99)}),
    (hdfunc.sgd, {"lr": 1e-3}, "element", {"lr": 0.02}),
    (hdfunc.sgd, {"weight_decay": 1e-2}, "tensor", {"lr": 0.02, "weight_decay": 0.05}),
    (hdfunc.adam, {"lr": 1e-4, "betas[0]": 1e-3}, {"lr": "element", "betas[0]": "tensor"},
     {"lr": 0.01, "betas": (0.9, 0.999), "weight_decay": 0.1}),
]


@pytest.mark.parametrize("factory,rates,granularity,fixed", GRANULAR_ORACLE,
                         ids=[f"{c[0].__name__}-{'+'.join(c[1])}-{c[2]}" for c in GRANULAR_ORACLE])
def test_granular_hypergradients_match_autodiff(factory, rates, granularity, fixed):
    """Per tensor / per element: h_λ,t has one entry per tensor (element) of λ, each the exact
    ∂/∂λ_j f(θ_{t-2} + u_{t-1}(λ)) of the penalised objective by reverse mode, where u_{t-1}(λ)
    applies to tensor i the base rule with tensor i's λ (its own state, frozen), and λ_t follows
    the additive law entry by entry."""
    problem = make_problem("mlp")
    history = run(hyperdescent(factory, rates, granularity=granularity, **fixed), problem, 6)
    names = list(rates)
    grains = granularity if isinstance(granularity, dict) else dict.fromkeys(names, granularity)
    for k in range(len(history) - 2):
        params, state, g = history[k]
        after, following = history[k + 1][1], history[k + 2][1]
        spec_leaves = tree_leaves(params)
        values = dict(after.hyperparams)

        def u_of(*lams):
            steps = []
            for i, (p, gi, base) in enumerate(zip(spec_leaves, tree_leaves(g), state.base)):
                mine = {n: tree_leaves(v)[i] if grains.get(n, "global") != "global" else v
                        for n, v in zip(names, lams)}
                if grains.get("lr") == "element":  # α lives in the state; a 0-d placeholder
                    base = hdfunc.freeze_lr(base, mine.pop("lr"))
                steps.append(frozen_step(factory, mine, base, [gi], [p], fixed)[0])
            return [s for s in steps]

        c = coupled_decay(factory, values, fixed)  # per tensor for a per-tensor weight decay
        c = [x.detach() for x in tree_leaves(c)] if isinstance(c, dict) else [c] * len(spec_leaves)

        def loss_at(*lams):
            theta = [p + u for p, u in zip(spec_leaves, u_of(*lams))]
            rebuilt = torch.utils._pytree.tree_unflatten(
                theta, torch.utils._pytree.tree_structure(params))
            return problem.loss(rebuilt) + 0.5 * sum(ci * (x * x).sum()
                                                     for ci, x in zip(c, theta))

        primals = tuple(values[n] for n in names)
        exact = grad(loss_at, argnums=tuple(range(len(names))))(*primals)
        for i, name in enumerate(names):
            got = following.hypergrad[name]
            scale = max(x.abs().max().item() for x in tree_leaves(exact[i]))
            assert max_diff(got, exact[i]) <= 1e-9 * scale + 1e-15, (k, name)
            expected = tree_map(lambda a, h: a - rates[name] * h, after.hyperparams[name], got)
            for e, a in zip(tree_leaves(expected), tree_leaves(following.hyperparams[name])):
                lo, hi = (0.0, None) if name in ("lr", "weight_decay") else (0.0, PROBABILITY_HIGH)
                torch.testing.assert_close(a, e.clamp(min=lo, max=hi), rtol=0, atol=0)
    for name in names:
        if grains.get(name, "global") != "global":
            leaves = tree_leaves(history[-1][1].hyperparams[name])
            flat = torch.cat([x.reshape(-1) for x in leaves])
            assert flat.max() > flat.min(), name  # one λ per tensor / element, apart


def test_per_tensor_rule_with_zero_rates_is_the_base_rule():
    """Applied tensor by tensor (with a per-tensor weight-decay mask resolved from a callable),
    the base rule takes the steps of the whole-tree rule."""
    problem = make_problem("mlp")
    mask = lambda ps: {k: {"weight": True, "bias": False} for k in ps}  # noqa: E731
    ours = run(hyperdescent(hdfunc.adam, {"betas[0]": 0.0, "lr": 0.0}, granularity="tensor",
                            lr=0.01, weight_decay=0.1, weight_decay_mask=mask), problem, 10)
    theirs = run(hdfunc.adam(lr=0.01, weight_decay=0.1, weight_decay_mask=mask), problem, 10)
    assert max_diff(ours[-1][0], theirs[-1][0]) <= 1e-14
    unmasked = run(hdfunc.adam(lr=0.01, weight_decay=0.1), problem, 10)
    assert max_diff(ours[-1][0], unmasked[-1][0]) > 1e-6  # the mask mattered


def test_granular_rule_vmaps_and_compiles():
    problem = make_problem("mlp")
    rule = hyperdescent(hdfunc.sgdn, {"lr": 1e-3, "momentum": 1e-3},
                        granularity={"lr": "element", "momentum": "tensor"}, lr=0.02)
    starts = [perturbed_params(problem, 0.1, seed) for seed in range(2)]

    def train(params, update=rule.update):
        state = rule.init(params)
        for _ in range(3):
            g = grad(problem.loss)(params)
            u, state = update(g, state, params)
            params = hdfunc.apply_updates(params, u)
        return params, state.hyperparams

    batched, _ = vmap(train)(tree_stack(starts))
    for i, start in enumerate(starts):
        assert max_diff(tree_map(lambda x: x[i], batched), train(start)[0]) <= 1e-12
    compiled = torch.compile(rule.update, backend="aot_eager", fullgraph=False)
    assert max_diff(train(starts[0], compiled)[0], train(starts[0])[0]) <= 1e-12


@pytest.mark.parametrize("factory,rates,options,message", [
    (hdfunc.sgdn, {"momentum": 1e-3}, {"granularity": "element"}, "'lr' only"),
    (hdfunc.sgdn, {"lr": 1e-3}, {"granularity": "layer"}, "granularity of 'lr'"),
    (hdfunc.sgdn, {"lr": 1e-3}, {"granularity": {"momentum": "tensor"}}, "not adapted"),
    (hdfunc.sgd_hd, {"hypergrad_lr": 1e-3}, {"granularity": "tensor", "hypergrad_lr": 1e-3},
     "globally only"),
    (hdfunc.sgdn_hd, {"momentum": 1e-3}, {"granularity": "tensor", "hypergrad_lr": 1e-3},
     "adapts a learning rate itself"),
    (hdfunc.sgdn, {"lr": 1e-3}, {"coupled_weight_decay": 1}, "coupled_weight_decay"),
])
def test_bad_granularity_and_decay_options_are_refused(factory, rates, options, message):
    with pytest.raises((TypeError, ValueError), match=message):
        hyperdescent(factory, rates, lr=0.1, **options)


# ----------------------------------------------------------------------------- coupled decay


@pytest.mark.parametrize("granularity", ["global", "tensor"])
@pytest.mark.parametrize("mode", ["additive", "multiplicative"])
@pytest.mark.parametrize("base,analytic,options", [
    (hdfunc.sgd, hdfunc.sgd_hd, {}),
    (hdfunc.sgdn, hdfunc.sgdn_hd, {"momentum": 0.9}),
    (hdfunc.adam, hdfunc.adam_hd, {}),
    (hdfunc.adam, hdfunc.adam_hd, {"weight_decay_mask": lambda ps: {
        k: {"weight": True, "bias": False} for k in ps}}),
], ids=["sgd", "sgdn", "adam", "adam-masked"])
def test_coupled_weight_decay_matches_the_analytic_rule(base, analytic, options, mode,
                                                        granularity):
    """With a coupled L2 term both use the gradient of the penalised objective,
    g_t + wd θ_{t-1}: the trajectories agree to rounding; with the raw g_t (the penalty left out,
    coupled_weight_decay=False) they do not."""
    problem = make_problem("mlp")
    beta = 0.02 if mode == "multiplicative" else 1e-3
    kwargs = dict(lr=0.02, weight_decay=0.3, **options)
    ours = run(hyperdescent(base, {"lr": beta}, mode=mode, granularity=granularity, **kwargs),
               problem, 20)
    theirs = run(analytic(hypergrad_lr=beta, mode=mode, lr_granularity=granularity, **kwargs),
                 problem, 20)
    for (p1, s1, _), (p2, s2, _) in zip(ours[1:], theirs[1:]):
        assert max_diff(p1, p2) <= 1e-13 * (1 + max(p.abs().max().item()
                                                    for p in tree_leaves(p2)))
        assert max_diff(s1.hyperparams["lr"], hdfunc.get_lr(s2)) <= 1e-13 * 0.02
    raw = run(hyperdescent(base, {"lr": beta}, mode=mode, granularity=granularity,
                           coupled_weight_decay=False, **kwargs), problem, 20)
    assert max_diff(raw[-1][1].hyperparams["lr"], ours[-1][1].hyperparams["lr"]) > 1e-9


def test_coupled_weight_decay_is_read_from_the_factory():
    assert hyperdescent(hdfunc.adam, {"lr": 1e-3}, lr=0.1,
                        weight_decay=0.1).hyperparams["coupled_weight_decay"]
    assert not hyperdescent(hdfunc.adam, {"lr": 1e-3}, lr=0.1, weight_decay=0.1,
                            decoupled_weight_decay=True).hyperparams["coupled_weight_decay"]
    assert not hyperdescent(hdfunc.adamw, {"lr": 1e-3}, lr=0.1,
                            weight_decay=0.1).hyperparams["coupled_weight_decay"]
    assert not hyperdescent(hdfunc.adam, {"lr": 1e-3},
                            lr=0.1).hyperparams["coupled_weight_decay"]  # weight decay 0
    assert hyperdescent(hdfunc.sgd, {"weight_decay": 1e-3}, lr=0.1,
                        weight_decay=0.0).hyperparams["coupled_weight_decay"]  # adapted from 0


# ----------------------------------------------------------------------------- eager cost


def test_rule_is_built_once_when_only_state_held_hyperparameters_are_adapted():
    """α (and an HD rule's β) are written into the state: the factory is not called per step;
    a closure hyperparameter (momentum) needs the rule rebuilt with its λ at every step."""
    calls = []

    def counting(**kwargs):
        calls.append(kwargs)
        return hdfunc.sgdn(**kwargs)

    problem = make_problem("quadratic")
    for rates, per_step in (({"lr": 1e-3}, 0), ({"lr": 1e-3, "momentum": 1e-3}, 1)):
        rule = hyperdescent(counting, rates, lr=0.02, momentum=0.9)
        run(rule, problem, 1)
        before = len(calls)
        run(rule, problem, 5)
        assert len(calls) - before == 1 + 5 * per_step  # init, then the steps
