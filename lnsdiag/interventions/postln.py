"""Post-LN Llama-family blocks: the same parameters, the norms moved after the residual add.

The third member of the paper's comparison (the original Transformer's placement):

    pre-LN:   h = x + Attn(N1(x));      out = h + MLP(N2(h))
    post-LN:  h = N1(x + Attn(x));      out = N2(h + MLP(h))

A Post-LN twin is built from the very same model (same parameter names, shapes and
initial values) by giving each block an instance ``forward`` that runs its modules in the
Post-LN order: ``input_layernorm`` becomes the norm after attention,
``post_attention_layernorm`` the norm after the MLP. The forwards are installed on one
:class:`~lnsdiag.model.patch.Patches` handle kept with the block stack, which
:func:`remove_post_ln` restores. The model's final norm is kept (it re-normalises an already
normalised stream; harmless, and the checkpoint stays a plain Llama). ``config.post_ln``
records it; :func:`restore_post_ln` re-installs it on load (``lnsdiag.model.load.load_model``
does). Only blocks whose forward is Llama's (``families.POST_LN_BLOCKS``: Llama, Mistral,
Qwen2, Qwen3) are supported.
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from ..errors import UserError
from ..model.families import POST_LN_BLOCKS
from ..model.patch import Patches, kept, patched_forward, release
from ..model.structure import LayerStack, find_layers

POST_LN_VERSION = 1
NORMS = ("input_layernorm", "post_attention_layernorm")
#: The tag of the Post-LN forwards, and the name their handle is kept under on the block stack.
KEPT_AS = "post-ln"


class _PostLNForward:
    """The Post-LN order for one block, with the arguments a Llama block receives.

    A small class holding its block (not a closure over it) so a deep copy or a pickle of the
    model runs the copy's own modules.
    """

    def __init__(self, block: nn.Module) -> None:
        self.block = block

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        block = self.block
        if len(args) > 1:
            bound = inspect.signature(type(block).forward).bind(block, *args, **kwargs)
            bound.arguments.pop("self")
            extra = bound.arguments.pop("kwargs", {})
            kwargs = {**bound.arguments, **extra}
        elif args:
            kwargs["hidden_states"] = args[0]
        x = kwargs.pop("hidden_states")
        attn, _ = block.self_attn(hidden_states=x, **kwargs)
        h = block.input_layernorm(x + attn)
        return block.post_attention_layernorm(h + block.mlp(h))


def is_post_ln(model: nn.Module) -> bool:
    return bool(getattr(getattr(model, "config", None), "post_ln", None))


def _unsupported(stack: LayerStack) -> str | None:
    """The stack's block classes, joined, when some do not run Llama's forward; else None."""
    kinds = {type(b).__name__ for b in stack.layers}
    return None if kinds <= set(POST_LN_BLOCKS) else ", ".join(kinds)


def _install(stack: LayerStack) -> None:
    """The Post-LN forward on every block, on one handle kept with the stack (once: installed again,
    nothing changes)."""
    if kept(stack.layers, KEPT_AS):
        return
    patches = Patches().keep_on(stack.layers, KEPT_AS)
    for block in stack.layers:
        patches.forward(block, _PostLNForward(block), tag=KEPT_AS)


def apply_post_ln(model: nn.Module, stack: LayerStack | None = None) -> nn.Module:
    """Make every block of a Llama-family model Post-LN, in place; records ``config.post_ln``."""
    stack = stack or find_layers(model)
    if kinds := _unsupported(stack):
        raise UserError(f"Post-LN is supported for {', '.join(POST_LN_BLOCKS)} blocks, not {kinds}")
    if getattr(getattr(model, "config", None), "lns", None):
        raise UserError("the model has LayerNorm Scaling, which applies to pre-LN blocks; not making it Post-LN")
    if any("forward" in b.__dict__ and patched_forward(b) != KEPT_AS for b in stack.layers):
        raise UserError("some blocks have a patched forward (removed layers?); apply Post-LN to a plain model")
    _install(stack)
    model.config.post_ln = {"norms": list(NORMS), "order": "N1(x + Attn(x)), N2(h + MLP(h))",
                            "version": POST_LN_VERSION}
    return model


def remove_post_ln(model: nn.Module, stack: LayerStack | None = None) -> nn.Module:
    """Back to the pre-LN forward (weights untouched)."""
    release((stack or find_layers(model)).layers, KEPT_AS)
    if hasattr(model.config, "post_ln"):
        del model.config.post_ln
    return model


def restore_post_ln(model: nn.Module, stack: LayerStack | None = None) -> bool:
    """Re-install the Post-LN forward if the config records it; True if it does."""
    record = getattr(getattr(model, "config", None), "post_ln", None)
    if not record:
        return False
    if int(record.get("version", 1)) > POST_LN_VERSION:
        raise UserError("this checkpoint's Post-LN record is of a newer lnsdiag; upgrade lnsdiag")
    stack = stack or find_layers(model)
    if kinds := _unsupported(stack):
        raise UserError(f"the checkpoint records Post-LN but its blocks ({kinds}) are not supported")
    _install(stack)
    return True
