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

from ..data.text import TextSource, from_dataset, from_file, resolve_text
from ..data.windows import TokenWindows, check_batch_size
from ..distributed import is_main
from ..engine.naive import run_naive
from ..engine.outcome import SweepOutcome
from ..engine.sweep import run_fast
from ..errors import Interrupted, UserError
from ..model.load import LoadedModel
from ..model.placement import norm_placement
from ..model.structure import find_layers, parse_layer_spec
from ..progress import SILENT, Progress
from ..results.store import ResultStore, VariantResult, plan_variants
from ..results.verdict import BOOTSTRAP_CAP, BOOTSTRAP_FLOOR, PYTHON_CAP, Margins, prune_frame, rule_text
from ..runs import Timer, read_json, run_record, write_csv, write_json
from ..scoring.base import Scorer
from ..scoring.lmeval.tasks import DEFAULT_BOOTSTRAP, TaskSet, check_num_fewshot, load_tasks, parse_limit
from ..scoring.registry import ScoringSetup, build_scorers

ENGINES = ("fast", "naive")
#: How the L comparisons of one metric are adjusted, for meta.json.
MULTIPLICITY = ("hurts/helps: Holm-adjusted p-values over the removed layers of each (task, metric); dead: "
                "two one-sided tests at alpha 0.05 per layer, not adjusted (each layer's equivalence is its own claim)")
NOTHING_TO_SCORE = "nothing to score: give --tasks and/or --ppl-text / --ppl-dataset"
#: Files a run writes into its folder (``fresh`` removes them with the stored variants).
OUTPUTS = ("angular.csv", "angular_settings.json", "prune.csv", "prune_wide.csv", "prune.tex", "prune.png",
           "prune.pdf", "meta.json")


@dataclass(frozen=True)
class PruneConfig:
    """Everything ``lnsdiag prune`` can be told, checked when built.

    ``tasks`` defaults to MMLU unless only a perplexity text is given; ``limit`` is a count of
    documents per task or a fraction (strings as typed on the command line are parsed).
    """

    tasks: tuple[str, ...] | None = None
    include_path: str | None = None
    num_fewshot: int | None = None
    limit: int | float | str | None = None
    seed: int = 1234
    bootstrap_iters: int = DEFAULT_BOOTSTRAP
    ppl_text: str | None = None
    ppl_dataset: str | None = None
    ppl_dataset_config: str | None = None
    ppl_split: str | None = None
    ppl_field: str = "text"
    ppl_max_tokens: int = 65_536
    seq_len: int | None = None
    layers: str = "all"
    angular: bool = True
    margin: str | None = None
    batch_size: int = 8
    engine: str = "fast"
    batch_tokens: int | None = None
    fresh: bool = False
    samples: bool = True

    def __post_init__(self) -> None:
        if self.ppl_text is not None and self.ppl_dataset is not None:
            raise UserError("give --ppl-text or --ppl-dataset, not both")
        names = self.tasks if self.tasks is not None else (() if self.wants_ppl else ("mmlu",))
        if isinstance(names, str):
            names = tuple(names.split(","))
        object.__setattr__(self, "tasks", tuple(t.strip() for t in names if t.strip()))
        object.__setattr__(self, "limit", parse_limit(self.limit))
        check_num_fewshot(self.num_fewshot)
        check_batch_size(self.batch_size)
        if self.engine not in ENGINES:
            raise UserError(f"--engine must be fast or naive, not {self.engine!r}")
        if self.batch_tokens is not None and self.batch_tokens < 1:
            raise UserError(f"--batch-tokens must be positive, not {self.batch_tokens}")
        if self.ppl_max_tokens < 1:
            raise UserError(f"--ppl-max-tokens must be positive, not {self.ppl_max_tokens}")
        if not self.tasks and not self.wants_ppl:
            raise UserError(NOTHING_TO_SCORE)
        Margins.parse(self.margin)  # a malformed --margin fails here, before any output

    @property
    def margins(self) -> Margins:
        return Margins.parse(self.margin)

    @property
    def wants_ppl(self) -> bool:
        return self.ppl_text is not None or self.ppl_dataset is not None

    def load_tasks(self) -> TaskSet | None:
        """The lm-eval tasks, loaded and checked (a command does it before loading the model,
        so a typo in a task name fails in seconds)."""
        return load_tasks(list(self.tasks), self.include_path, self.num_fewshot) if self.tasks else None

    def load_text(self) -> TextSource | None:
        """The perplexity text, if one is asked for."""
        if self.ppl_text is not None:
            return from_file(self.ppl_text, self.ppl_field)
        if self.ppl_dataset is not None:
            return from_dataset(self.ppl_dataset, self.ppl_dataset_config, self.ppl_split or "test", self.ppl_field)
        return None

    def load_inputs(self) -> PruneInputs:
        """Tasks and perplexity text together (:meth:`load_tasks`, :meth:`load_text`)."""
        return PruneInputs(self.load_tasks(), self.load_text())


