"""Find a model's stack of transformer blocks and remove blocks from it, reversibly.

Removal never touches weights: each removed block's ``forward`` is overridden for the
duration of a ``with removed_layers(...)`` block and restored on exit, exceptions included.

Two ways to remove a block, chosen per call (``mode``):

* ``skip`` returns the block's input unchanged and costs nothing. Exact for any forward
  pass that starts without a KV cache (scoring, perplexity, angular distances).
* ``passthrough`` runs the block and then discards its output. The block still writes its
  KV-cache slot, which cached generation needs: the model asks the cache of some layers
  (layer 0, the first sliding layer, ...) how long the context is, and a skipped block
  leaves its slot empty. Costs the block's compute.
* ``auto`` (default) skips, unless the call carries a KV cache, then passes through.

:func:`build_without_layers` builds the reference: a fresh model constructed from a config
that really has fewer layers, with the remaining weights copied. Tests compare the two.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from .errors import UserError

#: Where the block stack lives, by family. Tried in order; the first ModuleList wins.
LAYER_PATHS: tuple[str, ...] = (
    "model.layers",  # Llama, Mistral, Mixtral, Qwen2/3(-MoE), DeepSeek-V2/V3, Gemma2/3, Phi3
    "model.language_model.layers",  # multimodal wrappers (Gemma3, Llava-style)
    "model.decoder.layers",  # OPT
    "transformer.h",  # GPT-2, GPT-J, Bloom, Falcon
    "gpt_neox.layers",  # GPT-NeoX, Pythia
    "bert.encoder.layer",  # BERT
    "roberta.encoder.layer",
    "encoder.layer",  # bare BertModel
    "transformer.layers",
    "backbone.layers",
    "layers",
    "h",
)

RemovalMode = Literal["auto", "skip", "passthrough"]


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


def configured_layer_count(model: nn.Module) -> int | None:
    """The number of blocks the model's config declares, if it says."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    for name in ("num_hidden_layers", "n_layer", "num_layers"):
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


#: Whether a block class returns a tuple (older transformers) or the hidden states (5.x).
#: Annotations are not reliable (Gemma3's says tuple, it returns a tensor): learnt by
#: running one real block once per class and process.
_RETURNS_TUPLE: dict[type, bool] = {}


#: Keyword names under which blocks receive their KV cache (transformers 4.x and 5.x).
_CACHE_KWARGS = ("past_key_values", "past_key_value", "layer_past")


def _carries_cache(args: tuple, kwargs: dict) -> bool:
    """Whether a block call carries a KV cache it should write (so a removed block must run).

    Only a ``Cache`` object anywhere, or a non-empty legacy cache under a cache keyword, counts:
    other tuples of tensors (rotary ``position_embeddings``) are not caches.
    """
    from transformers.cache_utils import Cache

    if any(isinstance(value, Cache) for value in (*args[1:], *kwargs.values())):
        return True
    return any(kwargs.get(name) is not None and not isinstance(kwargs.get(name), bool) for name in _CACHE_KWARGS)


def _removed_forward(module: nn.Module, mode: RemovalMode):
    real = module.forward  # bound; may itself be an accelerate hook's wrapper
    cls = type(module)

    def forward(*args: Any, **kwargs: Any) -> Any:
        hidden = args[0] if args else kwargs["hidden_states"]
        if (
            mode == "passthrough"
            or (mode == "auto" and _carries_cache(args, kwargs))
            or cls not in _RETURNS_TUPLE
        ):
            out = real(*args, **kwargs)  # fills this block's KV-cache slot; output discarded
            _RETURNS_TUPLE[cls] = isinstance(out, tuple)
        return (hidden,) if _RETURNS_TUPLE[cls] else hidden

    forward.__lnsdiag_removed__ = True  # type: ignore[attr-defined]
    return forward


