"""Data that describes itself (data/stage.py): every stage's manifest records its settings,
its inputs' fingerprints and its outputs, so no re-run mixes two runs' data: killed runs
re-run with other settings, inputs regenerated in place, a changed shard count, leftover
spills and temporaries; and `stage.describe` reads the shards' manifests back for a consumer.

Tiny inputs (a few hundred records; tokenize on 2 KB of generated text): ~6 s on 2 cores."""

from __future__ import annotations

import hashlib
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from bertforge.data import stage
from bertforge.data.instances import InstanceConfig, tokenize
from bertforge.data.pack import SPILL_DIR, pack_files
from bertforge.data.shards import ShardSpill
from bertforge.data.shuffle import shuffle_files
from bertforge.data.tfrecord import iter_records
from test_packing import _sequences_of_packed, _write_unpacked


def _records(folder: Path, prefix: str) -> list[bytes]:
    return [r for f in sorted(folder.glob(f"{prefix}-*.tfrecord")) for r in iter_records(f)]


def _inputs(folder: Path, seeds=(0, 1), n=150) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"part-{i}.tfrecord" for i in range(len(seeds))]
    for path, seed in zip(paths, seeds):
        _write_unpacked(path, n, seed=seed, s=32, m=4)
    return paths


def _pack(inputs, out, **kw):
    kw.setdefault("packs_per_shard", 40)
    return pack_files(inputs, out, sequence_length=32, workers=1, **kw)


# ---------------------------------------------------------------- shuffle: kill after spill
def test_shuffle_rerun_after_a_kill_after_the_spill_writes_every_record_once(tmp_path):
    inputs = _inputs(tmp_path / "in")
    before = [r for f in inputs for r in iter_records(f)]
    out = tmp_path / "out"
    # What a run killed after its spill leaves: every record in .shuffle-spill, no shards.
    spill = ShardSpill(out / ".shuffle-spill", 2)
    for i, record in enumerate(before):
        spill.add(i % 2, np.array([len(record)]), record)
    spill.flush()
    summary = shuffle_files(inputs, out, seed=3, num_shards=2, workers=1, memory_limit=4096)
    assert summary.counts["records in"] == summary.counts["records out"] == len(before)
    assert Counter(_records(out, "shuffled")) == Counter(before)
    assert not (out / ".shuffle-spill").exists()


# ---------------------------------------------------------------- inputs regenerated in place
def test_pack_and_shuffle_redo_when_inputs_are_regenerated_in_place(tmp_path):
    inputs = _inputs(tmp_path / "in")
    _pack(inputs, tmp_path / "packed")
    shuffle_files(inputs, tmp_path / "shuffled", num_shards=2, workers=1)
    inputs = _inputs(tmp_path / "in", seeds=(5, 6))  # same paths, other records
    packed = _pack(inputs, tmp_path / "packed")
    shuffled = shuffle_files(inputs, tmp_path / "shuffled", num_shards=2, workers=1)
    assert "already complete" not in packed.stage + shuffled.stage
    now = [r for f in inputs for r in iter_records(f)]
    assert Counter(_records(tmp_path / "shuffled", "shuffled")) == Counter(now)
    from test_packing import _sequences_of_unpacked
    assert _sequences_of_packed(sorted((tmp_path / "packed").glob("packed-*.tfrecord"))) \
        == _sequences_of_unpacked(inputs)


def test_an_upstream_manifest_change_is_noticed(tmp_path):
    """Inputs listed by a manifest are fingerprinted with it: a re-run upstream that left a
    shard's size and mtime as they were is still noticed (here: only the manifest changes)."""
    inputs = _inputs(tmp_path / "in")
    upstream = stage.begin(tmp_path / "in", "tokenize", {"seed": 1}, [], outputs="^$")
    upstream.finish(inputs, stage.Summary("tokenize"))
    _pack(inputs, tmp_path / "packed")
    assert "already complete" in _pack(inputs, tmp_path / "packed").stage
    upstream = stage.begin(tmp_path / "in", "tokenize", {"seed": 2}, [], outputs="^$")
    upstream.finish(inputs, stage.Summary("tokenize"))
    assert "already complete" not in _pack(inputs, tmp_path / "packed").stage


