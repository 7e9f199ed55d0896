"""Train a sharded model with AdamHD under FSDP2, and checkpoint it with DCP.

    torchrun --nproc-per-node 2 examples/fsdp2_train.py            # CPU (gloo)
    torchrun --nproc-per-node 8 examples/fsdp2_train.py --device cuda

Every rank holds a shard of each parameter (DTensors); AdamHD sums the hypergradient's dot
products of the local shards over the ranks in one all-reduce per step, so every rank applies
the same α, the one a single process would compute over the whole model (docs/optim.md,
"Scaling out"). Half-way, the model and the optimizer (with α) are saved with
torch.distributed.checkpoint and loaded back; a run on another number of ranks can load them too.
"""

from __future__ import annotations

import argparse
import gc
import os
import tempfile

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.fsdp import fully_shard

from hdfunc.optim import AdamHD


def sharded_model(device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)  # the same initial weights on every rank
    model = torch.nn.Sequential(torch.nn.Linear(32, 256), torch.nn.GELU(),
                                torch.nn.Linear(256, 256), torch.nn.GELU(),
                                torch.nn.Linear(256, 1)).to(device)
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model


def train(args: argparse.Namespace) -> None:
    rank = dist.get_rank()
    device = torch.device(args.device, rank % torch.cuda.device_count()) \
        if args.device == "cuda" else torch.device("cpu")
    model = sharded_model(device)
    optimizer = AdamHD(model.parameters(), lr=1e-3, hypergrad_lr=1e-6)
    generator = torch.Generator().manual_seed(rank)  # each rank its own data
    for step in range(args.steps):
        x = torch.randn(64, 32, generator=generator).to(device)
        y = x[:, :1].sin().to(device)
        loss = torch.nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if rank == 0 and step % 10 == 0:
            print(f"step {step:3d}  loss {loss.item():.4f}  alpha {optimizer.param_groups[0]['lr']:.3e}")
        if step == args.steps // 2:  # save and load back, as a restarted job would
            dcp.save({"model": get_model_state_dict(model),
                      "optim": get_optimizer_state_dict(model, optimizer)},
                     checkpoint_id=args.checkpoint)
            model = sharded_model(device)
            optimizer = AdamHD(model.parameters(), lr=1e-3, hypergrad_lr=1e-6)
            state = {"model": get_model_state_dict(model),
                     "optim": get_optimizer_state_dict(model, optimizer)}
            dcp.load(state, checkpoint_id=args.checkpoint)
            set_model_state_dict(model, state["model"])
            set_optimizer_state_dict(model, optimizer, state["optim"])
    if rank == 0:
        print(f"done: alpha {optimizer.adapted_lrs()[0].item():.4e}, the same on every rank")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--checkpoint", default=os.path.join(tempfile.gettempdir(), "hd_fsdp2"))
    args = parser.parse_args()
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    try:
        # The model and optimizer live in train(), and the collection frees the reference cycles
        # FSDP leaves, so they go while Python is fully alive. Left to the interpreter's exit,
        # torch 2.13's gloo threads could still be releasing tensors then, and abort the process
        # ("terminate called without an active exception").
        train(args)
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
