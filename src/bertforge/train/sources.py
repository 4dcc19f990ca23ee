"""Batch sources for pre-training: TFRecord shards, or random data to measure compute alone.

- `pretraining`: shards through `data.loader.PretrainingDataset` (exact resume by batch index);
  with --packed-data the batches are packed rows (the reference packer's layout converted).
- `generated` (the reference's --dataset generated): one random record repeated, still passing
  through the host-to-device copy every step.
- `--synthetic-data`: one random batch made once on the device and reused: no input cost at all.
With --masking dynamic the shards' masks are replaced by fresh ones for every batch
(data/masking.py: DynamicMasker), in the loader workers (`MaskedRows`).
Random records are valid pre-training records (masked positions sorted and unique inside the
sequence, real labels), so losses and accuracies stay meaningful.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from bertforge.rows import as_rows


def random_batch(batch_size: int, sequence_length: int, mask_tokens: int, vocab_size: int,
                 generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A batch of random but well-formed records (ids >= 1 so no label looks like padding)."""
    b, s, m = batch_size, sequence_length, mask_tokens
    input_ids = torch.randint(1, vocab_size, (b, s), generator=generator)
    segment_ids = (torch.arange(s) >= s // 2).long().expand(b, s).clone()
    # M distinct positions in 1..S-2 per row, sorted (CLS at 0 and the last SEP never masked).
    scores = torch.rand(b, s - 2, generator=generator)
    positions = scores.topk(m, dim=1).indices.add(1).sort(dim=1).values
    return {
        "input_ids": input_ids,
        "input_mask": torch.ones(b, s, dtype=torch.long),
        "segment_ids": segment_ids,
        "masked_lm_positions": positions,
        "masked_lm_ids": torch.gather(input_ids, 1, positions),
        "masked_lm_weights": torch.ones(b, m),
        "next_sentence_labels": torch.randint(0, 2, (b,), generator=generator),
    }


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def training_batches(data, *, micro_batch_size: int, vocab_size: int, seed: int, rank: int,
                     world_size: int, start_batch: int, device: torch.device,
                     masker=None) -> Iterator[dict]:
    """Infinite iterator of device batches for this rank, starting at batch `start_batch`.

    `data` is the DataSection. The DataLoader gets its own generator so that creating it does
    not consume the global RNG (that would break exact resume of dropout). `masker`
    (data/masking.py: DynamicMasker) re-masks every batch in the loader workers.
    """
    if data.synthetic_data or data.dataset == "generated":
        gen = torch.Generator().manual_seed(seed + rank)
        if data.synthetic_data:
            batch = to_device(random_batch(micro_batch_size, data.sequence_length,
                                           data.mask_tokens, vocab_size, gen), device)
            return itertools.repeat(batch)
        record = random_batch(1, data.sequence_length, data.mask_tokens, vocab_size, gen)
        host = {k: v.expand(micro_batch_size, *v.shape[1:]).contiguous() for k, v in record.items()}
        return (to_device(host, device) for _ in itertools.count())
    from bertforge.data.loader import PretrainingDataset, make_dataloader
    transform = None if masker is None else MaskedRows(masker, data.packed_data)
    dataset = PretrainingDataset(data.input_files, micro_batch_size, shuffle=data.shuffle,
                                 seed=seed, rank=rank, world_size=world_size,
                                 start_batch=start_batch, vocab_size=vocab_size,
                                 transform=transform)
    loader = make_dataloader(dataset, data.dataloader_workers)
    if transform is not None:  # already rows
        return (to_device(b, device) for b in loader)
    if data.packed_data:  # the reference packer's layout is converted on the fly
        from bertforge.data.loader import packed_batch
        return (to_device(packed_batch(b), device) for b in loader)
    # Into the row layout once here, not again in the loop's counts and the model's forward.
    return (to_device(as_rows(b), device) for b in loader)


@dataclass
class MaskedRows:
    """Loader transform of dynamic masking: batch `number` in the row layout, re-masked."""

    masker: Any  # data/masking.py: DynamicMasker
    packed: bool

    def __call__(self, batch: dict[str, torch.Tensor], number: int) -> dict[str, torch.Tensor]:
        from bertforge.data.loader import packed_batch
        rows = packed_batch(batch) if self.packed else as_rows(batch)
        masked = self.masker({k: v.numpy() for k, v in rows.items()}, number)
        return {k: torch.from_numpy(v) for k, v in masked.items()}


def eval_batches(files: list[str], *, micro_batch_size: int, rank: int, world_size: int,
                 device: torch.device, vocab_size: int, packed: bool = False
                 ) -> Iterator[dict]:
    """One pass over held-out records, this rank's share, in file order (ids checked
    against the model's `vocab_size`)."""
    from bertforge.data.loader import PretrainingDataset, make_dataloader
    dataset = PretrainingDataset(files, micro_batch_size, shuffle=False, rank=rank,
                                 world_size=world_size, infinite=False, vocab_size=vocab_size)
    if packed:
        from bertforge.data.loader import packed_batch
        return (to_device(packed_batch(b), device) for b in make_dataloader(dataset, 0))
    return (to_device(as_rows(b), device) for b in make_dataloader(dataset, 0))
