"""Step time of the HD optimizers against torch.optim, side by side in one process.

    python benchmarks/bench_optim.py                      # CPU, 1 thread, both parameter sets
    python benchmarks/bench_optim.py --device cuda        # on a GPU (see gpu_bench.sh)
    python benchmarks/bench_optim.py --sets mlp --no-compile --rounds 2
    python benchmarks/bench_optim.py --sets resnet18 --optimizers sgd   # SGD-HD only

Parameter sets: the paper's MLP (784-1000-1000-10, 1.8M params, 6 tensors) and the parameter list
of a ResNet-18 (11.7M params, 62 tensors). Every timing is torch.utils.benchmark's median of a
``blocked_autorange``; candidates are measured in interleaved rounds and each keeps its best
round, so a load spike on a shared machine hits all of them alike. Ratios (issue 5's targets):

    AdamHD step / torch.optim.Adam step (best of its foreach and for-loop paths)  target <= 1.10
    SGDHD step  / torch.optim.SGD step (best of foreach and for-loop)              target <= 2.3
        (issue 13; memory-traffic bound 5/3: SGD moves 3 parameter-sized vectors, SGD-HD 5)
    functional adam_hd update (eager, torch.compile) / torch.optim.Adam step
    extra optimizer-state bytes over the base optimizer (Adam-HD 0, SGD-HD one params copy)

The SGD candidates get a new gradient tensor every step (two gradient sets, alternating), as in
training with ``zero_grad()`` and a backward per step.

The ratios against torch's fused kernels are printed too (not a target: see docs/optim.md).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from typing import Callable

import torch
from torch.utils import benchmark

import hdfunc
from hdfunc.optim import SGDHD, AdamHD, terms


def resnet18_shapes() -> list[tuple[int, ...]]:
    """The parameter shapes of torchvision's resnet18 (conv, batch-norm, fc)."""
    shapes: list[tuple[int, ...]] = [(64, 3, 7, 7), (64,), (64,)]
    width_in = 64
    for width, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
        for block in range(2):
            fan_in = width_in if block == 0 else width
            shapes += [(width, fan_in, 3, 3), (width,), (width,), (width, width, 3, 3), (width,),
                       (width,)]
            if block == 0 and (stride != 1 or fan_in != width):
                shapes += [(width, fan_in, 1, 1), (width,), (width,)]
        width_in = width
    return shapes + [(1000, 512), (1000,)]


def mlp_shapes() -> list[tuple[int, ...]]:
    return [(1000, 784), (1000,), (1000, 1000), (1000,), (10, 1000), (10,)]


PARAMETER_SETS = {"mlp": mlp_shapes, "resnet18": resnet18_shapes}


def make_params(shapes, device, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen).to(device, dtype).requires_grad_() for s in shapes]
    for p in params:
        p.grad = 1e-2 * torch.randn(p.shape, generator=gen).to(device, dtype)
    return params


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if torch.is_tensor(value):
                total += value.numel() * value.element_size()
    for group in optimizer.param_groups:
        for value in group.get("hd_state", ()):  # an hdfunc.HDState
            if torch.is_tensor(value):
                total += value.numel() * value.element_size()
    return total


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class CopyingSGDHD(SGDHD):
    """SGDHD as before issue 13: d_t ← g_t copied into its buffer in the hypergradient pass
    (the path SGDHD still takes where it cannot keep the gradient), for comparison."""

    def _keeps_gradient(self, group: dict, lists: dict) -> bool:
        return False


def alternating_gradients(optimizer: torch.optim.Optimizer, params: list[torch.Tensor],
                          seed: int) -> Callable[[], None]:
    """A step function that first sets each ``p.grad`` to the other of two gradient sets: each
    step sees a gradient tensor other than the last step's, as in training with
    ``zero_grad()`` (set_to_none=True) and a backward per step. (With one fixed gradient,
    SGD-HD's kept direction d_{t-1} would be the very memory of g_t, and its dot product would
    read one vector instead of two.) The swap costs every SGD candidate alike (62 attribute
    writes, ~0.02 ms)."""
    sets = [[p.grad for p in params], [p.grad.clone() for p in params]]
    gen = torch.Generator().manual_seed(seed)
    for g in sets[1]:
        g.copy_(1e-2 * torch.randn(g.shape, generator=gen).to(g.device, g.dtype))
    flip = [0]

    def step() -> None:
        flip[0] ^= 1
        for p, g in zip(params, sets[flip[0]]):
            p.grad = g
        optimizer.step()

    return step


