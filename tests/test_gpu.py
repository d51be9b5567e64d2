"""The GPU suite (`pytest -m gpu`): every device path on CUDA. Skips without a GPU; about 3 minutes on one.

CPU runs cannot see a tensor left on the wrong device or a host sync that starves the GPU, so these run the
same features on `cuda`: precisions, compile, channels_last, accumulation with clipping, non-finite steps, a
SIGTERM and resume, a CPU checkpoint resumed on the GPU, the GPU streams fit() gives its caller back, async
checkpoint saves, evaluate and predict (also of a CUDA checkpoint on the CPU), streams,
the regression and language-model tasks, the step ledger's in-order sums, and 2 ranks sharing one GPU over gloo:
under DDP (compiled, also with SyncBatchNorm), under FSDP with sharded checkpoints (the model moved to the GPU unit
by unit), and with a user IterableDataset; on a host with 2 GPUs, 2 ranks over NCCL too.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import time

import pytest
import torch
from conftest import REPO_DIR, launch_cli, read_metrics, run_cli, run_script
from dist_helpers import refusals, spawn, train_noting_gpu_memory_at_sharding

from ddp_trainer import checkpoint, rng, saving
from ddp_trainer.cli.shard import main as shard_main
from ddp_trainer.cli.train import main
from ddp_trainer.metrics import MetricSums, StepLedger
from ddp_trainer.trainer import Trainer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="the GPU suite needs a CUDA device"),
]

DIGITS = ["--config", "configs/digits_mlp.yaml", "trainer.device=cuda", "trainer.progress_bar=false"]
IMAGES = [
    "data.name=synthetic",
    "data.synthetic.input_shape=[3,32,32]",
    "data.synthetic.train_size=256",
    "data.synthetic.val_size=64",
    "data.batch_size=32",
    "model.name=cnn",
    "trainer.device=cuda",
    "trainer.epochs=2",
]


def run_example(name: str, overrides: list[str]) -> dict:
    """Call `main(overrides)` of examples/NAME.py in this process: the record its `ddp_trainer.fit` returned."""
    spec = importlib.util.spec_from_file_location(name, REPO_DIR / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(overrides)


def last_line(output_dir) -> dict:
    return read_metrics(output_dir)[-1]


def weights(output_dir, name: str = "last.pt") -> dict[str, torch.Tensor]:
    return checkpoint.load(output_dir / "checkpoints" / name)["model"]


def evaluate_json(capsys, path, *overrides: str) -> dict:
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(path), "--json", *overrides]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture
def one_gpu(monkeypatch):
    """Child processes see one GPU, which their ranks share over gloo: on a host with more, they would take NCCL."""
    first = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", first)


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """The default recipe trained on cuda in this process."""
    output_dir = tmp_path_factory.mktemp("digits_cuda")
    assert main([*DIGITS, f"output_dir={output_dir}"]) == 0
    return output_dir


def test_default_recipe_trains_on_the_gpu_above_95_percent(digits_run):
    line = last_line(digits_run)
    assert line["val/accuracy"] > 0.95 and line["val/samples"] == 359


@pytest.mark.parametrize(
    "options",
    [
        ["trainer.precision=32"],
        ["trainer.precision=bf16"],
        ["trainer.precision=fp16"],
        ["trainer.precision=bf16", "model.channels_last=true", "trainer.compile=true"],
    ],
    ids=["fp32", "bf16", "fp16", "bf16-channels_last-compile"],
)
def test_precisions_compile_and_channels_last_train_on_the_gpu(tmp_path, options):
    assert main([*IMAGES, *options, f"output_dir={tmp_path}"]) == 0
    line = last_line(tmp_path)
    assert line["train/samples"] == 256 and line["val/samples"] == 64
    assert torch.isfinite(torch.tensor([line["train/loss"], line["val/loss"]])).all()
    saved = checkpoint.load(tmp_path / "checkpoints" / "last.pt")
    assert all(tensor.device.type == "cpu" for tensor in saved["model"].values())  # loads anywhere
    assert (saved["grad_scaler"] is not None) == ("trainer.precision=fp16" in options)


def test_accumulation_with_clipping_matches_one_large_batch(tmp_path):
    common = [*IMAGES, "optim.name=sgd", "optim.lr=0.05", "trainer.grad_clip_norm=0.5", "trainer.epochs=1"]
    assert main([*common, "data.batch_size=64", f"output_dir={tmp_path / 'large'}"]) == 0
    accumulated = [*common, "data.batch_size=16", "trainer.accumulate_grad_batches=4"]
    assert main([*accumulated, f"output_dir={tmp_path / 'accumulated'}"]) == 0
    large, small = weights(tmp_path / "large"), weights(tmp_path / "accumulated")
    for name, tensor in large.items():
        torch.testing.assert_close(small[name], tensor, rtol=1e-4, atol=1e-5)
    assert last_line(tmp_path / "accumulated")["train/grad_norm"] > 0


def test_nonfinite_loss_stops_without_saving_or_is_skipped(tmp_path, capsys):
    blobs = ["data._target_=factories.blobs", "data.batch_size=8", "trainer.device=cuda"]
    blobs += ["model._target_=factories.NanAtStep", "trainer.epochs=3"]
    assert main([*blobs, "model.nan_step=15", f"output_dir={tmp_path / 'stop'}"]) == 3
    assert "at step 15 (epoch 2)" in capsys.readouterr().err
    saved = checkpoint.load(tmp_path / "stop" / "checkpoints" / "last.pt")
    assert saved["step"] == 12 and all(torch.isfinite(tensor).all() for tensor in saved["model"].values())
    skip = [*blobs, "model.nan_step=5", "trainer.nonfinite_loss=skip", f"output_dir={tmp_path / 'skip'}"]
    assert main(skip) == 0
    assert [line["train/skipped_steps"] for line in read_metrics(tmp_path / "skip")] == [1, 0, 0]
    assert all(torch.isfinite(tensor).all() for tensor in weights(tmp_path / "skip").values())


@pytest.mark.parametrize(
    ("precision", "accumulate", "steps_per_epoch", "nonfinite"),
    [("bf16", 1, 45, "skip"), ("bf16", 1, 45, "stop"), ("bf16", 2, 23, "skip"), ("fp16", 2, 23, "skip")],
    ids=["bf16-deferred-sums", "bf16-judged-at-the-sync", "bf16-accumulated", "fp16-accumulated"],
)
def test_no_host_sync_between_log_intervals(tmp_path, monkeypatch, precision, accumulate, steps_per_epoch, nonfinite):
    # Syncs are allowed only where the trainer reads metrics, evaluates and saves; anything else raises. Without
    # accumulation a step keeps its loss and outputs, and the fold makes their sums (`sums_of`) outside those places;
    # under `stop` it also flags the interval's steps there.
    def allowed(method):  # noqa: ANN001, ANN202
        def quiet(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            torch.cuda.set_sync_debug_mode(0)
            try:
                return method(*args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("error")

        return quiet

    for owner, name in ((MetricSums, "reduce"), (Trainer, "evaluate"), (Trainer, "_save")):
        monkeypatch.setattr(owner, name, allowed(getattr(owner, name)))
    options = [f"trainer.precision={precision}", "trainer.grad_clip_norm=1.0"]
    options += [f"trainer.accumulate_grad_batches={accumulate}"]
    options += [f"trainer.nonfinite_loss={nonfinite}", "trainer.log_every_n_steps=5", "trainer.epochs=3"]
    try:
        assert main([*DIGITS, *options, f"output_dir={tmp_path}"]) == 0
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert last_line(tmp_path)["step"] == 3 * steps_per_epoch  # 45 batches an epoch


def test_the_step_ledger_folds_steps_in_order_on_the_gpu():
    # CUDA's cumsum must scan the rows one after another, as on the CPU: else a fold's sums would depend on where
    # the host syncs fell, and a resumed run's metrics would differ from an uninterrupted run's in the last bits.
    device = torch.device("cuda", 0)
    rows = torch.randn(20, 2, dtype=torch.float64, device=device, generator=torch.Generator(device).manual_seed(0))
    rows = rows * 1e6
    one_by_one = MetricSums(("loss_sum", "samples", "skipped_steps"), device)
    for row in rows:
        one_by_one.add(torch.cat([row, row.new_zeros(1)]))
    folded = MetricSums(one_by_one.names, device)
    ledger = StepLedger(lambda losses, sums: torch.stack(sums), 2, capacity=20, norms=False, device=device)
    for start, end in ((0, 7), (7, 20)):
        flags = [ledger.record(step, rows[step, 0], rows[step], None, by_norm=True) for step in range(start, end)]
        folded.add_steps(ledger.fold(weight=1.0))
        ledger.settle(find=False)
    assert torch.equal(folded.sums, one_by_one.sums)
    assert flags[-1].device == device and flags[-1].dtype == torch.float32 and flags[-1].item() == 0.0


def test_sigterm_mid_epoch_resumes_to_the_uninterrupted_weights(tmp_path, monkeypatch):
    # Dropout draws from the CUDA RNG: equal weights need every RNG stream restored. cuBLAS GEMMs are
    # deterministic for fixed shapes with a fixed workspace.
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    args = [*DIGITS, "model.hidden_sizes=[64]", "model.dropout=0.2", "trainer.epochs=30", "checkpoint.every_n_steps=5"]
    straight = run_cli([*args, f"output_dir={tmp_path / 'straight'}"])
    assert straight.returncode == 0, straight.stderr
    metrics = tmp_path / "killed" / "metrics.jsonl"
    process = launch_cli([*args, f"output_dir={tmp_path / 'killed'}"])
    deadline = time.monotonic() + 120
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3) and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 128 + signal.SIGTERM
    assert checkpoint.load(tmp_path / "killed" / "checkpoints" / "last.pt")["epoch"] < 30
    resumed = run_cli([*args, f"output_dir={tmp_path / 'killed'}"])
    assert resumed.returncode == 0, resumed.stderr
    straight_weights, resumed_weights = weights(tmp_path / "straight"), weights(tmp_path / "killed")
    assert all(torch.equal(resumed_weights[name], tensor) for name, tensor in straight_weights.items())


def test_evaluate_and_predict_on_the_gpu_and_a_cuda_checkpoint_on_the_cpu(digits_run, tmp_path, capsys):
    last = digits_run / "checkpoints" / "last.pt"
    line = last_line(digits_run)
    on_gpu = evaluate_json(capsys, last)["metrics"]
    assert on_gpu["val/samples"] == 359 and on_gpu["val/loss"] == pytest.approx(line["val/loss"], rel=1e-6)
    on_cpu = evaluate_json(capsys, last, "trainer.device=cpu")["metrics"]
    assert on_cpu["val/loss"] == pytest.approx(line["val/loss"], rel=1e-3)
    assert abs(on_cpu["val/accuracy"] - line["val/accuracy"]) <= 2 / 359
    for device in ("cuda", "cpu"):
        output = tmp_path / f"{device}.jsonl"
        predict = ["predict", "--checkpoint", str(last), "--split", "val", "--output", str(output)]
        assert main([*predict, f"trainer.device={device}"]) == 0
        assert len(output.read_text().splitlines()) == 359
    assert f"top-1 accuracy {100 * on_gpu['val/accuracy']:.2f}%" in capsys.readouterr().out.splitlines()[0]


def test_seeding_a_sample_leaves_the_gpu_stream_alone():
    # With per-sample seeds and no DataLoader workers, samples are drawn in the training process between steps.
    torch.cuda.init()
    before = torch.cuda.get_rng_state()
    with rng.seeded(123):
        torch.rand(3)
    assert torch.equal(torch.cuda.get_rng_state(), before)


def test_a_cuda_checkpoint_resumes_on_the_cpu(digits_run, tmp_path):
    resumed = tmp_path / "resumed"
    args = [*DIGITS[:2], "trainer.device=cpu", "trainer.epochs=11", "trainer.allow_changes=[trainer.epochs]"]
    args.append(f"output_dir={resumed}")
    # In a process of its own: this one has CUDA started. Restoring the checkpoint's GPU stream started CUDA too.
    result = run_cli([*args, f"trainer.resume={digits_run / 'checkpoints' / 'last.pt'}"])
    assert result.returncode == 0, result.stderr
    assert [line["epoch"] for line in read_metrics(resumed)] == [11]
    assert "cuda" not in checkpoint.load(resumed / "checkpoints" / "last.pt")["rng"][0]  # CUDA never started


def test_a_cpu_checkpoint_resumes_on_the_gpu_with_new_dropout_masks(tmp_path):
    args = [*DIGITS, "model.dropout=0.2", "trainer.epochs=1"]
    cpu, gpu, resumed = tmp_path / "cpu", tmp_path / "gpu", tmp_path / "resumed"
    results = [run_cli([*args, "trainer.device=cpu", f"output_dir={cpu}"]), run_cli([*args, f"output_dir={gpu}"])]
    more = ["trainer.epochs=2", "trainer.allow_changes=[trainer.epochs]", f"output_dir={resumed}"]
    results.append(run_cli([*args, *more, f"trainer.resume={cpu / 'checkpoints' / 'last.pt'}"]))
    assert [result.returncode for result in results] == [0, 0, 0], [result.stderr for result in results]
    streams = [checkpoint.load(path / "checkpoints" / "last.pt")["rng"][0]["cuda"] for path in (gpu, resumed)]
    # Its epoch on the GPU drew as many masks as the GPU run's first: from the start's seed, the same ones.
    assert not torch.equal(*streams)


FIT_BETWEEN_DRAWS = """import sys
import torch
import ddp_trainer
from torch.utils.data import TensorDataset
if sys.argv[1] == "drew":  # on every GPU, before fit() made one of them current
    torch.cuda.manual_seed_all(5)
    torch.rand(3, device="cuda")
before = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
data = TensorDataset(torch.randn(64, 3), torch.randint(0, 2, (64,)))
model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 2))
ddp_trainer.fit(model, data, overrides=sys.argv[2:])
print(before is None or all(map(torch.equal, torch.cuda.get_rng_state_all(), before)))
print(torch.rand(4, device="cuda").tolist())
"""


def test_fit_gives_the_caller_back_its_gpu_streams(tmp_path):
    script, fresh = tmp_path / "fit_between_draws.py", tmp_path / "fresh.py"
    script.write_text(FIT_BETWEEN_DRAWS)
    fresh.write_text("import torch\nprint(torch.rand(4, device='cuda').tolist())\n")
    overrides = ["trainer.device=cuda", "trainer.epochs=1", "trainer.progress_bar=false"]
    runs = [run_script(script, [drew, *overrides, f"output_dir={tmp_path / drew}"]) for drew in ("drew", "fresh")]
    results = [*runs, run_script(fresh, [])]
    assert [result.returncode for result in results] == [0, 0, 0], [result.stderr for result in results]
    assert runs[0].stdout.splitlines()[-2] == "True"
    # In a process that had not used CUDA, a sweep's next trial drew the GPU randoms the trained run left.
    assert runs[1].stdout.splitlines()[-1] == results[2].stdout.splitlines()[-1]


def test_the_streaming_recipe_trains_on_the_gpu(tmp_path):
    assert shard_main(["--config", "configs/digits_mlp.yaml", "--out", str(tmp_path / "shards"), "--shards", "8"]) == 0
    stream = ["--config", "configs/digits_stream.yaml", f"data.root={tmp_path / 'shards'}", "trainer.device=cuda"]
    assert main([*stream, "trainer.progress_bar=false", f"output_dir={tmp_path / 'run'}"]) == 0
    line = last_line(tmp_path / "run")
    assert line["val/accuracy"] > 0.95 and line["train/samples"] == 1438 and line["val/samples"] == 359


TWO_RANKS = ["--config", "configs/digits_mlp.yaml", "trainer.epochs=3", "model.dropout=0.1"]


def assert_two_ranks_measure_what_one_process_does(tmp_path, capsys, args: list[str], backend: str) -> None:
    """Train the digits recipe on 2 ranks over `backend`: global metrics, and evaluate's val/loss from one process."""
    result = run_cli([*TWO_RANKS, *args, f"output_dir={tmp_path}"], nproc=2)
    assert result.returncode == 0, result.stderr
    assert f"world size 2 ({backend}, cuda:0)" in result.stdout
    line = last_line(tmp_path)
    assert line["val/samples"] == 359 and line["train/samples"] == 1438
    single = evaluate_json(capsys, tmp_path / "checkpoints" / "last.pt")["metrics"]
    assert single["val/loss"] == pytest.approx(line["val/loss"], rel=1e-6)


