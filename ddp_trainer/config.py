"""Typed config: dataclass schema + YAML file + `key=value` overrides, strict about unknown keys."""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from ddp_trainer import factory_args
from ddp_trainer.errors import UsageError

DATASETS = ("digits", "fashion_mnist", "cifar10", "synthetic", "stream")
BUILTIN_MODELS = ("mlp", "cnn")
OPTIMIZERS = ("sgd", "adamw", "adam")
SCHEDULERS = ("none", "cosine", "step")
DEVICES = ("auto", "cpu", "cuda")
BACKENDS = ("auto", "nccl", "gloo")
PRECISIONS = ("32", "bf16", "fp16")
WANDB_MODES = ("disabled", "offline", "online")


def _require(condition: bool, key: str, value: Any, expected: str) -> None:
    if not condition:
        raise UsageError(f"config key '{key}' has invalid value {value!r}: expected {expected}")


@dataclass
class SyntheticConfig:
    """Shape of the random dataset used by `data.name=synthetic` (benchmarks, smoke tests)."""

    train_size: int = 2048
    val_size: int = 512
    input_shape: list[int] = field(default_factory=lambda: [3, 32, 32])
    num_classes: int = 10


@dataclass
class StreamConfig:
    """How `data.name=stream` reads shard folders `data.root/train` and `data.root/val`."""

    shuffle_buffer: int = 1000
    input_field: str = "x"
    label_field: str = "y"
    input_shape: list[int] | None = None

    def __post_init__(self) -> None:
        _require(self.shuffle_buffer >= 1, "data.stream.shuffle_buffer", self.shuffle_buffer, "1 (no shuffle) or more")


@dataclass
class DataConfig:
    """Where samples come from and how they are batched; `batch_size` is per rank."""

    name: str = "digits"
    root: str = "data"
    batch_size: int = 64
    num_workers: int = 0
    download: bool = False
    augment: bool = True
    val_fraction: float = 0.2
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    stream: StreamConfig = field(default_factory=StreamConfig)
    pin_memory: bool | None = None
    persistent_workers: bool = True
    prefetch_factor: int = 2
    per_sample_seed: bool | None = None
    _target_: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self._target_ is None:
            _require(self.name in DATASETS, "data.name", self.name, f"one of {', '.join(DATASETS)} or data._target_")
        _require(self.batch_size > 0, "data.batch_size", self.batch_size, "a positive integer")
        _require(self.num_workers >= 0, "data.num_workers", self.num_workers, "0 or more")
        _require(0 < self.val_fraction < 1, "data.val_fraction", self.val_fraction, "a fraction between 0 and 1")
        _require(self.prefetch_factor >= 1, "data.prefetch_factor", self.prefetch_factor, "a positive integer")


