"""CUDA paths (bf16/fp16 autocast, fused AdamW on GPU, SDPA kernels, NCCL): run on a GPU machine.

Marked `gpu` and skipped when no CUDA device is visible, so the CPU suite stays green; on a
GPU machine `pytest -m gpu` runs them.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from support import losses, tiny_config, write_random_shards

from bertforge.train.pretraining import pretrain

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


# The tolerances below were measured with unit_test's earlier optimizer (torch's AdamW, fused
# on CUDA, lr 1e-3); the preset now follows the reference (AdamWNoBiasCorrection, lr 1e-2), so
# these tests pin the values they were tuned on, and keep exercising torch's fused kernel.
TUNED_ON = {"optimizer": "AdamW", "learning_rate": 1e-3}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    return write_random_shards(tmp_path_factory.mktemp("gpu-shards"))


@pytest.mark.parametrize("precision,extra", [("fp32", {}), ("bf16", {}),
                                             ("fp16", {"auto_loss_scaling": True})])
def test_cuda_training_tracks_cpu_fp32(shards, tmp_path, precision, extra):
    cpu = pretrain(tiny_config(shards, tmp_path / "cpu", training_steps=3, hidden_dropout_prob=0.0,
                               **TUNED_ON))
    gpu = pretrain(tiny_config(shards, tmp_path / precision, training_steps=3, device="cuda",
                               precision=precision, hidden_dropout_prob=0.0, **extra, **TUNED_ON))
    tolerance = 1e-4 if precision == "fp32" else 0.03
    for a, b in zip(gpu.history, cpu.history):
        assert abs(a["loss"] - b["loss"]) < tolerance * b["loss"]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs for NCCL")
def test_nccl_ddp_equals_one_gpu(shards, tmp_path):
    """torchrun over every visible GPU (NCCL, up to 8) == 1 process with the same global batch:
    the same losses and weights (benchmarks/gpu_check.py runs this as its `ddp` check)."""
    gpus = min(torch.cuda.device_count(), 8)  # 96 records: 3 steps of 4 x 8
    common = ["--config", "unit_test", "--input-files", shards, "--sequence-length", "32",
              "--mask-tokens", "5", "--micro-batch-size", "4", "--training-steps", "3",
              "--dataloader-workers", "0", "--disable-progress-bar", "--device", "cuda",
              "--max-position-embeddings", "64", "--hidden-dropout-prob", "0",
              "--global-batch-size", str(4 * gpus), "--optimizer", TUNED_ON["optimizer"],
              "--learning-rate", str(TUNED_ON["learning_rate"])]
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(gpus),
                    "--standalone", "-m", "bertforge", "pretrain", *common,
                    "--checkpoint-output-dir", str(tmp_path / "ddp")], check=True, timeout=600,
                   env=os.environ.copy())
    subprocess.run([sys.executable, "-m", "bertforge", "pretrain", *common,
                    "--checkpoint-output-dir", str(tmp_path / "one")], check=True, timeout=600)
    a = load_file(tmp_path / "ddp" / "step_3" / "model.safetensors")
    b = load_file(tmp_path / "one" / "step_3" / "model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-4, rtol=1e-3, msg=key)
    torch.testing.assert_close(torch.tensor(losses(tmp_path / "ddp")),
                               torch.tensor(losses(tmp_path / "one")), atol=1e-4, rtol=1e-4)


def test_varlen_kernel_matches_the_per_segment_reference():
    from bertforge.model.attention import _kernel, reference_varlen, segments
    torch.manual_seed(0)
    ids = torch.tensor([[1] * 100 + [2] * 60 + [0] * 96, [1] * 256, [1] * 7 + [2] * 200 + [0] * 49])
    offsets, longest = segments(ids.cuda())
    q, k, v = (torch.randn(ids.numel(), 4, 64, device="cuda", dtype=torch.bfloat16,
                           requires_grad=True) for _ in range(3))
    fast = _kernel(q, k, v, offsets, longest, 0.125)
    grads_fast = torch.autograd.grad(fast.float().square().sum(), (q, k, v))
    slow = reference_varlen(q, k, v, offsets, 0.125)
    grads_slow = torch.autograd.grad(slow.float().square().sum(), (q, k, v))
    torch.testing.assert_close(fast, slow, atol=2e-2, rtol=2e-2)
    for a, b in zip(grads_fast, grads_slow):
        torch.testing.assert_close(a, b, atol=5e-2, rtol=5e-2)


def test_varlen_training_tracks_sdpa(shards, tmp_path):
    common = {"training_steps": 3, "device": "cuda", "precision": "bf16", "hidden_dropout_prob": 0.0,
              **TUNED_ON}
    sdpa = pretrain(tiny_config(shards, tmp_path / "sdpa", **common))
    varlen = pretrain(tiny_config(shards, tmp_path / "varlen", attn_implementation="varlen", **common))
    for a, b in zip(varlen.history, sdpa.history):
        assert abs(a["loss"] - b["loss"]) < 0.03 * b["loss"]
