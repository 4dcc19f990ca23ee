"""`bertforge serve`: a real Triton Inference Server (through NVIDIA PyTriton) with two models.

- `bert`: input_ids, attention_mask, token_type_ids INT32 [-1, S] -> start_logits, end_logits
  FP32 [-1, S]; Triton's dynamic batcher merges concurrent requests (up to --max-batch-size
  rows, waiting at most --max-queue-delay-us), the reference's model "bert" with S = 384.
  Logits at padding positions (attention_mask 0) are PAD_LOGIT (-10000): right-padded rows
  are run padding-free (serve/qa.py: only their real tokens run), which never computes
  them; `--no-padding-free` runs the rows as sent, with the same outputs.
- `bert_qa`: question, context BYTES [-1, 1] (UTF-8) -> answer BYTES, score FP32, start/end
  INT32 (character offsets into the context); long contexts are windowed and answers
  post-processed by the SQuAD code (serve/qa.py).

Triton checks dtype and shape of every request before it reaches Python (a sequence longer
than S is a shape error there); token ids out of the vocab, non-0/1 masks, invalid UTF-8 and
empty contexts raise in the model function, which Triton turns into an error response while
the server keeps serving. With dynamic batching that error goes to every request of the
batch the bad one was merged into: PyTriton 0.7 answers a failed execution with one error for
all of its requests (proxy/model.py, BatchResponsesHandler), so a client that sent a good
request in that batch must resend it; the error text says so and names the bad row. Triton's
own C++ backends answer a failed batched run the same way (backend_common.h's
RESPOND_ALL_AND_SET_NULL_IF_ERROR: one error to every request of the batch).
Health/readiness are Triton's own (/v2/health/ready, /v2/models/bert/ready, gRPC ServerReady). SIGINT and SIGTERM stop the
server and its tritonserver child, with in-flight requests given --exit-timeout seconds.

Why PyTriton: it ships the tritonserver binary and the python backend on PyPI, so the same
command runs on a laptop CPU and a GPU box without the 10+ GB Triton container; the cost is
one extra hop (python backend stub -> this process over shared memory and zmq): a tiny model
(hidden 64, S 64) answers one gRPC client in 6.2 ms p50 here. For a container deployment
`bertforge export --format triton-repo` writes an onnxruntime-backend repository instead.
Dynamic batching is the throughput lever on CPU as on GPU; on the 2-core dev box (server,
stubs and clients on the same cores) its gain at 8 clients over batch-1 serving is bounded by
how much faster this CPU runs 8 rows than 1 (benchmarks/bench_serve.py; docs/benchmarks.md has
the numbers, sync and async, fp32 and bf16, and Triton + ONNX Runtime beside it). A lone
request waits --max-queue-delay-us for company: 0 suits one client at a time. The server
prints each model's mean batch when it stops.

Requirement seen here: PyTriton 0.7's python backend stub needs numpy<2 (with numpy 2 every
output tensor arrives empty), and it links libpython, so LD_LIBRARY_PATH must hold the
running interpreter's LIBDIR; `serve` sets that and checks numpy up front.

Configuration: ServeConfig (bertforge.config.serve; presets in presets/serve.yml), whose
sections (model, window, batching, server) have already checked every value; build_engine
checks only what needs the loaded model.
"""

from __future__ import annotations

import logging
import os
import signal
import sysconfig
from dataclasses import dataclass, field

import numpy as np

from bertforge.config.serve import ServeBatchingSection, ServeConfig

log = logging.getLogger("bertforge")


def check_runtime() -> None:
    """Fail early, with what to do, where PyTriton would start but answer garbage."""
    try:
        import pytriton  # noqa: F401
    except ImportError:
        raise ValueError("serving needs PyTriton: pip install 'bertforge[serve]'") from None
    if int(np.__version__.split(".")[0]) >= 2:
        raise ValueError(f"PyTriton 0.7's python backend needs numpy<2 (found {np.__version__}; "
                         "outputs would come back empty): pip install 'numpy<2'")
    libdir = sysconfig.get_config_var("LIBDIR")
    # The backend stub links libpython: without this it may pick another installed Python.
    if libdir and libdir not in os.environ.get("LD_LIBRARY_PATH", "").split(":"):
        os.environ["LD_LIBRARY_PATH"] = ":".join(
            p for p in (libdir, os.environ.get("LD_LIBRARY_PATH")) if p)


def _decode(column: np.ndarray, name: str) -> list[str]:
    out = []
    for i, raw in enumerate(column.reshape(-1)):
        try:
            out.append(raw.decode("utf-8") if isinstance(raw, bytes) else str(raw))
        except UnicodeDecodeError as err:
            raise ValueError(f"{name} of row {i} is not valid UTF-8 ({err})") from None
    return out


def _batch_error(err: ValueError, rows: int) -> str:
    """The error text of a failed execution. PyTriton sends it to every request of the batch,
    so a client whose own request was fine learns that it was not run and can resend it."""
    if rows == 1:
        return str(err)
    return (f"{err} (in a dynamic batch of {rows} rows: every request merged into it gets this "
            "error and none was run; resend the valid ones)")


@dataclass
class Executions:
    """Requests and model executions per model: the mean batch says how well the dynamic
    batcher is filling batches (printed when the server stops)."""

    requests: dict[str, int] = field(default_factory=dict)
    executions: dict[str, int] = field(default_factory=dict)

    def add(self, model: str, rows: int) -> None:
        self.requests[model] = self.requests.get(model, 0) + rows
        self.executions[model] = self.executions.get(model, 0) + 1

    def line(self) -> str:
        return "; ".join(f"{m} {n:,} rows in {self.executions[m]:,} executions (mean batch "
                         f"{n / self.executions[m]:.2f})" for m, n in self.requests.items())


