"""`bertforge export`: ONNX and Triton-repository exports, checked with onnxruntime against PyTorch
at batch and sequence sizes other than the export's (the axes are dynamic), and the CLI.
Needs no server, but onnx and onnxruntime come with the serve extra, so it is in the serve
tier (not in the numpy-2 run)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from bertforge.cli import main  # noqa: E402
from support import tiny_qa_model  # noqa: E402
from bertforge.serve.export import INPUTS, OUTPUTS, check_onnx, export, sample_batch  # noqa: E402
from bertforge.serve.qa import PAD_LOGIT  # noqa: E402


@pytest.fixture(scope="module")
def qa_dir(tmp_path_factory) -> Path:
    return tiny_qa_model(tmp_path_factory.mktemp("export") / "model", seed=0)


def test_onnx_export_matches_pytorch_at_other_shapes(qa_dir, tmp_path):
    import transformers
    lines = export(qa_dir, tmp_path / "onnx", fmt="onnx", sequence_length=32)
    path = tmp_path / "onnx" / "model.onnx"
    assert path.exists() and "max abs diff" in lines[-1]
    model = transformers.BertForQuestionAnswering.from_pretrained(qa_dir).eval()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == list(INPUTS)
    assert [o.name for o in session.get_outputs()] == list(OUTPUTS)
    for batch, seq in [(1, 7), (4, 48), (3, 100)]:
        feed = sample_batch(model.config.vocab_size, seq, batch=batch, seed=batch)
        got = session.run(list(OUTPUTS), feed)
        with torch.no_grad():
            want = model(**{k: torch.from_numpy(v.astype(np.int64)) for k, v in feed.items()})
        keep = feed["attention_mask"] > 0  # the `bert` contract: PAD_LOGIT at padding
        for have, logits in zip(got, (want.start_logits, want.end_logits)):
            np.testing.assert_allclose(have[keep], logits.numpy()[keep], atol=1e-4)
            assert (have[~keep] == PAD_LOGIT).all()


def test_parity_check_catches_a_different_model(qa_dir, tmp_path):
    import transformers
    export(qa_dir, tmp_path / "a", fmt="onnx", sequence_length=16)
    other = transformers.BertForQuestionAnswering.from_pretrained(
        tiny_qa_model(tmp_path / "other", seed=1))
    with pytest.raises(ValueError, match="differ from PyTorch"):
        check_onnx(other, tmp_path / "a" / "model.onnx", sequence_length=16)


def test_triton_repo_via_cli(qa_dir, tmp_path, capsys):
    out = tmp_path / "repo"
    assert main(["export", "--checkpoint-input-dir", str(qa_dir), "--format", "triton-repo",
                 "--output-dir", str(out), "--sequence-length", "24", "--doc-stride", "4",
                 "--max-query-length", "8", "--max-batch-size", "16",
                 "--model-instances", "2"]) == 0
    assert (out / "bert" / "1" / "model.onnx").exists()
    # bert_qa: text in, answer out (python backend), with the checkpoint's tokenizer files.
    assert (out / "bert_qa" / "1" / "model.py").exists()
    assert (out / "bert_qa" / "1" / "tokenizer.json").exists()
    config = (out / "bert" / "config.pbtxt").read_text()
    assert 'platform: "onnxruntime_onnx"' in config and "max_batch_size: 16" in config
    assert "dynamic_batching" in config and config.count("TYPE_INT32") == 3
    assert "max abs diff" in capsys.readouterr().out
    # Parsed with Triton's own ModelConfig schema (tritonclient ships model_config.proto), as
    # tritonserver parses config.pbtxt: unknown fields or bad enum values would fail here.
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2
    parsed = text_format.Parse(config, model_config_pb2.ModelConfig())
    assert parsed.name == "bert" and parsed.platform == "onnxruntime_onnx"
    assert parsed.max_batch_size == 16 and parsed.dynamic_batching.max_queue_delay_microseconds > 0
    # The queue budget as served (--request-timeout-ms, 30 s), in both models.
    for budgeted in (parsed, text_format.Parse((out / "bert_qa" / "config.pbtxt").read_text(),
                                               model_config_pb2.ModelConfig())):
        policy = budgeted.dynamic_batching.default_queue_policy
        assert policy.default_timeout_microseconds == 30_000_000
        assert policy.timeout_action == model_config_pb2.ModelQueuePolicy.REJECT
    assert [i.name for i in parsed.input] == list(INPUTS)
    assert [o.name for o in parsed.output] == list(OUTPUTS)
    assert all(list(t.dims) == [-1] for t in [*parsed.input, *parsed.output])
    assert parsed.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
    assert parsed.instance_group[0].count == 2  # each with half the cores, not all of them
    threads = int(parsed.parameters["intra_op_thread_count"].string_value)
    assert threads == max(1, torch.get_num_threads() // 2)
    qa = text_format.Parse((out / "bert_qa" / "config.pbtxt").read_text(),
                           model_config_pb2.ModelConfig())
    assert qa.backend == "python" and [i.name for i in qa.input] == ["question", "context"]
    assert [o.name for o in qa.output] == ["answer", "score", "start", "end"]
    settings = json.loads(qa.parameters["bertforge_serve_config"].string_value)
    assert settings["window"] == {"sequence_length": 24, "doc_stride": 4, "max_query_length": 8}
    assert settings["bert_max_batch_size"] == 16 and qa.instance_group[0].count == 2


def test_one_instance_gets_no_queue_policy(qa_dir, tmp_path, capsys):
    """tritonserver 2.51 stalls a single instance's queue policy: export writes none then,
    and says so."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2
    out = tmp_path / "repo"
    assert main(["export", "--checkpoint-input-dir", str(qa_dir), "--format", "triton-repo",
                 "--output-dir", str(out), "--sequence-length", "24", "--doc-stride", "4",
                 "--max-query-length", "8", "--model-instances", "1"]) == 0
    for model in ("bert", "bert_qa"):
        parsed = text_format.Parse((out / model / "config.pbtxt").read_text(),
                                   model_config_pb2.ModelConfig())
        assert not parsed.dynamic_batching.HasField("default_queue_policy")
    assert "no queue budget" in capsys.readouterr().out


