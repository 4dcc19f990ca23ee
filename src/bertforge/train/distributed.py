"""One place that knows about processes: torchrun environment, device choice, DDP wrapping.

Model code stays single-device (house style, after torchtitan); this module applies data
parallelism. `torchrun --nproc-per-node N -m bertforge pretrain ...` sets RANK/WORLD_SIZE/
LOCAL_RANK and a rendezvous, so multi-node needs nothing here beyond init_process_group:
NCCL on CUDA, gloo on CPU. Rank 0 alone logs and writes (`is_main`).
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import logging
import os
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")
log = logging.getLogger(__name__)

# Why the process group's teardown needs care (a hang at exit: seen in CI, and in 2 of 135
# runs of SQuAD's 2-rank test on a 2-core machine): gloo's worker threads free each finished
# collective after the caller has moved on, and that free can need the GIL (a tensor or
# thread-local state made in Python). The group's destructor joins those threads. When a
# Python handle of the group drops the last reference, the binding releases the GIL first:
# safe. When DDP's reducer drops it, the GIL stays held while joining: a deadlock. So no DDP
# wrapper may outlive the group's Python handles: `wrap_model` records its wrappers, the
# engine drops them before `shutdown`, and `shutdown` parks the handle until exit when one is
# still alive.
_WRAPPERS: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()
_PARKED: list[object] = []


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
    wrapper = DistributedDataParallel(model, device_ids=ids)
    _WRAPPERS.add(wrapper)  # see _WRAPPERS: it must be gone before the group's last handle
    return wrapper


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
    barrier, so that the ranks leave at once. Not after a failure: a rank that failed alone
    would wait there for ranks that are stuck in another collective, instead of exiting so
    that torchrun stops them. The last reference to the group goes here, through a Python
    handle, once no DDP wrapper is left (see _WRAPPERS); else at exit. Cost: one full
    garbage collection."""
    if not (ctx.is_distributed and dist.is_initialized()):
        return
    group = dist.group.WORLD  # this handle outlives the registry's: it is the last one
    if together:
        dist.barrier()
    dist.destroy_process_group()
    gc.collect()  # wrappers in reference cycles go now, while `group` still holds the group
    if len(_WRAPPERS):
        if not _PARKED:
            atexit.register(_release_parked)
        _PARKED.append(group)
        log.debug("a DDP wrapper outlives the process group: its handle is kept until exit")
    # leaving here drops `group`: the group's destructor runs without the GIL


def _release_parked() -> None:
    """At exit, while the interpreter still runs: collect what is left, then drop the parked
    handles (each the group's last reference unless a wrapper is still reachable)."""
    gc.collect()
    if not len(_WRAPPERS):
        _PARKED.clear()
