"""The one training engine behind `bertforge pretrain` and `bertforge squad`.

A recipe is a small task object (train/task.py: model, batches, loss, evaluation); the engine
owns everything else, once: process and device set-up, seeding, the run directory, checkpoint
load / save / exact resume, precision and loss scaling, optimizer and schedule, the step
(gradient accumulation with exact global normalisers, DDP no_sync until the last micro-batch),
the metrics log, the progress bar or step line, and the checkpoint and evaluation cadence.

One optimizer step = `gradient_accumulation` micro-batches per process x world size. The
task computes the step's loss normalisers from all of the step's micro-batches first (an
all-reduce when they depend on the data), so the summed micro-batch losses are exactly the
mean over the whole step: k accumulated micro-batches, or N DDP ranks, give the update of one
big batch (tests check both for both recipes).

Exact resume: a checkpoint after step s holds the optimizer, schedule, grad scaler, the RNG
states and the number of micro-batches consumed; the task restarts its batches there, so 2N
steps in one go and N + resume + N give identical losses and weights on CPU.

Costs beyond the task's own work: one small all-reduce of the step's statistics per step and
whatever the task's normalisers need (pre-training: two scalars), negligible next to the
gradient all-reduce.

Two opt-in diagnostics, both here because both need the step loop:
- --wandb-param-steps N: every N steps (0, N, 2N, ...), rank 0 logs the norm, mean and std of
  every parameter tensor and of its gradient (after unscaling and clipping, before the update)
  as the "params" split of the metrics log (metrics.jsonl, TensorBoard, wandb). Cost on such a
  step: ~6 reductions per tensor and one device sync (BERT-base: ~200 tensors, ~1,200 values).
- --profile-dir DIR: a torch.profiler trace of steps 3-5 (steps 1-2 are compilation, cache and
  allocator warm-up), one Chrome trace JSON per rank (`rank<R>.<time>.pt.trace.json`), which
  TensorBoard's profiler plugin and Perfetto open. Profiling slows those three steps (CPU-side
  op recording); the other steps run untouched.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bertforge.config import flag_name
from bertforge.model.attention import check_varlen
from bertforge.train import checkpoint as ckpt
from bertforge.train.distributed import (DistContext, all_reduce_sum, on_main, sync_gradients,
                                         wrap_model)
from bertforge.train.longrun import Eta, StopRequests, startup_summary
from bertforge.train.metrics import (MetricsLogger, format_duration, format_step_line,
                                     parameter_statistics)
from bertforge.train.optim import build_optimizer
from bertforge.train.precision import Precision
from bertforge.train.runtime import configure_compile_cache, default_run_dir, seed_everything
from bertforge.train.task import Task

log = logging.getLogger("bertforge")


@dataclass
class TrainResult:
    run_dir: Path
    final_checkpoint: Path | None = None
    steps: int = 0
    history: list[dict[str, float]] = field(default_factory=list)  # per-step train metrics
    eval: dict[str, float] | None = None
    # A task's target (pre-training: --target-mlm-accuracy) reached: {step, samples, wall_s,
    # train_s, <metric>, eval: the evaluation's metrics}
    target_reached: dict[str, Any] | None = None

    def last_mean(self, key: str, n: int = 10) -> float:
        values = [h[key] for h in self.history[-n:]]
        return sum(values) / max(1, len(values))


class Diverged(ValueError):
    """A step's loss or gradient norm is inf/nan (not an fp16 overflow the loss scaler skips)."""

    def __init__(self, loss: float, grad_norm: float):
        self.loss, self.grad_norm = loss, grad_norm
        super().__init__(f"loss {loss:.4g}, gradient norm {grad_norm:.4g}")


class Engine:
    """Holds a run's objects; `train()` runs the task's steps. Built on every rank; rank 0
    alone writes the run directory."""

    def __init__(self, cfg: Any, ctx: DistContext, task: Task):
        import transformers

        self.cfg, self.ctx, self.task = cfg, ctx, task
        t, c = cfg.train, cfg.checkpoint
        configure_compile_cache(t.executable_cache_dir)
        transformers.utils.logging.disable_progress_bar()  # no "Writing model shards" bar per save
        seed_everything(t.random_seed)
        self.source = ckpt.resolve_checkpoint(c.checkpoint_input_dir) \
            if c.checkpoint_input_dir else None
        self.state: dict[str, Any] | None = None
        if c.resume_training_from_checkpoint:
            self.state = ckpt.load_training_state(Path(self.source))
        if c.checkpoint_output_dir:
            self.run_dir = Path(c.checkpoint_output_dir)
        elif self.state is not None:
            self.run_dir = Path(self.source).parent
        else:
            self.run_dir = default_run_dir(cfg.config, recipe=task.name)
        on_main(ctx, lambda: ckpt.clean_leftovers(self.run_dir), "cleaning the run folder")
        if task.trains:  # on every rank (it only reads), so all of them stop, none waits
            ckpt.check_run_dir(self.run_dir, Path(self.source) if self.state else None)
        if self.state is not None:
            self.check_resume()
        # Tokenizer files saved with every checkpoint; the task sets them (build_model, prepare).
        self.tokenizer_dir: Path | None = None
        self.last_checkpoint: Path | None = None  # rank 0: the newest complete step of this run
        self.model = task.build_model(self)
        if self.source is not None:
            # The checkpoint decides the shape: record it in the run config that gets saved.
            for f in dataclasses.fields(cfg.model):
                if hasattr(self.model.config, f.name) and f.name != "attn_implementation":
                    setattr(cfg.model, f.name, getattr(self.model.config, f.name))
        if cfg.model.activation_checkpointing:
            from bertforge.model.bert import enable_activation_checkpointing
            enable_activation_checkpointing(self.model)
        if cfg.model.attn_implementation == "varlen":
            check_varlen(ctx.device, t.precision, self.model.config.attention_probs_dropout_prob,
                         training=task.trains)
        self.model = self.model.to(ctx.device)
        self.precision = Precision(t.precision, ctx.device, auto_loss_scaling=t.auto_loss_scaling,
                                   loss_scaling=t.loss_scaling)

    # ------------------------------------------------------------ checkpoints
    def check_resume(self) -> None:
        """Refuse a resume whose settings would make the saved data position or optimizer
        state mean something else (the task names those settings: `Task.resume_keys`)."""
        saved = json.loads((Path(self.source) / ckpt.CONFIG_FILE).read_text())
        now = self.cfg.to_dict()
        changed = [f"{flag_name(key)} {saved.get(section, {}).get(key)!r} -> "
                   f"{now[section][key]!r}" for section, key in self.task.resume_keys
                   if saved.get(section, {}).get(key, now[section][key]) != now[section][key]]
        if self.task.order_depends_on_world_size and \
                self.state.get("world_size", self.ctx.world_size) != self.ctx.world_size:
            changed.append(f"world size {self.state['world_size']} -> {self.ctx.world_size}")
        if changed:
            raise ValueError(
                f"cannot resume {self.source}: {', '.join(changed)} would change what its saved "
                "data position and optimizer state mean; resume with the saved settings, or "
                "start a new run from its weights (drop --resume-training-from-checkpoint)")

    def save(self, step: int, consumed_batches: int, metrics: dict[str, float]) -> Path | None:
        """Checkpoint `step` (rank 0 writes, every rank waits); its path on rank 0."""
        path = on_main(self.ctx, lambda: self._write_checkpoint(step, consumed_batches, metrics),
                       f"saving step {step}")
        self.last_checkpoint = path
        return path

    def _write_checkpoint(self, step: int, consumed_batches: int, metrics: dict[str, float]
                          ) -> Path:
        """Rank 0's part of `save`: the step directory, then --keep-last-checkpoints."""
        state = {"step": step, "consumed_batches": consumed_batches,
                 "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(),
                 "precision": self.precision.state_dict(),
                 "rng": ckpt.rng_state(), "metrics": metrics,
                 "world_size": self.ctx.world_size}
        path = ckpt.save_checkpoint(self.run_dir, step, self.model, state, self.cfg.to_dict(),
                                    tokenizer_dir=self.tokenizer_dir)
        log.info("saved checkpoint %s", path)
        keep = self.cfg.checkpoint.keep_last_checkpoints
        if keep:
            for old in ckpt.prune_steps(self.run_dir, keep):
                log.info("deleted %s (--keep-last-checkpoints %d)", old, keep)
        return path

    # ------------------------------------------------------------ one step
    def train_step(self, micro_batches: list[dict[str, torch.Tensor]],
                   param_stats: dict[str, float] | None = None) -> dict[str, float]:
        """One optimizer step over the step's micro-batches; the step's metrics (all ranks).
        A `param_stats` dict is filled with parameter and gradient statistics (see the module
        docstring) just before the update."""
        norms = self.task.normalizers(micro_batches, self.ctx)
        totals = None
        for i, batch in enumerate(micro_batches):
            with sync_gradients(self.ddp_model, i == len(micro_batches) - 1), \
                    self.precision.autocast():
                loss, stats = self.task.loss(self.forward, batch, norms)
            self.precision.backward(loss)
            stats = stats.detach().to(torch.float64)
            totals = stats if totals is None else totals + stats
        metrics = self.task.metrics(all_reduce_sum(totals, self.ctx).tolist(), self.ctx.world_size)
        grad_norm = float(self.precision.unscale_and_clip(self.optimizer, self.cfg.optim.max_grad_norm))
        finite = math.isfinite(metrics["loss"]) and math.isfinite(grad_norm)
        if not finite and not self.precision.skips_bad_steps:
            # Before the update: the weights stay those of the last good step.
            raise Diverged(metrics["loss"], grad_norm)
        if param_stats is not None:
            param_stats.update(parameter_statistics(self.model))
        skipped = self.precision.step(self.optimizer)
        self.optimizer.zero_grad(set_to_none=True)
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        metrics.update(lr=lr, grad_norm=grad_norm)
        if self.precision.skips_bad_steps:
            self.skipped_steps += skipped
            metrics.update(loss_scale=self.precision.loss_scale, skipped_steps=self.skipped_steps)
            if skipped:
                log.warning("fp16 loss scaling: non-finite gradients, step skipped and the loss "
                            "scale lowered to %g (%d steps skipped so far)",
                            self.precision.loss_scale, self.skipped_steps)
        return metrics

    def compile_only(self) -> TrainResult:
        """Compile forward+backward on one synthetic micro-batch (fills --executable-cache-dir)."""
        self._build_optimizer(self.cfg.train.training_steps)
        batch = self.task.synthetic_batch(self.ctx.device)
        start = time.perf_counter()
        with self.precision.autocast():
            loss, _ = self.task.loss(self.forward, batch, None)
        self.precision.backward(loss)
        self.optimizer.zero_grad(set_to_none=True)
        if self.ctx.is_main:
            print(f"compile-only: compiled forward+backward in {time.perf_counter() - start:.1f} s"
                  f" (cache: {self.cfg.train.executable_cache_dir or 'none'})")
        return TrainResult(run_dir=self.run_dir)

    def _build_optimizer(self, steps: int) -> None:
        from bertforge.train.schedule import build_scheduler
        o = self.cfg.optim
        self.optimizer = build_optimizer(self.model, o)
        self.scheduler = build_scheduler(self.optimizer, o.lr_schedule, o.lr_warmup, steps)
        self.ddp_model = wrap_model(self.task.training_module(self.model), self.ctx)
        self.forward = torch.compile(self.ddp_model) if self.cfg.train.compile else self.ddp_model
        if self.cfg.train.compile and self.ctx.device.type == "cpu" and self.ctx.is_main:
            log.warning("--compile on a CPU: measured 0.82x eager for demo_tiny_128 plus 6-20 s "
                        "of compilation (docs/benchmarks.md); it pays on GPUs")

    def close(self) -> None:
        """Drop the DDP wrapper (and its compiled form) before the process group goes:
        distributed._WRAPPERS says why."""
        self.ddp_model = self.forward = None

    # ------------------------------------------------------------ the run
    def train(self, result: TrainResult, logger: MetricsLogger | None) -> TrainResult:
        """The task's training steps, checkpoints and evaluations, into `result`."""
        cfg, ctx, t, task = self.cfg, self.ctx, self.cfg.train, self.task
        steps = task.prepare(self)  # may read data to know the step count
        t.training_steps = steps  # the saved config names the schedule that ran
        self._build_optimizer(steps)
        start_step, consumed = 0, 0
        metrics: dict[str, float] = {}
        if self.state is not None:
            if steps <= int(self.state["step"]):
                raise ValueError(f"--training-steps {steps} is not beyond {self.source}'s step "
                                 f"{self.state['step']}: give more steps to continue it, or "
                                 "start a new run from its weights (drop "
                                 "--resume-training-from-checkpoint)")
            self.optimizer.load_state_dict(self.state["optimizer"])
            self.scheduler.load_state_dict(self.state["scheduler"])
            self.precision.load_state_dict(self.state["precision"])
            start_step = int(self.state["step"])
            consumed = int(self.state["consumed_batches"])
            metrics = dict(self.state["metrics"])
        if ctx.is_main:
            (self.run_dir / ckpt.CONFIG_FILE).write_text(json.dumps(cfg.to_dict(), indent=1))
        batches = task.step_batches(self, start_step, consumed)
        if self.state is not None:
            ckpt.set_rng_state(self.state["rng"])  # after building everything that draws
        if ctx.is_main:
            for line in startup_summary(cfg, self.model, ctx, task.name, start_step, steps,
                                        task.summary_lines(self)):
                log.info(line)
        if start_step == 0 and cfg.checkpoint.save_initial_checkpoint:
            self.save(0, consumed, metrics)
        # Wall clock since the run began (evaluations and checkpoints included, as MLPerf counts
        # time to train) and time in training steps alone; a resumed run continues both.
        clock = _Clock(metrics.get("wall_s", 0.0), metrics.get("train_s", 0.0),
                       metrics.get("samples", 0.0))
        self.skipped_steps = int(metrics.get("skipped_steps", 0))
        from bertforge.progress import bars_enabled, progress
        # A bar on a terminal, else (a log file, --disable-progress-bar) the step line.
        use_bar = ctx.is_main and not t.disable_progress_bar and bars_enabled()
        bar = progress(range(start_step, steps), total=steps, desc=task.name, unit="step",
                       disable=not use_bar)
        bar.update(start_step)
        self.model.train()
        done, saved_step = start_step, None  # saved_step: the last periodic checkpoint
        profiler = self._start_profiler()
        eta = Eta(start_step, steps)
        with StopRequests(ctx) as stop:
            for step in bar:
                begin = time.perf_counter()
                micro = next(batches)
                stats_every = t.wandb_param_steps
                param_stats = {} if stats_every and step % stats_every == 0 and ctx.is_main \
                    else None
                try:
                    metrics = self.train_step(micro, param_stats)
                except Diverged as err:
                    kept = self.last_checkpoint or "none was saved"
                    raise ValueError(
                        f"step {step}: {err}: training diverged; the weights were not updated "
                        f"and no checkpoint is written (the last good one: {kept}). Try a lower "
                        "--learning-rate or a longer --lr-warmup, --max-grad-norm 1.0, or "
                        "--precision bf16 (fp16 needs --auto-loss-scaling)") from None
                consumed += len(micro)
                elapsed = time.perf_counter() - begin
                done = step + 1
                # "sequences": this step's (task metric); "samples": since the run began.
                metrics["samples_per_s"] = metrics["sequences"] / elapsed
                if "real_tokens" in metrics:
                    metrics["real_tokens_per_s"] = metrics["real_tokens"] / elapsed
                metrics.update(clock.step(elapsed, metrics["sequences"]))
                left = eta.seconds(done)
                if left is not None:
                    metrics["eta_s"] = left
                result.history.append(metrics)
                if ctx.is_main:
                    logger.log(step, metrics)
                    if not use_bar:
                        print(format_step_line(step, steps, metrics, task.step_fields(metrics)),
                              flush=True)
                    else:
                        bar.set_postfix(**task.step_fields(metrics, short=True),
                                        sps=f"{metrics['samples_per_s']:.0f}", refresh=False)
                    if param_stats is not None:
                        logger.log(step, param_stats, prefix="params")
                    if done == start_step + 1 and done < steps:
                        log.info("%s: step %d took %.1f s: about %s for the %d steps left (the "
                                 "step line's ETA follows the average)", task.name, step,
                                 elapsed, format_duration(left), steps - done)
                if profiler is not None:
                    profiler.step()
                every = cfg.checkpoint.checkpoint_steps
                if every and done % every == 0 and done < steps:
                    result.final_checkpoint, saved_step = self.save(done, consumed, metrics), done
                if done < steps and (signum := stop.requested()):
                    self._stop_for_signal(signum, done, consumed, metrics, saved_step)
                if task.eval_every and done % task.eval_every == 0 and done < steps:
                    ev = self._evaluate(done, clock, logger)
                    if ev is not None and task.target_met(ev):
                        result.target_reached = self._report_target(done, ev)
                        break
        if profiler is not None:
            profiler.stop()  # writes the trace if the run ended inside the profiled steps
        result.steps = done
        if saved_step != done:  # a target reached at a checkpoint step is saved already
            result.final_checkpoint = self.save(done, consumed, metrics)
        if result.target_reached is not None:
            result.eval = result.target_reached["eval"]
            return result
        result.eval = self._evaluate(done, clock, logger)
        if result.eval is not None and task.target is not None:
            if task.target_met(result.eval):
                result.target_reached = self._report_target(done, result.eval)
            elif ctx.is_main:
                name, value = task.target
                print(f"target {name} {value} not reached in {done} steps: held-out {name} "
                      f"{result.eval[name]:.4f}", flush=True)
        return result

    def _stop_for_signal(self, signum: int, done: int, consumed: int,
                         metrics: dict[str, float], saved_step: int | None) -> None:
        """SIGTERM/SIGUSR1 arrived (train/longrun.py): checkpoint this step, say how to go on,
        exit with 128 + the signal number."""
        path = self.last_checkpoint if saved_step == done else self.save(done, consumed, metrics)
        if self.ctx.is_main:
            name = signal.Signals(signum).name
            print(f"{self.task.name}: stopped by {name} after step {done}; checkpoint {path}. "
                  f"To continue, run the same command with --checkpoint-input-dir {self.run_dir} "
                  "--resume-training-from-checkpoint", file=sys.stderr, flush=True)
        raise SystemExit(128 + signum)

    def _start_profiler(self) -> torch.profiler.profile | None:
        """A started torch.profiler for --profile-dir (module docstring), else None."""
        directory = self.cfg.train.profile_dir
        if not directory:
            return None
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.ctx.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        # wait 1 + warmup 1 (traced but discarded: the profiler's own start-up) + active 3.
        profiler = torch.profiler.profile(
            activities=activities, record_shapes=True,
            schedule=torch.profiler.schedule(wait=1, warmup=1, active=3, repeat=1),
            on_trace_ready=torch.profiler.tensorboard_trace_handler(
                directory, worker_name=f"rank{self.ctx.rank}"))
        profiler.start()
        log.info("profiling steps 3-5 into %s", directory)
        return profiler

    def open_logger(self) -> MetricsLogger | None:
        """The metrics log of the run directory (rank 0; appended to when resuming)."""
        if not self.ctx.is_main:
            return None
        t = self.cfg.train
        self.run_dir.mkdir(parents=True, exist_ok=True)
        return MetricsLogger(self.run_dir,
                             resume_step=None if self.state is None else int(self.state["step"]),
                             wandb_project=t.wandb_project if t.wandb else None,
                             wandb_config=self.cfg.to_dict())

    def _evaluate(self, step: int, clock: _Clock, logger: MetricsLogger | None
                  ) -> dict[str, float] | None:
        """The task's held-out metrics at `step`, logged with the clock (its time counts as
        wall time)."""
        # Evaluation must not change training: its loaders may draw from the global RNGs
        # (a DataLoader's base seed), so they are restored after it (exact resume with eval).
        rng = ckpt.rng_state()
        self.model.eval()
        with torch.no_grad():
            ev = self.task.evaluate(self)
        self.model.train()
        ckpt.set_rng_state(rng)
        if ev is None:
            return None
        ev.update(clock.evaluated())
        if self.ctx.is_main:
            logger.log(step, ev, prefix="eval")
            log.info("eval at step %d: %s", step, ev)
        return ev

    def _report_target(self, step: int, ev: dict[str, float]) -> dict[str, Any]:
        """The task's target reached: one line with what it took (printed on rank 0)."""
        name, value = self.task.target
        reached = {"step": step, "samples": ev["samples"], "wall_s": ev["wall_s"],
                   "train_s": ev["train_s"], name: ev[name], "eval": ev}
        if self.ctx.is_main:
            print(f"target {name} {value} reached at step {step}: held-out {name} "
                  f"{ev[name]:.4f} after {int(ev['samples']):,} samples, "
                  f"{ev['wall_s']:.1f} s wall ({ev['train_s']:.1f} s in training steps)",
                  flush=True)
        return reached


class _Clock:
    """Wall time, time in training steps, and samples since the run began (across resumes)."""

    def __init__(self, wall_s: float, train_s: float, samples: float):
        self._origin = time.perf_counter() - wall_s
        self.train_s, self.samples = train_s, samples

    def step(self, seconds: float, samples: float) -> dict[str, float]:
        self.train_s += seconds
        self.samples += samples
        return self.evaluated()

    def evaluated(self) -> dict[str, float]:
        return {"wall_s": time.perf_counter() - self._origin, "train_s": self.train_s,
                "samples": self.samples}
