"""What the residual stream does across depth, measured from each block's input and output.

x_i is the input of block i (0-based) and x_{i+1} its output; x_L is the last block's output
*before* the final norm (``output_hidden_states`` would give the post-norm state there).
Statistics run over non-padding tokens (``tokens="all"``) or each sequence's last real
token (``tokens="last"``, as in Gromov et al. and ShortGPT), accumulated batch by batch so
memory stays bounded whatever the length of the text.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import pandas as pd
import torch
import torch.nn.functional as F

from .errors import UserError
from .surgery import LayerStack, find_layers, no_cache_kwargs

TokenMode = Literal["all", "last"]
ProgressFn = Callable[[int], None]


class _StopForward(Exception):
    """Raised after the last block: the final norm and LM head are not needed."""


def _pick(hidden: torch.Tensor, mask: torch.Tensor, tokens: TokenMode) -> torch.Tensor:
    mask = mask.to(hidden.device)
    if tokens == "all":
        return hidden[mask.bool()]
    last = mask.long().sum(dim=1) - 1
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def stream_states(
    model: torch.nn.Module,
    stack: LayerStack,
    ids: torch.Tensor,
    mask: torch.Tensor,
    on_state: Callable[[int, torch.Tensor], None],
    tokens: TokenMode = "all",
) -> None:
    """Run one batch and hand x_0..x_L (selected tokens, shape ``[n, hidden]``) to ``on_state``."""
    last = len(stack) - 1

    def before(index: int):
        def hook(_m: Any, args: tuple, kwargs: dict) -> None:
            on_state(index, _pick(args[0] if args else kwargs["hidden_states"], mask, tokens))
        return hook

    def after_last(_m: Any, _a: tuple, out: Any) -> None:
        on_state(last + 1, _pick(out[0] if isinstance(out, tuple) else out, mask, tokens))
        raise _StopForward

    hooks = [layer.register_forward_pre_hook(before(i), with_kwargs=True) for i, layer in enumerate(stack.layers)]
    hooks.append(stack.layers[last].register_forward_hook(after_last))
    device = model.get_input_embeddings().weight.device
    try:
        with torch.no_grad():
            model(input_ids=ids.to(device), attention_mask=mask.to(device), **no_cache_kwargs(model))
    except _StopForward:
        pass
    finally:
        for h in hooks:
            h.remove()


@dataclass
class AngularResult:
    """Per-layer and per-block angular distances of one model on one text."""

    layers: pd.DataFrame  # layer, angular_distance, block_influence, cosine, near_identity
    blocks: pd.DataFrame  # start_layer, block_size, angular_distance, block_influence
    tokens: int
    token_mode: str
    threshold: float

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def near_identity(self) -> list[int]:
        return [int(i) for i in self.layers.loc[self.layers["near_identity"], "layer"]]


class _PairAccumulator:
    """Running sums of angle and cosine between x_l and x_{l+n}, n = 1..max_block."""

    def __init__(self, num_layers: int, max_block: int) -> None:
        self.L, self.N = num_layers, max_block
        self.window: deque[tuple[int, torch.Tensor]] = deque(maxlen=max_block)
        self.angle: torch.Tensor | None = None
        self.cosine: torch.Tensor | None = None
        self.count = 0

    def __call__(self, index: int, state: torch.Tensor) -> None:
        if self.angle is None:
            self.angle = torch.zeros(self.L, self.N, dtype=torch.float64, device=state.device)
            self.cosine = torch.zeros_like(self.angle)
        unit = F.normalize(state.to(self.angle.device, torch.float32), dim=-1)
        if index == 0:
            self.window.clear()
            self.count += unit.shape[0]
        for start, previous in self.window:
            cos = (previous * unit).sum(dim=-1).clamp(-1.0, 1.0)
            n = index - start
            # arccos is ill-conditioned near cos = 1 (exactly where near-identity layers are);
            # 2·atan2(|u−v|, |u+v|) is the same angle, accurate for small angles too.
            angle = 2.0 * torch.atan2((previous - unit).norm(dim=-1), (previous + unit).norm(dim=-1))
            self.angle[start, n - 1] += angle.sum(dtype=torch.float64) / math.pi
            self.cosine[start, n - 1] += cos.sum(dtype=torch.float64)
        self.window.append((index, unit))


def angular_distances(
    model: torch.nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    tokens: TokenMode = "all",
    max_block: int | None = 1,
    threshold: float = 0.2,
    stack: LayerStack | None = None,
    progress: ProgressFn | None = None,
) -> AngularResult:
    """Angular distance arccos(cos(x_l, x_{l+n}))/π for every block l and n = 1..max_block.

    The per-layer table (n = 1) also has Block Influence, 1 − mean cosine (ShortGPT), and a
    ``near_identity`` flag for distances below ``threshold``. ``max_block=None`` means all.
    """
    if tokens not in ("all", "last"):
        raise UserError(f"--tokens must be all or last, not {tokens!r}")
    stack = stack or find_layers(model)
    L = len(stack)
    max_block = L if max_block is None else max_block
    if not 1 <= max_block <= L:
        raise UserError(f"--max-block {max_block} must be between 1 and the layer count ({L})")
    acc = _PairAccumulator(L, max_block)
    for ids, mask in batches:
        stream_states(model, stack, ids, mask, acc, tokens)
        if progress is not None:
            progress(int(mask.sum()) if tokens == "all" else int(mask.shape[0]))
    if acc.count == 0 or acc.angle is None:
        raise UserError("no tokens to measure: the text is empty")
    angle = (acc.angle / acc.count).cpu()
    cosine = (acc.cosine / acc.count).cpu()
    layers = pd.DataFrame({
        "layer": range(L),
        "angular_distance": angle[:, 0].tolist(),
        "block_influence": (1.0 - cosine[:, 0]).tolist(),
        "cosine": cosine[:, 0].tolist(),
    })
    layers["near_identity"] = layers["angular_distance"] < threshold
    rows = [
        {"start_layer": s, "block_size": n, "angular_distance": float(angle[s, n - 1]),
         "block_influence": float(1.0 - cosine[s, n - 1])}
        for n in range(1, max_block + 1) for s in range(L - n + 1)
    ]
    blocks = pd.DataFrame(rows, columns=["start_layer", "block_size", "angular_distance", "block_influence"])
    return AngularResult(layers, blocks, acc.count, tokens, threshold)


def default_seq_len(model: torch.nn.Module, wanted: int | None = None, cap: int = 2048) -> int:
    """``wanted``, else the model's context length capped at ``cap`` (2048, as in the paper)."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None) or cap
    if wanted is None:
        return min(cap, int(limit))
    if wanted < 2:
        raise UserError(f"--seq-len must be at least 2, not {wanted}")
    if wanted > limit:
        raise UserError(f"--seq-len {wanted} exceeds the model's context length ({limit})")
    return wanted


