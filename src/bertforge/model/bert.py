"""BERT for pre-training (MLM + NSP) with the MLM head run only where there is a label.

`GatheredBertForPreTraining` is a `transformers.BertForPreTraining` with the same modules,
parameters and state dict, so `save_pretrained` output loads into the stock class with no
missing or unexpected keys. Only `forward` differs: it takes a batch keyed
by the TFRecord feature names, gathers the encoder's hidden states at `masked_lm_positions`
and runs the prediction head (transform + vocab-wide decoder) on those rows alone.

Why: the decoder is a [hidden x vocab] matmul. At sequence 128 with 20 masked slots, the stock
head computes it for 128 rows per sequence; the gathered head for at most 20, and padding
slots (label 0) are dropped through a flat index, so they cost nothing. On demo_tiny_128
(hidden 64, 3 layers, vocab 30522) the decoder is 2 x 64 x 30522 = 3.9 MFLOP/token against
~0.4 MFLOP/token for the whole encoder, so the stock head is ~90% of the forward and
gathering 20 of 128 rows cuts the model's FLOPs ~4x; on BERT-base (encoder ~175 MFLOP/token,
decoder 47) it saves ~18%.
The price: the number of labelled rows is data dependent, so the flat index needs a
`nonzero` (one host sync on GPU, taken before the encoder runs, and a torch.compile graph
break with a dynamic dimension after it).

The same idea one layer down (`encode_rows`, on by default; `sparse_last_layer = False` keeps
the whole-sequence path the tests compare with): the heads read the last encoder layer only
at [CLS] and the masked slots, so that layer's queries, attention output and feed-forward run
on those rows only (keys and values still on every token). At seq 128 / 20 predictions it
removes ~84% of the last layer: 12% of BERT-mini's training FLOPs, 7% of BERT-base's.

The decoder and its loss are one fused, chunked step (`decoder_cross_entropy`): 128 rows at a
time, the logits are computed, reduced to loss and argmax, and turned in place into the
softmax-minus-one-hot gradient, whose two matmuls run in the forward. Stock Linear +
cross_entropy writes and re-reads the whole [rows x 30522] logits 5-6 times (log_softmax,
its backward, nll's zero-filled gradient, argmax; 78 MB each for BERT-mini's 640 rows), which
on CPU cost as much as a third of the decoder's matmuls. Measured on the 2-core dev machine
(1 thread, steps/s, stock head -> fused): BERT-mini fp32 17.2 -> 18.7 samples/s, bf16 24.3 ->
29.5; demo_tiny_128 fp32 61 -> 84. The price: a forward that will be back-propagated also does
the decoder's backward matmuls (they were due anyway), and holds the [vocab x hidden] weight
gradient from forward to backward (31 MB for BERT-mini).

Loss normalisation (what makes gradient accumulation and DDP exact): the model sums the
cross-entropies (returning the counts too) and divides the sums by `mlm_normalizer` /
`nsp_normalizer` when given (else by this batch's own counts, i.e. the usual means). A loop
that accumulates k micro-batches passes the whole step's counts (divided by the DDP world
size, since DDP averages gradients over ranks), so the summed micro-batch losses are exactly
the mean over every labelled position of the step, whatever each micro-batch's label count.

One forward path for every layout: a batch is first read into the row layout
(bertforge/rows.py): packed rows (`bertforge pack`, up to P sequences per row) as they are,
the reference packer's records converted, unpacked records as packs of one (sequence ids =
the input mask, one [CLS] at 0, one NSP slot). `sequence_ids` (0 padding, k = k-th sequence)
give a block-diagonal mask (token i sees token j only when both belong to the same
sequence) through HF's SDPA path, `position_ids` restart at 0 per sequence, the pooler reads
each sequence's [CLS] (`cls_positions` [B, P]) and `next_sentence_mask` weights out empty NSP
slots; MLM positions are row positions. Losses, logits and gradients equal those of the same
sequences run one per row (tests/test_packed_pretrain.py, fp32 within 1e-5). The mask costs
B x S^2 bytes (bool; 1 MB for 4 x 512^2) and SDPA still computes the masked-out blocks:
attention is ~10% of BERT-base FLOPs at 512, so packing keeps ~90% of its padding saving
there. `--attn-implementation varlen` (model/attention.py, CUDA) replaces the mask with
per-sequence offsets and FlashAttention computes the diagonal blocks only.

`reference_forward` is the simple path kept beside the fast one: the stock HF full-vocab head
over every position, with labels -100 except at the masked positions; tests check both agree.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch
import torch.nn.functional as F
import transformers
from transformers.models.bert.modeling_bert import BertLMPredictionHead

from bertforge.model.attention import implementation, segment_kwargs
from bertforge.rows import ROW_KEYS, as_rows, is_unpacked, labelled_slots

# Feature names of a pre-training record (the reference's TFRecord keys).
BATCH_KEYS = ("input_ids", "input_mask", "segment_ids", "masked_lm_positions",
              "masked_lm_ids", "next_sentence_labels")
# What the forward reads once a batch is in the row layout (bertforge/rows.py).
ROW_BATCH_KEYS = (*ROW_KEYS, "masked_lm_positions", "masked_lm_ids", "next_sentence_labels",
                  "next_sentence_mask")


@dataclasses.dataclass
class PretrainingOutput:
    """Losses, accuracies and counts of one (micro-)batch; all 0-dim tensors (no host sync).

    `loss`, `mlm_loss` and `nsp_loss` are divided by the normalisers given to forward (so
    they may be partial sums of a larger step); the accuracies are this batch's own. The
    `num_*` counts let a loop aggregate exactly: acc = sum(correct) / sum(count).
    """

    loss: torch.Tensor            # mlm_loss + nsp_loss, the one to backward()
    mlm_loss: torch.Tensor
    nsp_loss: torch.Tensor
    mlm_acc: torch.Tensor         # correct / labelled positions (0 when there are none)
    nsp_acc: torch.Tensor
    num_masked: torch.Tensor      # labelled MLM positions in this batch
    num_mlm_correct: torch.Tensor
    num_sequences: torch.Tensor
    num_nsp_correct: torch.Tensor
    num_tokens: torch.Tensor      # real (non-padding) tokens, for tokens/s


def num_sequences(batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Sequences in the batch (0-dim tensor): the real NSP slots of its rows (one per row when
    unpacked). The loop normalises the NSP loss and counts throughput with this, so it matches
    the model's count."""
    return (as_rows(batch)["next_sentence_mask"] > 0).sum()


