"""Test and benchmark support (not part of the package): run a Triton model repository, as
`bertforge export --format triton-repo` writes it, on the tritonserver that PyTriton bundles:
the stock Triton + ONNX Runtime stack without Docker.

The stock container serves the repository with Triton's C++ onnxruntime backend, which is not
on PyPI. PyTriton's tritonserver (2.51) has only the python backend, and Triton loads
Python-based backends: `backend_directory` lays out backends/python (PyTriton's, with the stub
of the running Python, as `bertforge serve` does) beside backends/onnxruntime holding
onnxruntime_backend/model.py, a
stand-in that runs model.onnx with onnxruntime. Triton itself parses and validates the
repository's config.pbtxt (platform "onnxruntime_onnx" picks the stand-in), runs the dynamic
batcher and answers HTTP/gRPC; only the backend differs from the container. Used by
tests/test_serve_triton_repo.py (the repository loads unchanged and answers what PyTorch
answers) and benchmarks/bench_serve.py --onnxruntime (Triton + ONNX Runtime beside
`bertforge serve`). Needs PyTriton (numpy<2) and onnxruntime in this environment.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

from bertforge.serve.tritonserver import distribution, environment, python_backend

STAND_IN = Path(__file__).with_name("onnxruntime_backend") / "model.py"


def backend_directory(path: Path) -> Path:
    """Create `path` with backends/python (as `bertforge serve` lays it out,
    bertforge.serve.tritonserver) and backends/onnxruntime holding the stand-in; return it."""
    python_backend(path)
    (path / "onnxruntime").mkdir()
    shutil.copy(STAND_IN, path / "onnxruntime" / "model.py")
    return path


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def start_tritonserver(repository: Path, backends: Path, log: Path
                       ) -> tuple[subprocess.Popen, str, str]:
    """tritonserver on free loopback ports, output to `log`; (process, gRPC url, HTTP url)."""
    http, grpc, metrics = free_ports(3)
    # The stub's environment (LIBDIR, PATH) as `bertforge serve` sets it up.
    env = environment()
    binary = distribution() / "bin" / "tritonserver"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [str(binary), "--model-repository", str(repository),
             "--backend-directory", str(backends), "--http-address", "127.0.0.1",
             "--http-port", str(http), "--grpc-address", "127.0.0.1", "--grpc-port", str(grpc),
             "--metrics-port", str(metrics), "--allow-metrics", "false",
             "--exit-timeout-secs", "5"],
            stdout=out, stderr=subprocess.STDOUT, env=env)
    return proc, f"127.0.0.1:{grpc}", f"127.0.0.1:{http}"


def wait_ready(proc: subprocess.Popen, http_url: str, log: Path, model: str = "bert",
               timeout: float = 90) -> bool:
    """True once `model` is ready; False if tritonserver exits first (a refused repository);
    kills it and raises with the log's tail if neither happens within `timeout` s."""
    import tritonclient.http as httpclient
    client = httpclient.InferenceServerClient(http_url)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                return False
            try:
                if client.is_model_ready(model):
                    return True
            except Exception:  # noqa: BLE001 - not listening yet
                pass
            time.sleep(0.3)
    finally:
        client.close()
    proc.kill()
    raise RuntimeError(f"tritonserver did not become ready in {timeout:.0f} s:\n"
                       f"{log.read_text()[-3000:]}")
