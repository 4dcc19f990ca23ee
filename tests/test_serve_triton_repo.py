"""The repository `bertforge export --format triton-repo` writes, loaded unchanged by a real
tritonserver and queried over gRPC: the check a stock Triton container would give, without
Docker.

The tritonserver binary is the one PyTriton bundles (2.51, python backend only); the C++
onnxruntime backend, not on PyPI, is replaced by benchmarks/onnxruntime_backend/model.py, a
Python-based backend named `onnxruntime` (benchmarks/triton_stack.py). Triton picks it for the
repository's `platform: "onnxruntime_onnx"`, parses and validates config.pbtxt itself (a broken
config is refused, which the second test checks), runs its dynamic batcher and sends each
dynamic batch to onnxruntime on the exported model.onnx; the exported `bert_qa` (python
backend, tokenizer beside it) answers questions through `bert` as `bertforge serve` answers
them. What this cannot check is the C++
backend itself (its own config auto-completion and ONNX loading).
"""

from __future__ import annotations

import shutil
import signal
import threading
import time

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("pytriton")
grpcclient = pytest.importorskip("tritonclient.grpc")
pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

if int(np.__version__.split(".")[0]) >= 2:
    pytest.skip("PyTriton 0.7's python backend stub needs numpy<2", allow_module_level=True)

from bertforge.config.serve import WindowSection  # noqa: E402
from bertforge.serve.bench import synthetic_rows  # noqa: E402
from bertforge.serve.export import INPUTS, OUTPUTS, export  # noqa: E402
from bertforge.serve.qa import QAEngine, load_qa_checkpoint  # noqa: E402
from triton_stack import (backend_directory, start_tritonserver,  # noqa: E402
                                         wait_ready)
from support import alive, descendants, tiny_qa_model  # noqa: E402

S = 32


def _text(name: str, values: list[bytes]):
    tensor = grpcclient.InferInput(name, [len(values), 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[v] for v in values], dtype=object))
    return tensor


def stop(proc) -> None:
    children = descendants(proc.pid)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    deadline = time.monotonic() + 10
    while any(alive(c) for c in children) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [c for c in children if alive(c)], "a backend stub outlived tritonserver"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("triton-repo")
    model_dir = tiny_qa_model(root / "model", seed=0)
    export(model_dir, root / "repo", fmt="triton-repo", sequence_length=S, doc_stride=8,
           max_query_length=8, max_batch_size=8, max_queue_delay_us=20_000)
    return model_dir, root / "repo", backend_directory(root / "backends")


def test_stock_tritonserver_serves_the_exported_repository(exported, tmp_path):
    model_dir, repository, backends = exported
    model, tokenizer = load_qa_checkpoint(model_dir)
    engine = QAEngine(model, tokenizer,
                      WindowSection(sequence_length=S, doc_stride=8, max_query_length=8))
    rows = synthetic_rows(12, S, model.config.vocab_size, seed=3)
    # Six requests of 2 rows each in flight at once: the dynamic batcher (20 ms) merges some.
    payloads = [{k: v[i:i + 2] for k, v in rows.items()} for i in range(0, 12, 2)]
    log = tmp_path / "tritonserver.log"
    proc, grpc_url, http_url = start_tritonserver(repository, backends, log)
    try:
        assert wait_ready(proc, http_url, log), log.read_text()[-3000:]
        client = grpcclient.InferenceServerClient(grpc_url)
        replies: dict[int, object] = {}
        done = threading.Semaphore(0)

        def on_reply(result, error, k):
            replies[k] = error if error is not None else result
            done.release()

        for k, payload in enumerate(payloads):  # back to back, so the batcher can merge them
            inputs = []
            for name in INPUTS:
                tensor = grpcclient.InferInput(name, list(payload[name].shape), "INT32")
                tensor.set_data_from_numpy(payload[name])
                inputs.append(tensor)
            client.async_infer("bert", inputs,
                               callback=lambda result, error, k=k: on_reply(result, error, k))
        for _ in payloads:
            assert done.acquire(timeout=60), "a reply did not come back"
        assert sorted(replies) == list(range(len(payloads)))
        failed = [r for r in replies.values() if not hasattr(r, "as_numpy")]
        assert not failed, failed[0]
        for k, payload in enumerate(payloads):
            want = engine.padded_logits(*(payload[n] for n in INPUTS))
            for name, expected in zip(OUTPUTS, want):
                np.testing.assert_allclose(replies[k].as_numpy(name), expected, atol=1e-4)

        stats = client.get_inference_statistics("bert").model_stats[0]
        assert stats.inference_count == 12  # rows
        assert 1 <= stats.execution_count < len(payloads), "no two requests were batched"

        # bert_qa: text in, answer out, through `bert` (BLS), as bertforge serve answers.
        questions = ["Who led the raiders?", "Where is Normandy?"]
        context = ("The Normans gave their name to Normandy, a region in France. They were "
                   "descended from Norse raiders who, under their leader Rollo, agreed to "
                   "swear fealty to King Charles III of West Francia.")
        reply = client.infer("bert_qa", [
            _text("question", [q.encode() for q in questions]),
            _text("context", [context.encode()] * 2)])
        for row, want in enumerate(engine.answer_many(questions, [context] * 2)):
            assert reply.as_numpy("answer")[row, 0].decode() == want.text
            assert (reply.as_numpy("start")[row, 0], reply.as_numpy("end")[row, 0]) == (
                want.start, want.end)
            assert reply.as_numpy("score")[row, 0] == pytest.approx(want.score, abs=1e-3)
        with pytest.raises(InferenceServerException) as caught:
            client.infer("bert_qa", [_text("question", [b"Who?"]), _text("context", [b" "])])
        assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert caught.value.message() == "context of row 0 is empty"

        config = client.get_model_config("bert").config
        assert config.platform == "onnxruntime_onnx" and config.max_batch_size == 8
        assert config.dynamic_batching.max_queue_delay_microseconds == 20_000
        client.close()
    finally:
        stop(proc)


def test_tritonserver_refuses_a_broken_config(exported, tmp_path):
    _, repository, backends = exported
    broken = tmp_path / "repo"
    shutil.copytree(repository, broken)
    config = broken / "bert" / "config.pbtxt"
    config.write_text(config.read_text().replace("max_batch_size: 8", "max_batch_size: -8"))
    log = tmp_path / "tritonserver.log"
    proc, _, http_url = start_tritonserver(broken, backends, log)
    try:
        assert not wait_ready(proc, http_url, log)
        assert "'max_batch_size' must be non-negative" in log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
