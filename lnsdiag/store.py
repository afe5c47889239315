"""The resumable result store of a sweep: one folder, its settings, one file per finished variant.

A run's folder holds ``settings.json`` (everything that changes the numbers: the fingerprint)
and one JSON file per finished variant under ``variants/``, each written atomically the
moment it is done. Rerunning the same command scores only what is missing; a folder made
with other settings is refused, not mixed.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UserError
from .perplexity import Perplexity
from .runs import read_json, write_json
from .scoring import MetricRow, Scores

#: The fast engine's partial results while a pass runs.
CHECKPOINT_NAME = "engine-partial.npz"


def variant_name(layer: int | None) -> str:
    return "baseline" if layer is None else f"layer_{layer:03d}"


@dataclass
class VariantResult:
    """The scores of the model with ``removed_layer`` removed (``None``: the full model)."""

    removed_layer: int | None
    rows: list[MetricRow]
    seconds: float
    engine: str = "naive"
    finished: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    ppl: Perplexity | None = None

    @classmethod
    def of(cls, layer: int | None, scores: Scores, seconds: float, engine: str) -> VariantResult:
        return cls(layer, scores.rows, seconds, engine, ppl=scores.ppl)

    def to_json(self) -> dict[str, Any]:
        return {"removed_layer": self.removed_layer, "seconds": round(self.seconds, 3), "engine": self.engine,
                "finished": self.finished, "metrics": [r.as_dict() for r in self.rows],
                "ppl_windows": self.ppl.as_json() if self.ppl else None}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> VariantResult:
        rows = [MetricRow(**{**r, "stderr": math.nan if r["stderr"] is None else r["stderr"]})
                for r in data["metrics"]]
        ppl = Perplexity(**data["ppl_windows"]) if data.get("ppl_windows") else None
        return cls(data["removed_layer"], rows, data["seconds"], data.get("engine", "naive"), data["finished"], ppl)


class ResultStore:
    """A run folder: ``settings.json`` plus ``variants/<name>.json`` per finished variant.

    ``settings`` is the fingerprint: a folder whose stored settings differ in any key is
    refused once it holds a variant. ``outputs`` are the files a previous run wrote there,
    removed with everything else by ``fresh``.
    """

    def __init__(self, folder: Path, settings: dict[str, Any], *, fresh: bool = False,
                 outputs: Sequence[str] = ()) -> None:
        self.folder = Path(folder)
        self.variants = self.folder / "variants"
        self.settings = settings
        self.checkpoint = self.folder / CHECKPOINT_NAME
        settings_path = self.folder / "settings.json"
        if fresh:  # everything a previous run left: stored variants, partial pass, cached angles, outputs
            shutil.rmtree(self.variants, ignore_errors=True)
            for name in ("settings.json", CHECKPOINT_NAME, *outputs):
                (self.folder / name).unlink(missing_ok=True)
        if settings_path.is_file():
            self._check_compatible(read_json(settings_path))
        self.variants.mkdir(parents=True, exist_ok=True)
        write_json(settings_path, settings)

    def _check_compatible(self, stored: dict[str, Any]) -> None:
        keys = list(dict.fromkeys([*self.settings, *stored]))
        differ = [k for k in keys if json.dumps(stored.get(k), sort_keys=True, default=str)
                  != json.dumps(self.settings.get(k), sort_keys=True, default=str)]
        if differ and any(self.variants.glob("*.json")):
            what = "; ".join(f"{k}: {stored.get(k)!r} there, {self.settings.get(k)!r} now" for k in differ[:3])
            raise UserError(
                f"{self.folder} holds a sweep made with other settings ({what}); rerun with --fresh to replace it "
                "or --out DIR to keep both"
            )

    def done(self) -> dict[int | None, VariantResult]:
        out: dict[int | None, VariantResult] = {}
        for path in sorted(self.variants.glob("*.json")):
            try:
                result = VariantResult.from_json(read_json(path))
            except (ValueError, KeyError, TypeError):
                continue  # a foreign or damaged file is rescored, never trusted
            out[result.removed_layer] = result
        return out

    def save(self, result: VariantResult) -> Path:
        return write_json(self.variants / f"{variant_name(result.removed_layer)}.json", result.to_json())


def plan_variants(layers: Iterable[int], done: dict[int | None, VariantResult]) -> list[int | None]:
    """Baseline first, then each selected layer; skip what is already stored."""
    wanted: list[int | None] = [None, *sorted(set(layers))]
    return [v for v in wanted if v not in done]
