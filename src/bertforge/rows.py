"""The row layout every model input uses: sequences laid one after another in rows.

Pre-training shards (`bertforge pack`), packed and unpacked SQuAD windows and the
padding-free server all put sequences into rows the same way, so one writer and one reader
live here and nowhere else.

A batch of R rows of length L holding at most P sequences per row:

- `input_ids` [R, L]: the sequences' tokens one after another, `pad_id` after the last;
- `sequence_ids` [R, L]: 0 at padding, k at the tokens of the row's k-th sequence (1-based);
- `segment_ids` [R, L]: each sequence's own token types;
- `position_ids` [R, L]: 0, 1, ... restarting at each sequence's first token;
- `cls_positions` [R, P]: row position of each sequence's first token ([CLS]);
- per-sequence values in P slots (slot k-1 holds the k-th sequence's value), e.g.
  `next_sentence_labels` and `next_sentence_mask` (1 where a sequence is);
- label positions (`masked_lm_positions`, SQuAD's start/end) are row positions.

An unpacked row is the pack of one: `as_rows` gives the TFRecord batch of unpacked records
sequence_ids = input_mask, positions 0..S-1, one [CLS] at 0 and one NSP slot, so the model
has one forward path for both (the stock Hugging Face path stays beside it as the reference).
The reference packer's records (`packed_*` keys, [CLS] of sequence k at row index S-k) are
read here too.

Writer (numpy, host side): `place` decides where each sequence goes (row, slot, offset) from
packs of sequence indices; `write_tokens`, `write_slots` and `write_labels` fill the arrays
in one vectorised scatter each; `read_tokens` is the inverse (row values back to each
sequence's own positions). Cost: O(real tokens) numpy work per batch; the 32-window SQuAD
micro-batch takes ~0.1 ms.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

ROW_KEYS = ("input_ids", "sequence_ids", "segment_ids", "position_ids", "cls_positions")
# The reference packer's record keys (its packed pre-training TFRecords).
REFERENCE_KEYS = ("packed_input_ids", "packed_input_mask", "packed_segment_ids",
                  "packed_position_ids", "packed_masked_lm_positions", "packed_masked_lm_ids",
                  "packed_masked_lm_mask", "packed_next_sentence_labels",
                  "packed_next_sentence_mask")


# ---------------------------------------------------------------- writer
@dataclass(frozen=True)
class Placement:
    """Where each of N sequences lands; arrays indexed by sequence (-1: not in any pack)."""

    rows: np.ndarray      # [N] row of the sequence
    slots: np.ndarray     # [N] 1-based rank among its row's sequences (its sequence id)
    offsets: np.ndarray   # [N] row position of its first token
    lengths: np.ndarray   # [N] its tokens
    order: np.ndarray     # [n] the placed sequences in pack order (row, then slot)
    num_rows: int
    width: int            # L: row length
    max_slots: int        # P: most sequences a row may hold

    @property
    def placed(self) -> np.ndarray:
        return self.rows >= 0


def place(lengths: Sequence[int] | np.ndarray, packs: Sequence[Sequence[int]] | np.ndarray,
          width: int | None = None, max_slots: int | None = None) -> Placement:
    """Placement of the sequences of `lengths` in the rows `packs` (lists of sequence
    indices, or a [R, P] array with -1 for an empty slot), each row's sequences in pack order.

    `width` defaults to the fullest row, `max_slots` to the most sequences of a row. A
    sequence in two packs, or a row longer than `width`, is refused."""
    lengths = np.asarray(lengths, dtype=np.int64)
    members = [[int(i) for i in pack if i >= 0] for pack in
               (packs.tolist() if isinstance(packs, np.ndarray) else packs)]
    n = len(lengths)
    rows = np.full(n, -1, np.int64)
    slots = np.zeros(n, np.int64)
    offsets = np.zeros(n, np.int64)
    order = np.fromiter((i for pack in members for i in pack), np.int64)
    if len(order) != len(np.unique(order)):
        raise ValueError("a sequence appears in more than one pack")
    counts = np.fromiter((len(p) for p in members), np.int64, len(members))
    row_of = np.repeat(np.arange(len(members)), counts)
    first = np.cumsum(counts) - counts  # index in `order` of each row's first sequence
    before = np.cumsum(lengths[order]) - lengths[order]  # tokens of earlier sequences
    if len(order):
        rows[order] = row_of
        slots[order] = np.arange(len(order)) - first[row_of] + 1
        offsets[order] = before - before[first[row_of]]
    fill = np.bincount(row_of, weights=lengths[order], minlength=len(members)).astype(np.int64)
    most = int(fill.max(initial=0))
    if width is None:
        width = max(most, 1)
    elif most > width:
        raise ValueError(f"a row of {most} tokens does not fit the row length {width}")
    slot_count = int(counts.max(initial=1))
    if max_slots is None:
        max_slots = slot_count
    elif slot_count > max_slots:
        raise ValueError(f"a row holds {slot_count} sequences; the layout has {max_slots} slots")
    return Placement(rows, slots, offsets, lengths, order, len(members), int(width),
                     int(max_slots))


def singles(lengths: Sequence[int] | np.ndarray, width: int | None = None) -> Placement:
    """Each sequence alone in its own row: the unpacked layout as a placement."""
    return place(lengths, [[i] for i in range(len(lengths))], width, max_slots=1)


def _token_index(p: Placement) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(sequence, position in it, row, row position) of every placed token."""
    seq = np.repeat(p.order, p.lengths[p.order])
    starts = np.cumsum(p.lengths[p.order]) - p.lengths[p.order]
    within = np.arange(len(seq)) - np.repeat(starts, p.lengths[p.order])
    return seq, within, p.rows[seq], p.offsets[seq] + within


