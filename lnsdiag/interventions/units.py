"""What a variant removes: units of a model, and sets of them — each form they take named once.

A :class:`Unit` is one removable piece of a model: a whole block (:class:`Block`), or one of its
two sub-layers, its attention (:class:`Attention`, ``3.attn``) or its MLP (:class:`Mlp`, ``3.mlp``);
a :class:`Removal` is a set of units (empty: the full model). Every form a removal takes outside
the program is defined here and nowhere else, so result folders, checkpoints and CSVs agree
(blocks 3, 4 and 7 / block 3 alone / the full model):

* ``shrink --layers``: ``3,4,7`` or ``3-4,7`` / ``3`` / ``3,5.attn,7.mlp`` (:meth:`Removal.parse`);
* the store key and file name: ``layers_003_004_007`` / ``layer_003`` / ``baseline`` (:attr:`Removal.name`);
* JSON, in variant files and engine checkpoints: ``[3, 4, 7]`` / ``3`` / ``null`` (:meth:`Removal.to_json`);
* a CSV cell: ``3,4,7`` / ``3`` / empty (:attr:`Removal.cell`);
* progress: ``without layers 3,4,7`` / ``without layer 3`` / ``baseline`` (:attr:`Removal.label`).

``prune``'s one-at-a-time ``--layers`` (``0-31``, ``28-``, ``all``, negatives from the end) needs
the model's depth: :func:`lnsdiag.model.structure.parse_layer_spec` reads it, :meth:`Removal.each`
makes each block one removal.

**Adding a unit kind** is one class and one entry in :data:`KINDS`; its text is ``<block>.<part>``
(``3.attn``) in every form above, and it sorts after the whole block of the same number. A set
never holds a sub-layer of a block it removes whole (:meth:`Removal.parse` refuses ``3,3.attn``).

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
    def kind(self) -> str:
        """The unit's kind as CSVs and ``--unit`` name it: ``block``, ``attn``, ``mlp``."""
        return self.part or "block"

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

    def of_kind(self, kind: str) -> Unit:
        """The unit of kind ``kind`` (``block``, ``attn``, ``mlp``) in the same block."""
        return KIND_NAMES[kind](self.block)


@dataclass(frozen=True)
class Block(Unit):
    """A whole block of the stack: removed, the block passes its input on unchanged."""


@dataclass(frozen=True)
class Attention(Unit):
    """A block's attention sub-layer: removed, it adds nothing to the residual stream (the block
    keeps its MLP)."""

    part: ClassVar[str] = "attn"


@dataclass(frozen=True)
class Mlp(Unit):
    """A block's MLP (or mixture-of-experts) sub-layer: removed, it adds nothing to the residual
    stream (the block keeps its attention)."""

    part: ClassVar[str] = "mlp"


#: Every unit kind, in the order units of one block sort (a whole block first).
KINDS: tuple[type[Unit], ...] = (Block, Attention, Mlp)
#: The kinds by their names (``--unit block,attn,mlp``; the CSVs' ``unit`` column).
KIND_NAMES: dict[str, type[Unit]] = {k.part or "block": k for k in KINDS}


def parse_kinds(value: str | Iterable[str]) -> tuple[str, ...]:
    """``--unit``: ``"block"``, ``"attn,mlp"`` → the kinds' names in :data:`KINDS` order. A name that
    is none (``attention``) is refused in one line naming the close one."""
    names = [v.strip().lower() for v in (value.split(",") if isinstance(value, str) else value)]
    names = [n for n in names if n]
    if not names:
        raise UserError("--unit names no unit kind: use block, attn or mlp")
    for name in names:
        if name not in KIND_NAMES:
            raise UserError(f"--unit {name!r} is no unit kind: {kind_hint(name)}")
    return tuple(k for k in KIND_NAMES if k in names)


def kind_hint(name: str) -> str:
    """"did you mean attn?" for a near miss, else the list of kinds."""
    close = close_kind(name)
    return f"did you mean {close}?" if close else "use block, attn or mlp"


def close_kind(name: str) -> str | None:
    """The kind a near miss or another name means (``attention`` → ``attn``), or None."""
    import difflib

    aliases = {"attention": "attn", "self_attn": "attn", "attn": "attn", "ffn": "mlp", "feed_forward": "mlp",
               "mlp": "mlp", "moe": "mlp", "layer": "block", "layers": "block", "blocks": "block"}
    return aliases.get(name) or next(iter(difflib.get_close_matches(name, list(KIND_NAMES), n=1, cutoff=0.5)), None)


