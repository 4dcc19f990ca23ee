"""SQuAD v1.1/v2.0: examples (data), windows (features), fine-tuning (finetune), answers
(postprocess) and the official exact-match/F1 (metric)."""
