"""The `ddp-train` command: parse -> load config -> build data and model from it -> `api.run`, with exit codes."""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from collections.abc import Callable, Sequence
from typing import NoReturn

from torch import nn
from torch.utils.data import Dataset

from ddp_trainer import api, config, data, distributed, models, task_checks
from ddp_trainer.cli import exit_after, loaded_before_meeting, tell_the_others, with_one_config
from ddp_trainer.config import Config
from ddp_trainer.distributed import DistEnv
from ddp_trainer.errors import CliError, UsageError, say
from ddp_trainer.rng import seed_everything

# `ddp-train COMMAND ...`: each module's main(argv) -> exit code; without a command, ddp-train trains.
COMMANDS = {
    "evaluate": "ddp_trainer.cli.evaluate",
    "predict": "ddp_trainer.cli.predict",
    "plot": "ddp_trainer.cli.plot",
    "consolidate": "ddp_trainer.cli.consolidate",
}


def run(cfg: Config, clock: Callable[[], float] = time.monotonic) -> int:
    """Train the run `cfg` describes (data and model from the config) on this rank; returns the exit code."""
    task = task_checks.resolve(cfg.task)

    def build(env: DistEnv) -> tuple[nn.Module, Dataset, Dataset | None]:
        train_set, val_set = data.build_datasets(cfg.data, env, cfg.seed)
        seed_everything(cfg.seed)  # identical initial weights on every rank, whatever the world size
        return models.build_for(cfg.model, train_set, val_set), train_set, val_set

    return api.run(cfg, build, task, clock)[0]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line arguments: an optional YAML file and any number of key=value overrides."""
    parser = argparse.ArgumentParser(
        prog="ddp-train",
        description="Train a model on 1..N ranks (plain python, torchrun or srun) from a YAML config.",
        epilog="example: ddp-train --config configs/digits_mlp.yaml optim.lr=3e-4 trainer.epochs=10\n"
        "other commands: ddp-train evaluate|predict|plot|consolidate --help",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="override any config key")
    return with_one_config(parser, argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `ddp-train` and `python -m ddp_trainer.train` (or `.cli.train`); returns the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    command = argv[0] if argv and argv[0] in COMMANDS else None
    prog = f"ddp-train {command}" if command else "ddp-train"
    try:
        if command is not None:
            return importlib.import_module(COMMANDS[command]).main(argv[1:])
        if argv and "=" not in argv[0] and not argv[0].startswith("-"):  # a mistyped command, or ddp-launch's doctor
            raise UsageError(f"{argv[0]!r} is neither a command ({', '.join(COMMANDS)}) nor a key=value override")
        args = parse_args(argv)
        return run(loaded_before_meeting(lambda: config.load(args.config, args.overrides)))
    except CliError as error:
        # Every rank reaches this on its own (config and files are checked before any collective),
        # so every rank says what is wrong and exits instead of waiting on the others.
        line = f"{prog}: error{distributed.rank_label()}: {error}"
        if error.before_meeting:
            tell_the_others(error, line)
        else:
            say(line, sys.stderr)
        return error.exit_code


def command() -> NoReturn:
    """The `ddp-train` program: main() on the command line's arguments, then exit with its code."""
    exit_after(main)


if __name__ == "__main__":
    command()
