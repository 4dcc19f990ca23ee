"""Packed pre-training equals unpacked: per-sequence losses, logits and gradients.

A tiny fp32 BERT (dropout 0) runs the same random sequences once one per row and once packed
(block-diagonal attention, restarted positions, NSP from each [CLS]); everything must agree
within 1e-5. The reference packer's layout ([CLS] of sequence k at S-k, NSP slots reversed)
is written as TFRecords, read back through the loader and must give the same losses too.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers

from bertforge.config import PretrainConfig
from bertforge.data.example import encode_example
from bertforge.data.loader import PretrainingDataset
from bertforge.data.loader import check_inputs, packed_batch
from bertforge.data.pack import layout_packs
from bertforge.data.packing import pack_lengths
from bertforge.data.tfrecord import RecordWriter
from bertforge.model.bert import build_pretraining_model, num_sequences
from bertforge.rows import from_reference_layout

S, M, VOCAB = 32, 5, 97


def _model(attn: str = "sdpa"):
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64,
                                     max_position_embeddings=S, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    return build_pretraining_model(config, attn_implementation=attn).train()


def _unpacked(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """n well-formed records of random lengths 4..S, left-aligned, labels padded with 0."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(4, S + 1, n)
    lengths[:3] = [S, 5, S // 2]
    arrays = {k: np.zeros((n, w), np.int64) for k, w in (
        ("input_ids", S), ("input_mask", S), ("segment_ids", S), ("masked_lm_positions", M),
        ("masked_lm_ids", M))}
    arrays["masked_lm_weights"] = np.zeros((n, M), np.float32)
    arrays["next_sentence_labels"] = rng.integers(0, 2, (n, 1))
    for i, length in enumerate(lengths.tolist()):
        arrays["input_ids"][i, :length] = rng.integers(5, VOCAB, length)
        arrays["input_mask"][i, :length] = 1
        arrays["segment_ids"][i, length // 2:length] = 1
        count = int(rng.integers(1, min(M, length - 2) + 1))
        positions = np.sort(rng.choice(np.arange(1, length - 1), count, replace=False))
        arrays["masked_lm_positions"][i, :count] = positions
        arrays["masked_lm_ids"][i, :count] = rng.integers(1, VOCAB, count)
        arrays["masked_lm_weights"][i, :count] = 1
    return arrays


def _torch(arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    out = {k: torch.from_numpy(np.asarray(v)) for k, v in arrays.items()}
    if "input_mask" in out:  # unpacked: NSP label per row
        out["next_sentence_labels"] = out["next_sentence_labels"].reshape(-1)
    return out


def _packed(arrays, max_per_pack=3):
    packs = pack_lengths(arrays["input_mask"].sum(1), S, max_per_pack, "spfhp")
    table = np.full((len(packs), max_per_pack), -1, np.int64)
    for row, members in enumerate(packs):
        table[row, :len(members)] = members
    return table, layout_packs(arrays, table, S, M * max_per_pack)


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _per_sequence(model, batch):
    """(hidden states of each sequence's tokens, MLM logits per prediction, NSP logits per
    sequence) in sequence order, for packed or unpacked batches."""
    hidden, pooled = model.encode(batch)
    head = model.cls.predictions
    if "sequence_ids" not in batch:
        masks = batch["input_mask"].bool()
        seqs = [hidden[i][masks[i]] for i in range(hidden.shape[0])]
        real = batch["masked_lm_ids"] != 0
        mlm = [head(hidden[i, batch["masked_lm_positions"][i][real[i]]]) for i in range(len(seqs))]
        return seqs, mlm, model.cls.seq_relationship(pooled[:, 0])  # one [CLS] per row
    seqs, mlm, nsp = [], [], []
    for row in range(hidden.shape[0]):
        for k in range(1, batch["next_sentence_mask"].shape[1] + 1):
            if not batch["next_sentence_mask"][row, k - 1]:
                continue
            # sort by position id: the reference layout keeps [CLS] at the row's end
            where = torch.nonzero(batch["sequence_ids"][row] == k).squeeze(1)
            where = where[batch["position_ids"][row, where].argsort()]
            seqs.append(hidden[row, where])
            mine = (batch["masked_lm_sequence"][row] == k) & (batch["masked_lm_ids"][row] != 0)
            mlm.append(head(hidden[row, batch["masked_lm_positions"][row][mine]]))
            nsp.append(model.cls.seq_relationship(pooled[row, k - 1]))
    return seqs, mlm, torch.stack(nsp)


# varlen on CPU runs model/attention.py's reference kernel (one SDPA call per segment): the
# segments, layouts and kwargs through HF's layers are what is checked here; the CUDA kernel is
# checked against that reference in tests/test_gpu.py.
@pytest.mark.parametrize("attn", ["sdpa", "eager", "varlen"])
def test_packed_batch_equals_unpacked(attn):
    model = _model(attn)
    arrays = _unpacked(12)
    table, packed = _packed(arrays)
    assert len(table) < 12  # packing happened
    unpacked_batch, packed_batch_ = _torch(arrays), _torch(packed)
    order = [i for row in table.tolist() for i in row if i >= 0]  # sequence of each packed slot

    with torch.no_grad():
        seq_u, mlm_u, nsp_u = _per_sequence(model, unpacked_batch)
        seq_p, mlm_p, nsp_p = _per_sequence(model, packed_batch_)
    for slot, i in enumerate(order):
        torch.testing.assert_close(seq_p[slot], seq_u[i], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(mlm_p[slot], mlm_u[i], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(nsp_p[slot], nsp_u[i], atol=1e-5, rtol=1e-5)
        # per-sequence losses
        labels = unpacked_batch["masked_lm_ids"][i][unpacked_batch["masked_lm_ids"][i] != 0]
        torch.testing.assert_close(F.cross_entropy(mlm_p[slot], labels),
                                   F.cross_entropy(mlm_u[i], labels), atol=1e-5, rtol=1e-5)
        nsp_label = unpacked_batch["next_sentence_labels"][i:i + 1]
        torch.testing.assert_close(F.cross_entropy(nsp_p[slot:slot + 1], nsp_label),
                                   F.cross_entropy(nsp_u[i:i + 1], nsp_label), atol=1e-5, rtol=1e-5)

    out_u = model(unpacked_batch)
    out_u.loss.backward()
    grads_u = _grads(model)
    model.zero_grad(set_to_none=True)
    out_p = model(packed_batch_)
    out_p.loss.backward()
    grads_p = _grads(model)
    for name in ("loss", "mlm_loss", "nsp_loss", "mlm_acc", "nsp_acc"):
        torch.testing.assert_close(getattr(out_p, name), getattr(out_u, name), atol=1e-5, rtol=1e-5)
    for name in ("num_masked", "num_sequences", "num_tokens"):
        assert int(getattr(out_p, name)) == int(getattr(out_u, name)), name
    assert int(num_sequences(packed_batch_)) == 12
    assert grads_p.keys() == grads_u.keys()
    for name, grad in grads_u.items():
        torch.testing.assert_close(grads_p[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def _reference_layout(arrays, table, max_per_pack=3):
    """The reference packer's records: tokens but [CLS] consecutive, [CLS] of k at S-k."""
    n = len(table)
    m = M * max_per_pack
    ref = {k: np.zeros((n, w), np.int64) for k, w in (
        ("packed_input_ids", S), ("packed_input_mask", S), ("packed_segment_ids", S),
        ("packed_position_ids", S), ("packed_masked_lm_positions", m), ("packed_masked_lm_ids", m),
        ("packed_next_sentence_labels", max_per_pack))}
    mlm_mask = np.zeros((n, m), np.float32)
    nsp_mask = np.zeros((n, max_per_pack), np.float32)
    lengths = arrays["input_mask"].sum(1)
    for row, members in enumerate(table.tolist()):
        start = used = 0
        for k, i in enumerate([x for x in members if x >= 0], start=1):
            length = int(lengths[i])
            body = slice(start, start + length - 1)  # tokens 1..L-1
            ref["packed_input_ids"][row, body] = arrays["input_ids"][i, 1:length]
            ref["packed_segment_ids"][row, body] = arrays["segment_ids"][i, 1:length]
            ref["packed_position_ids"][row, body] = np.arange(1, length)
            ref["packed_input_mask"][row, body] = k
            ref["packed_input_ids"][row, S - k] = arrays["input_ids"][i, 0]
            ref["packed_input_mask"][row, S - k] = k
            real = arrays["masked_lm_ids"][i] != 0
            count = int(real.sum())
            # token at original position q sits at start + q - 1
            ref["packed_masked_lm_positions"][row, used:used + count] = \
                arrays["masked_lm_positions"][i][real] + start - 1
            ref["packed_masked_lm_ids"][row, used:used + count] = arrays["masked_lm_ids"][i][real]
            mlm_mask[row, used:used + count] = k
            ref["packed_next_sentence_labels"][row, max_per_pack - k] = arrays["next_sentence_labels"][i, 0]
            nsp_mask[row, max_per_pack - k] = 1
            start, used = start + length - 1, used + count
    return ref, {"packed_masked_lm_mask": mlm_mask, "packed_next_sentence_mask": nsp_mask}


def test_reference_layout_record_reads_and_trains_the_same(tmp_path):
    model = _model()
    arrays = _unpacked(10, seed=3)
    table, ours = _packed(arrays)
    ints, floats = _reference_layout(arrays, table)
    path = tmp_path / "reference-packed.tfrecord"
    with RecordWriter(path) as writer:
        for row in range(len(table)):
            writer.write(encode_example({k: v[row] for k, v in ints.items()},
                                        {k: v[row] for k, v in floats.items()}))
    check_inputs([path], packed=True)
    batch = next(iter(PretrainingDataset([path], len(table), shuffle=False)))
    converted = packed_batch(batch)
    assert converted["cls_positions"][0].tolist() == [S - 1, S - 2, S - 3]
    assert torch.equal(converted["next_sentence_mask"], torch.from_numpy(ours["next_sentence_mask"]))
    assert torch.equal(converted["next_sentence_labels"], torch.from_numpy(ours["next_sentence_labels"]))
    with torch.no_grad():
        out_ref = model(converted)
        out_ours = model(_torch(ours))
        out_unpacked = model(_torch(arrays))
    for name in ("loss", "mlm_loss", "nsp_loss"):
        torch.testing.assert_close(getattr(out_ref, name), getattr(out_unpacked, name), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(getattr(out_ours, name), getattr(out_unpacked, name), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="lacks"):
        from_reference_layout({"packed_input_ids": batch["packed_input_ids"]})


def test_packing_factor_flows_into_global_batch():
    cfg = PretrainConfig.from_dict({"data": {"synthetic_data": True, "packed_data": True},
                                    "train": {"micro_batch_size": 4, "global_batch_size": 64}})
    assert cfg.resolve(1).train.gradient_accumulation == 16
    packed = cfg.resolve(1, packing_factor=2.0)
    assert packed.train.gradient_accumulation == 8
    assert packed.train.global_batch_size == 64  # still counted in sequences
    assert cfg.resolve(2, packing_factor=1.33).train.gradient_accumulation == 6  # 64/(4*2*1.33)
    with pytest.raises(ValueError, match="packing factor"):
        cfg.resolve(1, packing_factor=0.5)


def test_packed_pretraining_runs_and_counts_sequences(tmp_path):
    """End to end: packed shards -> measured packing factor -> accumulation -> sequences/s."""
    from bertforge.config import load_config
    from bertforge.data.shards import encode_example_batch
    from bertforge.train.pretraining import data_packing_factor, pretrain

    arrays = _unpacked(40, seed=5)
    table, packed = _packed(arrays)
    data, sizes = encode_example_batch(packed)
    ends = np.cumsum(sizes).tolist()
    with RecordWriter(tmp_path / "packed.tfrecord") as writer:
        for a, b in zip([0, *ends[:-1]], ends):
            writer.write(data[a:b])
    factor = 40 / len(table)
    values = {"input_files": [str(tmp_path / "packed.tfrecord")], "packed_data": True,
              "sequence_length": S, "mask_tokens": M, "micro_batch_size": 2,
              "global_batch_size": 16, "training_steps": 2, "dataloader_workers": 0,
              "checkpoint_output_dir": str(tmp_path / "run"), "disable_progress_bar": True,
              "device": "cpu", "max_position_embeddings": S}
    cfg = load_config("unit_test", values)
    assert data_packing_factor(cfg.data) == pytest.approx(factor)
    assert cfg.resolve(1, factor).train.gradient_accumulation == round(16 / (2 * factor))
    result = pretrain(cfg)
    accumulation = round(16 / (2 * factor))
    rows = accumulation * 2 * len(result.history)
    sequences = sum(step["sequences"] for step in result.history)
    assert rows < sequences <= 3 * rows  # sequences, not rows, are counted
    for step in result.history:
        assert step["samples_per_s"] > 0 and step["real_tokens"] > step["sequences"] * 3
    with pytest.raises(ValueError, match="add --packed-data"):
        data_packing_factor(load_config("unit_test", {**values, "packed_data": False}).data)


def test_varlen_segments_and_start_up_checks():
    from bertforge.model.attention import check_varlen, segments
    ids = torch.tensor([[1, 1, 2, 2, 2, 0], [1, 1, 1, 1, 1, 1], [1, 2, 3, 0, 0, 0]])
    offsets, longest = segments(ids)
    assert offsets.tolist() == [0, 2, 5, 6, 12, 13, 14, 15, 18] and longest == 6
    assert offsets.dtype == torch.int32
    with pytest.raises(ValueError, match="CUDA only"):
        check_varlen("cpu", "bf16", 0.0)
    with pytest.raises(ValueError, match="bf16 or fp16"):
        check_varlen("cuda", "fp32", 0.0)
    with pytest.raises(ValueError, match="attention_probs_dropout_prob is 0.1"):
        check_varlen("cuda", "bf16", 0.1)
    check_varlen("cuda", "bf16", 0.1, training=False)  # inference: dropout is off anyway
