"""SQuAD windows through the model in the row layout: packed (up to 3 per row) or one per row.

SQuAD windows are `[CLS] question [SEP] context-slice [SEP]`; most contexts are short, so at
384 about half of every padded row is padding (SQuAD-shaped windows average ~193 tokens).
Windows go into rows through the project's one row writer (bertforge/rows.py): with packing,
grouped by the pre-training packer (`data/packing.py`, `pack_lengths`: at most 3 per row,
lengths summing to <= 384); without, one window per row (a pack of one). Either way the
encoder runs under the block-diagonal mask (`model.bert.encode_sequences`, the pre-training
path), the unchanged `qa_outputs` head gives start/end logits per row position, and each
window's logits are cut back out (`rows.read_tokens`), so post-processing is unchanged.

Training: each window's start/end softmax is taken over that window's tokens only: the row's
logits at the other windows' (and padding) positions are set to the fp32 minimum, so loss,
accuracy and gradients equal those of the stock model on the padded windows with padding
masked (the reference path below: `reference_logits`; tests/test_squad_packed.py: fp32
within 1e-5). Windows are packed per micro-batch, so a step holds the same windows, in the
same number, packed or not.

Cost and gain: the [B, 1, S, S] bool mask (B x 147 kB at 384), and SDPA on CPU still computes
the masked-out attention blocks, so a packed row costs a padded row's attention. Packing is
cheap: SPFHP (the default) packs 9,821 SQuAD-shaped windows into 5,055 rows (1.94 per row,
97.6% of slots real) in 185 ms, NNLSHP into 5,028 (98.2%) in 450 ms; a 32-window micro-batch
takes 0.3 ms. Inference (benchmarks/bench_squad.py, mini BERT 256/4/4, 384 windows, 2-core
CPU, one run): 43 windows/s padded to 384, 47 padded to each batch's longest, 82 packed
(1.9x over 384), logits equal within 1e-4.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from bertforge import rows
from bertforge.data.packing import pack_lengths
from bertforge.model.bert import encode_sequences
from bertforge.squad.features import Window, pad_windows

MAX_WINDOWS_PER_ROW = 3
ROW_INPUTS = ("input_ids", "sequence_ids", "segment_ids", "position_ids")


def pack_windows(windows: Sequence[Window], sequence_length: int,
                 max_per_pack: int = MAX_WINDOWS_PER_ROW, algorithm: str = "spfhp",
                 seed: int | None = None) -> list[list[int]]:
    """Rows of window indices (each index exactly once; <= max_per_pack per row, <=
    sequence_length tokens per row), rows in the packer's order."""
    lengths = [len(w) for w in windows]
    too_long = [k for k, n in enumerate(lengths) if n > sequence_length]
    if too_long:
        raise ValueError(f"window {too_long[0]} has {lengths[too_long[0]]} tokens, more than "
                         f"the packed row length {sequence_length}; build windows with "
                         f"--sequence-length <= {sequence_length}")
    return pack_lengths(lengths, sequence_length, max_per_pack=max_per_pack,
                        algorithm=algorithm, seed=seed)


def window_rows(windows: Sequence[Window], packs: Sequence[Sequence[int]] | None = None,
                pad_to: int | None = None, pad_id: int = 0) -> dict[str, np.ndarray]:
    """int64 arrays of the rows `packs` (lists of indices into `windows`; None: one window
    per row):

    - input_ids, sequence_ids, segment_ids, position_ids: [rows, L], L = pad_to or the
      longest row;
    - per window, in pack order (window_index [W] says which): window_rows, window_slots
      (its sequence id in the row), window_offsets (its first row position), window_lengths,
      start_positions / end_positions (labels as row positions).
    """
    if packs is None:
        packs = [[k] for k in range(len(windows))]
    padded = pad_windows(windows, pad_id=pad_id)
    placement = rows.place([len(w) for w in windows], packs, width=pad_to)
    out = rows.write_tokens(placement, padded["input_ids"], padded["token_type_ids"],
                            pad_id=pad_id)
    order = placement.order
    offsets = placement.offsets[order]
    out.update(window_index=order, window_rows=placement.rows[order],
               window_slots=placement.slots[order], window_offsets=offsets,
               window_lengths=placement.lengths[order],
               start_positions=offsets + padded["start_positions"][order],
               end_positions=offsets + padded["end_positions"][order])
    return out


def to_device(arrays: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v).to(device) for k, v in arrays.items()}


