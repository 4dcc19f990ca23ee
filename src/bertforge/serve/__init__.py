"""Serving the QA model: Triton Inference Server, the binary PyTriton bundles run directly with
python-backend models (server.py, tritonserver.py, backend.py, triton_models/), the in-process
engine both served models share with tests and the load test (qa.py), ONNX / Triton-repository
export (export.py) and the multi-client load test (bench.py). Optional extra: pip install
'bertforge[serve]' (nvidia-pytriton for its tritonserver, tritonclient, onnx, onnxruntime)."""
