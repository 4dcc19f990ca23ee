"""Mixed precision: bf16 / fp16 autocast, and loss scaling for fp16.

- fp32: plain.
- bf16: autocast on CPU and GPU; bf16 keeps fp32's exponent range, so no loss scaling.
- fp16: autocast plus either dynamic loss scaling (`--auto-loss-scaling`, torch's GradScaler,
  the counterpart of the reference's ALS: grows the scale every 2000 clean steps, halves it and
  skips the step on inf/nan) or a static `--loss-scaling S` (loss x S, gradients / S).
Master weights and optimizer state stay fp32 in every mode.
"""

from __future__ import annotations

import contextlib

import torch


class Precision:
    def __init__(self, precision: str, device: torch.device, *, auto_loss_scaling: bool = False,
                 loss_scaling: float | None = None):
        if precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"--precision must be fp32, bf16 or fp16, not {precision!r}")
        self.precision, self.device = precision, device
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        self.scaler = None
        self.static_scale = None
        if precision == "fp16":
            if auto_loss_scaling:
                self.scaler = torch.amp.GradScaler(device.type, init_scale=loss_scaling or 2.0**16)
            else:
                self.static_scale = float(loss_scaling or 1.0)

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        elif self.static_scale not in (None, 1.0):
            (loss * self.static_scale).backward()
        else:
            loss.backward()

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is not None:
            self.scaler.step(optimizer)
            self.scaler.update()
            return
        if self.static_scale not in (None, 1.0):
            for group in optimizer.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.grad.div_(self.static_scale)
        optimizer.step()

    @property
    def loss_scale(self) -> float:
        if self.scaler is not None:
            return float(self.scaler.get_scale())
        return self.static_scale or 1.0

    def state_dict(self) -> dict:
        return {"scaler": self.scaler.state_dict() if self.scaler is not None else None}

    def load_state_dict(self, state: dict) -> None:
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
