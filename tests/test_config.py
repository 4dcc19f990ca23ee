"""Config sections, YAML presets and generated flags: `bertforge pretrain`'s in depth, then the
mechanism as every other subcommand uses it (serve presets, flat construction, shared sections,
required fields).

~3 s in all, mostly the one transformers import (bert_config); the rest is pure Python.
Every preset of presets/pretraining.yml loads and resolves, flags beat presets without unset
flags clobbering them, typos fail with a did-you-mean, and a resolved config survives
to_dict/from_dict (and JSON/YAML) exactly.
"""

from __future__ import annotations

import argparse
import json
import textwrap

import pytest
import yaml

from bertforge.config import (
    BenchConfig,
    DataSection,
    ExportConfig,
    InstanceConfig,
    PackConfig,
    PretrainConfig,
    ServeConfig,
    TokenizeConfig,
    WindowSection,
    coerce,
    default_preset_file,
    load_config,
    load_presets,
    parse_bool,
)
from bertforge.config.serve import ServeBatchingSection, ServedModelSection
from bertforge.flags import DidYouMeanParser, add_config_arguments, config_from_args
from bertforge.squad.config import SquadDataSection

REFERENCE_PRESETS = [
    "demo_tiny_128", "pretrain_base_128", "pretrain_base_512", "pretrain_large_128",
    "pretrain_large_512", "unit_test", "pretrain_base_3L_128_single",
] + [f"pretrain_{size}_{seq}_{variant}" for size in ("base", "large") for seq in (128, 512)
     for variant in ("pod4", "POD64", "ALS")] + ["pretrain_large_128_POD64_ALS"]

REFERENCE_FLAGS = [
    "--config", "--micro-batch-size", "--gradient-accumulation", "--training-steps",
    "--learning-rate", "--lr-schedule", "--lr-warmup", "--optimizer", "--weight-decay",
    "--sequence-length", "--mask-tokens", "--input-files", "--dataset", "--synthetic-data",
    "--random-seed", "--dataloader-workers", "--checkpoint-output-dir", "--checkpoint-steps",
    "--checkpoint-input-dir", "--resume-training-from-checkpoint", "--disable-progress-bar",
    "--wandb", "--auto-loss-scaling", "--loss-scaling", "--executable-cache-dir",
    "--compile-only", "--hidden-size", "--num-hidden-layers", "--num-attention-heads",
    "--precision", "--compile", "--eval-files", "--eval-every", "--global-batch-size",
    "--config-file", "--recompute-checkpoint-every-layer", "--profile-dir",
    "--wandb-param-steps", "--enable-half-first-order-momentum",
]


def make_parser() -> argparse.ArgumentParser:
    parser = DidYouMeanParser(prog="bertforge pretrain")
    add_config_arguments(parser)
    return parser


def from_flags(*argv: str) -> PretrainConfig:
    return config_from_args(make_parser().parse_args(list(argv)))


def write_presets(tmp_path, text: str):
    path = tmp_path / "presets.yml"
    path.write_text(textwrap.dedent(text))
    return path


def test_every_reference_preset_exists_loads_and_resolves():
    presets = load_presets(default_preset_file())
    assert set(REFERENCE_PRESETS) <= set(presets)
    for name in presets:
        cfg = load_config(name, {"synthetic_data": True})
        assert cfg.config == name
        for world_size in (1, 8):
            if cfg.train.global_batch_size % (cfg.train.micro_batch_size * world_size):
                continue
            r = cfg.resolve(world_size)
            t = r.train
            assert t.micro_batch_size * t.gradient_accumulation * world_size == t.global_batch_size
            assert r.world_size == world_size
            assert r.model.hidden_size % r.model.num_attention_heads == 0
            # shared reference settings
            assert r.model.layer_norm_eps == 1e-3 and r.model.attention_probs_dropout_prob == 0
            assert t.random_seed == 5
        assert cfg.resolve(1).train.global_batch_size == cfg.train.global_batch_size


