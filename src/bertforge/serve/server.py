"""`bertforge serve`: a real Triton Inference Server with two python-backend models.

- `bert`: input_ids, attention_mask, token_type_ids INT32 [-1, S] -> start_logits, end_logits
  FP32 [-1, S]; Triton's dynamic batcher merges concurrent requests (up to --max-batch-size
  rows, waiting at most --max-queue-delay-us), the reference's model "bert" with S = 384.
  Logits at padding positions (attention_mask 0) are PAD_LOGIT (-10000): right-padded rows
  are run padding-free (serve/qa.py: only their real tokens run), which never computes
  them; `--no-padding-free` runs the rows as sent, with the same outputs.
- `bert_qa`: question, context BYTES [-1, 1] (UTF-8) -> answer BYTES, score FP32, start/end
  INT32 (character offsets into the context); long contexts are windowed and answers
  post-processed by the SQuAD code (serve/qa.py); the windows' logits come from `bert`
  through Triton's BLS, so the model is loaded once and bert_qa's windows join bert's
  dynamic batches. The same model.py is the exported repository's bert_qa.

How: at start-up this writes a model repository into a temporary folder, the two models'
`model.py` (serve/triton_models/, thin wrappers of serve/backend.py) with a config.pbtxt
each that carries the settings as a parameter (and bert_qa's tokenizer files), and runs the
tritonserver 2.51 that the PyTriton wheel bundles on it, directly (serve/tritonserver.py):
`bert` loads the checkpoint in its python backend stub process and Triton talks to it over
shared memory, one hop less than PyTriton's proxy (which added ~5 ms a request). What runs
the model (--runtime): on CPU in fp32 ONNX Runtime, each row trimmed to its length
(serve/onnx_rows.py: 2x eager PyTorch at one row, even with the batched PyTorch engine at
8+), elsewhere the padding-free PyTorch engine (serve/qa.py).

Errors. Triton checks dtype and shape of every request (a sequence longer than S is a shape
error there). Content is checked per request in `execute` (serve/backend.py): token ids
outside the vocab, non-0/1 masks, invalid UTF-8, empty text, and the size limits
(--max-context-chars, default 100k characters; --max-question-chars): the bad request alone
gets a one-line error, HTTP 400 / gRPC INVALID_ARGUMENT, and the valid requests merged into
the same dynamic batch are run as usual. An unexpected exception answers "internal error"
(500 / INTERNAL) and logs its traceback in the server log, never to the client.
Requests that crash tritonserver 2.51 itself (it has no request size option): over HTTP, a
JSON body of ~100 bytes declaring shape [1000000000, 128] (Triton allocates the declared tensor:
SIGABRT) or "data" nested 50,000 deep (SIGSEGV), also gzipped (Triton inflates without a
limit). So the public --http-port is served by a front in this process (serve/front.py)
that checks every request before tritonserver, listening on 127.0.0.1 only, sees it: body
size (--max-request-bytes, default 16 MiB, also once inflated: 413), JSON nesting (32
levels), and every declared input shape against what the request can hold (400); rejects
use Triton's error shape {"error": "..."}, one line; everything else is forwarded as is.
Cost, measured (benchmarks/bench_front.py, 2 cores shared by clients, front and server,
batch-1 `bert`, keep-alive): +0.24 ms p50 at 1 client on the tiny model at S 64 (1.07 ->
1.30 ms; 0.84x the direct throughput at 8 clients, 1,645 vs 1,979 requests/s) and +0.28 ms
on the mini model at S 128 (6.6 -> 6.9 ms; 1.02x at 8 clients). gRPC needs no front:
tritonserver checks batch size and byte sizes before allocating (huge shapes over raw or
typed contents are INVALID_ARGUMENT), but it takes messages up to 2 GB (Triton sets gRPC's
limit so, with no option to lower it; a 1.1 GB message was received, then rejected). gRPC
and metrics are not behind the front: on a public --host keep them to trusted clients or
behind a proxy with a message limit. Triton's APIs that change the server (model load and
unload, log settings: a log file anywhere, trace settings, shared-memory registration) are
locked on HTTP and gRPC behind a random header value nobody is told
(serve/tritonserver.py ADMIN_APIS): 403 / UNAVAILABLE "This API is restricted".

Time budget: a request waiting in a model's queue longer than --request-timeout-ms
(default 30 s; 0: none) is answered "Request timeout expired" (HTTP 503 / gRPC UNAVAILABLE)
instead of run (Triton's queue policy; a client may ask for less per request); bert_qa's
windows that wait too long in bert's queue fail their question the same way ("bert: Request
timeout expired"). The queue is looked at between executions, so the answer can come later
than the budget (a 50 ms budget was answered after ~0.5 s behind long bert_qa runs). Without
dynamic batching the models get a dynamic batcher of max batch 1 and no delay to carry it:
still one request per execution. The budget needs two or more model instances: with any
queue policy tritonserver 2.51 holds a single instance's requests ~0.5 s at a time (10x less
throughput, BatchingSection.queue_budget_us), so with one instance serve sets none and says
so at start-up.

Operations. Start-up checks the three ports first (a taken port: one-line error naming it,
exit 2, in about a second), holds the HTTP port for the front, picks tritonserver's internal
HTTP port free on 127.0.0.1, and then watches tritonserver: if it exits while starting (a
port taken meanwhile, a model that fails to load) serve exits 2 with tritonserver's own error
line. Triton loads both models before it opens its endpoints, and runs with strict readiness:
/v2/health/ready is true only with both loaded; then the front starts accepting connections
and the "serve: models ..." line is printed (it names the internal port, for debugging).
If tritonserver dies or the front fails while serving, serve exits 1 with a line saying so.
SIGINT and SIGTERM stop tritonserver (in-flight requests get --exit-timeout seconds, their
answers still relayed by the front), then the front, and exit 0; tritonserver runs in its own
session and dies with this process (processes.die_with_parent), and its stubs with it. Binds
--host (default 127.0.0.1): the front, gRPC and metrics. Prints each model's mean batch when
it stops (Triton's statistics).

Dynamic batching pays where the hardware runs many rows faster than one: on a GPU, and on a
CPU's bf16 matrix units (8 async clients: 2.3-2.5x batch-1 on the 2-core dev box). In fp32 on
CPU a trimmed row already runs the cores at their peak, so batches only share the trip to
the stub (1.2x); more model instances (--model-instances) are the lever there
(benchmarks/bench_serve.py; docs/benchmarks.md). A lone request waits --max-queue-delay-us
for company (the default preset: 0; under load batches form from the queue anyway). The
stub needs numpy<2 (with numpy 2 every output
tensor arrived empty); checked up front. Configuration: ServeConfig (bertforge.config.serve;
presets in presets/serve.yml), whose sections have already checked every value.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bertforge.config.serve import (EndpointSection, RequestLimitsSection, ServeConfig,
                                    WindowSection)
from bertforge.serve.backend import SETTINGS_PARAMETER, build_engine  # noqa: F401 (re-export)

MODELS = Path(__file__).with_name("triton_models")
MODEL_NAMES = ("bert", "bert_qa")


def check_runtime() -> None:
    """Fail early, with what to do, where the python backend would start but answer garbage."""
    from bertforge.serve.tritonserver import distribution
    distribution()
    if int(np.__version__.split(".")[0]) >= 2:
        raise ValueError(f"Triton's python backend stub (PyTriton 0.7) needs numpy<2 (found "
                         f"{np.__version__}; outputs would come back empty): pip install 'numpy<2'")


def check_ports(end: EndpointSection):
    """The front's socket, bound to --http-port and held from here on, once --grpc-port and
    --metrics-port could be bound too; ValueError naming the first port that cannot be: in a
    second, where tritonserver would find out only after loading both models."""
    from bertforge.serve.front import listen_socket
    listener = listen_socket(end.host, end.http_port)
    try:
        for flag, port in (("--grpc-port", end.grpc_port), ("--metrics-port", end.metrics_port)):
            listen_socket(end.host, port, flag).close()
    except ValueError:
        listener.close()
        raise
    return listener


# bert_qa's tensors (served and exported): BYTES [-1, 1] in, answer, score, span out.
QA_INPUT_TENSORS = [("question", "TYPE_STRING", 1), ("context", "TYPE_STRING", 1)]
QA_OUTPUT_TENSORS = [("answer", "TYPE_STRING", 1), ("score", "TYPE_FP32", 1),
                     ("start", "TYPE_INT32", 1), ("end", "TYPE_INT32", 1)]


def python_model_config(name: str, max_batch_size: int, inputs: list, outputs: list,
                        max_queue_delay_us: int | None, settings: dict, instances: int = 1,
                        request_timeout_us: int = 0) -> str:
    """config.pbtxt of a python-backend model: `instances` CPU instances (a CUDA --device is
    the engine's, inside the stub), `settings` as one JSON parameter, dynamic batching unless
    `max_queue_delay_us` is None, and a queue policy rejecting a request that waited over
    `request_timeout_us` (0: none)."""
    def tensors(specs):
        return ",\n".join(f'  {{ name: "{n}" data_type: {t} dims: [ {d} ] }}'
                           for n, t, d in specs)
    value = json.dumps(json.dumps(settings, ensure_ascii=False), ensure_ascii=False)
    lines = [f'name: "{name}"', 'backend: "python"', f"max_batch_size: {max_batch_size}",
             "input [", tensors(inputs), "]", "output [", tensors(outputs), "]",
             f"instance_group [ {{ kind: KIND_CPU count: {instances} }} ]",
             f'parameters: {{ key: "{SETTINGS_PARAMETER}" value: {{ string_value: {value} }} }}']
    if max_queue_delay_us is not None or request_timeout_us:
        lines.append(dynamic_batching(max_queue_delay_us or 0, request_timeout_us))
    return "\n".join(lines) + "\n"


def dynamic_batching(max_queue_delay_us: int, request_timeout_us: int) -> str:
    """A config.pbtxt `dynamic_batching` block, with a queue policy rejecting a request that
    waited over `request_timeout_us` (0: none). Only the dynamic batcher has a queue policy:
    batch-1 serving (max_batch_size 1) gets one with no delay, which still merges nothing, as
    a 1-row batch holds one request (measured: 17 requests, 17 executions)."""
    policy = (" default_queue_policy { timeout_action: REJECT default_timeout_microseconds: "
              f"{request_timeout_us} allow_timeout_override: true }}" if request_timeout_us
              else "")
    return f"dynamic_batching {{ max_queue_delay_microseconds: {max_queue_delay_us}{policy} }}"


def bert_config(cfg: ServeConfig) -> str:
    """config.pbtxt of the served `bert`, `cfg` (flat) as its settings parameter."""
    b, seq = cfg.batching, cfg.window.sequence_length
    return python_model_config(
        "bert", b.max_batch_size if b.dynamic_batching else 1,
        [(n, "TYPE_INT32", seq) for n in ("input_ids", "attention_mask", "token_type_ids")],
        [(n, "TYPE_FP32", seq) for n in ("start_logits", "end_logits")],
        b.max_queue_delay_us if b.dynamic_batching else None, cfg.to_flat(), b.model_instances,
        b.queue_budget_us())


def write_qa_model(path: Path, checkpoint_dir: str, window: WindowSection,
                   limits: RequestLimitsSection, *, bert_max_batch_size: int,
                   max_queue_delay_us: int | None, instances: int = 1,
                   request_timeout_us: int = 0) -> None:
    """`bert_qa` at `path`, as served and as exported: model.py (python backend, calls `bert`
    through BLS in calls of up to `bert_max_batch_size` windows), the checkpoint's tokenizer
    files beside it, config.pbtxt with window and limits; dynamic batching unless
    `max_queue_delay_us` is None, the queue budget `request_timeout_us` (0: none)."""
    from bertforge.data.vocab import save_tokenizer_files
    from bertforge.serve.backend import qa_settings
    from bertforge.train.checkpoint import resolve_checkpoint
    (path / "1").mkdir(parents=True, exist_ok=True)
    shutil.copy(MODELS / "bert_qa" / "model.py", path / "1" / "model.py")
    save_tokenizer_files(path / "1", name_or_path=str(resolve_checkpoint(checkpoint_dir)))
    # A question is ~1-10 windows: a quarter of bert's rows keeps one execution's work alike.
    max_batch_size = max(1, bert_max_batch_size // 4) if max_queue_delay_us is not None else 1
    (path / "config.pbtxt").write_text(python_model_config(
        "bert_qa", max_batch_size, QA_INPUT_TENSORS, QA_OUTPUT_TENSORS, max_queue_delay_us,
        qa_settings(window, limits, bert_max_batch_size), instances, request_timeout_us))


def write_repository(cfg: ServeConfig, path: Path) -> Path:
    """The model repository of `cfg` at `path`: bert/ (model.py + config) and bert_qa/."""
    flat_cfg = ServeConfig.from_flat({**cfg.to_flat(), "checkpoint_input_dir": str(
        Path(cfg.model.checkpoint_input_dir).resolve())})
    (path / "bert" / "1").mkdir(parents=True)
    shutil.copy(MODELS / "bert" / "model.py", path / "bert" / "1" / "model.py")
    (path / "bert" / "config.pbtxt").write_text(bert_config(flat_cfg))
    b = cfg.batching
    write_qa_model(path / "bert_qa", flat_cfg.model.checkpoint_input_dir, cfg.window, cfg.limits,
                   bert_max_batch_size=b.max_batch_size if b.dynamic_batching else 1,
                   max_queue_delay_us=b.max_queue_delay_us if b.dynamic_batching else None,
                   instances=b.model_instances, request_timeout_us=b.queue_budget_us())
    return path


@dataclass
class Executions:
    """Requests and model executions per model: the mean batch says how well the dynamic
    batcher is filling batches (printed when the server stops)."""

    requests: dict[str, int] = field(default_factory=dict)
    executions: dict[str, int] = field(default_factory=dict)

    def add(self, model: str, rows: int, executions: int = 1) -> None:
        self.requests[model] = self.requests.get(model, 0) + rows
        self.executions[model] = self.executions.get(model, 0) + executions

    def line(self) -> str:
        return "; ".join(f"{m} {n:,} rows in {self.executions[m]:,} executions (mean batch "
                         f"{n / max(1, self.executions[m]):.2f})"
                         for m, n in self.requests.items() if n)


def serve(cfg: ServeConfig) -> None:
    """Start tritonserver on a fresh repository and the HTTP front before it, block until
    SIGINT/SIGTERM (exit 0) or until either dies (SystemExit 1), then shut down cleanly."""
    from bertforge.serve.front import HttpFront, free_loopback_port
    from bertforge.serve.tritonserver import TritonProcess, python_backend
    check_runtime()
    end = cfg.server
    # The public HTTP port is the front's, held from here on; tritonserver's own HTTP endpoint
    # listens on loopback only, where the front forwards the requests it let through.
    listener = check_ports(end)
    internal_port = free_loopback_port()
    front = HttpFront(listener, ("127.0.0.1", internal_port), end.max_request_bytes)
    stats = Executions()

    def on_stop(signum, frame):  # both end the serve loop the way Ctrl-C does
        raise KeyboardInterrupt

    # SIGINT too: a server started in the background of a script inherits SIGINT ignored.
    previous = {s: signal.signal(s, on_stop) for s in (signal.SIGTERM, signal.SIGINT)}
    with tempfile.TemporaryDirectory(prefix="bertforge-serve-") as tmp:
        triton = TritonProcess(write_repository(cfg, Path(tmp) / "models"),
                               python_backend(Path(tmp) / "backends"),
                               Path(tmp) / "tritonserver.log", host=end.host,
                               http_host="127.0.0.1", http_port=internal_port,
                               grpc_port=end.grpc_port, metrics_port=end.metrics_port,
                               exit_timeout=end.exit_timeout)
        died = None
        try:
            triton.start()
            triton.wait_ready(MODEL_NAMES)
            front.start()  # connections to the public port are accepted from now on
            batching = cfg.batching
            print(f"serve: models bert, bert_qa on http://{end.host}:{end.http_port} (tritonserver "
                  f"behind it on 127.0.0.1:{internal_port}) and grpc {end.host}:{end.grpc_port} "
                  f"(S={cfg.window.sequence_length}, max batch "
                  f"{batching.max_batch_size if batching.dynamic_batching else 1}, dynamic "
                  f"batching {'on' if batching.dynamic_batching else 'off'})", flush=True)
            if batching.request_timeout_ms and not batching.queue_budget_us():
                print("serve: no queue budget (--request-timeout-ms) with one model instance: "
                      "tritonserver 2.51 stalls a single instance's queue policy; give "
                      "--model-instances 2 for one", flush=True)
            while True:
                try:
                    code = triton.proc.wait(timeout=1.0)
                except subprocess.TimeoutExpired:
                    if front.failure is None:
                        continue
                    died = f"serve: the HTTP front failed ({front.failure}); no longer serving"
                    break
                died = (f"serve: tritonserver exited unexpectedly (exit status {code}, "
                        f"{triton.exit_reason()}); no longer serving")
                break
        except KeyboardInterrupt:
            pass  # a normal stop, also before the models were ready
        finally:
            for sig in previous:  # a second Ctrl-C must not cut the orderly stop short
                signal.signal(sig, signal.SIG_IGN)
            if triton.proc is not None:
                for model, (rows, executions) in triton.statistics().items():
                    stats.add(model, rows, executions)
                triton.stop()  # in-flight requests drain through the front, still up
            front.stop()
            listener.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    if died:
        raise SystemExit(died)
    print(f"serve: stopped; {stats.line() or 'no requests'}", flush=True)
