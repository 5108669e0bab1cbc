"""Exceptions that carry a message meant for the user: the cause and the fix, on one line where possible.

The command line prints these without a traceback; anything else is a bug and keeps its traceback.
"""


class DistillError(Exception):
    """Base class of every error whose message tells the user what went wrong and how to fix it."""


class InputError(DistillError, ValueError):
    """A tensor, file or value handed to the library does not have the form it needs."""


class NoReadableImage(InputError):
    """Not one image of a data source could be decoded, so there is nothing to compute."""


class UnknownConfigKey(InputError):
    """A config key the schema does not have; `key` is its dotted name, for callers that can say more of it."""

    def __init__(self, message: str, key: str) -> None:
        super().__init__(message)
        self.key = key


class CheckpointError(DistillError, RuntimeError):
    """A checkpoint file cannot be read safely, or does not fit the model it is loaded into."""


class UnknownArchitecture(CheckpointError):
    """Weights whose architecture cannot be told from the file alone: the caller must name it."""
