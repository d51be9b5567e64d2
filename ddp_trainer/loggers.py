"""Rank 0's outputs: console lines and progress bar, metrics.jsonl, config.yaml, TensorBoard, W&B. Other ranks: none."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.util
import json
import numbers
import os
import re
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, TypeVar

from tqdm import tqdm

from ddp_trainer import atomic
from ddp_trainer.config import LoggingConfig
from ddp_trainer.errors import CliError, UsageError, first_line

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter
    from wandb import Run

Item = TypeVar("Item")
# Every scalar's x axis, in TensorBoard and W&B alike: the optimizer step, which a resumed run continues.
STEP_KEY = "step"
# Running metrics get their own names so they never mix with the epoch values of the same quantity.
RUNNING_PREFIX = "step/"
WANDB_RUN_FOLDER = re.compile(r"(?:offline-)?run-(\d{8}_\d{6})-([a-z0-9]{1,64})")  # (start time, run id)
FINISHED_PREFIX = "finished-"  # beside the runs' folders, a file per run that finished: no restart continues it


class RunLogger:
    """Writes the run's outputs from rank 0; the other ranks write nothing."""

    def __init__(
        self,
        output_dir: Path,
        is_main: bool,
        progress_bar: bool,
        logging_cfg: LoggingConfig | None = None,
        run_config: dict[str, Any] | None = None,
    ) -> None:
        self.output_dir, self.is_main = output_dir, is_main
        self.logging_cfg = logging_cfg if logging_cfg is not None else LoggingConfig()
        self.run_config = run_config
        self.metrics_path = output_dir / "metrics.jsonl"
        # A bar redrawn into a log file is noise; only draw it for a person watching a terminal.
        self.show_bar = is_main and progress_bar and sys.stderr.isatty()
        self.bar: tqdm | None = None
        self.samples_per_batch = 0
        self.tensorboard: SummaryWriter | None = None
        self.wandb_run: Run | None = None
        self.wandb_run_id: str | None = None

    def start(
        self, config_yaml: str, completed_epochs: int, wandb_run_id: str | None = None, resumed_step: int = 0
    ) -> None:
        """Write config.yaml, keep only the history the resumed checkpoint holds, open the enabled loggers.

        `completed_epochs` and `resumed_step` are that history's (0 and 0: none); its W&B run, if any, is continued.
        """
        # Kept even while W&B is off, so a checkpoint still names the run should a later resume turn it back on.
        self.wandb_run_id = wandb_run_id
        if not self.is_main:
            return
        try:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            # Events a crashed attempt wrote after the checkpoint's step (all of them, with no checkpoint) are
            # dropped: the run redoes those steps. So are those of a line dropped below (a part epoch now finished).
            self._open_loggers(min(resumed_step + 1, self._keep_lines(completed_epochs)), wandb_run_id)
            # Once W&B took the run: a run it refuses leaves config.yaml as it was (or none). Replaced whole, never
            # truncated in place: a kill, or a reader (plot, tail), never finds it empty.
            atomic.write_atomic(self.output_dir / "config.yaml", lambda file: file.write(config_yaml.encode()))
        except OSError as error:  # a folder the up-front check cannot judge: /proc, a read-only mount, a full disk
            raise UsageError(f"output_dir={self.output_dir} cannot be written: {error.strerror or error}") from None

    def _open_loggers(self, purge_step: int | float, wandb_run_id: str | None) -> None:
        if self.logging_cfg.tensorboard:
            tensorboard = _import_optional("torch.utils.tensorboard", "logging.tensorboard=true")
            self.tensorboard = tensorboard.SummaryWriter(str(self.output_dir / "tensorboard"), purge_step=purge_step)
        if self.logging_cfg.wandb.mode != "disabled":
            self.wandb_run = self._start_wandb(wandb_run_id)
            self.wandb_run_id = self.wandb_run.id

    def _keep_lines(self, completed_epochs: int) -> int | float:
        """Drop the metrics lines of epochs after `completed_epochs`; the first dropped line's step (inf: none)."""
        if not self.metrics_path.exists():
            return float("inf")
        # A crash between writing an epoch's line and its checkpoint would otherwise repeat that epoch's line.
        text = self.metrics_path.read_text()
        lines = [(line, _epoch_of(line) <= completed_epochs) for line in text.splitlines()]
        kept = "".join(line + "\n" for line, keep in lines if keep)
        if kept != text:  # also a last line the crash cut before its newline: the next line must not join it
            atomic.write_atomic(self.metrics_path, lambda file: file.write(kept.encode()))
        return min((_step_of(line) for line, keep in lines if not keep), default=float("inf"))

    def _start_wandb(self, run_id: str | None) -> Run:
        settings = self.logging_cfg.wandb
        wandb = _import_optional("wandb", f"logging.wandb.mode={settings.mode}")
        # resume="allow" with the checkpoint's id: a resumed or requeued job appends to the same run. Without one, the
        # run an attempt that crashed before its first checkpoint began here, else a fresh one (or WANDB_RUN_ID's).
        run_id = run_id or _attempt_run_id(self.output_dir / "wandb")
        try:
            run = wandb.init(  # logging.wandb's keys (mode, project, name, entity) are wandb.init's
                **dataclasses.asdict(settings),
                dir=str(self.output_dir),
                config=self.run_config,
                id=run_id,
                resume="allow",
            )
        except wandb.errors.Error as error:  # a project name it refuses; online without a login
            given = ", ".join(f"{key}={value!r}" for key, value in dataclasses.asdict(settings).items() if value)
            raise UsageError(f"logging.wandb ({given}): W&B refused to start: {first_line(error)}") from None
        # W&B's own step counts log calls; plotting against ours keeps a resumed run's points in place.
        run.define_metric(STEP_KEY)
        run.define_metric("*", step_metric=STEP_KEY)
        return run

    def progress(
        self, batches: Iterable[Item], total: int | None, description: str, samples_per_batch: int = 0, done: int = 0
    ) -> Iterator[Item]:
        """Iterate `batches` with a bar on rank 0 when stderr is a terminal; `samples_per_batch` is the global batch.

        `done`: the batches of `total` trained before a resume, where the bar starts (and its ETA counts from).
        """
        if not self.show_bar:
            yield from batches
            return
        self.samples_per_batch = samples_per_batch
        bar = tqdm(batches, total=total, initial=done, desc=description, leave=False, dynamic_ncols=True)
        with bar as self.bar:
            yield from self.bar
        self.bar = None

    def show_running(self, metrics: dict[str, float], step: int) -> None:
        """Put the latest global running metrics on the progress bar and log them as `step/<name>` at `step`."""
        if not self.is_main:
            return
        if self.bar is not None:
            self.bar.set_postfix(self._postfix(metrics))
        self._write_scalars({RUNNING_PREFIX + name: value for name, value in metrics.items()}, step)

    def _postfix(self, metrics: dict[str, float]) -> dict[str, str]:
        postfix = {
            name.split("/", 1)[1]: _format(name, value, percent_digits=1)  # a bar has little room
            for name, value in metrics.items()
            if name.startswith("train/") and name != "train/grad_norm"
        }
        timing = self.bar.format_dict
        # tqdm's smoothed rate needs a few redraws; until then the average since the bar started stands in.
        batches_per_s = timing["rate"] or (
            (timing["n"] - timing["initial"]) / timing["elapsed"] if timing["elapsed"] else 0
        )
        if self.samples_per_batch and batches_per_s:
            postfix["samples/s"] = f"{batches_per_s * self.samples_per_batch:,.0f}"
        return postfix

    def info(self, message: str) -> None:
        """Print one line on rank 0 (above the progress bar while one is drawn)."""
        if self.is_main:
            try:
                if self.bar is not None:  # printed as is, the line would start where the bar's text ends
                    self.bar.write(message, file=sys.stdout)
                    sys.stdout.flush()  # tqdm.write does not: piped (| tee), the line would wait for the epoch's end
                else:
                    print(message, flush=True)
            except OSError:  # a closed pipe (`| head -1`) or a full disk: the run and its checkpoints matter more
                _silence_stdout()

    def log_epoch(self, record: dict[str, Any], epochs: int) -> None:
        """Append the epoch's global metrics to metrics.jsonl, print them and log them at `record["step"]`."""
        if not self.is_main:
            return
        try:
            with self.metrics_path.open("a") as file:
                file.write(json.dumps(record) + "\n")
        except OSError as error:  # a full disk: the epoch's checkpoint is not written either, the last one stands
            raise CliError(
                f"could not write {self.metrics_path} ({error.strerror or error}); every earlier checkpoint is intact"
            ) from None
        validation = format_metrics(record)
        self.info(
            f"epoch {record['epoch']}/{epochs} step {record['step']} | train/loss {record['train/loss']:.4f} "
            f"| {validation + ' | ' if validation else ''}{record['time/epoch_s']:.1f}s"
        )
        self._write_scalars({name: value for name, value in record.items() if name != STEP_KEY}, record[STEP_KEY])
        if self.tensorboard is not None:
            self.tensorboard.flush()  # an epoch is rare and worth keeping should the job be killed before close

    def _write_scalars(self, values: dict[str, Any], step: int) -> None:
        scalars = {name: value for name, value in values.items() if is_number(value)}
        if self.tensorboard is not None:
            for name, value in scalars.items():
                self.tensorboard.add_scalar(name, value, global_step=step)
        if self.wandb_run is not None:
            self.wandb_run.log({STEP_KEY: step, **scalars})

    def finish(self, exit_code: int = 0) -> None:
        """Flush and close TensorBoard and W&B (marked failed unless exit_code is 0); safe to call again."""
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None
        if self.wandb_run is not None:
            self.wandb_run.finish(exit_code=exit_code)
            if exit_code == 0:  # a run started afresh here later is a W&B run of its own, not this one continued
                (self.output_dir / "wandb" / f"{FINISHED_PREFIX}{self.wandb_run.id}").touch()
            self.wandb_run = None


