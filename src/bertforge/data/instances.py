"""`bertforge tokenize`: BERT pre-training instances by Google's create_pretraining_data, fast.

The algorithm is Google's (and the reference's, spec "Data pipeline" step 4), distribution
for distribution: per document and duplication round a target length S-3 (with probability
short_seq_prob a random one in [2, S-3], drawn once per document as Google does); sentences
accumulate into a chunk until the target or the document's end; A = the chunk's first
a_end sentences (a_end uniform in [1, n-1]); B = the rest, or with probability 0.5 (always
for a one-sentence chunk) sentences from a random other document, the unused sentences going
back to the document; the longer segment loses tokens at a random end until A + B <= S-3;
then `[CLS] A [SEP] B [SEP]`, n = max(min(M, max(1, round(mlm_prob * len))), len - S + M)
masked positions drawn uniformly from the non-special tokens, 80% [MASK] / 10% unchanged /
10% a random vocab id (the whole vocab, as Google drew it). Instances are shuffled globally.
Over 40 seeds on the sample, Google's code (ported line by line, kept out of the repo) and
this one agree on instances per run (5,769 +- 51 vs 5,826 +- 43 per duplication round), the
NSP "random" share (53.5% vs 53.9%) and the mean length (117.1 vs 116.2 tokens).

What differs is how, for speed (the target: the whole command in <= 1/10 of Google's 17.0 s
on the sample, on 2 cores) and bounded memory (Google holds every instance: 655 MB peak for
2.6 MB of text):
- The input is cut into tasks of ~1 MiB at document boundaries (text_tasks.py): the random
  document is drawn within the task, like the reference's per-file runs on 1 MB WikiExtractor
  files. A task has its own RNGs seeded from (seed, task ordinal), and results are taken in
  task order from a fork pool: the shards are byte-identical for any --workers (tested).
- Sentences are tokenized in one batch per task, each distinct word once (fast_wordpiece.py,
  ~3x less CPU than the Rust pipeline per sentence, same ids). Tokens live in one int32
  array; an instance is five integers (A span, B span, label) found by bisect on cumulative
  sentence lengths, with uniform draws as int(random() * n) like Google's Python 2 randint.
- Truncation is vectorised: how many tokens each side loses is fixed by the lengths, and the
  front pops are Binomial(k, 1/2), the distribution of Google's coin-per-token loop.
- Arrays, masking and Example serialization are vectorised over a task's instances
  (shards.encode_example_batch), and the global shuffle is spill-then-permute per shard
  (shards.ShardSpill): peak memory ~ one 64 MB shard + 128 MB of spill buffer per process.
Measured here (benchmarks/bench_tokenize.py): see docs/benchmarks.md; the sample command runs
in well under the 1.7 s budget on an idle machine.

Beyond Google's recipe: `--objective mlm` makes instances for masked LM alone (RoBERTa's
"full sentences" within a document): a chunk of contiguous sentences up to S-2 tokens as one
segment, `[CLS] text [SEP]`, NSP label 0, no random second segment; `--whole-word-masking`
masks a word's ##pieces together (Google's --do_whole_word_mask; data/masking.py). The
manifest records both, and pre-training checks them.

A task holding a single document cannot draw a random B from another document; such
instances are skipped and counted ('instance-without-other-document') rather than labelled
"random" with a B from the same document as Google's fallback would. Everything else that
is dropped is counted too: undecodable lines, sentences or documents without tokens, empty
files; one-sentence documents are kept (their instances take a random B) and counted.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import json
import os
import random
import shutil
from collections import deque
from dataclasses import asdict, dataclass
from multiprocessing import get_all_start_methods
from pathlib import Path

import numpy as np

from bertforge.config.data import InstanceConfig  # the parameters, validated there
from bertforge.data import stage
from bertforge.data.corpus import CORPUS_TEXT, SCRATCH_PREFIX, open_corpus, write_text
from bertforge.data.fast_wordpiece import SentenceEncoder
from bertforge.data.masking import MaskRule, apply_rule, choose, continuation_table, word_keys
from bertforge.data.shards import (ShardSpill, encode_example_batch, write_shard,
                                   write_shard_from_spill)
from bertforge.data.stage import Summary, default_workers
from bertforge.data.text_tasks import Piece, plan_tasks, read_task
from bertforge.data.tfrecord import index_path
from bertforge.files import atomic_output
from bertforge.processes import worker_pool
from bertforge.progress import progress

TASK_BYTES = 1 << 20          # text per task: the random-document pool and the unit of work
SHARD_BYTES = 64 << 20        # default shard size target
SPILL_BYTES = 128 << 20       # records held in memory before they are appended to spill files
MAX_DOCUMENT_BYTES = 16 << 20  # a document longer than this is cut, to bound a task's text
TASKS_PER_WORKER = 4          # default --workers: at most one process per 4 MiB of text
BATCH_INSTANCES = 8192        # rows per vectorised batch: ~20 MB of temporaries per 128 of S
# Shard bytes per input text byte per duplication round: 23.7 MB from 2.6 MB x 5 on the
# sample at seq 128; used only to pick the default number of shards.
RECORD_BYTES_PER_TEXT_BYTE = 1.8
OUTPUT_FORMAT = 1  # bump when the same parameters would give other records (re-runs redo)
# This stage's shards and indexes, of any run and shard count (all removed before a run)
OUTPUTS = r"part-\d{5,}-of-\d{5,}\.(tfrecord|index|tfrecord\.index)"
VOCAB_COPY = ".bertforge-vocab.txt"  # the vocab the shards' ids index; a dot file: not an input


# ---------------------------------------------------------------- the algorithm
def truncation(len_a: np.ndarray, len_b: np.ndarray, max_tokens: int
               ) -> tuple[np.ndarray, np.ndarray]:
    """Tokens Google's truncate_seq_pair removes from each A and each B (elementwise).

    It pops one token at a time from the longer segment (B on ties) until the pair fits, so
    the counts are fixed; only whether each pop hits the front or the back is random.
    """
    excess = np.maximum(len_a + len_b - max_tokens, 0)
    cut_a = np.minimum(excess, np.maximum(len_a - len_b, 0))
    cut_b = np.minimum(excess - cut_a, np.maximum(len_b - len_a, 0))
    rest = excess - cut_a - cut_b  # the segments are level now: B, A, B, A, ...
    return cut_a + rest // 2, cut_b + rest - rest // 2


def truncate_pairs(spans: np.ndarray, max_tokens: int, rng: np.random.Generator) -> None:
    """Truncate the [N, 5] spans in place as truncate_seq_pair does; each pop takes the
    front or the back with probability 1/2, so the front pops are Binomial(cut, 1/2)."""
    cut_a, cut_b = truncation(spans[:, 1] - spans[:, 0], spans[:, 3] - spans[:, 2], max_tokens)
    front_a, front_b = rng.binomial(cut_a, 0.5), rng.binomial(cut_b, 0.5)
    spans[:, 0] += front_a
    spans[:, 1] -= cut_a - front_a
    spans[:, 2] += front_b
    spans[:, 3] -= cut_b - front_b


def special_tokens_free(config: InstanceConfig) -> int:
    """Text tokens an instance holds: S minus [CLS] and one [SEP] per segment."""
    return config.sequence_length - (2 if config.objective == "mlm" else 3)


def create_instances(doc_starts: list[int], doc_ends: list[int], offsets: list[int],
                     config: InstanceConfig, rnd: random.Random, summary: Summary) -> list[int]:
    """Google's create_instances_from_document over every document, duplication_factor times.

    Documents are sentence ranges [doc_starts[d], doc_ends[d]); sentence k's tokens are
    offsets[k]:offsets[k+1] of the task's token array. Returns a flat list of five ints per
    instance: A start, A end, B start, B end (token offsets, before truncation), label.
    """
    max_tokens = special_tokens_free(config)
    mlm_only = config.objective == "mlm"
    short_prob = config.short_seq_prob
    num_docs = len(doc_starts)
    # Uniform integers as int(random() * n): Google's Python 2 randint did the same, and
    # it costs a fifth of random.randint (the bias is below 1e-9 for n < 1e6).
    uniform = rnd.random
    find = bisect.bisect_left
    out: list[int] = []
    append = out.extend
    no_other = 0
    for _ in range(config.duplication_factor):
        for doc in range(num_docs):
            first, stop = doc_starts[doc], doc_ends[doc]
            target = max_tokens
            if uniform() < short_prob:
                target = 2 + int(uniform() * (max_tokens - 1))
            i = first
            while i < stop:
                a_lo = offsets[i]
                # chunk = sentences [i, k): the first k whose tokens reach the target
                k = find(offsets, a_lo + target, i + 1, stop)
                if mlm_only:  # contiguous text as one segment, no NSP pair: [CLS] text [SEP]
                    append((a_lo, offsets[k], offsets[k], offsets[k], 0))
                    i = k
                    continue
                a_end = i + 1 + int(uniform() * (k - i - 1)) if k - i >= 2 else k
                a_hi = offsets[a_end]
                if k - i == 1 or uniform() < 0.5:
                    if num_docs == 1:
                        no_other += 1
                        i = a_end
                        continue
                    for _ in range(10):
                        other = int(uniform() * num_docs)
                        if other != doc:
                            break
                    other_first, other_stop = doc_starts[other], doc_ends[other]
                    start = other_first + int(uniform() * (other_stop - other_first))
                    b_lo = offsets[start]
                    b_hi = offsets[find(offsets, b_lo + target - (a_hi - a_lo), start + 1,
                                        other_stop)]
                    label, i = 1, a_end  # the unused sentences go back to the document
                else:
                    b_lo, b_hi, label, i = a_hi, offsets[k], 0, k
                append((a_lo, a_hi, b_lo, b_hi, label))
    if no_other:
        summary.skip("instance-without-other-document", no_other)
    return out


@dataclass(frozen=True)
class SpecialIds:
    """Token ids the instance builder places itself, and the range of random replacements."""

    cls: int
    sep: int
    mask: int
    vocab_size: int
    continuation: np.ndarray | None = None  # whole-word masking: masking.continuation_table


def build_features(spans: np.ndarray, tokens: np.ndarray, config: InstanceConfig,
                   special: SpecialIds, rng: np.random.Generator
                   ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The standard BERT features of instances `spans` ([N, 5] from create_instances), masked.

    Returns (int64 features, float features) as [N, L] arrays in the schema's order.
    """
    seq, num_masks = config.sequence_length, config.mask_tokens
    # int32 and bool throughout: [N, S] temporaries of int64 cost ~5x more (page faults)
    a_lo, a_hi, b_lo, b_hi, label = spans.astype(np.int32).T
    len_a, len_b = a_hi - a_lo, b_hi - b_lo
    length = len_a + len_b + 2 + (len_b > 0)  # a second [SEP] only after a B segment
    rows = np.arange(len(spans))
    pos = np.arange(seq, dtype=np.int32)
    la, total = len_a[:, None], length[:, None]
    # [CLS] at 0, A at 1..la, [SEP] at la+1, B at la+2..total-2, [SEP] at total-1, padding
    real = pos < total
    in_b = pos > la + 1
    candidate = (pos >= 1) & (pos < total - 1) & (pos != la + 1)
    source = np.where(in_b, (b_lo - len_a - 2)[:, None], (a_lo - 1)[:, None])
    source += pos
    input_ids = tokens.take(source, mode="clip")  # clip: padding may point past the end
    input_ids *= candidate
    input_ids[:, 0] = special.cls
    input_ids[rows, len_a + 1] = special.sep
    input_ids[rows, length - 1] = special.sep
    input_mask = real.view(np.uint8)
    segment_ids = (in_b & real).view(np.uint8)

    # How many to predict (spec): a full-length sequence gets exactly M.
    num = np.minimum(num_masks, np.maximum(1, np.rint(length * config.mlm_prob).astype(np.int64)))
    num = np.minimum(np.maximum(num, length - seq + num_masks), len_a + len_b)
    keys = rng.random((len(spans), seq), dtype=np.float32)
    if special.continuation is not None:  # whole words: the general rule (data/masking.py)
        keys = word_keys(keys, candidate, special.continuation[input_ids])
        positions, weights = choose(keys, candidate, real.astype(np.int64),
                                    np.stack([np.zeros_like(num), num], 1), num_masks)
    else:
        # A uniform random subset of `num` candidates = the `num` smallest random keys
        # (masking.choose's answer, by a partial sort: the tokenize hot path).
        keys[~candidate] = 2.0
        lowest = np.argpartition(keys, num_masks - 1, axis=1)[:, :num_masks]
        ranked = np.take_along_axis(lowest, np.argsort(np.take_along_axis(keys, lowest, 1), 1), 1)
        weights = np.arange(num_masks) < num[:, None]
        positions = np.sort(np.where(weights, ranked, seq), axis=1)
        positions[~weights] = 0
    labels = apply_rule(input_ids, positions, weights,
                        MaskRule(special.mask, special.vocab_size), rng)
    return ({"input_ids": input_ids, "input_mask": input_mask, "segment_ids": segment_ids,
             "masked_lm_positions": positions, "masked_lm_ids": labels,
             "next_sentence_labels": label[:, None]},
            {"masked_lm_weights": weights.astype(np.float32)})


