"""Residual-variance report: table, summary, variance.csv, log-scale plot (the paper's Fig. 9 shape)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from rich.table import Table

from ..runs import write_csv, write_json
from ..variance import VarianceResult
from .common import bar, pyplot, save_figure


def _log_bar(value: float, low: float, high: float) -> str:
    """A bar on a log scale between ``low`` and ``high`` (variance spans orders of magnitude)."""
    if not (value > 0 and low > 0):
        return ""
    span = math.log(high / low)
    if span <= 0:
        return bar(1.0, 1.0)
    return bar(math.log(value / low) + 0.05 * span, 1.05 * span)


def variance_table(result: VarianceResult, title: str = "Residual stream per layer",
                   placement: str | None = None) -> Table:
    caption = f"norm placement: {placement}" if placement else None
    table = Table(title=title, title_justify="left", header_style="bold", caption=caption, caption_justify="left")
    table.add_column("layer", justify="right")
    table.add_column("variance", justify="right")
    table.add_column("(log scale)", no_wrap=True)
    table.add_column("RMS", justify="right")
    table.add_column("‖f(x)‖/‖x‖", justify="right")
    table.add_column("", no_wrap=True)
    df = result.layers
    positive = df.loc[df["variance"] > 0, "variance"]
    low, high = (float(positive.min()), float(positive.max())) if len(positive) else (0.0, 0.0)
    top_ratio = float(df["update_ratio"].max()) if df["update_ratio"].notna().any() else 0.0
    last = result.num_layers
    for row in df.itertuples():
        name = "output" if row.layer == last else str(row.layer)
        ratio = "" if math.isnan(row.update_ratio) else f"{row.update_ratio:.4f}"
        ratio_bar = "" if math.isnan(row.update_ratio) else f"[green]{bar(row.update_ratio, top_ratio)}[/green]"
        table.add_row(name, f"{row.variance:.4g}", f"[magenta]{_log_bar(row.variance, low, high)}[/magenta]",
                      f"{row.rms:.4g}", ratio, ratio_bar)
    return table


def variance_summary(result: VarianceResult) -> str:
    L = result.num_layers
    return (f"Variance grows ×{result.growth:.3g} from the embeddings (input of layer 0) to the output of layer "
            f"{L - 1}. The deepest half of the layers change their input by {result.mean_update_ratio(0.5, 1):.1%} "
            f"on average (‖f(x)‖/‖x‖), the first half by {result.mean_update_ratio(0, 0.5):.1%}. "
            f"Averaged over {result.tokens:,} tokens ({result.token_mode}).")


def plot_variance(result: VarianceResult, stem: Path, title: str = "") -> list[Path]:
    """Variance of the stream entering each layer on a log scale, update ratio below."""
    plt = pyplot()
    df = result.layers
    L = result.num_layers
    fig, (top, low) = plt.subplots(2, 1, figsize=(6, 4.6), sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    top.plot(df["layer"], df["variance"], marker="o", ms=3, lw=1.4, label="variance of $x_l$")
    top.plot(df["layer"], df["rms"] ** 2, ls=":", lw=1, color="gray", label="mean square of $x_l$")
    top.set_yscale("log")
    top.set_ylabel("variance (log)")
    top.legend(frameon=False, fontsize=8)
    top.set_title(title or f"Residual stream variance per layer ({result.token_mode} tokens, n={result.tokens:,})")
    low.plot(df["layer"].iloc[:L], df["update_ratio"].iloc[:L], marker="o", ms=3, lw=1.2, color="tab:green")
    low.set_ylabel(r"$\|x_{l+1}-x_l\| / \|x_l\|$")
    low.set_ylim(bottom=0)
    low.set_xlabel(f"layer l (0-based; {L} = last block's output before the final norm)")
    from matplotlib.ticker import MaxNLocator

    low.xaxis.set_major_locator(MaxNLocator(integer=True))
    return save_figure(fig, stem)


def write_variance(result: VarianceResult, out: Path, meta: dict[str, Any], title: str = "") -> list[Path]:
    """variance.csv, meta.json, variance.png/pdf."""
    files = [write_csv(out / "variance.csv", result.layers)]
    files += plot_variance(result, out / "variance", title)
    files.append(write_json(out / "meta.json", meta))
    return files
