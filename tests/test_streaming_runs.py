"""Sharded streams in real training runs: ranks x DataLoader workers, mid-epoch resume, the digits recipe."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from conftest import kill_job, launch_cli, read_metrics
from dist_helpers import run_ranks, spawn, train_in_a_folder_per_rank

from ddp_trainer.cli.shard import main as shard_main
from ddp_trainer.cli.train import main as train_main

SHARD_SIZES = [0, 37, 5, 60]  # uneven, one empty, fewer files than 2 ranks x 3 workers
VAL_SIZES = [11, 0, 6]


def write_jsonl_shards(folder: Path, sizes: list[int], first_id: int = 0) -> None:
    """JSON Lines shards whose input column 0 is the record's id (read back by factories.IdRecordingNet)."""
    folder.mkdir(parents=True)
    record_id = first_id
    for number, size in enumerate(sizes):
        lines = []
        for _ in range(size):
            features = [record_id, record_id % 3, (record_id * 7) % 5, 1.0, -1.0]
            lines.append(json.dumps({"x": features, "y": record_id % 3}) + "\n")
            record_id += 1
        (folder / f"part-{number}.jsonl").write_text("".join(lines))


@pytest.fixture
def shard_root(tmp_path: Path) -> Path:
    root = tmp_path / "shards"
    write_jsonl_shards(root / "train", SHARD_SIZES)
    write_jsonl_shards(root / "val", VAL_SIZES, first_id=1000)
    return root


def stream_args(root: Path, record_dir: Path, output_dir: Path) -> list[str]:
    return [
        "data.name=stream",
        f"data.root={root}",
        "data.batch_size=4",
        "data.stream.shuffle_buffer=8",
        "model._target_=factories.IdRecordingNet",
        f"model.record_dir={record_dir}",
        "trainer.device=cpu",
        f"output_dir={output_dir}",
    ]


def recorded_ids(record_dir: Path) -> list[int]:
    return sorted(int(record) for path in record_dir.glob("rank*.txt") for record in path.read_text().split())


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("workers", [0, 3])  # in the main process, and workers that get uneven shares of batches
def test_every_record_is_trained_on_once_per_epoch(shard_root, tmp_path, world_size, workers):
    args = [*stream_args(shard_root, tmp_path / "ids", tmp_path / "run"), f"data.num_workers={workers}"]
    result = run_ranks([*args, "trainer.epochs=1"], world_size)
    assert result.returncode == 0, result.stderr
    assert recorded_ids(tmp_path / "ids") == list(range(sum(SHARD_SIZES)))
    [line] = read_metrics(tmp_path / "run")
    assert (line["train/samples"], line["val/samples"]) == (sum(SHARD_SIZES), sum(VAL_SIZES))


def test_predict_refuses_image_files_for_a_run_that_read_shards(shard_root, tmp_path, capsys):
    # Shards hold samples after their dataset's transform (FashionMNIST's in [-1, 1]); images were fed in [0, 1],
    # and the predictions were near uniform without a word.
    assert train_main([*stream_args(shard_root, tmp_path / "ids", tmp_path / "run"), "trainer.epochs=1"]) == 0
    last, named = tmp_path / "run" / "checkpoints" / "last.pt", "model._target_=factories.IdRecordingNet"
    command = ["predict", "--checkpoint", str(last), named, f"model.record_dir={tmp_path}", "--images", "shoe.png"]
    capsys.readouterr()
    assert train_main(command) == 2
    assert "--images: this run read a stream (data.name=stream, or an IterableDataset)" in capsys.readouterr().err
    command[-2:] = ["--split", "train", "--output", str(tmp_path / "train.jsonl")]
    assert train_main(command) == 2  # was "data.name=stream is read as shards, not as a map-style dataset"
    said = "--split train: this run's training data is a stream, which predict reads as a validation split\n"
    assert capsys.readouterr().err.endswith(said)


