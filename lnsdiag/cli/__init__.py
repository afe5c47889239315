"""The ``lnsdiag`` command line: parse options, make one library call, show the result.

Every command is a thin wrapper over a library runner a notebook can call too. One module
per command (``show`` holds the presenters they share); importing a module registers its
commands on ``app``.
"""

from __future__ import annotations

import importlib

from .common import app

#: Command modules, in the order ``lnsdiag --help`` lists their commands.
COMMANDS = ("angular", "prune", "shrink", "demo", "variance", "reproduce", "compare", "inspect", "export",
            "lm_eval")

for _module in COMMANDS:
    importlib.import_module(f"{__name__}.{_module}")


def main() -> None:
    """Console-script entry point."""
    app()


__all__ = ["app", "main"]
