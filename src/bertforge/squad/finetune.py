"""`bertforge squad`: fine-tune BertForQuestionAnswering, predict, write the official files, score.

A task on the training engine (train/engine.py), which pre-training runs on too: the same
optimizer and parameter groups, LR schedule, Precision (bf16/fp16 autocast, loss scaling), DDP
with no_sync accumulation, atomic self-describing step checkpoints with exact resume, the
metrics log (JSON lines + TensorBoard, optional wandb) and step line. Only what is SQuAD's own
lives here: the model and tokenizer, the windows and their order, the span loss, validation.

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
longest window, or packed) at no cost. Windows go through the model in the row layout
(squad/forward.py): one per row, padded to the batch's longest window (or to --sequence-length
with --compile so the graph is compiled once), or with --packed-data up to 3 per row.
SQuAD-shaped windows average 193 real tokens (50% of 384) but 3% are full, so padding to the
longest saves only 4-10% of token slots at micro-batch 32-16; packing removes most of the
rest. The loss is the same, window for window, in every layout.

Validation runs on rank 0 after training: logits per window, post-processing, predictions.json
/ nbest_predictions.json / null_odds.json, and the official metric; for SQuAD 2.0 the result
includes the best null-score threshold found on that set (rerun with it as
--null-score-diff-threshold, as the reference's README advises).
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from bertforge.model.attention import implementation
from bertforge.squad.config import SquadConfig
from bertforge.squad.data import SquadSet, load_split, skipped_line
from bertforge.squad.features import Window, build_windows
from bertforge.squad.forward import (QuestionAnsweringRows, pack_windows, predict_logits,
                                     run_rows, to_device, window_logits, window_rows)
from bertforge.squad.metric import evaluate_v1, evaluate_v2
from bertforge.squad.postprocess import postprocess
from bertforge.train.distributed import DistContext, init_distributed, on_main, shutdown
from bertforge.train.engine import Engine, TrainResult
from bertforge.train.metrics import MetricsLogger
from bertforge.train.task import Task

log = logging.getLogger("bertforge")
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt")


@dataclass
class SquadResult(TrainResult):
    files: dict[str, Path] = field(default_factory=dict)
    summaries: list[str] = field(default_factory=list)


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
        from bertforge.model.bert import bert_config
        return transformers.BertForQuestionAnswering(bert_config(m))
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


# ---------------------------------------------------------------- the task
class SquadTask(Task):
    """Fine-tuning on SQuAD windows: span loss over each window's own tokens."""

    name = "squad"
    # Step s takes global-batch window s of the seeded permutations whatever the world size
    # or micro-batch; the windows depend on the file and the window shape.
    resume_keys = (("optim", "optimizer"), ("train", "global_batch_size"),
                   ("train", "random_seed"), ("data", "train_file"), ("data", "dataset"),
                   ("data", "sequence_length"), ("data", "doc_stride"),
                   ("data", "max_query_length"), ("data", "tokenizer"))

    def __init__(self, cfg: SquadConfig):
        self.cfg = cfg
        self.trains = cfg.squad.squad_do_training
        self.spec = cfg.data  # a WindowSection: sequence length, doc stride, query length

    def build_model(self, engine: Engine):
        import transformers

        cfg, ctx = self.cfg, engine.ctx
        def tokenizer_files() -> None:
            engine.run_dir.mkdir(parents=True, exist_ok=True)
            target = engine.run_dir / "tokenizer"
            if target.exists() and engine.state is None:
                shutil.rmtree(target)  # a new run in a reused folder: never an old run's vocab
            if not target.exists():
                write_tokenizer(target, engine.source, cfg.data.tokenizer)

        on_main(ctx, tokenizer_files, "writing the tokenizer files")
        engine.tokenizer_dir = engine.run_dir / "tokenizer"
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(engine.tokenizer_dir)
        self.pad_id = self.tokenizer.pad_token_id or 0
        model = build_qa_model(engine.source, cfg.model, need_trained_head=not self.trains)
        if len(self.tokenizer) > model.config.vocab_size:
            raise ValueError(f"the tokenizer has {len(self.tokenizer)} tokens but the model's "
                             f"vocab_size is {model.config.vocab_size}; give the tokenizer "
                             "the model was pre-trained with (--tokenizer)")
        return model

    def training_module(self, model: torch.nn.Module) -> torch.nn.Module:
        return QuestionAnsweringRows(model)

    def windows(self, engine: Engine, training: bool) -> tuple[SquadSet, list[Window]]:
        dataset = load_split(self.cfg.data, training=training)
        start = time.perf_counter()
        windows = build_windows(dataset.examples, self.tokenizer, self.spec, is_training=training,
                                workers=self.cfg.data.feature_workers)
        elapsed = time.perf_counter() - start
        dataset.summary.counts["windows"] = len(windows)
        if training:
            dataset.summary.counts["answer outside window ([CLS])"] = sum(
                w.start_position == 0 for w in windows)
        if engine.ctx.is_main:
            detail = skipped_line(dataset)
            log.info("%s%s (windows in %.1f s)", dataset.summary.line(),
                     f" [{detail}]" if detail else "", elapsed)
        return dataset, windows

    def prepare(self, engine: Engine) -> int:
        dataset, self.train_windows = self.windows(engine, training=True)
        self.summaries = [dataset.summary.line()]
        return self.cfg.steps_for(len(self.train_windows))

    def step_batches(self, engine: Engine, start_step: int, consumed_batches: int
                     ) -> Iterator[list[dict[str, torch.Tensor]]]:
        """Step s: global-batch window s of the seeded epoch permutations; this rank's slice
        as micro-batches of window rows (packed with --packed-data, else one per row, padded
        to --sequence-length under --compile so the graph is compiled once)."""
        t, ctx = self.cfg.train, engine.ctx
        per_rank = t.micro_batch_size * t.gradient_accumulation
        pad_to = self.cfg.data.sequence_length if t.compile else None
        windows = self.train_windows
        for indices in step_indices(len(windows), t.global_batch_size, t.random_seed, start_step):
            mine = indices[ctx.rank * per_rank:(ctx.rank + 1) * per_rank]
            yield [self.micro_batch([windows[k] for k in mine[i:i + t.micro_batch_size]],
                                    pad_to, ctx.device)
                   for i in range(0, per_rank, t.micro_batch_size)]

    def micro_batch(self, chunk: list[Window], pad_to: int | None, device: torch.device
                    ) -> dict[str, torch.Tensor]:
        packs = pack_windows(chunk, self.cfg.data.sequence_length) \
            if self.cfg.data.packed_data else None
        return to_device(window_rows(chunk, packs, pad_to=pad_to, pad_id=self.pad_id), device)

    def normalizers(self, micro_batches, ctx: DistContext) -> float:
        # Every rank holds the same number of windows: dividing by its own share, DDP's
        # average over ranks makes the loss the global mean.
        t = self.cfg.train
        return float(t.micro_batch_size * t.gradient_accumulation)

    def loss(self, forward, batch, norms):
        row_start, row_end = run_rows(forward, batch)
        start, end = window_logits(row_start, batch), window_logits(row_end, batch)
        ce = (F.cross_entropy(start, batch["start_positions"], reduction="sum")
              + F.cross_entropy(end, batch["end_positions"], reduction="sum")) / 2
        exact = ((start.argmax(-1) == batch["start_positions"])
                 & (end.argmax(-1) == batch["end_positions"])).sum()
        stats = torch.stack([ce.detach(), exact.to(ce.dtype),
                             torch.tensor(float(len(start)), device=ce.device)])
        return ce / (norms if norms is not None else len(start)), stats

    def metrics(self, totals: list[float], world_size: int) -> dict[str, float]:
        loss_sum, exact, n = totals
        return {"loss": loss_sum / n, "span_acc": exact / n, "sequences": n}

    def step_fields(self, m: dict[str, float], short: bool = False) -> dict[str, str]:
        return {"loss": f"{m['loss']:.4f}", "span_acc": f"{m['span_acc']:.3f}"}

    # ------------------------------------------------------------ validation
    def validate(self, engine: Engine, result: SquadResult, logger: MetricsLogger | None) -> None:
        """Predict the validation windows, write the official files, score (rank 0)."""
        cfg, s = self.cfg, self.cfg.squad
        dataset, windows = self.windows(engine, training=False)
        result.summaries.append(dataset.summary.line())
        begin = time.perf_counter()
        starts, ends = predict_logits(
            engine.model, windows, batch_size=s.eval_batch_size, device=engine.ctx.device,
            precision=engine.precision, pad_id=self.pad_id,
            packed_length=cfg.data.sequence_length if cfg.data.packed_data else None,
            progress=not cfg.train.disable_progress_bar)
        elapsed = time.perf_counter() - begin
        log.info("predicted %d windows in %.1f s (%.1f windows/s)", len(windows), elapsed,
                 len(windows) / max(elapsed, 1e-9))
        predictions = postprocess(dataset.examples, windows, starts, ends,
                                  n_best_size=s.n_best_size, max_answer_length=s.max_answer_length,
                                  squad_v2=cfg.data.squad_v2,
                                  null_score_diff_threshold=s.null_score_diff_threshold)
        result.files.update(predictions.write(engine.run_dir))
        if cfg.data.squad_v2:
            scores = evaluate_v2(dataset.articles, predictions.answers, predictions.null_odds)
        else:
            scores = evaluate_v1(dataset.articles, predictions.answers)
        result.eval = scores
        path = engine.run_dir / "eval_results.json"
        path.write_text(json.dumps(scores, indent=2) + "\n")
        result.files["eval"] = path
        if logger is not None:
            logger.log(result.steps, {k: float(v) for k, v in scores.items()}, prefix="eval")


