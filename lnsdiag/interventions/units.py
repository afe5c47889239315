"""What a variant removes: units of a model, and sets of them — each form they take named once.

A :class:`Unit` is one removable piece of a model (today a whole block, :class:`Block`); a
:class:`Removal` is a set of units (empty: the full model). Every form a removal takes outside
the program is defined here and nowhere else, so result folders, checkpoints and CSVs agree
(blocks 3, 4 and 7 / block 3 alone / the full model):

* ``shrink --layers``: ``3,4,7`` or ``3-4,7`` / ``3`` (:meth:`Removal.parse`);
* the store key and file name: ``layers_003_004_007`` / ``layer_003`` / ``baseline`` (:attr:`Removal.name`);
* JSON, in variant files and engine checkpoints: ``[3, 4, 7]`` / ``3`` / ``null`` (:meth:`Removal.to_json`);
* a CSV cell: ``3,4,7`` / ``3`` / empty (:attr:`Removal.cell`);
* progress: ``without layers 3,4,7`` / ``without layer 3`` / ``baseline`` (:attr:`Removal.label`).

``prune``'s one-at-a-time ``--layers`` (``0-31``, ``28-``, ``all``, negatives from the end) needs
the model's depth: :func:`lnsdiag.model.structure.parse_layer_spec` reads it, :meth:`Removal.each`
makes each block one removal.

**Adding a unit kind** (a block's attention or MLP sub-layer) is one class and one entry in
:data:`KINDS`; its text is ``<block>.<part>`` (``3.attn``) in every form above, and it sorts after
the whole block of the same number::

    @dataclass(frozen=True)
    class Attention(Unit):
        part: ClassVar[str] = "attn"  # the attention sub-layer of a block

    KINDS = (Block, Attention)

How a unit is taken out of a model is :mod:`.removal`'s business: this module is plain values.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import total_ordering
from typing import Any, ClassVar

from ..errors import UserError

#: A removal's form in JSON: ``None`` (the full model), one unit, or a list of units.
RemovalJson = int | str | list[int | str] | None


@total_ordering
@dataclass(frozen=True)
class Unit:
    """One removable unit of a model, in its block ``block`` (0-based; checked against a model
    where one is at hand). Units sort by block, then by kind (:data:`KINDS` order)."""

    block: int
    #: The kind's name after the block number (``3.attn``); a whole block has none.
    part: ClassVar[str] = ""

    def __post_init__(self) -> None:
        if type(self) is Unit:
            raise TypeError("Unit is the base of the unit kinds: use Block(...)")
        object.__setattr__(self, "block", operator.index(self.block))

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, Unit):
            return NotImplemented
        return self._order() < other._order()

    def _order(self) -> tuple[int, int]:
        return self.block, KINDS.index(type(self))

    def __str__(self) -> str:
        return f"{self.block}.{self.part}" if self.part else str(self.block)

    @property
    def token(self) -> str:
        """The unit in a store file name: ``003`` (``003attn``)."""
        return f"{self.block:03d}{self.part}"

    def to_json(self) -> int | str:
        """A whole block as its number, any other unit as its text (``"3.attn"``)."""
        return str(self) if self.part else self.block

    @staticmethod
    def parse(text: str | int) -> Unit:
        """``3`` or ``"3"`` → a whole block; ``"3.attn"`` → the kind whose ``part`` is ``attn``.
        Raises ValueError for anything else."""
        if isinstance(text, int):
            return Block(text)
        block, dot, part = str(text).strip().partition(".")
        kinds = {k.part: k for k in KINDS}
        if (dot and not part) or part not in kinds:
            raise ValueError(f"not a unit: {text!r}")
        return kinds[part](int(block))


@dataclass(frozen=True)
class Block(Unit):
    """A whole block of the stack: removed, the block passes its input on unchanged."""


#: Every unit kind, in the order units of one block sort (a whole block first).
KINDS: tuple[type[Unit], ...] = (Block,)


@dataclass(frozen=True, order=True)
class Removal:
    """A set of units removed at once: distinct, ascending, hashable; ``Removal()`` is the full model.

    Built from units or block numbers: ``Removal((3, 4))`` removes blocks 3 and 4,
    ``Removal.of(3)`` block 3. Removals sort by their units (the full model first).
    """

    units: tuple[Unit, ...] = ()

    def __post_init__(self) -> None:
        units = {u if isinstance(u, Unit) else Block(u) for u in self.units}
        object.__setattr__(self, "units", tuple(sorted(units)))

    # --- building --------------------------------------------------------------------------------

    @classmethod
    def of(cls, value: Removal | Unit | int | Iterable[Unit | int]) -> Removal:
        """What a caller holds as a removal: a Removal, one unit or block number, or several."""
        if isinstance(value, Removal):
            return value
        if isinstance(value, Unit) or hasattr(value, "__index__"):
            return cls((value,))
        return cls(tuple(value))

    @classmethod
    def each(cls, blocks: Iterable[int]) -> list[Removal]:
        """One removal per block, in order: ``prune``'s one-at-a-time sweep of the blocks its
        ``--layers`` selects (:func:`~lnsdiag.model.structure.parse_layer_spec`)."""
        return [cls.of(b) for b in blocks]

    @classmethod
    def parse(cls, value: str | Iterable[int] | Removal) -> Removal:
        """``shrink``'s ``--layers``: ``"3,4,7"`` or ``"3-5,9"`` → blocks 3, 4, 5, 9 (checked against the
        model later); a sequence of block numbers is taken as it is."""
        if isinstance(value, Removal):
            return value
        if not isinstance(value, str):
            return cls(tuple(int(i) for i in value))
        out: set[int] = set()
        for part in value.split(","):
            part = part.strip()
            if not part:
                continue
            try:
                if "-" in part[1:]:
                    a, b = part.split("-", 1)
                    lo, hi = int(a), int(b)
                    if hi < lo:
                        raise ValueError
                    out.update(range(lo, hi + 1))
                else:
                    out.add(int(part))
            except ValueError:
                raise UserError(f"--layers must be layer numbers like 3,4,7 or 3-5, not {value!r}") from None
        if not out:
            raise UserError("--layers names no layer")
        return cls(tuple(out))

    # --- its forms outside the program -----------------------------------------------------------

    @property
    def name(self) -> str:
        """Its key in a result store, and its files' name: ``baseline``, ``layer_007``, ``layers_003_004_007``."""
        if not self.units:
            return "baseline"
        if len(self.units) == 1:
            return f"layer_{self.units[0].token}"
        return "layers_" + "_".join(u.token for u in self.units)

    def to_json(self) -> RemovalJson:
        """Its form in variant files and engine checkpoints: ``null``, one unit (``3``), or a list."""
        if not self.units:
            return None
        if len(self.units) == 1:
            return self.units[0].to_json()
        return [u.to_json() for u in self.units]

    @classmethod
    def from_json(cls, value: RemovalJson) -> Removal:
        """Read :meth:`to_json`'s form back (``null``, a unit, or a list of units). Raises ValueError
        or TypeError on anything else (a foreign file)."""
        if value is None:
            return cls()
        if isinstance(value, list):
            return cls(tuple(Unit.parse(_json_unit(v)) for v in value))
        return cls((Unit.parse(_json_unit(value)),))

    @property
    def cell(self) -> str:
        """Its cell in a CSV (shrink.csv's ``removed_layers``, prune.csv's ``removed_layer``): the units
        comma-joined, ``3,4,7``; empty for the full model."""
        return ",".join(map(str, self.units))

    @classmethod
    def from_cell(cls, value: Any) -> Removal:
        """Read a CSV cell back, whatever a reader made of it: ``"3,4,7"``, 31 or 31.0 (a one-block
        cell taken for a number), empty, None or NaN (the full model)."""
        if isinstance(value, str):
            return cls(tuple(Unit.parse(x) for x in value.replace(" ", "").split(",") if x))
        if value is None or math.isnan(float(value)):
            return cls()
        return cls.of(int(value))

    @property
    def label(self) -> str:
        """How progress names it while it is scored: ``baseline``, ``without layer 3``, ``without layers 3,4``."""
        if not self.units:
            return "baseline"
        return f"without layer{'s' if len(self.units) > 1 else ''} {self.cell}"

    def __str__(self) -> str:
        return self.cell

    def __repr__(self) -> str:
        return f"Removal({self.cell!r})"

    # --- what the engines ask ----------------------------------------------------------------------

    @property
    def blocks(self) -> tuple[int, ...]:
        """The whole blocks it removes, ascending."""
        return tuple(u.block for u in self.units if isinstance(u, Block))

    @property
    def single_block(self) -> int | None:
        """The block, when it removes exactly one whole block (a one-at-a-time sweep's variant); else None."""
        return self.units[0].block if len(self.units) == 1 and isinstance(self.units[0], Block) else None

    @property
    def first(self) -> int:
        """The block of its first unit: where the fast engine resumes from the kept input."""
        if not self.units:
            raise ValueError("the full model removes nothing")
        return self.units[0].block

    def without_first(self) -> Removal:
        """The units after the first (those a pass resumed at :attr:`first` still skips)."""
        return Removal(self.units[1:])

    def __or__(self, other: Removal) -> Removal:
        return Removal((*self.units, *other.units)) if isinstance(other, Removal) else NotImplemented

    def __len__(self) -> int:
        return len(self.units)

    def __iter__(self) -> Iterator[Unit]:
        return iter(self.units)

    def __contains__(self, unit: object) -> bool:
        return (Block(unit) if isinstance(unit, int) else unit) in self.units


def _json_unit(value: Any) -> int | str:
    """A unit in JSON: a block number or a unit's text (never a bool or a float)."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise TypeError(f"not a unit: {value!r}")
    return value
