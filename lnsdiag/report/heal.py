"""What healing did, in words: each strategy's loss without and with the heal (the healed tables and
dashed curves are :mod:`.shrink`'s, drawn from :func:`~.shrink.healed_rows`)."""

from __future__ import annotations

import pandas as pd

from ..results.verdict import headline_metrics
from ..runners.shrink_table import strategies_in
from .shrink import delta_text, delta_unit, finite, metric_name


def heal_summary(frame: pd.DataFrame, healed: pd.DataFrame, tasks: list[str]) -> list[str]:
    """Per headline metric and heal: each strategy's Δ at its largest n without and with the heal, and how
    much of the loss the heal recovered ("+3.8% → +1.2%"); every n is in shrink.csv."""
    if healed is None or healed.empty:
        return []
    lines = []
    for method, rows in healed.groupby("heal", sort=False):
        for task, metric in headline_metrics(frame, tasks):
            parts = []
            for strategy in strategies_in(rows):
                mine = rows[(rows["strategy"] == strategy) & (rows["task"] == task) & (rows["metric"] == metric)]
                if mine.empty:
                    continue
                n = int(mine["n_removed"].max())
                after = mine[mine["n_removed"] == n].iloc[0]
                plain = frame[(frame["strategy"] == strategy) & (frame["n_removed"] == n) & (frame["task"] == task)
                              & (frame["metric"] == metric)]
                if plain.empty:
                    continue
                before = plain.iloc[0]
                unit, _ = delta_unit(metric, before["baseline"])
                kept = ""
                if finite(before["delta"]) and finite(after["delta"]) and float(before["delta"]) != 0:
                    kept = f", {100 * (1 - float(after['delta']) / float(before['delta'])):.0f}% of the loss recovered"
                was = delta_text(before["delta"], metric, before["baseline"])
                now = delta_text(after["delta"], metric, after["baseline"])
                parts.append(f"{strategy} n = {n}: {was} → {now}{unit} ({after['verdict']}{kept})")
            if parts:
                lines.append(f"{metric_name(task, metric)} healed ({method}), Δ to the full model without → "
                             "with the heal: " + "; ".join(parts) + ".")
    return lines
