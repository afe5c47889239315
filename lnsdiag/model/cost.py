"""What a removal saves: parameters, and FLOPs per token at a context length.

Read off the model's modules, not its config's sizes, so a mixture of experts, a fused QKV or a
GPT-2 ``Conv1D`` is counted as it is. What counts as one sub-layer, and what is not counted, is
said once, in :func:`removal_savings`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..errors import UserError
from ..interventions.units import Removal, Unit
from .families import SUBLAYER_MODULES
from .structure import LayerStack, find_layers, sublayer_site, sublayers, text_config


@dataclass(frozen=True)
class Savings:
    """What a removal saves, beside the full model's totals (parameters shared between modules once)."""

    params: int  #: parameters removed
    total_params: int  #: the full model's
    flops: int  #: FLOPs per token no longer spent, at ``context``
    total_flops: int  #: the full model's FLOPs per token at ``context`` (its blocks and its output head)
    context: int  #: the number of earlier tokens each token attends to

    @property
    def params_fraction(self) -> float:
        return self.params / self.total_params if self.total_params else 0.0

    @property
    def flops_fraction(self) -> float:
        return self.flops / self.total_flops if self.total_flops else 0.0


def removal_savings(model: nn.Module, removal: Removal | Iterable[int | Unit] | int, *, context: int,
                    stack: LayerStack | None = None) -> Savings:
    """What removing ``removal`` from ``model`` saves, per token at ``context`` tokens of context.

    Parameters: a whole block's all (norms included); a sub-layer's module (its attention or MLP
    child: projections, biases, norms inside it such as q/k norms; of a mixture, the router and every
    routed and shared expert; :data:`~.families.SUBLAYER_MODULES` where it is not one child) and its
    sandwich post-norm. Not the norm in front of a removed sub-layer, which stays in its block.

    FLOPs per token: 2 × the matrix parameters (those of 2 or more dimensions) that no longer run,
    of a mixture only the router, the shared experts and the top-k routed ones, plus for a removed
    attention its QKᵀ and AV, 2·keys·heads·(qk_dim + v_dim) (4·context·heads·head_dim for most), keys
    being ``context`` or the layer's sliding window where that is smaller. Not counted: norms,
    activations, softmax, rotary embeddings, biases, residual adds and embedding lookups. The total
    adds the output head's matmul. A removed attention that still runs to fill a KV cache during
    generation, and a checkpoint's zeroed sub-layers under plain transformers, spend what is counted
    as saved here.
    """
    if context < 0:
        raise ValueError(f"context must be non-negative, not {context}")
    stack = stack or find_layers(model)
    removal = Removal.of(removal)
    config = text_config(model)
    params: dict[int, int] = {}
    flops = 0
    for unit in removal:
        block = stack.layers[unit.block]
        modules = _removed_modules(block, unit)
        params.update({id(p): p.numel() for m in modules for p in m.parameters()})
        flops += 2 * _active_matmul(modules, config)
        if unit.kind in ("block", "attn"):
            flops += _attention_flops(block, unit.block, config, context)
    total_flops = sum(2 * _active_matmul([b], config) + _attention_flops(b, i, config, context)
                      for i, b in enumerate(stack.layers)) + 2 * _head_params(model)
    total = sum(p.numel() for p in model.parameters())
    return Savings(sum(params.values()), total, flops, total_flops, context)


def removed_parameters(model: nn.Module, removal: Removal | Iterable[int | Unit] | int, *,
                       stack: LayerStack | None = None) -> int:
    """The parameters :func:`removal_savings` counts as removed, alone: no FLOPs, so nothing about
    the model is read beyond its modules (an evaluation's record can always say it)."""
    stack = stack or find_layers(model)
    params = {id(p): p.numel() for unit in Removal.of(removal)
              for m in _removed_modules(stack.layers[unit.block], unit) for p in m.parameters()}
    return sum(params.values())


def _removed_modules(block: nn.Module, unit: Unit) -> list[nn.Module]:
    """What removing ``unit`` of ``block`` takes out: the block, or the sub-layer's modules."""
    return [block] if not unit.part else _unit_modules(block, unit.kind)


