"""Batch Example encoding and the bounded-memory global shuffle behind `bertforge tokenize`.

Two pieces that make the tokenize stage fast and its memory independent of the corpus size:

1. `encode_example_batch` serializes N tf.train.Examples with the same fixed-length features
   in one vectorised numpy pass: every record is laid out as a row of byte "slots" (a token
   id's varint comes from a 64k-entry table as 4 slots, the unused ones masked off; headers
   that are the same in every row are one constant) and one boolean gather packs all rows.
   On 128-token BERT records it costs ~1/5 of calling `example.encode_example` per record
   (6.7 vs 37 us a record, same busy 2-core machine) and gives the same bytes (tested): for
   the sample's 28k records ~0.2 s instead of ~1 s of a 1.7 s budget.

2. The global shuffle. Google's script shuffled all instances in memory (655 MB peak for a
   2.6 MB input; it cannot run on a full Wikipedia). Here each tokenize task sends every
   instance to a random shard (task RNG), `ShardSpill` appends the records of each shard to
   that shard's spill file (buffered: at most `memory_limit` bytes are held, 128 MB by
   default, then every buffer is appended to disk with one write per shard), and
   `write_shard` loads one shard at a time, permutes it with a seeded RNG and writes it
   with `RecordWriter` (framing, CRC, .index, atomic rename). Memory is then bounded by the
   spill buffer plus one shard (~64 MB by default), whatever the input size; the cost is
   writing the records twice (page-cache speed, ~1% of the stage's time). A run in one
   process whose records fit the buffer (the sample: 24 MB) never touches the disk for it.

The spill format is private and transient: blocks of `uint64 n | n x uint32 length | data`.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from bertforge.data.example import encode_varint
from bertforge.data.tfrecord import RecordWriter

_BLOCK_HEADER = struct.Struct("<Q")


# ---------------------------------------------------------------- batch Example encoder
_TABLE_SIZE = 1 << 16  # token ids of vocabs up to 65k: their varints come from a table
_tables: dict[str, np.ndarray] = {}


def _varint_arithmetic(values: np.ndarray, width: int
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(bytes [N, L, width], present [N, L, width], bytes per value [N, L]) by shifts."""
    values = values.astype(np.uint64)
    data = np.empty((*values.shape, width), dtype=np.uint8)
    present = np.empty((*values.shape, width), dtype=bool)
    present[..., 0] = True
    for k in range(width):  # byte k: bits 7k..7k+6, high bit set when more bytes follow
        group = (values >> np.uint64(7 * k)) & np.uint64(0x7F)
        if k + 1 < width:
            more = values >= np.uint64(1 << (7 * (k + 1)))
            present[..., k + 1] = more
            group |= more.astype(np.uint64) << np.uint64(7)
        data[..., k] = group
    return data, present, present.sum(axis=-1, dtype=np.uint8)


