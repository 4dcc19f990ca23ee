"""Pre-training engine: optim.py (AdamW, LAMB, LAMBNoBiasCorrection and the reference's
parameter groups), schedule.py (constant / linear LR with warmup), and the training loop,
checkpoints, distributed setup and metrics beside them. Kept import-free so CLI start-up
stays fast; import the submodules directly."""
