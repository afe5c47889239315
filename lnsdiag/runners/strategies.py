"""How ``shrink`` chooses n layers to remove: every strategy, registered in the order outputs list them.

A strategy is a function ``(evidence, n_max) -> [(layers, selection), ...]``: for n = 1..n_max the
units it removes (original 0-based block numbers, or a :class:`~lnsdiag.interventions.units.Removal`)
and its own criterion for that choice (NaN when it has none), computed from the :class:`Evidence` it
declared it needs. It chooses among ``evidence.candidates()``: whole blocks, or with ``--unit attn``
/ ``mlp`` the blocks' attention / MLP sub-layers (several kinds: mixed, BlockPruner-style).
``shrink`` gathers that evidence once for every strategy run, scores every choice
against the full model and reports them side by side.

**Adding a strategy** is one function plus one registration::

    def middle_picks(evidence: Evidence, n_max: int) -> list[Choice]:
        mid = evidence.num_layers // 2
        return [(tuple(range(mid - n // 2, mid - n // 2 + n)), math.nan) for n in range(1, n_max + 1)]

    STRATEGIES = (..., Strategy("middle", "the n layers around the middle", "the middle n layers", Need.NOTHING,
                                middle_picks))

Its place in :data:`STRATEGIES` is its place in every output; ``--strategy`` accepts and documents it,
and the report gives it a colour and marker of its own (by that position) and its legend entry. Declare
in ``needs`` what it reads: angular distances, the single-layer sweep, or a scorer for sets it
scores as it goes (:class:`Need`).

This module is plain data and functions on data (no torch, no engine), so the report reads the
registry without importing anything that computes.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from ..errors import OptionError
from ..interventions.units import KIND_NAMES, Removal, Unit

if TYPE_CHECKING:
    import pandas as pd

    from ..results.store import VariantResult

#: One strategy's choice for one n: the layers removed, and its own criterion for them (NaN: none).
Choice = tuple[Removal | Iterable[int], float]
#: The strategy name of an explicit ``layers`` set (scored as it is, chosen by no strategy).
GIVEN = "given"


@dataclass
class Pick:
    """One strategy's choice for n layers removed, and its own criterion for that choice."""

    strategy: str
    n: int
    removal: Removal
    selection: float = math.nan


class Need(enum.Flag):
    """What a strategy reads, so ``shrink`` measures or scores it once for every strategy that does.

    ``ANGULAR``: ``evidence.blocks`` (d(x_l, x_{l+n}) for every block of n ≤ N) and ``evidence.per_layer``
    (per layer: angular distance and Block Influence); needs angular measurement (not ``--no-angular``).
    ``SWEEP``: every single layer is scored with the full model; ``evidence.singles`` holds them.
    ``SCORER``: ``evidence.scorer`` scores removal sets as the strategy goes.
    A strategy needing ``SWEEP`` or ``SCORER`` runs after the first pass, when ``evidence.rank`` (the
    ranking metric) is known; its picks are then scored in a pass of their own. The others choose before
    any scoring and their picks join the first pass.
    """

    NOTHING = 0
    ANGULAR = enum.auto()
    SWEEP = enum.auto()
    SCORER = enum.auto()


class SetScorer(Protocol):
    """Scores removal sets into the run's store, once each (``shrink``'s scorer)."""

    def score(self, sets: Sequence[Removal], label: str) -> Mapping[Removal, VariantResult]:
        """Every set (``Removal()``: the full model) scored, in one pass for those not stored yet."""
        ...

    def greedy_step(self, removed: Removal, label: str) -> Mapping[Removal, VariantResult]:
        """Every set ``removed`` + one more candidate unit, scored in one pass over the model without
        ``removed``."""
        ...


@dataclass
class Evidence:
    """What strategies choose from: ``blocks``, ``per_layer`` and ``singles`` only when a strategy run
    :class:`Need`\\ s them, ``rank`` once the first pass is scored, ``scorer`` always."""

    num_layers: int
    blocks: pd.DataFrame | None = None  #: start_layer, block_size, angular_distance, block_influence
    per_layer: pd.DataFrame | None = None  #: layer, (unit,) angular_distance, block_influence
    singles: dict[Unit, VariantResult] | None = None  #: each candidate's own removal, scored
    rank: tuple[str, str] | None = None  #: (task, metric) the harm is measured on
    scorer: SetScorer | None = None
    units: tuple[str, ...] = ("block",)  #: the unit kinds strategies choose among

    def candidates(self) -> list[Unit]:
        """Every unit a strategy may remove: each block's unit of each asked kind, in model order."""
        return [KIND_NAMES[k](i) for i in range(self.num_layers) for k in KIND_NAMES if k in self.units]


