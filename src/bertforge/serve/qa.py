"""The in-process QA engine behind both served models: tensors -> logits, text -> answer.

`QAEngine` is what the server calls and what tests and `serve-bench` compare the server's
replies with, so "the server answers what the model answers" is checked against one piece of
code. Text questions reuse the SQuAD code unchanged: `squad.features.build_windows` cuts the
context into --sequence-length windows with --doc-stride overlap, and
`squad.postprocess.window_candidates` ranks spans (top-20 starts x top-20 ends, max 30 tokens)
exactly as `bertforge squad` does; the only addition here is mapping the best span back to
character offsets so a client gets where the answer is, not only its text.

Cost: one forward pass over all windows of all questions in a request batch (chunked by
max_batch_size), then ~110 us of post-processing per window (squad/postprocess.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bertforge.squad.data import SquadExample
from bertforge.squad.features import WindowSpec, build_windows, pad_windows
from bertforge.squad.postprocess import window_candidates

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Answer:
    text: str
    score: float   # start logit + end logit of the span (the SQuAD ranking score)
    start: int     # character offsets into the context, [start, end)
    end: int


def load_qa_checkpoint(checkpoint_dir: Path | str, device: str = "cpu", precision: str = "fp32"):
    """(BertForQuestionAnswering in eval mode, tokenizers.Tokenizer) from a bertforge step or
    run directory or a Hugging Face QA model directory; the QA head must be trained."""
    import transformers

    from bertforge.data.vocab import load_tokenizer
    from bertforge.train.checkpoint import resolve_checkpoint
    if precision not in PRECISIONS:
        raise ValueError(f"--precision {precision}: choose one of {', '.join(PRECISIONS)}")
    if precision == "fp16" and device == "cpu":
        raise ValueError("--precision fp16 needs --device cuda; use fp32 or bf16 on CPU")
    source = resolve_checkpoint(checkpoint_dir)
    try:
        model, info = transformers.BertForQuestionAnswering.from_pretrained(
            source, output_loading_info=True)
    except OSError as err:
        raise ValueError(f"--checkpoint-input-dir {checkpoint_dir}: cannot load a BERT model "
                         f"({err})") from None
    if any(k.startswith("qa_outputs") for k in info["missing_keys"]):
        raise ValueError(f"--checkpoint-input-dir {checkpoint_dir} has no question-answering "
                         "head; fine-tune it with `bertforge squad` first")
    model = model.to(device=device, dtype=PRECISIONS[precision]).eval()
    return model, load_tokenizer(name_or_path=str(source))


class QAEngine:
    """A QA model plus its tokenizer and window spec; thread-compatible, not thread-safe."""

    def __init__(self, model: torch.nn.Module, tokenizer, spec: WindowSpec, *,
                 max_batch_size: int = 32, n_best_size: int = 20, max_answer_length: int = 30):
        self.model = model
        self.tokenizer = tokenizer
        self.spec = spec
        self.max_batch_size = max_batch_size
        self.n_best_size = n_best_size
        self.max_answer_length = max_answer_length
        self.device = next(model.parameters()).device
        self.vocab_size = model.config.vocab_size

    @torch.no_grad()
    def logits(self, input_ids: np.ndarray, attention_mask: np.ndarray,
               token_type_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """float32 start/end logits [B, S] of integer arrays [B, S] (checked, so one bad
        request cannot crash the model with an out-of-range embedding index)."""
        arrays = {"input_ids": input_ids, "attention_mask": attention_mask,
                  "token_type_ids": token_type_ids}
        for name, a in arrays.items():
            if a.ndim != 2 or a.shape != input_ids.shape:
                raise ValueError(f"{name} has shape {list(a.shape)}; all three inputs must be "
                                 f"[batch, sequence] of the same shape, "
                                 f"here {list(input_ids.shape)}")
        if input_ids.size and (input_ids.min() < 0 or input_ids.max() >= self.vocab_size):
            raise ValueError(f"input_ids must lie in [0, {self.vocab_size}); got "
                             f"{int(input_ids.min())}..{int(input_ids.max())}")
        for name in ("attention_mask", "token_type_ids"):
            a = arrays[name]
            if a.size and (a.min() < 0 or a.max() > 1):
                raise ValueError(f"{name} must hold only 0 and 1")
        tensors = {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.int64)).to(self.device)
                   for k, v in arrays.items()}
        out = self.model(**tensors)
        return (out.start_logits.float().cpu().numpy(), out.end_logits.float().cpu().numpy())

    def answer_many(self, questions: list[str], contexts: list[str]) -> list[Answer]:
        """The best span of each (question, context); contexts longer than one window are
        cut into overlapping windows and the best span over all of them wins."""
        for i, (q, c) in enumerate(zip(questions, contexts)):
            if not c.strip():
                raise ValueError(f"request row {i}: the context is empty")
            if not q.strip():
                raise ValueError(f"request row {i}: the question is empty")
        examples = [SquadExample(qid=str(i), question=q, context=c)
                    for i, (q, c) in enumerate(zip(questions, contexts))]
        windows = build_windows(examples, self.tokenizer, self.spec, is_training=False)
        starts: list[np.ndarray] = []
        ends: list[np.ndarray] = []
        for lo in range(0, len(windows), self.max_batch_size):
            batch = pad_windows(windows[lo:lo + self.max_batch_size])
            s, e = self.logits(batch["input_ids"], batch["attention_mask"],
                               batch["token_type_ids"])
            starts.extend(s)
            ends.extend(e)
        best: list[Answer | None] = [None] * len(examples)
        for w, s, e in zip(windows, starts, ends):
            for score, first, last, _, _ in window_candidates(
                    w, s, e, n_best_size=self.n_best_size,
                    max_answer_length=self.max_answer_length):
                current = best[w.example_index]
                if current is None or score > current.score:
                    lo_char, hi_char = int(w.offsets[first, 0]), int(w.offsets[last, 1])
                    best[w.example_index] = Answer(
                        examples[w.example_index].context[lo_char:hi_char], score,
                        lo_char, hi_char)
        # A context of only whitespace-like tokens can leave no valid span at all.
        return [a if a is not None else Answer("", float("-inf"), 0, 0) for a in best]