# ---------------------------------------------------------------- killed runs, other settings
def test_a_run_killed_with_other_settings_is_never_complete(tmp_path, monkeypatch):
    inputs = _inputs(tmp_path / "in")
    out = tmp_path / "packed"
    _pack(inputs, out)
    clean = {f.name: f.read_bytes() for f in out.glob("packed-*")}
    # Another seed, killed half-way: some shards written, no manifest. On main the first
    # run's manifest survived and the original command said "already complete".
    _pack(inputs, tmp_path / "other", seed=9)
    for name in sorted(clean)[:2]:
        shutil.copy(tmp_path / "other" / name, out / name)
    redone = _pack(inputs, out)
    assert "already complete" not in redone.stage
    assert {f.name: f.read_bytes() for f in out.glob("packed-*")} == clean

    # The manifest goes before anything is written: a run that dies leaves none.
    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(stage.StageRun, "finish", killed)
    with pytest.raises(KeyboardInterrupt):
        _pack(inputs, out, seed=9)
    assert not (out / ".bertforge-pack.json").exists()
    assert not list(out.glob("packed-*"))  # nothing for a glob to read


def test_tokenize_killed_with_other_settings_is_redone(tmp_path, text_file):
    from bertforge.data.vocab import load_tokenizer
    tokenizer = load_tokenizer()
    out = tmp_path / "tok"
    config = InstanceConfig(32, 4, duplication_factor=2, seed=7)
    tokenize([text_file], out, config, tokenizer, num_shards=2, workers=1)
    clean = {f.name: f.read_bytes() for f in out.glob("part-*")}
    other = InstanceConfig(32, 4, duplication_factor=2, seed=8)
    tokenize([text_file], tmp_path / "other", other, tokenizer, num_shards=2, workers=1)
    shutil.copy(tmp_path / "other" / "part-00000-of-00002.tfrecord", out)  # killed half-way
    redone = tokenize([text_file], out, config, tokenizer, num_shards=2, workers=1)
    assert "already complete" not in redone.stage
    assert {f.name: f.read_bytes() for f in out.glob("part-*")} == clean


# ---------------------------------------------------------------- shard count changes
def test_a_new_shard_count_leaves_no_shard_of_the_earlier_run(tmp_path):
    inputs = _inputs(tmp_path / "in")
    out = tmp_path / "out"
    _pack(inputs, out, packs_per_shard=40)
    _pack(inputs, out, packs_per_shard=1000)
    assert sorted(f.name for f in out.glob("packed-*.tfrecord")) == ["packed-00000-of-00001.tfrecord"]
    assert sum(1 for _ in iter_records(out / "packed-00000-of-00001.tfrecord")) \
        == len(_records(out, "packed"))
    shuffled = tmp_path / "shuffled"
    shuffle_files(inputs, shuffled, num_shards=3, workers=1)
    shuffle_files(inputs, shuffled, num_shards=2, workers=1)
    assert len(_records(shuffled, "shuffled")) == 300  # the README's glob reads one run only
    assert not [f for f in shuffled.iterdir() if "-of-00003" in f.name]


def test_one_folder_one_stage_and_one_run_at_a_time(tmp_path):
    """Another stage's shards in the folder, or a run still writing there: refused, nothing
    deleted (a glob would read both stages; two runs would delete each other's files)."""
    import subprocess
    import sys
    inputs = _inputs(tmp_path / "in")
    out = tmp_path / "out"
    _pack(inputs, out, packs_per_shard=1000)
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(ValueError, match=r"holds `bertforge pack` output .*give `bertforge "
                                         r"shuffle` its own output folder"):
        shuffle_files(inputs, out, num_shards=2, workers=1)
    assert sorted(p.name for p in out.iterdir()) == before
    holder = subprocess.Popen(  # a run in progress: holds the folder's lock
        [sys.executable, "-c", "import sys, time; from bertforge.data import stage; "
         "p = __import__('pathlib').Path(sys.argv[1]); stage._lock(p); stage._claim(p, 'shuffle'); "
         "print('held', "
         "flush=True); time.sleep(60)", str(tmp_path / "busy")], stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == b"held\n"
        with pytest.raises(ValueError, match=r"busy is being written by `bertforge shuffle` "
                                             r"\(pid \d+\); wait for it to end"):
            shuffle_files(inputs, tmp_path / "busy", num_shards=2, workers=1)
    finally:
        holder.kill()
        holder.wait()
    shuffle_files(inputs, tmp_path / "busy", num_shards=2, workers=1)  # its lock died with it


# ---------------------------------------------------------------- leftovers of killed runs
def test_spills_and_temporaries_of_killed_runs_are_removed(tmp_path):
    inputs = _inputs(tmp_path / "in")
    out, shuffled = tmp_path / "out", tmp_path / "shuffled"
    leftovers = [out / ".packed-00000-of-00007.tfrecord.tmp-99999",
                 out / ".packed-00000-of-00007.index.tmp-99999",
                 shuffled / ".shuffled-00001-of-00002.tfrecord.tmp-4242",
                 out / SPILL_DIR / "00000.records", shuffled / ".shuffle-spill" / "shard-00000.spill"]
    for path in leftovers:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"junk")
    keep = out / ".notes.txt.tmp-1"  # not ours: kept
    keep.write_text("mine")
    _pack(inputs, out)
    shuffle_files(inputs, shuffled, num_shards=2, workers=1)
    assert [p for p in leftovers if p.exists()] == []
    assert not (out / SPILL_DIR).exists() and not (shuffled / ".shuffle-spill").exists()
    assert keep.exists()


