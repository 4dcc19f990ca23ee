"""The command line: every subcommand's --help, did-you-mean on typos, clean user errors, and
the one config tree behind every subcommand (generated flags, the chosen preset's values in
--help, --print-config, validation in the sections only, the old flag spellings)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import types
from dataclasses import fields

import pytest
import yaml

from bertforge.cli import COMMANDS, build_parser, cmd_pretrain, cmd_squad, command_path, main
from bertforge.config import flag_name, load_config
from bertforge.squad.config import SquadConfig

SUBCOMMANDS = [["wiki", "download"], ["wiki", "extract"], ["wiki", "preprocess"], ["vocab", "train"],
               ["tokenize"], ["index"], ["pack"], ["shuffle"], ["sample", "fetch"], ["benchmark"], ["pretrain"], ["squad"], ["squad-eval"],
               ["demo"], ["serve"], ["export"], ["serve-bench"]]


def test_every_subcommand_is_covered():
    parser = build_parser()
    top = next(a for a in parser._actions if a.dest == "command")
    listed = {words[0] for words in SUBCOMMANDS}
    assert set(top.choices) == listed


@pytest.mark.parametrize("words", SUBCOMMANDS, ids=" ".join)
def test_help_works(words, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*words, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: bertforge " + " ".join(words))


def test_python_dash_m_entry_point():
    done = subprocess.run([sys.executable, "-m", "bertforge", "--help"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and "pretrain" in done.stdout


def test_mistyped_flag_suggests_the_right_one(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["pretrain", "--lerning-rate", "1e-3"])
    assert exit_info.value.code == 2
    assert "--learning-rate" in capsys.readouterr().err


def test_user_error_is_one_line_not_a_traceback(tmp_path, capsys):
    code = main(["pretrain", "--config", "demo_tiny_128", "--device", "cpu",
                 "--input-files", str(tmp_path / "nothing-*.tfrecord"),
                 "--checkpoint-output-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err and "nothing-*.tfrecord" in err


def test_version_names_bertforge_and_its_libraries(capsys):
    from importlib.metadata import version

    from bertforge import __version__
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    out = capsys.readouterr().out.strip()
    assert out == (f"bertforge {__version__} (torch {version('torch')}, transformers "
                   f"{version('transformers')}, tokenizers {version('tokenizers')})")


@pytest.mark.parametrize("env,asked,terminal,shown", [
    ({}, False, True, True), ({}, True, True, False), ({}, False, False, False),
    ({"TQDM_DISABLE": "1"}, False, True, False), ({"BERTFORGE_NO_PROGRESS": "1"}, False, True, False),
    ({"TQDM_DISABLE": "0"}, False, True, True)])
def test_progress_bars_only_on_a_terminal_and_honour_tqdm_disable(monkeypatch, env, asked,
                                                                   terminal, shown):
    from bertforge.progress import progress
    for name in ("TQDM_DISABLE", "BERTFORGE_NO_PROGRESS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: terminal)
    assert progress(range(3), disable=asked).disable is not shown


# ---------------------------------------------------------------- one config tree
def _one_line(text: str) -> str:
    return " ".join(text.split())


def _leaf_parser(path: tuple[str, ...], argv: list[str] | None = None):
    """The argparse parser of one subcommand, built as main builds it for `argv`."""
    parser = build_parser([*path, *(argv or [])])
    for word in path:
        parser = next(a for a in parser._actions if a.dest in ("command", f"{path[0]}_command")
                      ).choices[word]
    return parser


@pytest.mark.parametrize("path", list(COMMANDS), ids=" ".join)
def test_every_field_of_every_subcommand_is_a_flag(path):
    """The flags (and positionals) are generated from the subcommand's config sections."""
    cls = COMMANDS[path].config
    options = _leaf_parser(path)._option_string_actions
    positionals = {a.dest for a in _leaf_parser(path)._actions if not a.option_strings}
    for name, section in cls.field_sections().items():
        meta = next(f for f in fields(cls.section_types()[section]) if f.name == name).metadata
        if meta["positional"]:
            assert name in positionals, name
        else:
            assert flag_name(name) in options, name
    assert "--print-config" in options
    assert ("--config" in options) == bool(cls.PRESET_FILE)


@pytest.mark.parametrize("path", list(COMMANDS), ids=" ".join)
def test_print_config_prints_yaml_that_loads_back_and_exits_0(path, capsys):
    assert main([*path, "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    cls = COMMANDS[path].config
    assert set(printed) >= set(cls.section_types())
    assert cls.from_dict(printed) == load_config(cls=cls)


def test_print_config_shows_preset_and_flags_without_running(capsys):
    assert main(["pretrain", "--config", "demo_sample_128", "--learning-rate", "1e-4",
                 "--input-files", "a/*.tfrecord", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["config"] == "demo_sample_128"
    assert printed["optim"]["learning_rate"] == 1e-4  # the flag
    assert printed["model"]["hidden_size"] == 128  # the preset
    assert printed["data"]["input_files"] == ["a/*.tfrecord"]
    # pack's required inputs may still be missing: printing is not running
    assert main(["pack", "in/*.tfrecord", "--sequence-length", "512", "--print-config"]) == 0
    packing = yaml.safe_load(capsys.readouterr().out)
    assert packing["files"] == {"inputs": ["in/*.tfrecord"], "output_dir": None, "workers": None}
    assert packing["packing"]["sequence_length"] == 512
    assert main(["serve", "--config", "sync_clients", "--print-config"]) == 0
    served = yaml.safe_load(capsys.readouterr().out)
    assert served["batching"]["max_queue_delay_us"] == 0 and served["config"] == "sync_clients"


@pytest.mark.parametrize("argv,shown", [
    (["pretrain", "--config", "demo_sample_128"],
     "--learning-rate X peak learning rate (default: 0.003 from preset demo_sample_128)"),
    (["pretrain"], "--learning-rate X peak learning rate (default: 0.001 from preset "
                   "demo_tiny_128)"),
    (["pretrain", "--config=pretrain_base_128"],
     "(default: LAMBNoBiasCorrection from preset pretrain_base_128)"),
    (["squad", "--config", "squad_large_384"], "(default: 5e-05 from preset squad_large_384)"),
    (["serve", "--config", "sync_clients"], "(default: 0 from preset sync_clients)"),
    (["serve"], "--max-batch-size N most request rows merged into one model execution "
                "(default: 32 from preset default)"),
    (["pack"], "--output-dir DIR where the packed shards go (required)"),
])
def test_help_shows_the_chosen_presets_values(argv, shown, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--help"])
    assert exc.value.code == 0
    assert shown in _one_line(capsys.readouterr().out)


def test_help_with_an_unknown_preset_still_works_and_running_names_it(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["pretrain", "--config", "pretrain_bse_128", "--help"])
    assert exc.value.code == 0
    assert "did you mean 'pretrain_base_128'" in _one_line(capsys.readouterr().out)
    assert main(["pretrain", "--config", "pretrain_bse_128", "--print-config"]) == 2
    assert "did you mean 'pretrain_base_128'" in capsys.readouterr().err


@pytest.mark.parametrize("argv,flag,rule", [
    (["serve", "--checkpoint-input-dir", "x", "--max-batch-size", "0"], "--max-batch-size",
     "must be >= 1"),
    (["serve", "--checkpoint-input-dir", "x", "--precision", "fp16"], "--precision",
     "needs --device cuda"),
    (["serve", "--checkpoint-input-dir", "x", "--doc-stride", "400"], "--doc-stride",
     "must be below"),
    (["serve", "--checkpoint-input-dir", "x", "--metrics-port", "8000"], "--http-port",
     "give each endpoint its own port"),
    (["serve-bench", "--checkpoint-input-dir", "x", "--clients", "1,0"], "--clients",
     "must be >= 1"),
    (["export", "--checkpoint-input-dir", "x", "--format", "onnx", "--output-dir", "o",
      "--opset", "3"], "--opset", "must be >= 7"),
    (["pack", "in", "--output-dir", "o", "--sequence-length", "128",
      "--max-sequences-per-pack", "4"], "--max-sequences-per-pack", "use --algorithm spfhp"),
    (["tokenize", "in", "--output-dir", "o", "--mask-tokens", "126"], "--mask-tokens",
     "at most sequence_length - 3"),
    (["tokenize", "in", "--output-dir", "o", "--vocab-file", "v.txt", "--tokenizer", "t"],
     "--tokenizer", "give one of them"),
    (["wiki", "extract", "dump", "out", "--bytes", "3X"], "--bytes", "such as 1M"),
    (["pack", "in", "--sequence-length", "128"], "--output-dir", "is required"),
    (["tokenize", "--output-dir", "o"], "INPUT", "is required"),
])
def test_values_are_checked_by_the_sections_before_anything_runs(argv, flag, rule, capsys,
                                                                  monkeypatch):
    path = command_path(argv)
    monkeypatch.setitem(COMMANDS, path, dataclasses.replace(
        COMMANDS[path], run=lambda cfg: pytest.fail("ran with an invalid config")))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert flag in err and rule in err


def test_old_flag_spellings_still_work(capsys):
    def printed(*argv):
        assert main([*argv, "--print-config"]) == 0
        return yaml.safe_load(capsys.readouterr().out)

    serve = printed("serve", "--no-dynamic-batching", "--no-padding-free", "--host", "0.0.0.0")
    assert serve["batching"]["dynamic_batching"] is False
    assert serve["batching"]["padding_free"] is False and serve["server"]["host"] == "0.0.0.0"
    tokenize = printed("tokenize", "a.txt", "b", "--output-dir", "o", "--no-lower-case",
                       "--vocab-file", "v.txt", "--sequence-length", "512", "--mask-tokens", "76")
    assert tokenize["files"]["inputs"] == ["a.txt", "b"]
    assert tokenize["vocab"]["lower_case"] is False
    assert (tokenize["instances"]["sequence_length"], tokenize["instances"]["mask_tokens"]) == (
        512, 76)
    assert printed("vocab", "train", "c.txt", "--output", "v", "--no-lower-case"
                   )["vocab"]["lower_case"] is False
    assert printed("serve-bench", "--clients", "1,4,8")["load"]["clients"] == [1, 4, 8]
    assert printed("serve-bench", "--clients", "2", "--clients", "3")["load"]["clients"] == [2, 3]
    assert printed("benchmark", "--benchmark", "a", "--benchmark", "b")["run"]["benchmark"] == [
        "a", "b"]
    assert printed("squad-eval", "d.json", "p.json", "--version", "2.0")["eval"]["version"] == "2.0"
    assert printed("pack", "x", "--algorithm", "spfhp")["packing"]["algorithm"] == "spfhp"
    assert printed("squad", "--squad-do-training", "false")["squad"]["squad_do_training"] is False


def test_building_the_cli_imports_no_torch_numpy_or_transformers():
    code = ("import sys; from bertforge.cli import build_parser; build_parser(); "
            "build_parser(['pretrain', '--help']); "
            "heavy = [m for m in ('torch', 'numpy', 'transformers') if m in sys.modules]; "
            "assert not heavy, heavy")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("rank,shown", [("0", True), ("1", False)])
def test_only_rank_0_prints_the_summary(monkeypatch, capsys, rank, shown):
    import bertforge.squad.finetune
    import bertforge.train.pretraining
    result = types.SimpleNamespace(history=[{}], steps=3, final_checkpoint="run/step_3",
                                   eval={"exact_match": 1.0}, files={"predictions": "p.json"},
                                   last_mean=lambda key: 0.5)
    monkeypatch.setattr(bertforge.train.pretraining, "pretrain", lambda cfg: result)
    monkeypatch.setattr(bertforge.squad.finetune, "squad", lambda cfg: result)
    monkeypatch.setenv("RANK", rank)
    assert cmd_squad(load_config(cls=SquadConfig)) == 0
    result.eval = {}
    assert cmd_pretrain(load_config()) == 0
    out = capsys.readouterr().out
    assert ("squad: 3 steps" in out and "pretrain: 3 steps" in out) is shown
    assert (out == "") is not shown
