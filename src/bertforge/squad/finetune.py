"""`bertforge squad`: fine-tune BertForQuestionAnswering, predict, write the official files, score.

Built from the pre-training engine's parts (train/): the same optimizer and parameter groups,
LR schedule, Precision (bf16/fp16 autocast, loss scaling), DDP wrapping with no_sync
accumulation, atomic self-describing step checkpoints with exact resume, and the metrics log
(JSON lines + TensorBoard, optional wandb). Only what is SQuAD's own lives here.

Model: BertForQuestionAnswering from --checkpoint-input-dir (a bertforge pre-training step or
run directory, any Hugging Face BERT directory, or a hub name); the QA head is new unless the
source is already a QA model. The dropout rates of the model section apply to it (presets set
attention dropout 0.1 / 0.15 as the reference); its shape is the checkpoint's. Without a
checkpoint the model section's shape is initialised at random (tests, speed measurements).

Batches: step s takes global-batch windows s*G .. (s+1)*G-1 of an endless stream of seeded
per-epoch permutations (epoch e: permutation of seed (random_seed, e)), rank r its slice of
micro x accumulation. The order depends only on the seed and the step, so a resume at step s
continues exactly and any world size sees the same global batches. Steps = ceil(epochs x
windows / G) unless --training-steps is given.

Loss: mean over the global batch of (CE(start) + CE(end)) / 2, the softmax taken over a
window's real tokens (padding logits masked). The reference let padded positions into the
softmax; masking them makes the loss independent of the batch layout (padded to 384, to the
longest window, or packed) at no cost. Rows are padded to the batch's longest window, or to
--sequence-length with --compile so the graph is compiled once. SQuAD-shaped windows average
193 real tokens (50% of 384) but 3% are full, so padding to the longest saves only 4-10% of
token slots at micro-batch 32-16. With --packed-data each micro-batch's windows are packed
up to 3 per row instead (squad/packed.py: block-diagonal attention, each window's softmax over
its own tokens), which removes most of the rest; the loss is the same, window for window.

Validation runs on rank 0 after training: logits per window, post-processing, predictions.json
/ nbest_predictions.json / null_odds.json, and the official metric; for SQuAD 2.0 the result
includes the best null-score threshold found on that set (rerun with it as
--null-score-diff-threshold, as the reference's README advises).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from bertforge.model.attention import check_varlen, implementation
from bertforge.squad.config import SquadConfig
from bertforge.squad.data import SquadSet, load_split, skipped_line
from bertforge.squad.features import Window, WindowSpec, build_windows, pad_windows
from bertforge.squad.metric import evaluate_v1, evaluate_v2
from bertforge.squad.packed import (PackedQuestionAnswering, pack_windows, packed_tensors,
                                    predict_logits_packed, run_packed, window_logits)
from bertforge.squad.postprocess import postprocess
from bertforge.train import checkpoint as ckpt
from bertforge.train.distributed import (DistContext, all_reduce_sum, barrier, init_distributed,
                                         shutdown, sync_gradients, wrap_model)
from bertforge.train.metrics import MetricsLogger
from bertforge.train.optim import build_optimizer
from bertforge.train.precision import Precision
from bertforge.train.runtime import configure_compile_cache, default_run_dir, seed_everything
from bertforge.train.schedule import build_scheduler

log = logging.getLogger("bertforge")
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt")


@dataclass
class SquadResult:
    run_dir: Path
    final_checkpoint: Path | None = None
    steps: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    eval: dict[str, float] | None = None
    files: dict[str, Path] = field(default_factory=dict)
    summaries: list[str] = field(default_factory=list)

    def last_mean(self, key: str, n: int = 10) -> float:
        values = [h[key] for h in self.history[-n:]]
        return sum(values) / max(1, len(values))


# ---------------------------------------------------------------- model and tokenizer
def write_tokenizer(target: Path, source: Path | str | None, tokenizer: str | None) -> None:
    """HF tokenizer files in `target`: --tokenizer, else the checkpoint's, else bert-base-uncased."""
    from bertforge.data.vocab import save_tokenizer_files
    if tokenizer is not None:
        if Path(tokenizer).is_file():
            save_tokenizer_files(target, vocab_file=Path(tokenizer))
        else:
            save_tokenizer_files(target, name_or_path=tokenizer)
    elif source is not None and (not Path(source).is_dir() or
                                 any((Path(source) / f).exists() for f in TOKENIZER_FILES)):
        save_tokenizer_files(target, name_or_path=str(source))
    else:
        if source is not None:
            log.info("%s holds no tokenizer files: using the bert-base-uncased vocab", source)
        save_tokenizer_files(target)


