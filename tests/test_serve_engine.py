"""The serving engine's padding-free path, in both layouts (flat: all rows in one row under
variable-length attention; packs: up to 3 rows a packed row under the block-diagonal mask)
and under ONNX Runtime (each row trimmed, serve/onnx_rows.py), against its reference path (the stock model on the padded rows): same logits at every real
position, PAD_LOGIT at padding, whatever the mix of lengths; masks that are not right-padded
take the padded path. No server here (tests/test_serve.py starts one), so these run without
PyTriton."""

from __future__ import annotations

import numpy as np
import pytest

from bertforge.config.serve import WindowSection
from bertforge.serve.bench import synthetic_rows
from bertforge.serve.qa import PAD_LOGIT, QAEngine
from support import NORMANS, tiny_qa_model

S = 64
SPEC = WindowSection(sequence_length=S, doc_stride=16, max_query_length=16)


@pytest.fixture(scope="module", params=["flat", "packs"])
def engine(request, tmp_path_factory):
    from bertforge.serve.qa import load_qa_checkpoint
    model, tokenizer = load_qa_checkpoint(tiny_qa_model(tmp_path_factory.mktemp("qa") / "m", seed=1))
    return QAEngine(model, tokenizer, SPEC, layout=request.param)


def test_default_layout_is_flat_in_cpu_fp32_and_where_varlen_has_a_kernel(tmp_path):
    import torch

    from bertforge.model.attention import VARLEN
    from bertforge.serve.qa import default_layout, load_qa_checkpoint
    assert default_layout(torch.device("cpu"), torch.bfloat16) == "packs"
    assert default_layout(torch.device("cuda"), torch.float32) == "packs"
    assert default_layout(torch.device("cuda"), torch.bfloat16) == "flat"  # torch 2.13 has it
    model, _ = load_qa_checkpoint(tiny_qa_model(tmp_path / "m", seed=1))
    engine = QAEngine(model, None, SPEC)
    assert engine.layout == "flat" and model.config._attn_implementation == VARLEN
    with pytest.raises(ValueError, match="choose flat or packs"):
        QAEngine(model, None, SPEC, layout="rows")


def _agree(engine, rows):
    args = [rows[k] for k in ("input_ids", "attention_mask", "token_type_ids")]
    got = engine.logits(*args)
    want = engine.padded_logits(*args)
    keep = rows["attention_mask"] > 0
    for have, reference in zip(got, want):
        assert have.shape == reference.shape == rows["input_ids"].shape
        assert have.dtype == np.float32
        np.testing.assert_allclose(have[keep], reference[keep], rtol=1e-5, atol=1e-5)
        assert (have[~keep] == PAD_LOGIT).all() and (reference[~keep] == PAD_LOGIT).all()
    return got


@pytest.mark.parametrize("batch", [1, 2, 9, 32])
def test_padding_free_logits_equal_the_padded_reference(engine, batch):
    rows = synthetic_rows(batch, S, engine.vocab_size, seed=batch)  # lengths S/4..S
    _agree(engine, rows)