def write_tokens(p: Placement, input_ids: np.ndarray, segment_ids: np.ndarray,
                 pad_id: int = 0) -> dict[str, np.ndarray]:
    """input_ids, sequence_ids, segment_ids, position_ids [R, L] (int64) of the placed
    sequences; `input_ids` / `segment_ids` are [N, T] with sequence i's tokens first."""
    shape = (p.num_rows, p.width)
    out = {"input_ids": np.full(shape, pad_id, np.int64),
           "sequence_ids": np.zeros(shape, np.int64), "segment_ids": np.zeros(shape, np.int64),
           "position_ids": np.zeros(shape, np.int64)}
    seq, within, row, col = _token_index(p)
    out["input_ids"][row, col] = np.asarray(input_ids)[seq, within]
    out["segment_ids"][row, col] = np.asarray(segment_ids)[seq, within]
    out["sequence_ids"][row, col] = p.slots[seq]
    out["position_ids"][row, col] = within
    return out


def write_slots(p: Placement, values: np.ndarray | int, fill: int = 0) -> np.ndarray:
    """[R, P] int64: each placed sequence's value in its row's slot (slot k-1: k-th sequence)."""
    out = np.full((p.num_rows, p.max_slots), fill, np.int64)
    placed = p.order
    out[p.rows[placed], p.slots[placed] - 1] = np.broadcast_to(np.asarray(values), p.rows.shape)[placed]
    return out


def write_labels(p: Placement, positions: np.ndarray, labels: dict[str, np.ndarray],
                 labelled: np.ndarray, slots: int) -> dict[str, np.ndarray]:
    """Per-row label slots [R, slots]: each sequence's labelled entries (`labelled` [N, M])
    in pack order, at row positions (`positions` [N, M] + its offset); `labels` are the
    values carried along (e.g. masked_lm_ids); `masked_lm_sequence` says whose label it is."""
    per_row = np.bincount(p.rows[p.order], weights=labelled.sum(1)[p.order],
                          minlength=p.num_rows)
    if per_row.size and per_row.max() > slots:
        raise ValueError(f"a row needs {int(per_row.max())} label slots but the layout has {slots}")
    # Labelled entries in pack order (row-major), so a row's labels are consecutive: an
    # entry's slot is its index minus the index of its row's first entry.
    in_order, k = np.nonzero(labelled[p.order])
    seq = p.order[in_order]
    row = p.rows[seq]
    rank = np.arange(len(row)) - np.searchsorted(row, row, side="left")
    out = {"masked_lm_positions": np.zeros((p.num_rows, slots), np.int64),
           "masked_lm_sequence": np.zeros((p.num_rows, slots), np.int64)}
    out["masked_lm_positions"][row, rank] = positions[seq, k] + p.offsets[seq]
    out["masked_lm_sequence"][row, rank] = p.slots[seq]
    for name, values in labels.items():
        out[name] = np.zeros((p.num_rows, slots), np.int64)
        out[name][row, rank] = values[seq, k]
    return out