@dataclass
class PruneInputs:
    """What a sweep scores on: lm-eval tasks and/or a perplexity text."""

    tasks: TaskSet | None = None
    ppl_text: TextSource | None = None

    def __post_init__(self) -> None:
        if self.tasks is None and self.ppl_text is None:
            raise UserError(NOTHING_TO_SCORE)


@dataclass
class PruneRun:
    """A sweep's results: the tidy table, the tasks a table shows, and the JSON record."""

    frame: pd.DataFrame
    tasks: list[str]
    meta: dict[str, Any]
    folder: Path
    margins: Margins


def run(loaded: LoadedModel, config: PruneConfig, out: str | Path, *, inputs: PruneInputs | None = None,
        layers_path: str | None = None, progress: Progress = SILENT, timer: Timer | None = None,
        angular_text: TextSource | None = None, angular_frame: pd.DataFrame | None = None,
        on_update: Callable[[PruneRun], None] | None = None) -> PruneRun:
    """Sweep ``loaded`` into the folder ``out`` (resuming what is there) and return the results.

    ``on_update`` sees the results so far after every finished variant (the command line
    rewrites its CSVs). Ctrl-C raises :class:`~lnsdiag.errors.Interrupted` saying what is saved.
    """

    timer = timer or Timer()
    folder = Path(out)
    inputs = inputs or config.load_inputs()
    model = loaded.model
    stack = find_layers(model, layers_path)
    selected = parse_layer_spec(config.layers, len(stack))
    scoring = prepare_scoring(loaded, config, inputs, stack, progress)
    scorers, windows, settings = scoring.scorers, scoring.windows, scoring.settings
    store = ResultStore(folder, settings, fresh=config.fresh, outputs=OUTPUTS, samples=config.samples)
    done = store.done()
    todo = plan_variants(selected, done)
    if done and todo:
        progress.note(f"resuming: {len(done)} variant(s) already in {folder}, {len(todo)} to go")
    elif done and not todo:
        progress.note(f"all {len(selected) + 1} variants are already in {folder} (use --fresh to redo them)")

    if config.angular and angular_frame is None:
        angular_frame = _angular_column(loaded, folder, stack, angular_text, windows, settings, config, progress,
                                        timer)
    shown = [t for scorer in scorers for t in scorer.tasks]
    meta_fields = {"settings": settings, "tasks": inputs.tasks.describe() if inputs.tasks else None,
                   "ppl_text": inputs.ppl_text.name if inputs.ppl_text else None, "layer_stack": stack.path,
                   "num_layers": len(stack), "layers": selected, "margins": config.margins.as_json(),
                   "dead_rule": rule_text(config.margins), "multiplicity": MULTIPLICITY,
                   "bootstrap": {"resamples": min(max(config.bootstrap_iters, BOOTSTRAP_FLOOR), BOOTSTRAP_CAP),
                                 "python_aggregations_at_most": PYTHON_CAP, "seed": config.seed},
                   "norm_placement": norm_placement(model, stack)}
    engine_info: dict[str, Any] = {"engine": config.engine}

    comparisons: dict[tuple, Any] = {}

    def current() -> PruneRun:
        results = store.done()
        asked = {k: v for k, v in results.items() if k is None or k in selected}  # Holm: over these layers only
        frame = prune_frame(asked, margins=config.margins, angular=angular_frame,
                            bootstrap_iters=config.bootstrap_iters, seed=config.seed, cache=comparisons)
        timings = {**timer.seconds, "variants": {("baseline" if k is None else str(k)): v.seconds
                                                 for k, v in sorted(results.items(), key=lambda kv: -1
                                                                    if kv[0] is None else kv[0])}}
        engines = sorted({v.engine for k, v in results.items() if k is None or k in selected})
        meta = run_record("prune", model=loaded.describe(), **meta_fields, **engine_info, variant_engines=engines,
                          variants_done=len(results), timings=timings)
        return PruneRun(frame, shown, meta, folder, config.margins)

    def saved(_result: VariantResult) -> None:
        if on_update is not None and None in store.done():
            on_update(current())

    try:
        with timer("sweep"):
            engine = run_naive if config.engine == "naive" or not todo else run_fast
            extra = {"batch_tokens": config.batch_tokens} if engine is run_fast else {}
            outcome: SweepOutcome = engine(model, scorers, todo, stack=stack, store=store, progress=progress,
                                           on_saved=saved, **extra)
    except KeyboardInterrupt as exc:
        kept = sum(1 for k in store.done() if k is None or k in selected)
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