# ---------------------------------------------------------------- one task
class _TaskRunner:
    """Everything a worker needs; inherited by fork (a Tokenizer pickles as its JSON)."""

    def __init__(self, tokenizer, config: InstanceConfig, tasks: list[list[Piece]],
                 num_shards: int):
        if tokenizer.truncation is not None or tokenizer.padding is not None:
            # a sentence must keep all its tokens (Google never truncates one)
            tokenizer = type(tokenizer).from_str(tokenizer.to_str())
            tokenizer.no_truncation()
            tokenizer.no_padding()
        self.tokenizer, self.config = tokenizer, config
        self.tasks, self.num_shards = tasks, num_shards
        ids = {t: tokenizer.token_to_id(t) for t in ("[CLS]", "[SEP]", "[MASK]")}
        missing = [t for t, i in ids.items() if i is None]
        if missing:
            raise ValueError(f"the tokenizer's vocab has no {' '.join(missing)} token; BERT "
                             "pre-training instances need [CLS], [SEP] and [MASK]")
        self.encoder = SentenceEncoder(tokenizer)
        self.special = SpecialIds(
            ids["[CLS]"], ids["[SEP]"], ids["[MASK]"],
            tokenizer.get_vocab_size(with_added_tokens=True),
            continuation_table(tokenizer.get_vocab(with_added_tokens=True))
            if config.whole_word_masking else None)

    def run(self, index: int) -> tuple[Summary, tuple[np.ndarray, np.ndarray, bytes] | None]:
        """Task `index` -> (its counts, (records per shard, record lengths, records))."""
        summary = Summary("tokenize")
        sentences, doc_sizes = read_task(self.tasks[index], MAX_DOCUMENT_BYTES, summary)
        if not sentences:
            return summary, None
        tokens, lengths = self.encoder.encode(sentences)
        del sentences
        summary.counts["tokens"] = tokens.size
        kept = lengths > 0
        if not kept.all():
            summary.skip("sentence-without-tokens", int((~kept).sum()))
        per_doc = np.bincount(np.repeat(np.arange(len(doc_sizes)), doc_sizes)[kept],
                              minlength=len(doc_sizes))
        if (per_doc == 0).any():
            summary.skip("document-without-tokens", int((per_doc == 0).sum()))
        per_doc = per_doc[per_doc > 0]
        summary.counts["one-sentence documents"] = int((per_doc == 1).sum())
        doc_ends = np.cumsum(per_doc)
        offsets = np.concatenate(([0], np.cumsum(lengths[kept]))).tolist()

        seeds = np.random.SeedSequence([self.config.seed, 0, index]).spawn(2)
        rnd = random.Random(int.from_bytes(seeds[0].generate_state(4).tobytes(), "little"))
        rng = np.random.default_rng(seeds[1])
        spans = np.array(create_instances((doc_ends - per_doc).tolist(), doc_ends.tolist(),
                                          offsets, self.config, rnd, summary),
                         dtype=np.int64).reshape(-1, 5)
        summary.counts["instances out"] = len(spans)
        if not len(spans):
            return summary, None
        truncate_pairs(spans, special_tokens_free(self.config), rng)
        shard = rng.integers(self.num_shards, size=len(spans))
        spans = spans[np.argsort(shard, kind="stable")]  # records grouped by shard
        data, sizes = [], []
        for start in range(0, len(spans), BATCH_INSTANCES):
            features = build_features(spans[start:start + BATCH_INSTANCES], tokens,
                                      self.config, self.special, rng)
            records, record_sizes = encode_example_batch(*features)
            data.append(records)
            sizes.append(record_sizes)
        return summary, (np.bincount(shard, minlength=self.num_shards),
                         np.concatenate(sizes), b"".join(data))


