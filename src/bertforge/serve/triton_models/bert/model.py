"""`bert` of `bertforge serve`: token ids in, start/end logits out (Triton python backend).

Runs inside Triton's python backend stub; the logic is bertforge.serve.backend (each request
checked alone, the valid ones of a dynamic batch run together; Triton requests in and
responses out: backend.triton_execute). Written into the repository by serve/server.py.
"""

import triton_python_backend_utils as pb_utils

from bertforge.serve import backend


class TritonPythonModel:
    def initialize(self, args):
        self.engine = backend.build_engine(backend.settings_from_model_config(args["model_config"]))

    def execute(self, requests):
        return backend.triton_execute(pb_utils, requests, backend.BERT_INPUTS,
                                      lambda arrays: backend.run_bert(self.engine, arrays))
