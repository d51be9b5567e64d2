"""Exceptions the CLI turns into one line and an exit code of its own."""


class UsageError(Exception):
    """Bad config, missing file or unreadable checkpoint: reported in one line, exit code 2."""


class TrainingDiverged(Exception):
    """The loss became NaN or infinite and trainer.nonfinite_loss=stop: reported in one line, exit code 3."""


class RankLost(Exception):
    """A collective failed because another rank died or stalled: reported in one line naming it, exit code 4."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (or its type's name): what fits in a one-line error."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
