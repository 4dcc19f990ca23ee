"""Any corpus for `tokenize`: JSONL, Parquet and Hugging Face datasets -> sentence-per-line text.

`tokenize`'s algorithm reads text with one sentence per line and a blank line after each
document (wiki preprocess's output, cut into tasks by text_tasks.py). Other corpora come as
records, one document each: a JSON object per line (.jsonl, .json, .jsonl.gz, .json.gz), a
Parquet column, or a Hugging Face dataset (a folder written by `save_to_disk`, or a hub
name). This module turns the records into exactly that text -- a record's text split at line
breaks (paragraphs), then into sentences by blingfire's text_to_sentences (wiki preprocess's
splitter), written as one document -- in one file in a scratch folder inside the output
directory (`.tokenize-corpus-<pid>/`: removed at the end, and after a killed run by the next
run's stage.begin), and the unchanged text path runs on that file. So the same documents give
byte-identical shards whatever format carried them (tested), while the stage's manifest
fingerprints the original inputs (a JSONL file changed in place redoes the work).

Why a scratch file rather than streaming records into tasks: tasks are byte ranges of files
cut at document boundaries, which is what gives bounded memory, no pass over the corpus up
front and the same output for any --workers; streaming would need a second planner with the
same three guarantees. The file costs one write and one read of the text (the read from the
page cache). Measured on the real sample as JSONL (2.6 MB of text, 105 documents, 20k
sentences; 2 shared cores, one worker, medians of 7): reading, splitting and writing the
scratch file 0.28 s, of which the write is 2.4 ms and the read back 0.2 ms; JSON parsing 5 ms;
the sentence splitter 0.23 s (~11 MB/s per core: one blingfire call per paragraph, as wiki
preprocess makes). The whole tokenize (duplication 5): 0.74 s vs 0.50 s on the equivalent text
file. Streaming would save the ~3 ms of file, not the splitter. Disk: the scratch file is about
the size of the text (a record's text plus one byte per sentence).

Records are read in parts -- 8 MiB of an uncompressed JSONL file (cut at line starts, by the
rule text_tasks.py uses for documents), one whole .gz file (gzip cannot seek), one Parquet row
group, 4,096 rows of a dataset -- converted on all cores and appended in part order, so the
text does not depend on --workers. Memory is bounded by the parts in flight: Parquet is read
in record batches of one column, a dataset is memory-mapped Arrow read one slice at a time.

Every record is accounted for: 'records in' counts them (for JSONL: its non-blank lines), and
those that give no document are skipped and counted by reason: invalid-json-line,
record-not-an-object, record-without-text-field, null-text, non-string-text, empty-text,
invalid-unicode-text (lone surrogates from a JSON escape). A field that the first record of
a JSONL file lacks, or that a Parquet file or dataset has no column for (or a column that does
not hold text), is an error naming the file, the field and the fields it has: that is a wrong
--text-field, not a record to skip.
"""

from __future__ import annotations

import gzip
import json
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib.metadata import version
from multiprocessing import get_all_start_methods
from pathlib import Path
from typing import Any

from bertforge.data.stage import Summary, default_workers
from bertforge.data.text_tasks import find_input_files
from bertforge.processes import worker_pool
from bertforge.progress import progress

FORMATS = ("text", "jsonl", "parquet", "hf")
SCRATCH_PREFIX = ".tokenize-corpus-"  # + pid: the folder of the converted text
CORPUS_TEXT = "corpus.txt"
PART_BYTES = 8 << 20     # uncompressed JSONL per part (~0.25 s of splitting on one core)
PART_ROWS = 4096         # dataset rows per part
BATCH_ROWS = 1024        # Parquet rows per record batch
READER_FORMAT = 1        # bump when the same records would give other text (re-runs redo)
JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
# A folder written by Dataset.save_to_disk holds these two; DatasetDict.save_to_disk writes
# dataset_dict.json and one such folder per split.
DATASET_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
EXTRA = "pip install 'bertforge[corpus]'"
_MISSING = object()   # a record without the text field
_SKIPPED = object()   # a line that is no record (counted where it was read)


@dataclass
class Corpus:
    """The inputs of one tokenize run, resolved: their format, the files the manifest
    fingerprints (the original inputs), the parts to convert and the stage settings."""

    format: str
    files: list[Path]
    parts: list[tuple] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    text_field: str = "text"
    datasets: list[Any] = field(default_factory=list)  # hf: loaded, reduced to the text column


def detect_format(path: Path) -> str:
    """The format a file's name (or a folder's content) says; 'text' for anything else."""
    if path.is_dir():
        return "hf" if any((path / m).is_file() for m in DATASET_MARKERS) else "text"
    name = path.name.lower()
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    return "text"