def read_tokens(p: Placement, row_values: np.ndarray, fill: float = 0.0,
                width: int | None = None) -> np.ndarray:
    """[N, width] of `row_values` [R, L] cut back to each sequence's own positions (the
    inverse of write_tokens); positions past a sequence's length and unplaced sequences hold
    `fill`. `width` defaults to the longest sequence."""
    width = int(p.lengths.max(initial=1)) if width is None else width
    out = np.full((len(p.lengths), width), fill, dtype=row_values.dtype)
    seq, within, row, col = _token_index(p)
    out[seq, within] = row_values[row, col]
    return out


# ---------------------------------------------------------------- reader
def labelled_slots(batch: Mapping[str, Any]) -> Any:
    """[B, M] bool: which masked-LM slots carry a real label (torch tensors or numpy arrays).

    The one rule for every reader of labels (the loss, the loop's normalisers, the pack stage,
    the MLM prior): label 0 marks an unused slot (create_pretraining_data pads the slots with
    id 0, position 0, weight 0), and so does a weight of 0 when weights are present.
    """
    real = batch["masked_lm_ids"] != 0
    weights = batch.get("masked_lm_weights")
    if weights is not None:
        real &= weights > 0
    return real


def is_unpacked(batch: Mapping[str, torch.Tensor]) -> bool:
    """Records of one sequence per row (TFRecord `input_mask`), not yet in the row layout."""
    return "sequence_ids" not in batch and "packed_input_ids" not in batch


def as_rows(batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Any pre-training batch in the row layout: unpacked records as packs of one, the
    reference packer's layout converted, a batch already in the layout as it is."""
    if "packed_input_ids" in batch:
        return from_reference_layout(batch)
    if "sequence_ids" in batch:
        return dict(batch)
    if "input_mask" not in batch:
        raise ValueError(f"batch has neither input_mask (unpacked records) nor sequence_ids "
                         f"(packed rows): keys {sorted(batch)}")
    ids = batch["input_ids"]
    rows, length = ids.shape
    out = dict(batch)
    out["sequence_ids"] = out.pop("input_mask")
    if out.get("position_ids") is None:
        out["position_ids"] = torch.arange(length, device=ids.device).expand(rows, length)
    out["cls_positions"] = torch.zeros(rows, 1, dtype=torch.long, device=ids.device)
    if "next_sentence_labels" in out:
        out["next_sentence_labels"] = out["next_sentence_labels"].reshape(rows, 1)
        out["next_sentence_mask"] = torch.ones(rows, 1, dtype=torch.long, device=ids.device)
    return out


def from_reference_layout(batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A batch of the reference packer's records (packed_* keys) in the row layout.

    The reference writes sequence k's [CLS] at row index S-k and its NSP label/mask at slot
    P-k; tokens are never moved here (attention and positions do not depend on where a token
    sits in the row), only `cls_positions` and the NSP slots are derived.
    """
    missing = [k for k in REFERENCE_KEYS if k not in batch]
    if missing:
        raise ValueError(f"reference-layout packed batch lacks {missing}")
    ids = batch["packed_input_ids"]
    batch_size, s = ids.shape
    nsp_labels = batch["packed_next_sentence_labels"].reshape(batch_size, -1)
    p = nsp_labels.shape[1]
    mlm_sequence = batch["packed_masked_lm_mask"].round().long()
    cls = (s - torch.arange(1, p + 1, device=ids.device)).expand(batch_size, p)
    return {
        "input_ids": ids.long(),
        "sequence_ids": batch["packed_input_mask"].long(),
        "segment_ids": batch["packed_segment_ids"].long(),
        "position_ids": batch["packed_position_ids"].long(),
        "masked_lm_positions": batch["packed_masked_lm_positions"].long(),
        "masked_lm_ids": batch["packed_masked_lm_ids"].long(),
        "masked_lm_sequence": mlm_sequence,
        "masked_lm_weights": (mlm_sequence > 0).float(),
        "next_sentence_labels": nsp_labels.flip(1).long(),
        "next_sentence_mask": batch["packed_next_sentence_mask"].reshape(batch_size, -1).flip(1).long(),
        "cls_positions": cls.clone(),
    }
