"""User errors: mistakes in what the user gave us (paths, data, configs, checkpoints), not bugs.

Library code raises a :class:`UserError` (or a subclass) with a message that names the bad input
and, where there is one, the fix. The CLI (``movekd.cli.main``) prints such errors as one
``movekd: error: ...`` line (or a short list) and exits non-zero; ``movekd --debug`` shows the
traceback. Any other exception is a bug in movekd and keeps its traceback.

Subclasses also derive from the builtin type that older callers catch (``ValueError``,
``RuntimeError``, ``FileNotFoundError``), so ``except ValueError`` keeps working.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input; the message says what and where."""

    exit_code = 2


class OptionError(UserError, ValueError):
    """A command argument or option value that is not one of those accepted (the message lists them)."""


class DataError(UserError, ValueError):
    """A data file that cannot be used: missing, malformed, or with too many bad samples."""


class ImageError(UserError, ValueError):
    """An image file that cannot be decoded."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be read, does not fit the config, or must not be written."""


class TrainingInterrupted(UserError):
    """SIGTERM/SIGINT during training: a checkpoint was written at the step boundary."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum
