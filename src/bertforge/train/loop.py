"""`bertforge pretrain`: the MLM + NSP training loop on CPU or GPU, one process or many.

One optimizer step = `gradient_accumulation` micro-batches per process x world size. The
loop fetches the step's micro-batches first and counts their labelled MLM positions and
sequences (all-reduced over ranks), then passes those global counts to the model as loss
normalisers: the summed micro-batch losses are then exactly the mean over the whole step,
so k accumulated micro-batches, or N DDP ranks, give the same update as one big batch
(tests check both). DDP gradients sync only on the last micro-step (no_sync).

Exact resume: a checkpoint after step s holds the optimizer, schedule, grad scaler, the RNG
states and the number of micro-batches consumed; the dataset restarts at that batch index
(its order does not depend on DataLoader workers) and the DataLoader has its own generator,
so 2N steps in one go and N + resume + N give identical losses and weights on CPU.

Cost of the counting pass: one small all-reduce per step (two scalars), negligible next to
the gradient all-reduce.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers

from bertforge.config import PretrainConfig
from bertforge.model.attention import check_varlen, implementation
from bertforge.model.bert import (GatheredBertForPreTraining, build_pretraining_model, labelled_slots,
                                  num_sequences)
from bertforge.train import checkpoint as ckpt
from bertforge.train.distributed import (DistContext, all_reduce_sum, barrier, init_distributed,
                                         shutdown, sync_gradients, wrap_model)
from bertforge.train.metrics import MetricsLogger, format_step_line
from bertforge.train.optim import build_optimizer
from bertforge.train.precision import Precision
from bertforge.train.runtime import configure_compile_cache, default_run_dir, seed_everything
from bertforge.train.schedule import build_scheduler
from bertforge.train.sources import eval_batches, random_batch, to_device, training_batches

log = logging.getLogger("bertforge")


@dataclass
class TrainResult:
    run_dir: Path
    final_checkpoint: Path | None
    steps: int
    history: list[dict[str, float]] = field(default_factory=list)  # per-step train metrics
    eval: dict[str, float] | None = None
    # --target-mlm-accuracy: {step, samples, wall_s, train_s, mlm_acc, eval: the held-out
    # metrics} where it was reached
    target_reached: dict[str, Any] | None = None

    def last_mean(self, key: str, n: int = 10) -> float:
        values = [h[key] for h in self.history[-n:]]
        return sum(values) / max(1, len(values))


class Trainer:
    """Holds the run's objects; `run()` trains. Built on every rank, rank 0 alone writes."""

    def __init__(self, cfg: PretrainConfig, ctx: DistContext):
        self.cfg, self.ctx = cfg, ctx
        t, c = cfg.train, cfg.checkpoint
        configure_compile_cache(t.executable_cache_dir)
        transformers.utils.logging.disable_progress_bar()  # no "Writing model shards" bar per save
        seed_everything(t.random_seed)
        self.state: dict[str, Any] | None = None
        source = ckpt.resolve_checkpoint(c.checkpoint_input_dir) if c.checkpoint_input_dir else None
        if source is not None:
            model = GatheredBertForPreTraining.from_pretrained(
                source, attn_implementation=implementation(cfg.model.attn_implementation))
            if cfg.model.activation_checkpointing:
                from bertforge.model.bert import enable_activation_checkpointing
                enable_activation_checkpointing(model)
            if c.resume_training_from_checkpoint:
                self.state = ckpt.load_training_state(Path(source))
            # The checkpoint decides the shape: record it in the run config that gets saved.
            for f in dataclasses.fields(cfg.model):
                if hasattr(model.config, f.name) and f.name != "attn_implementation":
                    setattr(cfg.model, f.name, getattr(model.config, f.name))
        else:
            model = build_pretraining_model(cfg.model.to_bert_config(),
                                            activation_checkpointing=cfg.model.activation_checkpointing,
                                            attn_implementation=cfg.model.attn_implementation)
            init_mlm_prior(model, cfg)
        if cfg.model.attn_implementation == "varlen":
            check_varlen(ctx.device, t.precision, model.config.attention_probs_dropout_prob)
        self.source = source
        if c.checkpoint_output_dir:
            self.run_dir = Path(c.checkpoint_output_dir)
        elif self.state is not None:
            self.run_dir = Path(source).parent
        else:
            self.run_dir = default_run_dir(cfg.config)
        if ctx.is_main:
            ckpt.refuse_existing_run(self.run_dir, resuming=self.state is not None)
        self.model = model.to(ctx.device)
        self.precision = Precision(t.precision, ctx.device, auto_loss_scaling=t.auto_loss_scaling,
                                   loss_scaling=t.loss_scaling)
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim.lr_schedule, cfg.optim.lr_warmup,
                                         t.training_steps)
        self.start_step = 0
        if self.state is not None:
            self.optimizer.load_state_dict(self.state["optimizer"])
            self.scheduler.load_state_dict(self.state["scheduler"])
            self.precision.load_state_dict(self.state["precision"])
            self.start_step = int(self.state["step"])
        self.ddp_model = wrap_model(self.model, ctx)
        self.forward = self.ddp_model
        if t.compile:
            self.forward = torch.compile(self.ddp_model)

    # ------------------------------------------------------------ checkpoints
    def tokenizer_dir(self) -> Path | None:
        """HF tokenizer files for the checkpoints: the source checkpoint's, else the data's vocab."""
        target = self.run_dir / "tokenizer"
        if target.exists():
            return target
        if self.source is not None and Path(self.source).is_dir():
            files = [p for p in Path(self.source).iterdir()
                     if p.name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json",
                                   "special_tokens_map.json")]
            if files:
                target.mkdir(parents=True)
                for p in files:
                    (target / p.name).write_bytes(p.read_bytes())
                return target
        from bertforge.data.vocab import save_tokenizer_files
        tok = self.cfg.data.tokenizer
        is_vocab_file = tok is not None and Path(tok).is_file()
        save_tokenizer_files(target, vocab_file=Path(tok) if is_vocab_file else None,
                             name_or_path=None if is_vocab_file else tok,
                             model_max_length=self.cfg.model.max_position_embeddings)
        size = sum(1 for _ in open(target / "vocab.txt", encoding="utf-8")) \
            if (target / "vocab.txt").exists() else None
        if size is not None and size != self.model.config.vocab_size:
            log.warning("tokenizer has %d entries but the model's vocab_size is %d: checkpoints "
                        "are saved without tokenizer files", size, self.model.config.vocab_size)
            for p in target.iterdir():
                p.unlink()
            target.rmdir()
            return None
        return target

    def save(self, step: int, consumed_batches: int, metrics: dict[str, float]) -> Path | None:
        state = None
        if self.ctx.is_main:
            state = {"step": step, "consumed_batches": consumed_batches,
                     "optimizer": self.optimizer.state_dict(),
                     "scheduler": self.scheduler.state_dict(),
                     "precision": self.precision.state_dict(),
                     "rng": ckpt.rng_state(), "metrics": metrics,
                     "world_size": self.ctx.world_size}
            path = ckpt.save_checkpoint(self.run_dir, step, self.model, state, self.cfg.to_dict(),
                                        tokenizer_dir=self._tok_dir)
            log.info("saved checkpoint %s", path)
        barrier(self.ctx)
        return self.run_dir / f"step_{step}" if self.ctx.is_main else None

    # ------------------------------------------------------------ one step
    def train_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
        ctx = self.ctx
        # Sequences, not rows: a packed row holds several (its NSP mask says how many).
        counts = torch.stack([torch.stack([labelled_slots(b).sum(), num_sequences(b)])
                              for b in micro_batches]).sum(0)
        counts = all_reduce_sum(counts.to(torch.float64), ctx)
        # DDP averages gradients over ranks: scale normalisers so the average is the global mean.
        mlm_norm = (counts[0].clamp(min=1) / ctx.world_size).float()
        nsp_norm = (counts[1] / ctx.world_size).float()
        totals = torch.zeros(7, dtype=torch.float64, device=ctx.device)
        for i, batch in enumerate(micro_batches):
            with sync_gradients(self.ddp_model, i == len(micro_batches) - 1), self.precision.autocast():
                out = self.forward(batch, mlm_normalizer=mlm_norm, nsp_normalizer=nsp_norm)
            self.precision.backward(out.loss)
            totals += torch.stack([out.mlm_loss.detach(), out.nsp_loss.detach(),
                                   out.num_mlm_correct, out.num_masked, out.num_nsp_correct,
                                   out.num_sequences, out.num_tokens]).to(torch.float64)
        self.precision.step(self.optimizer)
        self.optimizer.zero_grad(set_to_none=True)
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        totals[:2] /= ctx.world_size  # per-rank partial means -> global mean after the sum
        totals = all_reduce_sum(totals, ctx).tolist()
        mlm_loss, nsp_loss, mlm_ok, n_mask, nsp_ok, n_seq, n_tok = totals
        return {"loss": mlm_loss + nsp_loss, "mlm_loss": mlm_loss, "nsp_loss": nsp_loss,
                "mlm_acc": mlm_ok / max(1.0, n_mask), "nsp_acc": nsp_ok / max(1.0, n_seq),
                "lr": lr, "sequences": n_seq, "real_tokens": n_tok}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float] | None:
        """MLM/NSP accuracy and loss over every held-out record (records never trained on)."""
        d = self.cfg.data
        if not d.eval_files:
            return None
        self.model.eval()
        sums = torch.zeros(6, dtype=torch.float64, device=self.ctx.device)
        for batch in eval_batches(d.eval_files, micro_batch_size=self.cfg.train.micro_batch_size,
                                  rank=self.ctx.rank, world_size=self.ctx.world_size,
                                  device=self.ctx.device, packed=d.packed_data):
            with self.precision.autocast():
                out = self.model(batch, mlm_normalizer=1.0, nsp_normalizer=1.0)
            sums += torch.stack([out.mlm_loss, out.nsp_loss, out.num_mlm_correct, out.num_masked,
                                 out.num_nsp_correct, out.num_sequences]).to(torch.float64)
        self.model.train()
        mlm_sum, nsp_sum, mlm_ok, n_mask, nsp_ok, n_seq = all_reduce_sum(sums, self.ctx).tolist()
        return {"mlm_loss": mlm_sum / max(1.0, n_mask), "nsp_loss": nsp_sum / max(1.0, n_seq),
                "mlm_acc": mlm_ok / max(1.0, n_mask), "nsp_acc": nsp_ok / max(1.0, n_seq),
                "records": n_seq}

    def compile_only(self) -> TrainResult:
        """Trigger compilation on one synthetic micro-batch (fills --executable-cache-dir), exit."""
        d = self.cfg.data
        gen = torch.Generator().manual_seed(0)
        batch = to_device(random_batch(self.cfg.train.micro_batch_size, d.sequence_length,
                                       d.mask_tokens, self.model.config.vocab_size, gen), self.ctx.device)
        start = time.perf_counter()
        with self.precision.autocast():
            out = self.forward(batch)
        self.precision.backward(out.loss)
        self.optimizer.zero_grad(set_to_none=True)
        if self.ctx.is_main:
            print(f"compile-only: compiled forward+backward in {time.perf_counter() - start:.1f} s"
                  f" (cache: {self.cfg.train.executable_cache_dir or 'none'})")
        return TrainResult(run_dir=self.run_dir, final_checkpoint=None, steps=0)

    # ------------------------------------------------------------ the run
    def run(self) -> TrainResult:
        cfg, ctx, t = self.cfg, self.ctx, self.cfg.train
        if t.compile_only:
            return self.compile_only()
        accum = t.gradient_accumulation
        logger = None
        if ctx.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / ckpt.CONFIG_FILE).write_text(json.dumps(cfg.to_dict(), indent=1))
            logger = MetricsLogger(self.run_dir, resume=self.state is not None,
                                   wandb_project=t.wandb_project if t.wandb else None,
                                   wandb_config=cfg.to_dict())
        self._tok_dir = self.tokenizer_dir() if ctx.is_main else None
        consumed = int(self.state["consumed_batches"]) if self.state else 0
        batches = training_batches(cfg.data, micro_batch_size=t.micro_batch_size,
                                   vocab_size=self.model.config.vocab_size, seed=t.random_seed,
                                   rank=ctx.rank, world_size=ctx.world_size, start_batch=consumed,
                                   device=ctx.device)
        if self.state is not None:
            ckpt.set_rng_state(self.state["rng"])  # after building everything that draws
        result = TrainResult(run_dir=self.run_dir, final_checkpoint=None, steps=t.training_steps)
        metrics: dict[str, float] = dict(self.state["metrics"]) if self.state else {}
        if self.start_step == 0:
            self.save(0, consumed, metrics)
        # Wall clock since the run began (evaluations and checkpoints included, as MLPerf counts
        # time to train) and time in training steps alone; a resumed run continues both.
        clock = _Clock(metrics.get("wall_s", 0.0), metrics.get("train_s", 0.0),
                       metrics.get("samples", 0.0))
        target = cfg.data.target_mlm_accuracy
        saved_step = None  # the step of the last periodic checkpoint
        from bertforge.data.stage import progress
        bar = progress(range(self.start_step, t.training_steps), total=t.training_steps,
                       desc="pretrain", unit="step", disable=t.disable_progress_bar or not ctx.is_main)
        bar.update(self.start_step)
        self.model.train()
        for step in bar:
            start = time.perf_counter()
            micro = [next(batches) for _ in range(accum)]
            metrics = self.train_step(micro)
            consumed += accum
            elapsed = time.perf_counter() - start
            metrics["samples_per_s"] = metrics["sequences"] / elapsed
            metrics["real_tokens_per_s"] = metrics["real_tokens"] / elapsed
            metrics.update(clock.step(elapsed, metrics["sequences"]))
            result.history.append(metrics)
            if ctx.is_main:
                logger.log(step, metrics)
                if t.disable_progress_bar:
                    print(format_step_line(step, t.training_steps, metrics), flush=True)
                else:
                    bar.set_postfix(loss=f"{metrics['loss']:.3f}", mlm_acc=f"{metrics['mlm_acc']:.3f}",
                                    nsp_acc=f"{metrics['nsp_acc']:.3f}",
                                    sps=f"{metrics['samples_per_s']:.0f}", refresh=False)
            done = step + 1
            every = cfg.checkpoint.checkpoint_steps
            if every and done % every == 0 and done < t.training_steps:
                result.final_checkpoint, saved_step = self.save(done, consumed, metrics), done
            if cfg.data.eval_every and done % cfg.data.eval_every == 0 and done < t.training_steps:
                ev = self._evaluate_and_log(done, clock, logger)
                if target is not None and ev["mlm_acc"] >= target:
                    result.target_reached = self._report_target(done, ev, target)
                    break
        last = done if self.start_step < t.training_steps else t.training_steps
        result.steps = last
        if saved_step != last:  # a target reached at a checkpoint step is saved already
            result.final_checkpoint = self.save(last, consumed, metrics)
        result.eval = self._evaluate_and_log(last, clock, logger) if result.target_reached is None \
            else result.target_reached["eval"]
        if result.eval is not None and target is not None and result.target_reached is None:
            if result.eval["mlm_acc"] >= target:
                result.target_reached = self._report_target(last, result.eval, target)
            elif ctx.is_main:
                print(f"target mlm_acc {target} not reached in {last} steps: held-out mlm_acc "
                      f"{result.eval['mlm_acc']:.4f}", flush=True)
        if ctx.is_main:
            logger.close()
        return result

    def _evaluate_and_log(self, step: int, clock: _Clock, logger: MetricsLogger | None
                          ) -> dict[str, float] | None:
        """Held-out accuracy at `step`, logged with the clock (its time counts as wall time)."""
        ev = self.evaluate()
        if ev is None:
            return None
        ev.update(clock.evaluated())
        if self.ctx.is_main:
            logger.log(step, ev, prefix="eval")
            log.info("eval at step %d: %s", step, ev)
        return ev

    def _report_target(self, step: int, ev: dict[str, float], target: float) -> dict[str, Any]:
        """--target-mlm-accuracy reached: one line with what it took (printed on rank 0)."""
        reached = {"step": step, "samples": ev["samples"], "wall_s": ev["wall_s"],
                   "train_s": ev["train_s"], "mlm_acc": ev["mlm_acc"], "eval": ev}
        if self.ctx.is_main:
            print(f"target mlm_acc {target} reached at step {step}: held-out mlm_acc "
                  f"{ev['mlm_acc']:.4f} after {int(ev['samples']):,} samples, "
                  f"{ev['wall_s']:.1f} s wall ({ev['train_s']:.1f} s in training steps)", flush=True)
        return reached


