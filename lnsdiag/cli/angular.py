"""`lnsdiag angular`: which layers barely turn the residual stream."""

from __future__ import annotations

from typing import Annotated

import typer

from ..data.text import TextOptions
from ..measure import angular
from ..model.load import ModelOptions
from ..runs import Timer, output_dir
from . import ui
from .common import Debug, MaxTokens, Out, SeqLen, Unit, app, command, load, model_options, text_options, text_source
from .show import show_angular


@app.command("angular")
@command
@model_options
@text_options
def angular_cmd(
    model: ModelOptions, text: TextOptions, max_tokens: MaxTokens = 65_536,
    seq_len: SeqLen = None,
    tokens: Annotated[str, typer.Option(help="all: every non-padding token; last: each sequence's last token "
                                             "(Gromov et al., ShortGPT).")] = "all",
    max_block: Annotated[int | None, typer.Option(
        "--max-block", help="Largest block size n for d(x_l, x_{l+n}) \\[default: all layers].",
        show_default=False)] = None,
    threshold: Annotated[float, typer.Option(help="Flag layers below this angular distance.")] = 0.2,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Sequences per forward pass.")] = 4,
    unit: Unit = "block", out: Out = None, debug: Debug = False,
) -> None:
    """Angular distance between each layer's input and output: which layers are near-identity."""
    config = angular.AngularConfig(seq_len=seq_len, max_tokens=max_tokens, batch_size=batch_size, tokens=tokens,
                                   max_block=max_block, threshold=threshold, units=unit)
    source = text_source(text)
    output_dir(out, model.slug, "angular", create=False)
    timer = Timer()
    with timer("load"):
        loaded = load(model)
    folder = output_dir(out, model.slug, "angular")
    with ui.progress_display() as progress:
        result = angular.run(loaded, source, config, layers_path=model.layers_path, progress=progress, timer=timer)
    show_angular(result, folder)