def squad(cfg: SquadConfig) -> SquadResult:
    """Resolve `cfg` for this process group and run it; the entry point of `bertforge squad`."""
    ctx = init_distributed(cfg.train.device)
    engine = None
    try:
        cfg = cfg.resolve(ctx.world_size)
        task = SquadTask(cfg)
        engine = Engine(cfg, ctx, task)
        result = SquadResult(run_dir=engine.run_dir)
        logger = engine.open_logger()
        try:
            if cfg.squad.squad_do_training:
                engine.train(result, logger)
                result.summaries.extend(task.summaries)
            # Rank 0 validates alone while the others wait for it, so that every rank shuts
            # the process group down together (a rank that left early hung gloo's teardown
            # in CI); a failed validation stops them all. The wait is bounded by the process
            # group's timeout (30 min by default): a longer validation needs more ranks'
            # share of the work, which is not built yet.
            def validate() -> None:
                engine.model.eval()
                task.validate(engine, result, logger)

            if cfg.squad.squad_do_validation:
                on_main(ctx, validate, "SQuAD validation")
        finally:
            if logger is not None:
                logger.close()
        return result
    finally:
        if engine is not None:
            engine.close()  # before the process group goes: distributed._WRAPPERS says why
        shutdown(ctx, together=sys.exc_info()[0] is None)  # no exception on this rank
