"""Remove blocks, or their attention / MLP sub-layers, from a model, reversibly: context managers only.

Removal never touches weights: each removed block's ``forward`` is overridden (through a
:class:`~lnsdiag.model.patch.Patches` handle) for the duration of a ``with removed_layers(...)``
block and restored on exit, exceptions included. A removed sub-layer's site
(:func:`~lnsdiag.model.structure.sublayer_site`: the module whose output is its update to the
residual stream, and a sandwich norm after it) returns zeros of its output's shape instead, so
the block adds nothing for it — the same computation as its output projection zeroed
(:func:`lnsdiag.checkpoint.reference.build_without_units`).

Two ways to remove a block, chosen per call (``mode``):

* ``skip`` returns the block's input unchanged and costs nothing. Exact for any forward
  pass that starts without a KV cache (scoring, perplexity, angular distances).
* ``passthrough`` runs the block and then discards its output. The block still writes its
  KV-cache slot, which cached generation needs: the model asks the cache of some layers
  (layer 0, the first sliding layer, ...) how long the context is, and a skipped block
  leaves its slot empty. Costs the block's compute.
* ``auto`` (default) skips, unless the call carries a KV cache, then passes through.

A removed MLP is always skipped (it writes no cache); a removed attention follows ``mode`` as a
block does.

What is removed is a :class:`~lnsdiag.interventions.units.Removal` (or plain block numbers).
The reference every removal is tested against, a model really built without the blocks,
is :func:`lnsdiag.checkpoint.reference.build_without_layers`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import nn

from ..model.families import CACHE_KWARGS
from ..model.patch import overrides_lifted, patched, patched_forward, tensors_lifted
from ..model.structure import LayerStack, block_input, find_layers, parse_layer_spec, sublayer_site
from .units import Removal

RemovalMode = Literal["auto", "skip", "passthrough"]
#: Tags of the forwards installed here: a block removed, and the block a pass resumes at.
REMOVED, RESUMED = "removed", "resumed"
#: Tag of weights a variant holds beyond its removal (a heal folded into the kept blocks): they are
#: part of the variant, so :func:`removals_suspended` lifts them with the removals.
VARIANT_WEIGHTS = "variant-weights"


#: Whether a block class returns a tuple (older transformers) or the hidden states (5.x).
#: Annotations are not reliable (Gemma3's says tuple, it returns a tensor): learnt by
#: running one real block once per class and process.
_RETURNS_TUPLE: dict[type, bool] = {}


def _carries_cache(args: tuple, kwargs: dict) -> bool:
    """Whether a block call carries a KV cache it should write (so a removed block must run).

    Only a ``Cache`` object anywhere, or a non-empty legacy cache under a cache keyword, counts:
    other tuples of tensors (rotary ``position_embeddings``) are not caches.
    """
    from transformers.cache_utils import Cache

    if any(isinstance(value, Cache) for value in (*args[1:], *kwargs.values())):
        return True
    return any(kwargs.get(name) is not None and not isinstance(kwargs.get(name), bool) for name in CACHE_KWARGS)


def _removed_forward(module: nn.Module, mode: RemovalMode) -> Callable[..., Any]:
    real = module.forward  # bound; may itself be an accelerate hook's wrapper
    cls = type(module)

    def forward(*args: Any, **kwargs: Any) -> Any:
        hidden = block_input(args, kwargs)
        if (
            mode == "passthrough"
            or (mode == "auto" and _carries_cache(args, kwargs))
            or cls not in _RETURNS_TUPLE
        ):
            out = real(*args, **kwargs)  # fills this block's KV-cache slot; output discarded
            _RETURNS_TUPLE[cls] = isinstance(out, tuple)
        return (hidden,) if _RETURNS_TUPLE[cls] else hidden

    return forward


#: A sub-layer site class's output form, learnt by running one once per class and process: the
#: length of the tuple it returns, or None for a plain tensor.
_SITE_FORM: dict[type, int | None] = {}


class SilencedSite:
    """A removed sub-layer site's forward: zeros shaped as its update (a tuple's other entries None:
    what a block discards, attention weights). The real one runs (output discarded) the first time
    a class is seen, to learn its output form, and when ``mode`` passes through or (``auto``) a KV
    cache is carried, so an attention still fills its cache slot.

    A small class holding its module (not a closure), so a deep copy of the model silences its own;
    also the skip a pruned checkpoint's recorded sub-layers get (:mod:`.pruned`)."""

    def __init__(self, module: nn.Module, mode: RemovalMode) -> None:
        self.module, self.mode = module, mode
        self.real = module.__dict__.get("forward")  # an override or an accelerate wrapper; None: the class's
        self.width = getattr(module, "out_features", None) or getattr(module, "nf", None)  # Linear / GPT-2 Conv1D

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        hidden = block_input(args, kwargs)
        cls = type(self.module)
        runs = self.mode == "passthrough" or (self.mode == "auto" and _carries_cache(args, kwargs))
        if runs or cls not in _SITE_FORM:
            real = self.real if self.real is not None else cls.forward.__get__(self.module)
            out = real(*args, **kwargs)
            _SITE_FORM[cls] = len(out) if isinstance(out, tuple) else None
        zeros = hidden.new_zeros((*hidden.shape[:-1], self.width) if self.width else hidden.shape)
        form = _SITE_FORM[cls]
        return zeros if form is None else (zeros, *([None] * (form - 1)))


