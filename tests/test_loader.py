"""The pre-training reader (src/bertforge/data/loader.py): sharding over ranks and DataLoader
workers, seeded shuffling, exact resume, and clear errors.

Records are synthetic: feature `record_id` holds each record's global number, so a batch
says exactly which records it holds.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from bertforge.data.example import encode_example
from bertforge.data.loader import PretrainingDataset, make_dataloader
from bertforge.data.tfrecord import CorruptRecordError, RecordWriter, read_index

SEQ, MASKS = 8, 3
SHARD_SIZES = (17, 9, 14)  # 40 records, uneven shards


def record(i: int) -> bytes:
    ints = {"input_ids": i * 100 + np.arange(SEQ), "input_mask": np.ones(SEQ, np.int64),
            "segment_ids": np.zeros(SEQ, np.int64), "masked_lm_positions": np.arange(MASKS),
            "masked_lm_ids": np.full(MASKS, i), "next_sentence_labels": [i % 2], "record_id": [i]}
    return encode_example(ints, {"masked_lm_weights": np.full(MASKS, i / 2, np.float32)})


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list:
    root = tmp_path_factory.mktemp("shards")
    paths, start = [], 0
    for k, size in enumerate(SHARD_SIZES):
        path = root / f"part-{k:02d}.tfrecord"
        with RecordWriter(path) as writer:
            for i in range(start, start + size):
                writer.write(record(i))
        paths.append(path)
        start += size
    return paths


def ids(batch) -> list[int]:
    return batch["record_id"].tolist()


def take(dataset, num_batches: int, num_workers: int = 0) -> list[dict]:
    out = []
    for batch in make_dataloader(dataset, num_workers):
        out.append(batch)
        if len(out) == num_batches:
            break
    return out


def test_batch_layout_and_dtypes(shards):
    dataset = PretrainingDataset(shards, 4, shuffle=False, infinite=False)
    batches = list(dataset)
    assert dataset.num_records == 40 and dataset.batches_per_epoch == 10
    assert [ids(b) for b in batches] == [list(range(i, i + 4)) for i in range(0, 40, 4)]
    batch = batches[2]
    assert batch["input_ids"].dtype == torch.long and batch["input_ids"].shape == (4, SEQ)
    assert batch["input_ids"][1].tolist() == [900 + j for j in range(SEQ)]
    assert batch["masked_lm_weights"].dtype == torch.float32
    assert batch["masked_lm_weights"].shape == (4, MASKS)
    assert batch["next_sentence_labels"].shape == (4,)  # per-record scalars squeezed
    assert batch["next_sentence_labels"].tolist() == [0, 1, 0, 1]


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_ranks_partition_each_epoch(shards, world_size):
    per_rank = []
    for rank in range(world_size):
        dataset = PretrainingDataset(shards, 5, seed=3, rank=rank, world_size=world_size,
                                     infinite=False)
        per_rank.append([i for batch in dataset for i in ids(batch)])
        assert len(per_rank[-1]) == dataset.records_per_epoch
    everything = [i for rank_ids in per_rank for i in rank_ids]
    assert sorted(everything) == list(range(40))  # all records, none twice
    assert max(map(len, per_rank)) - min(map(len, per_rank)) <= 1


def test_same_batches_for_any_number_of_workers(shards):
    def run(num_workers):
        dataset = PretrainingDataset(shards, 6, seed=5, rank=1, world_size=2)
        return [ids(b) for b in take(dataset, 9, num_workers)]  # 9 x 6 > 20: two epochs

    single = run(0)
    stream = [i for batch in single for i in batch]
    assert len(set(stream[:20])) == 20 and len(set(stream[20:40])) == 20  # rank 1's epochs
    assert run(1) == single
    assert run(2) == single


def test_resume_from_start_batch_equals_skipping(shards):
    full = [ids(b) for b in take(PretrainingDataset(shards, 7, seed=11), 12)]
    for start in (1, 5, 6):  # 6 x 7 = 42 > 40: the resumed run starts in epoch 1
        resumed = [ids(b) for b in take(PretrainingDataset(shards, 7, seed=11,
                                                           start_batch=start), 12 - start)]
        assert resumed == full[start:]


def test_seeded_shuffle(shards):
    def epochs(seed, n=2):
        dataset = PretrainingDataset(shards, 40, seed=seed)  # one batch per epoch
        return [ids(b) for b in take(dataset, n)]

    first = epochs(0)
    assert first == epochs(0)
    assert first != epochs(1)
    assert first[0] != first[1]  # each epoch is its own permutation
    assert sorted(first[0]) == sorted(first[1]) == list(range(40))
    assert first[0] != list(range(40))


def test_epoch_boundaries(shards):
    # a batch may span two epochs by default ...
    spanning = [ids(b) for b in take(PretrainingDataset(shards, 15, seed=2), 3)]
    stream = [i for b in spanning for i in b]
    assert sorted(stream[:40]) == list(range(40)) and len(set(stream[40:])) == 5
    # ... or each epoch can end on a whole batch, the same count on every rank
    dataset = PretrainingDataset(shards, 6, seed=2, rank=2, world_size=3,
                                 drop_last_epoch_partial=True)
    assert dataset.batches_per_epoch == 2  # 40 // 3 = 13 records per rank -> 2 batches of 6
    batches = [ids(b) for b in take(dataset, 4)]
    assert len(set(batches[0] + batches[1])) == 12 and len(set(batches[2] + batches[3])) == 12


def test_corrupt_record_names_file_and_offset(tmp_path):
    path = tmp_path / "bad.tfrecord"
    with RecordWriter(path) as writer:
        for i in range(6):
            writer.write(record(i))
    offset = int(read_index(path)[3, 0])
    raw = bytearray(path.read_bytes())
    raw[offset + 20] ^= 0x55
    path.write_bytes(bytes(raw))
    dataset = PretrainingDataset([path], 2, shuffle=False, infinite=False)
    with pytest.raises(CorruptRecordError) as err:
        list(dataset)
    assert str(path) in str(err.value) and f"byte offset {offset}" in str(err.value)


def test_mismatched_records_name_the_record(tmp_path):
    path = tmp_path / "mixed.tfrecord"
    with RecordWriter(path) as writer:
        writer.write(record(0))
        writer.write(encode_example({"input_ids": np.arange(SEQ + 1), "record_id": [1]}))
    offset = int(read_index(path)[1, 0])
    with pytest.raises(ValueError, match=f"{path}: record 1 \\(at byte offset {offset}\\)"):
        list(PretrainingDataset([path], 2, shuffle=False, infinite=False))


def test_file_errors_are_clear(shards, tmp_path):
    with pytest.raises(FileNotFoundError, match="matches no TFRecord files"):
        PretrainingDataset([str(tmp_path / "nothing-*.tfrecord")], 2)
    with pytest.raises(FileNotFoundError, match="no such file"):
        PretrainingDataset([tmp_path / "absent.tfrecord"], 2)
    lonely = tmp_path / "no-index.tfrecord"
    lonely.write_bytes(shards[1].read_bytes())
    with pytest.raises(FileNotFoundError, match="bertforge index"):
        PretrainingDataset([lonely], 2)
    # globs and directories expand, sorted, without the .index files
    by_glob = PretrainingDataset([str(shards[0].parent / "part-*.tfrecord")], 2)
    by_dir = PretrainingDataset(shards[0].parent, 2)
    assert by_glob.files == by_dir.files == sorted(shards)
    with pytest.raises(ValueError, match="cannot feed 41 ranks"):
        PretrainingDataset(shards, 2, rank=0, world_size=41)


def test_masked_label_counts_count_the_labelled_slots(shards, tmp_path):
    from bertforge.data.loader import masked_label_counts
    # record i has MASKS labels of id i with weight i / 2: record 0's weight-0 slots are padding
    counts = masked_label_counts(shards, vocab_size=4000)  # input ids go up to 3907
    expected = np.zeros(4000, np.int64)
    expected[1:40] = MASKS
    assert np.array_equal(counts, expected)
    first = masked_label_counts(shards, vocab_size=4000, max_records=20)  # file order
    assert first.sum() == 19 * MASKS and first[20:].sum() == 0
    # record 30 (the 5th of part-02) is the first whose input ids reach 3000
    with pytest.raises(ValueError, match=r"part-02.tfrecord: record 4 .*'input_ids' holds 3000 "
                                         r".*vocab of 3000 tokens.*--vocab-size"):
        masked_label_counts(shards, vocab_size=3000)


# ---------------------------------------------------------------- values checked on read
S, M, VOCAB = 16, 4, 100


def bert_arrays(n: int = 5, seed: int = 0) -> dict[str, np.ndarray]:
    """n valid unpacked BERT records as [n, k] arrays: [CLS] A [SEP] B [SEP] then padding."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(8, S + 1, n)
    real = np.arange(S) < lengths[:, None]
    masked = np.sort(rng.choice(np.arange(1, 7), (n, M), replace=True), axis=1)
    return {"input_ids": np.where(real, rng.integers(5, VOCAB, (n, S)), 0),
            "input_mask": real.astype(np.int64),
            "segment_ids": (real & (np.arange(S) >= 4)).astype(np.int64),
            "masked_lm_positions": masked, "masked_lm_ids": rng.integers(5, VOCAB, (n, M)),
            "next_sentence_labels": rng.integers(0, 2, (n, 1)),
            "masked_lm_weights": np.ones((n, M), np.float32)}


