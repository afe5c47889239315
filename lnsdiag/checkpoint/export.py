"""A model written whole as a checkpoint any runtime computes exactly: ``lnsdiag export``.

An LNS model computes its scales with hooks in lnsdiag (:mod:`lnsdiag.interventions.lns`); written by
:func:`export_checkpoint`, each scaled norm's weight (and bias) carries its factor instead, so plain
transformers, vLLM and lm-eval compute the same model. Same writer as :mod:`.save` (shard by shard,
atomic staging folder, tokenizer, generation config), with its own model card and
``lnsdiag_export.json`` record. A model without LayerNorm Scaling, or with it already folded, is
written as it is (:attr:`ExportedCheckpoint.note` says so); a Post-LN twin is refused: no plain
runtime runs its blocks' order.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..interventions.lns import fold_plan, is_folded, is_lns
from ..model.structure import LayerStack, find_layers
from .card import EXPORT_FILE, export_card, export_record, read_provenance, recorded_norm_scheme
from .save import (
    _check_savable,
    _check_target,
    _kept_parameters,
    _name_or_path,
    checkpoint_config,
    fold_rounding,
    parse_size,
    unwrap_loaded,
    write_checkpoint,
)


@dataclass(frozen=True)
class ExportedCheckpoint:
    """What :func:`export_checkpoint` wrote."""

    folder: Path
    weight_files: tuple[str, ...]
    num_parameters: int
    total_bytes: int
    folded_norms: int  #: norms whose weights now carry their LayerNorm-Scaling factor (0: nothing to fold)
    fold_rounding: float | None  #: largest relative rounding of a folded norm weight (its dtype's); None: none folded
    record: dict[str, Any]  #: what ``lnsdiag_export.json`` holds
    note: str | None = None  #: why nothing was folded, if nothing was


def check_export_target(folder: str | Path, overwrite: bool = False) -> Path:
    """``folder`` if a checkpoint may be written there, else a UserError: before any slow work (a
    non-empty folder needs ``overwrite``, which replaces only a model folder)."""
    target = Path(folder).expanduser()
    _check_target(target, overwrite)
    return target


def export_checkpoint(
    model: Any,
    folder: str | Path,
    *,
    tokenizer: Any = None,
    source: str | None = None,
    revision: str | None = None,
    overwrite: bool = False,
    max_shard_size: int | str = "5GB",
    stack: LayerStack | None = None,
) -> ExportedCheckpoint:
    """Write ``model`` whole into ``folder`` as a checkpoint plain transformers computes exactly.

    LayerNorm Scaling recorded in ``config.lns`` (hooks) leaves folded into the scaled norms' weights
    and biases, each block with its recorded l, and the record is marked ``folded`` (lnsdiag's
    ``load_model`` then installs nothing); the model in memory is not changed. ``model`` may be a
    :class:`~lnsdiag.model.load.LoadedModel` (its tokenizer, source and revision the defaults). A
    model with nothing to fold is written as it is, with a note; Post-LN, hooks the config does not
    record, a non-LNS norm that cannot be folded: UserErrors, before anything is written. A non-empty
    ``folder`` needs ``overwrite=True`` (only a model folder is replaced).
    """
    model, tokenizer, source, revision = unwrap_loaded(model, tokenizer, source, revision)
    stack = stack or find_layers(model)
    target = check_export_target(folder, overwrite)
    _check_savable(model, stack)
    if getattr(getattr(model, "config", None), "post_ln", None):
        raise UserError("cannot export a Post-LN model for plain runtimes: its blocks normalise after the residual "
                        "adds, which only lnsdiag's load_model re-installs (save_without_layers keeps the record)")
    folds = fold_plan(model, stack)
    max_bytes = parse_size(max_shard_size)
    note = None
    if not is_lns(model):
        note = "the model has no LayerNorm Scaling: nothing to fold, written as it is"
    elif is_folded(model):
        note = "the model's LayerNorm Scaling is already folded into its norm weights: written as it is"

    dtype = getattr(model, "dtype", None) or next(model.parameters()).dtype
    config = checkpoint_config(model, copy.deepcopy(model.config), dtype)
    source = source or _name_or_path(model) or None
    source_record = read_provenance(source) if source and Path(source).is_dir() else None
    scheme = recorded_norm_scheme(config)
    rounding = fold_rounding(folds)
    record = export_record(model, stack, config=config, source=source, revision=revision, dtype=dtype,
                           folded_norms=len(folds), fold_rounding=rounding, kinds=[f.kind for f in folds],
                           source_record=source_record)
    card = export_card(source=source, revision=revision or record.get("commit"), num_layers=len(stack),
                       norm_scheme=scheme, lns=getattr(config, "lns", None), folded_norms=len(folds), dtype=dtype,
                       fold_rounding=rounding, path=str(target), note=note)
    num_parameters = _kept_parameters(model, stack, [])
    written = write_checkpoint(model, stack, list(range(len(stack))), target, config=config, card=card,
                               record=record, record_file=EXPORT_FILE, tokenizer=tokenizer, extras={},
                               overwrite=overwrite, max_bytes=max_bytes, num_parameters=num_parameters, folds=folds)
    return ExportedCheckpoint(folder=target, weight_files=written.files, num_parameters=num_parameters,
                              total_bytes=written.total_bytes, folded_norms=len(folds), fold_rounding=rounding,
                              record=written.record, note=note)