def block_diagonal_mask(sequence_ids: torch.Tensor, additive_dtype: torch.dtype | None = None
                        ) -> torch.Tensor:
    """[B, 1, S, S] attention mask: query i may attend key j iff both carry the same sequence id.

    Padding (id 0) attends only to padding, so no row is fully masked (SDPA would return NaN)
    and no real token sees padding. Boolean (True = attend) for SDPA; with `additive_dtype`,
    0 / dtype-min for HF's eager path, which adds the mask to the scores.
    """
    allowed = (sequence_ids.unsqueeze(2) == sequence_ids.unsqueeze(1)).unsqueeze(1)
    if additive_dtype is None:
        return allowed
    mask = torch.zeros(allowed.shape, dtype=additive_dtype, device=allowed.device)
    return mask.masked_fill_(~allowed, torch.finfo(additive_dtype).min)


def encode_sequences(bert: transformers.BertModel, input_ids: torch.Tensor,
                     sequence_ids: torch.Tensor, segment_ids: torch.Tensor,
                     position_ids: torch.Tensor) -> torch.Tensor:
    """[B, S, H] hidden states of rows in the row layout (bertforge/rows.py; unpacked rows are
    packs of one): embeddings with per-sequence `position_ids`, then the encoder under the
    block-diagonal mask of `sequence_ids`, so each sequence sees only itself. The pooler is
    not run (BertModel.forward would pool row position 0: wasted work). Pre-training
    (GatheredBertForPreTraining.encode), SQuAD and the server (squad/forward.py) share it.
    """
    varlen = segment_kwargs(bert, sequence_ids)  # varlen attention: segments, no mask
    mask = None if varlen else _packed_mask(bert, sequence_ids)
    embeddings = bert.embeddings(input_ids=input_ids, token_type_ids=segment_ids,
                                 position_ids=position_ids)
    return bert.encoder(embeddings, attention_mask=mask, return_dict=True, **varlen).last_hidden_state


