"""`python -m ddp_trainer.train`: the training command line at the path the design fixes (`ddp_trainer.cli.train`)."""

import sys

from ddp_trainer.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
