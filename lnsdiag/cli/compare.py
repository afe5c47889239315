"""`lnsdiag compare`: several result folders side by side, layers aligned by relative depth."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..runners import compare
from ..runs import output_dir
from .common import Debug, app, command
from .show import show_compare

CompareOut = Annotated[Path | None, typer.Option("--out", "-o", help="Output folder \\[default: "
                                                 "results/compare/<runs>].", show_default=False)]


@app.command("compare")
@command
def compare_cmd(
    folders: Annotated[list[Path] | None, typer.Argument(
        help="Result folders (of angular, variance, prune or reproduce), or a model's results/<model> folder.",
        show_default=False)] = None,
    label: Annotated[list[str] | None, typer.Option("--label", "-l", help="A name per folder, in order "
                                                    "\\[default: the model's name].", show_default=False)] = None,
    bins: Annotated[int | None, typer.Option(help="Slices of relative depth \\[default: the smallest layer "
                                                  "count].", show_default=False)] = None,
    out: CompareOut = None, debug: Debug = False,
) -> None:
    """Several runs side by side: layers aligned by relative depth, overlay plots, a LaTeX table."""
    config = compare.CompareConfig(tuple(folders or ()), tuple(label) if label else None, bins)
    result = compare.run(config)
    show_compare(result, output_dir(out, "compare", result.slug))
