"""lm-eval's model type ``lnsdiag``: stock HFLM with some blocks, or their attention / MLP sub-layers,
removed by lnsdiag's hooks.

The evaluation is lm-eval's own, on the model as ``from_pretrained`` loads it (every HFLM
argument: revision, dtype, batch size, device, parallelize, trust_remote_code, ...), with the
units ``remove`` names taken out by :func:`~lnsdiag.interventions.removal.removed_layers` around
each forward lm-eval makes (:meth:`RemovalHFLM._model_call` for log-likelihoods, rolling
windows and batch-size detection; :meth:`RemovalHFLM._model_generate` for ``generate_until``,
KV cache included: a removed block or attention still runs there to fill its cache slot, its
output discarded). Weights are never touched, and between two calls the model is intact::

    lnsdiag lm-eval --model lnsdiag --model_args pretrained=meta-llama/Llama-2-7b-hf,remove=20-27 \\
        --tasks mmlu --output_path results/ --log_samples
    lnsdiag lm-eval --model lnsdiag --model_args pretrained=ID,remove=3.attn+5.mlp+7 --tasks gsm8k

    import lnsdiag.scoring.lmeval.model_type  # registers "lnsdiag" in lm-eval's model registry
    lm_eval.simple_evaluate(model="lnsdiag", model_args="pretrained=ID,remove=3+5+7", tasks=[...])
    lm_eval.simple_evaluate(model=RemovalHFLM(pretrained=ID, remove="20-27.attn+3"), tasks=[...])

``remove`` is written so that it survives lm-eval's comma-separated ``model_args``: units joined
by ``+``, each a block, an inclusive range, or either with a sub-layer after a dot: ``3+5+7``,
``20-27``, ``3.attn+5.mlp+7``, ``20-27.attn+3`` (0-based, as ``lnsdiag shrink --layers`` with ``+``
for ``,``); a list or a :class:`~lnsdiag.interventions.units.Removal` from Python. ``unit=attn``
(or ``mlp``) makes a bare number a sub-layer of that kind (``remove=20-27,unit=attn`` is
``remove=20-27.attn``); ``unit=block`` is the default. Left out, nothing is removed (the full
model, for the baseline of the same run).

Importing this module imports lm-eval, torch and transformers and registers the model type:
the light modules never import it at their top (``lnsdiag lm-eval`` imports it when it runs).
"""

from __future__ import annotations

import operator
import os
import re
from types import SimpleNamespace
from typing import Any

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from ... import __version__
from ...errors import UserError
from ...interventions.removal import removed_layers
from ...interventions.units import KIND_NAMES, Removal, Unit, close_kind, kind_hint
from ...model.cost import removed_parameters
from ...model.load import restore_norms
from ...model.structure import LayerStack, configured_layer_count, find_layers, no_cache_kwargs, sublayer_site

#: The name lm-eval knows the model type by (``--model lnsdiag``).
MODEL_TYPE = "lnsdiag"
#: ``unit=`` values and the unit kind they give a bare number in ``remove=`` (``block``: the default;
#: its plural and ``layer(s)`` kept from when whole blocks were the only unit).
UNIT_NAMES = {"block": "block", "blocks": "block", "layer": "block", "layers": "block", "attn": "attn", "mlp": "mlp"}

#: One ``+``-separated part of ``remove=``: a block or an inclusive range, and a kind after a dot.
_PART = re.compile(r"^(?P<lo>-?\d+)(?:-(?P<hi>\d+))?(?:\.(?P<kind>\w*))?$")
_SYNTAX = "write blocks as 3+5+7, ranges as 20-27, sub-layers as 3.attn or 20-27.mlp (0-based)"


class RemoveArgError(UserError, ValueError):
    """A ``remove=`` / ``unit=`` model argument lm-eval cannot evaluate: one line naming the value
    (a ValueError for lm-eval's callers, a :class:`~lnsdiag.errors.UserError` for lnsdiag's
    command line: ``error:`` and exit 2)."""


def _shown(value: Any) -> str:
    if isinstance(value, Removal):
        return "+".join(map(str, value.units))
    if isinstance(value, (list, tuple)):
        return "+".join(map(str, value))
    return str(value)


def parse_remove(value: Any, unit: str | None = "block") -> Removal:
    """What ``remove=`` names: blocks and sub-layers (checked against the model's depth later,
    :func:`check_removal`). Accepts ``"3+5+7"``, ``"20-27"``, ``"3.attn+5.mlp+7"``, ``"20-27.attn"``
    (commas too when the value does not pass through lm-eval's ``model_args`` string), an int, a list
    of those, or a :class:`Removal`; ``None`` is the full model. A bare number is a unit of kind
    ``unit`` (``block``, ``attn``, ``mlp``), so ``remove=20-27,unit=attn`` is ``remove=20-27.attn``;
    a :class:`Removal` or :class:`Unit` says its own kinds. Raises :class:`RemoveArgError`."""
    kind = parse_unit(unit)
    shown = _shown(value)
    if value is None:
        return Removal()
    if isinstance(value, Removal):
        return value
    if isinstance(value, (list, tuple)):
        parts = list(value)
    elif isinstance(value, str):
        if not value.strip():
            raise RemoveArgError("remove= is empty: name blocks like remove=3+5+7 or remove=20-27, "
                                 "or leave remove out for the full model")
        parts = [p for p in re.split(r"[+,\s]+", value.strip()) if p]
    else:
        parts = [value]
    units: list[Unit] = []
    for part in parts:
        for each in _part_units(part, kind, shown):
            if each in units:
                raise RemoveArgError(f"remove={shown} names {_named(each)} twice: name each unit once")
            units.append(each)
    if not units:
        raise RemoveArgError(f"remove={shown} names no block: {_SYNTAX}")
    return _removal(units, shown)


