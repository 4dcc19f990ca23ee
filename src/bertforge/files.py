"""Outputs that appear whole or not at all: write to a temporary sibling, rename on success.

Used by every writer whose output another step trusts (data stages, vocab, ONNX export, SQuAD
predictions, the benchmark runner's results): a killed process leaves a hidden `.tmp-*` file,
never a truncated output under the real name. Cost: one rename per output.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_output(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling path; rename it to `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
