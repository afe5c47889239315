"""The two sweep engines: every variant (the full model, and each one-layer removal) scored by
a list of :class:`~lnsdiag.scoring.Scorer`.

Both take the same arguments (the fast one also a token budget) and give the same results
(tested): ``run_naive`` scores each
variant with its layer removed, one full evaluation per variant (the reference, any task);
``run_fast`` answers every scorer's requests for all variants in one pass of
:class:`~lnsdiag.engine.SweepEngine` and lets each scorer aggregate its variants' answers.
Each finished variant is saved at once to the store (when one is given).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch

from ..distributed import all_gather, broadcast_from_main, is_main, my_share, world
from ..errors import UserError
from ..interventions.removal import removed_layers
from ..model.structure import LayerStack, find_layers
from ..progress import SILENT, Progress
from ..results.store import ResultStore, VariantResult
from ..scoring.base import Scorer, Scores
from ..scoring.perplexity import PerplexityScorer
from .fast import Variant, removal_set

if TYPE_CHECKING:
    from ..data.windows import TokenWindows
    from ..model.load import LoadedModel
    from ..results.verdict import Margins

#: Progress phase of the per-variant work.
VARIANTS_PHASE = "variants"


@dataclass
class SweepOutcome:
    """What an engine produced: each variant's result, and how (for meta.json)."""

    results: dict[Variant, VariantResult] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)


def _removed(model: torch.nn.Module, variant: Variant, stack: LayerStack) -> Any:
    return removed_layers(model, removal_set(variant), stack=stack)


def _variant_label(variant: Variant) -> str:
    blocks = removal_set(variant)
    if not blocks:
        return "baseline"
    return f"without layer {blocks[0]}" if len(blocks) == 1 else f"without layers {','.join(map(str, blocks))}"


def _finish(result: VariantResult, outcome: SweepOutcome, store: ResultStore | None,
            on_saved: Callable[[VariantResult], None] | None, progress: Progress, *, amount: float = 1,
            any_rank: bool = False) -> None:
    """Keep and store a finished variant; ``on_saved`` (rewriting outputs) runs on rank 0 only."""
    outcome.results[result.removed_layer] = result
    if store is not None:
        store.save(result, any_rank=any_rank)
    progress.advance(amount)
    if on_saved is not None and is_main():
        on_saved(result)


def run_naive(model: torch.nn.Module, scorers: Sequence[Scorer], todo: Sequence[Variant], *,
              stack: LayerStack, store: ResultStore | None = None, progress: Progress = SILENT,
              on_saved: Callable[[VariantResult], None] | None = None) -> SweepOutcome:
    """One full scoring pass per variant (the reference engine; works for every task type).

    Under a launcher the variants are dealt to the ranks (weighted by the blocks each runs);
    each rank saves the variants it scored as it finishes them (one file each: a relaunch with
    any number of ranks resumes from them), then every rank gets every result. Rank 0's
    progress counts its variants scaled to the job's.
    """
    todo = broadcast_from_main(list(todo))
    mine = [todo[i] for i in my_share([len(stack) - len(removal_set(v)) for v in todo])]
    scale = len(todo) / max(1, len(mine)) if world().parallel else 1
    outcome = SweepOutcome()
    progress.phase(VARIANTS_PHASE, total=len(todo))
    for variant in mine:
        progress.advance(0, detail=_variant_label(variant))
        start = time.perf_counter()
        scores = Scores()
        with _removed(model, variant, stack):
            for scorer in scorers:
                scores += scorer.score()
        _finish(VariantResult.of(variant, scores, time.perf_counter() - start, "naive"), outcome, store, on_saved,
                progress, amount=scale, any_rank=True)
    if world().parallel:
        gathered = {k: v for part in all_gather(outcome.results) for k, v in part.items()}
        outcome.results = {v: gathered[v] for v in todo}
        if store is not None:  # on a folder that is not shared between nodes, rank 0 still gets every file
            for variant, result in outcome.results.items():
                if is_main() and variant not in mine and not store.has(variant):
                    store.save(result)
                else:
                    store.hold(result)
        if not mine:
            progress.advance(len(todo))
    return outcome


