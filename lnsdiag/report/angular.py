"""Angular-distance report: table, summary, per-layer plot and block heatmap (the CSVs are the run's own:
:meth:`~lnsdiag.measure.angular.AngularRun.write`). Where the run measured sub-layers (``--unit``), the
table, summary and per-layer plot show each asked unit kind side by side: a block, its attention and its
MLP per layer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from ..measure.angular import AngularResult
from .common import (
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
    layer_axis,
    save_figure,
    styled,
    width_for,
    wrap,
)

#: Each unit kind's marker (distinct in grey too) where kinds are drawn side by side.
_MARKERS = {"block": "o", "attn": "s", "mlp": "^"}


def _by_unit(result: AngularResult) -> dict[str, pd.DataFrame]:
    """Each asked unit kind's rows, in layer order."""
    frame = result.tidy()
    return {unit: frame[frame["unit"] == unit].reset_index(drop=True) for unit in result.units}


def _only_blocks(result: AngularResult) -> bool:
    return tuple(result.units) == ("block",)


@styled
def angular_figure(result: AngularResult, title: str = "") -> Any:
    """Angular distance of each layer to the next; near-identity layers (below the dashed threshold) marked.
    With sub-layers measured, a line per asked unit kind (block, attention, MLP)."""
    L = result.num_layers
    width = width_for(L)
    fig, axes = figure(width, 2.4 if width == SINGLE_COLUMN else 2.6)
    ax = axes[0, 0]
    if _only_blocks(result):
        _draw_layers(ax, result)
        ax.set_ylabel("angular distance $d(x_\\ell, x_{\\ell+1})$\n= arccos(cos) / π")
        default = f"Angular distance per layer ({result.token_mode} tokens, n={result.tokens:,})"
    else:
        _draw_units(ax, result)
        ax.set_ylabel("angular distance of each\nunit's step = arccos(cos) / π")
        default = f"Angular distance per layer and unit ({result.token_mode} tokens, n={result.tokens:,})"
    ax.set_xlabel("layer ℓ (0-based)")
    ax.set_ylim(bottom=0)
    ax.set_xlim(-0.6, L - 0.4)
    layer_axis(ax.xaxis, L)
    ax.set_title(wrap(title or default, width - TITLE_INSET))
    ax.legend(loc="upper right")
    return fig


def _draw_layers(ax: Any, result: AngularResult) -> None:
    """The blocks alone: one line, near-identity layers hollow in vermillion."""
    df = result.layers
    ax.plot(df["layer"], df["angular_distance"], color=PALETTE["blue"], lw=1.0, zorder=2)
    near = df["near_identity"].astype(bool)
    ax.plot(df.loc[~near, "layer"], df.loc[~near, "angular_distance"], ls="none", marker="o", ms=3.5,
            color=PALETTE["blue"], label=f"layer (d ≥ {result.threshold:g})", zorder=3)
    ax.plot(df.loc[near, "layer"], df.loc[near, "angular_distance"], ls="none", marker="o", ms=3.5, mfc="white",
            mec=PALETTE["vermillion"], mew=1.0, label=f"near-identity (d < {result.threshold:g})", zorder=3)
    ax.axhline(result.threshold, color=PALETTE["vermillion"], ls="--", lw=0.8, label="threshold")


def _draw_units(ax: Any, result: AngularResult) -> None:
    """A line per asked unit kind, its near-identity points hollow."""
    for unit, df in _by_unit(result).items():
        colour = PALETTE["blue"] if unit == "block" else SUBLAYER_COLOURS[unit]
        near = df["near_identity"].astype(bool)
        ax.plot(df["layer"], df["angular_distance"], color=colour, lw=1.0, marker=_MARKERS[unit], ms=3.5,
                label=UNIT_WORDS[unit], zorder=2)
        ax.plot(df.loc[near, "layer"], df.loc[near, "angular_distance"], ls="none", marker=_MARKERS[unit], ms=3.5,
                mfc="white", mec=colour, mew=1.0, zorder=3)
    ax.plot([], [], ls="none", marker="o", ms=3.5, mfc="white", mec=PALETTE["grey"],
            label=f"hollow: near-identity (d < {result.threshold:g})")
    ax.axhline(result.threshold, color=PALETTE["vermillion"], ls="--", lw=0.8, label="threshold")


def plot_angular(result: AngularResult, stem: Path, title: str = "") -> list[Path]:
    """:func:`angular_figure` as ``stem``.png (a glance) and .pdf (vector, for a paper)."""
    return save_figure(angular_figure(result, title), stem)


