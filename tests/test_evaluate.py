"""`ddp-train evaluate` and `ddp-train predict`: a checkpoint's progress, config, exact metrics and top-k classes."""

from __future__ import annotations

import functools
import io
import json
import shutil
import signal
import stat
import subprocess
import time

import pytest
import torch
from conftest import REPO_DIR, FullDisk, cli_command, cli_env, read_metrics, run_cli
from dist_helpers import read_while_replaced, spawn, train_in_a_folder_per_rank
from factories import blobs
from PIL import Image

from ddp_trainer import atomic, checkpoint, config, distributed
from ddp_trainer.cli import predict
from ddp_trainer.cli.train import main
from ddp_trainer.data.datasets import digits

DIGITS = ["--config", "configs/digits_mlp.yaml", "trainer.device=cpu", "model.hidden_sizes=[64]", "trainer.epochs=3"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 3-epoch digits run's output folder."""
    output_dir = tmp_path_factory.mktemp("trained")
    assert main([*DIGITS, f"output_dir={output_dir}"]) == 0
    return output_dir


def evaluate_json(capsys, path, *overrides: str) -> dict:
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(path), "--json", *overrides]) == 0
    return json.loads(capsys.readouterr().out)


def test_evaluate_reproduces_the_last_epochs_validation_metrics(trained, capsys):
    report = evaluate_json(capsys, trained / "checkpoints" / "last.pt")
    last_line = read_metrics(trained)[-1]
    assert (report["epoch"], report["step"]) == (3, last_line["step"])
    for key in ("val/loss", "val/accuracy", "val/samples"):
        assert report["metrics"][key] == last_line[key], key
    assert report["config"]["model"]["hidden_sizes"] == [64]


def test_evaluate_prints_epoch_step_config_and_metrics_as_text(trained, capsys):
    best = trained / "checkpoints" / "best.pt"
    assert main(["evaluate", "--checkpoint", str(best), "data.batch_size=7"]) == 0
    text = capsys.readouterr().out
    best_epoch = checkpoint.load(best)["epoch"]
    best_line = read_metrics(trained)[best_epoch - 1]
    assert f"checkpoint {best}: epoch {best_epoch}, step {best_line['step']}" in text
    assert "  data:\n" in text and "batch_size: 7" in text  # the override applies to the shown config
    assert f"val/accuracy {100 * best_line['val/accuracy']:.2f}%" in text


def test_evaluate_under_torchrun_prints_once_with_the_same_metrics(trained, capsys):
    single = evaluate_json(capsys, trained / "checkpoints" / "last.pt")
    command = ["evaluate", "--checkpoint", str(trained / "checkpoints" / "last.pt"), "--json"]
    result = run_cli(command, nproc=2)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1  # rank 0 alone
    metrics = json.loads(lines[0])["metrics"]
    assert metrics["val/samples"] == single["metrics"]["val/samples"] == 359
    assert metrics["val/loss"] == pytest.approx(single["metrics"]["val/loss"], rel=1e-6)  # float32 sums per rank


class Payload:
    """Unpickling this would run `touch` (a pickle may name any callable): weights_only must refuse it."""

    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        return (__import__("os").system, (f"touch {self.marker}",))


def test_evaluate_and_predict_join_the_other_ranks_under_the_start_up_timeout(trained, tmp_path, monkeypatch):
    joined, real_setup = [], distributed.setup

    def recording_setup(device: str, timeout_s: float, *args: object, **kwargs: object) -> distributed.DistEnv:
        joined.append(timeout_s)
        return real_setup(device, timeout_s, *args, **kwargs)

    monkeypatch.setattr(distributed, "setup", recording_setup)
    last = str(trained / "checkpoints" / "last.pt")
    timeouts = ["trainer.startup_timeout_s=77", "trainer.dist_timeout_s=3"]
    assert main(["evaluate", "--checkpoint", last, *timeouts]) == 0
    output = ["--output", str(tmp_path / "val.jsonl")]
    assert main(["predict", "--checkpoint", last, "--split", "val", *output, *timeouts]) == 0
    assert joined == [77, 77]  # was training's 3 s, a rank that starts late failing, and named as start-up's