def _varint_slots(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Varints of non-negative ints [N, L] as byte slots.

    Returns (bytes [N, L*w] uint8, present [N, L*w] bool, bytes used per row [N]) where w is
    the widest varint in the batch; the slots of a value beyond its own varint are absent.
    """
    values = np.asarray(values)
    n, length = values.shape
    top = int(values.max()) if values.size else 0
    if values.size and int(values.min()) < 0:
        raise ValueError("encode_example_batch: negative int64 values are not supported")
    width = max(1, (top.bit_length() + 6) // 7)
    if width == 1:  # every value below 128 is its own single byte
        return (values.astype(np.uint8), np.broadcast_to(True, (n, length)),
                np.full(n, length, dtype=np.int64))
    if top < _TABLE_SIZE:
        # Three gathers from tables of each value's varint packed in a uint32 (4 slots, the
        # unused ones absent), instead of a dozen strided passes of shifts: ~3x faster for
        # token ids, and the views below copy nothing.
        if not _tables:
            data, present, used = _varint_arithmetic(np.arange(_TABLE_SIZE), 3)
            _tables["data"] = np.pad(data, ((0, 0), (0, 1))).view("<u4").reshape(-1)
            _tables["present"] = np.pad(present, ((0, 0), (0, 1))).view("<u4").reshape(-1)
            _tables["used"] = used
        data = _tables["data"].take(values).view(np.uint8).reshape(n, length * 4)
        present = _tables["present"].take(values).view(bool).reshape(n, length * 4)
        return data, present, _tables["used"].take(values).sum(axis=1, dtype=np.int64)
    data, present, used = _varint_arithmetic(values, width)
    used = used.sum(axis=1, dtype=np.int64)
    return data.reshape(n, length * width), present.reshape(n, length * width), used


def _varint_len(values: np.ndarray) -> np.ndarray:
    """Bytes in the varint of each non-negative value (values < 2^35 here: lengths)."""
    return 1 + (values >= 1 << 7) + (values >= 1 << 14) + (values >= 1 << 21) + (values >= 1 << 28)



def _const(n: int, data: bytes) -> tuple[np.ndarray, np.ndarray]:
    row = np.frombuffer(data, dtype=np.uint8)
    return np.broadcast_to(row, (n, row.size)), np.broadcast_to(True, (n, row.size))


def _length_slots(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    data, present, _ = _varint_slots(lengths[:, None])
    return data, present


def encode_example_batch(int64_features: dict[str, np.ndarray],
                         float_features: dict[str, np.ndarray] | None = None
                         ) -> tuple[bytes, np.ndarray]:
    """Serialize N tf.train.Examples from [N, L] arrays (each feature of fixed length L >= 1).

    Returns (all records concatenated, int64 length of each record). Record i equals
    `example.encode_example({k: v[i]...}, {k: v[i]...})`: int64 features first, then float
    features, each in the given order, repeated values packed.
    """
    float_features = float_features or {}
    rows = {a.shape[0] for a in (*int64_features.values(), *float_features.values())}
    assert len(rows) == 1, "every feature needs the same number of rows"
    n = rows.pop()
    pieces: list[tuple[np.ndarray, np.ndarray]] = []
    total = np.zeros(n, dtype=np.int64)  # bytes of the Features message so far

    def add_feature(name: str, tag: bytes, payload: tuple[np.ndarray, np.ndarray],
                    payload_len: np.ndarray) -> None:
        key = name.encode()
        prefix = b"\x0a" + encode_varint(len(key)) + key + b"\x12"  # map entry: key, then value
        if (payload_len == payload_len[0]).all():  # same sizes in every row: one header
            size = int(payload_len[0])
            inner = b"\x0a" + encode_varint(size)                   # List{1: packed}
            feature = tag + encode_varint(len(inner) + size) + inner  # Feature{tag: List}
            entry = prefix + encode_varint(len(feature) + size) + feature
            header = b"\x0a" + encode_varint(len(entry) + size) + entry
            pieces.extend([_const(n, header), payload])
            total[:] += len(header) + size
            return
        inner_len = 1 + _varint_len(payload_len) + payload_len
        feature_len = 1 + _varint_len(inner_len) + inner_len
        entry_len = len(prefix) + _varint_len(feature_len) + feature_len
        pieces.extend([_const(n, b"\x0a"), _length_slots(entry_len), _const(n, prefix),
                       _length_slots(feature_len), _const(n, tag), _length_slots(inner_len),
                       _const(n, b"\x0a"), _length_slots(payload_len), payload])
        total[:] += 1 + _varint_len(entry_len) + entry_len

    for name, values in int64_features.items():
        assert values.ndim == 2 and values.shape[1] >= 1
        data, present, payload_len = _varint_slots(values)
        add_feature(name, b"\x1a", (data, present), payload_len)
    for name, values in float_features.items():
        assert values.ndim == 2 and values.shape[1] >= 1
        data = np.ascontiguousarray(values, dtype="<f4").view(np.uint8)
        add_feature(name, b"\x12", (data, np.broadcast_to(True, data.shape)),
                    np.full(n, data.shape[1], dtype=np.int64))
    header, header_present = _length_slots(total)
    pieces[:0] = [_const(n, b"\x0a"), (header, header_present)]
    slots = np.concatenate([d for d, _ in pieces], axis=1)
    # Most slots are always present: start from all-true (one fill) and copy in only the
    # masks that vary, half the cost of concatenating them all.
    present = np.ones(slots.shape, dtype=bool)
    column = 0
    for data, mask in pieces:
        width = data.shape[1]
        if mask.strides != (0, 0):  # not a broadcast True
            present[:, column:column + width] = mask
        column += width
    return slots[present].tobytes(), 1 + _varint_len(total) + total


# ---------------------------------------------------------------- spill and shard writing
def _block(lengths: np.ndarray, data: bytes) -> bytes:
    return _BLOCK_HEADER.pack(len(lengths)) + lengths.astype("<u4").tobytes() + data


def _split_block(lengths: np.ndarray, data: bytes | memoryview) -> list[bytes]:
    ends = np.cumsum(lengths, dtype=np.int64).tolist()
    starts = [0, *ends[:-1]]
    return [bytes(data[a:b]) for a, b in zip(starts, ends)]


def read_spill_file(path: Path) -> list[bytes]:
    """Every record of a spill file written by `ShardSpill`, in order."""
    raw = memoryview(Path(path).read_bytes())
    records: list[bytes] = []
    pos = 0
    while pos < len(raw):
        (count,) = _BLOCK_HEADER.unpack_from(raw, pos)
        pos += _BLOCK_HEADER.size
        lengths = np.frombuffer(raw, dtype="<u4", count=count, offset=pos)
        pos += 4 * count
        size = int(lengths.sum(dtype=np.int64))
        records.extend(_split_block(lengths, raw[pos:pos + size]))
        pos += size
    return records


class ShardSpill:
    """Per-shard record buffers, appended to one spill file per shard when they grow.

    `add` keeps arrival order, so a shard's records are in task order whatever the number of
    worker processes; that is what makes the shuffled output deterministic.
    """

    def __init__(self, directory: Path, num_shards: int, memory_limit: int = 128 << 20):
        self.directory = Path(directory)
        self.num_shards = num_shards
        self.memory_limit = memory_limit
        self._buffers: list[list[tuple[np.ndarray, bytes]]] = [[] for _ in range(num_shards)]
        self._buffered = 0
        self._spilled = [False] * num_shards

    def path(self, shard: int) -> Path:
        return self.directory / f"shard-{shard:05d}.spill"

    def add(self, shard: int, lengths: np.ndarray, data: bytes) -> None:
        """Queue records (`data` = their bytes concatenated, `lengths` each one's size)."""
        self._buffers[shard].append((lengths, data))
        self._buffered += len(data) + 4 * len(lengths)
        if self._buffered > self.memory_limit:
            self.flush()

    def flush(self) -> None:
        """Append every buffered record to its shard's spill file."""
        self.directory.mkdir(parents=True, exist_ok=True)
        for shard, blocks in enumerate(self._buffers):
            if blocks:
                # The first write truncates: a file left by a killed run must not add its
                # records to this run's (a re-run wrote 61,920 records of 35,383 that way).
                with open(self.path(shard), "ab" if self._spilled[shard] else "wb") as f:
                    f.write(b"".join(_block(lengths, data) for lengths, data in blocks))
                self._spilled[shard] = True
                blocks.clear()
        self._buffered = 0

    def records(self, shard: int) -> list[bytes]:
        """The shard's records in arrival order (spilled ones first, then buffered)."""
        records = read_spill_file(self.path(shard)) if self._spilled[shard] else []
        for lengths, data in self._buffers[shard]:
            records.extend(_split_block(lengths, data))
        return records


def shard_rng(seed: int, shard: int) -> np.random.Generator:
    """The RNG that orders shard `shard` (its own stream, apart from the tasks' streams)."""
    return np.random.default_rng(np.random.SeedSequence([seed, 1, shard]))


def write_shard(path: Path, records: list[bytes], seed: int, shard: int) -> int:
    """Write `records` to TFRecord `path` (+ .index) in a seeded random order; return count."""
    order = shard_rng(seed, shard).permutation(len(records)).tolist()
    with RecordWriter(path) as writer:
        write = writer.write
        for i in order:
            write(records[i])
    return len(records)


def write_shard_from_spill(job: tuple[str, str, int, int]) -> int:
    """Pool job: (spill file, output path, seed, shard) -> records written."""
    spill, path, seed, shard = job
    records = read_spill_file(Path(spill)) if Path(spill).exists() else []
    return write_shard(Path(path), records, seed, shard)