def test_layout_really_happens_and_a_row_does_not_depend_on_its_neighbours(engine, monkeypatch):
    rows = synthetic_rows(12, S, engine.vocab_size, seed=5)
    lengths = rows["attention_mask"].sum(1)
    assert (lengths <= S // 2).sum() >= 2  # some rows can share a pack
    seen, stock = [], []
    forward = engine.packed_model.forward
    monkeypatch.setattr(engine.packed_model, "forward",
                        lambda **kw: seen.append(kw["input_ids"].shape) or forward(**kw))
    stock_forward = engine.model.forward
    monkeypatch.setattr(engine.model, "forward",
                        lambda **kw: stock.append(kw["input_ids"].shape) or stock_forward(**kw))
    together = _agree(engine, rows)
    if engine.layout == "flat":  # one row holding every real token, nothing else
        assert seen == [(1, int(lengths.sum()))]
    else:
        assert len(seen) == 1 and seen[0][0] < 12 and seen[0][1] <= S  # fewer rows than requests
    stock.clear()
    alone = engine.logits(*(rows[k][:1] for k in ("input_ids", "attention_mask", "token_type_ids")))
    assert stock == [(1, int(lengths[0]))] and len(seen) == 1  # one row: trimmed, stock model
    np.testing.assert_allclose(alone[0], together[0][:1], rtol=1e-5, atol=1e-5)


def test_empty_rows_and_full_rows(engine):
    rows = synthetic_rows(4, S, engine.vocab_size, seed=7)
    rows["attention_mask"][1] = 0  # a row with no real token: all PAD_LOGIT
    rows["input_ids"][1] = 0
    rows["attention_mask"][2] = 1  # a full row
    start, end = _agree(engine, rows)
    assert (start[1] == PAD_LOGIT).all() and (end[1] == PAD_LOGIT).all()


def test_masks_that_are_not_right_padded_take_the_padded_path(engine, monkeypatch):
    rows = synthetic_rows(3, S, engine.vocab_size, seed=8)
    rows["attention_mask"][0, :5] = 0  # left padding / holes: no packing
    monkeypatch.setattr(engine, "packed_logits", lambda *a: pytest.fail("packed path taken"))
    _agree(engine, rows)


def test_bad_rows_are_refused_before_the_model(engine):
    rows = synthetic_rows(2, S, engine.vocab_size, seed=9)
    rows["input_ids"][1, 0] = engine.vocab_size
    with pytest.raises(ValueError, match="input_ids must lie in"):
        engine.logits(rows["input_ids"], rows["attention_mask"], rows["token_type_ids"])
    rows = synthetic_rows(2, S, engine.vocab_size, seed=9)
    rows["attention_mask"][0, 0] = 2
    with pytest.raises(ValueError, match="attention_mask must hold only 0 and 1"):
        engine.logits(rows["input_ids"], rows["attention_mask"], rows["token_type_ids"])


def test_backend_answers_each_request_alone(engine):
    """What the served models do with a dynamic batch (serve/backend.py): a bad request gets
    its own error, the valid ones of the batch run together and get what they get alone."""
    from bertforge.config.serve import RequestLimitsSection
    from bertforge.serve.backend import run_bert, run_qa
    rows = synthetic_rows(3, S, engine.vocab_size, seed=12)
    requests = [{k: v[i:i + 1].copy() for k, v in rows.items()} for i in range(3)]
    requests[1]["input_ids"][0, 0] = engine.vocab_size
    outcomes = run_bert(engine, requests)
    assert outcomes[1].outputs is None and "input_ids must lie in" in outcomes[1].error
    for k in (0, 2):
        assert outcomes[k].error is None
        alone = engine.logits(*(requests[k][n] for n in ("input_ids", "attention_mask",
                                                          "token_type_ids")))
        np.testing.assert_allclose(outcomes[k].outputs["start_logits"], alone[0], atol=1e-5)
        np.testing.assert_allclose(outcomes[k].outputs["end_logits"], alone[1], atol=1e-5)

    limits = RequestLimitsSection(max_context_chars=50, max_question_chars=10)
    text = lambda *xs: np.array([[x] for x in xs], dtype=object)  # noqa: E731
    qa = [{"question": text(b"Who?"), "context": text(b"Rollo led the Normans.")},
          {"question": text(b"Who?"), "context": text(b"x" * 51)},
          {"question": text(b"Who is it, really?"), "context": text(b"Rollo.")},
          {"question": text(b"Who?", b"Where?"), "context": text(b"Rollo.", b"\xff")},
          {"question": text(b"Where?"), "context": text(b" ")}]
    outcomes = run_qa(engine, qa, limits)
    assert [o.error is None for o in outcomes] == [True, False, False, False, False]
    assert "--max-context-chars" in outcomes[1].error and "51 characters" in outcomes[1].error
    assert "--max-question-chars" in outcomes[2].error
    assert "context of row 1 is not valid UTF-8" in outcomes[3].error
    assert "context of row 0 is empty" in outcomes[4].error
    want = engine.answer_many(["Who?"], ["Rollo led the Normans."])[0]
    assert outcomes[0].outputs["answer"][0, 0].decode() == want.text
    assert outcomes[0].outputs["start"][0, 0] == want.start


@pytest.fixture(scope="module")
def onnx_engine(tmp_path_factory):
    pytest.importorskip("onnxruntime")
    from bertforge.config.serve import ServeConfig
    from bertforge.serve.backend import build_engine
    qa_dir = tiny_qa_model(tmp_path_factory.mktemp("qa") / "m", seed=1)
    engine = build_engine(ServeConfig(checkpoint_input_dir=qa_dir, sequence_length=S,
                                      max_query_length=16, doc_stride=16))  # runtime auto
    assert engine.onnx is not None and engine.onnx.parity <= 1e-4
    return engine


@pytest.mark.parametrize("batch", [1, 2, 9, 32])
def test_onnxruntime_rows_equal_the_padded_reference(onnx_engine, batch, monkeypatch):
    rows = synthetic_rows(batch, S, onnx_engine.vocab_size, seed=batch)
    rows["attention_mask"][0] = 0  # a row with no real token: not run, all PAD_LOGIT
    rows["input_ids"][0] = 0
    if batch > 1:
        rows["attention_mask"][1] = 1  # a full row
    runs = []
    run = onnx_engine.onnx.session.run
    monkeypatch.setattr(onnx_engine.onnx.session, "run",
                        lambda names, feed: runs.append(feed["input_ids"].shape) or run(names, feed))
    _agree(onnx_engine, rows)
    lengths = rows["attention_mask"].sum(1)
    assert runs == [(1, int(n)) for n in lengths if n]  # one run per real row, trimmed


def test_onnxruntime_row_alone_equals_row_in_a_batch_and_holes_take_the_padded_path(onnx_engine):
    rows = synthetic_rows(6, S, onnx_engine.vocab_size, seed=21)
    args = [rows[k] for k in ("input_ids", "attention_mask", "token_type_ids")]
    together = onnx_engine.logits(*args)
    alone = onnx_engine.logits(*(a[3:4] for a in args))
    np.testing.assert_array_equal(alone[0], together[0][3:4])
    rows["attention_mask"][2, :3] = 0  # not right-padded: the stock PyTorch model, masked
    onnx_engine.onnx, saved = None, onnx_engine.onnx  # the ONNX path must not be needed
    try:
        _agree(onnx_engine, rows)
    finally:
        onnx_engine.onnx = saved


def test_runtime_choice(tmp_path):
    from bertforge.config.serve import ServeConfig
    cfg = lambda **kw: ServeConfig(checkpoint_input_dir=str(tmp_path), **kw)  # noqa: E731
    assert cfg().model.engine_runtime() == "onnxruntime"
    assert cfg(precision="bf16").model.engine_runtime() == "torch"
    assert cfg(runtime="torch").model.engine_runtime() == "torch"
    with pytest.raises(ValueError, match="--runtime torch"):
        cfg(runtime="onnxruntime", precision="bf16")


class FakePbUtils:
    """The few names of Triton's `triton_python_backend_utils` that serve/backend.py uses, so
    the python-backend glue runs without a server; `bert` calls (BLS) go to `engine`."""

    def __init__(self, engine, bert_error=None):
        pb = self

        class TritonError:
            INTERNAL, INVALID_ARG, UNAVAILABLE = "INTERNAL", "INVALID_ARG", "UNAVAILABLE"

            def __init__(self, message, code=None):
                self._message, self._code = message, code

            def message(self):
                return self._message

            def code(self):
                return self._code

        class Tensor:
            def __init__(self, name, array):
                self.name, self.array = name, array

            def as_numpy(self):
                return self.array

        class InferenceResponse:
            def __init__(self, output_tensors=(), error=None):
                self.output_tensors, self._error = output_tensors, error

            def has_error(self):
                return self._error is not None

            def error(self):
                return self._error

        class InferenceRequest:
            def __init__(self, model_name, inputs, requested_output_names):
                assert model_name == "bert"
                self.inputs = {t.name: t.array for t in inputs}

            def exec(self):
                pb.bert_calls.append(self.inputs["input_ids"].shape)
                if bert_error is not None:
                    # As the python backend hands BLS errors over: the code is lost.
                    return InferenceResponse(error=TritonError(bert_error, "INTERNAL"))
                start, end = engine.logits(*(self.inputs[n] for n in (
                    "input_ids", "attention_mask", "token_type_ids")))
                return InferenceResponse([Tensor("start_logits", start), Tensor("end_logits", end)])

        self.TritonError, self.Tensor, self.InferenceResponse = TritonError, Tensor, InferenceResponse
        self.InferenceRequest = InferenceRequest
        self.bert_calls = []
        self.logged = []
        self.Logger = type("Logger", (), {"log_error": staticmethod(self.logged.append)})

    @staticmethod
    def get_input_tensor_by_name(request, name):
        return request[name]

    @staticmethod
    def get_output_tensor_by_name(response, name):
        return next(t for t in response.output_tensors if t.name == name)


def _qa_request(pb, question: bytes, context: bytes) -> dict:
    return {n: pb.Tensor(n, np.array([[t]], dtype=object))
            for n, t in (("question", question), ("context", context))}


@pytest.mark.parametrize("bert_max_batch_size", [1, 8])
def test_bert_qa_through_bls_answers_what_the_engine_answers(engine, bert_max_batch_size):
    """The served and exported bert_qa: windows padded to S for `bert` (whose inputs are
    [-1, S] when served), in calls of at most bert's max batch; answers equal the engine's."""
    from bertforge.config.serve import RequestLimitsSection
    from bertforge.serve import backend
    pb = FakePbUtils(engine)
    answerer = backend.BlsAnswerer(pb, engine.tokenizer, SPEC, bert_max_batch_size)
    questions = [b"Who led the raiders?", b"Where is Normandy?"]
    requests = [_qa_request(pb, q, c) for q, c in
                zip(questions + [b"Who?"], [NORMANS.encode()] * 2 + [b"Rollo."])]
    replies = backend.triton_execute(pb, requests, backend.QA_INPUTS,
                                     lambda arrays: backend.run_qa(answerer, arrays,
                                                                   RequestLimitsSection()))
    want = engine.answer_many([q.decode() for q in questions] + ["Who?"],
                              [NORMANS] * 2 + ["Rollo."])
    for reply, a in zip(replies, want):
        assert not reply.has_error()
        got = {t.name: t.as_numpy() for t in reply.output_tensors}
        assert got["answer"][0, 0].decode() == a.text and got["start"][0, 0] == a.start
    assert all(shape[1] == S and shape[0] <= bert_max_batch_size for shape in pb.bert_calls)
    assert len(pb.bert_calls) > 1 if bert_max_batch_size == 1 else True


def test_python_backend_errors_are_one_line_with_their_code(engine):
    from bertforge.config.serve import RequestLimitsSection
    from bertforge.serve import backend
    pb = FakePbUtils(engine, bert_error="Request timeout expired\nsecond line")  # budget
    answerer = backend.BlsAnswerer(pb, engine.tokenizer, SPEC, 8)
    run = lambda arrays: backend.run_qa(answerer, arrays, RequestLimitsSection())  # noqa: E731
    bad_and_good = [_qa_request(pb, b"Who?", b"\xff"), _qa_request(pb, b"Who?", b"Rollo.")]
    replies = backend.triton_execute(pb, bad_and_good, backend.QA_INPUTS, run)
    # The bad request: its own client error; the good one: bert's error, with bert's code.
    assert replies[0].error().code() == "INVALID_ARG"
    assert "not valid UTF-8" in replies[0].error().message()
    assert replies[1].error().code() == "UNAVAILABLE"
    assert replies[1].error().message() == "bert: Request timeout expired"

    def bug(arrays):
        raise KeyError("/some/install/path")
    replies = backend.triton_execute(pb, bad_and_good, backend.QA_INPUTS, bug)
    assert [r.error().message() for r in replies] == ["internal error: KeyError"] * 2
    assert [r.error().code() for r in replies] == ["INTERNAL"] * 2
    assert "Traceback" in pb.logged[-1]  # the server log gets it, the client does not
