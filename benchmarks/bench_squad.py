"""SQuAD feature building vs Hugging Face run_qa, and fine-tuning samples/s.

1. Feature building, examples/s, in one run on the same synthetic SQuAD-shaped data:
   - baseline: the standard Hugging Face run_qa `prepare_train_features` (fast tokenizer on
     (question, context) pairs with truncation="only_second", return_overflowing_tokens,
     stride, offsets, padding to max_length, then the Python scan that labels each window),
     written out below as run_qa does it, over batches of 1000 examples like datasets.map;
   - bertforge: `build_windows` (each distinct context tokenized once, windows cut from its
     offsets, labels by binary search) plus `pad_windows` to 384, so both end with padded
     model inputs. Window counts and input ids are checked equal before timing is reported.
2. Inference windows/s on CPU at 384, packed vs unpacked, in one run on the same windows of
   that data (the first --inference-windows of them, prediction features, mini BERT by
   default): unpacked = the stock Hugging Face forward on windows padded to 384 (the
   reference's layout; squad/forward.py's `reference_logits`); packed = `predict_logits` with
   `packed_length=384` (up to 3 windows per 384-token row, block-diagonal attention).
   Both at --eval-batch windows per forward; the logits are checked equal (1e-4) first.
   Floor: packed >= 1.5x unpacked. benchmarks/gpu_check.py runs the same
   comparison on CUDA in bf16 (`bench_inference(..., device="cuda", precision="bf16")`).
3. Fine-tuning samples/s on CPU: `bertforge.squad.finetune.squad` on the same data at 384,
   a tiny (64/2/2) or mini (256/4/4) random-init BERT, validation off; warm-up steps dropped.

Data: SQuAD v1.1 train has ~4.6 questions per paragraph, contexts of ~120 words (a few over
384 tokens), questions of ~10 words, answers of ~3 words. Paragraphs here are runs of
sentences from the embedded real Wikipedia sample when it is cached (`bertforge sample
fetch`), else random words from the vocab; questions are words drawn from the context, and
answers are real spans of it.

    python benchmarks/bench_squad.py [--paragraphs 2000] [--shape tiny|mini] [--steps 20]
Prints `... throughput: X examples/sec` / `windows/sec` / `samples/sec` lines for
benchmarks.yml, and `packed inference speedup: X.XXx`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SHAPES = {"tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2),
          "mini": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4),
          "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12)}


def _sentences() -> list[str]:
    roots = [Path("/tmp/sample_pre")]
    try:
        from bertforge.data.sample import default_cache_dir
        roots.append(default_cache_dir())
    except ImportError:
        pass
    for root in roots:
        files = sorted(root.rglob("*.txt")) if root.is_dir() else []
        lines = [ln.strip() for f in files for ln in f.read_text(encoding="utf-8").splitlines()
                 if len(ln.split()) >= 6]
        if len(lines) > 1000:
            return lines
    from bertforge.data.vocab import default_vocab_file
    words = [w for w in default_vocab_file().read_text().split() if w.isalpha()]
    rng = random.Random(0)
    return [" ".join(rng.choice(words) for _ in range(rng.randint(8, 30))) + "."
            for _ in range(20000)]


def make_squad_like(num_paragraphs: int, seed: int = 0) -> dict:
    rng = random.Random(seed)
    sentences = _sentences()
    articles = []
    qid = 0
    for p in range(num_paragraphs):
        target = int(rng.lognormvariate(np.log(110), 0.45))  # median ~110 words, long tail
        words: list[str] = []
        i = rng.randrange(len(sentences))
        while len(words) < target:
            words += sentences[i % len(sentences)].split()
            i += 1
        context = " ".join(words)
        qas = []
        for _ in range(rng.choice((4, 5, 5, 5))):
            a = rng.randrange(len(words))
            b = min(len(words), a + rng.randint(1, 4))
            start = len(" ".join(words[:a])) + (1 if a else 0)
            answer = " ".join(words[a:b])
            question = " ".join(rng.sample(words, min(len(words), rng.randint(6, 12)))) + "?"
            qas.append({"id": f"q{qid}", "question": question,
                        "answers": [{"text": answer, "answer_start": start}]})
            qid += 1
        articles.append({"title": f"p{p}", "paragraphs": [{"context": context, "qas": qas}]})
    return {"version": "1.1", "data": articles}


def hf_prepare_train_features(examples: dict, tokenizer, max_length: int = 384,
                              doc_stride: int = 128, padding: str | bool = "max_length") -> dict:
    """Hugging Face run_qa's prepare_train_features, as that script does it (`padding`: its
    pad_to_max_length choice; bench_squad_real.py pads per batch instead)."""
    examples["question"] = [q.lstrip() for q in examples["question"]]
    tokenized = tokenizer(examples["question"], examples["context"], truncation="only_second",
                          max_length=max_length, stride=doc_stride,
                          return_overflowing_tokens=True, return_offsets_mapping=True,
                          padding=padding)
    sample_mapping = tokenized.pop("overflow_to_sample_mapping")
    offset_mapping = tokenized.pop("offset_mapping")
    tokenized["start_positions"] = []
    tokenized["end_positions"] = []
    for i, offsets in enumerate(offset_mapping):
        input_ids = tokenized["input_ids"][i]
        cls_index = input_ids.index(tokenizer.cls_token_id)
        sequence_ids = tokenized.sequence_ids(i)
        answers = examples["answers"][sample_mapping[i]]
        start_char = answers["answer_start"][0]
        end_char = start_char + len(answers["text"][0])
        token_start = 0
        while sequence_ids[token_start] != 1:
            token_start += 1
        token_end = len(input_ids) - 1
        while sequence_ids[token_end] != 1:
            token_end -= 1
        if not (offsets[token_start][0] <= start_char and offsets[token_end][1] >= end_char):
            tokenized["start_positions"].append(cls_index)
            tokenized["end_positions"].append(cls_index)
        else:
            while token_start < len(offsets) and offsets[token_start][0] <= start_char:
                token_start += 1
            tokenized["start_positions"].append(token_start - 1)
            while offsets[token_end][1] >= end_char:
                token_end -= 1
            tokenized["end_positions"].append(token_end + 1)
    return tokenized


def bench_features(data: dict, tokenizer, repeat: int) -> None:
    from bertforge.config.serve import WindowSection
    from bertforge.squad.data import examples_from_articles
    from bertforge.squad.features import build_windows, pad_windows

    examples = examples_from_articles(data["data"], source="synthetic", is_training=True,
                                      squad_v2=False).examples
    n = len(examples)
    columns = {"question": [e.question for e in examples], "context": [e.context for e in examples],
               "answers": [{"text": [e.answers[0][0]], "answer_start": [e.answers[0][1]]}
                           for e in examples]}
    spec = WindowSection(384, 128, 64)
    hf_times, our_times = [], []
    for _ in range(repeat):
        start = time.perf_counter()
        hf_ids = []
        for lo in range(0, n, 1000):  # datasets.map(batched=True) default batch size
            batch = {k: v[lo:lo + 1000] for k, v in columns.items()}
            hf_ids += hf_prepare_train_features(batch, tokenizer)["input_ids"]
        hf_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        windows = build_windows(examples, tokenizer, spec, is_training=True)
        padded = pad_windows(windows, pad_to=384, pad_id=tokenizer.pad_token_id)
        our_times.append(time.perf_counter() - start)
    same = len(hf_ids) == len(windows) and np.array_equal(np.asarray(hf_ids), padded["input_ids"])
    hf_s, our_s = statistics.median(hf_times), statistics.median(our_times)
    print(f"data: {n} questions, {len(data['data'])} paragraphs, {len(windows)} windows at 384 "
          f"({len(windows) / n:.3f} per question); windows identical to run_qa: {same}")
    print(f"hf_run_qa features throughput: {n / hf_s:,.0f} examples/sec ({hf_s:.2f} s)")
    print(f"bertforge features throughput: {n / our_s:,.0f} examples/sec ({our_s:.2f} s)")
    print(f"features speedup: {hf_s / our_s:.2f}x")
    if not same:
        sys.exit("windows differ from run_qa's: the comparison is not like for like")


def bench_inference(data: dict, tokenizer, shape: str, num_windows: int, batch: int,
                    device: str = "cpu", precision: str = "fp32") -> dict:
    """Windows/s per layout, and whether their logits agree (1e-4 in fp32, 5e-2 in bf16, whose
    logits move by ~1e-2 with the kernel that computes them)."""
    import torch
    import transformers

    from bertforge.train.precision import Precision

    from bertforge.config.serve import WindowSection
    from bertforge.squad.data import examples_from_articles
    from bertforge.squad.features import build_windows
    from bertforge.squad.forward import (pack_windows, padded_tensors, predict_logits,
                                         reference_logits)

    examples = examples_from_articles(data["data"], source="synthetic", is_training=False,
                                      squad_v2=False).examples
    windows = build_windows(examples, tokenizer, WindowSection(384, 128, 64),
                            is_training=False)[:num_windows]
    torch.manual_seed(0)
    shape_kwargs = SHAPES[shape]
    config = transformers.BertConfig(**shape_kwargs, max_position_embeddings=512,
                                     intermediate_size=4 * shape_kwargs["hidden_size"])
    dev = torch.device(device)
    model = transformers.BertForQuestionAnswering(config).to(dev).eval()
    autocast = Precision(precision, dev)
    packs = pack_windows(windows, 384)
    fill = sum(len(w) for w in windows)
    print(f"inference data: {len(windows)} windows, {fill / len(windows):.0f} tokens per window "
          f"({fill / (384 * len(windows)):.0%} of 384); packed into {len(packs)} rows "
          f"({len(windows) / len(packs):.2f} windows per row, "
          f"{fill / (384 * len(packs)):.0%} full)")
    common = dict(batch_size=batch, device=dev, precision=autocast, pad_id=tokenizer.pad_token_id)

    @torch.no_grad()
    def padded_to_384(chunk_windows):
        """Per-window start/end logits of the stock forward on rows padded to 384."""
        starts, ends = [], []
        for i in range(0, len(chunk_windows), batch):
            chunk = chunk_windows[i:i + batch]
            with autocast.autocast():
                start, end = reference_logits(model, padded_tensors(
                    chunk, dev, pad_to=384, pad_id=tokenizer.pad_token_id))
            start, end = start.float().cpu().numpy(), end.float().cpu().numpy()
            starts += [start[k, :len(w)] for k, w in enumerate(chunk)]
            ends += [end[k, :len(w)] for k, w in enumerate(chunk)]
        return starts, ends

    runs = {"unpacked": lambda: padded_to_384(windows),
            # bertforge's own unpacked default, for reference: rows padded to the batch's longest
            "unpacked_longest": lambda: predict_logits(model, windows, **common),
            "packed": lambda: predict_logits(model, windows, packed_length=384, **common)}
    # Warm-up (allocator, kernels) on one batch's worth of windows, each way.
    padded_to_384(windows[:batch])
    predict_logits(model, windows[:batch], packed_length=384, **common)
    rates, logits = {}, {}
    for name, run in runs.items():
        start = time.perf_counter()
        logits[name] = run()
        rates[name] = len(windows) / (time.perf_counter() - start)
    tolerance = 1e-4 if precision == "fp32" else 5e-2
    same = all(np.allclose(a, b, atol=tolerance, rtol=0) for other in ("packed", "unpacked_longest")
               for which in (0, 1) for a, b in zip(logits["unpacked"][which], logits[other][which]))
    where = "CPU" if dev.type == "cpu" else torch.cuda.get_device_name(dev)
    print(f"inference ({shape}, seq 384, {batch} windows per forward, {precision}, {where}, "
          f"{torch.get_num_threads()} threads) logits equal packed vs unpacked: {same}")
    print(f"unpacked inference throughput: {rates['unpacked']:.1f} windows/sec")
    print(f"unpacked (padded to the batch's longest) inference throughput: "
          f"{rates['unpacked_longest']:.1f} windows/sec")
    print(f"packed inference throughput: {rates['packed']:.1f} windows/sec")
    print(f"packed inference speedup: {rates['packed'] / rates['unpacked']:.2f}x")
    return {"windows": len(windows), "windows_per_s": rates, "logits_equal": same}


def bench_finetune(data_file: Path, shape: str, steps: int, batch: int) -> None:
    import logging

    from bertforge.config import load_config
    from bertforge.squad.config import SquadConfig
    from bertforge.squad.finetune import squad
    logging.disable(logging.WARNING)
    with tempfile.TemporaryDirectory() as run:
        cfg = load_config("squad_base_384", {
            **SHAPES[shape], "train_file": str(data_file), "squad_do_validation": False,
            "training_steps": steps, "micro_batch_size": batch, "global_batch_size": batch,
            "precision": "fp32", "device": "cpu", "disable_progress_bar": True,
            "checkpoint_output_dir": str(Path(run) / "r")}, cls=SquadConfig)
        import contextlib
        import io
        with contextlib.redirect_stdout(io.StringIO()):
            result = squad(cfg)
    rates = [h["samples_per_s"] for h in result.history[2:]]  # drop warm-up steps
    print(f"finetune ({shape}, seq 384, batch {batch}, CPU, {steps} steps) throughput: "
          f"{statistics.mean(rates):.1f} samples/sec")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--paragraphs", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="mini")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--skip-finetune", action="store_true")
    parser.add_argument("--inference-windows", type=int, default=384,
                        help="windows predicted on each side of the packed/unpacked comparison")
    parser.add_argument("--eval-batch", type=int, default=64, help="windows per forward pass")
    parser.add_argument("--skip-inference", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    from bertforge.data.vocab import save_tokenizer_files
    data = make_squad_like(args.paragraphs)
    with tempfile.TemporaryDirectory() as tmp:
        save_tokenizer_files(Path(tmp) / "tok")
        tokenizer = AutoTokenizer.from_pretrained(Path(tmp) / "tok")
        bench_features(data, tokenizer, args.repeat)
        if not args.skip_inference:
            inference = bench_inference(data, tokenizer, args.shape, args.inference_windows,
                                        args.eval_batch)
            if not inference["logits_equal"]:
                sys.exit("packed logits differ from unpacked ones: the comparison is not like "
                         "for like")
        if not args.skip_finetune:
            path = Path(tmp) / "squad.json"
            path.write_text(json.dumps(data))
            bench_finetune(path, args.shape, args.steps, args.batch)


if __name__ == "__main__":
    main()
