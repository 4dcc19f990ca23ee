"""The pre-training presets against the reference's table, number by number.

REFERENCE below is the table of reference-system.md ("Pre-training"), copied as data the way
the reference's configs_pretraining.yml wrote it, and VARIANTS its variants paragraph. Each
preset of presets/pretraining.yml is loaded and resolved through the preset machinery (as
`bertforge pretrain --config NAME` does) and every number the recipe depends on (shape,
vocab, seq/mask, global batch, optimizer, weight decay, lr, warmup, schedule, steps, and the
shared LayerNorm eps / attention dropout / seed) must equal the table's; any difference fails
with the list of differences.

Deliberate, documented deviations (pretraining.yml's header), checked as such rather than
skipped: the micro-batch split is re-chosen for GPUs/CPUs (only the global batch is the
recipe, so mbs x GA x rep is checked to give the table's global batch, not copied); static
fp16 loss scales become bf16 (fp32 for the two CPU-sized presets), while the _ALS presets keep
fp16 with automatic loss scaling from scale 1; pretrain_base_512_pod4 inherits the 512 phase
(the reference's inherited the 128 preset by mistake).
"""

from __future__ import annotations

import pytest

from bertforge.config import default_preset_file, load_config, load_presets

# reference-system.md's table, as written there. Columns: H/L/heads, seq/mask, mbs x GA x rep,
# global batch, optimizer, wd, lr, warmup, schedule, steps, loss scale. Where a cell leaves a
# value out, the row says what the reference's file gave it: base_512 is "same" as base_128
# (LAMBNoBiasCorrection, .01); large_512 inherits large_128's wd .01; unit_test's AdamW has
# no wd (0) and its schedule is unset (constant, no warmup), like demo_tiny_128's.
REFERENCE = {
    #  name: ((H, L, heads), (seq, mask), (mbs, GA, rep), global, optimizer, wd, lr, warmup,
    #         schedule, steps, loss scale)
    "demo_tiny_128": ((64, 3, 8), (128, 20), (1, 16, 1), 16, "AdamW", 0.0, 1e-3, 0.0,
                      "constant", 150, 16),
    "pretrain_base_128": ((768, 12, 12), (128, 20), (32, 512, 4), 65536, "LAMBNoBiasCorrection",
                          0.01, 6e-3, 0.28, "linear", 7038, 16384),
    "pretrain_base_512": ((768, 12, 12), (512, 76), (8, 512, 4), 16384, "LAMBNoBiasCorrection",
                          0.01, 2.828e-3, 0.128, "linear", 2137, 128),
    "pretrain_large_128": ((1024, 24, 16), (128, 20), (8, 2048, 4), 65536, "LAMB", 0.01, 6e-3,
                           0.28, "linear", 7038, 4096),
    "pretrain_large_512": ((1024, 24, 16), (512, 76), (2, 2048, 4), 16384, "LAMB", 0.01,
                           2.828e-3, 0.128, "linear", 2137, 8192),
    "unit_test": ((32, 3, 8), (128, 20), (1, 16, 1), 16, "AdamW", 0.0, 1e-2, 0.0, "constant",
                  10, None),
    "pretrain_base_3L_128_single": ((768, 3, 12), (128, 20), (8, 128, 1), 1024, "AdamW", 0.01,
                                    1e-4, 0.01, "linear", 150, 16),
}
# Shared by all rows: vocab 30522 (unit_test: 1000), LN eps 1e-3, attention dropout 0, seed 5.
VOCAB = {"unit_test": 1000}
SHARED = {"layer_norm_eps": 1e-3, "attention_probs_dropout_prob": 0.0, "random_seed": 5}

# The variants paragraph: base row, then what changes. *_pod4: rep 1, GA x4 (same global
# batch); *_POD64: mbs x 512 x 16, loss scale 32768 (128) / 16384 (512); *_ALS: loss scale 1
# plus automatic loss scaling.
VARIANTS = {
    "pretrain_base_128_pod4": ("pretrain_base_128", {"split": (32, 2048, 1)}),
    # The reference inherited pretrain_base_128 here by mistake; bertforge's inherits 512.
    "pretrain_base_512_pod4": ("pretrain_base_512", {"split": (8, 2048, 1)}),
    "pretrain_large_128_pod4": ("pretrain_large_128", {"split": (8, 8192, 1)}),
    "pretrain_large_512_pod4": ("pretrain_large_512", {"split": (2, 8192, 1)}),
    "pretrain_large_128_POD64": ("pretrain_large_128", {"split": (8, 512, 16),
                                                        "loss_scale": 32768}),
    "pretrain_large_512_POD64": ("pretrain_large_512", {"split": (2, 512, 16),
                                                        "loss_scale": 16384}),
    "pretrain_large_128_ALS": ("pretrain_large_128", {"loss_scale": 1, "als": True}),
    "pretrain_large_128_POD64_ALS": ("pretrain_large_128_POD64", {"loss_scale": 1, "als": True}),
}

