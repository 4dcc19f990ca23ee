"""benchmarks/gpu_check.sh on a machine without a GPU, and the parts of gpu_check.py that need
none: the model-FLOP count behind its MFU, its check runner, its pytest report reader."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import transformers
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_check  # noqa: E402

from bertforge.model.bert import build_pretraining_model  # noqa: E402
from bertforge.train.sources import random_batch  # noqa: E402


def test_without_a_gpu_it_says_so_in_one_line_writes_nothing_and_exits_0(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable,
           "OMP_NUM_THREADS": "1"}
    out = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--output",
                          str(tmp_path / "record.json")], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 1, out.stdout
    assert lines[0].startswith("gpu_check: no GPU found (")
    assert "CPU self-checks passed; wrote nothing" in lines[0]
    for check in gpu_check.BUDGETS:
        assert f"{check} (" in lines[0].split("it would run:")[1]
    assert list(tmp_path.iterdir()) == []  # no record, no logs


def test_model_flops_equal_torch_flop_counter_on_the_stock_layout():
    """The count behind MFU against torch's FLOP counter, forward + backward of the model with
    every layer at every token (the sparse last layer does less: see model_flops_per_sequence).
    bf16 autocast: fp32 runs the MLM decoder's weight gradient as an in-place addmm_, which
    the counter does not see."""
    config = transformers.BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=256,
                                     max_position_embeddings=64, hidden_dropout_prob=0.0)
    model = build_pretraining_model(config).train()
    model.sparse_last_layer = False
    batch = random_batch(4, 64, 10, config.vocab_size, torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as counter:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(batch)
        out.loss.backward()
    assert counter.get_total_flops() == gpu_check.model_flops(config, [64] * 4, [10] * 4)
    # Per-sequence lengths and labels (unpacked and packed runs of the same sequences) sum up.
    lengths, masked = np.array([64, 30, 7]), np.array([10, 4, 1])
    assert gpu_check.model_flops(config, lengths, masked) == sum(
        gpu_check.model_flops(config, [n], [m]) for n, m in zip(lengths, masked))
    assert gpu_check.mfu(4e14, 2.0, 1e15) == 0.2


def test_a_failing_or_hanging_check_is_recorded_with_its_last_lines(tmp_path):
    result = tmp_path / "result.json"
    failing = [sys.executable, "-c", "print('\\n'.join(f'line {i}' for i in range(40))); "
               "raise SystemExit(3)"]
    record = gpu_check.run_check(failing, 60, result, tmp_path / "a.log")
    assert record["status"] == "failed"
    assert record["error"].startswith("exit status 3") and record["error"].endswith("line 39")
    assert "line 10" not in record["error"]  # the tail only; the whole output is in the log
    assert "line 0" in (tmp_path / "a.log").read_text()
    # A hang is killed at its budget and keeps what it saved before.
    hanging = [sys.executable, "-c", f"import json, time; open({str(result)!r}, 'w')"
               ".write(json.dumps({'runs': [1]})); print('started', flush=True); time.sleep(60)"]
    record = gpu_check.run_check(hanging, 3, result, tmp_path / "b.log")
    assert record["status"] == "timeout" and record["runs"] == [1]
    assert record["error"].startswith("killed after 3 s") and "started" in record["error"]
    assert record["seconds"] < 30


JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">
<testcase classname="" name="tests.test_tfrecord"><error message="collection failure">Traceback
E   ModuleNotFoundError: No module named 'tfrecord'</error></testcase>
<testcase classname="" name="tests.test_serve"><skipped message="collection skipped">could not
import 'pytriton'</skipped></testcase>
<testcase classname="tests.test_gpu" name="test_ok" />
<testcase classname="tests.test_gpu" name="test_bad"><failure message="assert 0">E assert 0</failure></testcase>
<testcase classname="tests.test_gpu" name="test_two"><skipped message="needs 2 GPUs">x</skipped></testcase>
<testcase classname="tests.test_gpu" name="test_err"><error message="failed on setup">E</error></testcase>
</testsuite></testsuites>"""


def test_pytest_report_counts_and_names_failures_and_lists_modules_not_collected():
    summary = gpu_check.junit_summary(JUNIT)
    assert {k: summary[k] for k in ("passed", "failed", "skipped", "errors")} == {
        "passed": 1, "failed": 1, "skipped": 1, "errors": 1}
    assert summary["failures"] == ["tests.test_gpu::test_bad", "tests.test_gpu::test_err"]
    assert summary["skips"] == {"tests.test_gpu::test_two": "needs 2 GPUs"}
    assert summary["not_collected"] == {
        "tests.test_tfrecord": "E   ModuleNotFoundError: No module named 'tfrecord'",
        "tests.test_serve": "import 'pytriton'"}