def _packed_mask(bert: transformers.BertModel, sequence_ids: torch.Tensor) -> torch.Tensor:
    """The block-diagonal mask in the form `bert`'s attention takes: bool for SDPA, additive
    for eager (varlen takes segments instead: segment_kwargs)."""
    sdpa = bert.config._attn_implementation == "sdpa"
    return block_diagonal_mask(sequence_ids, None if sdpa else bert.dtype)


def last_layer_at_rows(layer: torch.nn.Module, hidden: torch.Tensor, rows: torch.Tensor,
                       sequence_ids: torch.Tensor) -> torch.Tensor:
    """[B, R, H] output of BERT's last encoder `layer` at the positions `rows` [B, R] only.

    Pre-training reads the last layer at [CLS] and the masked positions alone, so its queries,
    attention output and feed-forward are needed there only; keys and values still come from
    every token. Query row q attends to key k where sequence_ids match (one id per packed
    sequence; for unpacked rows the input mask: real tokens see real tokens). Same modules and
    parameters as the layer's own forward (HF BertLayer: self-attention, BertSelfOutput,
    BertIntermediate, BertOutput), with torch's fused attention. Saves ~(1 - R/S) of the last
    layer: at S=128 with 20 predictions, 12% of BERT-mini's (4 layers) training FLOPs.
    """
    attention = layer.attention.self
    batch, seq_len, width = hidden.shape
    heads, head_size = attention.num_attention_heads, attention.attention_head_size
    at_rows = torch.gather(hidden, 1, rows.unsqueeze(-1).expand(-1, -1, width))
    query = attention.query(at_rows).view(batch, -1, heads, head_size).transpose(1, 2)
    key = attention.key(hidden).view(batch, seq_len, heads, head_size).transpose(1, 2)
    value = attention.value(hidden).view(batch, seq_len, heads, head_size).transpose(1, 2)
    row_ids = torch.gather(sequence_ids, 1, rows)
    mask = (row_ids.unsqueeze(-1) == sequence_ids.unsqueeze(1)).unsqueeze(1)
    context = F.scaled_dot_product_attention(
        query, key, value, attn_mask=mask,
        dropout_p=attention.dropout.p if layer.training else 0.0, scale=attention.scaling)
    context = context.transpose(1, 2).reshape(batch, -1, width)
    attention_output = layer.attention.output(context, at_rows)
    return layer.output(layer.intermediate(attention_output), attention_output)


def encode_rows(bert: transformers.BertModel, rows: Mapping[str, torch.Tensor],
                at: torch.Tensor) -> torch.Tensor:
    """[B, R, H]: the encoder's output at row positions `at` [B, R] only (see
    last_layer_at_rows), for a batch in the row layout. For an unpacked row (a pack of one)
    the block-diagonal mask lets real tokens attend to real tokens, as HF's padding mask does
    (padding queries differ, and are never read)."""
    sequence_ids = rows["sequence_ids"]
    varlen = segment_kwargs(bert, sequence_ids)  # varlen attention: segments, no mask
    mask = None if varlen else _packed_mask(bert, sequence_ids)
    hidden = bert.embeddings(input_ids=rows["input_ids"], token_type_ids=rows["segment_ids"],
                             position_ids=rows["position_ids"])
    layers = bert.encoder.layer
    for layer in layers[:-1]:
        hidden = layer(hidden, mask, **varlen)
    # The last layer's R query rows take a [B, 1, R, S] mask through SDPA, varlen or not.
    return last_layer_at_rows(layers[-1], hidden, at, sequence_ids)


