"""LayerNorm Scaling (LNS): each block's pre-sublayer norm output times 1/sqrt(l).

The fix of "The Curse of Depth" (arXiv 2502.05795): in block l (1-based) both norms that
feed a sub-layer (before attention, before the MLP) have their output multiplied by
1/sqrt(l), so deep blocks add smaller updates and the residual stream's variance stops
growing exponentially with depth.

Implemented as forward hooks on the existing norm modules of an ordinary HF model: no
parameter is added and no class changes, so the model trains with any loop (the one in
:mod:`lnsdiag.demo.training`, HF ``Trainer``, accelerate, gradient checkpointing) and saves as a
normal checkpoint. The hooks are installed on one :class:`~lnsdiag.model.patch.Patches` handle
kept with the block stack, which :func:`remove_lns` restores. The scaling is recorded in
``model.config.lns``, for example::

    {"scale": "1/sqrt(l)", "norms": ["input_layernorm", "post_attention_layernorm"],
     "layers": [1, 2, ..., L], "version": 1}

``norms`` names the scaled norms inside each block; ``layers`` is the l of each block, in
stack order. ``layers`` is explicit so that a model rebuilt without some blocks
(``checkpoint.save.build_without_layers``) keeps every remaining block's original scale: removing a
block never changes what the others compute. A checkpoint saved with this entry is LNS;
:func:`restore_lns` re-installs the hooks after ``from_pretrained`` (``lnsdiag`` does it in
``load_model``), and ``model.placement.norm_placement`` reports it as ``pre-LN+LNS``.

Initialisation: the paper notes that *scaled initialisation* (output projections drawn with
std / sqrt(2·L), GPT-2/Megatron style) conflicts with LNS, which already shrinks deep
updates; it trains LNS with the plain init. :func:`initialize` offers both.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import nn

from ..errors import UserError
from ..model.families import OUTPUT_PROJECTIONS
from ..model.patch import Patches, kept, release
from ..model.structure import LayerStack, block_norms, find_layers
from ..model.watch import watch_block

LNS_VERSION = 1
SCALE_RULE = "1/sqrt(l)"
InitKind = Literal["default", "scaled"]
INITS: tuple[str, ...] = ("default", "scaled")
#: The name the scale hooks' :class:`~lnsdiag.model.patch.Patches` handle is kept under, on the block stack.
KEPT_AS = "lns"


class _Scale:
    """A forward hook multiplying a norm's output by a constant.

    A small class (not a closure over the module) so deep copies and pickles of the model
    keep working hooks.
    """

    def __init__(self, factor: float) -> None:
        self.factor = factor

    def __call__(self, _module: nn.Module, _args: tuple, output: Any) -> Any:
        if isinstance(output, tuple):
            return (output[0] * self.factor, *output[1:])
        return output * self.factor

    def __repr__(self) -> str:
        return f"LNS(×{self.factor:.4g})"


def scale_for(layer: int) -> float:
    """1/sqrt(l) for the 1-based layer index l."""
    if layer < 1:
        raise ValueError(f"LNS layer indices are 1-based, got {layer}")
    return 1.0 / math.sqrt(layer)


# --- finding the two pre-sublayer norms ----------------------------------------------------

def _near(a: torch.Tensor, b: torch.Tensor, tolerance: float) -> bool:
    """‖a − b‖ ≤ tolerance, for tensors holding the same entries in any shape."""
    if a.numel() != b.numel():
        return False
    return float((a.float().reshape(-1) - b.float().reshape(-1)).norm()) <= tolerance


def find_pre_norms(model: nn.Module, stack: LayerStack | None = None) -> list[str]:
    """Names (inside a block) of the norms whose output feeds a sub-layer, in call order.

    Found by watching a middle block run once: a norm is pre-sublayer when its input is a
    residual-stream state, that is the block input x, or a state h such that the block
    output minus h is the output of one of the block's own sub-modules (h + MLP(norm(h))).
    This finds input_layernorm / post_attention_layernorm in Llama, Mistral, Qwen2/3,
    Mixtral and DeepSeek, input_layernorm / pre_feedforward_layernorm in Gemma2/3
    (whose other two norms act on sub-layer outputs), ln_1 / ln_2 in GPT-2,
    self_attn_layer_norm / final_layer_norm in OPT.
    """
    stack = stack or find_layers(model)
    block = stack.layers[len(stack) // 2]
    norms = dict(block_norms(block))
    if not norms:
        raise UserError(f"{type(block).__name__} has no norm modules: LayerNorm Scaling needs pre-LN blocks")
    children = dict(block.named_children())
    try:
        run = watch_block(model, block, {**norms, **children})  # probe: eval mode, dropout would hide the adds
    except Exception as exc:
        raise UserError(
            f"cannot watch a block of {type(model).__name__} run to find its norms ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200] if str(exc) else ''}); name them with norms=[...]"
        ) from exc
    x, out = run.input, run.output
    if x is None or out is None:
        raise UserError(f"{type(model).__name__}: the middle block did not run; name the norms with norms=[...]")
    norm_inputs = [(name, value) for name, value in run.inputs.items() if name in norms]
    child_outputs = [(name, value) for name, value in run.outputs.items() if name in children]
    # The block input reaches a pre-LN norm untouched; a residual add is exact up to the rounding of
    # its result, so out - h equals the sub-layer's output to a few ulps of out.
    same = 1e-6 * float(x.float().norm())
    rounding = 4 * torch.finfo(out.dtype).eps * float(out.float().norm()) if out.is_floating_point() else 0.0
    found: list[str] = []
    for name, inp in norm_inputs:
        if inp.numel() != x.numel():
            continue
        residual = _near(inp, x, same) or any(
            _near(out - inp.reshape(out.shape), value, rounding) for child, value in child_outputs if child != name
        )
        if residual:
            found.append(name)
    if not found:
        raise UserError(
            f"{type(block).__name__} is not a pre-LN block (no norm sees the residual stream): LayerNorm "
            "Scaling applies to pre-LN models such as Llama, Mistral and Qwen"
        )
    if len(found) > 2:
        raise UserError(f"{type(block).__name__}: found {len(found)} pre-sublayer norms ({', '.join(found)}); "
                        "name the two to scale with norms=[...]")
    return found


# --- applying, removing, restoring ---------------------------------------------------------

def _install(stack: LayerStack, norms: Sequence[str], layers: Sequence[int]) -> None:
    """Scale hooks on the named norms of every block, on one handle kept with the stack (any
    earlier LNS handle restored first, so re-installing never scales twice)."""
    if len(layers) != len(stack):
        raise UserError(
            f"the LNS record lists {len(layers)} layer indices but the model has {len(stack)} blocks "
            "(rebuild with lnsdiag.rebuild.build_without_layers, which keeps each block's l)"
        )
    targets = [(_norm(block, name), scale_for(int(layer)))
               for block, layer in zip(stack.layers, layers, strict=True) for name in norms]
    release(stack.layers, KEPT_AS)
    patches = Patches().keep_on(stack.layers, KEPT_AS)
    for module, factor in targets:
        patches.hook(module, _Scale(factor))


def _norm(block: nn.Module, name: str) -> nn.Module:
    try:
        return block.get_submodule(name)
    except AttributeError as exc:
        raise UserError(f"{type(block).__name__} has no norm {name!r} to scale") from exc


def has_lns_hooks(model: nn.Module, stack: LayerStack | None = None) -> bool:
    """Whether LNS hooks are installed (what actually runs, whatever the config says)."""
    stack = stack or find_layers(model)
    return bool(kept(stack.layers, KEPT_AS))


def lns_config(model: nn.Module) -> dict[str, Any] | None:
    """The LNS record of a model's config, or None."""
    value = getattr(getattr(model, "config", None), "lns", None)
    return value if isinstance(value, dict) and value else None


