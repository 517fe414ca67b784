"""The project's error types.

``UserError`` is a mistake in what the user passed (a path, a flag, a file's contents) together with
what to do about it: the CLI prints it as one line and exits with status 2. Any other exception is
a bug (ours or a library's) and keeps its traceback.
"""

from __future__ import annotations


class UserError(ValueError):
    """A bad input with an actionable message: what is wrong and what to do.

    A ``ValueError`` subclass, so library callers that catch ``ValueError`` keep working."""
