"""Trainer features, one process: precision, accumulation, clipping, compile, memory format, early stopping."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import read_metrics
from factories import ProbeNet, batchnorm_net, small_net

from ddp_trainer import checkpoint, config, data, models
from ddp_trainer.cli.train import main, run
from ddp_trainer.distributed import DistEnv
from ddp_trainer.errors import UsageError
from ddp_trainer.models import prepare_model
from ddp_trainer.optim import build_optimizer
from ddp_trainer.rng import seed_everything
from ddp_trainer.sharding import shard_model

BLOBS = ["data._target_=factories.blobs", "model._target_=factories.small_net", "trainer.device=cpu"]
IMAGES = [
    "data.name=synthetic",
    "data.synthetic.input_shape=[3,8,8]",
    "data.synthetic.train_size=32",
    "data.synthetic.val_size=16",
    "data.synthetic.num_classes=3",
    "data.batch_size=8",
    "model._target_=factories.ProbeNet",
    "trainer.device=cpu",
    "trainer.epochs=1",
]


def saved(output_dir, name: str = "last.pt") -> dict:
    return checkpoint.load(output_dir / "checkpoints" / name)


def probe_calls(args: list[str]) -> list[dict]:
    ProbeNet.calls.clear()
    assert main(args) == 0
    return list(ProbeNet.calls)


def test_accumulating_four_batches_of_8_equals_one_batch_of_32(tmp_path):
    common = [*BLOBS, "optim.name=sgd", "optim.lr=0.5", "optim.momentum=0.9", "trainer.epochs=3"]
    assert main([*common, "data.batch_size=32", f"output_dir={tmp_path / 'large'}"]) == 0
    accumulated = [*common, "data.batch_size=8", "trainer.accumulate_grad_batches=4"]
    assert main([*accumulated, f"output_dir={tmp_path / 'accumulated'}"]) == 0
    large, small = saved(tmp_path / "large"), saved(tmp_path / "accumulated")
    assert large["step"] == small["step"] == 9  # 96 samples: 3 optimizer steps per epoch either way
    for name, tensor in large["model"].items():
        torch.testing.assert_close(small["model"][name], tensor, rtol=1e-5, atol=1e-6)
    by_epoch = zip(read_metrics(tmp_path / "large"), read_metrics(tmp_path / "accumulated"), strict=True)
    for large_line, small_line in by_epoch:
        assert small_line["train/loss"] == pytest.approx(large_line["train/loss"], rel=1e-5)


def test_an_epoch_that_does_not_divide_into_windows_ends_with_a_shorter_step(tmp_path):
    # 96 samples in batches of 8 = 12 per epoch; windows of 5 leave a last window of 2 batches.
    args = [*BLOBS, "data.batch_size=8", "trainer.accumulate_grad_batches=5", "trainer.epochs=2"]
    assert main([*args, f"output_dir={tmp_path}"]) == 0
    assert [line["step"] for line in read_metrics(tmp_path)] == [3, 6]
    assert all(line["train/samples"] == 96 for line in read_metrics(tmp_path))


def test_gradient_clipping_bounds_the_update_and_reports_the_norm(tmp_path):
    # Plain SGD with lr 1: the first update is minus the (clipped) gradient, so its norm is the clip norm.
    args = [*BLOBS, "optim.name=sgd", "optim.lr=1.0", "optim.momentum=0", "optim.weight_decay=0", "data.batch_size=96"]
    assert main([*args, "trainer.max_steps=1", "trainer.grad_clip_norm=0.25", f"output_dir={tmp_path / 'on'}"]) == 0
    seed_everything(0)  # the run's initial weights: ddp-train seeds with `seed` (0) before building the model
    initial = small_net().state_dict()
    first = saved(tmp_path / "on")["model"]
    update = torch.cat([(first[name] - initial[name]).flatten() for name in initial])
    assert update.norm().item() == pytest.approx(0.25, rel=1e-4)
    reported = read_metrics(tmp_path / "on")[-1]["train/grad_norm"]
    assert reported > 0.25  # the norm before clipping
    assert main([*args, "trainer.max_steps=1", f"output_dir={tmp_path / 'off'}"]) == 0
    assert "train/grad_norm" not in read_metrics(tmp_path / "off")[0]


@pytest.mark.parametrize(("precision", "dtype"), [("bf16", torch.bfloat16), ("32", None)])
def test_precision_runs_forward_passes_under_autocast(tmp_path, precision, dtype):
    calls = probe_calls([*IMAGES, f"trainer.precision={precision}", f"output_dir={tmp_path}"])
    assert {call["autocast"] for call in calls if call["training"]} == {dtype}
    assert {call["autocast"] for call in calls if not call["training"]} == {dtype}  # evaluation too
    assert saved(tmp_path)["grad_scaler"] is None


def test_fp16_keeps_its_grad_scaler_in_checkpoints_and_restores_it(tmp_path):
    args = [*IMAGES, "trainer.precision=fp16", f"output_dir={tmp_path}"]
    calls = probe_calls(args)
    assert {call["autocast"] for call in calls if call["training"]} == {torch.float16}
    scaler = saved(tmp_path)["grad_scaler"]
    assert scaler["scale"] > 0 and scaler["growth_interval"] == 2000
    torch.save(  # a distinctive scale, as if the scaler had backed off: the resumed run must continue from it
        {**saved(tmp_path), "grad_scaler": {**scaler, "scale": 1024.0}}, tmp_path / "checkpoints" / "last.pt"
    )
    assert main([*args, "trainer.epochs=2"]) == 0
    assert saved(tmp_path)["grad_scaler"]["scale"] == 1024.0


@pytest.mark.parametrize("channels_last", [True, False])
def test_channels_last_puts_weights_and_inputs_in_nhwc(tmp_path, channels_last):
    calls = probe_calls([*IMAGES, f"model.channels_last={channels_last}", f"output_dir={tmp_path}"])
    assert {call["channels_last_input"] for call in calls} == {channels_last}
    assert {call["channels_last_weight"] for call in calls} == {channels_last}
    # evaluate and predict rebuild the model from the checkpoint's config, channels_last included.
    last, predictions = str(tmp_path / "checkpoints" / "last.pt"), str(tmp_path / "predictions.csv")
    predict = ["predict", "--checkpoint", last, "--split", "val", "--output", predictions]
    for command in (["evaluate", "--checkpoint", last], predict):
        command.append("model._target_=factories.ProbeNet")  # a checkpoint's factory runs once named again
        calls = probe_calls(command)
        assert {(call["channels_last_input"], call["channels_last_weight"]) for call in calls} == {(channels_last,) * 2}


def test_compiled_model_trains_to_the_same_weights(tmp_path):
    import torch._dynamo

    args = [*BLOBS, "trainer.epochs=1", "data.batch_size=32"]
    assert main([*args, f"output_dir={tmp_path / 'eager'}"]) == 0
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    assert main([*args, "trainer.compile=true", f"output_dir={tmp_path / 'compiled'}"]) == 0
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
    eager, compiled = saved(tmp_path / "eager")["model"], saved(tmp_path / "compiled")["model"]
    assert eager.keys() == compiled.keys()  # no _orig_mod. prefixes in the file
    for name in eager:
        torch.testing.assert_close(compiled[name], eager[name], rtol=1e-4, atol=1e-5)


def test_early_stopping_ends_the_run_when_the_monitor_stalls(tmp_path, capsys):
    # An improvement of more than 1.0 in accuracy is impossible: every epoch after the first counts as stalled.
    args = [*BLOBS, "trainer.epochs=10", "trainer.early_stopping_patience=2", "trainer.early_stopping_min_delta=1.0"]
    assert main([*args, f"output_dir={tmp_path}"]) == 0
    assert [line["epoch"] for line in read_metrics(tmp_path)] == [1, 2, 3]
    assert "early stopping after epoch 3" in capsys.readouterr().out
    assert saved(tmp_path)["epochs_without_improvement"] == 2
    files = sorted(path.relative_to(tmp_path) for path in tmp_path.rglob("*"))
    assert main([*args, "logging.tensorboard=true", f"output_dir={tmp_path}"]) == 0  # resumed, it does not train on
    assert "this run is finished (3 of 10 epochs, step 6, stopped early): nothing to train" in capsys.readouterr().out
    assert sorted(path.relative_to(tmp_path) for path in tmp_path.rglob("*")) == files  # nor opens its loggers
    assert [line["epoch"] for line in read_metrics(tmp_path)] == [1, 2, 3]
    patient = ["trainer.early_stopping_patience=3", "trainer.allow_changes=[trainer.early_stopping_patience]"]
    assert main([*args, *patient, f"output_dir={tmp_path}"]) == 0  # more patience: one more stalled epoch
    assert [line["epoch"] for line in read_metrics(tmp_path)] == [1, 2, 3, 4]


@pytest.mark.parametrize("mode", ["min", "max"])
def test_best_checkpoint_follows_the_monitor_and_its_mode(tmp_path, mode):
    # max for a loss is perverse, and so shows that the mode is the config's, not the one val/loss implies.
    args = [*BLOBS, "trainer.epochs=6", "optim.lr=0.05", "checkpoint.monitor=val/loss", f"checkpoint.mode={mode}"]
    assert main([*args, f"output_dir={tmp_path}"]) == 0
    lines = read_metrics(tmp_path)
    by_loss = sorted(lines, key=lambda line: line["val/loss"])
    assert by_loss[0]["epoch"] != by_loss[-1]["epoch"]  # the two modes keep different epochs
    best_line = by_loss[0] if mode == "min" else by_loss[-1]
    best = saved(tmp_path, "best.pt")
    assert best["epoch"] == best_line["epoch"] and best["best_metric"] == best_line["val/loss"]


class TickingClock:
    """A clock that moves `seconds` forward each time it is read: time passes with the steps, not the wall."""

    def __init__(self, seconds: float) -> None:
        self.now, self.seconds = 0.0, seconds

    def __call__(self) -> float:
        self.now += self.seconds
        return self.now


def step_checkpoints(output_dir) -> list[int]:
    return sorted(int(path.stem.split("-")[1]) for path in (output_dir / "checkpoints").glob("step-*.pt"))


def test_time_based_checkpoints_land_inside_epochs(tmp_path):
    # 4 steps per epoch; the clock is read at the start, once per step and once per save, 30 s a read; a save is due
    # a minute after the last. Rank 0's verdict of step s is acted on at step s + 1: read 60 s after the start at
    # step 2, saved at step 3 (120 s); 60 s after that save at step 4, whose epoch-end save (210 s) comes before the
    # verdict's at step 5 (240 s); then at 6 for 7, at 8 for 9, at 10 for 11.
    args = [*IMAGES, "trainer.epochs=3", "checkpoint.keep_last=100", f"output_dir={tmp_path}"]
    assert run(config.load(None, [*args, "checkpoint.every_n_minutes=1"]), clock=TickingClock(30.0)) == 0
    assert step_checkpoints(tmp_path) == [3, 4, 5, 7, 8, 9, 11, 12]
    assert run(config.load(None, [*args, "trainer.epochs=4"]), clock=TickingClock(30.0)) == 0  # clock unused
    newer = step_checkpoints(tmp_path)
    assert newer[-1] == 16 and 13 not in newer and 14 not in newer and 15 not in newer


def test_a_clock_that_never_reaches_the_interval_saves_at_epoch_ends_only(tmp_path):
    # 16 reads of 1 s: the interval is a minute, not a second.
    args = [*IMAGES, "trainer.epochs=3", "checkpoint.keep_last=100", "checkpoint.every_n_minutes=1"]
    clock = TickingClock(1.0)
    assert run(config.load(None, [*args, f"output_dir={tmp_path}"]), clock=clock) == 0
    assert clock.now < 60
    assert step_checkpoints(tmp_path) == [4, 8, 12]


def test_sync_batchnorm_converts_every_batchnorm_layer_for_gpu_ranks():
    # The meta device stands in for a GPU: no memory, no kernels, and not the CPU that SyncBatchNorm refuses.
    gpu_rank = DistEnv(rank=0, local_rank=0, world_size=2, device=torch.device("meta"), backend="nccl")
    model = prepare_model(batchnorm_net(), config.load(None, ["model.sync_batchnorm=true"]).model, gpu_rank)
    assert [type(layer) for layer in model.modules() if "BatchNorm" in type(layer).__name__] == [torch.nn.SyncBatchNorm]
    plain = prepare_model(batchnorm_net(), config.load(None, []).model, gpu_rank)
    assert [type(layer) for layer in plain.modules() if "BatchNorm" in type(layer).__name__] == [torch.nn.BatchNorm1d]


def test_a_model_that_cannot_take_the_data_is_refused_in_one_line_before_training():
    digits = (1, 8, 8)  # labels 0-9: a tenth logit short, or an RGB stem, fails only inside the first step
    with pytest.raises(UsageError, match=r"^model.num_classes=3 is fewer than the 10 classes of the data$"):
        models.build(config.ModelConfig(num_classes=3), digits, 10)
    shape = r"model.name=resnet18 does not take the data's samples of shape \(1, 8, 8\): .*to have 3 channels"
    with pytest.raises(UsageError, match=shape):
        models.build(config.ModelConfig(name="resnet18"), digits, 10)
    size = r"model.name=vit_b_16 does not take .*\(3, 32, 32\): .*Expected 224 but got 32"  # torchvision's assert
    with pytest.raises(UsageError, match=size):
        models.build(config.ModelConfig(name="vit_b_16"), (3, 32, 32), 10)
    # The CIFAR stem is built for the data's channels; the check leaves the model training, its RNG untouched.
    torch.manual_seed(0)
    model = models.build(config.ModelConfig(name="resnet18", cifar_stem=True), digits, 10)
    drawn = torch.rand(1)
    torch.manual_seed(0)
    models.build(config.ModelConfig(name="resnet18", cifar_stem=True), digits, 10)
    assert model.training and model(torch.zeros(2, *digits)).shape == (2, 10)
    assert torch.equal(torch.rand(1), drawn)


def test_the_mlps_keys_given_to_another_built_in_model_are_named_as_unused(tmp_path, capsys):
    # `--config fashion_mnist_mlp.yaml model.name=cnn` trained the CNN without the recipe's dropout, and said nothing.
    shape = ["data.synthetic.input_shape=[1,16,16]", "model._target_=null", "model.name=cnn", "model.dropout=0.2"]
    assert main([*IMAGES, *shape, f"output_dir={tmp_path}"]) == 0
    assert "model.dropout=0.2: the mlp's, unused by model.name=cnn" in capsys.readouterr().out
    assert models.unused_mlp_keys(config.ModelConfig(dropout=0.2)) is None  # the mlp uses it


def test_data_keys_for_another_built_in_dataset_are_named_as_unused(tmp_path, capsys):
    # data.augment=false or data.val_fraction=0.1 on a dataset that reads neither changed nothing, without a word.
    unused = [
        "data.augment=false",
        "data.val_fraction=0.5",
        "data.stream.shuffle_buffer=5",
        "data.synthetic.val_size=9",
    ]
    args = ["trainer.device=cpu", "trainer.epochs=1", "data.name=digits", f"output_dir={tmp_path}"]
    assert main([*args, *unused]) == 0
    assert (
        "data.augment=False, data.stream.shuffle_buffer=5, data.synthetic.val_size=9: unused by data.name=digits"
        in capsys.readouterr().out
    )
    assert data.unused_keys(config.DataConfig(name="cifar10", augment=False, root="/x")) is None  # both read there


def test_the_cifar_stem_is_initialised_as_resnet_initialises_its_convs_and_fits_every_resnet_class():
    # It kept Conv2d's default init (std 0.112 here against ResNet's 0.059), and resnext and wide_resnet were refused.
    stem = models.build(config.ModelConfig(name="resnet18", cifar_stem=True), (3, 32, 32), 10).conv1.weight
    assert stem.std().item() == pytest.approx(math.sqrt(2 / (64 * 3 * 3)), rel=0.1)
    for name in ("resnext50_32x4d", "wide_resnet50_2"):
        assert config.ModelConfig(name=name, cifar_stem=True).cifar_stem


@pytest.mark.parametrize("checkpointed", [False, True])
def test_activation_checkpointing_recomputes_each_block_in_backward(monkeypatch, checkpointed):
    blocks = ["trainer.strategy=fsdp", "trainer.fsdp_wrap=[Linear]"]
    overrides = [*blocks, f"trainer.activation_checkpointing={checkpointed}"]
    model = small_net()
    assert shard_model(model, config.load(None, overrides).trainer, device=None) == ["Linear"]
    calls, forward = [], torch.nn.Linear.forward
    monkeypatch.setattr(torch.nn.Linear, "forward", lambda layer, inputs: calls.append(layer) or forward(layer, inputs))
    model(torch.randn(4, 8)).sum().backward()
    # Checkpointed, both Linear blocks run again in backward: their activations were not kept.
    assert len(calls) == (4 if checkpointed else 2)


class TiedLanguageModel(torch.nn.Module):
    """Embedding and output layer sharing one weight, as language models tie them."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding, self.output = torch.nn.Embedding(6, 4), torch.nn.Linear(4, 6, bias=False)
        self.output.weight = self.embedding.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.output(self.embedding(tokens))