@styled
def angular_heatmap_figure(result: AngularResult, title: str = "") -> Any:
    """d(x_ℓ, x_ℓ+n) over start layer ℓ and block size n (Gromov et al.'s Fig. 2), with the block each n
    would drop (the smallest distance) marked."""
    import numpy as np

    blocks = result.blocks
    L, N = result.num_layers, int(blocks["block_size"].max())
    grid = np.full((N, L), np.nan)
    for row in blocks.itertuples():
        grid[row.block_size - 1, row.start_layer] = row.angular_distance
    width = width_for(L)
    fig, axes = figure(width, 2.8 if width == SINGLE_COLUMN else 4.2)
    ax = axes[0, 0]
    im = ax.imshow(grid, origin="lower", aspect="auto", cmap="viridis", vmin=0,
                   extent=(-0.5, L - 0.5, 0.5, N + 0.5), interpolation="nearest")
    ax.grid(False)
    best = [(int(np.nanargmin(grid[n])), n + 1) for n in range(N)  # (a row of ties has no least)
            if np.isfinite(grid[n]).sum() > 1 and np.nanmin(grid[n]) < np.nanmax(grid[n])]
    ax.plot([b[0] for b in best], [b[1] for b in best], ls="none", marker="o", ms=2.5 if N > 24 else 3.5,
            mfc="white", mec="black", mew=0.5, label="least-changing block of each size n")
    ax.set_xlabel("start layer ℓ")
    ax.set_ylabel("block size n (layers)")
    layer_axis(ax.xaxis, L)
    layer_axis(ax.yaxis, N)
    ax.set_title(wrap(title or "Angular distance of blocks of n layers", width - TITLE_INSET))
    fig.colorbar(im, ax=ax, label="angular distance $d(x_\\ell, x_{\\ell+n})$", fraction=0.05, pad=0.02)
    fig.legend(loc="outside lower center", handletextpad=0.3)
    return fig


def plot_angular_heatmap(result: AngularResult, stem: Path, title: str = "") -> list[Path]:
    """:func:`angular_heatmap_figure` as ``stem``.png (a glance) and .pdf (vector, for a paper)."""
    return save_figure(angular_heatmap_figure(result, title), stem)


# --- angular -------------------------------------------------------------------------------

def angular_table(result: AngularResult, title: str = "Angular distance per layer") -> Tables:
    """Each layer's distance to the next (with a bar), block influence, and the near-identity flag; with
    sub-layers measured, those of each asked unit kind side by side (:func:`units_table`)."""
    if not _only_blocks(result):
        return units_table(result, title)
    df = result.layers
    top = float(df["angular_distance"].max())
    distance, flags = [], []
    for row in df.itertuples():
        style = "red" if row.near_identity else "cyan"
        distance.append(f"{row.angular_distance:.4f} [{style}]{bar(row.angular_distance, top, 16)}[/{style}]")
        flags.append("[red]yes[/red]" if row.near_identity else "")
    return Tables(TableSpec(title, [Col("layer", [str(v) for v in df["layer"]])], [
        [Col("angular distance", distance, "left")],
        [Col("block infl.", [f"{v:.4f}" for v in df["block_influence"]]),
         Col(f"near-identity (< {result.threshold:g})", flags, "left")]]))


def units_table(result: AngularResult, title: str = "Angular distance per layer") -> Tables:
    """Per layer, each asked unit kind's distance over its own step (bars on one scale; ``*`` and red:
    near-identity) and block influence."""
    top = float(result.tidy()["angular_distance"].max())
    groups = []
    for unit, df in _by_unit(result).items():
        distance = [f"{d:.4f}{'*' if near else ' '} [{'red' if near else 'cyan'}]{bar(d, top, 8)}[/]"
                    for d, near in zip(df["angular_distance"], df["near_identity"], strict=True)]
        groups.append([Col(f"{unit} d", distance, "left"),
                       Col(f"{unit} BI", [f"{v:.4f}" for v in df["block_influence"]])])
    caption = (f"d: angular distance of the unit's own step (attn: x → x+a; mlp: x+a → x+a+m), * below "
               f"{result.threshold:g} (near-identity); BI: 1 − mean cosine")
    return Tables(TableSpec(title, [Col("layer", [str(v) for v in range(result.num_layers)])], groups,
                            caption=caption))


def angular_summary(result: AngularResult) -> str:
    """Which layers are near-identity, and (sub-layers measured) the most identity-like attention and MLP."""
    parts = []
    if "block" in result.units:
        near = result.near_identity()
        where = ", ".join(map(str, near)) if near else "none"
        parts.append(f"{len(near)} of {result.num_layers} layers are near-identity (angular distance < "
                     f"{result.threshold:g}): {where}. ")
    parts += [most_identity_like(result, kind) for kind in ("attn", "mlp") if kind in result.units]
    return "".join(parts) + f"Averaged over {result.tokens:,} tokens ({result.token_mode})."


def most_identity_like(result: AngularResult, kind: str) -> str:
    """A sentence naming the ``kind`` sub-layer (``attn``, ``mlp``) of least angular distance."""
    rows = result.sublayers[result.sublayers["unit"] == kind]
    if not len(rows):
        return ""
    best = rows.loc[rows["angular_distance"].astype(float).idxmin()]
    near = int(rows["near_identity"].astype(bool).sum())
    word = UNIT_WORDS[kind]
    return (f"The most identity-like {word} is {int(best['layer'])}.{kind} (d = {best['angular_distance']:.4f}, "
            f"BI = {best['block_influence']:.4f}); {near} of {len(rows)} {word} sub-layers are near-identity. ")


def _blocks_title(title: str) -> str:
    """The heatmap's title from the per-layer one (a command gives one title for both)."""
    per_layer = "Angular distance per layer"
    if not title or title.startswith(per_layer):
        return "Angular distance of blocks of n layers" + title.removeprefix(per_layer)
    return f"{title}: blocks of n layers"


def write_angular_report(result: AngularResult, out: Path, title: str = "") -> list[Path]:
    """angular.png/pdf (per layer) and angular_heatmap.png/pdf (per block): what a person reads."""
    files = plot_angular(result, out / "angular", title)
    return files + plot_angular_heatmap(result, out / "angular_heatmap", _blocks_title(title))
