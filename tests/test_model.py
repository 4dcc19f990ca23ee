"""The gathered-head pre-training model against stock transformers BertForPreTraining.

Tiny shapes (hidden 32, 2 layers, 4 heads, vocab 300, sequence 16) so the module runs in a
few seconds on 2 CPU cores. Batches have padding tokens, padding MLM slots (id 0, weight 0)
and a different number of labelled slots per sequence, which is where a gathered head, a
padding rule or a loss normalisation could go wrong.
"""

from __future__ import annotations

import pytest
import torch
import transformers

from bertforge.model import bert as bert_module
from bertforge.model.bert import GatheredBertForPreTraining, build_pretraining_model, decoder_cross_entropy
from bertforge.rows import labelled_slots

VOCAB, SEQ, SLOTS = 300, 16, 5


def tiny_config(**overrides) -> transformers.BertConfig:
    kwargs = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=64, max_position_embeddings=SEQ, layer_norm_eps=1e-3,
                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    kwargs.update(overrides)
    return transformers.BertConfig(**kwargs)


def make_batch(num_sequences: int, seed: int, labelled: list[int] | None = None) -> dict[str, torch.Tensor]:
    """Random pre-training batch shaped like create_pretraining_data's records."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (num_sequences, SEQ), generator=g)
    mask = torch.ones(num_sequences, SEQ, dtype=torch.long)
    segments = torch.zeros(num_sequences, SEQ, dtype=torch.long)
    positions = torch.zeros(num_sequences, SLOTS, dtype=torch.long)
    labels = torch.zeros(num_sequences, SLOTS, dtype=torch.long)
    weights = torch.zeros(num_sequences, SLOTS)
    for i in range(num_sequences):
        length = int(torch.randint(SEQ // 2, SEQ + 1, (1,), generator=g))
        ids[i, length:] = 0
        mask[i, length:] = 0
        segments[i, length // 2:length] = 1
        n = labelled[i] if labelled is not None else int(torch.randint(1, SLOTS + 1, (1,), generator=g))
        chosen = (torch.randperm(length - 1, generator=g)[:n] + 1).sort().values  # never [CLS]
        positions[i, :n] = chosen
        labels[i, :n] = torch.randint(5, VOCAB, (n,), generator=g)
        weights[i, :n] = 1.0
    return dict(input_ids=ids, input_mask=mask, segment_ids=segments, masked_lm_positions=positions,
                masked_lm_ids=labels, masked_lm_weights=weights,
                next_sentence_labels=torch.randint(0, 2, (num_sequences,), generator=g))


def hf_losses(model: transformers.BertForPreTraining, batch: dict[str, torch.Tensor]):
    """Stock HF: full head, labels -100 everywhere except the labelled masked positions."""
    labels = torch.full_like(batch["input_ids"], -100)
    for i in range(labels.shape[0]):
        for pos, tok, w in zip(batch["masked_lm_positions"][i].tolist(), batch["masked_lm_ids"][i].tolist(),
                               batch["masked_lm_weights"][i].tolist()):
            if w > 0:
                labels[i, pos] = tok
    out = model(input_ids=batch["input_ids"], attention_mask=batch["input_mask"],
                token_type_ids=batch["segment_ids"], labels=labels,
                next_sentence_label=batch["next_sentence_labels"])
    mlm = torch.nn.functional.cross_entropy(out.prediction_logits.reshape(-1, VOCAB), labels.reshape(-1))
    nsp = torch.nn.functional.cross_entropy(out.seq_relationship_logits, batch["next_sentence_labels"])
    return out, mlm, nsp


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_gathered_head_equals_hf_losses_and_gradients(attn):
    torch.manual_seed(0)
    ours = build_pretraining_model(tiny_config(), attn_implementation=attn).eval()
    hf = transformers.BertForPreTraining(tiny_config()).eval()
    hf.load_state_dict(ours.state_dict())
    batch = make_batch(4, seed=1)

    out = ours(batch)
    hf_out, hf_mlm, hf_nsp = hf_losses(hf, batch)
    assert abs(out.mlm_loss.item() - hf_mlm.item()) < 1e-5
    assert abs(out.nsp_loss.item() - hf_nsp.item()) < 1e-5
    assert abs(out.loss.item() - hf_out.loss.item()) < 1e-5
    out.loss.backward()
    hf_out.loss.backward()
    ours_g, hf_g = grads(ours), grads(hf)
    assert ours_g.keys() == hf_g.keys() and len(ours_g) > 20
    for name in hf_g:
        torch.testing.assert_close(ours_g[name], hf_g[name], rtol=1e-4, atol=1e-6, msg=name)

    # Counts and accuracies come from the same labelled positions HF scores.
    real = batch["masked_lm_weights"] > 0
    assert out.num_masked.item() == real.sum().item()
    assert out.num_sequences.item() == 4 and out.num_tokens.item() == batch["input_mask"].sum().item()
    rows = torch.arange(4).unsqueeze(1).expand_as(real)[real]
    predicted = hf_out.prediction_logits[rows, batch["masked_lm_positions"][real]].argmax(-1)
    expected_acc = (predicted == batch["masked_lm_ids"][real]).float().mean().item()
    assert out.mlm_acc.item() == pytest.approx(expected_acc)
    nsp_acc = (hf_out.seq_relationship_logits.argmax(-1) == batch["next_sentence_labels"]).float().mean()
    assert out.nsp_acc.item() == pytest.approx(nsp_acc.item())


def test_reference_forward_agrees_and_padding_slots_cost_nothing():
    torch.manual_seed(0)
    model = build_pretraining_model(tiny_config()).eval()
    batch = make_batch(3, seed=2)
    fast, ref = model(batch), model.reference_forward(batch)
    for field in ("loss", "mlm_loss", "nsp_loss", "mlm_acc", "nsp_acc", "num_masked"):
        torch.testing.assert_close(getattr(fast, field), getattr(ref, field), msg=field)
    # Label 0 marks a padding slot even without weights; changing a padding slot's position
    # must not change the loss (it is never gathered).
    no_weights = {k: v for k, v in batch.items() if k != "masked_lm_weights"}
    assert torch.equal(labelled_slots(no_weights), labelled_slots(batch))
    moved = dict(no_weights, masked_lm_positions=batch["masked_lm_positions"].clone())
    moved["masked_lm_positions"][~labelled_slots(batch)] = 7
    assert model(moved).loss.item() == fast.loss.item()


def test_batch_without_labelled_positions_gives_zero_mlm_loss():
    model = build_pretraining_model(tiny_config()).eval()
    out = model(make_batch(2, seed=3, labelled=[0, 0]))
    assert out.num_masked.item() == 0 and out.mlm_loss.item() == 0.0 and out.mlm_acc.item() == 0.0
    assert torch.isfinite(out.loss)


def test_missing_feature_is_a_clear_error():
    model = build_pretraining_model(tiny_config())
    batch = make_batch(2, seed=4)
    del batch["segment_ids"]
    with pytest.raises(ValueError, match="segment_ids"):
        model(batch)


def test_save_pretrained_loads_into_stock_bert_for_pretraining(tmp_path):
    torch.manual_seed(0)
    model = build_pretraining_model(tiny_config()).eval()
    model.save_pretrained(tmp_path)
    loaded, info = transformers.BertForPreTraining.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert type(loaded) is transformers.BertForPreTraining
    assert loaded.config.architectures == ["BertForPreTraining"]
    assert loaded.config.layer_norm_eps == 1e-3
    loaded.eval()
    batch = make_batch(3, seed=5)
    hf_out, hf_mlm, hf_nsp = hf_losses(loaded, batch)
    ours = model(batch)
    assert abs(ours.mlm_loss.item() - hf_mlm.item()) < 1e-5
    assert abs(ours.nsp_loss.item() - hf_nsp.item()) < 1e-5
    ref = transformers.BertForPreTraining.forward(model, input_ids=batch["input_ids"],
                                                  attention_mask=batch["input_mask"],
                                                  token_type_ids=batch["segment_ids"])
    torch.testing.assert_close(ref.prediction_logits, hf_out.prediction_logits)
    # Tying survives the round trip in both directions.
    assert loaded.cls.predictions.decoder.weight is loaded.bert.embeddings.word_embeddings.weight
    back = GatheredBertForPreTraining.from_pretrained(tmp_path).eval()
    assert back(batch).loss.item() == pytest.approx(ours.loss.item(), abs=1e-6)


def test_truncated_normal_init_and_config_knobs():
    torch.manual_seed(0)
    config = tiny_config(vocab_size=1000, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.0)
    model = build_pretraining_model(config)
    std = config.initializer_range
    emb = model.bert.embeddings.word_embeddings.weight.detach()
    assert emb[config.pad_token_id].abs().max() == 0  # HF zeroes the padding row
    body = emb[1:]
    assert body.abs().max() <= 2 * std
    # A normal truncated at +-2 std has std 0.8796 x sigma (TF BERT's initializer).
    assert body.std().item() == pytest.approx(0.8796 * std, rel=0.03)
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            assert p.abs().max() == 0, name
        elif "LayerNorm" in name:
            assert torch.all(p == 1), name
        else:
            assert p.abs().max() <= 2 * std and p.std() > 0.5 * std, name
    assert all(m.eps == 1e-3 for m in model.modules() if isinstance(m, torch.nn.LayerNorm))
    attention = [m.attention.self.dropout.p for m in model.bert.encoder.layer]
    assert attention == [0.0, 0.0]
    other = {m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)} - {0.0}
    assert other == {0.1}


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    plain = build_pretraining_model(tiny_config()).train()
    ckpt = build_pretraining_model(tiny_config(), activation_checkpointing=True).train()
    ckpt.load_state_dict(plain.state_dict())
    assert ckpt.bert.encoder.layer[0].gradient_checkpointing
    batch = make_batch(3, seed=6)
    plain(batch).loss.backward()
    ckpt(batch).loss.backward()
    g1, g2 = grads(plain), grads(ckpt)
    for name in g1:
        torch.testing.assert_close(g1[name], g2[name], rtol=1e-5, atol=1e-7, msg=name)


def test_accumulated_micro_batches_equal_one_big_batch():
    """k micro-batches, each loss divided by the whole step's counts, summed grads == the big
    batch's mean-loss grads. Micro-batches have different label counts (3+1, 5+5, 2+4)."""
    torch.manual_seed(0)
    model = build_pretraining_model(tiny_config()).train()  # dropout is 0 in tiny_config
    big = make_batch(6, seed=7, labelled=[3, 1, 5, 5, 2, 4])
    micro = [{k: v[i:i + 2] for k, v in big.items()} for i in range(0, 6, 2)]

    out_big = model(big)
    out_big.loss.backward()
    expected = grads(model)
    model.zero_grad()

    num_masked = sum(int(labelled_slots(b).sum()) for b in micro)
    num_sequences = sum(len(b["input_ids"]) for b in micro)
    step_loss = 0.0
    for b in micro:
        out = model(b, mlm_normalizer=num_masked, nsp_normalizer=num_sequences)
        out.loss.backward()
        step_loss += out.loss.item()
    got = grads(model)
    assert step_loss == pytest.approx(out_big.loss.item(), abs=1e-6)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-7, msg=name)

    # The premise: averaging per-micro-batch means would NOT be exact with these counts.
    model.zero_grad()
    for b in micro:
        (model(b).loss / len(micro)).backward()
    naive = grads(model)
    worst = max((naive[n] - expected[n]).abs().max().item() for n in expected)
    assert worst > 1e-4


