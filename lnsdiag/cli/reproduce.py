"""`lnsdiag reproduce`: the paper's experiment, small: Pre-LN and LNS twins trained and measured alike."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any

import typer

from ..data.text import from_file
from ..demo.model import DemoSpec
from ..model.load import model_slug, pick_device
from ..runners import reproduce
from ..runs import output_dir
from . import ui
from .common import Debug, Device, TextField, app, command
from .show import show_reproduce

ReproduceOut = Annotated[Path | None, typer.Option("--out", "-o", help="Output folder \\[default: "
                                                   "results/reproduce/<size>].", show_default=False)]


def _opt(help_text: str) -> Any:
    return typer.Option(help=help_text, show_default=False)


@app.command("reproduce")
@command
def reproduce_cmd(
    preset: Annotated[str, typer.Option(help="demo (12×128, minutes on a CPU) or llama-130m (the paper's "
                                             "smallest: 12 layers, hidden 768; for a GPU).")] = "demo",
    norms: Annotated[str, typer.Option(help="Models to train, comma-separated: pre-ln, lns, post-ln.")] = "pre-ln,lns",
    layers: Annotated[int | None, _opt("Blocks \\[preset].")] = None,
    hidden: Annotated[int | None, _opt("Hidden size \\[preset].")] = None,
    heads: Annotated[int | None, _opt("Attention heads \\[preset].")] = None,
    intermediate: Annotated[int | None, _opt("MLP size \\[preset].")] = None,
    vocab: Annotated[int | None, _opt("BPE vocabulary trained on the text \\[preset].")] = None,
    seq_len: Annotated[int | None, typer.Option("--seq-len", help="Tokens per sequence \\[preset].",
                                                show_default=False)] = None,
    train_batch_size: Annotated[int | None, typer.Option("--train-batch-size", help="Sequences per training step "
                                                         "\\[preset].", show_default=False)] = None,
    steps: Annotated[int | None, _opt("Training steps \\[preset: 250 for demo].")] = None,
    lr: Annotated[float | None, _opt("Peak learning rate \\[preset].")] = None,
    seed: Annotated[int | None, _opt("Seed for weights and batches (shared by the twins) \\[0].")] = None,
    init: Annotated[str, typer.Option(help="default, or scaled (output projections std/sqrt(2L); the paper "
                                           "says it conflicts with LNS).")] = "default",
    text_file: Annotated[Path | None, typer.Option("--text-file", help="Train on this text (plain or JSONL); its "
                                                   "last tenth is held out \\[default: stdlib docstrings].",
                                                   show_default=False)] = None,
    text_field: TextField = "text",
    eval_text_file: Annotated[Path | None, typer.Option("--eval-text-file", help="Held-out text \\[default: the "
                                                        "held-out part of the training text].",
                                                        show_default=False)] = None,
    eval_tokens: Annotated[int, typer.Option("--eval-tokens", help="Held-out tokens to measure on.")] = 16_384,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Sequences per forward pass.")] = 8,
    threshold: Annotated[float, typer.Option(help="Near-identity threshold on angular distance.")] = 0.2,
    device: Device = "auto",
    fresh: Annotated[bool, typer.Option("--fresh", help="Retrain even if cached models exist.")] = False,
    out: ReproduceOut = None, debug: Debug = False,
) -> None:
    """Train Pre-LN and LNS twins (same seed, data, steps) and compare angular distance, variance, perplexity."""
    spec = reproduce.spec_from(preset, layers=layers, hidden=hidden, heads=heads, intermediate=intermediate,
                               vocab=vocab, seq_len=seq_len, batch_size=train_batch_size, steps=steps, lr=lr,
                               seed=seed, init=init)
    config = reproduce.ReproduceConfig(spec=spec, norms=norms, eval_tokens=eval_tokens, batch_size=batch_size,
                                       threshold=threshold)
    dev = pick_device(device)
    text = from_file(text_file, text_field) if text_file is not None else None
    eval_text = from_file(eval_text_file, text_field) if eval_text_file is not None else None
    output_dir(out, "reproduce", _folder_name(spec, text_file), create=False)
    with ui.progress_display() as progress:
        result = reproduce.run(config, text=text, eval_text=eval_text, device=dev, fresh=fresh, progress=progress)
    show_reproduce(result, output_dir(out, "reproduce", _folder_name(spec, text_file)))


def _folder_name(spec: DemoSpec, text_file: Path | None) -> str:
    """The twins' shared size (``demo-llama-12L-128d``), and the training text's name if not the default."""
    base = re.sub(r"-(pre-ln|lns|post-ln)$", "", spec.with_(norm="pre-ln").name)
    return base + ("" if text_file is None else "-" + model_slug(Path(text_file).stem))
