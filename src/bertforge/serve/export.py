"""`bertforge export`: the QA model as ONNX, or as a Triton model repository for a stock container.

- `--format onnx`: `<out>/model.onnx` with inputs input_ids, attention_mask, token_type_ids
  (INT32 [batch, sequence], both axes dynamic) and outputs start_logits, end_logits (FP32),
  the same names and dtypes as the served `bert` model, so a client works with either.
- `--format triton-repo`: `<out>/bert/1/model.onnx` + `<out>/bert/config.pbtxt` for Triton's
  onnxruntime backend, dynamic batching on, and `<out>/bert_qa/`: question + context text in,
  answer out, a python-backend model (serve/triton_models/bert_qa/model.py, as served) with the
  checkpoint's tokenizer files that windows the context, asks `bert` for logits through BLS
  and post-processes as `bertforge serve` does; `tritonserver --model-repository <out>` in an
  NGC container loads both (bert_qa needs `pip install bertforge` in the container's Python;
  `bert` alone needs no Python in the serving path). Without Docker, the tests load
  the unchanged repository into the real tritonserver 2.51 that PyTriton bundles, with a
  Python-based stand-in for the C++ onnxruntime backend (benchmarks/triton_stack.py, test and
  benchmark support outside the package; tests/test_serve_triton_repo.py):
  Triton parses and validates config.pbtxt, batches concurrent requests and answers what
  PyTorch answers.

Every export is checked: onnxruntime runs the file on a random batch (2 x S tokens with
padding) and its logits must match PyTorch's within 1e-4 (max abs); the measured difference
is reported (1.2e-7 in fp32 for the tiny test model). The exporter is the TorchScript one
(`dynamo=False`): it needs no onnxscript package, and the whole command (load, export, check)
takes ~5 s for the tiny model; the
int64 cast of the INT32 inputs happens inside the graph so clients send 4-byte ids (half the
bytes of int64 on the wire, as the reference's INT32 [384] inputs).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from bertforge.config.serve import ExportConfig
from bertforge.files import atomic_output
from bertforge.serve.qa import PAD_LOGIT
from bertforge.serve.server import dynamic_batching, write_qa_model

INPUTS = ("input_ids", "attention_mask", "token_type_ids")
OUTPUTS = ("start_logits", "end_logits")
PARITY_ATOL = 1e-4


class _Int32QA(torch.nn.Module):
    """The QA model taking INT32 inputs (cast to int64 in the graph) and returning a tuple,
    with PAD_LOGIT at padding positions: the served `bert` model's contract (serve/qa.py)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids):
        out = self.model(input_ids=input_ids.long(), attention_mask=attention_mask.long(),
                         token_type_ids=token_type_ids.long())
        keep = attention_mask > 0
        pad = torch.tensor(PAD_LOGIT, dtype=torch.float32)
        return (torch.where(keep, out.start_logits.float(), pad),
                torch.where(keep, out.end_logits.float(), pad))


