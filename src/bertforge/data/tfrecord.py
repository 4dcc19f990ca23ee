"""TFRecord shards: framing with masked CRC32C and the `.index` side files.

A TFRecord file is a sequence of records framed as
`uint64 length | uint32 masked_crc32c(length) | data | uint32 masked_crc32c(data)` (little
endian), masked = ((crc >> 15) | (crc << 17)) + 0xa282ead8 mod 2^32. Writing exactly this lets
TensorFlow's tf.data, Google's BERT scripts and the `tfrecord` PyPI package read our shards,
and lets us read theirs. CRC32C comes from the `crc32c` package (SSE4.2/ARMv8
instructions, GB/s), so checking every record costs ~1% of decoding it.

Each shard gets an index: one line `byte_offset record_length` per record, where
record_length is the whole framed record (16 + len(data)), the convention of the `tfrecord`
package's tools/tfrecord2idx.py, so its readers take our indexes unchanged. The index makes
random access (seeded shuffling, exact resume) possible without scanning shards. Shards and
indexes are written to temporary names and renamed into place only when the writer closes
cleanly, data file first and index last: an index present means its shard is complete.

Index names. The reference's loader looks for `filename.replace(".tfrecord", ".index")`, so
`wiki_000.tfrecord` has `wiki_000.index`; that is the name written here (`index_path`), so
shards flow both ways without re-indexing. (tfrecord2idx writes whatever path it is given;
its directory mode writes `wiki_000.tfindex`, which neither side reads.) Earlier bertforge
versions wrote `wiki_000.tfrecord.index`: still read, and removed when bertforge re-indexes or
rewrites the shard. Both present with different contents is an error naming both. A shard
whose name does not end in `.tfrecord` has `NAME.index` (the two rules agree there).

"""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import crc32c
import numpy as np

from bertforge.data.stage import Summary, default_workers
from bertforge.files import atomic_output
from bertforge.processes import worker_pool
from bertforge.progress import progress

_MASK_DELTA = 0xA282EAD8
_HEADER = struct.Struct("<QI")  # length, masked crc of the length bytes
_FOOTER = struct.Struct("<I")
FRAME_OVERHEAD = 16  # 8 length + 4 length crc + 4 data crc
INDEX_SUFFIX = ".index"
SHARD_SUFFIX = ".tfrecord"


class CorruptRecordError(ValueError):
    """A TFRecord whose framing or CRC is wrong, or that ends early; names the file and offset."""


