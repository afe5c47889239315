"""Scoring removal sets for ``shrink``, each once: the strategies' :class:`~.strategies.SetScorer`.

Every set goes into the run's resumable store; a greedy step (SLEB, BlockPruner) scores every set
``removed`` + one more candidate unit in one fast-engine pass over the model with ``removed`` taken
out, so each candidate resumes from its own block's kept input.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..engine.naive import run_naive
from ..engine.sweep import run_fast
from ..interventions.removal import removed_layers
from ..interventions.units import KIND_NAMES, Block, Removal, Unit
from ..model.load import LoadedModel
from ..model.structure import LayerStack
from ..progress import Progress
from ..results.store import ResultStore, VariantResult
from .scoring import Scoring


class SetScores:
    """Scores removal sets into ``store``, once each, with the engine ``engine`` (``fast``, ``naive``);
    greedy steps add one unit of the ``units`` kinds at a time."""

    def __init__(self, loaded: LoadedModel, stack: LayerStack, scoring: Scoring, store: ResultStore, *,
                 engine: str, batch_tokens: int | None, units: Sequence[str], progress: Progress) -> None:
        self.model, self.stack, self.scorers = loaded.model, stack, scoring.scorers
        self.store, self.engine, self.batch_tokens = store, engine, batch_tokens
        self.units, self.progress = tuple(units), progress
        self.passes: list[dict[str, Any]] = []

    def done(self) -> dict[Removal, VariantResult]:
        return self.store.done()

    def score(self, sets: Sequence[Removal], label: str) -> dict[Removal, VariantResult]:
        """Score every set not yet stored (``Removal()``: the full model), all in one pass."""
        done = self.done()
        todo = [s for s in dict.fromkeys(sets) if s not in done]
        if todo:
            engine = run_naive if self.engine == "naive" else run_fast
            extra = {"batch_tokens": self.batch_tokens} if engine is run_fast else {}
            outcome = engine(self.model, self.scorers, todo, stack=self.stack, store=self.store,
                             progress=self.progress, **extra)
            self.passes.append({"pass": label, "sets": len(todo), **outcome.stats})
        return self.done()

    def greedy_step(self, removed: Removal, label: str) -> dict[Removal, VariantResult]:
        """Every set ``removed`` + one more unit. Fast engine: one pass over the current model
        (``removed`` taken out by the surgery, its whole blocks out of the stack the engine sees), so
        each candidate resumes from its own block."""
        rest = [i for i in range(len(self.stack)) if i not in removed.blocks]
        wanted = {removed | Removal.of(u): u for u in self.candidates(removed)}
        done = self.done()
        missing = [s for s in wanted if s not in done]
        if missing and (self.engine == "naive" or not removed):
            self.score(missing, label)
        elif missing:
            view = LayerStack(self.stack.path, [self.stack.layers[i] for i in rest])
            position = {i: k for k, i in enumerate(rest)}
            with removed_layers(self.model, removed, stack=self.stack):
                outcome = run_fast(self.model, self.scorers,
                                   [Removal.of(_moved(wanted[s], position[wanted[s].block])) for s in missing],
                                   stack=view, progress=self.progress, batch_tokens=self.batch_tokens,
                                   full_model_blocks=len(self.stack))  # KL against the real full model
            for in_view, result in outcome.results.items():  # numbered in the view: back to the model's blocks
                unit = in_view.units[0]
                result.removal = removed | Removal.of(_moved(unit, rest[unit.block]))
                self.store.save(result)
            self.passes.append({"pass": label, "sets": len(missing), **outcome.stats})
        done = self.done()
        return {s: done[s] for s in wanted}

    def candidates(self, removed: Removal) -> list[Unit]:
        """The units one greedy step may add to ``removed``: of the asked kinds, not removed, not inside
        a removed block, and no whole block one of whose sub-layers is already removed."""
        touched = {u.block for u in removed}
        out = []
        for i in range(len(self.stack)):
            for kind in (k for k in KIND_NAMES if k in self.units):
                unit = KIND_NAMES[kind](i)
                if unit in removed or i in removed.blocks or (isinstance(unit, Block) and i in touched):
                    continue
                out.append(unit)
        return out


def _moved(unit: Unit, block: int) -> Unit:
    """The same kind of unit in another block (numbering in a view of the stack, and back)."""
    return type(unit)(block)
