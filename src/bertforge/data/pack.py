"""`bertforge pack`: packed pre-training shards (several sequences per row).

Memory bounded by the length histogram and one shard per worker, not
by the dataset; three passes, the two heavy ones parallel:

1. Buckets (one process per input shard): read the shard, decode it in chunks only for each
   record's real token count and labelled MLM predictions, and spill its raw records sorted
   by length (stable) into `<output>/.pack-spill/` with an int64 offsets file (n + 1 byte
   offsets, np.save). Returns only histogram-sized arrays: sequences of each length, most
   predictions of a sequence of each length, M slots, record count. Memory per job: one
   input shard's records (64 MB shards from `bertforge tokenize`: ~130 MB with one decoded
   chunk).
2. Plan (main process, histogram-sized): the summed histogram is solved (`data.packing`:
   NNLSHP or SPFHP); the strategies' repeat counts are dealt into output shards of
   `packs_per_shard` packs by seeded multivariate hypergeometric draws (each shard gets a
   random mix of strategies). Bucket L is the concatenation, over input files in order, of
   each spill's length-L slice; walking the shards in order, each takes the next contiguous
   range of every bucket it needs. A shard's job is its strategy counts plus a list of
   (length, spill, first record, count) ranges: O(S x shards) numbers in all.
3. Write (one process per output shard): read its ranges (one read each, offsets from an
   mmap'd slice), shuffle the rows of each length (RNG seeded by seed and shard), fill the
   strategies' packs, put the packs in a seeded random order, lay them out (format below)
   and encode them 4096 packs at a time, and write the shard with its .index. Memory per job:
   one output shard's raw records (65536 packs at S=512, P=3: ~80k records, ~220 MB) plus one
   chunk's decoded and packed arrays (~150 MB).

Which sequences land in a shard (and so share packs) is a contiguous slice of each length's
bucket, i.e. follows input order: inputs from `bertforge tokenize` are globally shuffled, so
such slices are random samples of the corpus. Run inputs that are not shuffled (e.g.
concatenated corpora) through `bertforge shuffle` first. Disk: the spill is one extra copy
of the input records while the stage runs; it is removed at the end (also on failure).
Sequences in = sequences out and packs = the plan's packs are checked before the stage is
marked complete; the output depends on the seed only, not on the number of workers.

Packed record (docs/packing.md), S tokens, P sequences, M' prediction slots, all int64:
input_ids, sequence_ids (0 padding, k = k-th sequence), segment_ids, position_ids (restart at
0 per sequence) [S]; masked_lm_positions, masked_lm_ids, masked_lm_sequence [M'];
next_sentence_labels, next_sentence_mask, cls_positions [P]. Sequence k's [CLS] is the first
token of its span (unlike the reference packer: `rows.from_reference_layout` reads that layout).
`.bertforge-packing.json` in the output directory records the plan (packing factor, efficiency);
the stage's manifest (data/stage.py) records it too, with each shard's packs and sequences and
the tokenizer carried over from the input folder's manifest, for `stage.describe`.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np

from bertforge import rows
from bertforge.data.example import decode_examples
from bertforge.data.loader import expand_files, record_shape
from bertforge.data.packing import PackingPlan, pack_histogram, split_plan, strategy_lengths
from bertforge.data.shards import encode_example_batch
from bertforge.data import stage
from bertforge.data.stage import Summary, default_workers
from bertforge.data.tfrecord import RecordWriter, index_path, iter_records
from bertforge.files import atomic_output
from bertforge.processes import worker_pool
from bertforge.progress import progress

PLAN_FILE = ".bertforge-packing.json"  # a dot file: directory inputs skip it
SPILL_DIR = ".pack-spill"  # per-input-shard records sorted by length, removed at the end
# This stage's shards and indexes, of any run and shard count (all removed before a run)
OUTPUTS = r"packed-\d{5,}-of-\d{5,}\.(tfrecord|index|tfrecord\.index)"
_CHUNK = 4096  # records decoded at once (bucket pass), packs laid out at once (write)


# ---------------------------------------------------------------- pack: buckets
def _spill_paths(spill_dir: str | Path, file_no: int) -> tuple[Path, Path]:
    """(records, offsets) spill files of input shard `file_no`."""
    return (Path(spill_dir) / f"{file_no:05d}.records",
            Path(spill_dir) / f"{file_no:05d}.offsets.npy")


def _bucket_shard(job: tuple[str, int, str, int]) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Pool job: (input shard, S, spill dir, file number) -> (sequences of each length [S+1],
    most labelled predictions of one sequence of each length [S+1], M slots, records).

    Spills the shard's raw records sorted by length (stable) and their byte offsets."""
    path, sequence_length, spill_dir, file_no = job
    records = list(iter_records(path))
    lengths = np.zeros(len(records), np.int64)
    predictions = np.zeros(len(records), np.int64)
    slots = 0
    for start in range(0, len(records), _CHUNK):
        arrays = decode_examples(records[start:start + _CHUNK],
                                 lambda i, start=start: f"{path}: record {start + i}")
        if not {"input_mask", "masked_lm_ids", "next_sentence_labels"} <= arrays.keys():
            raise ValueError(f"{path}: records lack input_mask/masked_lm_ids/next_sentence_labels;"
                             " `bertforge pack` takes unpacked pre-training shards from "
                             "`bertforge tokenize`")
        if arrays["input_mask"].shape[1] != sequence_length:
            raise ValueError(f"{path}: records have {arrays['input_mask'].shape[1]} tokens but "
                             f"--sequence-length is {sequence_length}")
        end = start + len(arrays["input_mask"])
        lengths[start:end] = arrays["input_mask"].sum(1)
        predictions[start:end] = rows.labelled_slots(arrays).sum(1)
        slots = arrays["masked_lm_ids"].shape[1]
    if len(records) and lengths.min() < 1:
        raise ValueError(f"{path}: record {int(np.argmin(lengths))} has no real tokens "
                         "(input_mask all 0); such records cannot be packed")
    order = np.argsort(lengths, kind="stable")
    offsets = np.zeros(len(records) + 1, np.int64)
    np.cumsum(np.fromiter((len(r) for r in records), np.int64, len(records))[order],
              out=offsets[1:])
    records_path, offsets_path = _spill_paths(spill_dir, file_no)
    with open(records_path, "wb", buffering=1 << 20) as f:
        for i in order.tolist():
            f.write(records[i])
    np.save(offsets_path, offsets)
    most = np.zeros(sequence_length + 1, np.int64)
    np.maximum.at(most, lengths, predictions)
    return np.bincount(lengths, minlength=sequence_length + 1), most, slots, len(records)


