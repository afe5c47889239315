"""Healing ``shrink``'s picks: each removal set fitted a training-free linear heal on calibration text
(:mod:`lnsdiag.heal`), and the healed pruned model scored like every removal, against the same full model.

The calibration text is never the evaluation text: its documents and its token runs are checked
against the perplexity text's before any output (:func:`~lnsdiag.heal.calibration.check_disjoint`).
Healed results live in a store of their own (``heal-linear/`` in the run's folder) whose settings add
the heal's (method, ridge, the calibration text's digest) to the run's: resumable, and never mixed with
a heal fitted on other text. Each fitted patch is kept there too (``patches/<set>.safetensors``), so a
resumed run does not fit again. A healed variant is scored by the naive engine (the heal changes the
block before the cut, so no kept state of the full model resumes it), with the scorers the run uses.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from ..data.text import TextSource, from_dataset, from_file
from ..data.windows import TokenWindows, default_seq_len
from ..distributed import on_main
from ..engine.naive import run_naive
from ..errors import OptionError, UserError
from ..heal import RIDGE, LinearPatch, calibration_windows, fit_linear_patch, healed
from ..interventions.units import Removal
from ..model.load import LoadedModel
from ..model.structure import LayerStack
from ..progress import SILENT, Progress
from ..results.store import ResultStore, VariantResult
from .scoring import Scoring

#: Heal methods ``--heal`` takes; ``lora`` (distillation) is the next one.
METHODS = ("linear",)
PLANNED = {"lora": "LoRA distillation is not built yet: --heal linear is the training-free heal available"}
#: The calibration text when none is given: wikitext-2's training split (ReplaceMe and LinearPatch use it).
DEFAULT_CALIBRATION = ("wikitext", "wikitext-2-raw-v1", "train")
#: Calibration tokens by default (the demo's fit is as good at 16k; 64k costs a minute on a CPU).
CALIB_TOKENS = 65_536


@dataclass(frozen=True)
class HealConfig:
    """What ``--heal`` is told: the methods, the calibration text (a file, a dataset, or wikitext-2's
    training split), its size, and the ridge of the least squares."""

    methods: tuple[str, ...] | str = ()
    calib_text: str | None = None
    calib_dataset: str | None = None
    calib_dataset_config: str | None = None
    calib_split: str | None = None
    calib_field: str = "text"
    calib_max_tokens: int = CALIB_TOKENS
    ridge: float = RIDGE

    def __post_init__(self) -> None:
        object.__setattr__(self, "methods", parse_methods(self.methods))
        given = [name for name in ("calib_text", "calib_dataset", "calib_dataset_config", "calib_split")
                 if getattr(self, name) is not None]
        if given and not self.methods:
            raise OptionError("{" + given[0] + "} applies to {heal}: give {heal} linear too, or drop it")
        if self.calib_text is not None and self.calib_dataset is not None:
            raise OptionError("give {calib_text} or {calib_dataset}, not both")
        if self.calib_dataset is None and (self.calib_dataset_config is not None or self.calib_split is not None):
            raise OptionError("{calib_dataset_config} / {calib_split} apply to {calib_dataset}: give it too")
        if self.calib_max_tokens < 1:
            raise OptionError("{calib_max_tokens} must be positive, not {value}", value=self.calib_max_tokens)
        if not (isinstance(self.ridge, (int, float)) and math.isfinite(self.ridge) and self.ridge >= 0):
            raise OptionError("{heal_ridge} must be 0 or more, not {value}", value=self.ridge)

    def load_calibration(self) -> TextSource:
        """The calibration text (before the model loads: a missing file or dataset fails in seconds)."""
        if self.calib_text is not None:
            return from_file(self.calib_text, self.calib_field)
        if self.calib_dataset is not None:
            return from_dataset(self.calib_dataset, self.calib_dataset_config, self.calib_split or "train",
                                self.calib_field)
        try:
            return from_dataset(*DEFAULT_CALIBRATION, self.calib_field)
        except UserError as exc:
            reason = str(exc).split(" (offline?", 1)[0]  # its hint names the perplexity options, not these
            raise UserError(f"--heal needs calibration text, and its default is not reachable: {reason}; give "
                            "--calib-text FILE or --calib-dataset NAME (stdlib works offline)") from exc


def parse_methods(value: str | Sequence[str] | None) -> tuple[str, ...]:
    """``"linear"`` or a sequence → a checked tuple (a planned method named as such, a typo refused)."""
    if not value:
        return ()
    given = [value] if isinstance(value, str) else list(value)
    wanted = [m.strip() for v in given for m in str(v).split(",") if m.strip()]
    for method in wanted:
        if method in PLANNED:
            raise OptionError("{heal} " + method + ": " + PLANNED[method])
        if method not in METHODS:
            raise OptionError("{heal} {value!r} is not a heal: the heals are {known}", value=method,
                              known=", ".join(METHODS))
    return tuple(dict.fromkeys(wanted))


@dataclass
class HealOutcome:
    """Each healed set's result, its patch, and the sets that could not be healed (and why)."""

    method: str
    results: dict[Removal, VariantResult] = field(default_factory=dict)
    patches: dict[Removal, LinearPatch] = field(default_factory=dict)
    skipped: dict[Removal, str] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        """For meta.json: the calibration text, each patch's fit, what was not healed and why."""
        return {"method": self.method, "calibration": self.calibration,
                "patches": {r.name: p.summary() for r, p in self.patches.items()},
                "skipped": {r.name: why for r, why in self.skipped.items()}}


