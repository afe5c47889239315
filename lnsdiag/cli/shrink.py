"""`lnsdiag shrink`: remove n = 1..N layers at once by several strategies, score each choice, and
optionally save the smaller model as a real checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..errors import OptionError
from ..heal import RIDGE
from ..heal.lora import LR, RANK
from ..model import quantize
from ..model.load import ModelOptions
from ..model.structure import find_layers
from ..runners.heal import CALIB_TOKENS, HEAL_STEPS, METHODS, HealConfig, calibration_beside, check_calibration
from ..runners.scoring import ScoringConfig
from ..runners.shrink import ShrinkConfig, check_reuse, run
from ..runners.shrink_save import check_save_target, save_pick
from ..runners.strategies import STRATEGIES
from ..runs import Timer, output_dir
from . import scoring as opt
from . import ui
from .common import Debug, Out, SeqLen, app, command, model_options
from .show import show_shrink

#: ``--strategy``'s help: every registered strategy, described as the registry describes it.
STRATEGY_HELP = (", ".join(f"{s.name} ({s.help})" for s in STRATEGIES)
                 + "; comma-separated or repeated \\[default: all].")

#: What to do instead of ``--save`` on a quantized model.
SAVE_HINT = ("drop --save to score it quantized, then write the chosen set without --quantize (--device cpu if "
             "it does not fit the GPU): lnsdiag shrink MODEL --layers SET --save DIR")


@app.command("shrink")
@command
@model_options
def shrink_cmd(
    model: ModelOptions,
    remove: Annotated[int | None, typer.Option(
        "--remove", "-n", help="Remove n = 1..N layers at once \\[default: 4].", show_default=False)] = None,
    strategies: Annotated[list[str] | None, typer.Option(
        "--strategy", "-s", metavar="<str>", help=STRATEGY_HELP, show_default=False)] = None,
    layers: Annotated[str | None, typer.Option(
        "--layers", "-l", help="Score this one set instead of strategies: 3,4,7 or 20-27; sub-layers as 3.attn, "
        "5.mlp.", show_default=False)] = None,
    units: Annotated[str, typer.Option("--unit", "-u", help="What strategies remove: block, attn (attention "
                                       "sub-layers), mlp; several comma-separated let sweep/greedy mix them.")
                     ] = "block",
    rank_by: Annotated[str | None, typer.Option(
        "--rank-by", help="TASK/METRIC that sweep, greedy and --save-strategy best rank by \\[default: the first "
        "task's main metric, else perplexity].", show_default=False)] = None,
    save: Annotated[Path | None, typer.Option(
        "--save", help="Write the pruned model (N removed) to this folder as a Hugging Face checkpoint.",
        show_default=False)] = None,
    save_strategy: Annotated[str | None, typer.Option(
        "--save-strategy", help="Which strategy's N-layer removal --save writes: best (on --rank-by) or a "
        "strategy name \\[default: best].", show_default=False)] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Let --save replace a non-empty folder.")] = False,
    reuse: Annotated[Path | None, typer.Option(
        "--reuse", help="A prune (or shrink) folder of the same model and scoring settings: its stored results (the "
        "full model, each single layer) are reused, not scored again.", show_default=False)] = None,
    tasks: opt.Tasks = None,
    include_path: opt.IncludePath = None,
    num_fewshot: opt.NumFewshot = None,
    limit: opt.Limit = None,
    seed: opt.Seed = 1234,
    bootstrap_iters: opt.BootstrapIters = 100_000,
    ppl_text: opt.PplText = None,
    ppl_dataset: opt.PplDataset = None,
    ppl_dataset_config: opt.PplDatasetConfig = None,
    ppl_split: opt.PplSplit = None,
    ppl_field: opt.PplField = "text",
    ppl_max_tokens: opt.PplMaxTokens = 65_536,
    seq_len: SeqLen = None,
    no_kl: opt.NoKl = False,
    fidelity_tasks: opt.FidelityTasks = False,
    generate: opt.Generate = 0,
    margin: opt.Margin = None,
    heal: Annotated[list[str] | None, typer.Option(
        "--heal", metavar="<str>", help="Also heal every pick and score it healed: linear (no training: a "
        "least-squares map per removed span, folded into the MLP before the cut) and/or lora (adapters distilled "
        "from the full model's logits, merged); comma-separated or repeated.", show_default=False)] = None,
    calib_text: Annotated[Path | None, typer.Option(
        "--calib-text", help="Calibration text of --heal (plain or JSONL; never the evaluation text) \\[default: "
        "the training split of --ppl-dataset, else wikitext-2's].", show_default=False)] = None,
    calib_dataset: Annotated[str | None, typer.Option(
        "--calib-dataset", help="Calibration text from a `datasets` dataset (or `stdlib`).",
        show_default=False)] = None,
    calib_dataset_config: Annotated[str | None, typer.Option("--calib-dataset-config", show_default=False)] = None,
    calib_split: Annotated[str | None, typer.Option("--calib-split", help="\\[default: train]",
                                                     show_default=False)] = None,
    calib_max_tokens: Annotated[int, typer.Option("--calib-max-tokens", help="Calibration tokens.")] = CALIB_TOKENS,
    heal_ridge: Annotated[float, typer.Option("--heal-ridge", help="Ridge of the least squares, relative to the "
                                              "activations' mean square.")] = RIDGE,
    heal_steps: Annotated[int, typer.Option("--heal-steps", help="lora: training steps (batches of calibration "
                                            "windows).")] = HEAL_STEPS,
    heal_loss: Annotated[str, typer.Option("--heal-loss", help="lora: kd (KL to the full model's distributions) or "
                                           "lm (next token).")] = "kd",
    heal_rank: Annotated[int, typer.Option("--heal-rank", help="lora: adapter rank (alpha = 2 × rank).")] = RANK,
    heal_lr: Annotated[float, typer.Option("--heal-lr", help="lora: AdamW learning rate.")] = LR,
    save_heal: Annotated[str | None, typer.Option(
        "--save-heal", help="What --save writes: the model healed by linear or lora, or none (unhealed) "
        "\\[default: the run's first heal, with --heal].", show_default=False)] = None,
    batch_size: opt.BatchSize = 8,
    fresh: opt.Fresh = False,
    no_samples: opt.NoSamples = False,
    engine: opt.Engine = "fast",
    batch_tokens: opt.BatchTokens = None,
    out: Out = None, debug: Debug = False,
) -> None:
    """Remove 1..N layers at once by each strategy, score every choice against the full model, draw the
    pruning curves, and optionally heal and save the smaller model."""
    scoring = opt.scoring_config(
        ScoringConfig, tasks=tasks, include_path=include_path, num_fewshot=num_fewshot, limit=limit, seed=seed,
        bootstrap_iters=bootstrap_iters, ppl_text=ppl_text, ppl_dataset=ppl_dataset,
        ppl_dataset_config=ppl_dataset_config, ppl_split=ppl_split, ppl_field=ppl_field, ppl_max_tokens=ppl_max_tokens,
        seq_len=seq_len, margin=margin, kl=not no_kl, fidelity_tasks=fidelity_tasks, generate=generate,
        batch_size=batch_size, engine=engine, batch_tokens=batch_tokens,
        fresh=fresh, samples=not no_samples)
    heals = HealConfig(methods=heal or (), calib_text=str(calib_text) if calib_text else None,
                       calib_dataset=calib_dataset, calib_dataset_config=calib_dataset_config, calib_split=calib_split,
                       calib_max_tokens=calib_max_tokens, ridge=heal_ridge, steps=heal_steps, loss=heal_loss,
                       rank=heal_rank, lr=heal_lr)
    config = ShrinkConfig(remove=remove, strategies=strategies or None, layers=layers, rank_by=rank_by,
                          scoring=scoring, heal=heals, units=units)
    if save_heal is not None and save_heal not in ("none", *heals.methods):
        raise OptionError("{save_heal} {value!r}: give none, or a heal the run makes (--heal {known})",
                          value=save_heal, known=", ".join(METHODS))
    if save is None:
        for field, given in (("save_strategy", save_strategy is not None), ("overwrite", overwrite),
                             ("save_heal", save_heal is not None)):
            if given:
                raise OptionError("{" + field + "} applies to {save}: give {save} DIR too, or drop it")
    save_strategy = save_strategy or "best"
    planned = output_dir(out, model.slug, "shrink", create=False)
    opt.check_resumable(planned, scoring)
    if save is not None:
        check_save_target(save, overwrite, config, save_strategy, out=planned)
        quantize.refuse_save(model.quantize, "--save", SAVE_HINT)
    if reuse is not None:
        check_reuse(reuse)
    timer = Timer()
    calibration = checked = None
    if heals.methods:  # a missing calibration file or dataset fails before the model loads
        with ui.status("loading the calibration text"), timer("calibration"):
            calibration = heals.load_calibration(calibration_beside(scoring))
    inputs, loaded = opt.load_inputs(scoring, model, timer, check=config.check_scored)
    stack = find_layers(loaded.model, model.layers_path)
    config.check_model(len(stack), stack)  # before any output exists
    if calibration is not None:  # calibration that overlaps the evaluation text: refused before any output
        checked = check_calibration(loaded, heals, calibration, inputs.ppl_text, scoring.seq_len,
                                    scoring.ppl_max_tokens)
    if save is not None:
        quantize.refuse_save(loaded.quantize, "--save", SAVE_HINT)  # a checkpoint saved quantized, loaded as is
    folder = output_dir(out, model.slug, "shrink")
    with ui.progress_display() as progress:
        result = run(loaded, config, folder, inputs=inputs, layers_path=model.layers_path, progress=progress,
                     timer=timer, reuse=reuse, calibration=calibration, calibration_windows=checked)
    saved = None
    if save is not None:
        with ui.status(f"saving the pruned model to {save}"), timer("save"):
            saved = save_pick(result, loaded, save, strategy=save_strategy, overwrite=overwrite,
                              layers_path=model.layers_path, heal=save_heal)
    show_shrink(result, saved)