def _check_batch(rows: Mapping[str, torch.Tensor]) -> None:
    missing = [k for k in ROW_BATCH_KEYS if k not in rows]
    if missing:
        raise ValueError(f"pre-training batch lacks {missing}; it needs the features "
                         f"{list(BATCH_KEYS)} (the names create_pretraining_data writes) or "
                         "packed rows from `bertforge pack`")


# Rows of the decoder computed at once: 128 x 30522 fp32 logits = 15.6 MB, small enough to stay
# in a server CPU's L3 between the matmul and the softmax passes over it (64 and 256 rows were
# 5-15% slower on the 2-core dev machine).
DECODER_CHUNK_ROWS = 128


class _DecoderCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy and correct-prediction count of logits = x @ weight.T + bias,
    computed `DECODER_CHUNK_ROWS` rows at a time, with the gradients computed in the forward.

    The [rows x vocab] logits never exist whole: per chunk, one matmul writes them, one pass
    finds max and argmax, one turns them into exp in place, and the same buffer becomes the
    softmax-minus-one-hot gradient that the two gradient matmuls read. Backward only scales the
    stored gradients by the incoming scalar (the loss is a sum, so d loss / d logits does not
    depend on anything after it). Under autocast the matmuls run in the autocast dtype and the
    softmax in fp32, as the stock Linear + fp32 cross_entropy would.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, labels, weights, compute_grads: bool):
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        with torch.autocast(device, enabled=False):
            w, b = weight.to(dtype), bias.to(dtype)
            loss = torch.zeros((), dtype=torch.float32, device=x.device)
            correct = torch.zeros((), dtype=torch.long, device=x.device)
            grad_x = torch.empty_like(x) if compute_grads else None
            grad_w = torch.zeros_like(weight, dtype=torch.float32) if compute_grads else None
            grad_b = torch.zeros_like(bias, dtype=torch.float32) if compute_grads else None
            for start in range(0, x.shape[0], DECODER_CHUNK_ROWS):
                rows = slice(start, start + DECODER_CHUNK_ROWS)
                x_chunk, y = x[rows].to(dtype), labels[rows].unsqueeze(1)
                logits = torch.addmm(b, x_chunk, w.t()).float()
                target = logits.gather(1, y).squeeze(1)
                peak, predicted = logits.max(1)
                hit = predicted == y.squeeze(1)
                exp = logits.sub_(peak.unsqueeze(1)).exp_()
                total = exp.sum(1)
                each = total.log() + peak - target
                if weights is not None:  # rows weighted 0 (unlabelled slots) count for nothing
                    weight_chunk = weights[rows]
                    each, hit = each * weight_chunk, hit & (weight_chunk > 0)
                loss += each.sum()
                correct += hit.sum()
                if compute_grads:
                    grad_logits = exp.div_(total.unsqueeze(1))          # softmax
                    grad_logits.scatter_add_(1, y, torch.full_like(target, -1.0).unsqueeze(1))
                    if weights is not None:
                        grad_logits.mul_(weight_chunk.unsqueeze(1))
                    grad_b += grad_logits.sum(0)
                    grad_logits = grad_logits.to(dtype)
                    grad_x[rows] = grad_logits @ w
                    if dtype == torch.float32:
                        grad_w.addmm_(grad_logits.t(), x_chunk)
                    else:
                        grad_w += grad_logits.t() @ x_chunk
        ctx.save_for_backward(grad_x, grad_w, grad_b)
        ctx.mark_non_differentiable(correct)
        return loss, correct

    @staticmethod
    def backward(ctx, grad_loss, _grad_correct):
        grad_x, grad_w, grad_b = ctx.saved_tensors
        return grad_x * grad_loss, grad_w * grad_loss, grad_b * grad_loss, None, None, None


