"""The `ddp-train` command: parse -> load config -> join ranks -> build -> fit -> tear down, with exit codes."""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from ddp_trainer import config, data, distributed, models
from ddp_trainer.config import Config, to_container
from ddp_trainer.errors import CliError, say
from ddp_trainer.loggers import RunLogger, require_packages
from ddp_trainer.preemption import StopSignals
from ddp_trainer.rng import seed_everything
from ddp_trainer.trainer import Trainer

# `ddp-train COMMAND ...`: each module's main(argv) -> exit code; without a command, ddp-train trains.
COMMANDS = {
    "evaluate": "ddp_trainer.evaluate",
    "predict": "ddp_trainer.predict",
    "plot": "ddp_trainer.plot",
}


def run(cfg: Config, clock: Callable[[], float] = time.monotonic) -> int:
    """Train one run described by `cfg` on this rank; returns the exit code. Tears down on every exit path.

    `clock` (seconds) times `checkpoint.every_n_minutes`; tests pass their own to leave the wall clock out.
    """
    require_packages(cfg.logging)
    stop = StopSignals()  # from the start: a signal during start-up is acted on at the first step
    env = distributed.setup(cfg.trainer.device, cfg.trainer.dist_timeout_s, cfg.trainer.dist_backend)
    logger = RunLogger(Path(cfg.output_dir), env.is_main, cfg.trainer.progress_bar, cfg.logging, to_container(cfg))
    exit_code = 1  # until fit() returns: an exception marks the wandb run as failed
    try:
        bundle = data.build(cfg.data, env, cfg.seed)
        seed_everything(cfg.seed)  # identical initial weights on every rank, whatever the world size
        model = models.build(cfg.model, bundle.input_shape, bundle.num_classes)
        seed_everything(cfg.seed + env.rank)  # then distinct streams per rank (dropout, augmentation)
        signum = Trainer(cfg, env, model, bundle, logger, stop, clock).fit()
        # Stopped by SLURM's warning: requeued, so a success; by another signal: the shell's 128 + signal convention.
        exit_code = 0 if signum in (0, signal.SIGUSR2) else 128 + signum
    finally:
        logger.finish(exit_code)
        distributed.teardown()
        stop.restore()
    return exit_code


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line arguments: an optional YAML file and any number of key=value overrides."""
    parser = argparse.ArgumentParser(
        prog="ddp-train",
        description="Train a model on 1..N ranks (plain python, torchrun or srun) from a YAML config.",
        epilog="example: ddp-train --config configs/digits_mlp.yaml optim.lr=3e-4 trainer.epochs=10\n"
        "other commands: ddp-train evaluate|predict|plot --help",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="YAML recipe; without it, the built-in defaults (digits MLP)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="override any config key")
    return parser.parse_intermixed_args(argv)  # overrides may stand before and after --config


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `ddp-train` and `python -m ddp_trainer.train`; returns the process exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    command = argv[0] if argv and argv[0] in COMMANDS else None
    prog = f"ddp-train {command}" if command else "ddp-train"
    try:
        if command is not None:
            return importlib.import_module(COMMANDS[command]).main(argv[1:])
        args = parse_args(argv)
        return run(config.load(args.config, args.overrides))
    except CliError as error:
        # Every rank reaches this on its own (config and files are checked before any collective),
        # so every rank says what is wrong and exits instead of waiting on the others.
        say(f"{prog}: error{distributed.rank_label()}: {error}", sys.stderr)
        return error.exit_code


if __name__ == "__main__":
    sys.exit(main())
