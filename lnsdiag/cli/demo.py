"""`lnsdiag demo`: the offline, embedded default."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .. import ui
from ..runs import output_dir
from .common import Debug, Device, app, command
from .show import show_angular, show_prune, show_reproduce


@app.command("demo")
@command
def demo_cmd(
    steps: Annotated[int | None, typer.Option(help="Training steps \\[default: 250].", show_default=False)] = None,
    layers: Annotated[int | None, typer.Option(help="Layers of the demo model \\[default: 12].",
                                               show_default=False)] = None,
    fresh: Annotated[bool, typer.Option("--fresh", help="Retrain even if a cached model exists.")] = False,
    twin: Annotated[bool, typer.Option("--twin/--no-twin", help="Also train the LayerNorm-Scaling twin (same seed, "
                                       "data and steps) and show Pre-LN vs LNS side by side.")] = True,
    device: Device = "auto",
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path("results/demo"),
    debug: Debug = False,
) -> None:
    """Offline demo: train a small Llama on the stdlib's docstrings, diagnose it, and compare it with its LNS twin."""
    from ..demo import DemoConfig, DemoRun, run

    config = DemoConfig(steps=steps, layers=layers, fresh=fresh, twin=twin, device=device)
    folder = output_dir(out, "demo", "")
    name = config.spec.name

    def show(part: str, result: DemoRun) -> None:
        with progress.interlude():
            if part == "model":
                train = result.record["train"]
                ui.console.print(f"[bold]{name}[/]: {result.spec.layers} layers, trained {train['steps']} steps on "
                                 f"{result.record['corpus_tokens']:,} tokens of stdlib docstrings in "
                                 f"{train['seconds']:.0f} s (final train loss {train['final_train_loss']:.2f}); "
                                 f"cached at {result.model_path}")
            elif part == "angular":
                show_angular(result.angular, output_dir(folder / "angular", "demo", "angular"),
                             f"Angular distance per layer — {name} (held-out docstrings)")
                ui.console.print()
            elif part == "prune":
                show_prune(result.prune, f"Removing one layer of {name}: perplexity on held-out docstrings")
            elif part == "twins":
                ui.console.print()
                show_reproduce(result.twins, output_dir(folder / "twins", "demo", "twins"),
                               f"{name}: Pre-LN vs LNS (same seed, data and steps; held-out docstrings)")

    with ui.RichProgress() as progress:
        run(config, folder, progress=progress, on_part=show)
