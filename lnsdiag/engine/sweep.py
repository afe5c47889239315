"""Sweeps driven by the fast engine: every variant (the full model, and each removal) scored by
a list of :class:`~lnsdiag.scoring.base.Scorer`.

``run_fast`` answers every scorer's requests for all variants in one pass of
:class:`~lnsdiag.engine.fast.SweepEngine` and lets each scorer aggregate its variants' answers;
it takes the same arguments as the naive reference :func:`~lnsdiag.engine.naive.run_naive`
(plus a token budget) and gives the same results (tested). Each finished variant is saved at
once to the store (when one is given). ``perplexity_sweep`` is the notebook's one-call sweep.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from ..distributed import broadcast_from_main, is_main, world
from ..errors import UserError
from ..interventions.removal import removed_layers
from ..interventions.units import Removal
from ..model.structure import LayerStack, find_layers
from ..progress import SILENT, Progress
from ..results.margins import Margins
from ..results.store import ResultStore, VariantResult
from ..results.verdict import prune_frame
from ..scoring.base import Answers, Scorer, Scores, TokenRequest
from ..scoring.perplexity import PerplexityScorer
from .checkpoint import Checkpoint, fingerprint
from .fast import EngineResult, SweepEngine
from .outcome import SweepOutcome, finish_variant

if TYPE_CHECKING:
    from ..data.windows import TokenWindows
    from ..model.load import LoadedModel


def run_fast(model: torch.nn.Module, scorers: Sequence[Scorer], todo: Sequence[Removal], *,
             stack: LayerStack, store: ResultStore | None = None, progress: Progress = SILENT,
             on_saved: Callable[[VariantResult], None] | None = None, batch_tokens: int | None = None,
             full_model_blocks: int | None = None) -> SweepOutcome:
    """All variants from one engine pass, then each scorer's aggregation per variant.

    What log-likelihoods cannot serve (generation tasks) is scored the naive way inside the
    same loop. With a store, the pass is checkpointed there and resumes mid-pass. Under a
    launcher the pass's batches are shared (:meth:`SweepEngine.run`); every rank then
    aggregates every variant (cheap, and the same everywhere) and rank 0 alone writes them.
    ``full_model_blocks``: the model holds removals of its own (a greedy step's current model, ``stack``
    a view of its kept blocks); compared requests are then compared with the real full model of that
    many blocks (:class:`~.fast.SweepEngine`).
    """
    progress.phase("building requests (once)")
    spans, requests = _requests(scorers)
    max_length = _max_length(scorers)
    todo = broadcast_from_main(list(todo))  # every rank runs the same pass
    checkpoint, variants = _resumable_pass(store, todo, requests, max_length)
    engine = SweepEngine(model, stack, variants, batch_tokens=batch_tokens, pad_id=0,
                         full_model_blocks=full_model_blocks)
    start = time.perf_counter()
    naive = [r for scorer in scorers for r in scorer.naive_requests()]
    compared = [scorer.compares_to_full for scorer, span in zip(scorers, spans, strict=True)
                for _ in range(span.stop - span.start)]
    result = engine.run(requests, max_length, progress=progress, checkpoint=checkpoint, naive=naive,
                        compared=compared) if requests else None
    engine_seconds = time.perf_counter() - start
    share = engine_seconds / max(1, len(variants))  # each variant's part of the pass
    outcome = SweepOutcome()
    progress.phase("aggregating", total=len(todo))
    for variant in todo:
        progress.advance(0, detail=variant.label)
        start = time.perf_counter()
        scores = _aggregated(model, stack, scorers, spans, result, variant)
        saved = VariantResult.of(variant, scores, share + time.perf_counter() - start, "fast")
        finish_variant(saved, outcome, store, on_saved, progress)
    if checkpoint is not None and is_main():  # every rank saved its last state before the results met
        checkpoint.remove()
    outcome.stats = _pass_stats(engine, scorers, spans, len(requests), engine_seconds)
    return outcome


def _requests(scorers: Sequence[Scorer]) -> tuple[list[slice], list[TokenRequest]]:
    """Every scorer's token requests in one list, and each scorer's span of it."""
    spans, requests = [], []
    for scorer in scorers:
        own = scorer.requests()
        spans.append(slice(len(requests), len(requests) + len(own)))
        requests += own
    return spans, requests


def _resumable_pass(store: ResultStore | None, todo: list[Removal], requests: list[TokenRequest],
                    max_length: int) -> tuple[Checkpoint | None, list[Removal]]:
    """The pass's partial-file checkpoint (with a store) and its variants: those of a stored
    partial pass that covers ``todo`` (to finish that pass), else ``todo``."""
    if store is None:
        return None, list(todo)
    checkpoint = Checkpoint(store.checkpoint, fingerprint(requests, max_length, {"settings": store.settings}))
    stored = checkpoint.stored_variants()
    if stored is not None and set(todo) <= set(stored):
        return checkpoint, stored
    return checkpoint, list(todo)


def _aggregated(model: torch.nn.Module, stack: LayerStack, scorers: Sequence[Scorer], spans: list[slice],
                result: EngineResult | None, variant: Removal) -> Scores:
    """One variant's scores: each scorer's aggregation of its answers, plus what it scores with
    the model itself (generation tasks), the variant's blocks removed."""
    scores = Scores()
    answers = result.of(variant) if result is not None else Answers(np.zeros(0), np.zeros(0, dtype=bool))
    for scorer, span in zip(scorers, spans, strict=True):
        scores += scorer.aggregate(answers[span])
        if scorer.needs_model_per_variant():
            with removed_layers(model, variant, stack=stack):
                scores += scorer.score_rest()
    return scores


