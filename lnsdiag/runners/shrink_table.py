"""The shape of ``shrink``'s table: its columns, its rows by strategy and n, and the CSVs made of it.

The table is tidy: one row per (strategy, n_removed, task, metric), the full model's rows under strategy
``full`` with n_removed 0, each strategy keeping its own rows even when two pick the same layers. The
runner writes it (shrink.csv, shrink_wide.csv) and the report draws it; both read it through this module,
which is plain data (no torch), like the strategy registry whose order it follows.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from ..interventions.units import Removal
from .strategies import output_order

#: The strategy name of the full model's rows.
FULL = "full"
#: shrink.csv's columns, in this order (any others the computation adds follow them).
COLUMNS = ["strategy", "n_removed", "removed_layers", "unit", "heal", "task", "metric", "value", "stderr", "baseline",
           "baseline_stderr", "delta", "delta_stderr", "paired", "ci90_low", "ci90_high", "ci95_low", "ci95_high",
           "margin", "p_value", "p_holm", "verdict", "retention", "chance", "higher_is_better", "group", "samples",
           "selection", "params_removed_pct", "flops_saved_pct"]


def layer_list(text: Any) -> list[int]:
    """The removed layers of a row, whatever a reader made of the column ("3,4,7", 31 or 31.0, NaN for none)."""
    return list(Removal.from_cell(text).blocks)


def layers_text(value: Any) -> str:
    """The comma-joined list as written, whatever a reader made of it (31 or 31.0 from a CSV, NaN for none)."""
    return value if isinstance(value, str) else Removal.from_cell(value).cell


def is_full(frame: pd.DataFrame) -> pd.Series:
    """Which rows are the full model's."""
    return (frame["strategy"] == FULL) | (frame["n_removed"] == 0)


def strategies_in(frame: pd.DataFrame) -> list[str]:
    """The strategies present, in the registry's order (an explicit set last), then any others as they come."""
    present = [s for s in pd.unique(frame.loc[~is_full(frame), "strategy"]) if isinstance(s, str)]
    order = output_order()
    return [s for s in order if s in present] + [s for s in present if s not in order]


def strategy_rows(frame: pd.DataFrame) -> list[tuple[str, int, str, pd.DataFrame]]:
    """(strategy, n, removed layers, its rows): the full model first, then each strategy by n."""
    full = is_full(frame)
    out = []
    if full.any():
        out.append((FULL, 0, "", frame[full]))
    for strategy in strategies_in(frame):
        sel = frame[(frame["strategy"] == strategy) & ~full]
        for n, part in sorted(sel.groupby("n_removed", sort=False), key=lambda kv: int(kv[0])):
            out.append((strategy, int(n), layers_text(part["removed_layers"].iloc[0]), part))
    return out


def metric_row(part: pd.DataFrame, task: str, metric: str) -> pd.Series | None:
    """The row of ``task``/``metric`` among one (strategy, n)'s rows, if it has one."""
    sel = part[(part["task"] == task) & (part["metric"] == metric)]
    return None if sel.empty else sel.iloc[0]


def tidy_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """shrink.csv: :data:`COLUMNS` first, ``removed_layers`` as text (so "3,4,7" and "31" read back alike)."""
    if "heal" not in frame:  # a frame built without the column: its rows are unhealed
        frame = frame.assign(heal="none")
    if "unit" not in frame:  # built before sub-layers: the kind its removal says
        frame = frame.assign(unit=[Removal.from_cell(v).kind or None for v in frame["removed_layers"]])
    for column in ("params_removed_pct", "flops_saved_pct"):  # not measured by whoever built it
        if column not in frame:
            frame = frame.assign(**{column: math.nan})
    out = frame[[c for c in COLUMNS if c in frame] + [c for c in frame if c not in COLUMNS]].copy()
    out["removed_layers"] = pd.array([layers_text(v) for v in out["removed_layers"]], dtype=object)
    return out


def wide_shrink_frame(frame: pd.DataFrame, tasks: list[str]) -> pd.DataFrame:
    """One row per (strategy, n_removed), the full model first: ``task/metric`` value, stderr, Δ, its paired
    stderr and the verdict, for spreadsheets."""
    table = strategy_rows(frame)
    wide = pd.DataFrame({"strategy": [s for s, _, _, _ in table], "n_removed": [n for _, n, _, _ in table],
                         "removed_layers": pd.array([layers for _, _, layers, _ in table], dtype=object)})
    for column in ("unit", "params_removed_pct", "flops_saved_pct"):  # its kind; what it saves, beside what it costs
        if column in frame:
            wide[column] = [part[column].iloc[0] for _, _, _, part in table]
    sel = frame[frame["task"].isin(tasks)]
    for (task, metric), _ in sel.groupby(["task", "metric"], sort=False):
        for column, suffix in (("value", ""), ("stderr", "_stderr"), ("delta", "_delta"),
                               ("delta_stderr", "_delta_stderr"), ("verdict", "_verdict")):
            cells = []
            for _s, _n, _l, part in table:
                r = metric_row(part, task, metric)
                cells.append(None if r is None else r[column])
            wide[f"{task}/{metric}{suffix}"] = pd.array(cells, dtype=object) if suffix == "_verdict" else \
                pd.to_numeric(pd.Series(cells, dtype=object), errors="coerce")
    return wide


def read_shrink(path: str | Path) -> pd.DataFrame:
    """shrink.csv as written, ``removed_layers`` kept as text ("3,4,7"; "" for the full model)."""
    frame = pd.read_csv(path, dtype={"removed_layers": str, "strategy": str, "task": str, "metric": str,
                                     "verdict": str}, keep_default_na=True)
    frame["removed_layers"] = frame["removed_layers"].fillna("").astype(object)
    return frame
