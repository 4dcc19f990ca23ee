"""Helpers shared by several test modules (test modules import from here, never from each
other or from conftest): tiny pre-training shards and configs, a small learnable SQuAD set, a
tiny QA checkpoint, and process checks for the serving tests."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from bertforge.config import load_config
from bertforge.data.example import encode_example
from bertforge.data.tfrecord import RecordWriter
from bertforge.train.sources import random_batch

# ---------------------------------------------------------------- pre-training
SEQ, MASK, VOCAB = 32, 5, 1000


def write_random_shards(directory: Path, num_shards: int = 2, records_per_shard: int = 48) -> str:
    """Well-formed random pre-training records (unit_test vocab) in indexed shards."""
    gen = torch.Generator().manual_seed(1234)
    directory.mkdir(parents=True, exist_ok=True)
    for shard in range(num_shards):
        batch = random_batch(records_per_shard, SEQ, MASK, VOCAB, gen)
        with RecordWriter(directory / f"part-{shard}.tfrecord") as writer:
            for i in range(records_per_shard):
                ints = {k: batch[k][i].reshape(-1).numpy() for k in
                        ("input_ids", "input_mask", "segment_ids", "masked_lm_positions",
                         "masked_lm_ids", "next_sentence_labels")}
                writer.write(encode_example(ints, {"masked_lm_weights": batch["masked_lm_weights"][i].numpy()}))
    return str(directory / "*.tfrecord")


def tiny_config(shards: str, run_dir: Path, **overrides):
    values = {"input_files": [shards], "sequence_length": SEQ, "mask_tokens": MASK,
              "micro_batch_size": 4, "gradient_accumulation": 2, "training_steps": 6,
              "checkpoint_output_dir": str(run_dir), "dataloader_workers": 0,
              "disable_progress_bar": True, "device": "cpu", "max_position_embeddings": 64}
    values.update(overrides)
    return load_config("unit_test", values)


def losses(run_dir: Path) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(l)["loss"] for l in lines if json.loads(l)["split"] == "train"]


# ---------------------------------------------------------------- SQuAD
NAMES = ["Alice Moreau", "Bruno Keller", "Chen Wei", "Dara Okafor", "Elena Petrova",
         "Farid Haddad", "Greta Lindqvist", "Hiro Tanaka", "Ines Duarte", "Jonas Berg"]
CITIES = ["Lisbon", "Oslo", "Nairobi", "Lima", "Kyoto", "Tunis", "Quebec", "Dublin", "Hanoi"]
FILLER = ["The weather there is often mild.", "Many people visit the old market.",
          "A river runs through the valley.", "The library opened a new wing.",
          "Local farmers grow olives and grapes.", "The museum holds early maps."]
# A tiny random-init BERT (2 layers, hidden 64, 2 heads) on 64-token windows; with constant LR
# 1e-3 and no dropout it fits the 48 questions below in 180 steps (~4 s on one core).
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, sequence_length=64,
            max_query_length=16, doc_stride=16, micro_batch_size=16, global_batch_size=16,
            learning_rate=1e-3, lr_schedule="constant", lr_warmup=0.0, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0, precision="fp32", device="cpu",
            disable_progress_bar=True, max_position_embeddings=64)


def make_squad(num_paragraphs: int = 48, seed: int = 0, v2: bool = False) -> dict:
    """Paragraphs with one fact among shuffled filler sentences and one question on it: 'Where
    was X born?' (a city) or 'When did X win a prize?' (a year); v2 adds an unanswerable 'Why
    was X famous?'. One fact per paragraph keeps it learnable by a 2-layer model from scratch
    in seconds (with two facts, picking by question word took it >1000 steps, seed-dependent).
    """
    rng = random.Random(seed)
    articles = []
    for p in range(num_paragraphs):
        name = rng.choice(NAMES)
        if p % 2 == 0:
            answer = rng.choice(CITIES)
            fact, question = f"{name} was born in {answer}.", f"Where was {name} born?"
        else:
            answer = str(rng.randint(1800, 1999))
            fact, question = f"{name} won a prize in {answer}.", f"When did {name} win a prize?"
        sentences = rng.sample(FILLER, 2) + [fact]
        rng.shuffle(sentences)
        context = " ".join(sentences)
        start = context.index(fact) + fact.index(answer)
        qas = [{"id": f"p{p}", "question": question,
                "answers": [{"text": answer, "answer_start": start}]}]
        if v2:
            qas.append({"id": f"p{p}-why", "question": f"Why was {name} famous?",
                        "answers": [], "is_impossible": True})
        articles.append({"title": f"t{p}", "paragraphs": [{"context": context, "qas": qas}]})
    return {"version": "v2.0" if v2 else "1.1", "data": articles}


# ---------------------------------------------------------------- serving
# A SQuAD-like paragraph (SQuAD's first Normans context): several windows at S 64.
NORMANS = ("The Normans were the people who in the 10th and 11th centuries gave their name to "
           "Normandy, a region in France. They were descended from Norse raiders and pirates "
           "from Denmark, Iceland and Norway who, under their leader Rollo, agreed to swear "
           "fealty to King Charles III of West Francia. Through generations of assimilation "
           "and mixing with the native Frankish and Roman-Gaulish populations, their "
           "descendants would gradually merge with the Carolingian-based cultures of West "
           "Francia. The distinct cultural and ethnic identity of the Normans emerged "
           "initially in the first half of the 10th century, and it continued to evolve over "
           "the succeeding centuries.")


def tiny_qa_model(path: Path, seed: int) -> Path:
    """A random tiny BertForQuestionAnswering (64/2/2) with bert-base-uncased tokenizer files,
    saved at `path`: the served / exported model of the serving tests."""
    import torch
    import transformers

    from bertforge.data.vocab import save_tokenizer_files
    torch.manual_seed(seed)
    config = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=128, max_position_embeddings=128)
    transformers.BertForQuestionAnswering(config).save_pretrained(path)
    save_tokenizer_files(path)
    return path


def descendants(pid: int) -> list[int]:
    """Process ids below `pid` (from /proc), so the test can check none outlive the server."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
