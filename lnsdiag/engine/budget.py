"""How much a pass takes at once: tokens per batch (from free GPU memory), the widest shared
row, and the attention window no shared row may cross.

Rows are sorted by length and packed by a token budget sized from free GPU memory (a batch
that still runs out of memory is split and retried by the engine).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..model.families import WINDOW_FIELDS
from ..model.structure import text_config
from .plan import Row


def cut_batches(rows: list[Row], budget: int, max_rows: int = 512) -> list[list[int]]:
    """Consecutive row indices whose padded size (rows × longest) stays within ``budget`` tokens.

    A row that needs the model's own mask (beyond a sliding window) never shares a batch with
    a shared row, whose batch gets a custom mask."""
    out: list[list[int]] = []
    current: list[int] = []
    width = 0
    for i, row in enumerate(rows):
        w = max(width, len(row.ids))
        if current and (w * (len(current) + 1) > budget or len(current) >= max_rows
                        or row.own_mask != rows[current[-1]].own_mask):
            out.append(current)
            current, w = [], len(row.ids)
        current.append(i)
        width = w
    if current:
        out.append(current)
    return out


def default_budget(model: torch.nn.Module, kept_states: int, rows: Sequence[Row], compare: bool = False) -> int:
    """Tokens per batch that fit the free memory of the model's device (CPU: 8192).

    Per token: the kept block inputs (copies), a forward's working set, the logits of the
    scored positions (model dtype plus float32 for the log-sum-exp), and for shared rows the
    row's share of its boolean attention mask; with ``compare``, the full model's float32
    log-probabilities of the scored positions, kept while the variants resume.
    """
    device = model.get_input_embeddings().weight.device
    if device.type != "cuda":
        return 8192
    free, _ = torch.cuda.mem_get_info(device)
    config = text_config(model)
    hidden = int(getattr(config, "hidden_size", 4096))
    inter = int(getattr(config, "intermediate_size", 4 * hidden) or 4 * hidden)
    vocab = int(getattr(config, "vocab_size", 32000))
    elem = next(model.parameters()).element_size()
    tokens = max(1, sum(len(r.ids) for r in rows))
    scored = sum(len(r.positions) for r in rows) / tokens
    widest = max((len(r.ids) for r in rows if r.shared), default=0)
    per_token = (kept_states + 1) * hidden * elem + (12 * hidden + 3 * inter) * elem
    per_token += scored * vocab * (elem + 8 + (4 if compare else 0)) + widest
    return int(max(512, min(131_072, 0.6 * free / per_token)))


def default_row_tokens(model: torch.nn.Module, max_length: int) -> int:
    """Longest shared row: at most the context length, and short enough that its dense attention
    (≈ 4·hidden·width FLOPs a token, masked keys included) costs no more than the block's
    matmuls (≈ 2·(4·hidden² + 3·hidden·intermediate)); never below 1024 tokens."""
    config = text_config(model)
    hidden = int(getattr(config, "hidden_size", 0) or getattr(config, "n_embd", 0) or 4096)
    inter = int(getattr(config, "intermediate_size", 0) or getattr(config, "ffn_dim", 0) or 4 * hidden)
    return int(min(max_length, max(1024, 2 * hidden + 1.5 * inter)))


def attention_limit(model: torch.nn.Module) -> tuple[int | None, str]:
    """The smallest window (or chunk) any layer of the model attends within, and its config name.

    A window that the config says no layer uses (``use_sliding_window=False``; ``layer_types``
    or GPT-Neo's ``attention_layers`` naming full or global attention and no local kind) does
    not count. When in doubt the window counts: that only shares less.
    """
    config = text_config(model)
    kinds = getattr(config, "layer_types", None) or getattr(config, "attention_layers", None)
    kinds = [str(k) for k in kinds] if isinstance(kinds, (list, tuple)) else []
    no_local = any("full" in k or "global" in k for k in kinds) and not any(
        w in k for k in kinds for w in ("sliding", "local", "chunk"))
    if getattr(config, "use_sliding_window", True) is False or no_local:
        return None, ""
    found: list[tuple[int, str]] = []
    for name, _ in WINDOW_FIELDS:
        value = getattr(config, name, None)
        values = value if isinstance(value, (list, tuple)) else [value]
        for v in values:
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                found.append((v, f"config.{name}"))
    return min(found) if found else (None, "")