def _silence_stdout() -> None:
    """Point stdout at /dev/null: what is still buffered, and every later line, goes nowhere instead of failing."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    with contextlib.suppress(OSError, ValueError):  # a stdout without a file descriptor keeps failing, and is caught
        os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)  # stdout's descriptor now refers to /dev/null itself


def format_metrics(record: dict[str, Any]) -> str:
    """`val/loss 0.1234 | val/accuracy 97.21%`: a record's validation metrics, counts left out."""
    shown = [(name, value) for name, value in record.items() if name.startswith("val/") and is_number(value)]
    return " | ".join(f"{name} {_format(name, value)}" for name, value in shown if not name.endswith("/samples"))


def _format(name: str, value: float, percent_digits: int = 2) -> str:
    return f"{100 * value:.{percent_digits}f}%" if name.endswith("accuracy") else f"{value:.4f}"


def require_packages(cfg: LoggingConfig) -> None:
    """Fail on every rank, before ranks meet, when an enabled logger's package is missing (only rank 0 imports it)."""
    needed = {"tensorboard": "logging.tensorboard=true"} if cfg.tensorboard else {}
    if cfg.wandb.mode != "disabled":
        needed["wandb"] = f"logging.wandb.mode={cfg.wandb.mode}"
    for package, key in needed.items():
        if importlib.util.find_spec(package) is None:
            raise UsageError(f"{key} needs the {package} package: pip install 'ddp-trainer[logging]'")


