"""`lnsdiag prune`: remove each layer in turn, score every variant, say which are dead weight."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .. import report, ui
from ..models import ModelOptions
from ..runs import Timer, output_dir
from .common import Debug, Out, SeqLen, app, command, load, model_options
from .show import show_prune

Tasks = Annotated[str | None, typer.Option(
    "--tasks", "-t", help="lm-eval task or group names, comma-separated \\[default: mmlu, unless only --ppl-* "
    "is given].", show_default=False)]


@app.command("prune")
@command
@model_options
def prune_cmd(
    model: ModelOptions,
    tasks: Tasks = None,
    include_path: Annotated[Path | None, typer.Option("--include-path", help="Folder of extra lm-eval task YAMLs.",
                                                      show_default=False)] = None,
    num_fewshot: Annotated[int | None, typer.Option("--num-fewshot", help="Few-shot examples \\[default: the "
                                                    "task's own].", show_default=False)] = None,
    limit: Annotated[str | None, typer.Option(help="Documents per task: a count (100) or a fraction (0.1).",
                                              show_default=False)] = None,
    seed: Annotated[int, typer.Option(help="Seed for few-shot sampling and lm-eval.")] = 1234,
    bootstrap_iters: Annotated[int, typer.Option("--bootstrap-iters", help="lm-eval's bootstrap for stderr of "
                                                 "non-mean metrics.")] = 100_000,
    ppl_text: Annotated[Path | None, typer.Option("--ppl-text", help="Also score built-in perplexity on this "
                                                  "text (plain or JSONL).", show_default=False)] = None,
    ppl_dataset: Annotated[str | None, typer.Option("--ppl-dataset", help="Built-in perplexity on a `datasets` "
                                                    "dataset (or `stdlib`).", show_default=False)] = None,
    ppl_dataset_config: Annotated[str | None, typer.Option("--ppl-dataset-config", show_default=False)] = None,
    ppl_split: Annotated[str | None, typer.Option("--ppl-split", show_default=False)] = None,
    ppl_field: Annotated[str, typer.Option("--ppl-field", help="Field of JSONL records holding the text.")] = "text",
    ppl_max_tokens: Annotated[int, typer.Option("--ppl-max-tokens", help="Tokens of perplexity text.")] = 65_536,
    seq_len: SeqLen = None,
    layers: Annotated[str, typer.Option("--layers", "-l", help="Layers to remove, one at a time: 0-31, 0,4,8, "
                                        "28- or all.")] = "all",
    no_angular: Annotated[bool, typer.Option("--no-angular", help="Skip the angular distances.")] = False,
    margin: Annotated[str | None, typer.Option(
        help="Margin of practical equivalence: a layer is dead only if the 90% interval of Δ lies within it. "
        "0.02 (bounded metrics, absolute), 2% (perplexity-like, relative) or acc=0.02,ppl=2% \\[default: 0.01 "
        "and 1%].", show_default=False)] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Batch size for lm-eval and perplexity.")] = 8,
    fresh: Annotated[bool, typer.Option("--fresh", help="Discard stored results in --out and start over.")] = False,
    no_samples: Annotated[bool, typer.Option("--no-samples", help="Do not export per-document scores "
                                             "(samples/<variant>.csv.gz).")] = False,
    engine: Annotated[str, typer.Option(help="fast: all variants from one pass over the requests; naive: one "
                                        "lm-eval run per variant (the reference).")] = "fast",
    batch_tokens: Annotated[int | None, typer.Option("--batch-tokens", help="Fast engine: tokens per batch "
                                                     "\\[default: from free GPU memory; 8192 on CPU].",
                                                     show_default=False)] = None,
    out: Out = None, debug: Debug = False,
) -> None:
    """Remove each layer in turn, score every variant, and show which layers are dead weight."""
    from ..prune import PruneConfig, PruneInputs, run

    config = PruneConfig(
        tasks=tuple(tasks.split(",")) if tasks else None, include_path=str(include_path) if include_path else None,
        num_fewshot=num_fewshot, limit=limit, seed=seed, bootstrap_iters=bootstrap_iters,
        ppl_text=str(ppl_text) if ppl_text else None, ppl_dataset=ppl_dataset, ppl_dataset_config=ppl_dataset_config,
        ppl_split=ppl_split, ppl_field=ppl_field, ppl_max_tokens=ppl_max_tokens, seq_len=seq_len, layers=layers,
        angular=not no_angular, margin=margin, batch_size=batch_size, engine=engine, batch_tokens=batch_tokens,
        fresh=fresh, samples=not no_samples)
    output_dir(out, model.slug, "prune", create=False)
    timer = Timer()
    tasks = None
    if config.tasks:
        with ui.status(f"loading tasks {', '.join(config.tasks)}"), timer("tasks"):
            tasks = config.load_tasks()
    inputs = PruneInputs(tasks, config.load_text())
    with timer("load"):
        loaded = load(model)
    folder = output_dir(out, model.slug, "prune")
    with ui.progress_display() as progress:
        result = run(loaded, config, folder, inputs=inputs, layers_path=model.layers_path, progress=progress,
                     timer=timer, on_update=lambda partial: report.write_prune(
                         partial.frame, partial.tasks, folder, partial.meta, plots=False))
    show_prune(result)
