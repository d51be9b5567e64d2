"""Random number generators: seeding, and their state as tensors a weights_only checkpoint can hold."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

# What a mixed seed is for: each use hashes a tuple of its own length, as SeedSequence drops a tuple's trailing zeros.
RANK_STREAMS, SAMPLE_AUGMENTATION, RESEEDED_RANK = 1, 2, 3


def mixed_seed(use: int, *numbers: int) -> int:
    """A 32-bit seed for `use` hashed from `numbers` (the run's seed first): other tuples give unrelated streams.

    torch's CPU generator and NumPy keep 32 bits of a seed. A sum mixed runs up: `seed + rank` made rank 1 of seed 0
    rank 0 of seed 1, and a multiply-add of (epoch, index) gave a sample a million on its predecessor's seed.
    """
    return int(np.random.SeedSequence((use, *numbers)).generate_state(1)[0])


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) RNGs."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture() -> dict[str, Any]:
    """This process's Python, NumPy, torch and (its current GPU's) CUDA RNG states, as weights_only-safe types."""
    state = _capture_host()
    # Only this process's GPU, as a resumed rank may see other GPUs (or none); a CPU run never initialised CUDA.
    if torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _capture_host() -> dict[str, Any]:
    """The Python, NumPy and torch CPU streams, as weights_only-safe types."""
    _, keys, position, has_gauss, gauss = np.random.get_state(legacy=True)
    return {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": position, "has_gauss": has_gauss},
        "numpy_gauss": gauss,
        "torch": torch.get_rng_state(),
    }


def restore(state: dict[str, Any], cuda_seed: int) -> None:
    """Put back what `capture` returned, so random draws continue exactly where they stopped.

    A state without a GPU stream (a CPU run's) seeds this GPU's from `cuda_seed`: left as the start seeded it, it
    would replay the run's first dropout masks.
    """
    _restore_host(state)
    # Onto the current device, which setup() chose; a CPU run resuming a GPU checkpoint must not start CUDA for it.
    if torch.cuda.is_initialized():
        if "cuda" in state:
            torch.cuda.set_rng_state(state["cuda"])
        else:
            torch.cuda.manual_seed(cuda_seed)


def capture_process() -> dict[str, Any]:
    """Every stream of this process, each GPU's included: what a caller of fit() had, to put back after it."""
    return {**_capture_host(), "cuda_all": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None}


def restore_process(state: dict[str, Any]) -> None:
    """Put back what `capture_process` returned; GPU streams it found unstarted are left as a fresh process has them."""
    _restore_host(state)
    if state["cuda_all"] is not None:
        torch.cuda.set_rng_state_all(state["cuda_all"])  # each to its own GPU, whichever is current now
    elif torch.cuda.is_initialized():
        # A new generator's seed is the one each GPU's starts from unseeded (c10's default_rng_seed_val).
        torch.cuda.manual_seed_all(torch.Generator().initial_seed())


def _restore_host(state: dict[str, Any]) -> None:
    """Put back the Python, NumPy and torch CPU streams of a `capture`."""
    random.setstate(state["python"])
    numpy = state["numpy"]
    keys = numpy["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, numpy["pos"], numpy["has_gauss"], state["numpy_gauss"]))
    torch.set_rng_state(state["torch"])


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block with Python, NumPy and torch (CPU) seeded by `seed`, leaving the streams as they were after it."""
    host = _capture_host()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.default_generator.manual_seed(seed)  # not torch.manual_seed: that reseeds every GPU's stream (dropout) too
    try:
        yield
    finally:
        _restore_host(host)
