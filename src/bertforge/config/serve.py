"""Typed configuration of `bertforge serve`, `export` and `serve-bench`, and the SQuAD window.

Each value has one home here: the window shape (S 384, doc stride 128, max query 64, the
reference's) is `WindowSection`, shared with SQuAD fine-tuning (squad/config.py); Triton's
batching knobs are `BatchingSection`, shared by the server and the exported repository's
config.pbtxt; the server's ports are `EndpointSection`, whose defaults also give
serve-bench its default URL. `bertforge serve` has presets (presets/serve.yml); export and
serve-bench take flags only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from bertforge.config.core import RunConfig, Section, opt

# The reference's SQuAD windows and its served model "bert" (INT32 [-1, 384] inputs).
QA_SEQUENCE_LENGTH = 384


@dataclass
class WindowSection(Section):
    """How a question and its context become fixed-length windows."""

    sequence_length: int = opt(QA_SEQUENCE_LENGTH, "tokens per window: [CLS] question [SEP] "
                               "context [SEP]", ge=8)
    doc_stride: int = opt(128, "tokens shared by consecutive windows of a long context "
                          "(Hugging Face's stride)", ge=0)
    max_query_length: int = opt(64, "question tokens kept (longer questions are cut)", ge=1)

    def check(self) -> None:
        budget = self.sequence_length - self.max_query_length - 3
        if budget <= self.doc_stride:
            self.fail("doc_stride", f"= {self.doc_stride} must be below the context tokens per "
                      f"window, sequence_length - max_query_length - 3 = {budget}; lower "
                      "--doc-stride or --max-query-length, or raise --sequence-length")


@dataclass
class BatchingSection(Section):
    """How Triton's dynamic batcher merges requests."""

    max_batch_size: int = opt(32, "most request rows merged into one model execution", ge=1)
    max_queue_delay_us: int = opt(2000, "how long the dynamic batcher waits to fill a batch; a "
                                  "lone request waits this long too, so 0 suits one client at a "
                                  "time (under load batches still form from the queue)", ge=0)
    model_instances: int = opt(1, "copies of each model (Triton's instance_group count), each "
                               "in its own process with 1/N of the CPU threads: more "
                               "throughput from many clients", ge=1)
    # Triton's queue policy (REJECT after the timeout): without it an overloaded server queues
    # requests without bound and a client waits until its own timeout (tritonclient.http's:
    # 60 s), after which the server still runs the abandoned request. 30 s leaves a request
    # that waited the whole budget half of that 60 s to run. Measured with a 50 ms budget:
    # rejected requests were answered ~0.5 s after arrival (the queue is looked at between
    # executions, here one long bert_qa execution), so the budget is a lower bound.
    request_timeout_ms: int = opt(30_000, "longest a request may wait in a model's queue before "
                                  "it is answered 'Request timeout expired' (HTTP 503 / gRPC "
                                  "UNAVAILABLE) instead of run; 0: no limit; needs "
                                  "--model-instances 2 or more. A client may ask for less per "
                                  "request (Triton's request timeout)", ge=0)

    def queue_budget_us(self) -> int:
        """The queue policy's timeout to write into config.pbtxt (0: no policy). Only with
        two or more instances: tritonserver 2.51's dynamic batcher with any queue policy
        (a timeout or only max_queue_size) and a single instance holds requests ~0.5 s at a
        time (measured, mini BERT, 4 async clients: 27-54 rows/s and p99 1.6-4 s against 269-
        289 rows/s and p99 67 ms without the policy; with two instances 347-413 rows/s, p99
        under 75 ms, with it)."""
        return self.request_timeout_ms * 1000 if self.model_instances >= 2 else 0