def run_fast(model: torch.nn.Module, scorers: Sequence[Scorer], todo: Sequence[Variant], *,
             stack: LayerStack, store: ResultStore | None = None, progress: Progress = SILENT,
             on_saved: Callable[[VariantResult], None] | None = None, batch_tokens: int | None = None
             ) -> SweepOutcome:
    """All variants from one engine pass, then each scorer's aggregation per variant.

    What log-likelihoods cannot serve (generation tasks) is scored the naive way inside the
    same loop. With a store, the pass is checkpointed there and resumes mid-pass. Under a
    launcher the pass's batches are shared (:meth:`SweepEngine.run`); every rank then
    aggregates every variant (cheap, and the same everywhere) and rank 0 alone writes them.
    """
    from .fast import Checkpoint, SweepEngine, fingerprint

    progress.phase("building requests (once)")
    spans, requests = [], []
    for scorer in scorers:
        own = scorer.requests()
        spans.append(slice(len(requests), len(requests) + len(own)))
        requests += own
    max_length = _max_length(scorers)
    todo = broadcast_from_main(list(todo))  # every rank runs the same pass
    checkpoint = None
    variants = list(todo)
    if store is not None:
        checkpoint = Checkpoint(store.checkpoint, fingerprint(requests, max_length, {"settings": store.settings}))
        stored = checkpoint.stored_variants()
        if stored is not None and set(todo) <= set(stored):
            variants = stored  # finish that pass
    engine = SweepEngine(model, stack, variants, batch_tokens=batch_tokens, pad_id=0)
    start = time.perf_counter()
    result = engine.run(requests, max_length, progress=progress, checkpoint=checkpoint) if requests else None
    engine_seconds = time.perf_counter() - start
    share = engine_seconds / max(1, len(variants))
    outcome = SweepOutcome()
    progress.phase("aggregating", total=len(todo))
    for variant in todo:
        progress.advance(0, detail=_variant_label(variant))
        start = time.perf_counter()
        scores = Scores()
        loglik, greedy = result.of(variant) if result is not None else ((), ())
        for scorer, span in zip(scorers, spans, strict=True):
            scores += scorer.aggregate(loglik[span], greedy[span])
            if scorer.needs_model_per_variant():
                with _removed(model, variant, stack):
                    scores += scorer.score_rest()
        saved = VariantResult.of(variant, scores, share + time.perf_counter() - start, "fast")
        _finish(saved, outcome, store, on_saved, progress)
    if checkpoint is not None and is_main():  # every rank saved its last state before the results met
        checkpoint.remove()
    stats = engine.stats
    outcome.stats = {
        "variants_in_pass": len(variants), "engine_seconds": round(engine_seconds, 3),
        "requests": len(requests),
        "task_requests": sum(s.stop - s.start for sc, s in zip(scorers, spans, strict=True) if any(sc.lm_eval_tasks())),
        "model_rows": stats.get("rows"), "shared_rows": stats.get("shared_rows"), "tokens": stats.get("tokens"),
        "tokens_without_sharing": stats.get("unshared_tokens"), "sharing": stats.get("sharing"),
        "batch_tokens": stats.get("budget"), "row_tokens": stats.get("row_tokens"),
        # work in block-token passes (padding excluded): this pass, and the naive engine's for the same variants
        "block_tokens": stats.get("block_tokens"), "naive_block_tokens": stats.get("naive_block_tokens"),
        "work_ratio": stats.get("work_ratio"), "check_block_tokens": stats.get("check_block_tokens"),
        "fast_tasks": [t for s in scorers for t in s.lm_eval_tasks()[0]],
        "naive_tasks": [t for s in scorers for t in s.lm_eval_tasks()[1]],
        "layer_passes_per_row": engine.layer_passes(),
        # a resumed pass: tokens whose rows came from partial files, and tokens computed by this run's ranks
        "resumed_tokens": stats.get("resumed_tokens"), "computed_tokens": stats.get("computed_tokens"),
        "ranks": world().size,
    }
    return outcome


def _max_length(scorers: Sequence[Scorer]) -> int:
    """The context length requests are cut to (the scorers' limit), which every request that
    must stay whole (a perplexity window) has to fit."""
    limits = [limit for s in scorers if (limit := s.context_limit()) is not None]
    needed = max(s.context_needed() for s in scorers)
    if not limits:
        return needed
    if needed > min(limits):
        raise UserError(f"perplexity windows of {needed + 1} tokens exceed lm-eval's context length ({min(limits)}); "
                        "lower --seq-len")
    return min(limits)


def perplexity_sweep(loaded: LoadedModel, windows: TokenWindows, layers: Sequence[int] | None = None, *,
                     batch_tokens: int | None = None, margins: Margins | None = None,
                     angular: pd.DataFrame | None = None,
                     progress: Progress = SILENT) -> pd.DataFrame:
    """Built-in perplexity of the full model and of each one-layer-removed variant, in one pass.

    The same numbers, paired stderr and verdicts as ``lnsdiag prune --ppl-text``,
    without a result folder: the rows of :func:`~lnsdiag.verdict.prune_frame` for the ``ppl``
    metric, plus the number of scored ``tokens``. ``windows`` is a
    :class:`~lnsdiag.windows.TokenWindows`.
    """
    from ..results.verdict import prune_frame

    stack = find_layers(loaded.model)
    chosen = list(range(len(stack))) if layers is None else sorted(set(layers))
    outcome = run_fast(loaded.model, [PerplexityScorer(loaded.model, windows)], [None, *chosen], stack=stack,
                       batch_tokens=batch_tokens, progress=progress)
    frame = prune_frame(outcome.results, margins=margins, angular=angular)
    frame = frame[frame["metric"] == "ppl"].reset_index(drop=True)
    frame["tokens"] = sum(windows.scored_tokens)
    return frame
