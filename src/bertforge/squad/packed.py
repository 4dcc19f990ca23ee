"""Packed SQuAD (issue 5, item 7): up to 3 windows per 384-token row, block-diagonal attention.

SQuAD windows are `[CLS] question [SEP] context-slice [SEP]`; most contexts are short, so at
384 about half of every padded row is padding (SQuAD-shaped windows average ~193 tokens).
Here windows are grouped into rows with the pre-training packer (`data/packing.py`,
`pack_lengths`: at most 3 per row, lengths summing to <= 384) and each row carries
`sequence_ids` (0 padding, k = k-th window of the row), `segment_ids` (each window's own
token types) and `position_ids` restarting at 0 per window. The encoder runs under the
block-diagonal mask through `model.bert.encode_packed` (the pre-training packed path, shared,
not copied), then the unchanged `qa_outputs` head gives start/end logits per row position;
`unpack_logits` cuts each window's slice back out, so post-processing is the unchanged one.

Training: each window's start/end softmax is taken over that window's tokens only: the row's
logits at the other windows' (and padding) positions are set to the fp32 minimum, which is
what the unpadded path does with padding, so loss, accuracy and gradients equal those of the
same windows run one per row (tests/test_squad_packed.py: fp32 within 1e-5). Windows are
packed per micro-batch, so a step holds the same windows, in the same number, as unpacked.

Cost and gain: the [B, 1, S, S] bool mask (B x 147 kB at 384), and SDPA on CPU still computes
the masked-out attention blocks, so a packed row costs a padded row's attention. Packing is
cheap: SPFHP (the default) packs 9,821 SQuAD-shaped windows into 5,055 rows (1.94 per row,
97.6% of slots real) in 185 ms, NNLSHP into 5,028 (98.2%) in 450 ms; a 32-window micro-batch
takes 0.3 ms. Inference (benchmarks/bench_squad.py, mini BERT 256/4/4, 384 windows, 2-core
CPU, one run): 43 windows/s padded to 384, 47 padded to each batch's longest, 82 packed
(1.9x over 384; the issue's floor is 1.5x), logits equal within 1e-4.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import numpy as np
import torch

from bertforge.data.packing import pack_lengths
from bertforge.model.bert import encode_packed
from bertforge.squad.features import Window

MAX_WINDOWS_PER_ROW = 3


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


def packed_arrays(windows: Sequence[Window], packs: Sequence[Sequence[int]],
                  pad_to: int | None = None, pad_id: int = 0) -> dict[str, np.ndarray]:
    """int64 arrays of the rows `packs` (lists of indices into `windows`):

    - input_ids, sequence_ids, segment_ids, position_ids: [rows, L], L = pad_to or the
      longest row;
    - per window, in pack order (window_index [W] says which): window_rows, window_slots
      (its sequence id in the row), window_offsets (its first row position), window_lengths,
      start_positions / end_positions (labels as row positions).
    """
    fill = [sum(len(windows[k]) for k in pack) for pack in packs]
    length = pad_to or max(fill, default=1)
    if max(fill, default=0) > length:
        raise ValueError(f"a packed row of {max(fill)} tokens does not fit {length}")
    rows = len(packs)
    input_ids = np.full((rows, length), pad_id, dtype=np.int64)
    sequence_ids = np.zeros((rows, length), dtype=np.int64)
    segment_ids = np.zeros((rows, length), dtype=np.int64)
    position_ids = np.zeros((rows, length), dtype=np.int64)
    per_window = {key: [] for key in ("window_index", "window_rows", "window_slots",
                                      "window_offsets", "window_lengths", "start_positions",
                                      "end_positions")}
    for row, pack in enumerate(packs):
        offset = 0
        for slot, k in enumerate(pack, start=1):
            w = windows[k]
            n = len(w)
            span = slice(offset, offset + n)
            input_ids[row, span] = w.input_ids
            sequence_ids[row, span] = slot
            segment_ids[row, offset + w.context_start:offset + n] = 1
            position_ids[row, span] = np.arange(n)
            for key, value in (("window_index", k), ("window_rows", row), ("window_slots", slot),
                               ("window_offsets", offset), ("window_lengths", n),
                               ("start_positions", offset + w.start_position),
                               ("end_positions", offset + w.end_position)):
                per_window[key].append(value)
            offset += n
    return {"input_ids": input_ids, "sequence_ids": sequence_ids, "segment_ids": segment_ids,
            "position_ids": position_ids,
            **{key: np.asarray(values, dtype=np.int64) for key, values in per_window.items()}}


def packed_tensors(windows: Sequence[Window], packs: Sequence[Sequence[int]],
                   device: torch.device, pad_to: int | None = None, pad_id: int = 0
                   ) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v).to(device)
            for k, v in packed_arrays(windows, packs, pad_to=pad_to, pad_id=pad_id).items()}


class PackedQuestionAnswering(torch.nn.Module):
    """A BertForQuestionAnswering run on packed rows; holds (does not copy) the model, so
    DDP can wrap this module while checkpoints keep saving the plain QA model."""

    def __init__(self, qa_model: torch.nn.Module):
        super().__init__()
        self.qa = qa_model

    def forward(self, input_ids: torch.Tensor, sequence_ids: torch.Tensor,
                segment_ids: torch.Tensor, position_ids: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Start and end logits [rows, L] at every row position."""
        hidden = encode_packed(self.qa.bert, input_ids, sequence_ids, segment_ids, position_ids)
        logits = self.qa.qa_outputs(hidden)
        start, end = logits.split(1, dim=-1)
        return start.squeeze(-1), end.squeeze(-1)


