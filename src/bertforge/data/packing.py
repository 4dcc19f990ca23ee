"""Sequence packing algorithms: a histogram of lengths in, packs of at most P sequences out.

Two histogram packers from Krell et al. 2021, "Efficient Sequence Packing without
Cross-contamination" (arXiv 2107.02027), both working on the length histogram (S bins) rather
than on the N sequences, so their cost does not grow with the dataset:

* NNLSHP (non-negative least-squares histogram packing). A *strategy* is a non-decreasing
  tuple of at most P lengths summing to exactly S (S=512, P=3: 22k strategies). With A the
  [S x strategies] matrix counting how often each length occurs in each strategy and h the
  histogram, NNLS finds repeat counts x >= 0 with A x ~ h (rows of lengths 1..8 weighted
  a little more, as the paper does, since short sequences are the filler that completes
  packs). We round x *down*, so no length is ever over-used, and pack the leftover
  histogram h - A floor(x) (at most a few sequences per active strategy) with SPFHP.
  Every pack NNLS picks is exactly full, so efficiency is set by the leftovers. Measured
  on a 16M-sequence Wikipedia-shaped histogram (benchmarks/bench_packing.py, busy 2-core
  dev machine): S=512 99.97% in 13.7 s (paper: 99.75%, ~24 s), S=384 100.00% in 3.8 s,
  S=128 100.00% in 0.3 s. Cost: one dense [S x strategies] float64 matrix (512 x 22k =
  90 MB) and scipy's Lawson-Hanson NNLS; P > 3 is refused (P=4 at 512 has ~0.9M
  strategies: use SPFHP).
* SPFHP (shortest-pack-first histogram packing, any P). Lengths longest first; each goes into
  the open pack type with the least remaining space that still fits it and holds < P
  sequences (best-fit decreasing), else opens a new pack. Pack *types* (tuples) are kept
  with counts, so a whole histogram bin moves at once: O(S^2) work per run, milliseconds,
  independent of N. Same histogram, S=512: 96.5% with P=3, 99.56% with P=8 in 6 ms
  (paper: 99.6% in 0.03 s).

`pack_histogram` returns a `PackingPlan` (strategies + repeat counts); `pack_lengths` turns a
plan into packs of sequence indices for any list of lengths (SQuAD windows use it);
`split_plan` deals a plan's packs into output shards at random and `strategy_lengths` says
which lengths each strategy takes (the pack stage works on those, never on per-sequence
arrays). Counts in = counts out is checked on every plan.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np

ALGORITHMS = ("nnlshp", "spfhp")
# Rows of these lengths get extra weight in the NNLS fit (the paper's choice: lengths 1..8).
_SHORT_LENGTHS, _SHORT_WEIGHT = 8, 2.0


@dataclass
class PackingPlan:
    """Pack types and how many packs of each; every length's count matches the histogram."""

    max_len: int
    strategies: list[tuple[int, ...]]  # lengths of the sequences in one pack, non-decreasing
    counts: np.ndarray                 # packs of each strategy (int64)

    @property
    def num_packs(self) -> int:
        return int(self.counts.sum())

    @property
    def num_sequences(self) -> int:
        return int(sum(len(s) * int(c) for s, c in zip(self.strategies, self.counts)))

    @property
    def num_tokens(self) -> int:
        return int(sum(sum(s) * int(c) for s, c in zip(self.strategies, self.counts)))

    @property
    def efficiency(self) -> float:
        """Real tokens / token slots of the packs (1.0: no padding left)."""
        return self.num_tokens / max(1, self.num_packs * self.max_len)

    @property
    def packing_factor(self) -> float:
        """Mean sequences per pack = theoretical speed-up over one padded sequence per row."""
        return self.num_sequences / max(1, self.num_packs)

    def histogram(self) -> np.ndarray:
        """Sequences of each length 0..S that the plan packs."""
        out = np.zeros(self.max_len + 1, dtype=np.int64)
        for strategy, count in zip(self.strategies, self.counts):
            for length in strategy:
                out[length] += count
        return out

    def summary(self) -> str:
        return (f"{self.num_sequences:,} sequences -> {self.num_packs:,} packs, efficiency "
                f"{100 * self.efficiency:.2f}%, {self.packing_factor:.3f} sequences/pack, "
                f"theoretical speed-up {self.packing_factor:.3f}x")


