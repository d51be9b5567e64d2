"""The one exception type for mistakes in what the user gave us."""


class UsageError(Exception):
    """Bad config, missing file or unreadable checkpoint: reported in one line, exit code 2."""


class TrainingDiverged(Exception):
    """The loss became NaN or infinite and trainer.nonfinite_loss=stop: reported in one line, exit code 3."""