# ---------------------------------------------------------------- pack: plan
def _shard_ranges(per_file: np.ndarray, need: np.ndarray) -> list[list[tuple[int, int, int, int]]]:
    """Per output shard, its (length, file, first spill record, count) ranges.

    per_file [files, S+1] counts each input's lengths, need [shards, S+1] each shard's; bucket
    L is the inputs' length-L slices in file order and shard i takes the range after shard
    i-1's. Histogram-sized: O(shards x S) loop steps, independent of the sequences."""
    file_end = np.cumsum(per_file, axis=0)            # end of file f's part of bucket L
    file_start = file_end - per_file
    first_in_spill = np.cumsum(per_file, axis=1) - per_file  # a spill is sorted by length
    taken = np.cumsum(need, axis=0) - need             # bucket L records before shard i
    out = []
    for shard in range(len(need)):
        ranges = []
        for length in np.nonzero(need[shard])[0].tolist():
            lo = int(taken[shard, length])
            hi = lo + int(need[shard, length])
            f = int(np.searchsorted(file_end[:, length], lo, side="right"))
            while lo < hi:
                count = min(hi, int(file_end[f, length])) - lo
                if count > 0:
                    first = int(first_in_spill[f, length] + lo - file_start[f, length])
                    ranges.append((length, f, first, count))
                    lo += count
                f += 1
        out.append(ranges)
    return out


# ---------------------------------------------------------------- pack: layout
def packed_mask_slots(record_slots: int, max_sequences_per_pack: int, most_in_a_pack: int) -> int:
    """Prediction slots M' of a packed record: the reference's M + P - 1 (a pack of P sequences
    of M predictions each would not fit, but 15% of the pack's tokens do), or more when some
    pack of this data needs more: labels are never truncated."""
    return max(record_slots + max_sequences_per_pack - 1, most_in_a_pack)


def layout_packs(arrays: dict, packs: np.ndarray, sequence_length: int, mask_slots: int
                 ) -> dict[str, np.ndarray]:
    """Packed feature arrays from unpacked record arrays and packs of row numbers (-1 empty),
    written by the row layout's writer (bertforge/rows.py)."""
    lengths = arrays["input_mask"].sum(1)
    placement = rows.place(lengths, packs, width=sequence_length, max_slots=packs.shape[1])
    nsp = arrays["next_sentence_labels"].reshape(len(lengths), -1)[:, 0]
    out = rows.write_tokens(placement, arrays["input_ids"], arrays["segment_ids"])
    out.update(rows.write_labels(placement, arrays["masked_lm_positions"],
                                 {"masked_lm_ids": arrays["masked_lm_ids"]},
                                 rows.labelled_slots(arrays), mask_slots))
    out["next_sentence_labels"] = rows.write_slots(placement, nsp)
    out["next_sentence_mask"] = rows.write_slots(placement, 1)
    out["cls_positions"] = rows.write_slots(placement, placement.offsets)
    return out


