"""Put the results of several runs side by side, layers aligned by relative depth.

A run is a result folder written by ``angular``, ``variance``, ``prune`` or ``reproduce``
(``angular.csv``, ``variance.csv``, ``prune.csv``, ``ppl_sweep.csv``, with ``meta.json``), or
a folder holding such folders (``results/<model>/``). Models of different depth (Llama's
32 layers, Qwen's 36, BERT's 24) are compared at the same *relative depth*: layer l of L
occupies the slice [l/L, (l+1)/L) of the stack, and each of ``bins`` equal slices gets the
average of the layers overlapping it, weighted by the overlap. With equal layer counts and
``bins = L`` this is the identity.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..errors import UserError
from ..model.load import model_slug
from ..runs import Timer, run_record

#: File, and the per-layer metrics compare takes from it.
SOURCES: dict[str, tuple[str, ...]] = {
    "angular.csv": ("angular_distance",),
    "variance.csv": ("variance", "update_ratio"),
}
TIDY_FILES = ("prune.csv", "ppl_sweep.csv")
#: Metrics best shown on a log scale.
LOG_METRICS = {"variance"}


@dataclass
class RunResults:
    """The per-layer metrics of one run: a long frame of (metric, layer, value)."""

    label: str
    folder: Path
    num_layers: int
    values: pd.DataFrame  # metric, layer, value
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def metrics(self) -> list[str]:
        return list(dict.fromkeys(self.values["metric"]))

    def series(self, metric: str) -> pd.DataFrame:
        part = self.values[self.values["metric"] == metric].sort_values("layer")
        return part.assign(rel_depth=(part["layer"] + 0.5) / self.num_layers)


def _read_csv(path: Path) -> pd.DataFrame:
    try:
        data = path.read_bytes()
        frame = pd.read_csv(io.BytesIO(data))
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise UserError(f"cannot read {path}: {str(exc).splitlines()[0][:200]}") from exc
    if data and not data.endswith(b"\n"):  # every table lnsdiag writes ends with one: a copy that stopped short
        raise UserError(f"{path} is truncated (its last line is cut off): copy it again, or rerun the command that "
                        "wrote it")
    if "unit" in frame:  # layers are compared as whole blocks; a sweep's sub-layer rows stay in its own report
        frame = frame[frame["unit"].isna() | (frame["unit"] == "block")].reset_index(drop=True)
    return frame


def _check_complete(path: Path, layers: pd.Series, expected: Any) -> None:
    """Refuse a table lacking layers its run's meta.json says it measured (a truncated copy)."""
    if not isinstance(expected, list) or not all(isinstance(i, int) for i in expected):
        return
    missing = sorted(set(expected) - {int(v) for v in layers.dropna()})
    if missing:
        shown = ", ".join(map(str, missing[:8])) + (", ..." if len(missing) > 8 else "")
        raise UserError(f"{path} is truncated: it lacks layer(s) {shown} that its meta.json lists; copy it again, "
                        "or rerun the command that wrote it")


def _meta(folder: Path) -> dict[str, Any]:
    path = folder / "meta.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {path}: not valid JSON") from exc


def _folders(folder: Path) -> list[Path]:
    """The folder itself if it holds results, else its immediate subfolders that do."""
    names = (*SOURCES, *TIDY_FILES)
    if any((folder / n).is_file() for n in names):
        return [folder]
    return sorted(sub for sub in folder.iterdir() if sub.is_dir() and any((sub / n).is_file() for n in names))


def _tidy_metrics(frame: pd.DataFrame, path: Path) -> pd.DataFrame:
    """A prune-style tidy frame as (metric, layer, value): retention (% of baseline) per task/metric."""
    needed = {"removed_layer", "task", "metric", "value", "baseline"}
    if not needed <= set(frame.columns):
        raise UserError(f"{path} lacks columns {', '.join(sorted(needed - set(frame.columns)))}")
    layers = pd.to_numeric(frame["removed_layer"], errors="coerce")
    part = frame[layers.notna()].assign(layer=layers[layers.notna()].astype(int))
    if "retention" in part.columns:
        value = part["retention"].astype(float)
    else:
        value = 100.0 * part["value"].astype(float) / part["baseline"].astype(float)
    return pd.DataFrame({"metric": [f"{t}/{m} retention %" for t, m in zip(part["task"], part["metric"],
                                                                            strict=True)],
                         "layer": part["layer"].to_numpy(), "value": value.to_numpy()})


