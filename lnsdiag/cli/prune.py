"""`lnsdiag prune`: remove each layer in turn, score every variant, say which are dead weight."""

from __future__ import annotations

from typing import Annotated

import typer

from ..model.load import ModelOptions
from ..runners.prune import PruneConfig, run
from ..runs import Timer, output_dir
from . import ui
from .common import Debug, Out, SeqLen, app, command, model_options
from .scoring import (
    BatchSize,
    BatchTokens,
    BootstrapIters,
    Engine,
    FidelityTasks,
    Fresh,
    Generate,
    IncludePath,
    Limit,
    Margin,
    NoKl,
    NoSamples,
    NumFewshot,
    PplDataset,
    PplDatasetConfig,
    PplField,
    PplMaxTokens,
    PplSplit,
    PplText,
    Seed,
    Tasks,
    check_resumable,
    load_inputs,
    scoring_config,
)
from .show import show_prune, write_prune


@app.command("prune")
@command
@model_options
def prune_cmd(
    model: ModelOptions,
    tasks: Tasks = None,
    include_path: IncludePath = None,
    num_fewshot: NumFewshot = None,
    limit: Limit = None,
    seed: Seed = 1234,
    bootstrap_iters: BootstrapIters = 100_000,
    ppl_text: PplText = None,
    ppl_dataset: PplDataset = None,
    ppl_dataset_config: PplDatasetConfig = None,
    ppl_split: PplSplit = None,
    ppl_field: PplField = "text",
    ppl_max_tokens: PplMaxTokens = 65_536,
    seq_len: SeqLen = None,
    layers: Annotated[str, typer.Option("--layers", "-l", help="Layers to remove, one at a time: 0-31, 0,4,8, "
                                        "28- or all.")] = "all",
    units: Annotated[str, typer.Option("--unit", "-u", help="What to remove of each layer: block, attn (its "
                                       "attention), mlp (its MLP); several comma-separated, e.g. block,attn,mlp.")
                     ] = "block",
    no_angular: Annotated[bool, typer.Option("--no-angular", help="Skip the angular distances.")] = False,
    no_kl: NoKl = False,
    fidelity_tasks: FidelityTasks = False,
    generate: Generate = 0,
    margin: Margin = None,
    batch_size: BatchSize = 8,
    fresh: Fresh = False,
    no_samples: NoSamples = False,
    engine: Engine = "fast",
    batch_tokens: BatchTokens = None,
    out: Out = None, debug: Debug = False,
) -> None:
    """Remove each layer in turn, score every variant, and show which layers are dead weight."""
    config = scoring_config(
        PruneConfig, tasks=tasks, include_path=include_path, num_fewshot=num_fewshot, limit=limit, seed=seed,
        bootstrap_iters=bootstrap_iters, ppl_text=ppl_text, ppl_dataset=ppl_dataset,
        ppl_dataset_config=ppl_dataset_config, ppl_split=ppl_split, ppl_field=ppl_field, ppl_max_tokens=ppl_max_tokens,
        seq_len=seq_len, layers=layers, units=units, angular=not no_angular, margin=margin, kl=not no_kl,
        batch_size=batch_size, fidelity_tasks=fidelity_tasks, generate=generate, engine=engine,
        batch_tokens=batch_tokens, fresh=fresh, samples=not no_samples)
    check_resumable(output_dir(out, model.slug, "prune", create=False), config)
    timer = Timer()
    inputs, loaded = load_inputs(config, model, timer)
    folder = output_dir(out, model.slug, "prune")
    with ui.progress_display() as progress:
        result = run(loaded, config, folder, inputs=inputs, layers_path=model.layers_path, progress=progress,
                     timer=timer, on_update=lambda partial: write_prune(partial, plots=False))
    show_prune(result)
