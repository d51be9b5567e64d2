"""Distributed semantics, each shown with real processes on gloo (torchrun or torch.multiprocessing)."""

from __future__ import annotations

import gc
import json
import re
import select
import shutil
import signal
import socket
import subprocess
import time
import weakref
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import REPO_DIR, cli_command, cli_env, read_metrics, run_cli, run_script
from dist_helpers import (
    evaluate_checkpoint,
    free_port,
    plain_ranks,
    refusals,
    run_ranks,
    sharded_saver_group_timeout,
    spawn,
    train_counting_all_reduce,
    train_counting_gradient_allreduces,
    train_counting_graphs,
    train_in_a_folder_per_rank,
    train_noting_ddp_at_teardown,
    train_on_a_disk_too_full_for_the_probe,
    train_rank,
    train_with_slow_saves,
)

from ddp_trainer import checkpoint, config
from ddp_trainer.api import _release_failed_frames
from ddp_trainer.cli.train import main

DIGITS = "configs/digits_mlp.yaml"
BLOBS = ["data._target_=factories.blobs", "model.hidden_sizes=[16]", "trainer.device=cpu"]
BLOBS_OWN_MODEL = ["data._target_=factories.blobs", "trainer.device=cpu"]  # hidden_sizes is refused beside a factory


def test_default_recipe_on_two_ranks_reaches_95_percent_with_global_metrics(tmp_path):
    result = run_cli(["--config", DIGITS, f"output_dir={tmp_path}"], nproc=2)
    assert result.returncode == 0, result.stderr
    lines = read_metrics(tmp_path)
    assert [line["epoch"] for line in lines] == list(range(1, 11))  # rank 0 alone wrote: no doubled lines
    for line in lines:
        assert line["world_size"] == 2
        assert line["val/samples"] == 359  # 20% of 1,797 digits, each counted once although 359 is odd
        assert line["train/samples"] == 1438
        assert {"step", "train/loss", "val/loss", "lr", "time/epoch_s"} <= line.keys()
    assert lines[-1]["val/accuracy"] > 0.95
    assert result.stdout.count("epoch 10/10") == 1  # only rank 0 prints
    assert config.load(tmp_path / "config.yaml").output_dir == str(tmp_path)
    saved = sorted(path.name for path in (tmp_path / "checkpoints").iterdir())  # no temporary file left behind
    assert saved == ["best.pt", "last.pt", "step-00000207.pt", "step-00000230.pt"]  # checkpoint.keep_last=2
    for name in ("last.pt", "best.pt"):
        state = torch.load(tmp_path / "checkpoints" / name, weights_only=True)
        assert {"model", "optimizer", "epoch", "step", "config"} <= state.keys()
        assert not any(key.startswith("module.") for key in state["model"])
    assert torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)["epoch"] == 10


def test_validation_is_identical_on_one_and_two_ranks(tmp_path):
    assert main(["--config", DIGITS, f"output_dir={tmp_path / 'run'}", "trainer.epochs=1", "trainer.device=cpu"]) == 0
    last = str(tmp_path / "run" / "checkpoints" / "last.pt")
    spawn(1, evaluate_checkpoint, last, [], str(tmp_path / "one.json"))
    spawn(2, evaluate_checkpoint, last, [], str(tmp_path / "two.json"))
    one, two = (json.loads((tmp_path / name).read_text())["metrics"] for name in ("one.json", "two.json"))
    assert one["val/samples"] == two["val/samples"] == 359
    assert two["val/loss"] == pytest.approx(one["val/loss"], abs=1e-6)
    assert two["val/accuracy"] == pytest.approx(one["val/accuracy"], abs=1e-6)


def test_batchnorm_statistics_of_rank_0_are_the_ones_evaluated(tmp_path):
    model = ["model._target_=factories.batchnorm_net", "trainer.epochs=1", "data.batch_size=8"]
    result = run_ranks([*BLOBS_OWN_MODEL, *model, f"output_dir={tmp_path / 'run'}"])
    assert result.returncode == 0, result.stderr
    reported = read_metrics(tmp_path / "run")[-1]
    factories_named = [BLOBS_OWN_MODEL[0], model[0]]  # evaluate calls a checkpoint's factories once named again
    spawn(
        1,
        evaluate_checkpoint,
        str(tmp_path / "run" / "checkpoints" / "last.pt"),
        factories_named,
        str(tmp_path / "one.json"),
    )
    alone = json.loads((tmp_path / "one.json").read_text())["metrics"]
    assert alone["val/loss"] == pytest.approx(reported["val/loss"], abs=1e-6)


def test_two_ranks_of_batch_b_step_like_one_rank_of_batch_2b(tmp_path):
    common = ["--config", DIGITS, "trainer.max_steps=1", "optim.name=sgd", "optim.lr=0.5", "trainer.device=cpu"]
    common += ["trainer.grad_clip_norm=0.25"]  # clipped by the norm of the all-reduced gradients, as in one process
    assert main([*common, "data.batch_size=64", f"output_dir={tmp_path / 'one'}"]) == 0
    result = run_ranks([*common, "data.batch_size=32", f"output_dir={tmp_path / 'two'}"])
    assert result.returncode == 0, result.stderr
    # Another lr must land elsewhere: the step moved the weights, so equal weights are not two untouched models.
    assert main([*common, "data.batch_size=64", "optim.lr=0.25", f"output_dir={tmp_path / 'half'}"]) == 0
    one, two, half = (checkpoint.load(tmp_path / run / "checkpoints" / "last.pt") for run in ("one", "two", "half"))
    assert one["step"] == two["step"] == 1
    for name, weight in one["model"].items():
        torch.testing.assert_close(two["model"][name], weight, rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(half["model"][name], weight) for name, weight in one["model"].items())
    # Metrics are global sums and counts: the same samples give the same values however many ranks hold them.
    line_one, line_two = (read_metrics(tmp_path / run)[-1] for run in ("one", "two"))
    for key in ("train/loss", "train/accuracy", "train/grad_norm", "train/samples", "val/loss", "val/accuracy"):
        assert line_two[key] == pytest.approx(line_one[key], rel=1e-5), key
    assert line_one["train/grad_norm"] > 0.25  # the clip was in force


