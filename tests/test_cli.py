"""The command line: every subcommand's --help, did-you-mean on typos, clean user errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from bertforge.cli import build_parser, main

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


@pytest.mark.parametrize("env,asked,shown", [
    ({}, False, True), ({}, True, False),
    ({"TQDM_DISABLE": "1"}, False, False), ({"BERTFORGE_NO_PROGRESS": "1"}, False, False),
    ({"TQDM_DISABLE": "0"}, False, True)])
def test_progress_bars_honour_tqdm_disable(monkeypatch, env, asked, shown):
    from bertforge.data.stage import progress
    for name in ("TQDM_DISABLE", "BERTFORGE_NO_PROGRESS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert progress(range(3), disable=asked).disable is not shown
