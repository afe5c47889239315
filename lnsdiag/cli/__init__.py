"""The ``lnsdiag`` command line: parse options, call the library, hand results to report.

Every command is a thin wrapper over functions a notebook can call. One module per
command family; importing them registers their commands on ``app``.
"""

from __future__ import annotations

from . import angular, demo, depth, inspect, prune  # noqa: F401  (registers commands)
from .common import app


def main() -> None:
    """Console-script entry point."""
    app()


__all__ = ["app", "main"]