def write_arrays(path, arrays: dict[str, np.ndarray]) -> None:
    with RecordWriter(path) as writer:
        for i in range(len(next(iter(arrays.values())))):
            writer.write(encode_example(
                {k: v[i] for k, v in arrays.items() if v.dtype == np.int64},
                {k: v[i] for k, v in arrays.items() if v.dtype == np.float32}))


def packed_arrays(seed: int = 0) -> dict[str, np.ndarray]:
    """4 valid packed rows (ours) from 7 records, through the pack stage's layout code."""
    from bertforge.data.pack import layout_packs
    unpacked = bert_arrays(7, seed)
    unpacked["input_mask"][:, 7:] = 0  # 7 tokens each: up to 2 sequences per row of S = 16
    unpacked["input_ids"][:, 7:] = unpacked["segment_ids"][:, 7:] = 0
    packs = np.array([[0, 1, -1], [2, 3, -1], [4, 5, -1], [6, -1, -1]])
    return layout_packs(unpacked, packs, S, 2 * M)


def reference_packed_arrays() -> dict[str, np.ndarray]:
    """3 valid rows of the reference packer's layout: 2 sequences of 7 tokens, [CLS] at S-k."""
    mask = np.zeros((3, S), np.int64)
    mask[:, 1:7], mask[:, 7:13], mask[:, S - 1], mask[:, S - 2] = 1, 2, 1, 2
    positions = np.zeros((3, S), np.int64)
    positions[:, 1:7] = positions[:, 7:13] = np.arange(1, 7)
    return {"packed_input_ids": np.where(mask > 0, 7, 0), "packed_input_mask": mask,
            "packed_segment_ids": np.zeros((3, S), np.int64), "packed_position_ids": positions,
            "packed_masked_lm_positions": np.tile([2, 9, 0, 0, 0], (3, 1)),
            "packed_masked_lm_ids": np.tile([11, 12, 0, 0, 0], (3, 1)),
            "packed_next_sentence_labels": np.tile([0, 1, 0], (3, 1)),
            "packed_masked_lm_mask": np.tile(np.float32([1, 2, 0, 0, 0]), (3, 1)),
            "packed_next_sentence_mask": np.tile(np.float32([0, 1, 1]), (3, 1))}