def sample_batch(vocab_size: int, sequence_length: int, batch: int = 2,
                 seed: int = 0) -> dict[str, np.ndarray]:
    """A random INT32 batch with a padded tail in the second row (to exercise the mask)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1000, vocab_size, (batch, sequence_length), dtype=np.int32)
    mask = np.ones_like(ids)
    types = np.zeros_like(ids)
    types[:, sequence_length // 2:] = 1
    if batch > 1:
        mask[1, sequence_length * 3 // 4:] = 0
        ids[1, sequence_length * 3 // 4:] = 0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


def export_onnx(model: torch.nn.Module, path: Path, *, sequence_length: int = 128,
                opset: int = 17) -> Path:
    """Write `model` (a BertForQuestionAnswering) to `path` with dynamic batch/sequence axes."""
    model = model.float().cpu().eval()
    example = sample_batch(model.config.vocab_size, min(sequence_length, 16))
    args = tuple(torch.from_numpy(example[k]) for k in INPUTS)
    axes = {name: {0: "batch", 1: "sequence"} for name in INPUTS + OUTPUTS}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp, torch.no_grad():
        torch.onnx.export(_Int32QA(model), args, str(tmp), input_names=list(INPUTS),
                          output_names=list(OUTPUTS), dynamic_axes=axes, opset_version=opset,
                          dynamo=False)
    return path


def check_onnx(model: torch.nn.Module, path: Path, sequence_length: int) -> float:
    """Max abs difference between onnxruntime and PyTorch logits on a random batch; raises
    ValueError above PARITY_ATOL."""
    import onnxruntime as ort
    batch = sample_batch(model.config.vocab_size, sequence_length, batch=3, seed=1)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(list(OUTPUTS), batch)
    with torch.no_grad():
        want = _Int32QA(model.float().cpu().eval())(*(torch.from_numpy(batch[k]) for k in INPUTS))
    diff = max(float(np.abs(g - w.numpy()).max()) for g, w in zip(got, want))
    if not diff <= PARITY_ATOL:
        raise ValueError(f"{path}: onnxruntime logits differ from PyTorch by {diff:.2e} "
                         f"(> {PARITY_ATOL}); try another --opset")
    return diff


def triton_config(name: str, max_batch_size: int, max_queue_delay_us: int,
                  instances: int = 1, request_timeout_us: int = 0) -> str:
    """config.pbtxt of the onnxruntime backend; -1 = dynamic sequence length; the queue
    budget `request_timeout_us` as served (server.dynamic_batching). With several
    `instances`, each gets this machine's cores / instances intra-op threads (the backend's
    `intra_op_thread_count`; its default, every core per instance, oversubscribes the CPU):
    edit it for a serving machine with another core count."""
    def tensor(n: str, dtype: str) -> str:
        return f'  {{ name: "{n}" data_type: {dtype} dims: [ -1 ] }}'
    lines = [
        f'name: "{name}"', 'platform: "onnxruntime_onnx"', f"max_batch_size: {max_batch_size}",
        "input [", ",\n".join(tensor(n, "TYPE_INT32") for n in INPUTS), "]",
        "output [", ",\n".join(tensor(n, "TYPE_FP32") for n in OUTPUTS), "]",
        dynamic_batching(max_queue_delay_us, request_timeout_us),
        f"instance_group [ {{ kind: KIND_CPU count: {instances} }} ]"]
    if instances > 1:
        threads = max(1, torch.get_num_threads() // instances)
        lines.append(f'parameters {{ key: "intra_op_thread_count" value: {{ string_value: '
                     f'"{threads}" }} }}')
    return "\n".join(lines + [""])


def export(checkpoint_dir: Path | str, output_dir: Path | str, *, fmt: str,
           **settings: Any) -> list[str]:
    """run_export for a checkpoint, an output directory and a format; `settings` are the
    other ExportConfig fields (sequence_length, opset, max_batch_size, max_queue_delay_us,
    doc_stride, max_query_length, max_context_chars, ...),
    with ExportConfig's defaults and checks."""
    return run_export(ExportConfig(checkpoint_input_dir=checkpoint_dir, output_dir=output_dir,
                                   format=fmt, **settings))


def run_export(cfg: ExportConfig) -> list[str]:
    """Export (see module docstring); returns one line per thing written or checked."""
    from bertforge.serve.qa import load_qa_checkpoint
    e, batching = cfg.export, cfg.batching
    seq = e.sequence_length
    model, _ = load_qa_checkpoint(e.checkpoint_input_dir)
    output_dir = Path(e.output_dir)
    if e.format == "onnx":
        onnx_path = output_dir / "model.onnx"
    else:
        onnx_path = output_dir / "bert" / "1" / "model.onnx"
        # Triton's instance_group KIND_CPU is the safe default; edit to KIND_GPU for a GPU box.
        config = output_dir / "bert" / "config.pbtxt"
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text(triton_config("bert", batching.max_batch_size,
                                        batching.max_queue_delay_us, batching.model_instances,
                                        batching.queue_budget_us()))
    export_onnx(model, onnx_path, sequence_length=seq, opset=e.opset)
    diff = check_onnx(model, onnx_path, seq)
    lines = [f"wrote {onnx_path} ({onnx_path.stat().st_size / 1e6:.1f} MB)",
             f"onnxruntime vs PyTorch: max abs diff {diff:.2e} on 3 x {seq} tokens"]
    if e.format == "triton-repo":
        write_qa_model(output_dir / "bert_qa", e.checkpoint_input_dir, e.window(), cfg.limits,
                       bert_max_batch_size=batching.max_batch_size,
                       max_queue_delay_us=batching.max_queue_delay_us,
                       instances=batching.model_instances,
                       request_timeout_us=batching.queue_budget_us())
        lines.insert(1, f"wrote {output_dir / 'bert' / 'config.pbtxt'} and {output_dir / 'bert_qa'}"
                     f" (text in, answer out; needs bertforge in the server's Python) "
                     f"(tritonserver --model-repository {output_dir})")
        if batching.request_timeout_ms and not batching.queue_budget_us():
            lines.append("no queue budget (--request-timeout-ms) in config.pbtxt with one "
                         "model instance: tritonserver 2.51 stalls a single instance's queue "
                         "policy; give --model-instances 2 for one")
    return lines
