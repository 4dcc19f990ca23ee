"""Wikipedia stages: resumable download against a local server, WikiExtractor and sentence
splitting on the real sample, counted skips on bad input, CLI wiring."""

from __future__ import annotations

import hashlib
import json
import random
import re
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from bertforge.cli import main
from bertforge.data.wiki import download, extract, preprocess
from support import alive, descendants

DATA = random.Random(7).randbytes(300_000)


# ---------------------------------------------------------------- local HTTP server
class _Handler(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's naming)
        srv = self.server
        rng = self.headers.get("Range")
        srv.ranges.append(rng)
        if srv.status_override:
            self.send_error(srv.status_override)
            return
        start = 0
        if rng and not srv.ignore_range:
            start = int(re.fullmatch(r"bytes=(\d+)-", rng).group(1))
            if start >= len(DATA):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(DATA)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(DATA) - 1}/{len(DATA)}")
        else:
            self.send_response(200)
        body = DATA[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if srv.cuts > 0:
            # Announce the whole body, send half, hang up: a dropped connection midway.
            srv.cuts -= 1
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.ranges, srv.cuts, srv.ignore_range, srv.status_override = [], 0, False, 0
    thread = threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}/dumps/enwiki-test.xml.bz2"
    yield srv
    srv.shutdown()
    srv.server_close()


def test_download_resumes_after_connection_cut(server, tmp_path):
    server.cuts = 1
    path = download(server.url, tmp_path, backoff=0)
    assert path == tmp_path / "enwiki-test.xml.bz2"
    assert path.read_bytes() == DATA
    assert server.ranges == [None, f"bytes={len(DATA) // 2}-"]
    assert not (tmp_path / "enwiki-test.xml.bz2.part").exists()


def test_download_resumes_part_file_of_killed_run(server, tmp_path):
    (tmp_path / "enwiki-test.xml.bz2.part").write_bytes(DATA[:1000])
    path = download(server.url, tmp_path, backoff=0)
    assert path.read_bytes() == DATA
    assert server.ranges == ["bytes=1000-"]


def test_download_restarts_when_server_ignores_range(server, tmp_path):
    server.ignore_range = True
    (tmp_path / "enwiki-test.xml.bz2.part").write_bytes(b"x" * 1000)
    path = download(server.url, tmp_path, backoff=0)
    assert path.read_bytes() == DATA
    assert server.ranges == ["bytes=1000-"]


def test_download_whole_part_file_is_completed_by_416(server, tmp_path):
    (tmp_path / "enwiki-test.xml.bz2.part").write_bytes(DATA)
    assert download(server.url, tmp_path, backoff=0).read_bytes() == DATA


def test_download_checksum_ok_and_skip_when_complete(server, tmp_path):
    digest = hashlib.sha256(DATA).hexdigest()
    path = download(server.url, tmp_path, checksum=f"sha256:{digest}", backoff=0)
    assert path.read_bytes() == DATA
    requests = len(server.ranges)
    assert download(server.url, tmp_path, checksum=f"sha256:{digest}") == path
    assert len(server.ranges) == requests  # complete output: no request at all


def test_download_checksum_mismatch(server, tmp_path):
    wrong = "0" * 32
    with pytest.raises(ValueError) as err:
        download(server.url, tmp_path, checksum=f"md5:{wrong}", backoff=0)
    message = str(err.value)
    assert "enwiki-test.xml.bz2" in message and wrong in message
    assert hashlib.md5(DATA).hexdigest() in message
    assert not (tmp_path / "enwiki-test.xml.bz2").exists()
    assert (tmp_path / "enwiki-test.xml.bz2.mismatch").read_bytes() == DATA


def test_download_http_errors(server, tmp_path):
    server.status_override = 404
    with pytest.raises(ValueError, match="HTTP 404"):
        download(server.url, tmp_path, backoff=0)
    assert len(server.ranges) == 1  # not retried
    server.status_override = 503
    with pytest.raises(ValueError, match="after 2 retries"):
        download(server.url, tmp_path, retries=2, backoff=0)
    assert len(server.ranges) == 1 + 3