@dataclass(frozen=True)
class Strategy:
    """A registered strategy: its ``--strategy`` name, its help (what it removes, after whom), its legend
    entry in the pruning-curve plot, what it needs, and the function that chooses."""

    name: str
    help: str
    legend: str
    needs: Need
    choose: Callable[[Evidence, int], Sequence[Choice]]
    #: whether it chooses among attention / MLP sub-layers too (``--unit attn,mlp``), not only blocks
    sublayers: bool = True

    @property
    def after_first_pass(self) -> bool:
        """Whether it chooses from scores (so only once the full model and the single layers are scored)."""
        return bool(self.needs & (Need.SWEEP | Need.SCORER))

    def picks(self, evidence: Evidence, n_max: int) -> list[Pick]:
        """Its choices for n = 1..n_max as :class:`Pick`\\ s, each checked to remove n distinct layers."""
        chosen = list(self.choose(evidence, n_max))
        if len(chosen) != n_max:
            raise ValueError(f"strategy {self.name!r} chose {len(chosen)} removal sets for n = 1..{n_max}")
        picks = []
        for n, (layers, selection) in enumerate(chosen, start=1):
            removed = Removal.of(layers)
            if len(removed) != n or not all(0 <= u.block < evidence.num_layers for u in removed):
                raise ValueError(f"strategy {self.name!r} chose {removed.cell or 'no layer'} for n = {n}: not {n} "
                                 f"distinct layers of {evidence.num_layers}")
            picks.append(Pick(self.name, n, removed, float(selection)))
        return picks


def harm(result: VariantResult, task: str, metric: str) -> float:
    """How much worse than anything: the ranking metric's value, signed so that lower is better."""
    for row in result.rows:
        if row.task == task and row.metric == metric:
            return -row.value if row.higher_is_better else row.value
    raise OptionError("{rank_by} {task}/{metric}: no such metric in the results (have: {have})", task=task,
                      metric=metric, have=", ".join(sorted({f"{r.task}/{r.metric}" for r in result.rows})))


# --- the strategies ---------------------------------------------------------------------------------

def angular_picks(evidence: Evidence, n_max: int) -> list[Choice]:
    """Gromov et al.: for each n the block [l, l+n) minimising d(x_l, x_{l+n})."""
    picks = []
    for n in range(1, n_max + 1):
        part = evidence.blocks[evidence.blocks["block_size"] == n].sort_values(["angular_distance", "start_layer"])
        start = int(part.iloc[0]["start_layer"])
        picks.append((tuple(range(start, start + n)), float(part.iloc[0]["angular_distance"])))
    return picks


def bi_picks(evidence: Evidence, n_max: int) -> list[Choice]:
    """ShortGPT: the n units of lowest Block Influence — of the block, or of a sub-layer's own update
    (1 − cos(x, x + attn), 1 − cos(h, h + mlp)) — ties: the lower layer first."""
    frame = evidence.per_layer
    units = frame["unit"] if "unit" in frame else ["block"] * len(frame)
    bi = {KIND_NAMES[str(k)](int(i)): float(b)
          for i, k, b in zip(frame["layer"], units, frame["block_influence"], strict=True)}
    chosen = sorted((u for u in evidence.candidates() if u in bi), key=lambda u: (bi[u], u))
    return [(Removal(tuple(chosen[:n])), float(sum(bi[u] for u in chosen[:n]))) for n in range(1, n_max + 1)]


def sweep_picks(evidence: Evidence, n_max: int) -> list[Choice]:
    """The n units whose single removal harmed the ranking metric least (ties: the lower layer)."""
    cost = {u: harm(r, *evidence.rank) for u, r in evidence.singles.items()}
    order = sorted(cost, key=lambda u: (cost[u], u))
    return [(Removal(tuple(order[:n])), float(cost[order[n - 1]])) for n in range(1, n_max + 1)]


def greedy_picks(evidence: Evidence, n_max: int) -> list[Choice]:
    """SLEB: each step removes the unit whose removal harms the ranking metric least, given the
    units already removed (ties: the lower layer); with several kinds, BlockPruner's mixed search."""
    removed = Removal()
    picks = []
    for n in range(1, n_max + 1):
        scores = evidence.scorer.greedy_step(removed, f"greedy step {n}/{n_max}")
        cost = {s: harm(r, *evidence.rank) for s, r in scores.items()}
        removed = min(cost, key=lambda s: (cost[s], s))
        picks.append((removed, float(cost[removed])))
    return picks


def last_picks(evidence: Evidence, n_max: int) -> list[Choice]:
    """The n deepest units before the final layer."""
    before = [u for u in evidence.candidates() if u.block < evidence.num_layers - 1]
    return [(Removal(tuple(before[len(before) - n:])), math.nan) for n in range(1, n_max + 1)]


#: Every strategy, in the order ``--strategy`` lists them and every output shows them.
STRATEGIES: tuple[Strategy, ...] = (
    Strategy("angular", "contiguous block of least angular distance, Gromov et al.", "least-changing block",
             Need.ANGULAR, angular_picks, sublayers=False),
    Strategy("bi", "lowest Block Influence, ShortGPT", "lowest block influence", Need.ANGULAR, bi_picks),
    Strategy("sweep", "cheapest single removals", "smallest one-layer Δ", Need.SWEEP, sweep_picks),
    Strategy("greedy", "SLEB: re-scored after each removal", "one layer at a time", Need.SWEEP | Need.SCORER,
             greedy_picks),
    Strategy("last", "the deepest before the final layer", "the last n layers", Need.NOTHING, last_picks),
)


def names() -> tuple[str, ...]:
    """The registered strategies' names, in registry order."""
    return tuple(s.name for s in STRATEGIES)


def registered(name: str) -> Strategy:
    """The registered strategy called ``name``."""
    for s in STRATEGIES:
        if s.name == name:
            return s
    raise OptionError("unknown {strategies} {value!r} (use {names} or all)", value=name, names=", ".join(names()))


def output_order() -> tuple[str, ...]:
    """How every output orders strategies: the registry's order, then an explicit set."""
    return (*names(), GIVEN)
