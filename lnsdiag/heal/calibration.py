"""The text a heal is fitted on, kept apart from the text it is scored on.

A heal fitted on the evaluation text would score its own training data. :func:`check_disjoint`
refuses, in one line naming the overlap, when

* a source document of the evaluation text is also one of the calibration text (compared by a
  hash of its whitespace-normalised text; documents shorter than :data:`MIN_DOCUMENT_CHARS`
  are too generic to count), or
* any :data:`NGRAM` tokens in a row of an evaluation window (all of a shorter window) occur
  anywhere in the calibration tokens: a window, a passage, or a document contained in a larger
  one, shared by both texts, however each text was cut into windows (hashes of every run of
  ``NGRAM`` tokens on both sides; nothing but hashes is kept).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from ..data.windows import TokenWindows, special_tokens_around
from ..errors import UserError

#: Tokens in a row that, found in both texts, make them overlap: a paragraph, longer than the boilerplate
#: distinct documents share (the stdlib docstrings share runs of 64 tokens, none of 128).
NGRAM = 128
#: Documents shorter than this (characters, normalised) are not compared as documents.
MIN_DOCUMENT_CHARS = 64
_BASE = np.uint64(0x9E3779B97F4A7C15)
_BASE_INVERSE = np.uint64(pow(0x9E3779B97F4A7C15, -1, 2**64))


def calibration_windows(tokenizer: Any, texts: Iterable[str], *, seq_len: int, max_tokens: int | None,
                        name: str = "calibration", evaluation: tuple[Sequence[str], TokenWindows] | None = None
                        ) -> TokenWindows:
    """The calibration text's token windows (:class:`TokenWindows`), checked disjoint from
    ``evaluation`` (its documents and windows) when given."""
    texts = list(texts)
    windows = TokenWindows.of(tokenizer, texts, seq_len=seq_len, max_tokens=max_tokens, name=name)
    if evaluation is not None:
        check_disjoint(texts, windows, *evaluation)
    return windows


def check_disjoint(calibration_texts: Sequence[str], calibration: TokenWindows,
                   evaluation_texts: Sequence[str], evaluation: TokenWindows, *, ngram: int = NGRAM) -> None:
    """Refuse (one line) calibration and evaluation texts that share a document or ``ngram`` tokens."""
    _check_documents(calibration_texts, evaluation_texts)
    _check_tokens(calibration, evaluation, ngram)


def document_hash(text: str) -> str:
    """A document's identity: its whitespace-normalised text, hashed."""
    return hashlib.sha256(" ".join(text.split()).encode("utf-8")).hexdigest()


def _check_documents(calibration: Sequence[str], evaluation: Sequence[str]) -> None:
    seen = {document_hash(t) for t in calibration if len(" ".join(t.split())) >= MIN_DOCUMENT_CHARS}
    shared = [t for t in evaluation if len(" ".join(t.split())) >= MIN_DOCUMENT_CHARS and document_hash(t) in seen]
    if shared:
        raise UserError(f"the calibration text contains {len(shared)} document(s) of the evaluation text, e.g. "
                        f"{_snippet(shared[0])}: calibrate on other text")


def _check_tokens(calibration: TokenWindows, evaluation: TokenWindows, ngram: int) -> None:
    """Every ``ngram`` tokens in a row of each evaluation window (a shorter window: all of it) looked up
    among the hashes of every run of as many tokens in the calibration stream (windows joined)."""
    stream = torch.cat(_bodies(calibration))
    bodies = _bodies(evaluation)
    lengths = sorted({min(ngram, len(b)) for b in bodies if len(b)})
    for n in lengths:
        known = np.unique(_ngram_hashes(stream, n))
        picked = [(k, b) for k, b in enumerate(bodies) if min(ngram, len(b)) == n]
        hashes = [_ngram_hashes(b, n) for _, b in picked]
        hit = np.flatnonzero(np.isin(np.concatenate(hashes), known))
        if hit.size:
            _refuse_tokens(evaluation, picked, hashes, int(hit[0]), n)


def _refuse_tokens(evaluation: TokenWindows, picked: list[tuple[int, torch.Tensor]], hashes: list[np.ndarray],
                   position: int, n: int) -> None:
    """The one-line refusal naming the first evaluation window (and its tokens) found in the calibration text."""
    offsets = np.cumsum([len(h) for h in hashes])
    which = int(np.searchsorted(offsets, position, side="right"))
    start = position - (int(offsets[which - 1]) if which else 0)
    k, body = picked[which]
    text = evaluation.tokenizer.decode(body[start:start + n].tolist())
    raise UserError(f"the calibration text contains {n} tokens in a row of evaluation window {k} ({_snippet(text)}): "
                    "calibrate on other text")


def _bodies(windows: TokenWindows) -> list[torch.Tensor]:
    """Each window's text tokens (the tokenizer's special tokens around it taken off)."""
    prefix, suffix = special_tokens_around(windows.tokenizer)
    return [w[len(prefix):len(w) - len(suffix)] for w in windows.windows]


def _ngram_hashes(tokens: torch.Tensor, n: int) -> np.ndarray:
    """A 64-bit polynomial hash (wrapping arithmetic) of every ``n`` tokens in a row (a sequence shorter
    than ``n``: one hash of all of it). Vectorised: the prefix sums of
    ``v_t · B^-t`` times ``B^i`` are the prefix hashes (B is odd, so invertible mod 2^64)."""
    ids = tokens.numpy().astype(np.uint64) + np.uint64(1)
    n = min(n, len(ids))
    if n == 0:
        return np.zeros(0, dtype=np.uint64)
    with np.errstate(over="ignore"):
        powers = np.cumprod(np.full(len(ids), _BASE, dtype=np.uint64))  # B^1 .. B^len
        inverse = np.cumprod(np.full(len(ids), _BASE_INVERSE, dtype=np.uint64))  # B^-1 .. B^-len
        prefix = np.concatenate([[np.uint64(0)], np.cumsum(ids * inverse, dtype=np.uint64) * powers])
        hashes = prefix[n:] - prefix[:-n] * powers[n - 1]
    return hashes ^ np.uint64(n)


def _snippet(text: str, width: int = 48) -> str:
    flat = " ".join(text.split())
    return repr(flat if len(flat) <= width else flat[:width] + "...")
