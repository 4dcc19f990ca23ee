"""Learning parity: `bertforge pretrain` against a plain Hugging Face loop, same shards, same recipe.

Throughput benchmarks say how fast a step is, not whether the faster steps
learn as well. This one trains the same BERT shape on the same real shards with the same
optimizer, schedule, batch and steps, twice per seed:
  - bertforge: the real `pretrain()` entry point (gathered MLM head, fused decoder loss,
    bertforge's init, `--eval-files` + `--eval-every`), its held-out curve read back from
    the run's metrics.jsonl;
  - hf_loop: what a user would write from the transformers docs: `BertForPreTraining` with
    HF's own init, labels -100 except the masked slots, `torch.optim.AdamW` (no decay on
    biases and LayerNorm), `get_linear_schedule_with_warmup`, records read with the
    `tfrecord` package (an independent reader), shuffled per epoch.
Both evaluate held-out MLM and NSP accuracy every K steps on the same held-out records
(documents never trained on) and time their training steps with evaluation excluded.

Data (made once in --work-dir, reused after): the real Wikipedia sample through the whole
chain, a WordPiece vocab trained on the training documents, training and held-out documents
apart (bertforge.demo.prepare_sample_shards).

Reports, per trainer: accuracy at each eval step (mean and min..max over seeds), the
most-frequent-token baseline of the held-out set, and the wall time (training steps only) to
reach --target-mlm-accuracy; the ratio of those times is bertforge's speed-up in time to
accuracy. Writes a JSON of every curve and a PNG plot (accuracy against steps and against
seconds) when matplotlib is installed (`pip install matplotlib`).

    python benchmarks/bench_learning.py [--seeds 1,2,3] [--steps 1500] [--eval-every 100]
        [--target-mlm-accuracy 0.12] [--work-dir bench-data/learning] [--plot docs/learning_parity.png]
    # why the recipe before the MLM-bias fix stalled (seed 5): the plateau's fingerprint
    python benchmarks/bench_learning.py --trainers bertforge --seeds 5 --steps 300 --diagnose \
        --bertforge-set mlm_bias_init=zero

Cost: each run is sequential and uses every core (fair times); about 2 x seeds x steps /
(4-10 steps/s) on the 2-core dev VM. Results: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import transformers

from bertforge.data.tfrecord import find_index
from bertforge.model.bert import bert_config

LABELS = {"bertforge": "bertforge", "hf_loop": "plain HF loop",
          "bertforge_zero_bias": "bertforge, MLM bias at zero (before the fix)",
          "hf_loop_prior_bias": "plain HF loop, MLM bias at the prior"}
COLOURS = {"bertforge": "tab:blue", "hf_loop": "tab:orange", "bertforge_zero_bias": "tab:red",
           "hf_loop_prior_bias": "tab:green"}
FEATURES = ("input_ids", "input_mask", "segment_ids", "masked_lm_positions", "masked_lm_ids",
            "masked_lm_weights", "next_sentence_labels")


# ------------------------------------------------------------------ the plain HF loop
def read_records(files: list[Path]) -> dict[str, torch.Tensor]:
    """Every record of `files` through the `tfrecord` package (not bertforge's reader)."""
    from tfrecord.reader import tfrecord_loader
    columns: dict[str, list[np.ndarray]] = {k: [] for k in FEATURES}
    for path in files:
        index = find_index(path)  # X.index (the reference's name) or X.tfrecord.index
        for record in tfrecord_loader(str(path), str(index) if index else None,
                                      {k: ("float" if k == "masked_lm_weights" else "int")
                                       for k in FEATURES}):
            for key in FEATURES:
                columns[key].append(record[key])
    out = {k: torch.as_tensor(np.stack(v)) for k, v in columns.items()}
    out["next_sentence_labels"] = out["next_sentence_labels"].reshape(-1).long()
    return out


def mlm_labels(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """[B, S] labels: -100 everywhere but the labelled masked slots (HF's convention)."""
    labels = torch.full_like(batch["input_ids"], -100)
    real = (batch["masked_lm_weights"] > 0) & (batch["masked_lm_ids"] != 0)
    rows = torch.arange(labels.shape[0]).unsqueeze(1).expand_as(real)
    labels[rows[real], batch["masked_lm_positions"][real]] = batch["masked_lm_ids"][real]
    return labels


@torch.no_grad()
def hf_evaluate(model, heldout: dict[str, torch.Tensor], batch_size: int = 128) -> dict[str, float]:
    model.eval()
    ok = total = nsp_ok = 0
    for start in range(0, len(heldout["input_ids"]), batch_size):
        batch = {k: v[start:start + batch_size] for k, v in heldout.items()}
        out = model(input_ids=batch["input_ids"], attention_mask=batch["input_mask"],
                    token_type_ids=batch["segment_ids"])
        labels = mlm_labels(batch)
        keep = labels != -100
        ok += int((out.prediction_logits.argmax(-1)[keep] == labels[keep]).sum())
        total += int(keep.sum())
        nsp_ok += int((out.seq_relationship_logits.argmax(-1) == batch["next_sentence_labels"]).sum())
    model.train()
    return {"mlm_acc": ok / max(1, total), "nsp_acc": nsp_ok / len(heldout["input_ids"])}


def hf_loop(cfg, train_files: list[Path], heldout_files: list[Path], prior_bias: bool = False
            ) -> list[dict[str, float]]:
    """Train with plain transformers + torch on the recipe of `cfg` (a resolved bertforge
    config: same shape, optimizer settings, schedule, batch, steps, seed); returns the held-out
    curve [{step, wall_s, mlm_acc, nsp_acc}]. `prior_bias`: start the MLM bias at the log
    frequency of the masked tokens, as bertforge does, computed here from this loop's own
    records (first 16k, add-one), so that engine parity can be read apart from the recipe."""
    m, o, t = cfg.model, cfg.optim, cfg.train
    train, heldout = read_records(train_files), read_records(heldout_files)
    torch.manual_seed(t.random_seed)
    model = transformers.BertForPreTraining(bert_config(m))  # HF's own init
    if prior_bias:
        ids = train["masked_lm_ids"][:16384]
        ids = ids[(train["masked_lm_weights"][:16384] > 0) & (ids != 0)]
        counts = torch.bincount(ids, minlength=m.vocab_size).double() + 1
        with torch.no_grad():
            model.cls.predictions.bias.copy_((counts / counts.sum()).log())
    named = list(model.named_parameters())
    no_decay = [p for n, p in named if n.endswith("bias") or "LayerNorm" in n]
    decay = [p for n, p in named if not (n.endswith("bias") or "LayerNorm" in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=o.learning_rate, betas=(o.beta1, o.beta2), eps=o.eps)
    steps, batch_size = t.training_steps, t.global_batch_size
    scheduler = transformers.get_linear_schedule_with_warmup(
        optimizer, int(o.lr_warmup * steps), steps)
    order = torch.Generator().manual_seed(t.random_seed)
    n = len(train["input_ids"])
    perm, position = torch.randperm(n, generator=order), 0
    curve, train_time = [], 0.0
    model.train()
    for step in range(steps):
        start = time.perf_counter()
        if position + batch_size > n:
            perm, position = torch.randperm(n, generator=order), 0
        rows = perm[position:position + batch_size]
        position += batch_size
        batch = {k: v[rows] for k, v in train.items()}
        out = model(input_ids=batch["input_ids"], attention_mask=batch["input_mask"],
                    token_type_ids=batch["segment_ids"], labels=mlm_labels(batch),
                    next_sentence_label=batch["next_sentence_labels"])
        out.loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        train_time += time.perf_counter() - start
        if (step + 1) % cfg.data.eval_every == 0 or step + 1 == steps:
            curve.append({"step": step + 1, "wall_s": train_time, **hf_evaluate(model, heldout)})
    return curve


# ------------------------------------------------------------------ bertforge
def bertforge_run(cfg, run_dir: Path) -> list[dict[str, float]]:
    """`pretrain(cfg)`; the held-out curve from the run's metrics.jsonl, with the time in
    training steps (evaluation and checkpoints excluded, as for the HF loop) at each point."""
    import shutil

    from bertforge.train.pretraining import pretrain

    if run_dir.exists():
        shutil.rmtree(run_dir)
    cfg.checkpoint.checkpoint_output_dir = str(run_dir)
    pretrain(cfg)
    curve = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["split"] == "eval":
            curve.append({"step": record["step"], "wall_s": record["train_s"],
                          "mlm_acc": record["mlm_acc"], "nsp_acc": record["nsp_acc"]})
    return curve


# ------------------------------------------------------------------ why a run stalls
@torch.no_grad()
def plateau_diagnostics(step_dir: Path, train_files: list[Path], heldout_files: list[Path]) -> dict:
    """Where a checkpoint keeps the token frequencies, and whether its masked positions see
    context. MLM logits at a masked slot are z = E t(h) + b (E: the decoder weight, tied to the
    input word embeddings). Over 512 held-out records:
      - bias_std / bias_corr_logf: spread of b and its correlation with log frequency;
      - shared_std / shared_corr_logf: the same for the part of E t(h) common to all slots;
      - context_std: how much the logits vary from slot to slot (0: context is ignored);
      - emb_top_direction_share: variance of the centred word embeddings along their first
        principal direction (a frequency direction written into them makes it large).
    A run stuck at the unigram plateau keeps the frequencies in E t(h), not in b, with
    context_std ~0 (docs/benchmarks.md "Learning parity" quotes both states)."""
    from bertforge.data.loader import masked_label_counts
    from bertforge.model.bert import GatheredBertForPreTraining

    model = GatheredBertForPreTraining.from_pretrained(step_dir).eval()
    heldout = {k: v[:512] for k, v in read_records(heldout_files).items()}
    real = (heldout["masked_lm_weights"] > 0) & (heldout["masked_lm_ids"] != 0)
    sequence_output, _ = model.encode(heldout)
    rows = torch.arange(len(real)).unsqueeze(1).expand_as(real)[real]
    hidden = model.cls.predictions.transform(sequence_output[rows, heldout["masked_lm_positions"][real]])
    logits = hidden @ model.cls.predictions.decoder.weight.T
    shared = logits.mean(0)
    counts = torch.as_tensor(masked_label_counts(train_files, model.config.vocab_size), dtype=torch.float64)
    logf = ((counts + 1) / (counts + 1).sum()).log().float()
    bias = model.cls.predictions.bias

    def corr(x: torch.Tensor, y: torch.Tensor) -> float:
        x, y = x - x.mean(), y - y.mean()
        return float(x @ y / (x.norm() * y.norm()))

    embeddings = model.bert.embeddings.word_embeddings.weight
    singular = torch.linalg.svdvals(embeddings - embeddings.mean(0))
    return {"bias_std": float(bias.std()), "bias_corr_logf": corr(bias, logf),
            "shared_std": float(shared.std()), "shared_corr_logf": corr(shared, logf),
            "context_std": float((logits - shared).std(0).mean()),
            "emb_top_direction_share": float(singular[0] ** 2 / (singular ** 2).sum())}


# ------------------------------------------------------------------ report
def time_to(curve: list[dict[str, float]], target: float) -> tuple[float, int] | None:
    for point in curve:
        if point["mlm_acc"] >= target:
            return point["wall_s"], point["step"]
    return None


def summarise(results: dict[str, dict[int, list[dict]]], target: float) -> dict:
    summary: dict = {}
    for trainer, by_seed in results.items():
        steps = [p["step"] for p in next(iter(by_seed.values()))]
        at_step = {}
        for i, step in enumerate(steps):
            accs = [curve[i]["mlm_acc"] for curve in by_seed.values()]
            at_step[step] = {"mean": statistics.mean(accs), "min": min(accs), "max": max(accs)}
        times = [time_to(curve, target) for curve in by_seed.values()]
        reached = [t for t in times if t is not None]
        summary[trainer] = {
            "mlm_acc_at_step": at_step,
            "final_nsp_acc": statistics.mean(c[-1]["nsp_acc"] for c in by_seed.values()),
            "seeds_reaching_target": len(reached),
            "median_time_to_target_s": statistics.median(t for t, _ in reached) if reached else math.nan,
            "median_steps_to_target": statistics.median(s for _, s in reached) if reached else math.nan,
            "step_time_s": statistics.mean(c[-1]["wall_s"] / c[-1]["step"] for c in by_seed.values()),
        }
    return summary


def plot(results: dict[str, dict[int, list[dict]]], baseline: float, target: float, path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot: matplotlib is not installed (pip install matplotlib); no PNG written")
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))

    for trainer, by_seed in results.items():
        for i, (seed, curve) in enumerate(sorted(by_seed.items())):
            label = trainer if i == 0 else None
            for ax, x in zip(axes, ("step", "wall_s")):
                ax.plot([p[x] for p in curve], [p["mlm_acc"] for p in curve],
                        color=COLOURS[trainer], alpha=0.8, label=label and LABELS[trainer], marker=".")
    for ax, xlabel in zip(axes, ("optimizer steps", "training wall time (s, evaluation excluded)")):
        ax.axhline(baseline, color="grey", linestyle="--", label="most-frequent token")
        ax.axhline(target, color="black", linestyle=":", label=f"target {target}")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("held-out MLM accuracy")
        ax.grid(alpha=0.3)
    axes[0].legend(loc="lower right")
    fig.suptitle("bertforge vs plain Hugging Face loop: same shards, shape, optimizer, schedule, batch")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--lr-warmup", type=float, default=0.06)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--target-mlm-accuracy", type=float, default=0.12)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--work-dir", type=Path, default=Path("bench-data/learning"))
    parser.add_argument("--output", type=Path, default=None, help="JSON of every curve")
    parser.add_argument("--plot", type=Path, default=Path("docs/learning_parity.png"))
    parser.add_argument("--trainers", default="bertforge,hf_loop",
                        help="comma-separated: " + ", ".join(LABELS))
    parser.add_argument("--add-to", type=Path, action="append", default=[], metavar="JSON",
                        help="merge the curves of an earlier --output into the report and plot "
                             "(repeatable)")
    parser.add_argument("--diagnose", action="store_true",
                        help="after each bertforge run, where its model keeps token frequencies "
                             "and whether it uses context (plateau_diagnostics)")
    parser.add_argument("--bertforge-set", action="append", default=[], metavar="KEY=VALUE",
                        help="a bertforge config field for bertforge's run only (e.g. "
                             "mlm_bias_init=zero: the recipe before the MLM-bias fix)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from bertforge.config import load_config
    from bertforge.demo import DEMO_PRESET, most_frequent_token_accuracy, prepare_sample_shards

    data = prepare_sample_shards(args.work_dir, vocab_size=args.vocab_size)
    baseline, _ = most_frequent_token_accuracy(data.heldout_files)
    print(f"held-out most-frequent-token accuracy: {baseline:.4f}")
    seeds = [int(s) for s in args.seeds.split(",") if s]  # none: only report --add-to runs
    recipe = None
    results: dict[str, dict[int, list[dict]]] = {}
    for seed in seeds:  # trainers interleaved per seed: machine drift hits both alike
        # The demo's preset is the recipe of both trainers (128/2/2, AdamW 3e-3,
        # 6% warmup then linear decay, wd 0.01, eps 1e-6, batch 32); flags change it for both.
        cfg = load_config(DEMO_PRESET, {
            "vocab_size": args.vocab_size, "tokenizer": str(data.vocab_file),
            "input_files": [str(f) for f in data.train_files],
            "eval_files": [str(f) for f in data.heldout_files], "eval_every": args.eval_every,
            "training_steps": args.steps, "learning_rate": args.learning_rate,
            "lr_warmup": args.lr_warmup, "micro_batch_size": args.batch_size,
            "global_batch_size": args.batch_size, "random_seed": seed, "device": "cpu",
            "dataloader_workers": 1, "disable_progress_bar": True,
            **dict(kv.split("=", 1) for kv in args.bertforge_set)}).resolve(1)
        recipe = cfg.to_dict()
        for trainer in args.trainers.split(","):
            if trainer in ("bertforge", "bertforge_zero_bias"):
                run_cfg = type(cfg).from_dict(cfg.to_dict())
                if trainer == "bertforge_zero_bias":  # the recipe before the MLM-bias fix
                    run_cfg.model.mlm_bias_init = "zero"
                run_dir = args.work_dir / f"run-{trainer}-{seed}"
                curve = bertforge_run(run_cfg, run_dir)
                if args.diagnose:
                    diagnostics = plateau_diagnostics(run_dir / f"step_{curve[-1]['step']}",
                                                      data.train_files, data.heldout_files)
                    print(f"bertforge seed {seed} diagnostics: "
                          + ", ".join(f"{k} {v:.3g}" for k, v in diagnostics.items()))
            elif trainer in ("hf_loop", "hf_loop_prior_bias"):
                curve = hf_loop(cfg, data.train_files, data.heldout_files,
                                prior_bias=trainer == "hf_loop_prior_bias")
            else:
                raise SystemExit(f"--trainers: unknown trainer {trainer!r} ({', '.join(LABELS)})")
            results.setdefault(trainer, {})[seed] = curve
            last = curve[-1]
            print(f"{trainer} seed {seed}: held-out mlm_acc {last['mlm_acc']:.4f} nsp_acc "
                  f"{last['nsp_acc']:.3f} after {last['step']} steps, {last['wall_s']:.0f} s", flush=True)
    for path in args.add_to:  # curves of earlier runs of this benchmark (same data and recipe)
        earlier = json.loads(path.read_text())
        recipe = recipe or earlier["recipe"]
        for trainer, by_seed in earlier["results"].items():
            for seed, curve in by_seed.items():
                results.setdefault(trainer, {}).setdefault(int(seed), curve)
    summary = summarise(results, args.target_mlm_accuracy)
    for trainer, s in summary.items():
        final = s["mlm_acc_at_step"][max(s["mlm_acc_at_step"])]
        print(f"{trainer}: final held-out mlm_acc mean {final['mean']:.4f} "
              f"(min {final['min']:.4f}, max {final['max']:.4f}); nsp_acc {s['final_nsp_acc']:.3f}; "
              f"step {s['step_time_s'] * 1000:.0f} ms; target {args.target_mlm_accuracy} reached by "
              f"{s['seeds_reaching_target']}/{len(results[trainer])} seeds, median {s['median_time_to_target_s']:.0f} s "
              f"({s['median_steps_to_target']} steps)")
    for other in ("hf_loop", "hf_loop_prior_bias"):  # nan: that trainer never reached the target
        if {"bertforge", other} <= set(summary):
            bf, hf = summary["bertforge"], summary[other]
            suffix = "" if other == "hf_loop" else f"_vs_{other}"
            print(f"time_to_accuracy_speedup{suffix}: "
                  f"{hf['median_time_to_target_s'] / bf['median_time_to_target_s']:.2f}")
            print(f"step_time_speedup{suffix}: {hf['step_time_s'] / bf['step_time_s']:.2f}")
    if args.output:
        args.output.write_text(json.dumps({"recipe": recipe, "baseline": baseline,
                                           "results": results, "summary": summary}, indent=1))
    if args.plot and plot(results, baseline, args.target_mlm_accuracy, args.plot):
        print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
