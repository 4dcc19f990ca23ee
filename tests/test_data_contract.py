"""Pre-training reads what its shards say they hold: a sequence length, mask count or vocab
size that contradicts the data is refused naming both values and the flag, shards without a
manifest are described from their records, and a custom vocab travels into every checkpoint."""

from __future__ import annotations

import json
import logging

import pytest

from bertforge.train import checkpoint as ckpt
from bertforge.train.pretraining import pretrain
from support import MASK, SEQ, tiny_config, write_random_shards

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    return write_random_shards(tmp_path_factory.mktemp("shards"))


def test_shards_without_a_manifest_are_described_from_their_records(shards, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="bertforge"):
        with pytest.raises(ValueError, match=rf"--sequence-length 64 .*contradicts the data: "
                                             rf".*holds {SEQ}-token records; give "
                                             rf"--sequence-length {SEQ}"):
            pretrain(tiny_config(shards, tmp_path / "run", sequence_length=64))
    assert "has no manifest" in caplog.text and "described from its records" in caplog.text
    with pytest.raises(ValueError, match=rf"--mask-tokens {MASK - 1} .*give --mask-tokens {MASK}"):
        pretrain(tiny_config(shards, tmp_path / "run", mask_tokens=MASK - 1))


def test_a_custom_vocab_travels_into_every_checkpoint(small_vocab_shards, tmp_path):
    vocab, shards = small_vocab_shards
    common = dict(sequence_length=64, mask_tokens=8, training_steps=1)
    with pytest.raises(ValueError, match=r"--vocab-size 1000 .*contradicts the data: its vocab "
                                         r".*has 2000 tokens; give --vocab-size 2000"):
        pretrain(tiny_config(shards, tmp_path / "a", **common))
    result = pretrain(tiny_config(shards, tmp_path / "b", vocab_size=2000, **common))
    saved = (result.final_checkpoint / "vocab.txt").read_text().splitlines()
    assert saved == vocab.read_text().splitlines()  # the data's vocab, not bert-base-uncased's
    with pytest.raises(ValueError, match="is not the vocab the shards were made with"):
        from bertforge.data.vocab import default_vocab_file
        pretrain(tiny_config(shards, tmp_path / "c", vocab_size=2000,
                             tokenizer=str(default_vocab_file()), **common))


def test_mlm_only_shards_train_mlm_only_with_dynamic_whole_word_masks(
        preprocessed_sample, tmp_path):
    """tokenize --objective mlm -> shards that say so; pretrain refuses to read NSP labels
    from them, and trains MLM alone on them with fresh whole-word masks per batch."""
    from bertforge.data.instances import InstanceConfig, tokenize
    from bertforge.data.stage import describe
    from bertforge.data.vocab import load_tokenizer
    text = sorted(preprocessed_sample.rglob("*.txt"))[:1]
    tokenize(text, tmp_path / "shards", InstanceConfig(
        sequence_length=64, mask_tokens=8, duplication_factor=1, objective="mlm",
        whole_word_masking=True), tokenizer=load_tokenizer(), workers=1)
    shards = str(tmp_path / "shards" / "*.tfrecord")
    described, _ = describe(shards)
    assert described["objective"] == "mlm" and described["whole_word_masking"]
    common = dict(sequence_length=64, mask_tokens=8, training_steps=2, vocab_size=30522)
    with pytest.raises(ValueError, match=r"masked-LM-only records .* give --objective mlm"):
        pretrain(tiny_config(shards, tmp_path / "a", **common))
    result = pretrain(tiny_config(shards, tmp_path / "b", objective="mlm", masking="dynamic",
                                  mask_rate=0.25, whole_word_masking=True, **common))
    assert "nsp_acc" not in result.history[-1] and result.history[-1]["mlm_loss"] > 0
    saved = json.loads((result.final_checkpoint / ckpt.CONFIG_FILE).read_text())
    assert saved["data"]["mask_tokens"] == 16  # ceil(0.25 x 64): the dynamic masks' slots
