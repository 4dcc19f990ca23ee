"""SQuAD windows in the row layout (packed, or one per row) against the stock Hugging Face
forward on padded windows (the reference path): every window packed exactly once, the same
start/end logits per window and the same predictions.json, the same training loss and
gradients (fp32, 1e-5), and `--packed-data` end to end through `bertforge squad`."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers

from bertforge.config import load_config
from bertforge.config.serve import WindowSection
from bertforge.squad.config import SquadConfig
from bertforge.squad.data import examples_from_articles
from bertforge.squad.features import build_windows
from bertforge.squad.finetune import squad
from bertforge.squad.forward import (QuestionAnsweringRows, pack_windows, padded_tensors,
                                     predict_logits, reference_logits, run_rows, to_device,
                                     window_logits, window_rows)
from bertforge.squad.postprocess import postprocess
from support import FILLER, make_squad

SEQ = 128
SPEC = WindowSection(sequence_length=SEQ, doc_stride=32, max_query_length=16)


def squad_data(seed: int = 0) -> dict:
    """The fine-tuning test's set, with every third paragraph padded with filler to 60-90
    sentences so that its context spans several windows (full ones, and a short last one)."""
    data = make_squad(num_paragraphs=24, seed=seed)
    rng = random.Random(seed)
    for i, article in enumerate(data["data"]):
        if i % 3 == 0:
            paragraph = article["paragraphs"][0]
            extra = " " + " ".join(rng.choice(FILLER) for _ in range(rng.randint(10, 16)))
            paragraph["context"] += extra  # answers keep their offsets: text is appended
    return data


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from bertforge.data.vocab import save_tokenizer_files
    path = tmp_path_factory.mktemp("tok")
    save_tokenizer_files(path)
    return transformers.AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def dataset(tokenizer):
    examples = examples_from_articles(squad_data()["data"], source="test", is_training=True,
                                      squad_v2=False).examples
    windows = build_windows(examples, tokenizer, SPEC, is_training=True)
    return examples, windows


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=128, max_position_embeddings=SEQ,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    qa = transformers.BertForQuestionAnswering(config)
    with torch.no_grad():  # spread the logits so spans are not near-ties of a random head
        qa.qa_outputs.weight.mul_(30)
    return qa.eval()


def test_every_window_is_packed_exactly_once(dataset):
    _, windows = dataset
    lengths = [len(w) for w in windows]
    assert max(lengths) == SEQ and min(lengths) < SEQ / 3  # full windows and short ones
    assert len({w.example_index for w in windows}) < len(windows)  # multi-window examples
    packs = pack_windows(windows, SEQ)
    assert sorted(k for p in packs for k in p) == list(range(len(windows)))
    assert all(1 <= len(p) <= 3 and sum(lengths[k] for k in p) <= SEQ for p in packs)
    assert len(packs) < 0.6 * len(windows)  # short windows do share rows
    arrays = window_rows(windows, packs)
    assert arrays["input_ids"].shape == (len(packs), SEQ)
    assert sorted(arrays["window_index"].tolist()) == list(range(len(windows)))
    for k, row, slot, offset, n in zip(*(arrays[key].tolist() for key in (
            "window_index", "window_rows", "window_slots", "window_offsets", "window_lengths"))):
        w = windows[k]
        assert n == len(w) and (arrays["sequence_ids"][row] == slot).sum() == n
        span = slice(offset, offset + n)
        assert np.array_equal(arrays["input_ids"][row, span], w.input_ids)
        assert np.array_equal(arrays["position_ids"][row, span], np.arange(n))
        assert np.array_equal(arrays["segment_ids"][row, span], w.token_type_ids())
        assert arrays["start_positions"][k == arrays["window_index"]] == offset + w.start_position
    assert (arrays["sequence_ids"] > 0).sum() == sum(lengths)  # the rest is padding


def test_window_longer_than_the_row_is_an_error(dataset):
    _, windows = dataset
    with pytest.raises(ValueError, match="more than the packed row length 64"):
        pack_windows(windows, 64)


def reference_predictions(model, windows, batch_size=16):
    """Per-window logits of the stock model on padded windows (the reference path)."""
    starts, ends = [], []
    with torch.no_grad():
        for lo in range(0, len(windows), batch_size):
            chunk = windows[lo:lo + batch_size]
            start, end = reference_logits(model, padded_tensors(chunk, torch.device("cpu")))
            starts += [start[i, :len(w)].numpy() for i, w in enumerate(chunk)]
            ends += [end[i, :len(w)].numpy() for i, w in enumerate(chunk)]
    return starts, ends


def test_row_inference_gives_the_reference_logits_and_predictions(dataset, model, tmp_path):
    examples, windows = dataset
    cpu = torch.device("cpu")
    results = {"reference": reference_predictions(model, windows),
               "one per row": predict_logits(model, windows, batch_size=16, device=cpu),
               "packed": predict_logits(model, windows, batch_size=16, device=cpu,
                                        packed_length=SEQ)}
    starts, ends = results["reference"]
    for name, (r_starts, r_ends) in results.items():
        assert len(r_starts) == len(windows)
        for k, w in enumerate(windows):
            assert r_starts[k].shape == r_ends[k].shape == (len(w),)
            np.testing.assert_allclose(r_starts[k], starts[k], atol=1e-5, rtol=0, err_msg=name)
            np.testing.assert_allclose(r_ends[k], ends[k], atol=1e-5, rtol=0, err_msg=name)
    files = {}
    for name, (s, e) in results.items():
        (tmp_path / name).mkdir()
        files[name] = postprocess(examples, windows, s, e).write(tmp_path / name)
    reference = files["reference"]["predictions"].read_text()
    assert all(f["predictions"].read_text() == reference for f in files.values())
    assert len(set(json.loads(reference).values())) > 3  # real, varied answers were compared


@pytest.mark.parametrize("layout", ["packed", "one per row"])
def test_row_training_gives_the_reference_loss_and_gradients(dataset, model, layout):
    _, windows = dataset
    chunk = windows[:20]
    cpu = torch.device("cpu")

    def loss_and_grads(layout: str):
        model.zero_grad(set_to_none=True)
        if layout == "reference":
            batch = padded_tensors(chunk, cpu)
            start, end = reference_logits(model, batch)
        else:
            packs = pack_windows(chunk, SEQ) if layout == "packed" else None
            batch = to_device(window_rows(chunk, packs), cpu)
            row_start, row_end = run_rows(QuestionAnsweringRows(model), batch)
            start, end = window_logits(row_start, batch), window_logits(row_end, batch)
            rows = batch["input_ids"].shape[0]
            assert start.shape[0] == len(chunk) and (rows < len(chunk)) == (layout == "packed")
        loss = (F.cross_entropy(start, batch["start_positions"])
                + F.cross_entropy(end, batch["end_positions"])) / 2
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()
                             if p.grad is not None}

    loss, grads = loss_and_grads("reference")
    r_loss, r_grads = loss_and_grads(layout)
    model.zero_grad(set_to_none=True)
    assert r_loss == pytest.approx(loss, abs=1e-5) and loss > 1.0
    assert grads.keys() == r_grads.keys() and len(grads) > 10
    for name in grads:
        torch.testing.assert_close(r_grads[name], grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_packed_data_flag_end_to_end(tmp_path):
    path = tmp_path / "squad.json"
    path.write_text(json.dumps(squad_data(seed=1)))
    torch.set_num_threads(1)
    results = {}
    for packed in (False, True):
        cfg = load_config("squad_base_384", {
            "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
            "max_position_embeddings": SEQ, "sequence_length": SEQ, "doc_stride": 32,
            "max_query_length": 16, "micro_batch_size": 8, "global_batch_size": 16,
            "training_steps": 3, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
            "precision": "fp32", "device": "cpu", "disable_progress_bar": True,
            "train_file": str(path), "predict_file": str(path), "packed_data": packed,
            "checkpoint_output_dir": str(tmp_path / f"run-{packed}")}, cls=SquadConfig)
        results[packed] = squad(cfg)
    losses = [h["loss"] for h in results[False].history]
    assert [h["sequences"] for h in results[True].history] == [16.0] * 3
    assert [h["loss"] for h in results[True].history] == pytest.approx(losses, abs=1e-5)
    assert results[True].files["predictions"].read_text() == \
        results[False].files["predictions"].read_text()
    assert results[True].eval == results[False].eval
