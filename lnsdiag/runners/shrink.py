"""`shrink` as a library call: remove n = 1..N layers at once, chosen by several strategies, and
score every choice against the full model on the same data.

The strategies (registered in :mod:`.strategies`) are the ones the literature uses, side by side:

* ``angular`` — the contiguous block [l, l+n) whose input and output are closest in angle,
  d(x_l, x_{l+n}) (Gromov et al., "The Unreasonable Ineffectiveness of the Deeper Layers");
* ``bi`` — the n layers of lowest Block Influence, 1 − cos(x_l, x_{l+1}) (ShortGPT);
* ``sweep`` — the n layers whose single removal cost least, from a one-layer sweep;
* ``greedy`` — remove the layer whose removal costs least given those already removed, re-scored
  after each step (SLEB);
* ``last`` — the n deepest layers before the final one (the usual baseline);
* ``given`` — an explicit set (``layers``), scored as it is.

Every distinct removal set is one result in a resumable store keyed by the set, so strategies
that pick the same layers share it and a larger N reuses what a smaller one scored. All sets are
scored in one fast-engine pass: a set resumes from the kept input of its first removed block
(candidates sharing a kept prefix reuse it). Each greedy step is one pass over the current
model's remaining layers. Statistics and verdicts are ``prune``'s (paired, against the full model)::

    from lnsdiag import load_model
    from lnsdiag.runners import shrink
    run = shrink.run(load_model("meta-llama/Llama-2-7b-hf"), shrink.ShrinkConfig(remove=8), "out/")
    run.frame  # one row per (strategy, n_removed, task, metric)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from ..data.text import TextSource
from ..data.windows import TokenWindows, default_seq_len
from ..distributed import on_main
from ..errors import Interrupted, OptionError, UserError
from ..interventions.units import KIND_NAMES, Removal, parse_kinds
from ..measure.angular import AngularResult
from ..model.cost import Savings, removal_savings
from ..model.load import LoadedModel
from ..model.structure import LayerStack, find_layers, sublayer_site
from ..progress import SILENT, Progress
from ..results.lock import holds_folder_lock
from ..results.margins import rule_text
from ..results.store import ResultStore, VariantResult, read_settings, settings_differ
from ..results.verdict import headline_metrics, prune_frame
from ..runs import RunFiles, Timer, atomic_write, run_record, write_tables
from .angular_cache import AngularCache, cached_angular
from .heal import (
    HealConfig,
    HealOutcome,
    calibration_beside,
    calibration_of,
    heal_sets,
    heal_store,
    healed_frame,
)
from .scoring import Scoring, ScoringConfig, ScoringInputs, prepare_scoring
from .set_scorer import SetScores
from .shrink_table import COLUMNS, FULL, tidy_frame, wide_shrink_frame
from .strategies import (
    GIVEN,
    Evidence,
    Need,
    Pick,
    Strategy,
    harm,
    names,
    output_order,
    registered,
)

#: Files a run writes into its folder (``fresh`` removes them with the stored results).
OUTPUTS = ("angular.csv", "angular_blocks.csv", "angular_settings.json", "continuations.json", "shrink.csv",
           "shrink_wide.csv", "shrink.tex", "shrink.png", "shrink.pdf", "meta.json")


#: Layers removed at once when neither ``remove`` nor ``layers`` is given.
DEFAULT_REMOVE = 4


def parse_strategies(value: str | Sequence[str] | None) -> tuple[str, ...]:
    """``"angular,greedy"`` or a sequence of such (``--strategy`` repeated) → a checked tuple (``None`` or
    ``"all"``: every strategy)."""
    if value is None:
        return names()
    given = [value] if isinstance(value, str) else list(value)
    wanted = [n.strip().lower() for part in given for n in str(part).split(",") if n.strip()]
    if not wanted or wanted == ["all"]:
        return names()
    for name in wanted:
        registered(name)  # known?
    return tuple(dict.fromkeys(wanted))


@dataclass(frozen=True)
class ShrinkConfig:
    """Everything ``lnsdiag shrink`` can be told, checked when built (the layer count is checked
    against the model by :meth:`check_model`).

    ``remove`` is N [default: 4]; ``layers`` one set scored as it is instead (N is its size: give
    one of the two). ``scoring`` holds the options ``prune`` shares (tasks, perplexity text, margin,
    engine, ...); ``heal`` how each pick is also healed and scored healed (:mod:`.heal`). ``rank_by``
    (``"task/metric"``) is what ``sweep`` and ``greedy`` minimise the harm on
    [default: the first task's main metric, else perplexity].
    """

    remove: int | None = None
    strategies: tuple[str, ...] | str | None = None
    layers: Removal | Sequence[int] | str | None = None
    rank_by: str | None = None
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    heal: HealConfig = field(default_factory=HealConfig)
    units: tuple[str, ...] | str = ("block",)

    def __post_init__(self) -> None:
        object.__setattr__(self, "units", parse_kinds(self.units))
        sublayers = self.units != ("block",)
        if sublayers and self.layers is not None:
            raise OptionError("{units} is what strategies choose among; {layers} names its units itself "
                              "(e.g. 3.attn,5.mlp): drop {units}")
        if sublayers and self.heal.methods:
            raise OptionError("{heal} heals removed blocks; removed attention / MLP sub-layers ({units} "
                              "{value}) are not healable yet", value=",".join(self.units))
        explicit = self.strategies is not None and parse_strategies(self.strategies) != names()
        if self.layers is not None and self.strategies is not None:
            raise OptionError("give {layers} or {strategies}, not both: {layers} scores that one set as it is")
        if self.layers is not None and self.remove is not None:
            raise OptionError("give {layers} or {remove}, not both: {layers} scores that one set as it is (its "
                              "size is the number removed)")
        if self.layers is not None:
            layers = Removal.parse(self.layers)
            if layers.sublayers and self.heal.methods:
                raise OptionError("{heal} heals removed blocks; {layers} {value} removes sub-layers, which are not "
                                  "healable yet", value=layers.cell)
            object.__setattr__(self, "layers", layers)
            object.__setattr__(self, "remove", len(layers))
            object.__setattr__(self, "strategies", (GIVEN,))
        else:
            object.__setattr__(self, "strategies", parse_strategies(self.strategies))
            if sublayers:
                self._keep_sublayer_strategies(explicit)
            if self.remove is None:
                object.__setattr__(self, "remove", DEFAULT_REMOVE)
            if not isinstance(self.remove, int) or isinstance(self.remove, bool) or self.remove < 1:
                raise OptionError("{remove} must be at least 1, not {value}", value=self.remove)
        if self.rank_by is not None and "/" not in self.rank_by:
            raise OptionError("{rank_by} must be TASK/METRIC (e.g. arc_easy/acc or ppl/ppl), not {value!r}",
                              value=self.rank_by)
        if any(Need.ANGULAR in s.needs for s in self.chosen()) and not self.scoring.angular:
            raise OptionError("{needing} angular distances: turn {angular} on", needing=_needing_angular())

    def _keep_sublayer_strategies(self, explicit: bool) -> None:
        """With sub-layer units, the strategies that choose among them: a named one that cannot is refused,
        the default (all) drops it."""
        blocks_only = [n for n in self.strategies if not registered(n).sublayers]
        if blocks_only and explicit:
            raise OptionError("{strategies} {value} removes contiguous whole blocks: it has no sub-layer form "
                              "(drop it, or {units} block)", value=blocks_only[0])
        object.__setattr__(self, "strategies", tuple(n for n in self.strategies if n not in blocks_only))

    def chosen(self) -> list[Strategy]:
        """The registered strategies to run, in registry order (none for an explicit set)."""
        return [registered(name) for name in names() if name in self.strategies]

    def check_scored(self, scored: Mapping[str, Sequence[str]] | None) -> None:
        """``rank_by`` and the margins against what the run scores (task -> metrics,
        :func:`~lnsdiag.results.margins.scored_metrics`), known once the tasks are loaded: before the
        model loads, and before any output exists. None: not known, nothing checked."""
        if scored is None:
            return
        self.scoring.check_scored(scored)
        if self.rank_by is None:
            return
        task, metric = self.rank_by.split("/", 1)
        if task not in scored:
            raise OptionError("{rank_by} {value}: {task!r} is not scored in this run (scored: {have})",
                              value=self.rank_by, task=task, have=", ".join(scored) or "nothing")
        if metric not in scored[task]:
            raise OptionError("{rank_by} {value}: task {task!r} reports no metric {metric!r} (it reports: {have})",
                              value=self.rank_by, task=task, metric=metric, have=", ".join(scored[task]))

    def check_model(self, num_layers: int, stack: LayerStack | None = None) -> None:
        """The removal must leave at least one layer and name real ones; sub-layers the model's blocks can
        give up (checked on ``stack``, when given: a family that cannot split is refused in one line)."""
        candidates = (num_layers - 1) * len(self.units)  # the final layer's units stay (the ``last`` baseline)
        if self.remove > candidates and self.units == ("block",):
            raise OptionError("{remove} {value} leaves no layer: the model has {count} (remove at most {most})",
                              value=self.remove, count=num_layers, most=candidates)
        if self.remove > candidates:
            raise OptionError("{remove} {value} is more than the {most} sub-layers ({kinds}) of the model's first "
                              "{kept} layers that strategies choose among", value=self.remove, most=candidates,
                              kinds=", ".join(self.units), kept=num_layers - 1)
        if self.layers is not None:
            bad = [u for u in self.layers if not 0 <= u.block < num_layers]
            if bad:
                raise OptionError("{layers} {value} is out of range: the model has layers 0-{last}", value=str(bad[0]),
                                  last=num_layers - 1)
        if stack is not None:
            asked = self.layers.sublayers if self.layers is not None else [
                KIND_NAMES[k](i) for k in self.units if k != "block" for i in range(num_layers)]
            for unit in asked:
                sublayer_site(stack.layers[unit.block], unit.kind)


def _needing_angular() -> str:
    """Who needs angular distances, as the registry says: ``the angular and bi strategies need``."""
    who = [name for name in names() if Need.ANGULAR in registered(name).needs]
    listed = who[0] if len(who) == 1 else ", ".join(who[:-1]) + " and " + who[-1]
    return f"the {listed} strateg{'ies need' if len(who) > 1 else 'y needs'}"


@dataclass
class ShrinkRun:
    """A shrink's results: the tidy table, each strategy's picks, the tasks shown, and the record."""

    frame: pd.DataFrame
    picks: list[Pick]
    tasks: list[str]
    meta: dict[str, Any]
    folder: Path
    rank_by: tuple[str, str]
    #: each healed pick's rows (``heal``: the method), and the heals themselves (empty without ``--heal``)
    healed: pd.DataFrame = field(default_factory=pd.DataFrame)
    heals: dict[str, HealOutcome] = field(default_factory=dict)

    def write(self) -> RunFiles:
        """shrink.csv (tidy: the unhealed rows, then the healed ones), shrink_wide.csv (a row per strategy,
        n and heal) and meta.json, into the run's folder."""
        both = pd.concat([self.frame, self.healed], ignore_index=True) if len(self.healed) else self.frame
        wide = wide_shrink_frame(self.frame, self.tasks)
        if len(self.healed):
            full = self.frame[self.frame["strategy"] == FULL]
            parts = [wide.assign(heal="none")]
            for method, rows in self.healed.groupby("heal", sort=False):
                healed = wide_shrink_frame(pd.concat([full, rows], ignore_index=True), self.tasks)
                parts.append(healed[healed["strategy"] != FULL].assign(heal=method))
            wide = pd.concat(parts, ignore_index=True)
        return write_tables(self.folder, {"shrink.csv": tidy_frame(both), "shrink_wide.csv": wide}, self.meta)

    def best(self, n: int | None = None) -> Pick:
        """The pick with the best value on the ranking metric for n removed (default: the largest n)."""
        n = n if n is not None else max(p.n for p in self.picks)
        task, metric = self.rank_by
        rows = self.frame[(self.frame["n_removed"] == n) & (self.frame["task"] == task)
                          & (self.frame["metric"] == metric)]
        if rows.empty:
            raise UserError(f"no strategy removed {n} layers in this run")
        higher = bool(rows["higher_is_better"].iloc[0])
        best = rows.sort_values(["value", "strategy"], ascending=[not higher, True]).iloc[0]
        return next(p for p in self.picks if p.strategy == best["strategy"] and p.n == n)

    def pick(self, strategy: str, n: int | None = None) -> Pick:
        n = n if n is not None else max(p.n for p in self.picks)
        for p in self.picks:
            if p.strategy == strategy and p.n == n:
                return p
        raise UserError(f"strategy {strategy!r} was not run for {n} layers (ran: "
                        f"{', '.join(sorted({p.strategy for p in self.picks}))})")


def _rank_metric(config: ShrinkConfig, baseline: VariantResult, tasks: list[str]) -> tuple[str, str]:
    if config.rank_by is not None:
        task, metric = config.rank_by.split("/", 1)
        harm(baseline, task, metric)  # exists?
        return task, metric
    frame = pd.DataFrame([{"task": r.task, "metric": r.metric} for r in baseline.rows])
    heads = headline_metrics(frame, tasks)
    if not heads:
        raise OptionError("nothing to rank layers by: give {rank_by} TASK/METRIC")
    return heads[0]


@holds_folder_lock("out")
def run(loaded: LoadedModel, config: ShrinkConfig, out: str | Path, *, inputs: ScoringInputs | None = None,
        layers_path: str | None = None, progress: Progress = SILENT, timer: Timer | None = None,
        angular_text: TextSource | None = None, angular: AngularResult | None = None,
        reuse: str | Path | None = None, calibration: TextSource | None = None,
        calibration_windows: TokenWindows | None = None) -> ShrinkRun:
    """Pick, score and compare the removal sets of every strategy into ``out`` (resuming what is there).

    ``angular``: block angular distances already measured (n up to at least N) instead of measuring
    them. ``reuse``: a ``prune`` (or ``shrink``) folder made with the same scoring settings whose
    stored results (the full model, single layers, sets) are copied in instead of scored again.
    ``calibration``: the heal's calibration text, if already loaded (``config.heal`` says where from);
    ``calibration_windows``: its windows, if already checked against the evaluation text
    (:func:`~.heal.check_calibration`, which the command line calls before the folder exists).
    Ctrl-C raises :class:`~lnsdiag.errors.Interrupted` saying what is saved.
    """
    timer = timer or Timer()
    folder = Path(out)
    scoring_config = config.scoring
    if config.heal.methods and calibration is None:
        calibration = config.heal.load_calibration(calibration_beside(scoring_config))
    inputs = inputs or scoring_config.load_inputs()
    config.check_scored(scoring_config.scored(inputs))
    stack = find_layers(loaded.model, layers_path)
    L = len(stack)
    config.check_model(L, stack)
    scoring = prepare_scoring(loaded, scoring_config, inputs, stack, progress, folder)
    tasks = scoring.tasks
    if config.rank_by is not None and config.rank_by.split("/", 1)[0] not in tasks:
        raise OptionError("{rank_by} {value}: {task!r} is not scored in this run (scored: {scored})",
                          value=config.rank_by, task=config.rank_by.split("/", 1)[0], scored=", ".join(tasks))
    calib = None
    if config.heal.methods and calibration_windows is not None:
        calib = calibration_windows
    elif config.heal.methods:  # refused before the store writes anything, if it overlaps the evaluation text
        calib = calibration_of(loaded, config.heal, calibration, inputs.ppl_text, scoring.windows,
                               scoring_config.seq_len)
    if reuse is not None:  # refused before the store writes anything into the folder
        on_main(lambda: check_reuse(reuse, scoring.settings))
    store = ResultStore(folder, scoring.settings, fresh=scoring_config.fresh, outputs=OUTPUTS,
                        samples=scoring_config.samples)
    for scorer in scoring.scorers:  # the settings are accepted: what a resumed run reuses
        scorer.keep(folder)
    heal_stores = {method: heal_store(folder, scoring, config.heal, calib, method, fresh=scoring_config.fresh,
                                      samples=scoring_config.samples) for method in config.heal.methods}
    if reuse is not None:
        copied = on_main(lambda: _reuse(Path(reuse), store))  # one rank copies; every rank then reads
        if copied:
            progress.note(f"reusing {copied} stored result(s) from {reuse}")
    scorer = SetScores(loaded, stack, scoring, store, engine=scoring_config.engine,
                       batch_tokens=scoring_config.batch_tokens, units=config.units, progress=progress)
    if scorer.done():
        progress.note(f"resuming: {len(scorer.done())} removal set(s) already scored in {folder}")
    N = config.remove
    try:
        with timer("scoring"):
            evidence = Evidence(num_layers=L, scorer=scorer, units=config.units)
            if any(Need.ANGULAR in s.needs for s in config.chosen()):
                evidence.blocks, evidence.per_layer = _angular_evidence(angular, loaded, folder, stack, angular_text,
                                                                        scoring, config, progress, timer)
            picks, rank = _choose_and_score(config, scorer, evidence, tasks)
        heals = {}
        if calib is not None:
            with timer("heal"):
                checked = inputs.ppl_text.name if inputs.ppl_text is not None else None
                for method in config.heal.methods:
                    heals[method] = heal_sets(loaded, stack, scoring, config.heal, [p.removal for p in picks], calib,
                                              heal_stores[method], method=method, seed=scoring_config.seed,
                                              batch_size=scoring_config.batch_size, progress=progress,
                                              checked_against=checked)
    except KeyboardInterrupt as exc:
        raise Interrupted(f"{len(store.done())} removal sets are saved in {folder}; rerun the same command to "
                          "resume.") from exc
    position = {name: k for k, name in enumerate(output_order())}
    picks.sort(key=lambda p: (position[p.strategy], p.n))
    context = default_seq_len(loaded.model, scoring_config.seq_len)
    savings = {p.removal: removal_savings(loaded.model, p.removal, context=context, stack=stack) for p in picks}
    frame = shrink_frame(scorer.done(), picks, scoring_config, rank, savings)
    compare = lambda results, chosen: shrink_frame(results, chosen, scoring_config, rank, savings)  # noqa: E731
    healed = pd.concat([healed_frame(scorer.done()[Removal()], h, picks, compare) for h in heals.values()],
                       ignore_index=True) if heals else pd.DataFrame()
    meta = run_record(
        "shrink", model=loaded.describe(), settings=scoring.settings, remove=N, strategies=list(config.strategies),
        units=list(config.units),
        rank_by="/".join(rank), picks=[{"strategy": p.strategy, "n_removed": p.n,
                                        "removed_layers": list(p.removal.blocks),
                                        "removed_units": [str(u) for u in p.removal],
                                        "params_removed": savings[p.removal].params,
                                        "flops_per_token_saved": savings[p.removal].flops,
                                        "selection": None if math.isnan(p.selection) else p.selection}
                                       for p in picks],
        **inputs.describe(), layer_stack=stack.path, num_layers=L,
        margins=scoring_config.margins.as_json(), dead_rule=rule_text(scoring_config.margins, "removal set",
                                                                  "distinct removal sets of the run"),
        multiplicity=("hurts/helps: Holm-adjusted p-values over the distinct removal sets of this run, per (task, "
                      "metric); dead: two one-sided tests at alpha 0.05 per set, not adjusted"),
        savings_context=context, engine=scoring_config.engine, passes=scorer.passes, sets_scored=len(scorer.done()) - 1,
        heal={name: h.describe() for name, h in heals.items()} or None, timings=dict(timer.seconds))
    return ShrinkRun(frame, picks, tasks, meta, folder, rank, healed, heals)


def _choose_and_score(config: ShrinkConfig, scorer: SetScores, evidence: Evidence, tasks: list[str]
                      ) -> tuple[list[Pick], tuple[str, str]]:
    """Every chosen strategy's picks for n = 1..N, scored, and the ranking metric. Strategies that choose
    before any scoring go first and their picks join one pass with the full model and (when a strategy
    needs the sweep) every single layer; the others then choose from those scores, in registry order."""
    N, chosen = config.remove, config.chosen()
    picks = [Pick(GIVEN, N, config.layers)] if config.layers is not None else []
    for s in chosen:
        if not s.after_first_pass:
            picks += s.picks(evidence, N)
    sweep = any(Need.SWEEP in s.needs for s in chosen)
    singles = [Removal.of(u) for u in evidence.candidates()] if sweep else []
    # one pass: the full model, every single layer the sweep needs, every pick chosen before scoring
    results = scorer.score([Removal(), *singles, *(p.removal for p in picks)], "full model and candidates")
    evidence.rank = _rank_metric(config, results[Removal()], tasks)
    if sweep:
        wanted = set(singles)
        evidence.singles = {s.single: r for s, r in results.items() if s in wanted}
    for s in chosen:
        if s.after_first_pass:
            later = s.picks(evidence, N)
            scorer.score([p.removal for p in later], f"{s.name}'s candidates")  # what it did not score itself
            picks += later
    return picks, evidence.rank


def _angular_evidence(angular: AngularResult | None, loaded: LoadedModel, folder: Path, stack: LayerStack,
                      text: TextSource | None, scoring: Scoring, config: ShrinkConfig, progress: Progress,
                      timer: Timer) -> tuple[pd.DataFrame | None, pd.DataFrame]:
    """Block angular distances and per-layer Block Influence: those given when they reach N (and hold the
    asked units), else measured."""
    if angular is not None and config.units != ("block",) and set(config.units) <= set(angular.units):
        units = angular.units_frame()
        return None, units[units["unit"].isin(config.units)].reset_index(drop=True)
    if angular is not None and config.units == ("block",) and int(angular.blocks["block_size"].max()) >= config.remove:
        return angular.blocks, angular.layers[["layer", "angular_distance", "block_influence"]]
    with timer("angular"):
        return _angular(loaded, folder, stack, text, scoring, config, progress)


def check_reuse(reuse: str | Path, settings: Mapping[str, Any] | None = None) -> Path:
    """``reuse`` if it is a result folder (it holds a readable settings.json) and, given this run's
    ``settings``, one made with the same: checked before any slow work, and before any output."""
    source = Path(reuse)
    if not (source / "settings.json").is_file():
        raise OptionError("{reuse} {value}: not a prune or shrink folder (no settings.json)", value=source)
    stored = read_settings(source / "settings.json", what="--reuse")
    differ = settings_differ(settings, stored) if settings is not None else []
    if differ:
        raise OptionError("{reuse} {value}: made with other settings ({differ}); its results would not be comparable",
                          value=source, differ=", ".join(differ[:3]))
    return source


def _reuse(source: Path, store: ResultStore) -> int:
    """Copy the stored results of another run of the same settings into ``store``; how many."""
    check_reuse(source, store.settings)
    copied = 0
    for path in sorted((source / "variants").glob("*.json")):
        target = store.variants / path.name
        if not target.exists():
            atomic_write(target, path.read_bytes())
            copied += 1
    return copied


def _angular(loaded: LoadedModel, folder: Path, stack: LayerStack, text: TextSource | None, scoring: Scoring,
             config: ShrinkConfig, progress: Progress) -> tuple[pd.DataFrame | None, pd.DataFrame]:
    """Per-block angular distances d(x_l, x_{l+n}) for n ≤ N and per-layer Block Influence, on
    ``text`` if given, else on the perplexity windows, else on the default text; reused from a
    previous run of the same settings. With sub-layer units, the Block Influence of each asked unit's
    own step instead (no block table: the strategy reading it works on whole blocks only)."""
    stamp = {**scoring.settings, "max_block": config.remove, "text": text.name if text is not None else None}
    options = dict(text=text, batch_size=config.scoring.batch_size, progress=progress)
    if config.units != ("block",):
        units = cached_angular(loaded, stack, scoring, AngularCache(folder, "layers", stamp, units=config.units),
                               **options)
        return None, units[units["unit"].isin(config.units)].reset_index(drop=True)
    blocks = cached_angular(loaded, stack, scoring, AngularCache(folder, "blocks", stamp, max_block=config.remove),
                            **options)
    ones = blocks[blocks["block_size"] == 1].rename(columns={"start_layer": "layer"})
    return blocks, ones[["layer", "angular_distance", "block_influence"]].reset_index(drop=True)


def shrink_frame(results: dict[Removal, VariantResult], picks: Sequence[Pick], config: ScoringConfig,
                 rank: tuple[str, str] | None = None, savings: Mapping[Removal, Savings] | None = None
                 ) -> pd.DataFrame:
    """One row per (strategy, n, task, metric): ``prune``'s paired comparison of each pick with
    the full model (value, Δ, intervals, verdict, retention), Holm-adjusted over the distinct
    removal sets of the run per metric; the full model's rows first (strategy ``full``, n 0). With
    ``savings``, each pick's share of the parameters and of the FLOPs per token it removes (%)."""
    asked = {Removal(), *(p.removal for p in picks)}
    compared = prune_frame({s: results[s] for s in asked}, margins=config.margins,
                           bootstrap_iters=config.bootstrap_iters, seed=config.seed)
    by_set = dict(list(compared.groupby("variant", sort=False)))  # a variant's name is its removal's
    parts = [_tagged(by_set[Removal().name], FULL, 0, Removal(), math.nan)]
    parts += [_tagged(by_set[p.removal.name], p.strategy, p.n, p.removal, p.selection) for p in picks]
    frame = pd.concat(parts, ignore_index=True).assign(heal="none")
    saved = savings or {}
    for column, share in (("params_removed_pct", "params_fraction"), ("flops_saved_pct", "flops_fraction")):
        frame[column] = [100.0 * getattr(saved[r], share) if r in saved else (0.0 if not r else math.nan)
                         for r in map(Removal.from_cell, frame["removed_layers"])]
    return frame[COLUMNS]


def _tagged(part: pd.DataFrame, strategy: str, n: int, removal: Removal, selection: float) -> pd.DataFrame:
    part = part.copy()
    part.insert(0, "strategy", strategy)
    part.insert(1, "n_removed", n)
    part.insert(2, "removed_layers", removal.cell)
    part["selection"] = selection
    return part