def test_fsdp_units_that_would_split_a_tied_weight_are_refused_in_one_line():
    cfg = config.load(None, ["trainer.strategy=fsdp", "trainer.fsdp_wrap=[Embedding]"]).trainer
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    try:
        shared = r"^trainer.fsdp_wrap=\[.Embedding.\]: parameter weight of Linear is shared with another FSDP unit"
        with pytest.raises(UsageError, match=shared):
            shard_model(TiedLanguageModel(), cfg, torch.device("cpu"))
    finally:
        torch.distributed.destroy_process_group()
    assert shard_model(TiedLanguageModel(), cfg, None) == ["Embedding"]  # one process: nothing sharded, nothing split


def test_a_sharded_bf16_model_hands_the_loss_fp32_outputs_as_autocast_does():
    # Sharded, a run has no autocast: its outputs were bf16, so its val/loss (the monitor of best.pt under regression
    # and language_model) differed from what `evaluate` measures under autocast, by 0.006 on digits at 2 ranks.
    cfg = config.load(None, ["trainer.strategy=fsdp", "trainer.fsdp_wrap=[Linear]", "trainer.precision=bf16"]).trainer
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    try:
        model = small_net()
        shard_model(model, cfg, torch.device("cpu"))
        assert model(torch.randn(4, 8)).dtype == torch.float32
        assert model[0](torch.randn(4, 8)).dtype == torch.bfloat16  # the blocks inside still compute in bf16
    finally:
        torch.distributed.destroy_process_group()


def test_model_and_optimizer_keys_reach_what_they_build():
    cfg = config.load(None, ["model.hidden_sizes=[24,12]", "model.dropout=0.3", "optim.name=sgd", "optim.momentum=0.5"])
    model = models.build(cfg.model, (64,), 10)
    layers = [layer for layer in model if isinstance(layer, torch.nn.Linear)]
    assert [tuple(layer.weight.shape) for layer in layers] == [(24, 64), (12, 24), (10, 12)]
    assert [layer.p for layer in model if isinstance(layer, torch.nn.Dropout)] == [0.3, 0.3]
    assert build_optimizer(cfg.optim, model).param_groups[0]["momentum"] == 0.5
