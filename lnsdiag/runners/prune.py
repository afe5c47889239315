"""`prune` as a library call: remove each layer in turn, score every variant, say which are dead.

:class:`PruneConfig` holds every choice (validated when built, so a mistake fails before any
output exists); :func:`run` does the resumable sweep into a folder and returns the tidy
table and the JSON record as plain data, for the command line or a notebook to show::

    from lnsdiag import load_model
    from lnsdiag.runners import prune
    run = prune.run(load_model("meta-llama/Llama-2-7b-hf"), prune.PruneConfig(tasks=("arc_easy",)), "out/")
    run.frame  # one row per (variant, task, metric)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from ..data.text import TextSource
from ..engine.naive import run_naive
from ..engine.outcome import SweepOutcome
from ..engine.sweep import run_fast
from ..errors import Interrupted
from ..interventions.units import Removal, parse_kinds
from ..model.load import LoadedModel
from ..model.placement import norm_placement
from ..model.structure import LayerStack, find_layers, parse_layer_spec, sublayer_site
from ..progress import SILENT, Progress
from ..results.lock import holds_folder_lock
from ..results.margins import Margins, rule_text
from ..results.store import ResultStore, VariantResult, plan_variants
from ..results.verdict import BOOTSTRAP_CAP, BOOTSTRAP_FLOOR, PYTHON_CAP, prune_frame
from ..runs import RunFiles, Timer, run_record, write_tables
from .angular_cache import AngularCache, cached_angular
from .scoring import ScoringConfig, ScoringInputs, prepare_scoring

#: How the L comparisons of one metric are adjusted, for meta.json.
MULTIPLICITY = ("hurts/helps: Holm-adjusted p-values over the removed units (blocks and sub-layers alike) of each "
                "(task, metric); dead: two one-sided tests at alpha 0.05 per unit, not adjusted (each unit's "
                "equivalence is its own claim)")
#: Files a run writes into its folder (``fresh`` removes them with the stored variants).
OUTPUTS = ("angular.csv", "angular_settings.json", "continuations.json", "prune.csv", "prune_wide.csv", "prune.tex",
           "prune.png", "prune.pdf", "meta.json")


@dataclass(frozen=True)
class PruneConfig(ScoringConfig):
    """Everything ``lnsdiag prune`` can be told, checked when built: the scoring options
    (:class:`~.scoring.ScoringConfig`), which layers to remove, one at a time, and which units of
    each (``units``: ``block``, ``attn``, ``mlp``, several allowed as ``"attn,mlp"``)."""

    layers: str = "all"
    units: tuple[str, ...] | str = ("block",)

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "units", parse_kinds(self.units))

    def removals(self, stack: LayerStack) -> list[Removal]:
        """The sweep's variants (the full model aside): each selected block's asked units, in order. A
        sub-layer of a family whose blocks cannot be split is refused here, before any output."""
        blocks = parse_layer_spec(self.layers, len(stack))
        for kind in self.units:
            if kind != "block":
                for i in blocks:
                    sublayer_site(stack.layers[i], kind)
        return Removal.each(blocks, self.units)


@dataclass
class PruneRun:
    """A sweep's results: the tidy table, the tasks a table shows, and the JSON record."""

    frame: pd.DataFrame
    tasks: list[str]
    meta: dict[str, Any]
    folder: Path
    margins: Margins

    def write(self) -> RunFiles:
        """prune.csv (tidy), prune_wide.csv (a row per variant) and meta.json, into the run's folder."""
        return write_tables(self.folder, {"prune.csv": self.frame,
                                          "prune_wide.csv": wide_frame(self.frame, self.tasks)}, self.meta)


def wide_frame(frame: pd.DataFrame, tasks: list[str]) -> pd.DataFrame:
    """One row per variant, ``task/metric`` value, stderr, Δ and dead columns, for spreadsheets."""
    keys = [c for c in ("variant", "removed_layer", "unit", "angular_distance") if c in frame]  # no unit: older
    wide = frame.drop_duplicates("variant")[keys].reset_index(drop=True)
    sel = frame[frame["task"].isin(tasks)]
    for (task, metric), part in sel.groupby(["task", "metric"], sort=False):
        part = part.set_index("variant")
        for column, suffix in (("value", ""), ("stderr", "_stderr"), ("delta", "_delta"),
                               ("delta_stderr", "_delta_stderr"), ("verdict", "_verdict"), ("dead", "_dead")):
            wide[f"{task}/{metric}{suffix}"] = wide["variant"].map(part[column])
    return wide


