"""Ranks, shares of work, gathering: lnsdiag under ``torchrun`` / ``accelerate launch``.

A launcher starts one process (rank) per model replica and sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK`` and ``LOCAL_WORLD_SIZE``. Each rank takes a deterministic share of the work
(:func:`balanced_shares`), the results meet over torch.distributed (NCCL on GPUs, gloo on the
CPU), and rank 0 alone writes files and talks to the user. Without a launcher
(``WORLD_SIZE`` unset or 1) every function here is a no-op and torch.distributed's process
group is never touched, so a plain run and a notebook are exactly what they were.

Collectives time out after ``LNSDIAG_DIST_TIMEOUT`` seconds (default 1800): a rank that died
makes the others fail instead of hang (and torchrun tears the group down anyway when one
worker exits non-zero).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

from .errors import UserError

T = TypeVar("T")

#: Seconds a collective waits for the other ranks before failing (``LNSDIAG_DIST_TIMEOUT``).
DEFAULT_TIMEOUT = 1800.0


@dataclass(frozen=True)
class World:
    """This process's place in the job: global rank and size, rank and size on its node."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        """More than one rank: collectives are real."""
        return self.size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value.strip() else default
    except ValueError as exc:
        raise UserError(f"{name}={value!r} is not a number (set by torchrun / accelerate launch)") from exc


def world() -> World:
    """The job as the launcher's environment describes it (a single process without one)."""
    size = _env_int("WORLD_SIZE", 1)
    if size <= 1:
        return World()
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", rank)
    return World(rank, size, local_rank, _env_int("LOCAL_WORLD_SIZE", size))


def is_main() -> bool:
    """True on rank 0 (and in a single process): the rank that writes and prints."""
    return world().is_main


def timeout_seconds() -> float:
    """How long a collective waits (``LNSDIAG_DIST_TIMEOUT``, default 1800 s)."""
    value = os.environ.get("LNSDIAG_DIST_TIMEOUT", "")
    try:
        seconds = float(value) if value.strip() else DEFAULT_TIMEOUT
    except ValueError as exc:
        raise UserError(f"LNSDIAG_DIST_TIMEOUT={value!r} is not a number of seconds") from exc
    if seconds <= 0:
        raise UserError(f"LNSDIAG_DIST_TIMEOUT must be positive, not {value}")
    return seconds


def init_from_env(timeout_s: float | None = None, gpus_per_replica: int = 1) -> World:
    """Join the launcher's process group once (a no-op in a single process).

    NCCL when CUDA is available (each rank on ``cuda:LOCAL_RANK``, or the first GPU of its
    replica, ``cuda:LOCAL_RANK·K``), gloo otherwise; object collectives on NCCL travel through
    the current CUDA device, so it is set first.
    """
    here = world()
    if not here.parallel:
        return here
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return here
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(here.local_rank * max(1, gpus_per_replica) % max(1, torch.cuda.device_count()))
    seconds = timeout_seconds() if timeout_s is None else timeout_s
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=seconds))
    return here


def _group() -> Any:
    """torch.distributed, joined (lazily, for library use under a launcher)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        init_from_env()
    return dist


def backend() -> str:
    """The joined group's backend (``nccl``, ``gloo``), or ``""`` when none is joined."""
    if not world().parallel:
        return ""
    import torch.distributed as dist

    return str(dist.get_backend()) if dist.is_initialized() else ""


def shutdown() -> None:
    """Leave the process group, if joined (torch warns at exit otherwise)."""
    if not world().parallel:
        return
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def balanced_shares(weights: Sequence[float], size: int) -> list[list[int]]:
    """Indices ``0..len(weights)-1`` dealt to ``size`` ranks, each index exactly once.

    Longest processing time first: the heaviest item goes to the least loaded rank (ties: the
    lower index, the lower rank), so no rank's load exceeds the average by more than the
    largest item. Each share is sorted. Deterministic: every rank computes the same answer.
    """
    if size < 1:
        raise ValueError(f"a job has at least one rank, not {size}")
    shares: list[list[int]] = [[] for _ in range(size)]
    loads = [0.0] * size
    for i in sorted(range(len(weights)), key=lambda k: (-float(weights[k]), k)):
        r = min(range(size), key=lambda k: (loads[k], k))
        shares[r].append(i)
        loads[r] += float(weights[i])
    return [sorted(s) for s in shares]


