"""The partial-pass file: an interrupted engine pass resumes mid-pass, bitwise the same.

A :class:`Checkpoint` holds a :class:`PassState` (values so far, rows done, the batch budget)
for one set of requests (:func:`fingerprint`), variants and row plan
(:func:`~lnsdiag.engine.plan.plan_digest`).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..distributed import on_main, world
from ..interventions.units import Removal
from ..results.store import partial_files
from ..runs import atomic_write
from ..scoring.base import TokenRequest


@dataclass
class PassState:
    """What a checkpoint holds: results so far, which rows are done, and the batch budget
    (kept so a resumed pass cuts the same batches and gives bitwise the same numbers).
    ``have`` marks the requests whose values are present (those of done rows): under a
    launcher each rank's file holds its own rows, and files are merged by it.

    When requests are compared with the full model: ``kl`` / ``agree`` per (variant, request)
    and ``token_kl`` / ``token_agree`` per (variant, compared token), the compared requests' tokens
    laid end to end (``token_start``); None otherwise."""

    loglik: np.ndarray
    greedy: np.ndarray
    done: np.ndarray
    budget: int
    have: np.ndarray | None = None
    kl: np.ndarray | None = None
    agree: np.ndarray | None = None
    token_kl: np.ndarray | None = None
    token_agree: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.have is None:
            self.have = np.zeros(self.loglik.shape[1], dtype=bool)

    @classmethod
    def empty(cls, shape: tuple[int, int], rows: int, budget: int, compared_tokens: int | None = None) -> PassState:
        """Nothing done yet; with ``compared_tokens`` (not None), room for the comparison's values."""
        extra = {} if compared_tokens is None else {
            "kl": np.zeros(shape), "agree": np.zeros(shape, dtype=np.int64),
            "token_kl": np.zeros((shape[0], compared_tokens), dtype=np.float32),
            "token_agree": np.zeros((shape[0], compared_tokens), dtype=bool)}
        return cls(np.zeros(shape), np.zeros(shape, dtype=bool), np.zeros(rows, dtype=bool), budget, **extra)

    def take(self, other: PassState, have: np.ndarray, tokens: np.ndarray | None) -> None:
        """Copy ``other``'s values of the requests in ``have`` (and of their compared ``tokens``)."""
        self.loglik[:, have] = other.loglik[:, have]
        self.greedy[:, have] = other.greedy[:, have]
        if self.kl is not None and other.kl is not None:
            self.kl[:, have] = other.kl[:, have]
            self.agree[:, have] = other.agree[:, have]
            self.token_kl[:, tokens] = other.token_kl[:, tokens]
            self.token_agree[:, tokens] = other.token_agree[:, tokens]


def _variant_codes(variants: Sequence[Removal]) -> np.ndarray:
    """Variants as stored in a checkpoint: one JSON list of their JSON forms (``[null, 3, [3, 4]]``)."""
    return np.array(json.dumps([v.to_json() for v in variants]))


def _variants_from_codes(codes: np.ndarray) -> list[Removal]:
    return [Removal.from_json(v) for v in json.loads(str(codes))]


