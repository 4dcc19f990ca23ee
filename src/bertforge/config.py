"""Typed run configuration: dataclass sections, YAML presets with `inherit:`, validation.

A run's configuration is a tree of small dataclass sections (torchtitan style): `model`,
`data`, `optim`, `train`, `checkpoint`. Each section coerces and validates its own fields
when built, so a component that receives only its section (house style) can trust it.
Cross-section rules and derived values (gradient accumulation from the global batch and the
world size) live in `PretrainConfig.resolve(world_size)`, called once the process group is up.

Values come in three layers, later wins: dataclass defaults <- a named preset from
presets/pretraining.yml (following `inherit:` chains) <- the flags actually given. Every flag
defaults to argparse.SUPPRESS, so an unset flag never clobbers a preset value with an
argparse default. The flags are generated from the dataclass fields (flags.py), so a new
field is a flag, a preset key and a saved-config entry at once and the three can never drift
apart. The cost: flag names are the field names (dashes for
underscores), which is why fields keep the reference's names (micro_batch_size, mask_tokens,
...). Field names are unique across sections so presets stay flat like the reference's.

Global batch vs accumulation: a layer (parent preset, child preset, flags) that names exactly
one of global_batch_size / gradient_accumulation clears the other one set by earlier layers,
so `--gradient-accumulation 4` on a preset that fixes the global batch means "4 micro-batches
per step" rather than a conflict, and `--micro-batch-size 8` keeps the preset's global batch
(the optimisation recipe) and re-derives the accumulation.

Typos are errors with a did-you-mean (difflib): preset names, preset keys, choice values, and
flags (via flags.DidYouMeanParser; argparse's prefix abbreviations are switched off for these
parsers, since `--learning-rat` silently meaning `--learning-rate` hides typos and a future
flag could change what an abbreviation means). The module imports no torch/transformers, so
building the CLI stays instant (import + all flags + reading the presets: ~90 ms here).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import os
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Literal, Union

_BOOL_WORDS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
_NONE_WORDS = {"none", "null"}
_BATCH_PAIR = ("global_batch_size", "gradient_accumulation")


# ---------------------------------------------------------------- small helpers
def did_you_mean(word: str, candidates: typing.Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest candidates, or '' when none is close."""
    close = difflib.get_close_matches(str(word), list(candidates), n=3, cutoff=0.6)
    if not close:
        return ""
    return " (did you mean " + " or ".join(repr(c) for c in close) + "?)"


