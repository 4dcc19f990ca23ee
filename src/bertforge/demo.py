"""The README's main job: the whole chain on the real Wikipedia sample, ending in a model that
has clearly learned, in a few CPU minutes.

sample dump (PyPI gensim wheel, cached) -> WikiExtractor -> sentences -> a WordPiece vocab
trained on the training documents -> TFRecord shards (training and held-out documents apart)
-> pre-training of the `demo_sample_128` preset, evaluated on the held-out documents as it
goes -> held-out MLM/NSP accuracy next to the most-frequent-token baseline, and where the
checkpoint is. The last extracted file's documents are held out, so the held-out accuracy is
measured on text the model never saw. Every data stage skips work that is already complete,
so a second `make demo` goes straight to training.

Why this recipe (measured in docs/benchmarks.md, "The demo"): the reference's
demo_tiny_128 (bert-base's 30,522-token vocab, 64 wide, the reference's AdamW
without bias correction, 1e-3 constant) stays at the
most-frequent-token level on 2.6 MB of text for its 150 steps and for 1000. A vocab trained
on the sample (8,192 tokens: every token seen often enough to learn, and a 4x cheaper
decoder), a 128-wide 2-layer encoder, and the MLM bias started at the unigram prior
(model/bert.py: init_mlm_bias) leave that level within ~100 steps.
`prepare_sample_shards` is shared with benchmarks/bench_learning.py, so the demo and the
learning-parity benchmark train on the same data.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

DEMO_PRESET = "demo_sample_128"


@dataclass
class SampleShards:
    vocab_file: Path
    train_files: list[Path]
    heldout_files: list[Path]


def prepare_sample_shards(output_dir: Path, *, vocab_size: int = 8192, workers: int | None = None,
                          sequence_length: int = 128, mask_tokens: int = 20,
                          duplication_factor: int = 5, log=print) -> SampleShards:
    """The real sample, extracted, split into sentences, a vocab trained on its training
    documents, and pre-training shards of training (`duplication_factor` maskings) and
    held-out documents (one masking) under `output_dir`; complete stages are skipped."""
    from bertforge.data.instances import InstanceConfig, tokenize
    from bertforge.data.sample import fetch_sample
    from bertforge.data.vocab import load_tokenizer, train_vocab
    from bertforge.data.wiki import extract, preprocess

    output_dir = Path(output_dir)
    dump = fetch_sample()
    log(f"[1/5] sample dump: {dump}")
    log("[2/5] " + extract(dump, output_dir / "extracted", workers=workers).line())
    text = output_dir / "text"
    log("[3/5] " + preprocess(output_dir / "extracted", text, workers=workers).line())
    files = sorted(p for p in text.rglob("*.txt"))
    if len(files) < 2:
        raise ValueError(f"{text}: expected at least two text files to hold one out")
    train_text, heldout_text = files[:-1], files[-1:]
    vocab_dir = output_dir / f"vocab{vocab_size}"
    vocab_file = vocab_dir / "vocab.txt"
    # Trained on the training documents only: no held-out leak.
    log("[4/5] " + train_vocab(train_text, vocab_size, vocab_dir).line() + f" -> {vocab_file}")
    tokenizer = load_tokenizer(vocab_file)
    shards = output_dir / f"shards{vocab_size}"
    out = []
    for name, inputs, duplication in (("train", train_text, duplication_factor),
                                      ("heldout", heldout_text, 1)):
        # seed, short_seq_prob and mlm_prob: InstanceConfig's (Google's) defaults.
        config = InstanceConfig(sequence_length=sequence_length, mask_tokens=mask_tokens,
                                duplication_factor=duplication)
        log(f"      {name}: " + tokenize(inputs, shards / name, config, tokenizer=tokenizer,
                                          num_shards=None, workers=workers).line())
        out.append(sorted((shards / name).glob("*.tfrecord")))
    return SampleShards(vocab_file=vocab_file, train_files=out[0], heldout_files=out[1])


def most_frequent_token_accuracy(files: list[Path]) -> tuple[float, int]:
    """(accuracy, labels) of always predicting the held-out set's own commonest masked token:
    what token frequencies alone can score, the level a model that learned no context sits at."""
    import numpy as np

    from bertforge.data.loader import PretrainingDataset
    from bertforge.rows import labelled_slots

    counts: dict[int, int] = {}
    for batch in PretrainingDataset(files, 1024, shuffle=False, infinite=False):
        labels = batch["masked_lm_ids"][labelled_slots(batch)].numpy()
        ids, n = np.unique(labels, return_counts=True)
        for token, count in zip(ids.tolist(), n.tolist()):
            counts[token] = counts.get(token, 0) + count
    total = sum(counts.values())
    return max(counts.values()) / max(1, total), total


def run_demo(output_dir: Path, workers: int | None = None, training_steps: int | None = None) -> int:
    from bertforge.config import load_config
    from bertforge.train.pretraining import pretrain

    output_dir = Path(output_dir)
    began = time.perf_counter()
    data = prepare_sample_shards(output_dir, workers=workers)
    run_dir = output_dir / "pretrain"
    if run_dir.exists():
        shutil.rmtree(run_dir)  # the demo always trains afresh; data stages are reused
    overrides = {
        "input_files": [str(f) for f in data.train_files],
        "eval_files": [str(f) for f in data.heldout_files], "eval_every": 100,
        "tokenizer": str(data.vocab_file),
        "checkpoint_output_dir": str(run_dir), "dataloader_workers": 1,
        "disable_progress_bar": False, "device": "auto"}
    if training_steps is not None:
        overrides["training_steps"] = training_steps
    cfg = load_config(DEMO_PRESET, overrides)
    baseline, labels = most_frequent_token_accuracy(data.heldout_files)
    print(f"[5/5] pre-training {DEMO_PRESET} for {cfg.train.training_steps} steps -> {run_dir}")
    result = pretrain(cfg)
    print(f"demo: train, last 10 steps: mlm_acc {result.last_mean('mlm_acc'):.3f}, "
          f"nsp_acc {result.last_mean('nsp_acc'):.3f}, loss {result.last_mean('loss'):.3f}; "
          f"{result.history[-1]['train_s']:.0f} s in training steps")
    if result.eval:
        print(f"demo: held-out ({int(result.eval['records'])} records never trained on): "
              f"mlm_acc {result.eval['mlm_acc']:.3f} vs {baseline:.3f} for always predicting the "
              f"most frequent token ({labels:,} masked tokens); nsp_acc {result.eval['nsp_acc']:.3f}")
    print(f"demo: checkpoint {result.final_checkpoint} (loads with "
          f"transformers.BertForPreTraining.from_pretrained); took {time.perf_counter() - began:.0f} s")
    return 0
