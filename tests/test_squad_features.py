"""SQuAD input checks and windows: errors name the question, windows equal Hugging Face's
overflowing tokenization, labels cover the answer or sit at [CLS], workers change nothing."""

from __future__ import annotations

import json
import random
import sys

import numpy as np
import pytest

from bertforge.squad.data import (SquadExample, examples_from_articles, load_split, read_squad,
                                  rows_to_articles)
from bertforge.config.serve import WindowSection
from bertforge.squad.features import build_windows, pad_windows

WORDS = ("river valley market olive grape museum harbour bridge tower garden castle forest "
         "meadow village station library theatre festival mountain island").split()


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    from bertforge.data.vocab import save_tokenizer_files
    path = tmp_path_factory.mktemp("tok")
    save_tokenizer_files(path)
    return AutoTokenizer.from_pretrained(path)


def _text(n_words: int, seed: int) -> str:
    rng = random.Random(seed)
    words = [rng.choice(WORDS) + ("," if rng.random() < 0.1 else "") for _ in range(n_words)]
    return " ".join(words).capitalize() + "."


def _squad(qas_context, tmp_path, name="s.json", version="1.1"):
    data = {"version": version, "data": [{"title": "t", "paragraphs": [
        {"context": c, "qas": qas} for c, qas in qas_context]}]}
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


# ---------------------------------------------------------------- input checks
def test_good_file_reads(tmp_path):
    ctx = "Ada Lovelace wrote the first program."
    path = _squad([(ctx, [{"id": "q1", "question": "Who wrote it?",
                           "answers": [{"text": "Ada Lovelace", "answer_start": 0}]}])], tmp_path)
    ds = read_squad(path, is_training=True, squad_v2=False)
    assert [e.qid for e in ds.examples] == ["q1"] and ds.examples[0].answers == [("Ada Lovelace", 0)]
    assert "skipped: none" in ds.summary.line()


@pytest.mark.parametrize("payload, message", [
    ({"version": "1.1", "articles": []}, "no 'data' key"),
    ({"data": {"paragraphs": []}}, "'data' must be a list"),
    ({"data": [{"title": "t"}]}, r"data\[0\]: 'paragraphs' must be a list"),
    ({"data": [{"paragraphs": [{"context": "x", "qas": [{"id": "q9", "question": "?",
                                                         "answers": [{"text": 3}]}]}]}]},
     "q9.*'text' \\(string\\) and 'answer_start'"),
])
def test_wrong_schema_is_an_error_naming_where(tmp_path, payload, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(payload))
    with pytest.raises(ValueError, match=message):
        read_squad(path, is_training=True, squad_v2=False)


def test_empty_context_names_the_question(tmp_path):
    path = _squad([("   ", [{"id": "q-empty", "question": "What?",
                             "answers": [{"text": "x", "answer_start": 0}]}])], tmp_path)
    with pytest.raises(ValueError, match="q-empty.*context is empty"):
        read_squad(path, is_training=False, squad_v2=False)


def test_duplicate_ids_name_the_id(tmp_path):
    qa = {"id": "dup", "question": "Who?", "answers": [{"text": "Ada", "answer_start": 0}]}
    path = _squad([("Ada wrote.", [qa]), ("Ada sang.", [qa])], tmp_path)
    with pytest.raises(ValueError, match="'dup'.*duplicate question id"):
        read_squad(path, is_training=False, squad_v2=False)


def test_answer_start_mismatch_is_a_counted_skip(tmp_path):
    ctx = "Ada Lovelace wrote the first program."
    good = {"id": "ok", "question": "Who?", "answers": [{"text": "Ada Lovelace", "answer_start": 0}]}
    bad = {"id": "off", "question": "What?", "answers": [{"text": "program", "answer_start": 3}]}
    path = _squad([(ctx, [good, bad])], tmp_path)
    ds = read_squad(path, is_training=True, squad_v2=False)
    assert [e.qid for e in ds.examples] == ["ok"]
    assert "1 answer_start does not match the context" in ds.summary.line()
    assert ds.skipped_ids == {"answer_start does not match the context": ["off"]}
    # Evaluation reads only the texts: the question stays.
    assert len(read_squad(path, is_training=False, squad_v2=False).examples) == 2
    # Nothing left to train on: an error, not an empty run.
    only_bad = _squad([(ctx, [bad])], tmp_path, "b.json")
    with pytest.raises(ValueError, match="every training answer was skipped.*off"):
        read_squad(only_bad, is_training=True, squad_v2=False)


