"""SQuAD v1.1/v2.0: examples (data.py), windows (features.py), windows in the row layout and
their logits (forward.py), the fine-tuning task on the training engine (finetune.py), its
config sections (config.py), answers (postprocess.py) and the official exact-match/F1
(metric.py)."""
