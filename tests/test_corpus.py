"""`bertforge tokenize` on JSONL, Parquet and Hugging Face datasets (data/corpus.py).

The reference is the text path: the same documents written as text (one sentence per line, a
blank line after each) must give byte-identical shards in every format, since the same
sentences and document boundaries then reach the same algorithm. The documents are the real
sample's (wiki_02: 17 articles, 0.6 MB); a record's text is its sentences one per line, which
blingfire gives back unchanged (checked: all 20,281 sentences of the sample). Datasets are
built here with Dataset.from_dict(...).save_to_disk: no network. ~6 s on 2 cores.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest

from bertforge.data import corpus, instances
from bertforge.data.corpus import document_sentences, open_corpus
from bertforge.data.instances import InstanceConfig, tokenize

pa = pytest.importorskip("pyarrow", reason="needs the corpus extra: pip install "
                         "'bertforge[corpus]'")
pq = pytest.importorskip("pyarrow.parquet")
datasets = pytest.importorskip("datasets")


@pytest.fixture(scope="module")
def tokenizer():
    from bertforge.data.vocab import load_tokenizer
    return load_tokenizer()


@pytest.fixture(scope="module")
def documents(preprocessed_sample) -> list[list[str]]:
    text = (preprocessed_sample / "AA" / "wiki_02.txt").read_text()
    return [d.split("\n") for d in text.split("\n\n") if d.strip()]


@pytest.fixture
def small_parts(monkeypatch):
    """Several tasks and several conversion parts, even on 0.6 MB."""
    monkeypatch.setattr(instances, "TASK_BYTES", 100_000)
    monkeypatch.setattr(corpus, "PART_BYTES", 60_000)
    monkeypatch.setattr(corpus, "PART_ROWS", 4)


def _texts(documents) -> list[str]:
    return ["\n".join(sentences) for sentences in documents]


def _write_jsonl(path: Path, records) -> Path:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    return path


def _run(inputs, out, tokenizer, workers=1, num_shards=2, **kwargs):
    config = InstanceConfig(128, 20, duplication_factor=2, seed=5)
    return tokenize(inputs, out, config, tokenizer, num_shards=num_shards, workers=workers,
                    **kwargs)


def _contents(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.glob("part-*"))}


def test_every_format_gives_the_shards_of_the_same_text(documents, tokenizer, tmp_path,
                                                        small_parts):
    text = tmp_path / "docs.txt"
    text.write_text("".join(f"{d}\n\n" for d in _texts(documents)))
    records = [{"id": i, "text": t} for i, t in enumerate(_texts(documents))]
    (tmp_path / "two").mkdir()
    inputs = {"jsonl": [_write_jsonl(tmp_path / "docs.jsonl", records)],
              "jsonl.gz": [_write_jsonl(tmp_path / "docs.jsonl.gz", records)],
              # two files: documents never span files, and files are read in sorted order
              "two jsonl": [_write_jsonl(tmp_path / "two" / "a.json", records[:7]),
                            _write_jsonl(tmp_path / "two" / "b.json", records[7:])]}
    pq.write_table(pa.table({"id": [r["id"] for r in records],
                             "text": [r["text"] for r in records]}),
                   tmp_path / "docs.parquet", row_group_size=5)  # 4 row groups
    inputs["parquet"] = [tmp_path / "docs.parquet"]
    dataset = datasets.Dataset.from_dict({"text": [r["text"] for r in records],
                                          "id": [r["id"] for r in records]})
    dataset.save_to_disk(str(tmp_path / "saved"))
    inputs["hf"] = [tmp_path / "saved"]
    datasets.DatasetDict({"train": dataset.select(range(3)), "validation": dataset}).save_to_disk(
        str(tmp_path / "saved-dict"))

    reference = _run([text], tmp_path / "out-text", tokenizer)
    expected = _contents(tmp_path / "out-text")
    assert len(expected) == 4 and all(expected.values())
    for name, paths in inputs.items():
        out = tmp_path / f"out-{name}"
        summary = _run([tmp_path / "two"] if name == "two jsonl" else paths, out, tokenizer,
                       workers=2 if name in ("jsonl", "hf") else 1)
        assert _contents(out) == expected, name
        assert summary.counts["records in"] == len(documents), name
        assert {k: v for k, v in summary.counts.items() if k != "records in"} == \
            reference.counts and not summary.skipped, name
        assert not list(out.glob(".tokenize-corpus-*")), name  # the scratch text is gone
    split = _run([tmp_path / "saved-dict"], tmp_path / "out-split", tokenizer,
                 split="validation")
    assert _contents(tmp_path / "out-split") == expected
    assert split.counts["records in"] == len(documents)


def test_same_shards_for_any_workers(documents, tokenizer, tmp_path, small_parts):
    path = _write_jsonl(tmp_path / "docs.jsonl", [{"text": t} for t in _texts(documents)])
    assert len(open_corpus([path], tmp_path / "w1").parts) >= 8
    one = _run([path], tmp_path / "w1", tokenizer, workers=1, num_shards=3)
    three = _run([path], tmp_path / "w3", tokenizer, workers=3, num_shards=3)
    assert _contents(tmp_path / "w1") == _contents(tmp_path / "w3")
    assert one.as_dict() == three.as_dict()


def test_records_without_usable_text_are_counted(tokenizer, tmp_path):
    good = ("The first sentence of a document. Its second sentence, with more words.\n\n"
            "A second paragraph of it.")
    lines = [json.dumps({"text": good}), "{not json", json.dumps([1, 2]),
             json.dumps({"title": "no text field"}), json.dumps({"text": None}),
             json.dumps({"text": 42}), json.dumps({"text": "  \n "}), "",
             '{"text": "lone \\ud800 surrogate."}',
             json.dumps({"text": "Another document. It has two sentences."})]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(lines) + "\n")
    summary = _run([path], tmp_path / "out", tokenizer, num_shards=1)
    assert dict(summary.skipped) == {
        "invalid-json-line": 1, "record-not-an-object": 1, "record-without-text-field": 1,
        "null-text": 1, "non-string-text": 1, "empty-text": 1, "invalid-unicode-text": 1}
    assert summary.counts["records in"] == 9  # the non-blank lines
    assert summary.counts["documents in"] == 2 and summary.counts["sentences"] == 5
    assert summary.counts["records in"] == 2 + sum(summary.skipped.values())
    assert "record-without-text-field" in summary.line()
    # a Parquet null and an empty string are counted the same way
    pq.write_table(pa.table({"text": [good, None, "", good]}), tmp_path / "nulls.parquet")
    summary = _run([tmp_path / "nulls.parquet"], tmp_path / "out-pq", tokenizer, num_shards=1)
    assert dict(summary.skipped) == {"null-text": 1, "empty-text": 1}
    assert summary.counts["records in"] == 4 and summary.counts["documents in"] == 2


def test_a_wrong_text_field_is_a_clear_error(tokenizer, tmp_path, capsys):
    jsonl = _write_jsonl(tmp_path / "a.jsonl", [{"id": 1, "body": "Some text here."}])
    with pytest.raises(ValueError, match=r"a\.jsonl.*'text'.*fields: id, body"):
        _run([jsonl], tmp_path / "out", tokenizer)
    pq.write_table(pa.table({"id": [1], "body": ["Some text."]}), tmp_path / "a.parquet")
    with pytest.raises(ValueError, match=r"a\.parquet.*'text'.*columns: id, body"):
        _run([tmp_path / "a.parquet"], tmp_path / "out", tokenizer)
    with pytest.raises(ValueError, match=r"column 'id' holds int64, not text"):
        _run([tmp_path / "a.parquet"], tmp_path / "out", tokenizer, text_field="id")
    datasets.Dataset.from_dict({"body": ["Some text."]}).save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(ValueError, match=r"ds.*'text'.*columns: body"):
        _run([tmp_path / "ds"], tmp_path / "out", tokenizer)
    with pytest.raises(ValueError, match="inputs mix formats"):
        _run([jsonl, tmp_path / "a.parquet"], tmp_path / "out", tokenizer)
    assert not (tmp_path / "out").exists()  # nothing was started

    from bertforge.cli import main
    capsys.readouterr()  # datasets' save_to_disk progress bars
    assert main(["tokenize", str(jsonl), "--output-dir", str(tmp_path / "out"),
                 "--text-field", "title"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "a.jsonl" in err and "'title'" in err and "id, body" in err
    assert main(["tokenize", str(jsonl), "--output-dir", str(tmp_path / "cli"),
                 "--text-field", "body", "--num-shards", "1"]) == 0
    assert "1 records in" in capsys.readouterr().out


def test_a_missing_extra_names_the_pip_install(tokenizer, tmp_path, monkeypatch):
    pq.write_table(pa.table({"text": ["Some text."]}), tmp_path / "a.parquet")
    monkeypatch.setitem(__import__("sys").modules, "pyarrow.parquet", None)
    with pytest.raises(ValueError, match=r"needs pyarrow .*pip install 'bertforge\[corpus\]'"):
        _run([tmp_path / "a.parquet"], tmp_path / "out", tokenizer)


def test_hub_names_take_the_load_dataset_path(tmp_path, monkeypatch):
    # the tests are offline (conftest sets HF_HUB_OFFLINE): loading must fail clearly
    with pytest.raises(ValueError, match="dataset no-such/corpus-xyz: could not load split "
                       "'train'"):
        open_corpus(["no-such/corpus-xyz"], tmp_path, "hf")
    # and an existing hub dataset is read like a saved one: its cache files are the inputs
    saved = datasets.Dataset.from_dict({"text": ["One. Two."]})
    saved.save_to_disk(str(tmp_path / "cache"))
    loaded = datasets.load_from_disk(str(tmp_path / "cache"))
    calls = []
    monkeypatch.setattr(datasets, "load_dataset",
                        lambda name, split: calls.append((name, split)) or loaded)
    found = open_corpus(["owner/corpus"], tmp_path / "out", "hf", split="test")
    assert calls == [("owner/corpus", "test")]
    assert found.files == [Path(f["filename"]) for f in loaded.cache_files]
    assert found.settings["datasets"] == ["owner/corpus"] and found.settings["split"] == "test"


def test_rerun_skips_when_complete_and_redoes_when_the_input_changes(documents, tokenizer,
                                                                     tmp_path):
    texts = _texts(documents)
    path = _write_jsonl(tmp_path / "docs.jsonl", [{"text": t} for t in texts[:10]])
    out = tmp_path / "out"
    (out / ".tokenize-corpus-999999").mkdir(parents=True)  # left by a killed run
    first = _run([path], out, tokenizer)
    assert not list(out.glob(".tokenize-corpus-*"))
    before = _contents(out)
    again = _run([path], out, tokenizer)
    assert "already complete" in again.line() and again.counts == first.counts
    # the same file rewritten in place with other documents: redone
    _write_jsonl(path, [{"text": t} for t in texts[5:15]])
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1))
    redone = _run([path], out, tokenizer)
    assert "already complete" not in redone.line()
    assert _contents(out) != before
    assert "already complete" in _run([path], out, tokenizer).line()
    manifest = json.loads((out / ".bertforge-tokenize.json").read_text())
    assert manifest["inputs"][0]["path"] == str(path.resolve())
    assert manifest["params"]["input"]["format"] == "jsonl"


def test_sentences_split_at_paragraphs_then_by_blingfire():
    text = "First sentence here. Second one follows.\n\n  A new paragraph.\nLast line"
    assert document_sentences(text) == ["First sentence here.", "Second one follows.",
                                        "A new paragraph.", "Last line"]
    assert document_sentences(" \n\t\n") == []


def test_formats_are_detected_from_names(tmp_path):
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "state.json").write_text("{}")
    (tmp_path / "plain").mkdir()
    for name, kind in [("a.jsonl", "jsonl"), ("a.JSON", "jsonl"), ("a.jsonl.gz", "jsonl"),
                       ("a.parquet", "parquet"), ("wiki_00.txt", "text"), ("wiki_00", "text"),
                       ("ds", "hf"), ("plain", "text")]:
        assert corpus.detect_format(tmp_path / name) == kind, name
