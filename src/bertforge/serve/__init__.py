"""Serving the QA model: Triton Inference Server via PyTriton (server.py), the in-process engine
both served models share with tests and the load test (qa.py), ONNX / Triton-repository export
(export.py) and the multi-client load test (bench.py). Optional extra: pip install
'bertforge[serve]' (nvidia-pytriton, tritonclient, onnx, onnxruntime)."""
