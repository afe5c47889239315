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
from collections.abc import Iterator
from contextlib import contextmanager
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


def output_dir(out: str | Path | None, slug: str, command: str) -> Path:
    """The folder a command writes to, created and checked for writability."""
    path = Path(out) if out else DEFAULT_ROOT / slug / command
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".probe-"):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise UserError(f"cannot write to {path}: {reason}") from exc
    return path


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
