"""`lnsdiag models` and `lnsdiag inspect`: what can be loaded, and what a model looks like."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from ..checkpoint.card import provenance_line, read_provenance
from ..interventions.pruned import recorded_units
from ..model.families import ALIASES
from ..model.load import ModelOptions
from ..model.placement import describe
from . import ui
from .common import Debug, app, command, load, model_options


@app.command("models")
@command
def models_cmd() -> None:
    """List the model aliases (the paper's models)."""
    table = Table(title="Aliases", title_justify="left", header_style="bold")
    table.add_column("alias")
    table.add_column("hub id")
    for alias, hub in ALIASES.items():
        table.add_row(alias, hub)
    ui.console.print(table)
    ui.console.print("Any hub id or local directory works too; aliases are shortcuts.")


@app.command("inspect")
@command
@model_options
def inspect_cmd(model: ModelOptions, debug: Debug = False) -> None:
    """Show a model's layer stack, depth, size, norm placement (pre-LN, post-LN, sandwich) and, for a
    checkpoint lnsdiag pruned, which layers of which model it lacks."""
    loaded = load(model)
    shape = describe(loaded.model, model.layers_path)
    table = Table(show_header=False, box=None)
    info = loaded.describe()
    for key in ("source", "architecture", "model_type", "dtype", "device"):
        table.add_row(key, str(info[key]))
    if info["quantization"]:
        table.add_row("quantized", ", ".join(f"{k} {v}" for k, v in info["quantization"].items() if v is not None))
    table.add_row("parameters", f"{info['parameters'] / 1e6:,.1f}M")
    table.add_row("layer stack", f"{shape['layer_stack']} ({shape['num_layers']} × {shape['block']})")
    table.add_row("--unit attn / mlp", ", ".join(f"{kind}: {what}" for kind, what in shape["units"].items()))
    table.add_row("norm placement", shape["norm_placement"])
    removed = recorded_units(loaded.model.config)
    if removed:
        table.add_row("sub-layers skipped", f"{removed.cell} (zeroed in the checkpoint; lnsdiag does not run them)")
    record = read_provenance(loaded.source) if Path(loaded.source).is_dir() else None
    if record is not None:
        table.add_row("checkpoint", provenance_line(record))
    ui.console.print(table)