OTHER_VOCAB = "made with another vocab\\? give --vocab-size"
RECREATE = "re-create them with `bertforge tokenize`"
BAD_VALUES = [  # (records, feature, (row, column), value, vocab_size, what the message says)
    (bert_arrays, "input_ids", (3, 2), VOCAB, VOCAB, f"outside the vocab of {VOCAB} .*"
                                                     f"{OTHER_VOCAB}"),
    (bert_arrays, "masked_lm_ids", (3, 1), 30000, VOCAB, f"outside the vocab .*{OTHER_VOCAB}"),
    (bert_arrays, "input_ids", (3, 0), -1, None, f"must be a token id.*{RECREATE}"),
    (bert_arrays, "masked_lm_positions", (3, 3), S, None, f"must be a position in the {S} tokens"),
    (bert_arrays, "masked_lm_positions", (3, 0), -2, VOCAB, "must be a position"),
    (bert_arrays, "segment_ids", (3, 5), 2, VOCAB, f"must be 0 or 1.*{RECREATE}"),
    (bert_arrays, "next_sentence_labels", (3, 0), 7, VOCAB, "must be 0 or 1"),
    (bert_arrays, "input_mask", (3, 1), 5, None, "must be 0 or 1"),
    (packed_arrays, "sequence_ids", (3, 0), -1, VOCAB, "must be a sequence number 0..3"),
    (packed_arrays, "sequence_ids", (3, 4), 4, VOCAB, "must be a sequence number 0..3"),
    (packed_arrays, "position_ids", (3, 2), S, VOCAB, f"must be a position in the {S} tokens"),
    (packed_arrays, "cls_positions", (3, 1), S + 3, VOCAB, "must be a position"),
    (packed_arrays, "masked_lm_positions", (3, 0), S, VOCAB, "must be a position"),
    (packed_arrays, "input_ids", (3, 3), VOCAB + 1, VOCAB, OTHER_VOCAB),
    (packed_arrays, "next_sentence_labels", (3, 0), 7, VOCAB, "must be 0 or 1"),
    (reference_packed_arrays, "packed_input_mask", (2, 3), 4, VOCAB, "sequence number 0..3"),
    (reference_packed_arrays, "packed_masked_lm_positions", (2, 1), S, VOCAB, "a position"),
    (reference_packed_arrays, "packed_next_sentence_labels", (2, 2), 7, VOCAB, "0 or 1"),
    (reference_packed_arrays, "packed_input_ids", (2, 2), -3, None, "must be a token id"),
]


