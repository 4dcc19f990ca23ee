"""The README's pre-training recipes end to end on the sample: continued pre-training of a
Hugging Face encoder, and phase 1 (S=64 here) -> phase 2 (S=128) from the phase-1 checkpoint
with a fresh optimizer and schedule."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from bertforge.data.instances import InstanceConfig, tokenize
from bertforge.data.vocab import load_tokenizer
from bertforge.train import checkpoint as ckpt
from bertforge.train.pretraining import pretrain
from support import tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sample_shards(preprocessed_sample, tmp_path_factory) -> dict[int, str]:
    """One file of the sample tokenized at S=64 and S=128 (bert-base-uncased's vocab)."""
    root = tmp_path_factory.mktemp("recipe-shards")
    text = sorted(preprocessed_sample.rglob("*.txt"))[:1]
    out = {}
    for seq, mask in ((64, 10), (128, 20)):
        tokenize(text, root / str(seq), InstanceConfig(sequence_length=seq, mask_tokens=mask,
                                                       duplication_factor=1),
                 tokenizer=load_tokenizer(), workers=1)
        out[seq] = str(root / str(seq) / "*.tfrecord")
    return out


def test_continue_pretraining_a_hugging_face_encoder(sample_shards, tmp_path, minilm_dir):
    source = minilm_dir  # a real encoder without MLM/NSP heads
    result = pretrain(tiny_config(
        sample_shards[128], tmp_path / "run", sequence_length=128, mask_tokens=20,
        vocab_size=30522, micro_batch_size=2, gradient_accumulation=1, training_steps=2,
        checkpoint_input_dir=str(source), save_initial_checkpoint=True))
    start = load_file(tmp_path / "run" / "step_0" / "model.safetensors")
    original = load_file(source / "model.safetensors")
    # its shape and its encoder weights, not the preset's fresh model
    config = json.loads((result.final_checkpoint / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"]) == (384, 6)
    for name in ("embeddings.word_embeddings.weight", "encoder.layer.5.output.dense.weight"):
        theirs = original.get(name, original.get(f"bert.{name}"))
        assert torch.equal(start[f"bert.{name}"], theirs), name
    # its vocab travels with the checkpoints; its missing MLM head starts at the unigram prior
    assert (result.final_checkpoint / "vocab.txt").read_text() == \
        (source / "vocab.txt").read_text()
    assert start["cls.predictions.bias"].std() > 0.5
    assert result.history[-1]["mlm_loss"] < 10.4  # ln(30522) = 10.3: not a uniform guess


def test_continued_pretraining_refuses_shards_of_another_vocab(small_vocab_shards, tmp_path,
                                                               minilm_dir):
    _, shards = small_vocab_shards
    with pytest.raises(ValueError, match=r"has another vocab than the shards.*tokenize with "
                                         r"--vocab-file .*vocab.txt"):
        pretrain(tiny_config(shards, tmp_path / "run", sequence_length=64, mask_tokens=8,
                             vocab_size=2000, checkpoint_input_dir=str(minilm_dir)))


def test_phase_2_starts_from_phase_1_with_a_fresh_optimizer(sample_shards, tmp_path):
    shape = dict(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                 max_position_embeddings=128, micro_batch_size=4, gradient_accumulation=1)
    phase1 = pretrain(tiny_config(sample_shards[64], tmp_path / "phase1", sequence_length=64,
                                  mask_tokens=10, training_steps=3, **shape))
    phase2 = pretrain(tiny_config(
        sample_shards[128], tmp_path / "phase2", sequence_length=128, mask_tokens=20,
        training_steps=4, lr_schedule="linear", lr_warmup=0.5, learning_rate=1e-3,
        checkpoint_input_dir=str(tmp_path / "phase1"), save_initial_checkpoint=True, **shape))
    end1 = load_file(phase1.final_checkpoint / "model.safetensors")
    start2 = load_file(tmp_path / "phase2" / "step_0" / "model.safetensors")
    assert all(torch.equal(end1[k], start2[k]) for k in end1)  # the phase-1 weights
    # a fresh schedule: warm-up from 0 over int(0.5 x 4) = 2 steps, then decay
    assert [round(h["lr"], 6) for h in phase2.history] == [0.0, 0.0005, 0.001, 0.0005]
    state = torch.load(phase2.final_checkpoint / ckpt.STATE_FILE, weights_only=True)
    assert state["step"] == 4  # counted from 0 again, not from phase 1's 3
    saved = json.loads((phase2.final_checkpoint / ckpt.CONFIG_FILE).read_text())
    assert saved["data"]["sequence_length"] == 128