def is_lns(model: nn.Module) -> bool:
    return lns_config(model) is not None


def apply_lns(
    model: nn.Module,
    *,
    norms: Sequence[str] | None = None,
    layers: Sequence[int] | None = None,
    stack: LayerStack | None = None,
) -> nn.Module:
    """Turn a pre-LN model into an LNS model in place (hooks + ``config.lns``); returns it.

    ``norms`` names the norms to scale inside each block (found by inspection when not
    given); ``layers`` is the 1-based l of each block (default 1..L).
    """
    stack = stack or find_layers(model)
    if is_lns(model) or has_lns_hooks(model, stack):
        raise UserError("the model already has LayerNorm Scaling (remove_lns first to change it)")
    if getattr(getattr(model, "config", None), "post_ln", None):
        raise UserError("LayerNorm Scaling applies to pre-LN blocks; this model is a Post-LN variant")
    names = list(norms) if norms else find_pre_norms(model, stack)
    depth = [int(i) for i in layers] if layers is not None else list(range(1, len(stack) + 1))
    if any(i < 1 for i in depth):
        raise UserError(f"LNS layer indices are 1-based; got {depth}")
    _install(stack, names, depth)
    model.config.lns = {"scale": SCALE_RULE, "norms": names, "layers": depth, "version": LNS_VERSION}
    return model


