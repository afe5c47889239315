"""One writer per result folder: a second run is refused with one line while the first holds the
lock, and the lock is free again however the first ended (``kill -9`` included). Every wait
is a handshake with the holder (it says ``locked`` and waits on stdin), never a sleep."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from lnsdiag import distributed
from lnsdiag.distributed import MirroredError
from lnsdiag.errors import UserError
from lnsdiag.results import lock
from lnsdiag.results.lock import EXCLUSIVE_NAME, LOCK_NAME, LockHolder, folder_lock
from lnsdiag.runners import prune, shrink

ROOT = Path(__file__).resolve().parents[1]

_HOLDER = """
import sys
import threading
from lnsdiag.results import lock
if sys.argv[2] == "exclusive":
    lock._fcntl = None
with lock.folder_lock(sys.argv[1], what="--out"):
    print("locked", flush=True)
    sys.stdin.readline()
print("released", flush=True)
"""


@pytest.fixture(params=["flock", "exclusive"])
def mechanism(request, monkeypatch):
    """Both ways of locking: ``flock`` and, as without it (Windows), an exclusive lock file."""
    if request.param == "exclusive":
        monkeypatch.setattr(lock, "_fcntl", None)
    elif lock._fcntl is None:
        pytest.skip("no flock here")
    return request.param


def _holder(folder: Path, mechanism: str) -> subprocess.Popen:
    """Another process holding ``folder``'s lock, once it has said so."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    child = subprocess.Popen([sys.executable, "-c", _HOLDER, str(folder), mechanism], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    line = child.stdout.readline().strip()
    assert line == "locked", child.stderr.read()
    return child


def _refused(folder: Path) -> str:
    with pytest.raises(UserError) as info, folder_lock(folder, what="--out"):
        pass
    return str(info.value)


def test_a_second_writer_is_refused_and_the_lock_is_free_after_kill_9(mechanism, tmp_path):
    folder = tmp_path / "out"
    child = _holder(folder, mechanism)
    try:
        message = _refused(folder)
        assert message == (f"{folder} is in use by another lnsdiag run (pid {child.pid} on host "
                           f"{socket.gethostname()}, started {_record(folder, mechanism)['started']}); "
                           "wait for it or use another --out")
        assert "\n" not in message
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
    assert _record(folder, mechanism)["pid"] == child.pid  # what the killed run left ...
    with folder_lock(folder, what="--out") as holder:  # ... does not hold the folder
        assert holder.pid == os.getpid()
        assert _record(folder, mechanism)["pid"] == os.getpid()
    assert not (folder / LOCK_NAME).exists() and not (folder / EXCLUSIVE_NAME).exists()


def test_the_lock_is_released_on_a_normal_exit_and_on_an_exception(mechanism, tmp_path):
    folder = tmp_path / "out"
    child = _holder(folder, mechanism)
    out, err = child.communicate("\n", timeout=60)
    assert child.returncode == 0 and out.strip() == "released", err
    assert sorted(p.name for p in folder.iterdir()) == []
    with pytest.raises(RuntimeError, match="boom"), folder_lock(folder):
        raise RuntimeError("boom")
    child = _holder(folder, mechanism)  # free again: another process takes it
    try:
        assert f"pid {child.pid}" in _refused(folder)
    finally:
        child.communicate("\n", timeout=60)


def test_a_run_inside_a_run_shares_its_lock(mechanism, tmp_path):
    with folder_lock(tmp_path / "out") as outer:
        with folder_lock(tmp_path / "out" / ".." / "out") as inner:
            assert inner == outer and outer.pid == os.getpid()
        refused: list[str] = []
        thread = threading.Thread(target=lambda: refused.append(_refused(tmp_path / "out")))
        thread.start()
        thread.join()
        assert refused and f"pid {os.getpid()}" in refused[0]  # another thread is another writer
        child = _holder(tmp_path / "other", mechanism)  # another folder is another lock
        child.communicate("\n", timeout=60)
        assert child.returncode == 0
    with folder_lock(tmp_path / "out"):
        pass


def test_a_stale_exclusive_lock_of_another_host_is_never_taken_over(monkeypatch, tmp_path):
    monkeypatch.setattr(lock, "_fcntl", None)
    tmp_path.joinpath(EXCLUSIVE_NAME).write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "then"}))
    assert "pid 1 on host elsewhere, started then" in _refused(tmp_path)
    tmp_path.joinpath(EXCLUSIVE_NAME).write_text("")  # a holder that has not written its record yet
    assert "its holder is not recorded yet" in _refused(tmp_path)


def test_under_a_launcher_rank_0_holds_the_lock_for_the_job(monkeypatch, tmp_path):
    """Ranks other than 0 take no lock: they get rank 0's holder, or its refusal."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    rank0 = LockHolder(4242, "node0", "2026-12-02T10:00:00+0000")
    monkeypatch.setattr(distributed, "broadcast_from_main", lambda _obj: (rank0, None))
    with folder_lock(tmp_path / "out") as holder:
        assert holder == rank0
    assert not (tmp_path / "out").exists()
    monkeypatch.setattr(distributed, "broadcast_from_main", lambda _obj: (None, "out is in use by another run"))
    with pytest.raises(MirroredError, match="in use"), folder_lock(tmp_path / "out"):
        pass


def _record(folder: Path, mechanism: str) -> dict:
    name = LOCK_NAME if mechanism == "flock" else EXCLUSIVE_NAME
    return json.loads((folder / name).read_text())


def test_prune_and_shrink_hold_their_folder_while_they_run(tmp_path):
    """The runners are locked by folder: a second run into a folder in use is refused at once
    (here the holder is another thread, which the lock treats like another process)."""
    held, release = threading.Event(), threading.Event()

    def holder() -> None:
        with folder_lock(tmp_path):
            held.set()
            release.wait()

    thread = threading.Thread(target=holder)
    thread.start()
    try:
        assert held.wait(60)
        for runner in (prune.run, shrink.run):
            with pytest.raises(UserError, match="in use by another lnsdiag run"):
                runner(None, None, tmp_path)  # refused before the model or config is touched
    finally:
        release.set()
        thread.join()
    calls = []

    @lock.holds_folder_lock("out")
    def sweep(model: object, out: Path) -> str:
        calls.append((tmp_path / LOCK_NAME).exists() or (tmp_path / EXCLUSIVE_NAME).exists())
        return "done"

    assert sweep(None, out=tmp_path) == "done" and calls == [True]
    assert not (tmp_path / LOCK_NAME).exists()
