"""The training engine and the pre-training task.

    engine.py       the one training loop: set-up, checkpoints and exact resume, precision,
                    accumulation with exact normalisers, DDP, logging, cadence
    task.py         what a recipe gives the engine (model, batches, loss, evaluation)
    pretraining.py  the MLM + NSP (or MLM-only) task and `bertforge pretrain`'s entry point
    sources.py      pre-training batches: shards, generated or synthetic data
    checkpoint.py   atomic, self-describing step checkpoints (HF format + training state)
    distributed.py  process group, DDP wrapping, no_sync, all-reduce
    precision.py    bf16 / fp16 autocast and loss scaling
    optim.py        AdamW (torch's, and the reference's AdamWNoBiasCorrection), LAMB,
                    LAMBNoBiasCorrection and the reference's parameter groups
    schedule.py     constant / linear LR with warmup
    metrics.py      the step line, JSON lines, TensorBoard, wandb
    runtime.py      seeding, the compile cache, the default run directory
Kept import-free so CLI start-up stays fast; import the submodules directly."""
