"""The pre-training reader: batches of BERT instances from indexed TFRecord shards.

`PretrainingDataset` is an IterableDataset that yields whole batches (dicts of tensors keyed
by the records' feature names). It never scans a shard: the `.index` files give every record's
(file, offset, length), so an epoch is a seeded permutation of that global list, and any batch
can be located without reading what comes before it. That is what makes three guarantees cheap:

* Distributed ranks: rank r of W takes every W-th record of each epoch's permutation, so ranks
  differ by at most one record and no record is duplicated or missed within an epoch.
* DataLoader workers: worker w of K builds batches w, w+K, w+2K, ... of its rank's stream, and
  the DataLoader's round-robin then yields batches 0, 1, 2, ... in order: the same batches
  whatever K is, so a run is reproducible across machines with different core counts.
* Exact resume: `start_batch=k` starts at batch k of the same stream (a checkpoint stores the
  number of batches consumed), with no replay of the first k batches.

Each record is read with one pread() at its indexed offset from files opened once per worker,
its CRC checked (a corrupt record names its file and offset), and the batch is decoded with one
vectorised varint pass (`decode_examples`): ~30 us per 128-token record, shuffled, on one core
of the shared dev machine, so one worker feeds ~30k sequences/s, several times what a single
GPU trains BERT-base on at sequence length 128.

Cost: the global record list is 20 bytes per record per process and an epoch permutation 8
bytes per record (160 MB each for a 7M-record, 2x Wikipedia-sized dataset), built in each worker
once per epoch; fine up to ~10^8 records, beyond which a two-level shuffle (shards, then
records within a window) would be needed.

Every batch's values are checked as it is read (`check_values`): ids >= 0 (and below the
vocab size when the reader is given it), positions inside the S tokens of the record, segment
ids, NSP labels and masks 0 or 1, sequence numbers of packed rows within their P slots. Shards
from another vocab or a broken writer would otherwise fail later as a bare IndexError inside
an embedding or a gather, naming no file; here the error names the file, the record number
within it and the feature. The check is one unsigned max() per feature (a negative int64 seen
as uint64 is above any bound): 13-14 us per 32 x 128 batch of BERT records (6 int64 features)
against 0.62-0.77 ms (best-median of 100) to read, decode and check it, shuffled: ~2%, on one
core of the shared 2-core dev machine (benchmarks/bench_loader.py: 2.2-2.4%).

What the shards hold is checked here too, before a run starts: `record_kind` reads one record
per file (unpacked, packed, or the reference packer's), `check_inputs` refuses mixed kinds or a
kind that contradicts --packed-data, `measure_packing_factor` samples sequences per packed
row, and `packed_batch` reads a packed batch into the row layout (bertforge/rows.py).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from glob import glob
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from bertforge import rows
from bertforge.data.example import decode_examples
from bertforge.data.tfrecord import INDEX_SUFFIX, iter_records, read_index, read_record_at

_RECREATE = ("the shards are damaged or were not written as BERT pre-training records; "
             "re-create them with `bertforge tokenize` (and `bertforge pack`)")
_OTHER_VOCAB = ("made with another vocab? give --vocab-size (and --tokenizer) of the vocab "
                "the shards were made with")
# Features whose values index something, by what bounds them (from 0 up to, excluding):
# token ids the vocab; positions the S tokens of the row; 0/1 flags 2; the sequence number
# of a packed row's token or label (0 = none) its P sequence slots + 1.
# Unpacked, our packed and the reference packer's (packed_*) records, docs/packing.md.
_TOKEN_IDS = ("input_ids", "masked_lm_ids", "packed_input_ids", "packed_masked_lm_ids")
_POSITIONS = ("masked_lm_positions", "position_ids", "cls_positions",
              "packed_masked_lm_positions", "packed_position_ids")
_FLAGS = ("input_mask", "segment_ids", "next_sentence_labels", "next_sentence_mask",
          "packed_segment_ids", "packed_next_sentence_labels")
_SEQUENCE_NUMBERS = ("sequence_ids", "masked_lm_sequence", "packed_input_mask")


def expand_files(patterns: str | Path | Sequence[str | Path]) -> list[Path]:
    """Files named by paths, glob patterns or directories, sorted; .index files left out."""
    if isinstance(patterns, (str, Path)):
        patterns = [patterns]
    if not patterns:
        raise ValueError("no TFRecord files given")
    found: set[Path] = set()
    for pattern in patterns:
        text = str(pattern)
        if any(c in text for c in "*?["):
            matches = [Path(m) for m in glob(text) if Path(m).is_file()]
        elif Path(text).is_dir():
            matches = [p for p in Path(text).iterdir()
                       if p.is_file() and not p.name.startswith(".")]  # not manifests
        elif Path(text).is_file():
            matches = [Path(text)]
        else:
            raise FileNotFoundError(f"{text}: no such file or directory")
        matches = [m for m in matches if not m.name.endswith(INDEX_SUFFIX)]
        if not matches:
            raise FileNotFoundError(f"{text}: matches no TFRecord files; check the path or "
                                    "pattern (quote globs so the shell does not expand them)")
        found.update(matches)
    return sorted(found)


def check_values(arrays: dict[str, np.ndarray], describe, vocab_size: int | None = None
                 ) -> None:
    """Refuse a decoded batch whose ids, positions or flags are out of range.

    `arrays`: [N, k] int64 arrays by feature name (decode_examples' output); `describe(i)`
    names record i of the batch (file and record number). Bounds are in the tables above;
    token ids are bounded by `vocab_size` when given, else only checked to be >= 0. A ValueError
    names the record, the feature, the value and what to do. Cost: one max() per feature over
    the batch (measured in the module docstring); locating the bad value only on failure.
    """
    width = next((arrays[k].shape[1] for k in ("input_ids", "packed_input_ids") if k in arrays),
                 None)
    slots = next((arrays[k].shape[1] for k in ("next_sentence_labels", "cls_positions",
                                              "packed_next_sentence_labels") if k in arrays), 1)
    no_limit = np.iinfo(np.int64).max + 1  # as uint64: catches exactly the negative values
    for name, values in arrays.items():
        if not isinstance(values, np.ndarray) or values.dtype != np.int64 or not values.size:
            continue
        if name in _TOKEN_IDS:
            limit, what = vocab_size or no_limit, "a token id"
        elif name in _POSITIONS:
            limit, what = width or no_limit, f"a position in the {width} tokens of input_ids"
        elif name in _FLAGS:
            limit, what = 2, "0 or 1"
        elif name in _SEQUENCE_NUMBERS:
            limit, what = slots + 1, f"a sequence number 0..{slots} of a packed row"
        else:
            continue
        limit = np.uint64(limit)
        unsigned = values.view(np.uint64)  # one pass: negatives become >= 2^63
        if unsigned.max() < limit:
            continue
        row, column = np.argwhere(unsigned >= limit)[0].tolist()
        value = int(values[row, column])
        if name in _TOKEN_IDS and value >= 0:
            hint = f"is outside the vocab of {vocab_size} tokens; {_OTHER_VOCAB}"
        else:
            hint = f"must be {what}; {_RECREATE}"
        raise ValueError(f"{describe(row)}: feature {name!r} holds {value} (value {column}), "
                         f"which {hint}")


class PretrainingDataset(IterableDataset):
    """Batches of records from indexed TFRecord shards; see the module docstring.

    `vocab_size`, when given, bounds the token ids of every batch (`check_values`), so that
    shards made with another vocab are refused with the file and record named.
    """

    def __init__(self, files: Sequence[str | Path], batch_size: int, *, shuffle: bool = True,
                 seed: int = 0, rank: int = 0, world_size: int = 1, start_batch: int = 0,
                 drop_last_epoch_partial: bool = False, check_crc: bool = True,
                 infinite: bool = True, vocab_size: int | None = None,
                 transform: Callable[[dict[str, torch.Tensor], int], dict] | None = None):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if vocab_size is not None and vocab_size < 1:
            raise ValueError(f"vocab_size must be at least 1, got {vocab_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if start_batch < 0 or seed < 0:
            raise ValueError(f"start_batch ({start_batch}) and seed ({seed}) must be >= 0")
        self.files = expand_files(files)
        indexes = [read_index(path) for path in self.files]
        sizes = [len(index) for index in indexes]
        self._file_ids = np.repeat(np.arange(len(self.files), dtype=np.int32), sizes)
        self._file_starts = np.cumsum([0] + sizes[:-1])  # global number of each file's record 0
        self.vocab_size = vocab_size
        self.transform = transform  # (batch, batch number) -> batch, in the loader workers
        entries = np.concatenate(indexes) if indexes else np.zeros((0, 2), np.int64)
        self._offsets, self._lengths = entries[:, 0].copy(), entries[:, 1].copy()
        self.num_records = len(self._offsets)
        if self.num_records < world_size:
            raise ValueError(f"{self.num_records} records in {len(self.files)} file(s) "
                             f"({self.files[0]}, ...) cannot feed {world_size} ranks")
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.rank, self.world_size, self.start_batch = rank, world_size, start_batch
        self.check_crc, self.infinite = check_crc, infinite
        self.drop_last_epoch_partial = drop_last_epoch_partial
        if drop_last_epoch_partial:
            # every rank the same whole number of batches per epoch, so that DDP ranks stay
            # in step and no batch spans two epochs
            self.records_per_epoch = self.num_records // world_size // batch_size * batch_size
            if not self.records_per_epoch:
                raise ValueError(f"{self.num_records} records make no full batch of "
                                 f"{batch_size} per rank for {world_size} rank(s)")
        else:
            self.records_per_epoch = len(range(rank, self.num_records, world_size))
        self._permutations: dict[int, np.ndarray] = {}

    @property
    def batches_per_epoch(self) -> int:
        """Batches covering one epoch of this rank's records (the last may be partial)."""
        return -(-self.records_per_epoch // self.batch_size)

    def _records(self, first: int, last: int) -> np.ndarray:
        """Global record numbers of items [first, last) of this rank's stream."""
        items = np.arange(first, last)
        epochs, positions = np.divmod(items, self.records_per_epoch)
        picks = self.rank + self.world_size * positions  # this rank's share of the epoch
        if not self.shuffle:
            return picks
        out = np.empty_like(picks)
        for epoch in np.unique(epochs).tolist():
            mask = epochs == epoch
            out[mask] = self._permutation(epoch)[picks[mask]]
        return out

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._permutations:
            if len(self._permutations) >= 2:  # a batch spans at most this epoch and the last
                self._permutations.pop(min(self._permutations))
            rng = np.random.default_rng([self.seed, epoch])
            self._permutations[epoch] = rng.permutation(self.num_records)
        return self._permutations[epoch]

    def _read_batch(self, number: int, files: dict[int, int]) -> dict[str, torch.Tensor]:
        first = number * self.batch_size
        last = first + self.batch_size
        if not self.infinite:
            last = min(last, self.records_per_epoch)
        records = self._records(first, last)
        file_ids = self._file_ids[records].tolist()
        offsets = self._offsets[records].tolist()
        data = []
        for file_id, offset, length in zip(file_ids, offsets, self._lengths[records].tolist()):
            if file_id not in files:
                files[file_id] = os.open(self.files[file_id], os.O_RDONLY)
            data.append(read_record_at(files[file_id], self.files[file_id], offset, length,
                                       self.check_crc))
        def describe(i: int) -> str:
            number = int(records[i] - self._file_starts[file_ids[i]])
            return f"{self.files[file_ids[i]]}: record {number} (at byte offset {offsets[i]})"

        arrays = decode_examples(data, describe)
        check_values(arrays, describe, self.vocab_size)
        batch = {}
        for name, values in arrays.items():
            if isinstance(values, list):
                raise ValueError(f"{self.files[file_ids[0]]}: feature {name!r} holds bytes; "
                                 "the pre-training reader batches only int64 and float features")
            if values.ndim == 2 and values.shape[1] == 1:
                values = np.ascontiguousarray(values[:, 0])  # per-record scalar: NSP label
            batch[name] = torch.from_numpy(values)
        return batch if self.transform is None else self.transform(batch, number)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        worker = get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker else (0, 1)
        total = None if self.infinite else self.batches_per_epoch
        files: dict[int, int] = {}  # file number -> descriptor, opened once per worker
        try:
            number = self.start_batch + worker_id
            while total is None or number < total:
                yield self._read_batch(number, files)
                number += num_workers
        finally:
            for fd in files.values():
                os.close(fd)


def make_dataloader(dataset: PretrainingDataset, num_workers: int) -> DataLoader:
    """A DataLoader over the dataset's batches: in order, identical for any num_workers."""
    options = {}
    if num_workers > 0:
        # persistent: an infinite stream is one long iteration; prefetch hides read jitter
        options = {"persistent_workers": True, "prefetch_factor": 4}
    return DataLoader(dataset, batch_size=None, num_workers=num_workers,
                      pin_memory=torch.cuda.is_available(), **options)


def masked_label_counts(files: Sequence[str | Path], vocab_size: int,
                        max_records: int = 16384) -> np.ndarray:
    """[vocab_size] int64: how often each token id is a masked-LM label in the first
    `max_records` records of `files` (file order, packed or unpacked records).

    The unigram prior the MLM decoder bias starts from (model/bert.py: init_mlm_bias).
    `bertforge tokenize` shuffles records globally, so the first records are a fair sample;
    16k records x 20 labels is ~330k tokens, enough for the frequencies that matter (the
    head of the distribution). Cost: reading and decoding them, ~0.5 s on one core.
    An id outside the vocabulary means the shards were made with another vocab: refused
    here (the reader's check_values), before any training, with the file and record named.
    """
    dataset = PretrainingDataset(files, batch_size=1024, shuffle=False, infinite=False,
                                 vocab_size=vocab_size)
    counts = np.zeros(vocab_size, np.int64)
    seen = 0
    for batch in dataset:
        labels = batch.get("masked_lm_ids", batch.get("packed_masked_lm_ids"))
        if labels is None:
            raise ValueError(f"{dataset.files[0]}: records lack masked_lm_ids; these are not "
                             "pre-training records (bertforge tokenize / pack writes them)")
        batch = rows.as_rows(batch)
        real = rows.labelled_slots(batch)[:max_records - seen]  # the loss's rule
        labels = batch["masked_lm_ids"][:len(real)][real].numpy()
        counts += np.bincount(labels, minlength=vocab_size)
        seen += len(real)
        if seen >= max_records:
            break
    return counts


# ---------------------------------------------------------------- what the shards hold
def packed_batch(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Any packed batch (ours or the reference's) in this project's layout."""
    if rows.is_unpacked(batch):
        raise ValueError("--packed-data is set but the records are not packed (no sequence_ids); "
                         "run `bertforge pack` first or drop --packed-data")
    return rows.as_rows(batch)


def record_kind(path: str | Path) -> str:
    """'packed', 'reference-packed' or 'unpacked', from the first record of a shard."""
    for record in iter_records(path):
        keys = decode_examples([record]).keys()
        if "packed_input_ids" in keys:
            return "reference-packed"
        return "packed" if "sequence_ids" in keys else "unpacked"
    raise ValueError(f"{path}: holds no records")


def record_shape(path: str | Path) -> tuple[int, int]:
    """(tokens per record, prediction slots per record) from the first record of a shard: what
    shards without a manifest (Google's, the reference's) say about themselves."""
    for record in iter_records(path):
        arrays = decode_examples([record])
        prefix = "packed_" if "packed_input_ids" in arrays else ""  # the reference packer's
        return (arrays[prefix + "input_ids"].shape[1],
                arrays[prefix + "masked_lm_ids"].shape[1])
    raise ValueError(f"{path}: holds no records")


def check_inputs(files, packed: bool) -> None:
    """Refuse mixed packed and unpacked inputs, or a kind that does not match --packed-data."""
    kinds = {str(f): record_kind(f) for f in expand_files(files)}
    packed_files = [f for f, k in kinds.items() if k != "unpacked"]
    unpacked_files = [f for f, k in kinds.items() if k == "unpacked"]
    if packed_files and unpacked_files:
        raise ValueError(f"mixed packed ({packed_files[0]}) and unpacked ({unpacked_files[0]}) "
                         "input files; pack all of them with `bertforge pack` or give only one kind")
    if packed and unpacked_files:
        raise ValueError(f"--packed-data is set but {unpacked_files[0]} is unpacked; run "
                         "`bertforge pack` on it or drop --packed-data")
    if not packed and packed_files:
        raise ValueError(f"{packed_files[0]} holds packed records; add --packed-data")


def measure_packing_factor(files, sample: int = 4096, seed: int = 0) -> float:
    """Mean sequences per record over a seeded sample of records of packed shards."""
    paths = expand_files(files)
    indexes = [read_index(p) for p in paths]
    total = sum(len(i) for i in indexes)
    if not total:
        raise ValueError(f"no records in {paths[0]}...")
    picks = np.sort(np.random.default_rng(seed).choice(total, min(sample, total), replace=False))
    starts = np.cumsum([0] + [len(i) for i in indexes])
    records = []
    for file_id, path in enumerate(paths):
        mine = picks[(picks >= starts[file_id]) & (picks < starts[file_id + 1])] - starts[file_id]
        if not len(mine):
            continue
        fd = os.open(path, os.O_RDONLY)
        try:
            records += [read_record_at(fd, path, *indexes[file_id][i].tolist(), True) for i in mine.tolist()]
        finally:
            os.close(fd)
    arrays = decode_examples(records)
    key = "next_sentence_mask" if "next_sentence_mask" in arrays else "packed_next_sentence_mask"
    if key not in arrays:
        raise ValueError(f"{paths[0]}: records are not packed (no next_sentence_mask)")
    return float((np.asarray(arrays[key]) > 0).sum(1).mean())
