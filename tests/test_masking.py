"""Masking (data/masking.py): static and dynamic, token and whole-word, MLM-only records."""

from __future__ import annotations

import numpy as np
import torch

from bertforge.config.data import InstanceConfig
from bertforge.data.instances import SpecialIds, build_features, create_instances
from bertforge.data.masking import (DynamicMasker, MaskRule, choose, continuation_table,
                                    word_keys)
from bertforge.data.stage import Summary
from bertforge.model.bert import build_pretraining_model
from bertforge.rows import as_rows

# A toy vocab: specials, 40 word starts, 20 continuations (##).
VOCAB = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
                                    + [f"w{i}" for i in range(40)]
                                    + [f"##c{i}" for i in range(20)])}
PAD, CLS, SEP, MASK_ID = 0, 2, 3, 4
CONTINUATION = continuation_table(VOCAB)
SPECIAL = SpecialIds(CLS, SEP, MASK_ID, len(VOCAB))


def text_tokens(n: int, seed: int) -> np.ndarray:
    """Token ids where about a third of the tokens continue the word before them."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(5, 45, n)
    cont = rng.random(n) < 0.35
    tokens[cont] = rng.integers(45, 65, int(cont.sum()))
    return tokens.astype(np.int32)


def spans_for(tokens: np.ndarray, n: int, seq: int, seed: int, one_segment: bool = False
              ) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        la = int(rng.integers(5, seq // 2))
        lb = 0 if one_segment else int(rng.integers(3, seq - 3 - la + 1))
        a = int(rng.integers(0, len(tokens) - seq))
        out.append((a, a + la, a + la, a + la + lb, 0))
    return np.array(out, dtype=np.int64)


def unmasked(f) -> np.ndarray:
    ids = f["input_ids"].copy()
    w = f["masked_lm_ids"] != 0
    r, c = np.nonzero(w)
    ids[r, f["masked_lm_positions"][r, c]] = f["masked_lm_ids"][r, c]
    return ids


def chosen_mask(f) -> np.ndarray:
    chosen = np.zeros(f["input_ids"].shape, dtype=bool)
    r, c = np.nonzero(f["masked_lm_ids"] != 0)
    chosen[r, f["masked_lm_positions"][r, c]] = True
    return chosen


def assert_whole_words(ids: np.ndarray, chosen: np.ndarray, candidate: np.ndarray) -> None:
    """No chosen piece without the rest of its word: a continuation goes with the token it
    continues (unless that one is a special token or padding)."""
    cont = CONTINUATION[ids] & candidate
    prev_candidate = np.zeros_like(candidate)
    prev_candidate[:, 1:] = candidate[:, :-1]
    joined = cont & prev_candidate  # pieces that belong to the token before them
    prev_chosen = np.zeros_like(chosen)
    prev_chosen[:, 1:] = chosen[:, :-1]
    assert not (joined & (chosen != prev_chosen)).any()
    assert chosen[joined].sum() > 0  # some multi-piece words were chosen at all


# ---------------------------------------------------------------- static (tokenize)
def test_general_rule_equals_the_fast_static_path():
    """Without whole words, choose() (the reference rule) picks what build_features' partial
    sort picks: same records byte for byte from the same generator."""
    cfg = InstanceConfig(sequence_length=64, mask_tokens=10)
    tokens = text_tokens(5000, 0)
    spans = spans_for(tokens, 300, 64, 1)
    fast = build_features(spans.copy(), tokens, cfg, SPECIAL, np.random.default_rng(7))
    no_words = SpecialIds(CLS, SEP, MASK_ID, len(VOCAB), np.zeros(len(VOCAB), dtype=bool))
    general = build_features(spans.copy(), tokens, cfg, no_words, np.random.default_rng(7))
    for part_fast, part_general in zip(fast, general):
        for key in part_fast:
            assert np.array_equal(part_fast[key], part_general[key]), key


def test_static_whole_word_masking_never_splits_a_word():
    cfg = InstanceConfig(sequence_length=64, mask_tokens=10, whole_word_masking=True)
    tokens = text_tokens(5000, 2)
    spans = spans_for(tokens, 400, 64, 3)
    special = SpecialIds(CLS, SEP, MASK_ID, len(VOCAB), CONTINUATION)
    ints, floats = build_features(spans, tokens, cfg, special, np.random.default_rng(0))
    ids, chosen = unmasked(ints), chosen_mask(ints)
    candidate = (ids != CLS) & (ids != SEP) & (ints["input_mask"] > 0)
    assert_whole_words(ids, chosen, candidate)
    counts = chosen.sum(1)
    length = ints["input_mask"].sum(1)
    target = np.minimum(10, np.maximum(1, np.rint(length * 0.15)))
    assert (counts <= target).all() and (target - counts).mean() < 0.2
    assert np.array_equal(floats["masked_lm_weights"] > 0, ints["masked_lm_ids"] != 0)


def googles_whole_word_choice(ids, candidate, keys, num) -> set[int]:
    """Google's create_masked_lm_predictions loop, for one row: words in random (key) order,
    each taken whole if it still fits the count, else skipped."""
    words: list[list[int]] = []
    for p in np.flatnonzero(candidate).tolist():
        if words and CONTINUATION[ids[p]] and words[-1][-1] == p - 1:
            words[-1].append(p)
        else:
            words.append([p])
    chosen: set[int] = set()
    for word in sorted(words, key=lambda w: (keys[w[0]], w[0])):
        if len(chosen) + len(word) <= num:
            chosen.update(word)
    return chosen


def test_whole_word_choice_is_googles_loop():
    rng = np.random.default_rng(11)
    n, seq = 300, 48
    ids = np.stack([text_tokens(seq, i) for i in range(n)])
    candidate = rng.random((n, seq)) < 0.9
    candidate[:, 0] = False
    keys = rng.random((n, seq))
    num = rng.integers(1, 16, n)
    group = np.ones((n, seq), dtype=np.int64)
    positions, weights = choose(word_keys(keys, candidate, CONTINUATION[ids]), candidate, group,
                                np.stack([np.zeros_like(num), num], 1), 16)
    for r in range(n):
        expected = googles_whole_word_choice(ids[r], candidate[r], keys[r], num[r])
        assert set(positions[r][weights[r]].tolist()) == expected, r


def test_mlm_only_instances_are_one_segment_of_contiguous_text():
    cfg = InstanceConfig(sequence_length=32, mask_tokens=5, objective="mlm",
                         duplication_factor=1, short_seq_prob=0.0)
    # 3 documents of 20 sentences of 3 tokens
    offsets = list(range(0, 3 * 60 + 1, 3))
    starts, ends = [0, 20, 40], [20, 40, 60]
    import random
    flat = create_instances(starts, ends, offsets, cfg, random.Random(0), Summary("t"))
    spans = np.array(flat).reshape(-1, 5)
    assert (spans[:, 4] == 0).all()  # no random-B pairs, no NSP labels
    assert (spans[:, 2] == spans[:, 3]).all()  # B is empty
    tokens = text_tokens(200, 4)
    ints, _ = build_features(spans, tokens, cfg, SPECIAL, np.random.default_rng(0))
    ids = unmasked(ints)
    length = ints["input_mask"].sum(1)
    assert ((ids == SEP).sum(1) == 1).all() and (ids[np.arange(len(ids)), length - 1] == SEP).all()
    assert (ints["segment_ids"] == 0).all()
    # chunks reach the S-2 text tokens a single segment can hold
    assert length.max() == 32


# ---------------------------------------------------------------- dynamic (load time)
def rows_batch(n: int, seq: int, seed: int, packed: bool = False) -> dict[str, np.ndarray]:
    """Row-layout batch of statically masked records (the dynamic masker's input)."""
    tokens = text_tokens(20000, seed)
    cfg = InstanceConfig(sequence_length=seq, mask_tokens=8)
    ints, floats = build_features(spans_for(tokens, n, seq, seed + 1), tokens, cfg, SPECIAL,
                                  np.random.default_rng(seed))
    batch = {k: torch.from_numpy(np.asarray(v, dtype=np.int64)) for k, v in ints.items()}
    batch["next_sentence_labels"] = batch["next_sentence_labels"].reshape(-1)
    batch["masked_lm_weights"] = torch.from_numpy(floats["masked_lm_weights"])
    rows = {k: v.numpy() for k, v in as_rows(batch).items()}
    if packed:  # two records side by side in one row of 2S: sequence ids 1 and 2
        half = n // 2
        wide = {}
        for k in ("input_ids", "segment_ids", "position_ids"):
            wide[k] = np.concatenate([rows[k][:half], rows[k][half:2 * half]], 1)
        wide["sequence_ids"] = np.concatenate([rows["sequence_ids"][:half],
                                               2 * rows["sequence_ids"][half:2 * half]], 1)
        wide["cls_positions"] = np.stack([np.zeros(half, np.int64), np.full(half, seq)], 1)
        wide["masked_lm_positions"] = np.concatenate(
            [rows["masked_lm_positions"][:half], rows["masked_lm_positions"][half:2 * half] + seq], 1)
        wide["masked_lm_ids"] = np.concatenate(
            [rows["masked_lm_ids"][:half], rows["masked_lm_ids"][half:2 * half]], 1)
        return wide
    return rows


def masker(rate=0.15, whole_words=False, max_per_sequence=None, seq=64, rule=None):
    return DynamicMasker(rule=rule or MaskRule(MASK_ID, len(VOCAB)), rate=rate,
                         max_per_sequence=max_per_sequence or int(np.ceil(rate * seq)),
                         special_ids=(PAD, CLS, SEP, MASK_ID),
                         continuation=CONTINUATION if whole_words else None, seed=5, rank=0)


def test_dynamic_masking_statistics():
    rows = rows_batch(2000, 64, 0)
    original = unmasked(rows)
    out = masker(rate=0.3)(rows, 0)
    assert np.array_equal(unmasked(out), original)  # only the masks changed
    chosen = chosen_mask(out)
    length = (rows["sequence_ids"] > 0).sum(1)
    assert np.array_equal(chosen.sum(1), np.minimum(20, np.maximum(1, np.rint(0.3 * length))))
    assert not chosen[np.isin(original, (CLS, SEP, PAD))].any()  # specials never predicted
    # 80% [MASK], 10% random, 10% unchanged
    seen = out["input_ids"][chosen]
    labels = original[chosen]
    share_mask = (seen == MASK_ID).mean()
    share_same = (seen == labels).mean()
    assert abs(share_mask - 0.8) < 0.02 and 0.09 < share_same < 0.13  # random may hit the label
    # uniform over the candidate positions: every position's rate near the mean
    candidate = (rows["sequence_ids"] > 0) & ~np.isin(original, (CLS, SEP))
    per_position = chosen[:, 1:40].sum(0) / candidate[:, 1:40].sum(0)
    assert per_position.std() / per_position.mean() < 0.12
    # and the shards' own masks are not what we get back
    assert (chosen != chosen_mask(rows)).any()


def test_dynamic_mask_rule_is_configurable():
    rows = rows_batch(1000, 64, 1)
    out = masker(rule=MaskRule(MASK_ID, len(VOCAB), replace_prob=1.0, random_prob=0.0))(rows, 0)
    chosen = chosen_mask(out)
    assert (out["input_ids"][chosen] == MASK_ID).all()


def test_dynamic_whole_word_masking_never_splits_a_word():
    rows = rows_batch(1000, 64, 2)
    out = masker(rate=0.25, whole_words=True)(rows, 3)
    ids = unmasked(out)
    candidate = (rows["sequence_ids"] > 0) & ~np.isin(ids, (CLS, SEP))
    assert_whole_words(ids, chosen_mask(out), candidate)


def test_dynamic_masks_depend_on_the_batch_number_only():
    rows = rows_batch(64, 64, 3)
    m = masker()
    a, b, c = m(rows, 7), m(rows, 7), m(rows, 8)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["masked_lm_positions"], c["masked_lm_positions"])


def test_dynamic_masking_of_packed_rows_counts_per_sequence():
    rows = rows_batch(400, 32, 4, packed=True)
    m = masker(rate=0.2, seq=32)
    out = m(rows, 0)
    assert out["masked_lm_positions"].shape[1] == m.slots(64, 2)
    chosen = chosen_mask(out)
    for k in (1, 2):
        in_k = rows["sequence_ids"] == k
        expected = np.minimum(m.max_per_sequence, np.maximum(1, np.rint(0.2 * in_k.sum(1))))
        assert np.array_equal((chosen & in_k).sum(1), expected)


# ---------------------------------------------------------------- MLM only (the model)
def test_mlm_only_never_reads_next_sentence_labels():
    from support import random_batch
    config = __import__("transformers").BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = build_pretraining_model(config)
    model.mlm_only()
    batch = random_batch(4, 16, 3, 100, torch.Generator().manual_seed(0))
    garbage = dict(batch, next_sentence_labels=torch.full((4,), 12345))
    out_a, out_b = model(batch), model(garbage)
    assert torch.equal(out_a.loss, out_b.loss) and out_a.nsp_loss.item() == 0.0
    assert torch.equal(out_a.loss, out_a.mlm_loss)
    out_a.loss.backward()
    assert model.cls.seq_relationship.weight.grad is None  # frozen, no gradient
    assert model.bert.pooler.dense.weight.grad is None
    assert model.cls.predictions.transform.dense.weight.grad is not None
