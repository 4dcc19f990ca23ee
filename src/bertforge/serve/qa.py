"""The in-process QA engine behind both served models: tensors -> logits, text -> answer.

`QAEngine` is what the server calls and what tests and `serve-bench` compare the server's
replies with, so "the server answers what the model answers" is checked against one piece of
code. Text questions reuse the SQuAD code unchanged: `squad.features.build_windows` cuts the
context into --sequence-length windows with --doc-stride overlap, and
`squad.postprocess.window_candidates` ranks spans (top-20 starts x top-20 ends, max 30 tokens)
exactly as `bertforge squad` does; the only addition here is mapping the best span back to
character offsets so a client gets where the answer is, not only its text.

Padding-free (`padding_free`, on by default): the real tokens of a batch of right-padded rows
run without their padding and scattered back to [B, S]; padding positions get PAD_LOGIT
instead of values nobody reads. Two layouts (`layout`):
- "flat" (CPU fp32; CUDA bf16/fp16): all rows of the batch one after another in a single row,
  positions restarting per request row, under variable-length attention
  (model/attention.py: each row attends to itself only, no mask; per-row SDPA on CPU,
  FlashAttention's varlen kernel on CUDA). No padding slot at all.
- "packs" (CPU bf16; CUDA fp32, where varlen has no kernel): rows packed up to 3 a row
  (SPFHP, the pre-training packer), packs cut to the longest one, the block-diagonal mask
  (squad/forward.py); ~83-86% of the slots are real tokens at S 128.
A single row is only trimmed to its length and run by the stock model. A row's logits are
those of the stock model on the padded row (tests/test_serve_engine.py, both layouts, fp32
within 1e-5). In process (mini BERT 256/4, S 128, rows of S/4..S real tokens, 2 threads,
fp32): batch 8 runs 137 rows/s padded, 209 in packs, 230 flat; batch 1 101 padded, 147
trimmed. `padded_logits` is the reference path beside them: the stock model on the rows as
sent.

Cost: one forward pass over all windows of all questions in a request batch (chunked by
max_batch_size), then ~110 us of post-processing per window (squad/postprocess.py).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bertforge import rows
from bertforge.config.serve import WindowSection
from bertforge.data.packing import pack_lengths
from bertforge.model.attention import VARLEN, implementation
from bertforge.serve.onnx_rows import OnnxRows
from bertforge.squad.data import SquadExample
from bertforge.squad.features import build_windows, pad_windows
from bertforge.squad.forward import QuestionAnsweringRows
from bertforge.squad.postprocess import window_candidates

# The `bert` model's logit at padding positions (attention_mask 0): no span can start or end
# there, and the padding-free path never computes them. -10000 rather than -inf keeps JSON
# and allclose comparisons simple; real logits of a BERT QA head are many orders smaller.
PAD_LOGIT = -10000.0
# Request rows per packed row on the padding-free path (as packed SQuAD's windows).
MAX_ROWS_PER_PACK = 3
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def default_layout(device: torch.device, dtype: torch.dtype) -> str:
    """The layout measured faster where both run. CUDA: "flat" in bf16/fp16 (FlashAttention's
    varlen kernel), "packs" in fp32 (no kernel). CPU, where varlen is one SDPA call per row:
    "flat" in fp32 (served mini BERT, 8 async clients: +10%, sync: even), "packs" in bf16
    (flat measured even to 17% slower: the per-row attention calls weigh more when the
    matrix products run at bf16 speed)."""
    if device.type == "cpu":
        return "flat" if dtype == torch.float32 else "packs"
    has_kernel = importlib.util.find_spec("torch.nn.attention.varlen") is not None
    return "flat" if has_kernel and dtype in (torch.bfloat16, torch.float16) else "packs"


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

    def __init__(self, model: torch.nn.Module, tokenizer, spec: WindowSection, *,
                 max_batch_size: int = 32, n_best_size: int = 20, max_answer_length: int = 30,
                 padding_free: bool = True, layout: str | None = None,
                 onnx: OnnxRows | None = None):
        self.model = model
        # Set: right-padded rows run under ONNX Runtime, one at a time (serve/onnx_rows.py).
        self.onnx = onnx
        self.tokenizer = tokenizer
        self.spec = spec
        self.max_batch_size = max_batch_size
        self.n_best_size = n_best_size
        self.max_answer_length = max_answer_length
        param = next(model.parameters())
        self.device = param.device
        self.vocab_size = model.config.vocab_size
        self.padding_free = padding_free
        self.layout = layout or default_layout(self.device, param.dtype)
        if self.layout not in ("flat", "packs"):
            raise ValueError(f"layout {self.layout!r}: choose flat or packs")
        if self.layout == "flat":
            # The stock forward (padded_logits, single rows) gets no segments and takes SDPA
            # with its mask inside the same attention function: it is unchanged.
            model.config._attn_implementation = implementation("varlen")
        elif model.config._attn_implementation == VARLEN:
            model.config._attn_implementation = "sdpa"
        self.packed_model = QuestionAnsweringRows(model).eval()

    def check_rows(self, input_ids: np.ndarray, attention_mask: np.ndarray,
                   token_type_ids: np.ndarray) -> None:
        """Raise ValueError unless the three arrays are [batch, sequence] of one shape with ids
        in the vocabulary and 0/1 masks and types (one bad request cannot then crash the model
        with an out-of-range embedding index)."""
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

    def logits(self, input_ids: np.ndarray, attention_mask: np.ndarray,
               token_type_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """float32 start/end logits [B, S] of checked integer arrays [B, S]; PAD_LOGIT where
        attention_mask is 0. Right-padded rows (the usual case) take the padding-free path
        when `padding_free` is set, any other mask the padded one; both give the same logits."""
        self.check_rows(input_ids, attention_mask, token_type_ids)
        lengths = attention_mask.sum(1, dtype=np.int64)
        right_padded = bool((attention_mask == (np.arange(attention_mask.shape[1])
                                                < lengths[:, None])).all())
        if self.padding_free and right_padded:
            return self.packed_logits(input_ids, token_type_ids, lengths)
        return self.padded_logits(input_ids, attention_mask, token_type_ids)

    @torch.no_grad()
    def padded_logits(self, input_ids: np.ndarray, attention_mask: np.ndarray,
                      token_type_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The reference path: the stock model on the padded [B, S] rows, padding masked."""
        tensors = {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.int64)).to(self.device)
                   for k, v in (("input_ids", input_ids), ("attention_mask", attention_mask),
                                ("token_type_ids", token_type_ids))}
        out = self.model(**tensors)
        keep = attention_mask > 0
        return tuple(np.where(keep, logits.float().cpu().numpy(), PAD_LOGIT).astype(np.float32)
                     for logits in (out.start_logits, out.end_logits))

    @torch.no_grad()
    def packed_logits(self, input_ids: np.ndarray, token_type_ids: np.ndarray,
                      lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The padding-free path for right-padded rows of real `lengths`: the rows laid out
        by `self.layout` (module docstring), run, and scattered back to [B, S] with PAD_LOGIT
        at padding. A single row is only trimmed to its length. With `onnx`, each row is run
        trimmed by ONNX Runtime instead."""
        batch, seq_len = input_ids.shape
        start = np.full((batch, seq_len), PAD_LOGIT, dtype=np.float32)
        end = np.full((batch, seq_len), PAD_LOGIT, dtype=np.float32)
        if self.onnx is not None:
            self.onnx.logits(input_ids, token_type_ids, lengths, start, end)
            return start, end
        real = np.nonzero(lengths)[0]
        if len(real) == 1:
            i, n = int(real[0]), int(lengths[real[0]])
            row = {k: torch.from_numpy(v[i:i + 1, :n].astype(np.int64)).to(self.device)
                   for k, v in (("input_ids", input_ids), ("token_type_ids", token_type_ids))}
            out = self.model(**row)
            start[i, :n], end[i, :n] = (t.float().cpu().numpy()[0]
                                        for t in (out.start_logits, out.end_logits))
            return start, end
        if not len(real):
            return start, end
        if self.layout == "flat":
            packs = [[int(i) for i in real]]
        else:
            packs = [[int(real[k]) for k in pack] for pack in
                     pack_lengths(lengths[real], seq_len, MAX_ROWS_PER_PACK, "spfhp")]
        placement = rows.place(lengths, packs)
        tensors = {k: torch.from_numpy(v).to(self.device) for k, v in
                   rows.write_tokens(placement, input_ids, token_type_ids).items()}
        row_start, row_end = (t.float().cpu().numpy() for t in self.packed_model(**tensors))
        for logits, out in ((row_start, start), (row_end, end)):
            mine = rows.read_tokens(placement, logits, fill=PAD_LOGIT, width=seq_len)
            out[real] = mine[real]
        return start, end

    def answer_many(self, questions: list[str], contexts: list[str]) -> list[Answer]:
        """The best span of each (question, context) (answer_questions on this engine)."""
        return answer_questions(questions, contexts, self.tokenizer, self.spec, self.logits,
                                max_batch_size=self.max_batch_size, n_best_size=self.n_best_size,
                                max_answer_length=self.max_answer_length)


def answer_questions(questions: list[str], contexts: list[str], tokenizer, spec: WindowSection,
                     logits, *, max_batch_size: int = 32, n_best_size: int = 20,
                     max_answer_length: int = 30) -> list[Answer]:
    """The best span of each (question, context); contexts longer than one window are cut
    into overlapping windows and the best span over all of them wins. `logits(input_ids,
    attention_mask, token_type_ids)` runs up to `max_batch_size` windows (int arrays [B, L])
    and returns float32 start/end logits [B, L]: QAEngine.logits in process, a BLS call to
    `bert` in the served and exported `bert_qa` (serve/backend.py BlsAnswerer)."""
    for i, (q, c) in enumerate(zip(questions, contexts)):
        if not c.strip():
            raise ValueError(f"request row {i}: the context is empty")
        if not q.strip():
            raise ValueError(f"request row {i}: the question is empty")
    examples = [SquadExample(qid=str(i), question=q, context=c)
                for i, (q, c) in enumerate(zip(questions, contexts))]
    windows = build_windows(examples, tokenizer, spec, is_training=False)
    starts: list[np.ndarray] = []
    ends: list[np.ndarray] = []
    for lo in range(0, len(windows), max_batch_size):
        batch = pad_windows(windows[lo:lo + max_batch_size])
        s, e = logits(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        starts.extend(s)
        ends.extend(e)
    best: list[Answer | None] = [None] * len(examples)
    for w, s, e in zip(windows, starts, ends):
        for score, first, last, _, _ in window_candidates(
                w, s, e, n_best_size=n_best_size, max_answer_length=max_answer_length):
            current = best[w.example_index]
            if current is None or score > current.score:
                lo_char, hi_char = int(w.offsets[first, 0]), int(w.offsets[last, 1])
                best[w.example_index] = Answer(
                    examples[w.example_index].context[lo_char:hi_char], score,
                    lo_char, hi_char)
    # A context of only whitespace-like tokens can leave no valid span at all.
    return [a if a is not None else Answer("", float("-inf"), 0, 0) for a in best]
