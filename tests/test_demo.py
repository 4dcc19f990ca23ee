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
    assert "held-out (" in out
    step_dir = tmp_path / "pretrain" / "step_4"
    model = transformers.BertForPreTraining.from_pretrained(step_dir)
    assert model.config.hidden_size == 64
    tokenizer = transformers.AutoTokenizer.from_pretrained(step_dir)
    assert tokenizer("Hello, world!")["input_ids"] == [101, 7592, 1010, 2088, 999, 102]
