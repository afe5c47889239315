"""What a sweep scores: a model variant, named by the blocks it removes.

Kept apart so that one value type can replace it without touching the engines.
"""

from __future__ import annotations

#: A model variant: ``None`` (the full model), one removed block, or a tuple of removed blocks.
Variant = int | tuple[int, ...] | None


def removal_set(variant: Variant) -> tuple[int, ...]:
    """The 0-based blocks a variant removes, ascending (``()`` for the full model)."""
    if variant is None:
        return ()
    if isinstance(variant, int):
        return (variant,)
    return tuple(sorted(int(i) for i in variant))


def variant_label(variant: Variant) -> str:
    """How progress names a variant while it is scored."""
    blocks = removal_set(variant)
    if not blocks:
        return "baseline"
    return f"without layer {blocks[0]}" if len(blocks) == 1 else f"without layers {','.join(map(str, blocks))}"
