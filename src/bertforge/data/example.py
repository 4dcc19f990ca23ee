"""tf.train.Example codec: the pre-training records inside TFRecord shards (see tfrecord.py).

The Example codec is hand-written: varints of all int64 values go through one numpy pass
(a 65k-entry table for the common small non-negative ids), the message framing is a few bytes
joins, and parsing checks the layout protobuf writers produce before falling back to a general
wire-format walker (unpacked values, bytes lists, unknown fields). `decode_examples`, the
reader's call, decodes a whole batch in one pass straight into [N, k] arrays (the tokenizer's
batched encoder is data/shards.py's encode_example_batch). Records/s on 128-token BERT records
(910 bytes), one core of the shared 2-core dev machine, best of 7 runs over 256 records:

    encode_example ~40-46k                          protobuf reference ~35-37k
    decode_example ~23k, decode_examples ~45k       protobuf reference ~34k

protobuf >= 4 parses in C (upb), so per single record the hand decoder does not beat it; the
wins are the batched decode and not depending on generated protobuf code (protobuf 4 refused
example_pb2 modules made by protoc < 3.19). Per house style the protobuf path stays
(`encode_example_reference` / `decode_example_reference`, through the `tfrecord` package's
example_pb2) and tests check that both agree, also on hundreds of truncated and bit-flipped
records.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Iterator, Sequence

import numpy as np


# ---------------------------------------------------------------- Example codec (fast path)
# Wire format (tensorflow/core/example/{example,feature}.proto):
#   Example{1: Features}  Features{1: map<string, Feature>}  (map entry {1: key, 2: value})
#   Feature{1: BytesList, 2: FloatList, 3: Int64List}, each List{1: repeated value}.
_SHIFTS = np.arange(0, 70, 7, dtype=np.uint64)  # bit offset of each varint byte
_THRESHOLDS = np.uint64(1) << _SHIFTS[1:]        # a value >= 2^(7k) needs more than k bytes
_TABLE_SIZE = 1 << 16  # token ids of vocabs up to 65k, positions, labels: one table lookup
_INT64, _FLOAT = b"\x1a", b"\x12"  # Feature field tags of Int64List and FloatList
_ZERO = np.zeros(1, dtype=np.int64)
_header_cache: dict[tuple[str, bytes, int], bytes] = {}


def encode_varint(value: int) -> bytes:
    """Varint of a non-negative Python int (tags, lengths)."""
    if value < 0x80:
        return bytes((value,))
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _varint_groups(unsigned: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[n, width] varint bytes of `unsigned`, the mask of bytes used, and bytes per value."""
    column = unsigned[:, None]
    groups = ((column >> _SHIFTS[:width]) & np.uint64(0x7F)).astype(np.uint8)
    num_bytes = 1 + (column >= _THRESHOLDS[: width - 1]).sum(axis=1)
    position = np.arange(width)
    groups[position < (num_bytes - 1)[:, None]] |= 0x80  # continuation bits
    return groups, position < num_bytes[:, None], num_bytes


@functools.cache
def _varint_table() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return _varint_groups(np.arange(_TABLE_SIZE, dtype=np.uint64), 3)


