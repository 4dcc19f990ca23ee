"""Wikipedia stages: download a dump (resumable), extract it with WikiExtractor, split sentences.

download   HTTP(S) with the standard library, streamed to `<name>.part` in 1 MiB chunks and
           renamed into place at the end. After an interruption (a dropped connection inside
           the call, or a killed process before a re-run) it resumes with `Range: bytes=N-`;
           a server that ignores the range (200 instead of 206) restarts from zero. A
           checksum (md5/sha1/sha256) is verified after the last byte: one extra read of
           the file (~1-2 s per GB) instead of hashing across resumes, which would need the
           hash state to survive a killed process. file:// URLs and local paths are copied.
extract    WikiExtractor 3.1.0 (the PyPI package) as a subprocess into a staging folder that
           is moved into place only when it succeeds, so a killed run never leaves partial
           output that looks complete. It runs in its own process group, stopped whole when
           extract is interrupted (Ctrl-C, SIGTERM, SIGHUP): no worker is left an orphan.
           Beside it a thread counts the dump's pages by fate (article, redirect, other
           namespace) so the summary accounts for every page; that costs one more
           decompression of the dump on one core (WikiExtractor itself reads it twice:
           templates, then text), ~0.2 s on the 1.7 MB sample.
preprocess one sentence per line (blingfire, ~15 MB/s per core, no model download), a blank
           line after each document, titles dropped, HTML entities unescaped (WikiExtractor
           leaves &amp; and &quot; as text). One output file per input file, files in
           parallel: each file is processed alone, so the bytes written do not depend on
           --workers. Memory is bounded by one document.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import hashlib
import html
import http.client
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path

from bertforge.data import stage
from bertforge.data.stage import Summary, default_workers
from bertforge.files import atomic_output
from bertforge.processes import guarded_command, worker_pool
from bertforge.progress import progress

DEFAULT_DUMP_URL = ("https://dumps.wikimedia.org/enwiki/latest/"
                    "enwiki-latest-pages-articles-multistream.xml.bz2")
# Wikimedia asks clients to identify themselves; the default urllib agent may be throttled.
USER_AGENT = "bertforge/0.1 (BERT pre-training data pipeline; python-urllib)"
_CHUNK = 1 << 20
_RETRYABLE_HTTP = {408, 429, 500, 502, 503, 504}
_HASHES = ("md5", "sha1", "sha256")


# ---------------------------------------------------------------- download
def download(url: str | None, output_dir: Path, checksum: str | None = None, *,
             retries: int = 5, backoff: float = 2.0, timeout: float = 60.0) -> Path:
    """Fetch `url` (http(s), file:// or a local path; default: the latest English dump) into
    output_dir and return the file's path.

    An existing complete output is kept (and checked against `checksum` when given). An
    interrupted download resumes from `<name>.part`. On a checksum mismatch the bytes are
    moved to `<name>.mismatch` (a re-run then starts afresh instead of resuming onto bad
    bytes; inspect or delete that file) and ValueError names the file and both digests.
    """
    url = url or DEFAULT_DUMP_URL
    expected = _parse_checksum(checksum) if checksum else None
    parsed = urllib.parse.urlparse(url)
    remote = parsed.scheme in ("http", "https")
    if remote:
        name = Path(urllib.parse.unquote(parsed.path)).name
        if not name:
            raise ValueError(f"cannot name the download: {url} has no file name in its path")
        source = None
    else:
        source = Path(urllib.request.url2pathname(parsed.path)) if parsed.scheme == "file" \
            else Path(url).expanduser()
        if not source.is_file():
            raise FileNotFoundError(f"dump {url} not found (expected an http(s) URL, a file:// "
                                    "URL or the path of an existing file)")
        name = source.name
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    target = output_dir / name
    if target.is_file():
        if expected:
            _verify(target, expected, on_mismatch=None)
        print(f"wiki download: {target} already present, skipped", file=sys.stderr)
        return target
    part = target.with_name(name + ".part")
    if remote:
        _http_download(url, part, retries=retries, backoff=backoff, timeout=timeout)
    else:
        _copy(source, part)
    if expected:
        _verify(part, expected, on_mismatch=target.with_name(name + ".mismatch"))
    os.replace(part, target)
    return target


def _parse_checksum(text: str) -> tuple[str, str]:
    algo, _, digest = text.partition(":")
    algo, digest = algo.strip().lower(), digest.strip().lower()
    if algo not in _HASHES or not re.fullmatch(r"[0-9a-f]+", digest) \
            or len(digest) != hashlib.new(algo).digest_size * 2:
        raise ValueError(f"checksum {text!r} is not ALGO:HEX with ALGO one of "
                         f"{', '.join(_HASHES)} and a full hex digest (e.g. sha1:<40 hex>)")
    return algo, digest


def _verify(path: Path, expected: tuple[str, str], on_mismatch: Path | None) -> None:
    algo, want = expected
    digest = hashlib.new(algo)
    with open(path, "rb") as f, _byte_bar(path.stat().st_size, f"{algo} {path.name}") as bar:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            bar.update(len(chunk))
    got = digest.hexdigest()
    if got == want:
        return
    where = f"{path}"
    if on_mismatch is not None:
        os.replace(path, on_mismatch)
        where = f"{path.name} (kept as {on_mismatch} for inspection; delete it)"
    else:
        where += " (delete it to download again)"
    raise ValueError(f"checksum mismatch for {where}: {algo} is {got}, expected {want}")


def _copy(source: Path, part: Path) -> None:
    with open(source, "rb") as src, open(part, "wb") as dst, \
            _byte_bar(source.stat().st_size, f"copy {source.name}") as bar:
        while chunk := src.read(_CHUNK):
            dst.write(chunk)
            bar.update(len(chunk))


def _byte_bar(total: int | None, desc: str):
    return progress(total=total, desc=desc, unit="B", unit_scale=True)


class _Interrupted(Exception):
    """The server closed the body before Content-Length bytes arrived."""


def _http_download(url: str, part: Path, *, retries: int, backoff: float, timeout: float) -> None:
    """Stream url into part, resuming with Range after every interruption (bounded retries
    without progress; any progress resets the count)."""
    failures = 0
    while True:
        offset = part.stat().st_size if part.exists() else 0
        request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
        if offset:
            request.add_header("Range", f"bytes={offset}-")
        received = 0
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                if offset and response.status == 206:
                    start, total = _content_range(response.headers.get("Content-Range", ""))
                    if start != offset:  # a server answering another range: start over
                        part.unlink()
                        continue
                    mode = "ab"
                else:  # 200: full body (no .part yet, or the server ignored Range)
                    offset, mode = 0, "wb"
                    length = response.headers.get("Content-Length")
                    total = int(length) if length and length.isdigit() else None
                with open(part, mode) as out, _byte_bar(total, part.name[:-5]) as bar:
                    bar.n = offset
                    while chunk := response.read(_CHUNK):
                        out.write(chunk)
                        received += len(chunk)
                        bar.update(len(chunk))
            size = part.stat().st_size
            if total is not None and size < total:
                raise _Interrupted(f"connection closed at byte {size:,} of {total:,}")
            if total is not None and size > total:
                part.unlink()  # cannot be a prefix of the file the server has now
                raise _Interrupted(f"got {size:,} bytes, more than the {total:,} announced")
            return
        except urllib.error.HTTPError as err:
            if err.code == 416 and offset:
                # Range not satisfiable: either .part is already whole, or it is longer
                # than the file now on the server (a newer dump): then start over.
                _, total = _content_range(err.headers.get("Content-Range", ""))
                if total == offset:
                    return
                part.unlink()
                continue
            if err.code not in _RETRYABLE_HTTP:
                raise ValueError(f"download of {url} failed: HTTP {err.code} {err.reason}") from None
            error: Exception = err
        except (urllib.error.URLError, ConnectionError, TimeoutError, http.client.HTTPException,
                _Interrupted) as err:
            error = err
        failures = 0 if received else failures
        failures += 1
        if failures > retries:
            have = part.stat().st_size if part.exists() else 0
            kept = (f"; {have:,} bytes are kept in {part}: re-run the same command to resume"
                    if have else "")
            raise ValueError(f"download of {url} failed after {retries} retries "
                             f"({error}){kept}") from None
        delay = min(backoff * 2 ** (failures - 1), 30.0)  # 2+4+8+16+30 s by default
        print(f"wiki download: {error}; retrying in {delay:.0f} s "
              f"({failures}/{retries})", file=sys.stderr)
        time.sleep(delay)


def _content_range(header: str) -> tuple[int | None, int | None]:
    """'bytes 100-199/1000' -> (100, 1000); 'bytes */1000' -> (None, 1000)."""
    m = re.fullmatch(r"\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)\s*", header)
    if not m:
        return None, None
    start = int(m.group(1)) if m.group(1) else None
    total = int(m.group(2)) if m.group(2) != "*" else None
    return start, total


# ---------------------------------------------------------------- extract
def extract(dump: Path, output_dir: Path, workers: int | None = None,
            bytes_per_file: str = "1M") -> Summary:
    """WikiExtractor on a .xml.bz2/.xml(.gz) dump into output_dir/AA/wiki_00, ...

    Output does not depend on `workers` (WikiExtractor writes articles in page order).
    """
    dump, output_dir = Path(dump), Path(output_dir)
    if not dump.is_file():
        raise FileNotFoundError(f"dump {dump} not found; download one with `bertforge wiki "
                                "download` or fetch the sample with `bertforge sample fetch`")
    workers = workers or default_workers()
    params = {"bytes_per_file": bytes_per_file, "wikiextractor": version("wikiextractor")}
    run = stage.begin(output_dir, "extract", params, [dump], outputs=r"wiki_\d+(\.bz2)?",
                      scratch=[".extract-partial"], nested=True)
    if run.done is not None:
        return run.done

    staging = output_dir / ".extract-partial"
    staging.mkdir(parents=True)
    pages: Counter = Counter()
    stop = threading.Event()
    counter = threading.Thread(target=lambda: pages.update(_count_pages(dump, stop)), daemon=True)
    counter.start()
    log_path = output_dir / ".extract-log.txt"
    # Guarded: WikiExtractor and its workers die with this process even when it is killed
    # with SIGKILL (bertforge/processes.py).
    cmd = guarded_command("wikiextractor.WikiExtractor", "--processes", workers,
                          "-b", bytes_per_file, "--quiet", "-o", staging, dump)
    print(f"wiki extract: WikiExtractor on {dump} with {workers} processes", file=sys.stderr)
    with open(log_path, "wb") as log, _byte_bar(None, "extract (text written)") as bar, \
            _terminate_on_signals():
        # Its own process group: WikiExtractor's worker processes are stopped with it (a
        # killed extract left them running as orphans).
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            while True:
                try:
                    proc.wait(timeout=0.5)
                    break
                except subprocess.TimeoutExpired:
                    bar.n = sum(f.stat().st_size for f in staging.rglob("wiki_*"))
                    bar.refresh()
        finally:
            if proc.poll() is None:  # interrupted (Ctrl-C, SIGTERM): stop counting too
                stop.set()
            _stop_group(proc)
    if proc.returncode != 0:
        stop.set()
        tail = "\n".join(log_path.read_text(errors="replace").strip().splitlines()[-8:])
        raise ValueError(f"WikiExtractor failed on {dump} (exit {proc.returncode}); is it a "
                         f"MediaWiki XML dump (.xml, .xml.bz2)? Last lines of {log_path}:\n{tail}")
    counter.join()
    if not pages["pages"]:
        shutil.rmtree(staging)
        raise ValueError(f"no <page> element in {dump}: expected a MediaWiki XML export "
                         "(e.g. enwiki-latest-pages-articles-multistream.xml.bz2)")

    outputs = _move_into_place(staging, output_dir)
    summary = Summary("wiki extract")
    summary.counts["pages in"] = pages["pages"]
    docs = {p: _count_docs(p) for p in outputs}
    summary.counts["articles out"] = sum(docs.values())
    summary.counts["files"] = len(outputs)
    for reason, key in (("redirect", "redirect"), ("non-article-namespace", "non-article")):
        if pages[key]:
            summary.skip(reason, pages[key])
    # Duplicate ids, pages in the template namespace, pages WikiExtractor failed on.
    rest = pages["article"] - summary.counts["articles out"]
    if rest > 0:
        summary.skip("not-extracted-by-wikiextractor", rest)
    run.finish(docs, summary)
    return summary


class _Terminated(BaseException):
    """SIGTERM/SIGHUP arrived: unwind (stopping WikiExtractor), then exit 128 + signal."""


@contextlib.contextmanager
def _terminate_on_signals():
    """Turn SIGTERM/SIGHUP into an exception while the block runs, so `finally` clauses run
    (Python's default for SIGTERM ends the process at once, skipping them); the process
    then exits with the usual 128 + signal number."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return

    def handler(signum, frame):
        raise _Terminated(signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    except _Terminated as err:
        raise SystemExit(128 + err.args[0]) from None
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _stop_group(proc: subprocess.Popen) -> None:
    """Stop the process group led by `proc` (WikiExtractor and its workers): SIGTERM, then
    SIGKILL after 5 s. Its workers may outlive a leader that already exited."""
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break  # nobody left in the group
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        if not _group_alive(proc.pid):
            break
        time.sleep(0.1)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _open_dump(path: Path):
    if path.suffix == ".bz2":
        return bz2.open(path, "rb")
    if path.suffix == ".gz":
        return gzip.open(path, "rb")
    return open(path, "rb")


def _count_pages(dump: Path, stop: threading.Event) -> Counter:
    """Pages of the dump by fate, mirroring WikiExtractor's filter (ns 0, not a redirect)."""
    counts: Counter = Counter()
    ns, redirect = b"", False
    try:
        with _open_dump(dump) as f:
            for line in f:
                if b"<" not in line:
                    continue
                s = line.strip()
                if s == b"<page>":
                    ns, redirect = b"", False
                elif s.startswith(b"<ns>"):
                    ns = s[4:].split(b"<", 1)[0]
                elif s.startswith(b"<redirect"):
                    redirect = True
                elif s == b"</page>":
                    if stop.is_set():
                        break
                    counts["pages"] += 1
                    counts["redirect" if redirect else "article" if ns == b"0" else "non-article"] += 1
    except (OSError, EOFError):
        pass  # a corrupt dump: WikiExtractor's own failure is the error to report
    return counts


def _move_into_place(staging: Path, output_dir: Path) -> list[Path]:
    """Replace earlier WikiExtractor files (XX/wiki_NN) in output_dir by the staged ones."""
    pattern = re.compile(r"wiki_\d+(\.bz2)?")
    for sub in output_dir.iterdir():
        if sub.is_dir() and re.fullmatch(r"[A-Z]{2}", sub.name):
            for f in sub.iterdir():
                if pattern.fullmatch(f.name):
                    f.unlink()
            if not any(sub.iterdir()):
                sub.rmdir()
    outputs = []
    for f in sorted(staging.rglob("*")):
        if f.is_file():
            dest = output_dir / f.relative_to(staging)
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(f, dest)
            outputs.append(dest)
    shutil.rmtree(staging)
    return outputs


def _count_docs(path: Path) -> int:
    opener = bz2.open if path.suffix == ".bz2" else open
    with opener(path, "rb") as f:
        return sum(1 for line in f if line.startswith(b"<doc "))


# ---------------------------------------------------------------- preprocess
def preprocess(input_dir: Path, output_dir: Path, workers: int | None = None) -> Summary:
    """WikiExtractor output -> text with one sentence per line and a blank line after each
    document; input_dir/AA/wiki_00 becomes output_dir/AA/wiki_00.txt."""
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    inputs = _input_files(input_dir)
    workers = max(1, min(workers or default_workers(), len(inputs)))
    # format 2: HTML entities unescaped
    params = {"input_dir": str(input_dir.resolve()),
              "splitter": f"blingfire {version('blingfire')}", "format": 2}
    run = stage.begin(output_dir, "preprocess", params, [path for _, path in inputs],
                      outputs=r".+\.txt", nested=True)
    if run.done is not None:
        return run.done

    jobs = [(str(path), str(output_dir / _output_name(rel))) for rel, path in inputs]
    summary = Summary("wiki preprocess")
    outputs = {}
    with progress(total=len(jobs), desc="preprocess", unit="file") as bar:
        if workers == 1:
            results: Iterator = map(_preprocess_file, jobs)
            pool = None
        else:
            pool = worker_pool(workers)
            results = pool.imap(_preprocess_file, jobs, chunksize=1)
        try:
            for written, part in results:
                summary.add(part)
                if written:
                    outputs[Path(written)] = part.counts["documents out"]
                bar.update(1)
        finally:
            if pool is not None:
                pool.terminate()
    run.finish(outputs, summary)
    return summary


def _input_files(input_dir: Path) -> list[tuple[str, Path]]:
    """(relative posix path, path) of every visible file under input_dir, sorted."""
    if input_dir.is_file():
        return [(input_dir.name, input_dir)]
    if not input_dir.is_dir():
        raise FileNotFoundError(f"input directory {input_dir} not found (expected WikiExtractor "
                                "output, from `bertforge wiki extract`)")
    files = []
    for path in input_dir.rglob("*"):
        rel = path.relative_to(input_dir)
        if path.is_file() and not any(part.startswith(".") for part in rel.parts):
            files.append((rel.as_posix(), path))
    if not files:
        raise ValueError(f"no input files under {input_dir} (expected WikiExtractor output, "
                         "from `bertforge wiki extract`)")
    return sorted(files)


def _output_name(rel: str) -> str:
    return (rel[:-4] if rel.endswith(".bz2") else rel) + ".txt"


def _preprocess_file(job: tuple[str, str]) -> tuple[str | None, Summary]:
    """One WikiExtractor file -> one text file; the written path (None if skipped) and counts."""
    from blingfire import text_to_sentences

    src, dst = Path(job[0]), Path(job[1])
    summary = Summary("wiki preprocess")
    for key in ("files", "documents in", "documents out", "sentences out",
                "one-sentence documents (kept)"):
        summary.counts[key] = 0
    summary.counts["files"] = 1
    if src.stat().st_size == 0:
        summary.skip("empty-file")
        return None, summary
    opener = bz2.open if src.suffix == ".bz2" else open
    with opener(src, "rb") as f, atomic_output(dst) as tmp, open(tmp, "w", encoding="utf-8") as out:
        doc: list[str] | None = None  # sentences of the open document; None: outside one
        expect_title = False
        for raw in f:
            stripped = raw.strip()
            if raw.startswith(b"<doc") and stripped.endswith(b">") and raw[4:5] in (b" ", b">"):
                if doc is not None:
                    summary.skip("unterminated-doc")
                summary.counts["documents in"] += 1
                doc, expect_title = [], True
                continue
            if stripped == b"</doc>" and doc is not None:
                _write_doc(doc, out, summary)
                doc = None
                continue
            if doc is None:
                if stripped:
                    summary.skip("line-outside-doc")
                continue
            if expect_title:  # WikiExtractor repeats the title as the doc's first line
                expect_title = False
                continue
            try:
                line = stripped.decode("utf-8")
            except UnicodeDecodeError:
                summary.skip("invalid-utf8-line")
                continue
            # WikiExtractor leaves entities of the wikitext (&amp;, &nbsp;, &quot;) as text
            line = html.unescape(line)
            if line:
                doc.extend(s for s in (t.strip() for t in text_to_sentences(line).split("\n")) if s)
        if doc is not None:
            summary.skip("unterminated-doc")
    return str(dst), summary


def _write_doc(sentences: list[str], out, summary: Summary) -> None:
    if not sentences:
        summary.skip("empty-document")
        return
    out.write("\n".join(sentences))
    out.write("\n\n")
    summary.counts["documents out"] += 1
    summary.counts["sentences out"] += len(sentences)
    if len(sentences) == 1:
        summary.counts["one-sentence documents (kept)"] += 1
