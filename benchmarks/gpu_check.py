"""Every GPU check in one command and one JSON file: the CUDA tests, pre-training speed and MFU,
NCCL DDP, SQuAD inference and serving.

Why: bertforge is built and tested on CPU machines; a GPU machine is lent rarely, for minutes,
with little beyond torch and transformers installed. This script turns such a lease into one
command (`bash benchmarks/gpu_check.sh`, which sets the paths) that fits in 8 minutes on one
H100/H200 and always leaves a complete record behind, whatever fails.

Checks run one after another, each in its own process group under its own time budget: a CUDA
error, an out-of-memory or a hang ends that check only (status failed or timeout, with the last
lines of its output) and the next one runs. The JSON (--output) is rewritten after every check
and each check's whole output is kept beside it (<output stem>.<check>.log).
  gpu_tests 120 s  `pytest -m gpu tests/` less the NCCL test (run as `ddp`): passed / failed /
                   skipped counts and the failed tests' names; test modules that cannot be
                   imported on that machine are listed apart (not_collected)
  pretrain  170 s  the four BERT presets (base/large x S 128/512, their S and M), bf16, one step
                   = forward + backward + fused AdamW (bench_pretrain.bertforge_step_fn):
                     full           full-length random rows (what --synthetic-data runs), SDPA
                     unpacked       Wikipedia-shaped lengths (benchmarks/lengths.py)
                                    padded to S, SDPA
                     packed_varlen  the same sequences packed <= 3 a row (SPFHP,
                                    bench_packing.same_sequences), --attn-implementation varlen
                   3 warm-up steps, then one timed pass over all the batches; samples/s, real
                   tokens/s, MFU against the datasheet's dense bf16 peak and against the
                   fastest of seven 8192^3 bf16 matmuls, peak memory
  ddp       120 s  tests/test_gpu.py's NCCL test (DDP over every visible GPU == one process,
                   losses and weights); skipped, with the reason, below 2 GPUs
  squad      60 s  bench_squad.bench_inference on CUDA in bf16, BERT-base at S 384: windows/s
                   padded to 384, padded to the batch's longest, packed; logits compared
  serve      90 s  bench_serve.py --device cuda (PyTriton's tritonserver) where PyTriton,
                   tritonclient and numpy<2 are importable; else the serving engine in process
                   (serve/qa.QAEngine, what Triton's model function runs): rows/s padding-free
                   vs padded, batch 1/8/32, BERT-base at S 384, bf16
MFU counts model FLOPs (bench_pretrain.model_flops_per_sequence: every layer at every real
token, the MLM head at the labelled slots, x3 for forward + backward): padding earns nothing.
Micro-batches (256/64 rows for base, 128/32 for large; the presets' are IPU-sized) keep
activations to ~10-20 GB by estimate, so the runs fit an 80 GB H100.

The record: {"schema", "started", "seconds", "total_budget_s", "machine": {gpus, gpu_count,
torch, cuda, transformers, python, host, commit}, "checks": {name: {"status": passed | failed
| timeout | skipped, "seconds", "budget_s", "error" (last lines of output) or "reason" (why
skipped), and the check's own numbers}}}; `validate` checks that shape before every write.

Without a GPU (no nvidia-smi, or torch sees no CUDA device) it runs its CPU self-checks (the
plan, the FLOP formula over it, the MFU formula, the JSON writer), prints one line saying what
it would have run, writes nothing and exits 0 (~5 s, mostly importing transformers).

Cost: at most 460 s (--total-budget; the budgets above; `ddp` only with 2+ GPUs). Not yet run
on a GPU: the budgets are estimates (BERT-large at S 512 does ~33 TFLOP a step, ~0.1 s on an
H100; building each model on the CPU takes seconds). A bare torch + transformers image lacks
crc32c (the default vocab ships inside bertforge): `bash benchmarks/gpu_check.sh --fetch-deps`
gathers it (0.1 MB) where PyPI is reachable; the wrapper's header says how.

    bash benchmarks/gpu_check.sh [--output gpu_check.json] [--only pretrain,squad]
Exit status: 0 when every check passed or was skipped, 1 otherwise (the JSON says which).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

SCRIPT = Path(__file__).resolve()
ROOT = SCRIPT.parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))  # the bench_* modules reused below

SCHEMA = "bertforge-gpu-check/1"
STATUSES = ("passed", "failed", "timeout", "skipped")
BUDGETS = {"gpu_tests": 120, "pretrain": 170, "ddp": 120, "squad": 60, "serve": 90}  # seconds
MIN_CHECK_S = 20  # a check that would get less than this of --total-budget is skipped
DDP_TEST = "tests/test_gpu.py::test_nccl_ddp_equals_one_gpu"
# Pre-training: preset (gives shape, S and M) -> micro-batch rows; 12 batches timed a variant.
PRETRAIN_RUNS = {"pretrain_base_128": 256, "pretrain_base_512": 64,
                 "pretrain_large_128": 128, "pretrain_large_512": 32}
VARIANTS = ("full", "unpacked", "packed_varlen")
PRETRAIN_BATCHES, WARMUP_STEPS = 12, 3
# Dense bf16 tensor-core peaks from the vendors' datasheets (no sparsity), matched in this order
# against torch.cuda.get_device_name(): "NVIDIA H100 80GB HBM3" is the SXM part.
SPEC_BF16_PEAK = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H200 NVL", 835e12),
                  ("H100", 989.4e12), ("H200", 989.4e12), ("A100", 312e12))
SQUAD_SHAPE, SQUAD_PARAGRAPHS, SQUAD_WINDOWS, SQUAD_BATCH = "base", 1000, 4096, 128  # bench_squad
SERVE_SHAPE, SERVE_SEQUENCE_LENGTH, SERVE_BATCHES = "base", 384, (1, 8, 32)  # bench_serve
DEVICE = "cuda"  # where the checks run (a CPU smoke run of their code sets "cpu")


# ---------------------------------------------------------------- formulas and the record
def model_flops(bert_config, lengths, masked) -> float:
    """Model FLOPs of one forward + backward over sequences of real `lengths` with `masked`
    labelled slots each (per-sequence arrays)."""
    from bench_pretrain import model_flops_per_sequence
    lengths, masked = (np.asarray(a, dtype=np.float64) for a in (lengths, masked))
    return float(model_flops_per_sequence(bert_config, lengths, masked).sum())


def mfu(flops: float, seconds: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation: achieved FLOP/s over `peak` FLOP/s (None without a peak)."""
    return flops / seconds / peak if peak else None