# ---------------------------------------------------------------- bertforge serve
@dataclass
class ServedModelSection(Section):
    """The fine-tuned QA checkpoint and where it runs."""

    checkpoint_input_dir: str | None = opt(None, "a fine-tuned QA checkpoint (step/run directory "
                                           "or Hugging Face directory)", metavar="DIR",
                                           required=True)
    device: Literal["cpu", "cuda"] = opt("cpu", "where the model runs")
    precision: Literal["fp32", "bf16", "fp16"] = opt("fp32", "dtype of weights and activations "
                                                     "(fp16 needs --device cuda)")
    runtime: Literal["auto", "torch", "onnxruntime"] = opt(
        "auto", "what runs the model: 'onnxruntime' (CPU fp32 only: the model exported to ONNX "
        "at start-up, each row run trimmed to its length), 'torch' (the padding-free PyTorch "
        "engine), 'auto': onnxruntime on CPU in fp32, torch otherwise")

    def check(self) -> None:
        if self.precision == "fp16" and self.device == "cpu":
            self.fail("precision", "fp16 needs --device cuda; use fp32 or bf16 on CPU")
        if self.runtime == "onnxruntime" and (self.device, self.precision) != ("cpu", "fp32"):
            self.fail("runtime", f"onnxruntime runs CPU fp32 here (got --device {self.device} "
                      f"--precision {self.precision}); use --runtime torch")

    def engine_runtime(self) -> str:
        """The runtime 'auto' stands for on this device and precision (measured fastest:
        serve/onnx_rows.py)."""
        if self.runtime != "auto":
            return self.runtime
        return "onnxruntime" if (self.device, self.precision) == ("cpu", "fp32") else "torch"


@dataclass
class ServeBatchingSection(BatchingSection):
    """How requests are batched and run."""

    dynamic_batching: bool = opt(True, "merge concurrent requests into batches (false: one "
                                 "request row at a time, max batch 1, for comparison)")
    padding_free: bool = opt(True, "pack the batch's rows and trim their padding (false: run the "
                             "padded rows as sent, the stock path)")


@dataclass
class RequestLimitsSection(Section):
    """What one `bert_qa` request may hold; a request over a limit gets its own error (400 /
    INVALID_ARGUMENT) and the others of its batch are run. A context of 10 MB took 39 s on 2
    cores and held up every client behind it; 100k characters (a long Wikipedia article,
    ~25k tokens, ~170 windows at S 384) takes ~1 s on the mini model."""

    max_context_chars: int = opt(100_000, "longest `bert_qa` context, in characters", ge=1)
    max_question_chars: int = opt(1_000, "longest `bert_qa` question, in characters (only "
                                  "--max-query-length tokens of it are used)", ge=1)


@dataclass
class EndpointSection(Section):
    """Where the server listens, what its HTTP front accepts (serve/front.py), and how long a
    stop waits for in-flight requests."""

    host: str = opt("127.0.0.1", "bind address (default: loopback only)", metavar="ADDRESS")
    http_port: int = opt(8000, "HTTP port", ge=1, le=65535)
    grpc_port: int = opt(8001, "gRPC port", ge=1, le=65535)
    metrics_port: int = opt(8002, "Prometheus metrics port", ge=1, le=65535)
    exit_timeout: int = opt(5, "seconds in-flight requests get when the server stops", ge=0)
    # 16 MiB: a full bert_qa batch (8 rows at max batch 32) of 100k-character contexts is
    # 9.6 MB even as JSON with every character escaped (\ud83d\ude00: 12 bytes); a [32, 384]
    # x 3 bert batch is ~0.25 MB of JSON. Raise it with --max-batch-size or --max-context-chars.
    max_request_bytes: int = opt(16 * 1024 * 1024, "largest HTTP request body (also once "
                                 "gzip/deflate is inflated); a larger one is answered 413",
                                 ge=1024)

    def check(self) -> None:
        ports = {"http_port": self.http_port, "grpc_port": self.grpc_port,
                 "metrics_port": self.metrics_port}
        for name, port in ports.items():
            other = next((o for o, p in ports.items() if p == port and o != name), None)
            if other:
                self.fail(name, f"= {port} is also --{other.replace('_', '-')}; give each "
                          "endpoint its own port")


@dataclass
class ServeConfig(RunConfig):
    """Everything `bertforge serve` needs; model loading, batching and Triton each get their
    section."""

    PRESET_FILE: ClassVar[str] = "serve.yml"
    DEFAULT_PRESET: ClassVar[str] = "default"

    model: ServedModelSection = field(default_factory=ServedModelSection)
    window: WindowSection = field(default_factory=WindowSection)
    batching: ServeBatchingSection = field(default_factory=ServeBatchingSection)
    limits: RequestLimitsSection = field(default_factory=RequestLimitsSection)
    server: EndpointSection = field(default_factory=EndpointSection)


