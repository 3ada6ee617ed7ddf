"""User-facing errors.

Every error a user can fix (bad file, bad argument, unsupported module) is a
:class:`TracInError` carrying one sentence that names the thing and the fix.
The command-line tool prints that sentence and exits with code 2, without a traceback.
"""


class TracInError(ValueError):
    """A problem with the user's input that the user can fix."""


class CheckpointError(TracInError):
    """A checkpoint file is missing, unreadable, unsafe, or does not match the model."""


class UnsupportedModuleError(TracInError):
    """A module with trainable parameters in scope has no exact per-example kernel."""


class DataError(TracInError):
    """A dataset is empty, malformed, or produced a non-finite loss."""