def test_v2_questions_need_squad_v2(tmp_path):
    qa = {"id": "imp", "question": "Who?", "answers": [], "is_impossible": True}
    path = _squad([("Ada wrote.", [qa])], tmp_path, version="v2.0")
    with pytest.raises(ValueError, match="'imp'.*--squad-v2"):
        read_squad(path, is_training=True, squad_v2=False)
    ds = read_squad(path, is_training=True, squad_v2=True)
    assert ds.examples[0].is_impossible and ds.is_v2
    contradicting = dict(qa, answers=[{"text": "Ada", "answer_start": 0}])
    with pytest.raises(ValueError, match="is_impossible is true but 'answers' is not empty"):
        read_squad(_squad([("Ada wrote.", [contradicting])], tmp_path, "c.json"),
                   is_training=True, squad_v2=True)


def test_hf_rows_become_nested_articles():
    rows = [{"id": "1", "title": "A", "context": "c1", "question": "q?",
             "answers": {"text": ["c"], "answer_start": [0]}},
            {"id": "2", "title": "A", "context": "c1", "question": "q2?",
             "answers": {"text": [], "answer_start": []}},
            {"id": "3", "title": "B", "context": "c2", "question": "q3?",
             "answers": {"text": ["c2"], "answer_start": [0]}}]
    articles = rows_to_articles(rows)
    assert [len(a["paragraphs"]) for a in articles] == [1, 1]
    assert [q["id"] for q in articles[0]["paragraphs"][0]["qas"]] == ["1", "2"]
    ds = examples_from_articles(articles, source="rows", is_training=False, squad_v2=True)
    assert [e.is_impossible for e in ds.examples] == [False, True, False]


def test_dataset_without_the_datasets_package_is_a_clear_error(monkeypatch):
    from bertforge.squad.config import SquadDataSection
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails as if not installed
    with pytest.raises(ValueError, match="datasets package.*--train-file"):
        load_split(SquadDataSection(dataset="squad"), training=True)


# ---------------------------------------------------------------- windows
SPEC = WindowSection(sequence_length=64, doc_stride=16, max_query_length=16)


def test_windows_equal_hugging_face_overflow(tokenizer):
    examples = [SquadExample(qid=str(i), question=f"Where is the {WORDS[i]} of the town?",
                             context=_text(40 + 37 * i, seed=i)) for i in range(6)]
    windows = build_windows(examples, tokenizer, SPEC, is_training=False)
    hf = tokenizer([e.question for e in examples], [e.context for e in examples],
                   truncation="only_second", max_length=SPEC.sequence_length,
                   stride=SPEC.doc_stride, return_overflowing_tokens=True,
                   return_offsets_mapping=True)
    assert len(windows) == len(hf["input_ids"]) > len(examples)  # long contexts: several windows
    for k, w in enumerate(windows):
        assert w.example_index == hf["overflow_to_sample_mapping"][k]
        assert w.input_ids.tolist() == hf["input_ids"][k]
        assert w.token_type_ids().tolist() == hf["token_type_ids"][k]
        context_offsets = [o for o, s in zip(hf["offset_mapping"][k], hf.sequence_ids(k)) if s == 1]
        assert w.offsets.tolist() == [list(o) for o in context_offsets]


def test_query_is_cut_to_max_query_length(tokenizer):
    long_question = " ".join(["why"] * 40) + "?"
    ex = SquadExample(qid="q", question=long_question, context=_text(200, seed=3))
    windows = build_windows([ex], tokenizer, SPEC, is_training=False)
    assert all(w.context_start == SPEC.max_query_length + 2 for w in windows)
    assert all(len(w) <= SPEC.sequence_length for w in windows)
    assert all(w.input_ids[SPEC.max_query_length + 1] == tokenizer.sep_token_id for w in windows)


def _labelled_text(w, ex):
    lo = w.context_start
    return ex.context[w.offsets[w.start_position - lo, 0]:w.offsets[w.end_position - lo, 1]]


