"""Models: the tutorials' MLP and LeNet-style CNN, torchvision models by name, or a user factory."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.data import Dataset

from ddp_trainer import data
from ddp_trainer.config import GIVEN, ModelConfig, locate
from ddp_trainer.distributed import DistEnv
from ddp_trainer.errors import UsageError, first_line, sized_by


def mlp(input_shape: tuple[int, ...], hidden_sizes: list[int], num_classes: int, dropout: float) -> nn.Sequential:
    """Flatten -> (Linear, ReLU[, Dropout]) per hidden size -> Linear: the FashionMNIST tutorial's, Dropout moved."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = math.prod(input_shape)
    for hidden in hidden_sizes:
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        width = hidden
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


class GarmentClassifier(nn.Module):
    """The tutorial's LeNet-5 variant: two conv/pool stages, then three linear layers."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        if len(input_shape) != 3:
            raise UsageError(f"model.name=cnn needs images shaped (channels, height, width), got {input_shape}")
        channels, height, width = input_shape
        if min(height, width) < 16:
            raise UsageError(f"model.name=cnn needs inputs of at least 16x16, the data gives {height}x{width}")
        out_height, out_width = ((height - 4) // 2 - 4) // 2, ((width - 4) // 2 - 4) // 2
        self.features = nn.Sequential(
            nn.Conv2d(channels, 6, 5), nn.ReLU(), nn.MaxPool2d(2, 2),
            nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2, 2),
        )  # fmt: skip
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(16 * out_height * out_width, 120), nn.ReLU(),
            nn.Linear(120, 84), nn.ReLU(),
            nn.Linear(84, num_classes),
        )  # fmt: skip

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits for a batch of images."""
        return self.classifier(self.features(images))


def unused_mlp_keys(cfg: ModelConfig) -> str | None:
    """A note naming the MLP's keys set for another built-in model, which builds without them; None if none are."""
    if cfg._target_ is not None or cfg.name in ("mlp", GIVEN):
        return None
    defaults = ModelConfig()
    unused = [
        f"model.{key}={getattr(cfg, key)}"
        for key in ("hidden_sizes", "dropout")
        if getattr(cfg, key) != getattr(defaults, key)
    ]
    return f"{', '.join(unused)}: the mlp's, unused by model.name={cfg.name}" if unused else None


def build_for(cfg: ModelConfig, train_set: Dataset, val_set: Dataset | None) -> nn.Module:
    """`build` for these datasets: a built-in model is sized from one sample and takes their class count."""
    # The validation split's sample: reading it draws no random numbers (no augmentation). A factory needs none.
    split, sized_from = ("training", train_set) if val_set is None else ("validation", val_set)
    shape = () if cfg._target_ is not None else data.sample_shape(sized_from, split)
    return build(cfg, shape, data.class_count(train_set))


def build(cfg: ModelConfig, input_shape: tuple[int, ...], dataset_classes: int | None) -> nn.Module:
    """Build the configured model for samples of `input_shape` (on CPU; `prepare_model` moves it)."""
    if cfg._target_ is not None:
        model = locate(cfg._target_, "model._target_")(**cfg.kwargs)
        if not isinstance(model, nn.Module):
            raise UsageError(f"model._target_={cfg._target_} returned {type(model).__name__}, not an nn.Module")
        return model
    num_classes = cfg.num_classes or dataset_classes
    if num_classes is None:
        raise UsageError(
            "model.num_classes is not set and the dataset has no `classes` attribute to count (stream shards have "
            "one when their index.json lists them)"
        )
    if dataset_classes and num_classes < dataset_classes:  # labels past the last logit fail only inside the loss
        raise UsageError(f"model.num_classes={num_classes} is fewer than the {dataset_classes} classes of the data")
    # The input's size is the data's: a large sample makes a large first layer whatever the model's keys say.
    keys = ["model.hidden_sizes"] * (cfg.name == "mlp") + ["model.num_classes"] * (cfg.num_classes is not None)
    with sized_by(", ".join([*keys, f"inputs of shape {list(input_shape)}"])):
        return _built_in(cfg, input_shape, num_classes)


def _built_in(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    if cfg.name == "mlp":
        return mlp(input_shape, cfg.hidden_sizes, num_classes, cfg.dropout)
    if cfg.name == "cnn":
        return GarmentClassifier(input_shape, num_classes)
    import torchvision  # lazy: heavy, and only needed for these names

    model = torchvision.models.get_model(cfg.name, weights=None, num_classes=num_classes)
    if cfg.cifar_stem:  # a resnet: the config refuses the stem for other models
        # 32x32 inputs lose too much to the 7x7/2 conv and the max-pool; the usual CIFAR change.
        model.conv1 = nn.Conv2d(input_shape[0], 64, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")  # as ResNet inits its convs
        model.maxpool = nn.Identity()
    _check_takes(model, cfg.name, input_shape)
    return model


def _check_takes(model: nn.Module, name: str, input_shape: tuple[int, ...]) -> None:
    # A torchvision model built for other images (3 channels, a minimum size) would fail only at the first step, on
    # every rank with a traceback; one sample through it on the CPU says so here, in one line. Eval mode: batch norm
    # takes a batch of one, and no dropout draws from the RNG.
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, *input_shape))
    except (RuntimeError, ValueError, AssertionError) as error:  # torch's ops; torchvision's own checks (ViT's size)
        raise UsageError(
            f"model.name={name} does not take the data's samples of shape {input_shape}: {first_line(error)}"
        ) from None
    finally:
        model.train()


def prepare_model(model: nn.Module, cfg: ModelConfig, env: DistEnv, move: bool = True) -> nn.Module:
    """The model on this rank's device (where it is, unless `move`), in the configured memory format, with
    SyncBatchNorm if asked for."""
    lazy = [name for name, parameter in model.named_parameters() if isinstance(parameter, nn.UninitializedParameter)]
    if lazy:  # the optimizer, DDP and the checkpoint all need their shapes
        raise UsageError(
            f"the model's parameter {lazy[0]} is not initialised yet (a lazy module): run one batch through the model "
            "before training it"
        )
    if cfg.sync_batchnorm and env.distributed:
        if env.device.type == "cpu":
            raise UsageError(
                "model.sync_batchnorm=true needs GPUs: torch's SyncBatchNorm does not run on CPU (gloo); "
                "set model.sync_batchnorm=false for CPU runs"
            )
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if move:
        model = model.to(env.device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)  # conv kernels run NHWC on tensor cores
    return model