# ---------------------------------------------------------------- the reader
@pytest.fixture
def text_file(tmp_path):
    rng = np.random.default_rng(0)
    words = "the a cat dog runs sleeps under over table garden house river".split()
    docs = []
    for _ in range(30):
        sentences = [" ".join(rng.choice(words, rng.integers(4, 12))).capitalize() + "."
                     for _ in range(rng.integers(3, 8))]
        docs.append("\n".join(sentences))
    path = tmp_path / "text" / "doc.txt"
    path.parent.mkdir()
    path.write_text("\n\n".join(docs) + "\n")
    return path


def test_describe_tokenize_pack_and_shuffle_output(tmp_path, text_file):
    from bertforge.data.vocab import load_tokenizer
    tok = tmp_path / "tok"
    summary = tokenize([text_file], tok, InstanceConfig(32, 4, duplication_factor=3),
                       load_tokenizer(), num_shards=2, workers=1)
    info, reason = stage.describe(tok)
    assert reason == "" and info["stage"] == "tokenize" and not info["packed"]
    assert (info["sequence_length"], info["mask_tokens"], info["mask_slots"]) == (32, 4, 4)
    assert info["files"] == 2
    assert info["records"] == info["sequences"] == summary.counts["instances out"] \
        == len(_records(tok, "part"))
    vocab = Path(info["tokenizer"]["vocab_file"])
    assert vocab.parent == tok.resolve()
    assert info["tokenizer"]["vocab_sha256"] == hashlib.sha256(vocab.read_bytes()).hexdigest()
    assert info["tokenizer"]["vocab_size"] == len(vocab.read_text().splitlines()) == 30522
    assert info["tokenizer"]["lower_case"] is True

    packed = pack_files(tok, tmp_path / "packed", sequence_length=32, workers=1)
    info_p, _ = stage.describe(str(tmp_path / "packed" / "packed-*.tfrecord"))
    assert info_p["packed"] and info_p["stage"] == "pack"
    assert info_p["tokenizer"] == info["tokenizer"]  # carried over from the input's manifest
    assert info_p["sequences"] == packed.counts["sequences out"] == info["records"]
    assert info_p["records"] == packed.counts["packs"]
    assert info_p["packing_factor"] == pytest.approx(info_p["sequences"] / info_p["records"])
    assert info_p["mask_tokens"] == 4
    assert info_p["mask_slots"] >= 4 + info_p["max_sequences_per_pack"] - 1

    shuffle_files(tmp_path / "packed", tmp_path / "shuffled", num_shards=2, workers=1)
    info_s, _ = stage.describe(tmp_path / "shuffled")
    assert info_s["stage"] == "shuffle" and info_s["packed"]
    assert info_s["tokenizer"] == info["tokenizer"] and info_s["records"] == info_p["records"]

    with pytest.raises(ValueError, match="packed"):  # a mix-up: refuse to merge silently
        stage.describe([tok, tmp_path / "packed"])


def test_describe_without_a_manifest_says_why(tmp_path):
    inputs = _inputs(tmp_path / "in")
    info, reason = stage.describe(inputs)
    assert info is None and "part-0.tfrecord has no manifest" in reason
    _pack(inputs, tmp_path / "packed")
    shard = sorted((tmp_path / "packed").glob("packed-*.tfrecord"))[0]
    with open(shard, "ab") as f:
        f.write(b"x")
    info, reason = stage.describe(tmp_path / "packed")
    assert info is None and "changed after" in reason
