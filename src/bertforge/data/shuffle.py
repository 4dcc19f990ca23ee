"""`bertforge shuffle`: a global shuffle of TFRecord shards (packed or not) in bounded memory.

Inputs that are not globally shuffled (concatenated corpora, several `bertforge tokenize`
runs) would otherwise put related records into the same packs and batches. Cost: one extra
copy of the records on disk while the stage runs (the spill), memory of the spill buffer
(`memory_limit`) plus one output shard per worker.
"""

from __future__ import annotations

import shutil
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from bertforge.data.loader import expand_files
from bertforge.data.shards import ShardSpill, write_shard_from_spill
from bertforge.data.stage import Summary, default_workers, is_complete, mark_complete
from bertforge.data.tfrecord import iter_records
from bertforge.progress import progress

_CHUNK = 4096  # records spread at once


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
