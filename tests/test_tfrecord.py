"""TFRecord framing, CRC, .index files and the Example codec (src/bertforge/data/tfrecord.py).

The `tfrecord` PyPI package is the independent writer and reader (interop is the requirement);
protobuf (through that package's example_pb2) is the reference for the hand-written codec.
"""

from __future__ import annotations

import os
import re
import struct

import crc32c
import numpy as np
import pytest
from google.protobuf.message import DecodeError
from tfrecord import example_pb2
from tfrecord.reader import tfrecord_loader
from tfrecord.tools.tfrecord2idx import create_index
from tfrecord.writer import TFRecordWriter

from bertforge.cli import main
from bertforge.data.example import (decode_example, decode_example_reference, decode_examples,
                                    encode_example, encode_example_reference)
from bertforge.data.tfrecord import (CorruptRecordError, RecordWriter, index_files,
                                     index_is_current, index_path, iter_records, masked_crc32c,
                                     read_index, write_index)

EDGE_INTS = [0, 1, 127, 128, 255, 16383, 16384, 2**16 - 1, 2**16, 2**31, 2**62, 2**63 - 1,
             -1, -128, -(2**31), -(2**63)]


def _parse(data: bytes) -> example_pb2.Example:
    example = example_pb2.Example()
    example.ParseFromString(data)
    return example


