"""A stand-in for Triton's C++ onnxruntime backend, as a Python-based Triton backend.

The stock container's onnxruntime backend (libtriton_onnxruntime.so) is not on PyPI, but the
tritonserver 2.51 that PyTriton bundles loads Python-based backends: a directory
backends/onnxruntime/ holding this model.py serves any model whose config says
platform "onnxruntime_onnx". benchmarks/triton_stack.py uses it to load the repository
`bertforge export --format triton-repo` writes, unchanged, into a real tritonserver (tests and
benchmarks/bench_serve.py --onnxruntime). It reads
the model file, tensor names and batching from config.pbtxt as the real backend does, runs
the rows of a dynamic batch in one onnxruntime call and splits the outputs per request.
Runs inside the python backend stub, so it may import only the stub's environment.
"""

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        name = config.get("default_model_filename") or "model.onnx"
        path = Path(args["model_repository"]) / args["model_version"] / name
        options = ort.SessionOptions()
        # The real backend's parameter (0 or absent: onnxruntime's default, every core).
        threads = config.get("parameters", {}).get("intra_op_thread_count", {})
        options.intra_op_num_threads = int(threads.get("string_value", 0))
        self.session = ort.InferenceSession(str(path), options,
                                            providers=["CPUExecutionProvider"])
        self.inputs = [t["name"] for t in config["input"]]
        self.outputs = [t["name"] for t in config["output"]]

    def execute(self, requests):
        arrays = [{n: pb_utils.get_input_tensor_by_name(r, n).as_numpy() for n in self.inputs}
                  for r in requests]
        rows = [len(a[self.inputs[0]]) for a in arrays]
        if len({a[self.inputs[0]].shape[1] for a in arrays}) > 1:
            # Requests of different sequence lengths: one onnxruntime call each.
            results = [self.session.run(self.outputs, a) for a in arrays]
        else:
            merged = self.session.run(self.outputs, {n: np.concatenate([a[n] for a in arrays])
                                                     for n in self.inputs})
            bounds = np.cumsum([0, *rows])
            results = [[out[lo:hi] for out in merged] for lo, hi in zip(bounds, bounds[1:])]
        return [pb_utils.InferenceResponse([pb_utils.Tensor(n, np.ascontiguousarray(o))
                                            for n, o in zip(self.outputs, outs)])
                for outs in results]