@pytest.mark.parametrize("make, name, where, value, vocab_size, says", BAD_VALUES,
                         ids=[f"{m.__name__}-{n}={v}" for m, n, _, v, _, _ in BAD_VALUES])
def test_out_of_range_values_name_file_record_and_feature(tmp_path, make, name, where, value,
                                                          vocab_size, says):
    good, bad = tmp_path / "good.tfrecord", tmp_path / "bad.tfrecord"
    write_arrays(good, make())
    arrays = make()
    dataset = PretrainingDataset([good], 2, shuffle=False, infinite=False, vocab_size=vocab_size)
    assert sum(len(b[next(iter(b))]) for b in dataset) == len(arrays[name])  # valid: read
    arrays[name][where] = value
    write_arrays(bad, arrays)
    offset = int(read_index(bad)[where[0], 0])
    # shuffled, behind another file: the record number is the one within its file
    dataset = PretrainingDataset([good, bad], 64, seed=1, vocab_size=vocab_size)
    with pytest.raises(ValueError, match=f"{re.escape(str(bad))}: record {where[0]} \\(at byte "
                                         f"offset {offset}\\): feature '{name}' holds {value} "
                                         f"\\(value {where[1]}\\), which .*{says}"):
        next(iter(dataset))


def test_packed_and_reference_rows_pass_the_check_and_convert(tmp_path):
    from bertforge.data.loader import packed_batch
    for make in (packed_arrays, reference_packed_arrays):
        path = tmp_path / f"{make.__name__}.tfrecord"
        write_arrays(path, make())
        batch = next(iter(PretrainingDataset([path], 3, shuffle=False, vocab_size=VOCAB)))
        assert packed_batch(batch)["cls_positions"].shape == (3, 3)