def test_two_ranks_share_one_gpu_over_gloo_with_exact_metrics(tmp_path, capsys, one_gpu):
    # auto picks gloo: more processes than GPUs. Metric sums, buffers, the RNG gather and DDP's gradient
    # all-reduce all run on CUDA tensors; the model is compiled inside DDP, whose DDPOptimizer splits its graphs.
    assert_two_ranks_measure_what_one_process_does(tmp_path, capsys, ["trainer.compile=true"], "gloo")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs a GPU per rank")
def test_two_ranks_on_two_gpus_over_nccl_with_exact_metrics(tmp_path, capsys):
    # Every other test of 2 ranks shares one GPU over gloo: here NCCL carries DDP's gradients, the metric sums, the
    # buffers' broadcast and the RNG gather, each rank on its own GPU.
    assert_two_ranks_measure_what_one_process_does(tmp_path, capsys, ["trainer.dist_backend=nccl"], "nccl")


def test_compiled_sync_batchnorm_runs_on_two_ranks_sharing_a_gpu(tmp_path, one_gpu):
    # Compiled too: SyncBatchNorm's gather inside the compiled DDP model is a path no CPU run can take.
    args = ["data._target_=factories.blobs", "model._target_=factories.batchnorm_net", "model.sync_batchnorm=true"]
    args += ["data.batch_size=8", "trainer.device=cuda", "trainer.compile=true", f"output_dir={tmp_path}"]
    result = run_cli(args, nproc=2)
    assert result.returncode == 0, result.stderr
    assert last_line(tmp_path)["val/samples"] == 37


