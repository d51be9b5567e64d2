"""`python -m fault_entry ARGS`: ddp-train, except rank 0 of the first attempt dies half-way through a checkpoint write
(KILL_AT_SAVE=K: the K-th file) or just before a checkpoint's K-th further name is linked (KILL_AT_LINK=K).

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


def dying_link(real_link: Callable[[Path, Path], None], kill_at: int) -> Callable[[Path, Path], None]:
    """atomic.link_atomic making `kill_at - 1` links, then killing itself before the next one."""
    links = 0

    def link(source: Path, target: Path) -> None:
        nonlocal links
        links += 1
        if links == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        real_link(source, target)

    return link


if __name__ == "__main__":
    if os.environ.get("RANK", "0") == "0" and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
        if "KILL_AT_SAVE" in os.environ:
            atomic.save_atomic = dying_save(atomic.save_atomic, int(os.environ["KILL_AT_SAVE"]))
        if "KILL_AT_LINK" in os.environ:
            atomic.link_atomic = dying_link(atomic.link_atomic, int(os.environ["KILL_AT_LINK"]))
    sys.exit(train.main())
