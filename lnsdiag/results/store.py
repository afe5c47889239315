"""The resumable result store of a sweep: one folder, its settings, one file per finished variant.

A run's folder holds ``settings.json`` (everything that changes the numbers: the fingerprint)
and one JSON file per finished variant under ``variants/``, each written atomically the
moment it is done and named by what it removes (:attr:`~lnsdiag.interventions.units.Removal.name`:
``baseline.json``, ``layer_007.json``, ``layers_003_004_007.json``). Rerunning the same command
scores only what is missing; a folder made with other settings is refused, not mixed.
"""

from __future__ import annotations

import gzip
import json
import math
import shutil
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from ..distributed import is_main, on_main
from ..errors import UserError
from ..interventions.units import Removal
from ..runs import atomic_write, jsonable, read_json, write_json
from ..scoring.base import Documents, MetricRow, PairedUnits, Scores, units_from_json, units_to_json

#: The fast engine's partial results while a pass runs.
CHECKPOINT_NAME = "engine-partial.npz"


@dataclass
class VariantResult:
    """The scores of the model without ``removal`` (empty: the full model). Its JSON keeps the
    removal under ``removed_layer`` (``null``, a block, or a list), as every stored folder has it."""

    removal: Removal
    rows: list[MetricRow]
    seconds: float
    engine: str = "naive"
    finished: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    units: dict[str, PairedUnits] = field(default_factory=dict)
    documents: Documents = field(default_factory=dict)
    choices: dict[str, dict[Any, int]] = field(default_factory=dict)
    aggregations: dict[tuple[str, str], str] = field(default_factory=dict)
    groups: dict[str, list[str]] = field(default_factory=dict)

    @classmethod
    def of(cls, removal: Removal, scores: Scores, seconds: float, engine: str) -> VariantResult:
        return cls(removal, scores.rows, seconds, engine, units=scores.units, documents=scores.documents,
                   choices=scores.choices, aggregations=scores.aggregations, groups=scores.groups)

    def to_json(self) -> dict[str, Any]:
        return {"removed_layer": self.removal.to_json(), "seconds": round(self.seconds, 3), "engine": self.engine,
                "finished": self.finished, "metrics": [r.as_dict() for r in self.rows],
                "paired_units": units_to_json(self.units),
                "documents": [{"task": task, "metric": metric, "aggregation": self.aggregations.get((task, metric)),
                               "ids": list(items), "items": list(items.values())}
                              for (task, metric), items in self.documents.items()],
                "choices": {task: {"ids": list(per), "n": list(per.values())} for task, per in self.choices.items()},
                "groups": self.groups}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> VariantResult:
        rows = [MetricRow(**{**r, "stderr": math.nan if r["stderr"] is None else r["stderr"]})
                for r in data["metrics"]]
        units = units_from_json(data.get("paired_units") or _legacy_units(data))
        documents = {(d["task"], d["metric"]): dict(zip(d["ids"], map(_item, d["items"]), strict=True))
                     for d in data.get("documents", [])}
        choices = {task: dict(zip(c["ids"], c["n"], strict=True)) for task, c in data.get("choices", {}).items()}
        aggregations = {(d["task"], d["metric"]): d["aggregation"] for d in data.get("documents", [])
                        if d.get("aggregation")}
        return cls(Removal.from_json(data["removed_layer"]), rows, data["seconds"], data.get("engine", "naive"),
                   data["finished"], units, documents, choices, aggregations, data.get("groups", {}))

    def sample_rows(self) -> list[dict[str, Any]]:
        """One row per (task, metric, document): the per-document scores, for anyone to re-analyse.

        ``value`` is the document's score when it is a number; ``item`` the JSON of an item that
        is not (lm-eval's ``(loglikelihood, words)`` for perplexities); then each task's paired
        units as their scorer exports them (the built-in perplexity's windows).
        """
        rows = []
        for (task, metric), items in self.documents.items():
            per_choice = self.choices.get(task, {})
            for doc, item in items.items():
                scalar = isinstance(item, (int, float)) and not isinstance(item, bool)
                rows.append({"task": task, "metric": metric, "doc_id": doc, "value": float(item) if scalar else None,
                             "item": "" if scalar else json.dumps(item, default=jsonable),
                             "choices": per_choice.get(doc)})
        for task, units in self.units.items():
            rows += units.sample_rows(task)
        return rows


