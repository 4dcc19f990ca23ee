"""What the served models do with a batch of Triton requests: check each request on its own,
run the valid ones together, answer each with its outputs or its own error.

The `model.py` files of `bertforge serve`'s repository (serve/triton_models/) run inside
Triton's python backend stub and are thin: they turn Triton requests into numpy arrays and
back. The logic is here, importable and testable without Triton. Why per request: Triton's
dynamic batcher merges requests of different clients into one `execute` call; one client's
bad request (a token id outside the vocab, a 10 MB context) must fail alone, with a
one-line message, while the others of the batch are run (the reason we left PyTriton: its
proxy answers a failed execution with one error for all). The model needs one check per
request (vocab bounds, 0/1 masks: a few us for [8, 384] rows), then one run for all.

Cost of isolation: none at the model; a request's rows still run in the same forward pass
as its neighbours' (serve/qa.py's padding-free batch), so a bad request costs its check only.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bertforge.config.serve import RequestLimitsSection, ServeConfig, WindowSection

BERT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
BERT_OUTPUTS = ("start_logits", "end_logits")
QA_INPUTS = ("question", "context")
# The served repository's model config holds the serve settings as one JSON parameter.
SETTINGS_PARAMETER = "bertforge_serve_config"


def build_engine(cfg: ServeConfig):
    """The QAEngine of `cfg`'s checkpoint, window shape and batching (values checked by the
    config's sections; only what needs the model, its position table, is checked here)."""
    import torch

    from bertforge.serve.qa import QAEngine, load_qa_checkpoint
    m, w = cfg.model, cfg.window
    if m.device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device is visible; use --device cpu")
    model, tokenizer = load_qa_checkpoint(m.checkpoint_input_dir, m.device, m.precision)
    if w.sequence_length > model.config.max_position_embeddings:
        raise ValueError(f"--sequence-length {w.sequence_length} exceeds the model's "
                         f"max_position_embeddings {model.config.max_position_embeddings}")
    # Each of the --model-instances backend processes gets its share of the CPU threads
    # (two instances x 1 thread ran 1.7x the rows/s of one x 2 on 2 cores: small rows use a
    # second thread poorly, a second process fully).
    threads = max(1, torch.get_num_threads() // cfg.batching.model_instances)
    torch.set_num_threads(threads)
    onnx = None
    if m.engine_runtime() == "onnxruntime":
        from bertforge.serve.onnx_rows import OnnxRows
        # Before QAEngine picks its attention implementation: the export traces the stock one.
        onnx = OnnxRows(model, w.sequence_length, threads=threads)
    return QAEngine(model, tokenizer, w, max_batch_size=cfg.batching.max_batch_size,
                    padding_free=cfg.batching.padding_free, onnx=onnx)


class BertError(RuntimeError):
    """`bert`'s own error for a BLS request of bert_qa (Triton's message, e.g. a request
    rejected for its time budget): passed on to bert_qa's clients with its code."""

    def __init__(self, error, pb_utils):
        message = error.message().splitlines()[0]
        super().__init__(f"bert: {message}")
        # The python backend hands a BLS error over with its message but without Triton's
        # code (INTERNAL); the queue budget's rejection is an overload, 503 / UNAVAILABLE, as
        # Triton answers it to a client of bert.
        self.code = (pb_utils.TritonError.UNAVAILABLE if message == "Request timeout expired"
                     else error.code())


class BlsAnswerer:
    """QAEngine.answer_many with the logits from the repository's `bert` model, called through
    Triton's BLS from inside `bert_qa`'s stub, in calls of up to `max_batch_size` windows
    (bert's own max batch)."""

    def __init__(self, pb_utils, tokenizer, window: WindowSection, max_batch_size: int):
        # Imported here, while Triton loads the model: on the first question it took ~2 s
        # (torch), which the first clients waited for.
        from bertforge.serve.qa import answer_questions
        self.answer_questions = answer_questions
        self.pb_utils, self.tokenizer = pb_utils, tokenizer
        self.window, self.max_batch_size = window, max_batch_size

    def logits(self, input_ids, attention_mask, token_type_ids):
        pb = self.pb_utils
        # Windows come padded to the batch's longest; the served `bert` takes [-1, S] only
        # (the exported one any length): pad to S, which the padding-free engine never runs.
        width = self.window.sequence_length - input_ids.shape[1]
        inputs = [pb.Tensor(n, np.pad(a.astype(np.int32), ((0, 0), (0, width)))) for n, a in
                  zip(BERT_INPUTS, (input_ids, attention_mask, token_type_ids))]
        response = pb.InferenceRequest(model_name="bert", inputs=inputs,
                                       requested_output_names=list(BERT_OUTPUTS)).exec()
        if response.has_error():
            raise BertError(response.error(), pb)
        return tuple(pb.get_output_tensor_by_name(response, n).as_numpy()[:, :input_ids.shape[1]]
                     for n in BERT_OUTPUTS)

    def answer_many(self, questions: list[str], contexts: list[str]):
        return self.answer_questions(questions, contexts, self.tokenizer, self.window,
                                     self.logits, max_batch_size=self.max_batch_size)


def qa_settings(window: WindowSection, limits: RequestLimitsSection,
                bert_max_batch_size: int) -> dict:
    """bert_qa's settings parameter (read back by `bls_answerer`)."""
    return {"window": dataclasses.asdict(window), "limits": dataclasses.asdict(limits),
            "bert_max_batch_size": bert_max_batch_size}


def bls_answerer(pb_utils, folder: Path, settings: dict
                 ) -> tuple[BlsAnswerer, RequestLimitsSection]:
    """bert_qa's answerer (tokenizer files in `folder`) and request limits from its settings."""
    from bertforge.data.vocab import load_tokenizer
    answerer = BlsAnswerer(pb_utils, load_tokenizer(name_or_path=str(folder)),
                           WindowSection(**settings["window"]), settings["bert_max_batch_size"])
    return answerer, RequestLimitsSection(**settings["limits"])


def settings_from_model_config(model_config: str) -> ServeConfig:
    """The ServeConfig that `bertforge serve` wrote into a model's config.pbtxt (as the
    python backend hands it to `initialize`: JSON)."""
    parameters = json.loads(model_config)["parameters"]
    return ServeConfig.from_flat(json.loads(parameters[SETTINGS_PARAMETER]["string_value"]))


@dataclass
class Outcome:
    """One request's reply: outputs by name, or the one-line error it gets with its Triton
    error code (None: INVALID_ARG, a client error)."""

    outputs: dict[str, np.ndarray] | None = None
    error: str | None = None
    code: object = None


def triton_execute(pb_utils, requests, input_names, run) -> list:
    """A python-backend model's `execute`, shared by the served and exported models: Triton
    requests -> numpy arrays -> `run` (run_bert, run_qa) -> one response per request. Client
    errors answer INVALID_ARG (HTTP 400, gRPC INVALID_ARGUMENT); the python backend's default
    would be INTERNAL (HTTP 500). A failed BLS call of bert_qa answers bert's first line with
    bert's code (Outcome.code). A bug answers one line per request and logs its traceback
    on the server only. `pb_utils` is passed in: it exists only inside the stub, and fills in
    TritonError's codes after the model file is loaded."""
    def error(message: str, code):
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))

    arrays = [{n: pb_utils.get_input_tensor_by_name(r, n).as_numpy() for n in input_names}
              for r in requests]
    try:
        outcomes = run(arrays)
    except Exception as err:  # noqa: BLE001 - a bug: one line to clients, traceback to the log
        import traceback
        pb_utils.Logger.log_error(traceback.format_exc())
        return [error(f"internal error: {type(err).__name__}", pb_utils.TritonError.INTERNAL)
                for _ in requests]
    return [error(o.error, pb_utils.TritonError.INVALID_ARG if o.code is None else o.code)
            if o.error is not None else
            pb_utils.InferenceResponse([pb_utils.Tensor(n, a) for n, a in o.outputs.items()])
            for o in outcomes]