@pytest.mark.parametrize("name,shape,seq_mask,batch,optim,lr,steps", [
    ("demo_tiny_128", (64, 3, 8), (128, 20), 16, "AdamWNoBiasCorrection", 1e-3, 150),
    ("pretrain_base_128", (768, 12, 12), (128, 20), 65536, "LAMBNoBiasCorrection", 6e-3, 7038),
    ("pretrain_base_512", (768, 12, 12), (512, 76), 16384, "LAMBNoBiasCorrection", 2.828e-3,
     2137),
    ("pretrain_large_128", (1024, 24, 16), (128, 20), 65536, "LAMB", 6e-3, 7038),
    ("pretrain_large_512", (1024, 24, 16), (512, 76), 16384, "LAMB", 2.828e-3, 2137),
    # the reference's slip: its base_512_pod4 inherited the 128 preset; ours has 512 values
    ("pretrain_base_512_pod4", (768, 12, 12), (512, 76), 16384, "LAMBNoBiasCorrection",
     2.828e-3, 2137),
    ("pretrain_large_512_POD64", (1024, 24, 16), (512, 76), 16384, "LAMB", 2.828e-3, 2137),
    ("pretrain_base_3L_128_single", (768, 3, 12), (128, 20), 1024, "AdamWNoBiasCorrection", 1e-4,
     150),
])
def test_preset_numbers_match_the_reference(name, shape, seq_mask, batch, optim, lr, steps):
    cfg = load_config(name)
    m, d, o, t = cfg.model, cfg.data, cfg.optim, cfg.train
    assert (m.hidden_size, m.num_hidden_layers, m.num_attention_heads) == shape
    assert (d.sequence_length, d.mask_tokens) == seq_mask
    assert (t.global_batch_size, o.optimizer, o.learning_rate, t.training_steps) == (
        batch, optim, lr, steps)
    assert isinstance(o.learning_rate, float)  # YAML reads '1e-3' as a string: coerced


def test_demo_and_unit_test_and_als_details():
    demo = load_config("demo_tiny_128")
    assert (demo.optim.lr_schedule, demo.model.vocab_size, demo.train.precision) == (
        "constant", 30522, "fp32")
    unit = load_config("unit_test")
    assert (unit.model.vocab_size, unit.model.hidden_size, unit.model.num_hidden_layers,
            unit.model.num_attention_heads) == (1000, 32, 3, 8)
    als = load_config("pretrain_large_128_ALS")
    assert (als.train.precision, als.train.auto_loss_scaling, als.train.loss_scaling) == (
        "fp16", True, 1.0)
    base = load_config("pretrain_base_128")
    assert (base.optim.lr_warmup, base.optim.lr_schedule, base.optim.weight_decay) == (
        0.28, "linear", 0.01)


def test_generated_flags_keep_the_reference_names():
    options = make_parser()._option_string_actions
    missing = [f for f in REFERENCE_FLAGS if f not in options]
    assert not missing


