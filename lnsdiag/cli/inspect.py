"""`lnsdiag models` and `lnsdiag inspect`: what can be loaded, and what a model looks like."""

from __future__ import annotations

from rich.table import Table

from .. import ui
from ..models import ALIASES
from .common import (
    Debug,
    Device,
    DeviceMap,
    Dtype,
    LayersPath,
    ModelArg,
    ModelOpt,
    Revision,
    TrustRemote,
    app,
    command,
    load,
    model_name,
)


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
def inspect_cmd(
    model: ModelArg = None, model_opt: ModelOpt = None, revision: Revision = None, dtype: Dtype = "auto",
    device: Device = "auto", device_map: DeviceMap = None, trust_remote_code: TrustRemote = False,
    layers_path: LayersPath = None, debug: Debug = False,
) -> None:
    """Show a model's layer stack, depth, size and norm placement (pre-LN, post-LN, sandwich)."""
    from ..surgery import find_layers, norm_placement

    loaded = load(model_name(model, model_opt), revision, dtype, device, device_map, trust_remote_code)
    stack = find_layers(loaded.model, layers_path)
    table = Table(show_header=False, box=None)
    info = loaded.describe()
    for key in ("source", "architecture", "model_type", "dtype", "device"):
        table.add_row(key, str(info[key]))
    table.add_row("parameters", f"{info['parameters'] / 1e6:,.1f}M")
    table.add_row("layer stack", f"{stack.path} ({len(stack)} × {type(stack.layers[0]).__name__})")
    table.add_row("norm placement", norm_placement(loaded.model, stack))
    ui.console.print(table)
