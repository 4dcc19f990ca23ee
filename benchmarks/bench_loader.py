"""What the loader's value checks cost beside reading the batch they guard.

Every batch the pre-training loader reads is checked (`check_values`: ids within the vocab,
positions within S, labels and segment ids in range) so that bad shards stop with a line
naming file, record and field instead of an IndexError. The check must stay a small share of
the read. This times both on one batch of 32 bert-base records at S 128 (20 masks), random
ids, in a temporary shard: best of `--repeat` runs each, so that a shared machine's noise
shows as spread between runs of the script, not in the ratio.

    python benchmarks/bench_loader.py [--repeat 200]

Line read by benchmarks.yml: `check share: X %`. Results: docs/benchmarks.md, "Data".
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from bertforge.data.example import decode_examples, encode_example
from bertforge.data.loader import PretrainingDataset, check_values
from bertforge.data.tfrecord import RecordWriter

BATCH, S, MASKS, VOCAB = 32, 128, 20, 30522


def batch_arrays(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"input_ids": rng.integers(0, VOCAB, (BATCH, S)),
            "input_mask": np.ones((BATCH, S), np.int64),
            "segment_ids": np.repeat([[0, 1]], BATCH, 0).repeat(S // 2, 1),
            "masked_lm_positions": np.tile(np.arange(MASKS) * (S // MASKS - 1), (BATCH, 1)),
            "masked_lm_ids": rng.integers(0, VOCAB, (BATCH, MASKS)),
            "next_sentence_labels": rng.integers(0, 2, (BATCH, 1))}


def best_of(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=200)
    args = parser.parse_args()
    ints = batch_arrays()
    records = [encode_example({k: v[i] for k, v in ints.items()},
                              {"masked_lm_weights": np.ones(MASKS, np.float32)})
               for i in range(BATCH)]
    decoded = decode_examples(records)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "base.tfrecord"
        with RecordWriter(path) as writer:
            for record in records:
                writer.write(record)
        dataset = PretrainingDataset([path], BATCH, shuffle=True, vocab_size=VOCAB)
        read = best_of(lambda: dataset._read_batch(0, {}), args.repeat)
    check = best_of(lambda: check_values(decoded, str, VOCAB), args.repeat)
    print(f"batch {BATCH} x {S}: read {read * 1e3:.3f} ms (checks included), "
          f"check alone {check * 1e6:.1f} us")
    print(f"check share: {100 * check / read:.1f} %")


if __name__ == "__main__":
    main()
