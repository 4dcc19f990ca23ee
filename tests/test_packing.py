"""Packing algorithms, `bertforge pack` and `bertforge shuffle`.

Counts in = counts out everywhere; NNLSHP >= 99% efficient on a Wikipedia-shaped histogram
at 512 with P = 3; SPFHP valid for P up to 8; packed shards hold exactly the input
sequences (tokens, labels, NSP) with restarted positions, are the same bytes for any number
of workers, mix strategies in every shard and leave no spill behind; the shuffle keeps every
record. The real-data pack tests tokenize the Wikipedia sample at S=128 into 3 shards (~3 s).
"""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from bertforge.cli import main
from bertforge.data.example import decode_example
from bertforge.data.loader import check_inputs, measure_packing_factor
from bertforge.data.pack import SPILL_DIR, pack_files
from bertforge.data.packing import (full_strategies, pack_histogram, pack_lengths, split_plan,
                                    strategy_lengths)
from bertforge.data.shards import encode_example_batch
from bertforge.data.shuffle import shuffle_files
from bertforge.data.tfrecord import RecordWriter, index_path, iter_records, read_index
from lengths import wikipedia_like_histogram  # benchmarks/lengths.py (conftest puts it on the path)


# None: half the sequences at or near 512 ("half-full" in docs/packing.md); 2.0: the
# full-length share lowered to the packing factor the reference assumed for real Wikipedia
# at 512 (harder).
@pytest.mark.parametrize("factor", [None, 2.0])
def test_nnlshp_is_99_percent_efficient_on_wikipedia_shape_at_512(factor):
    histogram = wikipedia_like_histogram(512, n=2_000_000, packing_factor=factor)
    plan = pack_histogram(histogram, 512, 3, "nnlshp")
    if factor is not None:
        assert plan.packing_factor == pytest.approx(factor, rel=0.05), plan.summary()
    assert (plan.histogram() == histogram).all()  # nothing lost or duplicated
    assert all(len(s) <= 3 and sum(s) <= 512 for s in plan.strategies)
    assert plan.efficiency >= 0.99, plan.summary()
    assert plan.packing_factor == pytest.approx(plan.num_sequences / plan.num_packs)
    # NNLSHP beats (or ties) the greedy packer on the same data
    assert plan.num_packs <= pack_histogram(histogram, 512, 3, "spfhp").num_packs


def test_strategies_are_exactly_full_and_non_decreasing():
    strategies = full_strategies(32, 3)
    assert len(set(strategies)) == len(strategies)
    assert all(sum(s) == 32 and list(s) == sorted(s) and len(s) <= 3 for s in strategies)
    # all partitions of 32 into at most 3 parts: 1 + 16 + 85
    assert len(strategies) == 1 + 16 + sum(1 for a in range(1, 33) for b in range(a, 33)
                                           if 32 - a - b >= b)


@pytest.mark.parametrize("max_per_pack", range(1, 9))
def test_spfhp_valid_for_p_up_to_8(max_per_pack):
    rng = np.random.default_rng(max_per_pack)
    lengths = np.concatenate([rng.integers(1, 129, 3000), rng.integers(1, 12, 500)])
    packs = pack_lengths(lengths, 128, max_per_pack, "spfhp", seed=1)
    flat = [i for pack in packs for i in pack]
    assert sorted(flat) == list(range(len(lengths)))  # every sequence exactly once
    assert all(1 <= len(p) <= max_per_pack and lengths[p].sum() <= 128 for p in packs)
    if max_per_pack == 1:
        assert len(packs) == len(lengths)
    else:  # fewer packs with more room per pack
        assert len(packs) <= len(pack_lengths(lengths, 128, max_per_pack - 1, "spfhp"))


