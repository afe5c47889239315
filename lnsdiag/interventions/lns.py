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
block never changes what the others compute. A checkpoint saved with this entry (``save_pretrained``
of a hooked model) is LNS for lnsdiag: :func:`restore_lns` re-installs the hooks after
``from_pretrained`` (``lnsdiag`` does it in ``load_model``), and ``model.placement.norm_placement``
reports it as ``pre-LN+LNS``.

Folded: since the scale multiplies a norm's output, it can live in the norm's own weights instead
(:func:`fold_lns`; w' = s·w and b' = s·b for ``w·x̂ + b`` norms, w' = s·(1 + w) − 1 for Gemma's
``(1 + w)·x̂``), so that any runtime (plain transformers, vLLM, lm-eval) computes the LNS model with
no hook. The record then says so, ``"folded": true`` (``"version": 2``, which an lnsdiag that does not
know folding refuses rather than scaling twice), and :func:`restore_lns` installs nothing. Every
checkpoint lnsdiag writes is folded (``checkpoint.save``, ``checkpoint.export``, the trained twins);
:func:`unfold_lns` goes back to hooks (to keep training with LNS's gradients).

Initialisation: the paper notes that *scaled initialisation* (output projections drawn with
std / sqrt(2·L), GPT-2/Megatron style) conflicts with LNS, which already shrinks deep
updates; it trains LNS with the plain init. :func:`initialize` offers both.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from ..errors import UserError
from ..model.families import OUTPUT_PROJECTIONS
from ..model.patch import Patches, kept, release
from ..model.structure import LayerStack, block_norms, find_layers
from ..model.watch import watch_block

#: The record's version: 1 for hooks (weights unscaled), 2 for a record with ``"folded": true``.
LNS_VERSION = 1
FOLDED_VERSION = 2
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
    """Undo :func:`apply_lns`: drop the hooks and the config record (weights untouched).

    A folded model is refused (its weights carry the scales): :func:`unfold_lns` it first."""
    if is_folded(model):
        raise UserError("this model's LayerNorm Scaling is folded into its norm weights: unfold_lns(model) first, "
                        "then remove_lns")
    release((stack or find_layers(model)).layers, KEPT_AS)
    if hasattr(model.config, "lns"):
        del model.config.lns
    return model


def is_folded(model_or_record: Any) -> bool:
    """Whether an LNS record (or a model's) says the scales are folded into the norm weights."""
    record = model_or_record if isinstance(model_or_record, dict) else lns_config(model_or_record)
    return bool(record and record.get("folded"))


def _check_record(record: dict[str, Any]) -> None:
    version = record.get("version", 1)
    known = FOLDED_VERSION if record.get("folded") else LNS_VERSION
    if record.get("scale", SCALE_RULE) != SCALE_RULE or not isinstance(version, int) or version > known:
        raise UserError(f"this checkpoint's LNS record {record} is of a newer lnsdiag; upgrade lnsdiag")
    if not record.get("norms"):
        raise UserError("the checkpoint's config.lns does not name the norms to scale")


def restore_lns(model: nn.Module, stack: LayerStack | None = None) -> bool:
    """Re-install the LNS hooks a loaded checkpoint's config records; True if it records LNS.

    Call after a plain ``AutoModelForCausalLM.from_pretrained`` of an LNS checkpoint
    (``lnsdiag.model.load.load_model`` does, through ``restore_norms``). Idempotent. A folded
    record gets no hooks: its weights already compute LNS.
    """
    record = lns_config(model)
    if record is None:
        return False
    _check_record(record)
    stack = stack or find_layers(model)
    if record.get("folded"):
        release(stack.layers, KEPT_AS)
        return True
    _install(stack, list(record["norms"]), _record_layers(record, stack))
    return True


def _record_layers(record: dict[str, Any], stack: LayerStack) -> list[int]:
    return [int(i) for i in record.get("layers") or range(1, len(stack) + 1)]


# --- folding the scales into the norm weights ----------------------------------------------

#: How a norm's weight enters its output: ``scale`` for w·x̂ (+ b) (LayerNorm, Llama's RMSNorm),
#: ``one_plus`` for (1 + w)·x̂ (+ b) (Gemma, Gemma2/3).
FoldKind = Literal["scale", "one_plus"]


@dataclass(frozen=True)
class NormFold:
    """One norm whose output LNS scales: where it is, its l, how its weight enters its output."""

    block: int  #: 0-based position in the block stack
    norm: str  #: name inside the block (``input_layernorm``)
    layer: int  #: the 1-based l of the record
    kind: FoldKind
    module: nn.Module

    @property
    def factor(self) -> float:
        return scale_for(self.layer)

    def folded(self, param: str, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` (this norm's ``weight`` or ``bias``) with the scale folded in: a new tensor of the same
        dtype and device, computed in float64 (float32 where float64 is not available) and rounded once."""
        return _apply(tensor, self.factor, self.kind if param == "weight" else "scale")

    def unfolded(self, param: str, tensor: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`folded`."""
        return _apply(tensor, 1.0 / self.factor, self.kind if param == "weight" else "scale")


def _apply(tensor: torch.Tensor, factor: float, kind: str) -> torch.Tensor:
    wide = torch.float32 if tensor.device.type == "mps" else torch.float64
    value = tensor.detach().to(wide)
    value = value * factor if kind == "scale" else (1.0 + value) * factor - 1.0
    return value.to(tensor.dtype)


def _norm_params(module: nn.Module, where: str) -> list[str]:
    """``["weight"]`` or ``["weight", "bias"]``: what folding rescales; a UserError for a norm without a
    learnable weight, or with parameters of other names."""
    params = {name for name, p in module.named_parameters(recurse=False) if p is not None}
    if "weight" not in params:
        has = f"it has only {', '.join(sorted(params))}" if params else "it has no parameters, as with " \
            "elementwise_affine=False"
        raise UserError(f"cannot fold LayerNorm Scaling into {where}: the norm has no learnable weight to carry the "
                        f"scale ({has}); only lnsdiag's hooks compute it")
    if params - {"weight", "bias"}:
        raise UserError(f"cannot fold LayerNorm Scaling into {where}: unknown norm parameters "
                        f"{', '.join(sorted(params - {'weight', 'bias'}))}")
    return sorted(params, reverse=True)  # weight, bias


def fold_kind(module: nn.Module, where: str = "the norm") -> FoldKind:
    """How ``module``'s weight enters its output, found by trying it (not by its class name): a float32
    copy's output must become exactly 0.5 × itself once its weight is folded with 0.5 as ``scale``
    (w·x̂ + b) or as ``one_plus`` ((1 + w)·x̂ + b). A UserError when neither does."""
    params = _norm_params(module, where)
    probe = copy.deepcopy(module).float()
    for hook_dict in (probe._forward_hooks, probe._forward_pre_hooks):
        hook_dict.clear()
    weight = probe.get_parameter("weight")
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn((5, *weight.shape), generator=gen) * 3 + 1).to(weight.device)
    forward = type(probe).forward  # the class's own, whatever the instance has installed

    def run() -> torch.Tensor:
        out = forward(probe, x)
        return (out[0] if isinstance(out, tuple) else out).float()

    with torch.no_grad():
        try:
            reference = run()
        except Exception as exc:  # a norm whose input is not shaped like its weight: not one of the two formulas
            raise UserError(f"cannot fold LayerNorm Scaling into {where}: a copy of it did not run on an input shaped "
                            f"like its weight ({type(exc).__name__}); only lnsdiag's hooks compute it") from exc
        originals = {name: probe.get_parameter(name).detach().clone() for name in params}
        tolerance = 1e-5 * float(reference.abs().max()) + 1e-7
        for kind in ("scale", "one_plus"):
            for name in params:
                probe.get_parameter(name).copy_(_apply(originals[name], 0.5, kind if name == "weight" else "scale"))
            if torch.allclose(run(), 0.5 * reference, rtol=1e-4, atol=tolerance):
                return kind  # type: ignore[return-value]
    raise UserError(f"cannot fold LayerNorm Scaling into {where}: its output is neither w·x̂ + b nor (1 + w)·x̂ + b, "
                    "so only lnsdiag's hooks compute it (load it with lnsdiag's load_model)")


def fold_plan(model: nn.Module, stack: LayerStack | None = None) -> list[NormFold]:
    """The norms whose weights carry LNS once folded, with their l and formula; ``[]`` when the
    model records no LNS or records it folded already (nothing left to fold).

    Exactly the norms the record names, in every block, with the record's l for each block (a
    model rebuilt without some blocks keeps each remaining block's original l). Checked before
    anything is changed: every norm exists, has a learnable weight and a known formula, and no
    weight is shared between two of them (a shared weight cannot carry two scales).
    """
    record = lns_config(model)
    if record is None or record.get("folded"):
        return []
    _check_record(record)
    stack = stack or find_layers(model)
    layers = _record_layers(record, stack)
    if len(layers) != len(stack):
        raise UserError(f"the LNS record lists {len(layers)} layer indices but the model has {len(stack)} blocks")
    family = f"{type(model).__name__} ({getattr(model.config, 'model_type', '?')})"
    kinds: dict[type, FoldKind] = {}
    plan: list[NormFold] = []
    owners: dict[int, str] = {}
    for index, (block, layer) in enumerate(zip(stack.layers, layers, strict=True)):
        for name in record["norms"]:
            module = _norm(block, name)
            where = f"{type(module).__name__} {name!r} of {family}"
            if type(module) not in kinds:
                kinds[type(module)] = fold_kind(module, where)
            for param in _norm_params(module, where):
                tensor = module.get_parameter(param)
                key = tensor.data_ptr()
                here = f"{stack.path}.{index}.{name}.{param}"
                if key in owners:
                    raise UserError(f"cannot fold LayerNorm Scaling into {family}: {here} is the same tensor as "
                                    f"{owners[key]}, which would carry two scales")
                owners[key] = here
            plan.append(NormFold(index, name, int(layer), kinds[type(module)], module))
    return plan


def folded_record(record: dict[str, Any], num_layers: int | None = None) -> dict[str, Any]:
    """The LNS record of a checkpoint whose norm weights carry the scales (explicit ``layers``)."""
    layers = record.get("layers") or list(range(1, (num_layers or 0) + 1))
    return {**record, "layers": [int(i) for i in layers], "folded": True, "version": FOLDED_VERSION}


def fold_lns(model: nn.Module, stack: LayerStack | None = None) -> nn.Module:
    """Fold the LNS scales into the scaled norms' weights (and biases), in place; returns the model.

    Afterwards no hook runs and plain torch / transformers code computes the LNS model
    (``save_pretrained`` writes a checkpoint any runtime computes exactly); ``config.lns`` stays as
    a record marked ``folded``. A model already folded is returned as it is; a model without LNS
    is a UserError.
    """
    if not is_lns(model):
        raise UserError("the model has no LayerNorm Scaling to fold (config.lns is absent)")
    stack = stack or find_layers(model)
    plan = fold_plan(model, stack)
    if not plan:
        return model
    with torch.no_grad():
        for fold in plan:
            for param in _norm_params(fold.module, fold.norm):
                tensor = fold.module.get_parameter(param)
                tensor.copy_(fold.folded(param, tensor))
    release(stack.layers, KEPT_AS)
    model.config.lns = folded_record(model.config.lns, len(stack))
    return model


def unfold_lns(model: nn.Module, stack: LayerStack | None = None) -> nn.Module:
    """The inverse of :func:`fold_lns`: the scales out of the weights and back into hooks, in place
    (what training needs to keep LNS's gradients). A model with LNS hooks is returned as it is."""
    record = lns_config(model)
    if record is None:
        raise UserError("the model has no LayerNorm Scaling to unfold (config.lns is absent)")
    stack = stack or find_layers(model)
    if not record.get("folded"):
        restore_lns(model, stack)
        return model
    unfolded = {k: v for k, v in record.items() if k != "folded"}
    model.config.lns = {**unfolded, "version": LNS_VERSION}
    try:
        plan = fold_plan(model, stack)
    except BaseException:
        model.config.lns = record
        raise
    with torch.no_grad():
        for fold in plan:
            for param in _norm_params(fold.module, fold.norm):
                tensor = fold.module.get_parameter(param)
                tensor.copy_(fold.unfolded(param, tensor))
    restore_lns(model, stack)
    return model


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