def test_a_run_stopped_half_way_on_one_rank_resumes_on_two_with_the_records_it_had_not_seen(shard_root, tmp_path):
    # On two ranks both times: test_a_job_killed_mid_epoch_resumes_with_exactly_the_records_it_had_not_trained_on.
    args = [*stream_args(shard_root, tmp_path / "ids", tmp_path / "run"), "trainer.epochs=1", "data.num_workers=1"]
    args.append("trainer.accumulate_grad_batches=2")  # windows of the rest: 62 records on 2 ranks, 8 batches each
    first = run_ranks([*args, "trainer.max_steps=5"], world_size=1)  # 10 of 26 batches of 4
    assert first.returncode == 0, first.stderr
    assert len(recorded_ids(tmp_path / "ids")) == 40
    second = run_ranks([*args, "trainer.allow_changes=[world_size]"])  # a global batch of 8, no longer 4
    assert second.returncode == 0, second.stderr
    assert recorded_ids(tmp_path / "ids") == list(range(sum(SHARD_SIZES)))  # the union, no record twice
    [line] = read_metrics(tmp_path / "run")
    assert (line["train/samples"], line["step"]) == (sum(SHARD_SIZES), 5 + 4)  # every window of the rest stepped


def batch_lines(record_dir: Path, rank: int) -> list[list[int]]:
    lines = (record_dir / f"rank{rank}.txt").read_text().splitlines()
    return [[int(record) for record in line.split()] for line in lines]


def test_a_job_killed_mid_epoch_resumes_with_exactly_the_records_it_had_not_trained_on(shard_root, tmp_path):
    args = [*stream_args(shard_root, tmp_path / "ids", tmp_path / "run"), "trainer.epochs=1", "data.num_workers=1"]
    args += ["model.delay_s=0.1", "checkpoint.every_n_steps=2"]  # 13 steps of 0.1 s; a checkpoint every 2
    killed = launch_cli(args, nproc=2)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (
        (tmp_path / "ids" / "rank0.txt").exists() and len(batch_lines(tmp_path / "ids", 0)) >= 6
    ):
        time.sleep(0.02)
    kill_job(killed)
    step = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)["step"]
    assert 2 <= step < 13
    trained_before = [
        record for rank in (0, 1) for batch in batch_lines(tmp_path / "ids", rank)[:step] for record in batch
    ]
    for rank in (0, 1):
        (tmp_path / "ids" / f"rank{rank}.txt").unlink()  # forwards after the checkpoint were lost with the kill
    resumed = run_ranks(args)
    assert resumed.returncode == 0, resumed.stderr
    assert sorted(trained_before + recorded_ids(tmp_path / "ids")) == list(range(sum(SHARD_SIZES)))
    [line] = read_metrics(tmp_path / "run")
    assert line["train/samples"] == sum(SHARD_SIZES)


def test_nodes_that_hold_other_shard_files_are_refused_on_every_rank(tmp_path):
    # Each rank planned the epoch from its own node's index: with the same records cut into other files, some were
    # trained on twice an epoch and others never, and the run exited 0.
    for rank, sizes in ((0, SHARD_SIZES), (1, [50, 52])):
        write_jsonl_shards(tmp_path / f"node{rank}" / "shards" / "train", sizes)
        write_jsonl_shards(tmp_path / f"node{rank}" / "shards" / "val", VAL_SIZES, first_id=1000)
    spawn(2, train_in_a_folder_per_rank, stream_args(Path("shards"), tmp_path / "ids", tmp_path / "run"), str(tmp_path))
    said = (
        "the ranks read different shard files in data.root: rank 1's train shard 0 is part-0.jsonl (50 records) where "
        "rank 0's is part-0.jsonl (0 records); give every node the same shards, as `python -m ddp_trainer.cli.shard` "
        "wrote them"
    )
    for rank in (0, 1):
        assert (tmp_path / f"rank{rank}").read_text() == f"2\nddp-train: error (rank {rank}): {said}\n"
    assert recorded_ids(tmp_path / "ids") == []  # not a record trained on


