"""The terminal: consoles, progress bars with ETA, and quiet third-party loggers."""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    SpinnerColumn,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.progress import Progress as RichBars

from ..distributed import is_main
from ..progress import Progress

# Piped output (logs, CI) gets a wide page instead of rich's 80-column default. Under a launcher
# only rank 0 talks: the other ranks' stdout is quiet, and their stderr carries errors only.
console = Console(width=None if sys.stdout.isatty() else int(os.environ.get("COLUMNS", 160)), quiet=not is_main())
err_console = Console(stderr=True)

_NOISY_LOGGERS = ("transformers", "lm_eval", "lm-eval", "datasets", "accelerate", "evaluate", "huggingface_hub",
                  "urllib3", "filelock", "fsspec", "torch.distributed", "bitsandbytes")


def quiet_libraries(debug: bool = False) -> None:
    """Silence the libraries' own logging and progress bars unless debugging.

    Our rich progress bars and tables are the output; interleaved tqdm bars and INFO lines
    from transformers / lm-eval / datasets would garble them.
    """
    if debug:
        return
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        import huggingface_hub.utils.logging as hub_logging

        hub_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*TypedStorage.*")


def note(message: str) -> None:
    """A one-line remark on stderr (never wrapped, so logs stay greppable); rank 0's only."""
    if not is_main():
        return
    err_console.print(f"[yellow]note:[/] {message}", highlight=False, soft_wrap=True)


def make_progress(transient: bool = False) -> RichBars:
    """A progress bar with count, percentage, elapsed time and ETA (on stderr)."""
    return RichBars(
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=err_console,
        transient=transient,
    )


class RichProgress(Progress):
    """:class:`~lnsdiag.progress.Progress` as rich bars on stderr: one bar per phase, with ETA.

    A finished phase stays on screen, completed; ``transient`` clears every bar at the end.
    """

    def __init__(self, transient: bool = False) -> None:
        self.bars = make_progress(transient)
        self._task: Any = None
        self._name = ""
        self._signal = _SignalAfter.from_env()

    def __enter__(self) -> RichProgress:
        self.bars.start()
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:  # interrupted or failed work keeps its bars where they stopped
            self._finish()
        self.bars.stop()

    def _finish(self) -> None:
        if self._task is not None:
            task = self.bars.tasks[self._task]
            done = task.total if task.total is not None else max(task.completed, 1)
            self.bars.update(self._task, total=done, completed=done, description=self._name)

    def phase(self, name: str, total: float | None = None) -> None:
        if name == self._name and self._task is not None:
            self.bars.update(self._task, total=total)
            return
        self._finish()
        self._name = name
        self._task = self.bars.add_task(name, total=total)

    def advance(self, amount: float = 1, *, detail: str | None = None) -> None:
        if self._task is None:
            self.phase("working")
        self.bars.advance(self._task, amount)
        if detail is not None:
            self.bars.update(self._task, description=f"{self._name} ({detail})")
        if self._signal is not None and amount:
            self._signal.step(self._name)

    def note(self, message: str) -> None:
        self.bars.console.print(f"[yellow]note:[/] {message}", highlight=False, soft_wrap=True)

    @contextmanager
    def interlude(self) -> Iterator[None]:
        """Pause the bars to print something (a table); later phases get fresh bars below it."""
        self._finish()
        self.bars.stop()
        try:
            yield
        finally:
            self.bars = make_progress(self.bars.live.transient)
            self._task, self._name = None, ""
            self.bars.start()


