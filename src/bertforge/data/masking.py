"""Masked-LM masking: which tokens to predict, and what the model sees in their place.

One home for both ways of masking:
- static: `bertforge tokenize` writes the masks into the shards (data/instances.py:
  build_features), as Google's create_pretraining_data and the reference;
- dynamic: `bertforge pretrain --masking dynamic` undoes the shards' masks and draws fresh
  ones for every batch at load time (RoBERTa), `DynamicMasker` below.

The rule is Google's: a sequence of n tokens gets k = max(1, round(rate x n)) predictions
(at most M), chosen uniformly among its non-special tokens, each replaced by [MASK] with
probability 0.8, kept with 0.1 and replaced by a random vocab id with 0.1 (configurable).
Whole-word masking (Google's --do_whole_word_mask) chooses words instead: a WordPiece
continuation (`##ing`) is masked with the token it continues, never split from it.

How, vectorised over a batch ([N, S] arrays; `choose`): every token gets a random key, the
tokens of one word share their first token's key, and one stable sort by (sequence, key) lines
each sequence's words up in random order with their pieces contiguous. Then passes over that
order: each takes the longest run of words that still fits the remaining count; the word that
ends a run can never fit again, so the passes are exactly Google's loop (take a word if it
fits, else skip it and go on; tests/test_masking.py checks them against that loop). Without
whole words one pass takes all; with them ~2-4. Sequences are groups, so packed rows
(several sequences) are masked per sequence like unpacked ones. On the sample (S=128, rate
0.15) whole-word masking predicts 18.62 tokens per sequence, as many as token masking.

Cost (measured on one core of the 2-core dev box, 32 x 128 batch): 0.65 ms a batch for token
masking, 0.84 ms for whole words, in the loader workers. The static path without whole words
keeps build_features' own partial sort, faster and byte-identical to earlier shards, and
`choose` is its reference (a test checks they agree).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class MaskRule:
    """What a chosen position becomes: [MASK] (`replace_prob`), a random id in
    [0, vocab_size) (`random_prob`), else unchanged."""

    mask_id: int
    vocab_size: int
    replace_prob: float = 0.8
    random_prob: float = 0.1


def continuation_table(vocab: dict[str, int]) -> np.ndarray:
    """[vocab size] bool: True for WordPiece continuations (`##x`), the pieces that belong to
    the word before them."""
    table = np.zeros(max(vocab.values()) + 1, dtype=bool)
    for token, index in vocab.items():
        if token.startswith("##") and len(token) > 2:
            table[index] = True
    return table


def word_keys(keys: np.ndarray, candidate: np.ndarray, continuation: np.ndarray) -> np.ndarray:
    """Each token's key replaced by its word's first token's key (whole-word masking). A
    continuation piece right after a non-candidate (a [SEP], padding) starts a word itself."""
    pos = np.arange(keys.shape[1])
    previous_candidate = np.zeros_like(candidate)
    previous_candidate[:, 1:] = candidate[:, :-1]
    starts = ~(continuation & candidate & previous_candidate)
    first = np.maximum.accumulate(np.where(starts, pos, 0), axis=1)
    return np.take_along_axis(keys, first, axis=1)


def choose(keys: np.ndarray, candidate: np.ndarray, group: np.ndarray, num: np.ndarray,
           slots: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions to predict: in each row and group (sequence), `num[row, group]` candidate
    tokens taken in key order; tokens that share a key (`word_keys`) are one word, taken
    whole or not at all, by Google's rule: a word that would overshoot the count is skipped
    and later (shorter) words are still tried.

    keys [N, S] in [0, 1); candidate [N, S] bool; group [N, S] int, 0 for padding (never
    chosen), 1.. the sequences of a row; num [N, G+1] predictions per group (column 0
    unused). Returns (positions [N, slots] sorted, padding slots 0; weights [N, slots] bool).
    """
    n, s = keys.shape
    pos = np.arange(s)
    rows = np.arange(n)[:, None]
    # Sort by (group, key): candidates of a group in key order, its other tokens after them.
    composite = group * 4.0 + np.where(candidate, keys, 2.0)
    order = np.argsort(composite, axis=1, kind="stable")
    sorted_group = np.take_along_axis(group, order, axis=1)
    sorted_key = np.take_along_axis(composite, order, axis=1)
    usable = (sorted_key % 4.0 < 2.0) & (sorted_group > 0)
    # A word = a run of equal keys (contiguous after the stable sort): its first and last index.
    first_of_word = np.ones((n, s), dtype=bool)
    first_of_word[:, 1:] = sorted_key[:, 1:] != sorted_key[:, :-1]
    word_start = np.maximum.accumulate(np.where(first_of_word, pos, 0), axis=1)
    last_of_word = np.ones((n, s), dtype=bool)
    last_of_word[:, :-1] = first_of_word[:, 1:]
    word_end = np.flip(np.minimum.accumulate(
        np.flip(np.where(last_of_word, pos, s), axis=1), axis=1), axis=1)
    word_length = word_end - word_start + 1
    group_start = np.maximum.accumulate(np.where(np.diff(
        sorted_group, axis=1, prepend=-1) != 0, pos, 0), axis=1)
    remaining = num.astype(np.int64).copy()
    taken = np.zeros((n, s), dtype=bool)
    # Each pass takes, per group, the longest prefix (in key order) of the words that still
    # fit the remaining count; the word that stops it can never fit again (it is longer
    # than what remains), so the passes are Google's skip-and-go-on loop. Without whole
    # words the first pass takes everything; each further pass takes at least one word.
    while True:
        eligible = usable & ~taken & (word_length <= remaining[rows, sorted_group])
        through = np.cumsum(eligible, axis=1)  # eligible tokens up to and including here
        before_group = through[rows, group_start] - eligible[rows, group_start]
        take = eligible & (through[rows, word_end] - before_group
                           <= remaining[rows, sorted_group])
        if not take.any():
            break
        taken |= take
        np.subtract.at(remaining, (np.broadcast_to(rows, (n, s))[take], sorted_group[take]), 1)
    chosen = np.zeros((n, s), dtype=bool)
    np.put_along_axis(chosen, order, taken, axis=1)
    counts = chosen.sum(1)
    if counts.max(initial=0) > slots:
        raise ValueError(f"{int(counts.max())} predictions chosen for {slots} slots")
    positions = np.sort(np.where(chosen, pos, s), axis=1)[:, :slots]
    weights = positions < s
    positions[~weights] = 0
    return positions, weights


