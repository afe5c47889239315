"""`lnsdiag demo`: the offline, embedded default."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from ..demo.model import shipped_dir
from ..runners import demo as demo_runner
from ..runners.demo import DemoConfig, DemoRun
from ..runs import output_dir
from . import ui
from .common import Debug, Device, app, command
from .show import show_angular, show_prune, show_reproduce, show_shrink


@app.command("demo")
@command
def demo_cmd(
    steps: Annotated[int | None, typer.Option(help="Training steps \\[default: 250; a model of another size or "
                                              "step count is trained here, not shipped].", show_default=False)] = None,
    layers: Annotated[int | None, typer.Option(help="Layers of the demo model \\[default: 12].",
                                               show_default=False)] = None,
    retrain: Annotated[bool, typer.Option("--retrain", help="Train the models from scratch (minutes) instead of "
                                          "using the shipped or cached ones.")] = False,
    fresh: Annotated[bool, typer.Option("--fresh", hidden=True, help="Old name of --retrain.")] = False,
    twin: Annotated[bool, typer.Option("--twin/--no-twin", help="Also measure the LayerNorm-Scaling twin (same seed, "
                                       "data and steps) and show Pre-LN vs LNS side by side.")] = True,
    shrink: Annotated[int, typer.Option(help="Also remove up to this many layers at once by each strategy "
                                        "(`lnsdiag shrink`); 0: skip.")] = 4,
    device: Device = "auto",
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path("results/demo"),
    debug: Debug = False,
) -> None:
    """Offline demo: diagnose a small Llama trained on the stdlib's docstrings, and compare it with its LNS twin.

    The default model and its twin ship with lnsdiag (trained by this recipe; --retrain reproduces them).
    """
    config = DemoConfig(steps=steps, layers=layers, retrain=retrain or fresh, twin=twin, device=device,
                        shrink=shrink)
    folder = output_dir(out, "demo", "")
    name = config.spec.name

    def show(part: str, result: DemoRun) -> None:
        with progress.interlude():
            if part == "model":
                ui.console.print(model_line(result), width=min(ui.console.width, 100))
            elif part == "angular":
                show_angular(result.angular, output_dir(folder / "angular", "demo", "angular"),
                             f"Angular distance per layer — {name} (held-out docstrings)")
                ui.console.print()
            elif part == "prune":
                show_prune(result.prune, f"Removing one layer of {name}: perplexity on held-out docstrings")
            elif part == "shrink":
                ui.console.print()
                show_shrink(result.shrink, title=f"Removing 1–{result.shrink.meta['remove']} layers of {name} at once: "
                            "perplexity on held-out docstrings")
            elif part == "twins":
                ui.console.print()
                show_reproduce(result.twins, output_dir(folder / "twins", "demo", "twins"),
                               f"{name}: Pre-LN vs LNS (same seed, data and steps; held-out docstrings)")

    with ui.progress_display() as progress:
        demo_runner.run(config, folder, progress=progress, on_part=show)


def model_line(result: DemoRun) -> str:
    """Where the demo model's weights came from, in one sentence: shipped (and checked) or trained here."""
    record, train = result.record, result.record["train"]
    weights = record.get("weights") or {}
    name = f"[bold]{result.spec.name}[/]: {result.spec.layers} layers"
    if weights.get("source") == "shipped":
        python = (weights.get("trained_on") or {}).get("python") or record.get("python")
        return (f"{name}, the weights shipped with lnsdiag (SHA-256 checked; float16, measured as float32): trained "
                f"{train['steps']} steps on {record['corpus_tokens']:,} tokens of the docstrings of Python"
                f"{f' {python}' if python else ''}'s standard library, final train loss "
                f"{train['final_train_loss']:.2f}. `lnsdiag demo --retrain` trains them from scratch")
    line = (f"{name}, trained {train['steps']} steps on {record['corpus_tokens']:,} tokens of stdlib docstrings in "
            f"{train['seconds']:.0f} s (final train loss {train['final_train_loss']:.2f})")
    source = shipped_dir(result.spec)
    if source is not None and (source / "train_log.json").is_file():
        try:
            ref = json.loads((source / "train_log.json").read_text(encoding="utf-8"))["train"]["final_train_loss"]
            line += f"; the shipped weights' was {ref:.2f}"
        except (OSError, ValueError, KeyError, TypeError):
            pass
    return f"{line}; cached at {result.model_path}"