class _Clock:
    """Wall time, time in training steps, and samples since the run began (across resumes)."""

    def __init__(self, wall_s: float, train_s: float, samples: float):
        self._origin = time.perf_counter() - wall_s
        self.train_s, self.samples = train_s, samples

    def step(self, seconds: float, sequences: float) -> dict[str, float]:
        self.train_s += seconds
        self.samples += sequences
        return self.evaluated()

    def evaluated(self) -> dict[str, float]:
        return {"wall_s": time.perf_counter() - self._origin, "train_s": self.train_s,
                "samples": self.samples}


def init_mlm_prior(model: GatheredBertForPreTraining, cfg: PretrainConfig) -> None:
    """--mlm-bias-init unigram on a new model with real shards: the decoder bias starts at the
    masked tokens' log frequencies (model/bert.py: init_mlm_bias says why). Every rank reads
    the same first records, so every rank starts from the same weights."""
    d = cfg.data
    if cfg.model.mlm_bias_init != "unigram" or d.synthetic_data or d.dataset != "pretraining":
        return
    from bertforge.data.loader import masked_label_counts
    from bertforge.model.bert import init_mlm_bias
    counts = masked_label_counts(d.input_files, model.config.vocab_size)
    init_mlm_bias(model, counts)
    log.info("MLM bias starts at the unigram prior of %d masked tokens (--mlm-bias-init unigram)",
             int(counts.sum()))


def data_packing_factor(data) -> float:
    """Sequences per row of the training data: 1 unpacked, measured on a sample of packed
    records with --packed-data (so the global batch stays counted in sequences). Mixed packed
    and unpacked inputs, or a kind that contradicts --packed-data, are refused here."""
    if data.synthetic_data or data.dataset != "pretraining" or not data.input_files:
        return 1.0
    from bertforge.data.packed import check_inputs, measure_packing_factor
    check_inputs(data.input_files, data.packed_data)
    if data.eval_files:
        check_inputs(data.eval_files, data.packed_data)
    if not data.packed_data:
        return 1.0
    factor = measure_packing_factor(data.input_files)
    log.info("packed data: %.3f sequences per row; gradient accumulation divided by it", factor)
    return factor


def pretrain(cfg: PretrainConfig) -> TrainResult:
    """Resolve `cfg` for this process group and train; the entry point of `bertforge pretrain`."""
    ctx = init_distributed(cfg.train.device)
    try:
        return Trainer(cfg.resolve(ctx.world_size, data_packing_factor(cfg.data)), ctx).run()
    finally:
        shutdown(ctx)
