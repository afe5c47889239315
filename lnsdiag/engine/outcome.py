"""What a sweep hands back, whichever engine ran it: each variant's result, kept and stored as
soon as it is finished (a killed sweep resumes from the store)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..distributed import is_main
from ..interventions.units import Removal
from ..progress import Progress
from ..results.store import ResultStore, VariantResult


@dataclass
class SweepOutcome:
    """What an engine produced: each variant's result, and how (for meta.json)."""

    results: dict[Removal, VariantResult] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)


def finish_variant(result: VariantResult, outcome: SweepOutcome, store: ResultStore | None,
                   on_saved: Callable[[VariantResult], None] | None, progress: Progress, *, amount: float = 1,
                   any_rank: bool = False) -> None:
    """Keep and store a finished variant; ``on_saved`` (rewriting outputs) runs on rank 0 only."""
    outcome.results[result.removal] = result
    if store is not None:
        store.save(result, any_rank=any_rank)
    progress.advance(amount)
    if on_saved is not None and is_main():
        on_saved(result)
