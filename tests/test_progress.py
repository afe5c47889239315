"""Progress without a terminal: plain periodic lines with phase, done/total and ETA."""

from __future__ import annotations

import os
import subprocess
import sys

from lnsdiag.cli.ui import PlainProgress


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_plain_lines_with_eta(capsys):
    clock = FakeClock()
    with PlainProgress(every=10, clock=clock) as progress:
        progress.phase("variants", total=4)
        clock.now += 5
        progress.advance()  # 5 s since the last line: quiet
        clock.now += 5
        progress.advance(detail="layer 1")  # 10 s: a line, 2 of 4 in 10 s -> 10 s to go
        progress.note("resuming")
        progress.phase("plots")
    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        "variants: started (4 to do)",
        "variants (layer 1): 2/4, 50%, 0:00:10 elapsed, ETA 0:00:10",
        "note: resuming",
        "variants (layer 1): 4/4, 100%, 0:00:10 elapsed — done",
        "plots: started",
        "plots: 0, 0:00:00 elapsed — done",
    ]


def test_interrupted_phase_is_not_reported_done(capsys):
    clock = FakeClock()
    try:
        with PlainProgress(every=0, clock=clock) as progress:
            progress.phase("pass", total=3)
            clock.now += 1
            progress.advance()
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        pass
    err = capsys.readouterr().err
    assert "pass: 1/3, 33%, 0:00:01 elapsed, ETA 0:00:02" in err and "done" not in err


def test_a_piped_command_prints_progress_lines(tiny_llama_dir, text_file, tmp_path):
    """Through a pipe (CI logs, ``| tee``) a long phase shows its progress while it runs."""
    cmd = [sys.executable, "-m", "lnsdiag", "angular", str(tiny_llama_dir), "--text-file", str(text_file),
           "--seq-len", "32", "--max-tokens", "256", "--batch-size", "2", "--out", str(tmp_path / "o")]
    env = {**os.environ, "LNSDIAG_PROGRESS_EVERY": "0"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert any(line.startswith("loading ") for line in lines)
    measuring = [line for line in lines if "/" in line and "elapsed" in line and not line.endswith("done")]
    assert len(measuring) >= 2, done.stderr  # one line per batch at LNSDIAG_PROGRESS_EVERY=0
    assert any(line.endswith("— done") for line in lines)
    assert "\x1b[" not in done.stderr  # no terminal escapes in a log