def test_bf16_autocast_forward_is_close_to_fp32():
    torch.manual_seed(0)
    model = build_pretraining_model(tiny_config()).eval()
    batch = make_batch(3, seed=8)
    fp32 = model(batch).loss.item()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = model(batch)
    assert bf16.loss.dtype == torch.float32
    assert bf16.loss.item() == pytest.approx(fp32, rel=2e-2)


def decoder_inputs(rows: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 32, generator=g, requires_grad=True)
    weight = (torch.randn(VOCAB, 32, generator=g) * 0.3).requires_grad_()
    bias = (torch.randn(VOCAB, generator=g) * 0.1).requires_grad_()
    labels = torch.randint(0, VOCAB, (rows,), generator=g)
    return x, weight, bias, labels


@pytest.mark.parametrize("chunk_rows", [4, 1000])  # 11 rows: 3 chunks (last one short), or one
def test_fused_decoder_cross_entropy_equals_linear_plus_cross_entropy(monkeypatch, chunk_rows):
    monkeypatch.setattr(bert_module, "DECODER_CHUNK_ROWS", chunk_rows)
    x, weight, bias, labels = decoder_inputs(11, seed=9)
    logits = torch.nn.functional.linear(x, weight, bias)
    labels[:4] = logits.argmax(-1)[:4]  # some hits, so the count is not trivially 0
    expected = torch.nn.functional.cross_entropy(logits, labels, reduction="sum")
    (expected * 0.37).backward()  # a non-unit upstream gradient must scale the stored gradients
    want = [t.grad.clone() for t in (x, weight, bias)]
    for t in (x, weight, bias):
        t.grad = None
    got, correct = decoder_cross_entropy(x, weight, bias, labels)
    assert correct.item() == (logits.argmax(-1) == labels).sum().item() >= 4
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-5)
    (got * 0.37).backward()
    for name, t, w in zip(("x", "weight", "bias"), (x, weight, bias), want):
        torch.testing.assert_close(t.grad, w, rtol=1e-5, atol=1e-7, msg=name)


