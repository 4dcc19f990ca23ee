"""Runs that stop when they go wrong and resumes that check themselves: a non-finite loss stops
the run without a checkpoint of broken weights, the gradient norm is logged and clippable, fp16
skipped steps are counted, and a resume that would change what its saved data position or
optimizer state mean is refused with what changed; eval does not change training."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from bertforge.config import load_config
from bertforge.train import checkpoint as ckpt
from bertforge.train.precision import Precision
from bertforge.train.pretraining import pretrain
from support import tiny_config, write_random_shards

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    return write_random_shards(tmp_path_factory.mktemp("shards"))


def _steps(run_dir):
    return [d.name for d in ckpt.step_dirs(run_dir)]


def test_a_nan_loss_stops_the_run_and_saves_no_broken_checkpoint(shards, tmp_path):
    pretrain(tiny_config(shards, tmp_path / "good", training_steps=1))
    weights = tmp_path / "good" / "step_1" / "model.safetensors"
    tensors = load_file(weights)
    name = next(k for k in tensors if "word_embeddings" in k)
    tensors[name][5:] = float("nan")  # a broken checkpoint someone starts from
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"step 0: loss nan.*training diverged.*"
                                         r"--learning-rate.*--max-grad-norm"):
        pretrain(tiny_config(shards, tmp_path / "bad", training_steps=4, checkpoint_steps=2,
                             checkpoint_input_dir=str(tmp_path / "good" / "step_1"),
                             save_initial_checkpoint=True))
    assert _steps(tmp_path / "bad") == ["step_0"]  # nothing after the divergence


def test_non_finite_settings_are_refused():
    with pytest.raises(ValueError, match=r"learning_rate \(--learning-rate\) must be a finite"):
        load_config("unit_test", {"learning_rate": "inf"})
    with pytest.raises(ValueError, match="max_grad_norm"):
        load_config("unit_test", {"max_grad_norm": 0})


def test_gradient_norm_is_measured_at_true_scale_and_clipped():
    layer = torch.nn.Linear(4, 3)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    precision = Precision("fp16", torch.device("cpu"), loss_scaling=64.0)
    precision.backward(layer(torch.ones(2, 4)).sum())
    true = torch.cat([g.flatten() for g in (layer.weight.grad, layer.bias.grad)]).norm() / 64
    norm = precision.unscale_and_clip(optimizer, max_norm=0.5)
    assert float(norm) == pytest.approx(float(true), rel=1e-6) and float(norm) > 0.5
    clipped = torch.cat([layer.weight.grad.flatten(), layer.bias.grad.flatten()]).norm()
    assert float(clipped) == pytest.approx(0.5, rel=1e-4)


def test_grad_norm_logged_and_fp16_skipped_steps_counted(shards, tmp_path):
    result = pretrain(tiny_config(shards, tmp_path / "run", training_steps=3, precision="fp16",
                                  auto_loss_scaling=True, loss_scaling=2.0**60))
    assert all("grad_norm" in h for h in result.history)  # inf on the skipped steps
    assert result.history[0]["skipped_steps"] >= 1  # 2^60 overflows fp16 at once
    assert result.history[-1]["loss_scale"] < 2.0**60
    lines = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert "grad_norm" in lines[0] and "skipped_steps" in lines[0]
    fp32 = pretrain(tiny_config(shards, tmp_path / "fp32", training_steps=2))
    assert all(0 < h["grad_norm"] < float("inf") for h in fp32.history)


@pytest.fixture(scope="module")
def run_to_4(shards, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "base"
    pretrain(tiny_config(shards, run, training_steps=4, checkpoint_steps=2))
    return run


@pytest.mark.parametrize("change,message", [
    ({"micro_batch_size": 2, "gradient_accumulation": 4}, r"--micro-batch-size 4 -> 2"),
    ({"optimizer": "LAMB"}, r"--optimizer 'AdamWNoBiasCorrection' -> 'LAMB'"),  # unit_test's
    ({"random_seed": 7}, r"--random-seed \d+ -> 7"),  # the data order
    ({"training_steps": 4}, r"--training-steps 4 is not beyond .*step 4"),
])
def test_resume_refuses_what_changes_the_data_position_or_optimizer(run_to_4, shards, tmp_path,
                                                                     change, message):
    overrides = {"training_steps": 6, **change}
    with pytest.raises(ValueError, match=message):
        pretrain(tiny_config(shards, tmp_path / "unused", checkpoint_output_dir=None,
                             checkpoint_input_dir=str(run_to_4),
                             resume_training_from_checkpoint=True, **overrides))


def test_resume_refuses_an_older_step_and_another_runs_folder(run_to_4, shards, tmp_path):
    older = dict(checkpoint_input_dir=str(run_to_4 / "step_2"),
                 resume_training_from_checkpoint=True, training_steps=6)
    with pytest.raises(ValueError, match="not the newest step .*step_4 is.*branch"):
        pretrain(tiny_config(shards, run_to_4, **older))
    other = tmp_path / "other"
    pretrain(tiny_config(shards, other, training_steps=1))
    with pytest.raises(ValueError, match="holds another run's checkpoints"):
        pretrain(tiny_config(shards, other, **older))
    branch = pretrain(tiny_config(shards, tmp_path / "branch", **older))  # a new folder: fine
    assert branch.steps == 6 and _steps(tmp_path / "branch")[-1] == "step_6"


def test_exact_resume_with_evaluation_on(shards, tmp_path):
    common = dict(eval_files=[shards], eval_every=1, hidden_dropout_prob=0.1)
    whole = pretrain(tiny_config(shards, tmp_path / "whole", training_steps=4, **common))
    pretrain(tiny_config(shards, tmp_path / "half", training_steps=2, **common))
    resumed = pretrain(tiny_config(shards, tmp_path / "half", training_steps=4,
                                   checkpoint_input_dir=str(tmp_path / "half"),
                                   resume_training_from_checkpoint=True, **common))
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in whole.history[2:]]


def test_a_crash_before_the_first_real_checkpoint_does_not_block_a_rerun(shards, tmp_path,
                                                                          monkeypatch):
    from bertforge.train.engine import Engine

    def out_of_memory(self, micro, param_stats=None):
        raise RuntimeError("CUDA out of memory (simulated)")

    run = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(Engine, "train_step", out_of_memory)
        with pytest.raises(RuntimeError, match="out of memory"):
            pretrain(tiny_config(shards, run, training_steps=2, save_initial_checkpoint=True))
    assert _steps(run) == ["step_0"]
    assert pretrain(tiny_config(shards, run, training_steps=2)).steps == 2


def test_killed_saves_leave_nothing_half_done(shards, tmp_path):
    run = tmp_path / "run"
    pretrain(tiny_config(shards, run, training_steps=2, save_initial_checkpoint=True))
    (run / ".tmp-step_3-999").mkdir()  # a save killed while writing
    (run / "step_2").rename(run / ".old-step_2-999")  # killed between moving aside and renaming
    (run / "step_2").mkdir()
    (run / "step_2" / "config.json").write_text("{}")  # an incomplete step: no weights
    assert _steps(run) == ["step_0"]
    ckpt.clean_leftovers(run)
    assert _steps(run) == ["step_0", "step_2"] and not list(run.glob(".tmp-*"))
    assert not list(run.glob(".old-*"))


def test_a_failure_on_rank_0_alone_stops_every_rank(tmp_path):
    """Rank 0 writes (checkpoints, tokenizer files); when that fails, the other ranks stop
    too, with a line naming what failed, instead of waiting at a barrier for 30 minutes."""
    import os
    import subprocess
    import sys
    script = tmp_path / "fail_on_main.py"
    script.write_text(
        "from bertforge.train.distributed import init_distributed, on_main, shutdown\n"
        "ctx = init_distributed('cpu')\n"
        "def save():\n"
        "    raise OSError('No space left on device (simulated)')\n"
        "try:\n"
        "    on_main(ctx, save, 'saving step 3')\n"
        "except Exception as err:\n"
        "    print(f'rank {ctx.rank}: {type(err).__name__}: {err}', flush=True)\n"
        "shutdown(ctx)\n")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node",
                           "2", "--standalone", str(script)], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert "rank 0: OSError: No space left on device (simulated)" in done.stdout, done.stderr
    assert "rank 1: RuntimeError: saving step 3 failed on rank 0" in done.stdout, done.stderr


TEARDOWN_SCRIPT = """
import sys
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from bertforge.train import distributed as d