@pytest.mark.skipif(torch.cuda.device_count() >= 2, reason="needs fewer GPUs than ranks")
def test_nccl_on_a_shared_gpu_stops_every_rank_in_one_line(tmp_path):
    args = [
        "data._target_=factories.blobs",
        "trainer.device=cuda",
        "trainer.dist_backend=nccl",
        f"output_dir={tmp_path}",
    ]
    # Plain processes, not torchrun: torchrun SIGTERMs rank 1 as soon as rank 0 exits, at times before rank 1 printed.
    for rank, error in enumerate(refusals(args)):
        assert error.startswith(
            f"ddp-train: error (rank {rank}): trainer.dist_backend=nccl needs a GPU per rank, but ranks 0 and 1 (on "
        )
    assert not (tmp_path / "checkpoints").exists()


def test_staging_copies_cuda_state_into_pinned_cpu_memory():
    model = torch.nn.Linear(8, 4).cuda()
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(2, 8, device="cuda")).sum().backward()
    optimizer.step()
    state = saving.model_state(model, optimizer)
    staged = saving.stage(state)
    moments = state["optimizer"]["state"][0]["exp_avg"]
    assert staged["optimizer"]["state"][0]["exp_avg"].is_pinned()
    assert torch.equal(staged["optimizer"]["state"][0]["exp_avg"], moments.cpu())
    for name, tensor in state["model"].items():
        assert staged["model"][name].device.type == "cpu" and staged["model"][name].is_pinned(), name
        assert torch.equal(staged["model"][name], tensor.cpu()), name