def candidates(shapes, device, dtype, compile_functional: bool,
               prefixes: tuple[str, ...] = ("torch", "AdamHD", "SGDHD", "functional")
               ) -> dict[str, Callable]:
    """name -> a no-argument step function (each with its own params, grads and state), for the
    candidates whose names start with one of ``prefixes``."""
    steps: dict[str, Callable] = {}
    optimizers: dict[str, torch.optim.Optimizer] = {}
    specs = {
        "torch.Adam foreach": lambda p: torch.optim.Adam(p, lr=1e-6, foreach=True),
        "torch.Adam for-loop": lambda p: torch.optim.Adam(p, lr=1e-6, foreach=False),
        "torch.Adam fused": lambda p: torch.optim.Adam(p, lr=1e-6, fused=True),
        "AdamHD fused": lambda p: AdamHD(p, lr=1e-6, hypergrad_lr=1e-12, fused=True),
        "AdamHD foreach": lambda p: AdamHD(p, lr=1e-6, hypergrad_lr=1e-12, foreach=True),
        "torch.SGD foreach": lambda p: torch.optim.SGD(p, lr=1e-6, foreach=True),
        "torch.SGD for-loop": lambda p: torch.optim.SGD(p, lr=1e-6, foreach=False),
        "torch.SGD fused": lambda p: torch.optim.SGD(p, lr=1e-6, fused=True),
        "SGDHD foreach": lambda p: SGDHD(p, lr=1e-6, hypergrad_lr=1e-6, foreach=True),
        "SGDHD fused": lambda p: SGDHD(p, lr=1e-6, hypergrad_lr=1e-6, fused=True),
        "SGDHD foreach, copying d": lambda p: CopyingSGDHD(p, lr=1e-6, hypergrad_lr=1e-6,
                                                            foreach=True),
    }
    specs = {name: make for name, make in specs.items()
             if any(name.startswith(prefix) for prefix in prefixes)}
    for name, make in specs.items():
        params = make_params(shapes, device, dtype)
        optimizer = make(params)
        optimizer.step()  # state allocated outside the timing
        optimizers[name] = optimizer
        steps[name] = optimizer.step
        if "SGD" in name:  # a new gradient tensor every step, as backward after zero_grad()
            steps[name] = alternating_gradients(optimizer, params, seed=1)

    if "SGDHD" in prefixes:  # where SGD-HD's time goes: its hypergradient pass and fixed cost
        params = make_params(shapes, device, dtype)
        grads = [p.grad for p in params]
        previous = [torch.randn_like(p) for p in params]
        like = torch.zeros((), dtype=torch.float64, device=device)
        scratch: dict = {}
        steps["SGDHD part: g.d pass alone"] = lambda: terms.sgd_terms_streamed(
            grads, previous, want_sq=False, like=like, buffers=scratch)
        for name, make in (("SGDHD part: step of 62 one-element tensors", lambda p: SGDHD(
                p, lr=1e-6, hypergrad_lr=1e-6, foreach=True)),
                           ("torch.SGD part: step of 62 one-element tensors", lambda p:
                            torch.optim.SGD(p, lr=1e-6, foreach=True))):
            optimizer = make(make_params([(1,)] * 62, device, dtype))
            optimizer.step()
            steps[name] = optimizer.step
    candidates.optimizers = optimizers  # type: ignore[attr-defined]
    if "functional" not in prefixes:
        return steps
    rule = hdfunc.adam_hd(1e-6, 1e-12)
    params = [p.detach() for p in make_params(shapes, device, dtype)]
    grads = [0.01 * torch.randn_like(p) for p in params]
    holder = {"params": params, "state": rule.init(params)}

    def functional_step(params, grads, state):
        updates, state = rule.update(grads, state, params)
        return hdfunc.apply_updates(params, updates), state

    def run(step_fn):
        def call():
            holder["params"], holder["state"] = step_fn(holder["params"], grads, holder["state"])
        return call

    steps["functional adam_hd eager"] = run(functional_step)
    if compile_functional:
        compiled = torch.compile(functional_step)
        start = time.perf_counter()
        run(compiled)()
        run(compiled)()
        print(f"  (torch.compile of the functional update: {time.perf_counter() - start:.0f} s)",
              file=sys.stderr)
        steps["functional adam_hd compiled"] = run(compiled)
    candidates.optimizers = optimizers  # type: ignore[attr-defined]
    return steps


