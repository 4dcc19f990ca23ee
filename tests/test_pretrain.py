"""The training loop end to end on tiny shapes: exact resume, checkpoints, DDP, learning."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import transformers
from safetensors.torch import load_file

from bertforge.config import load_config
from bertforge.train import checkpoint as ckpt
from bertforge.train.pretraining import pretrain
from bertforge.train.sources import random_batch
from support import MASK, SEQ, VOCAB, losses, tiny_config, write_random_shards

@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    return write_random_shards(tmp_path_factory.mktemp("shards"))



# Dynamic masking draws each batch's masks at load time: resume must give the same ones.
RECIPES = {"static": {}, "dynamic-mlm-wwm": dict(objective="mlm", masking="dynamic",
                                                 mask_rate=0.25, whole_word_masking=True)}


@pytest.mark.parametrize("recipe", RECIPES)
def test_resume_is_exact(shards, tmp_path, recipe):
    """2N steps in one go == N steps, resume, N steps: same losses and bit-identical weights."""
    extra = RECIPES[recipe]
    whole = pretrain(tiny_config(shards, tmp_path / "whole", training_steps=6, **extra))
    first = pretrain(tiny_config(shards, tmp_path / "split", training_steps=3, **extra))
    assert [h["loss"] for h in first.history] == [h["loss"] for h in whole.history[:3]]
    resumed = pretrain(tiny_config(shards, tmp_path / "split", training_steps=6,
                                   checkpoint_input_dir=str(tmp_path / "split" / "step_3"),
                                   resume_training_from_checkpoint=True, **extra))
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in whole.history[3:]]
    assert losses(tmp_path / "split") == losses(tmp_path / "whole")
    a = load_file(tmp_path / "whole" / "step_6" / "model.safetensors")
    b = load_file(tmp_path / "split" / "step_6" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_checkpoint_loads_into_transformers(shards, tmp_path):
    result = pretrain(tiny_config(shards, tmp_path / "run", training_steps=2))
    step_dir = result.final_checkpoint
    assert step_dir == tmp_path / "run" / "step_2"
    hf, info = transformers.BertForPreTraining.from_pretrained(step_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    state = torch.load(step_dir / ckpt.STATE_FILE, weights_only=True)
    assert state["step"] == 2 and state["consumed_batches"] == 4
    saved = json.loads((step_dir / ckpt.CONFIG_FILE).read_text())
    assert saved["data"]["sequence_length"] == SEQ
    # Same outputs as the model that wrote it, through the stock HF forward.
    from bertforge.model.bert import GatheredBertForPreTraining
    ours = GatheredBertForPreTraining.from_pretrained(step_dir).eval()
    hf.eval()
    batch = random_batch(2, SEQ, MASK, VOCAB, torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(input_ids=batch["input_ids"], attention_mask=batch["input_mask"],
                 token_type_ids=batch["segment_ids"])
        mine = ours.bert(batch["input_ids"], attention_mask=batch["input_mask"],
                         token_type_ids=batch["segment_ids"])
        logits = ours.cls.predictions(mine.last_hidden_state)
    torch.testing.assert_close(logits, ref.prediction_logits, atol=1e-5, rtol=1e-5)


def test_existing_run_is_refused_unless_resuming(shards, tmp_path):
    pretrain(tiny_config(shards, tmp_path / "run", training_steps=1))
    with pytest.raises(ValueError, match="already holds checkpoints"):
        pretrain(tiny_config(shards, tmp_path / "run", training_steps=1))


def test_run_dir_resolves_latest_step_numerically(tmp_path):
    for step in (2, 9, 10, 12):
        (tmp_path / f"step_{step}").mkdir()
        for name in ("config.json", "model.safetensors", ckpt.STATE_FILE):
            (tmp_path / f"step_{step}" / name).write_text("{}")
    (tmp_path / "step_12" / "model.safetensors").unlink()  # no weights: never complete
    (tmp_path / ".tmp-step_11-123").mkdir()  # an interrupted save never counts
    assert ckpt.resolve_checkpoint(tmp_path) == tmp_path / "step_10"
    assert ckpt.resolve_checkpoint("bert-base-uncased") == "bert-base-uncased"
    with pytest.raises(ValueError, match="no such directory"):
        ckpt.resolve_checkpoint("./missing-dir")


def test_ddp_two_processes_equal_one(shards, tmp_path):
    """torchrun with 2 CPU ranks (gloo) == 1 process with the same global batch."""
    common = ["--config", "unit_test", "--input-files", shards, "--sequence-length", str(SEQ),
              "--mask-tokens", str(MASK), "--micro-batch-size", "4", "--training-steps", "3",
              "--dataloader-workers", "0", "--disable-progress-bar", "--device", "cpu",
              "--max-position-embeddings", "64", "--hidden-dropout-prob", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                    "--standalone", "-m", "bertforge", "pretrain", *common,
                    "--global-batch-size", "8", "--checkpoint-output-dir", str(tmp_path / "ddp")],
                   check=True, env=env, timeout=300)
    subprocess.run([sys.executable, "-m", "bertforge", "pretrain", *common,
                    "--global-batch-size", "8", "--checkpoint-output-dir", str(tmp_path / "one")],
                   check=True, env=env, timeout=300)
    ddp_state = torch.load(tmp_path / "ddp" / "step_3" / ckpt.STATE_FILE, weights_only=True)
    assert ddp_state["world_size"] == 2
    a = load_file(tmp_path / "ddp" / "step_3" / "model.safetensors")
    b = load_file(tmp_path / "one" / "step_3" / "model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=2e-5, rtol=1e-4, msg=key)
    torch.testing.assert_close(torch.tensor(losses(tmp_path / "ddp")),
                               torch.tensor(losses(tmp_path / "one")), atol=1e-5, rtol=1e-5)


def test_accumulation_equals_one_big_batch(shards, tmp_path):
    """micro 4 x accumulation 2 == micro 8 x 1 through the whole loop (fp32, no dropout)."""
    runs = {}
    for name, micro, accum in (("acc", 4, 2), ("big", 8, 1)):
        runs[name] = pretrain(tiny_config(shards, tmp_path / name, micro_batch_size=micro,
                                          gradient_accumulation=accum, training_steps=3,
                                          hidden_dropout_prob=0.0))
    a = load_file(tmp_path / "acc" / "step_3" / "model.safetensors")
    b = load_file(tmp_path / "big" / "step_3" / "model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4, msg=key)
    assert [h["sequences"] for h in runs["acc"].history] == [8.0, 8.0, 8.0]


@pytest.mark.parametrize("precision,extra", [
    ("bf16", {}),
    ("fp16", {"auto_loss_scaling": True, "loss_scaling": 1.0}),
    ("fp16", {"loss_scaling": 128.0}),
], ids=["bf16", "fp16-auto-loss-scaling", "fp16-static-loss-scaling"])
def test_mixed_precision_trains_close_to_fp32(shards, tmp_path, precision, extra):
    ref = pretrain(tiny_config(shards, tmp_path / "fp32", training_steps=3, hidden_dropout_prob=0.0))
    run = pretrain(tiny_config(shards, tmp_path / precision, training_steps=3, precision=precision,
                               hidden_dropout_prob=0.0, **extra))
    for mine, theirs in zip(run.history, ref.history):
        assert abs(mine["loss"] - theirs["loss"]) < 0.05 * theirs["loss"]
    if extra.get("auto_loss_scaling"):
        state = torch.load(tmp_path / precision / "step_3" / ckpt.STATE_FILE, weights_only=True)
        assert state["precision"]["scaler"]["scale"] >= 1.0  # the GradScaler state is saved


def test_held_out_evaluation_counts_every_record(shards, tmp_path):
    eval_dir = tmp_path / "heldout"
    eval_glob = write_random_shards(eval_dir, num_shards=1, records_per_shard=10)
    result = pretrain(tiny_config(shards, tmp_path / "run", training_steps=2, eval_files=[eval_glob],
                                  eval_every=1))
    assert result.eval["records"] == 10
    assert 0.0 <= result.eval["mlm_acc"] <= 1.0
    lines = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines if l["split"] == "eval"] == [1, 2]
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))


def test_clock_in_metrics_and_step_line_and_an_unreached_target(shards, tmp_path, capsys):
    """Every train and eval record carries wall_s / train_s / samples; the step line ends with
    the wall time; a --target-mlm-accuracy that is not reached runs every step and says so."""
    eval_glob = write_random_shards(tmp_path / "heldout", num_shards=1, records_per_shard=10)
    result = pretrain(tiny_config(shards, tmp_path / "run", training_steps=3, eval_files=[eval_glob],
                                  eval_every=1, target_mlm_accuracy=0.99))
    assert result.target_reached is None and result.steps == 3
    out = capsys.readouterr().out
    assert "target mlm_acc 0.99 not reached in 3 steps" in out
    assert " - wall: " in out.splitlines()[0]
    lines = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [l["samples"] for l in lines if l["split"] == "train"] == [8.0, 16.0, 24.0]
    walls = [l["wall_s"] for l in lines]
    assert walls == sorted(walls) and all(l["train_s"] <= l["wall_s"] for l in lines)


def test_mlm_bias_starts_at_the_data_prior_unless_zero(shards, tmp_path):
    from bertforge.data.loader import masked_label_counts
    counts = torch.as_tensor(masked_label_counts([shards], VOCAB), dtype=torch.float64)
    for mode in ("unigram", "zero"):
        pretrain(tiny_config(shards, tmp_path / mode, training_steps=1, mlm_bias_init=mode,
                             save_initial_checkpoint=True))
        bias = load_file(tmp_path / mode / "step_0" / "model.safetensors")["cls.predictions.bias"]
        expected = ((counts + 1) / (counts + 1).sum()).log().float() if mode == "unigram" \
            else torch.zeros(VOCAB)
        assert torch.allclose(bias, expected), mode


def test_synthetic_and_generated_data_need_no_files(tmp_path):
    for name, flag in (("synthetic", {"synthetic_data": True}), ("generated", {"dataset": "generated"})):
        result = pretrain(tiny_config("", tmp_path / name, input_files=[], training_steps=2, **flag))
        assert len(result.history) == 2 and all(h["loss"] > 0 for h in result.history)


def test_compiled_training_matches_eager_and_fills_the_cache(shards, tmp_path):
    """--compile (torch.compile) gives the eager losses; --executable-cache-dir keeps artifacts."""
    eager = pretrain(tiny_config(shards, tmp_path / "eager", training_steps=2, hidden_dropout_prob=0.0))
    cache = tmp_path / "cache"
    compiled = pretrain(tiny_config(shards, tmp_path / "compiled", training_steps=2,
                                    hidden_dropout_prob=0.0, compile=True,
                                    executable_cache_dir=str(cache)))
    for a, b in zip(compiled.history, eager.history):
        assert abs(a["loss"] - b["loss"]) < 1e-4 * b["loss"]
    assert any(p.is_file() for p in (cache / "inductor").rglob("*"))


def test_starts_from_a_real_pretrained_encoder(tmp_path, minilm_dir):
    """--checkpoint-input-dir with an HF BERT directory (the offline MiniLM): weights, shape
    and tokenizer come from it; the heads it lacks are initialised."""
    result = pretrain(load_config("demo_tiny_128", {
        "synthetic_data": True, "training_steps": 1, "micro_batch_size": 2, "global_batch_size": 2,
        "checkpoint_input_dir": str(minilm_dir), "checkpoint_output_dir": str(tmp_path / "run"),
        "disable_progress_bar": True, "device": "cpu"}))
    step_dir = result.final_checkpoint
    saved = json.loads((step_dir / ckpt.CONFIG_FILE).read_text())
    assert saved["model"]["hidden_size"] == 384 and saved["model"]["num_hidden_layers"] == 6
    assert (step_dir / "vocab.txt").read_bytes() == (minilm_dir / "vocab.txt").read_bytes()
    source = load_file(minilm_dir / "model.safetensors")
    ours = load_file(step_dir / "model.safetensors")
    key = next(k for k in source if k.endswith("encoder.layer.5.output.dense.weight"))
    # One AdamW step moves weights by ~lr: still close to the pretrained ones, not re-initialised.
    assert (ours["bert." + key.removeprefix("bert.")] - source[key]).abs().max() < 1e-2