def build_qa_model(source: Path | str | None, model_section: Any, *, need_trained_head: bool):
    """BertForQuestionAnswering from `source` (see module docstring) or at random from the shape."""
    import transformers
    m = model_section
    if source is None:
        log.warning("no --checkpoint-input-dir: fine-tuning a randomly initialised BERT (%d "
                    "layers, hidden %d); fine for tests, meaningless for SQuAD scores",
                    m.num_hidden_layers, m.hidden_size)
        return transformers.BertForQuestionAnswering(m.to_bert_config())
    try:
        model, info = transformers.BertForQuestionAnswering.from_pretrained(
            source, output_loading_info=True, hidden_dropout_prob=m.hidden_dropout_prob,
            attention_probs_dropout_prob=m.attention_probs_dropout_prob,
            attn_implementation=implementation(m.attn_implementation))
    except OSError as err:
        raise ValueError(f"--checkpoint-input-dir {source}: cannot load a BERT model ({err})") \
            from None
    missing = info["missing_keys"]
    encoder_missing = sorted(k for k in missing if not k.startswith("qa_outputs"))
    if encoder_missing:
        raise ValueError(f"--checkpoint-input-dir {source}: not a BERT checkpoint, it lacks "
                         f"{len(encoder_missing)} encoder weights (e.g. {encoder_missing[0]})")
    if need_trained_head and any(k.startswith("qa_outputs") for k in missing):
        raise ValueError(f"--checkpoint-input-dir {source} has no question-answering head: it is "
                         "not fine-tuned on SQuAD; fine-tune it first (--squad-do-training true)")
    return model


# ---------------------------------------------------------------- batches
def step_indices(num_windows: int, global_batch: int, seed: int, start_step: int = 0
                 ) -> Iterator[np.ndarray]:
    """Window indices of each optimizer step from `start_step` on (see module docstring)."""
    cache: dict[int, np.ndarray] = {}

    def permutation(epoch: int) -> np.ndarray:
        if epoch not in cache:
            cache.clear()  # steps advance monotonically: at most two epochs are live
            cache[epoch] = np.random.default_rng([seed, epoch]).permutation(num_windows)
        return cache[epoch]

    step = start_step
    while True:
        positions = np.arange(step * global_batch, (step + 1) * global_batch)
        epochs, within = np.divmod(positions, num_windows)
        out = np.empty(global_batch, dtype=np.int64)
        for epoch in np.unique(epochs):
            sel = epochs == epoch
            out[sel] = permutation(int(epoch))[within[sel]]
        yield out
        step += 1


def to_tensors(windows: Sequence[Window], device: torch.device, pad_to: int | None = None,
               pad_id: int = 0) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v).to(device) for k, v in
            pad_windows(windows, pad_to=pad_to, pad_id=pad_id).items()}


