"""The README's main job: the whole chain on the real Wikipedia sample, in a few CPU minutes.

sample dump (PyPI gensim wheel, cached) -> WikiExtractor -> sentences -> TFRecord shards
(training documents and held-out documents in separate shards) -> pre-training of the
demo_tiny_128 preset -> train and held-out MLM/NSP accuracy and where the checkpoint is.
The last extracted file's documents are held out, so the held-out accuracy is measured on
text the model never saw. Every stage skips work that is already complete, so a second
`make demo` goes straight to training.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path


def run_demo(output_dir: Path, workers: int | None = None, training_steps: int = 1000) -> int:
    from bertforge.config import load_config
    from bertforge.data.instances import InstanceConfig, tokenize
    from bertforge.data.sample import fetch_sample
    from bertforge.data.vocab import load_tokenizer
    from bertforge.data.wiki import extract, preprocess
    from bertforge.train.loop import pretrain

    output_dir = Path(output_dir)
    began = time.perf_counter()
    dump = fetch_sample()
    print(f"[1/5] sample dump: {dump}")
    print("[2/5] " + extract(dump, output_dir / "extracted", workers=workers).line())
    text = output_dir / "text"
    print("[3/5] " + preprocess(output_dir / "extracted", text, workers=workers).line())
    files = sorted(p for p in text.rglob("*.txt"))
    if len(files) < 2:
        raise ValueError(f"{text}: expected at least two text files to hold one out")
    tokenizer = load_tokenizer()
    instance_config = InstanceConfig(sequence_length=128, mask_tokens=20, duplication_factor=5,
                                     seed=1984, short_seq_prob=0.1, mlm_prob=0.15)
    shards = output_dir / "shards"
    print("[4/5] " + tokenize(files[:-1], shards / "train", instance_config, tokenizer=tokenizer,
                              num_shards=None, workers=workers).line())
    print("      " + tokenize(files[-1:], shards / "heldout", instance_config, tokenizer=tokenizer,
                              num_shards=None, workers=workers).line())
    run_dir = output_dir / "pretrain"
    if run_dir.exists():
        shutil.rmtree(run_dir)  # the demo always trains afresh; data stages are reused
    # demo_tiny_128 (global batch 16, AdamW 1e-3), run for 1000 steps instead of the preset's
    # 150 so that the accuracies visibly move (~2 minutes on 2 cores).
    cfg = load_config("demo_tiny_128", {
        "input_files": [str(shards / "train" / "*.tfrecord")],
        "eval_files": [str(shards / "heldout" / "*.tfrecord")],
        "training_steps": training_steps,
        "checkpoint_output_dir": str(run_dir), "dataloader_workers": 1,
        "disable_progress_bar": False, "device": "auto"})
    print(f"[5/5] pre-training demo_tiny_128 for {training_steps} steps -> {run_dir}")
    result = pretrain(cfg)
    first = result.history[:10]
    print(f"demo: train, mean of the first 10 steps: mlm_acc "
          f"{sum(h['mlm_acc'] for h in first) / len(first):.3f}, loss "
          f"{sum(h['loss'] for h in first) / len(first):.3f}; of the last 10: mlm_acc "
          f"{result.last_mean('mlm_acc'):.3f}, nsp_acc {result.last_mean('nsp_acc'):.3f}, "
          f"loss {result.last_mean('loss'):.3f}")
    if result.eval:
        print(f"demo: held-out ({int(result.eval['records'])} records never trained on): "
              f"mlm_acc {result.eval['mlm_acc']:.3f}, nsp_acc {result.eval['nsp_acc']:.3f}")
    print(f"demo: checkpoint {result.final_checkpoint} (loads with "
          f"transformers.BertForPreTraining.from_pretrained); took {time.perf_counter() - began:.0f} s")
    return 0
