"""The reference's remaining non-IPU flags, end to end on tiny shapes: --profile-dir (a
torch.profiler trace), --wandb-param-steps (parameter and gradient statistics in the metrics
log) and --enable-half-first-order-momentum (bf16 exp_avg, still learning). The alias
--recompute-checkpoint-every-layer is a config matter: tests/test_config.py. ~15 s on 2 cores.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from bertforge.train import checkpoint as ckpt
from bertforge.train.pretraining import pretrain
from support import losses, tiny_config, write_random_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    return write_random_shards(tmp_path_factory.mktemp("shards"))


def test_profile_dir_writes_a_chrome_trace_of_steps_3_to_5(shards, tmp_path):
    profile = tmp_path / "profile"
    pretrain(tiny_config(shards, tmp_path / "run", training_steps=6, profile_dir=str(profile)))
    traces = list(profile.glob("rank0.*.pt.trace.json"))
    assert len(traces) == 1, list(profile.iterdir())
    trace = json.loads(traces[0].read_text())  # valid JSON (Chrome trace format)
    names = {e.get("name", "") for e in trace["traceEvents"]}
    steps = sorted(n for n in names if n.startswith("ProfilerStep#"))
    # 0-based steps 2, 3, 4 = the run's steps 3-5: steps 1-2 are left out as warm-up.
    assert steps == ["ProfilerStep#2", "ProfilerStep#3", "ProfilerStep#4"], steps
    assert any("aten::" in n for n in names)  # the ops of the step were recorded


def test_wandb_param_steps_logs_parameter_and_gradient_statistics(shards, tmp_path):
    run = tmp_path / "run"
    result = pretrain(tiny_config(shards, run, training_steps=5, wandb_param_steps=2,
                                  save_initial_checkpoint=True))
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    params = [l for l in lines if l["split"] == "params"]
    assert [l["step"] for l in params] == [0, 2, 4]
    assert len(losses(run)) == 5 == len(result.history)  # the train lines are unchanged
    # Step 0's statistics are those of the weights saved at the start (before any update).
    weights = load_file(run / "step_0" / "model.safetensors")
    first = params[0]
    name = "bert.encoder.layer.0.attention.self.query.weight"
    w = weights[name].double()
    assert first[f"{name}/norm"] == pytest.approx(w.norm().item(), rel=1e-5)
    assert first[f"{name}/mean"] == pytest.approx(w.mean().item(), rel=1e-4, abs=1e-7)
    assert first[f"{name}/std"] == pytest.approx(w.std(correction=0).item(), rel=1e-5)
    # Every saved tensor has the six statistics (gradients included), all finite.
    for key in weights:
        if key in ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias"):
            continue  # tied to the word embeddings / cls.predictions.bias: listed once
        for stat in ("norm", "mean", "std", "grad_norm", "grad_mean", "grad_std"):
            assert math.isfinite(first[f"{key}/{stat}"]), (key, stat)
    assert first[f"{name}/grad_norm"] > 0
    assert params[2][f"{name}/norm"] != first[f"{name}/norm"]  # the weights moved


def test_half_first_order_momentum_keeps_exp_avg_in_bf16_and_still_learns(shards, tmp_path):
    # --dataset generated repeats one sample, so the loss can fall in a few steps (random
    # shards stay at the uniform loss, ln 1000, whatever the optimizer).
    steps, common = 12, {"dataset": "generated", "input_files": []}
    pretrain(tiny_config(shards, tmp_path / "half", training_steps=steps,
                         enable_half_first_order_momentum=True, **common))
    pretrain(tiny_config(shards, tmp_path / "full", training_steps=steps, **common))
    state = ckpt.load_training_state(tmp_path / "half" / f"step_{steps}")["optimizer"]["state"]
    assert state and all(s["exp_avg"].dtype == torch.bfloat16 for s in state.values())
    assert all(s["exp_avg_sq"].dtype == torch.float32 for s in state.values())
    full_state = ckpt.load_training_state(tmp_path / "full" / f"step_{steps}")["optimizer"]["state"]
    assert all(s["exp_avg"].dtype == torch.float32 for s in full_state.values())
    a, b = losses(tmp_path / "half"), losses(tmp_path / "full")
    assert sum(a[-3:]) < 0.8 * sum(a[:3]), a  # learns
    # ... and tracks the fp32-moment run closely (one bf16 rounding of m per step).
    assert all(abs(x - y) < 0.02 * y for x, y in zip(a, b)), (a, b)
