"""The CLI's two error kinds, in a module of their own so that every command module can raise them without
importing `cli.main` (which imports the command modules: that cycle loaded `cli.main` twice under
`python -m cli.main`, giving two `UsageError` classes and a traceback instead of one line).

`CLIError`: a known failure (cluster unreachable, run missing), one actionable line, exit 1.
`UsageError`: bad input from the user, one line, exit 2; nothing was created.
"""

from __future__ import annotations


class CLIError(Exception):
    """A known failure, reported as one actionable line (exit 1)."""

    exit_code = 1


class UsageError(CLIError):
    """Bad input from the user (exit 2); nothing was created."""

    exit_code = 2
