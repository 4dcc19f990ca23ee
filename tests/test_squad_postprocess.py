"""Post-processing picks the right span from crafted logits: invalid pairs are skipped, the
best window wins, text comes from the original context, SQuAD 2.0 null vs span threshold."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bertforge.config.serve import WindowSection
from bertforge.squad.data import SquadExample
from bertforge.squad.features import build_windows
from bertforge.squad.postprocess import postprocess

CONTEXT = ("The Quick brown Fox jumps over the lazy dog near the old Mill-House, while "
           "farmers in Provence harvest lavender under a bright July sky every summer.")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    from bertforge.data.vocab import save_tokenizer_files
    path = tmp_path_factory.mktemp("tok")
    save_tokenizer_files(path)
    return AutoTokenizer.from_pretrained(path)


def _position(window, context, word):
    """Window index of the first context token starting at `word`'s first char."""
    char = context.index(word)
    hits = np.nonzero(window.offsets[:, 0] == char)[0]
    assert len(hits), f"{word!r} not at a token start in this window"
    return window.context_start + int(hits[0])


def _logits(windows, picks):
    """Zero logits with the given (window, start/end, position, value) set."""
    starts = [np.zeros(len(w), dtype=np.float32) for w in windows]
    ends = [np.zeros(len(w), dtype=np.float32) for w in windows]
    for k, kind, pos, value in picks:
        (starts if kind == "start" else ends)[k][pos] = value
    return starts, ends


def test_best_valid_span_from_crafted_logits(tokenizer):
    ex = SquadExample("q", "What jumps?", CONTEXT)
    (w,) = build_windows([ex], tokenizer, WindowSection(128, 32, 16), is_training=False)
    brown, fox = _position(w, CONTEXT, "brown"), _position(w, CONTEXT, "Fox")
    quick, dog = _position(w, CONTEXT, "Quick"), _position(w, CONTEXT, "dog")
    starts, ends = _logits([w], [
        (0, "start", 2, 50.0),      # a question token: never a valid start
        (0, "end", len(w) - 1, 50.0),  # the final [SEP]: never a valid end
        (0, "start", dog, 9.0), (0, "end", quick, 9.5),  # end before start: invalid
        (0, "start", brown, 6.0), (0, "end", fox, 6.0),  # the best valid pair
    ])
    result = postprocess([ex], [w], starts, ends)
    assert result.answers == {"q": "brown Fox"}  # original case from the context
    nbest = result.nbest["q"]
    assert nbest[0]["text"] == "brown Fox"
    assert nbest[0]["start_logit"] == 6.0 and nbest[0]["end_logit"] == 6.0
    assert sum(e["probability"] for e in nbest) == pytest.approx(1.0)
    assert [e["probability"] for e in nbest] == sorted((e["probability"] for e in nbest),
                                                        reverse=True)
    assert len({e["text"] for e in nbest}) == len(nbest) <= 20


def test_max_answer_length_and_punctuation_spans(tokenizer):
    ex = SquadExample("q", "Where?", CONTEXT)
    (w,) = build_windows([ex], tokenizer, WindowSection(128, 32, 16), is_training=False)
    the, mill = _position(w, CONTEXT, "The"), _position(w, CONTEXT, "Mill-House")
    house_end = int(np.nonzero(w.offsets[:, 1] == CONTEXT.index("Mill-House") + 10)[0][0])
    house_end += w.context_start
    starts, ends = _logits([w], [(0, "start", the, 10.0), (0, "end", house_end, 10.0),
                                 (0, "start", mill, 4.0)])
    assert house_end - the + 1 > 5
    short = postprocess([ex], [w], starts, ends, max_answer_length=5)
    assert short.answers["q"] == "Mill-House"  # the longer, higher-scoring span is skipped
    full = postprocess([ex], [w], starts, ends, max_answer_length=30)
    assert full.answers["q"] == CONTEXT[:CONTEXT.index("Mill-House") + 10]


def test_best_window_wins_and_padding_is_ignored(tokenizer):
    context = " ".join([CONTEXT] * 3)
    ex = SquadExample("q", "Which?", context)
    windows = build_windows([ex], tokenizer, WindowSection(48, 16, 16), is_training=False)
    assert len(windows) >= 3
    k = len(windows) - 1
    target_char = context.rindex("lavender")
    hit = int(np.nonzero(windows[k].offsets[:, 0] == target_char)[0][0]) + windows[k].context_start
    fox = _position(windows[0], context, "Fox")  # a weaker candidate in the first window
    picks = [(k, "start", hit, 8.0), (k, "end", hit, 8.0), (0, "start", fox, 5.0),
             (0, "end", fox, 5.0)]
    starts, ends = _logits(windows, picks)
    result = postprocess([ex], windows, starts, ends)
    assert result.answers["q"] == "lavender"
    assert result.nbest["q"][0]["start_logit"] == 8.0  # from the last window
    # Rows padded to 48 with huge padding logits: same answer (padding is not a position).
    padded_s = [np.concatenate([s, np.full(48 - len(s), 99.0, np.float32)]) for s in starts]
    padded_e = [np.concatenate([e, np.full(48 - len(e), 99.0, np.float32)]) for e in ends]
    again = postprocess([ex], windows, padded_s, padded_e)
    assert again.answers == result.answers and again.nbest == result.nbest


def test_v2_null_against_best_span_with_threshold(tokenizer, tmp_path):
    ex = SquadExample("q", "What?", CONTEXT)
    windows = build_windows([ex], tokenizer, WindowSection(24, 4, 8), is_training=False)
    assert len(windows) >= 2
    fox = _position(windows[0], CONTEXT, "Fox")
    # Null = lowest [CLS] start + end over windows: window 0 has 3 + 3, window 1 has 2.5 + 2.5.
    picks = [(0, "start", 0, 3.0), (0, "end", 0, 3.0), (1, "start", 0, 2.5), (1, "end", 0, 2.5),
             (0, "start", fox, 2.0), (0, "end", fox, 2.0)]
    starts, ends = _logits(windows, picks)
    result = postprocess([ex], windows, starts, ends, squad_v2=True)
    assert result.null_odds["q"] == pytest.approx(5.0 - 4.0)
    assert result.answers["q"] == ""  # 1.0 > threshold 0
    assert "" in {e["text"] for e in result.nbest["q"]}
    lenient = postprocess([ex], windows, starts, ends, squad_v2=True, null_score_diff_threshold=1.5)
    assert lenient.answers["q"] == "Fox"
    files = lenient.write(tmp_path)
    assert json.loads(files["predictions"].read_text()) == {"q": "Fox"}
    assert json.loads(files["null_odds"].read_text()) == {"q": pytest.approx(1.0)}
    assert json.loads(files["nbest"].read_text())["q"][0].keys() == {
        "text", "probability", "start_logit", "end_logit"}


def test_v1_writes_no_null_odds(tokenizer, tmp_path):
    ex = SquadExample("q", "What?", CONTEXT)
    windows = build_windows([ex], tokenizer, WindowSection(128, 32, 16), is_training=False)
    starts, ends = _logits(windows, [])
    files = postprocess([ex], windows, starts, ends).write(tmp_path)
    assert "null_odds" not in files and not (tmp_path / "null_odds.json").exists()


def test_mismatched_logit_rows_are_an_error(tokenizer):
    ex = SquadExample("q", "What?", CONTEXT)
    windows = build_windows([ex], tokenizer, WindowSection(128, 32, 16), is_training=False)
    with pytest.raises(ValueError, match="windows but"):
        postprocess([ex], windows, [], [])
