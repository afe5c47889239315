"""How a batch of planned rows meets the model: padded ids, the 4D mask and position ids of
prefix-shared rows (and whether this model can take them), and the LM head run only at the
positions a request scores."""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from ..model.patch import patched
from ..model.structure import text_config
from .plan import Row


def padded_ids(rows: list[Row], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows' ids padded to the longest, and each row's scored positions ascending (padded
    with its last, so every row gathers the same number)."""
    ids = torch.full((len(rows), max(len(r.ids) for r in rows)), pad_id, dtype=torch.long)
    gather = torch.zeros((len(rows), max(len(r.positions) for r in rows)), dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, : len(row.ids)] = torch.tensor(row.ids, dtype=torch.long)
        positions = sorted(row.positions)
        gather[b, : len(positions)] = torch.tensor(positions, dtype=torch.long)
        gather[b, len(positions):] = positions[-1]
    return ids, gather


def shared_inputs(rows: list[Row], width: int, model: torch.nn.Module, device: torch.device) -> dict[str, Any]:
    """A 4D attention mask and position ids for a batch holding shared rows.

    A run's tokens see what its parent token sees, the parent, and the run itself causally;
    plain rows get the ordinary causal mask. Padding positions see token 0 only (a fully
    masked row would give NaNs); no real token ever sees padding.
    """
    allow = torch.zeros((len(rows), width, width), dtype=torch.bool, device=device)  # built where it is used
    causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    for b, row in enumerate(rows):
        n = len(row.ids)
        for first, length, parent in row.runs or [(0, n, -1)]:
            if parent >= 0:
                allow[b, first:first + length] = allow[b, parent]
            allow[b, first:first + length, first:first + length] = causal[:length, :length]
        allow[b, n:, 0] = True
        pos[b, :n] = torch.tensor(row.position_ids(), dtype=torch.long)
    mask = allow.unsqueeze(1)
    if getattr(model.config, "_attn_implementation", "sdpa") == "eager":
        dtype = next(model.parameters()).dtype
        mask = torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(~mask, torch.finfo(dtype).min)
    return {"attention_mask": mask, "position_ids": pos.to(device)}


def cannot_pack(model: torch.nn.Module) -> str:
    """Why shared rows (custom 4D mask + position ids) cannot be used on this model, if so."""
    impl = getattr(model.config, "_attn_implementation", "sdpa")
    if impl not in ("sdpa", "eager"):
        return f"{impl} attention takes no custom masks"
    config = text_config(model)
    if getattr(config, "alibi", False) or getattr(config, "model_type", "") in ("bloom", "mpt"):
        return "ALiBi positions ignore position ids"
    try:
        if "position_ids" not in inspect.signature(model.forward).parameters:
            return "the model's forward takes no position ids"
    except (TypeError, ValueError):
        return "the model's forward cannot be inspected"
    return ""


@contextmanager
def head_at(model: torch.nn.Module, index: torch.Tensor) -> Iterator[None]:
    """Make the LM head see only the hidden states at ``index`` ([batch, k] positions).

    Whatever the model does after its head (Gemma's logit soft-capping...) still applies; the
    logits come back as [batch, k, vocab].
    """
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings (LM head)")

    def gather(_module: Any, args: tuple) -> tuple:
        hidden = args[0]
        idx = index.to(hidden.device)
        picked = hidden.gather(1, idx.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
        return (picked, *args[1:])

    with patched() as patches:
        patches.pre_hook(head, gather)
        yield


def checked_logits(logits: torch.Tensor, gather: torch.Tensor) -> torch.Tensor:
    """The head must have seen only the gathered positions (a model that computes its logits
    without calling its output-embedding module would silently misalign them)."""
    if tuple(logits.shape[:2]) != tuple(gather.shape):
        raise RuntimeError(
            f"the LM head returned logits of shape {tuple(logits.shape)}, not one per gathered position "
            f"{tuple(gather.shape)}: this model computes logits without its output-embedding module; "
            "use --engine naive")
    return logits
