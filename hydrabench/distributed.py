"""Several training processes on torch.distributed, launched by `torchrun` (or `accelerate launch`).

Each process trains on its slice of every micro-batch; DDP averages the gradients. Weighting each
process's loss by its share of the micro-batch's tokens makes that average equal to the loss a
single process computes on the whole micro-batch, so the global batch, and the result, do not
depend on the number of processes. Only rank 0 writes records and artifacts.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, number of processes); (0, 1) when not launched by torchrun."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def is_main() -> bool:
    return world()[0] == 0


def init_if_launched() -> None:
    """Join the process group torchrun set up: NCCL on GPUs, gloo on CPUs."""
    if world()[1] > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_sum(value: float) -> float:
    """The sum of `value` over all processes (the value itself in a single process)."""
    if not dist.is_initialized():
        return value
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    tensor = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return float(tensor.item())


def data_parallel(model: torch.nn.Module) -> torch.nn.Module:
    """The module to run forward/backward through: DDP across processes, else the model itself."""
    if not dist.is_initialized():
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [torch.cuda.current_device()] if torch.cuda.is_available() else None
    return DistributedDataParallel(model, device_ids=device_ids)