def angular_on_text(
    loaded: Any,
    texts: Iterable[str],
    *,
    seq_len: int | None = None,
    max_tokens: int | None = 65_536,
    batch_size: int = 4,
    tokens: TokenMode = "all",
    max_block: int | None = None,
    threshold: float = 0.2,
    stack: LayerStack | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> AngularResult:
    """Tokenise ``texts`` for a :class:`~lnsdiag.models.LoadedModel` and measure angular distances.

    ``progress(done, total)`` is called after each batch, counted in windows.
    """
    text, tick = text_batches(loaded, texts, seq_len=seq_len, max_tokens=max_tokens, batch_size=batch_size,
                              progress=progress)
    return angular_distances(loaded.model, text, tokens=tokens, max_block=max_block, threshold=threshold,
                             stack=stack, progress=tick)


def text_batches(
    loaded: Any,
    texts: Iterable[str],
    *,
    seq_len: int | None,
    max_tokens: int | None,
    batch_size: int,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[Iterable[tuple[torch.Tensor, torch.Tensor]], ProgressFn]:
    """The text as padded batches of windows, and a per-batch tick reporting ``(done, total)`` windows."""
    from .text import batches, token_windows

    seq_len = default_seq_len(loaded.model, seq_len)
    windows = token_windows(loaded.tokenizer, texts, seq_len=seq_len, max_tokens=max_tokens)
    done = 0

    def tick(_n: int) -> None:
        nonlocal done
        done = min(len(windows), done + batch_size)
        if progress is not None:
            progress(done, len(windows))

    return batches(windows, batch_size, loaded.tokenizer.pad_token_id or 0), tick
