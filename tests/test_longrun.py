"""Long jobs (train/longrun.py): start-up summary and ETA, a checkpoint on SIGTERM then an
exact resume, --keep-last-checkpoints, step_0 only when asked, a log without repeated steps."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from bertforge.train import checkpoint as ckpt
from bertforge.train.pretraining import pretrain
from support import MASK, SEQ, losses, tiny_config, write_random_shards

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    return write_random_shards(tmp_path_factory.mktemp("shards"), records_per_shard=200)


def command(shards: str, run: Path, steps: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "bertforge", "pretrain", "--config", "unit_test",
            "--input-files", shards, "--sequence-length", str(SEQ), "--mask-tokens", str(MASK),
            "--max-position-embeddings", "64", "--micro-batch-size", "4",
            "--global-batch-size", "8", "--training-steps", str(steps),
            "--learning-rate", "1e-3", "--hidden-dropout-prob", "0", "--device", "cpu",
            "--dataloader-workers", "0", "--disable-progress-bar", "true",
            "--checkpoint-output-dir", str(run), *extra]


def train_steps(run: Path) -> list[int]:
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    return [l["step"] for l in lines if l["split"] == "train"]


def test_sigterm_checkpoints_the_step_and_the_run_resumes_exactly(shards, tmp_path):
    whole = tmp_path / "whole"
    subprocess.run(command(shards, whole, 40), check=True, capture_output=True, timeout=600)
    run = tmp_path / "run"
    proc = subprocess.Popen(command(shards, run, 40, "--checkpoint-steps", "1000"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:  # a few steps in, then the scheduler's notice
        if line.startswith("Step: 5 "):
            proc.send_signal(signal.SIGTERM)
            break
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, err
    message = err.strip().splitlines()[-1]
    assert "stopped by SIGTERM after step" in message and "--resume-training-from-checkpoint" \
        in message
    saved = ckpt.step_dirs(run)
    assert len(saved) == 1 and 6 <= int(saved[0].name[5:]) < 40  # the step it stopped after
    resumed = subprocess.run(command(shards, run, 40, "--checkpoint-input-dir", str(run),
                                     "--resume-training-from-checkpoint"),
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert train_steps(run) == list(range(40))  # every step logged once
    assert losses(run) == losses(whole)  # and trained exactly as without the stop


def test_summary_eta_initial_checkpoint_and_keep_last(shards, tmp_path):
    run = tmp_path / "run"
    done = subprocess.run(command(shards, run, 6, "--checkpoint-steps", "2",
                                  "--keep-last-checkpoints", "2"),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    log = done.stderr
    assert "M parameters (hidden 32, 3 layers, 8 heads, vocab 1,000) on cpu, 1 process" in log
    assert "global batch 8 = micro-batch 4 x accumulation 2 x 1 process" in log
    assert "data: 400 records in 2 files" in log and "steps 0 -> 6" in log
    assert "took" in log and "for the 5 steps left" in log
    assert " - ETA: 00:0" in done.stdout
    assert [d.name for d in ckpt.step_dirs(run)] == ["step_4", "step_6"]  # no step_0, 2 kept
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(l["time"] > 1.7e9 for l in lines) and "eta_s" in lines[-1]
    first = pretrain(tiny_config(shards, tmp_path / "initial", training_steps=1,
                                 save_initial_checkpoint=True))
    assert [d.name for d in ckpt.step_dirs(first.run_dir)] == ["step_0", "step_1"]


def test_a_resume_after_a_crash_drops_the_crashed_attempts_log_lines(shards, tmp_path):
    run = tmp_path / "run"
    pretrain(tiny_config(shards, run, training_steps=4, checkpoint_steps=2))
    # the attempt that crashed after step_2 had logged steps 2 and 3 too: resume from step_2
    (run / "step_4").rename(tmp_path / "gone")
    pretrain(tiny_config(shards, run, training_steps=6,
                         checkpoint_input_dir=str(run / "step_2"),
                         resume_training_from_checkpoint=True))
    assert train_steps(run) == list(range(6))