@dataclass
class ModelConfig:
    """Which network to build; `num_classes` defaults to the dataset's."""

    name: str = "mlp"
    hidden_sizes: list[int] = field(default_factory=lambda: [512, 256])
    dropout: float = 0.0
    num_classes: int | None = None
    cifar_stem: bool = False
    sync_batchnorm: bool = False
    channels_last: bool = False
    _target_: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self._target_ is None and self.name not in BUILTIN_MODELS:
            import torchvision  # lazy: only needed when the name is not one of ours

            known = torchvision.models.list_models()
            _require(
                self.name in known, "model.name", self.name, "mlp, cnn, a torchvision model name or model._target_"
            )
        _require(0.0 <= self.dropout < 1.0, "model.dropout", self.dropout, "a probability in [0, 1)")


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule (stepped once per optimizer step)."""

    name: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.01
    momentum: float = 0.9
    scheduler: str = "none"
    warmup_steps: int = 0
    step_epochs: int = 30
    gamma: float = 0.1
    min_lr: float = 0.0

    def __post_init__(self) -> None:
        _require(self.name in OPTIMIZERS, "optim.name", self.name, f"one of {', '.join(OPTIMIZERS)}")
        _require(self.scheduler in SCHEDULERS, "optim.scheduler", self.scheduler, f"one of {', '.join(SCHEDULERS)}")
        _require(self.lr > 0, "optim.lr", self.lr, "a positive number")
        _require(self.warmup_steps >= 0, "optim.warmup_steps", self.warmup_steps, "0 or more")
        _require(self.step_epochs > 0, "optim.step_epochs", self.step_epochs, "a positive integer")


@dataclass
class TrainerConfig:
    """How long and where to train, and how the run talks to the user."""

    epochs: int = 10
    max_steps: int = -1
    device: str = "auto"
    dist_backend: str = "auto"
    resume: str = "auto"
    log_every_n_steps: int = 50
    dist_timeout_s: float = 300.0
    progress_bar: bool = True
    stop_check_every_n_steps: int = 1
    requeue: bool = True
    nonfinite_loss: str = "stop"
    precision: str = "32"
    accumulate_grad_batches: int = 1
    grad_clip_norm: float = 0.0
    compile: bool = False
    early_stopping_patience: int = 0
    early_stopping_min_delta: float = 0.0

    def __post_init__(self) -> None:
        _require(self.epochs > 0, "trainer.epochs", self.epochs, "a positive integer")
        _require(self.device in DEVICES, "trainer.device", self.device, f"one of {', '.join(DEVICES)}")
        backend = self.dist_backend
        _require(backend in BACKENDS, "trainer.dist_backend", backend, f"one of {', '.join(BACKENDS)}")
        _require(self.log_every_n_steps > 0, "trainer.log_every_n_steps", self.log_every_n_steps, "a positive integer")
        _require(self.dist_timeout_s > 0, "trainer.dist_timeout_s", self.dist_timeout_s, "a positive number")
        _require(self.nonfinite_loss in ("stop", "skip"), "trainer.nonfinite_loss", self.nonfinite_loss, "stop or skip")
        every = self.stop_check_every_n_steps
        _require(every > 0, "trainer.stop_check_every_n_steps", every, "a positive integer")
        _require(self.precision in PRECISIONS, "trainer.precision", self.precision, f"one of {', '.join(PRECISIONS)}")
        accumulate = self.accumulate_grad_batches
        _require(accumulate > 0, "trainer.accumulate_grad_batches", accumulate, "a positive integer")
        _require(self.grad_clip_norm >= 0, "trainer.grad_clip_norm", self.grad_clip_norm, "0 (off) or a positive norm")
        patience = self.early_stopping_patience
        _require(patience >= 0, "trainer.early_stopping_patience", patience, "0 (off) or a number of epochs")
        delta = self.early_stopping_min_delta
        _require(delta >= 0, "trainer.early_stopping_min_delta", delta, "0 or a positive improvement")


@dataclass
class CheckpointConfig:
    """When checkpoints are written and which one counts as best."""

    every_n_steps: int = 0
    every_n_minutes: float = 0.0
    keep_last: int = 2
    monitor: str | None = None
    mode: str | None = None

    def __post_init__(self) -> None:
        _require(self.every_n_steps >= 0, "checkpoint.every_n_steps", self.every_n_steps, "0 (epoch end only) or more")
        minutes = self.every_n_minutes
        _require(minutes >= 0, "checkpoint.every_n_minutes", minutes, "0 (off) or a positive number of minutes")
        _require(self.keep_last >= 0, "checkpoint.keep_last", self.keep_last, "0 (last.pt only) or more")
        _require(self.mode in (None, "min", "max"), "checkpoint.mode", self.mode, "min or max")


@dataclass
class WandbConfig:
    """Weights & Biases: off by default; offline runs can be uploaded later with `wandb sync`."""

    mode: str = "disabled"
    project: str = "ddp-trainer"
    name: str | None = None
    entity: str | None = None

    def __post_init__(self) -> None:
        _require(self.mode in WANDB_MODES, "logging.wandb.mode", self.mode, f"one of {', '.join(WANDB_MODES)}")


@dataclass
class LoggingConfig:
    """Optional loggers beside metrics.jsonl and the console, all written by rank 0 only."""

    tensorboard: bool = False
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class Config:
    """The whole run: one dataclass per section, mapped one to one onto the YAML file."""

    output_dir: str = "runs/digits_mlp"
    seed: int = 0
    task: str = "classification"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


def _read_yaml(path: str | Path) -> DictConfig:
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"config file {file} does not exist")
    try:
        loaded = OmegaConf.load(file)
    except Exception as error:  # YAML errors come in several types; all mean the same to the user
        raise UsageError(f"config file {file} is not valid YAML: {str(error).splitlines()[0]}") from error
    if not isinstance(loaded, DictConfig):
        raise UsageError(f"config file {file} must hold a mapping of keys, not {type(loaded).__name__}")
    return loaded


def _parse_overrides(overrides: Sequence[str]) -> DictConfig:
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise UsageError(f"override {item!r} is not of the form key=value")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as error:
        raise UsageError(f"overrides could not be parsed: {str(error).splitlines()[0]}") from error


def _collect_factory_kwargs(raw: DictConfig, section: str, schema: type) -> None:
    """With `_target_`, keys the schema does not know are the factory's keyword arguments (Hydra style)."""
    node = raw.get(section)
    if not isinstance(node, DictConfig) or node.get("_target_") is None:
        return
    known = {f.name for f in dataclasses.fields(schema)}
    extra = [key for key in node.keys() if key not in known]
    kwargs = node.get("kwargs") or {}
    node["kwargs"] = OmegaConf.merge(kwargs, {key: node[key] for key in extra})
    for key in extra:
        del node[key]


