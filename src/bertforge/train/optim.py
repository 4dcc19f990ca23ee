"""Optimizers of the reference: AdamW, LAMB (each with and without Adam's bias correction),
with its parameter groups, and an optional half-precision first moment.

Parameter groups (reference-system.md, "Optimizers"): biases get no weight decay and no LAMB
trust ratio; the other 1-D parameters (LayerNorm weights) get no weight decay but keep the
trust ratio; every matrix (embeddings included) gets weight decay.

Names, as presets and --optimizer give them:
- `AdamW`: torch's, eps 1e-6. Fused (one pass over each tensor doing the whole update) when
  every parameter is on CUDA or CPU, else foreach. Measured on this 2-core CPU with torch
  2.13: one AdamW step over demo_tiny_128's 2.2M parameters takes 1.3 ms fused, 4.4 ms
  foreach, 6.1 ms per-tensor loop; BERT-mini (11.3M) 6.4 / 21.4 / 22.5 ms.
- `AdamWNoBiasCorrection`: the reference's AdamW, `poptorch.optim.AdamW(...,
  bias_correction=False)`: torch's formula without the two bias corrections (below). Its
  steps are larger than torch's for the same learning rate: at step t the update is torch's
  times (1 - b1^t) / sqrt(1 - b2^t) (eps aside, b1 0.9, b2 0.999): 3.2x at t = 1, 6.5x at
  t = 10, 3.2x at t = 100, 1.26x at t = 1000, 1.00x from t ~ 10^4. So a learning rate tuned
  for one does not transfer to the other, and short runs (the reference's 150-step presets)
  see the difference throughout.
- `LAMB` / `LAMBNoBiasCorrection`: ours (torch has no LAMB).

The Adam-family direction shared by all, per parameter tensor x with gradient g:
    m = b1 m + (1 - b1) g                  v = b2 v + (1 - b2) g^2
    m_hat = m / (1 - b1^t)                 v_hat = v / (1 - b2^t)   (skipped by the
                                                                     *NoBiasCorrection names)
    d = m_hat / (sqrt(v_hat) + eps)
AdamW (Loshchilov & Hutter 2019, decoupled weight decay, in torch's order):
    x = x (1 - lr wd);  x = x - lr d
LAMB (You et al. 2019, "Large Batch Optimization for Deep Learning: Training BERT in 76
minutes", Algorithm 2, with phi = identity):
    u = d + wd x;  r = ||x|| / ||u||   (1 if either norm is 0, and 1 in the no-trust-ratio group)
    x = x - lr r u
No global gradient-norm clipping and no trust-ratio clamp: the paper has neither. Our AdamW and
LAMB each have two implementations: a per-tensor loop (`*_reference`, the readable
definition) and the same with torch._foreach_* ops (`*_foreach`). On BERT-base's ~200
parameter tensors the loop launches ~2,400 small GPU kernels per step against ~15
multi-tensor ones; on CPU the two cost about the same (11 ms per step for demo_tiny_128,
33-55 ms for BERT-mini). Tests check the two agree to float64 rounding.

Half first moment (--enable-half-first-order-momentum, the reference's flag): exp_avg is
stored in bfloat16, 2 bytes per parameter instead of 4 (BERT-large: 0.67 GB less state per
replica, 16 -> 14 bytes per parameter with fp32 weights, gradients and second moment). The
update itself is computed in the parameter's dtype from a temporary copy, so the only extra
error is one bf16 rounding of m per step (relative 2^-9); the second moment stays fp32, as
squared gradients span too wide a range. bf16 rather than fp16 even under --precision fp16:
the optimizer sees unscaled gradients, and fp16 would flush first moments below 6e-8 (common
for embedding rows) to zero, while bf16 keeps fp32's exponent range. With it, `AdamW` uses
our implementation with bias correction (torch's fused kernel keeps its state in the
parameter dtype); tests check that it matches torch's AdamW when the moment is fp32. Cost: the
temporary fp32 copy of m during the step (4 bytes per parameter, freed before the next
forward, so not at the activation peak) and ~2 extra elementwise passes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch

OPTIMIZERS = ("AdamW", "AdamWNoBiasCorrection", "LAMB", "LAMBNoBiasCorrection")
HALF_MOMENTUM_DTYPE = torch.bfloat16


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """The reference's three groups, empty ones dropped; `trust_ratio` is read by LAMB only.

    named_parameters() lists a tied parameter once (the decoder weight is the word embedding,
    the decoder bias is cls.predictions.bias), so nothing is updated twice.
    """
    decay, norm_weights, biases = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.endswith("bias"):
            biases.append(param)
        elif param.ndim <= 1:
            norm_weights.append(param)
        else:
            decay.append(param)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "trust_ratio": True},
        {"params": norm_weights, "weight_decay": 0.0, "trust_ratio": True},
        {"params": biases, "weight_decay": 0.0, "trust_ratio": False},
    ]
    return [g for g in groups if g["params"]]


class _AdamFamily(torch.optim.Optimizer, ABC):
    """State handling shared by our AdamW and LAMB; subclasses name the update function.

    State per parameter: `step` (float32 CPU tensor, as torch's Adam keeps it), `exp_avg`,
    `exp_avg_sq`; it round-trips through state_dict()/load_state_dict() for exact resume.
    `half_momentum` is a property of this optimizer object, not of the saved state: torch's
    load_state_dict casts every state tensor to its parameter's dtype, so step() (re)casts
    exp_avg to bf16 when needed (lossless for a state that was bf16 before saving).
    """

    NAME = ""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0, bias_correction: bool = True,
                 foreach: bool = True, half_momentum: bool = False, **extra):
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError(f"{self.NAME} needs lr, eps and weight_decay >= 0 (got {lr}, {eps}, "
                             f"{weight_decay})")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"{self.NAME} betas must be in [0, 1) (got {betas})")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        bias_correction=bias_correction, foreach=foreach, **extra)
        self.half_momentum = half_momentum
        super().__init__(params, defaults)

    @abstractmethod
    def _update(self, group, params, grads, exp_avgs, exp_avg_sqs, steps) -> None:
        """One step of `group`'s parameters that have a gradient (the subclass's formula)."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{self.NAME} does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                moment_dtype = HALF_MOMENTUM_DTYPE if self.half_momentum else p.dtype
                if state["exp_avg"].dtype != moment_dtype:
                    state["exp_avg"] = state["exp_avg"].to(moment_dtype)
                params.append(p)
                grads.append(p.grad)
                exp_avgs.append(state["exp_avg"])
                exp_avg_sqs.append(state["exp_avg_sq"])
                steps.append(state["step"])
            if params:
                self._update(group, params, grads, exp_avgs, exp_avg_sqs, steps)
        return loss


