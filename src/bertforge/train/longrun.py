"""Running long jobs comfortably: the start-up summary, the ETA, and a checkpoint when the
scheduler says stop.

- `startup_summary`: what will run, on what, and how big each step is, before the first step
  (which may take minutes at the reference's global batch of 65,536 sequences); `Eta` then
  turns the steps done so far into the time left, printed after the first steps and on every
  step line.
- `StopRequests`: batch schedulers (SLURM, Kubernetes) send SIGTERM some seconds before they
  kill a job (SLURM can send SIGUSR1 earlier with --signal). Instead of dying mid-step, the
  run finishes its current step, saves a checkpoint and exits with 128 + the signal number,
  so the job can be requeued and resumed exactly. Under DDP every rank checks the flags of all
  ranks (one small all-reduce per step, only when there are several processes) so that they
  stop after the same step. A second signal of the same kind ends the process at once.
Cost: one clock read per step; the all-reduce above with DDP.
"""

from __future__ import annotations

import signal
import threading
import time
from typing import Any

import torch

from bertforge.train.distributed import DistContext, all_reduce_sum

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def startup_summary(cfg: Any, model: torch.nn.Module, ctx: DistContext, name: str,
                    start_step: int, steps: int, task_lines: list[str]) -> list[str]:
    """Lines describing the run before its first step (logged by rank 0)."""
    t, o, c = cfg.train, cfg.optim, model.config
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    processes = f"{ctx.world_size} process{'es' if ctx.world_size > 1 else ''}"
    frozen = f", {params - trainable:,} frozen" if trainable != params else ""
    schedule = o.lr_schedule if o.lr_schedule == "constant" else \
        f"{o.lr_schedule} with {o.lr_warmup:g} warmup"
    every = cfg.checkpoint.checkpoint_steps
    saves = f"every {every} steps and at the end" if every else "at the end"
    return [
        f"{name}: BERT {params / 1e6:.2f}M parameters{frozen} (hidden {c.hidden_size}, "
        f"{c.num_hidden_layers} layers, {c.num_attention_heads} heads, vocab "
        f"{c.vocab_size:,}) on {ctx.device}, {processes}, {t.precision}"
        + (", torch.compile" if t.compile else ""),
        f"{name}: global batch {t.global_batch_size:,} = micro-batch {t.micro_batch_size} x "
        f"accumulation {t.gradient_accumulation} x {processes}",
        *task_lines,
        f"{name}: steps {start_step} -> {steps} with {o.optimizer}, lr {o.learning_rate:g} "
        f"{schedule}; checkpoints {saves} in {cfg.checkpoint.checkpoint_output_dir or 'the run folder'}",
    ]


class Eta:
    """Time left, from this process's wall time per step so far (checkpoints and evaluations
    included: they recur at the same cadence)."""

    def __init__(self, start_step: int, steps: int):
        self.first, self.steps = start_step, steps
        self.begin = time.perf_counter()

    def seconds(self, done: int) -> float | None:
        if done <= self.first:
            return None
        per_step = (time.perf_counter() - self.begin) / (done - self.first)
        return per_step * (self.steps - done)


class StopRequests:
    """Context manager: while inside, SIGTERM/SIGUSR1 set a flag instead of ending the
    process; `requested()` says (on every rank alike) whether to stop after this step."""

    def __init__(self, ctx: DistContext):
        self.ctx = ctx
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def _handler(self, signum, frame) -> None:
        if self.signal == signum:  # asked twice: the default action, now
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            signal.raise_signal(signum)
        self.signal = signum

    def __enter__(self) -> StopRequests:
        # Handlers can only be set from the main thread (a library caller's worker thread
        # keeps Python's defaults).
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handler) for sig in STOP_SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._previous.items():
            signal.signal(sig, old)
        self._previous = {}

    def requested(self) -> int | None:
        """The signal to stop for (the largest number raised on any rank), else None."""
        local = self.signal or 0
        if self.ctx.world_size > 1:
            flag = torch.tensor([float(local)], dtype=torch.float64, device=self.ctx.device)
            if all_reduce_sum(flag, self.ctx).item() > 0:  # some rank was asked to stop
                return local or int(signal.SIGTERM)
            return None
        return local or None
