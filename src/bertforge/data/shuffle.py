"""`bertforge shuffle`: a global shuffle of TFRecord shards (packed or not) in bounded memory.

Inputs that are not globally shuffled (concatenated corpora, several `bertforge tokenize`
runs) would otherwise put related records into the same packs and batches. Cost: one extra
copy of the records on disk while the stage runs (the spill), memory of the spill buffer
(`memory_limit`) plus one output shard per worker.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from bertforge.data import stage
from bertforge.data.loader import expand_files
from bertforge.data.shards import ShardSpill, write_shard_from_spill
from bertforge.data.stage import Summary, default_workers
from bertforge.data.tfrecord import index_path, iter_records
from bertforge.processes import worker_pool
from bertforge.progress import progress

SPILL_DIR = ".shuffle-spill"
# This stage's shards and indexes, of any run and shard count (all removed before a run)
OUTPUTS = r"shuffled-\d{5,}-of-\d{5,}\.(tfrecord|index|tfrecord\.index)"
_CHUNK = 4096  # records spread at once


def shuffle_files(inputs, output_dir: str | Path, *, seed: int = 12345,
                  num_shards: int | None = None, memory_limit: int = 128 << 20,
                  workers: int | None = None) -> Summary:
    """Global shuffle of any TFRecord shards (packed or not) with bounded memory.

    Pass 1 sends each record to a random output shard (seeded per input file) through
    `ShardSpill` (at most `memory_limit` bytes buffered); pass 2 permutes and writes each
    output shard in parallel. Memory: the buffer plus one output shard. The manifest carries
    the inputs' description (stage.describe) over: shuffled shards describe themselves too.
    """
    output_dir = Path(output_dir)
    files = [str(f) for f in expand_files(inputs)]
    num_shards = num_shards or len(files)
    params = {"inputs": files, "seed": seed, "num_shards": num_shards}
    # A killed run's spill is removed here: appending to it wrote records twice.
    run = stage.begin(output_dir, "shuffle", params, files, outputs=OUTPUTS, scratch=[SPILL_DIR])
    if run.done is not None:
        return run.done
    upstream, _ = stage.describe(files)
    spill = ShardSpill(output_dir / SPILL_DIR, num_shards, memory_limit)
    paths = [output_dir / f"shuffled-{i:05d}-of-{num_shards:05d}.tfrecord"
             for i in range(num_shards)]
    try:
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
        jobs = [(str(spill.path(i)), str(paths[i]), seed, i) for i in range(num_shards)]
        with worker_pool(min(workers or default_workers(), num_shards), "fork") as pool:
            counts = list(progress(pool.imap(write_shard_from_spill, jobs), total=num_shards,
                                   desc="shuffle: write", unit="shard"))
        if sum(counts) != total:
            raise RuntimeError(f"shuffle: {total} records in but {sum(counts)} written")
    except BaseException:
        stage.remove_outputs(output_dir, OUTPUTS)  # no shards of a failed run for a glob
        raise
    finally:
        shutil.rmtree(output_dir / SPILL_DIR, ignore_errors=True)
    summary = Summary("shuffle")
    summary.counts.update({"records in": total, "records out": total, "shards": num_shards})
    outputs = {}
    for path, count in zip(paths, counts):
        outputs[path] = count
        outputs[index_path(path)] = None
    run.finish(outputs, summary, stage.carried_data(upstream))
    return summary


def _spread(spill: ShardSpill, batch: list[bytes], rng: np.random.Generator) -> int:
    targets = rng.integers(0, spill.num_shards, len(batch))
    for shard in np.unique(targets).tolist():
        picked = [batch[i] for i in np.nonzero(targets == shard)[0].tolist()]
        spill.add(shard, np.array([len(r) for r in picked], np.int64), b"".join(picked))
    count = len(batch)
    batch.clear()
    return count
