"""Pre-training reads what its shards say they hold: a sequence length, mask count or vocab
size that contradicts the data is refused naming both values and the flag, shards without a
manifest are described from their records, and a custom vocab travels into every checkpoint."""

from __future__ import annotations

import logging

import pytest

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


@pytest.fixture(scope="module")
def small_vocab_shards(preprocessed_sample, tmp_path_factory):
    """The sample tokenized with a 2,000-word vocab (the first lines of bert-base-uncased's,
    which hold [PAD] [UNK] [CLS] [SEP] [MASK])."""
    from bertforge.data.instances import InstanceConfig, tokenize
    from bertforge.data.vocab import default_vocab_file, load_tokenizer
    root = tmp_path_factory.mktemp("small-vocab")
    vocab = root / "vocab.txt"
    vocab.write_text("".join(default_vocab_file().read_text().splitlines(True)[:2000]))
    text = sorted(preprocessed_sample.rglob("*.txt"))[:1]
    tokenize(text, root / "shards", InstanceConfig(sequence_length=64, mask_tokens=8,
                                                   duplication_factor=1),
             tokenizer=load_tokenizer(vocab_file=vocab), workers=1)
    return vocab, str(root / "shards")


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
