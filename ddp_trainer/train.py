"""`python -m ddp_trainer.train`: the training command line at the path the design fixes (`ddp_trainer.cli.train`)."""

from ddp_trainer.cli.train import command

if __name__ == "__main__":
    command()
