"""Errors a user can cause and can fix without reading a traceback."""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's input (path, id, option, file).

    The command line prints its message as one line on stderr and exits non-zero; a
    notebook sees an ordinary exception with the same message.
    """


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during long work, with what was saved (the command line prints it, exit 130)."""