# The reference's optimizer names -> bertforge's: its AdamW was poptorch.optim.AdamW(...,
# bias_correction=False); its LAMBs are ours by the same names.
OPTIMIZER = {"AdamW": "AdamWNoBiasCorrection", "LAMB": "LAMB",
             "LAMBNoBiasCorrection": "LAMBNoBiasCorrection"}

# Presets bertforge has beyond the reference: variants of a reference row (same recipe, so the
# same numbers; the ALS ones fp16 + automatic loss scaling from 1) or its own recipe.
EXTRA_VARIANTS = {
    "pretrain_base_128_POD64": ("pretrain_base_128", False),
    "pretrain_base_512_POD64": ("pretrain_base_512", False),
    "pretrain_base_128_ALS": ("pretrain_base_128", True),
    "pretrain_base_512_ALS": ("pretrain_base_512", True),
    "pretrain_large_512_ALS": ("pretrain_large_512", True),
}
OWN_RECIPES = {"demo_sample_128"}  # `bertforge demo`'s recipe, measured in docs/benchmarks.md


def reference_row(name: str) -> dict:
    """The table's numbers for `name` (a row, or a variant applied to its base row)."""
    if name in VARIANTS:
        base, change = VARIANTS[name]
        row = reference_row(base)
        if "split" in change:
            row["split"] = change["split"]
        row["loss_scale"] = change.get("loss_scale", row["loss_scale"])
        row["als"] = change.get("als", row["als"])
        return row
    (shape, seq_mask, split, global_batch, optimizer, wd, lr, warmup, schedule, steps,
     loss_scale) = REFERENCE[name]
    return {"shape": shape, "vocab_size": VOCAB.get(name, 30522), "seq_mask": seq_mask,
            "split": split, "global_batch_size": global_batch,
            "optimizer": OPTIMIZER[optimizer], "weight_decay": wd, "learning_rate": lr,
            "lr_warmup": warmup, "lr_schedule": schedule, "training_steps": steps,
            "loss_scale": loss_scale, "als": False, **SHARED}


def recipe(name: str) -> dict:
    """The same numbers as bertforge resolves them for `bertforge pretrain --config NAME`."""
    cfg = load_config(name, {"synthetic_data": True}).resolve(1)
    m, d, o, t = cfg.model, cfg.data, cfg.optim, cfg.train
    return {"shape": (m.hidden_size, m.num_hidden_layers, m.num_attention_heads),
            "vocab_size": m.vocab_size, "seq_mask": (d.sequence_length, d.mask_tokens),
            "global_batch_size": t.global_batch_size, "optimizer": o.optimizer,
            "weight_decay": o.weight_decay, "learning_rate": o.learning_rate,
            "lr_warmup": o.lr_warmup, "lr_schedule": o.lr_schedule,
            "training_steps": t.training_steps, "layer_norm_eps": m.layer_norm_eps,
            "attention_probs_dropout_prob": m.attention_probs_dropout_prob,
            "random_seed": t.random_seed, "precision": t.precision,
            "auto_loss_scaling": t.auto_loss_scaling, "loss_scaling": t.loss_scaling}


def differences(expected: dict, got: dict) -> list[str]:
    return [f"{key}: reference {expected[key]!r}, preset {got[key]!r}"
            for key in expected if key in got and got[key] != expected[key]]


def check_precision(row: dict, got: dict) -> list[str]:
    """ALS rows: fp16 with automatic loss scaling from the table's scale (1). Other rows: the
    documented bf16 (fp32 for CPU-sized presets) instead of a static fp16 loss scale."""
    if row["als"]:
        want = ("fp16", True, float(row["loss_scale"]))
        have = (got["precision"], got["auto_loss_scaling"], got["loss_scaling"])
        return [] if have == want else [f"precision/ALS/scale: want {want}, preset {have}"]
    if got["precision"] not in ("bf16", "fp32") or got["loss_scaling"] is not None:
        return [f"precision {got['precision']} / loss scale {got['loss_scaling']}: a static "
                "loss scale preset runs bf16 or fp32 here (pretraining.yml's header)"]
    return []


ALL_REFERENCE = list(REFERENCE) + list(VARIANTS)


def test_the_copied_table_is_consistent():
    # mbs x GA x rep = global batch in every row and variant (catches a mistyped copy).
    for name in ALL_REFERENCE:
        row = reference_row(name)
        mbs, ga, rep = row["split"]
        assert mbs * ga * rep == row["global_batch_size"], name


