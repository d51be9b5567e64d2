"""ddp-trainer: a small DistributedDataParallel trainer for torchrun, srun and single-process runs."""

import os
from typing import Any

__all__ = ["fit"]
__version__ = "0.1.0"

# (this process, the one that started it), read before torch's imports take seconds: a torchrun SIGKILLed meanwhile
# has already left its ranks to PID 1, where stop_when_orphaned could no longer tell that it had a launcher.
STARTED_BY = (os.getpid(), os.getppid())


def __getattr__(name: str) -> Any:
    """`ddp_trainer.fit`, imported on first use: the launcher and the doctor import this package without torch."""
    if name == "fit":
        from ddp_trainer.api import fit

        return fit
    raise AttributeError(f"module 'ddp_trainer' has no attribute {name!r}")