_RUNNER: _TaskRunner | None = None


def _init_worker(runner: _TaskRunner, in_pool: bool = False) -> None:
    global _RUNNER
    _RUNNER = runner
    if in_pool:
        # One thread per worker (the pool is the parallelism); also keeps tokenizers from
        # warning about a fork after the parent used its thread pool.
        os.environ["TOKENIZERS_PARALLELISM"] = "false"


def _run_task(index: int):
    return _RUNNER.run(index)


def _ordered_results(pool, count: int, window: int):
    """Task results in task order with at most `window` in flight (bounded memory)."""
    pending: deque = deque()
    submitted = 0
    while submitted < count or pending:
        while submitted < count and len(pending) < window:
            pending.append(pool.apply_async(_run_task, (submitted,)))
            submitted += 1
        yield pending.popleft().get()


# ---------------------------------------------------------------- the stage
def shard_name(index: int, num_shards: int) -> str:
    return f"part-{index:05d}-of-{num_shards:05d}.tfrecord"


def default_num_shards(text_bytes: int, config: InstanceConfig) -> int:
    """About SHARD_BYTES of records per shard (1 for the sample)."""
    expected = text_bytes * config.duplication_factor * RECORD_BYTES_PER_TEXT_BYTE
    return max(1, round(expected / SHARD_BYTES))


