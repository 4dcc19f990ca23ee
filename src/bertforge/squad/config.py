"""Typed configuration of `bertforge squad`: the pre-training sections plus two SQuAD sections.

SquadConfig is a RunConfig like PretrainConfig, so presets (presets/squad.yml with
`inherit:`), generated flags, did-you-mean on typos and the saved config all come from
bertforge.config unchanged. It reuses ModelSection (shape of a randomly initialised model,
and the dropout rates applied to a loaded one), OptimSection, CheckpointSection and
TrainSection; only two things are SQuAD's own:

- SquadDataSection: where examples come from and how they become windows. The window
  shape (sequence length 384, doc stride 128, max query length 64, as the reference) and its
  rule are WindowSection's, shared with `bertforge serve`, so the two cannot disagree.
- SquadTaskSection: what to run (training, validation), epochs, and post-processing knobs.
`bertforge squad-eval` (SquadEvalConfig, flags only) is configured here too.

TrainSection is subclassed only to make `training_steps` optional: fine-tuning is counted in
epochs (the reference's 3), so by default the step count is derived from --num-epochs and the
number of training windows once the features exist (`steps_for`); an explicit
--training-steps wins. The resolved step count is then stored back, so the saved config
names the exact schedule that ran.

Cost: none at run time; the CLI still imports no torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from bertforge.config import (CheckpointSection, ModelSection, OptimSection, RunConfig, Section,
                              TrainSection, WindowSection, opt)


@dataclass
class SquadDataSection(WindowSection):
    """SQuAD inputs and how examples become fixed-length windows (shape: WindowSection)."""

    train_file: str | None = opt(None, "SQuAD-format JSON to fine-tune on (train-v1.1.json, "
                                 "train-v2.0.json or your own)", metavar="PATH")
    predict_file: str | None = opt(None, "SQuAD-format JSON to predict and score (dev-v1.1.json, "
                                   "dev-v2.0.json)", metavar="PATH")
    dataset: Literal["files", "squad", "squad_v2"] = opt(
        "files", "'files': --train-file/--predict-file; 'squad' / 'squad_v2': the Hugging Face "
        "datasets copies (needs the datasets package and a network connection)")
    squad_v2: bool = opt(False, "SQuAD 2.0: questions may have no answer (is_impossible); "
                         "predict '' when the null score wins, write null_odds.json")
    tokenizer: str | None = opt(None, "tokenizer directory or Hugging Face name (default: the "
                                "checkpoint's tokenizer files, else bert-base-uncased)",
                                metavar="PATH")
    feature_workers: int = opt(1, "processes that build windows (same windows for any number)",
                               ge=1)
    packed_data: bool = opt(False, "pack up to 3 windows per --sequence-length row "
                            "(block-diagonal attention) for training and prediction: same "
                            "losses and predictions as one window per row, ~half the rows")

    def check(self) -> None:
        super().check()
        if self.dataset == "squad_v2":
            self.squad_v2 = True
        elif self.dataset == "squad" and self.squad_v2:
            self.fail("squad_v2", "contradicts --dataset squad (SQuAD 1.1); use --dataset "
                      "squad_v2")


@dataclass
class SquadTaskSection(Section):
    """What the run does and how logits become answers."""

    squad_do_training: bool = opt(True, "fine-tune on the training examples")
    squad_do_validation: bool = opt(True, "predict the validation examples, write predictions "
                                    "and score them")
    num_epochs: float = opt(3.0, "passes over the training windows (sets the step count "
                            "unless --training-steps is given)", gt=0)
    n_best_size: int = opt(20, "start and end candidates per window (top-n x top-n spans)", ge=1)
    max_answer_length: int = opt(30, "longest answer in tokens", ge=1)
    null_score_diff_threshold: float = opt(
        0.0, "SQuAD 2.0: answer '' when null score - best span score exceeds this")
    eval_batch_size: int = opt(64, "windows per forward pass when predicting", ge=1)


@dataclass
class SquadTrainSection(TrainSection):
    """Batching, steps, precision, compilation, device and logging of the fine-tuning loop."""

    training_steps: int | None = opt(None, "optimizer steps (default: --num-epochs over the "
                                     "training windows)", ge=1)
    random_seed: int = opt(1984, "seed of the QA head init, dropout and data order")


@dataclass
class SquadConfig(RunConfig):
    """Everything `bertforge squad` needs; each component gets only its section."""

    PRESET_FILE: ClassVar[str] = "squad.yml"
    DEFAULT_PRESET: ClassVar[str] = "squad_base_384"

    model: ModelSection = field(default_factory=ModelSection)
    data: SquadDataSection = field(default_factory=SquadDataSection)
    squad: SquadTaskSection = field(default_factory=SquadTaskSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: SquadTrainSection = field(default_factory=SquadTrainSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    world_size: int | None = None  # set by resolve()

    def resolve(self, world_size: int = 1) -> SquadConfig:
        """Copy with the batch split derived for `world_size` processes and the inputs checked.

        Same rule as pre-training: global = micro x accumulation x world size, exactly.
        """
        if not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world size must be a positive integer, got {world_size!r}")
        cfg = type(self).from_dict(self.to_dict())
        t, d, s = cfg.train, cfg.data, cfg.squad
        t.split_batch(world_size)
        if t.compile_only:
            raise ValueError("--compile-only is a pre-training option; for SQuAD use --compile "
                             "with --executable-cache-dir (the first run fills the cache)")
        if not (s.squad_do_training or s.squad_do_validation):
            raise ValueError("nothing to do: --squad-do-training and --squad-do-validation are "
                             "both false")
        if d.dataset == "files":
            if s.squad_do_training and not d.train_file:
                raise ValueError("no training data: give --train-file (SQuAD JSON), --dataset "
                                 "squad|squad_v2, or --squad-do-training false")
            if s.squad_do_validation and not d.predict_file:
                raise ValueError("no validation data: give --predict-file (SQuAD JSON), --dataset "
                                 "squad|squad_v2, or --squad-do-validation false")
        if not s.squad_do_training and not cfg.checkpoint.checkpoint_input_dir:
            raise ValueError("--squad-do-training false predicts with an already fine-tuned "
                             "model: give it with --checkpoint-input-dir")
        if d.sequence_length > cfg.model.max_position_embeddings:
            raise ValueError(f"sequence_length {d.sequence_length} exceeds "
                             f"max_position_embeddings {cfg.model.max_position_embeddings}")
        cfg.world_size = world_size
        return cfg

    def steps_for(self, num_windows: int) -> int:
        """Optimizer steps: --training-steps, else ceil(epochs x windows / global batch)."""
        if self.train.training_steps is not None:
            return self.train.training_steps
        assert self.train.global_batch_size is not None, "resolve() first"
        return max(1, math.ceil(self.squad.num_epochs * num_windows / self.train.global_batch_size))


# ---------------------------------------------------------------- bertforge squad-eval
@dataclass
class SquadEvalSection(Section):
    """The official SQuAD v1.1/v2.0 evaluation of a predictions.json."""

    data_file: str | None = opt(None, "the SQuAD dataset JSON", metavar="DATA.json",
                                positional=True, required=True)
    prediction_file: str | None = opt(None, "question id -> answer text",
                                      metavar="PREDICTIONS.json", positional=True, required=True)
    na_prob_file: str | None = opt(None, "question id -> no-answer probability/score "
                                   "(null_odds.json); SQuAD 2.0", metavar="PATH")
    na_prob_thresh: float = opt(1.0, "predict '' when the no-answer probability exceeds this")
    out_file: str | None = opt(None, "write the JSON here, not stdout", metavar="PATH")
    version: Literal["auto", "1.1", "2.0"] = opt(
        "auto", "which official script to follow (auto: 2.0 for SQuAD 2.0 data or with "
        "--na-prob-file)")


@dataclass
class SquadEvalConfig(RunConfig):
    """`bertforge squad-eval`."""

    eval: SquadEvalSection = field(default_factory=SquadEvalSection)
