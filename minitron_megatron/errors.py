"""The project's error types.

``UserError`` is a mistake in what the user passed (a path, a flag, a file's contents) together with
what to do about it: the CLI prints it as one line and exits with status 2. Any other exception is
a bug (ours or a library's) and keeps its traceback. ``docs/errors.md`` lists every message.
"""

from __future__ import annotations


class UserError(ValueError):
    """A bad input with an actionable message: what is wrong and what to do.

    A ``ValueError`` subclass, so library callers that catch ``ValueError`` keep working."""


class MissingInputError(UserError, FileNotFoundError):
    """A file or directory the user named does not exist (also a ``FileNotFoundError``)."""


class CheckpointError(UserError):
    """A checkpoint path that cannot be used, with what to do about it."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint whose files differ from what was written (checksum mismatch, truncation,
    a file that is not a safe checkpoint)."""


class NonFiniteResultError(UserError):
    """A loss came out NaN or infinite: reporting it as a number would be a silent wrong
    result."""