@pytest.mark.parametrize("dynamic_batching", [True, False])
def test_served_repository(qa_dir, tmp_path, dynamic_batching):
    """`bertforge serve`'s repository: bert with the serve settings, bert_qa the exported
    model.py with tokenizer files; without dynamic batching bert takes 1 row and bert_qa asks
    it for 1 window at a time."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    from bertforge.serve.backend import settings_from_model_config
    from bertforge.serve.server import MODELS, ServeConfig, write_repository
    cfg = ServeConfig(checkpoint_input_dir=str(qa_dir), sequence_length=24, doc_stride=4,
                      max_query_length=8, max_batch_size=16, model_instances=3,
                      dynamic_batching=dynamic_batching)
    repo = write_repository(cfg, tmp_path / "models")
    parse = lambda m: text_format.Parse((repo / m / "config.pbtxt").read_text(),  # noqa: E731
                                        model_config_pb2.ModelConfig())
    bert, qa = parse("bert"), parse("bert_qa")
    assert bert.max_batch_size == (16 if dynamic_batching else 1)
    assert bert.instance_group[0].count == qa.instance_group[0].count == 3
    # Both get the queue budget (--request-timeout-ms, 30 s); without dynamic batching on a
    # dynamic batcher that cannot merge (max batch 1, no delay).
    for model in (bert, qa):
        policy = model.dynamic_batching.default_queue_policy
        assert policy.default_timeout_microseconds == 30_000_000
        assert dynamic_batching or model.dynamic_batching.max_queue_delay_microseconds == 0
    served = settings_from_model_config(json.dumps(
        {"parameters": {k: {"string_value": v.string_value} for k, v in bert.parameters.items()}}))
    assert served.model.checkpoint_input_dir == str(qa_dir.resolve())
    assert served.batching.model_instances == 3
    settings = json.loads(qa.parameters["bertforge_serve_config"].string_value)
    assert settings["bert_max_batch_size"] == (16 if dynamic_batching else 1)
    assert (repo / "bert_qa" / "1" / "tokenizer.json").exists()
    assert ((repo / "bert_qa" / "1" / "model.py").read_bytes()
            == (MODELS / "bert_qa" / "model.py").read_bytes())


def test_export_without_qa_head_is_a_user_error(tmp_path, capsys):
    import transformers
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=1,
                                     intermediate_size=64)
    transformers.BertModel(config).save_pretrained(tmp_path / "encoder")
    code = main(["export", "--checkpoint-input-dir", str(tmp_path / "encoder"), "--format", "onnx",
                 "--output-dir", str(tmp_path / "x")])
    assert code == 2
    assert "no question-answering head" in capsys.readouterr().err
