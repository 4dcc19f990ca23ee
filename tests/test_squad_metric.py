"""SQuAD exact match / F1 against values worked out by hand from the official v1.1 and v2.0
scripts' definitions, and `bertforge squad-eval` printing the official JSON."""

from __future__ import annotations

import json

import pytest

from bertforge.cli import main
from bertforge.squad.metric import (evaluate_v1, evaluate_v2, exact_match, f1_v1, f1_v2,
                                    normalize_answer)


def _articles(questions):
    """questions: [(id, [gold texts])] -> official nested data (one paragraph)."""
    qas = [{"id": qid, "question": "?", "answers": [{"text": t, "answer_start": 0} for t in golds]}
           for qid, golds in questions]
    return [{"title": "t", "paragraphs": [{"context": "ctx", "qas": qas}]}]


@pytest.mark.parametrize("text, expected", [
    ("The  Quick, brown fox!", "quick brown fox"),   # article, punctuation, spaces
    ("an apple a day", "apple day"),                 # a / an removed as words
    ("banana and the theory", "banana and theory"),  # not inside words ("an" in banana)
    ("U.S.A.", "usa"),                               # punctuation removed, not split on
    ("  A\tTHE\nAn ", ""),                           # only articles: empty
])
def test_normalisation(text, expected):
    assert normalize_answer(text) == expected


def test_several_gold_answers_take_the_best():
    golds = ["Denver Broncos", "Broncos"]
    # "the Broncos of Denver" -> [broncos, of, denver]; vs [denver, broncos]: P 2/3, R 1 -> 0.8;
    # vs [broncos]: P 1/3, R 1 -> 0.5. The best is 0.8; no exact match.
    assert max(f1_v1("the Broncos of Denver", g) for g in golds) == pytest.approx(0.8)
    assert max(exact_match("the Broncos of Denver", g) for g in golds) == 0
    assert max(exact_match("THE denver broncos.", g) for g in golds) == 1


def test_v1_missing_prediction_scores_zero_and_counts(capsys):
    articles = _articles([("q1", ["Paris"]), ("q2", ["Denver Broncos", "Broncos"]),
                          ("q3", ["blue"])])
    result = evaluate_v1(articles, {"q1": "paris", "q2": "the Broncos of Denver"})
    # EM: 1 of 3; F1: (1 + 0.8 + 0) / 3.
    assert result == pytest.approx({"exact_match": 100 / 3, "f1": 60.0})
    assert "Unanswered question q3 will receive score 0." in capsys.readouterr().err


def test_v2_empty_answers():
    assert f1_v2("", "") == 1.0          # unanswerable answered as such
    assert f1_v2("something", "") == 0.0
    assert f1_v2("", "Paris") == 0.0
    assert f1_v2("the", "") == 1.0       # normalises to empty: counts as no answer
    assert f1_v1("", "Paris") == 0.0


V2_QUESTIONS = [("a", ["Paris"]), ("b", []), ("c", ["blue whale", "the blue whale"]), ("d", [])]
V2_PREDS = {"a": "paris", "b": "", "c": "whale", "d": "something"}
V2_NA = {"a": 0.1, "b": 0.9, "c": 0.3, "d": 0.8}


def test_v2_breakdown_and_best_thresholds():
    result = evaluate_v2(_articles(V2_QUESTIONS), V2_PREDS, V2_NA)
    # Raw: a EM1 F1 1; b EM1 F1 1; c EM0 F1 2/3 (P 1, R 1/2); d EM0 F1 0. No na-prob > 1.0.
    expected = {"exact": 50.0, "f1": 100 * (8 / 3) / 4, "total": 4,
                "HasAns_exact": 50.0, "HasAns_f1": 100 * (5 / 3) / 2, "HasAns_total": 2,
                "NoAns_exact": 50.0, "NoAns_f1": 50.0, "NoAns_total": 2,
                # Sweep by na-prob a(.1) c(.3) d(.8) b(.9) from 2 (the unanswerables):
                # exact 3, 3, 2, 2 -> best 3/4 at 0.1; f1 3, 3.667, 2.667, 2.667 -> 3.667/4 at 0.3.
                "best_exact": 75.0, "best_exact_thresh": 0.1,
                "best_f1": 100 * (11 / 3) / 4, "best_f1_thresh": 0.3}
    assert list(result) == list(expected)  # the official script's key order
    assert result == pytest.approx(expected)


def test_v2_threshold_turns_predictions_into_no_answer():
    result = evaluate_v2(_articles(V2_QUESTIONS), V2_PREDS, V2_NA, na_prob_thresh=0.5)
    # b (.9) and d (.8) count as "no answer" -> both unanswerable -> 1 each.
    assert result["exact"] == pytest.approx(75.0)
    assert result["f1"] == pytest.approx(100 * (11 / 3) / 4)
    assert result["NoAns_exact"] == 100.0


def test_v2_without_na_probs_has_no_best_keys():
    result = evaluate_v2(_articles(V2_QUESTIONS), V2_PREDS)
    assert "best_f1" not in result and result["total"] == 4


def test_v2_missing_prediction_is_a_clear_error():
    with pytest.raises(ValueError, match="no prediction.*'?d"):
        evaluate_v2(_articles(V2_QUESTIONS), {k: v for k, v in V2_PREDS.items() if k != "d"})


def _write(tmp_path, name, payload):
    path = tmp_path / name
    path.write_text(json.dumps(payload))
    return str(path)


def test_squad_eval_cli_prints_official_json(tmp_path, capsys):
    data = _write(tmp_path, "dev.json", {"version": "v2.0", "data": _articles(V2_QUESTIONS)})
    preds = _write(tmp_path, "predictions.json", V2_PREDS)
    na = _write(tmp_path, "null_odds.json", V2_NA)
    assert main(["squad-eval", data, preds, "--na-prob-file", na]) == 0
    out = capsys.readouterr().out
    assert out.startswith('{\n  "exact": 50.0,')  # json.dumps(..., indent=2) as the script
    printed = json.loads(out)
    assert printed["best_f1_thresh"] == 0.3 and printed["HasAns_total"] == 2

    data_v1 = _write(tmp_path, "dev1.json", {"version": "1.1", "data": _articles(
        [("q1", ["Paris"]), ("q2", ["Denver Broncos", "Broncos"])])})
    preds_v1 = _write(tmp_path, "p1.json", {"q1": "Paris!", "q2": "the Broncos of Denver"})
    out_file = tmp_path / "eval.json"
    assert main(["squad-eval", data_v1, preds_v1, "--out-file", str(out_file)]) == 0
    text = out_file.read_text().strip()
    assert "\n" not in text  # v1.1 prints one line
    assert json.loads(text) == pytest.approx({"exact_match": 50.0, "f1": 90.0})


def test_squad_eval_cli_bad_prediction_file(tmp_path, capsys):
    data = _write(tmp_path, "dev.json", {"version": "1.1", "data": _articles([("q1", ["x"])])})
    preds = _write(tmp_path, "predictions.json", ["not", "a", "mapping"])
    assert main(["squad-eval", data, preds]) == 2
    err = capsys.readouterr().err
    assert "predictions.json" in err and "Traceback" not in err
