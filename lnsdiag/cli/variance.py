"""`lnsdiag variance`: how the residual stream grows with depth (why deep Pre-LN layers die)."""

from __future__ import annotations

from typing import Annotated

import typer

from ..data.text import TextOptions
from ..measure import variance
from ..model.load import ModelOptions
from ..runs import Timer, output_dir
from . import ui
from .common import Debug, MaxTokens, Out, SeqLen, Unit, app, command, load, model_options, text_options, text_source
from .show import show_variance


@app.command("variance")
@command
@model_options
@text_options
def variance_cmd(
    model: ModelOptions, text: TextOptions, max_tokens: MaxTokens = 65_536,
    seq_len: SeqLen = None,
    tokens: Annotated[str, typer.Option(help="all: every non-padding token; last: each sequence's last "
                                             "token.")] = "all",
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Sequences per forward pass.")] = 4,
    unit: Unit = "block", out: Out = None, debug: Debug = False,
) -> None:
    """Residual-stream variance per layer and how much each layer changes its input (Pre-LN growth)."""
    config = variance.VarianceConfig(seq_len=seq_len, max_tokens=max_tokens, batch_size=batch_size, tokens=tokens,
                                     units=unit)
    source = text_source(text)
    output_dir(out, model.slug, "variance", create=False)
    timer = Timer()
    with timer("load"):
        loaded = load(model)
    folder = output_dir(out, model.slug, "variance")
    with ui.progress_display() as progress:
        result = variance.run(loaded, source, config, layers_path=model.layers_path, progress=progress, timer=timer)
    show_variance(result, folder)
