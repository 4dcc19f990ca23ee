"""ONNX Runtime as the served model's CPU fp32 runtime: each row run on its own, trimmed to its
real length.

Why. On CPU a small BERT at batch 1 spends much of eager PyTorch's time dispatching ops;
ONNX Runtime runs the same graph with fused kernels and far less overhead per op. Measured in
process (mini BERT 256/4, S 128, rows of S/4..S real tokens, 2 threads, fp32, rows/s):

    batch                          1     4     8    32
    ONNX Runtime, rows trimmed   460   390   434   430   (this module)
    PyTorch padding-free engine  217   355   422   446   (serve/qa.py, flat layout)
    ONNX Runtime, padded rows    268   317   339   318   (the stock Triton + ORT stack)
    PyTorch, padded rows         176   280   309   336

One trimmed row already keeps this CPU's matrix units busy (the products are [~80, 256] x
[256, 1024]), so batching rows in ONNX Runtime does not pay: padding a batch to its longest
row only adds work (4 rows: 346 rows/s). Rows are therefore run one at a time, which gives the
batched PyTorch engine's throughput at 8+ rows and twice its speed at 1 row. The dynamic
batcher still pays for itself by running a whole batch of requests in one trip between
Triton and the backend stub.

Cost: the model is exported at start-up (torch.onnx, TorchScript exporter as `bertforge
export`) into a temporary file and checked against PyTorch within 1e-4 (export.check_onnx):
~3 s for the mini model; the ONNX graph lives in memory beside the PyTorch model, which stays
as the reference path (QAEngine.padded_logits) and for masks that are not right-padded.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

OUTPUTS = ("start_logits", "end_logits")


class OnnxRows:
    """`model` (BertForQuestionAnswering, CPU fp32) under ONNX Runtime, `threads` intra-op."""

    def __init__(self, model: torch.nn.Module, sequence_length: int, threads: int):
        try:
            import onnxruntime as ort
        except ImportError:
            raise ValueError("--runtime onnxruntime needs onnxruntime: pip install "
                             "'bertforge[serve]', or use --runtime torch") from None
        from bertforge.serve.export import check_onnx, export_onnx
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        with tempfile.TemporaryDirectory(prefix="bertforge-onnx-") as tmp:
            # The tracer's warnings (constants, index ops) would fill the server log at every
            # start; what they warn about is checked by check_onnx's parity run below.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                path = export_onnx(model, Path(tmp) / "model.onnx",
                                   sequence_length=sequence_length)
            self.parity = check_onnx(model, path, sequence_length)
            # The session holds the graph in memory: the file may go.
            self.session = ort.InferenceSession(str(path), options,
                                                providers=["CPUExecutionProvider"])

    def logits(self, input_ids: np.ndarray, token_type_ids: np.ndarray, lengths: np.ndarray,
               start: np.ndarray, end: np.ndarray) -> None:
        """Fill `start`/`end` [B, S] at each row's first `lengths[i]` positions with the
        logits of that row run alone, trimmed (rows of length 0 are left as they are)."""
        for i in np.nonzero(lengths)[0]:
            n = int(lengths[i])
            feed = {"input_ids": np.ascontiguousarray(input_ids[i:i + 1, :n], dtype=np.int32),
                    "attention_mask": np.ones((1, n), dtype=np.int32),
                    "token_type_ids": np.ascontiguousarray(token_type_ids[i:i + 1, :n],
                                                           dtype=np.int32)}
            row_start, row_end = self.session.run(list(OUTPUTS), feed)
            start[i, :n], end[i, :n] = row_start[0], row_end[0]