def test_evaluate_where_one_node_lacks_the_checkpoint_stops_every_rank_at_once(trained, tmp_path):
    # Refused alone before the ranks met, rank 1 left rank 0 waiting for it until trainer.startup_timeout_s.
    for rank in (0, 1):
        (tmp_path / f"node{rank}").mkdir()
    shutil.copy(trained / "checkpoints" / "last.pt", tmp_path / "node0" / "last.pt")
    args = ["evaluate", "--checkpoint", "last.pt", "trainer.startup_timeout_s=60"]
    spawn(2, train_in_a_folder_per_rank, args, str(tmp_path))
    said = "checkpoint last.pt does not exist"
    assert (tmp_path / "rank1").read_text() == f"2\nddp-train evaluate: error (rank 1): {said}\n"
    assert (tmp_path / "rank0").read_text() == f"2\nddp-train evaluate: error (rank 0): rank 1 cannot start: {said}\n"


def test_evaluate_refuses_a_checkpoint_that_would_run_code(tmp_path, capsys):
    marker, path = tmp_path / "pwned", tmp_path / "evil.pt"
    torch.save({"model": {}, "optimizer": {}, "epoch": 1, "step": 1, "config": Payload(marker)}, path)
    assert main(["evaluate", "--checkpoint", str(path)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"ddp-train evaluate: error: checkpoint {path} refused") and "\n" not in error
    assert not marker.exists()


@pytest.mark.parametrize(("content", "reason"), [(b"", "unreadable"), (b"PK\x03\x04 cut", "unreadable")])
def test_evaluate_names_an_empty_or_truncated_file(tmp_path, capsys, content, reason):
    path = tmp_path / "last.pt"
    path.write_bytes(content)
    assert main(["evaluate", "--checkpoint", str(path)]) == 2
    assert f"checkpoint {path} is {reason}" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["evaluate", "resume"])
def test_ranks_that_read_a_live_runs_last_at_different_saves_stop_in_one_line(trained, tmp_path, command):
    # Each rank reads the file itself: rank 0 scored half the validation set with one save's weights and rank 1 the
    # other half with the next save's, exit 0; a resume trained on from two states.
    last = tmp_path / "last.pt"
    shutil.copy(trained / "checkpoints" / "last.pt", last)
    other = tmp_path / "other.pt"  # another step's save, to be renamed over last.pt between the ranks' reads
    shutil.copy(sorted((trained / "checkpoints").glob("step-*.pt"))[0], other)
    steps = [checkpoint.load(path)["step"] for path in (last, other)]
    if command == "evaluate":
        prog, args = "ddp-train evaluate", ["evaluate", "--checkpoint", str(last)]
    else:
        prog, args = (
            "ddp-train",
            [*DIGITS, "trainer.epochs=4", f"trainer.resume={last}", f"output_dir={tmp_path / 'run'}"],
        )
    spawn(2, read_while_replaced, args, str(last), str(other), str(tmp_path))
    said = (
        f"the ranks read different checkpoints at {last} (rank 0 step {steps[0]}, rank 1 step {steps[1]}): one was "
        "saved as they read (a run still saving there?); name a step file or folder (step-*), or read once that run "
        "stopped"
    )
    for rank in (0, 1):
        assert (tmp_path / f"rank{rank}").read_text() == f"2\n{prog}: error (rank {rank}): {said}\n"
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize(
    ("planted", "refused"),
    [
        (
            {"model": {"_target_": "os.system", "command": "touch {marker}"}},
            "builds its model with os.system: a factory a file names",
        ),
        (
            {"data": {"_target_": "os.system", "command": "touch {marker}"}},
            "builds its data with os.system: a factory a file names",
        ),
        (
            {"trainer": {"x": functools.reduce(lambda inner, _: {"a": inner}, range(99), 0)}},
            "nested more than 32 level",
        ),
        ({"model": "oops"}, "is not a ddp-trainer checkpoint (config.model is 'oops')"),
    ],
)
def test_a_checkpoints_config_never_runs_code_from_it(trained, tmp_path, capsys, planted, refused):
    # evaluate and predict build the model and data the saved config names: a file from elsewhere called os.system,
    # printed this machine's environment through ${oc.env:...}, or ended in a RecursionError traceback.
    marker, crafted = tmp_path / "ran", tmp_path / "crafted.pt"
    state = torch.load(trained / "checkpoints" / "last.pt", weights_only=True)
    for section, value in json.loads(json.dumps(planted).replace("{marker}", str(marker))).items():
        state["config"][section] = {**state["config"][section], **value} if isinstance(value, dict) else value
    torch.save(state, crafted)
    for command in ("evaluate", "predict"):
        assert main([command, "--checkpoint", str(crafted), "--split", "val"][: 3 if command == "evaluate" else 5]) == 2
        assert capsys.readouterr().err.startswith(f"ddp-train {command}: error: checkpoint {crafted}")
        assert not marker.exists()
    assert main(["evaluate", "--checkpoint", str(crafted)]) == 2 and refused in capsys.readouterr().err