def parse_unit(unit: str | None) -> str:
    """``unit=``: the kind of a bare number in ``remove=`` (``block``, ``attn``, ``mlp``)."""
    name = str(unit).strip().lower() if unit is not None else "block"
    if name in UNIT_NAMES:
        return UNIT_NAMES[name]
    raise RemoveArgError(f"unit={unit} is not a unit: {kind_hint(name)} (block: whole blocks, the default)")


def _named(unit: Unit) -> str:
    """``block 3`` or ``3.attn``, as a message names it."""
    return str(unit) if unit.part else f"block {unit.block}"


def _removal(units: list[Unit], shown: str) -> Removal:
    """The set; one naming a sub-layer of a block it removes whole refused (:class:`Removal`'s own check)."""
    try:
        return Removal(tuple(units))
    except ValueError as exc:
        raise RemoveArgError(f"remove={shown}: {exc}") from None


def _part_units(part: Any, kind: str, shown: str) -> list[Unit]:
    """The units one ``+``-separated part names: a unit, a number or an inclusive range, each of
    kind ``kind`` unless the part says its own (``3.attn``, ``20-27.mlp``)."""
    if isinstance(part, Unit):
        return [part]
    if hasattr(part, "__index__") and not isinstance(part, bool):  # int, numpy integers
        return [KIND_NAMES[kind](operator.index(part))]
    if isinstance(part, float) and part.is_integer():  # lm-eval's command line reads remove=-1 as -1.0
        return [KIND_NAMES[kind](int(part))]
    if not isinstance(part, str):
        raise RemoveArgError(f"remove={shown}: {part!r} is not a block number; {_SYNTAX}")
    text = part.strip()
    match = _PART.match(text)
    if not match:
        raise RemoveArgError(f"remove={shown}: {text!r} is not a block number; {_SYNTAX}")
    lo, hi = int(match["lo"]), int(match["hi"] if match["hi"] is not None else match["lo"])
    if hi < lo:
        span = text.partition(".")[0]
        raise RemoveArgError(f"remove={shown}: the range {span} runs backwards; write it {hi}-{lo}")
    if match["kind"] is not None:
        kind = _suffix_kind(match["kind"], text, shown)
    return [KIND_NAMES[kind](b) for b in range(lo, hi + 1)]


def _suffix_kind(suffix: str, text: str, shown: str) -> str:
    """The kind after the dot (``attn``, ``mlp``); anything else refused with the likely fix."""
    if suffix in ("attn", "mlp"):
        return suffix
    span = text.partition(".")[0]
    close = close_kind(suffix.lower()) if suffix else None
    if close == "block":
        hint = f"write {span} for whole blocks"
    elif close:
        hint = f"did you mean {span}.{close}?"
    else:
        hint = f"write {span}.attn or {span}.mlp"
    raise RemoveArgError(f"remove={shown}: {text!r} names no unit ({hint})")


def check_removal(removal: Removal, num_layers: int, shown: str) -> None:
    """Every unit within the model's ``num_layers``, and at least one block kept."""
    last = num_layers - 1
    for unit in removal:
        if not 0 <= unit.block <= last:
            raise RemoveArgError(f"remove={shown}: block {unit.block} is out of range; the model has "
                                 f"{num_layers} blocks, numbered 0-{last}")
    if len(removal.blocks) >= num_layers:
        raise RemoveArgError(f"remove={shown} removes all {num_layers} blocks of the model: keep at least one")


def check_sites(removal: Removal, stack: LayerStack, shown: str) -> None:
    """Every sub-layer found in its block (a family whose blocks cannot be split: one line, before
    lm-eval's first request)."""
    for unit in removal.sublayers:
        try:
            sublayer_site(stack.layers[unit.block], unit.kind)
        except UserError as exc:
            raise RemoveArgError(f"remove={shown}: {exc}") from None


def check_model_args(model_args: dict[str, Any]) -> None:
    """``remove=`` / ``unit=`` of a model_args dict checked before lm-eval indexes its tasks and loads
    the model (``lnsdiag lm-eval``): the syntax always, the range when ``pretrained`` is a local
    folder whose config says the depth (a hub config is read, and checked, when the model loads)."""
    remove = model_args.get("remove")
    _stray_arguments({k: v for k, v in model_args.items() if k not in ("remove", "unit")}, _shown(remove))
    removal = parse_remove(remove, model_args.get("unit", "block"))
    pretrained = model_args.get("pretrained")
    if not removal or not isinstance(pretrained, str) or not os.path.isdir(pretrained):
        return
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(pretrained, subfolder=str(model_args.get("subfolder") or ""),
                                            trust_remote_code=bool(model_args.get("trust_remote_code", False)))
    except Exception:  # HFLM says what is wrong with the folder, in its own words
        return
    depth = configured_layer_count(SimpleNamespace(config=config))
    if depth:
        check_removal(removal, depth, _shown(remove))