@pytest.mark.parametrize("as_url", [True, False])
def test_download_local_file(tmp_path, as_url):
    src = tmp_path / "src" / "dump.xml.bz2"
    src.parent.mkdir()
    src.write_bytes(DATA)
    sha1 = hashlib.sha1(DATA).hexdigest()
    url = src.as_uri() if as_url else str(src)
    out = download(url, tmp_path / "out", checksum=f"sha1:{sha1}")
    assert out == tmp_path / "out" / "dump.xml.bz2" and out.read_bytes() == DATA
    with pytest.raises(ValueError, match="mismatch"):
        download(url, tmp_path / "other", checksum="sha1:" + "f" * 40)


def test_download_bad_arguments(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.bz2"):
        download(str(tmp_path / "nope.bz2"), tmp_path)
    src = tmp_path / "d.xml"
    src.write_bytes(b"x")
    for bad in ("crc32:1234", "sha1:xyz", "md5:abc"):
        with pytest.raises(ValueError, match="ALGO:HEX"):
            download(str(src), tmp_path / "o", checksum=bad)


# ---------------------------------------------------------------- extract + preprocess (sample)
def _docs(text: str) -> list[list[str]]:
    return [block.split("\n") for block in text.split("\n\n") if block]


def test_extract_sample(extracted_sample):
    files = sorted(p for p in extracted_sample.rglob("wiki_*"))
    assert files and all(p.parent.name == "AA" for p in files)
    docs = sum(p.read_text().count("<doc ") for p in files)
    assert docs == 106
    manifest = json.loads((extracted_sample / ".bertforge-extract.json").read_text())
    assert manifest["summary"]["counts"]["pages in"] == 206
    assert manifest["summary"]["counts"]["articles out"] == 106
    assert manifest["summary"]["skipped"] == {"redirect": 100}


def test_extract_rerun_is_skipped(wiki_sample, extracted_sample):
    before = {p: p.stat().st_mtime_ns for p in extracted_sample.rglob("*")}
    summary = extract(wiki_sample, extracted_sample)
    assert "already complete" in summary.line() and summary.counts["articles out"] == 106
    assert {p: p.stat().st_mtime_ns for p in extracted_sample.rglob("*")} == before


def test_preprocess_sample(extracted_sample, preprocessed_sample):
    outputs = sorted(preprocessed_sample.rglob("*.txt"))
    assert [p.relative_to(preprocessed_sample).as_posix() for p in outputs] == \
        ["AA/wiki_00.txt", "AA/wiki_01.txt", "AA/wiki_02.txt"]
    text = "".join(p.read_text(encoding="utf-8") for p in outputs)
    docs = _docs(text)
    assert len(docs) == 105  # 106 articles, one of which is empty
    sentences = sum(len(d) for d in docs)
    assert 19_000 < sentences < 22_000
    assert "\n\n\n" not in text and not any("" in d for d in docs)
    assert "<doc" not in text and "</doc>" not in text
    titles = re.findall(r'<doc [^>]*title="([^"]*)">',
                        "".join(p.read_text() for p in sorted(extracted_sample.rglob("wiki_*"))))
    assert len(titles) == 106
    firsts = [d[0] for d in docs]
    assert not set(titles) & set(firsts)  # no document starts with its title line
    assert firsts[0].startswith("Anarchism is a political philosophy")
    manifest = json.loads((preprocessed_sample / ".bertforge-preprocess.json").read_text())
    assert manifest["summary"]["counts"]["sentences out"] == sentences
    assert manifest["summary"]["skipped"] == {"empty-document": 1}


def test_preprocess_same_bytes_whatever_workers_and_rerun_skipped(
        extracted_sample, preprocessed_sample, tmp_path):
    one = preprocess(extracted_sample, tmp_path, workers=1)  # fixture used workers=2
    for ref in sorted(preprocessed_sample.rglob("*.txt")):
        assert (tmp_path / ref.relative_to(preprocessed_sample)).read_bytes() == ref.read_bytes()
    mtimes = [p.stat().st_mtime_ns for p in sorted(tmp_path.rglob("*.txt"))]
    again = preprocess(extracted_sample, tmp_path, workers=1)
    assert "already complete" in again.line()
    assert again.counts == one.counts
    assert [p.stat().st_mtime_ns for p in sorted(tmp_path.rglob("*.txt"))] == mtimes


# ---------------------------------------------------------------- bad input
def test_preprocess_bad_input_is_counted(tmp_path):
    src = tmp_path / "in"
    (src / "AA").mkdir(parents=True)
    (src / "AA" / "wiki_00").write_bytes(
        b'<doc id="1" url="u" title="Good">\nGood\n\nFirst sentence here. Second one follows.\n'
        b"Bad \xff\xfe bytes on this line.\nThird sentence.\n</doc>\n"
        b'<doc id="2" url="u" title="Short">\nShort\n\nOnly one sentence.\n</doc>\n'
        b'<doc id="3" url="u" title="Empty">\nEmpty\n\n\n</doc>\n'
        b"stray text outside a document\n"
        b'<doc id="4" url="u" title="Cut">\nCut\n\nThis document never ends.\n')
    (src / "AA" / "wiki_01").write_bytes(b"")
    summary = preprocess(src, tmp_path / "out", workers=2)
    assert summary.counts["files"] == 2
    assert summary.counts["documents in"] == 4
    assert summary.counts["documents out"] == 2
    assert summary.counts["sentences out"] == 4
    assert summary.counts["one-sentence documents (kept)"] == 1
    assert dict(summary.skipped) == {"invalid-utf8-line": 1, "empty-document": 1,
                                     "line-outside-doc": 1, "unterminated-doc": 1,
                                     "empty-file": 1}
    assert "1 invalid-utf8-line" in summary.line()
    out = (tmp_path / "out" / "AA" / "wiki_00.txt").read_text(encoding="utf-8")
    assert out == ("First sentence here.\nSecond one follows.\nThird sentence.\n\n"
                   "Only one sentence.\n\n")
    assert not (tmp_path / "out" / "AA" / "wiki_01.txt").exists()


def test_preprocess_missing_or_empty_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing"):
        preprocess(tmp_path / "missing", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no input files"):
        preprocess(tmp_path / "empty", tmp_path / "out")


SMALL_DUMP = """<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/" version="0.10">
  <siteinfo>
    <sitename>Wikipedia</sitename>
    <namespaces>
      <namespace key="1" case="first-letter">Talk</namespace>
      <namespace key="10" case="first-letter">Template</namespace>
    </namespaces>
  </siteinfo>
  <page>
    <title>Sample Article</title>
    <ns>0</ns>
    <id>10</id>
    <revision>
      <id>100</id>
      <text bytes="80" xml:space="preserve">'''Sample''' is an article. It has two sentences.</text>
    </revision>
  </page>
  <page>
    <title>Old Name</title>
    <ns>0</ns>
    <id>11</id>
    <redirect title="Sample Article" />
    <revision>
      <id>101</id>
      <text bytes="30" xml:space="preserve">#REDIRECT [[Sample Article]]</text>
    </revision>
  </page>
  <page>
    <title>Talk:Sample Article</title>
    <ns>1</ns>
    <id>12</id>
    <revision>
      <id>102</id>
      <text bytes="20" xml:space="preserve">A talk page.</text>
    </revision>
  </page>
</mediawiki>
"""


def test_extract_replaces_partial_output_and_counts_pages(tmp_path):
    dump = tmp_path / "small.xml"
    dump.write_text(SMALL_DUMP)
    out = tmp_path / "out"
    # Leftovers of a killed run and of an earlier run with more output files.
    (out / ".extract-partial" / "AA").mkdir(parents=True)
    (out / ".extract-partial" / "AA" / "wiki_00").write_text("garbage")
    (out / "AB").mkdir()
    (out / "AB" / "wiki_00").write_text("stale")
    summary = extract(dump, out, workers=1)
    assert summary.counts["pages in"] == 3 and summary.counts["articles out"] == 1
    assert dict(summary.skipped) == {"redirect": 1, "non-article-namespace": 1}
    assert not (out / "AB").exists() and not (out / ".extract-partial").exists()
    text = (out / "AA" / "wiki_00").read_text()
    assert text.count("<doc ") == 1 and "It has two sentences." in text


@pytest.mark.parametrize("name,content,message", [
    ("random.xml.bz2", random.Random(1).randbytes(4000), "WikiExtractor failed"),
    ("notes.xml", b"plain text, not a MediaWiki export\n", "no <page> element")])
def test_extract_rejects_non_dumps(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError, match=message):
        extract(tmp_path / name, tmp_path / "out", workers=1)
    assert not (tmp_path / "out" / ".bertforge-extract.json").exists()


def test_extract_missing_dump(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such-dump.xml.bz2"):
        extract(tmp_path / "no-such-dump.xml.bz2", tmp_path / "out")


# ---------------------------------------------------------------- CLI
@pytest.mark.parametrize("argv", [["wiki", "download"], ["wiki", "extract"],
                                  ["wiki", "preprocess"], ["vocab", "train"], ["sample", "fetch"]])
def test_cli_help(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--help"])
    assert exit_.value.code == 0
    assert f"bertforge {' '.join(argv)}" in capsys.readouterr().out


def test_cli_errors_and_summary_line(tmp_path, capsys):
    assert main(["wiki", "extract", str(tmp_path / "gone.xml.bz2"), str(tmp_path / "o")]) == 2
    assert "gone.xml.bz2" in capsys.readouterr().err
    src = tmp_path / "in"
    src.mkdir()
    (src / "wiki_00").write_text('<doc id="1" url="u" title="T">\nT\n\nOne. Two.\n</doc>\n')
    assert main(["wiki", "preprocess", str(src), str(tmp_path / "pre"), "--workers", "1"]) == 0
    assert capsys.readouterr().out.strip() == (
        "wiki preprocess: 1 files, 1 documents in, 1 documents out, 2 sentences out, "
        "0 one-sentence documents (kept); skipped: none")


# ---------------------------------------------------------------- entities, orphans
def test_preprocess_unescapes_html_entities(tmp_path):
    src = tmp_path / "extracted" / "AA"
    src.mkdir(parents=True)
    (src / "wiki_00").write_text('<doc id="1" url="u" title="AT&amp;T">\nAT&amp;T\n'
                                 "AT&amp;T sold &quot;phones&quot; for &lt;10 &#36; in 1990.\n"
                                 "</doc>\n")
    preprocess(tmp_path / "extracted", tmp_path / "out", workers=1)
    assert (tmp_path / "out" / "AA" / "wiki_00.txt").read_text() == \
        'AT&T sold "phones" for <10 $ in 1990.\n\n'


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads the process tree from /proc")
def test_killed_extract_leaves_no_wikiextractor_running(wiki_sample, tmp_path):
    code = ("import sys; from bertforge.data.wiki import extract; "
            "extract(sys.argv[1], sys.argv[2], workers=2)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(wiki_sample), str(tmp_path / "out")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seen: set[int] = set()
    deadline = time.monotonic() + 30
    while len(seen) < 3 and proc.poll() is None and time.monotonic() < deadline:
        seen |= set(descendants(proc.pid))  # WikiExtractor and its worker processes
        time.sleep(0.02)
    assert len(seen) >= 3, "WikiExtractor finished before the test could stop it"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    time.sleep(0.5)
    assert [pid for pid in seen if alive(pid)] == []
    assert not (tmp_path / "out" / ".bertforge-extract.json").exists()
