"""The embedded sample: cache hits need no network; the wheel path is exercised with a
locally built stand-in wheel (the real one comes from PyPI in `bertforge sample fetch`)."""

from __future__ import annotations

import subprocess
import zipfile

import pytest

from bertforge.data import sample
from bertforge.data.sample import SAMPLE_MEMBER, SAMPLE_NAME, SAMPLE_SIZE, fetch_sample


def test_cached_sample_is_returned_without_pip(wiki_sample, monkeypatch):
    def no_pip(*args, **kwargs):
        raise AssertionError("pip must not run when the sample is cached")

    monkeypatch.setattr(subprocess, "run", no_pip)
    assert fetch_sample(wiki_sample.parent) == wiki_sample
    assert wiki_sample.stat().st_size == SAMPLE_SIZE
    assert wiki_sample.read_bytes()[:3] == b"BZh"


def test_cache_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("BERTFORGE_CACHE", str(tmp_path / "c"))
    assert sample.default_cache_dir() == tmp_path / "c"


def _fake_wheel(directory, payload: bytes):
    directory.mkdir(parents=True, exist_ok=True)
    wheel = directory / "gensim-4.4.0-cp311-cp311-manylinux_x86_64.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("gensim/__init__.py", "")
        zf.writestr(SAMPLE_MEMBER, payload)
    return wheel


def test_fetch_extracts_member_from_wheel(wiki_sample, tmp_path, monkeypatch):
    wheel = _fake_wheel(tmp_path / "w", wiki_sample.read_bytes())
    monkeypatch.setattr(sample, "_download_wheel", lambda dest: wheel)
    cache = tmp_path / "cache"
    (cache).mkdir()
    (cache / SAMPLE_NAME).write_bytes(b"truncated by an earlier crash")
    path = fetch_sample(cache)
    assert path == cache / SAMPLE_NAME and path.read_bytes() == wiki_sample.read_bytes()
    assert sorted(p.name for p in cache.iterdir()) == [SAMPLE_NAME]  # no temp files left


def test_fetch_rejects_wrong_member_size(tmp_path, monkeypatch):
    wheel = _fake_wheel(tmp_path / "w", b"not the sample")
    monkeypatch.setattr(sample, "_download_wheel", lambda dest: wheel)
    with pytest.raises(ValueError, match="expected 1695871"):
        fetch_sample(tmp_path / "cache")
    assert not (tmp_path / "cache" / SAMPLE_NAME).exists()


def test_pip_failure_is_a_clear_error(tmp_path, monkeypatch):
    def failing_pip(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version that "
                                           "satisfies the requirement gensim==4.4.0")

    monkeypatch.setattr(subprocess, "run", failing_pip)
    with pytest.raises(ValueError, match=r"gensim 4.4.0 wheel from PyPI(.|\n)*Could not find"):
        fetch_sample(tmp_path / "cache")