def run_bert(engine, requests: list[dict[str, np.ndarray]]) -> list[Outcome]:
    """`bert`: each request's three INT32 [rows, S] arrays checked alone (QAEngine.check_rows);
    the valid requests' rows run as one batch and are split back."""
    outcomes: list[Outcome] = []
    valid: list[int] = []
    for k, arrays in enumerate(requests):
        try:
            engine.check_rows(*(arrays[n] for n in BERT_INPUTS))
        except ValueError as err:
            outcomes.append(Outcome(error=str(err)))
            continue
        outcomes.append(Outcome())
        valid.append(k)
    if valid:
        merged = [np.concatenate([requests[k][n] for k in valid]) for n in BERT_INPUTS]
        start, end = engine.logits(*merged)
        bounds = np.cumsum([0, *(len(requests[k]["input_ids"]) for k in valid)])
        for k, lo, hi in zip(valid, bounds, bounds[1:]):
            outcomes[k].outputs = {"start_logits": start[lo:hi], "end_logits": end[lo:hi]}
    return outcomes


def _texts(column: np.ndarray, name: str, limit: int, flag: str) -> list[str]:
    """The UTF-8 strings of a BYTES [rows, 1] input; ValueError names the first bad row."""
    out = []
    for i, raw in enumerate(column.reshape(-1)):
        if len(raw) > 4 * limit:  # over the limit whatever it decodes to: skip decoding
            raise ValueError(f"{name} of row {i} has {len(raw):,} bytes; at most {limit:,} "
                             f"characters are accepted ({flag} of the server)")
        try:
            text = raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
        except UnicodeDecodeError as err:
            raise ValueError(f"{name} of row {i} is not valid UTF-8 (byte {err.start})") from None
        if len(text) > limit:
            raise ValueError(f"{name} of row {i} has {len(text):,} characters; at most "
                             f"{limit:,} are accepted ({flag} of the server)")
        if not text.strip():
            raise ValueError(f"{name} of row {i} is empty")
        out.append(text)
    return out