class Checkpoint:
    """Partial engine results on disk, so an interrupted sweep resumes mid-pass.

    Saved atomically at most every ``every_seconds`` (``LNSDIAG_CHECKPOINT_SECONDS``, default
    60) and when the pass is interrupted: a killed run loses at most that much work. It is
    only used again for the same requests (``fingerprint``), variants and row plan.

    Under a launcher each rank writes its own file beside ``path`` (``engine-partial.rank-003.npz``)
    and a pass starts from all matching files merged, whatever number of ranks wrote them.
    """

    def __init__(self, path: Path, fingerprint: str, every_seconds: float | None = None) -> None:
        if every_seconds is None:
            every_seconds = float(os.environ.get("LNSDIAG_CHECKPOINT_SECONDS", 60))
        self.path, self.fingerprint, self.every = Path(path), fingerprint, every_seconds
        here = world()
        #: the file this process writes
        self.own = self.path.with_name(f"{self.path.stem}.rank-{here.rank:03d}{self.path.suffix}") \
            if here.parallel else self.path
        self._last = time.monotonic()
        self.variants: list[Removal] = []
        self.plan = ""

    def files(self) -> list[Path]:
        """Every partial file of this pass's folder: a single process's and each rank's."""
        return partial_files(self.path)

    def stored_variants(self) -> list[Removal] | None:
        """The variants of a matching checkpoint on disk (to finish that pass), if any; rank 0
        reads, every rank gets its answer."""
        return on_main(self._stored_variants)

    def _stored_variants(self) -> list[Removal] | None:
        for path in self.files():
            data = self._read(path)
            if data is None:
                continue
            try:
                return _variants_from_codes(data["variants"])
            except (ValueError, TypeError):
                continue  # a checkpoint of an older format: start the pass over
        return None

    def _read(self, path: Path) -> dict[str, np.ndarray] | None:
        try:
            with np.load(path, allow_pickle=False) as data:
                if str(data["fingerprint"]) != self.fingerprint:
                    return None
                return {key: data[key].copy() for key in data.files}
        except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):
            return None  # missing, foreign or damaged: start the pass over

    def load(self, shape: tuple[int, int], rows: int, token_start: np.ndarray | None = None,
             compared_tokens: int | None = None) -> PassState | None:
        """Every matching partial file merged (done rows, and their requests' values), or None.

        Files of another batch budget are left out: their batches were cut differently. A file
        without ``have`` (one process, older lnsdiag) holds every value it has, so it goes first.
        """
        found = []
        for path in self.files():
            data = self._read(path)
            if data is None or data["loglik"].shape != shape or data["done"].shape != (rows,):
                continue
            if compared_tokens is not None and any(
                    key not in data or data[key].shape[1] != compared_tokens for key in ("token_kl", "token_agree")):
                continue
            if str(data["variants"]) != str(_variant_codes(self.variants)) or str(data["plan"]) != self.plan:
                continue
            found.append(data)
        if not found:
            return None
        found.sort(key=lambda d: "have" in d)
        budget = int(found[0]["budget"])
        state = PassState.empty(shape, rows, budget, compared_tokens)
        for data in found:
            if int(data["budget"]) != budget:
                continue
            have = data["have"].astype(bool) if "have" in data else np.ones(shape[1], dtype=bool)
            saved = PassState(data["loglik"], data["greedy"], data["done"], budget, have, data.get("kl"),
                              data.get("agree"), data.get("token_kl"), data.get("token_agree"))
            state.take(saved, have, compared_token_mask(token_start, have, compared_tokens))
            state.done |= data["done"].astype(bool)
            state.have |= have
        return state

    def save(self, state: PassState, force: bool = False) -> None:
        if not force and time.monotonic() - self._last < self.every:
            return
        buf = io.BytesIO()
        compared = {} if state.kl is None else {"kl": state.kl, "agree": state.agree, "token_kl": state.token_kl,
                                                "token_agree": state.token_agree}
        np.savez(buf, fingerprint=np.array(self.fingerprint), loglik=state.loglik, greedy=state.greedy,
                 done=state.done, budget=np.array(state.budget), variants=_variant_codes(self.variants),
                 plan=np.array(self.plan), have=state.have, **compared)
        self.own.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.own, buf.getvalue())
        self._last = time.monotonic()

    def remove(self) -> None:
        """Delete every partial file of the pass (rank 0, once the pass's results are stored)."""
        for path in self.files():
            path.unlink(missing_ok=True)


def token_spans(token_start: np.ndarray, total: int) -> list[tuple[int, int] | None]:
    """Each request's tokens in the per-token arrays, ``(start, end)`` (None: not compared).
    ``token_start[n]`` is request n's first token (−1 when not compared); its tokens run to the next
    compared request's start, the last one's to ``total``."""
    spans: list[tuple[int, int] | None] = [None] * len(token_start)
    end = total
    for n in range(len(token_start) - 1, -1, -1):
        if token_start[n] >= 0:
            spans[n] = (int(token_start[n]), end)
            end = int(token_start[n])
    return spans


def compared_token_mask(token_start: np.ndarray | None, have: np.ndarray, compared_tokens: int | None
                        ) -> np.ndarray | None:
    """Which compared tokens belong to the requests in ``have`` (see :func:`token_spans`)."""
    if token_start is None or compared_tokens is None:
        return None
    mask = np.zeros(compared_tokens, dtype=bool)
    for n, span in enumerate(token_spans(token_start, compared_tokens)):
        if span is not None and have[n]:
            mask[span[0]:span[1]] = True
    return mask


def fingerprint(requests: Sequence[TokenRequest], max_length: int, extra: dict[str, Any] | None = None) -> str:
    """Identifies what a pass scores: the token requests, the context length, the settings."""
    digest = hashlib.sha256()
    digest.update(json.dumps({"max_length": max_length, **(extra or {})}, sort_keys=True, default=str).encode())
    for req in requests:
        digest.update(np.asarray(req.context, dtype=np.int64).tobytes())
        digest.update(b"|")
        digest.update(np.asarray(req.continuation, dtype=np.int64).tobytes())
        digest.update(b";")
    return digest.hexdigest()[:32]