def _unit_modules(block: nn.Module, kind: str) -> list[nn.Module]:
    """The modules a sub-layer is made of, and its sandwich post-norm."""
    site = sublayer_site(block, kind)
    names = SUBLAYER_MODULES.get(type(block).__name__, {}).get(kind)
    if names:
        modules = [block.get_submodule(n) for n in names]
    else:
        child = sublayers(block).get("attention" if kind == "attn" else kind)
        modules = [getattr(block, child) if child else site.module]
    return modules + ([site.post_norm] if site.post_norm is not None else [])


def _matmul(modules: Iterable[nn.Module]) -> int:
    """Matrix parameters (2 or more dimensions) of ``modules``, each once."""
    return sum({id(p): p.numel() for m in modules for p in m.parameters() if p.ndim >= 2}.values())


def _active_matmul(modules: list[nn.Module], config: Any) -> int:
    """The matrix parameters a token runs through: all but the routed experts it is not sent to."""
    idle = 0
    for module in modules:
        for name, experts in module.named_modules():
            if name.rsplit(".", 1)[-1] == "experts":
                count = _expert_count(experts)
                idle += _matmul([experts]) // count * (count - _top_k(module, config))
    return _matmul(modules) - idle


def _expert_count(experts: nn.Module) -> int:
    """How many routed experts a module holds: a list of them, or fused 3-D weights (experts first)."""
    if isinstance(experts, nn.ModuleList):
        return len(experts)
    declared = getattr(experts, "num_experts", None)
    if isinstance(declared, int) and declared > 0:
        return declared
    sizes = {p.shape[0] for p in experts.parameters() if p.ndim == 3}
    if len(sizes) != 1:
        raise UserError(f"cannot tell how many experts {type(experts).__name__} holds")
    return sizes.pop()


def _top_k(module: nn.Module, config: Any) -> int:
    """How many routed experts each token runs: the MoE block's or router's ``top_k``, else the config's."""
    for sub in module.modules():
        value = getattr(sub, "top_k", None)
        if isinstance(value, int) and value > 0:
            return value
    value = getattr(config, "num_experts_per_tok", None)
    if isinstance(value, int) and value > 0:
        return value
    raise UserError(f"cannot tell how many experts {type(module).__name__} runs per token (no top_k)")


def _first_int(*values: Any) -> int | None:
    return next((v for v in values if isinstance(v, int) and not isinstance(v, bool) and v > 0), None)


def _attention_flops(block: nn.Module, index: int, config: Any, context: int) -> int:
    """QKᵀ and AV of block ``index``'s attention for one token: 2·keys·heads·(qk_dim + v_dim)."""
    child = sublayers(block).get("attention")
    attn = getattr(block, child) if child else block
    heads = _first_int(getattr(attn, "num_heads", None), getattr(attn, "num_attention_heads", None),
                       getattr(config, "num_attention_heads", None))
    if heads is None:
        raise UserError(f"cannot tell how many attention heads {type(block).__name__} has")
    qk = _first_int(getattr(attn, "qk_head_dim", None), getattr(attn, "head_dim", None),
                    getattr(attn, "head_size", None), getattr(config, "head_dim", None)) or config.hidden_size // heads
    v = _first_int(getattr(attn, "v_head_dim", None)) or qk
    window = _window(attn, config, index)
    keys = min(context, window) if window else context
    return 2 * keys * heads * (qk + v)


def _window(attn: nn.Module, config: Any, index: int) -> int | None:
    """How far block ``index``'s attention reaches: its module's ``sliding_window``, else its
    ``layer_types`` entry, else the config's ``sliding_window`` (Mistral); None: the whole context."""
    if hasattr(attn, "sliding_window"):
        window = attn.sliding_window
    elif isinstance(types := getattr(config, "layer_types", None), (list, tuple)) and index < len(types):
        window = getattr(config, "sliding_window", None) if types[index] == "sliding_attention" else None
    elif getattr(config, "use_sliding_window", None) is False:
        window = None
    else:
        window = getattr(config, "sliding_window", None)
    return _first_int(window)


def _head_params(model: nn.Module) -> int:
    """The output head's weight (its matmul runs for every token); 0 without one."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    return weight.numel() if weight is not None else 0
