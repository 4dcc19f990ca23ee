"""`bertforge pretrain`: the MLM + NSP task (or MLM alone) on the training engine.

What is pre-training's own: the model (GatheredBertForPreTraining, new or from a checkpoint
for continued pre-training or phase 2; a new MLM head's bias at the data's unigram prior),
the objective (--objective mlm: no NSP loss, NSP head frozen), the masking (the shards'
static masks, or --masking dynamic: fresh ones per batch, data/masking.py), the batches
(TFRecord shards, packed or not, or random data; train/sources.py), the loss normalisers (the step's labelled MLM positions and
sequences, all-reduced over ranks, so accumulation and DDP give the big-batch update), the
held-out evaluation and --target-mlm-accuracy, and the tokenizer files saved with
checkpoints. The loop, checkpoints, resume, precision and logging are the engine's.

Cost of the normalisers: one small all-reduce per step (two scalars), negligible next to the
gradient all-reduce.
"""

from __future__ import annotations

import itertools
import logging
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

from bertforge.config import PretrainConfig
from bertforge.model.attention import implementation
from bertforge.model.bert import (GatheredBertForPreTraining, bert_config,
                                  build_pretraining_model, num_sequences)
from bertforge.rows import labelled_slots
from bertforge.train.distributed import DistContext, all_reduce_sum, init_distributed, shutdown
from bertforge.train.engine import Engine, TrainResult
from bertforge.train.sources import eval_batches, random_batch, to_device, training_batches
from bertforge.train.task import Task

log = logging.getLogger("bertforge")
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json")


