"""Habits shared by every data stage: skip-if-complete, counted skips, summary line, workers.

Each stage (extract, preprocess, tokenize, index, pack, shuffle) skips outputs that are
already complete on re-run, counts every dropped document/sentence/instance by reason, ends
with a one-line summary and runs on all cores by default. Keeping those here lets each stage
module hold only its algorithm (progress bars: bertforge/progress.py; write-then-rename
outputs: bertforge/files.py).

Completion is recorded by a small manifest, `<output_dir>/.bertforge-<stage>.json`, holding
the stage's parameters and the outputs it wrote. It is written last, after every output was
renamed into place (`atomic_output`), so a killed run never looks complete; a re-run with the
same parameters whose outputs all exist is skipped, any other re-run redoes the work.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bertforge.files import atomic_output


def default_workers() -> int:
    """All cores this process may run on (respects taskset/cgroup affinity)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@dataclass
class Summary:
    """Counts in, counts out, and skips by reason; printed as the stage's last line."""

    stage: str
    counts: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)

    def add(self, other: "Summary") -> None:
        self.counts.update(other.counts)
        self.skipped.update(other.skipped)

    def skip(self, reason: str, n: int = 1) -> None:
        self.skipped[reason] += n

    def line(self) -> str:
        parts = [f"{n:,} {name}" for name, n in self.counts.items()]
        text = f"{self.stage}: " + ", ".join(parts)
        if self.skipped:
            text += "; skipped: " + ", ".join(f"{n:,} {r}" for r, n in sorted(self.skipped.items()))
        else:
            text += "; skipped: none"
        return text

    def as_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "counts": dict(self.counts), "skipped": dict(self.skipped)}


def _manifest_path(output_dir: Path, stage: str) -> Path:
    return Path(output_dir) / f".bertforge-{stage}.json"


def is_complete(output_dir: Path, stage: str, params: dict[str, Any]) -> Summary | None:
    """The stored summary if `stage` already ran into `output_dir` with `params`, else None."""
    path = _manifest_path(output_dir, stage)
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if manifest.get("params") != json.loads(json.dumps(params, default=str)):
        return None
    if not all((Path(output_dir) / rel).exists() for rel in manifest.get("outputs", [])):
        return None
    summary = Summary(manifest["summary"].get("stage", stage) + " (already complete)")
    summary.counts.update(manifest["summary"].get("counts", {}))
    summary.skipped.update(manifest["summary"].get("skipped", {}))
    return summary


def mark_complete(output_dir: Path, stage: str, params: dict[str, Any],
                  outputs: Iterable[Path], summary: Summary) -> None:
    """Record that `stage` finished; call only after every output is in place."""
    output_dir = Path(output_dir)
    rel = sorted(str(Path(p).resolve().relative_to(output_dir.resolve())) for p in outputs)
    manifest = {"params": json.loads(json.dumps(params, default=str)), "outputs": rel,
                "summary": summary.as_dict()}
    with atomic_output(_manifest_path(output_dir, stage)) as tmp:
        tmp.write_text(json.dumps(manifest, indent=1))