def spec_peak(device_name: str) -> float | None:
    return next((peak for key, peak in SPEC_BF16_PEAK if key in device_name), None)


def validate(record: dict) -> None:
    """Raise ValueError unless `record` has the shape this script writes (module docstring)."""
    for key in ("schema", "started", "machine", "checks"):
        if key not in record:
            raise ValueError(f"gpu_check record lacks {key!r}")
    for name, check in record["checks"].items():
        if name not in BUDGETS:
            raise ValueError(f"gpu_check record: unknown check {name!r}")
        if check.get("status") not in STATUSES:
            raise ValueError(f"gpu_check record: {name} status {check.get('status')!r} is not "
                             f"one of {', '.join(STATUSES)}")
        if not isinstance(check.get("seconds"), (int, float)):
            raise ValueError(f"gpu_check record: {name} has no seconds")


def write_record(path: Path, record: dict) -> None:
    validate(record)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    tmp.replace(path)  # a reader never sees half a file


def tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def junit_summary(xml_text: str) -> dict:
    """Counts and failing names of a pytest JUnit XML report. Entries of whole modules (empty
    classname: import errors, module-level skips) go to not_collected, not to the counts."""
    counts = {"passed": 0, "failed": 0, "skipped": 0, "errors": 0}
    failures, skips, not_collected = [], {}, {}
    for case in ET.fromstring(xml_text).iter("testcase"):
        outcome = {c.tag: c for c in case if c.tag in ("failure", "error", "skipped")}
        if not case.get("classname"):
            reason = next(iter(outcome.values()), None)
            text = (reason.text or reason.get("message", "")) if reason is not None else ""
            not_collected[case.get("name")] = tail(text, 1)
            continue
        name = f"{case.get('classname')}::{case.get('name')}"
        if "failure" in outcome or "error" in outcome:
            counts["failed" if "failure" in outcome else "errors"] += 1
            failures.append(name)
        elif "skipped" in outcome:
            counts["skipped"] += 1
            skips[name] = outcome["skipped"].get("message", "")
        else:
            counts["passed"] += 1
    return {**counts, "failures": failures, "skips": skips, "not_collected": not_collected}