class PretrainTask(Task):
    name = "pretrain"
    resume_keys = (("optim", "optimizer"), ("train", "micro_batch_size"),
                   ("train", "gradient_accumulation"), ("train", "global_batch_size"),
                   ("train", "random_seed"), ("data", "input_files"), ("data", "dataset"),
                   ("data", "synthetic_data"), ("data", "sequence_length"),
                   ("data", "mask_tokens"), ("data", "packed_data"), ("data", "shuffle"),
                   ("data", "objective"), ("data", "masking"), ("data", "mask_rate"),
                   ("data", "mask_replace_prob"), ("data", "mask_random_prob"),
                   ("data", "whole_word_masking"))
    order_depends_on_world_size = True  # rank r reads every W-th record (data/loader.py)

    def __init__(self, cfg: PretrainConfig):
        self.cfg = cfg
        d = cfg.data
        self.nsp = d.objective == "mlm+nsp"
        self.eval_every = d.eval_every
        if d.target_mlm_accuracy is not None:
            self.target = ("mlm_acc", d.target_mlm_accuracy)

    # ------------------------------------------------------------ model
    def build_model(self, engine: Engine) -> GatheredBertForPreTraining:
        m = self.cfg.model
        if engine.source is not None:
            model, info = GatheredBertForPreTraining.from_pretrained(
                engine.source, attn_implementation=implementation(m.attn_implementation),
                output_loading_info=True)
            c = model.config
            if self.cfg.data.sequence_length > c.max_position_embeddings:
                raise ValueError(f"--sequence-length {self.cfg.data.sequence_length} exceeds "
                                 f"the {c.max_position_embeddings} positions of {engine.source}; "
                                 "use shards and --sequence-length within them")
            log.info("model: %s's shape (hidden %d, %d layers, %d heads, vocab %d); the "
                     "preset's shape fields do not apply", engine.source, c.hidden_size,
                     c.num_hidden_layers, c.num_attention_heads, c.vocab_size)
            if any(k.startswith("cls.predictions.") for k in info["missing_keys"]) \
                    and engine.state is None:
                # An encoder without an MLM head (a fine-tune, a sentence encoder): the head
                # starts new, its bias at the data's unigram prior as for a new model.
                log.info("%s has no MLM head: it starts new", engine.source)
                init_mlm_prior(model, self.cfg)
        else:
            model = build_pretraining_model(bert_config(m),
                                            attn_implementation=m.attn_implementation)
            init_mlm_prior(model, self.cfg)
        if not self.nsp:
            model.mlm_only()
        return model

    def prepare(self, engine: Engine) -> int:
        if engine.ctx.is_main:
            engine.tokenizer_dir = self.tokenizer_files(engine)
        return self.cfg.train.training_steps

    def tokenizer_files(self, engine: Engine) -> Path | None:
        """HF tokenizer files for the checkpoints: the source checkpoint's, else the data's vocab."""
        target = engine.run_dir / "tokenizer"
        if target.exists():
            if engine.state is not None:  # resuming: the run's own
                return target
            shutil.rmtree(target)  # a new run in a reused folder: never an old run's vocab
        source = engine.source
        if source is not None and Path(source).is_dir():
            files = [p for p in Path(source).iterdir() if p.name in TOKENIZER_FILES]
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
        vocab_size = engine.model.config.vocab_size
        if size is not None and size != vocab_size:
            log.warning("tokenizer has %d entries but the model's vocab_size is %d: checkpoints "
                        "are saved without tokenizer files", size, vocab_size)
            for p in target.iterdir():
                p.unlink()
            target.rmdir()
            return None
        return target

    # ------------------------------------------------------------ batches and loss
    def step_batches(self, engine: Engine, start_step: int, consumed_batches: int
                     ) -> Iterator[list[dict[str, torch.Tensor]]]:
        t, ctx = self.cfg.train, engine.ctx
        micro = training_batches(self.cfg.data, micro_batch_size=t.micro_batch_size,
                                 vocab_size=engine.model.config.vocab_size, seed=t.random_seed,
                                 rank=ctx.rank, world_size=ctx.world_size,
                                 start_batch=consumed_batches, device=ctx.device,
                                 masker=dynamic_masker(self.cfg, ctx.rank))
        accum = t.gradient_accumulation
        return ([next(micro) for _ in range(accum)] for _ in itertools.count())

    def normalizers(self, micro_batches: list[dict[str, torch.Tensor]], ctx: DistContext
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(labelled MLM positions, sequences) of the whole step over all ranks, divided by
        the world size because DDP averages gradients over ranks. Sequences, not rows: a
        packed row holds several."""
        counts = torch.stack([torch.stack([labelled_slots(b).sum(), num_sequences(b)])
                              for b in micro_batches]).sum(0)
        counts = all_reduce_sum(counts.to(torch.float64), ctx)
        return ((counts[0].clamp(min=1) / ctx.world_size).float(),
                (counts[1] / ctx.world_size).float())

    def loss(self, forward, batch, norms):
        mlm_norm, nsp_norm = norms if norms is not None else (None, None)
        out = forward(batch, mlm_normalizer=mlm_norm, nsp_normalizer=nsp_norm)
        return out.loss, torch.stack([out.mlm_loss.detach(), out.nsp_loss.detach(),
                                      out.num_mlm_correct, out.num_masked, out.num_nsp_correct,
                                      out.num_sequences, out.num_tokens]).to(torch.float64)

    def metrics(self, totals: list[float], world_size: int) -> dict[str, float]:
        mlm_loss, nsp_loss, mlm_ok, n_mask, nsp_ok, n_seq, n_tok = totals
        # Each rank's losses are its partial means of the global mean: the sum over ranks
        # counts the world size once too often.
        mlm_loss, nsp_loss = mlm_loss / world_size, nsp_loss / world_size
        m = {"loss": mlm_loss + nsp_loss, "mlm_loss": mlm_loss, "nsp_loss": nsp_loss,
             "mlm_acc": mlm_ok / max(1.0, n_mask), "nsp_acc": nsp_ok / max(1.0, n_seq),
             "sequences": n_seq, "real_tokens": n_tok}
        return m if self.nsp else _without_nsp(m)

    def step_fields(self, m: dict[str, float], short: bool = False) -> dict[str, str]:
        if short:
            fields = {"loss": f"{m['loss']:.3f}", "mlm_acc": f"{m['mlm_acc']:.3f}",
                      "nsp_acc": f"{m.get('nsp_acc', 0):.3f}"}
        else:
            # The reference's labels; accuracies are fractions 0..1 as it printed them.
            fields = {"total loss": f"{m['loss']:.3f}", "mlm_loss": f"{m['mlm_loss']:.3f}",
                      "nsp_loss": f"{m.get('nsp_loss', 0):.3f}",
                      "mlm_acc": f"{m['mlm_acc']:.3f} %", "nsp_acc": f"{m.get('nsp_acc', 0):.3f} %"}
        return fields if self.nsp else _without_nsp(fields)

    def summary_lines(self, engine: Engine) -> list[str]:
        d, t = self.cfg.data, self.cfg.train
        masks = (f"dynamic masks ({d.mask_rate:g} of the tokens"
                 + (", whole words" if d.whole_word_masking else "") + ")"
                 if d.masking == "dynamic" else "the shards' static masks")
        lines = [f"pretrain: {d.objective}, {masks}; sequences of {d.sequence_length} tokens: "
                 f"up to {t.global_batch_size * d.sequence_length:,} tokens per step"]
        if d.dataset == "pretraining" and not d.synthetic_data:
            from bertforge.data.loader import expand_files
            from bertforge.data.tfrecord import read_index
            files = expand_files(d.input_files)
            rows = sum(len(read_index(f)) for f in files)
            per_row = t.global_batch_size / (t.micro_batch_size * t.gradient_accumulation
                                             * engine.ctx.world_size)
            epochs = t.training_steps * t.micro_batch_size * t.gradient_accumulation \
                * engine.ctx.world_size / max(1, rows)
            lines.append(f"pretrain: data: {rows:,} {'packed rows' if d.packed_data else 'records'}"
                         f" in {len(files)} file{'s' if len(files) > 1 else ''}; "
                         f"{t.training_steps:,} steps read {epochs:.3g} epochs" + (f" (~{per_row:.2f} sequences per row)"
                                                   if d.packed_data else ""))
        return lines

    def synthetic_batch(self, device: torch.device) -> dict[str, torch.Tensor]:
        d = self.cfg.data
        return to_device(random_batch(self.cfg.train.micro_batch_size, d.sequence_length,
                                      d.mask_tokens, self.cfg.model.vocab_size,
                                      torch.Generator().manual_seed(0)), device)

    # ------------------------------------------------------------ evaluation
    def evaluate(self, engine: Engine) -> dict[str, float] | None:
        """MLM/NSP accuracy and loss over every held-out record (records never trained on)."""
        d, ctx = self.cfg.data, engine.ctx
        if not d.eval_files:
            return None
        from bertforge.progress import progress
        sums = torch.zeros(6, dtype=torch.float64, device=ctx.device)
        batches = eval_batches(d.eval_files, micro_batch_size=self.cfg.train.micro_batch_size,
                               rank=ctx.rank, world_size=ctx.world_size, device=ctx.device,
                               vocab_size=engine.model.config.vocab_size, packed=d.packed_data)
        for batch in progress(batches, desc="eval", unit="batch",
                              disable=not ctx.is_main or self.cfg.train.disable_progress_bar):
            with engine.precision.autocast():
                out = engine.model(batch, mlm_normalizer=1.0, nsp_normalizer=1.0)
            sums += torch.stack([out.mlm_loss, out.nsp_loss, out.num_mlm_correct, out.num_masked,
                                 out.num_nsp_correct, out.num_sequences]).to(torch.float64)
        mlm_sum, nsp_sum, mlm_ok, n_mask, nsp_ok, n_seq = all_reduce_sum(sums, ctx).tolist()
        m = {"mlm_loss": mlm_sum / max(1.0, n_mask), "nsp_loss": nsp_sum / max(1.0, n_seq),
             "mlm_acc": mlm_ok / max(1.0, n_mask), "nsp_acc": nsp_ok / max(1.0, n_seq),
             "records": n_seq}
        return m if self.nsp else _without_nsp(m)


def _without_nsp(fields: dict) -> dict:
    """Metrics or step-line fields of masked LM alone: no NSP numbers that mean nothing."""
    return {k: v for k, v in fields.items() if not k.startswith("nsp")}


def dynamic_masker(cfg: PretrainConfig, rank: int):
    """The load-time masker of --masking dynamic (data/masking.py), or None for the shards'
    own masks. Its special tokens and word pieces come from the data's vocab."""
    d = cfg.data
    if d.masking != "dynamic":
        return None
    from bertforge.data.masking import DynamicMasker, MaskRule, continuation_table
    from bertforge.data.vocab import load_tokenizer
    is_file = d.tokenizer is not None and Path(d.tokenizer).is_file()
    tokenizer = load_tokenizer(vocab_file=Path(d.tokenizer) if is_file else None,
                               name_or_path=None if is_file else d.tokenizer)
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    return DynamicMasker(
        rule=MaskRule(vocab["[MASK]"], min(len(vocab), cfg.model.vocab_size),
                      d.mask_replace_prob, d.mask_random_prob),
        rate=d.mask_rate, max_per_sequence=d.mask_tokens,
        special_ids=tuple(vocab[t] for t in ("[PAD]", "[CLS]", "[SEP]", "[MASK]")),
        continuation=continuation_table(vocab) if d.whole_word_masking else None,
        seed=cfg.train.random_seed, rank=rank)


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
    from bertforge.data.loader import check_inputs, measure_packing_factor
    check_inputs(data.input_files, data.packed_data)
    if data.eval_files:
        check_inputs(data.eval_files, data.packed_data)
    if not data.packed_data:
        return 1.0
    factor = measure_packing_factor(data.input_files)
    log.info("packed data: %.3f sequences per row; gradient accumulation divided by it", factor)
    return factor


def data_tokenizer(cfg: PretrainConfig) -> str | None:
    """Check the run's settings against what its shards say they hold; return the vocab file
    the shards were made with when the checkpoints must carry it instead of the default.

    The shards' manifest (data/stage.py: describe) gives sequence length, mask tokens and the
    tokenizer; shards without one (Google's, the reference's) are described from their first
    record, and the log says so. A setting that contradicts the data is refused, naming both
    values and the flag: training 64-token shards under a 512 preset, or a 30,522-entry model
    on shards of an 8,000-word vocab, would otherwise run and ship a mismatched checkpoint.
    """
    d = cfg.data
    if d.synthetic_data or d.dataset != "pretraining" or not d.input_files:
        return None
    from bertforge.data.loader import expand_files, record_shape
    from bertforge.data.stage import describe
    for files in (d.input_files, d.eval_files):
        if not files:
            continue
        described, why_not = describe(files)
        first = expand_files(files)[0]
        if described is None:
            log.warning("%s: described from its records instead", why_not)
            length, slots = record_shape(first)
            described = {"sequence_length": length, "tokenizer": None,
                         "mask_tokens": None if d.packed_data else slots}
        if described["sequence_length"] != d.sequence_length:
            raise ValueError(f"--sequence-length {d.sequence_length} "
                             f"contradicts the data: {first} holds "
                             f"{described['sequence_length']}-token records; give "
                             f"--sequence-length {described['sequence_length']}, or shards "
                             f"made at {d.sequence_length}")
        if described.get("objective", "mlm+nsp") == "mlm" and d.objective != "mlm":
            raise ValueError(f"{first} holds masked-LM-only records (tokenize --objective "
                             "mlm: no sentence pairs, no NSP labels); give --objective mlm")
        mask = described.get("mask_tokens")
        if d.masking == "dynamic":
            mask = None  # the shards' masks are undone; --mask-rate decides
        if mask is not None and mask != d.mask_tokens:
            raise ValueError(f"--mask-tokens {d.mask_tokens} (preset {cfg.config} or the "
                             f"flag) contradicts the data: {first} was made with {mask} masked-LM predictions per "
                             f"sequence; give --mask-tokens {mask}")
        if files is d.input_files:
            tokenizer = described.get("tokenizer")
    if not tokenizer:
        return None
    return _check_vocab(cfg, tokenizer)


def _check_vocab(cfg: PretrainConfig, data_vocab: dict) -> str | None:
    """The shards' vocab against --tokenizer and --vocab-size (module: data_tokenizer)."""
    from bertforge.data.vocab import default_vocab_file, vocab_sha256
    d, m = cfg.data, cfg.model
    given = Path(d.tokenizer) if d.tokenizer else default_vocab_file()
    if d.tokenizer and not given.is_file():
        log.warning("--tokenizer %s is not a vocab file: not compared with the shards' vocab "
                    "%s", d.tokenizer, data_vocab["vocab_file"])
        return None
    source = cfg.checkpoint.checkpoint_input_dir
    source_vocab = Path(source) / "vocab.txt" if source else None
    if source_vocab is not None and not source_vocab.is_file():  # a run dir: its latest step
        from bertforge.train.checkpoint import resolve_checkpoint
        resolved = resolve_checkpoint(source)
        source_vocab = Path(resolved) / "vocab.txt" if isinstance(resolved, Path) else None
    if source_vocab is not None and source_vocab.is_file() \
            and vocab_sha256(source_vocab) != data_vocab["vocab_sha256"]:
        raise ValueError(f"--checkpoint-input-dir {source} has another vocab than the shards "
                         f"({data_vocab['vocab_file']}); its token ids would mean other words: "
                         f"tokenize with --vocab-file {source_vocab}")
    result = None
    if vocab_sha256(given) != data_vocab["vocab_sha256"]:
        if d.tokenizer:
            raise ValueError(f"--tokenizer {d.tokenizer} is not the vocab the shards were made "
                             f"with ({data_vocab['vocab_file']}); drop --tokenizer to use the "
                             "shards' own")
        log.info("tokenizer: the shards' vocab %s (%d tokens), saved with every checkpoint",
                 data_vocab["vocab_file"], data_vocab["vocab_size"])
        result = data_vocab["vocab_file"]
    if cfg.checkpoint.checkpoint_input_dir is None and m.vocab_size != data_vocab["vocab_size"]:
        raise ValueError(f"--vocab-size {m.vocab_size} (preset {cfg.config} or the flag) "
                         f"contradicts the data: its vocab {data_vocab['vocab_file']} has "
                         f"{data_vocab['vocab_size']} tokens; give --vocab-size "
                         f"{data_vocab['vocab_size']}")
    return result


def pretrain(cfg: PretrainConfig) -> TrainResult:
    """Resolve `cfg` for this process group and train; the entry point of `bertforge pretrain`."""
    ctx = init_distributed(cfg.train.device)
    engine = None
    try:
        vocab = data_tokenizer(cfg)
        cfg = cfg.resolve(ctx.world_size, data_packing_factor(cfg.data))
        if vocab is not None:  # the checkpoints carry the vocab the data was made with
            cfg.data.tokenizer = vocab
        engine = Engine(cfg, ctx, PretrainTask(cfg))
        if cfg.train.compile_only:
            return engine.compile_only()
        logger = engine.open_logger()
        try:
            return engine.train(TrainResult(run_dir=engine.run_dir), logger)
        finally:
            if logger is not None:
                logger.close()
    finally:
        if engine is not None:
            engine.close()  # before the process group goes: distributed._WRAPPERS says why
        shutdown(ctx, together=sys.exc_info()[0] is None)  # no exception on this rank