def load_run(folder: str | Path, label: str | None = None) -> RunResults:
    """Read every result file of one run (a result folder or a model's results folder)."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise UserError(f"no such result folder: {folder}")
    found = _folders(folder)
    if not found:
        raise UserError(f"{folder} holds no angular.csv, variance.csv, prune.csv or ppl_sweep.csv "
                        "(give the folder a command wrote)")
    parts: list[pd.DataFrame] = []
    meta: dict[str, Any] = {}
    counts: list[int] = []
    for sub in found:
        sub_meta = _meta(sub)
        meta = meta or sub_meta
        if isinstance(sub_meta.get("num_layers"), int):
            counts.append(sub_meta["num_layers"])
        for name, metrics in SOURCES.items():
            path = sub / name
            if not path.is_file():
                continue
            frame = _read_csv(path)
            missing = {"layer", *metrics} - set(frame.columns)
            if missing:
                raise UserError(f"{path} lacks columns {', '.join(sorted(missing))}")
            if name == "angular.csv" and isinstance(sub_meta.get("num_layers"), int):
                _check_complete(path, frame["layer"], list(range(sub_meta["num_layers"])))
            if name == "variance.csv":  # the extra last row is the final output, not a layer
                last = int(frame["layer"].max())
                counts.append(last)
                frame = frame[frame["layer"] < last]
            else:
                counts.append(int(frame["layer"].max()) + 1)
            for metric in metrics:
                parts.append(pd.DataFrame({"metric": metric, "layer": frame["layer"].astype(int),
                                           "value": frame[metric].astype(float)}))
        for name in TIDY_FILES:
            path = sub / name
            if path.is_file():
                table = _read_csv(path)
                tidy = _tidy_metrics(table, path)
                if name == "prune.csv":
                    removed = pd.to_numeric(table["removed_layer"], errors="coerce")
                    _check_complete(path, removed, sub_meta.get("layers"))
                if len(tidy):
                    counts.append(int(tidy["layer"].max()) + 1)
                parts.append(tidy)
    if len(found) > 1:
        seen = [set(p["metric"]) for p in parts]
        if any(a & b for i, a in enumerate(seen) for b in seen[i + 1:]):
            raise UserError(f"{folder} holds several runs with the same results; pass their folders separately")
    values = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=["metric", "layer", "value"])
    if values.empty:
        raise UserError(f"{folder}: its result files hold no per-layer rows")
    model = meta.get("model") if isinstance(meta.get("model"), dict) else {}
    name = label or model.get("label") or model.get("name") or folder.name
    name = Path(str(name)).name if "/" in str(name) and Path(str(name)).exists() else str(name)
    return RunResults(label=name, folder=folder, num_layers=max(counts), values=values, meta=meta)


def resample(values: Sequence[float], bins: int) -> list[float]:
    """Average per-layer ``values`` onto ``bins`` equal slices of depth, weighted by overlap.

    Layer l of L covers [l/L, (l+1)/L); NaN layers are left out of the average.
    """
    L = len(values)
    if L == 0 or bins < 1:
        raise ValueError("need at least one layer and one bin")
    out = []
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        total = weight = 0.0
        for layer, value in enumerate(values):
            overlap = min(hi, (layer + 1) / L) - max(lo, layer / L)
            if overlap > 1e-12 and not (isinstance(value, float) and math.isnan(value)):
                total += overlap * float(value)
                weight += overlap
        out.append(total / weight if weight else math.nan)
    return out


@dataclass
class Comparison:
    """Several runs' per-layer metrics on one relative-depth grid."""

    runs: list[RunResults]
    bins: int
    table: pd.DataFrame  # bin, depth_from, depth_to, then "<metric> | <run>" columns

    @property
    def metrics(self) -> list[str]:
        return list(dict.fromkeys(m for run in self.runs for m in run.metrics))

    def columns(self, metric: str) -> list[str]:
        return [c for c in self.table.columns if c.startswith(f"{metric} | ")]


