"""Benchmark: S seeds trained as one vmapped batch vs a Python loop over the same seeds.

    .venv/bin/python benchmarks/bench_studies.py [--seeds 256] [--steps 30] [--device cpu]
                                                 [--problems classification,logreg] [--no-compile]
                                                 [--threads 1] [--loop-steps 10] [--repeat 3]
                                                 [--breakdown]

For each problem and optimizer it measures, each in a fresh subprocess (so peak memory is its own):

* loop:     for each seed, a plain (unbatched) training loop: torch.func.grad + rule.update
* batched:  all seeds at once, hdfunc.studies.BatchedTrainer (vmap over stacked params/states)
* compiled: the same with torch.compile on the batched step (compile time reported apart)

and prints a Markdown table: seeds·steps per second (best and range over the repetitions),
speed-up over the loop, and peak memory (CPU: growth of the process's peak RSS over its resident
size after set-up; CUDA: peak allocated). Timings exclude set-up and warm-up steps (the
compilation for ``compiled``); each is the best of ``--repeat`` repetitions (a shared machine only
ever slows a measurement down).

``--breakdown`` adds, per problem and optimizer, where the batched step's time goes (the
profiler's self time of torch's operations by kind, per step, set-up excluded; what is left of
the profiled wall time is Python and dispatch, inflated by the profiler itself).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
THREADS: int | None = None
REPEAT = int(os.environ.get("BENCH_REPEAT", "3"))


def rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def measure(mode: str, problem_name: str, optimizer: str, seeds: int, steps: int, device: str) -> dict:
    import torch
    from torch.func import functional_call, grad_and_value

    import hdfunc
    from hdfunc.studies import StudyConfig, make_problem, minibatch_indices
    from hdfunc.studies.engine import BatchedTrainer, make_rule

    options = {"classification": {"dim": 20, "classes": 5, "n_samples": 4096, "hidden": 32},
               "quadratic": {"dim": 20, "n_samples": 4096}, "logreg": {}, "mlp": {"hidden": 100}}
    config = StudyConfig(problem=problem_name, problem_options=options[problem_name],
                         optimizers=[optimizer], seeds=seeds, steps=steps + 1, batch_size=128,
                         device=device, compile=mode == "compiled", eval_final=False)
    problem = make_problem(problem_name, **config.problem_options)
    spec = config.optimizer_specs[0]
    keys = tuple(config.runs())
    cuda = torch.device(device).type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    result = {"mode": mode, "problem": problem_name, "optimizer": optimizer, "seeds": seeds,
              "steps": steps, "threads": torch.get_num_threads(), "params": problem.num_parameters()}

    if mode == "loop":
        template = problem.template()
        inputs, targets = problem.inputs.to(device), problem.targets.to(device)
        rule = make_rule(spec, 1e-3, 1e-3 if spec.is_hd else 0.0, config)

        def loss(params, x, y):
            return problem.loss_fn(functional_call(template, params, (x,)), y)

        def step(params, state, x, y):
            grads, value = grad_and_value(loss)(params, x, y)
            updates, state = rule.update(grads, state, params)
            return hdfunc.apply_updates(params, updates), state, value

        runs = []
        for key in keys:
            params = {k: v.to(device) for k, v in problem.init_params(key.seed).items()}
            order = [i.to(device) for i in
                     minibatch_indices(key.seed, 0, steps + 1, problem.num_examples, 128)]
            runs.append((params, rule.init(params), order))
        baseline = rss_kib("VmRSS")
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        params, state, order = runs[0]
        step(params, state, inputs[order[0]], targets[order[0]])  # warm-up
        sync()
        times = []
        for _ in range(REPEAT):
            start = time.perf_counter()
            for params, state, order in runs:
                for t in range(1, steps + 1):
                    params, state, value = step(params, state, inputs[order[t]], targets[order[t]])
            sync()
            times.append(time.perf_counter() - start)
    else:
        # the engine's own training loop (BatchedTrainer.run): per step one index tensor for
        # all seeds' minibatches, one gather, one vmapped step; no checkpoints, no evaluation.
        # Each call of run() first sets up its runs (S models initialised from their seeds,
        # stacked, rule.init, the epoch's S permutations: ~10-25 ms at S = 64 on MNIST); the
        # loop above does its set-up before the clock starts, so here too the set-up is taken
        # out: a repetition is run(steps + 1) minus run(1), the same set-up and first step.
        trainer = BatchedTrainer(problem, spec, config, device)
        baseline = rss_kib("VmRSS")
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        trainer.run(keys, steps=2)  # warm-up (and compilation for "compiled")
        sync()
        result["warmup_s"] = time.perf_counter() - start
        times, setups = [], []
        for _ in range(REPEAT):
            start = time.perf_counter()
            trainer.run(keys, steps=1)
            sync()
            setups.append(time.perf_counter() - start)
            start = time.perf_counter()
            trainer.run(keys, steps=steps + 1)
            sync()
            times.append(time.perf_counter() - start - setups[-1])
        result["setup_and_first_step_s"] = round(min(setups), 4)
    if mode == "breakdown":
        result.update(breakdown(trainer, keys, steps, problem))
        result.update(timed_split(trainer, keys))
    elapsed = min(times)  # the best repetition: the machine may be shared
    result["seconds"] = elapsed
    result["repeats"] = [round(t, 4) for t in times]
    result["seed_steps_per_s"] = seeds * steps / elapsed
    result["peak_mib"] = ((torch.cuda.max_memory_allocated() / 2**20) if cuda
                          else (rss_kib("VmHWM") - baseline) / 1024)
    return result


BREAKDOWN = ("gather (index_select)", "matrix products", "log_softmax + backward",
             "element-wise, parameter-sized", "other operations", "Python and dispatch")


def breakdown(trainer, keys: tuple, steps: int, problem) -> dict:
    """Milliseconds per batched step by kind of work: torch.profiler's self CPU time of the aten
    operations of run(steps + 1) minus those of run(1) (the set-up and first step), divided by
    ``steps``; "Python and dispatch" is the rest of the profiled wall time."""
    from torch.profiler import ProfilerActivity, profile

    runs = len(keys)
    shapes = {tuple(v.shape) for v in problem.init_params(0).values()}
    shapes |= {(runs,) + shape for shape in shapes}  # as vmap's batched operations see them

    def kind(key: str, input_shapes: list) -> str:
        if key == "aten::index_select":
            return BREAKDOWN[0]
        if key in ("aten::bmm", "aten::mm", "aten::addmm", "aten::baddbmm"):
            return BREAKDOWN[1]
        if key in ("aten::_log_softmax", "aten::_log_softmax_backward_data"):
            return BREAKDOWN[2]
        if any(tuple(shape) in shapes for shape in input_shapes if shape):
            return BREAKDOWN[3]
        return BREAKDOWN[4]

    def profiled(n: int) -> dict:
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            start = time.perf_counter()
            trainer.run(keys, steps=n)
            wall = time.perf_counter() - start
        seconds = dict.fromkeys(BREAKDOWN, 0.0)
        for event in prof.key_averages(group_by_input_shape=True):
            if event.key.startswith("aten::"):
                seconds[kind(event.key, event.input_shapes)] += event.self_cpu_time_total / 1e6
        seconds[BREAKDOWN[5]] = wall - sum(seconds.values())
        return seconds

    one, many = profiled(1), profiled(steps + 1)
    return {"breakdown_ms": {k: round((many[k] - one[k]) / steps * 1e3, 2) for k in BREAKDOWN}}


SPLIT = ("gather", "loss and gradient", "rule update and apply", "products alone")


def timed_split(trainer, keys: tuple, repeat: int = 20) -> dict:
    """The batched step's parts timed without the profiler (best of ``repeat``, ms), on the
    step's own first minibatch: the gather (``index_select`` of the S·B rows), the vmapped loss
    and gradient (``vmap(grad_and_value(trainer.loss))``), and the rule's update with the params'
    update as the step minus the gradient (both with cold caches after the gather, as in
    training). "products alone": the forward and backward batched matrix products of a linear
    model's first layer on the same shapes (logits and weight gradient), for the problems whose
    first layer is a linear map of the inputs."""
    import torch
    from torch.func import grad_and_value, vmap

    from hdfunc.studies.engine import minibatch_indices

    runs, size = len(keys), trainer.config.batch_size
    params, state = trainer.initial(keys)
    flat = torch.cat([minibatch_indices(k.seed, 0, 1, trainer.problem.num_examples, size)[0]
                      for k in keys]).to(trainer.device)
    x_buffer = trainer.inputs.new_empty((flat.numel(),) + tuple(trainer.inputs.shape[1:]))
    gather = lambda: torch.index_select(trainer.inputs, 0, flat, out=x_buffer)  # noqa: E731
    x = gather().view(runs, size, *trainer.inputs.shape[1:])
    y = trainer.targets[flat].view(runs, size, *trainer.targets.shape[1:])
    gradient = vmap(grad_and_value(trainer.loss))
    sync = torch.cuda.synchronize if trainer.device.type == "cuda" else (lambda: None)

    def best(fn, *, after_gather: bool) -> float:
        fn()
        times = []
        for _ in range(repeat):
            if after_gather:
                gather()
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - start)
        return min(times) * 1e3

    split = {SPLIT[0]: best(gather, after_gather=False),
             SPLIT[1]: best(lambda: gradient(params, x, y), after_gather=True)}
    split[SPLIT[2]] = best(lambda: trainer._step(params, state, x, y),
                           after_gather=True) - split[SPLIT[1]]
    weights = [v for v in params.values() if v.dim() == 3]
    inputs = x.flatten(2)
    if weights and weights[0].shape[-1] == inputs.shape[-1]:
        weight = weights[0]
        grad_out = inputs.new_ones(runs, weight.shape[1], size)
        split[SPLIT[3]] = best(lambda: first_layer_products(weight, inputs, grad_out),
                               after_gather=True)
    return {"split_ms": {k: round(v, 2) for k, v in split.items()}}


def first_layer_products(weight, inputs, grad_out):
    """The two batched matrix products of a linear first layer over S runs: the logits without
    the bias, x·Wᵀ (S × [B × in] × [in × out]), and the weight gradient for an output gradient
    G (``grad_out``, S × out × B, i.e. Gᵀ), Gᵀ·x (S × [out × B] × [B × in])."""
    import torch

    return torch.bmm(inputs, weight.transpose(1, 2)), torch.bmm(grad_out, inputs)


def run_child(*args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if THREADS:
        env["OMP_NUM_THREADS"] = str(THREADS)
    done = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True,
                          text=True, env=env)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=256)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--loop-steps", type=int, default=None, help="steps per seed in the loop (default --steps)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--problems", default="classification,logreg")
    parser.add_argument("--optimizers", default="sgd_hd,adam_hd")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--repeat", type=int, default=3, help="timed repetitions; the best counts")
    parser.add_argument("--breakdown", action="store_true",
                        help="also profile the batched step: its time per step by kind of work")
    parser.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, problem, optimizer, seeds, steps, device = args.child
        print(json.dumps(measure(mode, problem, optimizer, int(seeds), int(steps), device)))
        return
    global THREADS
    THREADS = args.threads
    os.environ["BENCH_REPEAT"] = str(args.repeat)
    modes = (["loop", "batched"] + ([] if args.no_compile else ["compiled"])
             + (["breakdown"] if args.breakdown else []))
    rows = []
    print(f"load average before: {os.getloadavg()[0]:.2f}; cores: {os.cpu_count()}", file=sys.stderr)
    for problem in args.problems.split(","):
        for optimizer in args.optimizers.split(","):
            loop_rate = None
            for mode in modes:
                steps = args.loop_steps or args.steps if mode == "loop" else args.steps
                r = run_child(mode, problem, optimizer, str(args.seeds), str(steps), args.device)
                r.update(mode=mode, problem=problem, optimizer=optimizer)
                if "error" not in r and mode == "loop":
                    loop_rate = r["seed_steps_per_s"]
                rows.append((r, loop_rate))
                print(json.dumps(r), file=sys.stderr)
    print(f"\nS = {args.seeds} seeds, batch 128, device {args.device}, threads "
          f"{args.threads or 'torch default'}, best of {args.repeat} repetitions of {args.steps} steps "
          f"(loop: {args.loop_steps or args.steps} steps per seed); "
          f"load average after: {os.getloadavg()[0]:.2f}\n")
    print("| problem (params) | optimizer | mode | seeds·steps/s (range) | speed-up vs loop | peak memory (MiB) | warm-up/compile (s) |")
    print("|---|---|---|---:|---:|---:|---:|")
    for r, loop_rate in rows:
        if r["mode"] == "breakdown":
            continue
        if "error" in r:
            print(f"| {r['problem']} | {r['optimizer']} | {r['mode']} | failed: {r['error'][:80]} | | | |")
            continue
        speedup = f"{r['seed_steps_per_s'] / loop_rate:.1f}×" if loop_rate else "-"
        warm = f"{r['warmup_s']:.1f}" if "warmup_s" in r else "-"
        rates = [r["seeds"] * r["steps"] / t for t in r["repeats"]]
        print(f"| {r['problem']} ({r['params']}) | {r['optimizer']} | {r['mode']} | "
              f"{r['seed_steps_per_s']:.0f} ({min(rates):.0f}–{max(rates):.0f}) | {speedup} | "
              f"{r['peak_mib']:.0f} | {warm} |")
    profiled = [r for r, _ in rows if r["mode"] == "breakdown" and "error" not in r]
    if profiled:
        print("\nBatched step, ms per step by kind of work (profiled; set-up excluded):\n")
        print("| problem | optimizer | unprofiled step (ms) | " + " | ".join(BREAKDOWN) + " |")
        print("|---|---|---:|" + "---:|" * len(BREAKDOWN))
        for r in profiled:
            cells = " | ".join(f"{r['breakdown_ms'][k]:.2f}" for k in BREAKDOWN)
            print(f"| {r['problem']} | {r['optimizer']} | {r['seconds'] / r['steps'] * 1e3:.2f} | "
                  f"{cells} |")
        print("\nThe same step timed in parts without the profiler (best of 20, ms; the "
              "profiler's per-operation times above inflate the small operations):\n")
        print("| problem | optimizer | unprofiled step (ms) | " + " | ".join(SPLIT) + " |")
        print("|---|---|---:|" + "---:|" * len(SPLIT))
        for r in profiled:
            cells = " | ".join(f"{r['split_ms'][k]:.2f}" if k in r["split_ms"] else "-"
                               for k in SPLIT)
            print(f"| {r['problem']} | {r['optimizer']} | {r['seconds'] / r['steps'] * 1e3:.2f} | "
                  f"{cells} |")


if __name__ == "__main__":
    main()