def _assert_same(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        if isinstance(b[name], list):
            assert a[name] == b[name], name
        else:
            assert a[name].dtype == b[name].dtype, name
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def _random_features(rng: np.random.Generator) -> tuple[dict, dict]:
    ints, floats = {}, {}
    for j in range(rng.integers(0, 5)):
        kind = rng.integers(0, 4)
        size = int(rng.integers(0, 40))
        if kind == 0:
            values = rng.choice(EDGE_INTS, size)
        elif kind == 1:
            values = rng.integers(0, 30522, size)
        elif kind == 2:
            values = rng.integers(-(2**63), 2**63 - 1, size, dtype=np.int64)
        else:
            values = rng.integers(0, 128, size)
        ints[f"int_{j}"] = values
    for j in range(rng.integers(0, 3)):
        floats[f"float_{j}"] = rng.standard_normal(int(rng.integers(0, 20))).astype(np.float32)
    return ints, floats


def bert_record(i: int) -> tuple[dict, dict]:
    rng = np.random.default_rng(i)
    ints = {"input_ids": rng.integers(0, 30522, 128), "input_mask": np.ones(128, np.int64),
            "segment_ids": np.repeat([0, 1], 64), "masked_lm_positions": np.arange(20) * 6,
            "masked_lm_ids": rng.integers(0, 30522, 20), "next_sentence_labels": np.array([i % 2])}
    return ints, {"masked_lm_weights": np.ones(20, np.float32)}


def write_shard(path, n: int, start: int = 0) -> list[bytes]:
    records = [encode_example({"id": [start + i], "body": np.arange(i % 7) * 1000})
               for i in range(n)]
    with RecordWriter(path) as writer:
        for record in records:
            writer.write(record)
    return records


# ---------------------------------------------------------------- CRC
def test_masked_crc32c_golden_value():
    crc = crc32c.crc32c(b"123456789")
    assert crc == 0xE3069283  # the CRC-32C check value
    assert masked_crc32c(b"123456789") == (((crc >> 15) | (crc << 17)) + 0xA282EAD8) % 2**32
    # and the same bytes the tfrecord package writes
    for data in (b"", b"123456789", bytes(range(256)) * 3):
        assert struct.pack("<I", masked_crc32c(data)) == TFRecordWriter.masked_crc(data)


# ---------------------------------------------------------------- Example codec
def test_fast_and_reference_codecs_agree_on_random_features():
    rng = np.random.default_rng(0)
    for _ in range(300):
        ints, floats = _random_features(rng)
        fast, reference = encode_example(ints, floats), encode_example_reference(ints, floats)
        assert _parse(fast) == _parse(reference)
        _assert_same(decode_example(fast), decode_example_reference(fast))
        _assert_same(decode_example(reference), decode_example_reference(reference))
        # protobuf's deterministic output orders the map by key; so does ours if given so
        if len(ints) == 1 and not floats:
            assert fast == reference
    edge = {"edge": np.array(EDGE_INTS)}
    assert encode_example(edge) == encode_example_reference(edge)
    assert decode_example(encode_example(edge))["edge"].tolist() == EDGE_INTS


def test_batched_decoder_matches_single_records():
    records = [bert_record(i) for i in range(9)]
    encoded = [encode_example(*r) for r in records]
    decoded = decode_examples(encoded)
    assert decoded["input_ids"].shape == (9, 128)
    assert decoded["masked_lm_weights"].dtype == np.float32
    for i, (ints, floats) in enumerate(records):
        _assert_same({k: v[i] for k, v in decoded.items()}, {**ints, **floats})
    # records in another encoding take the general path and give the same arrays
    mixed = [encode_example_reference(*records[i]) if i % 2 else encoded[i] for i in range(9)]
    _assert_same(decode_examples(mixed), decoded)
    with pytest.raises(ValueError, match="record 1 of the batch.*'input_ids' has 3 values"):
        decode_examples([encoded[0], encode_example({"input_ids": [1, 2, 3]})])


def test_decoder_accepts_any_valid_encoding():
    """Unpacked repeated values, bytes lists, unknown fields and repeated keys (what other
    writers may produce) decode as protobuf decodes them."""
    def varint(v):
        out = bytearray()
        v &= 2**64 - 1
        while v >= 0x80:
            out.append(v & 0x7F | 0x80)
            v >>= 7
        return bytes(out + bytes([v]))

    def field(number, payload):
        return varint(number << 3 | 2) + varint(len(payload)) + payload

    def entry(name, feature):
        return field(1, field(1, name.encode()) + field(2, feature))

    unpacked = b"".join(varint(1 << 3) + varint(v) for v in (5, 300, -7))
    floats = b"".join(b"\x0d" + struct.pack("<f", v) for v in (1.5, -2.0))
    features = (entry("ids", field(3, unpacked))
                + entry("w", field(2, floats))
                + entry("text", field(1, field(1, b"hello") + field(1, b"")))
                + b"\x10\x07"                                      # unknown varint field
                + entry("mixed", field(3, field(1, varint(1) + varint(2)) + varint(8) + varint(9)))
                + entry("dup", field(3, field(1, varint(1))))
                + entry("dup", field(3, field(1, varint(2))))     # map: the last entry wins
                + entry("none", b""))
    data = field(1, features) + b"\x18\x01"                        # unknown field of Example
    reference = decode_example_reference(data)
    _assert_same(decode_example(data), reference)
    assert decode_example(data)["ids"].tolist() == [5, 300, -7]
    assert decode_example(data)["text"] == [b"hello", b""]
    assert decode_example(data)["dup"].tolist() == [2]


def test_decoder_rejects_what_protobuf_rejects():
    """Every truncation and many byte flips of a valid record: where protobuf fails we raise
    ValueError, where it parses we return the same values."""
    data = encode_example(*bert_record(1))
    rng = np.random.default_rng(1)
    variants = [data[:n] for n in range(0, len(data), 7)]
    for _ in range(400):
        flipped = bytearray(data)
        flipped[rng.integers(len(data))] ^= 1 << int(rng.integers(8))
        variants.append(bytes(flipped))
    rejected = 0
    for variant in variants:
        try:
            _parse(variant)
        except DecodeError:
            rejected += 1
            with pytest.raises(ValueError):
                decode_example(variant)
            continue
        _assert_same(decode_example(variant), decode_example_reference(variant))
    assert rejected > 50  # the test exercised the error paths


# ---------------------------------------------------------------- shards and indexes
def test_record_writer_round_trip_and_index(tmp_path):
    path = tmp_path / "shard.tfrecord"
    records = write_shard(path, 25)
    assert list(iter_records(path)) == records
    index = read_index(path)
    assert index.shape == (25, 2) and index.dtype == np.int64
    assert index[:, 1].tolist() == [16 + len(r) for r in records]
    assert int(index[-1].sum()) == path.stat().st_size
    subset = index[[3, 0, 24]]
    assert list(iter_records(path, subset)) == [records[3], records[0], records[24]]
    assert index_is_current(path)
    assert not list(tmp_path.glob(".*"))  # no temporaries left


def test_record_writer_leaves_nothing_on_error(tmp_path):
    path = tmp_path / "shard.tfrecord"
    with pytest.raises(RuntimeError):
        with RecordWriter(path) as writer:
            writer.write(b"abc")
            assert not path.exists()  # not complete-looking while being written
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_interop_tfrecord_package_as_writer(tmp_path):
    path = tmp_path / "theirs.tfrecord"
    writer = TFRecordWriter(str(path))
    for i in range(12):
        writer.write({"input_ids": (list(range(i, i + 5)), "int"),
                      "weights": ([0.5, float(i)], "float"), "label": (i % 2, "int")})
    writer.close()
    create_index(str(path), str(tmp_path / "theirs.tfindex"))
    assert write_index(path) == 12
    ours, theirs = tmp_path / "theirs.index", tmp_path / "theirs.tfindex"
    assert ours.read_text() == theirs.read_text()
    decoded = [decode_example(r) for r in iter_records(path, read_index(path))]
    assert [d["input_ids"].tolist() for d in decoded] == [list(range(i, i + 5)) for i in range(12)]
    assert [d["label"].tolist() for d in decoded] == [[i % 2] for i in range(12)]
    assert decoded[3]["weights"].tolist() == [0.5, 3.0]


def test_interop_tfrecord_package_as_reader(tmp_path):
    path = tmp_path / "ours.tfrecord"
    records = [bert_record(i) for i in range(10)]
    with RecordWriter(path) as writer:
        for ints, floats in records:
            writer.write(encode_example(ints, floats))
    index = str(tmp_path / "ours.index")  # the reference's name: .tfrecord -> .index
    read = [r for shard in range(3)
            for r in tfrecord_loader(str(path), index, shard=(shard, 3))]  # uses our index
    assert len(read) == 10
    for got, (ints, floats) in zip(read, records):
        _assert_same(got, {**ints, **floats})


# ---------------------------------------------------------------- corruption
def test_corrupt_data_byte_names_file_and_offset(tmp_path):
    path = tmp_path / "shard.tfrecord"
    write_shard(path, 10)
    index = read_index(path)
    raw = bytearray(path.read_bytes())
    raw[int(index[4, 0]) + 14] ^= 0xFF  # inside record 4's data
    path.write_bytes(bytes(raw))
    for reader in (lambda: list(iter_records(path)), lambda: list(iter_records(path, index))):
        with pytest.raises(CorruptRecordError, match="data CRC") as err:
            reader()
        assert str(path) in str(err.value) and f"byte offset {index[4, 0]}" in str(err.value)
        assert "bertforge index" in str(err.value)
    with pytest.raises(CorruptRecordError):
        write_index(path)
    assert list(iter_records(path, check_crc=False))  # framing itself is intact


def test_corrupt_length_and_truncation(tmp_path):
    path = tmp_path / "shard.tfrecord"
    write_shard(path, 6)
    index = read_index(path)
    raw = path.read_bytes()
    bad_length = bytearray(raw)
    bad_length[int(index[2, 0])] ^= 0x01
    path.write_bytes(bytes(bad_length))
    with pytest.raises(CorruptRecordError, match=f"offset {index[2, 0]}: length CRC mismatch"):
        list(iter_records(path))
    path.write_bytes(raw[:-5])  # a run killed mid-record
    with pytest.raises(CorruptRecordError, match=f"offset {index[5, 0]}: truncated"):
        list(iter_records(path))
    with pytest.raises(ValueError, match="stale"):
        read_index(path)  # the index no longer matches the file
    path.write_bytes(raw[:int(index[5, 0]) + 7])  # cut inside the header
    with pytest.raises(CorruptRecordError, match="truncated record header"):
        write_index(path)


def test_index_errors_are_clear(tmp_path):
    path = tmp_path / "shard.tfrecord"
    write_shard(path, 4)
    index = tmp_path / "shard.index"
    lines = index.read_text().splitlines()
    index.write_text("\n".join(lines[:2] + ["12 x"] + lines[3:]) + "\n")
    with pytest.raises(ValueError, match="line 3"):
        read_index(path)
    index.write_text("\n".join(lines[:1] + lines[2:]) + "\n")  # a record missing
    with pytest.raises(ValueError, match="line 2.*bertforge index"):
        read_index(path)
    index.unlink()
    with pytest.raises(FileNotFoundError, match="bertforge index"):
        read_index(path)


# ---------------------------------------------------------------- `bertforge index`
def test_index_command_end_to_end(tmp_path, capsys):
    paths = [tmp_path / f"part-{i}.tfrecord" for i in range(3)]
    expected = {}
    for i, path in enumerate(paths):
        write_shard(path, 5 + i, start=100 * i)
        expected[path] = (tmp_path / f"{path.stem}.index").read_text()
        (tmp_path / f"{path.stem}.index").unlink()
    assert main(["index", *map(str, paths), "--workers", "2"]) == 0
    assert "index: 3 files, 18 records; skipped: none" in capsys.readouterr().out
    for path in paths:
        assert (tmp_path / f"{path.stem}.index").read_text() == expected[path]
    # re-run on a glob that also matches the indexes: complete, up-to-date ones are skipped
    assert main(["index", *map(str, sorted(tmp_path.glob("part-*")))]) == 0
    assert "0 files, 0 records; skipped: 3 already-indexed, 3 index-file-given" in (
        capsys.readouterr().out)
    # an index older than its file is redone
    os.utime(paths[0], ns=(2**62, 2**62))
    assert index_files(paths, workers=1).line() == (
        "index: 1 files, 5 records; skipped: 2 already-indexed")
    # a corrupt shard: exit code 2 and a message naming the file and offset, no traceback
    paths[1].write_bytes(paths[1].read_bytes()[:-3])
    assert main(["index", str(paths[1])]) == 2
    err = capsys.readouterr().err
    assert str(paths[1]) in err and "byte offset" in err and "Traceback" not in err
    assert main(["index", str(tmp_path / "missing.tfrecord")]) == 2


# ---------------------------------------------------------------- index names
def test_reference_named_index_is_read_and_is_the_name_written(tmp_path):
    # A shard as the reference makes it: the tfrecord package writes it, and its index goes
    # where the reference's loader looks, filename.replace(".tfrecord", ".index").
    theirs = tmp_path / "wiki_000.tfrecord"
    writer = TFRecordWriter(str(theirs))
    for i in range(7):
        writer.write({"id": ([i], "int"), "input_ids": (list(range(i, i + 5)), "int")})
    writer.close()
    create_index(str(theirs), str(theirs).replace(".tfrecord", ".index"))
    assert len(read_index(theirs)) == 7 and index_is_current(theirs)
    assert index_files([theirs], workers=1).line() == (
        "index: 0 files, 0 records; skipped: 1 already-indexed")
    # ours gets the same name, so the reference's loader takes it without re-indexing
    ours = tmp_path / "ours.tfrecord"
    write_shard(ours, 9)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "ours.index", "ours.tfrecord", "wiki_000.index", "wiki_000.tfrecord"]
    second_half = tfrecord_loader(str(ours), str(ours).replace(".tfrecord", ".index"), shard=(1, 2))
    assert [int(r["id"][0]) for r in second_half] == [4, 5, 6, 7, 8]
    # a shard not named *.tfrecord: NAME.index, as before
    write_shard(tmp_path / "part-7", 2)
    assert (tmp_path / "part-7.index").exists() and len(read_index(tmp_path / "part-7")) == 2


