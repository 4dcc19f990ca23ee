"""Training learns: memorising a small real sample (the reference's check), and
learning from context on held-out text within a few hundred steps, every seed.

The reference trained demo_tiny_128 on ~45 records for 360 steps and asked for a falling
loss and a mean mlm_acc over the last 10 steps above 0.85 (memorising a small sample is
what a correct model, head, loss and optimizer must manage). Same check here, on records
made by `bertforge tokenize` from two short real Wikipedia documents (~8k characters, 23
records at duplication 1). Measured: mean mlm_acc of the last 10 steps 0.995 with 23
records, 0.86 with 46 (duplication 2: too close to the bar for a CI test). About a minute
on 2 idle CPU cores.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bertforge.config import load_config
from bertforge.data.instances import InstanceConfig, tokenize
from bertforge.data.vocab import load_tokenizer
from bertforge.demo import DEMO_PRESET, most_frequent_token_accuracy, prepare_sample_shards
from bertforge.train.pretraining import pretrain


def small_real_corpus(preprocessed: Path, target_chars: int, out: Path) -> Path:
    """A few short documents of the real sample (blank-line separated), ~target_chars long."""
    docs = [d for f in sorted(preprocessed.rglob("*.txt"))
            for d in f.read_text(encoding="utf-8").split("\n\n") if 1000 < len(d) < 8000]
    chosen, size = [], 0
    for doc in docs:
        chosen.append(doc.strip("\n"))
        size += len(doc)
        if size >= target_chars:
            break
    out.write_text("\n\n".join(chosen) + "\n", encoding="utf-8")
    return out


def test_demo_tiny_128_memorises_a_small_sample(preprocessed_sample, tmp_path):
    corpus = small_real_corpus(preprocessed_sample, 8_000, tmp_path / "small.txt")
    config = InstanceConfig(sequence_length=128, mask_tokens=20, duplication_factor=1, seed=1984,
                            short_seq_prob=0.1, mlm_prob=0.15)
    summary = tokenize([corpus], tmp_path / "shards", config, tokenizer=load_tokenizer(),
                       num_shards=1, workers=1)
    records = summary.counts["instances out"]
    assert 15 <= records <= 60, summary.line()
    cfg = load_config("demo_tiny_128", {
        "input_files": [str(tmp_path / "shards" / "*.tfrecord")], "training_steps": 360,
        "checkpoint_output_dir": str(tmp_path / "run"), "dataloader_workers": 0,
        "disable_progress_bar": True, "device": "cpu"})
    result = pretrain(cfg)
    first, last = result.history[:10], result.history[-10:]
    assert sum(h["loss"] for h in last) < 0.5 * sum(h["loss"] for h in first)
    assert result.last_mean("mlm_acc") > 0.85, result.last_mean("mlm_acc")


@pytest.mark.parametrize("seed", [5, 1])
def test_a_few_hundred_steps_learn_context_on_held_out_text(seed, tmp_path, wiki_sample):
    """The demo's recipe on the real sample: held-out MLM accuracy at least twice what
    predicting the most frequent token scores, within a 400-step schedule, for the presets'
    seed 5 and another. Before the MLM bias started at the prior (it started at zero), seed 5
    sat at that baseline (0.048 after 300 steps). With the fix, on these shards (baseline
    0.0468, target 0.0936; the vocab is reproducible, so these are the shards every run
    gets): 0.107-0.110 at step 400 for seeds 1, 2, 3, 5 and the target first met at step 250
    (0.099-0.101). A 300-step schedule ended at 0.095-0.098, too close to the bar: it failed
    once in CI when the vocab was still a random draw (baseline 0.0489). It also checks
    --target-mlm-accuracy: the run stops at the first evaluation at or above the target, with
    the checkpoint there. About 25-30 s per seed on 2 idle cores."""
    data = prepare_sample_shards(tmp_path / "data", log=lambda line: None)
    baseline, _ = most_frequent_token_accuracy(data.heldout_files)
    assert 0.03 < baseline < 0.07, baseline
    target = 2 * baseline
    cfg = load_config(DEMO_PRESET, {
        "input_files": [str(f) for f in data.train_files],
        "eval_files": [str(f) for f in data.heldout_files], "tokenizer": str(data.vocab_file),
        "training_steps": 400, "eval_every": 50, "target_mlm_accuracy": target,
        "checkpoint_steps": 50,  # the stop step is a checkpoint step too: saved once
        "random_seed": seed, "checkpoint_output_dir": str(tmp_path / "run"),
        "dataloader_workers": 0, "disable_progress_bar": True, "device": "cpu"})
    result = pretrain(cfg)
    reached = result.target_reached
    assert reached is not None, f"held-out mlm_acc {result.eval['mlm_acc']:.4f} < {target:.4f}"
    assert reached["mlm_acc"] >= target and reached["step"] % 50 == 0
    assert result.final_checkpoint == tmp_path / "run" / f"step_{reached['step']}"
    assert len(result.history) == reached["step"] < 400
