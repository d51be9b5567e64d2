"""`ddp-train plot`: the figure holds the file's values, the PNG is real, bad input is one line and exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import cli_env

from ddp_trainer.cli.plot import main, plot_metrics, read_epochs
from ddp_trainer.cli.train import main as ddp_train

RECORDS = [
    {"epoch": 1, "step": 10, "train/loss": 1.5, "train/accuracy": 0.4, "val/loss": 1.25, "val/accuracy": 0.5},
    {"epoch": 2, "step": 20, "train/loss": 1.0, "train/accuracy": 0.6},  # e.g. a line from before validation ran
    {"epoch": 3, "step": 30, "train/loss": 0.5, "train/accuracy": 0.8, "val/loss": 0.75, "val/accuracy": 0.7},
]


def write_metrics(run_dir, lines: list[str]):
    """A run directory holding metrics.jsonl with `lines`."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))
    return run_dir / "metrics.jsonl"


def test_panels_plot_each_splits_values_at_the_epochs_that_have_them(tmp_path):
    file = write_metrics(tmp_path, [json.dumps(record) for record in RECORDS] + ['{"note": "not an epoch"}'])
    figure = plot_metrics(read_epochs(file))
    plotted = {
        (axes.get_title(), line.get_label()): (list(line.get_xdata()), list(line.get_ydata()))
        for axes in figure.axes
        for line in axes.get_lines()
    }
    assert plotted == {
        ("loss", "train"): ([1, 2, 3], [1.5, 1.0, 0.5]),
        ("loss", "val"): ([1, 3], [1.25, 0.75]),
        ("accuracy", "train"): ([1, 2, 3], [0.4, 0.6, 0.8]),
        ("accuracy", "val"): ([1, 3], [0.5, 0.7]),
    }


def test_plot_command_writes_a_png_next_to_the_metrics_of_a_run_dir(tmp_path, capsys):
    from matplotlib.image import imread

    write_metrics(tmp_path / "run", [json.dumps(record) for record in RECORDS])
    assert ddp_train(["plot", str(tmp_path / "run")]) == 0
    png = tmp_path / "run" / "metrics.png"
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    height, width, channels = imread(png).shape
    assert (width, height) == (1000, 400) and channels in (3, 4)  # figsize 10 x 4 inches at 100 dpi
    assert capsys.readouterr().out == f"wrote {png}\n"


def test_plot_output_option_names_the_png(tmp_path):
    file = write_metrics(tmp_path / "run", [json.dumps(record) for record in RECORDS])
    assert main([str(file), "--output", str(tmp_path / "figures" / "run.png")]) == 0
    assert (tmp_path / "figures" / "run.png").stat().st_size > 10_000
    assert not (tmp_path / "run" / "metrics.png").exists()


def test_plot_output_that_is_not_a_png_is_refused_in_one_line(tmp_path, capsys):
    file = write_metrics(tmp_path / "run", [json.dumps(record) for record in RECORDS])
    for output in (file, tmp_path / "run", tmp_path / "figure"):  # a typo for the input, a folder, no suffix
        assert ddp_train(["plot", str(file), "--output", str(output)]) == 2
        assert f"--output {output} must name a .png file" in capsys.readouterr().err
    assert sorted(path.name for path in tmp_path.iterdir()) == ["run"] and file.read_text().count("\n") == 3


def test_a_full_disk_keeps_the_old_png_and_leaves_no_partial_file(tmp_path, capsys, monkeypatch):
    from matplotlib.figure import Figure

    write_metrics(tmp_path / "run", [json.dumps(record) for record in RECORDS])
    assert ddp_train(["plot", str(tmp_path / "run")]) == 0
    png = tmp_path / "run" / "metrics.png"
    old_png = png.read_bytes()

    def savefig_on_a_full_disk(figure, target, **kwargs):
        """Writes the start of a PNG, then fails as savefig does when the disk fills up."""
        if hasattr(target, "write"):  # an open file or a path: savefig takes either
            target.write(old_png[:100])
        else:
            Path(target).write_bytes(old_png[:100])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", savefig_on_a_full_disk)
    capsys.readouterr()
    assert ddp_train(["plot", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err == f"ddp-train plot: error: cannot write {png}: No space left on device\n"
    assert png.read_bytes() == old_png
    assert sorted(path.name for path in png.parent.iterdir()) == ["metrics.jsonl", "metrics.png"]


def test_missing_run_gives_one_error_line_naming_it_and_exit_2(tmp_path, capsys):
    assert ddp_train(["plot", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err == (
        f"ddp-train plot: error: {tmp_path / 'nope'} does not exist (give a run directory or its metrics.jsonl)\n"
    )


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        ([], "has no epoch lines"),
        (['{"note": "no epoch"}'], "has no epoch lines"),
        ([json.dumps(RECORDS[0]), '{"epoch": 2, "train'], "line 2 is not valid JSON"),
        (["[" * 100_000 + "]" * 100_000], "line 1 is not valid JSON"),  # a RecursionError traceback, before
        (
            ['{"epoch": 1, "train/loss": 1e308}', '{"epoch": 2, "train/loss": -1e308}'],
            "line 1: train/loss is 1e+308, too",
        ),
        ([json.dumps(RECORDS[0]), '{"epoch": 2, "train/loss": {"a": 1}}'], "line 2: train/loss is {'a': 1}, not a"),
        (['{"epoch": "one", "val/loss": 0.5}'], "line 1: epoch is 'one', not a number"),
    ],
)
def test_bad_metrics_give_one_error_line_naming_the_file_and_exit_2(tmp_path, capsys, lines, expected):
    file = write_metrics(tmp_path / "run", lines)
    assert ddp_train(["plot", str(tmp_path / "run")]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"ddp-train plot: error: {file} {expected}") and error.count("\n") == 1
    assert not (tmp_path / "run" / "metrics.png").exists()


def test_a_last_line_cut_short_by_a_crash_is_left_out_and_the_epochs_before_it_drawn(tmp_path, capsys):
    # The trainer drops such a line when the run resumes; until then plot refused the whole file.
    file = write_metrics(tmp_path / "run", [json.dumps(record) for record in RECORDS[:2]])
    file.write_text(file.read_text() + json.dumps(RECORDS[2])[:30])
    assert ddp_train(["plot", str(tmp_path / "run")]) == 0
    assert capsys.readouterr().err == f"{file} line 3 was cut short as it was written: left out\n"
    assert (tmp_path / "run" / "metrics.png").stat().st_size > 0


def test_importing_the_plot_command_does_not_load_matplotlib():
    script = "import sys, ddp_trainer.cli.plot; print([name for name in sys.modules if name.startswith('matplotlib')])"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=cli_env())
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_a_file_naming_thousands_of_metrics_is_refused_not_drawn_for_minutes(tmp_path, capsys):
    write_metrics(tmp_path / "run", [json.dumps({"epoch": 1, **{f"train/m{index}": 1.0 for index in range(3000)}})])
    assert ddp_train(["plot", str(tmp_path / "run")]) == 2
    assert "the file names 3001 metrics, more than the 24 panels plot draws" in capsys.readouterr().err