# ---------------------------------------------------------------- pack: write
def _read_ranges(spill_dir: str, ranges) -> tuple[list[bytes], dict[int, np.ndarray], np.ndarray]:
    """Records of `ranges` (one read each), the rows of each length, and each row's (file,
    spill record) for error messages."""
    records: list[bytes] = []
    rows: dict[int, list[np.ndarray]] = {}
    origin: list[np.ndarray] = []
    handles = {}
    try:
        for length, file_no, first, count in ranges:
            records_path, offsets_path = _spill_paths(spill_dir, file_no)
            if file_no not in handles:
                handles[file_no] = open(records_path, "rb")
            offsets = np.load(offsets_path, mmap_mode="r")[first:first + count + 1]
            start, end = int(offsets[0]), int(offsets[-1])
            f = handles[file_no]
            f.seek(start)
            data = f.read(end - start)
            if len(data) != end - start:
                raise RuntimeError(f"{records_path}: spill ends at {start + len(data)}, "
                                   f"expected {end} bytes; was it removed while packing?")
            bounds = (offsets - start).tolist()
            rows.setdefault(length, []).append(np.arange(len(records), len(records) + count))
            records.extend(data[a:b] for a, b in zip(bounds[:-1], bounds[1:]))
            origin.append(np.column_stack([np.full(count, file_no), first + np.arange(count)]))
    finally:
        for f in handles.values():
            f.close()
    return (records, {n: np.concatenate(r) for n, r in rows.items()},
            np.concatenate(origin) if origin else np.zeros((0, 2), np.int64))


def _write_packed_shard(job: tuple) -> tuple[int, int]:
    """Pool job: build and write one output shard from its bucket ranges; (packs, sequences)."""
    (path, spill_dir, ranges, strategies, counts, sequence_length, mask_slots, width, seed,
     shard) = job
    rng = np.random.default_rng([seed, 3, shard])
    records, rows, origin = _read_ranges(spill_dir, ranges)
    pools = {n: rng.permutation(rows[n]) for n in sorted(rows)}  # who shares a pack: random
    used = dict.fromkeys(pools, 0)
    members = np.full((int(sum(counts)), width), -1, np.int64)
    row = 0
    for strategy, count in zip(strategies, counts):
        for slot, length in enumerate(strategy):
            members[row:row + count, slot] = pools[length][used[length]:used[length] + count]
            used[length] += count
        row += count
    assert all(used[n] == len(pools[n]) for n in pools), "shard ranges do not match its packs"
    members = members[rng.permutation(len(members))]  # packs in random order
    with RecordWriter(path) as writer:
        for begin in range(0, len(members), _CHUNK):
            chunk = members[begin:begin + _CHUNK]
            ids = np.unique(chunk[chunk >= 0])
            local = np.where(chunk >= 0, np.searchsorted(ids, np.maximum(chunk, 0)), -1)
            arrays = decode_examples([records[i] for i in ids.tolist()],
                                     lambda i, ids=ids: _describe(spill_dir, origin[ids[i]]))
            data, sizes = encode_example_batch(layout_packs(arrays, local, sequence_length,
                                                            mask_slots))
            ends = np.cumsum(sizes).tolist()
            view = memoryview(data)
            for start, end in zip([0, *ends[:-1]], ends):
                writer.write(bytes(view[start:end]))
    return len(members), int((members >= 0).sum())


def _describe(spill_dir: str, origin: np.ndarray) -> str:
    file_no, record = origin.tolist()
    return f"{_spill_paths(spill_dir, file_no)[0]}: record {record} (sorted by length)"


def pack_files(inputs, output_dir: str | Path, *, sequence_length: int | None = None,
               max_sequences_per_pack: int = 3, algorithm: str = "nnlshp", seed: int = 12345,
               packs_per_shard: int = 65536, workers: int | None = None) -> Summary:
    """The `bertforge pack` stage; returns its summary (see the module docstring).
    `sequence_length` None: the inputs' own (their manifest, else their first record); a
    value that contradicts the records is refused per file in the bucket pass."""
    output_dir = Path(output_dir)
    files = [str(f) for f in expand_files(inputs)]
    if sequence_length is None:
        described, _ = stage.describe(files)
        sequence_length = described["sequence_length"] if described else record_shape(files[0])[0]
    params = {"inputs": files, "sequence_length": sequence_length, "algorithm": algorithm,
              "max_sequences_per_pack": max_sequences_per_pack, "seed": seed,
              "packs_per_shard": packs_per_shard}
    run = stage.begin(output_dir, "pack", params, files, outputs=OUTPUTS,
                      scratch=[SPILL_DIR, PLAN_FILE])
    if run.done is not None:
        return run.done
    spill_dir = output_dir / SPILL_DIR
    spill_dir.mkdir(parents=True)
    try:
        return _pack(files, output_dir, spill_dir, run, workers or default_workers())
    except BaseException:
        stage.remove_outputs(output_dir, OUTPUTS)  # no shards of a failed run for a glob
        raise
    finally:
        shutil.rmtree(spill_dir, ignore_errors=True)