def open_corpus(inputs: list, output_dir: Path | None, input_format: str = "auto",
                text_field: str = "text", split: str = "train") -> Corpus:
    """Resolve `inputs` (files, folders, saved datasets, hub names with input_format='hf')."""
    assert input_format == "auto" or input_format in FORMATS, input_format
    found: list[tuple[str, Any]] = []  # (format, a file or a dataset's folder or hub name)
    for item in inputs:
        path = Path(item)
        if input_format == "hf" or (input_format == "auto" and detect_format(path) == "hf"):
            found.append(("hf", item))
            continue
        for file in find_input_files([path], output_dir):
            found.append((detect_format(file) if input_format == "auto" else input_format, file))
    kinds = {}
    for kind, item in found:
        kinds.setdefault(kind, item)
    if len(kinds) > 1:
        raise ValueError("inputs mix formats (" + ", ".join(f"{item}: {kind}" for kind, item in
                         kinds.items()) + "); tokenize one format per run, or force one with "
                         "--input-format")
    kind = next(iter(kinds))
    if kind == "text":
        return Corpus("text", [item for _, item in found])
    corpus = Corpus(kind, [], text_field=text_field, settings={
        "format": kind, "text_field": text_field, "reader": READER_FORMAT,
        "splitter": f"blingfire {version('blingfire')}"})
    for _, item in found:
        {"jsonl": _add_jsonl, "parquet": _add_parquet, "hf": _add_dataset}[kind](
            corpus, item, output_dir, split)
    return corpus


def _require(module: str, kind: str):
    """Import an optional dependency, or say which pip install brings it."""
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError as err:  # also pyarrow's own "requires NumPy ..." ImportError
        raise ValueError(f"--input-format {kind} needs {module.split('.')[0]} ({err}): "
                         f"{EXTRA}") from None


def _fields_text(names) -> str:
    return ", ".join(names) if names else "none"


# ---------------------------------------------------------------- JSONL
def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


def _open_jsonl(path: Path):
    return gzip.open(path, "rb") if _is_gzip(path) else open(path, "rb")


def _add_jsonl(corpus: Corpus, path: Path, output_dir, split) -> None:
    corpus.files.append(path)
    with _open_jsonl(path) as f:
        # the first record says whether the field exists at all (looked for in 100 lines:
        # a file of no JSON is counted line by line later, not read twice)
        for _, line in zip(range(100), f):
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and corpus.text_field not in record:
                raise ValueError(f"{path}: its first record has no field {corpus.text_field!r} "
                                 f"(fields: {_fields_text(list(record))}); pass --text-field NAME")
            break
    if _is_gzip(path):
        corpus.parts.append(("jsonl", str(path), 0, -1))
        return
    size = path.stat().st_size
    for start in range(0, size, PART_BYTES):
        corpus.parts.append(("jsonl", str(path), start, min(start + PART_BYTES, size)))


def _jsonl_values(path: str, start: int, end: int, text_field: str,
                  summary: Summary) -> Iterator[Any]:
    """Text values of the records whose lines start in [start, end) (end -1: to the end)."""
    with _open_jsonl(Path(path)) as f:
        if start > 0:  # the first line that starts at or after `start`
            f.seek(start - 1)
            if f.read(1) != b"\n":
                f.readline()
        pos = f.tell()
        for line in f:
            if 0 <= end <= pos:
                break
            pos += len(line)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:  # UnicodeDecodeError too
                summary.skip("invalid-json-line")
                yield _SKIPPED
                continue
            if not isinstance(record, dict):
                summary.skip("record-not-an-object")
                yield _SKIPPED
            else:
                yield record.get(text_field, _MISSING)


# ---------------------------------------------------------------- Parquet
def _check_column(label: str, schema, text_field: str, kind: str) -> None:
    pa = _require("pyarrow", kind)
    if text_field not in schema.names:
        raise ValueError(f"{label}: no column {text_field!r} (columns: "
                         f"{_fields_text(schema.names)}); pass --text-field NAME")
    held = schema.field(text_field).type
    if not (pa.types.is_string(held) or pa.types.is_large_string(held)
            or getattr(pa.types, "is_string_view", lambda _: False)(held)):
        raise ValueError(f"{label}: column {text_field!r} holds {held}, not text; pass "
                         "--text-field NAME of a string column")


def _add_parquet(corpus: Corpus, path: Path, output_dir, split) -> None:
    pq = _require("pyarrow.parquet", "parquet")
    try:
        meta = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises ArrowInvalid (a ValueError) or OSError
        raise ValueError(f"{path} is not a Parquet file ({err})") from None
    _check_column(str(path), meta.schema_arrow, corpus.text_field, "parquet")
    corpus.files.append(path)
    corpus.parts.extend(("parquet", str(path), g) for g in range(meta.num_row_groups))


def _parquet_values(path: str, row_group: int, text_field: str) -> Iterator[Any]:
    import pyarrow.parquet as pq
    batches = pq.ParquetFile(path).iter_batches(batch_size=BATCH_ROWS, row_groups=[row_group],
                                                columns=[text_field])
    for batch in batches:
        yield from batch.column(0).to_pylist()


