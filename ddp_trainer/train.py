"""`python -m ddp_trainer.train`: the training command line at the path the design fixes (`ddp_trainer.cli.train`)."""

import sys
from importlib.util import find_spec

if find_spec("torch") is None:  # a batch script's PYTHON without the dependencies: one line per rank, no traceback
    print(
        f"ddp-train: error: {sys.executable} cannot import torch: run the Python that has ddp-trainer's dependencies "
        "(the sbatch scripts take it from PYTHON, e.g. PYTHON=.venv/bin/python)",
        file=sys.stderr,
    )
    sys.exit(2)

from ddp_trainer.cli.train import command  # noqa: E402 (after the check: it imports torch)

if __name__ == "__main__":
    command()
