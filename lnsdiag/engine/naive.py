"""The naive sweep engine, the reference: each variant scored by a full evaluation of its own,
its blocks removed (any scorer, any task type)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch

from ..distributed import all_gather, broadcast_from_main, is_main, my_share, world
from ..interventions.removal import removed_layers
from ..interventions.units import Removal
from ..model.structure import LayerStack
from ..progress import SILENT, Progress
from ..results.store import ResultStore, VariantResult
from ..scoring.base import Scorer, Scores
from .outcome import SweepOutcome, finish_variant

#: Progress phase of the per-variant work.
VARIANTS_PHASE = "variants"


def run_naive(model: torch.nn.Module, scorers: Sequence[Scorer], todo: Sequence[Removal], *,
              stack: LayerStack, store: ResultStore | None = None, progress: Progress = SILENT,
              on_saved: Callable[[VariantResult], None] | None = None,
              variant: Callable[[Removal], AbstractContextManager[Any]] | None = None) -> SweepOutcome:
    """One full scoring pass per variant (the reference engine; works for every task type).

    ``variant(removal)``: the model as that variant for a ``with`` block (default: its blocks removed;
    a healed pruned model: removed and its heal folded in).

    Under a launcher the variants are dealt to the ranks (weighted by the blocks each runs);
    each rank saves the variants it scored as it finishes them (one file each: a relaunch with
    any number of ranks resumes from them), then every rank gets every result. Rank 0's
    progress counts its variants scaled to the job's.
    """
    todo = broadcast_from_main(list(todo))
    mine = [todo[i] for i in my_share([len(stack) - len(v.blocks) for v in todo])]
    scale = len(todo) / max(1, len(mine)) if world().parallel else 1
    outcome = SweepOutcome()
    progress.phase(VARIANTS_PHASE, total=len(todo))
    for removal in mine:
        progress.advance(0, detail=removal.label)
        start = time.perf_counter()
        scores = Scores()
        with variant(removal) if variant is not None else removed_layers(model, removal, stack=stack):
            for scorer in scorers:
                scores += scorer.score()
        finish_variant(VariantResult.of(removal, scores, time.perf_counter() - start, "naive"), outcome, store,
                       on_saved, progress, amount=scale, any_rank=True)
    if world().parallel:
        _meet(outcome, todo, mine, store)
        if not mine:
            progress.advance(len(todo))
    return outcome


def _meet(outcome: SweepOutcome, todo: list[Removal], mine: list[Removal], store: ResultStore | None) -> None:
    """Every rank's results on every rank, in ``todo``'s order; on a folder that is not shared
    between nodes, rank 0 still gets every file."""
    gathered = {k: v for part in all_gather(outcome.results) for k, v in part.items()}
    outcome.results = {v: gathered[v] for v in todo}
    if store is None:
        return
    for variant, result in outcome.results.items():
        if is_main() and variant not in mine and not store.has(variant):
            store.save(result)
        else:
            store.hold(result)
