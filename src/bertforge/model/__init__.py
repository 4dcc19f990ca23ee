"""BERT models: bert.py holds the pre-training model (HF BertForPreTraining weights, MLM head
gathered at the masked positions) and its construction (truncated-normal init, activation
checkpointing). Kept import-free so `bertforge --help` does not pay for torch/transformers."""