def masked_logits(out: Any, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Start/end logits in fp32 with padding at the dtype's minimum (out of every softmax)."""
    pad = attention_mask == 0
    low = torch.finfo(torch.float32).min
    return (out.start_logits.float().masked_fill(pad, low),
            out.end_logits.float().masked_fill(pad, low))


@torch.no_grad()
def predict_logits(model: torch.nn.Module, windows: Sequence[Window], *, batch_size: int,
                   device: torch.device, precision: Precision | None = None,
                   pad_to: int | None = None, pad_id: int = 0, progress: bool = False
                   ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per-window start/end logits (each trimmed to its window's length), in window order."""
    from bertforge.data.stage import progress as bar
    model.eval()
    starts: list[np.ndarray] = []
    ends: list[np.ndarray] = []
    for lo in bar(range(0, len(windows), batch_size), desc="squad predict", unit="batch",
                  disable=None if progress else True):
        chunk = windows[lo:lo + batch_size]
        batch = to_tensors(chunk, device, pad_to=pad_to, pad_id=pad_id)
        with precision.autocast() if precision is not None else torch.autocast("cpu", enabled=False):
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        token_type_ids=batch["token_type_ids"])
        s, e = (t.float().cpu().numpy() for t in (out.start_logits, out.end_logits))
        for row, w in enumerate(chunk):
            starts.append(s[row, :len(w)].copy())
            ends.append(e[row, :len(w)].copy())
    return starts, ends


# ---------------------------------------------------------------- the run
class SquadTrainer:
    """Holds the run's objects; `run()` trains (if asked) and validates (if asked)."""

    def __init__(self, cfg: SquadConfig, ctx: DistContext):
        import transformers

        self.cfg, self.ctx = cfg, ctx
        t, c, s = cfg.train, cfg.checkpoint, cfg.squad
        configure_compile_cache(t.executable_cache_dir)
        transformers.utils.logging.disable_progress_bar()
        seed_everything(t.random_seed)
        self.source = ckpt.resolve_checkpoint(c.checkpoint_input_dir) \
            if c.checkpoint_input_dir else None
        self.state = None
        if c.resume_training_from_checkpoint:
            self.state = ckpt.load_training_state(Path(self.source))
        if c.checkpoint_output_dir:
            self.run_dir = Path(c.checkpoint_output_dir)
        elif self.state is not None:
            self.run_dir = Path(self.source).parent
        else:
            self.run_dir = default_run_dir(cfg.config, recipe="squad")
        if ctx.is_main:
            if s.squad_do_training:
                ckpt.refuse_existing_run(self.run_dir, resuming=self.state is not None)
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if not (self.run_dir / "tokenizer").exists():
                write_tokenizer(self.run_dir / "tokenizer", self.source, cfg.data.tokenizer)
        barrier(ctx)
        self.tokenizer_dir = self.run_dir / "tokenizer"
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(self.tokenizer_dir)
        self.model = build_qa_model(self.source, cfg.model,
                                    need_trained_head=not s.squad_do_training).to(ctx.device)
        if self.source is not None:
            # The checkpoint decides the shape: record it in the run config that gets saved.
            for f in dataclasses.fields(cfg.model):
                if hasattr(self.model.config, f.name) and f.name != "attn_implementation":
                    setattr(cfg.model, f.name, getattr(self.model.config, f.name))
        if len(self.tokenizer) > self.model.config.vocab_size:
            raise ValueError(f"the tokenizer has {len(self.tokenizer)} tokens but the model's "
                             f"vocab_size is {self.model.config.vocab_size}; give the tokenizer "
                             "the model was pre-trained with (--tokenizer)")
        if cfg.model.activation_checkpointing:
            from bertforge.model.bert import enable_activation_checkpointing
            enable_activation_checkpointing(self.model)
        if cfg.model.attn_implementation == "varlen":
            check_varlen(ctx.device, t.precision, self.model.config.attention_probs_dropout_prob,
                         training=s.squad_do_training)
        self.precision = Precision(t.precision, ctx.device, auto_loss_scaling=t.auto_loss_scaling,
                                   loss_scaling=t.loss_scaling)
        self.spec = WindowSpec(cfg.data.sequence_length, cfg.data.doc_stride,
                               cfg.data.max_query_length)
        self.pad_id = self.tokenizer.pad_token_id or 0

    # ------------------------------------------------------------ data
    def windows(self, training: bool) -> tuple[SquadSet, list[Window]]:
        dataset = load_split(self.cfg.data, training=training)
        start = time.perf_counter()
        windows = build_windows(dataset.examples, self.tokenizer, self.spec, is_training=training,
                                workers=self.cfg.data.feature_workers)
        elapsed = time.perf_counter() - start
        dataset.summary.counts["windows"] = len(windows)
        if training:
            dataset.summary.counts["answer outside window ([CLS])"] = sum(
                w.start_position == 0 for w in windows)
        if self.ctx.is_main:
            detail = skipped_line(dataset)
            log.info("%s%s (windows in %.1f s)", dataset.summary.line(),
                     f" [{detail}]" if detail else "", elapsed)
        return dataset, windows

    # ------------------------------------------------------------ training
    def train_step(self, micro_batches: list[dict[str, torch.Tensor]], per_rank: int
                   ) -> dict[str, float]:
        totals = torch.zeros(3, dtype=torch.float64, device=self.ctx.device)
        for i, batch in enumerate(micro_batches):
            with sync_gradients(self.ddp_model, i == len(micro_batches) - 1), \
                    self.precision.autocast():
                if "sequence_ids" in batch:  # packed rows: one row of logits per window
                    row_start, row_end = run_packed(self.forward, batch)
                else:
                    out = self.forward(input_ids=batch["input_ids"],
                                       attention_mask=batch["attention_mask"],
                                       token_type_ids=batch["token_type_ids"])
            if "sequence_ids" in batch:
                start, end = window_logits(row_start, batch), window_logits(row_end, batch)
            else:
                start, end = masked_logits(out, batch["attention_mask"])
            ce = (F.cross_entropy(start, batch["start_positions"], reduction="sum")
                  + F.cross_entropy(end, batch["end_positions"], reduction="sum")) / 2
            # Each rank divides by its share; DDP's average over ranks makes it the global mean.
            self.precision.backward(ce / per_rank)
            exact = ((start.argmax(-1) == batch["start_positions"])
                     & (end.argmax(-1) == batch["end_positions"])).sum()
            totals += torch.stack([ce.detach(), exact.to(ce.dtype),
                                   torch.tensor(float(len(start)), device=ce.device)]).double()
        self.precision.step(self.optimizer)
        self.optimizer.zero_grad(set_to_none=True)
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        loss_sum, exact, n = all_reduce_sum(totals, self.ctx).tolist()
        return {"loss": loss_sum / n, "span_acc": exact / n, "lr": lr, "samples": n}

    def micro_batch(self, chunk: list[Window], pad_to: int | None) -> dict[str, torch.Tensor]:
        """Tensors of one micro-batch: padded rows, or with --packed-data its windows packed."""
        if not self.cfg.data.packed_data:
            return to_tensors(chunk, self.ctx.device, pad_to=pad_to, pad_id=self.pad_id)
        packs = pack_windows(chunk, self.cfg.data.sequence_length)
        return packed_tensors(chunk, packs, self.ctx.device, pad_to=pad_to, pad_id=self.pad_id)

    def save(self, step: int, metrics: dict[str, float]) -> Path | None:
        path = None
        if self.ctx.is_main:
            state = {"step": step, "consumed_batches": step,
                     "optimizer": self.optimizer.state_dict(),
                     "scheduler": self.scheduler.state_dict(),
                     "precision": self.precision.state_dict(), "rng": ckpt.rng_state(),
                     "metrics": metrics, "world_size": self.ctx.world_size}
            path = ckpt.save_checkpoint(self.run_dir, step, self.model, state, self.cfg.to_dict(),
                                        tokenizer_dir=self.tokenizer_dir)
            log.info("saved checkpoint %s", path)
        barrier(self.ctx)
        return path

    def train(self, result: SquadResult, logger: MetricsLogger | None) -> None:
        cfg, ctx, t = self.cfg, self.ctx, self.cfg.train
        dataset, windows = self.windows(training=True)
        result.summaries.append(dataset.summary.line())
        steps = cfg.steps_for(len(windows))
        t.training_steps = steps  # the saved config names the schedule that ran
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim.lr_schedule, cfg.optim.lr_warmup,
                                         steps)
        start_step = 0
        if self.state is not None:
            self.optimizer.load_state_dict(self.state["optimizer"])
            self.scheduler.load_state_dict(self.state["scheduler"])
            self.precision.load_state_dict(self.state["precision"])
            start_step = int(self.state["step"])
            ckpt.set_rng_state(self.state["rng"])
        packed = cfg.data.packed_data
        self.ddp_model = wrap_model(PackedQuestionAnswering(self.model) if packed else self.model,
                                    ctx)
        self.forward = torch.compile(self.ddp_model) if t.compile else self.ddp_model
        pad_to = cfg.data.sequence_length if t.compile else None
        per_rank = t.micro_batch_size * t.gradient_accumulation
        if ctx.is_main:
            (self.run_dir / ckpt.CONFIG_FILE).write_text(json.dumps(cfg.to_dict(), indent=1))
        from bertforge.data.stage import progress
        bar = progress(range(start_step, steps), total=steps, desc="squad", unit="step",
                       disable=t.disable_progress_bar or not ctx.is_main)
        bar.update(start_step)
        stream = step_indices(len(windows), t.global_batch_size, t.random_seed, start_step)
        self.model.train()
        metrics: dict[str, float] = {}
        for step in bar:
            begin = time.perf_counter()
            mine = next(stream)[ctx.rank * per_rank:(ctx.rank + 1) * per_rank]
            micro = [self.micro_batch([windows[k] for k in mine[i:i + t.micro_batch_size]],
                                      pad_to)
                     for i in range(0, per_rank, t.micro_batch_size)]
            metrics = self.train_step(micro, per_rank)
            metrics["samples_per_s"] = metrics["samples"] / (time.perf_counter() - begin)
            result.history.append(metrics)
            if ctx.is_main:
                logger.log(step, metrics)
                if t.disable_progress_bar:
                    print(f"Step: {step} / {steps - 1} - LR: {metrics['lr']:.3e} - loss: "
                          f"{metrics['loss']:.4f} - span_acc: {metrics['span_acc']:.3f} "
                          f"throughput: {metrics['samples_per_s']:.1f} samples/sec", flush=True)
                else:
                    bar.set_postfix(loss=f"{metrics['loss']:.3f}",
                                    sps=f"{metrics['samples_per_s']:.0f}")
            done = step + 1
            every = cfg.checkpoint.checkpoint_steps
            if every and done % every == 0 and done < steps:
                self.save(done, metrics)
        result.steps = steps
        result.final_checkpoint = self.save(steps, metrics)

    # ------------------------------------------------------------ validation
    def validate(self, result: SquadResult, logger: MetricsLogger | None) -> None:
        cfg, s = self.cfg, self.cfg.squad
        dataset, windows = self.windows(training=False)
        result.summaries.append(dataset.summary.line())
        begin = time.perf_counter()
        predict = predict_logits
        if cfg.data.packed_data:  # same logits per window, from packed rows
            predict = functools.partial(predict_logits_packed,
                                        sequence_length=cfg.data.sequence_length)
        starts, ends = predict(self.model, windows, batch_size=s.eval_batch_size,
                               device=self.ctx.device, precision=self.precision,
                               pad_id=self.pad_id, progress=not cfg.train.disable_progress_bar)
        elapsed = time.perf_counter() - begin
        log.info("predicted %d windows in %.1f s (%.1f windows/s)", len(windows), elapsed,
                 len(windows) / max(elapsed, 1e-9))
        predictions = postprocess(dataset.examples, windows, starts, ends,
                                  n_best_size=s.n_best_size, max_answer_length=s.max_answer_length,
                                  squad_v2=cfg.data.squad_v2,
                                  null_score_diff_threshold=s.null_score_diff_threshold)
        result.files.update(predictions.write(self.run_dir))
        if cfg.data.squad_v2:
            scores = evaluate_v2(dataset.articles, predictions.answers, predictions.null_odds)
        else:
            scores = evaluate_v1(dataset.articles, predictions.answers)
        result.eval = scores
        path = self.run_dir / "eval_results.json"
        path.write_text(json.dumps(scores, indent=2) + "\n")
        result.files["eval"] = path
        if logger is not None:
            logger.log(result.steps, {k: float(v) for k, v in scores.items()}, prefix="eval")

    def run(self) -> SquadResult:
        cfg, ctx = self.cfg, self.ctx
        result = SquadResult(run_dir=self.run_dir)
        logger = None
        if ctx.is_main:
            t = cfg.train
            logger = MetricsLogger(self.run_dir, resume=self.state is not None,
                                   wandb_project=t.wandb_project if t.wandb else None,
                                   wandb_config=cfg.to_dict())
        try:
            if cfg.squad.squad_do_training:
                self.train(result, logger)
            if cfg.squad.squad_do_validation and ctx.is_main:
                self.validate(result, logger)
            barrier(ctx)
        finally:
            if logger is not None:
                logger.close()
        return result


def squad(cfg: SquadConfig) -> SquadResult:
    """Resolve `cfg` for this process group and run it; the entry point of `bertforge squad`."""
    ctx = init_distributed(cfg.train.device)
    try:
        return SquadTrainer(cfg.resolve(ctx.world_size), ctx).run()
    finally:
        shutdown(ctx)
