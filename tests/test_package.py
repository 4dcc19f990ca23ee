"""The package as users get it: a wheel built from this tree and installed without -e into a fresh
virtualenv runs `bertforge pretrain` and `bertforge squad` from a directory outside the checkout,
so everything they read at run time (presets, the Triton backend) travels inside the wheel.

No network at test time: the wheel is built with --no-build-isolation (this environment's
setuptools), and the fresh virtualenv reaches this environment's dependencies (torch,
transformers, ...) through a .pth line naming their site-packages. A plain path in a .pth file
does not process the .pth files inside it, so the editable bertforge of this environment is not
loaded there: the test checks that `bertforge` is imported from the installed wheel. About 30 s.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ARTICLE = Path(__file__).resolve().parent / "data" / "squad" / "notre-dame-train-v1.1.json"


def run(cmd: list[str], cwd: Path, timeout: int = 300) -> str:
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{' '.join(cmd)}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout


def test_wheel_installed_elsewhere_runs_pretrain_and_squad(tmp_path):
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
            "bertforge/serve/onnxruntime_backend/model.py"} <= set(names)

    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp_path)
    python = venv / "bin" / "python"
    site = Path(run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                    cwd=tmp_path).strip())
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
         "--target", str(site), str(wheel)], cwd=tmp_path)

    work = tmp_path / "elsewhere"
    work.mkdir()
    where = run([str(python), "-c", "import bertforge; print(bertforge.__file__)"], cwd=work)
    assert Path(where.strip()).is_relative_to(site), where
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
