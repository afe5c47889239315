"""Angular-distance report: table, summary, CSVs, per-layer plot and block heatmap."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.table import Table

from ..angular import AngularResult
from ..runs import write_csv, write_json
from .common import bar, pyplot, save_figure


def plot_angular(result: AngularResult, stem: Path, title: str = "") -> list[Path]:
    """Angular distance of each layer to the next, threshold dashed, near-identity marked."""
    plt = pyplot()
    df = result.layers
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot(df["layer"], df["angular_distance"], marker="o", ms=3, lw=1.4, label=r"$d(x_l, x_{l+1})$")
    dead = df[df["near_identity"]]
    ax.scatter(dead["layer"], dead["angular_distance"], color="tab:red", zorder=3, s=18,
               label=f"near-identity (< {result.threshold:g})")
    ax.axhline(result.threshold, color="tab:red", ls="--", lw=0.8)
    ax.set_xlabel("layer l (0-based)")
    ax.set_ylabel("angular distance  arccos(cos)/π")
    ax.set_ylim(bottom=0)
    ax.set_title(title or f"Angular distance per layer ({result.token_mode} tokens, n={result.tokens:,})")
    ax.legend(frameon=False, fontsize=8)
    return save_figure(fig, stem)


def plot_angular_heatmap(result: AngularResult, stem: Path, title: str = "") -> list[Path]:
    """d(x_l, x_{l+n}) over start layer l and block size n (Gromov et al.; the paper's Fig. 2)."""
    import numpy as np

    plt = pyplot()
    blocks = result.blocks
    L, N = result.num_layers, int(blocks["block_size"].max())
    grid = np.full((N, L), np.nan)
    for row in blocks.itertuples():
        grid[row.block_size - 1, row.start_layer] = row.angular_distance
    fig, ax = plt.subplots(figsize=(6, 3.6))
    im = ax.imshow(grid, origin="lower", aspect="auto", cmap="viridis", vmin=0,
                   extent=(-0.5, L - 0.5, 0.5, N + 0.5), interpolation="nearest")
    ax.grid(False)
    ax.set_xlabel("start layer l")
    ax.set_ylabel("block size n")
    ax.set_title(title or "Angular distance d(x_l, x_{l+n})")
    fig.colorbar(im, ax=ax, label="arccos(cos)/π")
    return save_figure(fig, stem)


# --- angular -------------------------------------------------------------------------------

def angular_table(result: AngularResult, title: str = "Angular distance per layer") -> Table:
    table = Table(title=title, title_justify="left", header_style="bold")
    table.add_column("layer", justify="right")
    table.add_column("angular dist.", justify="right")
    table.add_column("", no_wrap=True)
    table.add_column("block infl.", justify="right")
    table.add_column("", no_wrap=True)
    top = float(result.layers["angular_distance"].max())
    for row in result.layers.itertuples():
        flag = "[red]near-identity[/red]" if row.near_identity else ""
        style = "red" if row.near_identity else "cyan"
        table.add_row(str(row.layer), f"{row.angular_distance:.4f}",
                      f"[{style}]{bar(row.angular_distance, top)}[/{style}]",
                      f"{row.block_influence:.4f}", flag)
    return table


def angular_summary(result: AngularResult) -> str:
    near = result.near_identity()
    n = result.num_layers
    where = ", ".join(map(str, near)) if near else "none"
    return (f"{len(near)} of {n} layers are near-identity (angular distance < {result.threshold:g}): {where}. "
            f"Averaged over {result.tokens:,} tokens ({result.token_mode}).")


def write_angular(result: AngularResult, out: Path, meta: dict[str, Any], title: str = "") -> list[Path]:
    """angular.csv, angular_blocks.csv, meta.json, angular.png/pdf, angular_heatmap.png/pdf."""
    files = [
        write_csv(out / "angular.csv", result.layers),
        write_csv(out / "angular_blocks.csv", result.blocks),
    ]
    files += plot_angular(result, out / "angular", title)
    files += plot_angular_heatmap(result, out / "angular_heatmap", title)
    files.append(write_json(out / "meta.json", meta))
    return files