def parse_bool(value: Any) -> bool:
    """true/false/1/0/yes/no (any case), Python bools, and the ints 0/1."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _BOOL_WORDS:
        return _BOOL_WORDS[value.strip().lower()]
    raise ValueError(f"must be a boolean (true/false/1/0/yes/no), got {value!r}")


def _is_none(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value.strip().lower() in _NONE_WORDS)


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def opt(default: Any, help: str, *, ge: float | None = None, gt: float | None = None,
        lt: float | None = None, metavar: str | None = None) -> Any:
    """A dataclass field with its flag help and simple numeric bounds (checked on build)."""
    meta = {"help": help, "ge": ge, "gt": gt, "lt": lt, "metavar": metavar}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def coerce(value: Any, hint: Any) -> Any:
    """Convert a YAML/flag/JSON value to the field type `hint`; ValueError says what was expected.

    YAML 1.1 (PyYAML) reads `1e-3` as a string and `yes` as a bool, flags arrive as strings:
    one converter for all sources keeps a preset, a flag and a saved config interchangeable.
    """
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        assert len(inner) == 1, f"only Optional[X] unions are supported, got {hint}"
        if _is_none(value):
            return None
        return coerce(value, inner[0])
    if origin is Literal:
        if isinstance(value, str):
            if value in args:
                return value
            folded = {str(a).lower(): a for a in args}
            if value.lower() in folded:
                return folded[value.lower()]
        raise ValueError(f"must be one of {', '.join(map(str, args))}; got {value!r}"
                         + did_you_mean(str(value), map(str, args)))
    if origin is list:
        if isinstance(value, (str, os.PathLike)):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"must be a list, got {value!r}")
        return [coerce(v, args[0]) for v in value]
    if hint is bool:
        return parse_bool(value)
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise ValueError(f"must be an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                pass
        raise ValueError(f"must be a number, got {value!r}")
    if hint is str:
        if isinstance(value, (str, os.PathLike)):
            return os.fspath(value)
        raise ValueError(f"must be a string, got {value!r}")
    raise AssertionError(f"unsupported field type {hint}")


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    """cls(**values) with unknown keys reported by name and did-you-mean."""
    known = [f.name for f in fields(cls)]
    for key in values:
        if key not in known:
            raise ValueError(f"{where}: unknown key {key!r}{did_you_mean(key, known)}")
    return cls(**values)


# ---------------------------------------------------------------- sections
@dataclass
class Section:
    """Base of the config sections: coerces every field to its type and checks its bounds."""

    def __post_init__(self) -> None:
        hints = _hints(type(self))
        for f in fields(self):
            name = f"{f.name} ({flag_name(f.name)})"
            try:
                value = coerce(getattr(self, f.name), hints[f.name])
            except ValueError as err:
                raise ValueError(f"{name}: {err}") from None
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                m = f.metadata
                if ((m.get("ge") is not None and value < m["ge"])
                        or (m.get("gt") is not None and value <= m["gt"])
                        or (m.get("lt") is not None and value >= m["lt"])):
                    bounds = [f"{op} {m[k]}" for k, op in (("ge", ">="), ("gt", ">"), ("lt", "<"))
                              if m.get(k) is not None]
                    raise ValueError(f"{name} must be {' and '.join(bounds)}, got {value}")
            setattr(self, f.name, value)
        self.check()

    def check(self) -> None:
        """Rules between fields of this section; override in sections that have some."""

    @staticmethod
    def fail(field_name: str, message: str) -> typing.NoReturn:
        raise ValueError(f"{field_name} ({flag_name(field_name)}) {message}")


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

    def to_bert_config(self) -> Any:
        """The transformers.BertConfig of this shape (imported here: transformers is slow)."""
        import transformers

        from bertforge.model.attention import implementation

        return transformers.BertConfig(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            intermediate_size=self.intermediate_size,
            max_position_embeddings=self.max_position_embeddings,
            type_vocab_size=self.type_vocab_size, hidden_act=self.hidden_act,
            layer_norm_eps=self.layer_norm_eps, hidden_dropout_prob=self.hidden_dropout_prob,
            attention_probs_dropout_prob=self.attention_probs_dropout_prob,
            initializer_range=self.initializer_range,
            attn_implementation=implementation(self.attn_implementation))


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

    def check(self) -> None:
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

    optimizer: Literal["AdamW", "LAMB", "LAMBNoBiasCorrection"] = opt(
        "AdamW", "AdamW, or LAMB with or without Adam's bias correction")
    learning_rate: float = opt(1e-3, "peak learning rate", gt=0)
    lr_schedule: Literal["constant", "linear"] = opt(
        "constant", "'linear': warm up for int(lr_warmup x steps), then decay linearly to 0")
    lr_warmup: float = opt(0.0, "warmup as a fraction of --training-steps", ge=0, lt=1)
    weight_decay: float = opt(0.0, "decoupled weight decay (never on biases and LayerNorm)", ge=0)
    beta1: float = opt(0.9, "first-moment decay", ge=0, lt=1)
    beta2: float = opt(0.999, "second-moment decay", ge=0, lt=1)
    eps: float = opt(1e-6, "denominator epsilon (the reference's 1e-6)", gt=0)


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

    def check(self) -> None:
        if self.checkpoint_steps is None:
            self.checkpoint_steps = 0
        if self.resume_training_from_checkpoint and not self.checkpoint_input_dir:
            self.fail("resume_training_from_checkpoint", "needs the checkpoint to resume "
                      "from: give --checkpoint-input-dir (a step_N or run directory)")


# ---------------------------------------------------------------- run configs
@dataclass
class RunConfig:
    """A preset name plus sections; subclasses name their preset file and default preset.

    The machinery here (presets, flags, to_dict/from_dict) is shared by every recipe
    (pre-training now, SQuAD later): a recipe only declares its sections and `resolve`.
    """

    PRESET_FILE: ClassVar[str] = ""
    DEFAULT_PRESET: ClassVar[str] = ""

    config: str | None = None

    @classmethod
    def section_types(cls) -> dict[str, type[Section]]:
        hints = _hints(cls)
        return {f.name: hints[f.name] for f in fields(cls)
                if isinstance(hints[f.name], type) and issubclass(hints[f.name], Section)}

    @classmethod
    @functools.cache
    def field_sections(cls) -> dict[str, str]:
        """Flat field name -> section name; flat names must be unique (presets are flat)."""
        owner: dict[str, str] = {}
        for section, section_cls in cls.section_types().items():
            for f in fields(section_cls):
                assert f.name not in owner and f.name != "config", f"duplicate field {f.name}"
                owner[f.name] = section
        return owner

    @classmethod
    def from_flat(cls, values: dict[str, Any], *, config: str | None = None,
                  sources: dict[str, str] | None = None) -> RunConfig:
        """Build from flat field values; `sources` names where each value came from for errors."""
        owner = cls.field_sections()
        nested: dict[str, dict[str, Any]] = {name: {} for name in cls.section_types()}
        hints = {name: _hints(cls.section_types()[section])[name] for name, section in owner.items()}
        for key, value in values.items():
            where = (sources or {}).get(key, "config")
            if key not in owner:
                raise ValueError(f"{where}: unknown key {key!r}{did_you_mean(key, owner)}")
            try:
                nested[owner[key]][key] = coerce(value, hints[key])
            except ValueError as err:
                raise ValueError(f"{where}: {key}: {err}") from None
        return cls(config=config, **{s: cls.section_types()[s](**v) for s, v in nested.items()})

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML/JSON-safe) for the run directory and checkpoints."""
        return {f.name: (dataclasses.asdict(v) if isinstance(v := getattr(self, f.name), Section)
                         else v) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "saved config") -> RunConfig:
        """Inverse of to_dict (exact round trip); keys missing from an older save take defaults."""
        if not isinstance(data, dict):
            raise ValueError(f"{where}: expected a mapping of sections, got {type(data).__name__}")
        sections = cls.section_types()
        top = {}
        for key, value in data.items():
            if key in sections:
                if not isinstance(value, dict):
                    raise ValueError(f"{where}: section {key!r} must be a mapping")
                value = _build(sections[key], value, f"{where}: section {key!r}")
            top[key] = value
        return _build(cls, top, where)

    def resolve(self, world_size: int = 1) -> RunConfig:
        """A copy with derived values filled and cross-section rules checked."""
        return type(self).from_dict(self.to_dict())


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
        if cfg.data.sequence_length > cfg.model.max_position_embeddings:
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


