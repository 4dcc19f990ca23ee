"""Moved: the pre-training task is train/pretraining.py, its loop the engine (train/engine.py).
Kept only while the CLI still imports from here; removed once it imports pretraining."""

from bertforge.train.pretraining import data_packing_factor, init_mlm_prior, pretrain  # noqa: F401