def read_order(record_dir: Path, rank: int) -> list[int]:
    return [int(index) for index in (record_dir / f"train_rank{rank}.txt").read_text().split()]


def test_training_order_changes_every_epoch_and_repeats_with_the_seed(tmp_path):
    orders = []
    for run in ("first", "again"):
        record_dir = tmp_path / run / "record"
        args = ["data._target_=factories.recording_blobs", f"data.record_dir={record_dir}", *BLOBS[1:]]
        result = run_ranks([*args, f"output_dir={tmp_path / run}", "trainer.epochs=2", "data.batch_size=8"])
        assert result.returncode == 0, result.stderr
        orders.append([read_order(record_dir, rank) for rank in (0, 1)])
    per_rank = 96 // 2
    for rank_order in orders[0]:
        assert len(rank_order) == 2 * per_rank
        assert rank_order[:per_rank] != rank_order[per_rank:]  # set_epoch reshuffled
    for epoch in (0, 1):
        seen = sorted(i for rank_order in orders[0] for i in rank_order[epoch * per_rank : (epoch + 1) * per_rank])
        assert seen == list(range(96))  # the ranks split each epoch between them
    assert orders[0] == orders[1]


def test_metrics_are_synchronised_once_per_logging_interval(tmp_path):
    # 96 samples / (2 ranks x batch 8) = 6 steps per epoch; a sync every 3 steps gives 2 per epoch,
    # plus one for the epoch's training totals and one for validation: 4 per epoch, 8 for 2 epochs.
    args = [*BLOBS, f"output_dir={tmp_path}", "trainer.epochs=2", "data.batch_size=8", "trainer.log_every_n_steps=3"]
    spawn(2, train_counting_all_reduce, args, str(tmp_path))
    counts = [int((tmp_path / f"all_reduce_rank{rank}.txt").read_text()) for rank in (0, 1)]
    assert counts == [8, 8]
    assert [line["step"] for line in read_metrics(tmp_path)] == [6, 12]


CRASH_ON_RANK_1 = ["data._target_=factories.faulty_blobs", "data.fault=crash", "data.fault_rank=1", "data.after=40"]


@pytest.mark.parametrize(("data", "ended"), [(BLOBS[:1], ["0", "0"]), (CRASH_ON_RANK_1, ["4", "RuntimeError"])])
def test_the_ddp_model_is_freed_before_the_process_group_is_destroyed(tmp_path, data, ended):
    # Freed after, DDP's reducer took gloo's group down holding the GIL, which gloo's worker thread may need to free
    # the last broadcast's tensors: the process hung at exit, 2 runs in 70 on torch 2.11 (py-spy: ~ProcessGroupGloo).
    args = [*data, *BLOBS[1:], "trainer.epochs=1", "data.batch_size=8", f"output_dir={tmp_path}"]
    spawn(2, train_noting_ddp_at_teardown, [*args, "trainer.dist_timeout_s=20"], str(tmp_path))
    assert [(tmp_path / f"teardown_rank{rank}.txt").read_text() for rank in (0, 1)] == [f"{end} [0]" for end in ended]


class _Held:
    """Stands for what a failed step's frames hold: the DDP model and its reducer."""


def _fail_holding(held: _Held) -> None:
    raise RuntimeError("stopped at step 5")


def test_a_failure_frees_what_every_branch_of_its_exception_chain_holds():
    # A stop whose checkpoint write then failed in the writer thread: the failure's __cause__ is the OSError, and only
    # its __context__ leads to the frames that held the model.
    held = _Held()
    alive = weakref.ref(held)
    write_error = OSError("No space left on device")
    try:
        try:
            _fail_holding(held)
        except RuntimeError:
            raise RuntimeError("the stop checkpoint was not written") from write_error
    except RuntimeError as error:
        failure = error
    del held
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        _release_failed_frames(type(failure), failure, failure.__traceback__)
    finally:
        dist.destroy_process_group()
    gc.collect()
    assert alive() is None
    assert isinstance(failure.__context__, RuntimeError)  # the chain itself stays whole: a traceback prints as before


def test_a_crash_on_one_rank_ends_the_whole_job_promptly(tmp_path):
    faulty = ["data._target_=factories.faulty_blobs", "data.fault=crash", "data.fault_rank=1", "data.after=40"]
    # Loader workers ignore stop signals, so the crashed rank must stop them itself or never exit.
    args = [*faulty, "data.train_size=4096", "data.num_workers=2", *BLOBS[1:]]
    result = run_cli([*args, f"output_dir={tmp_path}", "data.batch_size=8"], nproc=2, timeout=90)
    assert result.returncode != 0
    assert "injected failure on rank 1" in result.stderr
    assert not (tmp_path / "checkpoints" / "last.pt").exists()


FIT_AGAIN = """
import sys, torch, ddp_trainer
from torch.utils.data import TensorDataset
from ddp_trainer.errors import say  # one write per line: print's two would interleave with the other rank's
data = TensorDataset(torch.randn(64, 8), torch.arange(64) % 3)
for run in range(4):
    overrides = [f"output_dir={sys.argv[1]}/{run}", "trainer.device=cpu", "trainer.epochs=1"]
    say(f"fit {run} step {ddp_trainer.fit(torch.nn.Linear(8, 3), data, overrides=overrides)['step']}")
"""