def tokenize(inputs: list[str | Path], output_dir: Path, config: InstanceConfig, tokenizer,
             num_shards: int | None = None, workers: int | None = None, *,
             input_format: str = "auto", text_field: str = "text",
             split: str = "train") -> Summary:
    """Text files/directories -> `output_dir/part-XXXXX-of-YYYYY.tfrecord` (+ .index) shards
    of shuffled pre-training instances; skipped when already complete with the same inputs,
    config, tokenizer and shard count. Output is identical for any number of workers.
    The manifest (data/stage.py) records S, M, each shard's records and the tokenizer: vocab
    sha256 and size, lower-casing, and a copy of its vocab.txt beside the shards (VOCAB_COPY).

    JSONL, Parquet and Hugging Face datasets (input_format, or detected from the names; see
    data/corpus.py) are converted to the text format in a scratch folder first, after the
    skip-if-complete check, and fingerprinted as the original inputs; their default shard
    count follows the converted text (the manifest then records num_shards None)."""
    output_dir = Path(output_dir)
    corpus = open_corpus(inputs, output_dir, input_format, text_field, split)
    files = corpus.files
    if num_shards is not None and num_shards < 1:
        raise ValueError(f"--num-shards {num_shards} must be >= 1")
    if corpus.format == "text":
        stats = [f.stat() for f in files]
        text_bytes = sum(s.st_size for s in stats)
        if num_shards is None:
            num_shards = default_num_shards(text_bytes, config)
        _refuse_raw_extracted(files)
    params = {"config": asdict(config), "num_shards": num_shards, "task_bytes": TASK_BYTES,
              "max_document_bytes": MAX_DOCUMENT_BYTES, "format": OUTPUT_FORMAT,
              "tokenizer_sha256": hashlib.sha256(tokenizer.to_str().encode()).hexdigest()}
    if corpus.format != "text":
        params["input"] = corpus.settings  # text runs keep their params (and manifests)
    run = stage.begin(output_dir, "tokenize", params, files, outputs=OUTPUTS,
                      scratch=[VOCAB_COPY, *(p.name for p in output_dir.glob(".tokenize-spill-*")),
                               *(p.name for p in output_dir.glob(SCRATCH_PREFIX + "*"))])
    if run.done is not None:
        return run.done

    summary = Summary("tokenize")
    summary.counts.update(dict.fromkeys(("documents in", "sentences", "tokens", "instances out",
                                         "shards", "one-sentence documents"), 0))
    scratch = None
    if corpus.format != "text":
        scratch = output_dir / f"{SCRATCH_PREFIX}{os.getpid()}"
        scratch.mkdir()
        files = [scratch / CORPUS_TEXT]
        try:
            converted = write_text(corpus, files[0], workers)
        except BaseException:
            shutil.rmtree(scratch, ignore_errors=True)
            raise
        converted.add(summary)  # 'records in' first, then the counts of the text path
        summary = converted
        stats = [f.stat() for f in files]
        text_bytes = sum(s.st_size for s in stats)
        if num_shards is None:
            num_shards = default_num_shards(text_bytes, config)
    else:
        empty = sum(s.st_size == 0 for s in stats)
        if empty:
            summary.skip("empty-file", empty)
    tasks = plan_tasks([(str(f), s.st_size) for f, s in zip(files, stats)], TASK_BYTES)
    runner = _TaskRunner(tokenizer, config, tasks, num_shards)
    if workers is None:
        # All cores, but at most one per TASKS_PER_WORKER tasks: a pool costs ~0.25 s of CPU
        # (fork, first touch of memory, results through pipes), about what it saves on a few
        # MB, and a loss when other jobs hold the cores (the sample on this 2-core machine
        # with other jobs running: 1.2 s in one process, 1.6-1.8 s with 2 workers).
        workers = min(default_workers(), len(tasks) // TASKS_PER_WORKER)
    workers = max(1, min(workers, len(tasks)))
    paths = [output_dir / shard_name(i, num_shards) for i in range(num_shards)]
    spill = ShardSpill(output_dir / f".tokenize-spill-{os.getpid()}", num_shards, SPILL_BYTES)
    try:
        with contextlib.ExitStack() as stack:
            pool = None
            if workers > 1:
                methods = get_all_start_methods()
                pool = stack.enter_context(worker_pool(
                    workers, "fork" if "fork" in methods else None, _init_worker, (runner, True)))
                results = _ordered_results(pool, len(tasks), workers + 2)
            else:
                _init_worker(runner)
                stack.callback(_init_worker, None)
                results = map(_run_task, range(len(tasks)))
            bar = progress(total=text_bytes, desc="tokenize", unit="B", unit_scale=True)
            for task, (task_summary, output) in zip(tasks, results):
                summary.add(task_summary)
                bar.update(sum(end - start for _, start, end, _ in task))
                if output is not None:
                    _spill_task_output(spill, *output)
            bar.close()
            bar = progress(total=num_shards, desc="shuffle+write", unit="shard")
            if pool is not None and num_shards > 1:
                spill.flush()
                jobs = [(str(spill.path(i)), str(p), config.seed, i) for i, p in enumerate(paths)]
                counts = []
                for count in pool.imap(write_shard_from_spill, jobs):
                    counts.append(count)
                    bar.update(1)
            else:
                counts = []
                for i, path in enumerate(paths):
                    counts.append(write_shard(path, spill.records(i), config.seed, i))
                    bar.update(1)
            bar.close()
    finally:
        shutil.rmtree(spill.directory, ignore_errors=True)
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    summary.counts["shards"] = num_shards
    outputs: dict[Path, int | None] = {}
    for path, count in zip(paths, counts):
        outputs[path] = count
        outputs[index_path(path)] = None
    vocab = _copy_vocab(tokenizer, output_dir / VOCAB_COPY)
    outputs[output_dir / VOCAB_COPY] = None
    run.finish(outputs, summary, {
        "packed": False, "sequence_length": config.sequence_length,
        "mask_tokens": config.mask_tokens, "mask_slots": config.mask_tokens,
        "max_sequences_per_pack": 1, "packing_factor": 1.0, "tokenizer": vocab,
        "objective": config.objective, "whole_word_masking": config.whole_word_masking})
    return summary


def _copy_vocab(tokenizer, path: Path) -> dict:
    """Write the tokenizer's vocab (one token a line, in id order: the vocab.txt format)
    beside the shards; return the manifest's tokenizer fields."""
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    text = "".join(f"{token}\n" for token, _ in sorted(vocab.items(), key=lambda kv: kv[1]))
    data = text.encode("utf-8")
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)
    normalizer = json.loads(tokenizer.to_str()).get("normalizer") or {}
    return {"vocab_sha256": hashlib.sha256(data).hexdigest(), "vocab_size": len(vocab),
            "lower_case": bool(normalizer.get("lowercase", False)), "vocab_file": path.name}


def _refuse_raw_extracted(files: list[Path]) -> None:
    """Raw WikiExtractor files would be read as text, `<doc ...>` markup and titles included."""
    for path in files:
        with open(path, "rb") as f:
            head = f.read(5)
        if head in (b"<doc ", b"<doc>"):
            raise ValueError(f"{path} is raw WikiExtractor output (it starts with a <doc> tag); "
                             "run `bertforge wiki preprocess` on it first and tokenize its output")


def _spill_task_output(spill: ShardSpill, per_shard: np.ndarray, sizes: np.ndarray,
                       data: bytes) -> None:
    """Queue a task's records (grouped by shard, `per_shard` of them each) in the spill."""
    record_ends = np.cumsum(per_shard)
    byte_ends = np.concatenate(([0], np.cumsum(sizes)))[record_ends]
    for shard in np.flatnonzero(per_shard).tolist():
        first, last = int(record_ends[shard] - per_shard[shard]), int(record_ends[shard])
        byte_first = int(byte_ends[shard - 1]) if shard else 0
        spill.add(shard, sizes[first:last], data[byte_first:int(byte_ends[shard])])