def length_histogram(lengths: np.ndarray, max_len: int) -> np.ndarray:
    """Counts of each length 0..max_len; lengths outside 1..max_len are user errors."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.size and (lengths.min() < 1 or lengths.max() > max_len):
        bad = lengths[(lengths < 1) | (lengths > max_len)][0]
        raise ValueError(f"sequence length {bad} is outside 1..{max_len}; give the "
                         "--sequence-length the data was made with")
    return np.bincount(lengths, minlength=max_len + 1).astype(np.int64)


def _check(histogram: np.ndarray, max_len: int, max_per_pack: int, algorithm: str) -> np.ndarray:
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown packing algorithm {algorithm!r}; use one of {ALGORITHMS}")
    if max_per_pack < 1:
        raise ValueError(f"max_sequences_per_pack must be at least 1, got {max_per_pack}")
    if algorithm == "nnlshp" and max_per_pack > 3:
        raise ValueError(f"nnlshp supports at most 3 sequences per pack (got {max_per_pack}: "
                         "the strategy matrix grows as S^(P-1)); use --algorithm spfhp")
    histogram = np.asarray(histogram, dtype=np.int64)
    if histogram.shape != (max_len + 1,):
        raise ValueError(f"histogram has {histogram.shape[0]} bins; expected {max_len + 1} "
                         f"(lengths 0..{max_len})")
    if histogram[0]:
        raise ValueError(f"{histogram[0]} sequences of length 0 cannot be packed")
    if (histogram < 0).any():
        raise ValueError("histogram counts must be non-negative")
    return histogram


def full_strategies(max_len: int, max_per_pack: int) -> list[tuple[int, ...]]:
    """Every non-decreasing tuple of 1..max_per_pack lengths summing to exactly max_len."""
    out: list[tuple[int, ...]] = []

    def extend(prefix: tuple[int, ...], smallest: int, remaining: int) -> None:
        if remaining >= smallest:
            out.append(prefix + (remaining,))  # close the pack with one more sequence
        if len(prefix) + 2 <= max_per_pack:
            # l <= remaining / 2 leaves room for at least one more length >= l
            for length in range(smallest, remaining // 2 + 1):
                extend(prefix + (length,), length, remaining - length)

    extend((), 1, max_len)
    return out


def spfhp(histogram: np.ndarray, max_len: int, max_per_pack: int) -> PackingPlan:
    """Shortest-pack-first histogram packing (best-fit decreasing on histogram bins)."""
    histogram = _check(histogram, max_len, max_per_pack, "spfhp")
    # open[space] = {strategy: count} of packs with `space` tokens free and < P sequences
    open_packs: list[dict[tuple[int, ...], int]] = [dict() for _ in range(max_len + 1)]
    closed: dict[tuple[int, ...], int] = defaultdict(int)
    for length in range(max_len, 0, -1):
        todo = int(histogram[length])
        space = length
        while todo and space < max_len:
            bucket = open_packs[space]
            if not bucket:
                space += 1
                continue
            strategy, count = next(iter(bucket.items()))
            moved = min(todo, count)
            if count == moved:
                del bucket[strategy]
            else:
                bucket[strategy] = count - moved
            _place(open_packs, closed, strategy + (length,), space - length, moved, max_per_pack)
            todo -= moved
        if todo:
            _place(open_packs, closed, (length,), max_len - length, todo, max_per_pack)
    for bucket in open_packs:
        for strategy, count in bucket.items():
            closed[strategy] += count
    return _plan(closed, histogram, max_len)


def _place(open_packs, closed, strategy, space, count, max_per_pack) -> None:
    target = closed if space == 0 or len(strategy) == max_per_pack else open_packs[space]
    target[strategy] = target.get(strategy, 0) + count


def nnlshp(histogram: np.ndarray, max_len: int, max_per_pack: int) -> PackingPlan:
    """Non-negative least-squares histogram packing; leftovers packed with SPFHP."""
    from scipy.optimize import nnls

    histogram = _check(histogram, max_len, max_per_pack, "nnlshp")
    # Only strategies whose lengths all occur: one using an absent length could only over-fit.
    present = histogram > 0
    strategies = [s for s in full_strategies(max_len, max_per_pack) if all(present[n] for n in s)]
    matrix = np.zeros((max_len, len(strategies)))
    for column, strategy in enumerate(strategies):
        for length in strategy:
            matrix[length - 1, column] += 1
    weights = np.ones(max_len)
    weights[:_SHORT_LENGTHS] = _SHORT_WEIGHT
    repeats = np.zeros(len(strategies), dtype=np.int64)
    if strategies:  # (scipy's nnls crashes on a matrix without columns)
        solution, _ = nnls(matrix * weights[:, None], histogram[1:] * weights, maxiter=50 * max_len)
        repeats = np.floor(solution).astype(np.int64)
    used = np.zeros(max_len + 1, dtype=np.int64)
    used[1:] = matrix.astype(np.int64) @ repeats
    # Floor never over-uses a length when the fit is exact; where the least-squares fit
    # overshoots a bin, take packs of strategies using that bin back until it fits.
    for length in np.nonzero(used > histogram)[0].tolist():
        for column in np.nonzero((matrix[length - 1] > 0) & (repeats > 0))[0].tolist():
            excess = used[length] - histogram[length]
            if excess <= 0:
                break
            per_pack = int(matrix[length - 1, column])
            drop = min(int(repeats[column]), -(-excess // per_pack))
            repeats[column] -= drop
            for other in strategies[column]:
                used[other] -= drop
    leftover = spfhp(histogram - used, max_len, max_per_pack)
    merged: dict[tuple[int, ...], int] = defaultdict(int)
    for strategy, count in zip(strategies, repeats.tolist()):
        if count:
            merged[strategy] += count
    for strategy, count in zip(leftover.strategies, leftover.counts.tolist()):
        merged[strategy] += count
    return _plan(merged, histogram, max_len)


def _plan(packs: dict[tuple[int, ...], int], histogram: np.ndarray, max_len: int) -> PackingPlan:
    items = sorted((tuple(sorted(s)), c) for s, c in packs.items() if c)
    plan = PackingPlan(max_len, [s for s, _ in items], np.array([c for _, c in items], np.int64))
    # Counts in = counts out: no sequence lost or duplicated by any packer.
    packed = plan.histogram()
    assert (packed == histogram).all(), \
        f"packer lost/duplicated lengths {np.nonzero(packed != histogram)[0][:5]}"
    assert all(sum(s) <= max_len for s in plan.strategies)
    return plan


def pack_histogram(histogram: np.ndarray, max_len: int, max_per_pack: int = 3,
                   algorithm: str = "nnlshp") -> PackingPlan:
    """Solve a length histogram (bins 0..max_len) with the named algorithm."""
    _check(histogram, max_len, max_per_pack, algorithm)
    if algorithm == "spfhp":
        return spfhp(histogram, max_len, max_per_pack)
    return nnlshp(histogram, max_len, max_per_pack)


def strategy_lengths(plan: PackingPlan) -> np.ndarray:
    """[strategies, S+1] int64: how many sequences of each length one pack of each strategy holds."""
    out = np.zeros((len(plan.strategies), plan.max_len + 1), dtype=np.int64)
    for row, strategy in enumerate(plan.strategies):
        for length in strategy:
            out[row, length] += 1
    return out


def split_plan(plan: PackingPlan, packs_per_part: list[int], rng: np.random.Generator
               ) -> np.ndarray:
    """[parts, strategies] int64 repeat counts: the plan's packs dealt into parts of the given
    sizes at random (sequential multivariate hypergeometric draws, i.e. a seeded shuffle of
    the packs cut into parts), so each part gets a random mix of strategies. Histogram-sized:
    the cost grows with parts x strategies, not with the packs."""
    if sum(packs_per_part) != plan.num_packs:
        raise ValueError(f"parts hold {sum(packs_per_part)} packs but the plan has "
                         f"{plan.num_packs}")
    remaining = plan.counts.astype(np.int64).copy()
    out = np.zeros((len(packs_per_part), len(remaining)), dtype=np.int64)
    for part, size in enumerate(packs_per_part):
        if part == len(packs_per_part) - 1:
            out[part] = remaining
        elif size:
            out[part] = rng.multivariate_hypergeometric(remaining, size)
        remaining -= out[part]
    assert (remaining == 0).all() and (out.sum(1) == packs_per_part).all()
    return out


def assign_packs(lengths: np.ndarray, plan: PackingPlan, seed: int | None = None) -> np.ndarray:
    """[num_packs, P] int64 sequence indices of `plan` realised on `lengths` (-1 = empty slot).

    Sequences of one length are taken in index order, or in a seeded random order (so that
    which sequences share a pack does not follow the input order).
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(lengths, kind="stable")
    if seed is not None:  # random order within each length: sort by (length, random key)
        keys = np.random.default_rng(seed).random(len(lengths))
        order = np.lexsort((keys, lengths))
    starts = np.zeros(plan.max_len + 2, dtype=np.int64)
    starts[1:] = np.cumsum(np.bincount(lengths, minlength=plan.max_len + 1))
    cursor = starts[:-1].copy()
    width = max((len(s) for s in plan.strategies), default=1)
    packs = np.full((plan.num_packs, width), -1, dtype=np.int64)
    row = 0
    for strategy, count in zip(plan.strategies, plan.counts.tolist()):
        for slot, length in enumerate(strategy):
            packs[row:row + count, slot] = order[cursor[length]:cursor[length] + count]
            cursor[length] += count
        row += count
    return packs


def pack_lengths(lengths, max_len: int, max_per_pack: int = 3, algorithm: str = "nnlshp",
                 seed: int | None = None) -> list[list[int]]:
    """Packs (lists of indices into `lengths`) each holding <= max_per_pack sequences whose
    lengths sum to <= max_len; every index appears in exactly one pack."""
    lengths = np.asarray(lengths, dtype=np.int64)
    plan = pack_histogram(length_histogram(lengths, max_len), max_len, max_per_pack, algorithm)
    return [[int(i) for i in row if i >= 0] for row in assign_packs(lengths, plan, seed)]