class PlainProgress(Progress):
    """Progress as plain lines on stderr, for logs and pipes (``| tee``, CI) where bars cannot
    redraw: a line when a phase starts, every ``every`` seconds while it runs (done/total,
    percent, elapsed, ETA) and when it ends. ``LNSDIAG_PROGRESS_EVERY`` sets ``every``."""

    def __init__(self, every: float | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.every = float(os.environ.get("LNSDIAG_PROGRESS_EVERY", 10)) if every is None else every
        self.clock = clock
        self._name = ""
        self._total: float | None = None
        self._done = 0.0
        self._detail: str | None = None
        self._started = self._said = 0.0
        self._signal = _SignalAfter.from_env()

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self._finish()

    def _line(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    def _status(self) -> str:
        elapsed = self.clock() - self._started
        done = f"{self._done:g}" + (f"/{self._total:g}" if self._total is not None else "")
        parts = [f"{self._name}{f' ({self._detail})' if self._detail else ''}: {done}"]
        if self._total:
            parts.append(f"{100 * min(self._done / self._total, 1):.0f}%")
        parts.append(f"{_clock(elapsed)} elapsed")
        if self._total and 0 < self._done < self._total:
            parts.append(f"ETA {_clock(elapsed * (self._total - self._done) / self._done)}")
        return ", ".join(parts)

    def _finish(self) -> None:
        if self._name:
            if self._total is not None:
                self._done = self._total
            self._line(self._status() + " — done")
            self._name = ""

    def phase(self, name: str, total: float | None = None) -> None:
        if name == self._name:
            self._total = total
            return
        self._finish()
        self._name, self._total, self._done, self._detail = name, total, 0.0, None
        self._started = self._said = self.clock()
        self._line(f"{name}: started" + (f" ({total:g} to do)" if total is not None else ""))

    def advance(self, amount: float = 1, *, detail: str | None = None) -> None:
        if not self._name:
            self.phase("working")
        self._done += amount
        if detail is not None:
            self._detail = detail
        now = self.clock()
        if now - self._said >= self.every:
            self._said = now
            self._line(self._status())
        if self._signal is not None and amount:
            self._signal.step(self._name)

    def note(self, message: str) -> None:
        self._line(f"note: {message}")

    @contextmanager
    def interlude(self) -> Iterator[None]:
        """Finish the current phase's line before a table is printed."""
        self._finish()
        yield


def _clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class QuietProgress(PlainProgress):
    """The progress of a rank other than 0 under a launcher: nothing shown (rank 0's bar counts
    the job), the test hook kept."""

    def _line(self, text: str) -> None:
        pass

    def note(self, message: str) -> None:
        pass


def progress_display(transient: bool = False) -> RichProgress | PlainProgress:
    """Bars on a terminal, plain periodic lines otherwise (logs, pipes, CI); silent on ranks
    other than 0."""
    if not is_main():
        return QuietProgress()
    return RichProgress(transient) if err_console.is_terminal else PlainProgress()


class _SignalAfter:
    """Test hook: ``LNSDIAG_TEST_SIGNAL="PHASE:N:SIGNAL"`` makes the process send itself SIGNAL
    (KILL, INT...) after the N-th non-empty advance of PHASE, so tests interrupt long work at a
    point given by its own progress, never by a timer. Under a launcher,
    ``LNSDIAG_TEST_SIGNAL_RANK=R`` arms it on rank R only."""

    def __init__(self, phase: str, count: int, signum: int) -> None:
        self.phase, self.count, self.signum, self.seen = phase, count, signum, 0

    @classmethod
    def from_env(cls) -> _SignalAfter | None:
        spec = os.environ.get("LNSDIAG_TEST_SIGNAL")
        if not spec:
            return None
        only = os.environ.get("LNSDIAG_TEST_SIGNAL_RANK")
        if only is not None and only.strip() != os.environ.get("RANK", "0"):
            return None
        try:
            phase, count, name = spec.rsplit(":", 2)
            return cls(phase, int(count), int(getattr(signal, f"SIG{name.upper()}")))
        except (ValueError, AttributeError) as exc:
            raise ValueError(f"LNSDIAG_TEST_SIGNAL={spec!r}: expected PHASE:COUNT:SIGNAL, e.g. variants:2:INT") from exc

    def step(self, phase: str) -> None:
        if phase == self.phase:
            self.seen += 1
            if self.seen == self.count:
                os.kill(os.getpid(), self.signum)


@contextmanager
def status(message: str) -> Iterator[None]:
    """A spinner for work without a count (loading a model); a plain line without a terminal;
    nothing on ranks other than 0."""
    if not is_main():
        yield
        return
    if not err_console.is_terminal:
        print(f"{message} ...", file=sys.stderr, flush=True)
        yield
        return
    with err_console.status(message):
        yield
