"""Post-LN Llama-family blocks: the same parameters, the norms moved after the residual add.

The third member of the paper's comparison (the original Transformer's placement):

    pre-LN:   h = x + Attn(N1(x));      out = h + MLP(N2(h))
    post-LN:  h = N1(x + Attn(x));      out = N2(h + MLP(h))

A Post-LN twin is built from the very same model (same parameter names, shapes and
initial values) by giving each block an instance ``forward`` that runs its modules in the
Post-LN order: ``input_layernorm`` becomes the norm after attention,
``post_attention_layernorm`` the norm after the MLP. The model's final norm is kept (it
re-normalises an already normalised stream; harmless, and the checkpoint stays a plain
Llama). ``config.post_ln`` records it; :func:`restore_post_ln` re-installs it on
load (``lnsdiag.models.load_model`` does). Only blocks whose forward is Llama's (Llama,
Mistral, Qwen2, Qwen3) are supported.
"""

from __future__ import annotations

import inspect
import types
from typing import Any

from torch import nn

from ..errors import UserError
from ..model.structure import LayerStack, find_layers

POST_LN_VERSION = 1
NORMS = ("input_layernorm", "post_attention_layernorm")
#: Blocks whose pre-LN forward is exactly Llama's, so the reordering below is the whole change.
SUPPORTED_BLOCKS = ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer")


def _post_ln_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The Post-LN order, with the arguments a Llama block receives."""
    if len(args) > 1:
        bound = inspect.signature(type(self).forward).bind(self, *args, **kwargs)
        bound.arguments.pop("self")
        extra = bound.arguments.pop("kwargs", {})
        kwargs = {**bound.arguments, **extra}
    elif args:
        kwargs["hidden_states"] = args[0]
    x = kwargs.pop("hidden_states")
    attn, _ = self.self_attn(hidden_states=x, **kwargs)
    h = self.input_layernorm(x + attn)
    return self.post_attention_layernorm(h + self.mlp(h))


def _is_post_ln(block: nn.Module) -> bool:
    own = block.__dict__.get("forward")
    return getattr(own, "__func__", None) is _post_ln_forward


def is_post_ln(model: nn.Module) -> bool:
    return bool(getattr(getattr(model, "config", None), "post_ln", None))


def _install(stack: LayerStack) -> None:
    for block in stack.layers:
        if not _is_post_ln(block):
            block.forward = types.MethodType(_post_ln_forward, block)


def apply_post_ln(model: nn.Module, stack: LayerStack | None = None) -> nn.Module:
    """Make every block of a Llama-family model Post-LN, in place; records ``config.post_ln``."""
    stack = stack or find_layers(model)
    kinds = {type(b).__name__ for b in stack.layers}
    if not kinds <= set(SUPPORTED_BLOCKS):
        raise UserError(f"Post-LN is supported for {', '.join(SUPPORTED_BLOCKS)} blocks, not {', '.join(kinds)}")
    if getattr(getattr(model, "config", None), "lns", None):
        raise UserError("the model has LayerNorm Scaling, which applies to pre-LN blocks; not making it Post-LN")
    if any("forward" in b.__dict__ and not _is_post_ln(b) for b in stack.layers):
        raise UserError("some blocks have a patched forward (removed layers?); apply Post-LN to a plain model")
    _install(stack)
    model.config.post_ln = {"norms": list(NORMS), "order": "N1(x + Attn(x)), N2(h + MLP(h))",
                            "version": POST_LN_VERSION}
    return model


def remove_post_ln(model: nn.Module, stack: LayerStack | None = None) -> nn.Module:
    """Back to the pre-LN forward (weights untouched)."""
    stack = stack or find_layers(model)
    for block in stack.layers:
        if _is_post_ln(block):
            del block.__dict__["forward"]
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
    kinds = {type(b).__name__ for b in stack.layers}
    if not kinds <= set(SUPPORTED_BLOCKS):
        raise UserError(f"the checkpoint records Post-LN but its blocks ({', '.join(kinds)}) are not supported")
    _install(stack)
    return True
