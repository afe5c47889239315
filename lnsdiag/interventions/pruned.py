"""Sub-layers a pruned checkpoint records as removed: skipped once it is loaded by lnsdiag.

A checkpoint lnsdiag writes without some attention or MLP sub-layers of kept blocks stores each
one with its output projection zeroed (:mod:`lnsdiag.checkpoint.sublayers`), so plain transformers
computes the pruned model exactly, but still spends the sub-layer's compute. Its config records
them in its own block numbering (``config.lnsdiag_removed_units = ["1.attn", "4.mlp"]``);
:func:`restore_removed_units` (run on load by :func:`lnsdiag.model.load.restore_norms`, as LayerNorm
Scaling and Post-LN are) makes each recorded sub-layer's site return zeros instead of running it.

The skip is what the checkpoint *is*, not a variant of it: its forwards are kept on the block stack
under their own tag, :data:`KEPT_AS`, which :func:`~.removal.removals_suspended` does not lift and
:func:`~.removal.removed_layers` does not take for a removal of its own (removing the same sub-layer
again in a sweep is allowed, and changes nothing).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import UserError
from ..model.patch import Patches, release
from ..model.structure import LayerStack, find_layers, sublayer_site
from .removal import SilencedSite
from .units import Removal, Unit

#: The config field a checkpoint records its removed sub-layers under (its own block numbering).
RECORD = "lnsdiag_removed_units"
#: The tag of the skipped sites' forwards, and the name their handle is kept under on the stack.
KEPT_AS = "removed-in-checkpoint"


def recorded_units(config: Any) -> Removal:
    """The sub-layers a config records as removed (:data:`RECORD`); the full model when none.
    A record that is not a list of sub-layers (``"3.attn"``) is refused in one line."""
    value = getattr(config, RECORD, None)
    if not value:
        return Removal()
    try:
        removal = Removal(tuple(Unit.parse(v) for v in value))
    except (TypeError, ValueError) as exc:
        raise UserError(f"config.{RECORD} = {value!r} is not a list of sub-layers like 3.attn: {exc}") from None
    if removal.blocks:
        raise UserError(f"config.{RECORD} = {value!r} names whole blocks: a checkpoint records only sub-layers")
    return removal


def write_record(config: Any, units: Iterable[Unit]) -> None:
    """Record ``units`` (sub-layers, the config's own block numbering) in ``config``; no field when none."""
    texts = [str(u) for u in sorted(set(units))]
    if texts:
        setattr(config, RECORD, texts)
    elif hasattr(config, RECORD):
        delattr(config, RECORD)


def renumbered(units: Iterable[Unit], keep: Sequence[int]) -> list[Unit]:
    """``units`` in the numbering of a model that keeps only the blocks ``keep`` (old indices, in
    order); those of blocks not kept are gone with their blocks."""
    new_index = {old: new for new, old in enumerate(keep)}
    return [type(u)(new_index[u.block]) for u in units if u.block in new_index]


def restore_removed_units(model: nn.Module, stack: LayerStack | None = None) -> bool:
    """Skip the sub-layers the model's config records as removed (see the module doc); True if it
    records any. Idempotent: an earlier skip handle is restored first. A model whose config records
    none is left alone (not even searched for its block stack)."""
    removal = recorded_units(getattr(model, "config", None))
    if not removal:
        return False
    stack = stack or find_layers(model)
    for unit in removal:
        if unit.block >= len(stack):
            raise UserError(f"config.{RECORD} names {unit}, but the model has {len(stack)} blocks")
    release(stack.layers, KEPT_AS)
    patches = Patches().keep_on(stack.layers, KEPT_AS)
    for unit in removal:
        site = sublayer_site(stack.layers[unit.block], unit.kind)
        patches.forward(site.module, SilencedSite(site.module, "auto" if unit.kind == "attn" else "skip"), tag=KEPT_AS)
        if site.post_norm is not None:
            patches.forward(site.post_norm, torch.zeros_like, tag=KEPT_AS)
    return True