@pytest.mark.parametrize("name", ALL_REFERENCE)
def test_preset_equals_the_reference_table(name):
    row, got = reference_row(name), recipe(name)
    problems = differences(row, got) + check_precision(row, got)
    assert not problems, f"{name}: " + "; ".join(problems)


@pytest.mark.parametrize("name", sorted(EXTRA_VARIANTS))
def test_extra_variants_keep_their_base_recipe(name):
    base, als = EXTRA_VARIANTS[name]
    row = reference_row(base)
    row.update(als=als, loss_scale=1 if als else row["loss_scale"])
    got = recipe(name)
    problems = differences(row, got) + check_precision(row, got)
    assert not problems, f"{name}: " + "; ".join(problems)


def test_every_preset_is_accounted_for():
    presets = set(load_presets(default_preset_file()))
    known = set(ALL_REFERENCE) | set(EXTRA_VARIANTS) | OWN_RECIPES
    assert presets == known, (f"not in the reference's table nor declared here: "
                              f"{sorted(presets - known)}; missing: {sorted(known - presets)}")


def test_the_comparison_fails_on_a_difference():
    # The check must be able to fail: one changed number is reported by name.
    row = reference_row("pretrain_base_3L_128_single")
    got = recipe("pretrain_base_3L_128_single")
    got["lr_warmup"] = 0.28
    assert differences(row, got) == ["lr_warmup: reference 0.01, preset 0.28"]
    got["optimizer"] = "AdamW"
    assert "optimizer: reference 'AdamWNoBiasCorrection', preset 'AdamW'" in differences(row, got)


# reference-system.md, "SQuAD": the fine-tuning presets, and the SQuAD configs file's own
# demo_tiny_128 (64/3/8, seq 128, batch 16 = micro 1 x accumulation 16, AdamW lr 1e-3
# constant, 150 steps, 2 epochs, seed 1984, dataset squad). SQuAD keeps torch's AdamW.
SQUAD_BASE = {"shape": (768, 12, 12), "sequence_length": 384, "global_batch_size": 32,
              "optimizer": "AdamW", "learning_rate": 6e-5, "lr_warmup": 0.25,
              "lr_schedule": "linear", "attention_probs_dropout_prob": 0.1, "num_epochs": 3.0,
              "weight_decay": 0.01, "random_seed": 1984}
SQUAD_LARGE = {**SQUAD_BASE, "shape": (1024, 24, 16), "global_batch_size": 256,
               "learning_rate": 5e-5, "lr_warmup": 0.1, "attention_probs_dropout_prob": 0.15}
SQUAD = {
    "squad_base_384": SQUAD_BASE,
    "squad_large_384": SQUAD_LARGE,
    "squad_large_384_4x4": {**SQUAD_LARGE, "global_batch_size": 512},
    "demo_tiny_128": {"shape": (64, 3, 8), "sequence_length": 128, "global_batch_size": 16,
                      "split": (1, 16), "optimizer": "AdamW", "learning_rate": 1e-3,
                      "lr_schedule": "constant", "lr_warmup": 0.0, "training_steps": 150,
                      "num_epochs": 2.0, "random_seed": 1984, "dataset": "squad"},
}


@pytest.mark.parametrize("name", sorted(SQUAD))
def test_squad_preset_equals_the_reference(name):
    from bertforge.squad.config import SquadConfig

    cfg = load_config(name, {"train_file": "x.json", "predict_file": "x.json"},
                      cls=SquadConfig).resolve(1)
    m, d, o, t, s = cfg.model, cfg.data, cfg.optim, cfg.train, cfg.squad
    got = {"shape": (m.hidden_size, m.num_hidden_layers, m.num_attention_heads),
           "sequence_length": d.sequence_length, "global_batch_size": t.global_batch_size,
           "split": (t.micro_batch_size, t.gradient_accumulation), "optimizer": o.optimizer,
           "learning_rate": o.learning_rate, "lr_warmup": o.lr_warmup,
           "lr_schedule": o.lr_schedule, "attention_probs_dropout_prob":
           m.attention_probs_dropout_prob, "num_epochs": s.num_epochs,
           "weight_decay": o.weight_decay, "random_seed": t.random_seed,
           "training_steps": t.training_steps, "dataset": d.dataset}
    problems = differences(SQUAD[name], got)
    assert not problems, f"{name}: " + "; ".join(problems)


def test_every_squad_preset_is_accounted_for():
    from bertforge.squad.config import SquadConfig

    assert set(load_presets(default_preset_file(SquadConfig))) == set(SQUAD)
