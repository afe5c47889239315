"""Where results go and how they are written: atomically, with a record of how they were made.

Every command writes into ``results/<model-slug>/<command>/`` unless told otherwise, and
every file is written to a temporary name first and renamed, so a crash never leaves half
a CSV behind. Files and folders get the user's umask, as any other program's would (results
on a shared filesystem must be readable by the group that shares them). A folder written as a
whole (a checkpoint) is staged in a hidden folder marked with the process that made it
(:func:`staging_folder`), so what a killed process left is recognised and removed by the next
run (:func:`remove_stale_staging`), never what a live one is writing.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import socket
import tempfile
import threading
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
    """Write ``data`` to ``path`` via a temporary file and an atomic rename; the file gets the
    user's umask (``mkstemp`` alone would leave it ``-rw-------``)."""
    path = Path(path)
    mode = "wb" if isinstance(data, bytes) else "w"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        _chmod(fd, tmp, file_mode())
        with os.fdopen(fd, mode, **({} if isinstance(data, bytes) else {"encoding": "utf-8"})) as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# --- the user's umask -------------------------------------------------------------------------

_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process's umask, read without changing it where the system says it (Linux's
    ``/proc/self/status``); elsewhere set and restored at once (``os.umask`` is the only way
    to read it there, and is process-wide: a file another thread creates meanwhile gets the
    stricter mask)."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o077)
        os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a new file gets from ``open()``: 0666 less the umask."""
    return 0o666 & ~current_umask()


def folder_mode() -> int:
    """The mode a new folder gets from ``mkdir``: 0777 less the umask."""
    return 0o777 & ~current_umask()


def _chmod(fd: int, path: str | Path, mode: int) -> None:
    if os.chmod in os.supports_fd:
        os.chmod(fd, mode)
    else:
        os.chmod(path, mode)


# --- which process made something, and whether it still runs -------------------------------------

def process_stamp() -> dict[str, Any]:
    """This process, as a lock file or a staging folder records its maker: PID and host, and what
    tells a later process whether that PID is still this process (boot, PID namespace, start)."""
    pid = os.getpid()
    stat = _proc_stat(pid)
    return {"pid": pid, "host": socket.gethostname(), "boot": _read_text("/proc/sys/kernel/random/boot_id"),
            "pid_namespace": _pid_namespace(), "start_ticks": stat[1] if stat else None,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def process_gone(stamp: dict[str, Any]) -> bool:
    """Whether the process ``stamp`` describes has certainly ended: it ran on this host, in this PID
    namespace, and its PID is free (or a zombie), belongs to a later process, or the machine
    has rebooted since. False whenever that cannot be known (another host, a bad record)."""
    try:
        pid, host = int(stamp["pid"]), str(stamp["host"])
    except (KeyError, TypeError, ValueError):
        return False
    if pid <= 0 or host != socket.gethostname() or stamp.get("pid_namespace") != _pid_namespace():
        return False
    boot = _read_text("/proc/sys/kernel/random/boot_id")
    if boot and stamp.get("boot") and stamp["boot"] != boot:
        return True
    if not _pid_running(pid):
        return True
    stat = _proc_stat(pid)
    if stat is None:
        return False
    state, start = stat
    return state == "Z" or (stamp.get("start_ticks") is not None and start != stamp["start_ticks"])


def _pid_running(pid: int) -> bool:
    if os.name == "nt":  # os.kill would terminate it there: assume it runs
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it runs, as another user
        return True
    return True


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """A process's state letter and start time (clock ticks after boot), from Linux's /proc."""
    text = _read_text(f"/proc/{pid}/stat")
    if not text or ")" not in text:
        return None
    fields = text.rsplit(")", 1)[1].split()
    try:
        return fields[0], int(fields[19])
    except (IndexError, ValueError):
        return None


def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except (OSError, AttributeError):
        return None


def _read_text(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return fh.read().strip()
    except OSError:
        return None


# --- folders staged before they are renamed into place ----------------------------------------------

#: Marks a hidden staging folder as lnsdiag's, and names the process that made it.
STAGING_MARKER = ".lnsdiag-staging.json"
#: In the name of every staging folder: ``.<target>.lnsdiag-XXXXXXXX<suffix>``.
STAGING_TAG = ".lnsdiag-"


def staging_folder(parent: Path, name: str, *, suffix: str = ".tmp", replaces: str | None = None) -> Path:
    """A new hidden folder in ``parent`` to build ``name`` in, with the user's umask (``mkdtemp``
    makes it ``drwx------``) and a marker naming this process. ``replaces``: the folder is to
    hold ``name``'s previous contents while the new ones move in (never removed while
    ``parent/replaces`` is missing: it then holds the only copy). Call :func:`unmark` before
    the folder is renamed into place."""
    folder = Path(tempfile.mkdtemp(prefix=f".{name}{STAGING_TAG}", suffix=suffix, dir=parent))
    try:
        os.chmod(folder, folder_mode())
        record = {**process_stamp(), "replaces": replaces}
        (folder / STAGING_MARKER).write_text(json.dumps(record) + "\n", encoding="utf-8")
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return folder


def unmark(folder: Path) -> None:
    """Take the marker out of a staging folder about to become a real one."""
    (folder / STAGING_MARKER).unlink(missing_ok=True)


def remove_stale_staging(parent: Path) -> list[Path]:
    """Remove the staging folders in ``parent`` whose process has certainly ended (``kill -9``
    or a power cut during a save): only folders with lnsdiag's marker, never a live run's,
    never one from another host. Returns what was removed."""
    removed = []
    for folder in sorted(Path(parent).glob(f".*{STAGING_TAG}*")) if Path(parent).is_dir() else []:
        record = _staging_record(folder)
        if record is None or not process_gone(record):
            continue
        replaces = record.get("replaces")
        if replaces and not (Path(parent) / str(replaces)).exists():
            continue  # killed between two renames: this is the only copy of the replaced folder
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


def _staging_record(folder: Path) -> dict[str, Any] | None:
    if folder.is_symlink() or not folder.is_dir():
        return None
    try:
        record = json.loads((folder / STAGING_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


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
