"""The one progress interface long work reports to: phases, and units done within a phase.

Library code takes a ``Progress`` and never knows who watches: the command line passes
``ui.progress_display()`` (bars with ETA, or plain lines in a log), a notebook passes
nothing (:data:`SILENT`) or its own.
"""

from __future__ import annotations


class Progress:
    """Receives progress; this base class ignores it (a notebook's default).

    Contract: ``phase`` starts a named phase of ``total`` units (None when unknown, e.g.
    before the work is planned; a later ``phase`` with the same name only updates the total).
    ``advance`` adds ``amount`` units done in the current phase, with an optional ``detail``
    (say, the latest training loss) shown beside the phase name. ``note`` is a one-line
    remark for the user (resuming, a fallback taken).
    """

    def phase(self, name: str, total: float | None = None) -> None:
        """Start (or re-size) the phase ``name``."""

    def advance(self, amount: float = 1, *, detail: str | None = None) -> None:
        """``amount`` more units of the current phase are done."""

    def note(self, message: str) -> None:
        """Tell the user something worth knowing about the run."""


class Labelled(Progress):
    """Passes progress on with a label before each phase name ("LNS: residual variance"), so
    the parts of a run that repeat the same phases (the twins) can be told apart."""

    def __init__(self, label: str, inner: Progress) -> None:
        self.label, self.inner = label, inner

    def phase(self, name: str, total: float | None = None) -> None:
        self.inner.phase(f"{self.label}: {name}", total)

    def advance(self, amount: float = 1, *, detail: str | None = None) -> None:
        self.inner.advance(amount, detail=detail)

    def note(self, message: str) -> None:
        self.inner.note(f"{self.label}: {message}")


#: Progress nobody watches.
SILENT = Progress()
