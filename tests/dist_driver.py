"""Several ``lnsdiag`` command lines in one torchrun launch, for tests/test_distributed.py.

``torchrun --nproc-per-node N -m tests.dist_driver PLAN.json`` runs, on every rank and in the
plan's order, each ``{"name", "args", "logs"}`` entry as ``python -m lnsdiag ARGS`` would (the
CLI entry point, exit through SystemExit), with this rank's stdout and stderr (file descriptors
1 and 2) going to ``LOGS.rank-R.out`` / ``.err`` and the exit status to ``LOGS.rank-R.code``.
It stops at the first command that fails on this rank (exit non-zero: torchrun then ends the others).

One launch instead of one per command saves N interpreter start-ups (each imports torch,
transformers and lm-eval) per command. The process group is the one the first command joins:
each command's own teardown (``distributed.shutdown``) is held back until the last command,
which leaves the group as every command does; a group created anew in the same process would
reuse the launcher's store keys of the one before.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path


def _run(args: list[str], logs: str, rank: int) -> int:
    from lnsdiag.cli import main

    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    code: object = 0
    with open(f"{logs}.rank-{rank}.out", "wb") as out, open(f"{logs}.rank-{rank}.err", "wb") as err:
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        try:
            sys.argv = ["lnsdiag", *args]
            main()
        except SystemExit as exc:  # how every click command ends, success included
            code = exc.code
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
    code = 0 if code is None else code if isinstance(code, int) else 1
    Path(f"{logs}.rank-{rank}.code").write_text(str(code))
    return code


def drive(plan: list[dict]) -> int:
    from lnsdiag import distributed

    rank = distributed.world().rank
    leave = distributed.shutdown
    try:
        for i, entry in enumerate(plan):
            distributed.shutdown = leave if i == len(plan) - 1 else (lambda: None)
            code = _run([str(a) for a in entry["args"]], entry["logs"], rank)
            if code != 0:
                return code
        return 0
    finally:
        distributed.shutdown = leave
        with contextlib.suppress(Exception):  # a group a failed rank broke, as the CLI's own teardown
            leave()


if __name__ == "__main__":
    sys.exit(drive(json.loads(Path(sys.argv[1]).read_text())))