def _legacy_units(data: dict[str, Any]) -> dict[str, Any]:
    """Variant files written before paired units were generic kept the built-in perplexity's
    windows under ``ppl_windows``."""
    windows = data.get("ppl_windows")
    return {"ppl": {"kind": "token_windows", **windows}} if windows else {}


def _item(value: Any) -> Any:
    """A per-document item as lm-eval made it (JSON turns its tuples into lists)."""
    return tuple(_item(v) for v in value) if isinstance(value, list) else value


class ResultStore:
    """A run folder: ``settings.json`` plus ``variants/<name>.json`` per finished variant.

    ``settings`` is the fingerprint: a folder whose stored settings differ in any key is
    refused once it holds a variant. ``outputs`` are the files a previous run wrote there,
    removed with everything else by ``fresh``.
    """

    def __init__(self, folder: Path, settings: dict[str, Any], *, fresh: bool = False,
                 outputs: Sequence[str] = (), samples: bool = True) -> None:
        self.folder = Path(folder)
        self.variants = self.folder / "variants"
        self.samples = self.folder / "samples" if samples else None
        self.settings = settings
        self.checkpoint = self.folder / CHECKPOINT_NAME
        self._parsed: dict[Path, tuple[tuple[int, int], VariantResult]] = {}
        #: results this rank holds but rank 0 writes (under a launcher), so ``done`` never waits for a file
        self._held: dict[Removal, VariantResult] = {}
        # Under a launcher rank 0 alone prepares the folder; the others wait for it (and share its error).
        on_main(lambda: self._prepare(fresh, outputs, samples))

    def _prepare(self, fresh: bool, outputs: Sequence[str], samples: bool) -> None:
        settings_path = self.folder / "settings.json"
        if fresh:  # everything a previous run left: stored variants, partial pass, cached angles, outputs
            shutil.rmtree(self.variants, ignore_errors=True)
            shutil.rmtree(self.folder / "samples", ignore_errors=True)
            for name in ("settings.json", *outputs):
                (self.folder / name).unlink(missing_ok=True)
            for partial in partial_files(self.checkpoint):
                partial.unlink(missing_ok=True)
        if settings_path.is_file():
            self._check_compatible(read_settings(settings_path))
        if not samples:  # an earlier run's export would no longer match the variants
            shutil.rmtree(self.folder / "samples", ignore_errors=True)
        self.variants.mkdir(parents=True, exist_ok=True)
        write_json(settings_path, self.settings)

    def differing(self, stored: dict[str, Any]) -> list[str]:
        """The settings in which ``stored`` (another run's settings.json) differs from this store's."""
        return settings_differ(self.settings, stored)

    def _check_compatible(self, stored: dict[str, Any]) -> None:
        differ = self.differing(stored)
        if differ and any(self.variants.glob("*.json")):
            what = "; ".join(f"{k}: {stored.get(k)!r} there, {self.settings.get(k)!r} now" for k in differ[:3])
            raise UserError(
                f"{self.folder} holds a sweep made with other settings ({what}); rerun with --fresh to replace it "
                "or --out DIR to keep both"
            )

    def done(self) -> dict[Removal, VariantResult]:
        """Every finished variant on disk, by what it removes. A file is parsed again only when it
        changed (a sweep asks after each variant, and each file carries its per-document scores)."""
        out: dict[Removal, VariantResult] = {}
        for path in sorted(self.variants.glob("*.json")):
            stat = path.stat()
            stamp = (stat.st_mtime_ns, stat.st_size)
            cached = self._parsed.get(path)
            if cached is None or cached[0] != stamp:
                try:
                    cached = (stamp, VariantResult.from_json(read_json(path)))
                except (ValueError, KeyError, TypeError):
                    continue  # a foreign or damaged file is rescored, never trusted
                self._parsed[path] = cached
            out[cached[1].removal] = cached[1]
        return {**self._held, **out}

    def has(self, removal: Removal) -> bool:
        """Whether the variant's file is on disk (here)."""
        return (self.variants / f"{removal.name}.json").is_file()

    def hold(self, result: VariantResult) -> None:
        """Count ``result`` as done without reading it from disk (another rank wrote it)."""
        self._held[result.removal] = result

    def save(self, result: VariantResult, *, any_rank: bool = False) -> Path:
        """Store a finished variant (and export its per-document scores, unless turned off).

        Under a launcher only rank 0 writes, unless ``any_rank`` (each rank saving the variants
        it scored itself); another rank keeps the result in memory, where :meth:`done` finds it.
        """
        name = result.removal.name
        if not any_rank and not is_main():
            self._held[result.removal] = result
            return self.variants / f"{name}.json"
        if self.samples is not None:
            rows = result.sample_rows()
            if rows:
                self.samples.mkdir(exist_ok=True)
                frame = pd.DataFrame(rows, columns=["task", "metric", "doc_id", "value", "item", "choices"])
                text = frame.to_csv(index=False, float_format="%.10g", lineterminator="\n")
                atomic_write(self.samples / f"{name}.csv.gz", gzip.compress(text.encode("utf-8"), mtime=0))
        return write_json(self.variants / f"{name}.json", result.to_json())