def _error_message(error: OmegaConfBaseException) -> str:
    key = getattr(error, "full_key", None) or "?"
    detail = str(getattr(error, "msg", "") or error).splitlines()[0]
    if isinstance(error, ConfigKeyError):
        hint = detail[detail.index("Did you mean") :] if "Did you mean" in detail else ""
        return f"unknown config key '{key}'" + (f" ({hint})" if hint else "")
    if isinstance(error, ValidationError):
        return f"config key '{key}' has a wrong type: {detail}"
    return f"config key '{key}': {detail}"


def load(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Merge a YAML file and `key=value` overrides onto the schema; raise UsageError naming the bad key."""
    raw = _read_yaml(path) if path is not None else OmegaConf.create({})
    merged = OmegaConf.merge(raw, _parse_overrides(overrides))
    return _validate(merged, written=merged)


def from_container(container: dict[str, Any], overrides: Sequence[str] = ()) -> Config:
    """A config saved by `to_container` (e.g. inside a checkpoint), with `key=value` overrides on top."""
    # The saved keys were judged when the run started (and older checkpoints kept keys that reached nothing):
    # only the overrides are keys written now.
    written = _parse_overrides(overrides)
    return _validate(OmegaConf.merge(OmegaConf.create(container), written), written)


def load_for_objects(source: str | Path | Mapping[str, Any] | None, overrides: Sequence[str] = ()) -> Config:
    """The config of a run given its model and datasets as objects (`fit`): keys that would build them are refused."""
    if isinstance(source, Mapping):
        raw = OmegaConf.create(dict(source))
    else:
        raw = _read_yaml(source) if source is not None else OmegaConf.create({})
    merged = OmegaConf.merge(raw, _parse_overrides(overrides))
    for section, objects in (("data", "datasets"), ("model", "model")):
        usable = factory_args.TRAINER_KEYS[section]
        for key in _written_keys(merged, section):
            if key not in usable:
                raise UsageError(
                    f"config key '{section}.{key}' does nothing here: fit() is given the {objects}, and only "
                    f"{', '.join(f'{section}.{name}' for name in sorted(usable))} apply"
                )
    return _validate(merged, written=merged)


def _written_keys(written: DictConfig, section: str) -> list[str]:
    node = written.get(section)
    return list(node.keys()) if isinstance(node, DictConfig) else []


def _validate(raw: DictConfig, written: DictConfig) -> Config:
    written_keys = {section: _written_keys(written, section) for section in ("data", "model")}  # raw changes below
    _collect_factory_kwargs(raw, "data", DataConfig)
    _collect_factory_kwargs(raw, "model", ModelConfig)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(Config), raw)
        config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as error:
        raise UsageError(_error_message(error)) from error
    for section, settings in (("data", config.data), ("model", config.model)):
        if settings._target_ is not None:
            factory = locate(settings._target_, f"{section}._target_")
            factory_args.route(section, factory, settings, written_keys[section])
    return config


def to_container(config: Config) -> dict[str, Any]:
    """Plain dicts and lists only, so the config can travel inside a weights_only checkpoint."""
    container = dataclasses.asdict(config)
    for section, schema in (("data", DataConfig), ("model", ModelConfig)):
        if container[section]["_target_"] is not None:
            defaults = dataclasses.asdict(schema())
            container[section] = factory_args.saved(section, container[section], defaults)
    return container


def to_yaml(config: Config) -> str:
    """The resolved config as YAML text, loadable again by `load`."""
    return OmegaConf.to_yaml(OmegaConf.create(to_container(config)))


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
