"""One place that knows about processes: torchrun environment, device choice, DDP wrapping.

Model code stays single-device (house style, after torchtitan); this module applies data
parallelism. `torchrun --nproc-per-node N -m bertforge pretrain ...` sets RANK/WORLD_SIZE/
LOCAL_RANK and a rendezvous, so multi-node needs nothing here beyond init_process_group:
NCCL on CUDA, gloo on CPU. Rank 0 alone logs and writes (`is_main`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def pick_device(preference: str, local_rank: int = 0) -> torch.device:
    """`auto` takes CUDA when present; asking for CUDA without one is a user error."""
    if preference not in ("auto", "cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu or cuda, not {preference!r}")
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("--device cuda was given but no CUDA device is visible; use --device cpu")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(device_preference: str = "auto") -> DistContext:
    """Read the torchrun environment; start the process group when there is more than one rank."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_preference, local_rank)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None)
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def wrap_model(model: torch.nn.Module, ctx: DistContext) -> torch.nn.Module:
    if not ctx.is_distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel
    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def sync_gradients(model: torch.nn.Module, last_micro_step: bool):
    """Gradients all-reduce only on the last micro-step of an accumulation (DDP no_sync)."""
    if last_micro_step or not hasattr(model, "no_sync"):
        return contextlib.nullcontext()
    return model.no_sync()


def all_reduce_sum(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    if ctx.is_distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def on_main(ctx: DistContext, fn: Callable[[], T], what: str) -> T | None:
    """Run `fn` on rank 0 alone (writing files), then let every rank go on together, or stop
    together: when it raised, rank 0 raises its error and the others a one-line error naming
    `what`, instead of waiting at a barrier until the collective timeout (30 min with NCCL).
    Returns fn's result on rank 0, None elsewhere. Cost: one one-element all-reduce."""
    result, error = None, None
    if ctx.is_main:
        try:
            result = fn()
        except Exception as err:  # noqa: BLE001 (re-raised below, after telling the others)
            error = err
    if ctx.is_distributed:
        failed = torch.tensor([0.0 if error is None else 1.0], device=ctx.device)
        dist.all_reduce(failed, op=dist.ReduceOp.SUM)
        if failed.item() and error is None:
            raise RuntimeError(f"{what} failed on rank 0; its error is in rank 0's output")
    if error is not None:
        raise error
    return result


def shutdown(ctx: DistContext, together: bool = True) -> None:
    """Leave the process group; `together` (the run ended normally on every rank) after a
    barrier. Not after a failure: a rank that failed alone would wait there for ranks that
    are stuck in another collective, instead of exiting so that torchrun stops them. The
    barrier: gloo's worker thread frees each
    finished collective's tensors after the caller has moved on, and freeing a tensor made in
    Python needs the GIL; if the group is destroyed meanwhile (DDP's reducer dropping the last
    reference), its destructor joins that thread while holding the GIL: a deadlock (seen with
    an all_reduce of a Python-made flag as the last collective). A barrier's work holds no
    Python tensor, and the thread frees earlier works before it runs the barrier."""
    if ctx.is_distributed and dist.is_initialized():
        if together:
            dist.barrier()
        dist.destroy_process_group()
