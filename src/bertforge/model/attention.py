"""Packed attention without an S x S mask: variable-length (flash) attention over segments.

Why: a packed row's attention is block-diagonal (docs/packing.md). Through SDPA that takes a
[B, 1, S, S] mask, and SDPA computes every masked-out block anyway: with three sequences of
S/3 in a row, two thirds of the attention FLOPs are thrown away. On CUDA, torch's
`torch.nn.attention.varlen.varlen_attn` (FlashAttention over cumulative sequence offsets)
computes the diagonal blocks only and needs no mask at all.

How: the tokens of a batch, flattened to [B*S], are cut into segments, each a run of equal
sequence ids within one row, the padding run included (padding then attends to padding, as
under the block-diagonal mask, so real tokens see exactly what they saw there). `segments()`
gives the cumulative offsets and the longest segment once per batch (one host sync), and the
encoder passes them to every layer as `cu_seq_lens` / `max_seq_len` keyword arguments, which
HF's BERT layers hand to the attention function registered here. An unpacked row is a packed
row with one sequence, so unpacked batches use it as well (`encode_rows`); batches that come
without offsets (HF's own `BertModel.forward`) take HF's SDPA path inside the same function.

`--attn-implementation varlen` (config `model.attn_implementation`) selects it; it needs CUDA,
fp16 or bf16 (FlashAttention's dtypes), and no attention dropout while training
(`varlen_attn` has none; the pre-training presets already use 0, as the reference does).
`check_varlen` says so at start-up instead of failing in the first step.

Reference path: `reference_varlen` runs the same segments with one SDPA call each, on any
device and dtype. It is the kernel off CUDA, so on CPU the tests check the whole plumbing
(segments, layouts, kwargs through HF's layers) against the block-diagonal mask (fp32, 1e-5);
tests/test_gpu.py checks the CUDA kernel against it.
"""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F

# The name registered with transformers' AttentionInterface (prefixed: HF may add a "varlen").
VARLEN = "bertforge_varlen"
# What users write: --attn-implementation varlen.
IMPLEMENTATIONS = {"sdpa": "sdpa", "eager": "eager", "varlen": VARLEN}


def segments(sequence_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(int32 cumulative offsets [N + 1] into the flattened [B*S] tokens, longest segment) of
    the runs of equal ids in each row of `sequence_ids` [B, S] (0 = padding is a run too)."""
    batch, seq_len = sequence_ids.shape
    starts = torch.ones_like(sequence_ids, dtype=torch.bool)
    starts[:, 1:] = sequence_ids[:, 1:] != sequence_ids[:, :-1]
    offsets = torch.nonzero(starts.reshape(-1)).squeeze(1)
    cu_seq_lens = torch.cat([offsets, offsets.new_tensor([batch * seq_len])]).to(torch.int32)
    return cu_seq_lens, int((cu_seq_lens[1:] - cu_seq_lens[:-1]).max())


def reference_varlen(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     cu_seq_lens: torch.Tensor, scale: float | None) -> torch.Tensor:
    """[T, H, D] attention of [T, H, D] tokens within each segment: one SDPA call a segment."""
    bounds = cu_seq_lens.tolist()
    out = [F.scaled_dot_product_attention(*(t[lo:hi].transpose(0, 1) for t in (query, key, value)),
                                          scale=scale).transpose(0, 1)
           for lo, hi in zip(bounds[:-1], bounds[1:])]
    return torch.cat(out)


def _kernel(query, key, value, cu_seq_lens, max_seq_len, scale):
    if query.is_cuda:
        from torch.nn.attention.varlen import varlen_attn
        return varlen_attn(query, key, value, cu_seq_lens, cu_seq_lens, max_seq_len, max_seq_len,
                           scale=scale)
    return reference_varlen(query, key, value, cu_seq_lens, scale)


def varlen_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                             scaling: float | None = None, cu_seq_lens=None, max_seq_len=None,
                             **kwargs):
    """transformers attention function: q/k/v [B, H, S, D] -> ([B, S, H, D], None)."""
    if cu_seq_lens is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    if dropout:
        raise ValueError("--attn-implementation varlen has no attention dropout; set "
                         "attention_probs_dropout_prob to 0 or use --attn-implementation sdpa")
    batch, heads, seq_len, head_size = query.shape
    flat = (t.transpose(1, 2).reshape(batch * seq_len, heads, head_size) for t in (query, key, value))
    out = _kernel(*flat, cu_seq_lens, max_seq_len, scaling)
    return out.reshape(batch, seq_len, heads, head_size), None


def register() -> None:
    """Make VARLEN a valid `attn_implementation` for transformers models (idempotent). HF
    builds masks per implementation too (an unknown name gets none: padding would be attended
    to), so VARLEN gets SDPA's, which its fallback path takes."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    AttentionInterface.register(VARLEN, varlen_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(VARLEN, sdpa_mask)


def implementation(name: str) -> str:
    """transformers' attn_implementation for a user's --attn-implementation value."""
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"--attn-implementation {name!r}: choose {', '.join(IMPLEMENTATIONS)}")
    if IMPLEMENTATIONS[name] == VARLEN:
        register()
    return IMPLEMENTATIONS[name]


def check_varlen(device: torch.device | str, precision: str, attention_dropout: float,
                 training: bool = True) -> None:
    """Refuse, before any step, a varlen run that FlashAttention cannot do."""
    if torch.device(device).type != "cuda":
        raise ValueError("--attn-implementation varlen runs on CUDA only (FlashAttention); "
                         "use sdpa on this device")
    if precision not in ("bf16", "fp16"):
        raise ValueError(f"--attn-implementation varlen needs --precision bf16 or fp16 "
                         f"(FlashAttention has no {precision} kernel)")
    if training and attention_dropout:
        raise ValueError(f"--attn-implementation varlen has no attention dropout but "
                         f"attention_probs_dropout_prob is {attention_dropout}; set it to 0 or "
                         "use sdpa")
    try:
        importlib.import_module("torch.nn.attention.varlen")
    except ImportError:
        raise ValueError(f"--attn-implementation varlen needs torch >= 2.10 "
                         f"(torch.nn.attention.varlen); this is {torch.__version__}") from None


def segment_kwargs(bert, sequence_ids: torch.Tensor) -> dict:
    """Keyword arguments for the encoder layers: segment offsets when `bert` uses VARLEN."""
    if bert.config._attn_implementation != VARLEN:
        return {}
    cu_seq_lens, max_seq_len = segments(sequence_ids)
    return {"cu_seq_lens": cu_seq_lens, "max_seq_len": max_seq_len}
