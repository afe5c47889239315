"""What a model is made of: its block stack, its text config, a block's input, its norms and
sub-layers — found by looking; the names looking cannot find are in :mod:`.families`.

Every other module asks here (removal, the reference build, lns, postln, the measurements, the
engine), so which submodule counts as a norm, or where a block's input is, is decided once.
How a block normalises is read off a watched forward pass: :mod:`.placement`.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import UserError
from .families import (
    ATTENTION_NAMES,
    LAYER_COUNT_FIELDS,
    LAYER_PATHS,
    MLP_NAMES,
    SUBLAYER_OUTPUTS,
    SUBLAYER_POST_NORMS,
)


@dataclass
class LayerStack:
    """The block stack of a model: where it is and its modules."""

    path: str
    layers: nn.ModuleList

    def __len__(self) -> int:
        return len(self.layers)


def _get(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def text_config(model_or_config: Any) -> Any:
    """The config of the language model itself (a multimodal config's text part)."""
    config = getattr(model_or_config, "config", model_or_config)
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def configured_layer_count(model: nn.Module) -> int | None:
    """The number of blocks the model's config declares, if it says."""
    if getattr(model, "config", None) is None:
        return None
    config = text_config(model)
    for name in LAYER_COUNT_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


def find_layers(model: nn.Module, layers_path: str | None = None) -> LayerStack:
    """Locate the stack of transformer blocks.

    ``layers_path`` (dotted, e.g. ``model.layers``) overrides discovery. Without it the
    known paths are tried, then any single ModuleList whose length equals the layer count
    the config declares.
    """
    if layers_path:
        try:
            found = _get(model, layers_path)
        except AttributeError as exc:
            raise UserError(f"--layers-path {layers_path}: {type(model).__name__} has no such attribute") from exc
        if not isinstance(found, nn.ModuleList) or len(found) == 0:
            raise UserError(f"--layers-path {layers_path} is a {type(found).__name__}, not a list of blocks")
        return LayerStack(layers_path, found)
    for path in LAYER_PATHS:
        try:
            found = _get(model, path)
        except AttributeError:
            continue
        if isinstance(found, nn.ModuleList) and len(found) > 0:
            return LayerStack(path, found)
    count = configured_layer_count(model)
    if count:
        candidates = [
            (name, mod) for name, mod in model.named_modules()
            if isinstance(mod, nn.ModuleList) and len(mod) == count
            and len({type(m) for m in mod}) == 1
        ]
        if len(candidates) == 1:
            return LayerStack(*candidates[0])
    raise UserError(
        f"cannot find the layer stack of {type(model).__name__}: tried "
        + ", ".join(LAYER_PATHS)
        + "; pass --layers-path DOTTED.PATH (e.g. model.layers)"
    )


def parse_layer_spec(spec: str | Sequence[int] | None, num_layers: int) -> list[int]:
    """Turn ``"0-31"``, ``"0,4,8"``, ``"28-"``, ``"all"`` or a list into sorted indices.

    Indices are 0-based; ranges include both ends; negative indices count from the end.
    """
    if spec is None or (isinstance(spec, str) and spec.strip().lower() in ("", "all")):
        return list(range(num_layers))
    last = num_layers - 1
    if isinstance(spec, str):
        out: set[int] = set()
        for part in spec.replace(" ", "").split(","):
            if not part:
                continue
            try:
                if "-" in part.lstrip("-"):
                    head, _, tail = part.lstrip("-").partition("-")
                    start = int(("-" if part.startswith("-") else "") + head)
                    stop = int(tail) if tail else last
                    if start < 0:
                        start += num_layers
                    if start > stop:
                        raise UserError(f"--layers {spec!r}: range {part} runs backwards")
                    chunk = range(start, stop + 1)
                else:
                    chunk = [int(part)]
            except ValueError as exc:
                raise UserError(
                    f"--layers {spec!r} is malformed: use ranges and lists like 0-31 or 0,4,8"
                ) from exc
            out.update(chunk)
        indices: Iterable[int] = out
    else:
        indices = spec
    result = []
    for i in indices:
        j = i + num_layers if i < 0 else i
        if not 0 <= j < num_layers:
            raise UserError(f"layer {i} is out of range: the model has {num_layers} layers (0-{last})")
        result.append(j)
    if not result:
        raise UserError(f"--layers {spec!r} selects no layer")
    return sorted(set(result))


# --- inside a block --------------------------------------------------------------------------

def block_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden states a block was called with (positionally or as ``hidden_states``)."""
    return args[0] if args else kwargs["hidden_states"]


def first_tensor(value: Any) -> torch.Tensor | None:
    """A module's main output: the tensor itself, or the first element of a tuple."""
    if torch.is_tensor(value):
        return value
    if isinstance(value, (tuple, list)) and value and torch.is_tensor(value[0]):
        return value[0]
    return None


def is_norm(module: nn.Module) -> bool:
    """A normalisation module: LayerNorm/GroupNorm, or any class named like a norm that holds
    no norm of its own (RMSNorm of every family, Gemma's, DeepSeek's...)."""
    if isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
        return True
    name = type(module).__name__.lower()
    return "norm" in name and not any("norm" in type(c).__name__.lower() for c in module.children())


def block_norms(block: nn.Module) -> list[tuple[str, nn.Module]]:
    """The norms inside a block, by their names relative to it, in definition order."""
    return [(name, mod) for name, mod in block.named_modules() if name and is_norm(mod)]


def sublayers(block: nn.Module) -> dict[str, str]:
    """Names of a block's attention and MLP children (``{"attention": "self_attn", "mlp": "mlp"}``),
    for the families whose naming is known; a missing key means not found."""
    children = dict(block.named_children())
    out = {}
    for role, names in (("attention", ATTENTION_NAMES), ("mlp", MLP_NAMES)):
        found = next((n for n in names if n in children), None)
        if found is not None:
            out[role] = found
    return out


@dataclass(frozen=True)
class SublayerSite:
    """Where a block's sub-layer (``attn`` or ``mlp``) meets the residual stream: ``module``, whose
    (first) output is the sub-layer's update before any ``post_norm`` (a sandwich norm) and the add.
    ``name`` is ``module``'s dotted name in the block."""

    kind: str
    name: str
    module: nn.Module
    post_norm: nn.Module | None = None


def sublayer_site(block: nn.Module, kind: str) -> SublayerSite:
    """The site of ``block``'s ``kind`` sub-layer (``attn`` or ``mlp``): the family's table entry
    (:data:`~.families.SUBLAYER_OUTPUTS`), else its attention / MLP child. A block where neither
    names it cannot be split: one line, naming what was looked for."""
    cls = type(block).__name__
    dotted = SUBLAYER_OUTPUTS.get(cls, {}).get(kind) or sublayers(block).get("attention" if kind == "attn" else kind)
    if dotted is None:
        names = ATTENTION_NAMES if kind == "attn" else MLP_NAMES
        raise UserError(f"cannot remove the {kind} sub-layer of {cls} blocks: none of their modules is named "
                        f"{', '.join(names)} (lnsdiag.model.families.SUBLAYER_OUTPUTS tells it where it is)")
    post = SUBLAYER_POST_NORMS.get(cls, {}).get(kind)
    return SublayerSite(kind, dotted, _get(block, dotted), _get(block, post) if post else None)


def no_cache_kwargs(model: nn.Module) -> dict[str, bool]:
    """``{"use_cache": False}`` for models that take it: a scoring pass builds no KV cache,
    so removed blocks are skipped for free (see ``interventions.removal.removed_layers``)."""
    try:
        takes = "use_cache" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        takes = False
    return {"use_cache": False} if takes else {}


def probe(model: nn.Module) -> None:
    """Run 8 fixed tokens through the model (eval mode, no grad, no cache), for hooks to watch.

    The training/eval mode is restored afterwards (dropout would hide a block's residual adds).
    """
    device = next(model.parameters()).device
    vocab = getattr(model.config, "vocab_size", 100) or 100
    ids = (torch.arange(1, 9, device=device) * 7 % max(vocab - 1, 1)).unsqueeze(0) + 1
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(input_ids=ids, **no_cache_kwargs(model))
    finally:
        model.train(training)
