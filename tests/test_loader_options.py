"""DataLoader settings: pinned memory, persistent workers, prefetching and their defaults; a stream's shuffle buffer."""

from __future__ import annotations

import numpy as np
import torch

from ddp_trainer import config, data
from ddp_trainer.distributed import DistEnv

CPU = DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), backend=None)
CUDA = DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cuda"), backend=None)


def loaders(env: DistEnv, *overrides: str) -> data.DataBundle:
    cfg = config.load(None, ["data._target_=factories.blobs", *overrides])
    return data.build_loaders(*data.build_datasets(cfg.data, env, cfg.seed), cfg.data, env, cfg.seed)


def test_defaults_pin_memory_on_cuda_only_and_keep_workers_alive():
    assert not loaders(CPU).train_loader.pin_memory
    assert loaders(CUDA).train_loader.pin_memory  # building a loader does not touch the GPU
    bundle = loaders(CPU, "data.num_workers=2")
    assert bundle.train_loader.persistent_workers and bundle.val_loader.persistent_workers
    assert bundle.train_loader.prefetch_factor == 2


def test_loader_settings_come_from_the_config():
    bundle = loaders(CUDA, "data.num_workers=2", "data.pin_memory=false", "data.persistent_workers=false",
                     "data.prefetch_factor=4")  # fmt: skip
    for loader in (bundle.train_loader, bundle.val_loader):
        assert not loader.pin_memory and not loader.persistent_workers and loader.prefetch_factor == 4
    assert loaders(CPU, "data.pin_memory=true").train_loader.pin_memory


def test_without_workers_there_is_nothing_to_prefetch_or_keep_alive():
    loader = loaders(CPU, "data.num_workers=0", "data.prefetch_factor=4").train_loader
    assert loader.prefetch_factor is None and not loader.persistent_workers


def test_a_stream_takes_its_shuffle_buffer_from_the_config(tmp_path):
    for split in ("train", "val"):
        (tmp_path / split).mkdir()
        np.savez(tmp_path / split / "part-0.npz", x=np.zeros((16, 4), np.float32), y=np.zeros(16, np.int64))
    cfg = config.load(None, ["data.name=stream", f"data.root={tmp_path}", "data.stream.shuffle_buffer=8"])
    train, val = data.build_datasets(cfg.data, CPU, cfg.seed)
    assert (train.shuffle, train.shuffle_buffer) == (True, 8)
    assert not val.shuffle  # validation reads its records in order
