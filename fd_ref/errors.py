"""User-facing errors.

Anything the user can fix (a bad flag, a missing folder, an unknown teacher, a checkpoint of another
architecture) is raised as :class:`UserError`. The scripts catch it at the top level, print its message as
one line (no traceback) and exit with status 2.
"""
from __future__ import annotations


class UserError(Exception):
    """An error caused by the user's input; its message says what is wrong and what to do."""

    exit_code = 2


class RunStopped(Exception):
    """A run that cannot go on for a reason outside this process (a peer rank died or hung). The scripts
    print its message as one line (no traceback) and exit with status 1."""

    exit_code = 1