def my_share(weights: Sequence[float]) -> list[int]:
    """This rank's share of ``weights``' indices (all of them in a single process)."""
    here = world()
    return balanced_shares(weights, here.size)[here.rank] if here.parallel else list(range(len(weights)))


def all_gather(obj: T) -> list[T]:
    """Every rank's ``obj``, in rank order, on every rank (``[obj]`` in a single process)."""
    here = world()
    if not here.parallel:
        return [obj]
    out: list[Any] = [None] * here.size
    _group().all_gather_object(out, obj)
    return out


def gather_to_main(obj: T) -> list[T] | None:
    """Every rank's ``obj`` in rank order on rank 0; None elsewhere."""
    here = world()
    if not here.parallel:
        return [obj]
    out: list[Any] | None = [None] * here.size if here.is_main else None
    _group().gather_object(obj, out, dst=0)
    return out


def broadcast_from_main(obj: T) -> T:
    """Rank 0's ``obj`` on every rank (what the others pass is ignored)."""
    if not world().parallel:
        return obj
    box = [obj]
    _group().broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    """Wait until every rank gets here (bounded by the collective timeout)."""
    if world().parallel:
        _group().barrier()


class MirroredError(UserError):
    """Rank 0's UserError, raised on the other ranks so that they stop with it; only rank 0 says it."""


def on_main(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 only and hand its result to every rank.

    For work that must happen once (create a result folder, decide a batch budget). A
    UserError on rank 0 reaches every rank as :class:`MirroredError`, so no rank waits for a
    result that will never come.
    """
    if not world().parallel:
        return fn()
    failure: str | None = None
    value: Any = None
    if is_main():
        try:
            value = fn()
        except Exception as exc:  # the others must not wait for a result that will never come
            failure = str(exc) if isinstance(exc, UserError) else f"rank 0 failed: {type(exc).__name__}: {exc}"
            broadcast_from_main((None, failure))
            raise
    value, failure = broadcast_from_main((value, failure))
    if failure is not None:
        raise MirroredError(failure)
    return value


# --- a replica larger than one GPU -----------------------------------------------------------

def replica_gpus(local_rank: int, local_size: int, per_replica: int, visible: int) -> list[int]:
    """The GPUs of this node that hold this rank's replica: ``local_rank·K .. local_rank·K + K − 1``.

    Ranks on a node times ``K`` must fit the node's visible GPUs, or two replicas would share one.
    """
    if per_replica < 1:
        raise UserError(f"--gpus-per-replica must be at least 1, not {per_replica}")
    if visible < 1:
        raise UserError(f"--gpus-per-replica {per_replica}: no CUDA GPU is visible on this machine")
    if per_replica > visible:
        raise UserError(f"--gpus-per-replica {per_replica}: only {visible} GPU(s) are visible on this node")
    if local_size * per_replica > visible:
        raise UserError(
            f"{local_size} rank(s) on this node × --gpus-per-replica {per_replica} = {local_size * per_replica} GPUs, "
            f"but {visible} are visible: launch {visible // per_replica} rank(s) per node "
            f"(torchrun --nproc-per-node {visible // per_replica})")
    if not 0 <= local_rank < local_size:
        raise UserError(f"LOCAL_RANK={local_rank} is outside this node's {local_size} rank(s)")
    first = local_rank * per_replica
    return list(range(first, first + per_replica))


def replica_max_memory(gpus: Sequence[int], capacity: Callable[[int], int], share: float = 0.9) -> dict[int, int]:
    """``max_memory`` for ``from_pretrained(device_map="auto")``: ``share`` of each of ``gpus``
    (``capacity(i)`` bytes), and no other device, so the replica stays on its own GPUs."""
    return {int(i): int(capacity(int(i)) * share) for i in gpus}
