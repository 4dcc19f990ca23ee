"""Worker processes die with their parent, whatever stops it (bertforge/processes.py)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from support import alive, descendants

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="PR_SET_PDEATHSIG and /proc are Linux's")

# Workers that would sleep for a minute: without the guard they outlive a killed parent.
POOL_SCRIPT = """
import sys, time
from bertforge.processes import worker_pool
with worker_pool(2, sys.argv[1]) as pool:
    print("started", flush=True)
    pool.map(time.sleep, [60, 60])
"""


def wait_for_descendants(proc: subprocess.Popen, at_least: int, timeout: float = 60) -> set[int]:
    seen: set[int] = set()
    deadline = time.monotonic() + timeout
    while len(seen) < at_least and proc.poll() is None and time.monotonic() < deadline:
        seen |= set(descendants(proc.pid))
        time.sleep(0.02)
    assert len(seen) >= at_least, f"only {len(seen)} child processes appeared"
    return seen


def assert_all_gone(pids: set[int], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [p for p in pids if alive(p)] == []


@pytest.mark.parametrize("method", ["fork", "spawn"])
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_pool_workers_die_with_their_parent(method, sig):
    proc = subprocess.Popen([sys.executable, "-c", POOL_SCRIPT, method], stdout=subprocess.PIPE)
    assert proc.stdout.readline() == b"started\n"
    workers = wait_for_descendants(proc, 2)
    proc.send_signal(sig)
    assert proc.wait(timeout=30) == -sig
    assert_all_gone(workers)


def big_dump(path: Path, pages: int = 40_000) -> Path:
    """A MediaWiki export of `pages` articles (~16 MB): WikiExtractor needs ~6 s on it with
    2 workers, long enough that an orphan would still be running when the test looks."""
    text = ("'''Article {i}''' is a test page about the number {i}. " * 5).strip()
    with open(path, "w") as f:
        f.write('<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/" version="0.10">\n'
                "<siteinfo>\n<sitename>Wikipedia</sitename>\n<namespaces>\n"
                '<namespace key="10" case="first-letter">Template</namespace>\n'
                "</namespaces>\n</siteinfo>\n")  # WikiExtractor needs the template prefix
        for i in range(1, pages + 1):
            f.write(f"<page>\n<title>Article {i}</title>\n<ns>0</ns>\n<id>{i}</id>\n"
                    f'<revision>\n<id>{i}</id>\n<text xml:space="preserve">{text.format(i=i)}'
                    "</text>\n</revision>\n</page>\n")
        f.write("</mediawiki>\n")
    return path


def test_sigkilled_extract_leaves_no_wikiextractor_and_reruns_cleanly(tmp_path):
    dump, out = big_dump(tmp_path / "big.xml"), tmp_path / "out"
    cmd = [sys.executable, "-m", "bertforge", "wiki", "extract", str(dump), str(out),
           "--workers", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seen = wait_for_descendants(proc, 4)  # WikiExtractor, its reducer and 2 extract workers
    proc.kill()
    proc.wait(timeout=30)
    assert_all_gone(seen, timeout=2.0)
    assert (out / ".extract-partial").is_dir()  # a killed run's leftovers ...
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "40,000 articles out" in done.stdout
    assert not (out / ".extract-partial").exists()  # ... gone after the next run