def bind_models(triton, engine, batching: ServeBatchingSection, seq: int,
                stats: Executions | None = None) -> None:
    """Bind `bert` and `bert_qa` of `engine` (a serve.qa.QAEngine) to a pytriton.Triton; the
    `bert` model takes [-1, seq] rows."""
    from pytriton.decorators import batch
    from pytriton.exceptions import PyTritonValidationError
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor

    @batch
    def infer_bert(input_ids, attention_mask, token_type_ids):
        if stats is not None:
            stats.add("bert", len(input_ids))
        try:
            start, end = engine.logits(input_ids, attention_mask, token_type_ids)
        except ValueError as err:
            raise PyTritonValidationError(_batch_error(err, len(input_ids))) from None
        return {"start_logits": start, "end_logits": end}

    @batch
    def infer_qa(question, context):
        if stats is not None:
            stats.add("bert_qa", len(question))
        try:
            answers = engine.answer_many(_decode(question, "question"),
                                         _decode(context, "context"))
        except ValueError as err:
            raise PyTritonValidationError(_batch_error(err, len(question))) from None
        return {"answer": np.array([[a.text.encode("utf-8")] for a in answers], dtype=np.object_),
                "score": np.array([[a.score] for a in answers], dtype=np.float32),
                "start": np.array([[a.start] for a in answers], dtype=np.int32),
                "end": np.array([[a.end] for a in answers], dtype=np.int32)}

    batcher = (DynamicBatcher(max_queue_delay_microseconds=batching.max_queue_delay_us)
               if batching.dynamic_batching else None)
    max_batch = batching.max_batch_size if batching.dynamic_batching else 1
    triton.bind(
        model_name="bert", infer_func=infer_bert,
        inputs=[Tensor(name=n, dtype=np.int32, shape=(seq,))
                for n in ("input_ids", "attention_mask", "token_type_ids")],
        outputs=[Tensor(name=n, dtype=np.float32, shape=(seq,))
                 for n in ("start_logits", "end_logits")],
        config=ModelConfig(max_batch_size=max_batch, batcher=batcher,
                           batching=True), strict=True)
    triton.bind(
        model_name="bert_qa", infer_func=infer_qa,
        inputs=[Tensor(name="question", dtype=np.bytes_, shape=(1,)),
                Tensor(name="context", dtype=np.bytes_, shape=(1,))],
        outputs=[Tensor(name="answer", dtype=np.bytes_, shape=(1,)),
                 Tensor(name="score", dtype=np.float32, shape=(1,)),
                 Tensor(name="start", dtype=np.int32, shape=(1,)),
                 Tensor(name="end", dtype=np.int32, shape=(1,))],
        config=ModelConfig(max_batch_size=max(1, batching.max_batch_size // 4), batcher=batcher),
        strict=True)


def build_engine(cfg: ServeConfig):
    """The QAEngine of `cfg`'s checkpoint, window shape and batching (values checked by the
    config's sections; only what needs the model, its position table, is checked here)."""
    from bertforge.serve.qa import QAEngine, load_qa_checkpoint
    m, w = cfg.model, cfg.window
    if m.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device is visible; use --device cpu")
    model, tokenizer = load_qa_checkpoint(m.checkpoint_input_dir, m.device, m.precision)
    if w.sequence_length > model.config.max_position_embeddings:
        raise ValueError(f"--sequence-length {w.sequence_length} exceeds the model's "
                         f"max_position_embeddings {model.config.max_position_embeddings}")
    return QAEngine(model, tokenizer, w, max_batch_size=cfg.batching.max_batch_size,
                    padding_free=cfg.batching.padding_free)


def serve(cfg: ServeConfig) -> None:
    """Load the model, start Triton, block until SIGINT/SIGTERM, then shut down cleanly."""
    check_runtime()
    from pytriton.triton import Triton, TritonConfig
    engine = build_engine(cfg)
    stats = Executions()
    end = cfg.server
    triton_cfg = TritonConfig(http_address=end.host, http_port=end.http_port,
                              grpc_address=end.host, grpc_port=end.grpc_port,
                              metrics_port=end.metrics_port, exit_timeout_secs=end.exit_timeout)

    def on_stop(signum, frame):  # both end the serve loop the way Ctrl-C does
        raise KeyboardInterrupt

    # SIGINT too: a server started in the background of a script inherits SIGINT ignored.
    previous = {s: signal.signal(s, on_stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        with Triton(config=triton_cfg) as triton:
            bind_models(triton, engine, cfg.batching, cfg.window.sequence_length, stats)
            batching = cfg.batching
            print(f"serve: models bert, bert_qa on http://{end.host}:{end.http_port} and "
                  f"grpc {end.host}:{end.grpc_port} (S={cfg.window.sequence_length}, max batch "
                  f"{batching.max_batch_size if batching.dynamic_batching else 1}, dynamic "
                  f"batching {'on' if batching.dynamic_batching else 'off'})", flush=True)
            triton.serve()
    except KeyboardInterrupt:
        # A signal that arrives before serve() (models already ready, as readiness reports
        # them after bind) lands here; leaving the `with` has stopped tritonserver and its
        # stubs, so it is a normal stop.
        pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print(f"serve: stopped; {stats.line() or 'no requests'}", flush=True)
