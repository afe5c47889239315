"""Where results go and how they are written: atomically, with a record of how they were made.

Every command writes into ``results/<model-slug>/<command>/`` unless told otherwise, and
every file is written to a temporary name first and renamed, so a crash never leaves half
a CSV behind.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import UserError

DEFAULT_ROOT = Path("results")


def cache_dir() -> Path:
    """Where lnsdiag keeps what it can rebuild (the demo models, the stdlib corpus).

    ``LNSDIAG_CACHE`` wins, then ``$XDG_CACHE_HOME/lnsdiag``, then ``~/.cache/lnsdiag``.
    """
    if os.environ.get("LNSDIAG_CACHE"):
        return Path(os.environ["LNSDIAG_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "lnsdiag"


#: Output folders this process created, oldest first: removed again if a command fails before
#: writing anything into them (a bad input must not leave an empty folder behind).
_CREATED: list[Path] = []


def output_dir(out: str | Path | None, slug: str, command: str, *, create: bool = True) -> Path:
    """The folder a command writes to, checked for writability and created unless ``create=False``.

    Commands call it once with ``create=False`` before any slow work (so an unwritable ``--out``
    fails before a 7B model loads) and again when they are about to write.
    """
    path = Path(out) if out else DEFAULT_ROOT / slug / command
    if not create:
        _check_writable(path)
        return path
    missing = [p for p in (path, *path.parents) if not p.exists()]
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".probe-"):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise UserError(f"cannot write to {path}: {reason}") from exc
    if missing:
        _CREATED.append(missing[-1])
    return path


def _check_writable(path: Path) -> None:
    """Raise UserError unless ``path`` is, or could be created as, a writable folder."""
    existing = next(p for p in (path, *path.parents, Path(".")) if p.exists())
    if not existing.is_dir():
        raise UserError(f"cannot write to {path}: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"cannot write to {path}: Permission denied")


def discard_empty_outputs() -> None:
    """Remove the output folders this process created and left empty (after a failed command)."""
    while _CREATED:
        top = _CREATED.pop()
        if not top.is_dir():
            continue
        dirs = sorted((p for p in top.rglob("*")), key=lambda p: len(p.parts), reverse=True)
        if any(not p.is_dir() for p in dirs):
            continue
        for d in dirs:
            d.rmdir()
        top.rmdir()


def atomic_write(path: str | Path, data: str | bytes) -> Path:
    """Write ``data`` to ``path`` via a temporary file and an atomic rename."""
    path = Path(path)
    mode = "wb" if isinstance(data, bytes) else "w"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **({} if isinstance(data, bytes) else {"encoding": "utf-8"})) as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write(path, json.dumps(obj, indent=2, default=jsonable) + "\n")


def write_csv(path: str | Path, frame: Any) -> Path:
    """A pandas DataFrame as CSV, floats at full precision."""
    return atomic_write(path, frame.to_csv(index=False, float_format="%.10g", lineterminator="\n"))


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def jsonable(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


def versions() -> dict[str, str | None]:
    """Versions of everything that can change a number, for the JSON record."""
    import importlib.metadata as md

    import torch

    out: dict[str, str | None] = {"python": platform.python_version()}
    for pkg in ("lnsdiag", "torch", "transformers", "lm-eval", "accelerate", "datasets", "tokenizers"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    out["cuda"] = torch.version.cuda if torch.cuda.is_available() else None
    out["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    out["platform"] = platform.platform()
    return out


class Timer:
    """Named wall-clock timings, collected for meta.json."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._start = time.perf_counter()

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - start, 4)

    def total(self) -> float:
        return round(time.perf_counter() - self._start, 4)


def run_record(command: str, *, model: dict[str, Any] | None = None, **fields: Any) -> dict[str, Any]:
    """The JSON record of how a result was produced."""
    return {
        "command": command,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": model,
        **fields,
        "versions": versions(),
    }


@dataclass
class RunFiles:
    """What a result wrote: its tables and its records, each list in the order written."""

    tables: list[Path]
    records: list[Path]

    def around(self, presented: Sequence[Path]) -> list[Path]:
        """Every file in the order a command lists them: the tables, ``presented``, the records."""
        return [*self.tables, *presented, *self.records]


def write_tables(folder: Path, tables: Mapping[str, Any], meta: dict[str, Any]) -> RunFiles:
    """Each table as ``folder/name`` (CSV, atomically), then ``meta.json``: the usual run's files."""
    written = [write_csv(folder / name, frame) for name, frame in tables.items()]
    return RunFiles(written, [write_json(folder / "meta.json", meta)])
