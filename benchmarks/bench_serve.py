"""Serving throughput and latency: `bert` with and without dynamic batching, `bert_qa` end to end,
in one run on the same model and requests.

Starts `bertforge serve` three (five) times on free loopback ports, on a random-init QA BERT of
--shape (mini: hidden 256, 4 layers; tiny: 64, 2; base: 768, 12) at S = --sequence-length,
on --device (cpu, or cuda: benchmarks/gpu_check.py runs it so where PyTriton is installed):
  on          dynamic batching (max batch 32, --max-queue-delay-us), padding-free engine;
  off         one row per execution, the same padding-free engine (a row trimmed to its length);
  off-padded  one row per execution on the padded row as sent (--no-padding-free: stock);
  on-torch, off-torch  (--torch-runtime) on and off with --runtime torch, the PyTorch engine
              (on and off take the default runtime: ONNX Runtime on CPU in fp32);
and with --onnxruntime the stock Triton + ONNX Runtime stack on the exported repository
(benchmarks/triton_stack.py), ort-on with dynamic batching and ort-off with max batch 1;
and against each runs the serve-bench client (gRPC, --mode sync|async, 1/4/8 clients, every
reply checked against the model run in process on the padded rows). The servers are up
together and take turns: for each client count, --rounds rounds of on, off, off-padded (and
ort-*), so drift on a shared machine hits all of them alike; the ratios are per round and
their median is reported (an idle server takes 0.4% of a core). Then `bert_qa` questions/s
with 4 clients on the first server (each question a SQuAD-sized context of ~150 words,
answers checked against the in-process engine). Rows are synthetic: real lengths uniform in
S/4..S, padded to S. Each server prints its mean batch when it stops. Every server, the
stock stack's too, gets --model-instances and --max-queue-delay-us (default: serve's default
preset, 2 and 0).
Floor: with 8 clients dynamic batching >= 2x the throughput of batch-1 serving;
`on` vs `off` is that ratio with everything else equal, `on` vs `off-padded` adds what
the padding-free engine gives over stock batch-1 serving. Results: docs/benchmarks.md.

    python benchmarks/bench_serve.py [--shape mini] [--sequence-length 128] [--requests 100]
                                     [--rounds 3] [--mode sync|async] [--precision fp32|bf16]
                                     [--onnxruntime] [--torch-runtime] [--device cpu|cuda]
                                     [--model-instances 2] [--max-queue-delay-us 0]
Prints `bert batching: on|off|off-padded clients: N ... throughput: X samples/sec latency:
p50 .. p99 Y ms` (all rounds together), the per-round ratios, `bert_qa throughput: X
questions/sec`, and `dynamic batching speedup at 8 clients: X.XXx` (median of the rounds).
Needs PyTriton with numpy<2 (see bertforge/serve/server.py).
"""

from __future__ import annotations

import argparse
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

SHAPES = {"tiny": (64, 2, 2), "mini": (256, 4, 4), "base": (768, 12, 12)}
WORDS = ("the river city north king army built church first century people town war "
         "empire bridge road castle south west east island harbour market council").split()


def make_model(path: Path, shape: str) -> Path:
    import torch
    import transformers

    from bertforge.data.vocab import save_tokenizer_files
    hidden, layers, heads = SHAPES[shape]
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=hidden, num_hidden_layers=layers,
                                     num_attention_heads=heads, intermediate_size=4 * hidden)
    transformers.BertForQuestionAnswering(config).save_pretrained(path)
    save_tokenizer_files(path)
    return path


def start_server(model: Path, args, batching: bool, log: Path, padding_free: bool = True,
                 runtime: str = "auto"):
    import tritonclient.http as httpclient

    from triton_stack import free_ports
    http, grpc, metrics = free_ports(3)
    cmd = [sys.executable, "-m", "bertforge", "serve", "--checkpoint-input-dir", str(model),
           "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics),
           "--sequence-length", str(args.sequence_length), "--max-query-length", "32",
           "--doc-stride", "32", "--max-queue-delay-us", str(args.max_queue_delay_us),
           "--precision", args.precision, "--device", args.device, "--runtime", runtime,
           "--model-instances", str(args.model_instances)]
    if not batching:
        cmd.append("--no-dynamic-batching")
    if not padding_free:
        cmd.append("--no-padding-free")
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    client = httpclient.InferenceServerClient(f"127.0.0.1:{http}")
    deadline = time.monotonic() + 120
    while True:
        try:
            if client.is_server_ready() and client.is_model_ready("bert_qa"):
                break
        except Exception:  # noqa: BLE001 - not listening yet
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"server failed to start:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)
    client.close()
    return proc, f"127.0.0.1:{grpc}"


