"""``lnsdiag export``: a model written as a checkpoint any runtime computes exactly, and checked.

:func:`check_target` refuses, before the model loads, a folder that must not be written (not empty
without ``overwrite``, the model's own folder); :func:`run` writes the checkpoint
(:func:`lnsdiag.checkpoint.export.export_checkpoint`: LayerNorm Scaling folded into the norm weights)
and, with ``verify``, loads it back with plain transformers and measures the largest logit difference
to the model lnsdiag computes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..checkpoint.export import ExportedCheckpoint, check_export_target, export_checkpoint
from ..checkpoint.save import parse_size
from ..errors import OptionError
from ..model.load import LoadedModel, ModelOptions, resolve_model
from ..model.structure import find_layers

#: Token ids the check runs: rows × columns, drawn uniformly from the vocabulary with this seed.
CHECK_SHAPE = (2, 32)
CHECK_SEED = 0


@dataclass(frozen=True)
class ExportRun:
    """What ``lnsdiag export`` wrote and, when checked, how exactly plain transformers computes it."""

    checkpoint: ExportedCheckpoint
    max_abs_logit_diff: float | None = None  #: plain transformers (the folder) vs lnsdiag (in memory)
    max_abs_logit: float | None = None  #: the largest |logit| lnsdiag computed, for scale
    check_tokens: int = 0


def check_target(folder: str | Path, overwrite: bool = False, model: ModelOptions | None = None,
                 max_shard_size: int | str = "5GB") -> Path:
    """``folder`` if the export may write it (before the model loads), else an OptionError."""
    target = Path(folder).expanduser()
    parse_size(max_shard_size)
    if model is not None and model.is_local:
        source = Path(resolve_model(model.name)[0]).resolve()
        here = target.resolve()
        if here == source or source in here.parents:
            raise OptionError("{value} is inside the model's own folder: export to a folder of its own", value=folder)
    if target.is_dir() and any(target.iterdir()):
        if not overwrite:
            raise OptionError("{value} is not empty: give {overwrite} to replace it, or another folder", value=folder)
        if not (target / "config.json").is_file():
            raise OptionError("{value} holds no config.json: {overwrite} replaces only a model folder, not an "
                              "arbitrary one", value=folder)
    return check_export_target(target, overwrite)


def run(loaded: LoadedModel, folder: str | Path, *, overwrite: bool = False, max_shard_size: int | str = "5GB",
        layers_path: str | None = None, verify: bool = False) -> ExportRun:
    """Write ``loaded`` into ``folder`` (LayerNorm Scaling folded into the norm weights) and, with
    ``verify``, measure plain transformers' logits on it against lnsdiag's on fixed random tokens."""
    saved = export_checkpoint(loaded, folder, overwrite=overwrite, max_shard_size=max_shard_size,
                              stack=find_layers(loaded.model, layers_path))
    if not verify:
        return ExportRun(saved)
    diff, scale = compare_logits(loaded, saved.folder)
    return ExportRun(saved, diff, scale, CHECK_SHAPE[0] * CHECK_SHAPE[1])


def compare_logits(loaded: LoadedModel, folder: str | Path) -> tuple[float, float]:
    """(max |Δlogits|, max |logit|) between ``folder`` loaded by plain transformers (the model's own class,
    nothing of lnsdiag) and ``loaded.model`` as lnsdiag runs it, on :data:`CHECK_SHAPE` fixed random
    tokens, in the model's dtype and on its device."""
    model = loaded.model
    vocab = int(model.get_input_embeddings().weight.shape[0])
    ids = torch.randint(0, vocab, CHECK_SHAPE, generator=torch.Generator().manual_seed(CHECK_SEED))
    device = model.get_input_embeddings().weight.device
    plain = type(model).from_pretrained(str(folder), dtype=loaded.dtype,
                                        device_map=loaded.device_map or {"": device}).eval()
    try:
        ours, theirs = _logits(model, ids.to(device)), _logits(plain, ids.to(device))
    finally:
        del plain
    return float((ours - theirs).abs().max()), float(ours.abs().max())


def _logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float().cpu()