def run_packed(model: torch.nn.Module, batch: dict[str, torch.Tensor]
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Row logits of a packed batch; `model` is a PackedQuestionAnswering (maybe DDP-wrapped)."""
    return model(input_ids=batch["input_ids"], sequence_ids=batch["sequence_ids"],
                 segment_ids=batch["segment_ids"], position_ids=batch["position_ids"])


def window_logits(row_logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """[W, L] fp32: each window's row of logits with every position that is not its own
    (other windows, padding) at the fp32 minimum, out of its softmax. Row positions are kept,
    so the labels are `batch["start_positions"]` / `["end_positions"]` (row positions)."""
    rows = batch["window_rows"]
    mine = batch["sequence_ids"][rows] == batch["window_slots"].unsqueeze(1)
    return row_logits.float()[rows].masked_fill(~mine, torch.finfo(torch.float32).min)


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
def predict_logits_packed(model: torch.nn.Module, windows: Sequence[Window], *, batch_size: int,
                          device: torch.device, sequence_length: int, precision=None,
                          pad_id: int = 0, algorithm: str = "spfhp", progress: bool = False
                          ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per-window start/end logits (each its window's length) in window order, computed on
    packed rows; a drop-in for finetune.predict_logits. `model`: a BertForQuestionAnswering.
    `batch_size` counts windows per forward pass, as unpacked."""
    from bertforge.data.stage import progress as bar
    packed_model = PackedQuestionAnswering(model).eval()
    packs = pack_windows(windows, sequence_length, algorithm=algorithm)
    starts: list[np.ndarray | None] = [None] * len(windows)
    ends: list[np.ndarray | None] = [None] * len(windows)
    for group in bar(batches_of_packs(packs, batch_size), desc="squad predict (packed)",
                     unit="batch", disable=None if progress else True):
        arrays = packed_arrays(windows, group, pad_id=pad_id)
        batch = {k: torch.from_numpy(arrays[k]).to(device)
                 for k in ("input_ids", "sequence_ids", "segment_ids", "position_ids")}
        autocast = precision.autocast() if precision is not None else contextlib.nullcontext()
        with autocast:
            start, end = run_packed(packed_model, batch)
        for logits, target in ((start, starts), (end, ends)):
            for k, values in unpack_logits(logits.float().cpu().numpy(), arrays).items():
                target[k] = values
    assert all(s is not None for s in starts), "a window was not packed"
    return starts, ends
