"""One writer per result folder: a lock that a second run into the same ``--out`` is refused by.

Two sweeps writing one folder interleave their variants and settings into numbers that belong
to neither, so a run holds :func:`folder_lock` on its folder while it writes. Where the system
has ``flock`` (Linux, macOS; NFS through POSIX locks) the lock belongs to an open file and the
system releases it when the process ends in any way, ``kill -9`` included: nothing stale can
outlive its holder. Elsewhere a lock file created exclusively records its holder, and a file
whose holder has certainly ended on this host (:func:`~lnsdiag.runs.process_gone`) is taken
over. Under a launcher the job holds one lock: rank 0 takes it for every rank, and a refusal
reaches them all.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from ..distributed import on_main
from ..errors import UserError
from ..runs import file_mode, output_dir, process_gone, process_stamp

F = TypeVar("F", bound=Callable[..., Any])

try:
    import fcntl as _fcntl
except ImportError:  # Windows: the exclusive lock file below
    _fcntl = None

#: The lock file, in the locked folder (removed when the lock is released).
LOCK_NAME = ".lnsdiag.lock"
#: The lock file created exclusively where ``flock`` is missing or refused by the filesystem.
EXCLUSIVE_NAME = ".lnsdiag.lock.excl"


@dataclass(frozen=True)
class LockHolder:
    """Who holds a folder's lock, as its lock file says."""

    pid: int | None
    host: str | None
    started: str | None

    @classmethod
    def of(cls, record: dict[str, Any] | None) -> LockHolder:
        record = record or {}
        return cls(record.get("pid"), record.get("host"), record.get("started"))

    def describe(self) -> str:
        if self.pid is None:
            return "its holder is not recorded yet"
        return f"pid {self.pid} on host {self.host}, started {self.started}"


#: Folders this process holds the lock of: the thread that took it, and the holder it recorded.
_HELD: dict[Path, tuple[int, LockHolder]] = {}
_HELD_LOCK = threading.Lock()


@contextmanager
def folder_lock(folder: str | Path, *, what: str = "--out") -> Iterator[LockHolder]:
    """Hold ``folder``'s lock while the block runs (the folder is created if needed, as
    :func:`~lnsdiag.runs.output_dir` creates it).

    Another process holding it makes this raise :class:`~lnsdiag.errors.UserError` at once,
    naming the holder; ``what`` is the option that chose the folder, for the message. A call
    nested in another of the same thread on the same folder shares its lock (another thread
    is refused like another process). Under a
    launcher rank 0 alone takes it; every rank gets rank 0's holder, or its refusal. Yields
    the holder (this process, or rank 0).
    """
    path = Path(folder).expanduser().resolve()
    taken: list[_Lock] = []

    def take() -> LockHolder:
        taken.append(_acquire(path, what))
        return taken[0].holder

    holder = on_main(take)
    try:
        yield holder
    finally:
        for lock in taken:
            lock.release()


@dataclass
class _Lock:
    """A lock this process took: ``fd`` the ``flock``-ed file, or None for the exclusive file;
    a nested one releases nothing."""

    path: Path
    holder: LockHolder
    fd: int | None = None
    nested: bool = False

    def release(self) -> None:
        if self.nested:
            return
        with _HELD_LOCK:
            _HELD.pop(self.path, None)
        if self.fd is None:
            exclusive = self.path / EXCLUSIVE_NAME
            if _read_record(exclusive).get("pid") == os.getpid():
                exclusive.unlink(missing_ok=True)
            _unlink_if_empty(self.path / LOCK_NAME)  # left by a filesystem that refused flock
            return
        (self.path / LOCK_NAME).unlink(missing_ok=True)  # while still held: openers of the old file retry
        os.close(self.fd)


def _acquire(path: Path, what: str) -> _Lock:
    with _HELD_LOCK:
        thread, holder = _HELD.get(path, (None, None))
        if thread == threading.get_ident() and holder is not None:  # a runner inside a runner, same folder
            return _Lock(path, holder, nested=True)
    output_dir(path, "", "")  # created (and removed again, empty, should the command fail), or refused
    record = process_stamp()
    fd = _flock(path / LOCK_NAME, record, what) if _fcntl is not None else None
    if fd is None:
        _exclusive(path / EXCLUSIVE_NAME, record, what)
    holder = LockHolder.of(record)
    with _HELD_LOCK:
        _HELD[path] = (threading.get_ident(), holder)
    return _Lock(path, holder, fd)


def _flock(lock_file: Path, record: dict[str, Any], what: str) -> int | None:
    """An open lock file this process holds ``flock`` on, its record written in it; None when the
    filesystem has no such locks. Retried when the file it locked was released and unlinked
    meanwhile (the next holder locks a new file)."""
    while True:
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, file_mode())
        try:
            _fcntl.flock(fd, _fcntl.LOCK_EX | _fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise _refusal(lock_file, what) from None
        except OSError:  # ENOLCK, EOPNOTSUPP: a filesystem without flock
            os.close(fd)
            return None
        if _same_file(fd, lock_file):
            os.ftruncate(fd, 0)
            os.write(fd, (json.dumps(record) + "\n").encode("utf-8"))
            return fd
        os.close(fd)


def _same_file(fd: int, lock_file: Path) -> bool:
    try:
        now = os.stat(lock_file)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (mine.st_dev, mine.st_ino) == (now.st_dev, now.st_ino)


def _exclusive(lock_file: Path, record: dict[str, Any], what: str) -> None:
    """Without ``flock``: create the lock file exclusively, taking over one whose holder has
    certainly ended (killed on this host). Two runs taking over one stale file at the very same
    moment could both succeed: a fallback, where ``flock`` has no such gap."""
    for _ in range(2):
        try:
            fd = os.open(lock_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, file_mode())
        except FileExistsError:
            if not process_gone(_read_record(lock_file)):
                raise _refusal(lock_file, what) from None
            lock_file.unlink(missing_ok=True)  # a stale lock
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
        return
    raise _refusal(lock_file, what)


def _refusal(lock_file: Path, what: str) -> UserError:
    holder = LockHolder.of(_read_record(lock_file))
    return UserError(f"{lock_file.parent} is in use by another lnsdiag run ({holder.describe()}); "
                     f"wait for it or use another {what}")


def _unlink_if_empty(path: Path) -> None:
    try:
        if path.stat().st_size == 0:
            path.unlink()
    except OSError:
        pass


def _read_record(lock_file: Path) -> dict[str, Any]:
    try:
        record = json.loads(lock_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def holds_folder_lock(param: str = "out", *, what: str = "--out") -> Callable[[F], F]:
    """Decorate a runner so the folder passed as ``param`` is locked while it runs: two runs
    into one folder never mix their results (the second is refused at once, naming the first)."""

    def decorate(function: F) -> F:
        signature = inspect.signature(function)

        @functools.wraps(function)
        def locked(*args: Any, **kwargs: Any) -> Any:
            folder = signature.bind(*args, **kwargs).arguments[param]
            with folder_lock(folder, what=what):
                return function(*args, **kwargs)

        return locked  # type: ignore[return-value]

    return decorate
