"""`bert_qa` of `bertforge serve`: question and context in, answer out (Triton python backend).

Runs inside Triton's python backend stub; the logic is bertforge.serve.backend (each request
checked alone, the valid ones of a dynamic batch run together), this file only converts
between Triton requests and numpy arrays. Written into the repository by serve/server.py.
"""

import traceback

import triton_python_backend_utils as pb_utils

from bertforge.serve import backend


def error_response(message, code_name):
    """An error response with Triton's code `code_name`: client errors are INVALID_ARG (HTTP
    400, gRPC INVALID_ARGUMENT); the python backend's default is INTERNAL (HTTP 500). Looked
    up here, not at import: the stub fills TritonError in after loading this file."""
    code = getattr(pb_utils.TritonError, code_name)
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))


class TritonPythonModel:
    def initialize(self, args):
        self.settings = backend.settings_from_model_config(args["model_config"])
        self.engine = backend.build_engine(self.settings)

    def execute(self, requests):
        arrays = [{n: pb_utils.get_input_tensor_by_name(r, n).as_numpy()
                   for n in backend.QA_INPUTS} for r in requests]
        try:
            outcomes = backend.run_qa(self.engine, arrays, self.settings.limits)
        except Exception as err:  # noqa: BLE001 - a bug: one line to clients, traceback to the log
            pb_utils.Logger.log_error(traceback.format_exc())
            return [error_response(f"internal error: {type(err).__name__}", "INTERNAL")
                    for _ in requests]
        return [error_response(o.error, "INVALID_ARG") if o.error is not None else
                pb_utils.InferenceResponse([pb_utils.Tensor(n, a) for n, a in o.outputs.items()])
                for o in outcomes]
