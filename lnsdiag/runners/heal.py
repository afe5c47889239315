"""Healing ``shrink``'s picks: each removal set healed on calibration text (:mod:`lnsdiag.heal`) — a
training-free linear map (``linear``) and/or LoRA adapters distilled from the full model (``lora``) — and
the healed pruned model scored like every removal, against the same full model.

The calibration text is never the evaluation text: its documents and its token runs are checked
against the perplexity text's before any output (:func:`~lnsdiag.heal.calibration.check_disjoint`).
Healed results live in a store of their own per method (``heal-linear/``, ``heal-lora/`` in the run's
folder) whose settings add the heal's (method, ridge or training settings, the calibration text's
digest) to the run's: resumable, and never mixed with a heal fitted on other text. Each fitted patch is
kept there too (``patches/<set>.safetensors``), so a resumed run does not fit again. A healed variant
is scored by the naive engine (a heal changes kept blocks, so no kept state of the full model resumes
it), with the scorers the run uses.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from ..data.text import TextSource, from_dataset, from_file
from ..data.windows import TokenWindows, default_seq_len
from ..distributed import all_gather, my_share
from ..engine.naive import run_naive
from ..errors import OptionError, UserError
from ..heal import (
    RIDGE,
    LinearPatch,
    LoraPatch,
    calibration_windows,
    fit_linear_patch,
    healed,
    lora_healed,
    save_healed,
    save_lora_healed,
    train_lora,
)
from ..heal.lora import LOSSES, LR, RANK
from ..interventions.units import Removal
from ..model.load import LoadedModel
from ..model.structure import LayerStack
from ..progress import SILENT, Progress
from ..results.store import ResultStore, VariantResult
from .scoring import Scoring

#: Heal methods ``--heal`` takes.
METHODS = ("linear", "lora")
PLANNED: dict[str, str] = {}
#: LoRA training steps by default (batches of the calibration windows).
HEAL_STEPS = 100
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
    steps: int = HEAL_STEPS
    loss: str = "kd"
    rank: int = RANK
    lr: float = LR

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
        if self.steps < 1:
            raise OptionError("{heal_steps} must be at least 1, not {value}", value=self.steps)
        if self.loss not in LOSSES:
            raise OptionError("{heal_loss} must be kd (distil the full model) or lm (next token), not {value!r}",
                              value=self.loss)
        if self.rank < 1:
            raise OptionError("{heal_rank} must be at least 1, not {value}", value=self.rank)
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise OptionError("{heal_lr} must be positive, not {value}", value=self.lr)
        if "lora" in self.methods and importlib.util.find_spec("peft") is None:
            raise OptionError("{heal} lora needs peft: pip install 'lnsdiag[heal]' (or peft)")

    def load_calibration(self, beside: tuple[str, str | None] | None = None) -> TextSource:
        """The calibration text (before the model loads: a missing file or dataset fails in seconds). Not given:
        the training split of ``beside`` (the dataset the variants are scored on, when not on its training
        split: the demo's docstrings), else wikitext-2's."""
        if self.calib_text is not None:
            return from_file(self.calib_text, self.calib_field)
        if self.calib_dataset is not None:
            return from_dataset(self.calib_dataset, self.calib_dataset_config, self.calib_split or "train",
                                self.calib_field)
        if beside is not None:
            return from_dataset(beside[0], beside[1], "train", self.calib_field)
        try:
            return from_dataset(*DEFAULT_CALIBRATION, self.calib_field)
        except UserError as exc:
            reason = str(exc).split(" (offline?", 1)[0]  # its hint names the perplexity options, not these
            raise UserError(f"--heal needs calibration text, and its default is not reachable: {reason}; give "
                            "--calib-text FILE or --calib-dataset NAME (stdlib works offline)") from exc


def calibration_beside(scoring: Any) -> tuple[str, str | None] | None:
    """The dataset whose training split calibrates by default: the perplexity dataset, when the run scores
    another split of it (``--ppl-dataset stdlib``: the stdlib docstrings' train split)."""
    if scoring.ppl_dataset is None or (scoring.ppl_split or "test") == "train":
        return None
    return scoring.ppl_dataset, scoring.ppl_dataset_config


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
                      seq_len: int | None, max_tokens: int) -> TokenWindows:
    """:func:`calibration_of` before a command creates its folder: the evaluation text's windows built as the
    perplexity scorer builds them. The checked calibration windows, for the run (tokenised once)."""
    windows = None
    if evaluation is not None:
        windows = TokenWindows.of(loaded.tokenizer, evaluation.texts, seq_len=default_seq_len(loaded.model, seq_len),
                                  max_tokens=max_tokens, name=evaluation.name)
    return calibration_of(loaded, config, source, evaluation, windows, seq_len)


def heal_store(folder: Path, scoring: Scoring, config: HealConfig, windows: TokenWindows, method: str, *,
               fresh: bool = False, samples: bool = True) -> ResultStore:
    """The store of ``method``'s healed sets (``heal-<method>/``): the run's settings and the heal's. Made
    with the run's own store, so a heal fitted on other text is refused before anything is scored."""
    return ResultStore(folder / f"heal-{method}", {**scoring.settings, **heal_settings(config, windows, method)},
                       fresh=fresh, samples=samples)


def heal_settings(config: HealConfig, windows: TokenWindows, method: str) -> dict[str, Any]:
    """What makes two heals' numbers comparable: joined to the run's settings in the heal's store."""
    own = {"heal_ridge": config.ridge} if method == "linear" else {
        "heal_steps": config.steps, "heal_loss": config.loss, "lora_rank": config.rank, "lora_alpha": 2.0 * config.rank,
        "heal_lr": config.lr}
    return {"heal": method, **own, "calibration": f"{windows.name}#{windows.digest}",
            "calib_max_tokens": config.calib_max_tokens, "calib_seq_len": windows.longest}


def heal_sets(loaded: LoadedModel, stack: LayerStack, scoring: Scoring, config: HealConfig, sets: Sequence[Removal],
              windows: TokenWindows, store: ResultStore, *, method: str = "linear", seed: int = 1234,
              batch_size: int = 8, progress: Progress = SILENT, checked_against: str | None = None) -> HealOutcome:
    """Fit (or read back) ``method``'s heal of every set, then score each healed pruned model into ``store``
    (:func:`heal_store`)."""
    wanted = [s for s in dict.fromkeys(sets) if s]
    fit = _fitter(loaded, stack, config, windows, method, seed, batch_size, progress)
    mine = [wanted[i] for i in my_share([len(s.blocks) for s in wanted])]  # under a launcher: a share each
    fitted = all_gather(_fit_all(fit, PATCHES[method], mine, store.folder / "patches"))
    patches = {s: p for part, _ in fitted for s, p in part.items()}
    patches = {s: patches[s] for s in wanted if s in patches}  # one order on every rank
    skipped = {s: why for _, part in fitted for s, why in part.items()}
    for removal, why in skipped.items():
        progress.note(f"not healed: {removal.label}: {why}")
    done = store.done()
    todo = [s for s in patches if s not in done]
    if todo:
        progress.note(f"scoring {len(todo)} healed set(s) ({method}), one evaluation each")
        apply = CONTEXTS[method]
        run_naive(loaded.model, scoring.scorers, todo, stack=stack, store=store, progress=progress,
                  variant=lambda removal: apply(loaded.model, patches[removal], remove=True, stack=stack))
    done = store.done()
    calibration = {"name": windows.name, "digest": windows.digest, "windows": len(windows),
                   "tokens": sum(len(w) for w in windows.windows), "checked_disjoint_from": checked_against,
                   **{k: v for k, v in heal_settings(config, windows, method).items()
                      if k.startswith(("heal_", "lora_"))}}
    return HealOutcome(method, {s: done[s] for s in patches if s in done}, patches, skipped, calibration)


#: Each method's patch class (its ``load``), and the context that makes the loaded model the healed variant.
PATCHES: dict[str, Any] = {"linear": LinearPatch, "lora": LoraPatch}
CONTEXTS: dict[str, Callable[..., Any]] = {"linear": healed, "lora": lora_healed}
SAVERS: dict[str, Callable[..., Any]] = {"linear": save_healed, "lora": save_lora_healed}


def _fitter(loaded: LoadedModel, stack: LayerStack, config: HealConfig, windows: TokenWindows, method: str, seed: int,
            batch_size: int, progress: Progress) -> Callable[[Removal], Any]:
    """``method``'s heal of one removal set, fitted on ``windows``."""
    if method == "linear":
        return lambda removal: fit_linear_patch(loaded.model, removal, windows, ridge=config.ridge, stack=stack,
                                                progress=progress.note)
    return lambda removal: train_lora(loaded.model, removal, windows, steps=config.steps, loss=config.loss,
                                      rank=config.rank, alpha=2.0 * config.rank, lr=config.lr, seed=seed,
                                      batch_size=batch_size, stack=stack, progress=progress.note)


def _fit_all(fit: Callable[[Removal], Any], kind: Any, sets: list[Removal], folder: Path
             ) -> tuple[dict[Removal, Any], dict[Removal, str]]:
    """Each set's patch, read back when an earlier run of the same settings fitted it; a set the family
    cannot heal (a span at block 0 with tied embeddings, sandwich norms) is skipped with the reason."""
    patches: dict[Removal, Any] = {}
    skipped: dict[Removal, str] = {}
    folder.mkdir(parents=True, exist_ok=True)
    for removal in sets:
        path = folder / f"{removal.name}.safetensors"
        if path.is_file():
            try:
                patches[removal] = kind.load(path)
                continue
            except (UserError, OSError, ValueError):
                path.unlink(missing_ok=True)  # damaged: fitted again
        try:
            patch = fit(removal)
        except UserError as exc:
            skipped[removal] = str(exc)
            continue
        if getattr(patch, "record", {}).get("interrupted_at") is None:  # an interrupted training is used, not kept
            patch.save(path)
        patches[removal] = patch
    return patches, skipped


def heal_card_text(outcome: HealOutcome) -> str:
    """How a saved model was healed, for its model card."""
    c = outcome.calibration
    where = f"{c['tokens']:,} tokens of {c['name']} (calibration text, disjoint from the evaluation text)"
    if outcome.method == "linear":
        return (f"Healed without training (linear): after the removal, a d×d linear map per removed span was fitted "
                f"by least squares (ridge {c.get('heal_ridge', RIDGE):g}) on {where} and folded into the MLP output "
                "projection before the cut, so the architecture is the standard one.")
    return (f"Healed with LoRA (rank {c.get('lora_rank')}, {c.get('heal_steps')} steps of "
            f"{'distillation from the full model (KL)' if c.get('heal_loss') == 'kd' else 'next-token loss'}, "
            f"learning rate {c.get('heal_lr'):g}) on {where}; the adapters are merged into the weights.")


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
