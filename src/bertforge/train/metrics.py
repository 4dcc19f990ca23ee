"""Where training numbers go: the reference's per-step line, JSON lines, TensorBoard, wandb.

The step line keeps the reference's format so its users' log parsers and our benchmark regexes
(`throughput: *(.*?) samples/sec`) keep working; accuracies are fractions 0..1 as the reference
printed them. Beyond the reference we also report real (non-padding) tokens/s, which is the
honest speed measure once packing removes padding, and the wall time since the run began
(`wall_s`; `train_s` counts training steps only), so time to accuracy can be read off any
log. Only rank 0 builds a MetricsLogger.

Splits of the log: "train" (every step), "eval", and "params" (`parameter_statistics`, every
--wandb-param-steps steps: one line holding ~6 values per parameter tensor, ~1,200 for
BERT-base, so it is opt-in).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("bertforge")


def format_step_line(step: int, total_steps: int, m: dict[str, float],
                     fields: dict[str, str]) -> str:
    """`Step: s / T-1 - LR: ... - <task fields> throughput: X samples/sec - ...`: the
    reference's line for every recipe; `fields` are the task's (label -> formatted value)."""
    task = "".join(f" - {label}: {value}" for label, value in fields.items())
    return (f"Step: {step} / {total_steps - 1} - LR: {m['lr']:.3e}{task}"
            f" throughput: {m['samples_per_s']:.1f} samples/sec"
            + (f" - real tokens/s: {m['real_tokens_per_s']:.0f}" if "real_tokens_per_s" in m
               else "")
            + (f" - wall: {m['wall_s']:.1f} s" if "wall_s" in m else "")
            + (f" - ETA: {format_duration(m['eta_s'])}" if "eta_s" in m else "")
            + (f" - grad norm: {m['grad_norm']:.3g}" if "grad_norm" in m else "")
            + (f" - loss scale: {m['loss_scale']:g} ({int(m['skipped_steps'])} skipped)"
               if "loss_scale" in m else ""))


def format_duration(seconds: float) -> str:
    """[H:]MM:SS, as tqdm's bars show their ETA (tqdm's own formatter)."""
    from tqdm import tqdm
    return tqdm.format_interval(seconds)


def parameter_statistics(model) -> dict[str, float]:
    """`<name>/{norm,mean,std}` of every trainable parameter and `<name>/grad_{norm,mean,std}`
    of its gradient (where it has one), for --wandb-param-steps. Computed in fp32 on the
    device, then one transfer (a single sync instead of one per value). std is the population
    std (correction 0), so one-element tensors give 0 rather than nan."""
    import torch

    names, values = [], []
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            for kind, tensor in (("", param), ("grad_", param.grad)):
                if tensor is None:
                    continue
                x = tensor.detach().float()
                std, mean = torch.std_mean(x, correction=0)
                names += [f"{name}/{kind}norm", f"{name}/{kind}mean", f"{name}/{kind}std"]
                values += [x.norm(), mean, std]
        if not values:
            return {}
        return dict(zip(names, torch.stack(values).tolist()))


def _truncate_log(path: Path, step: int) -> None:
    """Keep the lines of steps before `step` (train, params: logged at the step's index) and
    evaluations up to it (logged after `step` steps, like the checkpoint); written atomically."""
    kept = []
    for line in path.read_text().splitlines(keepends=True):
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut short by a kill
        limit = step if record.get("split") == "eval" else step - 1
        if record.get("step", 0) <= limit:
            kept.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept))
    tmp.replace(path)


class MetricsLogger:
    """JSON lines at `<run>/metrics.jsonl` + TensorBoard events at `<run>/tensorboard`, optional wandb."""

    def __init__(self, run_dir: Path, *, tensorboard: bool = True, wandb_project: str | None = None,
                 wandb_config: dict[str, Any] | None = None, resume_step: int | None = None):
        """`resume_step`: the run continues from the checkpoint of that step, so what an
        interrupted attempt logged after it is dropped (metrics.jsonl rewritten, TensorBoard's
        later events purged) and the log never holds a step twice."""
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / "metrics.jsonl"
        if resume_step is not None and path.exists():
            _truncate_log(path, resume_step)
        self._jsonl = open(path, "a" if resume_step is not None else "w", buffering=1)
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=resume_step)
        self._wandb = None
        if wandb_project:
            try:
                import wandb
            except ImportError as err:
                raise ValueError("--wandb needs the wandb package: pip install 'bertforge[wandb]'") from err
            self._wandb = wandb.init(project=wandb_project, config=wandb_config, dir=str(run_dir))

    def log(self, step: int, metrics: dict[str, float], prefix: str = "train") -> None:
        # "time": the wall clock (Unix seconds), to line the log up with other logs
        record = {"step": step, "split": prefix, "time": round(time.time(), 3),
                  **{k: float(v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for name, value in metrics.items():
                self._tb.add_scalar(f"{prefix}/{name}", float(value), step)
        if self._wandb is not None:
            self._wandb.log({f"{prefix}/{k}": float(v) for k, v in metrics.items()}, step=step)

    def close(self) -> None:
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
