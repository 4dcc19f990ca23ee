"""The README's main command, `bertforge demo`, end to end on the real sample (few steps)."""

from __future__ import annotations

import transformers

from bertforge.cli import main


def test_demo_runs_the_whole_chain(tmp_path, wiki_sample, capsys):
    assert main(["demo", "--output-dir", str(tmp_path), "--training-steps", "4"]) == 0
    out = capsys.readouterr().out
    assert "wiki extract: " in out and "106 articles out" in out
    assert "wiki preprocess: " in out
    assert out.count("tokenize: ") == 2
    assert "held-out (" in out and "for always predicting the most frequent token" in out
    step_dir = tmp_path / "pretrain" / "step_4"
    model = transformers.BertForPreTraining.from_pretrained(step_dir)
    assert (model.config.hidden_size, model.config.vocab_size) == (128, 8192)
    # the checkpoint ships the vocab the demo trained on the sample, not bert-base-uncased's
    tokenizer = transformers.AutoTokenizer.from_pretrained(step_dir)
    assert len(tokenizer) == 8192
    vocab = (tmp_path / "vocab8192" / "vocab.txt").read_text(encoding="utf-8").splitlines()
    ids = tokenizer("The history of the country")["input_ids"]
    assert [vocab[i] for i in ids] == ["[CLS]", "the", "history", "of", "the", "country", "[SEP]"]