@holds_folder_lock("out")
def run(loaded: LoadedModel, config: PruneConfig, out: str | Path, *, inputs: ScoringInputs | None = None,
        layers_path: str | None = None, progress: Progress = SILENT, timer: Timer | None = None,
        angular_text: TextSource | None = None, angular_frame: pd.DataFrame | None = None,
        on_update: Callable[[PruneRun], None] | None = None) -> PruneRun:
    """Sweep ``loaded`` into the folder ``out`` (resuming what is there) and return the results.

    ``on_update`` sees the results so far after every finished variant (the command line
    writes them: ``partial.write()``). Ctrl-C raises :class:`~lnsdiag.errors.Interrupted` saying what is saved.
    """

    timer = timer or Timer()
    folder = Path(out)
    inputs = inputs or config.load_inputs()
    config.check_scored(config.scored(inputs))
    model = loaded.model
    stack = find_layers(model, layers_path)
    selected = config.removals(stack)
    scoring = prepare_scoring(loaded, config, inputs, stack, progress, folder)
    scorers, settings = scoring.scorers, scoring.settings
    store = ResultStore(folder, settings, fresh=config.fresh, outputs=OUTPUTS, samples=config.samples)
    for scorer in scorers:  # the settings are accepted: what a resumed run reuses
        scorer.keep(folder)
    done = store.done()
    todo = plan_variants(selected, done)
    if done and todo:
        progress.note(f"resuming: {len(done)} variant(s) already in {folder}, {len(todo)} to go")
    elif done and not todo:
        progress.note(f"all {len(selected) + 1} variants are already in {folder} (use --fresh to redo them)")

    placement = norm_placement(model, stack)
    if config.angular and angular_frame is None:
        # a Post-LN block's sub-layer updates are no steps of a residual stream: their angle is not measured
        units = ("block",) if placement.startswith("post-LN") else config.units
        cache = AngularCache(folder, "layers", settings, units=units)
        with timer("angular"):
            angular_frame = cached_angular(loaded, stack, scoring, cache, text=angular_text,
                                           batch_size=config.batch_size, progress=progress)
    shown = scoring.tasks
    meta_fields = {"settings": settings, **inputs.describe(), "layer_stack": stack.path,
                   "num_layers": len(stack), "layers": sorted({s.first for s in selected}), "units": list(config.units),
                   "margins": config.margins.as_json(),
                   "dead_rule": rule_text(config.margins), "multiplicity": MULTIPLICITY,
                   "bootstrap": {"resamples": min(max(config.bootstrap_iters, BOOTSTRAP_FLOOR), BOOTSTRAP_CAP),
                                 "python_aggregations_at_most": PYTHON_CAP, "seed": config.seed},
                   "norm_placement": placement}
    engine_info: dict[str, Any] = {"engine": config.engine}

    comparisons: dict[tuple, Any] = {}

    def current() -> PruneRun:
        results = store.done()
        asked = {k: v for k, v in results.items() if not k or k in selected}  # Holm: over these layers only
        frame = prune_frame(asked, margins=config.margins, angular=angular_frame,
                            bootstrap_iters=config.bootstrap_iters, seed=config.seed, cache=comparisons)
        timings = {**timer.seconds, "variants": {(str(k) or "baseline"): v.seconds
                                                 for k, v in sorted(results.items(), key=lambda kv: kv[0])}}
        engines = sorted({v.engine for k, v in results.items() if not k or k in selected})
        meta = run_record("prune", model=loaded.describe(), **meta_fields, **engine_info, variant_engines=engines,
                          variants_done=len(results), timings=timings)
        return PruneRun(frame, shown, meta, folder, config.margins)

    def saved(_result: VariantResult) -> None:
        if on_update is not None and Removal() in store.done():
            on_update(current())

    try:
        with timer("sweep"):
            engine = run_naive if config.engine == "naive" or not todo else run_fast
            extra = {"batch_tokens": config.batch_tokens} if engine is run_fast else {}
            outcome: SweepOutcome = engine(model, scorers, todo, stack=stack, store=store, progress=progress,
                                           on_saved=saved, **extra)
    except KeyboardInterrupt as exc:
        kept = sum(1 for k in store.done() if not k or k in selected)
        raise Interrupted(f"{kept} of {len(selected) + 1} variants are saved in {folder}; rerun the same command "
                          "to resume.") from exc
    if engine is run_fast:
        engine_info["engine_stats"] = outcome.stats
        for scorer in scorers:
            engine_info["engine_stats"].update(scorer.run_stats())
        if outcome.stats.get("naive_tasks"):
            progress.note(f"generation tasks ({', '.join(outcome.stats['naive_tasks'])}) were scored by the naive "
                          "engine: they need the model to generate, not just log-likelihoods")
    return current()
