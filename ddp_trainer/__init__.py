"""ddp-trainer: a small DistributedDataParallel trainer for torchrun, srun and single-process runs."""

from typing import Any

__all__ = ["fit"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """`ddp_trainer.fit`, imported on first use: the launcher and the doctor import this package without torch."""
    if name == "fit":
        from ddp_trainer.api import fit

        return fit
    raise AttributeError(f"module 'ddp_trainer' has no attribute {name!r}")
