"""The terminal: consoles, progress bars with ETA, and quiet third-party loggers."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

# Piped output (logs, CI) gets a wide page instead of rich's 80-column default.
console = Console(width=None if sys.stdout.isatty() else int(os.environ.get("COLUMNS", 160)))
err_console = Console(stderr=True)

_NOISY_LOGGERS = ("transformers", "lm_eval", "lm-eval", "datasets", "accelerate", "evaluate", "huggingface_hub",
                  "urllib3", "filelock", "fsspec", "torch.distributed")


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
    """A one-line remark on stderr (never wrapped, so logs stay greppable)."""
    err_console.print(f"[yellow]note:[/] {message}", highlight=False, soft_wrap=True)


def make_progress(transient: bool = False) -> Progress:
    """A progress bar with count, percentage, elapsed time and ETA (on stderr)."""
    return Progress(
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


@contextmanager
def status(message: str) -> Iterator[None]:
    """A spinner for work without a count (loading a model)."""
    with err_console.status(message):
        yield