def stop_server(proc) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)


def start_onnxruntime(model: Path, args, tmp: Path) -> dict:
    """Triton + ONNX Runtime on the exported repository (triton_stack.py: PyTriton's
    tritonserver, a Python-based stand-in for the C++ onnxruntime backend): `ort-on` with
    dynamic batching (max batch 32), `ort-off` with max batch 1. fp32, padded rows."""
    from bertforge.serve.export import export
    from triton_stack import backend_directory, start_tritonserver, wait_ready
    backends = backend_directory(tmp / "backends")
    servers = {}
    for label, max_batch in (("ort-on", 32), ("ort-off", 1)):
        export(model, tmp / label, fmt="triton-repo", sequence_length=args.sequence_length,
               max_batch_size=max_batch, max_queue_delay_us=args.max_queue_delay_us,
               model_instances=args.model_instances)
        log = tmp / f"serve-{label}.log"
        proc, grpc, http = start_tritonserver(tmp / label, backends, log)
        servers[label] = (proc, grpc)
        if not wait_ready(proc, http, log):
            raise SystemExit(f"tritonserver refused {tmp / label}:\n{log.read_text()[-3000:]}")
    return servers


def mean_batch(url: str) -> str:
    """Rows and executions of model `bert` from Triton's statistics (tritonserver has no
    bertforge stop line)."""
    import tritonclient.grpc as grpcclient
    client = grpcclient.InferenceServerClient(url)
    stats = client.get_inference_statistics("bert").model_stats[0]
    client.close()
    return (f"bert {stats.inference_count:,} rows in {stats.execution_count:,} executions "
            f"(mean batch {stats.inference_count / max(1, stats.execution_count):.2f})")


def bench_bert(model, urls: dict[str, str], args) -> dict[str, dict[int, list[float]]]:
    """samples/s per server label, client count and round; servers take turns each round."""
    from bertforge.serve.bench import (BenchConfig, BenchResult, reference_logits, run_setting,
                                       synthetic_rows)
    from bertforge.serve.qa import load_qa_checkpoint
    # bf16 logits move by ~1e-2 with the batch a row lands in: compare at that tolerance.
    tolerance = 1e-4 if args.precision == "fp32" else 5e-2
    qa_model, _ = load_qa_checkpoint(model, device=args.device, precision=args.precision)
    pool = 64
    rows = synthetic_rows(pool, args.sequence_length, qa_model.config.vocab_size)
    payloads = [{k: v[i:i + 1] for k, v in rows.items()} for i in range(pool)]
    expected = reference_logits(qa_model, payloads)
    rates: dict[str, dict[int, list[float]]] = {label: {} for label in urls}
    for clients in (1, 4, 8):
        merged = {label: BenchResult(clients, 0, 0.0, []) for label in urls}
        for _ in range(args.rounds):
            for label, url in urls.items():
                cfg = BenchConfig(checkpoint_input_dir=model, url=url, requests=args.requests,
                                  sequence_length=args.sequence_length, mode=args.mode,
                                  rtol=tolerance, atol=tolerance, pool_size=pool)
                result = run_setting(cfg, url, clients, payloads, expected)
                if result.errors or result.mismatches:
                    raise SystemExit(f"bad replies from {label}: {result.first_error}")
                rates[label].setdefault(clients, []).append(result.samples / result.seconds)
                total = merged[label]
                total.samples += result.samples
                total.seconds += result.seconds
                total.latencies_ms += result.latencies_ms
        for label, total in merged.items():
            print(f"bert batching: {label} {total.line(args.mode, 'grpc')}", flush=True)
        for on, off in (("on", "off"), ("ort-on", "ort-off"), ("on", "ort-on"),
                        ("off", "ort-off"), ("on", "on-torch"), ("off", "off-torch")):
            if on in rates and off in rates:
                ratios = [a / b for a, b in zip(rates[on][clients], rates[off][clients])]
                print(f"clients: {clients} {on}/{off} per round: "
                      + " ".join(f"{r:.2f}x" for r in ratios), flush=True)
    return rates


