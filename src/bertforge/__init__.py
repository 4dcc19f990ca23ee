"""bertforge: BERT pre-training (MLM + NSP) and SQuAD fine-tuning on CPUs and NVIDIA GPUs.

Layout (imports point down only): cli -> recipes (data stages, train loop) -> library
(tfrecord, model, optimisers). See README.md for the two set-up commands.
"""

__version__ = "0.1.0"
