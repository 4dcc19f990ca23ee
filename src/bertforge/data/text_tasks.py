"""Input text -> deterministic, bounded tasks cut at document boundaries (for `tokenize`).

`bertforge tokenize` must run in bounded memory on a 20 GB corpus, on all cores, with the
same output for any number of workers. So the input (files in sorted order, as one
stream) is cut every `task_bytes` (1 MiB by default) into tasks, and a task moves each of
its cuts forward to the next document boundary (just past a blank line) itself, by the same
rule its neighbour uses: the tasks tile the input exactly, depend only on the input and
`task_bytes`, and nothing reads the corpus up front to find them (finding a boundary reads
~one document, ~10 kB). A document with no blank line within `limit` bytes (16 MiB by
default; Wikipedia's longest article is ~0.5 MB) is cut at a line instead, and counted, so
that a task's text stays bounded even for text without document breaks.

Lines are read as bytes and decoded one by one only when the whole piece is not UTF-8, so
an undecodable line is dropped and counted ('invalid-utf8-line') instead of failing the run
(the decode of a clean 1 MB piece costs ~1 ms).
"""

from __future__ import annotations

from pathlib import Path

from bertforge.data.stage import Summary

Piece = tuple[str, int, int, int]  # path, start, end (raw cut offsets), file size


def find_input_files(inputs: list[Path], output_dir: Path | None = None) -> list[Path]:
    """Files named, and files under directories named (recursively, sorted; dotfiles and
    dot-directories such as stage manifests left out, and so is `output_dir`, where our own
    shards go)."""
    files: list[Path] = []
    skip = Path(output_dir).resolve() if output_dir is not None else None
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(p for p in item.rglob("*") if p.is_file() and not any(
                part.startswith(".") for part in p.relative_to(item).parts)
                and (skip is None or not p.resolve().is_relative_to(skip)))
            if not found:
                raise ValueError(f"input directory {item} holds no files; pass the output "
                                 "directory of `bertforge wiki preprocess`")
            files.extend(found)
        elif item.is_file():
            files.append(item)
        else:
            raise FileNotFoundError(f"input {item}: no such file or directory (tokenize reads "
                                    "text files with one sentence per line, a blank line "
                                    "between documents, JSONL, Parquet, saved Hugging Face "
                                    "datasets, or directories of them; a hub dataset name "
                                    "needs --input-format hf)")
    return files


def plan_tasks(sizes: list[tuple[str, int]], task_bytes: int) -> list[list[Piece]]:
    """Cut the files' concatenation every `task_bytes`; each task gets its pieces of files.

    Cuts are raw byte offsets; a task moves each of its inner cuts to the next document
    boundary itself, with the same rule as its neighbour, so tasks tile the input exactly.
    """
    tasks: list[list[Piece]] = []
    current: list[Piece] = []
    room = task_bytes
    for path, size in sizes:
        pos = 0
        while pos < size:
            take = min(room, size - pos)
            current.append((path, pos, pos + take, size))
            pos += take
            room -= take
            if room == 0:
                tasks.append(current)
                current, room = [], task_bytes
    if current:
        tasks.append(current)
    return tasks


def document_boundary(f, offset: int, size: int, limit: int) -> tuple[int, bool]:
    """(The first document start at or after `offset`, False): just past the first blank
    line that starts at or after it; the file's start and end are boundaries. When no blank
    line comes within `limit` bytes (a huge document, or text without document breaks):
    (the first line start at or after `offset`, True), so that a task's text stays bounded."""
    if offset <= 0 or offset >= size:
        return min(max(offset, 0), size), False
    f.seek(offset - 1)
    if f.read(1) != b"\n":
        f.readline()  # finish the partial line
    line_start = f.tell()
    while True:
        line = f.readline()
        if not line:
            return size, False
        if not line.strip():
            return f.tell(), False
        if f.tell() - line_start > limit:
            return line_start, True


def read_piece(piece: Piece, limit: int) -> tuple[bytes, bool]:
    """The piece's text, moved to document boundaries, and whether its start cuts a document."""
    path, start, end, size = piece
    with open(path, "rb") as f:
        begin, cut = document_boundary(f, start, size, limit)
        stop, _ = document_boundary(f, end, size, limit)
        if stop <= begin:
            return b"", cut
        f.seek(begin)
        return f.read(stop - begin), cut


def split_documents(data: bytes, sentences: list[str], doc_sizes: list[int],
                    summary: Summary) -> None:
    """Append the sentences (stripped lines) of `data` and each document's sentence count."""
    try:
        lines = data.decode("utf-8").split("\n")
    except UnicodeDecodeError:  # decode line by line; count and drop the bad lines only
        lines = []
        for raw in data.split(b"\n"):
            try:
                lines.append(raw.decode("utf-8"))
            except UnicodeDecodeError:
                summary.skip("invalid-utf8-line")
    count = 0
    for line in lines:
        line = line.strip()
        if line:
            sentences.append(line)
            count += 1
        elif count:
            doc_sizes.append(count)
            count = 0
    if count:
        doc_sizes.append(count)


def refuse_markup(data: bytes, piece: Piece) -> None:
    """ValueError naming the file of a WikiExtractor `<doc id=...>` or `</doc>` line in a piece
    of input text: such text has not been through `wiki preprocess`, and its titles and tags
    would become training text. Two C-level substring scans, ~1 ms per MiB (tokenizing that
    MiB takes ~200 ms)."""
    for tag in (b"<doc id=", b"</doc>"):
        at = data.find(tag)
        while at != -1:
            if at == 0 or data[at - 1] == 0x0A:  # at a line start
                raise ValueError(f"{piece[0]}: a WikiExtractor {tag.decode()}... line (near byte "
                                 f"{piece[1] + at:,}): this is raw `bertforge wiki extract` "
                                 "output; run `bertforge wiki preprocess` on it and tokenize "
                                 "that")
            at = data.find(tag, at + 1)


def read_task(pieces: list[Piece], limit: int, summary: Summary) -> tuple[list[str], list[int]]:
    """(sentences, sentences per document) of a task's pieces; counts in `summary`."""
    sentences: list[str] = []
    doc_sizes: list[int] = []
    for piece in pieces:
        data, cut = read_piece(piece, limit)
        if cut:
            summary.counts["long documents cut"] += 1
        refuse_markup(data, piece)
        split_documents(data, sentences, doc_sizes, summary)
    summary.counts.update({"documents in": len(doc_sizes), "sentences": len(sentences)})
    return sentences, doc_sizes