def test_fused_decoder_cross_entropy_without_grad_and_under_bf16():
    x, weight, bias, labels = decoder_inputs(6, seed=10)
    with torch.no_grad():
        plain, _ = decoder_cross_entropy(x, weight, bias, labels)
    assert not plain.requires_grad
    expected = torch.nn.functional.cross_entropy(torch.nn.functional.linear(x, weight, bias), labels,
                                                 reduction="sum")
    assert plain.item() == pytest.approx(expected.item(), rel=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        stock_logits = torch.nn.functional.linear(x, weight, bias)
        fused, _ = decoder_cross_entropy(x, weight, bias, labels)
    assert stock_logits.dtype == torch.bfloat16 and fused.dtype == torch.float32
    stock = torch.nn.functional.cross_entropy(stock_logits.float(), labels, reduction="sum")
    # Same bf16 matmul as the stock Linear under autocast, so closer than bf16 vs fp32 (~1e-2).
    assert fused.item() == pytest.approx(stock.item(), rel=1e-3)
    fused.backward()
    assert weight.grad.dtype == torch.float32 and x.grad.dtype == torch.float32


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_sparse_last_layer_equals_the_full_encoder(attn, monkeypatch):
    """Last layer at [CLS] + masked rows only == whole sequence then gather: losses, grads."""
    torch.manual_seed(0)
    model = build_pretraining_model(tiny_config(num_hidden_layers=3), attn_implementation=attn)
    batch = make_batch(4, seed=11)
    results = {}
    for sparse in (True, False):
        monkeypatch.setattr(GatheredBertForPreTraining, "sparse_last_layer", sparse)
        model.zero_grad(set_to_none=True)
        out = model(batch)
        out.loss.backward()
        results[sparse] = (out, grads(model))
    (fast, fast_grads), (full, full_grads) = results[True], results[False]
    for name in ("loss", "mlm_loss", "nsp_loss", "mlm_acc", "nsp_acc"):
        torch.testing.assert_close(getattr(fast, name), getattr(full, name), atol=1e-5, rtol=1e-5)
    assert fast_grads.keys() == full_grads.keys()
    for name, grad in fast_grads.items():
        torch.testing.assert_close(grad, full_grads[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("sparse", [True, False])
def test_static_slots_equal_the_selected_slots(sparse, monkeypatch):
    """The fixed-shape path for torch.compile (every slot through the decoder, unlabelled ones
    weighted out) == selecting the labelled slots: losses, counts and gradients."""
    torch.manual_seed(0)
    model = build_pretraining_model(tiny_config())
    batch = make_batch(4, seed=12, labelled=[1, 3, SLOTS, 2])  # unlabelled slots in 3 rows
    monkeypatch.setattr(GatheredBertForPreTraining, "sparse_last_layer", sparse)
    results = {}
    for static in (True, False):
        monkeypatch.setattr(GatheredBertForPreTraining, "static_slots", static)
        model.zero_grad(set_to_none=True)
        out = model(batch)
        out.loss.backward()
        results[static] = (out, grads(model))
    (fixed, fixed_grads), (selected, selected_grads) = results[True], results[False]
    for name in ("loss", "mlm_loss", "mlm_acc", "num_masked", "num_mlm_correct"):
        torch.testing.assert_close(getattr(fixed, name), getattr(selected, name),
                                   atol=1e-6, rtol=1e-6)
    for name, grad in selected_grads.items():
        torch.testing.assert_close(fixed_grads[name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_compiled_model_does_not_recompile_when_the_label_count_changes():
    import torch._dynamo
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = build_pretraining_model(tiny_config())
    compiled = torch.compile(model)
    compiled(make_batch(4, seed=1, labelled=[1, 2, 3, 4])).loss.backward()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for seed, labelled in ((2, [SLOTS, 1, 1, 2]), (3, [2, 2, 2, 2])):
            out = compiled(make_batch(4, seed=seed, labelled=labelled))
            out.loss.backward()
            assert out.num_masked.item() == sum(labelled)
    torch._dynamo.reset()


def test_mlm_bias_starts_at_the_unigram_prior():
    from bertforge.model.bert import init_mlm_bias
    model = build_pretraining_model(tiny_config(vocab_size=50))
    counts = torch.zeros(50, dtype=torch.long)
    counts[7], counts[3] = 97, 1
    init_mlm_bias(model, counts)
    # add-one smoothing: 98 / 148, 2 / 148, 1 / 148 for the other 48 ids
    probs = torch.softmax(model.cls.predictions.bias.double(), 0)
    assert probs[7].item() == pytest.approx(98 / 148) and probs[3].item() == pytest.approx(2 / 148)
    assert probs[0].item() == pytest.approx(1 / 148)
    assert model.cls.predictions.decoder.bias is model.cls.predictions.bias  # one tied tensor
    with pytest.raises(ValueError, match="label counts of 49 tokens for a vocab of 50"):
        init_mlm_bias(model, counts[:49])
