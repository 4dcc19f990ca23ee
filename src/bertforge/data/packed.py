"""`bertforge pack` and `bertforge shuffle`: packed pre-training shards, and the reader side.

Pack stage (issue 4), three passes, each parallel:

1. Lengths: every input shard is read once (one process per file) for each record's real
   token count and labelled MLM predictions (2 x int16 per sequence).
2. Plan: the length histogram is solved (`data.packing`: NNLSHP or SPFHP) and realised on
   the sequence numbers with a seeded random choice among equal lengths; the packs are put
   in a seeded random order (a global shuffle for free) and cut into output shards.
3. Write: one process per output shard reads its member records from the indexed inputs
   (one pread each, sorted by file and offset), lays them out (format below), encodes the
   shard in one vectorised pass and writes it with its .index.

Memory is bounded by per-sequence metadata (~50 bytes a sequence: lengths, index locations,
pack table; ~0.8 GB for 16M sequences) plus one output shard's records per worker, never
by the dataset's bytes. The price of not spilling records
into per-length buckets: pass 3 reads inputs in pack order, i.e. random reads (page-cache
speed on local disks; on network storage run `bertforge shuffle` style staging first).
Sequences in = sequences out is counted and checked before the stage is marked complete.

Packed record (docs/packing.md), S tokens, P sequences, M' prediction slots, all int64:
input_ids, sequence_ids (0 padding, k = k-th sequence), segment_ids, position_ids (restart at
0 per sequence) [S]; masked_lm_positions, masked_lm_ids, masked_lm_sequence [M'];
next_sentence_labels, next_sentence_mask, cls_positions [P]. Sequence k's [CLS] is the first
token of its span (unlike the reference packer: `from_reference_layout` reads that layout).
`.bertforge-packing.json` in the output directory records the plan (packing factor, efficiency).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch

from bertforge.data.example import decode_examples
from bertforge.data.loader import expand_files
from bertforge.data.packing import assign_packs, length_histogram, pack_histogram
from bertforge.data.shards import ShardSpill, encode_example_batch, write_shard_from_spill
from bertforge.data.stage import Summary, default_workers, is_complete, mark_complete, progress
from bertforge.data.tfrecord import RecordWriter, iter_records, read_index, read_record_at

PLAN_FILE = ".bertforge-packing.json"  # a dot file: directory inputs skip it
_CHUNK = 4096  # records decoded at once in the lengths pass
REFERENCE_KEYS = ("packed_input_ids", "packed_input_mask", "packed_segment_ids",
                  "packed_position_ids", "packed_masked_lm_positions", "packed_masked_lm_ids",
                  "packed_masked_lm_mask", "packed_next_sentence_labels",
                  "packed_next_sentence_mask")


def _labelled(arrays: dict) -> np.ndarray:
    real = arrays["masked_lm_ids"] != 0
    if "masked_lm_weights" in arrays:
        real &= arrays["masked_lm_weights"] > 0
    return real


def _scan_lengths(job: tuple[str, int]) -> tuple[np.ndarray, np.ndarray, int]:
    """Pool job: (shard, S) -> (real tokens, labelled predictions per record, M slots)."""
    path, sequence_length = job
    lengths, predictions, slots = [], [], 0
    chunk: list[bytes] = []

    def flush() -> None:
        nonlocal slots
        arrays = decode_examples(chunk, lambda i: f"{path}: record {i} of a chunk")
        if "input_mask" not in arrays or "masked_lm_ids" not in arrays:
            raise ValueError(f"{path}: records lack input_mask/masked_lm_ids; `bertforge pack` "
                             "takes unpacked pre-training shards from `bertforge tokenize`")
        if arrays["input_mask"].shape[1] != sequence_length:
            raise ValueError(f"{path}: records have {arrays['input_mask'].shape[1]} tokens but "
                             f"--sequence-length is {sequence_length}")
        lengths.append(arrays["input_mask"].sum(1).astype(np.int16))
        predictions.append(_labelled(arrays).sum(1).astype(np.int16))
        slots = arrays["masked_lm_ids"].shape[1]
        chunk.clear()

    for record in iter_records(path):
        chunk.append(record)
        if len(chunk) == _CHUNK:
            flush()
    if chunk:
        flush()
    empty = np.zeros(0, np.int16)
    return (np.concatenate(lengths) if lengths else empty,
            np.concatenate(predictions) if predictions else empty, slots)


def packed_mask_slots(record_slots: int, max_sequences_per_pack: int, most_in_a_pack: int) -> int:
    """Prediction slots M' of a packed record: the reference's M + P - 1 (a pack of P sequences
    of M predictions each would not fit, but 15% of the pack's tokens do), or more when some
    pack of this data needs more: labels are never truncated."""
    return max(record_slots + max_sequences_per_pack - 1, most_in_a_pack)


def layout_packs(arrays: dict, packs: np.ndarray, sequence_length: int, mask_slots: int
                 ) -> dict[str, np.ndarray]:
    """Packed feature arrays from unpacked record arrays and packs of row numbers (-1 empty)."""
    n, p = packs.shape
    s, m = sequence_length, mask_slots
    out = {name: np.zeros((n, width), np.int64) for name, width in (
        ("input_ids", s), ("sequence_ids", s), ("segment_ids", s), ("position_ids", s),
        ("masked_lm_positions", m), ("masked_lm_ids", m), ("masked_lm_sequence", m),
        ("next_sentence_labels", p), ("next_sentence_mask", p), ("cls_positions", p))}
    lengths = arrays["input_mask"].sum(1)
    labelled = _labelled(arrays)
    nsp = arrays["next_sentence_labels"].reshape(len(lengths), -1)[:, 0]
    for row, members in enumerate(packs.tolist()):
        start = used = 0
        for k, i in enumerate(members, start=1):
            if i < 0:
                continue
            end = start + int(lengths[i])
            out["input_ids"][row, start:end] = arrays["input_ids"][i, :end - start]
            out["segment_ids"][row, start:end] = arrays["segment_ids"][i, :end - start]
            out["sequence_ids"][row, start:end] = k
            out["position_ids"][row, start:end] = np.arange(end - start)
            real = labelled[i]
            count = int(real.sum())
            if used + count > m:
                raise ValueError(f"a pack needs {used + count} prediction slots but the packed "
                                 f"format has {m} (mask_slots)")
            slots = slice(used, used + count)
            out["masked_lm_positions"][row, slots] = arrays["masked_lm_positions"][i][real] + start
            out["masked_lm_ids"][row, used:used + count] = arrays["masked_lm_ids"][i][real]
            out["masked_lm_sequence"][row, used:used + count] = k
            out["next_sentence_labels"][row, k - 1] = nsp[i]
            out["next_sentence_mask"][row, k - 1] = 1
            out["cls_positions"][row, k - 1] = start
            start, used = end, used + count
    return out


def _write_packed_shard(job: tuple) -> tuple[int, int]:
    """Pool job: read the member records of one output shard, lay out and write its packs.

    `members` [packs, P] numbers rows of `locations` (file, offset, length), which holds only
    this shard's sequences, so a job's pickle is small whatever the dataset size."""
    path, files, members, locations, sequence_length, mask_slots = job
    order = np.lexsort((locations[:, 1], locations[:, 0]))  # read by file, then offset
    records: list[bytes] = [b""] * len(locations)
    fds: dict[int, int] = {}
    try:
        for row in order.tolist():
            file_id, offset, length = locations[row].tolist()
            if file_id not in fds:
                fds[file_id] = os.open(files[file_id], os.O_RDONLY)
            records[row] = read_record_at(fds[file_id], files[file_id], offset, length, True)
    finally:
        for fd in fds.values():
            os.close(fd)
    arrays = decode_examples(records, lambda i: f"{files[locations[i, 0]]}: record at byte "
                                                f"offset {locations[i, 1]}")
    local = members
    packed = layout_packs(arrays, local, sequence_length, mask_slots)
    data, lengths = encode_example_batch(packed)
    # Packs arrive already in a global random order: write them as they are.
    ends = np.cumsum(lengths).tolist()
    view = memoryview(data)
    with RecordWriter(path) as writer:
        for start, end in zip([0, *ends[:-1]], ends):
            writer.write(bytes(view[start:end]))
    return len(members), int((members >= 0).sum())


def _shard_job(path, files, members, locations, sequence_length, mask_slots) -> tuple:
    """One output shard's job, its pack table renumbered to its own sequences."""
    ids = np.unique(members[members >= 0])
    local = np.where(members >= 0, np.searchsorted(ids, np.maximum(members, 0)), -1)
    return path, files, local, locations[ids], sequence_length, mask_slots


def pack_files(inputs, output_dir: str | Path, *, sequence_length: int,
               max_sequences_per_pack: int = 3, algorithm: str = "nnlshp", seed: int = 12345, packs_per_shard: int = 65536,
               workers: int | None = None) -> Summary:
    """The `bertforge pack` stage; returns its summary (see the module docstring)."""
    output_dir = Path(output_dir)
    files = [str(f) for f in expand_files(inputs)]
    params = {"inputs": files, "sequence_length": sequence_length, "algorithm": algorithm,
              "max_sequences_per_pack": max_sequences_per_pack, "seed": seed,
              "packs_per_shard": packs_per_shard}
    done = is_complete(output_dir, "pack", params)
    if done is not None:
        return done
    workers = workers or default_workers()
    ctx = get_context("fork")  # as the other stages: workers inherit the imported modules
    with ctx.Pool(min(workers, len(files))) as pool:
        scanned = list(progress(pool.imap(_scan_lengths, [(f, sequence_length) for f in files]),
                                total=len(files), desc="pack: lengths", unit="file"))
    lengths = np.concatenate([s[0] for s in scanned])  # int16: 2 bytes per sequence
    predictions = np.concatenate([s[1] for s in scanned])
    if not len(lengths):
        raise ValueError(f"no records in {files[0]}...; nothing to pack")
    solve_start = time.perf_counter()
    plan = pack_histogram(length_histogram(lengths, sequence_length), sequence_length,
                          max_sequences_per_pack, algorithm)
    solve_time = time.perf_counter() - solve_start
    packs = assign_packs(lengths, plan, seed)
    packs = packs[np.random.default_rng([seed, 1]).permutation(len(packs))]
    width = packs.shape[1]
    pack_predictions = np.where(packs >= 0, predictions[np.maximum(packs, 0)], 0)
    pack_predictions = pack_predictions.sum(1, dtype=np.int64)
    mask_slots = packed_mask_slots(max(s[2] for s in scanned), width, int(pack_predictions.max()))
    locations = np.concatenate([np.column_stack([np.full(len(index), i), index])
                                for i, index in enumerate(read_index(f) for f in files)])
    if len(locations) != len(lengths):
        raise ValueError(f"the .index files of {files[0]}... list {len(locations):,} records but "
                         f"the shards hold {len(lengths):,}; re-run `bertforge index` on them")
    num_shards = -(-len(packs) // packs_per_shard)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = [output_dir / f"packed-{i:05d}-of-{num_shards:05d}.tfrecord" for i in range(num_shards)]
    jobs = (_shard_job(str(paths[i]), files, packs[i::num_shards], locations, sequence_length,
                       mask_slots) for i in range(num_shards))
    with ctx.Pool(min(workers, num_shards)) as pool:
        results = list(progress(pool.imap(_write_packed_shard, jobs), total=num_shards,
                                desc="pack: write", unit="shard"))
    written_packs = sum(r[0] for r in results)
    written_sequences = sum(r[1] for r in results)
    if written_sequences != len(lengths) or written_packs != plan.num_packs:
        raise RuntimeError(f"pack: {len(lengths)} sequences in but {written_sequences} written")
    summary = Summary("pack")
    summary.counts.update({"sequences in": len(lengths), "sequences out": written_sequences,
                           "packs": written_packs, "shards": num_shards})
    stats = {"sequence_length": sequence_length, "max_sequences_per_pack": width,
             "mask_slots": mask_slots, "algorithm": algorithm, "sequences": len(lengths),
             "packs": plan.num_packs, "efficiency": plan.efficiency,
             "packing_factor": plan.packing_factor}
    (output_dir / PLAN_FILE).write_text(json.dumps(stats, indent=1))
    mark_complete(output_dir, "pack", params, [*paths, output_dir / PLAN_FILE], summary)
    print(f"{plan.summary()}; {algorithm} solved in {solve_time:.2f} s")
    return summary


# ---------------------------------------------------------------- shuffle
def shuffle_files(inputs, output_dir: str | Path, *, seed: int = 12345,
                  num_shards: int | None = None, memory_limit: int = 128 << 20,
                  workers: int | None = None) -> Summary:
    """Global shuffle of any TFRecord shards (packed or not) with bounded memory.

    Pass 1 sends each record to a random output shard (seeded per input file) through
    `ShardSpill` (at most `memory_limit` bytes buffered); pass 2 permutes and writes each
    output shard in parallel. Memory: the buffer plus one output shard.
    """
    output_dir = Path(output_dir)
    files = [str(f) for f in expand_files(inputs)]
    num_shards = num_shards or len(files)
    params = {"inputs": files, "seed": seed, "num_shards": num_shards}
    done = is_complete(output_dir, "shuffle", params)
    if done is not None:
        return done
    spill = ShardSpill(output_dir / ".shuffle-spill", num_shards, memory_limit)
    total = 0
    for file_no, path in enumerate(progress(files, desc="shuffle: spread", unit="file")):
        rng = np.random.default_rng([seed, 2, file_no])
        batch: list[bytes] = []
        for record in iter_records(path):
            batch.append(record)
            if len(batch) == _CHUNK:
                total += _spread(spill, batch, rng)
        total += _spread(spill, batch, rng)
    spill.flush()
    paths = [output_dir / f"shuffled-{i:05d}-of-{num_shards:05d}.tfrecord" for i in range(num_shards)]
    jobs = [(str(spill.path(i)), str(paths[i]), seed, i) for i in range(num_shards)]
    ctx = get_context("fork")
    with ctx.Pool(min(workers or default_workers(), num_shards)) as pool:
        written = sum(progress(pool.imap(write_shard_from_spill, jobs), total=num_shards,
                               desc="shuffle: write", unit="shard"))
    shutil.rmtree(output_dir / ".shuffle-spill", ignore_errors=True)
    if written != total:
        raise RuntimeError(f"shuffle: {total} records in but {written} written")
    summary = Summary("shuffle")
    summary.counts.update({"records in": total, "records out": written, "shards": num_shards})
    mark_complete(output_dir, "shuffle", params, paths, summary)
    return summary


def _spread(spill: ShardSpill, batch: list[bytes], rng: np.random.Generator) -> int:
    targets = rng.integers(0, spill.num_shards, len(batch))
    for shard in np.unique(targets).tolist():
        picked = [batch[i] for i in np.nonzero(targets == shard)[0].tolist()]
        spill.add(shard, np.array([len(r) for r in picked], np.int64), b"".join(picked))
    count = len(batch)
    batch.clear()
    return count


# ---------------------------------------------------------------- reader side
def from_reference_layout(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A batch of the reference packer's records (packed_* keys) in this project's layout.

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


def packed_batch(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Any packed batch (ours or the reference's) in this project's layout."""
    if "packed_input_ids" in batch:
        return from_reference_layout(batch)
    if "sequence_ids" not in batch:
        raise ValueError("--packed-data is set but the records are not packed (no sequence_ids); "
                         "run `bertforge pack` first or drop --packed-data")
    return batch


def record_kind(path: str | Path) -> str:
    """'packed', 'reference-packed' or 'unpacked', from the first record of a shard."""
    for record in iter_records(path):
        keys = decode_examples([record]).keys()
        if "packed_input_ids" in keys:
            return "reference-packed"
        return "packed" if "sequence_ids" in keys else "unpacked"
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