def test_old_index_name_is_read_and_a_disagreeing_pair_is_an_error(tmp_path, capsys):
    path = tmp_path / "shard.tfrecord"
    write_shard(path, 5)
    new, old = tmp_path / "shard.index", tmp_path / "shard.tfrecord.index"
    new.rename(old)  # as bertforge wrote it before: existing user data
    assert len(read_index(path)) == 5 and index_is_current(path)
    new.write_bytes(old.read_bytes())  # both, equal: fine
    assert len(read_index(path)) == 5
    old.write_text("".join(old.read_text().splitlines(True)[:3]))  # both, different
    with pytest.raises(ValueError, match=f"{re.escape(str(path))} has two different indexes, "
                                         f"{re.escape(str(new))} and {re.escape(str(old))}.*"
                                         "bertforge index"):
        read_index(path)
    assert not index_is_current(path)
    assert main(["index", str(path)]) == 0  # the fix the message gives
    assert "1 files, 5 records" in capsys.readouterr().out
    assert new.exists() and not old.exists() and len(read_index(path)) == 5
    # rewriting a shard drops an index under the old name: it described the file replaced
    new.rename(old)
    write_shard(path, 3)
    assert not old.exists() and len(read_index(path)) == 3


def test_empty_or_short_index_beside_a_full_shard_is_an_error(tmp_path):
    path = tmp_path / "shard.tfrecord"
    write_shard(path, 6)
    index = index_path(path)
    lines = index.read_text().splitlines(True)
    size = path.stat().st_size
    for kept, what in ((0, "empty"), (5, "short")):
        index.write_text("".join(lines[:kept]))
        with pytest.raises(ValueError, match=f"{re.escape(str(index))}: index is {what}: its "
                                             f"{kept} records end at byte .* but "
                                             f"{re.escape(str(path))} has {size} bytes; re-run "
                                             f"`bertforge index {re.escape(str(path))}`"):
            read_index(path)
    empty = tmp_path / "empty.tfrecord"  # an empty shard with an empty index is fine
    write_shard(empty, 0)
    assert read_index(empty).shape == (0, 2)
