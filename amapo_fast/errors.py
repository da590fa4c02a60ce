"""The kinds of user error behind a training run's own checks: bad data, a diverged run, a damaged
checkpoint, a busy output folder. Each is a `cli.UserError`, so the command lines print it as one line."""
from .cli import UserError


class DataError(UserError):
    """A dataset file or row that cannot be read as preference pairs."""


class NonFiniteError(UserError):
    """A loss, gradient norm, weight or log-prob that is NaN or infinite."""


class CheckpointError(UserError):
    """A checkpoint folder that is incomplete, damaged or cannot be used by this run."""


class OutputDirBusyError(UserError):
    """Another live run writes to the same output folder."""
