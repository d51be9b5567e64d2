"""ddp-trainer: a small DistributedDataParallel trainer for torchrun, srun and single-process runs."""

__version__ = "0.1.0"