def test_a_checkpoints_factories_run_under_any_name_the_user_gives_and_both_are_asked_for_at_once(tmp_path, capsys):
    # Only the saved name passed: a factory that moved since could not be named, and the line asked for its old home.
    named = ["model._target_=factories.small_net", "data._target_=factories.blobs"]
    assert main([*named, "trainer.device=cpu", "trainer.epochs=1", f"output_dir={tmp_path}"]) == 0
    last = tmp_path / "checkpoints" / "last.pt"
    assert main(["evaluate", "--checkpoint", str(last)]) == 2
    assert capsys.readouterr().err.endswith(
        "builds its model with factories.small_net and its data with factories.blobs: a factory a file names is "
        f"imported and called only when you name it (or where it moved): add {named[0]} {named[1]}\n"
    )
    moved = ["model._target_=factories.small_net_moved", named[1]]
    assert evaluate_json(capsys, last, *moved)["metrics"] == evaluate_json(capsys, last, *named)["metrics"]


def test_a_checkpoints_interpolations_stay_text(trained, tmp_path, capsys):
    # `${oc.env:HOME}` in a file from elsewhere would have printed this machine's environment; resolved on save, a
    # config's `${` is text the user escaped (`\${...}`), so it is read back as that text.
    crafted = tmp_path / "crafted.pt"
    state = torch.load(trained / "checkpoints" / "last.pt", weights_only=True)
    state["config"]["output_dir"] = "${oc.env:HOME}"
    state["config"]["logging"]["wandb"]["name"] = "a\\${b}"
    torch.save(state, crafted)
    saved = config.from_container(state["config"])
    assert (saved.output_dir, saved.logging.wandb.name) == ("${oc.env:HOME}", "a\\${b}")
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(crafted)]) == 0
    assert "output_dir: \\${oc.env:HOME}" in capsys.readouterr().out  # the text, in config.yaml's spelling


def test_predict_on_the_validation_split_agrees_with_evaluate(trained, tmp_path, capsys):
    last = trained / "checkpoints" / "last.pt"
    accuracy = evaluate_json(capsys, last)["metrics"]["val/accuracy"]
    output = tmp_path / "val.jsonl"
    assert main(["predict", "--checkpoint", str(last), "--split", "val", "--top-k", "3", "--output", str(output)]) == 0
    assert f"top-1 accuracy {100 * accuracy:.2f}%" in capsys.readouterr().out
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert [row["index"] for row in rows] == list(range(359))
    for row in rows:
        probabilities = [probability for _, probability in row["top_k"]]
        assert len(probabilities) == 3 and probabilities == sorted(probabilities, reverse=True)
        assert 0 < sum(probabilities) <= 1 + 1e-6
    assert sum(row["top_k"][0][0] == row["target"] for row in rows) == round(accuracy * 359)
    metrics = trained / "metrics.jsonl"  # a run's own file, mistyped as the output: left as it was
    for existing in (output, metrics):
        before = existing.read_bytes()
        assert main(["predict", "--checkpoint", str(last), "--split", "val", "--output", str(existing)]) == 2
        assert f"--output {existing} exists; predict never overwrites a file" in capsys.readouterr().err
        assert existing.read_bytes() == before


