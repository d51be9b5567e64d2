"""`python -m fault_entry ARGS`: ddp-train, except rank 0 of the first attempt dies half-way through a checkpoint write.

The write is real: half of the serialised checkpoint reaches the temporary file, then the process gets SIGKILL,
as a node failure or the OOM killer would deliver it. A single process (no RANK) counts as rank 0; with
checkpoint.async_save=true the kill lands in the background writer thread while training goes on.
"""

from __future__ import annotations

import io
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

import torch

from ddp_trainer.cli import train


def dying_save(real_save: Callable[..., None], kill_at: int) -> Callable[..., None]:
    """torch.save that writes `kill_at - 1` checkpoint files, then half of the next one, and kills this process."""
    saves = 0

    def save(state: Any, file: Any, *args: Any, **kwargs: Any) -> None:
        nonlocal saves
        if isinstance(file, io.BytesIO):  # all_gather_object serialises into memory with torch.save
            return real_save(state, file, *args, **kwargs)
        saves += 1
        if saves < kill_at:
            return real_save(state, file, *args, **kwargs)
        buffer = io.BytesIO()
        real_save(state, buffer, *args, **kwargs)
        file.write(buffer.getvalue()[: buffer.tell() // 2])
        file.flush()  # into the page cache, which outlives the process
        os.kill(os.getpid(), signal.SIGKILL)
        return None

    return save


if __name__ == "__main__":
    if os.environ.get("RANK", "0") == "0" and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
        torch.save = dying_save(torch.save, int(os.environ["KILL_AT_SAVE"]))
    sys.exit(train.main())