@dataclass
class Scoring:
    """What every variant is scored with, and the settings that make two runs' numbers comparable."""

    scorers: list[Scorer]
    windows: TokenWindows | None
    settings: dict[str, Any]


def prepare_scoring(loaded: LoadedModel, config: PruneConfig, inputs: PruneInputs, stack: Any,
                    progress: Progress = SILENT) -> Scoring:
    """The registered scorers this sweep asks for, and its fingerprint: the run's own settings
    followed by each scorer's ``settings()``. Shared by ``prune`` and ``shrink``."""
    setup = ScoringSetup(loaded, inputs.tasks, inputs.ppl_text, limit=config.limit, seed=config.seed,
                         bootstrap_iters=config.bootstrap_iters, batch_size=config.batch_size, seq_len=config.seq_len,
                         max_tokens=config.ppl_max_tokens, note=progress.note)
    scorers = build_scorers(setup)
    settings: dict[str, Any] = {
        "model": loaded.source, "revision": loaded.revision, "weights": loaded.weights_identity(),
        "dtype": str(loaded.dtype).replace("torch.", ""), "limit": config.limit, "seed": config.seed,
        "bootstrap_iters": config.bootstrap_iters, "layers_path": stack.path, "softmax_dtype": "float32"}
    for scorer in scorers:
        settings.update(scorer.settings())
    windows = next((w for w in (s.token_windows() for s in scorers) if w is not None), None)
    return Scoring(scorers, windows, settings)


def _angular_column(loaded: LoadedModel, folder: Path, stack: Any, text: TextSource | None,
                    windows: TokenWindows | None, settings: dict[str, Any], config: PruneConfig, progress: Progress,
                    timer: Timer) -> pd.DataFrame:
    """Angular distances for the table's last column, on ``text`` if given, else on the perplexity
    windows, else on the default text; reused from a previous run of the same sweep."""
    from ..data.windows import default_seq_len
    from ..measure.angular import AngularConfig, angular_on_windows

    path, stamp = folder / "angular.csv", folder / "angular_settings.json"
    if path.is_file() and stamp.is_file() and read_json(stamp) == settings:
        return pd.read_csv(path)
    if text is not None or windows is None:
        text = text or resolve_text(note=progress.note)
        seq_len = default_seq_len(loaded.model, settings.get("seq_len"))
        windows = TokenWindows.of(loaded.tokenizer, text.texts, seq_len=seq_len,
                                  max_tokens=settings.get("ppl_max_tokens") or 65_536, name=text.name)
    with timer("angular"):
        result = angular_on_windows(loaded.model, windows, AngularConfig(max_block=1, batch_size=config.batch_size),
                                    stack=stack, progress=progress)
    if is_main():  # every rank has the result; one writes it
        write_csv(path, result.layers)
        write_json(stamp, settings)
    return result.layers