def test_predict_asked_for_more_classes_than_the_model_has_names_the_top_k_it_measured(trained, tmp_path, capsys):
    output = tmp_path / "all.jsonl"
    last = trained / "checkpoints" / "last.pt"
    assert main(["predict", "--checkpoint", str(last), "--split", "val", "--top-k", "20", "--output", str(output)]) == 0
    summary = capsys.readouterr().out.splitlines()[-1]  # said "top-20 accuracy" of the 10 digits
    assert summary.endswith(", top-10 accuracy 100.00% (every class: --top-k 20 is more than the model has)")
    assert {len(json.loads(line)["top_k"]) for line in output.read_text().splitlines()} == {10}


def open_on_a_full_disk(room: int):
    """io.open, except that files opened to write text hold `room` bytes at most (reads and binary files as ever)."""
    real_open = io.open

    def opener(file, mode="r", *args, **kwargs):
        if "r" in mode or "b" in mode:
            return real_open(file, mode, *args, **kwargs)
        return io.TextIOWrapper(io.BufferedWriter(FullDisk(file, mode.replace("t", ""), room)), encoding="utf-8")

    return opener


@pytest.mark.parametrize("full_at", ["the first write", "the flush at close"])
def test_predict_on_a_full_disk_leaves_no_file_and_says_so_in_one_line(trained, tmp_path, capsys, monkeypatch, full_at):
    command = ["predict", "--checkpoint", str(trained / "checkpoints" / "last.pt"), "--split", "val", "--output"]
    reference, output = tmp_path / "reference.jsonl", tmp_path / "out" / "val.jsonl"
    assert main([*command, str(reference)]) == 0
    output.parent.mkdir()
    room = 0 if full_at == "the first write" else reference.stat().st_size - 1  # all but the last buffer's last byte
    with monkeypatch.context() as patch:
        patch.setattr(io, "open", open_on_a_full_disk(room))
        capsys.readouterr()
        assert main([*command, str(output)]) == 2
    error = capsys.readouterr().err
    assert error == f"ddp-train predict: error: --output {output} cannot be written: No space left on device\n"
    assert list(output.parent.iterdir()) == []  # neither a truncated file nor the temporary one
    assert main([*command, str(output)]) == 0  # the rerun, once there is room, is not refused
    assert output.read_bytes() == reference.read_bytes()


@pytest.mark.parametrize(("umask", "mode"), [(0o077, 0o600), (0o002, 0o664)])
def test_predicts_output_is_as_open_as_the_users_umask_makes_files(trained, tmp_path, monkeypatch, umask, mode):
    monkeypatch.setattr(atomic, "UMASK", umask)  # read once at import, as a process started under that umask would
    output = tmp_path / "val.jsonl"
    command = ["predict", "--checkpoint", str(trained / "checkpoints" / "last.pt"), "--split", "val"]
    assert main([*command, "--output", str(output)]) == 0
    assert stat.S_IMODE(output.stat().st_mode) == mode  # a temporary file's 0o600 would hide it from the user's group


