"""What a checkpoint without some units is: whole blocks really gone, sub-layers written as zeros.

:func:`~.save.save_without_layers` takes a :class:`~lnsdiag.interventions.units.Removal`. Its whole
blocks are left out of the checkpoint (the kept ones renumbered); each removed attention or MLP
sub-layer of a kept block stays, with the tensors that make its update (its output projection, every
expert's: :func:`~.reference.zeroed_projections`) written as zeros, so plain transformers computes the
pruned model exactly. The tensors are zeroed on their way to the files (:func:`zeroed_names` says
which); the model in memory is never changed. The config records the sub-layers in the checkpoint's
own numbering (:data:`~lnsdiag.interventions.pruned.RECORD`), so that lnsdiag's loader skips them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..errors import UserError
from ..interventions.pruned import recorded_units, renumbered, write_record
from ..interventions.units import Removal, Unit
from ..model.structure import LayerStack, parse_layer_spec
from .reference import zeroed_projections


@dataclass(frozen=True)
class Pruning:
    """A removal checked against a model of ``total`` blocks: its units (block numbers non-negative),
    the whole blocks it removes and those it keeps, in order (original numbering)."""

    removal: Removal
    removed: list[int]
    keep: list[int]


def plan_pruning(layers: Removal | Iterable[int | Unit] | int | str, total: int) -> Pruning:
    """``layers`` (a Removal, units or block numbers, negative ones from the end, or ``--layers`` text)
    checked against ``total`` blocks: refused in one line when it removes nothing, every block, a
    block that is not there, or a sub-layer of a block it removes whole."""
    if isinstance(layers, str):
        layers = Removal.parse(layers)
    units = [layers] if isinstance(layers, (int, Unit)) else list(layers)
    if not units:
        raise UserError("no layer to remove: the pruned checkpoint would be the model itself")
    blocks = [u.block if isinstance(u, Unit) else u for u in units if not isinstance(u, Unit) or not u.part]
    removed = parse_layer_spec(blocks, total) if blocks else []
    if len(removed) == total:
        raise UserError(f"cannot remove all {total} layers: at least one block must remain")
    parts = [_in_range(u, total) for u in units if isinstance(u, Unit) and u.part]
    try:
        removal = Removal((*removed, *parts))
    except ValueError as exc:
        raise UserError(f"cannot save without {', '.join(map(str, units))}: {exc}") from None
    return Pruning(removal, removed, [i for i in range(total) if i not in set(removed)])


def _in_range(unit: Unit, total: int) -> Unit:
    """``unit`` with a negative block counted from the end; one out of range refused."""
    block = unit.block + total if unit.block < 0 else unit.block
    if not 0 <= block < total:
        raise UserError(f"{unit} is out of range: the model has {total} layers (0-{total - 1})")
    return type(unit)(block)


def zeroed_names(model: nn.Module, stack: LayerStack, removal: Removal) -> frozenset[str]:
    """State-dict names (the model's own numbering) of the tensors written as zeros: the output
    projections of ``removal``'s sub-layers, and of those the model's config already records as
    removed (a pruned checkpoint pruned further), in the blocks it keeps."""
    units = {*removal.sublayers, *recorded_units(getattr(model, "config", None))}
    return frozenset(f"{stack.path}.{u.block}.{name}" for u in sorted(units) if u.block not in removal.blocks
                     for name, _ in zeroed_projections(stack.layers[u.block], u.kind))


def record_sublayers(config: Any, pruning: Pruning) -> list[str]:
    """Add the pruning's sub-layers, renumbered, to the removed sub-layers ``config`` records (a config
    :func:`~.reference.config_without` reduced: its earlier record already renumbered); returns the
    record, in the checkpoint's numbering (``["1.attn", "4.mlp"]``)."""
    units = [*recorded_units(config), *renumbered(pruning.removal.sublayers, pruning.keep)]
    write_record(config, units)
    return [str(u) for u in recorded_units(config)]
