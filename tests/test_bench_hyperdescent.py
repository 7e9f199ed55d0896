"""benchmarks/bench_hyperdescent.py (issue 12, "Cost"): its candidates compute what they claim,
its state-bytes accounting is right, and its CLI writes the tables (on a tiny parameter set,
eager only: a few seconds)."""

import importlib.util
from pathlib import Path

import pytest
import torch

import hdfunc
from hdfunc.tree import tree_leaves

PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_hyperdescent.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_hyperdescent_under_test", PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY = [(3, 4), (4,), (2, 3, 2)]


def run(rule, params, grads_list):
    """The updates and states of len(grads_list) steps (params moved by the updates)."""
    state = rule.init(params)
    out = []
    for grads in grads_list:
        updates, state = rule.update(grads, state, params)
        params = hdfunc.apply_updates(params, updates)
        out.append((updates, state))
    return out


def max_diff(a, b):
    return max((x - y).abs().max().item() for x, y in zip(tree_leaves(a), tree_leaves(b)))


@pytest.mark.parametrize("family", ["adam", "sgd", "sgdn", "sgdm"])
def test_hyperdescent_candidates_equal_the_analytic_rule(bench, family, one_torch_thread):
    """hyperdescent(<family>, {lr}) gives the analytic HD rule's updates to 1e-12 in float64
    over 3 steps, and so does the two-hyperparameter candidate with a zero rate on the second;
    the base rule does not (α is adapted), so a candidate built wrongly fails."""
    params, _ = bench.make_inputs(TINY, "cpu", torch.float64, seed=1)
    gen = torch.Generator().manual_seed(2)
    grads_list = [[torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in params]
                  for _ in range(3)]
    specs = bench.rule_specs(family, lr=0.01, hypergrad_lr=1e-4, second_hypergrad_lr=0.0)
    kinds = [(s.kind, len(s.adapted)) for s in specs]
    assert kinds == [("base", 0), ("analytic", 1), ("hyperdescent", 1)] + (
        [] if family == "sgd" else [("hyperdescent", 2)])
    runs = {(s.kind, len(s.adapted)): run(s.rule, params, grads_list) for s in specs}
    analytic = runs[("analytic", 1)]
    for key in [k for k in runs if k[0] == "hyperdescent"]:
        for (u1, _), (u2, _) in zip(runs[key], analytic):
            assert max_diff(u1, u2) <= 1e-12
        assert runs[key][-1][1].hyperparams["lr"].item() != 0.01  # α moved
    assert max_diff(runs[("base", 0)][-1][0], analytic[-1][0]) > 1e-9


def test_state_bytes_of_a_hand_built_state(bench):
    state = {"m": torch.zeros(3, 4, dtype=torch.float64),  # 96 bytes
             "rest": (torch.zeros(5, dtype=torch.float32), None, 3),  # 20 bytes, None, an int
             "count": torch.zeros((), dtype=torch.int64),  # 8 bytes
             "half": [torch.zeros(7, dtype=torch.float16)]}  # 14 bytes
    assert bench.state_bytes(state) == 96 + 20 + 8 + 14


def test_state_memory_one_tangent_per_adapted_hyperparameter(bench, one_torch_thread):
    """The measured extra state over the base rule: k params-sized buffers for hyperdescent with
    k adapted hyperparameters, 0 for Adam-HD, 1 for SGD-HD (plus a few 0-d scalars)."""
    params, grads = bench.make_inputs(TINY, "cpu", torch.float32)
    param_bytes = bench.state_bytes(params)
    assert param_bytes == 4 * (12 + 4 + 12)
    for family, analytic_extra in [("adam", 0), ("sgd", 1), ("sgdm", 0)]:
        cands = [bench.make_candidate(s, params, grads, "cpu", compiled=False)
                 for s in bench.rule_specs(family)]
        base = cands[0].state_bytes
        for c in cands[1:]:
            want = analytic_extra if c.spec.kind == "analytic" else len(c.spec.adapted)
            scalars = c.state_bytes - base - want * param_bytes
            assert 0 <= scalars <= 8 * 12, (c.spec.name, scalars)


def test_cli_writes_the_tables(bench, tmp_path, monkeypatch, one_torch_thread):
    monkeypatch.setitem(bench.PARAMETER_SETS, "tiny", lambda: TINY)
    out = tmp_path / "bench.md"
    assert bench.main(["--sets", "tiny", "--families", "adam,sgdn", "--no-compile",
                       "--rounds", "1", "--min-run-time", "0.01", "--clock", "cpu",
                       "--markdown", str(out)]) == 0
    text = out.read_text()
    assert "cpu clock" in text.splitlines()[0]
    for row in ["`adam_hd`", "`hyperdescent(adam, {lr, betas[0]})`",
                "`hyperdescent(sgdn, {lr, momentum})`", "Per-λ target t/(k t_HD) <= 2 met in"]:
        assert row in text
    assert "failed" not in text and "Not measured" not in text
    with pytest.raises(SystemExit):
        bench.main(["--sets", "nope", "--no-compile"])