def test_predict_never_overwrites_an_output_that_appears_while_it_runs(trained, tmp_path, capsys, monkeypatch):
    output = tmp_path / "val.jsonl"
    real_top_k = predict.top_k

    def top_k_while_another_writes_the_output(*args, **kwargs):
        if not output.exists():  # after parse_args found no such file: another job's, say
            output.write_text("theirs\n")
        return real_top_k(*args, **kwargs)

    monkeypatch.setattr(predict, "top_k", top_k_while_another_writes_the_output)
    command = ["predict", "--checkpoint", str(trained / "checkpoints" / "last.pt"), "--split", "val"]
    assert main([*command, "--output", str(output)]) == 2
    assert f"--output {output} exists; predict never overwrites a file" in capsys.readouterr().err
    assert output.read_text() == "theirs\n" and list(tmp_path.iterdir()) == [output]


def test_predict_on_image_files_matches_the_model_on_the_same_pixels(trained, tmp_path, capsys):
    _, val = digits(0.2)
    files = []
    for index in range(3):
        pixels = (val.inputs[index, 0] * 255).round().to(torch.uint8).numpy()
        files.append(tmp_path / f"digit{index}.png")
        Image.fromarray(pixels).save(files[-1])
    last = trained / "checkpoints" / "last.pt"
    capsys.readouterr()
    assert main(["predict", "--checkpoint", str(last), "--images", *map(str, files), "--top-k", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    model.load_state_dict(checkpoint.load(last)["model"])
    with torch.no_grad():
        expected = model((val.inputs[:3] * 255).round() / 255).softmax(dim=1)
    for line, probabilities in zip(lines, expected, strict=True):
        top = probabilities.argmax().item()
        assert line.split(": ")[1].startswith(f"{top} ({probabilities[top].item():.4f})")


def test_predict_explains_an_unreadable_image(trained, tmp_path, capsys, monkeypatch):
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    assert main(["predict", "--checkpoint", str(trained / "checkpoints" / "last.pt"), "--images", str(bad)]) == 2
    assert f"image {bad} cannot be read" in capsys.readouterr().err
    bomb = tmp_path / "bomb.png"  # PIL refuses a huge size before decoding it, with an error that is no OSError
    Image.new("L", (64, 64)).save(bomb)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    assert main(["predict", "--checkpoint", str(trained / "checkpoints" / "last.pt"), "--images", str(bomb)]) == 2
    assert f"image {bomb} cannot be read: Image size (4096 pixels) exceeds limit" in capsys.readouterr().err


def test_a_checkpoint_saved_for_gpus_is_evaluated_and_predicted_on_this_cpu(trained, tmp_path, capsys):
    # What a GPU run saves: its config asks for cuda and nccl, and its RNG streams include CUDA's.
    state = checkpoint.load(trained / "checkpoints" / "last.pt")
    state["config"]["trainer"] |= {"device": "cuda", "dist_backend": "nccl"}
    state["rng"][0]["cuda"] = torch.zeros(16, dtype=torch.uint8)
    gpu_file = tmp_path / "gpu.pt"
    torch.save(state, gpu_file)
    expected = evaluate_json(capsys, trained / "checkpoints" / "last.pt")["metrics"]
    assert evaluate_json(capsys, gpu_file)["metrics"] == expected
    output = tmp_path / "val.jsonl"
    assert main(["predict", "--checkpoint", str(gpu_file), "--split", "val", "--output", str(output)]) == 0
    assert f"top-1 accuracy {100 * expected['val/accuracy']:.2f}%" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("factory", "workers"),
    [
        ("factories.dict_blobs", 0),  # a traceback: the dict's keys were unpacked as (inputs, targets)
        ("factories.blob_streams", 2),  # rows came in the workers' round-robin order, not the stream's
    ],
)
def test_predict_writes_a_row_per_sample_in_the_splits_own_order(tmp_path, capsys, factory, workers):
    named = [f"data._target_={factory}", "model._target_=factories.small_net"]
    args = [*named, f"data.num_workers={workers}", "trainer.device=cpu", "trainer.epochs=1", "data.batch_size=8"]
    assert main([*args, f"output_dir={tmp_path / 'run'}"]) == 0
    last, output = tmp_path / "run" / "checkpoints" / "last.pt", tmp_path / "val.jsonl"
    assert main(["predict", "--checkpoint", str(last), "--split", "val", "--output", str(output), *named]) == 0
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    val = blobs()[1]
    assert [(row["index"], row["target"]) for row in rows] == [(index, str(index % 3)) for index in range(len(val))]
    if "stream" in factory:  # a TypeError traceback: a DataLoader of a stream has no len() to be truthy by
        assert main(["predict", "--checkpoint", str(last), *named, "--images", "a.png"]) == 2
        assert "--images: this run read a stream" in capsys.readouterr().err


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_predict_stopped_by_a_signal_leaves_no_file_and_no_traceback(tmp_path, stop):
    # SIGTERM (a time limit, kill) left its hidden temporary file, as large as the output; Ctrl-C printed a traceback.
    synthetic = ["data.name=synthetic", "data.synthetic.input_shape=[4]", "data.synthetic.train_size=300000"]
    args = [*synthetic, "model.hidden_sizes=[8]", "trainer.device=cpu", "trainer.max_steps=1", "trainer.epochs=1"]
    assert run_cli([*args, f"output_dir={tmp_path / 'run'}"]).returncode == 0
    last, output = tmp_path / "run" / "checkpoints" / "last.pt", tmp_path / "out" / "rows.jsonl"
    output.parent.mkdir()
    command = cli_command(["predict", "--checkpoint", str(last), "--split", "train", "--output", str(output)], 1)
    # SIGINT's default action in the child: a job started in the background (CI, say) passes SIGINT on as ignored.
    predicting = subprocess.Popen(
        [*command, "--batch-size", "1"],
        env=cli_env(),
        cwd=REPO_DIR,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 120
    while not any(output.parent.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.1)
    predicting.send_signal(stop)
    assert predicting.wait(timeout=60) == {signal.SIGTERM: 128 + stop, signal.SIGINT: -stop}[stop]  # as Python ends
    assert list(output.parent.iterdir()) == []
    assert "Traceback" not in predicting.stderr.read()


def test_predicts_own_reading_settings_never_reach_a_data_factorys_options(tmp_path):
    # Given as overrides, data.num_workers=0 reached a factory that passes its **options on: a TypeError traceback.
    named = ["data._target_=factories.forwarding_blobs", "model._target_=factories.small_net"]
    assert main([*named, "trainer.device=cpu", "trainer.epochs=1", f"output_dir={tmp_path / 'run'}"]) == 0
    last, output = tmp_path / "run" / "checkpoints" / "last.pt", tmp_path / "val.jsonl"
    assert main(["predict", "--checkpoint", str(last), "--split", "val", "--output", str(output), *named]) == 0
    assert len(output.read_text().splitlines()) == 37


def test_predict_refuses_what_it_cannot_do_in_one_line(trained, tmp_path, capsys):
    last = trained / "checkpoints" / "last.pt"
    with pytest.raises(SystemExit) as parsed:  # --output was ignored, with exit code 0
        main(["predict", "--checkpoint", str(last), "--images", "a.png", "--output", str(tmp_path / "out.jsonl")])
    assert parsed.value.code == 2 and "--output goes with --split" in capsys.readouterr().err


def test_predict_on_the_training_split_turns_off_a_factorys_augmentation(tmp_path, capsys):
    # The factory was passed augment=true: its training split adds fresh noise to each sample it hands out.
    args = ["data._target_=factories.augmented_blobs", "data.augment=true", "trainer.device=cpu", "trainer.epochs=1"]
    assert main([*args, f"output_dir={tmp_path}"]) == 0
    last, outputs = tmp_path / "checkpoints" / "last.pt", [tmp_path / "first.jsonl", tmp_path / "second.jsonl"]
    for output in outputs:
        named = ["data._target_=factories.augmented_blobs"]  # a checkpoint's factory runs only when named again
        assert main(["predict", "--checkpoint", str(last), "--split", "train", "--output", str(output), *named]) == 0
    first, second = ([json.loads(line) for line in output.read_text().splitlines()] for output in outputs)
    assert len(first) == 96 and first == second