# ---------------------------------------------------------------- presets
def default_preset_file(cls: type[RunConfig] = PretrainConfig) -> Path:
    """presets/<PRESET_FILE> inside the package (package data: a wheel installed anywhere,
    not only a checkout, finds them)."""
    return Path(__file__).resolve().parent / "presets" / cls.PRESET_FILE


def load_presets(path: Path | str) -> dict[str, dict[str, Any]]:
    """All presets of a YAML file: {name: {key: value}}; structural errors name the file."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"preset file {path} not found; pass --config-file PATH (the "
                                "package's presets/ directory holds the built-in ones)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ValueError(f"{path}: expected a mapping of preset name -> mapping of settings")
    return {str(k): v for k, v in data.items()}


def preset_layers(name: str, path: Path | str, cls: type[RunConfig] = PretrainConfig,
                  ) -> list[tuple[str, dict[str, Any]]]:
    """[(preset, its own settings)] from the root of the `inherit:` chain down to `name`."""
    presets = load_presets(path)
    known = list(cls.field_sections())
    chain: list[str] = []
    current: Any = name
    while current is not None:
        if not isinstance(current, str) or current not in presets:
            if not chain:
                raise ValueError(f"unknown preset {current!r} in {path}"
                                 f"{did_you_mean(str(current), presets)}; presets: "
                                 f"{', '.join(presets)}")
            raise ValueError(f"preset {chain[-1]!r} in {path} inherits unknown preset "
                             f"{current!r}{did_you_mean(str(current), presets)}")
        if current in chain:
            raise ValueError(f"{path}: inherit cycle {' -> '.join(chain + [current])}")
        chain.append(current)
        current = presets[current].get("inherit")
    layers = []
    for preset in reversed(chain):
        own = {k: v for k, v in presets[preset].items() if k != "inherit"}
        for key in own:
            if key not in known:
                raise ValueError(f"preset {preset!r} in {path}: unknown key {key!r}"
                                 f"{did_you_mean(key, known)}")
        layers.append((preset, own))
    return layers


def load_config(name: str | None = None, overrides: dict[str, Any] | None = None, *,
                preset_file: Path | str | None = None,
                cls: type[RunConfig] = PretrainConfig) -> RunConfig:
    """defaults <- preset `name` (with its inherit chain) <- overrides (flat field names).

    Not resolved: call .resolve(world_size) once the world size is known.
    """
    name = name or cls.DEFAULT_PRESET
    path = Path(preset_file) if preset_file else default_preset_file(cls)
    layers = [(f"preset {p!r} in {path}", own) for p, own in preset_layers(name, path, cls)]
    if overrides:
        layers.append(("", dict(overrides)))
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for where, own in layers:
        # The most specific layer that sets one of the pair decides; setting it to none
        # (re-derive) clears nothing.
        named = [k for k in _BATCH_PAIR if k in own and not _is_none(own[k])]
        if len(named) == 1:
            other = _BATCH_PAIR[1 - _BATCH_PAIR.index(named[0])]
            values.pop(other, None)
        for key, value in own.items():
            values[key] = value
            sources[key] = where or flag_name(key)
    return cls.from_flat(values, config=name, sources=sources)
