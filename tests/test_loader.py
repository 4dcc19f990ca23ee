"""The pre-training reader (src/bertforge/data/loader.py): sharding over ranks and DataLoader
workers, seeded shuffling, exact resume, and clear errors.

Records are synthetic: feature `record_id` holds each record's global number, so a batch
says exactly which records it holds.
"""

from __future__ import annotations

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