def _pass_stats(engine: SweepEngine, scorers: Sequence[Scorer], spans: list[slice], requests: int,
                engine_seconds: float) -> dict[str, Any]:
    """How the pass went, for meta.json."""
    stats = engine.stats
    return {
        "variants_in_pass": len(engine.variants), "engine_seconds": round(engine_seconds, 3),
        "requests": requests,
        "task_requests": sum(s.stop - s.start for sc, s in zip(scorers, spans, strict=True) if any(sc.lm_eval_tasks())),
        "model_rows": stats.get("rows"), "shared_rows": stats.get("shared_rows"), "tokens": stats.get("tokens"),
        "tokens_without_sharing": stats.get("unshared_tokens"), "sharing": stats.get("sharing"),
        "batch_tokens": stats.get("budget"), "row_tokens": stats.get("row_tokens"),
        # work in block-token passes (padding excluded): this pass, and the naive engine's for the same variants
        "block_tokens": stats.get("block_tokens"), "naive_block_tokens": stats.get("naive_block_tokens"),
        "work_ratio": stats.get("work_ratio"), "check_block_tokens": stats.get("check_block_tokens"),
        # a greedy step's model holds removals: the real full model's forward for the comparisons, counted above
        **({"reference_block_tokens": stats["reference_block_tokens"]} if "reference_block_tokens" in stats else {}),
        "fast_tasks": [t for s in scorers for t in s.lm_eval_tasks()[0]],
        "naive_tasks": [t for s in scorers for t in s.lm_eval_tasks()[1]],
        "layer_passes_per_row": engine.layer_passes(),
        # a resumed pass: tokens whose rows came from partial files, and tokens computed by this run's ranks
        "resumed_tokens": stats.get("resumed_tokens"), "computed_tokens": stats.get("computed_tokens"),
        "ranks": world().size,
    }


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
    without a result folder: the rows of :func:`~lnsdiag.results.verdict.prune_frame` for the ``ppl``
    metric, plus the number of scored ``tokens``. ``windows`` is a
    :class:`~lnsdiag.data.windows.TokenWindows`.
    """
    stack = find_layers(loaded.model)
    chosen = list(range(len(stack))) if layers is None else sorted(set(layers))
    outcome = run_fast(loaded.model, [PerplexityScorer(loaded.model, windows)],
                       [Removal(), *Removal.each(chosen)], stack=stack,
                       batch_tokens=batch_tokens, progress=progress)
    frame = prune_frame(outcome.results, margins=margins, angular=angular)
    frame = frame[frame["metric"] == "ppl"].reset_index(drop=True)
    frame["tokens"] = sum(windows.scored_tokens)
    return frame
