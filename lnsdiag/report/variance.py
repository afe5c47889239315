"""Residual-variance report: table, summary, variance.csv, log-scale plot (the paper's Fig. 9 shape). Where
the run measured sub-layers (``--unit``), each asked unit kind's update ratio is shown beside the others:
the block's ‖f(x)‖/‖x‖, the attention's ‖a‖/‖x‖, the MLP's ‖m‖/‖h‖ (h = x + a)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ..measure.variance import VarianceResult
from ..runs import write_csv, write_json
from .common import (
    DOUBLE_COLUMN,
    PALETTE,
    SINGLE_COLUMN,
    SUBLAYER_COLOURS,
    TITLE_INSET,
    UNIT_WORDS,
    Col,
    Tables,
    TableSpec,
    bar,
    figure,
    large_spread,
    layer_axis,
    save_figure,
    styled,
    width_for,
    wrap,
)


def _log_bar(value: float, low: float, high: float, width: int = 24) -> str:
    """A bar on a log scale between ``low`` and ``high`` (variance spans orders of magnitude)."""
    if not (value > 0 and low > 0):
        return ""
    span = math.log(high / low)
    if span <= 0:
        return bar(1.0, 1.0, width)
    return bar(math.log(value / low) + 0.05 * span, 1.05 * span, width)


#: Each unit kind's update ratio as the table and summary name it.
_RATIOS = {"block": "‖f(x)‖/‖x‖", "attn": "‖a‖/‖x‖", "mlp": "‖m‖/‖h‖"}


def _ratios(result: VarianceResult) -> dict[str, list[float]]:
    """Each asked unit kind's update ratio per state row (layers 0..L; the output row has none)."""
    L = result.num_layers
    out = {}
    for unit in result.units:
        if unit == "block":
            out[unit] = [float(v) for v in result.layers["update_ratio"]]
        else:
            rows = result.sublayers[result.sublayers["unit"] == unit]
            out[unit] = [float(v) for v in rows.sort_values("layer")["update_ratio"]] + [math.nan]
        out[unit] += [math.nan] * (L + 1 - len(out[unit]))
    return out


def variance_table(result: VarianceResult, title: str = "Residual stream per layer",
                   placement: str | None = None) -> Tables:
    """Variance entering each layer and each layer's relative update, both with log-scale bars (the first
    layer's update is often 100 times the others'); with sub-layers measured, each asked unit kind's update
    (bars on one scale)."""
    df = result.layers
    positive = df.loc[df["variance"] > 0, "variance"]
    low, high = (float(positive.min()), float(positive.max())) if len(positive) else (0.0, 0.0)
    ratios = _ratios(result)
    shown = [v for values in ratios.values() for v in values if v > 0]  # NaN compares False
    r_low, r_high = (min(shown), max(shown)) if shown else (0.0, 0.0)
    last = result.num_layers
    one = len(ratios) == 1  # the blocks' alone, as ever; several kinds: narrower bars, so all fit in 100 columns
    variance = [f"{v:<9.4g} [magenta]{_log_bar(v, low, high, 16 if one else 7)}[/magenta]" for v in df["variance"]]
    updates = [Col(f"update {_RATIOS[unit]}" if one else f"{unit} {_RATIOS[unit]}",
                   ["" if math.isnan(v) else (f"{v:<9.4g} [green]{_log_bar(v, r_low, r_high, 16)}[/green]" if one
                                              else f"{v:<7.3g} [green]{_log_bar(v, r_low, r_high, 6)}[/green]")
                    for v in values], "left")
               for unit, values in ratios.items()]
    caption = f"norm placement: {placement}; bars on a log scale" if placement else "bars on a log scale"
    layers = Col("layer", ["output" if v == last else str(v) for v in df["layer"]])
    return Tables(TableSpec(title, [layers], [[Col("variance of x_l", variance, "left"),
                                               Col("RMS", [f"{v:.4g}" for v in df["rms"]]), *updates]],
                            caption=caption))