def rank_main(rank, folder, rounds):
    torch.set_num_threads(1)
    for i in range(rounds):
        dist.init_process_group("gloo", init_method=f"file://{folder}/store{i}", rank=rank,
                                world_size=2)
        ctx = d.DistContext(rank=rank, world_size=2, local_rank=rank, device=torch.device("cpu"))
        model = d.wrap_model(torch.nn.Linear(4, 4), ctx)
        model(torch.ones(2, 4)).sum().backward()
        d.all_reduce_sum(torch.ones(3), ctx)
        d.on_main(ctx, lambda: None, "nothing")
        if i % 2:  # the engine's order: the wrapper goes first
            del model
            d.shutdown(ctx)
        else:  # a wrapper that outlives the group: its handle is parked
            d.shutdown(ctx)
            del model
    d._release_parked()
    print(f"rank {rank}: {rounds} teardowns, {len(d._PARKED)} handles left", flush=True)

if __name__ == "__main__":
    mp.spawn(rank_main, args=(sys.argv[1], int(sys.argv[2])), nprocs=2)
"""


def test_process_group_teardown_never_hangs(tmp_path):
    """Leaving the process group must not deadlock: DDP's reducer dropping the group's last
    reference joins gloo's threads holding the GIL that a thread freeing a finished collective
    needs (distributed._WRAPPERS). 40 teardowns: before the fix 4 of 5 runs of 20 hung."""
    import os
    import signal
    import subprocess
    import sys
    script = tmp_path / "teardown.py"
    script.write_text(TEARDOWN_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path), "40"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        out, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("leaving the process group hung (a rank stuck joining gloo's threads)")
    assert proc.returncode == 0, out
    for rank in (0, 1):
        assert f"rank {rank}: 40 teardowns, 0 handles left" in out, out
