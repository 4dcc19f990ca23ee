"""Synthetic sequence-length histograms shaped like BERT data from full Wikipedia, for the
packing tests and benchmarks (support code, not part of the package): full Wikipedia cannot
be downloaded here, and the packers only see a length histogram.
"""

from __future__ import annotations

import numpy as np

from bertforge.data.packing import length_histogram


def wikipedia_like_histogram(sequence_length: int, n: int = 16_000_000, seed: int = 0,
                             packing_factor: float | None = None) -> np.ndarray:
    """A synthetic length histogram shaped like BERT data from full Wikipedia (tests and
    benchmarks): a share of the sequences at full length, 5% just below it, a uniform part
    (short_seq_prob = 0.1 draws uniform target lengths) and a geometric tail of short ones
    (documents end early). By default 45% are at full length (about half near it, as
    reported for BERT's Wikipedia data; ~1.46x at any S). With `packing_factor`, the full-length share is set so
    that the mean length is S / packing_factor: the factors the reference assumed for real
    Wikipedia (1.17 at 128, 1.7 at 384, 2.0 at 512) then give its harder histograms."""
    rng = np.random.default_rng(seed)
    s = sequence_length
    tail_mean = s / 3  # geometric(3 / S), before clipping
    if packing_factor is None:
        full_share = 0.45
    else:  # mean = full * S + 0.05 * (S - 12.5) + uniform * (S + 8) / 2 + tail * tail_mean
        fixed = 0.05 * (s - 12.5)
        # uniform = 0.3 x (the rest after full and near), tail = 0.7 x that rest
        rest_mean = 0.3 * (s + 8) / 2 + 0.7 * tail_mean
        full_share = (s / packing_factor - fixed - 0.95 * rest_mean) / (s - rest_mean)
        if not 0 <= full_share <= 0.95:
            raise ValueError(f"packing factor {packing_factor} is out of this shape's reach "
                             f"at S={s}")
    full, near = int(n * full_share), int(n * 0.05)
    uniform = int((n - full - near) * 0.3)
    tail = n - full - near - uniform
    lengths = np.concatenate([
        np.full(full, s), rng.integers(s - 24, s, near), rng.integers(8, s, uniform),
        np.clip(rng.geometric(3 / s, tail), 2, s)])
    return length_histogram(lengths, s)
