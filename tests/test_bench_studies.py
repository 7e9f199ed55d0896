"""benchmarks/bench_studies.py's split of the batched step: the products it times alone are the
first layer's forward product and weight gradient (checked against autodiff), and the split runs
on the engine's trainer."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch.func import grad, vmap

from hdfunc.studies import StudyConfig, make_problem
from hdfunc.studies.engine import BatchedTrainer

PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_studies.py"
spec = importlib.util.spec_from_file_location("bench_studies", PATH)
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def test_first_layer_products_are_the_logits_and_the_weight_gradient():
    gen = torch.Generator().manual_seed(0)
    runs, batch, inputs_dim, outputs_dim = 3, 5, 7, 4
    weight = torch.randn(runs, outputs_dim, inputs_dim, generator=gen, dtype=torch.float64)
    inputs = torch.randn(runs, batch, inputs_dim, generator=gen, dtype=torch.float64)
    grad_out = torch.randn(runs, outputs_dim, batch, generator=gen, dtype=torch.float64)
    logits, weight_grad = bench.first_layer_products(weight, inputs, grad_out)
    expected_logits = torch.stack([torch.nn.functional.linear(inputs[r], weight[r])
                                   for r in range(runs)])
    # the two kernels may sum the K = 7 products in another order: |error| <= K·eps·(|x|·|w|ᵀ)
    bound = inputs_dim * torch.finfo(torch.float64).eps * (inputs.abs() @ weight.abs().transpose(1, 2))
    assert ((logits - expected_logits).abs() <= bound).all()

    def pulled_back(w, x, g):  # <x·wᵀ, gᵀ>: its gradient in w is the weight gradient for g
        return (torch.nn.functional.linear(x, w) * g.T).sum()

    expected_grad = vmap(grad(pulled_back))(weight, inputs, grad_out)
    bound = batch * torch.finfo(torch.float64).eps * (grad_out.abs() @ inputs.abs())
    assert ((weight_grad - expected_grad).abs() <= bound).all()
    # a transposed product is caught
    assert not torch.allclose(weight_grad, expected_grad.flip(1))


def test_timed_split_covers_the_step_on_the_engine():
    config = StudyConfig(problem="classification",
                         problem_options={"dim": 6, "classes": 3, "n_samples": 64, "hidden": 8},
                         optimizers=["sgd_hd"], seeds=2, steps=3, batch_size=16, eval_final=False)
    problem = make_problem("classification", **config.problem_options)
    trainer = BatchedTrainer(problem, config.optimizer_specs[0], config)
    split = bench.timed_split(trainer, tuple(config.runs()), repeat=2)["split_ms"]
    assert set(split) == set(bench.SPLIT)  # the MLP's first layer is a linear map of the inputs
    assert all(split[k] >= 0 for k in ("gather", "loss and gradient", "products alone"))