def variance_summary(result: VarianceResult) -> str:
    """How much the stream grows, how much the deep layers change it, and (sub-layers measured) the
    attention's and the MLP's share, naming the smallest update of each."""
    L = result.num_layers
    text = (f"Variance grows ×{result.growth:.3g} from the embeddings (input of layer 0) to the output of layer "
            f"{L - 1}. ")
    if "block" in result.units:
        text += (f"The deepest half of the layers change their input by {result.mean_update_ratio(0.5, 1):.1%} "
                 f"on average (‖f(x)‖/‖x‖), the first half by {result.mean_update_ratio(0, 0.5):.1%}. ")
    for kind in ("attn", "mlp"):
        rows = result.sublayers[result.sublayers["unit"] == kind]
        if kind in result.units and len(rows):
            least = rows.loc[rows["update_ratio"].astype(float).idxmin()]
            word = UNIT_WORDS[kind]
            text += (f"{word[0].upper() + word[1:]} updates ({_RATIOS[kind]}): "
                     f"{result.mean_update_ratio(0.5, 1, kind):.1%} in the deepest half, "
                     f"{result.mean_update_ratio(0, 0.5, kind):.1%} in the first; the smallest is "
                     f"{int(least['layer'])}.{kind}'s ({least['update_ratio']:.3g}). ")
    return text + f"Averaged over {result.tokens:,} tokens ({result.token_mode})."


@styled
def variance_figure(result: VarianceResult, title: str = "") -> Any:
    """Variance of the stream entering each layer (log scale; the paper's Fig. 9 shape), and each layer's
    relative update below (log scale too when the first layer's dwarfs the rest)."""
    df = result.layers
    L = result.num_layers
    width = width_for(L)
    fig, axes = figure(width, 3.6 if width == SINGLE_COLUMN else 4.0, nrows=2, sharex=True,
                       gridspec_kw={"height_ratios": [3, 2]})
    top, low = axes[:, 0]
    top.plot(df["layer"], df["variance"], marker="o", color=PALETTE["blue"], label="variance of $x_\\ell$")
    top.plot(df["layer"], df["rms"] ** 2, ls=":", lw=1, color=PALETTE["grey"], label="mean square of $x_\\ell$")
    top.set_yscale("log")
    top.set_ylabel("variance (log)")
    top.legend(loc="lower right")
    top.set_title(wrap(title or f"Residual stream per layer ({result.token_mode} tokens, n={result.tokens:,})",
                       width - TITLE_INSET))
    shown = _draw_ratios(low, result)
    logscale = large_spread(shown, 0.0)
    label = ("relative update\n$\\|x_{\\ell+1}-x_\\ell\\| / \\|x_\\ell\\|$" if tuple(result.units) == ("block",)
             else "relative update\nof each unit")
    low.set_ylabel(label + (" (log)" if logscale else ""))
    if logscale:
        low.set_yscale("log")
    else:
        low.set_ylim(bottom=0)
    low.set_xlabel(f"layer ℓ (0-based; {L}: last block's output, before the final norm)"
                   if width == DOUBLE_COLUMN else f"layer ℓ (0-based; {L}: last block's output)")
    low.set_xlim(-0.6, L + 0.6)
    layer_axis(low.xaxis, L + 1)
    return fig


def _draw_ratios(ax: Any, result: VarianceResult) -> list[float]:
    """Each asked unit kind's update ratio per layer (the blocks' alone as ever, in green); the values drawn."""
    L = result.num_layers
    ratios = _ratios(result)
    layers = list(range(L))
    drawn: list[float] = []
    for unit, values in ratios.items():
        colour = PALETTE["green"] if unit == "block" else SUBLAYER_COLOURS[unit]
        ax.plot(layers, values[:L], marker={"block": "o", "attn": "s", "mlp": "^"}[unit], color=colour,
                **({} if len(ratios) == 1 else {"label": f"{UNIT_WORDS[unit]} {_RATIOS[unit]}"}))
        drawn += [v for v in values[:L] if v > 0]
    if len(ratios) > 1:
        ax.legend(loc="upper right")
    return drawn


def plot_variance(result: VarianceResult, stem: Path, title: str = "") -> list[Path]:
    """:func:`variance_figure` as ``stem``.png (a glance) and .pdf (vector, for a paper)."""
    return save_figure(variance_figure(result, title), stem)


def write_variance(result: VarianceResult, out: Path, meta: dict[str, Any], title: str = "") -> list[Path]:
    """variance.csv, meta.json, variance.png/pdf."""
    files = [write_csv(out / "variance.csv", result.csv_frame())]
    files += plot_variance(result, out / "variance", title)
    files.append(write_json(out / "meta.json", meta))
    return files