def run_qa(engine, requests: list[dict[str, np.ndarray]],
           limits: RequestLimitsSection) -> list[Outcome]:
    """`bert_qa`: each request's question/context rows decoded and checked alone (UTF-8,
    not empty, within the limits); the valid requests' questions answered together by
    `engine.answer_many` (a QAEngine, or the exported model's BLS answerer)."""
    outcomes: list[Outcome] = []
    valid: list[tuple[int, list[str], list[str]]] = []
    for k, arrays in enumerate(requests):
        try:
            if arrays["question"].shape != arrays["context"].shape:
                raise ValueError(f"question {list(arrays['question'].shape)} and context "
                                 f"{list(arrays['context'].shape)} must have one shape")
            questions = _texts(arrays["question"], "question", limits.max_question_chars,
                               "--max-question-chars")
            contexts = _texts(arrays["context"], "context", limits.max_context_chars,
                              "--max-context-chars")
        except ValueError as err:
            outcomes.append(Outcome(error=str(err)))
            continue
        outcomes.append(Outcome())
        valid.append((k, questions, contexts))
    if valid:
        try:
            answers = engine.answer_many([q for _, qs, _ in valid for q in qs],
                                         [c for _, _, cs in valid for c in cs])
        except BertError as err:  # bert's reason (e.g. its time budget), for the valid ones
            for k, _, _ in valid:
                outcomes[k] = Outcome(error=str(err), code=err.code)
            return outcomes
        lo = 0
        for k, questions, _ in valid:
            mine = answers[lo:lo + len(questions)]
            lo += len(questions)
            outcomes[k].outputs = {
                "answer": np.array([[a.text.encode("utf-8")] for a in mine], dtype=np.object_),
                "score": np.array([[a.score] for a in mine], dtype=np.float32),
                "start": np.array([[a.start] for a in mine], dtype=np.int32),
                "end": np.array([[a.end] for a in mine], dtype=np.int32)}
    return outcomes
