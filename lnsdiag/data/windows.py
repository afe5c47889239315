"""Text as token windows: the one object that owns them, for every consumer.

Angular distances and variance batch the windows; the built-in perplexity scores each
window's tokens after its context (BOS); the fast engine takes them as token requests; the
result store fingerprints them. All of that is derived here, once.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Sequence
from functools import cached_property
from itertools import pairwise
from typing import Any

import torch

from ..errors import UserError
from ..stats.blocks import token_blocks


def token_windows(
    tokenizer: Any, texts: Iterable[str], *, seq_len: int, max_tokens: int | None
) -> list[torch.Tensor]:
    """Pack the texts (joined by blank lines) into windows of at most ``seq_len`` tokens.

    Each window gets the tokenizer's own special tokens (Llama's BOS, BERT's [CLS]/[SEP]),
    counted inside ``seq_len``; the total stops at ``max_tokens``. The last window may be
    shorter: batches pad it and masks exclude the padding from every statistic.
    """
    prefix, suffix = special_tokens_around(tokenizer)
    specials = len(prefix) + len(suffix)
    body = seq_len - specials
    if body < 1:
        raise UserError(f"--seq-len {seq_len} leaves no room for text after {specials} special tokens")
    if max_tokens is None:
        needed = None
    else:
        full, rest = divmod(max_tokens, seq_len)
        needed = full * body + max(0, rest - specials)
    stream: list[int] = []
    chunk: list[str] = []
    chars = 0
    goal = 16 * body if needed is None else max(4 * needed, 1024)
    for text in texts:
        chunk.append(text)
        chars += len(text)
        if chars >= goal:
            stream.extend(_encode(tokenizer, chunk, continued=bool(stream)))
            chunk, chars = [], 0
            if needed is not None and len(stream) >= needed:
                break
    if chunk:
        stream.extend(_encode(tokenizer, chunk, continued=bool(stream)))
    if needed is not None:
        stream = stream[:needed]
    windows = [
        torch.tensor(prefix + stream[i:i + body] + suffix, dtype=torch.long)
        for i in range(0, len(stream), body)
    ]
    if not windows:
        raise UserError("the text produced no tokens")
    return windows


def special_tokens_around(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The ids a tokenizer puts before and after a text (BOS; [CLS] ... [SEP]; none)."""
    probe = "Hello world"
    bare = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe, add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(bare) + 1):
        if full[start:start + len(bare)] == bare:
            return list(full[:start]), list(full[start + len(bare):])
    return [], []


def context_tokens(tokenizer: Any) -> int:
    """Leading tokens of a window that are context only when scoring it: the tokenizer's
    prefix (BOS), or the first text token when there is none."""
    return max(1, len(special_tokens_around(tokenizer)[0]))


def _encode(tokenizer: Any, docs: list[str], continued: bool) -> list[int]:
    text = ("\n\n" if continued else "") + "\n\n".join(docs)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def default_seq_len(model: torch.nn.Module, wanted: int | None = None, cap: int = 2048) -> int:
    """``wanted``, else the model's context length capped at ``cap`` (2048, as in the paper)."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None) or cap
    if wanted is None:
        return min(cap, int(limit))
    check_seq_len(wanted)
    if wanted > limit:
        raise UserError(f"--seq-len {wanted} exceeds the model's context length ({limit})")
    return wanted


def check_seq_len(seq_len: int) -> None:
    """A window needs a token of context and one to measure or predict."""
    if seq_len < 2:
        raise UserError(f"--seq-len must be at least 2, not {seq_len}")


def check_batch_size(batch_size: int) -> int:
    """``--batch-size``: sequences per forward pass, at least 1."""
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, not {batch_size}")
    return batch_size


def batches(
    windows: Sequence[torch.Tensor], batch_size: int, pad_id: int = 0
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Right-padded ``(input_ids, attention_mask)`` batches of the windows, in order."""
    check_batch_size(batch_size)
    for start in range(0, len(windows), batch_size):
        group = windows[start:start + batch_size]
        width = max(len(w) for w in group)
        ids = torch.full((len(group), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for row, w in enumerate(group):
            ids[row, : len(w)] = w
            mask[row, : len(w)] = 1
        yield ids, mask


class TokenWindows:
    """A text's token windows and everything derived from them, computed once.

    ``context`` leading tokens of each window (BOS, else the first text token) are context
    only when the window is scored; the rest are the scored tokens.
    """

    def __init__(self, windows: Sequence[torch.Tensor], tokenizer: Any, name: str = "text") -> None:
        if not windows:
            raise UserError("the text produced no tokens")
        self.windows = list(windows)
        self.tokenizer = tokenizer
        self.name = name
        self.context = context_tokens(tokenizer)

    @classmethod
    def of(cls, tokenizer: Any, texts: Iterable[str], *, seq_len: int, max_tokens: int | None,
           name: str = "text") -> TokenWindows:
        """Tokenise ``texts`` into windows (see :func:`token_windows`)."""
        return cls(token_windows(tokenizer, texts, seq_len=seq_len, max_tokens=max_tokens), tokenizer, name)

    def __len__(self) -> int:
        return len(self.windows)

    @property
    def longest(self) -> int:
        return max(len(w) for w in self.windows)

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id or 0

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Right-padded ``(input_ids, attention_mask)`` batches, in order."""
        return batches(self.windows, batch_size, self.pad_id)

    @cached_property
    def scored_tokens(self) -> list[int]:
        """Tokens each window predicts (its length minus the context)."""
        return [len(w) - self.context for w in self.windows]

    @cached_property
    def scored_bytes(self) -> list[int]:
        """UTF-8 bytes of the text each window predicts (at least 1), for bits per byte."""
        return [len(self.tokenizer.decode(w[self.context:].tolist(), skip_special_tokens=True).encode("utf-8")) or 1
                for w in self.windows]

    @cached_property
    def cuts(self) -> list[list[int]]:
        """Each window's scored tokens cut into the units of a paired comparison: the window
        itself when there are many windows, blocks of it on a short text (:func:`token_blocks`)."""
        return token_blocks(self.scored_tokens)

    @property
    def units_are_windows(self) -> bool:
        """Whether each window (with tokens to score) is one unit, rather than cut into blocks."""
        return all(len(cut) <= 2 for cut in self.cuts)

    @cached_property
    def blocks(self) -> list[tuple[int, int, int]]:
        """``(window, start, end)`` of every unit, in scored-token coordinates, in text order."""
        return [(k, a, b) for k, cut in enumerate(self.cuts) for a, b in pairwise(cut)]

    @cached_property
    def block_bytes(self) -> list[int]:
        """UTF-8 bytes each unit predicts; a window's units add up to its :attr:`scored_bytes`
        (prefix decodes, so a character split between two blocks is counted once)."""
        out: list[int] = []
        for k, cut in enumerate(self.cuts):
            if len(cut) < 2:
                continue  # nothing to score: no unit
            scored = self.windows[k][self.context:].tolist()
            done = [len(self.tokenizer.decode(scored[:c], skip_special_tokens=True).encode("utf-8"))
                    for c in cut[1:-1]]
            ends = [0, *done, self.scored_bytes[k]]
            out += [b - a for a, b in pairwise(ends)]
        return out

    @cached_property
    def digest(self) -> str:
        """Identifies the tokens (for a result store's settings)."""
        return hashlib.sha256(b"".join(w.numpy().tobytes() for w in self.windows)).hexdigest()[:16]