class AdamW(_AdamFamily):
    """AdamW (bias_correction=True) or AdamWNoBiasCorrection (False), our implementation; the
    name `AdamW` uses torch's unless the first moment is half (see the module docstring)."""

    NAME = "AdamW"

    def _update(self, group, params, grads, exp_avgs, exp_avg_sqs, steps) -> None:
        fn = _adamw_foreach if group["foreach"] else _adamw_reference
        fn(params, grads, exp_avgs, exp_avg_sqs, steps, lr=group["lr"], beta1=group["betas"][0],
           beta2=group["betas"][1], eps=group["eps"], weight_decay=group["weight_decay"],
           bias_correction=group["bias_correction"])


class LAMB(_AdamFamily):
    """LAMB (bias_correction=True) or LAMBNoBiasCorrection (False); see the module docstring.
    A group's `trust_ratio` (default True) turns the trust ratio off for it (biases)."""

    NAME = "LAMB"

    def __init__(self, params, **kwargs):
        super().__init__(params, trust_ratio=True, **kwargs)

    def _update(self, group, params, grads, exp_avgs, exp_avg_sqs, steps) -> None:
        fn = _lamb_foreach if group["foreach"] else _lamb_reference
        fn(params, grads, exp_avgs, exp_avg_sqs, steps, lr=group["lr"], beta1=group["betas"][0],
           beta2=group["betas"][1], eps=group["eps"], weight_decay=group["weight_decay"],
           bias_correction=group["bias_correction"], trust_ratio=group["trust_ratio"])


# ---------------------------------------------------------------- per-tensor reference path
def _adam_direction(p, g, m_stored, v, step, *, beta1, beta2, eps, bias_correction):
    """d = m_hat / (sqrt(v_hat) + eps) for one tensor, updating its moments and step."""
    step += 1
    t = step.item()
    # A half first moment is updated in the parameter's dtype and rounded once when stored.
    m = m_stored if m_stored.dtype == p.dtype else m_stored.to(p.dtype)
    m.mul_(beta1).add_(g, alpha=1 - beta1)
    if m is not m_stored:
        m_stored.copy_(m)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    m_hat, v_hat = (m / (1 - beta1 ** t), v / (1 - beta2 ** t)) if bias_correction else (m, v)
    return m_hat / (v_hat.sqrt() + eps)


def _adamw_reference(params, grads, exp_avgs, exp_avg_sqs, steps, *, lr, beta1, beta2, eps,
                     weight_decay, bias_correction):
    """One AdamW step, tensor by tensor: the definition the foreach version must match."""
    for p, g, m, v, step in zip(params, grads, exp_avgs, exp_avg_sqs, steps):
        direction = _adam_direction(p, g, m, v, step, beta1=beta1, beta2=beta2, eps=eps,
                                    bias_correction=bias_correction)
        p.mul_(1 - lr * weight_decay)  # decoupled decay from the pre-update weights, as torch
        p.add_(direction, alpha=-lr)


