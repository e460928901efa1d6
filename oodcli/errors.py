"""Errors a user can act on.

Raising one of these anywhere in the library makes the CLI print a single line
(``error: ...``) on stderr and exit with the given code, without a traceback.
Anything else is a bug and keeps its traceback.
"""


class OodError(Exception):
    """A failure of the work that the user can fix (missing store, bad data...). Exit 1."""

    exit_code = 1


class UsageError(OodError):
    """The command was called wrongly (unknown name, conflicting options). Exit 2."""

    exit_code = 2
