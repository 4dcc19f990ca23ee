"""Checkpoints that describe themselves and never look complete when they are not.

`<run>/step_<N>/` holds: the Hugging Face `save_pretrained` output (model.safetensors +
config.json, loadable by `transformers.BertForPreTraining.from_pretrained`), the tokenizer
files (so SQuAD and serving need no extra flag), `bertforge_config.json` (the resolved run
config) and `training_state.pt` (step, batches consumed, optimizer, schedule, grad scaler,
RNG states, last metrics). A step is complete only with its config, weights and training
state. A checkpoint is written into a hidden temporary directory and renamed into place; an
existing step is moved aside (`.old-step_<N>-*`) before the new one is renamed in and removed
after, so a kill at any point leaves either step complete, never a step without weights.
`clean_leftovers` removes a killed save's temporary folder (GBs for BERT-large) and puts a
step that was moved aside back if its replacement never arrived.
Training state holds only tensors and plain Python values, so it loads with
`torch.load(weights_only=True)`: no arbitrary unpickling.

Finding a checkpoint sorts step directories by number (the reference sorted names as text,
so step_9 beat step_10).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

STEP_DIR = re.compile(r"step_(\d+)")
STATE_FILE = "training_state.pt"
CONFIG_FILE = "bertforge_config.json"


WEIGHTS = ("model.safetensors", "pytorch_model.bin")


def is_complete_step(step_dir: Path) -> bool:
    return ((step_dir / "config.json").is_file() and (step_dir / STATE_FILE).is_file()
            and any((step_dir / w).is_file() for w in WEIGHTS))


def step_dirs(run_dir: Path) -> list[Path]:
    """Complete step directories of a run, in numeric order."""
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), d) for d in run_dir.iterdir()
             if d.is_dir() and (m := STEP_DIR.fullmatch(d.name)) and is_complete_step(d)]
    return [d for _, d in sorted(found)]


def prune_steps(run_dir: Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` complete steps of a run (--keep-last-checkpoints);
    the deleted paths. Each is renamed to a temporary name first, so a kill half-way through
    the deletion leaves no step that looks complete but is not (clean_leftovers removes it)."""
    doomed = step_dirs(run_dir)[:-keep]
    for step_dir in doomed:
        trash = run_dir / f".tmp-{step_dir.name}-pruned"
        os.replace(step_dir, trash)
        shutil.rmtree(trash, ignore_errors=True)
    return doomed


def clean_leftovers(run_dir: Path) -> None:
    """Temporary folders of killed saves removed; a step moved aside by a save that was
    killed before its replacement arrived is put back."""
    if not run_dir.is_dir():
        return
    for item in run_dir.iterdir():
        if item.name.startswith(".tmp-step_"):
            shutil.rmtree(item, ignore_errors=True)
        elif m := re.fullmatch(r"\.old-(step_\d+)-\d+", item.name):
            final = run_dir / m.group(1)
            if is_complete_step(final):
                shutil.rmtree(item, ignore_errors=True)
            else:
                shutil.rmtree(final, ignore_errors=True)
                os.replace(item, final)


def resolve_checkpoint(path_or_name: str | Path) -> Path | str:
    """A step directory, a run directory (its latest step) or an HF directory; else a hub name."""
    path = Path(path_or_name)
    if path.is_dir():
        if (path / "config.json").exists():
            return path
        steps = step_dirs(path)
        if steps:
            return steps[-1]
        raise ValueError(f"--checkpoint-input-dir {path}: no config.json and no step_<N>/ checkpoint "
                         "inside; give a step directory, a run directory or a Hugging Face model name")
    if path.exists():
        raise ValueError(f"--checkpoint-input-dir {path} is a file; give a checkpoint directory")
    if str(path_or_name).startswith((".", "/", "~")):
        raise ValueError(f"--checkpoint-input-dir {path}: no such directory")
    return str(path_or_name)  # a hub name such as bert-base-uncased, resolved by transformers


def check_run_dir(run_dir: Path, source: Path | None) -> None:
    """Where a run may write: a new or untrained folder, or (resuming `source`) the run it
    continues from its newest step, or a new folder to branch into."""
    steps = step_dirs(run_dir)
    # Only step_0 (saved at the start of pre-training): an earlier attempt crashed before its
    # first real checkpoint, so re-running the same command starts it again.
    trained = [s for s in steps if s.name != "step_0"]
    if source is None:
        if trained:
            raise ValueError(f"{run_dir} already holds checkpoints ({trained[-1].name}); to "
                             f"continue that run give --checkpoint-input-dir {run_dir} "
                             "--resume-training-from-checkpoint, or choose another "
                             "--checkpoint-output-dir")
        return
    source_run = Path(source).resolve().parent
    if run_dir.resolve() != source_run:
        if trained:
            raise ValueError(f"--checkpoint-output-dir {run_dir} holds another run's checkpoints "
                             f"({trained[-1].name}); resume {source} into its own run (drop "
                             "--checkpoint-output-dir) or branch into a new, empty folder")
        return
    newest = step_dirs(source_run)[-1]
    if newest.resolve() != Path(source).resolve():
        raise ValueError(f"{source} is not the newest step of {source_run} ({newest.name} is): "
                         f"resume the newest with --checkpoint-input-dir {source_run}, or branch "
                         f"from {Path(source).name} into a new folder with --checkpoint-output-dir")


def rng_state() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": [version, list(internal), gauss],
             "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]]}
    if torch.cuda.is_available():
        # This process's device only: every rank seeds alike and draws alike, so rank 0's
        # state is every rank's; saving all devices' would hand rank k rank 0's copy of
        # cuda:k (never advanced) and open a CUDA context on every GPU in every rank.
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if isinstance(cuda, (list, tuple)):  # saved by an older version: all devices
            cuda = cuda[0]
        torch.cuda.set_rng_state(cuda)


def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, training_state: dict[str, Any],
                    config: dict[str, Any], tokenizer_dir: Path | None = None) -> Path:
    """Write `<run_dir>/step_<step>` atomically and return it."""
    final = run_dir / f"step_{step}"
    tmp = run_dir / f".tmp-step_{step}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer_dir is not None:
            for item in tokenizer_dir.iterdir():
                shutil.copy2(item, tmp / item.name)
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=1, default=str))
        torch.save(training_state, tmp / STATE_FILE)
        aside = run_dir / f".old-step_{step}-{os.getpid()}"
        if final.exists():  # moved aside, not deleted: a kill here keeps it (clean_leftovers)
            os.replace(final, aside)
        os.replace(tmp, final)
        shutil.rmtree(aside, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return final


def load_training_state(step_dir: Path) -> dict[str, Any]:
    path = step_dir / STATE_FILE
    if not path.exists():
        raise ValueError(f"{step_dir} has no {STATE_FILE}: it is a model-only checkpoint; drop "
                         "--resume-training-from-checkpoint to start a new run from its weights")
    return torch.load(path, map_location="cpu", weights_only=True)
