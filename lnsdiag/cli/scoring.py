"""The scoring options ``prune`` and ``shrink`` share (what every variant is scored on, and how
verdicts are reached), as Typer option types, and the step from them to a checked
:class:`~lnsdiag.runners.scoring.ScoringConfig` (or ``prune``'s :class:`~lnsdiag.runners.prune.PruneConfig`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, TypeVar

import typer

from ..errors import OptionError
from ..results.store import read_settings
from ..runners.scoring import ScoringConfig, ScoringInputs
from . import ui
from .common import load

if TYPE_CHECKING:
    from ..model.load import LoadedModel, ModelOptions
    from ..runs import Timer

Config = TypeVar("Config", bound=ScoringConfig)

Tasks = Annotated[list[str] | None, typer.Option(
    "--tasks", "-t", metavar="<str>", help="lm-eval task or group names, comma-separated or repeated "
    "\\[default: mmlu, unless only --ppl-* is given].", show_default=False)]
IncludePath = Annotated[Path | None, typer.Option("--include-path", help="Folder of extra lm-eval task YAMLs.",
                                                  show_default=False)]
NumFewshot = Annotated[int | None, typer.Option("--num-fewshot", help="Few-shot examples \\[default: the "
                                                "task's own].", show_default=False)]
Limit = Annotated[str | None, typer.Option(help="Documents per task: a count (100) or a fraction (0.1).",
                                           show_default=False)]
Seed = Annotated[int, typer.Option(help="Seed for few-shot sampling and lm-eval.")]
BootstrapIters = Annotated[int, typer.Option("--bootstrap-iters", help="lm-eval's bootstrap for stderr of "
                                             "non-mean metrics.")]
PplText = Annotated[Path | None, typer.Option("--ppl-text", help="Also score built-in perplexity on this "
                                              "text (plain or JSONL).", show_default=False)]
PplDataset = Annotated[str | None, typer.Option("--ppl-dataset", help="Built-in perplexity on a `datasets` "
                                                "dataset (or `stdlib`).", show_default=False)]
PplDatasetConfig = Annotated[str | None, typer.Option("--ppl-dataset-config", show_default=False)]
PplSplit = Annotated[str | None, typer.Option("--ppl-split", show_default=False)]
PplField = Annotated[str, typer.Option("--ppl-field", help="Field of JSONL records holding the text.")]
PplMaxTokens = Annotated[int, typer.Option("--ppl-max-tokens", help="Tokens of perplexity text.")]
NoKl = Annotated[bool, typer.Option("--no-kl", help="Skip the KL divergence and top-1 agreement of every variant "
                                    "with the full model on the perplexity text.")]
FidelityTasks = Annotated[bool, typer.Option(
    "--fidelity-tasks", help="Also compare every variant's next-token distributions with the full model's on "
    "every token of the lm-eval tasks' requests (KL, top-1 agreement; a document is a unit).")]
Generate = Annotated[int, typer.Option(
    "--generate", metavar="N", help="Let the full model continue each text window's opening and each task "
    "context greedily for N tokens (once); score every variant along them: KL, top-1 agreement, tokens "
    "reproduced before the first disagreement \\[default: 0, off].", show_default=False)]
Margin = Annotated[str | None, typer.Option(
    help="Margin of practical equivalence: a removal is dead only if the 90% interval of Δ lies within it. "
    "0.02 (bounded metrics, absolute), 2% (perplexity-like, relative) or acc=0.02,ppl=2% \\[default: 0.01 "
    "and 1%].", show_default=False)]
BatchSize = Annotated[int, typer.Option("--batch-size", "-b", help="Batch size for lm-eval and perplexity.")]
Fresh = Annotated[bool, typer.Option("--fresh", help="Discard stored results in --out and start over.")]
NoSamples = Annotated[bool, typer.Option("--no-samples", help="Do not export per-document scores "
                                         "(samples/<variant>.csv.gz).")]
Engine = Annotated[str, typer.Option(help="fast: all variants from one pass over the requests; naive: one "
                                     "lm-eval run per variant (the reference).")]
BatchTokens = Annotated[int | None, typer.Option("--batch-tokens", help="Fast engine: tokens per batch "
                                                 "\\[default: from free GPU memory; 8192 on CPU].",
                                                 show_default=False)]


def scoring_config(kind: type[Config], *, tasks: str | Sequence[str] | None, include_path: Path | None,
                   ppl_text: Path | None, **options: object) -> Config:
    """A checked config of ``kind`` from the options as typed (paths converted; ``--tasks`` comma-separated
    and/or repeated), refusing options that would be silently ignored."""
    names = None
    if tasks is not None:
        given = [tasks] if isinstance(tasks, str) else list(tasks)
        names = tuple(dict.fromkeys(t.strip() for value in given for t in value.split(",") if t.strip()))
        if not names and given:
            raise OptionError("{tasks} {value!r} names no task", value=",".join(given))
        names = names or None
    if options.get("ppl_dataset") is None:
        for field in ("ppl_dataset_config", "ppl_split"):
            if options.get(field) is not None:
                fix = ("give {ppl_dataset} too, or drop it" if ppl_text is None
                       else "drop it with {ppl_text}, or give {ppl_dataset} instead")
                raise OptionError("{" + field + "} applies to {ppl_dataset}: " + fix)
    if options.get("kl") is False and ppl_text is None and options.get("ppl_dataset") is None:
        raise OptionError("{no_kl} applies to the perplexity text: give {ppl_text} / {ppl_dataset}, or drop it")
    return kind(tasks=names, include_path=str(include_path) if include_path else None,
                ppl_text=str(ppl_text) if ppl_text else None, **options)  # type: ignore[arg-type]


def check_resumable(folder: Path, config: ScoringConfig) -> None:
    """A folder a run would resume from must have readable settings (unless ``--fresh`` replaces them):
    said before the model loads, not after."""
    if not config.fresh and (folder / "settings.json").is_file():
        read_settings(folder / "settings.json")


def load_inputs(config: ScoringConfig, model: ModelOptions, timer: Timer,
                check: Callable[[dict[str, list[str]] | None], None] | None = None,
                ) -> tuple[ScoringInputs, LoadedModel]:
    """Tasks and text first (a typo fails in seconds), then ``check`` on what they score (task ->
    metrics; default: the margins), then the model: what a scoring command needs before its runner."""
    tasks = None
    if config.tasks:
        with ui.status(f"loading tasks {', '.join(config.tasks)}"), timer("tasks"):
            tasks = config.load_tasks()
    inputs = ScoringInputs(tasks, config.load_text())
    (check or config.check_scored)(config.scored(inputs))
    with timer("load"):
        loaded = load(model)
    config.check_loaded(loaded)
    return inputs, loaded