def settings_differ(settings: Mapping[str, Any], stored: Mapping[str, Any]) -> list[str]:
    """The keys in which two runs' settings (``settings.json`` fingerprints) differ."""
    keys = list(dict.fromkeys([*settings, *stored]))
    return [k for k in keys if json.dumps(stored.get(k), sort_keys=True, default=str)
            != json.dumps(settings.get(k), sort_keys=True, default=str)]


def read_settings(path: str | Path, what: str = "--out") -> dict[str, Any]:
    """A run folder's ``settings.json``; one that cannot be read (a run cut off while writing it, an
    edit) is a :class:`~lnsdiag.errors.UserError` naming it, not a JSON traceback. ``what`` is the option
    that chose the folder, for the message."""
    path = Path(path)
    hint = ("rerun with --fresh to start the folder over, or --out DIR to write elsewhere" if what == "--out"
            else f"give {what} the folder of a run that finished")
    try:
        settings = read_json(path)
    except (OSError, ValueError) as exc:
        reason = "not valid JSON" if isinstance(exc, ValueError) else (exc.strerror or type(exc).__name__)
        raise UserError(f"cannot read {path} ({reason}): {hint}") from exc
    if not isinstance(settings, dict):
        raise UserError(f"cannot read {path} (not a JSON object): {hint}")
    return settings


def partial_files(checkpoint: Path) -> list[Path]:
    """The engine's partial-pass files beside ``checkpoint``: its own name, and one per rank of any
    earlier launch (``engine-partial.rank-003.npz``)."""
    folder = Path(checkpoint).parent
    if not folder.is_dir():
        return []
    stem, suffix = Path(checkpoint).stem, Path(checkpoint).suffix
    return sorted(p for p in folder.glob(f"{stem}*{suffix}")
                  if p.name == Path(checkpoint).name or p.name.startswith(f"{stem}.rank-"))


def plan_variants(selected: Iterable[Removal], done: Mapping[Removal, VariantResult]) -> list[Removal]:
    """The full model first, then each selected removal in order; skip what is already stored."""
    wanted = [Removal(), *sorted(set(selected))]
    return [v for v in wanted if v not in done]
