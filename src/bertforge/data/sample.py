"""The embedded real Wikipedia sample: a dump excerpt fetched once from PyPI and cached.

The demo and the integration tests need a real MediaWiki XML dump, but these machines reach
only package registries. The gensim 4.4.0 wheel on PyPI ships one:
`enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2` (1,695,871 bytes,
206 pages; WikiExtractor makes 106 articles, ~2.6 MB of text, ~20k sentences from it).
We `pip download` that wheel without dependencies (~25 MB, once), take just that member out
of the zip (gensim itself is never installed or imported) and keep the 1.7 MB file in the
cache: $BERTFORGE_CACHE, else ~/.cache/bertforge. Later calls cost one stat().
The trade-off: the first fetch moves ~25 MB to obtain 1.7 MB, in exchange for needing no
hosting of our own and no network beyond PyPI.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

GENSIM_VERSION = "4.4.0"
SAMPLE_NAME = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
SAMPLE_MEMBER = f"gensim/test/test_data/{SAMPLE_NAME}"
SAMPLE_SIZE = 1_695_871


def default_cache_dir() -> Path:
    """$BERTFORGE_CACHE if set, else ~/.cache/bertforge."""
    env = os.environ.get("BERTFORGE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "bertforge"


def fetch_sample(cache_dir: Path | None = None) -> Path:
    """Path of the cached dump excerpt, fetching it from the gensim wheel on PyPI if missing."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache_dir / SAMPLE_NAME
    if target.is_file() and target.stat().st_size == SAMPLE_SIZE:
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bertforge-sample-", dir=cache_dir) as tmp:
        wheel = _download_wheel(Path(tmp))
        with zipfile.ZipFile(wheel) as zf:
            try:
                info = zf.getinfo(SAMPLE_MEMBER)
            except KeyError:
                raise ValueError(f"{wheel.name} has no member {SAMPLE_MEMBER}; the sample "
                                 "cannot be fetched from this gensim wheel") from None
            if info.file_size != SAMPLE_SIZE:
                raise ValueError(f"{SAMPLE_MEMBER} in {wheel.name} is {info.file_size} bytes, "
                                 f"expected {SAMPLE_SIZE}")
            # Written inside the cache dir, then renamed: a killed fetch leaves no half file
            # under the final name (the size check above would also catch it).
            part = Path(tmp) / (SAMPLE_NAME + ".part")
            with zf.open(info) as src, open(part, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
        os.replace(part, target)
    return target


def _download_wheel(dest: Path) -> Path:
    """`pip download gensim==4.4.0 --no-deps` into dest; the wheel's path."""
    cmd = [sys.executable, "-m", "pip", "download", f"gensim=={GENSIM_VERSION}", "--no-deps",
           "--only-binary=:all:", "--disable-pip-version-check", "-q", "-d", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob(f"gensim-{GENSIM_VERSION}-*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        raise ValueError(f"could not download the gensim {GENSIM_VERSION} wheel from PyPI "
                         f"(needed once for the Wikipedia sample; check network/proxy or "
                         f"pip's index settings): {' '.join(cmd[2:])} failed:\n{tail}")
    return wheels[0]
