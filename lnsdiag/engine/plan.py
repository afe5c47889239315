"""The row plan: which model rows a pass runs, and which request each scored position answers.

Requests share their common leading tokens (prefix sharing): the inputs are sorted into a trie
and cut into rows; a row holds each shared prefix once and every request's remaining tokens as
a branch that attends to its ancestors and itself only, positions continuing from the branch
point (:class:`Row`). A 5-shot MMLU subject's description and dev examples are computed once
per row, a question's context once for its choices; identical inputs (one-token choices) share
one branch, as lm-eval's ``logits_cache`` does. The engine switches sharing on only after a
run-time check against unshared rows, and never across a sliding window.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ..scoring.base import TokenRequest


@dataclass
class Row:
    """One model input and the requests it answers.

    A plain row is one token sequence (requests with identical inputs share it). A shared row
    lays out a trie of several requests' inputs depth first: each distinct prefix once, then
    each branch as a ``run`` of tokens that attends to its ancestors and to itself (causally)
    only, with position ids continuing from its branch point. Every request therefore sees
    exactly its own unshared input: a context with its choices is the two-level case, a
    few-shot prefix with many questions after it the general one.
    """

    ids: tuple[int, ...]
    positions: set[int] = field(default_factory=set)
    members: list[tuple[int, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)  # (req, pos, targets)
    runs: list[tuple[int, int, int]] = field(default_factory=list)  # shared: (first, length, parent token or -1)
    own_mask: bool = False  # must run with the model's own mask (longer than a sliding window)

    @property
    def shared(self) -> bool:
        return bool(self.runs)

    def position_ids(self) -> list[int]:
        """Each token's depth in its request's input (for a plain row: 0, 1, 2, ...)."""
        if not self.runs:
            return list(range(len(self.ids)))
        out = [0] * len(self.ids)
        for first, length, parent in self.runs:
            start = out[parent] + 1 if parent >= 0 else 0
            out[first:first + length] = range(start, start + length)
        return out


def _plain_input(req: TokenRequest, n: int, max_length: int) -> tuple[tuple[int, ...], int]:
    ids = (req.context + req.continuation)[-(max_length + 1):][:-1]
    start = len(ids) - len(req.continuation)
    if start < 0:
        raise ValueError(f"request {n}: continuation longer than the model's context ({max_length})")
    return ids, start


#: Requests sharing fewer leading tokens than this are not worth a custom attention mask
#: (rolling windows share one BOS).
MIN_SHARED_CONTEXT = 4


def plan_rows(requests: Sequence[TokenRequest], max_length: int, share: bool = False,
              window: int | None = None, row_tokens: int | None = None, prefixes: bool = True) -> list[Row]:
    """Group requests into model rows, longest first (lm-eval's order).

    A request's input is ``(context + continuation)[-(max_length+1):][:-1]`` and it scores its
    continuation at the last ``len(continuation)`` positions, exactly as HFLM does. Identical
    inputs always share a row (one-token choices of a question). With ``share``, inputs that
    begin with the same tokens share shared rows of at most ``row_tokens`` tokens (default
    ``max_length``), chosen to hold as few tokens as possible (:func:`_cut_rows`). With a
    sliding ``window``, inputs longer than it stay plain rows on the model's own mask.

    With ``prefixes`` (the default), an input that is a prefix of another is answered from the
    longer one's plain row (a causal model's logits at a position never see later tokens): a
    short text's blocks (each request the window up to a block) cost one row per window, as the
    naive engine does. Without, every distinct input has a row (the sharing check's reference).
    """
    by_input: dict[tuple[int, ...], list[tuple[int, int, tuple[int, ...]]]] = {}
    for n, req in enumerate(requests):
        if not req.continuation:  # nothing to score: the engine answers (0.0, True), as HFLM does
            continue
        ids, start = _plain_input(req, n, max_length)
        by_input.setdefault(ids, []).append((n, start, req.continuation))
    inputs = sorted(by_input)  # lexicographic: inputs with a common prefix are neighbours
    rows: list[Row] = []
    budget = max_length if row_tokens is None else row_tokens
    fits = [share and (window is None or len(ids) <= window) for ids in inputs]
    group: list[tuple[int, ...]] = []
    chain = True  # the group is one path: each input a prefix of the next
    for k, ids in enumerate(inputs + [()]):
        extends = prefixes and k < len(inputs) and bool(group) and chain and ids[:len(group[-1])] == group[-1]
        joins = extends or (k < len(inputs) and fits[k] and bool(group) and fits[k - 1] and
                            _common(group[-1], ids) >= MIN_SHARED_CONTEXT)
        if not joins and group:
            rows += [_build_row(part, by_input) for part in _cut_rows(group, budget)]
            group = []
        chain = extends or not group
        group.append(ids)
    for row in rows:
        row.own_mask = window is not None and not row.shared and len(row.ids) > window
    return sorted(rows, key=lambda r: (not r.own_mask, -len(r.ids), r.ids))


def _common(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the common prefix of ``a`` and ``b``."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _cut_rows(inputs: list[tuple[int, ...]], budget: int) -> list[list[tuple[int, ...]]]:
    """Split sorted inputs into consecutive rows of at most ``budget`` distinct tokens, with the
    fewest tokens in all (then the fewest rows).

    In sorted order an input's longest common prefix with any earlier one is the one with its
    predecessor, so a row of inputs i..j-1 holds ``len(i) + Σ (len(k) − common(k−1, k))``
    tokens; a cut before k costs ``common(k−1, k)`` repeated tokens. Dynamic programming over
    the cut points (an input longer than the budget gets a row of its own).
    """
    n = len(inputs)
    common = [0] + [_common(inputs[k - 1], inputs[k]) for k in range(1, n)]
    added = [0]
    for k in range(n):
        added.append(added[-1] + len(inputs[k]) - common[k])
    best: list[tuple[int, int]] = [(0, 0)] + [(0, 0)] * n
    start = [0] * (n + 1)
    for j in range(1, n + 1):
        choice = None
        for i in range(j - 1, -1, -1):
            size = added[j] - added[i] + common[i]
            if j - i > 1 and size > budget:
                break  # sizes only grow as the row starts earlier
            cost = (best[i][0] + size, best[i][1] + 1)
            if choice is None or cost < choice[0]:
                choice = (cost, i)
        best[j], start[j] = choice  # type: ignore[misc]
    parts: list[list[tuple[int, ...]]] = []
    j = n
    while j > 0:
        parts.append(inputs[start[j]:j])
        j = start[j]
    return parts[::-1]


def _build_row(inputs: list[tuple[int, ...]], by_input: dict) -> Row:
    """Lay out sorted ``inputs`` depth first; a single path (one input, or inputs that are
    prefixes of the last) is a plain row."""
    ids: list[int] = []
    runs: list[list[int]] = []
    path: list[int] = []  # row index of each token of the previous input
    placed: list[tuple[tuple[int, ...], list[int]]] = []
    for ids_k in inputs:
        shared = _common(ids_k[:len(path)], [ids[p] for p in path]) if path else 0
        new = ids_k[shared:]
        parent = path[shared - 1] if shared else -1
        first = len(ids)
        if new:
            if runs and parent == first - 1 and parent >= 0:
                runs[-1][1] += len(new)  # continues the previous run: no branch
            else:
                runs.append([first, len(new), parent])
            ids += new
        path = path[:shared] + list(range(first, first + len(new)))
        placed.append((ids_k, list(path)))
    row = Row(tuple(ids))
    if len(runs) > 1:
        row.runs = [(a, b, c) for a, b, c in runs]
    for ids_k, where in placed:
        for n, start, cont in by_input[ids_k]:
            at = tuple(where[start:start + len(cont)])
            row.members.append((n, at, cont))
            row.positions.update(at)
    return row



def plan_digest(rows: Sequence[Row]) -> str:
    """Identifies a row plan (inputs, packing, members), so a checkpoint's ``done`` matches it."""
    digest = hashlib.sha256()
    for row in rows:
        digest.update(np.asarray(row.ids, dtype=np.int64).tobytes())
        digest.update(repr((row.runs, row.own_mask, [(n, p) for n, p, _ in row.members])).encode())
    return digest.hexdigest()[:32]
