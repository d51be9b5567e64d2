"""Typed config: dataclass schema + YAML file + `key=value` overrides, strict about unknown keys."""

from __future__ import annotations

import dataclasses
import importlib
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ddp_trainer import config_sources as sources
from ddp_trainer import factory_args
from ddp_trainer.errors import UsageError
from ddp_trainer.fields import (
    SHAPE,
    Section,
    checked,
    invalid,
    is_shape,
    is_size,
    not_negative,
    one_of,
    path_field,
    positive,
    timeout,
)

# The data.name and model.name of a fit() run, whose datasets and model were Python objects: no key rebuilds them.
GIVEN = "given"
RESNETS = ("resnet", "resnext", "wide_resnet")  # torchvision's ResNet class: the models the CIFAR stem fits

# What trainer.allow_changes may name: changes a resumed run can meaningfully continue with (see changes.py).
CONTINUABLE = (
    "trainer.epochs", "trainer.max_steps", "optim.lr", "optim.min_lr", "optim.weight_decay", "optim.momentum",
    "trainer.grad_clip_norm", "trainer.nonfinite_loss", "trainer.early_stopping_patience",
    "trainer.early_stopping_min_delta", "world_size",
)  # fmt: skip
CONTINUED = ", ".join(CONTINUABLE)
# Under trainer.strategy=fsdp each module of these classes is one FSDP unit: torchvision's ResNet, ViT, ConvNeXt,
# EfficientNet, MobileNet and Swin blocks, torch's transformer layers. The root is one too (all the mlp and cnn are).
FSDP_WRAP = [
    "BasicBlock", "Bottleneck", "EncoderBlock", "CNBlock", "MBConv", "FusedMBConv", "InvertedResidual",
    "SwinTransformerBlock", "SwinTransformerBlockV2", "TransformerEncoderLayer", "TransformerDecoderLayer",
]  # fmt: skip


@dataclass
class SyntheticConfig(Section):
    """Shape of the random dataset used by `data.name=synthetic` (benchmarks, smoke tests)."""

    section = "data.synthetic"
    train_size: int = positive(2048)
    val_size: int = positive(512)
    input_shape: list[int] = checked([3, 32, 32], is_shape, SHAPE)
    num_classes: int = checked(10, lambda count: 2 <= count <= 10**6, "2 to 1000000 classes", most=10**6)


@dataclass
class StreamConfig(Section):
    """How `data.name=stream` reads shard folders `data.root/train` and `data.root/val`."""

    section = "data.stream"
    shuffle_buffer: int = positive(1000, "1 (no shuffle) or more")
    input_field: str = "x"
    label_field: str = "y"
    input_shape: list[int] | None = checked(None, lambda shape: shape is None or is_shape(shape), SHAPE)


@dataclass
class DataConfig(Section):
    """Where samples come from and how they are batched; `batch_size` is per rank."""

    section = "data"
    name: str = "digits"
    root: str = "data"
    batch_size: int = positive(64)
    num_workers: int = not_negative(0, "0 or more")
    download: bool = False
    augment: bool = True
    val_fraction: float = checked(0.2, lambda value: 0 < value < 1, "a fraction between 0 and 1")
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    stream: StreamConfig = field(default_factory=StreamConfig)
    pin_memory: bool | None = None
    persistent_workers: bool = True
    prefetch_factor: int = checked(2, lambda value: 0 < value <= 1024, "1 to 1024 batches per worker", most=1024)
    per_sample_seed: bool | None = None
    _target_: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        datasets = ("digits", "fashion_mnist", "cifar10", "synthetic", "stream")
        if self._target_ is None and self.name not in (*datasets, GIVEN):
            raise invalid("data.name", self.name, f"one of {', '.join(datasets)} or data._target_")
        super().__post_init__()


@dataclass
class ModelConfig(Section):
    """Which network to build; `num_classes` defaults to the dataset's."""

    section = "model"
    name: str = "mlp"
    hidden_sizes: list[int] = checked(
        [512, 256], lambda sizes: all(is_size(size) for size in sizes), f"positive widths, each at most {sys.maxsize}"
    )
    dropout: float = checked(0.0, lambda value: 0.0 <= value < 1.0, "a probability in [0, 1)")
    num_classes: int | None = checked(
        None, lambda value: value is None or is_size(value), "a positive count", most=sys.maxsize
    )
    cifar_stem: bool = False
    sync_batchnorm: bool = False
    channels_last: bool = False
    _target_: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self._target_ is None and self.name not in ("mlp", "cnn", GIVEN):
            import torchvision  # lazy: only needed when the name is not one of ours

            if self.name not in torchvision.models.list_models():
                raise invalid("model.name", self.name, "mlp, cnn, a torchvision model name or model._target_")
        if self._target_ is None and self.cifar_stem and not self.name.startswith(RESNETS):
            raise invalid(
                "model.cifar_stem", True, f"false: the CIFAR stem is a resnet's, not model.name={self.name}'s"
            )
        super().__post_init__()


