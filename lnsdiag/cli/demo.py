"""`lnsdiag demo`: the offline, embedded default."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .. import ui
from ..models import load_model
from ..runs import Timer, output_dir
from .angular import run_angular
from .common import (
    Debug,
    Device,
    app,
    command,
)
from .prune import run_prune


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
    from ..demo import DemoSpec, ensure_demo_model
    from ..models import pick_device
    from ..text import stdlib_corpus

    spec = DemoSpec().with_(steps=steps, layers=layers)
    folder = output_dir(out, "demo", "")
    timer = Timer()
    dev = pick_device(device)
    with ui.make_progress() as progress, timer("train"):
        task = progress.add_task(f"training {spec.name}", total=spec.steps)
        path, record = ensure_demo_model(
            spec, fresh=fresh, device=dev,
            on_phase=lambda msg: progress.update(task, description=msg),
            on_step=lambda step, loss: progress.update(task, completed=step,
                                                       description=f"training (loss {loss:.2f})"),
        )
        progress.update(task, completed=spec.steps)
    train = record["train"]
    ui.console.print(f"[bold]{spec.name}[/]: {spec.layers} layers, trained {train['steps']} steps on "
                     f"{record['corpus_tokens']:,} tokens of stdlib docstrings in {train['seconds']:.0f} s "
                     f"(final train loss {train['final_train_loss']:.2f}); cached at {path}")
    loaded = load_model(str(path), device=str(dev))
    loaded.name = spec.name
    heldout = stdlib_corpus("test")
    angular = run_angular(loaded, heldout, output_dir(folder / "angular", "demo", "angular"), timer=timer,
                          max_tokens=32_768, seq_len=spec.seq_len, batch_size=16, tokens="all", max_block=None,
                          threshold=0.2, title=f"Angular distance per layer — {spec.name} (held-out docstrings)")
    ui.console.print()
    run_prune(loaded, output_dir(folder / "prune", "demo", "prune"), ppl_source=heldout, timer=timer,
              ppl_max_tokens=32_768, seq_len=spec.seq_len, batch_size=16, angular_frame=angular.layers,
              fresh=True, title=f"Removing one layer of {spec.name}: perplexity on held-out docstrings")
    if twin:
        from .depth import run_reproduce

        ui.console.print()
        run_reproduce(spec, ["pre-ln", "lns"], output_dir(folder / "twins", "demo", "twins"), eval_tokens=32_768,
                      batch_size=16, device=dev, fresh=["lns"] if fresh else False,
                      title=f"{spec.name}: Pre-LN vs LNS (same seed, data and steps; held-out docstrings)")
