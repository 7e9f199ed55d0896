"""Step time of the HD optimizers under FSDP2 against torch's, side by side in one run.

    python benchmarks/bench_fsdp.py                    # 2 CPU processes (gloo), the paper's MLP
    python benchmarks/bench_fsdp.py --world 4 --rounds 5

Each process holds its shard of the paper's MLP (784-1000-1000-10, float32, every Linear and the
root wrapped by ``fully_shard``). The optimizer step alone is timed (forward and backward once
before each round; the step repeated on the same gradients), for torch.optim.Adam and AdamHD,
torch.optim.SGD and SGDHD, with the same kernel (foreach). Rounds interleave the candidates and
each keeps its best median, so a load spike on a shared machine hits all of them alike. HD's
communication is measured too: the collectives and bytes of one step (CommDebugMode).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CANDIDATES = ("torch Adam", "AdamHD", "torch SGD", "SGDHD")


def make(name: str, params):
    from hdfunc.optim import SGDHD, AdamHD

    if name == "torch Adam":
        return torch.optim.Adam(params, lr=1e-3, foreach=True)
    if name == "AdamHD":
        return AdamHD(params, lr=1e-3, hypergrad_lr=1e-7, foreach=True)
    if name == "torch SGD":
        return torch.optim.SGD(params, lr=1e-3, foreach=True)
    return SGDHD(params, lr=1e-3, hypergrad_lr=1e-3, foreach=True)


def worker(rank: int, world: int, port: int, rounds: int, repeats: int, out: str) -> None:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.debug import CommDebugMode

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    x = torch.randn(128, 784)
    y = torch.randint(0, 10, (128,))
    setups = {}
    for name in CANDIDATES:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(784, 1000), torch.nn.ReLU(),
                                    torch.nn.Linear(1000, 1000), torch.nn.ReLU(),
                                    torch.nn.Linear(1000, 10))
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer)
        fully_shard(model)
        setups[name] = (model, make(name, model.parameters()))
    best = {name: float("inf") for name in CANDIDATES}
    comms = {}
    for _ in range(rounds):
        for name, (model, optimizer) in setups.items():
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()  # warm-up (state made)
            with CommDebugMode() as comm:
                optimizer.step()
            comms[name] = sum(comm.get_comm_counts().values())
            times = []
            for _ in range(repeats):
                dist.barrier()
                start = time.perf_counter()
                optimizer.step()
                times.append(time.perf_counter() - start)
            best[name] = min(best[name], statistics.median(times))
    table = torch.zeros(1, 3, dtype=torch.float64)  # what HD all-reduces: one row per group
    reduce_times = []
    for _ in range(rounds * repeats):
        dist.barrier()
        start = time.perf_counter()
        dist.all_reduce(table)
        reduce_times.append(time.perf_counter() - start)
    if rank == 0:
        lines = ["| optimizer | step (ms) | ratio | collectives per step |", "|---|---|---|---|"]
        for name in CANDIDATES:
            base = best["torch Adam"] if "Adam" in name else best["torch SGD"]
            lines.append(f"| {name} | {1e3 * best[name]:.2f} | {best[name] / base:.2f} | "
                         f"{comms[name]} |")
        lines.append(f"| (HD's all-reduce alone: 24 bytes) | "
                     f"{1e3 * statistics.median(reduce_times):.2f} | | 1 |")
        Path(out).write_text("\n".join(lines) + "\n")
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = Path("/tmp") / f"bench_fsdp_{os.getpid()}.md"
    mp.spawn(worker, args=(args.world, port, args.rounds, args.repeats, str(out)),
             nprocs=args.world, join=True)
    print(f"FSDP2, {args.world} CPU processes (gloo, 1 thread each), the paper's MLP "
          f"(1.8M params, float32), torch {torch.__version__}; step alone, best of "
          f"{args.rounds} rounds of the median of {args.repeats} steps")
    print(out.read_text())


if __name__ == "__main__":
    main()