def masked_crc32c(data: bytes) -> int:
    """The TFRecord checksum of `data`: CRC32C, rotated right by 15 bits, plus a constant."""
    crc = crc32c.crc32c(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


# ---------------------------------------------------------------- writing shards
class RecordWriter:
    """Write framed records to `path` and their index to `index_path(path)`, atomically.

    Both go to temporary siblings and are renamed into place on a clean close (data first,
    index last), then an index under the old name (`path.index`) is removed: it described the
    file this one replaced. An exception inside the `with` block removes the temporaries.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.num_records = 0
        self._offset = 0
        self._stack = contextlib.ExitStack()
        # entered index first, so that on exit the data file is renamed before the index
        index_tmp = self._stack.enter_context(atomic_output(index_path(self.path)))
        data_tmp = self._stack.enter_context(atomic_output(self.path))
        self._index = self._stack.enter_context(open(index_tmp, "w", buffering=1 << 16))
        self._data = self._stack.enter_context(open(data_tmp, "wb", buffering=1 << 20))

    def write(self, record: bytes) -> None:
        length = struct.pack("<Q", len(record))
        self._data.write(length + struct.pack("<I", masked_crc32c(length)))
        self._data.write(record)
        self._data.write(struct.pack("<I", masked_crc32c(record)))
        framed = FRAME_OVERHEAD + len(record)
        self._index.write(f"{self._offset} {framed}\n")
        self._offset += framed
        self.num_records += 1

    def close(self) -> None:
        """Finish: flush, close and rename both files into place."""
        self._stack.close()
        _remove_old_index(self.path)

    def __enter__(self) -> "RecordWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.close()
            return False
        # Passing the exception on makes atomic_output drop its temporaries.
        return self._stack.__exit__(exc_type, exc, tb)


# ---------------------------------------------------------------- reading shards
def index_path(path: str | Path) -> Path:
    """The index file written for shard `path`: `X.index` for `X.tfrecord` (the reference's
    name), `NAME.index` for any other NAME."""
    path = Path(path)
    if path.name.endswith(SHARD_SUFFIX) and path.name != SHARD_SUFFIX:
        return path.with_name(path.name[:-len(SHARD_SUFFIX)] + INDEX_SUFFIX)
    return Path(f"{path}{INDEX_SUFFIX}")


def old_index_path(path: str | Path) -> Path:
    """The name earlier bertforge versions gave the index of `path`: `X.tfrecord.index`."""
    return Path(f"{path}{INDEX_SUFFIX}")


def _remove_old_index(path: Path) -> None:
    """After (re-)indexing `path` under index_path: drop a copy under the old name."""
    if old_index_path(path) != index_path(path):
        old_index_path(path).unlink(missing_ok=True)


def find_index(path: str | Path) -> Path | None:
    """The index of shard `path` that exists (the reference's name or the old one), or None.

    Both present is fine when their bytes are equal; otherwise it is a ValueError naming both,
    since nothing says which one describes the shard.
    """
    new, old = index_path(path), old_index_path(path)
    present = [p for p in dict.fromkeys((new, old)) if p.is_file()]
    if len(present) == 2 and new.read_bytes() != old.read_bytes():
        raise ValueError(f"{path} has two different indexes, {new} and {old} (the old name); "
                         f"run `bertforge index {path}` to rewrite {new.name} from the shard "
                         f"and remove {old.name}")
    return present[0] if present else None


def _shard_of_index(index: Path) -> Path:
    """The shard an index file belongs to: `X` for an old-style `X.index` next to an existing
    `X`, else the reference's `X.tfrecord`."""
    stem = Path(str(index)[: -len(INDEX_SUFFIX)])
    if stem.name.endswith(SHARD_SUFFIX) or stem.is_file():
        return stem
    return stem.with_name(stem.name + SHARD_SUFFIX)


def _corrupt(path: str | Path, offset: int, what: str) -> CorruptRecordError:
    return CorruptRecordError(
        f"{path}: corrupt TFRecord at byte offset {offset}: {what}. The shard is damaged or "
        f"was not completely written: re-create it (re-run the `bertforge tokenize` that wrote "
        f"it), or if the file is good and only its index is stale, run `bertforge index {path}`")


def parse_record(path: str | Path, offset: int, framed: bytes | memoryview,
                 check_crc: bool = True) -> bytes:
    """The data of the framed record `framed` read from `path` at `offset`; checks framing."""
    if len(framed) < 12:
        raise _corrupt(path, offset, f"truncated record header ({len(framed)} of 12 bytes)")
    length, length_crc = _HEADER.unpack_from(framed, 0)
    if check_crc and masked_crc32c(framed[:8]) != length_crc:
        raise _corrupt(path, offset, "length CRC mismatch")
    if len(framed) < FRAME_OVERHEAD + length:
        raise _corrupt(path, offset, f"truncated record ({len(framed)} of "
                                     f"{FRAME_OVERHEAD + length} bytes present)")
    if len(framed) > FRAME_OVERHEAD + length:
        raise _corrupt(path, offset, f"index says {len(framed)} bytes but the record header "
                                     f"says {FRAME_OVERHEAD + length}")
    data = bytes(framed[12:12 + length])
    if check_crc and masked_crc32c(data) != _FOOTER.unpack_from(framed, 12 + length)[0]:
        raise _corrupt(path, offset, "data CRC mismatch")
    return data


def read_record_at(fd: int, path: str | Path, offset: int, framed_length: int,
                   check_crc: bool = True) -> bytes:
    """One record's data by its index entry, from an open file descriptor (one pread)."""
    return parse_record(path, offset, os.pread(fd, framed_length, offset), check_crc)


def _scan(path: Path, check_crc: bool = True) -> Iterator[tuple[int, int, bytes]]:
    """(offset, framed length, data) for each record of a whole file, verifying framing."""
    size = path.stat().st_size
    if size == 0:
        return
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        offset = 0
        while offset < size:
            if size - offset < 12:
                raise _corrupt(path, offset, f"truncated record header ({size - offset} of "
                                             "12 bytes before the end of the file)")
            length, length_crc = _HEADER.unpack_from(mm, offset)
            if check_crc and masked_crc32c(mm[offset:offset + 8]) != length_crc:
                raise _corrupt(path, offset, "length CRC mismatch")
            end = offset + FRAME_OVERHEAD + length
            if end > size:
                raise _corrupt(path, offset, f"truncated record (needs {end - offset} bytes, "
                                             f"{size - offset} left in the file)")
            data = mm[offset + 12:end - 4]  # a copy: no view may outlive the mapping
            if check_crc and masked_crc32c(data) != _FOOTER.unpack_from(mm, end - 4)[0]:
                raise _corrupt(path, offset, "data CRC mismatch")
            yield offset, end - offset, data
            offset = end


def iter_records(path: str | Path, index: np.ndarray | None = None,
                 check_crc: bool = True) -> Iterator[bytes]:
    """The data of each record of `path`: the whole file in order, or the records of `index`."""
    path = Path(path)
    if index is None:
        for _, _, data in _scan(path, check_crc):
            yield data
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        for offset, framed_length in np.asarray(index).tolist():
            yield read_record_at(fd, path, offset, framed_length, check_crc)
    finally:
        os.close(fd)


def _index_error(index: Path, data: Path, line: int, what: str) -> ValueError:
    return ValueError(f"{index}: line {line}: {what}; re-create it with `bertforge index {data}`")


def read_index(path: str | Path) -> np.ndarray:
    """The [n, 2] int64 (offset, framed length) index of shard `path` (or of `path` if .index).

    Checks that entries are well formed and contiguous from byte 0 and, when the shard is
    present, that they end exactly at its size: a stale, foreign, short or empty index beside
    a non-empty shard is an error (an empty one would silently drop the whole shard).
    """
    path = Path(path)
    data = _shard_of_index(path) if path.name.endswith(INDEX_SUFFIX) else path
    index = find_index(data)
    if index is None:
        raise FileNotFoundError(f"{index_path(data)}: no index for TFRecord file {data}; "
                                f"run `bertforge index {data}` to write it")
    raw = index.read_bytes()
    tokens = raw.split()
    entries = None
    if len(tokens) % 2 == 0 and len(tokens) // 2 == len(raw.splitlines()):
        try:
            entries = np.array(tokens, dtype=np.bytes_).astype(np.int64).reshape(-1, 2)
        except ValueError:
            entries = None
    if entries is None or not _contiguous(entries):
        _find_bad_line(index, data, raw)  # raises, naming the line
        raise AssertionError("the fast and the line-by-line index checks disagree")
    if data.exists():
        end, size = (int(entries[-1].sum()) if len(entries) else 0), data.stat().st_size
        if end != size:
            what = ("is empty" if not len(entries) else "is stale" if end > size else
                    "is short")
            raise ValueError(f"{index}: index {what}: its {len(entries)} records end at byte "
                             f"{end} but {data} has {size} bytes; re-run `bertforge index "
                             f"{data}` to rewrite the index from the shard")
    return entries


def _contiguous(entries: np.ndarray) -> bool:
    if not len(entries):
        return True
    offsets, lengths = entries[:, 0], entries[:, 1]
    return (offsets[0] == 0 and bool((lengths >= FRAME_OVERHEAD).all())
            and bool((offsets[1:] == offsets[:-1] + lengths[:-1]).all()))


def _find_bad_line(index: Path, data: Path, raw: bytes) -> None:
    expected = 0
    for number, line in enumerate(raw.splitlines(), 1):
        fields = line.split()
        if len(fields) != 2 or not all(f.isdigit() for f in fields):
            raise _index_error(index, data, number, f"expected 'offset length', got {line[:60]!r}")
        offset, length = int(fields[0]), int(fields[1])
        if offset != expected:
            raise _index_error(index, data, number, f"offset {offset} does not follow the "
                                                    f"previous record (expected {expected})")
        if length < FRAME_OVERHEAD:
            raise _index_error(index, data, number, f"record length {length} is below the "
                                                    f"{FRAME_OVERHEAD}-byte framing")
        expected = offset + length


# ---------------------------------------------------------------- `bertforge index`
def write_index(path: str | Path) -> int:
    """Scan TFRecord `path` (checking framing and CRCs), write its index (`index_path`, and
    remove one under the old name); return the number of records."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such TFRecord file")
    count = 0
    with atomic_output(index_path(path)) as tmp, open(tmp, "w", buffering=1 << 16) as out:
        for offset, framed_length, _ in _scan(path):
            out.write(f"{offset} {framed_length}\n")
            count += 1
    _remove_old_index(path)
    return count


def index_is_current(path: str | Path) -> bool:
    """True if the one index of `path` is newer than it and its last entry ends at the file's
    end; False also when indexes under both names exist (re-indexing settles which)."""
    path = Path(path)
    present = [p for p in dict.fromkeys((index_path(path), old_index_path(path))) if p.is_file()]
    if len(present) != 1:
        return False
    index = present[0]
    try:
        data_stat, index_stat = path.stat(), index.stat()
    except FileNotFoundError:
        return False
    if index_stat.st_mtime_ns < data_stat.st_mtime_ns:
        return False
    if index_stat.st_size == 0:
        return data_stat.st_size == 0
    with open(index, "rb") as f:
        f.seek(max(0, index_stat.st_size - 64))
        tail = f.read().splitlines()
    fields = tail[-1].split() if tail else []
    return (len(fields) == 2 and all(x.isdigit() for x in fields)
            and int(fields[0]) + int(fields[1]) == data_stat.st_size)


def _index_one(path: str) -> tuple[str, int | None]:
    """(path, records written) or (path, None) when its index was already current."""
    if index_is_current(path):
        return path, None
    return path, write_index(path)


def index_files(files: list[Path], workers: int | None = None) -> Summary:
    """`bertforge index FILES...`: write each file's index, in parallel over files."""
    summary = Summary("index")
    summary.counts.update(files=0, records=0)
    # `bertforge index shards/*` also matches the indexes themselves: counted, not read
    paths = [str(p) for p in files if not str(p).endswith(INDEX_SUFFIX)]
    if len(paths) < len(files):
        summary.skip("index-file-given", len(files) - len(paths))
    for p in paths:
        if Path(p).is_dir():
            raise ValueError(f"{p} is a directory; pass its TFRecord files (e.g. {p}/*)")
        if not Path(p).is_file():
            raise FileNotFoundError(f"{p}: no such TFRecord file")
    workers = min(workers or default_workers(), len(paths)) or 1
    with contextlib.ExitStack() as stack:
        bar = stack.enter_context(progress(total=len(paths), desc="index", unit="file"))
        if workers > 1:
            pool = stack.enter_context(worker_pool(workers))
            results = pool.imap_unordered(_index_one, paths)
        else:
            results = map(_index_one, paths)
        for path, count in results:
            bar.update(1)
            if count is None:
                summary.skip("already-indexed")
            else:
                summary.counts["files"] += 1
                summary.counts["records"] += count
    return summary
