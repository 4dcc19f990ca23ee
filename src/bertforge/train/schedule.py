"""Learning-rate schedules of the reference: "constant" and "linear", both with linear warmup.

The factor multiplies the optimizer's base learning rate at optimizer step `s` (0-based):
    warmup = int(lr_warmup * training_steps)
    s < warmup:            s / warmup          (so step 0 runs at lr 0, as HF's
                                                get_linear_schedule_with_warmup, which the
                                                reference used, does)
    constant, s >= warmup: 1
    linear,   s >= warmup: (training_steps - s) / (training_steps - warmup), floored at 0
With pretrain_base_128 (7038 steps, warmup 0.28) that is 1970 warmup steps to the peak 6e-3,
then 5068 steps of decay reaching 0 at step 7038 (one past the last step taken, 7037, which
runs at 1/5068 of the peak).

A LambdaLR: its state (last_epoch) round-trips through state_dict() for exact resume; the
lambda itself is rebuilt from the config, so nothing unpicklable is saved. The schedule name
and warmup fraction are validated by the config's OptimSection only.
"""

from __future__ import annotations

import torch

def lr_factor(step: int, lr_schedule: str, warmup_steps: int, training_steps: int) -> float:
    """Multiplier of the base learning rate at optimizer step `step` (see module docstring)."""
    if step < warmup_steps:
        return step / warmup_steps
    if lr_schedule == "constant":
        return 1.0
    return max(0.0, (training_steps - step) / max(1, training_steps - warmup_steps))


def build_scheduler(optimizer: torch.optim.Optimizer, lr_schedule: str, lr_warmup: float,
                    training_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR for `lr_schedule` with a warmup of int(lr_warmup * training_steps) steps."""
    warmup_steps = int(lr_warmup * training_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, lr_schedule, warmup_steps, training_steps))