@contextmanager
def removed_layers(
    model: nn.Module,
    layers: Iterable[int] | int,
    *,
    mode: RemovalMode = "auto",
    stack: LayerStack | None = None,
) -> Iterator[LayerStack]:
    """Remove ``layers`` (0-based) from ``model`` inside the ``with`` block; restore on exit.

    >>> with removed_layers(model, [3]):
    ...     logits = model(ids, use_cache=False).logits

    Pass ``use_cache=False`` when scoring so ``auto`` never pays for a removed block.
    """
    if mode not in ("auto", "skip", "passthrough"):
        raise ValueError(f"mode must be auto, skip or passthrough, not {mode!r}")
    stack = stack or find_layers(model)
    wanted = [layers] if isinstance(layers, int) else list(layers)
    indices = parse_layer_spec(wanted, len(stack)) if wanted else []  # nothing removed: the baseline
    patched: list[tuple[nn.Module, bool, Any]] = []
    try:
        for i in indices:
            module = stack.layers[i]
            if getattr(module.__dict__.get("forward"), "__lnsdiag_removed__", False):
                raise RuntimeError(f"layer {i} is already removed (nested removal of the same layer)")
            patched.append(_override_forward(module, _removed_forward(module, mode)))
        yield stack
    finally:
        _restore_forwards(patched)


def _override_forward(module: nn.Module, forward: Any) -> tuple[nn.Module, bool, Any]:
    """Install ``forward`` on this module instance; return what restores it."""
    saved = (module, "forward" in module.__dict__, module.__dict__.get("forward"))
    module.forward = forward
    return saved


def _restore_forwards(patched: list[tuple[nn.Module, bool, Any]]) -> None:
    for module, had_own, previous in reversed(patched):
        if had_own:
            module.forward = previous
        else:
            module.__dict__.pop("forward", None)


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

    forward.__lnsdiag_removed__ = True  # type: ignore[attr-defined]
    with removed_layers(model, range(index), mode="skip", stack=stack):
        patched = [_override_forward(module, forward)]
        try:
            yield stack
        finally:
            _restore_forwards(patched)


# --- the reference: a model really built without the layers ------------------------------

#: Config fields that hold one entry per layer.
_PER_LAYER_LISTS = ("layer_types", "no_rope_layers", "mlp_layer_types", "attention_layer_types")


def _config_without(config: Any, keep: list[int], total: int) -> Any:
    """A copy of ``config`` describing only the ``keep`` layers, each with its old role."""
    new = copy.deepcopy(config)
    text = new.get_text_config() if hasattr(new, "get_text_config") else new
    new_index = {old: new_i for new_i, old in enumerate(keep)}
    for name in _PER_LAYER_LISTS:
        value = getattr(text, name, None)
        if isinstance(value, (list, tuple)) and len(value) == total:
            setattr(text, name, [value[i] for i in keep])
    # Qwen2/3-MoE: which layers are dense comes from a list and a stride; write it out.
    if hasattr(text, "mlp_only_layers") and hasattr(text, "decoder_sparse_step"):
        step = text.decoder_sparse_step or 1
        dense = [
            i for i in range(total)
            if i in (text.mlp_only_layers or []) or not (text.num_experts > 0 and (i + 1) % step == 0)
        ]
        text.mlp_only_layers = [new_index[i] for i in dense if i in new_index]
        text.decoder_sparse_step = 1
    # DeepSeek-V2/V3: the first k layers are dense.
    if isinstance(getattr(text, "first_k_dense_replace", None), int):
        text.first_k_dense_replace = sum(1 for i in keep if i < text.first_k_dense_replace)
    # LayerNorm Scaling (lnsdiag.lns): the kept blocks keep their original l.
    lns = getattr(new, "lns", None)
    if isinstance(lns, dict):
        scales = [int(i) for i in (lns.get("layers") or range(1, total + 1))]
        new.lns = {**lns, "layers": [scales[i] for i in keep]}
    text.num_hidden_layers = len(keep)
    return new