def decoder_cross_entropy(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                          labels: torch.Tensor, weights: torch.Tensor | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of cross-entropies, number of argmax hits) of `x @ weight.T + bias` against
    `labels`: the MLM decoder + loss without materialising all logits (see the class above).
    Equals F.cross_entropy(F.linear(x, weight, bias), labels, reduction="sum") and its
    gradients (tests/test_model.py checks both). `weights` (one per row, 0 or 1) leaves
    rows out of both sums: the fixed-shape path of GatheredBertForPreTraining.static_slots."""
    compute_grads = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                                 or bias.requires_grad)
    if weights is not None:
        weights = weights.to(torch.float32)
    return _DecoderCrossEntropy.apply(x, weight, bias, labels, weights, compute_grads)


class GatheredBertForPreTraining(transformers.BertForPreTraining):
    """BertForPreTraining whose forward takes a TFRecord-keyed batch and gathers the MLM head.

    Same parameters as the parent (weights tied as HF ties them), so checkpoints are plain
    BertForPreTraining checkpoints; see the module docstring for the loss contract.
    """

    # True: the last encoder layer runs at [CLS] and the masked positions only (encode_rows);
    # False: the whole sequence through `encode` (the reference path, kept for tests).
    sparse_last_layer = True
    # False: masked LM alone (`mlm_only`); the NSP labels are never read.
    next_sentence_prediction = True
    # True: every masked-LM slot goes through the decoder, unlabelled ones weighted out, so
    # shapes never depend on the data: torch.compile makes one graph and never recompiles
    # (selecting the labelled slots needs a nonzero whose size changes every batch; that
    # recompiled ~9 times in 15 steps). Costs the padding slots' decoder rows (~7% of the
    # slots with the reference's S=128/M=20 shards). None: on while compiling only.
    static_slots: bool | None = None

    def mlm_only(self) -> None:
        """Train masked LM alone (RoBERTa and later): no NSP loss, and the pooler and NSP head
        frozen, so that they keep their weights (the checkpoint still loads as a
        BertForPreTraining) and DDP does not wait for gradients they would never get."""
        self.next_sentence_prediction = False
        for module in (self.bert.pooler, self.cls.seq_relationship):
            module.requires_grad_(False)

    def encode(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(sequence_output [B, S, H], pooled [CLS] output [B, P, H]) of any pre-training
        batch: in the row layout, the pooler runs on each sequence's [CLS] (`cls_positions`)."""
        rows = as_rows(batch)
        hidden = encode_sequences(self.bert, rows["input_ids"], rows["sequence_ids"],
                                  rows["segment_ids"], rows["position_ids"])
        cls = rows["cls_positions"]
        at_cls = torch.gather(hidden, 1, cls.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
        return hidden, self.bert.pooler.activation(self.bert.pooler.dense(at_cls))

    def forward(self, batch: Mapping[str, torch.Tensor], *,
                mlm_normalizer: float | torch.Tensor | None = None,
                nsp_normalizer: float | torch.Tensor | None = None) -> PretrainingOutput:
        """Gathered-head training forward of any pre-training batch (unpacked records are
        read as packs of one). Normalisers default to this batch's counts (means)."""
        rows = as_rows(batch)
        _check_batch(rows)
        input_ids = rows["input_ids"]
        batch_size, seq_len = input_ids.shape
        # Which slots carry a label: selecting them (a nonzero, one host sync on GPU) keeps
        # padding slots out of the decoder; with static slots they are weighted out instead.
        real = labelled_slots(rows)
        static = torch.compiler.is_compiling() if self.static_slots is None else self.static_slots
        if static:
            def select(t: torch.Tensor) -> torch.Tensor:
                return t.reshape(-1, *t.shape[2:])
            num_masked, slot_weights = real.sum(), real.reshape(-1)
        else:
            def select(t: torch.Tensor) -> torch.Tensor:
                return t[real]
            slot_weights = None
        mlm_labels = select(rows["masked_lm_ids"])
        if not static:
            num_masked = mlm_labels.numel()
        cls_rows = rows["cls_positions"]
        if self.sparse_last_layer:
            # The last layer only at the rows the heads read: each sequence's [CLS], then every
            # masked slot (padding slots too: fixed shapes; dropped below).
            at_rows = encode_rows(self.bert, rows,
                                  torch.cat([cls_rows, rows["masked_lm_positions"]], dim=1))
            num_cls = cls_rows.shape[1]
            pooled = self.bert.pooler.activation(self.bert.pooler.dense(at_rows[:, :num_cls]))
            hidden = select(at_rows[:, num_cls:])
        else:
            sequence_output, pooled = self.encode(rows)
            row_offset = torch.arange(batch_size, device=input_ids.device).unsqueeze(1) * seq_len
            flat_index = select(rows["masked_lm_positions"] + row_offset)
            # Advanced indexing, not index_select: on CPU (torch 2.13) index_select's backward
            # (a scatter_add) took 15 ms for 320 rows of 64 against 0.1 ms for indexing's.
            hidden = sequence_output.reshape(batch_size * seq_len, -1)[flat_index]
        head = self.cls.predictions
        hidden = head.transform(hidden)
        mlm_sum, mlm_correct = decoder_cross_entropy(hidden, head.decoder.weight,
                                                     head.decoder.bias, mlm_labels, slot_weights)
        nsp_real = rows["next_sentence_mask"].reshape(-1) > 0  # sequence slots, not labels
        nsp = None
        if self.next_sentence_prediction:
            nsp = (self.cls.seq_relationship(pooled).reshape(-1, 2),
                   rows["next_sentence_labels"].reshape(-1))
        return self._losses(mlm_sum, mlm_correct, num_masked, nsp, nsp_real,
                            (rows["sequence_ids"] > 0).sum(), mlm_normalizer, nsp_normalizer)

    def reference_forward(self, batch: Mapping[str, torch.Tensor], *,
                          mlm_normalizer: float | torch.Tensor | None = None,
                          nsp_normalizer: float | torch.Tensor | None = None) -> PretrainingOutput:
        """The simple path: HF's full head over every position (S x vocab logits per sequence),
        labels -100 except at the labelled masked positions. Slow; for tests and checks."""
        if not is_unpacked(batch):
            raise ValueError("reference_forward takes unpacked batches; compare a packed batch "
                             "with its sequences run one per row through forward")
        missing = [k for k in BATCH_KEYS if k not in batch]
        if missing:
            raise ValueError(f"pre-training batch lacks {missing}")
        input_ids = batch["input_ids"]
        real = labelled_slots(batch)
        labels = torch.full_like(input_ids, -100)
        rows = torch.arange(input_ids.shape[0], device=input_ids.device).unsqueeze(1)
        rows = rows.expand_as(real)[real]
        labels[rows, batch["masked_lm_positions"][real]] = batch["masked_lm_ids"][real]
        out = transformers.BertForPreTraining.forward(
            self, input_ids, attention_mask=batch["input_mask"],
            token_type_ids=batch["segment_ids"], position_ids=batch.get("position_ids"),
            return_dict=True)
        keep = labels.reshape(-1) != -100
        mlm_logits = out.prediction_logits.reshape(-1, self.config.vocab_size)[keep]
        mlm_labels = labels.reshape(-1)[keep]
        mlm_sum = F.cross_entropy(mlm_logits.float(), mlm_labels, reduction="sum")
        mlm_correct = (mlm_logits.argmax(-1) == mlm_labels).sum()
        nsp = None
        if self.next_sentence_prediction:
            nsp = (out.seq_relationship_logits, batch["next_sentence_labels"].reshape(-1))
        return self._losses(mlm_sum, mlm_correct, mlm_labels.numel(), nsp,
                            torch.ones(len(input_ids), dtype=torch.bool, device=input_ids.device),
                            batch["input_mask"].sum(), mlm_normalizer, nsp_normalizer)

    @staticmethod
    def _losses(mlm_sum, mlm_correct, num_masked, nsp, nsp_real, num_tokens,
                mlm_normalizer, nsp_normalizer) -> PretrainingOutput:
        # Sums, then one division: the normaliser decides whether this is a batch mean or a
        # share of a larger step's mean (see module docstring). Cross-entropies run in fp32
        # under autocast, so bf16/fp16 logits do not lose the loss's precision. Empty NSP
        # slots of packed rows are weighted out rather than selected: no host sync.
        # `nsp` = (logits, labels), or None for masked LM alone (NSP loss and accuracy 0).
        if not isinstance(num_masked, torch.Tensor):
            num_masked = torch.tensor(num_masked, device=mlm_sum.device)
        num_sequences = nsp_real.sum()
        mlm_loss = mlm_sum / (num_masked.clamp(min=1) if mlm_normalizer is None else mlm_normalizer)
        if nsp is None:
            nsp_loss = torch.zeros((), device=mlm_sum.device)
            nsp_correct = torch.zeros((), dtype=torch.long, device=mlm_sum.device)
        else:
            nsp_logits, nsp_labels = nsp
            nsp_each = F.cross_entropy(nsp_logits.float(), nsp_labels, reduction="none")
            nsp_sum = torch.where(nsp_real, nsp_each, 0.0).sum()
            nsp_loss = nsp_sum / (num_sequences.clamp(min=1) if nsp_normalizer is None
                                  else nsp_normalizer)
            with torch.no_grad():
                nsp_correct = ((nsp_logits.argmax(-1) == nsp_labels) & nsp_real).sum()
        return PretrainingOutput(
            loss=mlm_loss + nsp_loss, mlm_loss=mlm_loss, nsp_loss=nsp_loss,
            mlm_acc=mlm_correct / num_masked.clamp(min=1),
            nsp_acc=nsp_correct / num_sequences.clamp(min=1),
            num_masked=num_masked, num_mlm_correct=mlm_correct,
            num_sequences=num_sequences, num_nsp_correct=nsp_correct, num_tokens=num_tokens)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """HF save_pretrained, with config.architectures naming the stock class, so that
        `AutoModelForPreTraining` and users of the checkpoint need not know this subclass."""
        super().save_pretrained(save_directory, *args, **kwargs)
        self.config.architectures = ["BertForPreTraining"]
        if kwargs.get("is_main_process", True):
            self.config.save_pretrained(save_directory)


def bert_config(model_section) -> transformers.BertConfig:
    """The transformers.BertConfig of a config's ModelSection (shape, regularisation and
    attention kernel). Here, not in the config: the config tree imports no model code."""
    m = model_section
    return transformers.BertConfig(
        vocab_size=m.vocab_size, hidden_size=m.hidden_size,
        num_hidden_layers=m.num_hidden_layers, num_attention_heads=m.num_attention_heads,
        intermediate_size=m.intermediate_size,
        max_position_embeddings=m.max_position_embeddings,
        type_vocab_size=m.type_vocab_size, hidden_act=m.hidden_act,
        layer_norm_eps=m.layer_norm_eps, hidden_dropout_prob=m.hidden_dropout_prob,
        attention_probs_dropout_prob=m.attention_probs_dropout_prob,
        initializer_range=m.initializer_range,
        attn_implementation=implementation(m.attn_implementation))


@torch.no_grad()
def init_pretraining_weights(model: torch.nn.Module, std: float) -> None:
    """Truncated-normal init at +-2 std (TF BERT's truncated_normal_initializer; HF uses an
    untruncated normal), zero biases, LayerNorm weight 1 / bias 0, zero padding embedding row.

    Plain torch.nn.init on every module, applied after construction: transformers 5 marks
    modules as initialised and dispatches sub-models to their own `_init_weights`, so an
    override in this class would not reach the encoder.
    """
    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            torch.nn.init.trunc_normal_(module.weight, mean=0.0, std=std, a=-2 * std, b=2 * std)
        if isinstance(module, torch.nn.Linear) and module.bias is not None:
            torch.nn.init.zeros_(module.bias)
        elif isinstance(module, torch.nn.LayerNorm):
            torch.nn.init.ones_(module.weight)
            torch.nn.init.zeros_(module.bias)
        elif isinstance(module, BertLMPredictionHead):
            torch.nn.init.zeros_(module.bias)
    # After every module: the decoder's weight is the tied word embedding, re-drawn above.
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding) and module.padding_idx is not None:
            module.weight[module.padding_idx].zero_()