def _stray_arguments(kwargs: dict[str, Any], shown: str) -> None:
    """``remove=3,5`` in a model_args string reaches us as ``remove=3`` and an argument named ``5``."""
    stray = [key for key in kwargs if re.match(r"^-?\d", str(key))]
    if stray and shown == "None":
        raise RemoveArgError(f"model_args: {', '.join(stray)} is not key=value (blocks and sub-layers to "
                             "remove go in remove=3+5.attn+7.mlp)")
    if stray:
        joined = "+".join([shown, *stray])
        raise RemoveArgError(f"remove={shown},{','.join(stray)}: lm-eval splits model_args at commas, so "
                             f"{', '.join(stray)} reached the model as an argument of its own; write "
                             f"remove={joined}")


@register_model(MODEL_TYPE)
class RemovalHFLM(HFLM):
    """lm-eval's HFLM with the blocks and sub-layers ``remove`` names taken out for every forward it makes.

    Arguments: ``pretrained`` (hub id, local folder, or a model already loaded) and every HFLM
    argument, plus ``remove`` (blocks and sub-layers: ``3+5+7``, ``20-27``, ``3.attn+5.mlp``,
    ``20-27.attn``; left out: none), ``unit`` (the kind of a bare number in ``remove``: ``block``, the
    default, ``attn`` or ``mlp``) and ``layers_path`` (dotted path of the block list,
    when discovery fails). A checkpoint that records LayerNorm Scaling or Post-LN (``config.lns``)
    gets its norms re-installed as lnsdiag's ``load_model`` does; other models load as they are.
    """

    def __init__(self, pretrained: Any, remove: Any = None, unit: str | None = "block",
                 layers_path: str | None = None, **kwargs: Any) -> None:
        self._shown = _shown(remove)
        _stray_arguments(kwargs, self._shown)
        #: What is removed, as lnsdiag names it everywhere (store keys, CSV cells, model cards).
        self.removal = parse_remove(remove, unit)  # before any download: a typo costs nothing
        self._layers_path = layers_path
        self._norms_restored: bool | None = None  # a model passed in is evaluated as it is
        super().__init__(pretrained=pretrained, **kwargs)
        self._stack: LayerStack = find_layers(self.model, layers_path)
        check_removal(self.removal, len(self._stack), self._shown)
        check_sites(self.removal, self._stack, self._shown)
        self._no_cache = no_cache_kwargs(self.model)

    def _create_model(self, pretrained: str, *args: Any, **kwargs: Any) -> None:
        depth = configured_layer_count(self)  # the config is read, the weights not yet
        if depth:
            check_removal(self.removal, depth, self._shown)
        super()._create_model(pretrained, *args, **kwargs)
        self._norms_restored = restore_norms(self._model)

    def _model_call(self, inps: torch.Tensor, attn_mask: Any = None, labels: Any = None) -> torch.Tensor:
        with removed_layers(self.model, self.removal, stack=self._stack):
            if attn_mask is not None or labels is not None or not self._no_cache:
                return super()._model_call(inps, attn_mask, labels)
            # HFLM's causal branch, building no KV cache: removed blocks are then skipped, not run
            with torch.no_grad(), torch.autocast(device_type=self.device.type, dtype=self.mixed_precision_dtype,
                                                 enabled=self.mixed_precision_dtype is not None):
                return self.model(inps, **self._no_cache).logits

    def _model_generate(self, context: torch.Tensor, max_length: int, stop: list[str], **generation_kwargs: Any
                        ) -> torch.Tensor:
        # generate() runs with a KV cache: removed blocks and attentions run for their cache slot,
        # output discarded (a removed MLP writes no cache: skipped)
        with removed_layers(self.model, self.removal, stack=self._stack):
            return super()._model_generate(context, max_length, stop, **generation_kwargs)

    def get_model_info(self) -> dict[str, Any]:
        """HFLM's record (results' ``config``), plus what was removed: two runs cannot be confused."""
        info = super().get_model_info()
        total = sum(p.numel() for p in self.model.parameters())
        kept = total - removed_parameters(self.model, self.removal, stack=self._stack)
        info.update({
            "lnsdiag_removed": self.removal.cell or "none",
            "lnsdiag_removed_blocks": list(self.removal.blocks),
            # the sub-layers of kept blocks, as a checkpoint pruned of them records them in its config
            "lnsdiag_removed_units": [str(u) for u in self.removal.sublayers],
            "lnsdiag_num_layers": len(self._stack),
            "lnsdiag_layers_kept": len(self._stack) - len(self.removal.blocks),
            "lnsdiag_num_parameters_kept": kept,
            "lnsdiag_norms_restored": self._norms_restored,
            "lnsdiag_version": __version__,
        })
        return info
