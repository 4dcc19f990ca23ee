"""Mixed precision: bf16 / fp16 autocast, and loss scaling for fp16.

- fp32: plain.
- bf16: autocast on CPU and GPU; bf16 keeps fp32's exponent range, so no loss scaling.
- fp16: autocast plus either dynamic loss scaling (`--auto-loss-scaling`, torch's GradScaler,
  the counterpart of the reference's ALS: grows the scale every 2000 clean steps, halves it and
  skips the step on inf/nan) or a static `--loss-scaling S` (loss x S, gradients / S).
Master weights and optimizer state stay fp32 in every mode (but the first moment with
--enable-half-first-order-momentum: bf16, train/optim.py).

A step is `unscale_and_clip` (gradients back to their true scale, the global norm measured
and, with --max-grad-norm, clipped: the norm is what the loop checks for inf/nan and logs)
then `step`, which reports whether dynamic loss scaling skipped it. Cost: one pass over the
gradients for the norm (a fused foreach kernel), ~1% of a BERT-mini step on CPU.
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

    def unscale_and_clip(self, optimizer: torch.optim.Optimizer,
                         max_norm: float | None = None) -> torch.Tensor:
        """Gradients at their true scale; returns their global L2 norm (before clipping), and
        clips them to `max_norm` when given. inf/nan when any gradient is."""
        params = [p for group in optimizer.param_groups for p in group["params"]
                  if p.grad is not None]
        grads = [p.grad for p in params]
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)
        elif self.static_scale not in (None, 1.0):
            torch._foreach_div_(grads, self.static_scale)
        norm = torch.nn.utils.get_total_norm(grads)
        if max_norm is not None:
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
        return norm

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        """The optimizer step after `unscale_and_clip`; True when dynamic loss scaling skipped
        it (inf/nan gradients: the scale is halved and the step not taken)."""
        if self.scaler is not None:
            before = self.scaler.get_scale()
            self.scaler.step(optimizer)
            self.scaler.update()
            return self.scaler.get_scale() < before
        optimizer.step()
        return False

    @property
    def skips_bad_steps(self) -> bool:
        """Dynamic loss scaling: inf/nan gradients are expected now and then and skipped."""
        return self.scaler is not None

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