@dataclass(frozen=True, order=True)
class Removal:
    """A set of units removed at once: distinct, ascending, hashable; ``Removal()`` is the full model.

    Built from units or block numbers: ``Removal((3, 4))`` removes blocks 3 and 4,
    ``Removal.of(3)`` block 3. Removals sort by their units (the full model first).
    """

    units: tuple[Unit, ...] = ()

    def __post_init__(self) -> None:
        units = {u if isinstance(u, Unit) else Block(u) for u in self.units}
        whole = {u.block for u in units if isinstance(u, Block)}
        inside = sorted(u for u in units if u.part and u.block in whole)
        if inside:
            unit = inside[0]
            raise ValueError(f"{unit} is inside block {unit.block}, which it removes whole; name either "
                             f"{unit.block} or {unit}")
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
    def each(cls, blocks: Iterable[int], kinds: Iterable[str] = ("block",)) -> list[Removal]:
        """One removal per block and unit kind, in order (block 3, 3.attn, 3.mlp, block 4, ...):
        ``prune``'s one-at-a-time sweep of the blocks its ``--layers`` selects
        (:func:`~lnsdiag.model.structure.parse_layer_spec`), for each of its ``--unit`` kinds."""
        kinds = tuple(kinds)
        return [cls.of(KIND_NAMES[k](b)) for b in blocks for k in KIND_NAMES if k in kinds]

    @classmethod
    def parse(cls, value: str | Iterable[int | Unit] | Removal) -> Removal:
        """``shrink``'s ``--layers``: ``"3,4,7"``, ``"3-5,9"`` (blocks), ``"3.attn,5-6.mlp"`` (sub-layers)
        → the set (blocks checked against the model later); a sequence of units or block numbers is
        taken as it is."""
        if isinstance(value, Removal):
            return value
        if not isinstance(value, str):
            return cls(tuple(value))
        out: set[Unit] = set()
        for part in value.split(","):
            part = part.strip()
            if part:
                out.update(_parse_part(part, value))
        if not out:
            raise UserError("--layers names no layer")
        try:
            return cls(tuple(out))
        except ValueError as exc:
            raise UserError(f"--layers {value!r}: {exc}") from None

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
    def sublayers(self) -> tuple[Unit, ...]:
        """The attention and MLP sub-layers it removes (of blocks it keeps), ascending."""
        return tuple(u for u in self.units if not isinstance(u, Block))

    @property
    def single(self) -> Unit | None:
        """The unit, when it removes exactly one (a one-at-a-time sweep's variant); else None."""
        return self.units[0] if len(self.units) == 1 else None

    @property
    def kind(self) -> str:
        """The kind of its units when they share one (``block``, ``attn``, ``mlp``), ``mixed`` when they
        do not, empty for the full model: the CSVs' ``unit`` column."""
        kinds = {u.kind for u in self.units}
        return kinds.pop() if len(kinds) == 1 else ("mixed" if kinds else "")

    @property
    def single_block(self) -> int | None:
        """The block, when it removes exactly one whole block (a one-at-a-time sweep's variant); else None."""
        return self.units[0].block if len(self.units) == 1 and isinstance(self.units[0], Block) else None

    @property
    def first(self) -> int:
        """The block of its first unit: the fast engine resumes from this block's kept input (after
        the block when it is removed whole, at it when only a sub-layer of it is)."""
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


def _parse_part(part: str, value: str) -> list[Unit]:
    """One comma-separated part of ``--layers``: ``3``, ``3-5``, ``3.attn`` or ``3-5.mlp``."""
    span, dot, kind = part.partition(".")
    if (dot and kind not in KIND_NAMES) or kind == "block":
        hint = kind_hint(kind) if kind else "write 3.attn or 3.mlp"
        raise UserError(f"--layers {value!r}: {part!r} names no unit ({hint})")
    try:
        if "-" in span[1:]:
            a, b = span.split("-", 1)
            lo, hi = int(a), int(b)
            if hi < lo:
                raise ValueError
            blocks = range(lo, hi + 1)
        else:
            blocks = range(int(span), int(span) + 1)
    except ValueError:
        raise UserError(f"--layers must be layer numbers like 3,4,7 or 3-5 (3.attn, 3.mlp: a sub-layer), "
                        f"not {value!r}") from None
    return [KIND_NAMES[kind or "block"](b) for b in blocks]


def _json_unit(value: Any) -> int | str:
    """A unit in JSON: a block number or a unit's text (never a bool or a float)."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise TypeError(f"not a unit: {value!r}")
    return value
