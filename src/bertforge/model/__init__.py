"""BERT models: bert.py holds the pre-training model (HF BertForPreTraining weights, one
forward path over the row layout, MLM head only at the masked positions), its construction
(truncated-normal init, MLM bias at the data's prior, activation checkpointing) and
`bert_config` (a config's model section as a transformers.BertConfig); attention.py adds
variable-length flash attention. Kept import-free so `bertforge --help` does not pay for
torch/transformers."""