def _pack(files: list[str], output_dir: Path, spill_dir: Path, run: stage.StageRun,
          workers: int) -> Summary:
    params = run.params
    sequence_length, seed = params["sequence_length"], params["seed"]
    upstream, _ = stage.describe(files)  # the tokenizer and M, carried into the manifest
    jobs = [(f, sequence_length, str(spill_dir), i) for i, f in enumerate(files)]
    # fork, as the other stages: workers inherit the imported modules
    with worker_pool(min(workers, len(files)), "fork") as pool:
        scanned = list(progress(pool.imap(_bucket_shard, jobs), total=len(files),
                                desc="pack: buckets", unit="file"))
    per_file = np.stack([s[0] for s in scanned])  # [files, S+1]
    most = np.stack([s[1] for s in scanned]).max(0)
    num_sequences = sum(s[3] for s in scanned)
    if not num_sequences:
        raise ValueError(f"no records in {files[0]}...; nothing to pack")
    solve_start = time.perf_counter()
    plan = pack_histogram(per_file.sum(0), sequence_length, params["max_sequences_per_pack"],
                          params["algorithm"])
    solve_time = time.perf_counter() - solve_start
    width = max(len(s) for s in plan.strategies)
    by_strategy = strategy_lengths(plan)  # [strategies, S+1]
    # Enough slots for the most predictions any used strategy could need: never truncated.
    mask_slots = packed_mask_slots(max(s[2] for s in scanned), width,
                                   int((by_strategy @ most)[plan.counts > 0].max()))
    num_shards = -(-plan.num_packs // params["packs_per_shard"])
    sizes = [plan.num_packs // num_shards + (i < plan.num_packs % num_shards)
             for i in range(num_shards)]
    shard_counts = split_plan(plan, sizes, np.random.default_rng([seed, 1]))
    ranges = _shard_ranges(per_file, shard_counts @ by_strategy)
    paths = [output_dir / f"packed-{i:05d}-of-{num_shards:05d}.tfrecord" for i in range(num_shards)]
    jobs = (_shard_job(plan, shard_counts[i], str(paths[i]), str(spill_dir), ranges[i],
                       sequence_length, mask_slots, width, seed, i) for i in range(num_shards))
    with worker_pool(min(workers, num_shards), "fork") as pool:
        results = list(progress(pool.imap(_write_packed_shard, jobs), total=num_shards,
                                desc="pack: write", unit="shard"))
    written_packs = sum(r[0] for r in results)
    written_sequences = sum(r[1] for r in results)
    if written_sequences != num_sequences or written_packs != plan.num_packs:
        raise RuntimeError(f"pack: {num_sequences} sequences in but {written_sequences} written,"
                           f" {written_packs} packs written of {plan.num_packs} planned")
    summary = Summary("pack")
    summary.counts.update({"sequences in": num_sequences, "sequences out": written_sequences,
                           "packs": written_packs, "shards": num_shards})
    stats = {"sequence_length": sequence_length, "max_sequences_per_pack": width,
             "mask_slots": mask_slots, "algorithm": params["algorithm"],
             "sequences": num_sequences, "packs": plan.num_packs, "efficiency": plan.efficiency,
             "packing_factor": plan.packing_factor}
    with atomic_output(output_dir / PLAN_FILE) as tmp:
        tmp.write_text(json.dumps(stats, indent=1))
    outputs = {output_dir / PLAN_FILE: None}
    for path, (packs, sequences) in zip(paths, results):
        outputs[path] = {"records": packs, "sequences": sequences}
        outputs[index_path(path)] = None
    data = stage.carried_data(upstream)
    data.update(packed=True, sequence_length=sequence_length, mask_slots=mask_slots,
                max_sequences_per_pack=width, packing_factor=plan.packing_factor,
                mask_tokens=data.get("mask_tokens", max(s[2] for s in scanned)),
                algorithm=params["algorithm"], efficiency=plan.efficiency)
    run.finish(outputs, summary, data)
    print(f"{plan.summary()}; {params['algorithm']} solved in {solve_time:.2f} s")
    return summary


def _shard_job(plan: PackingPlan, counts: np.ndarray, path: str, spill_dir: str, ranges: list,
               sequence_length: int, mask_slots: int, width: int, seed: int, shard: int
               ) -> tuple:
    """One output shard's job: the strategies it uses with their counts, and its ranges."""
    used = np.nonzero(counts)[0].tolist()
    return (path, spill_dir, ranges, [plan.strategies[i] for i in used],
            [int(counts[i]) for i in used], sequence_length, mask_slots, width, seed, shard)