def test_answer_straddling_a_window_edge(tokenizer):
    context = _text(150, seed=11)
    probe = build_windows([SquadExample("p", "Which word?", context)], tokenizer, SPEC,
                          is_training=False)
    assert len(probe) >= 3
    # Answer: the last 2 context tokens of window 0 plus the next 2 (window 1 holds all 4,
    # since consecutive windows overlap by doc_stride = 16 tokens).
    w0 = probe[0]
    first = w0.num_context_tokens - 2
    start_char = int(w0.offsets[first, 0])
    full = build_windows([SquadExample("p", "Which word?", context)], tokenizer,
                         WindowSection(4096, 16, 16), is_training=False)[0]
    end_char = int(full.offsets[first + 3, 1])
    answer = context[start_char:end_char]
    ex = SquadExample("p", "Which word?", context, answers=[(answer, start_char)])
    windows = build_windows([ex], tokenizer, SPEC, is_training=True)
    assert (windows[0].start_position, windows[0].end_position) == (0, 0)  # cut: at [CLS]
    assert _labelled_text(windows[1], ex) == answer
    assert windows[1].end_position - windows[1].start_position == 3
    for w in windows[2:]:  # later windows start past the answer
        assert (w.start_position, w.end_position) == (0, 0)


def test_labels_cover_the_answer_or_point_at_cls(tokenizer):
    rng = random.Random(5)
    examples = []
    for i in range(20):
        context = _text(rng.randint(20, 160), seed=100 + i)
        words = context.split()
        a, b = sorted(rng.sample(range(len(words)), 2))
        b = min(b, a + 3)
        start = len(" ".join(words[:a])) + (1 if a else 0)
        answer = " ".join(words[a:b + 1])
        assert context[start:start + len(answer)] == answer
        examples.append(SquadExample(str(i), "Which words?", context, answers=[(answer, start)]))
    windows = build_windows(examples, tokenizer, SPEC, is_training=True)
    found = set()
    for w in windows:
        ex = examples[w.example_index]
        text, start = ex.answers[0]
        inside = w.offsets[0, 0] <= start and w.offsets[-1, 1] >= start + len(text)
        if not inside:
            assert (w.start_position, w.end_position) == (0, 0)
            continue
        found.add(w.example_index)
        assert w.context_start <= w.start_position <= w.end_position < len(w)
        labelled = _labelled_text(w, ex)
        assert text in labelled and len(labelled) - len(text) <= 2  # at most a trailing comma
    assert found == set(range(len(examples)))  # every answer is labelled in some window


def test_impossible_questions_label_cls(tokenizer):
    ex = SquadExample("q", "Who?", _text(120, seed=2), is_impossible=True)
    windows = build_windows([ex], tokenizer, SPEC, is_training=True)
    assert len(windows) > 1 and all(w.start_position == w.end_position == 0 for w in windows)


def test_workers_do_not_change_windows(tokenizer):
    examples = [SquadExample(str(i), f"Is the {WORDS[i % 20]} here?", _text(30 + 11 * i, seed=i),
                             answers=[(WORDS[0], 0)]) for i in range(23)]
    one = build_windows(examples, tokenizer, SPEC, is_training=True)
    two = build_windows(examples, tokenizer, SPEC, is_training=True, workers=2, chunk_examples=5)
    assert len(one) == len(two)
    for a, b in zip(one, two):
        assert a.example_index == b.example_index
        assert np.array_equal(a.input_ids, b.input_ids) and np.array_equal(a.offsets, b.offsets)
        assert (a.start_position, a.end_position) == (b.start_position, b.end_position)


def test_padding(tokenizer):
    examples = [SquadExample("a", "Why?", "Short one."), SquadExample("b", "Why?", _text(30, 1))]
    windows = build_windows(examples, tokenizer, SPEC, is_training=False)
    batch = pad_windows(windows, pad_to=64, pad_id=tokenizer.pad_token_id)
    assert batch["input_ids"].shape == (2, 64)
    assert batch["attention_mask"].sum(1).tolist() == [len(w) for w in windows]
    assert batch["token_type_ids"][0].tolist() == windows[0].token_type_ids().tolist() + [0] * (
        64 - len(windows[0]))
    assert pad_windows(windows)["input_ids"].shape == (2, max(len(w) for w in windows))