def test_split_plan_deals_every_pack_once_at_random():
    plan = pack_histogram(wikipedia_like_histogram(128, n=50_000), 128, 3, "nnlshp")
    sizes = [plan.num_packs // 7 + (i < plan.num_packs % 7) for i in range(7)]
    parts = split_plan(plan, sizes, np.random.default_rng(0))
    assert (parts.sum(0) == plan.counts).all() and parts.sum(1).tolist() == sizes
    assert (parts @ strategy_lengths(plan)).sum(0).tolist() == plan.histogram().tolist()
    # a random mix: each part's share of every big strategy is near its size share
    big = plan.counts > 1000
    share = parts[:, big] / plan.counts[big]
    assert np.abs(share - 1 / 7).max() < 0.05
    assert not (split_plan(plan, sizes, np.random.default_rng(1)) == parts).all()
    with pytest.raises(ValueError, match="plan has"):
        split_plan(plan, [1], np.random.default_rng(0))


def test_user_errors_name_the_problem():
    with pytest.raises(ValueError, match="spfhp"):
        pack_lengths([5, 6], 16, 4, "nnlshp")
    with pytest.raises(ValueError, match="outside 1..16"):
        pack_lengths([5, 17], 16)
    with pytest.raises(ValueError, match="unknown packing algorithm"):
        pack_lengths([5], 16, 3, "firstfit")


def _write_unpacked(path, n, seed, s=64, m=6):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(6, s + 1, n)
    ids = np.zeros((n, s), np.int64)
    mask = np.zeros((n, s), np.int64)
    seg = np.zeros((n, s), np.int64)
    pos = np.zeros((n, m), np.int64)
    lab = np.zeros((n, m), np.int64)
    w = np.zeros((n, m), np.float32)
    for i, length in enumerate(lengths.tolist()):
        ids[i, :length] = rng.integers(5, 1000, length)
        ids[i, 0] = 2  # [CLS]
        mask[i, :length] = 1
        seg[i, length // 2:length] = 1
        count = min(m, max(1, length // 7))
        pos[i, :count] = np.sort(rng.choice(np.arange(1, length - 1), count, replace=False))
        lab[i, :count] = ids[i, pos[i, :count]]
        w[i, :count] = 1
    data, sizes = encode_example_batch(
        {"input_ids": ids, "input_mask": mask, "segment_ids": seg, "masked_lm_positions": pos,
         "masked_lm_ids": lab, "next_sentence_labels": rng.integers(0, 2, (n, 1))},
        {"masked_lm_weights": w})
    ends = np.cumsum(sizes).tolist()
    with RecordWriter(path) as writer:
        for a, b in zip([0, *ends[:-1]], ends):
            writer.write(data[a:b])


def _sequences_of_unpacked(files):
    out = Counter()
    for f in files:
        for rec in iter_records(f):
            r = decode_example(rec)
            length = int(r["input_mask"].sum())
            real = r["masked_lm_ids"] != 0
            out[(tuple(r["input_ids"][:length]), tuple(r["segment_ids"][:length]),
                 tuple(r["masked_lm_positions"][real]), tuple(r["masked_lm_ids"][real]),
                 int(r["next_sentence_labels"][0]))] += 1
    return out


def _sequences_of_packed(files):
    out = Counter()
    for f in files:
        for rec in iter_records(f):
            r = decode_example(rec)
            for k in range(1, len(r["next_sentence_mask"]) + 1):
                if not r["next_sentence_mask"][k - 1]:
                    continue
                span = np.nonzero(r["sequence_ids"] == k)[0]
                start = int(span[0])
                assert (np.diff(span) == 1).all() and r["cls_positions"][k - 1] == start
                assert (r["position_ids"][span] == np.arange(len(span))).all()
                mine = r["masked_lm_sequence"] == k
                out[(tuple(r["input_ids"][span]), tuple(r["segment_ids"][span]),
                     tuple(r["masked_lm_positions"][mine] - start), tuple(r["masked_lm_ids"][mine]),
                     int(r["next_sentence_labels"][k - 1]))] += 1
    return out


def test_pack_stage_keeps_every_sequence(tmp_path, capsys):
    inputs = [tmp_path / "in" / f"part-{i}.tfrecord" for i in range(3)]
    for i, path in enumerate(inputs):
        path.parent.mkdir(exist_ok=True)
        _write_unpacked(path, 300, seed=i)
    out = tmp_path / "packed"
    summary = pack_files([tmp_path / "in"], out, sequence_length=64, packs_per_shard=200, workers=2)
    assert summary.counts["sequences in"] == summary.counts["sequences out"] == 900
    files = sorted(out.glob("packed-*.tfrecord"))
    assert len(files) == summary.counts["shards"] == -(-summary.counts["packs"] // 200)
    assert sum(len(read_index(f)) for f in files) == summary.counts["packs"] < 900
    assert _sequences_of_packed(files) == _sequences_of_unpacked(inputs)
    plan = json.loads((out / ".bertforge-packing.json").read_text())
    assert plan["packing_factor"] == pytest.approx(900 / summary.counts["packs"])
    assert measure_packing_factor(files, sample=10_000) == pytest.approx(plan["packing_factor"])
    check_inputs(files, packed=True)
    with pytest.raises(ValueError, match="mixed packed"):
        check_inputs([*files, inputs[0]], packed=True)
    with pytest.raises(ValueError, match="add --packed-data"):
        check_inputs(files, packed=False)
    # re-run with the same parameters: skipped as complete
    again = pack_files([tmp_path / "in"], out, sequence_length=64, packs_per_shard=200, workers=2)
    assert "already complete" in again.stage
    # the CLI prints the efficiency line and the summary
    assert main(["pack", str(tmp_path / "in"), "--output-dir", str(tmp_path / "cli"),
                 "--sequence-length", "64", "--algorithm", "spfhp", "--workers", "1"]) == 0
    printed = capsys.readouterr().out
    assert "efficiency" in printed and "900 sequences in" in printed
    assert not (out / SPILL_DIR).exists() and not (tmp_path / "cli" / SPILL_DIR).exists()


def test_pack_takes_the_sequence_length_from_its_inputs(tmp_path):
    """No --sequence-length: the inputs' own (here shards without a manifest: their records);
    the packed shards' manifest then says what they hold."""
    from bertforge.data.stage import describe
    (tmp_path / "in").mkdir()
    _write_unpacked(tmp_path / "in" / "part-0.tfrecord", 40, seed=0)
    assert main(["pack", str(tmp_path / "in"), "--output-dir", str(tmp_path / "out"),
                 "--workers", "1"]) == 0
    described, _ = describe(tmp_path / "out")
    assert described["packed"] and described["sequence_length"] == 64


def test_pack_errors_name_the_file_and_leave_no_spill(tmp_path):
    (tmp_path / "in").mkdir()
    _write_unpacked(tmp_path / "in" / "part-0.tfrecord", 20, seed=0)
    with pytest.raises(ValueError, match=r"part-0.tfrecord: records have 64 tokens but "
                                         r"--sequence-length is 32"):
        pack_files([tmp_path / "in"], tmp_path / "out", sequence_length=32, workers=1)
    assert not (tmp_path / "out" / SPILL_DIR).exists()
    assert not list((tmp_path / "out").glob("packed-*"))


@pytest.fixture(scope="module")
def real_shards(preprocessed_sample, tmp_path_factory):
    """The Wikipedia sample tokenized at S=128 into 3 globally shuffled shards (~5k sequences)."""
    from bertforge.data.instances import InstanceConfig, tokenize
    from bertforge.data.vocab import load_tokenizer
    out = tmp_path_factory.mktemp("unpacked128")
    tokenize([preprocessed_sample], out, InstanceConfig(128, 20, duplication_factor=1),
             load_tokenizer(), num_shards=3, workers=2)
    return sorted(out.glob("part-*.tfrecord"))


def test_pack_real_sample_several_inputs_and_shards_workers_independent(real_shards, tmp_path):
    assert len(real_shards) == 3
    runs = {}
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        summary = pack_files(real_shards, out, sequence_length=128, packs_per_shard=1500,
                             workers=workers)
        assert not (out / SPILL_DIR).exists()
        files = sorted(out.glob("packed-*.tfrecord"))
        runs[workers] = {f.name: (f.read_bytes(), index_path(f).read_bytes()) for f in files}
    n = summary.counts["sequences in"]
    assert n == summary.counts["sequences out"] > 4000
    assert len(files) == summary.counts["shards"] == -(-summary.counts["packs"] // 1500) > 2
    assert runs[1] == runs[2]  # byte-identical shards and indexes for 1 and 2 workers
    # every input sequence exactly once (tokens, segments, labels and NSP)
    assert _sequences_of_packed(files) == _sequences_of_unpacked(real_shards)
    # every shard holds a random mix of strategies: single sequences and multi-sequence packs
    for f in files:
        per_pack = [int(decode_example(r)["next_sentence_mask"].sum()) for r in iter_records(f)]
        assert 1 in per_pack and max(per_pack) >= 2, f
    other = pack_files(real_shards, tmp_path / "seed", sequence_length=128, packs_per_shard=1500,
                       seed=7, workers=2)
    assert other.counts["sequences out"] == n
    assert (tmp_path / "seed" / files[0].name).read_bytes() != runs[2][files[0].name][0]


def test_shuffle_keeps_every_record_and_mixes_files(tmp_path):
    inputs = [tmp_path / f"in-{i}.tfrecord" for i in range(2)]
    for i, path in enumerate(inputs):
        _write_unpacked(path, 200, seed=10 + i, s=16, m=2)
    before = [rec for f in inputs for rec in iter_records(f)]
    summary = shuffle_files(inputs, tmp_path / "out", seed=3, num_shards=3, workers=1,
                            memory_limit=4096)  # tiny buffer: exercises the spill files
    files = sorted((tmp_path / "out").glob("shuffled-*.tfrecord"))
    after = [rec for f in files for rec in iter_records(f)]
    assert summary.counts["records out"] == 400 and len(files) == 3
    assert Counter(after) == Counter(before) and after != before
    first_input = set(iter_records(inputs[0]))
    assert all(any(r in first_input for r in iter_records(f)) for f in files)  # mixed
    assert not (tmp_path / "out" / ".shuffle-spill").exists()
    again = shuffle_files(inputs, tmp_path / "again", seed=3, num_shards=3, workers=1)
    assert again.counts["records out"] == 400
    assert [r for f in sorted((tmp_path / "again").glob("shuffled-*")) if not f.name.endswith(".index")
            for r in iter_records(f)] == after  # deterministic for a seed