def test_recompute_checkpoint_every_layer_is_an_alias_of_activation_checkpointing(capsys):
    # The reference's flag sets the field (bare, with a value, or as a preset key), shows in
    # --help as another name, and is never consulted itself (None in the saved config).
    assert from_flags("--recompute-checkpoint-every-layer").model.activation_checkpointing
    assert from_flags("--recompute-checkpoint-every-layer", "yes").model.activation_checkpointing
    off = from_flags("--recompute-checkpoint-every-layer", "false").model
    assert (off.activation_checkpointing, off.recompute_checkpoint_every_layer) == (False, None)
    on = load_config("unit_test", {"recompute_checkpoint_every_layer": True})
    assert on.model.activation_checkpointing and on.model.recompute_checkpoint_every_layer is None
    assert PretrainConfig.from_dict(json.loads(json.dumps(on.to_dict()))) == on
    assert from_flags("--activation-checkpointing").model.activation_checkpointing
    with pytest.raises(ValueError, match="--recompute-checkpoint-every-layer is another name for "
                       "--activation-checkpointing and the two disagree"):
        from_flags("--recompute-checkpoint-every-layer", "--activation-checkpointing", "false")
    with pytest.raises(SystemExit):
        make_parser().parse_args(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--recompute-checkpoint-every-layer [BOOL] the reference's name for " \
           "--activation-checkpointing" in help_text


def test_flags_override_preset_and_unset_flags_do_not_clobber():
    cfg = from_flags("--config", "pretrain_base_128", "--learning-rate", "1e-4",
                     "--hidden-size", "256", "--num-attention-heads", "4",
                     "--input-files", "a/*.tfrecord", "b.tfrecord")
    assert cfg.optim.learning_rate == 1e-4
    assert (cfg.model.hidden_size, cfg.model.num_attention_heads) == (256, 4)
    assert cfg.model.intermediate_size == 1024  # derived from the overridden width
    assert cfg.data.input_files == ["a/*.tfrecord", "b.tfrecord"]
    # not given: the preset's values survive, not the dataclass defaults
    assert cfg.optim.optimizer == "LAMBNoBiasCorrection"
    assert cfg.train.training_steps == 7038
    assert cfg.train.precision == "bf16"
    assert cfg.model.num_hidden_layers == 12
    # no --config: the default preset
    assert from_flags().config == "demo_tiny_128"
    assert from_flags().model.hidden_size == 64


@pytest.mark.parametrize("word,value", [
    ("true", True), ("True", True), ("1", True), ("yes", True), ("YES", True),
    ("false", False), ("0", False), ("no", False), ("No", False)])
def test_bool_forms(word, value):
    assert parse_bool(word) is value
    assert from_flags("--wandb", word).train.wandb is value
    assert from_flags(f"--shuffle={word}").data.shuffle is value


def test_bare_bool_flag_means_true_and_bad_bool_fails(capsys):
    assert from_flags("--synthetic-data").data.synthetic_data is True
    assert from_flags("--compile-only", "--wandb").train.compile_only is True
    with pytest.raises(SystemExit) as exc:
        make_parser().parse_args(["--wandb", "maybe"])
    assert exc.value.code == 2
    assert "true/false/1/0/yes/no" in capsys.readouterr().err
    with pytest.raises(ValueError, match="boolean"):
        parse_bool(2)


def test_yaml_bool_forms(tmp_path):
    path = write_presets(tmp_path, """
        a: {synthetic_data: "yes", shuffle: 0, wandb: "TRUE", compile: no}
    """)
    cfg = load_config("a", preset_file=path)
    assert (cfg.data.synthetic_data, cfg.data.shuffle, cfg.train.wandb, cfg.train.compile) == (
        True, False, True, False)


def test_unknown_flag_exits_2_with_did_you_mean(capsys):
    with pytest.raises(SystemExit) as exc:
        make_parser().parse_args(["--lerning-rate", "0.1"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--lerning-rate" in err and "did you mean '--learning-rate'" in err


def test_unknown_flag_in_a_subcommand_is_caught_at_the_leaf(capsys):
    top = DidYouMeanParser(prog="bertforge")
    add_config_arguments(top.add_subparsers(dest="command").add_parser("pretrain"))
    assert top.parse_args(["pretrain", "--mask-tokens", "10"]).mask_tokens == 10
    with pytest.raises(SystemExit) as exc:
        top.parse_args(["pretrain", "--mask-token", "10"])  # no prefix abbreviations either
    assert exc.value.code == 2
    assert "did you mean '--mask-tokens'" in capsys.readouterr().err


def test_bad_choice_value_names_the_choices(capsys):
    assert from_flags("--optimizer", "lamb").optim.optimizer == "LAMB"  # case-insensitive
    with pytest.raises(SystemExit):
        make_parser().parse_args(["--lr-schedule", "linaer"])
    assert "did you mean 'linear'" in capsys.readouterr().err


def test_unknown_preset_did_you_mean_and_list():
    with pytest.raises(ValueError) as exc:
        load_config("pretrain_bse_128")
    msg = str(exc.value)
    assert "did you mean 'pretrain_base_128'" in msg
    assert "presets: demo_tiny_128, pretrain_base_128," in msg


def test_unknown_preset_key_names_preset_and_key(tmp_path):
    path = write_presets(tmp_path, """
        base: {hidden_size: 64, num_attention_heads: 8}
        child: {inherit: base, learnig_rate: 0.1}
    """)
    with pytest.raises(ValueError) as exc:
        load_config("child", preset_file=path)
    msg = str(exc.value)
    assert "'child'" in msg and "'learnig_rate'" in msg and "did you mean 'learning_rate'" in msg


def test_inherit_chain_and_errors(tmp_path):
    path = write_presets(tmp_path, """
        a: {hidden_size: 64, num_attention_heads: 8, learning_rate: 0.5, training_steps: 7}
        b: {inherit: a, learning_rate: 0.25}
        c: {inherit: b, training_steps: 9}
        loop1: {inherit: loop2}
        loop2: {inherit: loop1}
        orphan: {inherit: bb}
    """)
    cfg = load_config("c", preset_file=path)
    assert (cfg.model.hidden_size, cfg.optim.learning_rate, cfg.train.training_steps) == (
        64, 0.25, 9)
    with pytest.raises(ValueError, match="inherit cycle loop1 -> loop2 -> loop1"):
        load_config("loop1", preset_file=path)
    with pytest.raises(ValueError, match="inherits unknown preset 'bb'.*did you mean 'b'"):
        load_config("orphan", preset_file=path)


def test_preset_bad_value_and_missing_file(tmp_path):
    path = write_presets(tmp_path, "a: {micro_batch_size: many}\n")
    with pytest.raises(ValueError, match="preset 'a'.*micro_batch_size: must be an integer"):
        load_config("a", preset_file=path)
    with pytest.raises(FileNotFoundError, match="--config-file"):
        load_config("a", preset_file=tmp_path / "absent.yml")


def test_gradient_accumulation_derivation():
    cfg = load_config("pretrain_base_128", {"micro_batch_size": 32, "synthetic_data": True})
    assert cfg.resolve(1).train.gradient_accumulation == 2048
    assert cfg.resolve(8).train.gradient_accumulation == 256
    # an explicit accumulation flag replaces the preset's global batch instead of conflicting
    acc = from_flags("--config", "pretrain_base_128", "--micro-batch-size", "8",
                     "--gradient-accumulation", "4", "--synthetic-data").resolve(2)
    assert (acc.train.gradient_accumulation, acc.train.global_batch_size) == (4, 64)
    # a micro-batch flag alone keeps the preset's global batch (the recipe)
    micro = from_flags("--micro-batch-size", "4", "--synthetic-data").resolve(1)
    assert (micro.train.gradient_accumulation, micro.train.global_batch_size) == (4, 16)
    # 'none' re-derives the accumulation from the kept global batch (e.g. a new world size)
    flag = from_flags("--micro-batch-size", "4", "--gradient-accumulation", "none",
                      "--synthetic-data").resolve(2)
    assert (flag.train.gradient_accumulation, flag.train.global_batch_size) == (2, 16)
    with pytest.raises(ValueError, match="give only one of"):
        micro.resolve(2)  # resolved for 1 process: both numbers fixed, so 2 processes conflict
    saved = micro.to_dict()
    saved["train"]["gradient_accumulation"] = None
    assert PretrainConfig.from_dict(saved).resolve(2).train.gradient_accumulation == 2
    # neither given: accumulation 1
    plain = PretrainConfig(data=DataSection(synthetic_data=True))
    assert plain.resolve(3).train.global_batch_size == plain.train.micro_batch_size * 3


def test_indivisible_and_conflicting_batches_are_errors():
    cfg = load_config("demo_tiny_128", {"micro_batch_size": 3, "synthetic_data": True})
    with pytest.raises(ValueError) as exc:
        cfg.resolve(1)
    msg = str(exc.value)
    assert "global_batch_size 16" in msg and "micro_batch_size 3" in msg and "[1, 2, 4, 8, 16]" in msg
    with pytest.raises(ValueError, match="multiple of 3"):
        load_config("demo_tiny_128", {"synthetic_data": True, "micro_batch_size": 1}).resolve(3)
    both = load_config("demo_tiny_128", {"synthetic_data": True, "global_batch_size": 16,
                                         "gradient_accumulation": 4, "micro_batch_size": 2})
    with pytest.raises(ValueError, match="give only one of"):
        both.resolve(1)


@pytest.mark.parametrize("overrides,match", [
    ({"hidden_size": 100, "num_attention_heads": 8}, "must divide hidden_size"),
    ({"mask_tokens": 126}, "at most sequence_length - 3"),
    ({"auto_loss_scaling": True}, "only applies to --precision fp16"),
    ({"precision": "bf16", "loss_scaling": 128}, "only applies to --precision fp16"),
    ({"resume_training_from_checkpoint": True}, "--checkpoint-input-dir"),
    ({"eval_every": 10}, "--eval-files"),
    ({"target_mlm_accuracy": 0.3}, "--eval-files and --eval-every"),
    ({"target_mlm_accuracy": 0.3, "eval_files": ["h/*.tfrecord"]}, "--eval-every N"),
    ({"target_mlm_accuracy": 1.5, "eval_files": ["h/*"], "eval_every": 5}, "must be > 0 and < 1"),
    ({"mlm_bias_init": "prior"}, "unigram"),
    ({"learning_rate": 0}, r"learning_rate \(--learning-rate\) must be > 0"),
    ({"lr_warmup": 1.5}, "must be >= 0 and < 1"),
])
def test_section_rules(overrides, match):
    with pytest.raises(ValueError, match=match):
        load_config("demo_tiny_128", overrides)


def test_resolve_cross_section_rules():
    with pytest.raises(ValueError, match="--input-files"):
        load_config("demo_tiny_128").resolve(1)
    with pytest.raises(ValueError, match="max_position_embeddings 256"):
        load_config("demo_tiny_128", {"synthetic_data": True, "max_position_embeddings": 256,
                                      "sequence_length": 512, "mask_tokens": 76}).resolve(1)
    r = load_config("demo_tiny_128", {"compile_only": True}).resolve(1)
    assert r.train.compile is True


def test_to_dict_from_dict_round_trip():
    cfg = from_flags("--config", "pretrain_large_512_ALS", "--input-files", "x/*.tfrecord",
                     "--eval-files", "held/*.tfrecord", "--eval-every", "50",
                     "--checkpoint-output-dir", "runs/a", "--wandb").resolve(8)
    saved = cfg.to_dict()
    assert set(saved) == {"config", "model", "data", "optim", "train", "checkpoint",
                          "world_size"}
    again = PretrainConfig.from_dict(saved)
    assert again == cfg
    assert PretrainConfig.from_dict(json.loads(json.dumps(saved))) == cfg
    assert PretrainConfig.from_dict(yaml.safe_load(yaml.safe_dump(saved))) == cfg
    assert again.resolve(8) == cfg  # a resolved config resolves to itself
    saved["optim"]["learnig_rate"] = 1.0
    with pytest.raises(ValueError, match="did you mean 'learning_rate'"):
        PretrainConfig.from_dict(saved)


def test_model_section_becomes_a_bert_config():
    from bertforge.model.bert import bert_config
    bert = bert_config(load_config("demo_tiny_128").model)
    assert (bert.hidden_size, bert.num_hidden_layers, bert.num_attention_heads,
            bert.intermediate_size, bert.layer_norm_eps, bert.attention_probs_dropout_prob,
            bert.vocab_size) == (64, 3, 8, 256, 1e-3, 0.0, 30522)


# ---------------------------------------------------------------- the mechanism, every subcommand
def test_every_serve_preset_loads():
    presets = load_presets(default_preset_file(ServeConfig))
    assert "default" in presets and ServeConfig.DEFAULT_PRESET == "default"
    for name in presets:
        cfg = load_config(name, cls=ServeConfig)
        assert cfg.config == name and cfg.window.sequence_length == 384
    assert load_config("sync_clients", cls=ServeConfig).batching.max_queue_delay_us == 0
    assert load_config("gpu_bf16", cls=ServeConfig).model.device == "cuda"


def test_a_run_config_is_built_from_sections_or_from_flat_fields():
    flat = ServeConfig(checkpoint_input_dir="qa", sequence_length=128, doc_stride=32,
                       max_batch_size=8)
    nested = ServeConfig(model=ServedModelSection(checkpoint_input_dir="qa"),
                         window=WindowSection(sequence_length=128, doc_stride=32),
                         batching=ServeBatchingSection(max_batch_size=8))
    assert flat == nested and flat.to_flat()["max_batch_size"] == 8
    assert ServeConfig.from_dict(flat.to_dict()) == flat
    with pytest.raises(ValueError, match=r"max_batch_size \(--max-batch-size\) must be >= 1"):
        ServeConfig(max_batch_size=0)


def test_the_window_rule_has_one_home():
    """SQuAD fine-tuning and serving share WindowSection: same defaults, same rule."""
    for cls in (WindowSection, SquadDataSection):
        assert (cls().sequence_length, cls().doc_stride, cls().max_query_length) == (384, 128, 64)
        with pytest.raises(ValueError, match="doc_stride .* must be below the context tokens"):
            cls(sequence_length=128, max_query_length=64, doc_stride=61)
    assert BenchConfig().load.sequence_length == ExportConfig().export.sequence_length == 384


def test_lists_of_numbers_and_their_bounds():
    assert coerce("1,4,8", list[int]) == [1, 4, 8]
    assert coerce(["2", "3"], list[int]) == [2, 3]
    assert coerce("a,b.tfrecord", list[str]) == ["a,b.tfrecord"]  # paths may hold commas
    with pytest.raises(ValueError, match=r"clients \(--clients\) must be >= 1, got 0"):
        BenchConfig(clients=[4, 0])


def test_required_fields_are_checked_before_running_not_on_build():
    cfg = PackConfig(inputs=["in"])  # builds: --print-config and --help work without them
    with pytest.raises(ValueError, match="--output-dir is required"):
        cfg.check_required()
    with pytest.raises(ValueError, match="INPUT is required"):
        PackConfig(output_dir="o", sequence_length=128).check_required()
    PackConfig(inputs=["in"], output_dir="o", sequence_length=128).check_required()


def test_instance_config_is_a_section_built_positionally_too():
    assert InstanceConfig(512, 76, duplication_factor=1) == InstanceConfig(
        sequence_length=512, mask_tokens=76, duplication_factor=1)
    with pytest.raises(ValueError, match=r"short_seq_prob \(--short-seq-prob\) must be >= 0 "
                                         r"and <= 1"):
        InstanceConfig(short_seq_prob=1.5)
    assert TokenizeConfig(mask_tokens=76, sequence_length=512).instances.mask_tokens == 76


def test_flat_names_are_unique_in_every_run_config():
    from bertforge.cli import COMMANDS
    for command in COMMANDS.values():
        command.config.field_sections()  # asserts uniqueness and no clash with section names


def test_preset_files_are_parsed_once_and_callers_get_copies(tmp_path):
    path = write_presets(tmp_path, "a: {hidden_size: 64, num_attention_heads: 8}\n")
    first = load_presets(path)
    first["a"]["hidden_size"] = 1
    assert load_presets(path)["a"]["hidden_size"] == 64
    path.write_text("a: {hidden_size: 128, num_attention_heads: 8}\n")  # a new version is read
    assert load_config("a", preset_file=path).model.hidden_size == 128