def measure(steps: dict[str, Callable], device: str, rounds: int, min_run_time: float,
            threads: int) -> dict[str, float]:
    best = {name: math.inf for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            step()
            synchronize(device)
            timer = benchmark.Timer(stmt="step(); sync()", globals={
                "step": step, "sync": lambda: synchronize(device)}, num_threads=threads,
                label=name)
            best[name] = min(best[name], timer.blocked_autorange(min_run_time=min_run_time).median)
    return best


def report(set_name: str, n_params: int, times: dict[str, float],
           optimizers: dict[str, torch.optim.Optimizer]) -> list[str]:
    param_bytes = n_params * 4
    lines = [f"### {set_name} ({n_params / 1e6:.2f}M params)", "",
             "| step | ms |", "|---|---:|"]
    lines += [f"| {name} | {1e3 * t:.2f} |" for name, t in times.items()]
    lines += ["", "| ratio | value | target | memory-traffic bound |", "|---|---:|---:|---:|"]
    extra = {}
    if "AdamHD fused" in times:
        adam_base = min(times["torch.Adam foreach"], times["torch.Adam for-loop"])
        adam_hd = min(times["AdamHD fused"], times["AdamHD foreach"])
        extra["AdamHD"] = state_bytes(optimizers["AdamHD fused"]) - state_bytes(
            optimizers["torch.Adam fused"])
        lines.append(f"| AdamHD / torch.Adam (best of foreach, for-loop) | "
                     f"{adam_hd / adam_base:.2f} | <= 1.10 | - |")
    if "SGDHD foreach" in times:
        sgd_base = min(times["torch.SGD foreach"], times["torch.SGD for-loop"])
        sgd_hd = min(times["SGDHD foreach"], times["SGDHD fused"])
        extra["SGDHD"] = state_bytes(optimizers["SGDHD foreach"]) - state_bytes(
            optimizers["torch.SGD foreach"])
        # torch's SGD moves 3 parameter-sized vectors (read g, θ; write θ); SGD-HD keeping a
        # reference to g moves 5 (and reads g, d_{t-1} for the dot product)
        lines.append(f"| SGDHD / torch.SGD (best of foreach, for-loop) | "
                     f"{sgd_hd / sgd_base:.2f} | <= 2.3 | 1.67 |")
        for name, bound in (("SGDHD foreach, copying d", "2.0"),
                            ("SGDHD part: g.d pass alone", "-"),
                            ("SGDHD part: step of 62 one-element tensors", "-")):
            if name in times:
                lines.append(f"| {name} / torch.SGD | {times[name] / sgd_base:.2f} | - | {bound} |")
    for name in ("functional adam_hd eager", "functional adam_hd compiled"):
        if name in times:
            lines.append(f"| {name} / torch.Adam | {times[name] / adam_base:.2f} | - | - |")
    if "AdamHD fused" in times:
        lines.append(f"| AdamHD / torch.Adam fused | {adam_hd / times['torch.Adam fused']:.2f} "
                     "| - | - |")
    if "SGDHD foreach" in times:
        lines.append(f"| SGDHD / torch.SGD fused | {sgd_hd / times['torch.SGD fused']:.2f} "
                     "| - | - |")
    lines += ["", "| extra optimizer-state bytes over the base | bytes | x params |",
              "|---|---:|---:|"]
    lines += [f"| {name} | {value} | {value / param_bytes:.3f} |"
              for name, value in extra.items()]
    return lines + [""]


def machine() -> str:
    """CPU model and core count (Linux /proc/cpuinfo, else platform)."""
    import os
    import platform
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sets", nargs="+", default=list(PARAMETER_SETS),
                        choices=list(PARAMETER_SETS))
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads (default 1: stable on a shared machine)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--min-run-time", type=float, default=0.5)
    parser.add_argument("--no-compile", action="store_true",
                        help="skip the torch.compile'd functional update")
    parser.add_argument("--optimizers", choices=["all", "adam", "sgd"], default="all",
                        help="time only the Adam or only the SGD candidates")
    parser.add_argument("--out", help="also write the Markdown tables to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    lines = [f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {machine()}; "
             f"torch {torch.__version__}, device {args.device}"
             + (f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else
                f", {args.threads} thread(s)") + ", float32", ""]
    for set_name in args.sets:
        shapes = PARAMETER_SETS[set_name]()
        n_params = sum(math.prod(s) for s in shapes)
        print(f"{set_name}: building candidates", file=sys.stderr)
        prefixes = {"all": ("torch", "AdamHD", "SGDHD", "functional"),
                    "adam": ("torch.Adam", "AdamHD", "functional"),
                    "sgd": ("torch.SGD", "SGDHD")}[args.optimizers]
        steps = candidates(shapes, args.device, torch.float32, not args.no_compile, prefixes)
        print(f"{set_name}: measuring {len(steps)} candidates x {args.rounds} rounds",
              file=sys.stderr)
        times = measure(steps, args.device, args.rounds, args.min_run_time, args.threads)
        lines += report(set_name, n_params, times, candidates.optimizers)  # type: ignore
        print("\n".join(lines[-40:]), file=sys.stderr)
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