def remove_lns(model: nn.Module, stack: LayerStack | None = None) -> nn.Module:
    """Undo :func:`apply_lns`: drop the hooks and the config record (weights untouched)."""
    release((stack or find_layers(model)).layers, KEPT_AS)
    if hasattr(model.config, "lns"):
        del model.config.lns
    return model


def restore_lns(model: nn.Module, stack: LayerStack | None = None) -> bool:
    """Re-install the LNS hooks a loaded checkpoint's config records; True if it records LNS.

    Call after a plain ``AutoModelForCausalLM.from_pretrained`` of an LNS checkpoint
    (``lnsdiag.model.load.load_model`` does, through ``restore_norms``). Idempotent.
    """
    record = lns_config(model)
    if record is None:
        return False
    if record.get("scale", SCALE_RULE) != SCALE_RULE or int(record.get("version", 1)) > LNS_VERSION:
        raise UserError(f"this checkpoint's LNS record {record} is of a newer lnsdiag; upgrade lnsdiag")
    stack = stack or find_layers(model)
    norms = record.get("norms")
    if not norms:
        raise UserError("the checkpoint's config.lns does not name the norms to scale")
    layers = record.get("layers") or list(range(1, len(stack) + 1))
    _install(stack, list(norms), [int(i) for i in layers])
    return True


def layer_scales(model: nn.Module) -> list[float]:
    """The factor each block's norms are multiplied by (1.0 everywhere without LNS)."""
    stack = find_layers(model)
    record = lns_config(model)
    if record is None:
        return [1.0] * len(stack)
    return [scale_for(int(i)) for i in record.get("layers") or range(1, len(stack) + 1)]


# --- initialisation ------------------------------------------------------------------------

def check_init(init: str) -> str:
    """``init`` if it names an initialisation (``default`` or ``scaled``), else a UserError."""
    if init not in INITS:
        raise UserError(f"unknown init {init!r}: --init must be {' or '.join(INITS)}")
    return init


def initialize(model: nn.Module, init: str = "default", *, stack: LayerStack | None = None) -> nn.Module:
    """Initialise a freshly built model for training (in place, from torch's global RNG).

    ``default`` keeps the model's own init (HF: every linear N(0, initializer_range²)), the
    paper's choice with LNS. ``scaled`` re-draws each sub-layer's output projection
    (o_proj, down_proj, ...) with std initializer_range / sqrt(2·L), the depth-scaled init of
    GPT-2 and Megatron, which the paper reports conflicts with LNS (both shrink deep updates).
    """
    check_init(init)
    if init == "default":
        return model
    stack = stack or find_layers(model)
    std = float(getattr(model.config, "initializer_range", 0.02) or 0.02) / math.sqrt(2 * len(stack))
    touched = 0
    with torch.no_grad():
        for block in stack.layers:
            for name, module in block.named_modules():
                weight = getattr(module, "weight", None)
                if name.rsplit(".", 1)[-1] in OUTPUT_PROJECTIONS and isinstance(weight, torch.Tensor):
                    weight.normal_(0.0, std)
                    touched += 1
    if touched == 0:
        raise UserError(f"scaled init: no output projection ({', '.join(OUTPUT_PROJECTIONS)}) found in "
                        f"{type(stack.layers[0]).__name__}")
    return model
