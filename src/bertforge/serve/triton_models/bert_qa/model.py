"""`bert_qa`: question and context text in, answer out (Triton python backend), in both
`bertforge serve`'s repository and the one `bertforge export --format triton-repo` writes.

Tokenizes with the tokenizer files beside this file, cuts windows and ranks spans with
bertforge's SQuAD code (serve/qa.py, answer_questions), and gets the logits from the
repository's `bert` model through Triton's BLS (business logic scripting): one copy of the
model, in `bert`, where the dynamic batcher merges bert_qa's windows with other clients'
tensor requests. Each request is checked on its own (serve/backend.py run_qa): a bad one gets
its own 400 / INVALID_ARGUMENT. In a stock container it needs `pip install bertforge` (and
numpy<2 for the stub) in the container's Python.
"""

import json
from pathlib import Path

import triton_python_backend_utils as pb_utils

from bertforge.serve import backend


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        settings = json.loads(config["parameters"][backend.SETTINGS_PARAMETER]["string_value"])
        here = Path(args["model_repository"]) / args["model_version"]
        self.answerer, self.limits = backend.bls_answerer(pb_utils, here, settings)

    def execute(self, requests):
        return backend.triton_execute(
            pb_utils, requests, backend.QA_INPUTS,
            lambda arrays: backend.run_qa(self.answerer, arrays, self.limits))