@dataclass
class OptimConfig(Section):
    """Optimizer and learning-rate schedule (stepped once per optimizer step)."""

    section = "optim"
    name: str = one_of("adamw", ("sgd", "adamw", "adam"))
    lr: float = positive(1e-3, "a positive number")
    weight_decay: float = not_negative(0.01, "0 or more")
    momentum: float = checked(0.9, lambda value: 0.0 <= value < 1.0, "a fraction in [0, 1)")
    scheduler: str = one_of("none", ("none", "cosine", "step"))
    warmup_steps: int = not_negative(0, "0 or more")
    step_epochs: int = positive(30)
    gamma: float = checked(0.1, lambda value: 0.0 < value <= 1.0, "a factor in (0, 1]: the rate decays")
    min_lr: float = not_negative(0.0, "0 or more")


@dataclass
class TrainerConfig(Section):
    """How long and where to train, and how the run talks to the user."""

    section = "trainer"
    epochs: int = positive(10)
    max_steps: int = checked(
        -1, lambda value: value == -1 or 0 < value <= sys.maxsize, "-1 (no limit) or a positive number", sys.maxsize
    )
    device: str = one_of("auto", ("auto", "cpu", "cuda"))
    dist_backend: str = one_of("auto", ("auto", "nccl", "gloo"))
    resume: str = path_field("auto", "auto, none or a checkpoint's path")  # expanduser keeps auto and none
    log_every_n_steps: int = positive(50)
    dist_timeout_s: float = timeout(300.0)
    startup_timeout_s: float = timeout(1800.0)
    progress_bar: bool = True
    stop_check_every_n_steps: int = positive(1)
    requeue: bool = True
    nonfinite_loss: str = one_of("stop", ("stop", "skip"))
    precision: str = one_of("32", ("32", "bf16", "fp16"))
    accumulate_grad_batches: int = positive(1)
    grad_clip_norm: float = not_negative(0.0, "0 (off) or a positive norm")
    compile: bool = False
    strategy: str = one_of("ddp", ("ddp", "fsdp"))
    find_unused_parameters: bool = False
    fsdp_wrap: list[str] = checked(
        FSDP_WRAP, lambda names: all(str(name).isidentifier() for name in names), "a list of module class names"
    )
    activation_checkpointing: bool = False
    early_stopping_patience: int = not_negative(0, "0 (off) or a number of epochs")
    early_stopping_min_delta: float = not_negative(0.0, "0 or a positive improvement")
    allow_changes: list[str] = checked(
        [], lambda keys: all(key in CONTINUABLE for key in keys), f"keys among {CONTINUED}"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.strategy != "fsdp":
            if self.activation_checkpointing:  # it checkpoints the FSDP units: trainer.fsdp_wrap's blocks
                raise invalid("trainer.activation_checkpointing", True, "false unless trainer.strategy=fsdp")
            return
        # Not yet built: fp16 under FSDP needs a scaler that agrees on overflows across shards, and compile per block.
        if self.precision == "fp16":
            raise invalid("trainer.precision", self.precision, "32 or bf16 with trainer.strategy=fsdp (fp16: ddp)")
        if self.compile:
            raise invalid("trainer.compile", self.compile, "false with trainer.strategy=fsdp (compile: ddp)")


@dataclass
class CheckpointConfig(Section):
    """When checkpoints are written and which one counts as best."""

    section = "checkpoint"
    every_n_steps: int = not_negative(0, "0 (epoch end only) or more")
    every_n_minutes: float = not_negative(0.0, "0 (off) or a positive number of minutes")
    keep_last: int = not_negative(2, "0 (last.pt only) or more")
    async_save: bool = False  # `checkpoint.async` would be the name, but `async` is a Python keyword
    monitor: str | None = None
    mode: str | None = checked(None, lambda value: value in (None, "min", "max"), "min or max")


@dataclass
class WandbConfig(Section):
    """Weights & Biases: off by default; offline runs can be uploaded later with `wandb sync`."""

    section = "logging.wandb"
    mode: str = one_of("disabled", ("disabled", "offline", "online"))
    project: str = "ddp-trainer"
    name: str | None = None
    entity: str | None = None


@dataclass
class LoggingConfig:
    """Optional loggers beside metrics.jsonl and the console, all written by rank 0 only."""

    tensorboard: bool = False
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class Config(Section):
    """The whole run: one dataclass per section, mapped one to one onto the YAML file."""

    section = ""  # its own keys are top-level: `seed`, not `.seed`
    output_dir: str = path_field("runs/digits_mlp", "a folder's path")
    # In a SLURM job array each task writes to output_dir/array_task_<SLURM_ARRAY_TASK_ID>: the tasks of one sbatch
    # command never share a folder, and a requeued task resumes its own. false: output_dir as written.
    output_dir_per_array_task: bool = True
    seed: int = checked(0, lambda seed: 0 <= seed < 2**32, "0 to 2**32 - 1 (torch and NumPy seeds keep 32 bits)")
    task: str = "classification"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


def load(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Merge a YAML file and `key=value` overrides onto the schema; raise UsageError naming the bad key."""
    merged = factory_args.layered(sources.read(path), sources.parse_overrides(overrides))
    return _refusing_given(_validate(merged, written=merged))


def from_container(container: dict[str, Any], overrides: Sequence[str] = ()) -> Config:
    """A config saved by `to_container` (e.g. inside a checkpoint), with `key=value` overrides on top."""
    # The saved keys were judged when the run started (and older checkpoints kept keys that reached nothing):
    # only the overrides are keys written now.
    written = sources.parse_overrides(overrides)
    saved = OmegaConf.create(sources.literal(container))
    return _refusing_given(_validate(factory_args.layered(saved, written), written))


def load_for_objects(source: str | Path | Mapping[str, Any] | None, overrides: Sequence[str] = ()) -> Config:
    """The config of a run given its model and datasets as objects (`fit`): keys that would build them are refused.

    A fit() run's own config.yaml loads again: it names the data and the model `given`.
    """
    merged = sources.merge(sources.read(source), sources.parse_overrides(overrides))
    for section, objects in (("data", "datasets"), ("model", "model")):
        usable = factory_args.OBJECT_KEYS[section]
        for key in _written_keys(merged, section):
            if key not in usable and (key, merged[section][key]) != ("name", GIVEN):
                raise UsageError(
                    f"config key '{section}.{key}' does nothing here: fit() is given the {objects}, and only "
                    f"{', '.join(f'{section}.{name}' for name in usable)} apply"
                )
    config = _validate(merged, written=merged)
    data, model = dataclasses.replace(config.data, name=GIVEN), dataclasses.replace(config.model, name=GIVEN)
    return dataclasses.replace(config, data=data, model=model)


def _refusing_given(config: Config) -> Config:
    for section in ("data", "model"):
        if getattr(config, section).name == GIVEN:
            raise UsageError(
                f"config key '{section}.name' is {GIVEN!r}: fit() saved this config for datasets and a model given as "
                "Python objects, which no config key rebuilds; pass it to fit(config=...) with them"
            )
    return config


def _written_keys(written: DictConfig, section: str) -> list[str]:
    node = written.get(section)
    return list(node.keys()) if isinstance(node, DictConfig) else []


def _validate(raw: DictConfig, written: DictConfig) -> Config:
    written_keys = {section: _written_keys(written, section) for section in ("data", "model")}  # raw changes below
    raw = sources.resolved(dataclasses.asdict(Config()), raw)  # `${model.width}` before width moves to kwargs
    factory_args.collect(raw, "data", DataConfig)
    factory_args.collect(raw, "model", ModelConfig)
    config = sources.to_object(sources.merge(OmegaConf.structured(Config), raw))
    for section, settings in (("data", config.data), ("model", config.model)):
        factory = None if settings._target_ is None else locate(settings._target_, f"{section}._target_")
        factory_args.route(section, factory, settings, written_keys[section])
    return config


def to_container(config: Config) -> dict[str, Any]:
    """Plain dicts and lists only, so the config can travel inside a weights_only checkpoint."""
    container = dataclasses.asdict(config)
    for section, schema in (("data", DataConfig), ("model", ModelConfig)):
        if container[section]["name"] == GIVEN:  # the rest did nothing: saved, it would be refused when loaded
            container[section] = {key: container[section][key] for key in ("name", *factory_args.OBJECT_KEYS[section])}
        elif container[section]["_target_"] is not None:
            defaults = dataclasses.asdict(schema())
            container[section] = factory_args.saved(section, container[section], defaults)
    return container


def to_yaml(config: Config) -> str:
    """The resolved config as YAML text, loadable again by `load` (a `fit()` run's by `fit(config=...)`)."""
    return OmegaConf.to_yaml(OmegaConf.create(sources.literal(to_container(config))))


def locate(target: str, key: str) -> Callable[..., Any]:
    """Import `package.module.factory` and return the callable, or raise UsageError naming `key`."""
    module_name, _, attribute = target.rpartition(".")
    if not module_name:
        raise UsageError(f"config key '{key}' = {target!r} must be a dotted path like package.module.factory")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise UsageError(f"config key '{key}' = {target!r}: cannot import module {module_name!r} ({error})") from error
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise UsageError(f"config key '{key}' = {target!r}: module {module_name!r} has no callable {attribute!r}")
    return factory
