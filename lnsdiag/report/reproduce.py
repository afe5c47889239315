"""Pre-LN vs LNS report: one summary table, layers side by side, overlay plots, per-model folders."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
from rich.table import Table

from ..reproduce import ReproduceResult
from ..runs import atomic_write, write_csv, write_json
from .common import bar, frame_to_latex, pyplot, save_figure

_COLORS = {"pre-ln": "tab:blue", "lns": "tab:orange", "post-ln": "tab:green"}


def reproduce_table(result: ReproduceResult, title: str = "") -> Table:
    """One row per model: what the paper compares."""
    table = Table(title=title or "Pre-LN vs LayerNorm Scaling", title_justify="left", header_style="bold")
    for name in ("model", "placement", "params", "train loss", "held-out ppl", "deep-half ang. dist.",
                 "near-identity", "var. growth", "deep ‖f(x)‖/‖x‖", "deep removal Δppl", "dead layers"):
        table.add_column(name, justify="left" if name in ("model", "placement") else "right")
    best = min(r.perplexity for r in result.runs)
    for row in result.summary().itertuples():
        ppl = f"{row.heldout_ppl:.2f}"
        table.add_row(row.model, row.placement, f"{row.parameters / 1e6:.1f}M", f"{row.final_train_loss:.3f}",
                      f"[bold]{ppl}[/bold]" if row.heldout_ppl == best else ppl, f"{row.deep_angular:.3f}",
                      str(row.near_identity_layers), f"×{row.variance_growth:.3g}", f"{row.deep_update_ratio:.3f}",
                      f"{row.deep_removal_ppl_increase_pct:+.1f}%", str(row.dead_layers))
    return table


def reproduce_layers_table(result: ReproduceResult) -> Table:
    """Each layer's angular distance and removal cost, the models side by side."""
    frame = result.layers()
    table = Table(title="Per layer (held-out text)", title_justify="left", header_style="bold")
    table.add_column("layer", justify="right")
    top = max(float(frame[f"angular_{r.norm}"].max()) for r in result.runs)
    for run in result.runs:
        table.add_column(f"ang. {run.label}", justify="right")
        table.add_column("", no_wrap=True)
    for run in result.runs:
        table.add_column(f"Δppl {run.label}", justify="right")
    for i, row in frame.iterrows():
        cells = [str(int(row["layer"]))]
        for run in result.runs:
            value = float(row[f"angular_{run.norm}"])
            color = _COLORS.get(run.norm, "tab:gray").removeprefix("tab:")
            cells += [f"{value:.3f}", f"[{color}]{bar(value, top, 14)}[/{color}]"]
        cells += [f"{float(frame.at[i, f'ppl_increase_pct_{run.norm}']):+.1f}%" for run in result.runs]
        table.add_row(*cells)
    return table


def plot_reproduce(result: ReproduceResult, stem: Path, title: str = "") -> list[Path]:
    """Four panels, models overlaid: training loss, variance (log), angular distance, removal cost."""
    plt = pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(9, 6))
    (loss_ax, var_ax), (ang_ax, ppl_ax) = axes
    frame = result.layers()
    for run in result.runs:
        color = _COLORS.get(run.norm)
        curve = run.record.get("train", {}).get("loss_every_10_steps") or []
        loss_ax.plot([10 * i + 1 for i in range(len(curve))], curve, color=color, lw=1.2, label=run.label,
                     marker="o" if len(curve) < 30 else None, ms=3)
        var = run.variance.layers
        var_ax.plot(var["layer"], var["variance"], marker="o", ms=3, color=color, label=run.label)
        ang_ax.plot(frame["layer"], frame[f"angular_{run.norm}"], marker="o", ms=3, color=color, label=run.label)
        ppl_ax.plot(frame["layer"], frame[f"ppl_increase_pct_{run.norm}"], marker="o", ms=3, color=color,
                    label=run.label)
    loss_ax.set(xlabel="step", ylabel="training loss", title="Training loss")
    var_ax.set_yscale("log")
    var_ax.set(xlabel="layer l (last = output before final norm)", ylabel="variance of $x_l$ (log)",
               title="Residual stream variance")
    ang_ax.set(xlabel="layer l", ylabel="arccos(cos)/π", title=r"Angular distance $d(x_l, x_{l+1})$")
    ang_ax.set_ylim(bottom=0)
    ppl_ax.axhline(0, color="black", lw=0.8)
    ppl_ax.set(xlabel="removed layer", ylabel="perplexity increase (%)", title="Cost of removing one layer")
    ppl_ax.set_yscale("symlog", linthresh=1.0)
    from matplotlib.ticker import MaxNLocator

    for ax in axes.flat:
        ax.legend(frameon=False, fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    spec = result.spec
    fig.suptitle(title or f"{spec.layers} layers, hidden {spec.hidden}, {spec.steps} steps — held-out: "
                 f"{result.eval_text}", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, stem)


def _twin_meta(result: ReproduceResult, run: Any, meta: dict[str, Any]) -> dict[str, Any]:
    return {**{k: v for k, v in meta.items() if k not in ("models", "summary")},
            "command": "reproduce",
            "model": {"name": run.name, "label": run.label, "source": str(run.path), "norm": run.norm,
                      "parameters": run.parameters},
            "num_layers": run.num_layers, "norm_placement": run.placement, "train": run.record,
            "heldout_perplexity": run.perplexity}


def write_reproduce(result: ReproduceResult, out: Path, meta: dict[str, Any], title: str = "") -> list[Path]:
    """reproduce.csv (summary), reproduce_layers.csv, reproduce.tex, reproduce.png/pdf, meta.json, and one
    folder per model (angular.csv, angular_blocks.csv, variance.csv, ppl_sweep.csv, meta.json) for ``compare``."""
    summary = result.summary()
    files = [write_csv(out / "reproduce.csv", summary), write_csv(out / "reproduce_layers.csv", result.layers())]
    latex = summary[["model", "heldout_ppl", "deep_angular", "near_identity_layers", "variance_growth",
                     "deep_removal_ppl_increase_pct"]].rename(columns={
                         "heldout_ppl": "held-out ppl", "deep_angular": "deep ang. dist.",
                         "near_identity_layers": "near-identity", "variance_growth": "var. growth",
                         "deep_removal_ppl_increase_pct": "deep removal Δppl %"})
    files.append(atomic_write(out / "reproduce.tex", frame_to_latex(
        pd.DataFrame(latex), caption="Models trained identically but for the norm, on held-out text.",
        label="tab:pre-ln-vs-lns")))
    files += plot_reproduce(result, out / "reproduce", title)
    for run in result.runs:
        sub = out / run.norm
        sub.mkdir(parents=True, exist_ok=True)
        files += [write_csv(sub / "angular.csv", run.angular.layers),
                  write_csv(sub / "angular_blocks.csv", run.angular.blocks),
                  write_csv(sub / "variance.csv", run.variance.layers),
                  write_csv(sub / "ppl_sweep.csv", run.sweep),
                  write_json(sub / "meta.json", _twin_meta(result, run, meta))]
    files.append(write_json(out / "meta.json", meta))
    return files