# ---------------------------------------------------------------- Hugging Face datasets
def _add_dataset(corpus: Corpus, item, output_dir, split: str) -> None:
    datasets = _require("datasets", "hf")
    path = Path(item)
    if path.exists():  # a folder written by save_to_disk: offline
        if not path.is_dir() or detect_format(path) != "hf":
            raise ValueError(f"{path} is not a dataset saved with save_to_disk (no "
                             f"{' / '.join(DATASET_MARKERS)} in it)")
        dataset = datasets.load_from_disk(str(path))
        label = str(path)
        if isinstance(dataset, datasets.DatasetDict):
            if split not in dataset:
                raise ValueError(f"{path} has no split {split!r} (splits: "
                                 f"{_fields_text(list(dataset))}); pass --split NAME")
            dataset, path = dataset[split], path / split
            label = f"{label} split {split!r}"
            corpus.settings["split"] = split  # (a saved Dataset has no splits)
        files = find_input_files([path], output_dir)
    else:  # a hub name: downloads into (or reads from) the datasets cache
        try:
            dataset = datasets.load_dataset(str(item), split=split)
        except (OSError, ConnectionError, ValueError) as err:
            raise ValueError(f"dataset {item}: could not load split {split!r} ({err}); a hub "
                             "dataset needs the network or a warm datasets cache; offline, "
                             "pass a folder written by save_to_disk") from None
        label = f"dataset {item} split {split!r}"
        files = [Path(f["filename"]) for f in dataset.cache_files]
        corpus.settings.setdefault("datasets", []).append(str(item))
        corpus.settings["split"] = split
    _check_column(label, dataset.data.schema, corpus.text_field, "hf")
    corpus.files.extend(files)
    index = len(corpus.datasets)
    # python objects whatever format the saved dataset was given (with_format("torch"), ...)
    corpus.datasets.append(dataset.select_columns([corpus.text_field]).with_format(None))
    corpus.parts.extend(("hf", index, start, min(start + PART_ROWS, len(dataset)))
                        for start in range(0, len(dataset), PART_ROWS))


# ---------------------------------------------------------------- records -> text
def document_sentences(text: str) -> list[str]:
    """A document's sentences: its lines (paragraphs) split by blingfire, stripped, as
    wiki preprocess splits an article."""
    from blingfire import text_to_sentences
    sentences = []
    for line in text.splitlines():
        line = line.strip()
        if line:
            sentences.extend(s for s in (t.strip() for t in text_to_sentences(line).split("\n"))
                             if s)
    return sentences


def _part_values(corpus: Corpus, part: tuple, summary: Summary) -> Iterator[Any]:
    kind, *where = part
    if kind == "jsonl":
        return _jsonl_values(*where, corpus.text_field, summary)
    if kind == "parquet":
        return _parquet_values(*where, corpus.text_field)
    index, start, stop = where
    return iter(corpus.datasets[index][start:stop][corpus.text_field])


def convert_part(corpus: Corpus, part: tuple) -> tuple[bytes, Summary]:
    """One part's records as documents of the text format, and its counts."""
    summary = Summary("tokenize")
    documents = []
    records = 0
    for value in _part_values(corpus, part, summary):
        records += 1
        if value is _SKIPPED:
            continue
        if value is _MISSING:
            summary.skip("record-without-text-field")
        elif value is None:
            summary.skip("null-text")
        elif not isinstance(value, str):
            summary.skip("non-string-text")
        else:
            try:
                sentences = document_sentences(value)
            except UnicodeEncodeError:  # a lone surrogate, e.g. "\ud800" in JSON
                summary.skip("invalid-unicode-text")
                continue
            if sentences:
                documents.append(("\n".join(sentences) + "\n\n").encode("utf-8"))
            else:
                summary.skip("empty-text")
    summary.counts["records in"] = records
    return b"".join(documents), summary


_CORPUS: Corpus | None = None


def _init_worker(corpus: Corpus | None) -> None:
    global _CORPUS
    _CORPUS = corpus


def _convert(index: int) -> tuple[bytes, Summary]:
    return convert_part(_CORPUS, _CORPUS.parts[index])


def write_text(corpus: Corpus, path: Path, workers: int | None = None) -> Summary:
    """Convert every part, in order, into the text file `path`; the counts of all parts."""
    summary = Summary("tokenize")
    summary.counts["records in"] = 0
    count = len(corpus.parts)
    workers = max(1, min(workers or default_workers(), count))
    with open(path, "wb") as out, progress(total=count, desc="read corpus", unit="part") as bar:
        if workers > 1:
            # fork: workers inherit the memory-mapped datasets instead of reloading them
            method = "fork" if "fork" in get_all_start_methods() else None
            with worker_pool(workers, method, _init_worker, (corpus,)) as pool:
                pending: deque = deque()  # in part order, at most workers + 2 in flight
                submitted = 0
                while submitted < count or pending:
                    while submitted < count and len(pending) < workers + 2:
                        pending.append(pool.apply_async(_convert, (submitted,)))
                        submitted += 1
                    data, part = pending.popleft().get()
                    out.write(data)
                    summary.add(part)
                    bar.update(1)
        else:
            for part_spec in corpus.parts:
                data, part = convert_part(corpus, part_spec)
                out.write(data)
                summary.add(part)
                bar.update(1)
    return summary
