"""Process-level set-up shared by the training recipes (pre-training, SQuAD): seeding, the
torch.compile artifact cache, and the default run directory."""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def configure_compile_cache(cache_dir: str | None) -> None:
    """Persist Inductor/Triton artifacts so an identical later run skips most compilation."""
    if not cache_dir:
        return
    path = Path(cache_dir).resolve()
    path.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path / "inductor")
    os.environ["TRITON_CACHE_DIR"] = str(path / "triton")
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config
    inductor_config.fx_graph_cache = True
    functorch_config.enable_autograd_cache = True


def default_run_dir(preset: str | None, recipe: str = "pretrain") -> Path:
    """runs/<preset>-<timestamp>: a fresh directory per run when none is given."""
    return Path("runs") / f"{preset or recipe}-{time.strftime('%Y%m%d-%H%M%S')}"