def _attempt_run_id(wandb_dir: Path) -> str | None:
    """The id of the newest W&B run in `wandb_dir` (a folder `[offline-]run-<time>-<id>`) that did not finish; None."""
    found = [match.groups() for path in wandb_dir.glob("*run-*") if (match := WANDB_RUN_FOLDER.fullmatch(path.name))]
    unfinished = [(start, run) for start, run in found if not (wandb_dir / f"{FINISHED_PREFIX}{run}").exists()]
    return max(unfinished, default=(None, None))[1]


def _import_optional(module: str, key: str) -> ModuleType:
    """Import a logger's package, or say which setting needs it and how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise UsageError(
            f"{key} needs a package that is not installed ({error}): pip install 'ddp-trainer[logging]'"
        ) from error


def is_number(value: Any) -> bool:
    """Whether a record's value is a number to plot or log as a scalar (JSON's true and false are not)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _record(line: str) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, RecursionError):
        return None  # a half-written last line from a crash
    return record if isinstance(record, dict) else None  # no line of ours


def _epoch_of(line: str) -> float:
    record = _record(line)
    epoch = None if record is None else record.get("epoch", 0)
    return epoch if is_number(epoch) else float("inf")  # a cut line, or one not of ours, is dropped


def last_record(metrics: Path) -> dict[str, Any]:
    """The last whole record of a run's metrics.jsonl ({} without one); a line a crash cut is passed over."""
    lines = metrics.read_text().splitlines() if metrics.is_file() else []
    return next((record for record in map(_record, reversed(lines)) if record is not None), {})


def recorded_steps(metrics: Path) -> list[int]:
    """The steps of a run's metrics.jsonl records, in order (none without the file); a line a crash cut is left out."""
    lines = metrics.read_text().splitlines() if metrics.is_file() else []
    return [step for step in map(_step_of, lines) if step != float("inf")]


def _step_of(line: str) -> float:
    step = (_record(line) or {}).get(STEP_KEY)
    return step if isinstance(step, int) and not isinstance(step, bool) else float("inf")  # no step: purges nothing
