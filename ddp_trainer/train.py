"""The `ddp-train` command: parse -> load config -> join ranks -> build -> fit -> tear down, with exit codes."""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from ddp_trainer import config, data, distributed, models
from ddp_trainer.config import Config
from ddp_trainer.errors import TrainingDiverged, UsageError
from ddp_trainer.loggers import RunLogger
from ddp_trainer.preemption import StopSignals
from ddp_trainer.rng import seed_everything
from ddp_trainer.trainer import Trainer

EXIT_USAGE = 2
EXIT_DIVERGED = 3


def run(cfg: Config) -> int:
    """Train one run described by `cfg` on this rank; returns the exit code. Tears down on every exit path."""
    stop = StopSignals()  # from the start: a signal during start-up is acted on at the first step
    env = distributed.setup(cfg.trainer.device, cfg.trainer.dist_timeout_s)
    try:
        bundle = data.build(cfg.data, env, cfg.seed)
        seed_everything(cfg.seed)  # identical initial weights on every rank, whatever the world size
        model = models.build(cfg.model, bundle.input_shape, bundle.num_classes)
        seed_everything(cfg.seed + env.rank)  # then distinct streams per rank (dropout, augmentation)
        logger = RunLogger(Path(cfg.output_dir), env.is_main, cfg.trainer.progress_bar)
        signum = Trainer(cfg, env, model, bundle, logger, stop).fit()
    finally:
        distributed.teardown()
        stop.restore()
    # Stopped by SLURM's warning: requeued, so a success; by another signal: the shell's 128 + signal convention.
    return 0 if signum in (0, signal.SIGUSR2) else 128 + signum


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line arguments: an optional YAML file and any number of key=value overrides."""
    parser = argparse.ArgumentParser(
        prog="ddp-train",
        description="Train a model on 1..N ranks (plain python, torchrun or srun) from a YAML config.",
        epilog="example: ddp-train --config configs/digits_mlp.yaml optim.lr=3e-4 trainer.epochs=10",
    )
    parser.add_argument("--config", help="YAML recipe; without it, the built-in defaults (digits MLP)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="override any config key")
    return parser.parse_intermixed_args(argv)  # overrides may stand before and after --config


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `ddp-train` and `python -m ddp_trainer.train`; returns the process exit code."""
    args = parse_args(argv)
    try:
        return run(config.load(args.config, args.overrides))
    except UsageError as error:
        # Every rank reaches this on its own (config and files are checked before any collective),
        # so every rank says what is wrong and exits instead of waiting on the others.
        print(f"ddp-train: error{distributed.rank_label()}: {error}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    except TrainingDiverged as error:
        print(f"ddp-train: error{distributed.rank_label()}: {error}", file=sys.stderr, flush=True)
        return EXIT_DIVERGED


if __name__ == "__main__":
    sys.exit(main())
