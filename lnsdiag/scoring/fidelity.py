"""How far each removal moves the output distribution: KL(p_full ‖ p_variant) and top-1
agreement with the full model on the built-in text, per scored token, from the same pass.

Perplexity averages gains and losses; accuracy moves in whole answers. The quantization
community judges a changed model by how far its next-token distribution moves from the
original's (llama.cpp's ``perplexity --kl-divergence``, mlx-lm's ``kld``); FinerCut ranks
removals by it. Here, on the perplexity text's windows and units (:mod:`.perplexity`):

* ``kl``: mean over scored tokens of KL(p_full ‖ p_variant), nats; paired unit by unit (the full
  model's KL is 0 on every unit), with a minimum-effect test for "hurts" (KL above its margin);
* ``top1``: share of scored tokens whose argmax is the full model's;
* ``kl_p90`` / ``kl_p99``: the 90th / 99th percentile of per-token KL (the tail, where
  generation breaks), descriptive: no interval, no verdict.

The fast engine computes these from the same pass (the full model's distributions of the batch
in flight are kept while its variants resume); :meth:`FidelityScorer.score`, the naive reference,
runs the full model beside the variant on each batch (:func:`~..interventions.removal.removals_suspended`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import numpy as np
import torch

from ..data.windows import TokenWindows
from ..interventions.removal import removals_suspended
from ..model.structure import no_cache_kwargs
from ..stats.blocks import ratio_stderr
from .base import Answers, MetricRow, PairedUnits, Scorer, Scores, TokenRequest, paired_units
from .divergence import full_divergence
from .perplexity import TextScorer, windows_of
from .registry import ScoringSetup

FIDELITY_TASK = "fidelity"
#: The metrics this scorer reports, in the order tables show them.
FIDELITY_METRICS = ("kl", "top1", "kl_p90", "kl_p99")
#: Percentiles of per-token KL reported (descriptive).
PERCENTILES = {"kl_p90": 90.0, "kl_p99": 99.0}


@paired_units
@dataclass
class Fidelity(PairedUnits):
    """Per unit (a window, or a block of one on a short text): summed KL to the full model, the
    tokens whose argmax agrees with the full model's, and the unit's scored tokens; plus the
    percentiles of per-token KL over the whole text."""

    kind = "fidelity"

    unit_kl: list[float]
    unit_agree: list[int]
    unit_tokens: list[int]
    percentiles: dict[str, float]
    unit_window: list[int] | None = None

    @property
    def tokens(self) -> int:
        return sum(self.unit_tokens)

    def rows(self, task: str = FIDELITY_TASK) -> list[MetricRow]:
        n = len(self.unit_kl)
        kl = sum(self.unit_kl) / self.tokens
        top1 = sum(self.unit_agree) / self.tokens
        return [MetricRow(task, "kl", kl, ratio_stderr(self.unit_kl, self.unit_tokens), False, n),
                MetricRow(task, "top1", top1, ratio_stderr(self.unit_agree, self.unit_tokens), True, n),
                *(MetricRow(task, name, self.percentiles[name], math.nan, False, n) for name in PERCENTILES)]

    def units(self) -> int:
        return len(self.unit_kl)

    def no_change_count(self, metric: str) -> int:
        """A variant that moved no token's distribution at all: the count behind "nothing changed"
        is the scored tokens, each of which could have moved (see the verdict's floor)."""
        return self.tokens

    def delta_stderr(self, base: PairedUnits, metric: str, on_log_ratio: bool) -> float:
        """The paired Δ (variant − full model, unit by unit) of ``kl`` or ``top1``; NaN for the
        percentiles (descriptive) and for units that do not pair."""
        if (not isinstance(base, Fidelity) or base.unit_tokens != self.unit_tokens
                or base.unit_window != self.unit_window or metric not in ("kl", "top1")):
            return math.nan
        mine, theirs = (self.unit_kl, base.unit_kl) if metric == "kl" else (self.unit_agree, base.unit_agree)
        return ratio_stderr([a - b for a, b in zip(mine, theirs, strict=True)], self.unit_tokens)

    def as_json(self) -> dict[str, Any]:
        return {"unit_kl": self.unit_kl, "unit_agree": self.unit_agree, "unit_tokens": self.unit_tokens,
                "percentiles": self.percentiles, "unit_window": self.unit_window}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Fidelity:
        return cls(**data)

    def sample_rows(self, task: str) -> list[dict[str, Any]]:
        """Each unit as metric ``unit_kl`` with ``[tokens, agreeing tokens, window]`` as item."""
        windows = self.unit_window or list(range(len(self.unit_kl)))
        return [{"task": task, "metric": "unit_kl", "doc_id": i, "value": kl, "item": json.dumps([t, a, w]),
                 "choices": None}
                for i, (kl, a, t, w) in enumerate(zip(self.unit_kl, self.unit_agree, self.unit_tokens, windows,
                                                      strict=True))]

    @classmethod
    def of(cls, unit_kl: list[float], unit_agree: list[int], token_kl: np.ndarray, windows: TokenWindows) -> Fidelity:
        """The units of a text's windows (:attr:`~lnsdiag.data.windows.TokenWindows.blocks`)."""
        blocks = windows.blocks
        return cls.of_units(unit_kl, unit_agree, [b - a for _, a, b in blocks], token_kl,
                            None if windows.units_are_windows else [k for k, _, _ in blocks])

    @classmethod
    def of_units(cls, unit_kl: Sequence[float], unit_agree: Sequence[int], unit_tokens: Sequence[int],
                 token_kl: np.ndarray, unit_window: list[int] | None = None) -> Fidelity:
        """Units given directly (a task's documents, a generation's prompts); ``token_kl``: every
        scored token's KL, for the percentiles."""
        values = np.asarray(token_kl, dtype=np.float64)
        percentiles = {name: float(np.percentile(values, q)) if values.size else math.nan
                       for name, q in PERCENTILES.items()}
        return cls([float(x) for x in unit_kl], [int(x) for x in unit_agree], [int(t) for t in unit_tokens],
                   percentiles, unit_window)


def fidelity(model: torch.nn.Module, windows: TokenWindows, *, batch_size: int = 8) -> Fidelity:
    """KL and top-1 of the model as it is now (inside a removal) against the full model, the
    naive way: each batch of windows through the variant and through the full model."""
    skip = windows.context
    device = model.get_input_embeddings().weight.device
    unit_kl: list[float] = []
    unit_agree: list[int] = []
    token_kl: list[np.ndarray] = []
    cuts = iter(windows.cuts)
    for ids, mask in windows.batches(batch_size):
        ids, mask = ids.to(device), mask.to(device)
        with torch.no_grad():
            variant = model(input_ids=ids, attention_mask=mask, **no_cache_kwargs(model)).logits
            with removals_suspended(model):
                full = model(input_ids=ids, attention_mask=mask, **no_cache_kwargs(model)).logits
            kl, agree = full_divergence(full[:, skip - 1:-1], variant[:, skip - 1:-1])
        del variant, full
        scored = mask[:, skip:].bool().cpu()
        kl, agree = kl.cpu(), agree.cpu()
        for row_kl, row_agree, row_mask in zip(kl, agree, scored, strict=True):
            cut = next(cuts)
            row_kl, row_agree = row_kl[row_mask], row_agree[row_mask]
            unit_kl += [float(row_kl[a:b].sum()) for a, b in pairwise(cut)]
            unit_agree += [int(row_agree[a:b].sum()) for a, b in pairwise(cut)]
            token_kl.append(row_kl.float().numpy())
    tokens = np.concatenate(token_kl) if token_kl else np.zeros(0, dtype=np.float32)
    return Fidelity.of(unit_kl, unit_agree, tokens, windows)


@dataclass
class Compared:
    """One request's comparison with the full model: summed KL (float64), agreeing tokens, and each
    scored token's KL (float32) and agreement."""

    kl: float
    agree: int
    token_kl: np.ndarray
    token_agree: np.ndarray


def compare_requests(model: torch.nn.Module, requests: Sequence[TokenRequest], *, max_length: int,
                     batch_size: int = 8) -> list[Compared]:
    """Each request's continuation compared with the full model the naive way: the variant (the
    model as it is now) and the full model each run on the request's own input, as HFLM builds it
    (``(context + continuation)[-(max_length + 1):][:-1]``), in right-padded batches."""
    device = model.get_input_embeddings().weight.device
    out: list[Compared | None] = [None] * len(requests)
    inputs = [(r.context + r.continuation)[-(max_length + 1):][:-1] for r in requests]
    order = sorted(range(len(requests)), key=lambda n: -len(inputs[n]))
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        width = max(1, max(len(inputs[n]) for n in batch))
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for b, n in enumerate(batch):
            ids[b, :len(inputs[n])] = torch.tensor(inputs[n], dtype=torch.long)
            mask[b, :len(inputs[n])] = 1
        ids, mask = ids.to(device), mask.to(device)
        with torch.no_grad():
            variant = model(input_ids=ids, attention_mask=mask, **no_cache_kwargs(model)).logits
            with removals_suspended(model):
                full = model(input_ids=ids, attention_mask=mask, **no_cache_kwargs(model)).logits
        for b, n in enumerate(batch):
            scored = len(requests[n].continuation)
            end = len(inputs[n])
            kl, agree = full_divergence(full[b:b + 1, end - scored:end], variant[b:b + 1, end - scored:end])
            out[n] = Compared(float(kl.sum()), int(agree.sum()), kl[0].float().cpu().numpy(), agree[0].cpu().numpy())
        del variant, full
    return [c for c in out if c is not None]


class FidelityScorer(TextScorer):
    """KL and top-1 agreement with the full model on the perplexity text, as a registered scorer:
    the same requests as the perplexity (the engine answers both from the same rows). The naive
    work counted is the variant's pass over each window; the naive reference also runs the full
    model beside it (a naive tool could keep those distributions on disk instead: not counted)."""

    compares_to_full = True

    def __init__(self, model: torch.nn.Module, windows: TokenWindows, *, batch_size: int = 8) -> None:
        super().__init__(model, windows, batch_size=batch_size)
        self.tasks = [FIDELITY_TASK]

    def score(self) -> Scores:
        result = fidelity(self.model, self.windows, batch_size=self.batch_size)
        return Scores(result.rows(), {FIDELITY_TASK: result})

    def aggregate(self, answers: Answers) -> Scores:
        if answers.kl is None or answers.agree is None or answers.token_kl is None:
            raise ValueError("the fidelity scorer needs the engine's comparison with the full model")
        tokens = np.concatenate(answers.token_kl) if len(answers.token_kl) else np.zeros(0, dtype=np.float32)
        result = Fidelity.of(list(answers.kl), list(answers.agree), tokens, self.windows)
        return Scores(result.rows(), {FIDELITY_TASK: result})

    def settings(self) -> dict[str, Any]:
        return {"fidelity": f"kl, top1 against the full model; {', '.join(PERCENTILES)} of per-token kl"}


def fold_units(layout: Sequence[tuple[int, int]], units: Sequence[int], kl: Sequence[float], agree: Sequence[int],
         tokens: Sequence[int], token_kl: Sequence[np.ndarray]) -> list[Fidelity]:
    """Per-request comparisons summed into each task's units: ``layout[n]`` = (task, unit) of
    request n, ``units[t]`` the units of task t."""
    unit_kl = [[0.0] * u for u in units]
    unit_agree = [[0] * u for u in units]
    unit_tokens = [[0] * u for u in units]
    values: list[list[np.ndarray]] = [[] for _ in units]
    for n, (t, u) in enumerate(layout):
        unit_kl[t][u] += float(kl[n])
        unit_agree[t][u] += int(agree[n])
        unit_tokens[t][u] += int(tokens[n])
        values[t].append(np.asarray(token_kl[n]))
    return [Fidelity.of_units(unit_kl[t], unit_agree[t], unit_tokens[t],
                              np.concatenate(values[t]) if values[t] else np.zeros(0, dtype=np.float32))
            for t in range(len(units))]


class ComparedRequests(Scorer):
    """Requests grouped into units per task, each compared with the full model from the same pass
    (the naive reference: :func:`~lnsdiag.scoring.fidelity.compare_requests`), reported as a
    :class:`~lnsdiag.scoring.fidelity.Fidelity` per task."""

    compares_to_full = True

    def __init__(self, model: torch.nn.Module, tasks: list[str], units: list[list[list[TokenRequest]]], *,
                 max_length: int, batch_size: int = 8, settings: dict[str, Any] | None = None) -> None:
        self.model, self.tasks, self.max_length, self.batch_size = model, tasks, max_length, batch_size
        self._settings = settings or {}
        self._requests: list[TokenRequest] = []
        self.layout: list[tuple[int, int]] = []
        self.units = [len(task_units) for task_units in units]
        for t, task_units in enumerate(units):
            for u, requests in enumerate(task_units):
                self._requests += requests
                self.layout += [(t, u)] * len(requests)

    def requests(self) -> list[TokenRequest]:
        return self._requests

    def context_needed(self) -> int:
        """The longest input (``max_length`` cuts them already: the tasks' own limit)."""
        return max((min(len(r.context) + len(r.continuation), self.max_length + 1) - 1 for r in self._requests),
                   default=0)

    def _scores(self, results: list[Any]) -> Scores:
        scores = Scores()
        for task, result in zip(self.tasks, results, strict=True):
            scores += Scores(result.rows(task), {task: result})
        return scores

    def score(self) -> Scores:
        compared = compare_requests(self.model, self._requests, max_length=self.max_length,
                                    batch_size=self.batch_size)
        return self._scores(self.fold([c.kl for c in compared], [c.agree for c in compared],
                                      [c.token_kl for c in compared], [c.token_agree for c in compared]))

    def aggregate(self, answers: Answers) -> Scores:
        if answers.kl is None or answers.agree is None or answers.token_kl is None or answers.token_agree is None:
            raise ValueError(f"{type(self).__name__} needs the engine's comparison with the full model")
        return self._scores(self.fold(answers.kl, answers.agree, answers.token_kl, answers.token_agree))

    def fold(self, kl: Sequence[float], agree: Sequence[int], token_kl: Sequence[np.ndarray],
             token_agree: Sequence[np.ndarray]) -> list[Any]:
        return fold_units(self.layout, self.units, kl, agree, [len(r.continuation) for r in self._requests], token_kl)

    def settings(self) -> dict[str, Any]:
        return dict(self._settings)


def build(setup: ScoringSetup) -> FidelityScorer | None:
    """KL and top-1 on the perplexity text, unless the run switches them off (``--no-kl``)."""
    windows = windows_of(setup)
    if windows is None or not setup.kl:
        return None
    return FidelityScorer(setup.loaded.model, windows, batch_size=setup.batch_size)