def bench_qa(model, url, args) -> None:
    import tritonclient.grpc as grpcclient

    from bertforge.serve.server import ServeConfig, build_engine
    engine = build_engine(ServeConfig(checkpoint_input_dir=model, precision=args.precision,
                                      device=args.device,
                                      sequence_length=args.sequence_length,
                                      max_query_length=32, doc_stride=32))
    rng = np.random.default_rng(0)
    pool = []
    for _ in range(16):
        context = " ".join(rng.choice(WORDS, 150)).capitalize() + "."
        question = "what " + " ".join(rng.choice(WORDS, 8)) + "?"
        pool.append((question, context, engine.answer_many([question], [context])[0]))
    done, wrong, lock = [0], [0], threading.Lock()

    def client(index: int) -> None:
        conn = grpcclient.InferenceServerClient(url)
        for i in range(args.qa_requests):
            q, c, want = pool[(index * 5 + i) % len(pool)]
            inputs = []
            for name, text in (("question", q), ("context", c)):
                t = grpcclient.InferInput(name, [1, 1], "BYTES")
                t.set_data_from_numpy(np.array([[text.encode()]], dtype=object))
                inputs.append(t)
            reply = conn.infer("bert_qa", inputs)
            ok = (reply.as_numpy("answer")[0, 0].decode() == want.text
                  and int(reply.as_numpy("start")[0, 0]) == want.start)
            with lock:
                done[0] += 1
                wrong[0] += not ok
        conn.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    print(f"bert_qa clients: 4 throughput: {done[0] / seconds:.1f} questions/sec "
          f"wrong: {wrong[0]}", flush=True)
    if wrong[0]:
        raise SystemExit("bert_qa answers differ from the in-process engine")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="mini")
    p.add_argument("--sequence-length", type=int, default=128)
    p.add_argument("--requests", type=int, default=100,
                   help="per client, setting and round")
    p.add_argument("--rounds", type=int, default=3,
                   help="turns of the servers per client count (ratios: median)")
    p.add_argument("--qa-requests", type=int, default=25, help="questions per client")
    p.add_argument("--max-queue-delay-us", type=int, default=0,
                   help="every server's (default: serve's default preset, 0)")
    p.add_argument("--model-instances", type=int, default=2,
                   help="every server's model instances, stock stack's too (default: serve's "
                        "default preset, 2)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="where the servers (and the in-process reference) run the model")
    p.add_argument("--mode", choices=["sync", "async"], default="sync",
                   help="clients wait for each reply (sync) or keep 4 requests in flight")
    p.add_argument("--torch-runtime", action="store_true",
                   help="also `on-torch` / `off-torch`: the servers on and off with --runtime "
                        "torch (the PyTorch padding-free engine; on and off take the default "
                        "runtime, ONNX Runtime on CPU in fp32)")
    p.add_argument("--onnxruntime", action="store_true",
                   help="also the exported repository on Triton + ONNX Runtime (fp32 only)")
    args = p.parse_args()
    if args.onnxruntime and args.precision != "fp32":
        p.error("--onnxruntime: the ONNX export is fp32; drop --precision or --onnxruntime")
    with tempfile.TemporaryDirectory() as tmp:
        model = make_model(Path(tmp) / "model", args.shape)
        servers = {}
        try:
            settings = [(True, True, "auto", "on"), (False, True, "auto", "off"),
                        (False, False, "auto", "off-padded")]
            if args.torch_runtime:
                settings += [(True, True, "torch", "on-torch"), (False, True, "torch", "off-torch")]
            for batching, padding_free, runtime, label in settings:
                servers[label] = start_server(model, args, batching,
                                              Path(tmp) / f"serve-{label}.log", padding_free,
                                              runtime)
            if args.onnxruntime:
                servers.update(start_onnxruntime(model, args, Path(tmp)))
            rates = bench_bert(model, {label: url for label, (_, url) in servers.items()}, args)
            bench_qa(model, servers["on"][1], args)
            for label in ("ort-on", "ort-off"):
                if label in servers:
                    print(f"batching {label}: {mean_batch(servers[label][1])}")
        finally:
            for label, (proc, _) in servers.items():
                stop_server(proc)
                if not label.startswith("ort"):
                    log = (Path(tmp) / f"serve-{label}.log").read_text().splitlines()
                    print(f"batching {label}: {next(l for l in reversed(log) if 'stopped' in l)}")

    def median_ratio(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(rates[a][8], rates[b][8]))

    print(f"dynamic batching speedup at 8 clients: {median_ratio('on', 'off'):.2f}x (floor 2x, "
          f"median of {args.rounds} rounds); over stock padded batch-1 serving: "
          f"{median_ratio('on', 'off-padded'):.2f}x", flush=True)
    if args.onnxruntime:
        print(f"Triton + ONNX Runtime at 8 clients: dynamic batching speedup "
              f"{median_ratio('ort-on', 'ort-off'):.2f}x; bertforge serve (on) over it "
              f"(ort-on): {median_ratio('on', 'ort-on'):.2f}x", flush=True)


if __name__ == "__main__":
    main()
