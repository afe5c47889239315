"""lm-eval's model type ``lnsdiag``: stock HFLM with some blocks removed by lnsdiag's hooks.

The evaluation is lm-eval's own, on the model as ``from_pretrained`` loads it (every HFLM
argument: revision, dtype, batch size, device, parallelize, trust_remote_code, ...), with the
blocks ``remove`` names taken out by :func:`~lnsdiag.interventions.removal.removed_layers` around
each forward lm-eval makes (:meth:`RemovalHFLM._model_call` for log-likelihoods, rolling
windows and batch-size detection; :meth:`RemovalHFLM._model_generate` for ``generate_until``,
KV cache included). Weights are never touched, and between two calls the model is intact::

    lnsdiag lm-eval --model lnsdiag --model_args pretrained=meta-llama/Llama-2-7b-hf,remove=20-27 \\
        --tasks mmlu --output_path results/ --log_samples

    import lnsdiag.scoring.lmeval.model_type  # registers "lnsdiag" in lm-eval's model registry
    lm_eval.simple_evaluate(model="lnsdiag", model_args="pretrained=ID,remove=3+5+7", tasks=[...])
    lm_eval.simple_evaluate(model=RemovalHFLM(pretrained=ID, remove="3+5+7"), tasks=[...])

``remove`` is written so that it survives lm-eval's comma-separated ``model_args``: blocks
joined by ``+`` and inclusive ranges, ``3+5+7``, ``20-27``, ``3+20-27`` (0-based, as
``lnsdiag shrink --layers``); a list or a :class:`~lnsdiag.interventions.units.Removal` from
Python. Left out, nothing is removed (the full model, for the baseline of the same run).

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
from ...interventions.units import Block, Removal, Unit
from ...model.load import restore_norms
from ...model.structure import LayerStack, configured_layer_count, find_layers, no_cache_kwargs

#: The name lm-eval knows the model type by (``--model lnsdiag``).
MODEL_TYPE = "lnsdiag"
#: ``unit=`` values meaning whole blocks (the only unit removal supports today).
BLOCK_UNITS = ("block", "blocks", "layer", "layers")
#: ``unit=`` values meaning sub-layers (a later issue).
SUBLAYER_UNITS = ("attn", "attention", "mlp", "ffn")

_RANGE = re.compile(r"^(\d+)-(\d+)$")
_SUBLAYER = re.compile(r"^-?\d+\.\w*$")


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


def parse_remove(value: Any, unit: str | None = "block") -> tuple[int, ...]:
    """What ``remove=`` names: the blocks, distinct, in the order given (checked against the model's
    depth later, :func:`check_blocks`). Accepts ``"3+5+7"``, ``"20-27"``, ``"3+20-27"`` (commas too when
    the value does not pass through lm-eval's ``model_args`` string), an int, a list of those, or a
    :class:`Removal`; ``None`` is the full model. Raises :class:`RemoveArgError`."""
    _check_unit(unit)
    shown = _shown(value)
    if value is None:
        return ()
    if isinstance(value, Removal):
        parts: list[Any] = list(value.units)
    elif isinstance(value, (list, tuple)):
        parts = list(value)
    elif isinstance(value, str):
        if not value.strip():
            raise RemoveArgError("remove= is empty: name blocks like remove=3+5+7 or remove=20-27, "
                                 "or leave remove out for the full model")
        parts = [p for p in re.split(r"[+,\s]+", value.strip()) if p]
    else:
        parts = [value]
    blocks: list[int] = []
    for part in parts:
        for block in _part_blocks(part, shown):
            if block in blocks:
                raise RemoveArgError(f"remove={shown} names block {block} twice: name each block once")
            blocks.append(block)
    if not blocks:
        raise RemoveArgError(f"remove={shown} names no block: write blocks as 3+5+7 and ranges as 20-27")
    return tuple(blocks)


def _check_unit(unit: str | None) -> None:
    name = str(unit).strip().lower() if unit is not None else "block"
    if name in BLOCK_UNITS:
        return
    if name in SUBLAYER_UNITS:
        raise RemoveArgError(f"unit={unit}: removing sub-layers (attention, MLP) is not supported yet; "
                             "only whole blocks (unit=block)")
    raise RemoveArgError(f"unit={unit} is not a unit: use unit=block (whole blocks, the default)")


def _part_blocks(part: Any, shown: str) -> range | list[int]:
    """The blocks one ``+``-separated part names: a number or an inclusive range."""
    if isinstance(part, Block):
        return [part.block]
    if isinstance(part, Unit):  # a sub-layer unit of a later kind (interventions.units.KINDS)
        raise RemoveArgError(f"remove={shown}: removing sub-layers ({part}) is not supported yet; "
                             f"only whole blocks (remove={part.block})")
    if hasattr(part, "__index__") and not isinstance(part, bool):  # int, numpy integers
        return [operator.index(part)]
    if isinstance(part, float) and part.is_integer():  # lm-eval's command line reads remove=-1 as -1.0
        return [int(part)]
    if not isinstance(part, str):
        raise RemoveArgError(f"remove={shown}: {part!r} is not a block number; write blocks as 3+5+7 "
                             "and ranges as 20-27 (0-based)")
    text = part.strip()
    if re.fullmatch(r"-?\d+", text):
        return [int(text)]
    if match := _RANGE.match(text):
        lo, hi = int(match[1]), int(match[2])
        if hi < lo:
            raise RemoveArgError(f"remove={shown}: the range {text} runs backwards; write it {hi}-{lo}")
        return range(lo, hi + 1)
    if _SUBLAYER.match(text):
        raise RemoveArgError(f"remove={shown}: removing sub-layers ({text}) is not supported yet; "
                             f"only whole blocks (remove={text.partition('.')[0]})")
    raise RemoveArgError(f"remove={shown}: {text!r} is not a block number; write blocks as 3+5+7 and "
                         "ranges as 20-27 (0-based)")


def check_blocks(blocks: tuple[int, ...], num_layers: int, shown: str) -> None:
    """Every block within the model's ``num_layers``, and at least one block kept."""
    last = num_layers - 1
    for block in blocks:
        if not 0 <= block <= last:
            raise RemoveArgError(f"remove={shown}: block {block} is out of range; the model has {num_layers} "
                                 f"blocks, numbered 0-{last}")
    if len(blocks) >= num_layers:
        raise RemoveArgError(f"remove={shown} removes all {num_layers} blocks of the model: keep at least one")


def check_model_args(model_args: dict[str, Any]) -> None:
    """``remove=`` / ``unit=`` of a model_args dict checked before lm-eval indexes its tasks and loads
    the model (``lnsdiag lm-eval``): the syntax always, the range when ``pretrained`` is a local
    folder whose config says the depth (a hub config is read, and checked, when the model loads)."""
    remove = model_args.get("remove")
    _stray_arguments({k: v for k, v in model_args.items() if k not in ("remove", "unit")}, _shown(remove))
    blocks = parse_remove(remove, model_args.get("unit", "block"))
    pretrained = model_args.get("pretrained")
    if not blocks or not isinstance(pretrained, str) or not os.path.isdir(pretrained):
        return
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(pretrained, subfolder=str(model_args.get("subfolder") or ""),
                                            trust_remote_code=bool(model_args.get("trust_remote_code", False)))
    except Exception:  # HFLM says what is wrong with the folder, in its own words
        return
    depth = configured_layer_count(SimpleNamespace(config=config))
    if depth:
        check_blocks(blocks, depth, _shown(remove))


def _stray_arguments(kwargs: dict[str, Any], shown: str) -> None:
    """``remove=3,5`` in a model_args string reaches us as ``remove=3`` and an argument named ``5``."""
    stray = [key for key in kwargs if re.match(r"^-?\d", str(key))]
    if stray and shown == "None":
        raise RemoveArgError(f"model_args: {', '.join(stray)} is not key=value (blocks to remove go in "
                             "remove=3+5+7)")
    if stray:
        joined = "+".join([shown, *stray])
        raise RemoveArgError(f"remove={shown},{','.join(stray)}: lm-eval splits model_args at commas, so "
                             f"{', '.join(stray)} reached the model as an argument of its own; write "
                             f"remove={joined}")


@register_model(MODEL_TYPE)
class RemovalHFLM(HFLM):
    """lm-eval's HFLM with the blocks ``remove`` names taken out for every forward it makes.

    Arguments: ``pretrained`` (hub id, local folder, or a model already loaded) and every HFLM
    argument, plus ``remove`` (the blocks: ``3+5+7``, ``20-27``; left out: none), ``unit``
    (``block``, the only unit supported yet) and ``layers_path`` (dotted path of the block list,
    when discovery fails). A checkpoint that records LayerNorm Scaling or Post-LN (``config.lns``)
    gets its norms re-installed as lnsdiag's ``load_model`` does; other models load as they are.
    """

    def __init__(self, pretrained: Any, remove: Any = None, unit: str | None = "block",
                 layers_path: str | None = None, **kwargs: Any) -> None:
        self._shown = _shown(remove)
        _stray_arguments(kwargs, self._shown)
        self._blocks = parse_remove(remove, unit)  # before any download: a typo costs nothing
        self._layers_path = layers_path
        self._norms_restored: bool | None = None  # a model passed in is evaluated as it is
        super().__init__(pretrained=pretrained, **kwargs)
        self._stack: LayerStack = find_layers(self.model, layers_path)
        check_blocks(self._blocks, len(self._stack), self._shown)
        #: What is removed, as lnsdiag names it everywhere (store keys, CSV cells, model cards).
        self.removal = Removal(self._blocks)
        self._no_cache = no_cache_kwargs(self.model)

    def _create_model(self, pretrained: str, *args: Any, **kwargs: Any) -> None:
        depth = configured_layer_count(self)  # the config is read, the weights not yet
        if depth:
            check_blocks(self._blocks, depth, self._shown)
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
        # generate() runs with a KV cache: removed blocks run for their cache slot, output discarded
        with removed_layers(self.model, self.removal, stack=self._stack):
            return super()._model_generate(context, max_length, stop, **generation_kwargs)

    def get_model_info(self) -> dict[str, Any]:
        """HFLM's record (results' ``config``), plus what was removed: two runs cannot be confused."""
        info = super().get_model_info()
        removed = {id(p) for i in self.removal.blocks for p in self._stack.layers[i].parameters()}
        kept = sum(p.numel() for p in self.model.parameters() if id(p) not in removed)
        info.update({
            "lnsdiag_removed": self.removal.cell or "none",
            "lnsdiag_removed_blocks": list(self.removal.blocks),
            "lnsdiag_num_layers": len(self._stack),
            "lnsdiag_layers_kept": len(self._stack) - len(self.removal),
            "lnsdiag_num_parameters_kept": kept,
            "lnsdiag_norms_restored": self._norms_restored,
            "lnsdiag_version": __version__,
        })
        return info