class QuestionAnsweringRows(torch.nn.Module):
    """A BertForQuestionAnswering run on rows in the row layout; holds (does not copy) the
    model, so DDP can wrap this module while checkpoints keep saving the plain QA model."""

    def __init__(self, qa_model: torch.nn.Module):
        super().__init__()
        self.qa = qa_model

    def forward(self, input_ids: torch.Tensor, sequence_ids: torch.Tensor,
                segment_ids: torch.Tensor, position_ids: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Start and end logits [rows, L] at every row position."""
        hidden = encode_sequences(self.qa.bert, input_ids, sequence_ids, segment_ids,
                                  position_ids)
        logits = self.qa.qa_outputs(hidden)
        start, end = logits.split(1, dim=-1)
        return start.squeeze(-1), end.squeeze(-1)


def run_rows(model: torch.nn.Module, batch: dict[str, torch.Tensor]
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Row logits of a batch of window rows; `model` is a QuestionAnsweringRows (maybe
    DDP-wrapped or compiled)."""
    return model(**{k: batch[k] for k in ROW_INPUTS})


def window_logits(row_logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """[W, L] fp32: each window's row of logits with every position that is not its own
    (other windows, padding) at the fp32 minimum, out of its softmax. Row positions are kept,
    so the labels are `batch["start_positions"]` / `["end_positions"]` (row positions)."""
    index = batch["window_rows"]
    mine = batch["sequence_ids"][index] == batch["window_slots"].unsqueeze(1)
    return row_logits.float()[index].masked_fill(~mine, torch.finfo(torch.float32).min)


def unpack_logits(row_logits: np.ndarray, arrays: dict[str, np.ndarray]
                  ) -> dict[int, np.ndarray]:
    """Window index -> its own logits (length of the window), cut from [rows, L] row logits."""
    out = {}
    for k, row, offset, n in zip(arrays["window_index"].tolist(), arrays["window_rows"].tolist(),
                                 arrays["window_offsets"].tolist(),
                                 arrays["window_lengths"].tolist()):
        out[k] = row_logits[row, offset:offset + n].copy()
    return out


def batches_of_packs(packs: Sequence[Sequence[int]], windows_per_batch: int
                     ) -> list[list[Sequence[int]]]:
    """Consecutive packs grouped so each group holds <= windows_per_batch windows (a pack is
    never split; a group holds at least one pack)."""
    groups: list[list[Sequence[int]]] = []
    count = 0
    for pack in packs:
        if not groups or count + len(pack) > windows_per_batch:
            groups.append([])
            count = 0
        groups[-1].append(pack)
        count += len(pack)
    return groups


@torch.no_grad()
def predict_logits(model: torch.nn.Module, windows: Sequence[Window], *, batch_size: int,
                   device: torch.device, precision=None, pad_id: int = 0,
                   packed_length: int | None = None, algorithm: str = "spfhp",
                   progress: bool = False) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per-window start/end logits (each its window's length) in window order. `model`: a
    BertForQuestionAnswering; with `packed_length` windows are packed into rows of that many
    tokens, else one per row padded to the batch's longest. `batch_size` counts windows per
    forward pass either way."""
    from bertforge.progress import progress as bar
    row_model = QuestionAnsweringRows(model).eval()
    packs = (pack_windows(windows, packed_length, algorithm=algorithm) if packed_length
             else [[k] for k in range(len(windows))])
    starts: list[np.ndarray | None] = [None] * len(windows)
    ends: list[np.ndarray | None] = [None] * len(windows)
    for group in bar(batches_of_packs(packs, batch_size), desc="squad predict", unit="batch",
                     disable=None if progress else True):
        # This batch's windows only (writing rows from the whole set per batch is quadratic).
        chosen = [k for pack in group for k in pack]
        local = {k: i for i, k in enumerate(chosen)}
        arrays = window_rows([windows[k] for k in chosen],
                             [[local[k] for k in pack] for pack in group], pad_id=pad_id)
        autocast = precision.autocast() if precision is not None else contextlib.nullcontext()
        with autocast:
            start, end = run_rows(row_model, to_device(arrays, device))
        for logits, target in ((start, starts), (end, ends)):
            for i, values in unpack_logits(logits.float().cpu().numpy(), arrays).items():
                target[chosen[i]] = values
    assert all(s is not None for s in starts), "a window was not predicted"
    return starts, ends


# ---------------------------------------------------------------- reference path
def padded_tensors(windows: Sequence[Window], device: torch.device, pad_to: int | None = None,
                   pad_id: int = 0) -> dict[str, torch.Tensor]:
    """The stock layout: one window per row, padded (pad_windows), as tensors."""
    return to_device(pad_windows(windows, pad_to=pad_to, pad_id=pad_id), device)


def reference_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """The stock Hugging Face forward on padded windows: start/end logits in fp32 with
    padding at the fp32 minimum (out of every softmax). Tests compare the row path with it."""
    out: Any = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     token_type_ids=batch["token_type_ids"])
    pad = batch["attention_mask"] == 0
    low = torch.finfo(torch.float32).min
    return (out.start_logits.float().masked_fill(pad, low),
            out.end_logits.float().masked_fill(pad, low))
