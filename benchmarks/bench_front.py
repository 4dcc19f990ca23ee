"""What `bertforge serve`'s HTTP front costs: the same requests to tritonserver's own HTTP
endpoint (direct) and through the front (serve/front.py), in one run, on one server.

Starts `bertforge serve` on free loopback ports on a random-init QA BERT of --shape (tiny:
hidden 64, 2 layers, the serving tests' model; mini: 256, 4) at S = --sequence-length, reads
tritonserver's internal HTTP port from serve's ready line, and sends `bert` requests of
--rows rows as tritonclient.http builds them (the binary tensor extension, its default;
--json: tensors as JSON "data", which the front's checks parse), sent with http.client
(--client tritonclient: with tritonclient.http itself) from 1 and from 8 clients (a thread
and a keep-alive connection each, sync requests). The server runs serve's default preset
(2 model instances: with 1, 4-8% of requests stalled ~500 ms, direct and through the front
alike, which drowned the comparison). Direct and front take turns, --rounds rounds each,
so drift on a shared machine hits both alike. The tiny model at S 64 makes a request cost
~1 ms, so the front's share shows; on a real model the same absolute cost is a smaller
part. Clients, front and tritonserver share the CPU.
Then check_request alone on the bodies the front sees most (in-process, no server).

    python benchmarks/bench_front.py [--shape tiny] [--sequence-length 64] [--rows 1]
                                     [--requests 300] [--rounds 3] [--json]
                                     [--client raw|tritonclient]
Prints `front: <direct|front> clients: N throughput: X requests/sec latency: p50 Y ms p99 Z
ms` per setting (all rounds together), `front added p50 at 1 client: +X.XXX ms` and `front
throughput at 8 clients: X.XXx direct` (medians over rounds), and `check_request <body>:
X us`. Needs PyTriton with numpy<2 (see bertforge/serve/server.py).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from bench_serve import make_model, stop_server
from triton_stack import free_ports


def start_serve(model: Path, args, log: Path) -> tuple[subprocess.Popen, str, str]:
    """`bertforge serve` once ready: (process, front url, tritonserver's own HTTP url)."""
    http, grpc, metrics = free_ports(3)
    cmd = [sys.executable, "-m", "bertforge", "serve", "--checkpoint-input-dir", str(model),
           "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics),
           "--sequence-length", str(args.sequence_length), "--max-query-length", "16",
           "--doc-stride", "16"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while not (found := re.search(r"behind it on (127\.0\.0\.1:\d+)", log.read_text())):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"server failed to start:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)
    return proc, f"127.0.0.1:{http}", found.group(1)


def request_bytes(rows: dict, binary: bool) -> tuple[bytes, dict]:
    """The body and headers tritonclient.http sends for `rows` (its own request builder)."""
    import tritonclient.http as httpclient
    inputs = []
    for name, array in rows.items():
        tensor = httpclient.InferInput(name, list(array.shape), "INT32")
        tensor.set_data_from_numpy(array, binary_data=binary)
        inputs.append(tensor)
    body, json_size = httpclient.InferenceServerClient.generate_request_body(inputs)
    headers = {"Content-Type": "application/octet-stream" if json_size else "application/json"}
    if json_size is not None:
        headers["Inference-Header-Content-Length"] = str(json_size)
    return body, headers


def run_clients(url: str, clients: int, requests: int, rows: dict, binary: bool, kind: str
                ) -> tuple[float, list[float]]:
    """(requests/s, latencies in s) of `clients` threads sending `requests` each, with
    tritonclient.http or (`kind` raw) http.client sending the bytes tritonclient builds: the
    lighter client leaves more of the 2 cores to the server, so the front's share shows."""
    import http.client

    import tritonclient.http as httpclient
    latencies: list[float] = []
    errors: list[Exception] = []
    barrier = threading.Barrier(clients + 1)
    body, headers = request_bytes(rows, binary)

    def client():
        if kind == "raw":
            conn = http.client.HTTPConnection(*url.split(":"))

            def infer():
                conn.request("POST", "/v2/models/bert/infer", body=body, headers=headers)
                reply = conn.getresponse()
                reply.read()
                if reply.status != 200:
                    raise RuntimeError(f"HTTP {reply.status}")
        else:
            own = httpclient.InferenceServerClient(url)
            inputs = []
            for name, array in rows.items():
                tensor = httpclient.InferInput(name, list(array.shape), "INT32")
                tensor.set_data_from_numpy(array, binary_data=binary)
                inputs.append(tensor)

            def infer():
                own.infer("bert", inputs)
        infer()  # warm the connection
        barrier.wait()
        mine = []
        try:
            for _ in range(requests):
                began = time.perf_counter()
                infer()
                mine.append(time.perf_counter() - began)
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)
        latencies.extend(mine)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    began = time.perf_counter()
    for t in threads:
        t.join()
    took = time.perf_counter() - began
    if errors:
        raise SystemExit(f"a request failed: {errors[0]}")
    return clients * requests / took, latencies


def time_checks(sequence_length: int) -> None:
    """check_request alone, on a batch-1 row, a [32, S] batch and a 100k-character context."""
    from bertforge.serve.front import check_request
    rng = np.random.default_rng(0)
    bodies = {}
    for batch in (1, 32):
        ids = rng.integers(0, 30522, size=(batch, sequence_length)).tolist()
        bodies[f"JSON bert [{batch}, {sequence_length}] x 3"] = json.dumps({"inputs": [
            {"name": n, "shape": [batch, sequence_length], "datatype": "INT32", "data": ids}
            for n in ("input_ids", "attention_mask", "token_type_ids")]}).encode()
    context = " ".join(rng.choice(["river", "city", "north", "king"], 20_000))[:100_000]
    bodies["JSON bert_qa 100k-char context"] = json.dumps({"inputs": [
        {"name": "question", "shape": [1, 1], "datatype": "BYTES", "data": ["Who?"]},
        {"name": "context", "shape": [1, 1], "datatype": "BYTES", "data": [context]}]}).encode()
    for label, body in bodies.items():
        repeats = 200
        began = time.perf_counter()
        for _ in range(repeats):
            check_request({}, body, 16 << 20)
        took = (time.perf_counter() - began) / repeats
        print(f"check_request {label} ({len(body):,} bytes): {took * 1e6:.0f} us", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="tiny", choices=["tiny", "mini", "base"])
    parser.add_argument("--sequence-length", type=int, default=64)
    parser.add_argument("--rows", type=int, default=1, help="rows per request")
    parser.add_argument("--requests", type=int, default=300, help="per client and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="tensors as JSON data")
    parser.add_argument("--client", default="raw", choices=["raw", "tritonclient"],
                        help="http.client sending tritonclient's bytes, or tritonclient.http")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    rows = {"input_ids": rng.integers(1000, 2000, (args.rows, args.sequence_length)),
            "attention_mask": np.ones((args.rows, args.sequence_length)),
            "token_type_ids": np.zeros((args.rows, args.sequence_length))}
    rows = {k: v.astype(np.int32) for k, v in rows.items()}
    with tempfile.TemporaryDirectory(prefix="bench-front-") as tmp:
        model = make_model(Path(tmp) / "model", args.shape)
        proc, front, direct = start_serve(model, args, Path(tmp) / "serve.log")
        try:
            urls = {"direct": direct, "front": front}
            results = {(w, c): [] for w in urls for c in (1, 8)}
            for _ in range(args.rounds):
                for clients in (1, 8):
                    for which, url in urls.items():
                        results[which, clients].append(run_clients(
                            url, clients, args.requests // clients * (1 if clients == 1 else 2),
                            rows, binary=not args.json, kind=args.client))
        finally:
            stop_server(proc)
    for (which, clients), runs in results.items():
        lat = np.array([x for _, lats in runs for x in lats]) * 1e3
        print(f"front: {which} clients: {clients} throughput: "
              f"{statistics.median(r for r, _ in runs):.1f} requests/sec latency: p50 "
              f"{np.percentile(lat, 50):.3f} ms p99 {np.percentile(lat, 99):.3f} ms", flush=True)
    added = [np.median(f[1]) - np.median(d[1]) for d, f in zip(results["direct", 1],
                                                               results["front", 1])]
    ratio = [f[0] / d[0] for d, f in zip(results["direct", 8], results["front", 8])]
    print(f"front added p50 at 1 client: {statistics.median(added) * 1e3:+.3f} ms (rounds: "
          f"{', '.join(f'{a * 1e3:+.3f}' for a in added)})")
    print(f"front throughput at 8 clients: {statistics.median(ratio):.2f}x direct (rounds: "
          f"{', '.join(f'{r:.2f}' for r in ratio)})")
    time_checks(args.sequence_length)


if __name__ == "__main__":
    main()