def _lamb_reference(params, grads, exp_avgs, exp_avg_sqs, steps, *, lr, beta1, beta2, eps,
                    weight_decay, bias_correction, trust_ratio):
    """One LAMB step, tensor by tensor: the definition the foreach version must match."""
    for p, g, m, v, step in zip(params, grads, exp_avgs, exp_avg_sqs, steps):
        update = _adam_direction(p, g, m, v, step, beta1=beta1, beta2=beta2, eps=eps,
                                 bias_correction=bias_correction)
        if weight_decay != 0:
            update.add_(p, alpha=weight_decay)
        ratio = 1.0
        if trust_ratio:
            p_norm, u_norm = p.norm(), update.norm()
            if p_norm > 0 and u_norm > 0:
                ratio = (p_norm / u_norm).item()
        p.add_(update, alpha=-lr * ratio)


# ---------------------------------------------------------------- multi-tensor fast path
def _adam_directions_foreach(params, grads, exp_avgs, exp_avg_sqs, steps, *, beta1, beta2, eps,
                             bias_correction):
    """The directions d of every tensor with foreach kernels, updating moments and steps."""
    torch._foreach_add_(steps, 1)
    half = [m for m, p in zip(exp_avgs, params) if m.dtype != p.dtype]
    # Half first moments: update fp32 copies, then store them rounded (see module docstring).
    moments = [m.to(p.dtype) for m, p in zip(exp_avgs, params)] if half else exp_avgs
    torch._foreach_lerp_(moments, grads, 1 - beta1)            # m = b1 m + (1 - b1) g
    if half:
        torch._foreach_copy_(exp_avgs, moments)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
    if bias_correction:
        ts = [s.item() for s in steps]                         # CPU tensors: no device sync
        denom = torch._foreach_div(exp_avg_sqs, [1 - beta2 ** t for t in ts])
        torch._foreach_sqrt_(denom)
        torch._foreach_add_(denom, eps)
        update = torch._foreach_div(moments, [1 - beta1 ** t for t in ts])
        torch._foreach_div_(update, denom)
    else:
        denom = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_add_(denom, eps)
        update = torch._foreach_div(moments, denom)
    return update


def _adamw_foreach(params, grads, exp_avgs, exp_avg_sqs, steps, *, lr, beta1, beta2, eps,
                   weight_decay, bias_correction):
    """One AdamW step over the whole tensor list with multi-tensor (foreach) kernels."""
    update = _adam_directions_foreach(params, grads, exp_avgs, exp_avg_sqs, steps, beta1=beta1,
                                      beta2=beta2, eps=eps, bias_correction=bias_correction)
    if weight_decay != 0:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    torch._foreach_add_(params, update, alpha=-lr)


def _lamb_foreach(params, grads, exp_avgs, exp_avg_sqs, steps, *, lr, beta1, beta2, eps,
                  weight_decay, bias_correction, trust_ratio):
    """One LAMB step over the whole tensor list with multi-tensor (foreach) kernels."""
    update = _adam_directions_foreach(params, grads, exp_avgs, exp_avg_sqs, steps, beta1=beta1,
                                      beta2=beta2, eps=eps, bias_correction=bias_correction)
    if weight_decay != 0:
        torch._foreach_add_(update, params, alpha=weight_decay)
    if trust_ratio:
        # Norms stay on the device: one stacked where() instead of a sync per tensor.
        p_norms = torch.stack(torch._foreach_norm(params))
        u_norms = torch.stack(torch._foreach_norm(update))
        ratios = torch.where((p_norms > 0) & (u_norms > 0), p_norms / u_norms, torch.ones_like(p_norms))
        torch._foreach_mul_(update, list((ratios * -lr).unbind()))
        torch._foreach_add_(params, update)
    else:
        torch._foreach_add_(params, update, alpha=-lr)


def build_optimizer(model: torch.nn.Module, section) -> torch.optim.Optimizer:
    """The optimizer named by `section.optimizer` over the reference's parameter groups.

    `section` is any object with: optimizer, learning_rate, weight_decay, beta1, beta2, eps,
    enable_half_first_order_momentum.
    """
    name = section.optimizer
    groups = parameter_groups(model, section.weight_decay)
    half = section.enable_half_first_order_momentum
    common = dict(lr=section.learning_rate, betas=(section.beta1, section.beta2), eps=section.eps,
                  weight_decay=section.weight_decay)
    if name in ("AdamW", "AdamWNoBiasCorrection"):
        for g in groups:
            del g["trust_ratio"]
        if name == "AdamW" and not half:
            # torch has fused AdamW kernels for CUDA and (since 2.4) CPU; see module docstring.
            fusable = all(p.device.type in ("cuda", "cpu") for g in groups for p in g["params"])
            kind = {"fused": True} if fusable else {"foreach": True}
            return torch.optim.AdamW(groups, **common, **kind)
        return AdamW(groups, **common, bias_correction=(name == "AdamW"), half_momentum=half)
    if name in ("LAMB", "LAMBNoBiasCorrection"):
        return LAMB(groups, **common, bias_correction=(name == "LAMB"), half_momentum=half)
    raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
