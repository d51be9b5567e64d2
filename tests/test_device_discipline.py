"""What a CPU run cannot see by itself: host syncs in the step, and the loader's tensors used after the device copy.

On a GPU, each `.item()`/`bool()`/`.tolist()` of a device tensor stalls the host until the GPU has caught up, and a
loader tensor that reaches a device computation is a crash ("found at least two devices"). On the CPU both run
fine, so these tests count and trace them instead.
"""

from __future__ import annotations

import traceback
from collections import Counter
from collections.abc import Iterator

import pytest
import torch
from conftest import read_metrics
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ddp_trainer import data, evaluation, trainer
from ddp_trainer.cli.train import main

# Tensor methods that wait for the device when the tensor lives on a GPU.
SYNCING_METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__")
DIGITS = ["--config", "configs/digits_mlp.yaml", "trainer.device=cpu", "model.hidden_sizes=[32]"]


def first_project_frame() -> str:
    """file:line of the innermost ddp_trainer frame that led to a call: where the sync is asked for."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        if "/ddp_trainer/" in frame.filename:
            return f"{frame.filename.rsplit('/', 2)[-1]}:{frame.lineno} {frame.line}"
    return "outside ddp_trainer"


@pytest.fixture
def host_syncs(monkeypatch) -> Iterator[Counter]:
    """Counts every call of a syncing Tensor method, by the ddp_trainer line that led to it."""
    calls: Counter = Counter()

    def counting(name: str):  # noqa: ANN202 - wraps Tensor methods of different signatures
        original = getattr(torch.Tensor, name)

        def method(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
            calls[first_project_frame()] += 1
            return original(self, *args, **kwargs)

        return method

    for name in SYNCING_METHODS:
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    yield calls


@pytest.mark.parametrize(
    "features",
    [
        [],
        ["trainer.grad_clip_norm=1.0", "trainer.accumulate_grad_batches=2", "trainer.nonfinite_loss=skip"],
        ["trainer.precision=fp16", "trainer.grad_clip_norm=1.0", "optim.name=sgd"],
    ],
    ids=["plain", "clip-accumulate-skip", "fp16-sgd"],
)
def test_host_syncs_stay_within_one_per_log_interval_plus_a_few_per_epoch(tmp_path, host_syncs, features):
    epochs, log_every = 3, 10
    args = [*DIGITS, *features, f"trainer.epochs={epochs}", f"trainer.log_every_n_steps={log_every}"]
    assert main([*args, f"output_dir={tmp_path}"]) == 0
    steps = read_metrics(tmp_path)[-1]["step"]
    assert steps >= 60  # enough steps that one sync per step could not hide under the allowance
    # Per epoch: its end and validation (one reduce each), the sampler's order, the checkpoints (fp16 reads its scale).
    allowed = steps // log_every + 8 * epochs + 8
    assert sum(host_syncs.values()) <= allowed, host_syncs.most_common(5)


class LoaderTensorTrace(TorchDispatchMode):
    """Records any operation on a tensor the loader produced after it was handed to the device copy."""

    def __init__(self) -> None:
        super().__init__()
        self.moved: list[torch.Tensor] = []  # kept alive so no later tensor reuses their memory
        self.pointers: set[int] = set()
        self.misuses: Counter = Counter()

    def retire(self, *tensors: torch.Tensor) -> None:
        """From now on `tensors` stand for host memory: no device computation may read them."""
        for tensor in tensors:
            if tensor.numel():
                self.moved.append(tensor)
                self.pointers.add(tensor.untyped_storage().data_ptr())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 - torch's protocol
        kwargs = kwargs or {}
        for leaf in tree_leaves((args, kwargs)):
            if isinstance(leaf, torch.Tensor) and leaf.numel() and leaf.untyped_storage().data_ptr() in self.pointers:
                self.misuses[f"{func} at {first_project_frame()}"] += 1
        return func(*args, **kwargs)


def test_training_and_evaluation_use_only_the_device_copies_of_a_batch(tmp_path, monkeypatch):
    trace = LoaderTensorTrace()
    original = data.to_device

    def copying_to_device(batch, device, channels_last):  # noqa: ANN001, ANN202
        # On the CPU `.to(cpu)` returns the same tensor; a copy stands in for the GPU's, so a use of the
        # loader's own tensor after this point is told apart from a use of the copy.
        inputs, targets = batch
        moved = original((inputs.clone(), targets.clone()), device, channels_last)
        trace.retire(inputs, targets)
        return moved

    for module in (trainer, evaluation):
        monkeypatch.setattr(module, "to_device", copying_to_device)
    args = [*DIGITS, "trainer.epochs=1", "trainer.grad_clip_norm=1.0", f"output_dir={tmp_path}"]
    with trace:
        assert main(args) == 0
    assert len(trace.moved) > 40  # every training and validation batch went through the copy
    assert not trace.misuses, trace.misuses.most_common(5)
