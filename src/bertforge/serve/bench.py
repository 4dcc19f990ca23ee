"""`bertforge serve-bench`: the reference's 1/4/8-client load test of a served `bert` model.

Each client is a thread with its own tritonclient connection (gRPC or HTTP) sending
--requests requests of --batch-size windows: SQuAD windows of --data (the reference sends
its validation set) or synthetic ones (random ids, random real lengths from S/4 to S, padded
to S). `sync` waits for each reply; `async` keeps 4 requests in flight per client with
async_infer. Every reply is checked against the model run in this process on the same rows
(allclose, default rtol = atol = 1e-4: the server batches rows from several clients together,
and a row's fp32 logits move by ~1e-6 with the batch's shape, which the reference's rtol 1e-5
with no atol would flag on near-zero logits). A wrong or failed reply is counted, never
dropped, and makes the command exit 1.

Printed per setting, in the reference's words so the benchmarks.yml regexes read it:
`clients: 8 mode: sync protocol: grpc throughput: X samples/sec latency: p50 A ms p90 B ms
p99 C ms errors: 0 mismatches: 0`. Threads suffice as clients: tritonclient releases the GIL
while waiting on the socket. Measured here (2 cores shared with the server): 8 clients x
1,000 gRPC requests to the tiny test model, 0 errors, 0 mismatches; throughput with and
without dynamic batching: benchmarks/bench_serve.py, docs/benchmarks.md.

Configuration: BenchConfig (bertforge.config.serve): target (url, protocol, model), load
(clients, mode, requests, windows) and reference (checkpoint, tolerances) sections.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bertforge.config.serve import BenchConfig, BenchTargetSection
from bertforge.serve.export import INPUTS, OUTPUTS

IN_FLIGHT = 4  # async mode: outstanding requests per client


@dataclass
class BenchResult:
    clients: int
    samples: int
    seconds: float
    latencies_ms: list[float]
    errors: int = 0
    mismatches: int = 0
    first_error: str = ""

    def line(self, mode: str, protocol: str) -> str:
        p50, p90, p99 = (np.percentile(self.latencies_ms, q) if self.latencies_ms else float("nan")
                         for q in (50, 90, 99))
        return (f"clients: {self.clients} mode: {mode} protocol: {protocol} throughput: "
                f"{self.samples / self.seconds:.1f} samples/sec latency: p50 {p50:.2f} ms "
                f"p90 {p90:.2f} ms p99 {p99:.2f} ms errors: {self.errors} "
                f"mismatches: {self.mismatches}")


def synthetic_rows(n: int, sequence_length: int, vocab_size: int, seed: int = 0
                   ) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(1000, vocab_size, (n, sequence_length), dtype=np.int32)
    mask = np.zeros_like(ids)
    types = np.zeros_like(ids)
    for row, length in enumerate(rng.integers(sequence_length // 4, sequence_length + 1, n)):
        mask[row, :length] = 1
        types[row, length // 3:length] = 1
        ids[row, length:] = 0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


def squad_rows(path: Path, tokenizer, sequence_length: int, limit: int) -> dict[str, np.ndarray]:
    from bertforge.config.serve import WindowSection
    from bertforge.squad.data import read_squad
    from bertforge.squad.features import build_windows, pad_windows
    dataset = read_squad(path, is_training=False, squad_v2=False)
    # The reference's query length and stride where they fit this length, else shrunk to fit.
    query = min(64, sequence_length // 4)
    spec = WindowSection(sequence_length=sequence_length, max_query_length=query,
                         doc_stride=min(128, sequence_length - query - 4))
    windows = build_windows(dataset.examples[:limit], tokenizer, spec, is_training=False)
    if not windows:
        raise ValueError(f"--data {path}: no questions to send")
    padded = pad_windows(windows[:limit], pad_to=sequence_length)
    return {k: padded[k].astype(np.int32) for k in INPUTS}


def _client_module(protocol: str):
    if protocol == "grpc":
        import tritonclient.grpc as module
    else:  # "http": the only other choice BenchTargetSection allows
        import tritonclient.http as module
    return module


def _inputs(module, rows: dict[str, np.ndarray]):
    out = []
    for name in INPUTS:
        t = module.InferInput(name, list(rows[name].shape), "INT32")
        t.set_data_from_numpy(rows[name])
        out.append(t)
    return out


def run_setting(cfg: BenchConfig, url: str, num_clients: int, payloads, expected) -> BenchResult:
    """One (clients, mode, protocol) setting; payloads[k] rows, expected[k] (start, end)."""
    target, load, reference = cfg.target, cfg.load, cfg.reference
    module = _client_module(target.protocol)
    lock = threading.Lock()
    result = BenchResult(num_clients, 0, 0.0, [])

    def check(k: int, reply, latency_ms: float, error: Exception | None) -> None:
        with lock:
            if error is not None:
                result.errors += 1
                result.first_error = result.first_error or str(error)[:300]
                return
            result.latencies_ms.append(latency_ms)
            result.samples += len(payloads[k]["input_ids"])
            for name, want in zip(OUTPUTS, expected[k]):
                got = reply.as_numpy(name)
                if got is None or not np.allclose(got, want, rtol=reference.rtol,
                                                  atol=reference.atol):
                    result.mismatches += 1
                    break

    def client(index: int) -> None:
        kwargs = {"concurrency": IN_FLIGHT} if target.protocol == "http" else {}
        conn = module.InferenceServerClient(url, **kwargs)
        try:
            order = [(index * 7919 + i) % len(payloads) for i in range(load.requests)]
            if load.mode == "sync":
                for k in order:
                    t0 = time.perf_counter()
                    try:
                        reply, err = conn.infer(target.model, _inputs(module, payloads[k])), None
                    except Exception as e:  # noqa: BLE001 - counted and reported, not hidden
                        reply, err = None, e
                    check(k, reply, (time.perf_counter() - t0) * 1e3, err)
            else:
                _run_async(conn, module, target, order, payloads, check)
        finally:
            conn.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(num_clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    result.seconds = time.perf_counter() - t0
    return result


def _run_async(conn, module, target: BenchTargetSection, order, payloads, check) -> None:
    """Keep IN_FLIGHT requests outstanding on one connection."""
    if target.protocol == "grpc":
        slots = threading.Semaphore(IN_FLIGHT)
        for k in order:
            slots.acquire()
            t0 = time.perf_counter()

            # tritonclient calls callback(result=..., error=...): the names matter.
            def done(result, error, k=k, t0=t0):
                try:
                    check(k, result, (time.perf_counter() - t0) * 1e3, error)
                finally:  # an exception here is swallowed by grpc: never leak the slot
                    slots.release()
            conn.async_infer(target.model, _inputs(module, payloads[k]), callback=done)
        for _ in range(IN_FLIGHT):  # wait for the last callbacks
            slots.acquire()
        return
    pending: list = []
    for k in order:
        pending.append((k, time.perf_counter(),
                        conn.async_infer(target.model, _inputs(module, payloads[k]))))
        if len(pending) >= IN_FLIGHT:
            _finish_http(pending.pop(0), check)
    while pending:
        _finish_http(pending.pop(0), check)


def _finish_http(item, check) -> None:
    k, t0, request = item
    try:
        reply, err = request.get_result(), None
    except Exception as e:  # noqa: BLE001 - counted and reported
        reply, err = None, e
    check(k, reply, (time.perf_counter() - t0) * 1e3, err)


def run_bench(cfg: BenchConfig) -> int:
    """All settings of `cfg`; prints one line each; 0 when every reply was right."""
    from bertforge.serve.qa import load_qa_checkpoint
    target, load = cfg.target, cfg.load
    model, tokenizer = load_qa_checkpoint(cfg.reference.checkpoint_input_dir)
    n = load.pool_size * load.batch_size
    rows = (squad_rows(Path(load.data), tokenizer, load.sequence_length, n)
            if load.data is not None
            else synthetic_rows(n, load.sequence_length, model.config.vocab_size))
    n = len(rows["input_ids"])
    payloads = [{k: v[lo:lo + load.batch_size] for k, v in rows.items()}
                for lo in range(0, n, load.batch_size)]
    expected = reference_logits(model, payloads)
    failed = False
    for num_clients in load.clients:
        result = run_setting(cfg, target.address(), num_clients, payloads, expected)
        print(result.line(load.mode, target.protocol), flush=True)
        if result.errors or result.mismatches:
            failed = True
            if result.first_error:
                print(f"serve-bench: first error: {result.first_error}", flush=True)
    return 1 if failed else 0


def reference_logits(model, payloads) -> list[tuple[np.ndarray, np.ndarray]]:
    """(start, end) of each payload from `model` run in this process on the padded rows (the
    engine's reference path, not the padding-free one the server takes)."""
    from bertforge.config.serve import WindowSection
    from bertforge.serve.qa import QAEngine
    engine = QAEngine(model, None, WindowSection())
    return [engine.padded_logits(*(p[k] for k in INPUTS)) for p in payloads]
