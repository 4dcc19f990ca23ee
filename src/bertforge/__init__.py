"""bertforge: BERT pre-training (MLM + NSP) and SQuAD fine-tuning on CPUs and NVIDIA GPUs.

Layout (imports point down only): cli + config -> recipes (data stages, the pre-training and
SQuAD tasks, serving) -> the training engine -> model, rows and file formats.
docs/architecture.md describes the layers; README.md lists every file.
"""

__version__ = "0.1.0"
