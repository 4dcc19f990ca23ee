"""The row layout's writer and reader (bertforge/rows.py): placement, tokens, slots and labels
written where the layout says, read back exactly, unpacked batches read as packs of one, and
impossible layouts refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bertforge import rows


def _sequences(lengths, seed=0):
    rng = np.random.default_rng(seed)
    width = max(lengths)
    ids = np.zeros((len(lengths), width), np.int64)
    segments = np.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, :n] = rng.integers(5, 100, n)
        segments[i, n // 2:n] = 1
    return ids, segments


def test_tokens_slots_and_positions_follow_the_packs():
    lengths = [5, 3, 7, 2, 4]
    ids, segments = _sequences(lengths)
    packs = [[2, 0], [4], [1, 3]]  # sequence 2 first in row 0: pack order, not index order
    p = rows.place(lengths, packs, width=12)
    assert p.rows.tolist() == [0, 2, 0, 2, 1]
    assert p.slots.tolist() == [2, 1, 1, 2, 1]
    assert p.offsets.tolist() == [7, 0, 0, 3, 0]
    out = rows.write_tokens(p, ids, segments, pad_id=0)
    assert out["input_ids"].shape == (3, 12)
    assert out["input_ids"][0, :12].tolist() == ids[2, :7].tolist() + ids[0, :5].tolist()
    assert out["sequence_ids"][0].tolist() == [1] * 7 + [2] * 5
    assert out["position_ids"][0].tolist() == list(range(7)) + list(range(5))
    assert out["sequence_ids"][1].tolist() == [1] * 4 + [0] * 8  # padding is sequence 0
    assert out["segment_ids"][2, :3].tolist() == segments[1, :3].tolist()
    assert rows.write_slots(p, p.offsets).tolist() == [[0, 7], [0, 0], [0, 3]]
    assert rows.write_slots(p, 1).tolist() == [[1, 1], [1, 0], [1, 1]]
    back = rows.read_tokens(p, out["input_ids"], fill=-1)
    for i, n in enumerate(lengths):
        assert back[i, :n].tolist() == ids[i, :n].tolist() and (back[i, n:] == -1).all()


def test_labels_go_to_consecutive_slots_at_row_positions():
    lengths = [6, 5]
    p = rows.place(lengths, [[1, 0]])
    positions = np.array([[1, 3, 0], [2, 0, 0]])
    ids = np.array([[11, 13, 0], [22, 0, 0]])
    out = rows.write_labels(p, positions, {"masked_lm_ids": ids}, ids != 0, slots=4)
    # Sequence 1 comes first in the row (offset 0), then sequence 0 at offset 5.
    assert out["masked_lm_positions"].tolist() == [[2, 6, 8, 0]]
    assert out["masked_lm_ids"].tolist() == [[22, 11, 13, 0]]
    assert out["masked_lm_sequence"].tolist() == [[1, 2, 2, 0]]
    with pytest.raises(ValueError, match="needs 3 label slots but the layout has 2"):
        rows.write_labels(p, positions, {"masked_lm_ids": ids}, ids != 0, slots=2)


def test_impossible_layouts_are_refused():
    with pytest.raises(ValueError, match="more than one pack"):
        rows.place([3, 3], [[0, 1], [1]])
    with pytest.raises(ValueError, match="row of 6 tokens does not fit the row length 5"):
        rows.place([3, 3], [[0, 1]], width=5)
    with pytest.raises(ValueError, match="holds 2 sequences; the layout has 1 slots"):
        rows.place([3, 3], [[0, 1]], max_slots=1)


def test_unplaced_sequences_read_back_as_fill():
    p = rows.place([4, 0, 3], [[0, 2]])
    assert p.rows.tolist() == [0, -1, 0]
    values = np.arange(7, dtype=np.float32).reshape(1, 7)
    back = rows.read_tokens(p, values, fill=-5.0, width=5)
    assert back.tolist() == [[0, 1, 2, 3, -5], [-5] * 5, [4, 5, 6, -5, -5]]


def test_an_unpacked_batch_is_a_pack_of_one():
    batch = {"input_ids": torch.tensor([[2, 7, 3, 0], [2, 8, 9, 3]]),
             "input_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]),
             "segment_ids": torch.zeros(2, 4, dtype=torch.long),
             "next_sentence_labels": torch.tensor([1, 0])}
    out = rows.as_rows(batch)
    assert out["sequence_ids"].tolist() == batch["input_mask"].tolist()
    assert out["position_ids"].tolist() == [[0, 1, 2, 3]] * 2
    assert out["cls_positions"].tolist() == [[0], [0]]
    assert out["next_sentence_labels"].tolist() == [[1], [0]]
    assert out["next_sentence_mask"].tolist() == [[1], [1]]
    assert rows.as_rows(out) == out  # already in the layout: unchanged
    with pytest.raises(ValueError, match="neither input_mask"):
        rows.as_rows({"input_ids": batch["input_ids"]})
