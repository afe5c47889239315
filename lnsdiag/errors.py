"""Errors a user can cause and can fix without reading a traceback."""

from __future__ import annotations

import functools
import string
from collections.abc import Callable
from typing import Any


class UserError(Exception):
    """A mistake in the user's input (path, id, option, file).

    The command line prints its message as one line on stderr and exits non-zero; a
    notebook sees an ordinary exception with the same message.
    """


class OptionError(UserError):
    """A bad value of a config field, naming the field where the user set it.

    The message is a template: a placeholder given a value (``value=...``) shows that value,
    every other placeholder is a field's name. ``str()`` shows the field as the library
    spells it (``layers``), for a notebook; the command line renders it as the flag that
    sets it (``--layers``) with :meth:`render`::

        OptionError("{remove} must be at least 1, not {value}", value=0)
    """

    def __init__(self, template: str, **values: Any) -> None:
        self.template, self.values = template, values
        super().__init__(self.render())

    @property
    def fields(self) -> tuple[str, ...]:
        """The config fields the message names, in order."""
        named = (name for _, name, _, _ in string.Formatter().parse(self.template) if name)
        return tuple(dict.fromkeys(n for n in named if n not in self.values))

    def render(self, name: Callable[[str], str] = str) -> str:
        """The message with each field shown as ``name(field)`` (default: the field itself)."""
        return self.template.format_map(_Fields(self.values, name))

    def __reduce__(self) -> tuple[Any, ...]:
        return functools.partial(type(self), self.template, **self.values), ()


class _Fields(dict):
    """The values of an :class:`OptionError`; a placeholder without one is a field, shown by ``name``."""

    def __init__(self, values: dict[str, Any], name: Callable[[str], str]) -> None:
        super().__init__(values)
        self.name = name

    def __missing__(self, key: str) -> str:
        return self.name(key)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during long work, with what was saved (the command line prints it, exit 130)."""
