"""`bert_qa` of the repository `bertforge export --format triton-repo` writes: question and
context text in, answer out, for a stock Triton container (python backend).

Tokenizes with the tokenizer files beside this file, cuts windows and ranks spans with
bertforge's SQuAD code (serve/qa.py, answer_questions), and gets the logits from the
repository's `bert` model (ONNX Runtime) through Triton's BLS (business logic scripting):
the windows of a batch of questions go to `bert` in calls of up to max_batch_size rows, where
Triton's dynamic batcher may merge them with other clients' tensor requests. Each request is
checked on its own (serve/backend.py): a bad one gets its own 400 / INVALID_ARGUMENT.
Needs `pip install bertforge` (and numpy<2 for the stub) in the container's Python.
"""

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from bertforge.config.serve import RequestLimitsSection, WindowSection
from bertforge.data.vocab import load_tokenizer
from bertforge.serve import backend
from bertforge.serve.qa import answer_questions


class BlsAnswerer:
    """answer_many as QAEngine has it, with `bert` called through BLS for the logits."""

    def __init__(self, tokenizer, window, max_batch_size):
        self.tokenizer, self.window, self.max_batch_size = tokenizer, window, max_batch_size

    def logits(self, input_ids, attention_mask, token_type_ids):
        inputs = [pb_utils.Tensor(n, np.ascontiguousarray(a, dtype=np.int32)) for n, a in
                  zip(backend.BERT_INPUTS, (input_ids, attention_mask, token_type_ids))]
        response = pb_utils.InferenceRequest(
            model_name="bert", inputs=inputs,
            requested_output_names=list(backend.BERT_OUTPUTS)).exec()
        if response.has_error():
            raise RuntimeError(f"bert: {response.error().message()}")
        return tuple(pb_utils.get_output_tensor_by_name(response, n).as_numpy()
                     for n in backend.BERT_OUTPUTS)

    def answer_many(self, questions, contexts):
        return answer_questions(questions, contexts, self.tokenizer, self.window, self.logits,
                                max_batch_size=self.max_batch_size)


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        settings = json.loads(config["parameters"][backend.SETTINGS_PARAMETER]["string_value"])
        here = Path(args["model_repository"]) / args["model_version"]
        self.limits = RequestLimitsSection(**settings["limits"])
        self.answerer = BlsAnswerer(load_tokenizer(name_or_path=str(here)),
                                    WindowSection(**settings["window"]),
                                    settings["bert_max_batch_size"])

    def execute(self, requests):
        return backend.triton_execute(
            pb_utils, requests, backend.QA_INPUTS,
            lambda arrays: backend.run_qa(self.answerer, arrays, self.limits))
