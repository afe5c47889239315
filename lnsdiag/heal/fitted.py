"""What a linear heal fitted: plain data, saved and loaded without pickle, summarised for JSON.

A :class:`LinearPatch` holds, for each removed contiguous span of blocks, the ``d×d`` transform
``T`` folded at its site (:mod:`.sites`) and how well it fitted. It refers to no model: applying
it is :func:`lnsdiag.heal.apply.healed`'s business.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError
from ..interventions.units import Removal
from ..runs import atomic_write

#: The safetensors metadata key that holds a saved patch's record.
_META_KEY = "lnsdiag_heal"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class SpanFit:
    """The heal of the removed blocks ``first..last`` (inclusive), folded at ``site`` (block
    ``first - 1``'s MLP; ``-1``: the input embeddings).

    Errors are relative to the full model's stream after ``last`` (``‖H_last‖``): ``error_unhealed``
    is the pruned stream's distance to it, ``error_healed`` the healed one's, on the calibration
    tokens; ``fit_error`` is ``‖X T − R‖ / ‖R‖`` (1 without the heal).
    """

    first: int
    last: int
    site: int
    transform: torch.Tensor = field(repr=False)
    ridge: float
    penalty: float  #: the absolute ridge λ = ridge · trace(XᵀX) / d
    tokens: int
    error_unhealed: float
    error_healed: float
    fit_error: float

    def summary(self) -> dict[str, Any]:
        """Everything but the transform, for a JSON record."""
        return {"first": self.first, "last": self.last, "site": self.site, "ridge": self.ridge,
                "penalty": self.penalty, "tokens": self.tokens, "error_unhealed": self.error_unhealed,
                "error_healed": self.error_healed, "fit_error": self.fit_error,
                "transform_norm": float(self.transform.double().norm())}


@dataclass(frozen=True)
class LinearPatch:
    """A training-free linear heal of ``removal`` in a model of ``num_layers`` blocks of width
    ``hidden_size``: one :class:`SpanFit` per removed contiguous span, in order."""

    removal: Removal
    num_layers: int
    hidden_size: int
    spans: tuple[SpanFit, ...]
    method: str = "lstsq"
    calibration: dict[str, Any] = field(default_factory=dict)  #: the calibration text's name, digest, windows

    def summary(self) -> dict[str, Any]:
        """The patch as JSON-ready plain data (no tensors)."""
        return {"format": FORMAT_VERSION, "method": self.method, "removed": self.removal.to_json(),
                "num_layers": self.num_layers, "hidden_size": self.hidden_size, "calibration": self.calibration,
                "spans": [s.summary() for s in self.spans]}

    def save(self, path: str | Path) -> Path:
        """Write the patch as one safetensors file (the transforms in float32, the record as metadata)."""
        tensors = {f"span_{k}": s.transform for k, s in enumerate(self.spans)}
        return write_patch_file(path, tensors, self.summary(), _META_KEY)

    @classmethod
    def load(cls, path: str | Path) -> LinearPatch:
        """Read a patch :meth:`save` wrote; refuses (one line) a file that is not one."""
        record, tensors = read_patch_file(path, _META_KEY, "a linear heal")
        return cls._from_record(record, tensors)

    @classmethod
    def _from_record(cls, record: dict[str, Any], tensors: dict[str, torch.Tensor]) -> LinearPatch:
        spans = tuple(SpanFit(transform=tensors[f"span_{k}"],
                              **{n: v for n, v in s.items() if n != "transform_norm"})
                      for k, s in enumerate(record["spans"]))
        return cls(Removal.from_json(record["removed"]), int(record["num_layers"]), int(record["hidden_size"]),
                   spans, record.get("method", "lstsq"), dict(record.get("calibration") or {}))


def write_patch_file(path: str | Path, tensors: dict[str, torch.Tensor], record: dict[str, Any], key: str) -> Path:
    """A heal as one safetensors file: ``tensors`` in float32, ``record`` as JSON metadata under ``key``.
    Written atomically (a temporary file renamed into place): a kill leaves the old file or none, never
    a damaged one."""
    from safetensors.torch import save

    plain = {name: t.detach().to("cpu", torch.float32).contiguous() for name, t in tensors.items()}
    return atomic_write(Path(path).expanduser(), save(plain, metadata={key: json.dumps(record)}))


def read_patch_file(path: str | Path, key: str, what: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """What :func:`write_patch_file` wrote: the record and the tensors; a file that is not ``what``
    lnsdiag saved is refused in one line."""
    from safetensors import SafetensorError, safe_open

    path = Path(path).expanduser()
    try:
        with safe_open(str(path), framework="pt") as f:
            record = json.loads((f.metadata() or {})[key])
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no iteration)
    except (OSError, KeyError, ValueError, SafetensorError) as exc:
        raise UserError(f"{path} is not {what} lnsdiag saved ({exc})") from None
    return record, tensors


def contiguous_spans(blocks: tuple[int, ...] | list[int]) -> list[tuple[int, int]]:
    """``[3, 4, 7]`` → ``[(3, 4), (7, 7)]``: the removed runs of blocks, in order, inclusive."""
    spans: list[tuple[int, int]] = []
    for b in sorted(blocks):
        if spans and b == spans[-1][1] + 1:
            spans[-1] = (spans[-1][0], b)
        else:
            spans.append((b, b))
    return spans