@torch.no_grad()
def init_mlm_bias(model: transformers.BertForPreTraining, label_counts) -> None:
    """Start the MLM decoder bias at the log unigram prior of the masked tokens (add-one
    smoothed counts from data/loader.py: masked_label_counts), not at zero.

    Why (measured in docs/benchmarks.md, "Learning parity"): with a zero bias the
    first thing MLM learns is token frequencies, and with AdamW a bias entry moves at most ~lr
    per step, so ~9 nats of log-frequency range take thousands of steps through the bias. The
    faster route is the decoder weight, which BERT ties to the input word embeddings: the
    frequencies get written into the embeddings every layer reads, and the model sits at the
    unigram plateau (held-out accuracy = the most frequent token's share) for hundreds to
    thousands of steps, or the whole run, depending on the seed. Starting at the prior (the
    "init the output bias to the prior" rule for imbalanced classes) gives the loss the
    plateau's value at step 0, so every gradient goes to context. The price: one pass over
    ~16k records before training (~0.5 s) and a bias that is data-dependent at step 0 (saved
    in every checkpoint like any other weight; `--mlm-bias-init zero` restores TF/HF BERT's).
    """
    counts = torch.as_tensor(label_counts, dtype=torch.float64)
    if counts.shape != model.cls.predictions.bias.shape:
        raise ValueError(f"label counts of {counts.numel()} tokens for a vocab of "
                         f"{model.cls.predictions.bias.numel()}")
    prior = (counts + 1) / (counts + 1).sum()
    # cls.predictions.bias is the decoder's bias too (tied): one copy sets both.
    model.cls.predictions.bias.copy_(prior.log().to(model.cls.predictions.bias.dtype))


def build_pretraining_model(config: transformers.BertConfig, *, activation_checkpointing: bool = False,
                            attn_implementation: str = "sdpa") -> GatheredBertForPreTraining:
    """A freshly initialised pre-training model for `config` (layer_norm_eps, dropouts and
    initializer_range are taken from it). `attn_implementation`: "sdpa" (default: PyTorch's
    fused attention, CPU and GPU), "eager" (HF's matmul-softmax reference) or "varlen"
    (model/attention.py: variable-length flash attention on CUDA)."""
    config = transformers.BertConfig.from_dict(config.to_dict())  # do not mutate the caller's
    config._attn_implementation = implementation(attn_implementation)
    model = GatheredBertForPreTraining(config)
    init_pretraining_weights(model, config.initializer_range)
    if activation_checkpointing:
        enable_activation_checkpointing(model)
    return model


def enable_activation_checkpointing(model: transformers.PreTrainedModel) -> None:
    """Recompute each encoder layer in backward (non-reentrant torch.utils.checkpoint): about
    one extra forward (~+33% step compute) for activation memory of one layer instead of all."""
    kwargs = {"use_reentrant": False}
    # transformers >= 5.2x renamed the method (the old one warns); older versions lack the new one.
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