def test_a_script_fits_again_and_again_under_torchrun(tmp_path):
    # Each fit() joins a new process group in the same torchrun attempt: it must not read the addresses the last,
    # destroyed one left in the store (before the fix, half the second fits failed to connect or hung).
    script = tmp_path / "fit_again.py"
    script.write_text(FIT_AGAIN)
    result = run_script(script, [str(tmp_path)], nproc=2, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines().count("fit 3 step 1") == 2, result.stdout


@pytest.mark.parametrize(
    ("after", "timeouts", "where"),
    [
        # Stalled at the third step: training's short timeout holds (start-up's 30 minutes would fail the test).
        (20, ["trainer.dist_timeout_s=4"], "after step 2 (epoch 1)"),
        # Stalled before the first step is done: start-up's timeout holds, not training's. It also bounds the
        # rendezvous: 6 s leaves room for one rank's imports to lag the other's on a loaded machine.
        (4, ["trainer.startup_timeout_s=6", "trainer.dist_timeout_s=900"], "before the first step ended"),
    ],
)
def test_a_stalled_rank_becomes_an_error_naming_it_within_the_timeout(tmp_path, after, timeouts, where):
    faulty = ["data._target_=factories.faulty_blobs", "data.fault=stall", "data.fault_rank=1", f"data.after={after}"]
    args = [*faulty, *BLOBS[1:]]
    rank0, rank1 = plain_ranks([*args, "data.batch_size=8", *timeouts, f"output_dir={tmp_path}"])
    try:
        _, stderr = rank0.communicate(timeout=60)  # the timeout named below, not torch's default 30 minutes
    finally:
        rank1.kill()
        rank1.communicate()
    assert rank0.returncode == 4
    error = stderr.strip().splitlines()[-1]
    assert error.startswith("ddp-train: error (rank 0): rank 1 stopped answering (died or stalled")
    assert f"{timeouts[0]})" in error and f"failed {where} (" in error  # batches of 8 samples


def test_a_rank_busy_past_the_timeout_says_it_was_slow_not_that_the_network_failed(tmp_path):
    # Rank 0 is busy for 8 s at its third step; rank 1 times out after 2 s and ends (by about 4 s), then rank 0 finds it
    # gone. The margin lets rank 1 end first on a loaded machine.
    faulty = ["data._target_=factories.faulty_blobs", "data.fault=slow", "data.fault_rank=0", "data.after=20"]
    result = run_ranks([*faulty, *BLOBS[1:], "data.batch_size=8", "trainer.dist_timeout_s=2", f"output_dir={tmp_path}"])
    rank0 = next(line for line in result.stderr.splitlines() if line.startswith("ddp-train: error (rank 0)"))
    # Before: "every rank's collective failed (network?)"
    assert rank0.startswith("ddp-train: error (rank 0): this rank was busy past the timeout while rank 1 waited (slow")
    assert "a collective failed after step 2 (epoch 1) (trainer.dist_timeout_s=2)" in rank0
    # gloo's own words, less its source location and advice (it ended "... GLHF! 🏖️").
    assert re.search(
        r"\(trainer.dist_timeout_s=2\): (Connection closed by peer|Connection reset by peer|Timed out)", rank0
    )
    assert ".cc:" not in rank0 and ". " not in rank0.rsplit("): ", 1)[1]


@pytest.mark.parametrize("async_save", [False, True])
def test_ranks_wait_for_rank_0s_checkpoint_write_longer_than_the_training_timeout(tmp_path, async_save):
    # The others wait for rank 0's 6 s write past training's 3 s timeout: at the barrier after the save, or, written
    # in the background, as the run ends. Before, both exited 4 when the barrier's 3 s ran out.
    args = [*BLOBS, "data.batch_size=8", "trainer.epochs=1", "trainer.dist_timeout_s=3", f"output_dir={tmp_path}"]
    spawn(2, train_with_slow_saves, [*args, f"checkpoint.async_save={async_save}"], 6.0)
    assert [line["epoch"] for line in read_metrics(tmp_path)] == [1]
    assert checkpoint.load(tmp_path / "checkpoints" / "last.pt")["step"] == 6


def test_an_async_sharded_savers_group_times_out_as_configured(tmp_path):
    spawn(1, sharded_saver_group_timeout, str(tmp_path), 42.0)  # it was torch's default, 30 minutes, whatever was set


@pytest.mark.parametrize("fault", ["key", "output_dir"])
def test_bad_input_stops_every_rank_with_one_line_each(tmp_path, fault):
    taken = tmp_path / "taken"
    taken.write_text("a file, where the run's folder would go")
    if fault == "key":
        args, message = [f"output_dir={tmp_path / 'run'}", "optim.lrr=0.1"], "unknown config key 'optim.lrr'"
    else:  # found before the ranks wait for each other, not as rank 0's traceback once they do
        inside = taken / "run"
        args, message = [f"output_dir={inside}"], f"output_dir={inside} cannot be written: {taken} is a file"
    for rank, error in enumerate(refusals(["--config", DIGITS, *args])):
        assert error.startswith(f"ddp-train: error (rank {rank}): {message}") and "\n" not in error
    assert list(tmp_path.iterdir()) == [taken] and taken.read_text().startswith("a file")


def test_a_failed_download_stops_every_rank_in_the_fetchers_words(tmp_path):
    # Rank 0 fetches while rank 1 waits for it: rank 1 used to end saying rank 0 was gone (exit 4), not why.
    args = ["data._target_=factories.fetched_digits", f"data.kwargs.root={tmp_path / 'data'}"]
    args += ["data.kwargs.offline=true", "data.download=true", "trainer.device=cpu", f"output_dir={tmp_path / 'run'}"]
    cause = f"the digits could not be downloaded into {tmp_path / 'data'} (no network)"
    errors = refusals(args)
    assert errors[0] == f"ddp-train: error (rank 0): {cause}"
    assert errors[1] == f"ddp-train: error (rank 1): rank 0 cannot start: {cause}"
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_fsdp_with_channels_last_convolutions_is_refused_on_every_rank_in_one_line(tmp_path):
    args = ["data.name=synthetic", "data.synthetic.input_shape=[3,16,16]", "model.name=cnn", "model.channels_last=true"]
    args += ["trainer.strategy=fsdp", "trainer.device=cpu", f"output_dir={tmp_path}"]
    for rank, error in enumerate(refusals(args)):
        assert error.startswith(f"ddp-train: error (rank {rank}): trainer.strategy=fsdp shards contiguous parameters ")
        assert error.endswith("set model.channels_last=false") and "\n" not in error


def test_a_resume_where_only_one_node_sees_the_checkpoints_says_output_dir_must_be_shared(tmp_path):
    args = ["--config", str(REPO_DIR / DIGITS), "trainer.device=cpu", "trainer.epochs=1", "output_dir=run"]
    for rank in (0, 1):
        (tmp_path / f"node{rank}").mkdir()
    assert main([*args, f"output_dir={tmp_path / 'node0' / 'run'}"]) == 0  # node 0's disk alone holds the checkpoints
    spawn(2, train_in_a_folder_per_rank, [*args, "trainer.epochs=2"], str(tmp_path))
    for rank in (0, 1):
        said = (tmp_path / f"rank{rank}").read_text()
        assert said.startswith(f"2\nddp-train: error (rank {rank}): the ranks read different checkpoints at ")
        assert "(rank 0 step 45, rank 1 none)" in said and said.endswith("every node shares\n")
    assert not (tmp_path / "node1" / "run" / "checkpoints").exists()


def test_a_rank_on_another_node_that_cannot_write_output_dir_stops_every_rank_at_once(tmp_path):
    # Refused on rank 1 alone, before the ranks met, it left rank 0 waiting for it for trainer.startup_timeout_s.
    for rank in (0, 1):
        (tmp_path / f"node{rank}").mkdir()
    (tmp_path / "node1" / "run").write_text("a file, where node 1 would see the run's folder")
    args = ["--config", str(REPO_DIR / DIGITS), "trainer.device=cpu", "trainer.startup_timeout_s=60", "output_dir=run"]
    spawn(2, train_in_a_folder_per_rank, args, str(tmp_path))
    said = "output_dir=run cannot be written: run is a file"
    assert (tmp_path / "rank1").read_text() == f"2\nddp-train: error (rank 1): {said}\n"
    assert (tmp_path / "rank0").read_text() == f"2\nddp-train: error (rank 0): rank 1 cannot start: {said}\n"
    assert not (tmp_path / "node0" / "run").exists()


def test_fsdp_into_an_output_dir_that_only_rank_0_sees_is_refused_before_a_shard_is_written(tmp_path):
    # Each rank wrote its shard on its own node: rank 0 published checkpoints lacking rank 1's, and exited 0.
    for rank in (0, 1):
        (tmp_path / f"node{rank}").mkdir()
    args = ["--config", str(REPO_DIR / DIGITS), "trainer.device=cpu", "trainer.strategy=fsdp", "output_dir=run"]
    spawn(2, train_in_a_folder_per_rank, args, str(tmp_path))
    said = (
        f"output_dir {tmp_path / 'node1' / 'run'} on {socket.gethostname()} is not the folder rank 0 writes on "
        f"{socket.gethostname()}: trainer.strategy=fsdp writes every rank's shard there, so it must be on a filesystem "
        "every node shares"
    )
    assert (tmp_path / "rank1").read_text() == f"2\nddp-train: error (rank 1): {said}\n"
    assert (tmp_path / "rank0").read_text() == f"2\nddp-train: error (rank 0): rank 1 cannot start: {said}\n"
    assert sorted(path.name for path in tmp_path.rglob("*") if path.is_file()) == ["rank0", "rank1"]


def test_fsdp_whose_shared_folder_probe_cannot_be_written_stops_every_rank_at_once(tmp_path):
    # Rank 0 raised alone, the others waiting for its probe's name until trainer.startup_timeout_s.
    args = [*BLOBS, "trainer.strategy=fsdp", "trainer.startup_timeout_s=60", f"output_dir={tmp_path / 'run'}"]
    spawn(2, train_on_a_disk_too_full_for_the_probe, args, str(tmp_path))
    said = f"output_dir {tmp_path / 'run'} cannot be written (No space left on device)"
    assert (tmp_path / "rank0").read_text() == f"2\nddp-train: error (rank 0): {said}\n"
    assert (tmp_path / "rank1").read_text() == f"2\nddp-train: error (rank 1): rank 0 cannot start: {said}\n"
    assert not (tmp_path / "run").exists()  # the folder the claim made is gone with it


def test_nodes_whose_config_files_differ_are_refused_on_every_rank_before_training(tmp_path):
    # Nothing compared them: another optim.lr on node 1 trained diverged replicas and exited 0, another
    # trainer.epochs left rank 0 waiting for rank 1's last epoch until trainer.startup_timeout_s.
    recipe = (REPO_DIR / DIGITS).read_text()
    assert "  lr: 1.0e-3\n" in recipe and "  epochs: 10\n" in recipe
    node1 = recipe.replace("  lr: 1.0e-3\n", "  lr: 1.0e-2\n").replace("  epochs: 10\n", "  epochs: 11\n")
    for rank, text in enumerate((recipe, node1)):
        (tmp_path / f"node{rank}").mkdir()
        (tmp_path / f"node{rank}" / "recipe.yaml").write_text(text)
    args = [
        "--config",
        "recipe.yaml",
        "trainer.device=cpu",
        "trainer.startup_timeout_s=60",
        f"output_dir={tmp_path / 'run'}",
    ]
    spawn(2, train_in_a_folder_per_rank, args, str(tmp_path))
    host = socket.gethostname()
    said = (
        f"the ranks do not run the same: rank 1 (on {host}) has optim.lr=0.01, trainer.epochs=11 where rank 0 (on "
        f"{host}) has optim.lr=0.001, trainer.epochs=10; give every node the same config, overrides and packages"
    )
    for rank in (0, 1):
        assert (tmp_path / f"rank{rank}").read_text() == f"2\nddp-train: error (rank {rank}): {said}\n"
    assert not (tmp_path / "run").exists()


def test_a_node_without_the_config_file_stops_every_rank_at_once(tmp_path):
    # Refused alone before the ranks met, rank 1 left rank 0 waiting for it until trainer.startup_timeout_s (30 min).
    for rank in (0, 1):
        (tmp_path / f"node{rank}").mkdir()
    (tmp_path / "node0" / "recipe.yaml").write_text((REPO_DIR / DIGITS).read_text())
    args = ["--config", "recipe.yaml", "trainer.device=cpu", "trainer.startup_timeout_s=60", "output_dir=run"]
    spawn(2, train_in_a_folder_per_rank, args, str(tmp_path))
    said = "config file recipe.yaml does not exist"
    assert (tmp_path / "rank1").read_text() == f"2\nddp-train: error (rank 1): {said}\n"
    assert (tmp_path / "rank0").read_text() == f"2\nddp-train: error (rank 0): rank 1 cannot start: {said}\n"
    assert not (tmp_path / "node0" / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a node without CUDA")
def test_a_node_without_the_gpus_its_config_asks_for_stops_every_rank_at_once(tmp_path):
    # Its device was refused before the ranks met: rank 0 waited for it until trainer.startup_timeout_s.
    recipe = (REPO_DIR / DIGITS).read_text()
    assert len(re.findall(r"\n  device: \w+\n", recipe)) == 1
    for rank, device in ((0, "cpu"), (1, "cuda")):
        (tmp_path / f"node{rank}").mkdir()
        node_recipe = re.sub(r"\n  device: \w+\n", f"\n  device: {device}\n", recipe)
        (tmp_path / f"node{rank}" / "recipe.yaml").write_text(node_recipe)
    args = ["--config", "recipe.yaml", "trainer.startup_timeout_s=60", "output_dir=run"]
    spawn(2, train_in_a_folder_per_rank, args, str(tmp_path))
    said = "trainer.device=cuda but no CUDA device is available (use trainer.device=cpu or auto)"
    assert (tmp_path / "rank1").read_text() == f"2\nddp-train: error (rank 1): {said}\n"
    assert (tmp_path / "rank0").read_text() == f"2\nddp-train: error (rank 0): rank 1 cannot start: {said}\n"


def test_a_rank_that_cannot_load_its_config_says_so_before_it_waits_for_the_others(tmp_path):
    # It waited up to 5 minutes to tell ranks that were never started, silent, and Ctrl-C then lost its error.
    (rank0,) = plain_ranks(["--config", str(tmp_path / "missing.yaml")], world_size=2, started=[0])
    try:
        ready, _, _ = select.select([rank0.stderr], [], [], 60)
        assert ready, "no line within 60 s"
        said = f"ddp-train: error (rank 0): config file {tmp_path / 'missing.yaml'} does not exist\n"
        assert rank0.stderr.readline() == said
        assert rank0.poll() is None  # waiting for rank 1, to tell it
        rank0.send_signal(signal.SIGINT)
        _, rest = rank0.communicate(timeout=60)
        assert (rank0.returncode, rest) == (-signal.SIGINT, "")  # no traceback over its line
    finally:
        rank0.kill()
        rank0.communicate()


def test_datasets_of_other_lengths_on_one_rank_are_refused_on_every_rank(tmp_path):
    # Unequal lengths would split unequal index ranges: a hang in training, or validation counted wrongly.
    args = ["data._target_=factories.blobs_differing_on", "data.rank=1", "data.difference=shorter", *BLOBS[1:]]
    for rank, error in enumerate(refusals([*args, f"output_dir={tmp_path}"])):
        assert error == (
            f"ddp-train: error (rank {rank}): the ranks were given datasets of different lengths (train / val samples, "
            "rank 0: 96 / 37, rank 1: 40 / 37): give every rank the whole datasets, the samplers split them"
        )
    assert not (tmp_path / "checkpoints").exists()


def test_a_rank_that_fails_while_the_run_is_assembled_is_named_by_the_others(tmp_path):
    args = ["data._target_=factories.blobs_differing_on", "data.rank=1", "data.difference=missing", *BLOBS[1:]]
    rank0, rank1 = plain_ranks([*args, f"output_dir={tmp_path}"])
    (_, stderr0), (_, stderr1) = rank0.communicate(timeout=120), rank1.communicate(timeout=120)
    assert (rank0.returncode, rank1.returncode) == (4, 2)
    assert (
        stderr1.strip()
        == "ddp-train: error (rank 1): data.root=/data is missing the blobs files (on this rank's node only)"
    )
    error = stderr0.strip()
    assert error.startswith(
        "ddp-train: error (rank 0): rank 1 stopped: data.root=/data is missing the blobs files (on this rank's node "
        "only); a collective failed during start-up (trainer.startup_timeout_s=1800)"
    )
    assert "\n" not in error


def test_evaluate_on_two_ranks_names_the_rank_that_failed_alone(tmp_path):
    trained = ["data._target_=factories.blobs_differing_on", "data.rank=9", "data.difference=missing", *BLOBS[1:]]
    assert main([*trained, "trainer.epochs=1", f"output_dir={tmp_path}"]) == 0
    named = ["data._target_=factories.blobs_differing_on", "data.rank=1"]  # only rank 1's node lacks the files
    rank0, rank1 = plain_ranks(["evaluate", "--checkpoint", str(tmp_path / "checkpoints" / "last.pt"), *named])
    (_, stderr0), (_, stderr1) = rank0.communicate(timeout=120), rank1.communicate(timeout=120)
    assert (rank0.returncode, rank1.returncode) == (4, 2), stderr0
    assert stderr1.strip() == (
        "ddp-train evaluate: error (rank 1): data.root=/data is missing the blobs files (on this rank's node only)"
    )
    error = stderr0.strip()  # was a traceback of gloo's "Connection closed by peer"
    assert error.startswith(
        "ddp-train evaluate: error (rank 0): rank 1 stopped: data.root=/data is missing the blobs files (on this "
        "rank's node only); a collective failed while evaluating (trainer.startup_timeout_s=1800)"
    )
    assert "\n" not in error


def listening(port: int) -> bool:
    """Whether a socket of this machine listens on `port` (the rendezvous store that rank 0 hosts)."""
    tables = [Path(f"/proc/net/{name}").read_text() for name in ("tcp", "tcp6")]
    return any(f":{port:04X} " in line and line.split()[3] == "0A" for table in tables for line in table.splitlines())


def test_a_rank_waiting_for_one_that_never_started_ends_in_one_line_or_on_sigterm(tmp_path):
    alone = plain_ranks(["--config", DIGITS, "trainer.startup_timeout_s=3", f"output_dir={tmp_path}"], started=[0])[0]
    _, stderr = alone.communicate(timeout=60)
    assert alone.returncode == 4
    assert re.fullmatch(
        r"ddp-train: error \(rank 0\): the rendezvous at 127.0.0.1:\d+ timed out \(trainer.startup_timeout_s=3\): "
        r"Timed out after \d+ seconds waiting for clients. 1/2 clients joined. A rank failed to start: see its output",
        stderr.strip(),
    )
    # srun started rank 1, and rank 0 never came up (or died before it opened the rendezvous).
    orphan = plain_ranks(["--config", DIGITS, "trainer.startup_timeout_s=3", f"output_dir={tmp_path}"], started=[1])[0]
    _, stderr = orphan.communicate(timeout=60)
    assert orphan.returncode == 4 and "Traceback" not in stderr
    assert re.fullmatch(  # the last line: c10d logs its own before it
        r"ddp-train: error \(rank 1\): rank 0 never opened the rendezvous at 127.0.0.1:\d+ "
        r"\(trainer.startup_timeout_s=3\): The client socket has timed out after 3000ms while trying to connect to "
        r"\(127.0.0.1, \d+\). See rank 0's output",
        stderr.strip().splitlines()[-1],
    )
    # torchrun SIGTERMs the ranks left when one fails: one waiting in the rendezvous must end, not wait 30 minutes.
    port = free_port()
    waiting = plain_ranks(["--config", DIGITS, f"output_dir={tmp_path}"], started=[0], port=port)[0]
    deadline = time.monotonic() + 60
    while not listening(port) and time.monotonic() < deadline:
        time.sleep(0.1)
    waiting.send_signal(signal.SIGTERM)
    try:
        waiting.communicate(timeout=15)
    finally:
        waiting.kill()
    assert waiting.returncode == -signal.SIGTERM


def joined(port: int) -> int:
    """How many connections to `port` of this machine are established (the ranks that reached rank 0's store)."""
    tables = [Path(f"/proc/net/{name}").read_text() for name in ("tcp", "tcp6")]
    rows = [line.split() for table in tables for line in table.splitlines()[1:]]
    return sum(row[2].endswith(f":{port:04X}") and row[3] == "01" for row in rows)


def test_a_rank_that_stops_on_its_own_error_is_named_with_it_by_the_others(tmp_path):
    # Rank 1 meets a bad record mid-epoch and stops in one line: rank 0 said only "rank 1 stopped answering".
    faulty = ["data._target_=factories.faulty_blobs", "data.fault=bad", "data.fault_rank=1", "data.after=40"]
    args = [*faulty, *BLOBS[1:], "data.batch_size=8", "trainer.dist_timeout_s=5", f"output_dir={tmp_path}"]
    rank0, rank1 = plain_ranks(args)
    outputs = [rank.communicate(timeout=120)[1] for rank in (rank0, rank1)]
    assert [rank0.returncode, rank1.returncode] == [4, 2], outputs
    said = outputs[1].strip().splitlines()[-1].removeprefix("ddp-train: error (rank 1): ")
    assert said.startswith("data: record ") and said.endswith(" of /data/blobs is unreadable (on rank 1)")
    blamed = outputs[0].strip().splitlines()[-1]
    assert blamed.startswith(f"ddp-train: error (rank 0): rank 1 stopped: {said}; a collective failed after step ")


def test_a_rank_whose_rendezvous_host_dies_as_it_waits_ends_in_one_line(tmp_path):
    # Rank 2 never starts: ranks 0 and 1 wait in rank 0's store, then rank 0 is killed under rank 1.
    port = free_port()
    args = ["--config", DIGITS, "trainer.startup_timeout_s=60", f"output_dir={tmp_path}"]
    rank0, rank1 = plain_ranks(args, world_size=3, started=[0, 1], port=port)
    deadline = time.monotonic() + 60
    while joined(port) < 2 and time.monotonic() < deadline:  # rank 0's own client, and rank 1's
        time.sleep(0.1)
    rank0.kill()
    rank0.wait()
    _, stderr = rank1.communicate(timeout=30)
    assert rank1.returncode == 4, stderr
    said = stderr.strip().splitlines()[-1]
    assert said.startswith(f"ddp-train: error (rank 1): the rendezvous store at 127.0.0.1:{port} is gone as this rank ")
    assert said.endswith("its host (rank 0) stopped; see its output")
    assert "Traceback" not in stderr


def test_a_rendezvous_port_another_job_holds_is_named_in_one_line(tmp_path):
    port = free_port()
    held = dist.TCPStore("127.0.0.1", port, 1, True)  # another job's store, on the port srun derived from a job id
    try:
        rank0 = plain_ranks(["--config", DIGITS, f"output_dir={tmp_path}"], started=[0], port=port)[0]
        _, stderr = rank0.communicate(timeout=60)
    finally:
        del held
    assert rank0.returncode == 2  # was a DistNetworkError traceback, exit 1
    assert stderr.strip().startswith(
        f"ddp-train: error (rank 0): the rendezvous port {port} on 127.0.0.1 is in use (another job?): set MASTER_PORT"
    )


def test_a_rank_that_finds_another_program_on_the_rendezvous_port_ends_in_one_line(tmp_path):
    # Under srun, a program that is not a store took the port rank 0 needed. It accepts and never answers: rank 1
    # waited in TCPStore's first exchange for as long as that program kept the port (here 60 s), then printed C++
    # frames and blamed rank 0 (exit 4).
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        args = ["--config", DIGITS, "trainer.startup_timeout_s=2", f"output_dir={tmp_path}"]
        rank1 = plain_ranks(args, started=[1], port=port)[0]
        try:
            _, stderr = rank1.communicate(timeout=60)
        finally:
            rank1.kill()
    assert rank1.returncode == 2, stderr
    assert stderr.splitlines() == [
        f"ddp-train: error (rank 1): the rendezvous port {port} on 127.0.0.1 took this rank's connection but never "
        "answered as a store: another program holds it (or the process that opened it is stopped); set MASTER_PORT "
        "to a free port"
    ]
    assert not (tmp_path / "checkpoints").exists()


def test_a_model_with_unused_parameters_trains_on_two_ranks_once_ddp_is_told(tmp_path):
    args = ["data._target_=factories.blobs", "model._target_=factories.WithUnusedHead", "trainer.device=cpu"]
    args += ["trainer.epochs=1", "data.batch_size=8"]
    untold = run_ranks([*args, f"output_dir={tmp_path / 'untold'}"])
    assert untold.returncode == 2, untold.stderr  # DDP's words name its own argument, not the config key
    assert untold.stderr.splitlines() == [
        f"ddp-train: error (rank {rank}): some parameters took no part in a step's loss (a head used only at some "
        "steps, a frozen branch?): set trainer.find_unused_parameters=true"
        for rank in (0, 1)
    ]
    told = run_ranks([*args, "trainer.find_unused_parameters=true", f"output_dir={tmp_path / 'told'}"])
    assert told.returncode == 0, told.stderr
    state = checkpoint.load(tmp_path / "told" / "checkpoints" / "last.pt")
    assert state["step"] == 6 and "unused_head.weight" in state["model"]


def test_accumulation_all_reduces_gradients_once_per_window(tmp_path):
    # 96 samples / (2 ranks x batch 8) = 6 micro-batches per rank and epoch; windows of 3 give 2 steps.
    args = [*BLOBS, f"output_dir={tmp_path}", "trainer.epochs=2", "data.batch_size=8"]
    spawn(2, train_counting_gradient_allreduces, [*args, "trainer.accumulate_grad_batches=3"], str(tmp_path))
    counts = [int((tmp_path / f"gradient_allreduces_rank{rank}.txt").read_text()) for rank in (0, 1)]
    assert counts == [4, 4]  # one bucket per optimizer step: no all-reduce on the first 2 of every 3 micro-batches
    assert [line["step"] for line in read_metrics(tmp_path)] == [2, 4]


def test_sync_batchnorm_on_cpu_ranks_is_refused_on_every_rank(tmp_path):
    args = [*BLOBS_OWN_MODEL, "model._target_=factories.batchnorm_net", "model.sync_batchnorm=true"]
    result = run_ranks([*args, f"output_dir={tmp_path}"])
    assert result.returncode != 0
    assert result.stderr.count("model.sync_batchnorm=true needs GPUs") == 2  # each rank says it, none hangs
    assert not (tmp_path / "checkpoints").exists()


def test_compiled_ddp_model_with_accumulation_matches_eager_on_two_ranks(tmp_path):
    args = [*BLOBS, "trainer.epochs=2", "data.batch_size=8", "trainer.accumulate_grad_batches=2"]
    result = run_ranks([*args, f"output_dir={tmp_path / 'eager'}"])
    assert result.returncode == 0, result.stderr
    compiled_args = [*args, "trainer.compile=true", f"output_dir={tmp_path / 'compiled'}"]
    spawn(2, train_counting_graphs, compiled_args, str(tmp_path))
    assert all(int((tmp_path / f"graphs_rank{rank}.txt").read_text()) >= 1 for rank in (0, 1))  # each rank compiled
    eager, compiled = (checkpoint.load(tmp_path / name / "checkpoints" / "last.pt") for name in ("eager", "compiled"))
    assert eager["step"] == compiled["step"] == 6  # 96 samples / (2 ranks x 8) / 2 micro-batches = 3 per epoch
    assert eager["model"].keys() == compiled["model"].keys()
    for name, weight in eager["model"].items():
        torch.testing.assert_close(compiled["model"][name], weight, rtol=1e-4, atol=1e-5)


def test_fsdp_on_two_and_four_ranks_trains_the_same_weights_as_ddp(tmp_path):
    # Accumulation, clipping and evaluation each take FSDP's own path; Linear blocks make several FSDP units. Each
    # rank builds other initial weights: DDP broadcasts rank 0's, and FSDP must too.
    args = [*BLOBS_OWN_MODEL, "model._target_=factories.rank_seeded_mlp", "trainer.epochs=2"]
    args += ["trainer.accumulate_grad_batches=2"]
    args += ["trainer.grad_clip_norm=0.5", "trainer.log_every_n_steps=1"]
    fsdp = ["trainer.strategy=fsdp", "trainer.fsdp_wrap=[Linear]", "trainer.activation_checkpointing=true"]
    # One global batch of 16 in each run: DistributedSampler gives 2 ranks x 8 and 4 ranks x 4 the same samples.
    runs = {"ddp": (2, ["data.batch_size=8"]), "fsdp2": (2, ["data.batch_size=8", *fsdp])}
    runs["fsdp4"] = (4, ["data.batch_size=4", *fsdp])
    for name, (ranks, extra) in runs.items():  # a spawn per run: two runs in one set of processes share a port
        spawn(ranks, train_rank, [*args, *extra, f"output_dir={tmp_path / name}"])
    ddp = checkpoint.load(tmp_path / "ddp" / "checkpoints" / "last.pt")
    for name in ("fsdp2", "fsdp4"):
        folder = tmp_path / name / "checkpoints"
        assert (folder / "last").resolve() == folder / "step-00000006"  # 96 samples / 16 / 2 micro-batches x 2
        assert sorted(path.name for path in (folder / "last").iterdir()) == [
            ".metadata", *(f"__{rank}_0.distcp" for rank in range(runs[name][0])), "state.pt"
        ]  # fmt: skip
        sharded = checkpoint.load(folder / "last")  # the shards gathered in this process
        assert sharded["step"] == ddp["step"] == 6 and sharded["world_size"] == runs[name][0]
        assert ddp["model"].keys() == sharded["model"].keys()
        for key, weight in ddp["model"].items():
            torch.testing.assert_close(sharded["model"][key], weight, rtol=1e-5, atol=1e-6)
        assert list(sharded["optimizer"]["state"])[0] == "1.weight"  # DCP's optimizer state, keyed by name
        record, ddp_record = read_metrics(tmp_path / name)[-1], read_metrics(tmp_path / "ddp")[-1]
        assert record["val/samples"] == ddp_record["val/samples"] == 37  # uneven ranks, each sample once
        for key in ("train/loss", "train/grad_norm", "val/loss", "val/accuracy"):
            assert record[key] == pytest.approx(ddp_record[key], rel=1e-5), (name, key)


def test_fsdp_run_killed_mid_save_resumes_bitwise_and_continues_at_another_world_size(tmp_path):
    # Dropout: each rank's RNG stream matters. BatchNorm: each rank's running statistics differ inside an epoch, and
    # only rank 0's count (evaluation broadcasts them); a save must keep those, not another rank's copy.
    args = [*BLOBS_OWN_MODEL, "model._target_=factories.batchnorm_net", "model.dropout=0.2", "trainer.epochs=2"]
    args += ["data.batch_size=8", "trainer.strategy=fsdp", "trainer.fsdp_wrap=[Linear]", "checkpoint.every_n_steps=2"]
    args += ["checkpoint.async_save=true"]
    spawn(2, train_rank, [*args, f"output_dir={tmp_path / 'straight'}"])
    killed_args = [*args, f"output_dir={tmp_path / 'killed'}"]
    command = cli_command(killed_args, nproc=2)
    command[command.index("ddp_trainer.train")] = "fault_entry"
    # Rank 0 gets SIGKILL in its writer thread, half-way through the state file of the 2nd save (step 4 of 6): the
    # shards are in, the folder is not published, and training has gone on meanwhile.
    killed = subprocess.run(
        command, capture_output=True, text=True, timeout=180, env={**cli_env(), "KILL_AT_SAVE": "2"}, cwd=REPO_DIR
    )
    assert killed.returncode != 0, killed.stdout
    folder = tmp_path / "killed" / "checkpoints"
    assert (folder / "last").resolve().name == "step-00000002"
    # Rank 1, whose own write ended, may have begun the step-6 save's shard before rank 0 died: a slow writer thread.
    listed = sorted(path.name for path in folder.iterdir() if path.name != ".step-00000006.tmp")
    assert listed == [".step-00000004.tmp", "last", "step-00000002"]
    shutil.copytree(tmp_path / "killed", tmp_path / "one_rank", symlinks=True)  # `last` stays a link

    resumed = run_ranks(killed_args)
    assert resumed.returncode == 0, resumed.stderr
    assert "a checkpoint write that a crash interrupted" in resumed.stdout
    assert f"resumed from {folder / 'step-00000002'}: step 2, epochs done: 0" in resumed.stdout  # `last` named it
    straight, final = (checkpoint.load(tmp_path / name / "checkpoints" / "last") for name in ("straight", "killed"))
    assert straight["step"] == final["step"] == 12
    for name, weight in straight["model"].items():
        assert torch.equal(final["model"][name], weight), name
    assert read_metrics(tmp_path / "killed")[-1]["val/loss"] == read_metrics(tmp_path / "straight")[-1]["val/loss"]
    # DCP reshards: one process reads the 2-rank shards and trains on to the end.
    assert main([*args, f"output_dir={tmp_path / 'one_rank'}", "trainer.allow_changes=[world_size]"]) == 0
    # 2 ranks' position in the epoch does not fit one rank: epoch 1 restarts, 12 steps of batch 8 per epoch.
    assert checkpoint.load(tmp_path / "one_rank" / "checkpoints" / "last")["step"] == 2 + 12 + 12
    assert [line["epoch"] for line in read_metrics(tmp_path / "one_rank")] == [1, 2]