def apply_rule(input_ids: np.ndarray, positions: np.ndarray, weights: np.ndarray,
               rule: MaskRule, rng: np.random.Generator) -> np.ndarray:
    """Mask `input_ids` in place at `positions`; returns the labels [N, slots] (0 in padding
    slots, which point at position 0 and leave its token as it is). Two draws per slot, in
    this order, so static shards stay byte-identical across versions."""
    original = np.take_along_axis(input_ids, positions, 1)
    labels = np.where(weights, original, 0)
    draw = rng.random(positions.shape)
    random_ids = rng.integers(0, rule.vocab_size, positions.shape, dtype=np.int32)
    keep_below = 1.0 - rule.random_prob  # 0.9 exactly for the defaults (not 0.8 + 0.1)
    replaced = np.where(draw < rule.replace_prob, rule.mask_id,
                        np.where(draw < keep_below, labels, random_ids))
    np.put_along_axis(input_ids, positions, np.where(weights, replaced, original), 1)
    return labels


@dataclass
class DynamicMasker:
    """Fresh masks for every batch of row-layout records (bertforge/rows.py), at load time.

    Batch `number` of a run is masked from the generator seeded (seed, rank, number), so the
    masks depend on nothing but the batch's place in the run: exact resume and any number of
    loader workers give the same masks. The shards' own masks are undone first (their labels
    put back), so static shards serve as the unmasked text.
    """

    rule: MaskRule
    rate: float
    max_per_sequence: int  # M: at most this many predictions per sequence
    special_ids: tuple[int, ...]  # never chosen ([CLS], [SEP], [PAD], ...)
    continuation: np.ndarray | None  # whole-word masking when given (continuation_table)
    seed: int
    rank: int

    def slots(self, sequence_length: int, sequences_per_row: int) -> int:
        """Prediction slots of a row: M for one sequence; for several, the most their counts
        can add up to (each round(rate x n_i) <= rate x n_i + 1/2, and max(1, .) adds <= 1)."""
        if sequences_per_row == 1:
            return self.max_per_sequence
        return min(sequence_length, math.ceil(self.rate * sequence_length) + sequences_per_row)

    def __call__(self, rows: dict[str, np.ndarray], number: int) -> dict[str, np.ndarray]:
        ids = rows["input_ids"].copy()
        labelled = rows["masked_lm_ids"] != 0
        r, c = np.nonzero(labelled)
        ids[r, rows["masked_lm_positions"][r, c]] = rows["masked_lm_ids"][r, c]  # unmask
        group = rows["sequence_ids"].astype(np.int64)
        candidate = (group > 0) & ~np.isin(ids, self.special_ids)
        rng = np.random.default_rng([self.seed, self.rank, number])
        keys = rng.random(ids.shape, dtype=np.float32)
        if self.continuation is not None:
            keys = word_keys(keys, candidate, self.continuation[np.minimum(
                ids, len(self.continuation) - 1)])
        per_row = rows["cls_positions"].shape[1]
        cell = np.arange(len(ids))[:, None] * (per_row + 1) + group  # (row, sequence)
        size = len(ids) * (per_row + 1)
        lengths = np.bincount(cell.ravel(), minlength=size).reshape(len(ids), -1)
        candidates = np.bincount(cell.ravel(), candidate.ravel(), size).reshape(len(ids), -1)
        # Google's count per sequence, but never more than its candidates
        num = np.minimum(self.max_per_sequence,
                         np.maximum(1, np.rint(lengths * self.rate).astype(np.int64)))
        num = np.minimum(num, candidates.astype(np.int64))
        num[:, 0] = 0  # padding
        positions, weights = choose(keys, candidate, group, num,
                                    self.slots(ids.shape[1], per_row))
        labels = apply_rule(ids, positions, weights, self.rule, rng)
        out = dict(rows)
        out.update(input_ids=ids, masked_lm_positions=positions.astype(np.int64),
                   masked_lm_ids=labels.astype(np.int64),
                   masked_lm_weights=weights.astype(np.float32))
        return out