def test_digits_from_shards_reach_the_accuracy_of_the_map_style_recipe(tmp_path):
    assert shard_main(["--config", "configs/digits_mlp.yaml", "--out", str(tmp_path / "shards"), "--shards", "8"]) == 0
    common = ["trainer.device=cpu", "data.num_workers=0"]
    assert train_main(["--config", "configs/digits_mlp.yaml", *common, f"output_dir={tmp_path / 'map'}"]) == 0
    stream = ["--config", "configs/digits_stream.yaml", f"data.root={tmp_path / 'shards'}", *common]
    assert train_main([*stream, f"output_dir={tmp_path / 'stream'}"]) == 0
    map_line, stream_line = read_metrics(tmp_path / "map")[-1], read_metrics(tmp_path / "stream")[-1]
    assert stream_line["val/samples"] == map_line["val/samples"] == 359
    assert stream_line["train/samples"] == map_line["train/samples"] == 1438
    assert stream_line["val/accuracy"] > 0.95
    # predict reads the stream's validation batches as they come, every record once.
    predictions, best = tmp_path / "val.jsonl", tmp_path / "stream" / "checkpoints" / "best.pt"
    assert train_main(["predict", "--checkpoint", str(best), "--split", "val", "--output", str(predictions)]) == 0
    assert len(predictions.read_text().splitlines()) == 359
    assert abs(stream_line["val/accuracy"] - map_line["val/accuracy"]) < 0.02


def test_shard_writer_refuses_to_write_over_existing_files_or_empty_shards(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("saved")
    for out in ("out", "out/keep.txt"):  # a folder with files, a file
        assert shard_main(["--out", str(tmp_path / out)]) == 2
        refusal = capsys.readouterr().err
        assert refusal.startswith(f"python -m ddp_trainer.cli.shard: error: --out {tmp_path / out} is not an empty")
    assert (tmp_path / "out" / "keep.txt").read_text() == "saved"
    assert shard_main(["--out", str(tmp_path / "many"), "--shards", "100000"]) == 2
    assert "--shards=100000: more than the 1438 training records" in capsys.readouterr().err
    assert shard_main(["--out", "/proc/shards"]) == 2
    assert "cannot write shards to --out /proc/shards" in capsys.readouterr().err
    no_val = ["data._target_=factories.blobs", "data.train_size=16", "data.val_size=0"]
    assert shard_main(["--out", str(tmp_path / "no_val"), *no_val]) == 2  # was a traceback, train/ already written
    assert capsys.readouterr().err.endswith("error: data: the validation split of factories.blobs is empty\n")
    assert shard_main(["--out", str(tmp_path / "no_val"), "data._target_=factories.blobs_without_validation"]) == 2
    assert capsys.readouterr().err.endswith(
        "error: the data has no validation split: a stream's val/ folder needs a record at least\n"
    )
    assert shard_main(["--out", str(tmp_path / "stream"), "data._target_=factories.blob_streams"]) == 2
    assert capsys.readouterr().err.endswith("shards are written from map-style datasets\n")  # was a TypeError
    assert shard_main(["--out", str(tmp_path / "real"), "data._target_=factories.regression_blobs"]) == 2
    assert "shard files hold a class index per record, not the label tensor(" in capsys.readouterr().err  # were cut
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"]


def test_missing_stream_folder_is_named(tmp_path, capsys):
    assert train_main(["data.name=stream", f"data.root={tmp_path}", f"output_dir={tmp_path / 'run'}"]) == 2
    assert f"{tmp_path / 'train'} holds no index.json" in capsys.readouterr().err


def test_shards_without_index_are_counted_and_ask_for_the_class_count(tmp_path, capsys):
    shards = tmp_path / "shards"
    assert shard_main(["--config", "configs/digits_mlp.yaml", "--out", str(shards), "--shards", "4"]) == 0
    for split in ("train", "val"):
        (shards / split / "index.json").unlink()
    stream = ["--config", "configs/digits_stream.yaml", f"data.root={shards}", "trainer.device=cpu", "trainer.epochs=1"]
    capsys.readouterr()
    assert train_main([*stream, f"output_dir={tmp_path / 'run'}"]) == 2
    assert "model.num_classes is not set" in capsys.readouterr().err
    assert train_main([*stream, "model.num_classes=10", f"output_dir={tmp_path / 'run'}"]) == 0
    [line] = read_metrics(tmp_path / "run")
    assert (line["train/samples"], line["val/samples"]) == (1438, 359)
