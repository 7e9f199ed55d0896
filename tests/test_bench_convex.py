"""Fast checks of benchmarks/bench_convex.py (issue 12's convex benchmark): its evaluation
counter, its f*, its vmapped runner and its smoke run."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

import hdfunc

ROOT = Path(__file__).resolve().parents[1]


def _load():
    name = "bench_convex_under_test"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / "bench_convex.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


bc = _load()


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_lbfgs_counts_every_closure_call_including_the_line_search():
    # non-convex: the strong-Wolfe search has to try more than the unit step now and then
    problem = bc.make_tanh(1, seed=0, samples=40, inputs=4, hidden=3)
    data = problem.instance(0)
    # an independent run of torch's L-BFGS: 15 iterations of one step() call, its closure calls
    # counted here
    theta = problem.theta0[0].clone().requires_grad_(True)
    opt = torch.optim.LBFGS([theta], lr=1, max_iter=15, max_eval=10_000, tolerance_grad=0,
                            tolerance_change=0, history_size=bc.LBFGS_HISTORY,
                            line_search_fn="strong_wolfe")
    values = []

    def closure():
        opt.zero_grad()
        f = bc.tanh_loss(theta, data)
        f.backward()
        values.append(float(f.detach()))
        return f

    opt.step(closure)
    iterations = opt.state[opt._params[0]]["n_iter"]
    calls = len(values)
    assert iterations == 15
    assert calls > iterations + 1  # the line search evaluated more than one point somewhere

    # the benchmark's runner with that many evaluations: the same points, each one counted,
    # and a counter of the loss's own calls agrees
    counted = {"n": 0}

    def counting_loss(theta, data):
        counted["n"] += 1
        return bc.tanh_loss(theta, data)

    rel = bc.run_lbfgs(problem, 0, budget=calls, loss=counting_loss)
    assert len(rel) == calls == counted["n"]
    expected = problem.rel(torch.tensor(values, dtype=torch.float64), 0)
    torch.testing.assert_close(rel, expected, rtol=1e-12, atol=0)


def test_lbfgs_stops_at_the_target_and_reports_the_evaluation():
    problem = bc.make_quadratic(1, seed=0, dim=10, cond=1e2)
    rel = bc.run_lbfgs(problem, 0, budget=1000)
    n = bc.evals_to_target(rel)
    assert n == len(rel) and rel[-1] <= bc.TARGET and bool((rel[:-1] > bc.TARGET).all())


def test_quadratic_fstar_is_the_closed_form_minimum():
    problem = bc.make_quadratic(3, seed=1, dim=15, cond=1e4)
    for k in range(3):
        H, b = problem.data["H"][k], problem.data["b"][k]
        evals, vecs = torch.linalg.eigh(H)
        minimiser = vecs @ ((vecs.T @ b) / evals)
        closed = -0.5 * b @ minimiser
        torch.testing.assert_close(problem.fstar[k], closed, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(bc.quadratic_loss(minimiser, problem.instance(k)),
                                   problem.fstar[k], rtol=1e-10, atol=1e-12)
        # and nothing nearby is lower
        gen = torch.Generator().manual_seed(k)
        for _ in range(5):
            other = minimiser + 1e-3 * torch.randn(15, generator=gen, dtype=torch.float64)
            assert bc.quadratic_loss(other, problem.instance(k)) > problem.fstar[k]
    # the power-iteration L̂ finds the largest eigenvalue (1 by construction)
    torch.testing.assert_close(problem.lhat, torch.ones(3, dtype=torch.float64), rtol=1e-3,
                               atol=0)


def test_lstsq_fstar_matches_the_normal_equations():
    problem = bc.make_lstsq(2, seed=0, rows=30, dim=8)
    for k in range(2):
        A, b = problem.data["A"][k], problem.data["b"][k]
        solution = torch.linalg.solve(A.T @ A, A.T @ b)
        torch.testing.assert_close(problem.fstar[k],
                                   bc.lstsq_loss(solution, problem.instance(k)), rtol=1e-10,
                                   atol=1e-14)


def _loop_single(problem, rule, k, steps):
    """One rule on one instance, unbatched: the reference for the vmapped runner."""
    theta = problem.theta0[k].clone()
    state = rule.init(theta)
    rel = []
    for _ in range(steps):
        theta_ = theta.detach().requires_grad_(True)
        f = problem.loss(theta_, problem.instance(k))
        (g,) = torch.autograd.grad(f, theta_)
        updates, state = rule.update(g, state, theta)
        theta = hdfunc.apply_updates(theta, updates)
        rel.append(problem.rel(f.detach(), k))
    return torch.stack(rel)


@pytest.mark.parametrize("method", ["sgd_hd", "hb_hd"])
def test_vmapped_grid_equals_a_loop_of_single_runs(method):
    problem = bc.make_quadratic(2, seed=2, dim=10, cond=1e2)
    grid = bc.method_grid(method, quick=True)[:3]
    steps = 25
    batched = bc.run_configs(problem, grid, [0, 1], budget=steps)  # (steps, configs, instances)
    for i, config in enumerate(grid):
        for k in (0, 1):
            single = _loop_single(problem, config.make(problem, k), k, steps)
            torch.testing.assert_close(batched[:, i, k], single, rtol=1e-9, atol=1e-13)


def test_evals_to_target_and_summary():
    rel = torch.tensor([1.0, 1e-3, 5e-7, 1e-8], dtype=torch.float64)
    assert bc.evals_to_target(rel) == 3
    assert bc.evals_to_target(rel[:2]) is None
    full = bc.summarize([10, 30, 20])
    assert (full["median"], full["low"], full["high"]) == (20, 10, 30)
    assert bc.format_cell(full) == "20 (10–30)"
    partial = bc.summarize([10, None, 20])
    assert partial["reached"] == 2 and partial["median"] == 20 and partial["high"] is None
    assert bc.format_cell(bc.summarize([None, None, 5])) == "— (1/3)"
    assert bc.format_cell(partial) == "20 (10–n.r.) [2/3]"


def test_quick_smoke_run_writes_table_json_and_plots(tmp_path):
    dtype = torch.get_default_dtype()
    code = bc.main(["--quick", "--problems", "quad1e2,lstsq", "--methods", "gd,lbfgs",
                    "--budget", "100", "--out", str(tmp_path)])
    assert code == 0
    assert torch.get_default_dtype() == dtype  # the run's float64 default does not leak
    table = (tmp_path / "convex_table.txt").read_text()
    assert "quadratic, κ = 1e2" in table and "least squares" in table
    assert "L-BFGS" in table and "GD (tuned α)" in table
    results = json.loads((tmp_path / "convex_results.json").read_text())
    assert [r["problem"] for r in results["results"]] == ["quad1e2", "lstsq"]
    lbfgs = results["results"][0]["methods"]["lbfgs"]
    assert lbfgs["reached"] == lbfgs["n"] == 2  # L-BFGS solves a 20-d quadratic in 120
    assert (tmp_path / "convex_convergence.png").stat().st_size > 10_000
    assert (tmp_path / "convex_sensitivity.png").stat().st_size > 10_000


def test_logreg_is_skipped_cleanly_without_data(tmp_path, capsys):
    assert bc.make_logreg(2, 0, 10, 1e-4, data_dir=str(tmp_path / "absent")) is None
    assert "skipped" in capsys.readouterr().out