def test_async_save_on_cuda_writes_checkpoints_a_cpu_can_load(tmp_path):
    args = [*DIGITS, "trainer.epochs=2", "checkpoint.every_n_steps=5", "checkpoint.async_save=true"]
    assert main([*args, f"output_dir={tmp_path}"]) == 0
    written = {path.name: checkpoint.load(path) for path in (tmp_path / "checkpoints").glob("*.pt")}
    assert sorted(written) == ["best.pt", "last.pt", "step-00000085.pt", "step-00000090.pt"]
    assert written["last.pt"]["step"] == 90
    assert all(tensor.device.type == "cpu" for tensor in written["last.pt"]["model"].values())


def test_fsdp_on_two_ranks_sharing_a_gpu_writes_shards_one_process_resumes(tmp_path, one_gpu):
    # FSDP2's all-gathers and reduce-scatters, DCP's shard writes and the async staging, all of CUDA tensors.
    args = ["--config", "configs/digits_mlp.yaml", "trainer.device=cuda", "trainer.strategy=fsdp"]
    args += ["trainer.fsdp_wrap=[Linear]", "trainer.precision=bf16", "checkpoint.async_save=true", "trainer.epochs=2"]
    args += ["trainer.progress_bar=false", f"output_dir={tmp_path}"]
    result = run_cli(args, nproc=2)
    assert result.returncode == 0, result.stderr
    assert "world size 2 (gloo, cuda:0)" in result.stdout
    last = tmp_path / "checkpoints" / "last"
    assert sorted(path.name for path in last.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp", "state.pt"]
    line = last_line(tmp_path)
    assert line["val/samples"] == 359 and line["val/accuracy"] > 0.85  # 46 steps from 0.1
    two_rank_steps = checkpoint.load(last)["step"]
    # One process on the GPU reads the 2 ranks' shards and trains a third epoch: 1,438 samples in 45 batches of 32.
    assert main([*args, "trainer.epochs=3", "trainer.allow_changes=[world_size,trainer.epochs]"]) == 0
    assert checkpoint.load(tmp_path / "checkpoints" / "last")["step"] == two_rank_steps + 45
    assert last_line(tmp_path)["val/accuracy"] > 0.9


def test_fsdp_moves_the_model_to_the_gpu_one_unit_at_a_time(tmp_path):
    # 12 Linear units of 4 MB and a small root, built on the CPU: each rank's GPU holds its half of every unit and one
    # unit in transit, never the whole model (on two GPUs over NCCL too: each rank notes its own GPU).
    args = ["data._target_=factories.blobs", "model._target_=factories.deep_mlp", "trainer.device=cuda"]
    args += ["trainer.strategy=fsdp", "trainer.fsdp_wrap=[Linear]", "trainer.epochs=1", "trainer.progress_bar=false"]
    spawn(2, train_noting_gpu_memory_at_sharding, [*args, f"output_dir={tmp_path}"], str(tmp_path))
    for rank in (0, 1):
        size, peak = json.loads((tmp_path / f"memory_rank{rank}.json").read_text())
        assert size > 45e6 and peak < 0.7 * size, (rank, size, peak)
    assert last_line(tmp_path)["val/samples"] == 37


@pytest.mark.parametrize(
    ("example", "metric"), [("regression_diabetes", "val/mae"), ("char_language_model", "val/perplexity")]
)
def test_regression_and_language_model_measure_on_the_gpu_what_they_measure_on_the_cpu(tmp_path, example, metric):
    records = {}
    for device in ("cuda", "cpu"):
        args = [f"trainer.device={device}", "trainer.epochs=2", "trainer.progress_bar=false"]
        records[device] = run_example(example, [*args, f"output_dir={tmp_path / device}"])
    gpu, cpu = records["cuda"], records["cpu"]
    assert (gpu["step"], gpu["train/samples"], gpu["val/samples"]) == (
        cpu["step"],
        cpu["train/samples"],
        cpu["val/samples"],
    )
    for key in ("train/loss", "val/loss", metric):  # the same data order and weights; only the kernels differ
        assert gpu[key] == pytest.approx(cpu[key], rel=0.02), key


def test_a_user_stream_on_two_uneven_ranks_sharing_a_gpu_trains_every_image_once(tmp_path, one_gpu):
    # 4 readers of 360, 360, 360, 357 images in batches of 7: one rank holds 104 batches, the other 103, and joins
    # the last step with a stand-in batch on the GPU.
    args = ["trainer.device=cuda", "trainer.epochs=1", "data.batch_size=7", "data.num_workers=2"]
    result = run_script(REPO_DIR / "examples" / "digits_stream.py", [*args, f"output_dir={tmp_path}"], nproc=2)
    assert result.returncode == 0, result.stderr
    assert "world size 2 (gloo, cuda:0)" in result.stdout
    record = last_line(tmp_path)
    assert (record["step"], record["train/samples"], record["val/samples"]) == (104, 1437, 360)
