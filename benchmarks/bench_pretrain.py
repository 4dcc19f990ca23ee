"""CPU/GPU pre-training throughput: bertforge vs a plain Hugging Face baseline, in one run.

For each shape (demo_tiny_128: 64/3/8, and BERT-mini: 256/4/4; seq 128),
on the SAME batches (real shards when given, else well-formed random records):
  - baseline: transformers.BertForPreTraining, full MLM head over all 128 positions (labels
    -100 except the masked slots), torch.optim.AdamW with its defaults, fp32;
  - bertforge fp32: the gathered MLM head with the fused chunked decoder + cross-entropy, and
    bertforge's AdamW (fused), fp32;
  - bertforge bf16: the same under bf16 autocast, with SDPA attention and with HF's eager
    (matmul + softmax) attention: on CPU, torch 2.13's bf16 SDPA backward is ~2x slower than
    its fp32 one (74 vs 35 ms per BERT-mini layer), eager bf16 attention is not (39 ms);
  - optionally (--compile) fp32 + torch.compile (compile time excluded by the warm-up steps).
Variants are timed in interleaved rounds and each reports its median round, so that load from
other processes on a shared machine hits all variants alike. It prints samples/s and real (non-padding) tokens/s per variant, the ratio to the baseline,
and model FLOPs utilisation against a matmul peak measured in the same run (fp32 and bf16
GEMMs of 2048^3). Model FLOPs count only useful work (encoder + MLM head at the masked
positions + NSP), x3 for forward + backward, so the baseline's wasted head FLOPs do not
count in its favour.

    python benchmarks/bench_pretrain.py [--steps 4] [--rounds 3] [--threads N] [--compile]
                                        [--input-files 'shards/*.tfrecord']

Measured results and the machine they ran on: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

import torch
import transformers

from bertforge.model.bert import build_pretraining_model
from bertforge.rows import labelled_slots
from bertforge.train.optim import build_optimizer
from bertforge.train.sources import random_batch

SHAPES = {
    "demo_tiny_128": dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=8, micro_batch_size=16),
    "bert_mini_128": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, micro_batch_size=32),
}


class AdamWSection:
    optimizer, learning_rate, weight_decay, beta1, beta2, eps = "AdamW", 1e-4, 0.01, 0.9, 0.999, 1e-6


def matmul_peak(dtype: torch.dtype, n: int = 2048, reps: int = 7, device: str = "cpu") -> float:
    """FLOP/s of the fastest of `reps` n^3 GEMMs: the best, not the mean, so that a neighbour's
    load during the measurement does not deflate the peak (and inflate every MFU). On CUDA each
    product is timed to its end (synchronize), not to its launch."""
    a, b = (torch.randn(n, n, dtype=dtype, device=device) for _ in range(2))
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    torch.mm(a, b)
    sync()
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        torch.mm(a, b)
        sync()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def model_flops_per_sequence(cfg: transformers.BertConfig, seq: int, masked: float) -> float:
    """Useful training FLOPs per sequence (forward x 3). `seq` and `masked` may be numpy arrays
    (one value per sequence: real length, labelled slots); the result is then per sequence too.
    Every layer counts at every token, as in the stock model (tests/test_gpu_check.py checks it
    against torch's FLOP counter); bertforge runs the last layer at [CLS] and the masked slots
    only, so it does fewer than counted here: ~6% fewer at BERT-base, S 128, ~3% at BERT-large."""
    h, layers, inter, vocab = cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size, cfg.vocab_size
    per_token_layer = 2 * (4 * h * h + 2 * h * inter) + 2 * 2 * seq * h  # projections + attention
    encoder = seq * layers * per_token_layer
    head = masked * 2 * (h * h + h * vocab) + 2 * h * h + 2 * h * 2  # MLM at masked slots + pooler/NSP
    return 3 * (encoder + head)


def load_batches(input_files: str | None, batch_size: int, n: int, vocab: int) -> list[dict]:
    if input_files:
        from bertforge.data.loader import PretrainingDataset
        ds = PretrainingDataset([input_files], batch_size, shuffle=True, seed=0)
        return list(itertools.islice(iter(ds), n))
    gen = torch.Generator().manual_seed(0)
    return [random_batch(batch_size, 128, 20, vocab, gen) for _ in range(n)]


def hf_labels(batch: dict) -> torch.Tensor:
    labels = torch.full_like(batch["input_ids"], -100)
    real = labelled_slots(batch)
    rows = torch.arange(labels.shape[0]).unsqueeze(1).expand_as(real)
    labels[rows[real], batch["masked_lm_positions"][real]] = batch["masked_lm_ids"][real]
    return labels


def time_variants(steps: dict, batches: list[dict], num_steps: int, rounds: int, warmup: int = 3) -> dict:
    """Median seconds per step of each variant over `rounds` interleaved rounds of `num_steps`."""
    for step in steps.values():
        for b in batches[:warmup]:  # includes torch.compile's compilation
            step(b)
    times = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            for i in range(num_steps):
                step(batches[i % len(batches)])
            times[name].append((time.perf_counter() - start) / num_steps)
    return {name: statistics.median(t) for name, t in times.items()}


def baseline_step_fn(cfg):
    torch.manual_seed(0)
    model = transformers.BertForPreTraining(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)

    def step(b):
        out = model(input_ids=b["input_ids"], attention_mask=b["input_mask"],
                    token_type_ids=b["segment_ids"], labels=b["hf_labels"],
                    next_sentence_label=b["next_sentence_labels"].reshape(-1))
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def bertforge_step_fn(cfg, *, bf16: bool, compile_model: bool = False, attn: str = "sdpa",
                      device: str = "cpu"):
    device = torch.device(device)
    torch.manual_seed(0)
    model = build_pretraining_model(cfg, attn_implementation=attn).to(device).train()
    opt = build_optimizer(model, AdamWSection)
    forward = torch.compile(model) if compile_model else model

    def step(b):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = forward(b)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":  # a step's wall time is then its GPU work, not its launch
            torch.cuda.synchronize()
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median reported)")
    parser.add_argument("--input-files", default=None, help="glob of seq-128 shards (default: random records)")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--compile", action="store_true",
                        help="add fp32 + torch.compile (minutes of compilation on 2 cores; no gain measured)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    peak32, peak16 = matmul_peak(torch.float32), matmul_peak(torch.bfloat16)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               "unknown") if __import__("os").path.exists("/proc/cpuinfo") else "unknown"
    print(f"machine: {cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"transformers {transformers.__version__}")
    print(f"matmul peak: fp32 {peak32 / 1e9:.1f} GFLOP/s, bf16 {peak16 / 1e9:.1f} GFLOP/s")
    for name in args.shapes.split(","):
        shape = dict(SHAPES[name])
        micro = shape.pop("micro_batch_size")
        cfg = transformers.BertConfig(**shape, intermediate_size=4 * shape["hidden_size"],
                                      layer_norm_eps=1e-3, attention_probs_dropout_prob=0.0)
        cfg._attn_implementation = "sdpa"
        batches = load_batches(args.input_files, micro, 8, cfg.vocab_size)
        for b in batches:
            b["hf_labels"] = hf_labels(b)
        tokens = sum(int(b["input_mask"].sum()) for b in batches) / len(batches)
        masked = sum(int(labelled_slots(b).sum()) for b in batches) / len(batches) / micro
        flops = model_flops_per_sequence(cfg, 128, masked) * micro
        variants = {"hf_baseline_fp32": (baseline_step_fn(cfg), peak32),
                    "bertforge_fp32": (bertforge_step_fn(cfg, bf16=False), peak32),
                    "bertforge_bf16": (bertforge_step_fn(cfg, bf16=True), peak16),
                    "bertforge_bf16_eager_attn": (bertforge_step_fn(cfg, bf16=True, attn="eager"), peak16)}
        if args.compile:
            variants["bertforge_fp32_compile"] = (bertforge_step_fn(cfg, bf16=False, compile_model=True), peak32)
        seconds = time_variants({v: fn for v, (fn, _) in variants.items()}, batches, args.steps, args.rounds)
        results = {}
        for variant, (_, peak) in variants.items():
            results[variant] = tokens / seconds[variant]
            print(f"{name} {variant}: throughput: {micro / seconds[variant]:.1f} samples/sec, "
                  f"real tokens/s: {tokens / seconds[variant]:.0f}, "
                  f"MFU: {100 * flops / seconds[variant] / peak:.1f} % (of the {peak / 1e9:.0f} GFLOP/s peak)")
        base = results["hf_baseline_fp32"]
        best = max((v for v in results if v.startswith("bertforge")), key=results.get)
        print(f"{name} speedup_fp32: {results['bertforge_fp32'] / base:.2f}x")
        print(f"{name} speedup_best: {results[best] / base:.2f}x ({best})")


if __name__ == "__main__":
    main()
