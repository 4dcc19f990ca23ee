"""Run the tritonserver binary that NVIDIA PyTriton bundles, directly, with its python backend.

PyTriton's wheel (PyPI, 55 MB) holds a real tritonserver 2.51, libtritonserver and the python
backend with a stub per Python version: the same server as the 10+ GB container, minus the
C++ framework backends. We use those files and not PyTriton's proxy, which answers a failed
batched execution with one error for every request of the batch (pytriton/proxy/model.py,
BatchResponsesHandler) and adds a hop (stub -> PyTriton process over zmq, ~5 ms a request).
Here a model's `model.py` runs inside the stub and answers each request on its own.

What the stub needs from its environment (seen on this machine): it links libpython, so
LD_LIBRARY_PATH must start with the running interpreter's LIBDIR (else it may pick another
installed Python); it finds this environment's packages (torch, bertforge) through the
`python` first on PATH, so PATH starts with this interpreter's bin directory; PYTHONPATH is
not passed on. It also needs numpy<2 (with numpy 2 outputs arrived empty).

`TritonProcess` starts tritonserver in its own session (a Ctrl-C in the terminal reaches
`bertforge serve` only, which then stops the server in order), dying with its parent
(processes.die_with_parent), output to a log file, and watches it: `wait_ready` returns once
the server answers /v2/health/ready (with the default model control mode "none" Triton loads
every model of the repository *before* it opens its endpoints, and strict readiness means
ready only with all of them loaded) and raises with Triton's own error line if it exits first.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from pathlib import Path

from bertforge.processes import die_with_parent


def distribution() -> Path:
    """The tritonserver folder of the installed PyTriton wheel."""
    try:
        import pytriton
    except ImportError:
        raise ValueError("serving needs the tritonserver that PyTriton bundles: "
                         "pip install 'bertforge[serve]'") from None
    return Path(pytriton.__file__).parent / "tritonserver"


def python_backend(backends: Path) -> Path:
    """Create `backends`/python (PyTriton's python backend with the stub of the running Python)
    and return `backends`. Copies (3 MB), not links: tritonserver refuses a backend library
    whose real path leaves the backend directory."""
    dist = distribution()
    python = backends / "python"
    shutil.copytree(dist / "backends" / "python", python,
                    ignore=shutil.ignore_patterns("__pycache__"))
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = dist / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.exists():
        raise ValueError(f"PyTriton ships no python backend stub for Python {version}")
    shutil.copy(stub, python)
    return backends


def environment() -> dict[str, str]:
    """os.environ plus what the stub needs (module docstring)."""
    from pytriton.utils.distribution import get_libs_path
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = ":".join(str(p) for p in (
        sysconfig.get_config_var("LIBDIR"), get_libs_path(), env.get("LD_LIBRARY_PATH")) if p)
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    return env


# Triton's APIs that change or reach outside the server: load/unload models, the log file and
# level (POST /v2/logging can point the log at any path the server may write), trace
# settings, and shared-memory registration (maps a named /dev/shm region or CUDA memory of the
# host). Restricted to requests carrying a header whose value is a fresh random token that is
# never printed: no client, over HTTP or gRPC, can use them. Health, metadata, model config,
# statistics and inference stay open.
ADMIN_APIS = "model-repository,logging,trace,shared-memory"
ADMIN_HEADER = "bertforge-admin"

# Error lines a CPU machine always prints (no GPU driver): never the reason for an exit.
NOISE = ("CUDA", "NVML", "cuda", "CudaDriver")


def _error_line(log: str) -> str:
    """tritonserver's own reason for exiting, on one line: a model's load failure (its first
    line, not the stub's traceback) or else the last error line, without the log prefix."""
    lines = log.splitlines()
    # Lines read 'E1105 10:00:00.123 123 file.cc:45] "message"'; CUDA/NVML noise on a CPU box.
    errors = [ln.split("] ", 1)[-1].strip().strip('"') for ln in lines
              if ln[:1] == "E" and "] " in ln and not any(w in ln for w in NOISE)]
    errors += [ln.strip() for ln in lines if ln.startswith("error:")]
    loads = [e for e in errors if e.startswith("failed to load '")]
    reason = (loads or errors or [ln for ln in lines if ln.strip()] or ["(empty log)"])[-1]
    return reason.split("\\n")[0].split("\n")[0]


class TritonProcess:
    """A tritonserver on `repository`, started by `start`, watched and stopped from here."""

    def __init__(self, repository: Path, backends: Path, log: Path, *, host: str,
                 http_port: int, grpc_port: int, metrics_port: int, exit_timeout: int,
                 http_host: str | None = None):
        """Binds `host`, the HTTP endpoint `http_host` if given (`bertforge serve`: 127.0.0.1,
        behind its HTTP front)."""
        self.log = log
        http_host = http_host or host
        self.http = f"http://{'127.0.0.1' if http_host == '0.0.0.0' else http_host}:{http_port}"
        self.command = [
            str(distribution() / "bin" / "tritonserver"), "--model-repository", str(repository),
            "--backend-directory", str(backends), "--http-address", http_host,
            "--http-port", str(http_port), "--grpc-address", host, "--grpc-port", str(grpc_port),
            "--metrics-address", host, "--metrics-port", str(metrics_port),
            "--strict-readiness", "true", "--exit-on-error", "true",
            "--http-restricted-api", f"{ADMIN_APIS}:{ADMIN_HEADER}={secrets.token_hex(16)}",
            "--grpc-restricted-protocol", f"{ADMIN_APIS}:{ADMIN_HEADER}={secrets.token_hex(16)}",
            "--exit-timeout-secs", str(exit_timeout)]
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        parent = os.getpid()
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(self.command, stdout=out, stderr=subprocess.STDOUT,
                                         env=environment(), start_new_session=True,
                                         preexec_fn=lambda: die_with_parent(parent))

    def exit_reason(self) -> str:
        """Why tritonserver exited: the signal that killed it, or its own last error."""
        code = self.proc.poll()
        if code is not None and code < 0:
            return f"killed by {signal.Signals(-code).name}"
        return _error_line(self.log.read_text(errors="replace"))

    def _get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.http + path, timeout=5) as reply:
                return reply.status, reply.read()
        except urllib.error.HTTPError as err:
            return err.code, b""

    def wait_ready(self, models: tuple[str, ...], timeout: float = 600) -> None:
        """Return once the server and every one of `models` are ready; raise ValueError with
        tritonserver's own reason if it exits first, or after `timeout` s."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ValueError(f"tritonserver exited during start-up: {self.exit_reason()}")
            try:
                if self._get("/v2/health/ready")[0] == 200 and all(
                        self._get(f"/v2/models/{m}/ready")[0] == 200 for m in models):
                    return
            except OSError:  # not listening yet
                pass
            time.sleep(0.2)
        self.stop()
        raise ValueError(f"tritonserver was not ready after {timeout:.0f} s: {self.exit_reason()}")

    def statistics(self) -> dict[str, tuple[int, int]]:
        """{model: (inference rows, executions)} from Triton's statistics extension."""
        try:
            status, body = self._get("/v2/models/stats")
        except OSError:
            return {}
        if status != 200:
            return {}
        return {m["name"]: (int(m.get("inference_count", 0)), int(m.get("execution_count", 0)))
                for m in json.loads(body).get("model_stats", [])}

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM (Triton waits --exit-timeout-secs for in-flight requests), then SIGKILL."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()
