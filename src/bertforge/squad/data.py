"""SQuAD examples: read the official nested JSON (v1.1 / v2.0) or HF datasets, and check them.

The official format is data -> [article] -> paragraphs -> [paragraph] -> qas -> [question],
each question {id, question, answers: [{text, answer_start}], is_impossible (v2 only)}.
Everything downstream (windows, post-processing, the metric) trusts the examples built here,
so the checks live in one place:

- wrong schema, an empty context, an empty or duplicate id, an empty question, a v2 question
  in a v1.1 run, or `is_impossible` contradicting the answers: ValueError naming the file,
  the JSON path and the question id. These mean the file is not what the user thinks it is.
- an answer whose `answer_start` does not point at its text in the context: a counted skip
  (training) listed in the summary with the first ids. Real files hold a few of these (the
  reference skipped "could not find answer" examples too), and one stray offset should not
  stop a 88k-question run; if every answer is bad the run stops with an error instead.
  Evaluation never reads answer_start (the metric compares texts), so it is not checked there.

Cost: reading and checking 3.3 MB of SQuAD-shaped JSON (9.5k questions) takes 0.05 s here,
so ~0.5 s for the 30 MB train-v1.1.json; the checks are one slice compare per answer.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bertforge.data.stage import Summary

MAX_IDS_SHOWN = 5


@dataclass
class SquadExample:
    """One question over one context; `answers` are (text, char start) pairs (v2: may be empty)."""

    qid: str
    question: str
    context: str
    answers: list[tuple[str, int]] = field(default_factory=list)
    is_impossible: bool = False
    title: str = ""

    @property
    def answer_texts(self) -> list[str]:
        return [text for text, _ in self.answers]


@dataclass
class SquadSet:
    """Examples of one file, the raw `data` list (the metric reads it) and what was skipped."""

    examples: list[SquadExample]
    articles: list[dict[str, Any]]
    summary: Summary
    skipped_ids: dict[str, list[str]] = field(default_factory=dict)

    @property
    def is_v2(self) -> bool:
        return any(e.is_impossible for e in self.examples)


def _need(value: Any, kind: type, where: str, what: str) -> Any:
    if not isinstance(value, kind):
        raise ValueError(f"{where}: {what} must be a {kind.__name__}, got "
                         f"{type(value).__name__}; expected the official SQuAD format "
                         "data -> paragraphs -> qas")
    return value


def load_squad_json(path: Path | str) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SQuAD file {path} not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON: {err}") from None
    _need(data, dict, str(path), "the top level")
    if "data" not in data:
        raise ValueError(f"{path}: no 'data' key; expected the official SQuAD format "
                         "{\"version\": ..., \"data\": [{\"paragraphs\": [...]}]}")
    _need(data["data"], list, str(path), "'data'")
    return data


def read_squad(path: Path | str, *, is_training: bool, squad_v2: bool) -> SquadSet:
    """Examples of a SQuAD JSON file; see the module docstring for what fails and what skips."""
    data = load_squad_json(path)
    return examples_from_articles(data["data"], source=str(path), is_training=is_training,
                                  squad_v2=squad_v2)


def examples_from_articles(articles: list[Any], *, source: str, is_training: bool,
                           squad_v2: bool) -> SquadSet:
    summary = Summary("squad data")
    skipped: dict[str, list[str]] = {}
    examples: list[SquadExample] = []
    seen: dict[str, str] = {}
    for a, article in enumerate(articles):
        where_a = f"{source}: data[{a}]"
        _need(article, dict, where_a, "an article")
        paragraphs = _need(article.get("paragraphs"), list, where_a, "'paragraphs'")
        title = article.get("title", "")
        for p, paragraph in enumerate(paragraphs):
            where_p = f"{where_a}.paragraphs[{p}]"
            _need(paragraph, dict, where_p, "a paragraph")
            context = _need(paragraph.get("context"), str, where_p, "'context'")
            qas = _need(paragraph.get("qas"), list, where_p, "'qas'")
            for q, qa in enumerate(qas):
                where = f"{where_p}.qas[{q}]"
                _need(qa, dict, where, "a question")
                qid = qa.get("id")
                if not isinstance(qid, (str, int)) or str(qid) == "":
                    raise ValueError(f"{where}: missing or empty 'id'")
                qid = str(qid)
                where = f"{where} (id {qid!r})"
                if qid in seen:
                    raise ValueError(f"{where}: duplicate question id, first seen at {seen[qid]}; "
                                     "ids key predictions.json, so they must be unique")
                seen[qid] = where
                example = _example(qa, qid, context, title, where, squad_v2=squad_v2)
                if is_training and not example.is_impossible:
                    bad = _first_misplaced_answer(example)
                    if bad is not None:
                        reason = "answer_start does not match the context"
                        summary.skip(reason)
                        skipped.setdefault(reason, []).append(qid)
                        continue
                examples.append(example)
    summary.counts["questions"] = len(examples)
    summary.counts["impossible"] = sum(e.is_impossible for e in examples)
    if is_training and not examples and summary.skipped:
        ids = ", ".join(next(iter(skipped.values()))[:MAX_IDS_SHOWN])
        raise ValueError(f"{source}: every training answer was skipped ({summary.line()}; e.g. "
                         f"ids {ids}); check that answer_start counts characters from 0")
    return SquadSet(examples=examples, articles=articles, summary=summary, skipped_ids=skipped)


def _example(qa: Mapping[str, Any], qid: str, context: str, title: str, where: str, *,
             squad_v2: bool) -> SquadExample:
    if not context.strip():
        raise ValueError(f"{where}: the paragraph's context is empty")
    question = qa.get("question")
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"{where}: missing or empty 'question'")
    raw = _need(qa.get("answers", []), list, where, "'answers'")
    answers = []
    for i, ans in enumerate(raw):
        _need(ans, dict, f"{where}.answers[{i}]", "an answer")
        text, start = ans.get("text"), ans.get("answer_start")
        if not isinstance(text, str) or not isinstance(start, int) or isinstance(start, bool):
            raise ValueError(f"{where}.answers[{i}]: needs 'text' (string) and 'answer_start' "
                             f"(integer), got {ans!r}")
        answers.append((text, start))
    impossible = qa.get("is_impossible", False)
    if not isinstance(impossible, bool):
        raise ValueError(f"{where}: 'is_impossible' must be true or false, got {impossible!r}")
    if impossible and not squad_v2:
        raise ValueError(f"{where}: is_impossible is true but this is a SQuAD 1.1 run; pass "
                         "--squad-v2 for SQuAD 2.0 data")
    if impossible and answers:
        raise ValueError(f"{where}: is_impossible is true but 'answers' is not empty (SQuAD 2.0 "
                         "keeps those under 'plausible_answers')")
    if not impossible and not answers:
        if not squad_v2:
            raise ValueError(f"{where}: no answers; SQuAD 1.1 questions all have one (SQuAD 2.0 "
                             "data: pass --squad-v2)")
        impossible = True  # v2 dev files mark unanswerable questions by an empty list
    return SquadExample(qid=qid, question=question, context=context, answers=answers,
                        is_impossible=impossible, title=str(title))


def _first_misplaced_answer(example: SquadExample) -> int | None:
    """Index of the first answer (only the first is trained on) not found at answer_start."""
    text, start = example.answers[0]
    if not text or start < 0 or example.context[start:start + len(text)] != text:
        return 0
    return None


def skipped_line(dataset: SquadSet) -> str:
    """'; e.g. ids a, b' style detail for the log, empty when nothing was skipped."""
    parts = [f"{reason}: {', '.join(ids[:MAX_IDS_SHOWN])}" + (" ..." if len(ids) > MAX_IDS_SHOWN
                                                              else "")
             for reason, ids in dataset.skipped_ids.items()]
    return "; ".join(parts)


# ---------------------------------------------------------------- Hugging Face datasets
def rows_to_articles(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """HF `squad`/`squad_v2` rows (flat: id, title, context, question, answers{text,
    answer_start}) -> the official nested articles, grouping consecutive rows by context."""
    articles: list[dict[str, Any]] = []
    for row in rows:
        answers = [{"text": t, "answer_start": int(s)}
                   for t, s in zip(row["answers"]["text"], row["answers"]["answer_start"])]
        qa = {"id": row["id"], "question": row["question"], "answers": answers}
        title = row.get("title", "")
        if not articles or articles[-1]["title"] != title:
            articles.append({"title": title, "paragraphs": []})
        paragraphs = articles[-1]["paragraphs"]
        if not paragraphs or paragraphs[-1]["context"] != row["context"]:
            paragraphs.append({"context": row["context"], "qas": []})
        paragraphs[-1]["qas"].append(qa)
    return articles


def load_hf_split(name: str, split: str) -> list[dict[str, Any]]:
    """Articles of `datasets.load_dataset(name)[split]`; clear errors when impossible here."""
    try:
        import datasets
    except ImportError:
        raise ValueError(f"--dataset {name} needs the Hugging Face datasets package (pip install "
                         "datasets); or download the SQuAD JSON files and pass --train-file / "
                         "--predict-file") from None
    try:
        rows = datasets.load_dataset(name, split=split)
    except (OSError, ConnectionError) as err:
        raise ValueError(f"--dataset {name}: could not load split {split!r} ({err}); this needs a "
                         "network connection (or a warm HF datasets cache). Offline, pass the "
                         "SQuAD JSON files with --train-file / --predict-file") from None
    return rows_to_articles(rows)


def load_split(data_section: Any, *, training: bool) -> SquadSet:
    """The training or validation SquadSet named by a SquadDataSection."""
    d = data_section
    if d.dataset == "files":
        path = d.train_file if training else d.predict_file
        return read_squad(path, is_training=training, squad_v2=d.squad_v2)
    articles = load_hf_split(d.dataset, "train" if training else "validation")
    return examples_from_articles(articles, source=f"datasets:{d.dataset}", is_training=training,
                                  squad_v2=d.squad_v2)
