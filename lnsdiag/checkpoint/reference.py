"""The reference for every removal: a model really built without some blocks (and, for a removed
attention or MLP sub-layer, with its output projection zeroed).

A fresh model of the same class is constructed from a config that really has fewer layers
(each kept layer keeping its role: layer types, MoE/dense split, LNS scale), and the kept
weights are copied into it. Tests compare ``surgery.removed_layers`` with it; :mod:`.save`
writes the same reduced config beside the kept weights.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..interventions.pruned import recorded_units, renumbered, write_record
from ..interventions.units import Removal
from ..model.families import ATTENTION_OUTPUT_PROJECTIONS, MLP_OUTPUT_PROJECTIONS, PER_LAYER_CONFIG_LISTS
from ..model.load import restore_norms
from ..model.structure import LayerStack, find_layers, parse_layer_spec, sublayer_site, text_config


def config_without(config: Any, keep: list[int], total: int) -> Any:
    """A copy of ``config`` describing only the ``keep`` layers, each with its old role (its removed
    sub-layers, ``lnsdiag_removed_units``, renumbered)."""
    new = copy.deepcopy(config)
    text = text_config(new)
    new_index = {old: new_i for new_i, old in enumerate(keep)}
    for name in PER_LAYER_CONFIG_LISTS:
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
    # Sub-layers a pruned checkpoint records as removed: renumbered, gone with their blocks.
    write_record(new, renumbered(recorded_units(new), keep))
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
    config = config_without(model.config, keep, total)
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
    restore_norms(new_model)  # LNS hooks / Post-LN forwards, as the reduced config records them
    if getattr(model, "generation_config", None) is not None:
        new_model.generation_config = copy.deepcopy(model.generation_config)
    return new_model.eval()


def zeroed_projections(block: nn.Module, kind: str) -> list[tuple[str, nn.Parameter]]:
    """The parameters of ``block``'s ``kind`` sub-layer (``attn``, ``mlp``) that produce its update:
    its output projection's weight and bias (every routed and shared expert's, fused 3-D expert
    weights included), or all of its site's when the site is itself the projection (BERT, OPT's
    ``fc2``). Zeroed, the sub-layer's update is exactly zero."""
    site = sublayer_site(block, kind)
    names = ATTENTION_OUTPUT_PROJECTIONS if kind == "attn" else MLP_OUTPUT_PROJECTIONS
    own = isinstance(site.module, nn.Linear) or hasattr(site.module, "nf")
    found = [(f"{site.name}.{n}", p) for n, p in site.module.named_parameters()
             if own or any(part in names for part in n.split("."))]
    if not found:
        raise ValueError(f"no output projection named {', '.join(names)} in {site.name} of {type(block).__name__}")
    return found


def build_without_units(model: nn.Module, removal: Removal, stack: LayerStack | None = None) -> nn.Module:
    """The reference of any removal: a copy of ``model`` with each removed sub-layer's output
    projection zeroed (:func:`zeroed_projections`), then really built without the removed blocks
    (:func:`build_without_layers`). The original is untouched."""
    stack = stack or find_layers(model)
    copied = copy.deepcopy(model)
    copied_stack = find_layers(copied, stack.path)
    with torch.no_grad():
        for unit in removal.sublayers:
            for _, param in zeroed_projections(copied_stack.layers[unit.block], unit.kind):
                param.zero_()
    if not removal.blocks:
        return copied.eval()
    return build_without_layers(copied, removal.blocks, copied_stack)