def run_check(cmd: list[str], timeout: float, result_file: Path, log_file: Path) -> dict:
    """Run `cmd` (in its own process group, output to `log_file`) for at most `timeout` s. Its
    record is the JSON it left in `result_file`, partial ones too; exit 0 keeps the status it
    wrote (passed if none), a non-zero exit makes it failed and a timeout timeout, with the
    last lines of the output as `error`."""
    start = time.monotonic()
    with open(log_file, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = None
        try:  # the check's children too (pytest's trainers, servers), whether it ended or not
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    record = json.loads(result_file.read_text()) if result_file.exists() else {}
    output = log_file.read_text(errors="replace")
    if code is None:
        record.update(status="timeout", error=f"killed after {timeout:.0f} s\n{tail(output)}")
    elif code != 0:
        record.update(status="failed", error=f"exit status {code}\n{tail(output)}")
    else:
        record.setdefault("status", "passed")
        if record["status"] == "failed":
            record.setdefault("error", tail(output))
    record["seconds"] = round(time.monotonic() - start, 1)
    return record


# ---------------------------------------------------------------- the checks (child process)
def pytest_check(record: dict, args: list[str], junit: Path) -> None:
    code = subprocess.call([sys.executable, "-m", "pytest", *args, "-q", "-p", "no:cacheprovider",
                            "--continue-on-collection-errors", f"--junitxml={junit}"], cwd=ROOT)
    record["pytest_exit_status"] = code
    if not junit.exists():
        record["status"] = "failed"
        return
    record.update(junit_summary(junit.read_text()))
    ok = record["failed"] == record["errors"] == 0 and record["passed"] > 0
    record["status"] = "passed" if ok else "failed"


def check_gpu_tests(record: dict, save, tmp: Path) -> None:
    pytest_check(record, ["-m", "gpu", "tests/", "--deselect", DDP_TEST], tmp / "junit.xml")


def check_ddp(record: dict, save, tmp: Path) -> None:
    import torch
    record["gpus"] = torch.cuda.device_count()
    pytest_check(record, [DDP_TEST], tmp / "junit.xml")


def preset_shape(preset: str):
    """(transformers.BertConfig, S, M) of a pre-training preset (src/bertforge/presets/pretraining.yml)."""
    from bertforge.config import load_config
    from bertforge.model.bert import bert_config
    cfg = load_config(preset)
    return bert_config(cfg.model), cfg.data.sequence_length, cfg.data.mask_tokens


def with_lengths(batch: dict, lengths) -> dict:
    """Full-length random records cut to real `lengths`: padding after each, segment B from its
    middle, and only the masked slots before its last [SEP] kept as labels."""
    import torch
    s = batch["input_ids"].shape[1]
    lengths = torch.as_tensor(lengths).unsqueeze(1)
    real = torch.arange(s) < lengths
    keep = batch["masked_lm_positions"] < lengths - 1
    return {**batch, "input_ids": batch["input_ids"] * real, "input_mask": real.long(),
            "segment_ids": ((torch.arange(s) >= lengths // 2) & real).long(),
            "masked_lm_positions": batch["masked_lm_positions"] * keep,
            "masked_lm_ids": batch["masked_lm_ids"] * keep,
            "masked_lm_weights": batch["masked_lm_weights"] * keep}


def pretrain_data(bert_config, seq: int, mask: int, micro: int) -> dict:
    """variant -> (micro-batches, model FLOPs of one pass over them, sequences, real tokens)."""
    import torch
    from bench_packing import same_sequences

    from lengths import wikipedia_like_histogram
    from bertforge.train.sources import random_batch
    n = micro * PRETRAIN_BATCHES
    gen = torch.Generator().manual_seed(0)
    full = random_batch(n, seq, mask, bert_config.vocab_size, gen)
    lengths = np.repeat(np.arange(seq + 1), wikipedia_like_histogram(seq, n, seed=0))
    np.random.default_rng(0).shuffle(lengths)
    varied = with_lengths(random_batch(n, seq, mask, bert_config.vocab_size, gen), lengths)
    unpacked, packed, _ = same_sequences(varied, micro, max_per_pack=3, algorithm="spfhp")
    labelled = (varied["masked_lm_ids"] != 0).sum(1).numpy()
    same = (model_flops(bert_config, lengths, labelled), n, int(lengths.sum()))
    return {"full": ([{k: v[i:i + micro] for k, v in full.items()} for i in range(0, n, micro)],
                     model_flops(bert_config, [seq] * n, [mask] * n), n, n * seq),
            "unpacked": (unpacked, *same), "packed_varlen": (packed, *same)}


def time_pretrain(bert_config, variant: str, batches: list, flops: float, sequences: int,
                  tokens: int, peaks: dict) -> dict:
    import torch
    from bench_pretrain import bertforge_step_fn

    from bertforge.train.sources import to_device
    torch.cuda.reset_peak_memory_stats()
    step = bertforge_step_fn(bert_config, bf16=True, device=DEVICE,
                             attn="varlen" if variant == "packed_varlen" else "sdpa")
    on_device = [to_device(b, torch.device(DEVICE)) for b in batches]
    for batch in on_device[:WARMUP_STEPS]:
        step(batch)
    start = time.perf_counter()
    for batch in on_device:
        step(batch)  # synchronizes at its end
    seconds = time.perf_counter() - start
    return {"steps": len(on_device),
            "sequences_per_row": round(sequences / sum(len(b["input_ids"]) for b in batches), 3),
            "samples_per_s": sequences / seconds, "real_tokens_per_s": tokens / seconds,
            "mfu_spec": mfu(flops, seconds, peaks["spec"]),
            "mfu_measured": mfu(flops, seconds, peaks["measured_matmul_8192"]),
            "max_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}


def check_pretrain(record: dict, save, tmp: Path) -> None:
    import torch
    from bench_pretrain import matmul_peak
    record["device"] = torch.cuda.get_device_name()
    record["peak_bf16_flops"] = {"spec": spec_peak(record["device"]),
                                 "measured_matmul_8192": matmul_peak(torch.bfloat16, n=8192,
                                                                     device=DEVICE)}
    record["runs"] = []
    save()
    for preset, micro in PRETRAIN_RUNS.items():
        bert_config, seq, mask = preset_shape(preset)
        data = pretrain_data(bert_config, seq, mask, micro)
        for variant in VARIANTS:
            run = {"preset": preset, "sequence_length": seq, "variant": variant,
                   "micro_batch_size": micro}
            try:
                run.update(time_pretrain(bert_config, variant, *data[variant],
                                         record["peak_bf16_flops"]))
            except Exception:  # noqa: BLE001 - recorded; the other runs go on
                run["error"] = tail(traceback.format_exc())
            torch.cuda.empty_cache()
            print(f"pretrain {json.dumps(run)}", flush=True)
            record["runs"].append(run)
            save()
    if any("error" in run for run in record["runs"]):
        record["status"] = "failed"


def check_squad(record: dict, save, tmp: Path) -> None:
    from bench_squad import bench_inference, make_squad_like
    from transformers import AutoTokenizer

    from bertforge.data.vocab import save_tokenizer_files
    save_tokenizer_files(tmp / "tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(tmp / "tokenizer")
    record.update(shape=SQUAD_SHAPE, sequence_length=384, precision="bf16", batch=SQUAD_BATCH)
    record.update(bench_inference(make_squad_like(SQUAD_PARAGRAPHS), tokenizer, SQUAD_SHAPE,
                                  SQUAD_WINDOWS, SQUAD_BATCH, device=DEVICE, precision="bf16"))
    if not record["logits_equal"]:
        record.update(status="failed", error="packed and unpacked logits differ beyond 5e-2")


def triton_missing() -> str | None:
    """Why bench_serve.py cannot run here, or None."""
    for module in ("pytriton", "tritonclient.grpc", "tritonclient.http"):
        try:
            __import__(module)
        except ImportError as err:
            return f"{err} (pip install 'bertforge[serve]')"
    if int(np.__version__.split(".")[0]) >= 2:
        return f"PyTriton 0.7 needs numpy<2, found {np.__version__}"
    return None


def serve_triton(record: dict) -> None:
    cmd = [sys.executable, "benchmarks/bench_serve.py", "--device", DEVICE, "--precision",
           "bf16", "--shape", SERVE_SHAPE, "--sequence-length", str(SERVE_SEQUENCE_LENGTH),
           "--mode", "async", "--requests", "50", "--rounds", "2",
           # serve's gpu_bf16 preset: one instance on the GPU, requests wait 2 ms for company.
           "--model-instances", "1", "--max-queue-delay-us", "2000"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    lines = []
    for line in proc.stdout:  # into the log as it comes: a timeout then still shows where
        print(line, end="", flush=True)
        lines.append(line)
    output = "".join(lines)
    record["samples_per_s"] = {
        f"{label} clients {clients}": float(rate) for label, clients, rate in re.findall(
            r"bert batching: (\S+) clients: (\d+) .*?throughput: ([0-9.]+) samples/sec", output)}
    qa = re.search(r"bert_qa clients: \d+ throughput: ([0-9.]+) questions/sec", output)
    record["qa_questions_per_s"] = float(qa.group(1)) if qa else None
    speedup = re.search(r"dynamic batching speedup at 8 clients: ([0-9.]+)x", output)
    record["dynamic_batching_speedup_8_clients"] = float(speedup.group(1)) if speedup else None
    if proc.wait():
        record.update(status="failed", error=tail(output))


def serve_engine(record: dict) -> None:
    import torch
    import transformers
    from bench_serve import SHAPES

    from bertforge.config.serve import WindowSection
    from bertforge.serve.bench import INPUTS, synthetic_rows
    from bertforge.serve.qa import QAEngine
    hidden, layers, heads = SHAPES[SERVE_SHAPE]
    config = transformers.BertConfig(hidden_size=hidden, num_hidden_layers=layers,
                                     num_attention_heads=heads, intermediate_size=4 * hidden)
    torch.manual_seed(0)
    model = transformers.BertForQuestionAnswering(config).to(DEVICE, torch.bfloat16).eval()
    engine = QAEngine(model, None, WindowSection(sequence_length=SERVE_SEQUENCE_LENGTH))
    rows = synthetic_rows(max(SERVE_BATCHES), SERVE_SEQUENCE_LENGTH, config.vocab_size)
    some = [rows[k][:8] for k in INPUTS]
    # bf16 logits move by ~1e-2 with the kernel: bench_serve.py compares at the same tolerance.
    record["logits_equal"] = all(np.allclose(a, b, atol=5e-2, rtol=0) for a, b in
                                 zip(engine.logits(*some), engine.padded_logits(*some)))
    record["layout"] = engine.layout
    record["rows_per_s"] = {}
    for batch in SERVE_BATCHES:
        chunk = [rows[k][:batch] for k in INPUTS]
        for path, run in (("padding_free", engine.logits), ("padded", engine.padded_logits)):
            run(*chunk)  # warm-up; every call returns numpy arrays, so it ends synchronized
            calls, start = 0, time.perf_counter()
            while calls < 5 or time.perf_counter() - start < 1.0:
                run(*chunk)
                calls += 1
            seconds = time.perf_counter() - start
            record["rows_per_s"][f"{path} batch {batch}"] = calls * batch / seconds
    if not record["logits_equal"]:
        record.update(status="failed", error="padding-free and padded logits differ beyond 5e-2")


def check_serve(record: dict, save, tmp: Path) -> None:
    record.update(shape=SERVE_SHAPE, sequence_length=SERVE_SEQUENCE_LENGTH, precision="bf16")
    reason = triton_missing()
    record["mode"] = "triton" if reason is None else "engine"
    if reason is None:
        serve_triton(record)
    else:
        record["triton_not_run"] = reason
        serve_engine(record)


CHECKS = {"gpu_tests": check_gpu_tests, "pretrain": check_pretrain, "ddp": check_ddp,
          "squad": check_squad, "serve": check_serve}


def run_child(name: str, result_file: Path) -> None:
    """The body of one check, in its own process; the record is saved as it grows."""
    record: dict = {}

    def save() -> None:  # whole files only: the driver may kill this process at any time
        tmp = result_file.with_name(result_file.name + ".tmp")
        tmp.write_text(json.dumps(record))
        tmp.replace(result_file)

    with tempfile.TemporaryDirectory(prefix=f"gpu_check-{name}-") as tmp:
        CHECKS[name](record, save, Path(tmp))
    save()


# ---------------------------------------------------------------- the driver
def find_gpu() -> str | None:
    """None when an NVIDIA GPU is usable, else why not."""
    if shutil.which("nvidia-smi") is None:
        return "nvidia-smi not found"
    import torch
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} sees no CUDA device"
    return None


def machine() -> dict:
    import torch
    import transformers

    def command(*cmd: str) -> str | None:
        try:
            return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=30,
                                  check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    gpus = command("nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                   "--format=csv,noheader")
    return {"gpus": gpus.splitlines() if gpus else [], "gpu_count": torch.cuda.device_count(),
            "torch": torch.__version__, "cuda": torch.version.cuda,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "host": platform.node(), "commit": command("git", "rev-parse", "HEAD")}


def plan(names: list[str]) -> str:
    what = {"gpu_tests": "gpu_tests (pytest -m gpu tests/)",
            "pretrain": f"pretrain ({', '.join(PRETRAIN_RUNS)} x {'/'.join(VARIANTS)}, bf16)",
            "ddp": "ddp (NCCL DDP == one process, 2+ GPUs)",
            "squad": "squad (BERT-base inference at 384, bf16)",
            "serve": "serve (Triton, else the in-process engine; BERT-base, bf16)"}
    return ", ".join(what[n] for n in names)


def self_checks() -> None:
    """What can be checked without a GPU: every planned run's shape and FLOPs, the MFU formula,
    the JSON writer and its validation. Raises on a programmer error."""
    for preset, micro in PRETRAIN_RUNS.items():
        bert_config, seq, mask = preset_shape(preset)
        flops = model_flops(bert_config, [seq] * micro, [mask] * micro)
        assert math.isfinite(flops) and flops > 0, (preset, flops)
    assert mfu(3e15, 2.0, 1.5e15) == 1.0 and mfu(1.0, 1.0, None) is None
    assert spec_peak("NVIDIA H100 PCIe") == 756e12 and spec_peak("NVIDIA H200") == 989.4e12
    record = {"schema": SCHEMA, "started": "self-check", "machine": {},
              "checks": {n: {"status": "skipped", "seconds": 0.0} for n in BUDGETS}}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "record.json"
        write_record(path, record)
        assert json.loads(path.read_text()) == record
    for bad in ({}, {**record, "checks": {"pretrain": {"status": "done", "seconds": 1.0}}}):
        try:
            validate(bad)
        except ValueError:
            continue
        raise AssertionError(f"validate accepted {bad}")


def summary_lines(record: dict) -> list[str]:
    """One line per number, for people and for benchmarks.yml's regexes."""
    lines = [f"gpu_check {name}: {check['status']} in {check['seconds']} s"
             + (f" - passed {check['passed']} failed {check['failed']} skipped {check['skipped']}"
                f" errors {check['errors']}" if "passed" in check else "")
             for name, check in record["checks"].items()]
    for run in record["checks"].get("pretrain", {}).get("runs", []):
        if "samples_per_s" in run:
            spec = "n/a" if run["mfu_spec"] is None else f"{100 * run['mfu_spec']:.1f}"
            lines.append(f"gpu_check pretrain {run['preset']} {run['variant']}: throughput: "
                         f"{run['samples_per_s']:.1f} samples/sec - real tokens/s: "
                         f"{run['real_tokens_per_s']:.0f} - MFU: {spec} % of the datasheet peak, "
                         f"{100 * run['mfu_measured']:.1f} % of the measured matmul peak")
    for layout, rate in record["checks"].get("squad", {}).get("windows_per_s", {}).items():
        lines.append(f"gpu_check squad {layout} inference throughput: {rate:.1f} windows/sec")
    serve = record["checks"].get("serve", {})
    for setting, rate in {**serve.get("rows_per_s", {}), **serve.get("samples_per_s", {})}.items():
        lines.append(f"gpu_check serve {serve['mode']} {setting}: throughput: {rate:.1f} "
                     "samples/sec")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path("gpu_check.json"),
                        help="the JSON record (default: gpu_check.json); logs go beside it")
    parser.add_argument("--only", default=",".join(BUDGETS),
                        help=f"comma-separated checks to run (default: all: {','.join(BUDGETS)})")
    parser.add_argument("--total-budget", type=float, default=460,
                        help="seconds for all checks together (each also has its own budget)")
    parser.add_argument("--run-check", choices=sorted(CHECKS), help=argparse.SUPPRESS)
    parser.add_argument("--result-file", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    names = [n for n in args.only.split(",") if n]
    unknown = sorted(set(names) - set(BUDGETS))
    if unknown:
        parser.error(f"--only {','.join(unknown)}: choose from {','.join(BUDGETS)}")
    if args.run_check:
        run_child(args.run_check, args.result_file)
        return 0
    reason = find_gpu()
    if reason is not None:
        self_checks()
        print(f"gpu_check: no GPU found ({reason}); CPU self-checks passed; wrote nothing "
              f"(no {args.output}); with a GPU it would run: {plan(names)}")
        return 0
    start = time.monotonic()
    record = {"schema": SCHEMA, "total_budget_s": args.total_budget,
              "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "machine": machine(), "checks": {}}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        for name in names:
            left = args.total_budget - (time.monotonic() - start)
            if name == "ddp" and record["machine"]["gpu_count"] < 2:
                check = {"status": "skipped", "seconds": 0.0, "reason":
                         f"{record['machine']['gpu_count']} GPU visible; NCCL DDP needs 2 or more"}
            elif left < MIN_CHECK_S:
                check = {"status": "skipped", "seconds": 0.0,
                         "reason": f"{left:.0f} s left of --total-budget {args.total_budget:.0f}"}
            else:
                result = Path(tmp) / f"{name}.json"
                log = args.output.with_name(f"{args.output.stem}.{name}.log")
                check = run_check([sys.executable, str(SCRIPT), "--run-check", name,
                                   "--result-file", str(result)],
                                  min(BUDGETS[name], left), result, log)
            check["budget_s"] = BUDGETS[name]
            record["checks"][name] = check
            record["seconds"] = round(time.monotonic() - start, 1)
            write_record(args.output, record)
            print(f"gpu_check: {name} {check['status']} in {check['seconds']} s", flush=True)
    print("\n".join(summary_lines(record)))
    print(json.dumps(record, indent=1))
    return 0 if all(c["status"] in ("passed", "skipped") for c in record["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
