"""Step time and state memory of ``hyperdescent`` against the analytic HD rule and the base rule.

    python benchmarks/bench_hyperdescent.py                        # CPU, 1 thread, MLP + ResNet-18
    python benchmarks/bench_hyperdescent.py --sets mlp --no-compile --rounds 1   # quick look
    python benchmarks/bench_hyperdescent.py --clock cpu            # on a busy shared CPU
    python benchmarks/bench_hyperdescent.py --device cuda --markdown results.md

Issue 12 ("Cost"): the step time of ``hyperdescent(factory, {name: β})`` (forward mode:
``torch.func.jvp`` for one adapted hyperparameter, ``jacfwd`` for several) against the analytic
HD rule and the base rule, eager and ``torch.compile``d, on the parameter sets of
``benchmarks/bench_optim.py`` (the paper's MLP 784-1000-1000-10 and the ResNet-18 parameter
list, imported from that module). Target: <= 2x the analytic HD rule per adapted
hyperparameter; memory: one extra params-sized buffer per adapted hyperparameter.

Candidates, per family (k = the number of adapted hyperparameters):

    adam:  adam(α) | adam_hd(α, β) | hyperdescent(adam, {lr}) | hyperdescent(adam, {lr, betas[0]})
    sgd:   sgd(α)  | sgd_hd(α, β)  | hyperdescent(sgd, {lr})
    sgdn:  sgdn(α) | sgdn_hd(α, β) | hyperdescent(sgdn, {lr}) | hyperdescent(sgdn, {lr, momentum})
    sgdm:  sgdm(α) | sgdm_hd(α, β) | hyperdescent(sgdm, {lr}) | hyperdescent(sgdm, {lr, momentum})

(sgdm only with ``--families``: its compiles add 1-2 minutes on 2 CPU cores.)

What is timed is one call of the pure ``rule.update(grads, state, params)`` (the state it returns
is fed to the next call; params and grads are fixed, float32), eager and ``torch.compile``d
(``torch.compile(rule.update)``, compiled and warmed up before timing). Timing method of
bench_optim.py: torch.utils.benchmark's median of a ``blocked_autorange`` per candidate, the
candidates measured in interleaved rounds, each keeping its best round. ``--clock cpu`` times
the thread's CPU time instead of the wall clock (CPU, 1 thread): on an oversubscribed machine it
leaves out the waits for a core, which otherwise swamp steps of a few ms. Results, and what they
mean: docs/benchmarks-hyperdescent.md.

Ratios printed (t = best median step time):

    per-λ ratio  = t(hyperdescent, k) / (k · t(analytic HD))         target <= 2   (the issue's)
    ratio        = t(hyperdescent, k) / t(analytic HD)                (no target)
    vs base      = t(candidate) / t(base rule)                        (no target)
    overhead per λ = (t(hyperdescent, k) - t(base)) / (k · (t(analytic HD) - t(base)))
                     (the cost added to the base rule, per λ, against the analytic rule's added
                     cost; informative only: the denominator is small and noisy)

Memory: the bytes of the state pytree (the sum of ``numel · element_size`` over its tensor
leaves) after one update, and the extra over the base rule's state in units of the params'
bytes. Expected: hyperdescent carries one params-sized tangent per adapted hyperparameter (k);
analytic Adam-HD stores nothing (its direction is recomputed from m, v), analytic SGD-HD and
SGDN-HD store the last direction (1), heavy-ball SGDM-HD reuses its momentum buffer (0).
On CUDA the table adds the peak memory allocated during one update above what was allocated
before it (``torch.cuda.max_memory_allocated``; it includes the new state, built while the old
one is still held, and the updates), in params units. torch's CPU allocator keeps no such
statistics (and ``tracemalloc`` does not see tensor storage), so on CPU only the state bytes are
measured.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional

import torch
from torch.utils import benchmark

import hdfunc
from hdfunc.hyperdescent import hyperdescent
from hdfunc.tree import tree_leaves


def _load_bench_optim():
    """benchmarks/bench_optim.py, imported by path (the parameter sets are defined there)."""
    path = Path(__file__).resolve().parent / "bench_optim.py"
    spec = importlib.util.spec_from_file_location("hdfunc_bench_optim", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench_optim = _load_bench_optim()
PARAMETER_SETS = dict(bench_optim.PARAMETER_SETS)  # mlp, resnet18 (a copy: tests add sets)
FAMILIES = ("adam", "sgd", "sgdn", "sgdm")
DEFAULT_FAMILIES = ("adam", "sgd", "sgdn")  # the paper's three (sgdm: --families, +~2 min)

# step sizes and hypergradient rates: tiny, so that thousands of updates with fixed grads keep
# every hyperparameter finite and inside its bounds (the work per step does not depend on them)
LR = {"adam": 1e-6, "sgd": 1e-6, "sgdn": 1e-6, "sgdm": 1e-6}
HYPERGRAD_LR = {"adam": 1e-12, "sgd": 1e-6, "sgdn": 1e-6, "sgdm": 1e-6}
SECOND_HYPERGRAD_LR = 1e-9


class Spec(NamedTuple):
    """One candidate: ``rule`` and what it is."""

    family: str
    kind: str  # "base", "analytic" or "hyperdescent"
    adapted: tuple[str, ...]  # the adapted hyperparameters (empty for the base rule)
    rule: Any

    @property
    def name(self) -> str:
        if self.kind == "base":
            return f"{self.family}"
        if self.kind == "analytic":
            return f"{self.family}_hd"
        return f"hyperdescent({self.family}, {{{', '.join(self.adapted)}}})"


def rule_specs(family: str, lr: Optional[float] = None, hypergrad_lr: Optional[float] = None,
               second_hypergrad_lr: float = SECOND_HYPERGRAD_LR) -> list[Spec]:
    """The candidates of one family: base rule, analytic HD rule, hyperdescent on {lr} and (not
    for sgd) on {lr, second} with second = betas[0] (adam) or momentum (sgdn, sgdm).

    Args:
        family: one of :data:`FAMILIES`.
        lr: α (default :data:`LR`).
        hypergrad_lr: β of α (default :data:`HYPERGRAD_LR`).
        second_hypergrad_lr: β of the second adapted hyperparameter.

    Returns:
        The specs, base first.
    """
    lr = LR[family] if lr is None else lr
    beta = HYPERGRAD_LR[family] if hypergrad_lr is None else hypergrad_lr
    factory = {"adam": hdfunc.adam, "sgd": hdfunc.sgd, "sgdn": hdfunc.sgdn,
               "sgdm": hdfunc.rules.sgdm}[family]
    analytic = {"adam": hdfunc.adam_hd, "sgd": hdfunc.sgd_hd, "sgdn": hdfunc.sgdn_hd,
                "sgdm": hdfunc.rules.sgdm_hd}[family]
    second = {"adam": "betas[0]", "sgdn": "momentum", "sgdm": "momentum"}.get(family)
    specs = [Spec(family, "base", (), factory(lr=lr)),
             Spec(family, "analytic", ("lr",), analytic(lr=lr, hypergrad_lr=beta)),
             Spec(family, "hyperdescent", ("lr",), hyperdescent(factory, {"lr": beta}, lr=lr))]
    if second is not None:
        specs.append(Spec(family, "hyperdescent", ("lr", second), hyperdescent(
            factory, {"lr": beta, second: second_hypergrad_lr}, lr=lr)))
    return specs


def state_bytes(state: Any) -> int:
    """The bytes of the tensors in a state pytree: Σ numel · element_size over its leaves
    (non-tensor leaves count 0)."""
    return sum(leaf.numel() * leaf.element_size() for leaf in tree_leaves(state)
               if isinstance(leaf, torch.Tensor))


def make_inputs(shapes, device: str, dtype: torch.dtype, seed: int = 0):
    """(params, grads): lists of tensors, the grads of scale 1e-2 (as bench_optim)."""
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen, dtype=dtype).to(device) for s in shapes]
    grads = [1e-2 * torch.randn(s, generator=gen, dtype=dtype).to(device) for s in shapes]
    return params, grads


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class Candidate(NamedTuple):
    spec: Spec
    compiled: bool
    step: Callable[[], None]  # one update, the state carried in a closure
    state_bytes: int  # after one update
    compile_seconds: float  # compile + 3 warm-up calls (0 when eager)
    graphs: int  # graphs dynamo compiled for it (more than 1: graph breaks or recompiles)
    peak_bytes: Optional[int] = None  # CUDA only: peak allocated during one update - before

    @property
    def label(self) -> str:
        return f"{self.spec.name} [{'compiled' if self.compiled else 'eager'}]"


def make_candidate(spec: Spec, params, grads, device: str, compiled: bool,
                   compile_timeout: float = 600.0) -> Candidate:
    """A step function over its own state; compiled: ``torch.compile(rule.update)``, warmed up
    with three calls (compile time printed to stderr). Raises what the compile raises, and
    TimeoutError where the warm-up took longer than ``compile_timeout`` seconds."""
    update = spec.rule.update
    if compiled:
        # every rule's update is the same function (hdfunc.base.checked_rule's closure), and
        # dynamo caches compiled code per code object, at most recompile_limit (8) entries: past
        # that it silently runs eager. A wrapper with its own code object per candidate keeps
        # each candidate's compiled code apart.
        namespace = {"_update": update}
        exec(compile("def update(grads, state, params):\n"
                     "    return _update(grads, state, params)\n",
                     f"<bench_hyperdescent {spec.name}>", "exec"), namespace)
        update = torch.compile(namespace["update"])
    holder = {"state": spec.rule.init(params)}
    from torch._dynamo.utils import counters
    graphs_before = counters["stats"]["unique_graphs"]

    def step() -> None:
        holder["state"] = update(grads, holder["state"], params)[1]

    start = time.perf_counter()
    for _ in range(3 if compiled else 1):  # the state after one update: tangents allocated
        step()
    synchronize(device)
    elapsed = time.perf_counter() - start
    graphs = counters["stats"]["unique_graphs"] - graphs_before
    peak = None
    if device.startswith("cuda"):  # the transient memory of one update (state swap included)
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        synchronize(device)
        peak = torch.cuda.max_memory_allocated() - before
    if compiled:
        print(f"    compile + 3 calls of {spec.name}: {elapsed:.1f} s, {graphs} graph(s)",
              file=sys.stderr)
        if elapsed > compile_timeout:
            raise TimeoutError(f"compile took {elapsed:.0f} s > {compile_timeout:.0f} s")
        if graphs == 0:
            raise RuntimeError("torch.compile made no graph (dynamo fell back to eager)")
    return Candidate(spec, compiled, step, state_bytes(holder["state"]),
                     elapsed if compiled else 0.0, graphs, peak)


CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}


def measure(candidates: list[Candidate], device: str, rounds: int, min_run_time: float,
            threads: int, clock: str = "wall") -> dict[str, float]:
    """{label: the best over ``rounds`` interleaved rounds of a blocked_autorange median}.

    ``clock="cpu"`` times with the calling thread's CPU time (``time.thread_time``) instead of
    the wall clock: on an oversubscribed CPU it leaves out the time the thread waits for a core.
    Only meaningful on CPU with one thread (the work must run in the calling thread)."""
    if clock == "cpu" and (device != "cpu" or threads != 1):
        raise ValueError("clock='cpu' needs --device cpu and --threads 1")
    best = {c.label: math.inf for c in candidates}
    sync = (lambda: synchronize(device))
    for r in range(rounds):
        for c in candidates:
            c.step()
            sync()
            timer = benchmark.Timer(stmt="step(); sync()", globals={"step": c.step, "sync": sync},
                                    num_threads=threads, label=c.label, timer=CLOCKS[clock])
            best[c.label] = min(best[c.label],
                                timer.blocked_autorange(min_run_time=min_run_time).median)
        print(f"    round {r + 1}/{rounds} done", file=sys.stderr)
    return best


def report(set_name: str, n_params: int, param_bytes: int, candidates: list[Candidate],
           times: dict[str, float], failures: list[str], families: list[str]) -> list[str]:
    """Markdown tables: step times, ratios, state bytes."""
    lines = [f"### {set_name} ({n_params / 1e6:.2f}M params, {param_bytes / 2**20:.1f} MiB)", ""]
    by = {(c.spec.name, c.compiled): c for c in candidates}
    modes = [m for m in (False, True) if any(c.compiled == m for c in candidates)]
    head = " | ".join("eager ms" if not m else "compiled ms" for m in modes)
    lines += [f"| update | k | {head} | " + " | ".join(
        f"{'eager' if not m else 'compiled'} vs base" for m in modes)
        + (" | compile s (graphs) |" if True in modes else " |"),
        "|---|---:|" + "---:|" * (2 * len(modes) + (True in modes))]
    for family in families:
        for spec in [c.spec for c in candidates if c.spec.family == family and not c.compiled]:
            cells, vs = [], []
            for m in modes:
                c, base = by.get((spec.name, m)), by.get((spec.family, m))
                t = times.get(c.label) if c else None
                tb = times.get(base.label) if base else None
                cells.append(f"{1e3 * t:.2f}" if t else "failed")
                vs.append(f"{t / tb:.2f}" if t and tb else "-")
            row = f"| `{spec.name}` | {len(spec.adapted)} | " + " | ".join(cells + vs) + " |"
            if True in modes:
                c = by.get((spec.name, True))
                row += f" {c.compile_seconds:.0f} ({c.graphs}) |" if c else " - |"
            lines.append(row)
    lines += ["", "| hyperdescent vs analytic HD | k | " + " | ".join(
        f"{'eager' if not m else 'compiled'}: t/t_HD | per λ: t/(k t_HD) | overhead per λ"
        for m in modes) + " |", "|---|---:|" + "---:|" * (3 * len(modes))]
    met = []
    for family in families:
        for spec in [c.spec for c in candidates if c.spec.family == family and not c.compiled
                     and c.spec.kind == "hyperdescent"]:
            k = len(spec.adapted)
            cells = []
            for m in modes:
                c, hd, base = (by.get((spec.name, m)), by.get((f"{family}_hd", m)),
                               by.get((family, m)))
                t, th, tb = (times.get(x.label) if x else None for x in (c, hd, base))
                if t and th and tb:
                    per = t / (k * th)
                    met.append(per <= 2.0)
                    cells.append(f"{t / th:.2f} | {per:.2f} {'✓' if per <= 2 else '✗'} | "
                                 f"{(t - tb) / (k * (th - tb)) if th > tb else math.nan:.1f}")
                else:
                    cells.append("- | - | -")
            lines.append(f"| `{spec.name}` | {k} | " + " | ".join(cells) + " |")
    peaks = any(c.peak_bytes is not None for c in candidates)
    lines += ["", f"Per-λ target t/(k t_HD) <= 2 met in {sum(met)} of {len(met)} cases.", "",
              "| state after one update | k | state bytes | extra over base | extra / params "
              "bytes | expected |" + (" peak during update / params bytes (eager, compiled) |"
                                      if peaks else ""),
              "|---|---:|---:|---:|---:|---:|" + ("---:|" if peaks else "")]
    expected_analytic = {"adam": 0, "sgd": 1, "sgdn": 1, "sgdm": 0}
    for family in families:
        base = by.get((family, False))
        for c in [c for c in candidates if c.spec.family == family and not c.compiled]:
            extra = c.state_bytes - base.state_bytes
            want = {"base": 0, "analytic": expected_analytic[family]}.get(
                c.spec.kind, len(c.spec.adapted))
            row = (f"| `{c.spec.name}` | {len(c.spec.adapted)} | {c.state_bytes} | {extra} "
                   f"| {extra / param_bytes:.4f} | {want} |")
            if peaks:
                row += " " + ", ".join(
                    f"{x.peak_bytes / param_bytes:.2f}" if x and x.peak_bytes is not None else "-"
                    for x in (c, by.get((c.spec.name, True)))) + " |"
            lines.append(row)
    if failures:
        lines += ["", "Not measured:", ""] + [f"- {f}" for f in failures]
    return lines + [""]


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sets", default=",".join(PARAMETER_SETS),
                        help="comma-separated parameter sets (default: mlp,resnet18)")
    parser.add_argument("--families", default=",".join(DEFAULT_FAMILIES),
                        help="comma-separated rule families out of adam,sgd,sgdn,sgdm "
                        "(default: adam,sgd,sgdn)")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads (default 1: stable on a shared machine)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--min-run-time", type=float, default=0.2,
                        help="seconds per blocked_autorange (default 0.2)")
    parser.add_argument("--clock", choices=list(CLOCKS), default="wall",
                        help="wall (default) or cpu: the thread's CPU time, which leaves out the "
                        "waits for a core on a busy machine (CPU, 1 thread only)")
    parser.add_argument("--no-compile", action="store_true",
                        help="skip the torch.compile'd updates")
    parser.add_argument("--compile-timeout", type=float, default=300.0,
                        help="drop a compiled candidate whose compile + warm-up takes longer")
    parser.add_argument("--markdown", help="also write the Markdown tables to this file")
    args = parser.parse_args(argv)
    sets = [s for s in args.sets.split(",") if s]
    families = [f for f in args.families.split(",") if f]
    for s in sets:
        if s not in PARAMETER_SETS:
            parser.error(f"unknown set {s!r}; choose from {sorted(PARAMETER_SETS)}")
    for f in families:
        if f not in FAMILIES:
            parser.error(f"unknown family {f!r}; choose from {list(FAMILIES)}")
    torch.set_num_threads(args.threads)
    if not args.no_compile:  # resume functions after a graph break are shared by candidates
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        torch._dynamo.config.accumulated_recompile_limit = max(
            torch._dynamo.config.accumulated_recompile_limit, 1024)
    started = time.perf_counter()
    lines = [f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {bench_optim.machine()}; "
             f"torch {torch.__version__}, device {args.device}"
             + (f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else
                f", {args.threads} thread(s)") + f", float32, {args.rounds} round(s), "
             f"min_run_time {args.min_run_time} s, {args.clock} clock", ""]
    for set_name in sets:
        shapes = PARAMETER_SETS[set_name]()
        n_params = sum(math.prod(s) for s in shapes)
        params, grads = make_inputs(shapes, args.device, torch.float32)
        param_bytes = state_bytes(params)
        candidates, failures = [], []
        print(f"{set_name}: building candidates", file=sys.stderr)
        for family in families:
            for compiled in ([False] if args.no_compile else [False, True]):
                for spec in rule_specs(family):
                    try:
                        candidates.append(make_candidate(spec, params, grads, args.device,
                                                         compiled, args.compile_timeout))
                    except Exception as error:  # a compile failure: reported, not fatal
                        traceback.print_exc(limit=2, file=sys.stderr)
                        failures.append(f"`{spec.name}` {'compiled' if compiled else 'eager'}: "
                                        f"{type(error).__name__}: {str(error)[:200]}")
        print(f"{set_name}: measuring {len(candidates)} candidates x {args.rounds} rounds",
              file=sys.stderr)
        times = measure(candidates, args.device, args.rounds, args.min_run_time, args.threads,
                        args.clock)
        lines += report(set_name, n_params, param_bytes, candidates, times, failures, families)
        print("\n".join(lines), file=sys.stderr)
        del candidates
        torch._dynamo.reset()
    lines.append(f"Wall time of the run: {time.perf_counter() - started:.0f} s.")
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as handle:
            handle.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
