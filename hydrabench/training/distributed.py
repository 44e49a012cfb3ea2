"""Several training processes on torch.distributed, launched by `torchrun` (or `accelerate launch`).

Each process trains on its slice of every micro-batch; DDP (or FSDP's reduce-scatter) averages
the gradients. Weighting each process's loss by its share of the micro-batch's tokens makes that
average equal to the loss a single process computes on the whole micro-batch, so the global batch,
and the result, do not depend on the number of processes. Only rank 0 writes records and artifacts.

Methods the profile names under `sharding:` (full fine-tuning) train an FSDP2-sharded copy; rank 0
keeps the model it was given as the full copy the trained weights are gathered into, so saving
and everything after training see a plain model.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, number of processes); (0, 1) when not launched by torchrun."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def is_main() -> bool:
    return world()[0] == 0


def backend_for(device: str | torch.device) -> str:
    """The process-group backend for a run on `device`: NCCL for CUDA, gloo otherwise. The run's
    device decides, not the machine: a CPU profile on a GPU box needs gloo, as NCCL has no CPU
    collectives."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def init_if_launched(device: str | torch.device) -> None:
    """Join the process group torchrun set up, with the backend of the run's `device`; a CUDA
    run binds this process to its GPU (LOCAL_RANK), a CPU run never touches CUDA."""
    if world()[1] > 1 and not dist.is_initialized():
        backend = backend_for(device)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend)


def settle() -> None:
    """Return once every process has finished every collective it started: gloo's barrier waits
    for the process group's earlier work. A process that leaves with a collective still in
    flight may abort at exit ("terminate called without an active exception", seen once in CI
    on a rank done training while rank 0 saved): gloo's worker thread releases the collective's
    tensors while Python is finalizing, and FSDP's DTensor caches keep the process group alive
    past `destroy_process_group`, so it is torn down only then."""
    if dist.is_initialized():
        dist.barrier()


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


def all_gather(value: Any) -> list[Any]:
    """`value` from every process, in rank order (a one-item list in a single process)."""
    if not dist.is_initialized():
        return [value]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def strategy(sharding: dict[str, Any] | None) -> str:
    """How this process trains: single, ddp, or fsdp:<config name>."""
    if not dist.is_initialized():
        return "single"
    return f"fsdp:{sharding['name']}" if sharding else "ddp"


def prepare(model: torch.nn.Module,
            sharding: dict[str, Any] | None) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(module to run forward/backward through, module whose parameters the optimizer steps)."""
    if not dist.is_initialized():
        return model, model
    if sharding:
        sharded = shard(model, sharding)
        return sharded, sharded
    from torch.nn.parallel import DistributedDataParallel

    # The model's device, not the machine's: DDP given a GPU for a CPU model fails
    device = next(model.parameters()).device
    device_ids = [device.index] if device.type == "cuda" and device.index is not None else None
    return DistributedDataParallel(model, device_ids=device_ids), model


def shard(model: torch.nn.Module, options: dict[str, Any]) -> torch.nn.Module:
    """An FSDP2-sharded copy of `model`, one unit per decoder layer plus the root.

    `model` moves to CPU memory (rank 0: to receive the trained weights; other ranks: emptied).
    """
    from torch.distributed.fsdp import (
        CPUOffloadPolicy,
        MixedPrecisionPolicy,
        OffloadPolicy,
        fully_shard,
    )

    reduce_dtype = options.get("reduce_dtype")
    settings = {
        "reshard_after_forward": options.get("reshard_after_forward", True),
        "mp_policy": MixedPrecisionPolicy(
            reduce_dtype=getattr(torch, reduce_dtype) if reduce_dtype else None),
        "offload_policy": CPUOffloadPolicy() if options.get("cpu_offload") else OffloadPolicy(),
    }
    sharded = copy.deepcopy(model.to("cpu"))
    # transformers names the blocks that must not be split: those are FSDP's units
    units = set(getattr(model, "_no_split_modules", None) or ())
    for module in sharded.modules():
        if type(module).__name__ in units:
            fully_shard(module, **settings)
    fully_shard(sharded, **settings)  # moves the shards to this process's device
    if not is_main():
        model.to("meta")  # only rank 0 keeps a full copy
    return sharded


FULL_STATE = {"full_state_dict": True, "cpu_offload": True}


def gather_into(sharded: torch.nn.Module, model: torch.nn.Module) -> None:
    """Copy the trained weights of the sharded copy into rank 0's full `model` (all ranks call)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    weights = get_model_state_dict(sharded, options=StateDictOptions(**FULL_STATE))
    if is_main():
        model.load_state_dict(weights)
