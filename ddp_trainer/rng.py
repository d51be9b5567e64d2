"""Random number generators: seeding, and their state as tensors a weights_only checkpoint can hold."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) RNGs."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture() -> dict[str, Any]:
    """This process's Python, NumPy, torch and (its current GPU's) CUDA RNG states, as weights_only-safe types."""
    _, keys, position, has_gauss, gauss = np.random.get_state(legacy=True)
    state = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": position, "has_gauss": has_gauss},
        "numpy_gauss": gauss,
        "torch": torch.get_rng_state(),
    }
    # Only this process's GPU, as a resumed rank may see other GPUs (or none); a CPU run never initialised CUDA.
    if torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore(state: dict[str, Any]) -> None:
    """Put back what `capture` returned, so random draws continue exactly where they stopped."""
    random.setstate(state["python"])
    numpy = state["numpy"]
    keys = numpy["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, numpy["pos"], numpy["has_gauss"], state["numpy_gauss"]))
    torch.set_rng_state(state["torch"])
    # Onto the current device, which setup() chose; a CPU run resuming a GPU checkpoint must not start CUDA for it.
    if "cuda" in state and torch.cuda.is_initialized():
        torch.cuda.set_rng_state(state["cuda"])


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block with Python, NumPy and torch (CPU) seeded by `seed`, leaving the streams as they were after it."""
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.default_generator.manual_seed(seed)  # not torch.manual_seed: that reseeds every GPU's stream (dropout) too
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
