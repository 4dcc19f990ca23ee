"""Progress bars: drawn on a terminal only, off for logs, CI and `TQDM_DISABLE=1`.

One home for every bar of the project (data stages, training steps, SQuAD prediction), so
the rule "a bar is redrawn only where a person watches it" holds everywhere; a training loop
asks `bars_enabled()` and prints its step line instead. Cost: one isatty() per bar.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable

from tqdm import tqdm


def bars_enabled() -> bool:
    """Whether progress bars may be drawn: stderr is a terminal and neither
    BERTFORGE_NO_PROGRESS=1 nor tqdm's own TQDM_DISABLE=1 is set. A bar redrawn into a log
    file or a CI log is noise, so there a loop prints lines instead."""
    off = any(os.environ.get(name, "").strip().lower() not in ("", "0", "false")
              for name in ("BERTFORGE_NO_PROGRESS", "TQDM_DISABLE"))
    return not off and sys.stderr.isatty()


def progress(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "",
             unit: str = "it", disable: bool | None = None, unit_scale: bool = False) -> tqdm:
    """A tqdm bar on stderr, drawn only where `bars_enabled()`, whatever the caller asked for.

    unit_scale=True shows byte counts as KiB/MiB (divisor 1024)."""
    disable = not bars_enabled() or bool(disable)
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=disable,
                file=sys.stderr, dynamic_ncols=True, mininterval=0.5,
                unit_scale=unit_scale, unit_divisor=1024 if unit_scale else 1000)
