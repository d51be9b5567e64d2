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
from pathlib import Path
from typing import IO, Any

import torch

from ddp_trainer import atomic
from ddp_trainer.cli import train


def dying_save(real_save: Callable[[dict[str, Any], Path], None], kill_at: int) -> Callable[..., None]:
    """atomic.save_atomic writing `kill_at - 1` checkpoint files, then half of the next one, and killing itself."""
    saves = 0

    def save(state: dict[str, Any], path: Path) -> None:
        nonlocal saves
        saves += 1
        if saves < kill_at:
            return real_save(state, path)

        def write_half_and_die(file: IO[bytes]) -> None:
            buffer = io.BytesIO()
            torch.save(state, buffer)
            file.write(buffer.getvalue()[: buffer.tell() // 2])
            file.flush()  # into the page cache, which outlives the process
            os.kill(os.getpid(), signal.SIGKILL)

        atomic.write_atomic(path, write_half_and_die)
        return None

    return save


if __name__ == "__main__":
    if os.environ.get("RANK", "0") == "0" and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
        atomic.save_atomic = dying_save(atomic.save_atomic, int(os.environ["KILL_AT_SAVE"]))
    sys.exit(train.main())
