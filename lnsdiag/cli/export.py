"""`lnsdiag export`: a model written as a checkpoint any runtime computes exactly (LayerNorm Scaling
folded into the norm weights)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..model import quantize
from ..model.load import ModelOptions
from ..runners import export
from . import ui
from .common import Debug, app, command, load, model_options


@app.command("export")
@command
@model_options
def export_cmd(
    model: ModelOptions,
    folder: Annotated[Path, typer.Argument(
        help="Folder to write the checkpoint into (new or empty).", show_default=False)],
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace FOLDER if it holds a model.")] = False,
    max_shard_size: Annotated[str, typer.Option(
        "--max-shard-size", help="Largest safetensors file (e.g. 5GB, 500MB).")] = "5GB",
    verify: Annotated[bool, typer.Option(
        "--verify", help="Load the written checkpoint with plain transformers and report its largest logit "
        "difference to lnsdiag's model (loads it a second time).")] = False,
    debug: Debug = False,
) -> None:
    """Write MODEL as a checkpoint plain transformers, vLLM and lm-eval compute exactly: LayerNorm Scaling
    folded into the scaled norms' weights (and biases); a model without it is written as it is."""
    target = export.check_target(folder, overwrite, model, max_shard_size)  # before the model loads
    quantize.refuse_save(model.quantize, "export", "rerun without --quantize")
    loaded = load(model)
    with ui.status(f"writing {target}"):
        result = export.run(loaded, target, overwrite=overwrite, max_shard_size=max_shard_size,
                            layers_path=model.layers_path, verify=verify)
    show_export(result, model.name)


def show_export(result: export.ExportRun, name: str) -> None:
    saved = result.checkpoint
    lns = saved.record.get("lns") or {}
    if saved.note:
        ui.note(saved.note)
    size = f"{saved.num_parameters / 1e6:,.1f}M parameters, {saved.record.get('dtype')}, " \
           f"{len(saved.weight_files)} file(s), {saved.total_bytes / 1e6:,.1f} MB"
    if saved.folded_norms:
        layers = lns.get("layers") or []
        span = f"{layers[0]}..{layers[-1]}" if layers == list(range(layers[0], layers[-1] + 1)) else \
            ",".join(map(str, layers))
        ui.console.print(
            f"exported {name} to {saved.folder}: LayerNorm Scaling folded into {saved.folded_norms} norms "
            f"({', '.join(lns.get('norms') or [])}; l = {span}), largest relative rounding "
            f"{saved.fold_rounding:.2g}; {size}", highlight=False, soft_wrap=True)
    else:
        ui.console.print(f"exported {name} to {saved.folder}: {size}", highlight=False, soft_wrap=True)
    eps = _eps(saved.record.get("dtype"))
    if saved.fold_rounding is not None and eps is not None and saved.fold_rounding > eps:
        ui.note(f"stored in {saved.record.get('dtype')}, a folded norm weight is off its exact value by up to "
                f"{saved.fold_rounding:.2g} of its factor (more than {saved.record.get('dtype')}'s own {eps:.2g}); "
                "--dtype float32 writes the folded weights exactly")
    if result.max_abs_logit_diff is not None:
        ui.console.print(f"checked: plain transformers on {saved.folder} vs lnsdiag's model, {result.check_tokens} "
                         f"random tokens: max |Δlogits| = {result.max_abs_logit_diff:.3g} (logits up to "
                         f"{result.max_abs_logit:.3g})", highlight=False, soft_wrap=True)
    ui.console.print(f"load it anywhere: AutoModelForCausalLM.from_pretrained({str(saved.folder)!r}), vLLM, "
                     f"lm-eval --model_args pretrained={saved.folder}", highlight=False, soft_wrap=True)


def _eps(dtype: str | None) -> float | None:
    import torch

    value = getattr(torch, str(dtype), None)
    return float(torch.finfo(value).eps) if isinstance(value, torch.dtype) and value.is_floating_point else None