@contextmanager
def removed_layers(
    model: nn.Module,
    layers: Removal | Iterable[int] | int,
    *,
    mode: RemovalMode = "auto",
    stack: LayerStack | None = None,
) -> Iterator[LayerStack]:
    """Remove ``layers`` from ``model`` inside the ``with`` block; restore on exit.

    ``layers`` is a :class:`~lnsdiag.interventions.units.Removal` (blocks and sub-layers), or 0-based
    block numbers (one or several; negative ones count from the end).

    >>> with removed_layers(model, [3]):
    ...     logits = model(ids, use_cache=False).logits

    Pass ``use_cache=False`` when scoring so ``auto`` never pays for a removed block.
    """
    if mode not in ("auto", "skip", "passthrough"):
        raise ValueError(f"mode must be auto, skip or passthrough, not {mode!r}")
    stack = stack or find_layers(model)
    with patched() as patches:
        for i in _blocks(layers, len(stack)):
            module = stack.layers[i]
            if patched_forward(module) in (REMOVED, RESUMED):
                raise RuntimeError(f"layer {i} is already removed (nested removal of the same layer)")
            patches.forward(module, _removed_forward(module, mode), tag=REMOVED)
        for unit in layers.sublayers if isinstance(layers, Removal) else ():
            if not 0 <= unit.block < len(stack):
                raise IndexError(f"{unit}: the model has {len(stack)} layers (0-{len(stack) - 1})")
            site = sublayer_site(stack.layers[unit.block], unit.kind)
            if patched_forward(site.module) == REMOVED:
                raise RuntimeError(f"{unit} is already removed (nested removal of the same sub-layer)")
            silenced = SilencedSite(site.module, mode if unit.kind == "attn" else "skip")
            patches.forward(site.module, silenced, tag=REMOVED)
            if site.post_norm is not None:
                patches.forward(site.post_norm, torch.zeros_like, tag=REMOVED)
        yield stack


def _blocks(layers: Removal | Iterable[int] | int, num_layers: int) -> list[int]:
    """The whole blocks ``layers`` names, checked against a stack of ``num_layers``; none for the full
    model (or a removal of sub-layers only)."""
    if isinstance(layers, Removal):
        wanted = list(layers.blocks)
    else:
        wanted = [layers] if isinstance(layers, int) else list(layers)
    return parse_layer_spec(wanted, num_layers) if wanted else []


@contextmanager
def resumed_at(model: nn.Module, index: int, state: torch.Tensor, *, stack: LayerStack | None = None
               ) -> Iterator[LayerStack]:
    """Run the model as if block ``index`` had output ``state``: blocks before it are skipped.

    The fast sweep keeps x_i (block i's input) from the baseline pass; resuming at i with
    ``state = x_i`` is the model without block i, computed from block i+1 on only. Masks,
    position embeddings, final norm and head are the model's own, as in any forward.
    """
    stack = stack or find_layers(model)
    module = stack.layers[index]
    cls = type(module)
    real = module.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        if cls not in _RETURNS_TUPLE:  # learn the block's output form once per class
            _RETURNS_TUPLE[cls] = isinstance(real(*args, **kwargs), tuple)
        return (state,) if _RETURNS_TUPLE[cls] else state

    with removed_layers(model, range(index), mode="skip", stack=stack), patched() as patches:
        patches.forward(module, forward, tag=RESUMED)
        yield stack


@contextmanager
def removals_suspended(model: nn.Module, *, stack: LayerStack | None = None) -> Iterator[None]:
    """The full model for the duration, inside a removal: every removed block's own forward is
    back until the ``with`` block ends, then removed again (exceptions included).

    The naive engine scores a variant with its blocks removed; a scorer that compares the
    variant with the full model (KL, top-1 agreement) runs the full model on the same batch here.
    Only the variant is suspended (its removals, and weights it holds: a heal's,
    :data:`VARIANT_WEIGHTS`): what the model is (LayerNorm Scaling, Post-LN, a pruned checkpoint's
    skipped sub-layers) stays. Every module of the model is looked at, so removals made on another
    view of the stack (a greedy step's) are lifted too; ``stack`` is not needed.
    """
    modules = list(model.modules())  # every block and sub-layer site, whatever view of the stack a caller holds
    with overrides_lifted(modules, (REMOVED, RESUMED)), tensors_lifted(model, (VARIANT_WEIGHTS,)):
        yield