def _unique_labels(runs: list[RunResults]) -> None:
    seen: dict[str, int] = {}
    for run in runs:
        base = run.label
        seen[base] = seen.get(base, 0) + 1
        if seen[base] > 1:
            run.label = f"{base} ({seen[base]})"


def compare_runs(runs: Sequence[RunResults], bins: int | None = None) -> Comparison:
    """Align runs by relative depth; ``bins`` defaults to the smallest layer count."""
    runs = list(runs)
    if len(runs) < 1:
        raise UserError("nothing to compare: give at least one result folder")
    _unique_labels(runs)
    bins = bins if bins is not None else min(r.num_layers for r in runs)
    if bins < 1:
        raise UserError(f"--bins must be at least 1, not {bins}")
    table = pd.DataFrame({"bin": range(bins), "depth_from": [b / bins for b in range(bins)],
                          "depth_to": [(b + 1) / bins for b in range(bins)]})
    metrics = list(dict.fromkeys(m for run in runs for m in run.metrics))
    for metric in metrics:
        for run in runs:
            if metric not in run.metrics:
                continue
            per_layer = np.full(run.num_layers, np.nan)
            series = run.series(metric)
            per_layer[series["layer"].to_numpy()] = series["value"].to_numpy()
            table[f"{metric} | {run.label}"] = resample(per_layer.tolist(), bins)
    return Comparison(runs=runs, bins=bins, table=table)


def _reproduce_twins(path: Path) -> list[Path]:
    """The per-model folders of a ``reproduce`` result, in the order it trained them."""
    if not (path / "reproduce.csv").is_file():
        return []
    order = _meta(path).get("norms") or sorted(p.name for p in path.iterdir() if p.is_dir())
    return [path / n for n in order if (path / n).is_dir() and _folders(path / n)]


def compare_folders(folders: Sequence[str | Path], labels: Sequence[str] | None = None,
                    bins: int | None = None) -> Comparison:
    """:func:`load_run` each folder (with its label, if given), then :func:`compare_runs`."""
    if labels and len(labels) != len(folders):
        raise UserError(f"{len(labels)} --label given for {len(folders)} folders: give one per folder or none")
    runs: list[RunResults] = []
    for i, folder in enumerate(folders):
        path = Path(folder).expanduser()
        twins = _reproduce_twins(path)
        if twins:  # a `reproduce` folder: one run per trained model
            runs += [load_run(t, f"{labels[i]} {t.name}" if labels else None) for t in twins]
        else:
            runs.append(load_run(path, labels[i] if labels else None))
    return compare_runs(runs, bins)


@dataclass(frozen=True)
class CompareConfig:
    """What ``lnsdiag compare`` puts side by side: result folders, a label per folder (or none:
    the models' names), and the number of depth slices (None: the smallest layer count)."""

    folders: tuple[Path, ...]
    labels: tuple[str, ...] | None = None
    bins: int | None = None

    def __post_init__(self) -> None:
        if not self.folders:
            raise UserError("no result folders given: lnsdiag compare FOLDER [FOLDER ...]")
        object.__setattr__(self, "folders", tuple(Path(f) for f in self.folders))
        object.__setattr__(self, "labels", tuple(self.labels) if self.labels else None)


@dataclass(frozen=True)
class CompareRun:
    """A ``compare`` run: the aligned runs, and the JSON record of how it was made (``meta.json``)."""

    comparison: Comparison
    meta: dict[str, Any]

    @property
    def slug(self) -> str:
        """A folder name naming the runs compared (``A-vs-B``)."""
        return "-vs-".join(model_slug(r.label) for r in self.comparison.runs)[:120] or "runs"


def run(config: CompareConfig, *, timer: Timer | None = None) -> CompareRun:
    """Read and align the folders' results, and record how (``lnsdiag compare``)."""
    timer = timer or Timer()
    with timer("load"):
        comparison = compare_folders(config.folders, config.labels, config.bins)
    meta = run_record(
        "compare", model=None, bins=comparison.bins,
        runs=[{"label": r.label, "folder": str(r.folder), "num_layers": r.num_layers, "metrics": r.metrics,
               "model": r.meta.get("model")} for r in comparison.runs],
        timings={**timer.seconds, "total": timer.total()},
    )
    return CompareRun(comparison, meta)