def build_without_layers(model: nn.Module, layers: Iterable[int], stack: LayerStack | None = None) -> nn.Module:
    """Build a new model of the same class whose config has the layers really removed.

    Remaining weights are copied (strictly: every tensor must find its place, so a config
    that misdescribes a layer's kind fails loudly). A LayerNorm-Scaling or Post-LN model stays
    one, each kept block with its original scale. The original is untouched.
    """
    stack = stack or find_layers(model)
    total = len(stack)
    drop = set(parse_layer_spec(list(layers), total))
    keep = [i for i in range(total) if i not in drop]
    config = _config_without(model.config, keep, total)
    param = next(model.parameters())
    new_model = type(model)(config).to(dtype=param.dtype, device=param.device)
    prefix = stack.path + "."
    state = {}
    new_index = {old: new_i for new_i, old in enumerate(keep)}
    for key, value in model.state_dict().items():
        if key.startswith(prefix):
            idx, _, rest = key[len(prefix):].partition(".")
            if int(idx) in drop:
                continue
            key = f"{prefix}{new_index[int(idx)]}.{rest}"
        state[key] = value
    new_model.load_state_dict(state, strict=True)
    from .lns import restore_lns

    restore_lns(new_model)  # LNS hooks / Post-LN forwards, as the reduced config records them
    if getattr(model, "generation_config", None) is not None:
        new_model.generation_config = copy.deepcopy(model.generation_config)
    return new_model.eval()


# --- norm placement, by watching a block run ---------------------------------------------

def _norm_modules(block: nn.Module) -> list[tuple[str, nn.Module]]:
    found = []
    for name, mod in block.named_modules():
        if not name:
            continue
        cls = type(mod).__name__.lower()
        if isinstance(mod, nn.LayerNorm) or (
            "norm" in cls and not any("norm" in type(c).__name__.lower() for c in mod.children())
        ):
            found.append((name, mod))
    return found


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.allclose(a.float(), b.float(), rtol=1e-3, atol=1e-5)


def norm_placement(model: nn.Module, stack: LayerStack | None = None) -> str:
    """Where a block normalises, read off one forward pass of a middle block.

    ``pre-LN`` (the norm sees the residual stream, the output is not normalised), ``post-LN``
    (the block's output is a norm's output: BERT, original Transformer), ``sandwich`` (pre-LN
    plus a norm on each sub-layer's output before the residual add: Gemma2/3), ``no-norm``.
    ``LNS`` is appended when the model records LayerNorm Scaling in its config.
    """
    stack = stack or find_layers(model)
    block = stack.layers[len(stack) // 2]
    norms = _norm_modules(block)
    if not norms:
        return "no-norm"
    seen: dict[str, Any] = {}
    io: list[tuple[torch.Tensor, torch.Tensor]] = []

    def block_in(_m: nn.Module, args: tuple, kwargs: dict) -> None:
        seen.setdefault("x", args[0] if args else kwargs["hidden_states"])

    def block_out(_m: nn.Module, _a: tuple, out: Any) -> None:
        seen.setdefault("out", out[0] if isinstance(out, tuple) else out)

    def norm_io(_m: nn.Module, args: tuple, out: Any) -> None:
        io.append((args[0], out if torch.is_tensor(out) else out[0]))

    hooks = [
        block.register_forward_pre_hook(block_in, with_kwargs=True),
        block.register_forward_hook(block_out),
        *(mod.register_forward_hook(norm_io) for _, mod in norms),
    ]
    try:
        device = next(model.parameters()).device
        vocab = getattr(model.config, "vocab_size", 100) or 100
        ids = (torch.arange(1, 9, device=device) * 7 % max(vocab - 1, 1)).unsqueeze(0) + 1
        with torch.no_grad():
            model(input_ids=ids, **no_cache_kwargs(model))
    finally:
        for h in hooks:
            h.remove()
    x, out = seen["x"], seen["out"]
    pre = any(_close(inp, x) for inp, _ in io)
    post = any(_close(o, out) for _, o in io)
    sandwich = pre and any(_close(out - o, inp) for _, o in io for inp, _ in io if o.shape == out.shape)
    kind = "post-LN" if post and not pre else "sandwich" if sandwich else "pre-LN" if pre else "other"
    if getattr(model.config, "lns", None):
        kind += "+LNS"
    return kind


def no_cache_kwargs(model: nn.Module) -> dict[str, bool]:
    """``{"use_cache": False}`` for models that take it: a scoring pass builds no KV cache,
    so removed blocks are skipped for free (see ``removed_layers``)."""
    try:
        takes = "use_cache" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        takes = False
    return {"use_cache": False} if takes else {}
