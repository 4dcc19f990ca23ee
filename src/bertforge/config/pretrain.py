"""Typed configuration of `bertforge pretrain` (and the sections SQuAD fine-tuning reuses).

A run's configuration is a tree of small sections (torchtitan style): `model`, `data`,
`optim`, `train`, `checkpoint`. Each coerces and validates its own fields when built
(config/core.py), so a component that receives only its section (house style) can trust
it. Cross-section rules and derived values (gradient accumulation from the global batch and
the world size) live in `PretrainConfig.resolve(world_size)`, called once the process group
is up. Flag names are the field names (dashes for underscores), which is why fields keep the
reference's names (micro_batch_size, mask_tokens, ...).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from bertforge.config.core import RunConfig, Section, flag_name, opt


# ---------------------------------------------------------------- sections
@dataclass
class ModelSection(Section):
    """BERT shape and regularisation (Hugging Face's names); becomes a transformers.BertConfig."""

    vocab_size: int = opt(30522, "WordPiece vocabulary size", ge=1)
    hidden_size: int = opt(768, "width of the encoder", ge=1)
    num_hidden_layers: int = opt(12, "encoder layers", ge=1)
    num_attention_heads: int = opt(12, "attention heads (must divide hidden_size)", ge=1)
    intermediate_size: int | None = opt(None, "feed-forward width (default: 4 x hidden_size)", ge=1)
    max_position_embeddings: int = opt(512, "longest sequence the position table holds", ge=1)
    type_vocab_size: int = opt(2, "segment (token type) vocabulary; NSP needs 2", ge=1)
    hidden_act: Literal["gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "silu"] = opt(
        "gelu", "activation of the feed-forward layers")
    layer_norm_eps: float = opt(1e-3, "LayerNorm epsilon (the reference's 1e-3, not HF's 1e-12)",
                                gt=0)
    hidden_dropout_prob: float = opt(0.1, "dropout on embeddings and layer outputs", ge=0, lt=1)
    attention_probs_dropout_prob: float = opt(0.0, "dropout on attention probabilities "
                                              "(0 for pre-training, as the reference)", ge=0, lt=1)
    initializer_range: float = opt(0.02, "std of the truncated-normal weight init", gt=0)
    mlm_bias_init: Literal["unigram", "zero"] = opt(
        "unigram", "initial MLM decoder bias of a new model: the log frequency of the masked "
        "tokens in --input-files (starts at the unigram solution, so training learns context "
        "from step 0), or zero as TF/HF BERT")
    activation_checkpointing: bool = opt(False, "recompute each layer's activations in the "
                                         "backward pass (the reference's "
                                         "recompute_checkpoint_every_layer): ~1/3 more compute "
                                         "for far less activation memory")
    recompute_checkpoint_every_layer: bool = opt(
        None, "the reference's name for --activation-checkpointing (sets it; default: unset)",
        alias_of="activation_checkpointing")
    attn_implementation: Literal["sdpa", "eager", "varlen"] = opt(
        "sdpa", "attention kernel: torch scaled_dot_product_attention, the plain reference path, "
        "or variable-length flash attention (CUDA, bf16/fp16, no attention dropout; packed "
        "rows without the S x S mask)")

    def check(self) -> None:
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.hidden_size
        if self.hidden_size % self.num_attention_heads:
            self.fail("num_attention_heads", f"= {self.num_attention_heads} must divide "
                      f"hidden_size = {self.hidden_size}")


@dataclass
class DataSection(Section):
    """Where the pre-training records come from and their shape."""

    input_files: list[str] = opt([], "TFRecord files or globs of pre-training shards",
                                 metavar="GLOB")
    dataset: Literal["pretraining", "generated"] = opt(
        "pretraining", "'pretraining' reads --input-files; 'generated' repeats one random sample "
        "(measures compute without input cost)")
    synthetic_data: bool = opt(False, "random batches made on the device, no input pipeline")
    sequence_length: int = opt(128, "tokens per sequence (S)", ge=4)
    mask_tokens: int = opt(20, "masked-LM predictions per sequence (M)", ge=1)
    dataloader_workers: int = opt(2, "loader worker processes (0: load in the training process)",
                                  ge=0)
    shuffle: bool = opt(True, "shuffle the records (per epoch, seeded by --random-seed)")
    eval_files: list[str] = opt([], "held-out TFRecord files or globs for evaluation",
                                metavar="GLOB")
    eval_every: int = opt(0, "evaluate on --eval-files every N steps (0: only at the end)", ge=0)
    target_mlm_accuracy: float | None = opt(
        None, "stop when the held-out MLM accuracy (checked every --eval-every steps) reaches "
        "this fraction, and report the time and samples it took (MLPerf's time to train)",
        gt=0, lt=1)
    packed_data: bool = opt(False, "the input files are packed (`bertforge pack`): several "
                            "sequences per row; global batch counted in sequences")
    tokenizer: str | None = opt(None, "vocab.txt or Hugging Face tokenizer the shards were made "
                                "with, saved into checkpoints (default: bert-base-uncased)",
                                metavar="PATH")
    objective: Literal["mlm+nsp", "mlm"] = opt(
        "mlm+nsp", "what the loss trains: masked LM plus next-sentence prediction (BERT, the "
        "reference), or masked LM alone (RoBERTa and later; the NSP labels are never read)")
    masking: Literal["static", "dynamic"] = opt(
        "static", "static: the masks written into the shards by `bertforge tokenize`; dynamic: "
        "the shards' masks are undone and fresh ones drawn for every batch at load time "
        "(RoBERTa), reproducible from --random-seed and the batch number")
    mask_rate: float = opt(0.15, "dynamic masking: share of each sequence's tokens to predict "
                           "(BERT 0.15, cramming 0.25, MosaicBERT 0.3); sets --mask-tokens to "
                           "ceil(rate x S)", gt=0, lt=1)
    mask_replace_prob: float = opt(0.8, "dynamic masking: share of the predicted tokens "
                                   "replaced by [MASK]", ge=0, le=1)
    mask_random_prob: float = opt(0.1, "dynamic masking: share replaced by a random token (the "
                                  "rest keep their token)", ge=0, le=1)
    whole_word_masking: bool = opt(False, "dynamic masking: mask whole words (a word's ##pieces "
                                   "together), as Google's --do_whole_word_mask")

    def check(self) -> None:
        if self.mask_replace_prob + self.mask_random_prob > 1:
            self.fail("mask_random_prob", f"+ --mask-replace-prob = "
                      f"{self.mask_replace_prob + self.mask_random_prob:g} exceeds 1")
        if self.masking == "dynamic":
            # Google's count, round(rate x length), is at most ceil(rate x S) for any length.
            self.mask_tokens = math.ceil(self.mask_rate * self.sequence_length)
        # [CLS] A [SEP] B [SEP]: three special tokens are never masked.
        if self.mask_tokens > self.sequence_length - 3:
            self.fail("mask_tokens", f"= {self.mask_tokens} must be at most sequence_length - 3 "
                      f"= {self.sequence_length - 3} ([CLS] and two [SEP] are never masked)")
        if self.eval_every and not self.eval_files:
            self.fail("eval_every", "needs held-out records: give --eval-files")
        if self.target_mlm_accuracy is not None and not (self.eval_files and self.eval_every):
            self.fail("target_mlm_accuracy", "needs held-out records checked during training: "
                      "give --eval-files and --eval-every N")


@dataclass
class OptimSection(Section):
    """Optimizer and learning-rate schedule."""

    optimizer: Literal["AdamW", "AdamWNoBiasCorrection", "LAMB", "LAMBNoBiasCorrection"] = opt(
        "AdamW", "AdamW (torch's) or LAMB, each with or without Adam's bias correction (the "
        "reference's AdamW had none: AdamWNoBiasCorrection)")
    learning_rate: float = opt(1e-3, "peak learning rate", gt=0)
    lr_schedule: Literal["constant", "linear"] = opt(
        "constant", "'linear': warm up for int(lr_warmup x steps), then decay linearly to 0")
    lr_warmup: float = opt(0.0, "warmup as a fraction of --training-steps", ge=0, lt=1)
    weight_decay: float = opt(0.0, "decoupled weight decay (never on biases and LayerNorm)", ge=0)
    beta1: float = opt(0.9, "first-moment decay", ge=0, lt=1)
    beta2: float = opt(0.999, "second-moment decay", ge=0, lt=1)
    eps: float = opt(1e-6, "denominator epsilon (the reference's 1e-6)", gt=0)
    max_grad_norm: float | None = opt(
        None, "clip the global gradient norm to this before each step (none: no clipping, as "
        "the reference presets); the norm is logged every step either way", gt=0)
    enable_half_first_order_momentum: bool = opt(
        False, "keep the optimizer's first moment (exp_avg) in bfloat16: 2 bytes less state "
        "per parameter; the update is still computed in fp32")


@dataclass
class TrainSection(Section):
    """Batching, steps, precision, compilation, device and logging of the training loop."""

    micro_batch_size: int = opt(1, "sequences per forward/backward pass per process", ge=1)
    global_batch_size: int | None = opt(None, "sequences per optimizer step over all processes "
                                        "(default: micro x accumulation x world size)", ge=1)
    gradient_accumulation: int | None = opt(
        None, "micro-batches per optimizer step per process (default: derived from "
        "--global-batch-size / (--micro-batch-size x world size); 'none' re-derives it)", ge=1)
    training_steps: int = opt(150, "optimizer steps", ge=1)
    random_seed: int = opt(5, "seed of weights init, dropout and data order (reference: 5)")
    precision: Literal["fp32", "bf16", "fp16"] = opt(
        "fp32", "fp32, or bf16 / fp16 autocast (fp16 needs loss scaling)")
    auto_loss_scaling: bool = opt(False, "fp16 only: dynamic loss scaling (torch GradScaler), "
                                  "starting at --loss-scaling when given")
    loss_scaling: float | None = opt(None, "fp16 only: static loss scale, or with "
                                     "--auto-loss-scaling the initial scale", gt=0)
    compile: bool = opt(False, "torch.compile the model")
    executable_cache_dir: str | None = opt(None, "keep torch.compile artifacts here so an "
                                           "identical later run skips most compilation",
                                           metavar="DIR")
    compile_only: bool = opt(False, "compile (implies --compile), fill the cache and exit")
    device: Literal["auto", "cpu", "cuda"] = opt("auto", "auto: cuda when available, else cpu")
    disable_progress_bar: bool = opt(False, "no tqdm bar; log one line per step instead")
    wandb: bool = opt(False, "log losses, accuracies, LR and throughput to Weights & Biases")
    wandb_project: str = opt("bertforge", "Weights & Biases project name", metavar="NAME")
    wandb_param_steps: int = opt(
        0, "every N steps also log norm, mean and std of every parameter tensor and its "
        "gradient, where the metrics go (metrics.jsonl, TensorBoard, wandb with --wandb); "
        "0: never", ge=0)
    profile_dir: str | None = opt(
        None, "write a torch.profiler trace of steps 3-5 here (Chrome trace JSON, opens in "
        "TensorBoard's profiler or Perfetto); steps 1-2 are skipped as warm-up",
        metavar="DIR")

    def split_batch(self, world_size: int) -> None:
        """Fill gradient_accumulation / global_batch_size so that global = micro x accumulation
        x world size holds exactly: a rounded accumulation would silently change the recipe
        (the learning rate was tuned for that batch)."""
        per_step = self.micro_batch_size * world_size
        if self.gradient_accumulation is None:
            target = self.global_batch_size or per_step
            if target % per_step:
                raise ValueError(_indivisible(target, self.micro_batch_size, world_size))
            self.gradient_accumulation = target // per_step
        implied = per_step * self.gradient_accumulation
        if self.global_batch_size is None:
            self.global_batch_size = implied
        elif self.global_batch_size != implied:
            raise ValueError(
                f"global_batch_size {self.global_batch_size} != micro_batch_size "
                f"{self.micro_batch_size} x gradient_accumulation {self.gradient_accumulation} x "
                f"world size {world_size} = {implied}; give only one of --global-batch-size and "
                "--gradient-accumulation (or --gradient-accumulation none to derive it)")

    def check(self) -> None:
        if self.precision != "fp16":
            knob = ("auto_loss_scaling" if self.auto_loss_scaling
                    else "loss_scaling" if self.loss_scaling is not None else None)
            if knob:
                self.fail(knob, f"only applies to --precision fp16 (got {self.precision}, "
                          f"which needs no loss scaling); drop {flag_name(knob)} or use "
                          "--precision fp16")


@dataclass
class CheckpointSection(Section):
    """Where checkpoints go and where a run starts from."""

    checkpoint_output_dir: str | None = opt(
        None, "run directory: step_N/ checkpoints, the resolved config, metrics and logs",
        metavar="DIR")
    checkpoint_steps: int | None = opt(
        0, "also save every N steps (0 or none: only at the start and the end)", ge=0)
    checkpoint_input_dir: str | None = opt(
        None, "start from a step_N directory, a run directory (its latest step) or a Hugging "
        "Face model name/path", metavar="DIR")
    resume_training_from_checkpoint: bool = opt(
        False, "also restore optimizer, schedule, scaler, RNG and data position from "
        "--checkpoint-input-dir (not only the weights)")
    save_initial_checkpoint: bool = opt(
        False, "also save step_0, the weights before the first update, as the reference always "
        "did (a full checkpoint: GBs for BERT-large)")
    keep_last_checkpoints: int | None = opt(
        None, "keep only the newest N step_N checkpoints of the run, deleting older ones after "
        "each save (none: keep all)", ge=1)

    def check(self) -> None:
        if self.checkpoint_steps is None:
            self.checkpoint_steps = 0
        if self.resume_training_from_checkpoint and not self.checkpoint_input_dir:
            self.fail("resume_training_from_checkpoint", "needs the checkpoint to resume "
                      "from: give --checkpoint-input-dir (a step_N or run directory)")



# ---------------------------------------------------------------- run configs
@dataclass
class PretrainConfig(RunConfig):
    """Everything `bertforge pretrain` needs; each component gets only its section."""

    PRESET_FILE: ClassVar[str] = "pretraining.yml"
    DEFAULT_PRESET: ClassVar[str] = "demo_tiny_128"

    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    world_size: int | None = None  # set by resolve(); saved so a resume can compare

    def resolve(self, world_size: int = 1, packing_factor: float = 1.0) -> PretrainConfig:
        """Copy with gradient_accumulation / global_batch_size derived for `world_size` processes.

        global = micro x accumulation x world size must hold exactly: a rounded accumulation
        would silently change the optimisation recipe (the LR was tuned for that batch).
        With packed data (`packing_factor` = mean sequences per packed row, measured on the
        data) the global batch stays counted in sequences and the accumulation is divided by
        the factor, rounded to the nearest whole number (at least 1); global_batch_size is then
        the expected sequences per step.
        """
        if packing_factor != 1.0:
            return self._resolve_packed(world_size, packing_factor)
        if not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world size must be a positive integer, got {world_size!r}")
        cfg = type(self).from_dict(self.to_dict())
        t = cfg.train
        t.split_batch(world_size)
        t.compile = t.compile or t.compile_only
        # A model from --checkpoint-input-dir brings its own table (checked once loaded).
        if cfg.checkpoint.checkpoint_input_dir is None \
                and cfg.data.sequence_length > cfg.model.max_position_embeddings:
            raise ValueError(f"sequence_length {cfg.data.sequence_length} exceeds "
                             f"max_position_embeddings {cfg.model.max_position_embeddings}; "
                             "lower --sequence-length or raise --max-position-embeddings")
        d = cfg.data
        if (d.dataset == "pretraining" and not d.synthetic_data and not d.input_files
                and not t.compile_only):
            raise ValueError("no training data: give --input-files (TFRecord shards or globs), "
                             "or --synthetic-data / --dataset generated to measure speed")
        cfg.world_size = world_size
        return cfg

    def _resolve_packed(self, world_size: int, packing_factor: float) -> PretrainConfig:
        """Packed data: accumulation = round(global / (micro x world x factor)), unless the user
        fixed both --global-batch-size and --gradient-accumulation (then rows are theirs)."""
        if not packing_factor >= 1.0:
            raise ValueError(f"packing factor {packing_factor} must be at least 1 (sequences per row)")
        cfg = type(self).from_dict(self.to_dict())
        t = cfg.train
        target = t.global_batch_size or t.micro_batch_size * world_size * (t.gradient_accumulation or 1)
        if t.global_batch_size is None or t.gradient_accumulation is None:
            rows = t.micro_batch_size * world_size * packing_factor
            t.gradient_accumulation = max(1, round(target / rows))
        t.global_batch_size = target
        unpacked = type(self).from_dict(cfg.to_dict())
        unpacked.train.global_batch_size = None
        resolved = PretrainConfig.resolve(unpacked, world_size)  # every other rule
        resolved.train.global_batch_size = target
        return resolved


def _indivisible(global_batch: int, micro: int, world_size: int) -> str:
    msg = (f"global_batch_size {global_batch} is not divisible by micro_batch_size {micro} x "
           f"world size {world_size} = {micro * world_size}, so no whole gradient accumulation "
           "gives it")
    if global_batch % world_size:
        return msg + f"; use a --global-batch-size that is a multiple of {world_size}"
    per_process = global_batch // world_size
    fits = [m for m in range(1, min(per_process, 4096) + 1) if per_process % m == 0]
    return msg + f"; use a --micro-batch-size in {fits[-12:]}"



@dataclass
class DemoSection(Section):
    """The README's main job on the embedded Wikipedia sample (preset demo_sample_128)."""

    output_dir: str = opt("demo-output", "where the data stages and the run go (complete data "
                          "stages are reused by a second run)", metavar="DIR")
    training_steps: int | None = opt(None, "optimizer steps (default: the demo_sample_128 "
                                     "preset's)", ge=1)
    workers: int | None = opt(None, "processes of the data stages (default: all cores)", ge=1)


@dataclass
class DemoConfig(RunConfig):
    """`bertforge demo`."""

    demo: DemoSection = field(default_factory=DemoSection)
