"""The repository `bertforge export --format triton-repo` writes, loaded unchanged by a real
tritonserver and queried over gRPC: the check a stock Triton container would give, without
Docker.

The tritonserver binary is the one PyTriton bundles (2.51, python backend only). Its C++
onnxruntime backend is not on PyPI, so tests/assets/onnxruntime_backend/model.py stands in
for it as a Python-based backend named `onnxruntime`: Triton picks it for the repository's
`platform: "onnxruntime_onnx"`, parses and validates config.pbtxt itself (a broken config is
refused, which the second test checks), runs its dynamic batcher and sends each dynamic
batch to onnxruntime on the exported model.onnx. What this cannot check is the C++ backend
itself (its own config auto-completion and ONNX loading).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("pytriton")
grpcclient = pytest.importorskip("tritonclient.grpc")
httpclient = pytest.importorskip("tritonclient.http")

if int(np.__version__.split(".")[0]) >= 2:
    pytest.skip("PyTriton 0.7's python backend stub needs numpy<2", allow_module_level=True)

from bertforge.serve.export import INPUTS, OUTPUTS, export  # noqa: E402
from bertforge.serve.qa import QAEngine, load_qa_checkpoint  # noqa: E402
from bertforge.squad.features import WindowSpec  # noqa: E402
from bertforge.serve.bench import synthetic_rows  # noqa: E402
from conftest import alive, descendants, free_ports, tiny_qa_model  # noqa: E402

S = 32
STAND_IN = Path(__file__).parent / "assets" / "onnxruntime_backend" / "model.py"


def backend_directory(path: Path) -> Path:
    """backends/python from PyTriton's distribution (with the stub of this Python) and
    backends/onnxruntime holding the stand-in. Copies (3 MB), not links: tritonserver refuses
    a backend library whose real path leaves the backend directory."""
    import pytriton
    dist = Path(pytriton.__file__).parent / "tritonserver"
    python = path / "python"
    shutil.copytree(dist / "backends" / "python", python,
                    ignore=shutil.ignore_patterns("__pycache__"))
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    shutil.copy(dist / "python_backend_stubs" / version / "triton_python_backend_stub", python)
    (path / "onnxruntime").mkdir()
    shutil.copy(STAND_IN, path / "onnxruntime" / "model.py")
    return path


def start_tritonserver(repository: Path, backends: Path, log: Path):
    """tritonserver on free loopback ports; (process, grpc url, http url)."""
    import pytriton
    from pytriton.utils.distribution import get_libs_path
    http, grpc, metrics = free_ports(3)
    env = dict(os.environ)
    # The stub links libpython (this interpreter's LIBDIR) and finds this environment's
    # packages through `python` on PATH, as PyTriton arranges it.
    env["LD_LIBRARY_PATH"] = ":".join(str(p) for p in (
        sysconfig.get_config_var("LIBDIR"), get_libs_path(), env.get("LD_LIBRARY_PATH")) if p)
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    binary = Path(pytriton.__file__).parent / "tritonserver" / "bin" / "tritonserver"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [str(binary), "--model-repository", str(repository),
             "--backend-directory", str(backends), "--http-address", "127.0.0.1",
             "--http-port", str(http), "--grpc-address", "127.0.0.1", "--grpc-port", str(grpc),
             "--metrics-port", str(metrics), "--allow-metrics", "false", "--exit-timeout-secs", "5"],
            stdout=out, stderr=subprocess.STDOUT, env=env)
    return proc, f"127.0.0.1:{grpc}", f"127.0.0.1:{http}"


def wait_ready(proc, http_url: str, log: Path, timeout: float = 90) -> bool:
    """True once model `bert` is ready; False if tritonserver exits first."""
    client = httpclient.InferenceServerClient(http_url)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                return False
            try:
                if client.is_model_ready("bert"):
                    return True
            except Exception:  # noqa: BLE001 - not listening yet
                pass
            time.sleep(0.3)
    finally:
        client.close()
    proc.kill()
    raise RuntimeError(f"tritonserver did not become ready:\n{log.read_text()[-3000:]}")


def stop(proc) -> None:
    children = descendants(proc.pid)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    deadline = time.monotonic() + 10
    while any(alive(c) for c in children) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [c for c in children if alive(c)], "a backend stub outlived tritonserver"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("triton-repo")
    model_dir = tiny_qa_model(root / "model", seed=0)
    export(model_dir, root / "repo", fmt="triton-repo", sequence_length=S, max_batch_size=8,
           max_queue_delay_us=20_000)
    return model_dir, root / "repo", backend_directory(root / "backends")


def test_stock_tritonserver_serves_the_exported_repository(exported, tmp_path):
    model_dir, repository, backends = exported
    model, _ = load_qa_checkpoint(model_dir)
    engine = QAEngine(model, None, WindowSpec(sequence_length=S))
    rows = synthetic_rows(12, S, model.config.vocab_size, seed=3)
    # Six requests of 2 rows each in flight at once: the dynamic batcher (20 ms) merges some.
    payloads = [{k: v[i:i + 2] for k, v in rows.items()} for i in range(0, 12, 2)]
    log = tmp_path / "tritonserver.log"
    proc, grpc_url, http_url = start_tritonserver(repository, backends, log)
    try:
        assert wait_ready(proc, http_url, log), log.read_text()[-3000:]
        client = grpcclient.InferenceServerClient(grpc_url)
        replies: dict[int, object] = {}
        done = threading.Semaphore(0)

        def on_reply(result, error, k):
            replies[k] = error if error is not None else result
            done.release()

        for k, payload in enumerate(payloads):  # back to back, so the batcher can merge them
            inputs = []
            for name in INPUTS:
                tensor = grpcclient.InferInput(name, list(payload[name].shape), "INT32")
                tensor.set_data_from_numpy(payload[name])
                inputs.append(tensor)
            client.async_infer("bert", inputs,
                               callback=lambda result, error, k=k: on_reply(result, error, k))
        for _ in payloads:
            assert done.acquire(timeout=60), "a reply did not come back"
        assert sorted(replies) == list(range(len(payloads)))
        failed = [r for r in replies.values() if not hasattr(r, "as_numpy")]
        assert not failed, failed[0]
        for k, payload in enumerate(payloads):
            want = engine.padded_logits(*(payload[n] for n in INPUTS))
            for name, expected in zip(OUTPUTS, want):
                np.testing.assert_allclose(replies[k].as_numpy(name), expected, atol=1e-4)

        config = client.get_model_config("bert").config
        assert config.platform == "onnxruntime_onnx" and config.max_batch_size == 8
        assert config.dynamic_batching.max_queue_delay_microseconds == 20_000
        stats = client.get_inference_statistics("bert").model_stats[0]
        client.close()
        assert stats.inference_count == 12  # rows
        assert 1 <= stats.execution_count < len(payloads), "no two requests were batched"
    finally:
        stop(proc)


def test_tritonserver_refuses_a_broken_config(exported, tmp_path):
    _, repository, backends = exported
    broken = tmp_path / "repo"
    shutil.copytree(repository, broken)
    config = broken / "bert" / "config.pbtxt"
    config.write_text(config.read_text().replace("max_batch_size: 8", "max_batch_size: -8"))
    log = tmp_path / "tritonserver.log"
    proc, _, http_url = start_tritonserver(broken, backends, log)
    try:
        assert not wait_ready(proc, http_url, log)
        assert "'max_batch_size' must be non-negative" in log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
