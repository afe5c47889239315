"""How a block normalises (pre-LN, post-LN, sandwich), read off one watched forward pass, and
the model's shape as ``lnsdiag inspect`` shows it.

Not read off class names: a block's norms are watched while a middle block runs
(:func:`~lnsdiag.model.watch.watch_block`), and where their inputs and outputs sit on the
residual stream says where the block normalises.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import UserError
from .structure import LayerStack, block_norms, find_layers, sublayer_site, sublayers
from .watch import watch_block


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
    norms = dict(block_norms(block))
    if not norms:
        return "no-norm"
    run = watch_block(model, block, norms)
    io = [(run.inputs[name], run.outputs[name]) for name in run.inputs if name in run.outputs]
    x, out = run.input, run.output
    pre = any(_close(inp, x) for inp, _ in io)
    post = any(_close(o, out) for _, o in io)
    sandwich = pre and any(_close(out - o, inp) for _, o in io for inp, _ in io if o.shape == out.shape)
    kind = "post-LN" if post and not pre else "sandwich" if sandwich else "pre-LN" if pre else "other"
    if getattr(model.config, "lns", None):
        kind += "+LNS"
    return kind


def describe(model: nn.Module, layers_path: str | None = None) -> dict[str, Any]:
    """What ``lnsdiag inspect`` shows: the stack, its block class, a block's sub-layers, what ``--unit
    attn`` / ``mlp`` removes of a block (its sites, or why the block cannot be split), norm placement."""
    stack = find_layers(model, layers_path)
    return {"layer_stack": stack.path, "num_layers": len(stack), "block": type(stack.layers[0]).__name__,
            "sublayers": sublayers(stack.layers[0]), "units": _units(stack.layers[0]),
            "norm_placement": norm_placement(model, stack)}


def _units(block: nn.Module) -> dict[str, str]:
    """Per sub-layer kind, the module whose output removing it zeroes (and its sandwich norm), or why not."""
    out = {}
    for kind in ("attn", "mlp"):
        try:
            site = sublayer_site(block, kind)
        except UserError as exc:
            out[kind] = f"cannot be removed ({exc})"
            continue
        norm = next((n for n, m in block.named_modules() if m is site.post_norm), None)
        out[kind] = site.name + (f" + {norm}" if norm else "")
    return out
