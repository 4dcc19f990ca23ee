"""Sequence packing benchmarks, three parts:

  solve  NNLSHP vs SPFHP efficiency and solve time at S = 128/384/512 on Wikipedia-shaped
         histograms of 16M sequences: "half-full" (half at/near full length, a long tail of
         short ones; the shape of tests/test_packing.py) and "reference-factor" (the
         full-length share lowered until the mean length gives the packing factors the
         reference assumed for real Wikipedia: 1.17 / 1.7 / 2.0). Paper, Wikipedia 512:
         NNLSHP P=3 99.75% (1.996x) in ~24 s, SPFHP 99.6% in 0.03 s.
  pack   end-to-end `bertforge pack` sequences/s on real unpacked shards.
  train  CPU pre-training real tokens/s, packed vs unpacked, on the SAME sequences: N records
         sampled from unpacked shards run one per row and packed (NNLSHP) in memory, in
         interleaved rounds (medians; round 0 warm-up); compared with the theoretical speed-up
         (N / packs) of those sequences (floor: 0.9x of it).

    python benchmarks/bench_packing.py solve [--sequences 16000000]
    python benchmarks/bench_packing.py pack UNPACKED_DIR --sequence-length 512 [--output DIR]
    python benchmarks/bench_packing.py train --unpacked 'u512/*.tfrecord' [--sequences 48]

Lines read by benchmarks.yml: `throughput: X samples/sec` (sequences/s) and
`real tokens/s: X`. Results and machine: docs/packing.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import transformers


# The packing factors the reference assumed for real Wikipedia (reference-system.md).
REFERENCE_FACTORS = {128: 1.17, 384: 1.7, 512: 2.0}


def bench_solve(args) -> None:
    from bertforge.data.packing import pack_histogram
    from lengths import wikipedia_like_histogram
    for s in args.sequence_lengths:
        shapes = {"half-full": None}
        if s in REFERENCE_FACTORS:
            shapes[f"reference-factor {REFERENCE_FACTORS[s]}x"] = REFERENCE_FACTORS[s]
        for shape, factor in shapes.items():
            histogram = wikipedia_like_histogram(s, args.sequences, packing_factor=factor)
            for algorithm, p in (("nnlshp", 3), ("spfhp", 3), ("spfhp", 8)):
                start = time.perf_counter()
                plan = pack_histogram(histogram, s, p, algorithm)
                took = time.perf_counter() - start
                print(f"S={s} histogram {shape} {algorithm} P={p}: efficiency "
                      f"{100 * plan.efficiency:.2f}% speed-up {plan.packing_factor:.3f}x packs "
                      f"{plan.num_packs:,} solve time: {took:.3f} s", flush=True)


def bench_pack(args) -> None:
    import resource

    from bertforge.data.pack import pack_files
    out = Path(args.output or tempfile.mkdtemp(prefix="bench-pack-"))
    start = time.perf_counter()
    summary = pack_files([args.input], out, sequence_length=args.sequence_length,
                         algorithm=args.algorithm, workers=args.workers)
    took = time.perf_counter() - start
    n = summary.counts["sequences in"]
    print(summary.line())
    print(f"pack: {n:,} sequences in {took:.2f} s; throughput: {n / took:.1f} samples/sec")
    # ru_maxrss is KiB on Linux; children = the largest single worker process, not a sum
    main_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    worker_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"pack: peak RSS main process {main_mb:.0f} MB, largest worker {worker_mb:.0f} MB")


def _same_sequences(files, count, batch_size, max_per_pack):
    """`count` sampled unpacked records of `files`, as `same_sequences` returns them."""
    from bertforge.data.loader import PretrainingDataset
    records = next(iter(PretrainingDataset(files, count, shuffle=True, seed=0)))
    return same_sequences(records, batch_size, max_per_pack)


def same_sequences(records: dict[str, torch.Tensor], batch_size: int, max_per_pack: int,
                   algorithm: str = "nnlshp"):
    """(unpacked batches, packed batches, sequences per packed row) of one batch of unpacked
    `records`: the two variants then train on exactly the same sequences and real tokens."""
    from bertforge.data.pack import layout_packs, packed_mask_slots
    from bertforge.data.packing import pack_lengths
    arrays = {k: v.numpy() for k, v in records.items()}
    count, s = arrays["input_ids"].shape
    arrays["next_sentence_labels"] = arrays["next_sentence_labels"].reshape(count, 1)
    packs = pack_lengths(arrays["input_mask"].sum(1), s, max_per_pack, algorithm, seed=0)
    table = np.full((len(packs), max_per_pack), -1, np.int64)
    for row, members in enumerate(packs):
        table[row, :len(members)] = members
    labelled = (arrays["masked_lm_ids"] != 0).sum(1)
    # The slot count `bertforge pack` would give these packs (M + P - 1 unless one needs more).
    slots = packed_mask_slots(arrays["masked_lm_ids"].shape[1], max_per_pack,
                              max(int(labelled[members].sum()) for members in packs))
    packed = {k: torch.from_numpy(v) for k, v in layout_packs(arrays, table, s, slots).items()}
    unpacked = [{k: v[i:i + batch_size] for k, v in records.items()}
                for i in range(0, count, batch_size)]
    packed = [{k: v[i:i + batch_size] for k, v in packed.items()}
              for i in range(0, len(table), batch_size)]
    return unpacked, packed, count / len(table)


def bench_train(args) -> None:
    from bertforge.model.bert import build_pretraining_model
    torch.set_num_threads(args.threads or torch.get_num_threads())
    config = transformers.BertConfig(
        vocab_size=30522, hidden_size=args.hidden_size, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, intermediate_size=4 * args.hidden_size,
        max_position_embeddings=512, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = build_pretraining_model(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    unpacked, packed, factor = _same_sequences(args.unpacked, args.sequences, args.batch_size,
                                               args.max_sequences_per_pack)
    variants = {"unpacked": unpacked, "packed": packed}
    times: dict[str, list[float]] = {k: [] for k in variants}
    counts: dict[str, tuple[int, int]] = {}
    for round_ in range(args.rounds + 1):  # round 0 is warm-up
        for name, batches in variants.items():
            seqs = toks = 0
            start = time.perf_counter()
            for batch in batches:
                out = model(batch)
                out.loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                seqs += int(out.num_sequences)
                toks += int(out.num_tokens)
            if round_:
                times[name].append(time.perf_counter() - start)
            counts[name] = (seqs, toks)
    assert counts["packed"] == counts["unpacked"], counts  # the same sequences and tokens
    seqs, toks = counts["unpacked"]
    result = {}
    for name, values in times.items():
        took = statistics.median(values)
        result[name] = toks / took
        print(f"{name}: {len(variants[name])} steps; throughput: {seqs / took:.1f} samples/sec"
              f" - real tokens/s: {toks / took:.0f}")
    speedup = result["packed"] / result["unpacked"]
    print(f"packed/unpacked real tokens/s: {speedup:.3f}x; theoretical (packing factor of these "
          f"{seqs} sequences) {factor:.3f}x; ratio to theoretical {speedup / factor:.3f} (floor 0.9)")
    print(json.dumps({"speedup": speedup, "packing_factor": factor}))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="part", required=True)
    p = sub.add_parser("solve")
    p.add_argument("--sequences", type=int, default=16_000_000)
    p.add_argument("--sequence-lengths", type=int, nargs="+", default=[128, 384, 512])
    p.set_defaults(func=bench_solve)
    p = sub.add_parser("pack")
    p.add_argument("input")
    p.add_argument("--sequence-length", type=int, required=True)
    p.add_argument("--algorithm", default="nnlshp")
    p.add_argument("--output", default=None)
    p.add_argument("--workers", type=int, default=None)
    p.set_defaults(func=bench_pack)
    p = sub.add_parser("train")
    p.add_argument("--unpacked", required=True, help="unpacked shards (glob)")
    p.add_argument("--sequences", type=int, default=48, help="sampled sequences run both ways")
    p.add_argument("--max-sequences-per-pack", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--threads", type=int, default=None)
    p.set_defaults(func=bench_train)
    args = parser.parse_args(argv)
    args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