# ---------------------------------------------------------------- bertforge export
@dataclass
class ExportSection(Section):
    """What is exported, in which format, and where."""

    checkpoint_input_dir: str | None = opt(None, "a fine-tuned QA checkpoint", metavar="DIR",
                                           required=True)
    format: Literal["onnx", "triton-repo"] | None = opt(
        None, "'onnx': OUT/model.onnx; 'triton-repo': OUT/bert (model.onnx for Triton's "
        "onnxruntime backend) and OUT/bert_qa (text in, answer out: python backend + "
        "tokenizer, calls bert)", required=True)
    output_dir: str | None = opt(None, "where the export goes", metavar="DIR", required=True)
    sequence_length: int = opt(QA_SEQUENCE_LENGTH, "S of the parity check against PyTorch "
                               "(the exported axes are dynamic) and of bert_qa's windows", ge=8)
    doc_stride: int | None = opt(None, "bert_qa's window overlap (default: min(128, half the "
                                 "context tokens of a window))", ge=0)
    max_query_length: int | None = opt(None, "bert_qa's question tokens (default: min(64, "
                                       "S/4))", ge=1)
    opset: int = opt(17, "ONNX opset", ge=7)

    def window(self) -> WindowSection:
        """bert_qa's windows: --sequence-length with the given or scaled stride and query
        (at S 384 the reference's 128 / 64); WindowSection checks them."""
        query = self.max_query_length or min(64, self.sequence_length // 4)
        stride = (self.doc_stride if self.doc_stride is not None
                  else min(128, (self.sequence_length - query - 3) // 2))
        return WindowSection(sequence_length=self.sequence_length, doc_stride=stride,
                             max_query_length=query)

    def check(self) -> None:
        if self.format == "triton-repo":
            self.window()


@dataclass
class ExportConfig(RunConfig):
    """Everything `bertforge export` needs; `batching` fills the Triton repository's
    config.pbtxt files, `limits` its bert_qa's."""

    export: ExportSection = field(default_factory=ExportSection)
    batching: BatchingSection = field(default_factory=BatchingSection)
    limits: RequestLimitsSection = field(default_factory=RequestLimitsSection)


# ---------------------------------------------------------------- bertforge serve-bench
@dataclass
class BenchTargetSection(Section):
    """The served model under load."""

    url: str | None = opt(None, "host:port of the server (default: serve's defaults, gRPC or "
                          "HTTP port by --protocol)", metavar="HOST:PORT")
    protocol: Literal["grpc", "http"] = opt("grpc", "tritonclient protocol")
    model: str = opt("bert", "served model name", metavar="NAME")

    def address(self) -> str:
        """--url, else the address `bertforge serve` listens on by default for --protocol."""
        if self.url:
            return self.url
        served = EndpointSection()
        return f"{served.host}:{served.grpc_port if self.protocol == 'grpc' else served.http_port}"


@dataclass
class BenchLoadSection(Section):
    """The load: clients, requests and the windows they send."""

    clients: list[int] = opt([1, 4, 8], "client counts, one setting each (also 1,4,8)", ge=1)
    mode: Literal["sync", "async"] = opt("sync", "'sync' waits for each reply; 'async' keeps 4 "
                                         "requests in flight per client")
    requests: int = opt(200, "requests per client", ge=1)
    batch_size: int = opt(1, "windows per request", ge=1)
    data: str | None = opt(None, "a SQuAD json whose windows are sent (default: synthetic "
                           "windows)", metavar="PATH")
    sequence_length: int = opt(QA_SEQUENCE_LENGTH, "S of the windows sent (the server's "
                               "--sequence-length)", ge=8)
    pool_size: int = opt(64, "distinct request payloads, cycled", ge=1)

    def check(self) -> None:
        if not self.clients:
            self.fail("clients", "is empty; give client counts such as 1,4,8")


@dataclass
class BenchReferenceSection(Section):
    """The model every reply is checked against, run in this process."""

    checkpoint_input_dir: str | None = opt(None, "the served checkpoint, to check every "
                                           "response in process", metavar="DIR", required=True)
    rtol: float = opt(1e-4, "relative tolerance of a reply's logits", ge=0)
    atol: float = opt(1e-4, "absolute tolerance of a reply's logits", ge=0)


@dataclass
class BenchConfig(RunConfig):
    """Everything `bertforge serve-bench` needs."""

    target: BenchTargetSection = field(default_factory=BenchTargetSection)
    load: BenchLoadSection = field(default_factory=BenchLoadSection)
    reference: BenchReferenceSection = field(default_factory=BenchReferenceSection)