def calibration_of(loaded: LoadedModel, config: HealConfig, source: TextSource, evaluation: TextSource | None,
                   windows: TokenWindows | None, seq_len: int | None) -> TokenWindows:
    """The calibration text's windows, refused (one line) where it shares a document or a run of tokens
    with the perplexity text the variants are scored on (its ``windows``)."""
    against = (evaluation.texts, windows) if evaluation is not None and windows is not None else None
    return calibration_windows(loaded.tokenizer, source.texts, seq_len=default_seq_len(loaded.model, seq_len),
                               max_tokens=config.calib_max_tokens, name=source.name, evaluation=against)


def check_calibration(loaded: LoadedModel, config: HealConfig, source: TextSource, evaluation: TextSource | None,
                      seq_len: int | None, max_tokens: int) -> None:
    """:func:`calibration_of` before a command creates its folder: the evaluation text's windows built as the
    perplexity scorer builds them."""
    windows = None
    if evaluation is not None:
        windows = TokenWindows.of(loaded.tokenizer, evaluation.texts, seq_len=default_seq_len(loaded.model, seq_len),
                                  max_tokens=max_tokens, name=evaluation.name)
    calibration_of(loaded, config, source, evaluation, windows, seq_len)


def heal_store(folder: Path, scoring: Scoring, config: HealConfig, windows: TokenWindows, method: str, *,
               fresh: bool = False, samples: bool = True) -> ResultStore:
    """The store of ``method``'s healed sets (``heal-<method>/``): the run's settings and the heal's. Made
    with the run's own store, so a heal fitted on other text is refused before anything is scored."""
    return ResultStore(folder / f"heal-{method}", {**scoring.settings, **heal_settings(config, windows, method)},
                       fresh=fresh, samples=samples)


def heal_settings(config: HealConfig, windows: TokenWindows, method: str) -> dict[str, Any]:
    """What makes two heals' numbers comparable: joined to the run's settings in the heal's store."""
    return {"heal": method, "heal_ridge": config.ridge, "calibration": f"{windows.name}#{windows.digest}",
            "calib_max_tokens": config.calib_max_tokens, "calib_seq_len": windows.longest}


def heal_sets(loaded: LoadedModel, stack: LayerStack, scoring: Scoring, config: HealConfig, sets: Sequence[Removal],
              windows: TokenWindows, store: ResultStore, *, progress: Progress = SILENT,
              checked_against: str | None = None) -> HealOutcome:
    """Fit (or read back) the heal of every set, then score each healed pruned model into ``store``
    (:func:`heal_store`)."""
    method = "linear"
    wanted = [s for s in dict.fromkeys(sets) if s]
    fitted: tuple[dict[Removal, LinearPatch], dict[Removal, str]] = on_main(
        lambda: _fit_all(loaded, stack, config, wanted, windows, store.folder / "patches", progress))
    patches, skipped = fitted
    for removal, why in skipped.items():
        progress.note(f"not healed: {removal.label}: {why}")
    done = store.done()
    todo = [s for s in patches if s not in done]
    if todo:
        progress.note(f"scoring {len(todo)} healed set(s) ({method}), one evaluation each")
        run_naive(loaded.model, scoring.scorers, todo, stack=stack, store=store, progress=progress,
                  variant=lambda removal: healed(loaded.model, patches[removal], remove=True, stack=stack))
    done = store.done()
    calibration = {"name": windows.name, "digest": windows.digest, "windows": len(windows),
                   "tokens": sum(len(w) for w in windows.windows), "ridge": config.ridge,
                   "checked_disjoint_from": checked_against}
    return HealOutcome(method, {s: done[s] for s in patches if s in done}, patches, skipped, calibration)


def _fit_all(loaded: LoadedModel, stack: LayerStack, config: HealConfig, sets: list[Removal], windows: TokenWindows,
             folder: Path, progress: Progress) -> tuple[dict[Removal, LinearPatch], dict[Removal, str]]:
    """Each set's patch, read back when an earlier run of the same settings fitted it; a set the family
    cannot heal (a span at block 0 with tied embeddings, sandwich norms) is skipped with the reason."""
    patches: dict[Removal, LinearPatch] = {}
    skipped: dict[Removal, str] = {}
    folder.mkdir(parents=True, exist_ok=True)
    for removal in sets:
        path = folder / f"{removal.name}.safetensors"
        if path.is_file():
            try:
                patches[removal] = LinearPatch.load(path)
                continue
            except (UserError, OSError, ValueError):
                path.unlink(missing_ok=True)  # damaged: fitted again
        try:
            patch = fit_linear_patch(loaded.model, removal, windows, ridge=config.ridge, stack=stack,
                                     progress=progress.note)
        except UserError as exc:
            skipped[removal] = str(exc)
            continue
        patch.save(path)
        patches[removal] = patch
    return patches, skipped


def healed_frame(base: VariantResult, outcome: HealOutcome, picks: Sequence[Any], compare: Any) -> pd.DataFrame:
    """One row per (strategy, n, task, metric) of each healed pick against the full model (``compare``: the
    run's paired comparison, ``shrink_frame``'s), ``heal`` naming the method; empty when nothing was healed."""
    healed_picks = [p for p in picks if p.removal in outcome.results]
    if not healed_picks:
        return pd.DataFrame()
    frame = compare({Removal(): base, **outcome.results}, healed_picks)
    frame = frame[frame["strategy"] != "full"].copy()
    frame["heal"] = outcome.method
    return frame.reset_index(drop=True)