def _encode_varints(values: np.ndarray) -> tuple[bytes, np.ndarray]:
    """Concatenated varints of int64 `values` and each one's byte count, in one numpy pass.

    Values in [0, 65536) are gathered from a table (6 us for a 356-value BERT record,
    against 14 us computing them); others go through the general path, where a negative
    int64 takes 10 bytes (two's complement), as protobuf writes it.
    """
    if not values.size:
        return b"", np.zeros(0, dtype=np.int64)
    unsigned = values.view(np.uint64)
    top = int(unsigned.max())
    if top < _TABLE_SIZE:
        groups, used, num_bytes = _varint_table()
        return (groups.take(values, axis=0)[used.take(values, axis=0)].tobytes(),
                num_bytes.take(values))
    groups, used, num_bytes = _varint_groups(unsigned, max(1, (top.bit_length() + 6) // 7))
    return groups[used].tobytes(), num_bytes


def _entry_header(name: str, tag: bytes, size: int) -> bytes:
    """Bytes of a Features map entry {key: Feature{tag: List{1: packed}}} up to a `size`-byte
    packed payload. Cached: a shard repeats few (name, size) pairs, and building it costs 7x
    the dict lookup."""
    header = _header_cache.get((name, tag, size))
    if header is None:
        key = name.encode()
        packed = b"\x0a" + encode_varint(size) if size else b""  # an empty list is an empty List
        feature = tag + encode_varint(len(packed) + size) + packed
        entry = b"\x0a" + encode_varint(len(key)) + key + b"\x12" + encode_varint(len(feature) + size) + feature
        header = b"\x0a" + encode_varint(len(entry) + size) + entry
        if len(_header_cache) < 1 << 16:
            _header_cache[(name, tag, size)] = header
    return header


def encode_example(int64_features: dict[str, np.ndarray],
                   float_features: dict[str, np.ndarray] | None = None) -> bytes:
    """Serialize one tf.train.Example: int64 features first, then float, in the order given.

    Values are packed, as protobuf serializers write them, so protobuf parses the bytes to the
    same message as encode_example_reference's (tests/test_tfrecord.py checks it). For many
    fixed-length records at once, data/shards.py's encode_example_batch is ~6x faster.
    """
    parts = []
    if int64_features:
        arrays = [np.asarray(v, dtype=np.int64).reshape(-1) for v in int64_features.values()]
        payload, num_bytes = _encode_varints(np.concatenate(arrays))
        value_ends = list(itertools.accumulate(a.size for a in arrays))
        bytes_before = np.concatenate((_ZERO, num_bytes.cumsum()))
        start = 0
        for name, end in zip(int64_features, bytes_before.take(value_ends).tolist()):
            parts.append(_entry_header(name, _INT64, end - start))
            parts.append(payload[start:end])
            start = end
    for name, values in (float_features or {}).items():
        payload = np.asarray(values, dtype="<f4").reshape(-1).tobytes()
        parts.append(_entry_header(name, _FLOAT, len(payload)))
        parts.append(payload)
    features = b"".join(parts)
    return b"\x0a" + encode_varint(len(features)) + features


def _read_varint(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    """(value, next position) of the varint at buf[pos], which must end before `end`."""
    if pos >= end:
        raise ValueError(f"malformed Example: truncated varint at byte {pos}")
    byte = buf[pos]
    if byte < 0x80:
        return byte, pos + 1
    result, shift = byte & 0x7F, 7
    pos += 1
    while True:
        if pos >= end:
            raise ValueError(f"malformed Example: truncated varint at byte {pos}")
        byte = buf[pos]
        result |= (byte & 0x7F) << shift
        pos += 1
        if byte < 0x80:
            return result & 0xFFFFFFFFFFFFFFFF, pos
        shift += 7
        if shift >= 70:
            raise ValueError(f"malformed Example: varint longer than 10 bytes at byte {pos}")


def _decode_varints(data: bytes, byte_ends: list[int]) -> tuple[np.ndarray, list[int]]:
    """Decode concatenated packed int64 lists with numpy (values wrap to int64, as protobuf's).

    Returns the values and, for each of `byte_ends` (where a list ends in `data`), how many
    values come before it. Works value-wise rather than byte-wise: the first byte of every
    value, then the second byte of the values that have one, and so on; a 128-token record's
    ids take at most 3 bytes, so that is 3 passes over shrinking subsets.
    """
    raw = np.frombuffer(data, dtype=np.uint8)
    is_last = raw < 0x80  # the last byte of each varint has the high bit clear
    ends = np.flatnonzero(is_last)
    if ends.size == raw.size:  # every value below 128
        return raw.astype(np.int64), byte_ends
    if not is_last[[end - 1 for end in byte_ends if end]].all():
        raise ValueError("malformed Example: a packed int64 list ends inside a varint")
    starts = np.empty_like(ends)
    starts[0] = 0
    np.add(ends[:-1], 1, out=starts[1:])
    extra = ends - starts  # bytes after the first one
    low = raw & 0x7F
    values = low[starts].astype(np.uint64)
    todo = np.flatnonzero(extra)
    for byte in range(1, 10):
        if not todo.size:
            break
        values[todo] |= low[starts[todo] + byte].astype(np.uint64) << np.uint64(7 * byte)
        todo = todo[extra[todo] > byte]
    if todo.size:
        raise ValueError("malformed Example: varint longer than 10 bytes in an int64 list")
    return values.view(np.int64), np.searchsorted(ends, byte_ends).tolist()


def _canonical_layout(buf: bytes) -> tuple[tuple, list[tuple[int, int]]] | None:
    """((name, kind) of each feature, (start, end) of its packed values), if `buf` has the
    layout that protobuf serializers and encode_example write: one packed int64 (kind 3) or
    float (kind 2) list per feature. None for anything else (unpacked values, bytes lists,
    unknown fields, malformed input), which goes to the general parser."""
    size, read, keys, spans = len(buf), _read_varint, [], []
    try:
        if buf[0] != 0x0A:
            return None
        total, pos = read(buf, 1, size)
        if pos + total != size:
            return None
        while pos < size:  # one map entry per turn; one-byte varints inlined (2x faster)
            if buf[pos] != 0x0A:
                return None
            entry_len, p = read(buf, pos + 1, size)
            end = p + entry_len
            name_start, name_end = p + 2, p + 2 + buf[p + 1]
            if end > size or buf[p] != 0x0A or buf[p + 1] >= 0x80 or buf[name_end] != 0x12:
                return None
            p = name_end + 1
            length = buf[p]  # of the Feature
            if length < 0x80:
                p += 1
            else:
                length, p = read(buf, p, end)
            tag = buf[p]
            if not length or p + length != end or (tag != 0x1A and tag != 0x12):
                return None
            length = buf[p + 1]  # of the Int64List / FloatList
            if length < 0x80:
                p += 2
            else:
                length, p = read(buf, p + 1, end)
            if p + length != end:
                return None
            if length:
                if buf[p] != 0x0A:
                    return None
                length = buf[p + 1]  # of the packed values
                if length < 0x80:
                    p += 2
                else:
                    length, p = read(buf, p + 1, end)
                if p + length != end or (tag == 0x12 and length % 4):
                    return None
            keys.append((buf[name_start:name_end].decode(), tag >> 3))
            spans.append((p, end))
            pos = end
    except (ValueError, IndexError, UnicodeDecodeError):
        return None  # the general parser says what is wrong
    if len(set(keys)) != len(keys):
        return None  # a repeated feature name: the general parser applies map semantics
    return tuple(keys), spans


def decode_example(data: bytes) -> dict[str, np.ndarray | list[bytes]]:
    """Parse a serialized tf.train.Example: int64 -> np.int64, float -> np.float32, bytes -> list.

    Accepts what any protobuf writer produces (packed or unpacked values, bytes lists,
    unknown fields); raises ValueError on malformed input.
    """
    buf = bytes(data)
    layout = _canonical_layout(buf)
    if layout is None:
        return _decode_general(buf)
    keys, spans = layout
    ints = [span for (_, kind), span in zip(keys, spans) if kind == 3]
    if ints:
        values, value_ends = _decode_varints(
            b"".join([buf[start:end] for start, end in ints]),
            list(itertools.accumulate(end - start for start, end in ints)))
        int_values = iter([values[first:last] for first, last in zip([0, *value_ends], value_ends)])
    return {name: next(int_values) if kind == 3 else
            np.frombuffer(buf, dtype="<f4", count=(end - start) // 4, offset=start).copy()
            for (name, kind), (start, end) in zip(keys, spans)}


def decode_examples(records: Sequence[bytes], describe: Callable[[int], str] | None = None
                    ) -> dict[str, np.ndarray | list[list[bytes]]]:
    """Decode records that share their features into one [N, k] array per feature.

    The batched twin of decode_example (the reader's hot path): one varint pass for all
    records, about half the time per record. A feature whose length differs between records, or
    that some record lacks, is a ValueError naming the record (`describe(i)` if given).
    Bytes features come back as a list of per-record lists.
    """
    if not records:
        raise ValueError("decode_examples needs at least one record")
    describe = describe or (lambda i: f"record {i} of the batch")
    bufs = [bytes(r) for r in records]
    layouts = [_canonical_layout(buf) for buf in bufs]
    keys = layouts[0][0] if layouts[0] else None
    if keys is None or not all(layout and layout[0] == keys for layout in layouts):
        return _stack_examples(bufs, describe)
    num, out = len(bufs), {}
    int_names = [name for name, kind in keys if kind == 3]
    int_columns = [j for j, (_, kind) in enumerate(keys) if kind == 3]
    if int_names:
        pieces = [buf[spans[j][0]:spans[j][1]] for buf, (_, spans) in zip(bufs, layouts)
                  for j in int_columns]
        try:
            values, value_ends = _decode_varints(
                b"".join(pieces), list(itertools.accumulate(map(len, pieces))))
        except ValueError:  # find and name the bad record
            return _stack_examples(bufs, describe)
        counts = np.diff(value_ends, prepend=0).reshape(num, len(int_names))
        _check_same_lengths(counts, int_names, describe)
        table = values.reshape(num, -1)
        column_ends = np.cumsum(counts[0]).tolist()
        for name, first, last in zip(int_names, [0, *column_ends], column_ends):
            out[name] = np.ascontiguousarray(table[:, first:last])
    for j, (name, kind) in enumerate(keys):
        if kind == 2:
            spans = [layout[1][j] for layout in layouts]
            counts = np.array([[(end - start) // 4] for start, end in spans])
            _check_same_lengths(counts, [name], describe)
            joined = b"".join([buf[start:end] for buf, (start, end) in zip(bufs, spans)])
            out[name] = np.frombuffer(joined, dtype="<f4").astype(np.float32).reshape(num, -1)
    return {name: out[name] for name, _ in keys}


def _check_same_lengths(counts: np.ndarray, names: list[str], describe: Callable) -> None:
    """counts: [N, F] values per record and feature; every row must equal the first."""
    bad = np.argwhere(counts != counts[0])
    if len(bad):
        i, j = bad[0].tolist()
        raise ValueError(f"{describe(i)}: feature {names[j]!r} has {counts[i, j]} values but "
                         f"{counts[0, j]} in {describe(0)}; records batched together must "
                         "have the same feature lengths")


def _stack_examples(bufs: list[bytes], describe: Callable[[int], str]) -> dict:
    """decode_examples through decode_example one record at a time (any encoding)."""
    decoded = []
    for i, buf in enumerate(bufs):
        try:
            decoded.append(decode_example(buf))
        except ValueError as err:
            raise ValueError(f"{describe(i)}: {err}") from err
    out = {}
    for name, first in decoded[0].items():
        column = []
        for i, example in enumerate(decoded):
            if name not in example:
                raise ValueError(f"{describe(i)}: has no feature {name!r}, which "
                                 f"{describe(0)} has")
            column.append(example[name])
        if isinstance(first, list):
            out[name] = column
            continue
        counts = np.array([[len(values)] for values in column])
        _check_same_lengths(counts, [name], describe)
        out[name] = np.stack(column)
    return out


# ---------------------------------------------------------------- general protobuf parser
def _fields(buf: bytes, pos: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """(field number, wire type, a, b) for each field in buf[pos:end].

    Wire type 2 gives the payload span [a, b); wire types 0, 1, 5 give the value in `a`.
    """
    while pos < end:
        key, pos = _read_varint(buf, pos, end)
        field, wire = key >> 3, key & 7
        if field == 0:
            raise ValueError(f"malformed Example: field number 0 at byte {pos}")
        if wire == 2:
            size, pos = _read_varint(buf, pos, end)
            if pos + size > end:
                raise ValueError(f"malformed Example: field {field} runs past its message "
                                 f"({size} bytes at byte {pos}, message ends at {end})")
            yield field, wire, pos, pos + size
            pos += size
        elif wire == 0:
            value, pos = _read_varint(buf, pos, end)
            yield field, wire, value, 0
        elif wire in (1, 5):
            size = 4 if wire == 5 else 8
            if pos + size > end:
                raise ValueError(f"malformed Example: truncated fixed{size * 8} at byte {pos}")
            yield field, wire, int.from_bytes(buf[pos:pos + size], "little"), 0
            pos += size
        else:
            raise ValueError(f"malformed Example: unsupported wire type {wire} at byte {pos}")


def _decode_general(buf: bytes) -> dict[str, np.ndarray | list[bytes]]:
    """decode_example for any valid encoding: walks every field with protobuf's semantics
    (unknown fields skipped, repeated embedded messages merged, map: last entry wins)."""
    entries: dict[str, list[tuple[int, int]]] = {}
    for field, wire, a, b in _fields(buf, 0, len(buf)):
        if field != 1 or wire != 2:
            continue
        for f2, w2, a2, b2 in _fields(buf, a, b):
            if f2 != 1 or w2 != 2:
                continue
            key, spans, unknown = b"", [], False
            for f3, w3, a3, b3 in _fields(buf, a2, b2):
                if f3 == 1 and w3 == 2:
                    key = buf[a3:b3]
                elif f3 == 2 and w3 == 2:
                    spans.append((a3, b3))
                else:
                    unknown = True
            if unknown:  # protobuf (C++, upb) keeps such a map entry as an unknown field
                continue
            try:
                name = key.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(f"malformed Example: feature name {key!r} is not UTF-8") from err
            entries.pop(name, None)  # a repeated key moves to where its last entry is
            entries[name] = spans
    return {name: _decode_feature(buf, spans) for name, spans in entries.items()}


def _decode_feature(buf: bytes, spans: list[tuple[int, int]]) -> np.ndarray | list[bytes]:
    kind, values = 0, []
    for field, wire, a, b in (f for start, end in spans for f in _fields(buf, start, end)):
        if field not in (1, 2, 3) or wire != 2:
            continue
        if field != kind:  # oneof: a list of another kind replaces the earlier one
            kind, values = field, []
        for f2, w2, a2, b2 in _fields(buf, a, b):
            if f2 != 1:
                continue
            if field == 3 and w2 == 2:
                values.extend(_decode_varints(buf[a2:b2], [b2 - a2])[0].tolist())
            elif field == 3 and w2 == 0:
                values.append(a2)
            elif field == 2 and w2 == 2 and (b2 - a2) % 4 == 0:
                values.extend(np.frombuffer(buf[a2:b2], dtype="<f4").tolist())
            elif field == 2 and w2 == 5:
                values.extend(np.frombuffer(a2.to_bytes(4, "little"), dtype="<f4").tolist())
            elif field == 1 and w2 == 2:
                values.append(buf[a2:b2])
            else:
                raise ValueError(f"malformed Example: value of wire type {w2} in list {field}")
    if kind == 1:
        return values
    if kind == 2:
        return np.array(values, dtype=np.float32)
    # int64 (or no list set, which reads as an empty list)
    return np.array([v & 0xFFFFFFFFFFFFFFFF for v in values], dtype=np.uint64).view(np.int64)


# ---------------------------------------------------------------- Example codec (reference path)
def encode_example_reference(int64_features: dict[str, np.ndarray],
                             float_features: dict[str, np.ndarray] | None = None) -> bytes:
    """encode_example through protobuf objects (slow, obviously right); for tests and timing."""
    from tfrecord import example_pb2

    example = example_pb2.Example()
    example.features.SetInParent()  # present even with no features, as encode_example writes
    for name, values in int64_features.items():
        feature = example.features.feature[name]
        feature.int64_list.SetInParent()  # an empty list is still an int64 list
        feature.int64_list.value.extend(np.asarray(values, dtype=np.int64).reshape(-1).tolist())
    for name, values in (float_features or {}).items():
        feature = example.features.feature[name]
        feature.float_list.SetInParent()
        feature.float_list.value.extend(np.asarray(values, dtype=np.float32).reshape(-1).tolist())
    return example.SerializeToString(deterministic=True)


def decode_example_reference(data: bytes) -> dict[str, np.ndarray | list[bytes]]:
    """decode_example through protobuf objects (slow, obviously right); for tests and timing."""
    from google.protobuf.message import DecodeError
    from tfrecord import example_pb2

    example = example_pb2.Example()
    try:
        example.ParseFromString(bytes(data))
    except DecodeError as err:
        raise ValueError(f"malformed Example: {err}") from err
    out: dict[str, np.ndarray | list[bytes]] = {}
    for name, feature in example.features.feature.items():
        kind = feature.WhichOneof("kind")
        if kind == "bytes_list":
            out[name] = list(feature.bytes_list.value)
        elif kind == "float_list":
            out[name] = np.array(feature.float_list.value, dtype=np.float32)
        else:
            out[name] = np.array(feature.int64_list.value, dtype=np.int64)
    return out
