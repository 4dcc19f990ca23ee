"""What a recipe gives the training engine (train/engine.py): the task interface.

Pre-training (train/pretraining.py) and SQuAD (squad/finetune.py) are tasks: each says how
to build its model, which micro-batches make a step, the loss of one micro-batch with the
step's normalisers, how its statistics become metrics, and how to evaluate. Everything
else (devices, checkpoints, resume, precision, optimizer, accumulation, DDP, logging,
cadence) is the engine's, once. `Task` holds the defaults a task may keep.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from bertforge.train.distributed import DistContext
    from bertforge.train.engine import Engine


class Task(ABC):
    """Base of the recipes' tasks; subclasses implement the abstract methods."""

    name = "task"              # progress bar label and default run directory prefix
    trains = True              # False: the run only evaluates an existing model
    eval_every = 0             # evaluate every N steps during training (0: at the end only)
    target: tuple[str, float] | None = None  # stop once evaluate()[name] >= value
    # Settings (section, field) that a resume must keep: they decide the data order, the
    # batch a saved position points into, or what the optimizer state holds.
    resume_keys: tuple[tuple[str, str], ...] = (("optim", "optimizer"),)
    order_depends_on_world_size = False  # True: ranks split the data, so N ranks != M ranks

    @abstractmethod
    def build_model(self, engine: Engine) -> torch.nn.Module:
        """The model, from `engine.source` (a checkpoint) when there is one."""

    def training_module(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module DDP wraps and the step calls (default: the model itself)."""
        return model

    def prepare(self, engine: Engine) -> int:
        """Read what training needs; return the number of optimizer steps."""
        return engine.cfg.train.training_steps

    @abstractmethod
    def step_batches(self, engine: Engine, start_step: int, consumed_batches: int
                     ) -> Iterator[list[dict[str, torch.Tensor]]]:
        """The micro-batches of each step from `start_step` on (this rank's, on its device);
        `consumed_batches` micro-batches were consumed before (exact resume)."""

    def normalizers(self, micro_batches: list[dict[str, torch.Tensor]], ctx: DistContext) -> Any:
        """Whatever `loss` divides by so the step's summed losses are the global mean."""
        return None

    @abstractmethod
    def loss(self, forward: torch.nn.Module, batch: dict[str, torch.Tensor], norms: Any
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss to backward, 1-D tensor of statistics to sum over micro-batches and ranks)."""

    @abstractmethod
    def metrics(self, totals: list[float], world_size: int) -> dict[str, float]:
        """The step's metrics from the summed statistics; must include "sequences"."""

    def step_fields(self, metrics: dict[str, float], short: bool = False) -> dict[str, str]:
        """The task's part of the step line (label -> value); `short`: the progress bar's."""
        return {"loss": f"{metrics['loss']:.4f}"}

    def summary_lines(self, engine: Engine) -> list[str]:
        """The task's lines of the start-up summary (train/longrun.py): data, sequence size."""
        return []

    def evaluate(self, engine: Engine) -> dict[str, float] | None:
        """Held-out metrics (all ranks, under no_grad, model in eval mode), or None."""
        return None

    def target_met(self, metrics: dict[str, float]) -> bool:
        return self.target is not None and metrics[self.target[0]] >= self.target[1]

    def synthetic_batch(self, device: torch.device) -> dict[str, torch.Tensor]:
        """One well-formed micro-batch of random data (--compile-only)."""
        raise NotImplementedError(f"{self.name} has no --compile-only")
