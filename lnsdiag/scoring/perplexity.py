"""The built-in perplexity: token-level NLL of non-overlapping windows, per window, so that
two variants scored on the same windows can be compared pairwise."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..data.windows import TokenWindows, default_seq_len
from ..model.structure import no_cache_kwargs
from ..progress import SILENT, Progress
from .base import MetricRow, PairedUnits, Scorer, Scores, TokenRequest, paired_units
from .registry import ScoringSetup

PPL_TASK = "ppl"


@paired_units
@dataclass
class Perplexity(PairedUnits):
    """Token-level negative log-likelihood of a text, per window (for an honest stderr)."""

    kind = "token_windows"

    window_nll: list[float]
    window_tokens: list[int]
    window_bytes: list[int]

    @property
    def tokens(self) -> int:
        return sum(self.window_tokens)

    @property
    def mean_nll(self) -> float:
        return sum(self.window_nll) / self.tokens

    def _ratio_stderr(self, denominators: list[int]) -> float:
        """Stderr of Σnll/Σd across windows (ratio estimator; windows are the sampling unit)."""
        n = len(self.window_nll)
        if n < 2:
            return math.nan
        total = sum(denominators)
        ratio = sum(self.window_nll) / total
        resid = sum((a - ratio * d) ** 2 for a, d in zip(self.window_nll, denominators, strict=True))
        return math.sqrt(resid / (n * (n - 1))) / (total / n)

    def paired_delta_stderr(self, base: Perplexity) -> dict[str, float]:
        """Stderr of (self − base) for ppl, bits_per_byte and nll, paired window by window.

        Both were scored on the same windows, so window difficulty cancels: this is the noise
        of the *difference*, far smaller than either metric's own stderr. Each window's
        linearised contribution (delta method on the ratio estimators) is resampled.
        """
        n = len(self.window_nll)
        if self.window_tokens != base.window_tokens or n < 2:
            return {}

        def stderr(residuals: list[float], denominators: list[int]) -> float:
            return math.sqrt(sum(r * r for r in residuals) / (n * (n - 1))) / (sum(denominators) / n)

        tokens, sizes = self.window_tokens, self.window_bytes
        m_v, m_b = self.mean_nll, base.mean_nll
        d_nll = m_v - m_b
        d_byte = (sum(self.window_nll) - sum(base.window_nll)) / sum(sizes)
        diffs = [a - b for a, b in zip(self.window_nll, base.window_nll, strict=True)]
        e_v, e_b = math.exp(m_v), math.exp(m_b)
        return {
            "nll": stderr([d - d_nll * t for d, t in zip(diffs, tokens, strict=True)], tokens),
            "ppl": stderr([e_v * (a - m_v * t) - e_b * (b - m_b * t)
                           for a, b, t in zip(self.window_nll, base.window_nll, tokens, strict=True)], tokens),
            "bits_per_byte": stderr([d - d_byte * z for d, z in zip(diffs, sizes, strict=True)], sizes) / math.log(2),
        }

    def as_json(self) -> dict[str, list]:
        return {"window_nll": self.window_nll, "window_tokens": self.window_tokens, "window_bytes": self.window_bytes}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Perplexity:
        return cls(**data)

    def units(self) -> int:
        return len(self.window_nll)

    def delta_stderr(self, base: PairedUnits, metric: str, on_log_ratio: bool) -> float:
        """log(ppl_v / ppl_b) is the paired Δ of the mean NLL per token: its stderr is NLL's."""
        if not isinstance(base, Perplexity):
            return math.nan
        return self.paired_delta_stderr(base).get("nll" if on_log_ratio else metric, math.nan)

    def sample_rows(self, task: str) -> list[dict[str, Any]]:
        """Each window as metric ``window_nll`` with ``[tokens, bytes]`` as item."""
        return [{"task": task, "metric": "window_nll", "doc_id": i, "value": nll, "item": json.dumps([tokens, size]),
                 "choices": None}
                for i, (nll, tokens, size) in enumerate(zip(self.window_nll, self.window_tokens, self.window_bytes,
                                                            strict=True))]

    def rows(self, task: str = PPL_TASK) -> list[MetricRow]:
        se_nll = self._ratio_stderr(self.window_tokens)
        ppl = math.exp(self.mean_nll)
        bpb = sum(self.window_nll) / sum(self.window_bytes) / math.log(2)
        se_bpb = self._ratio_stderr(self.window_bytes) / math.log(2)
        n = len(self.window_nll)
        return [
            MetricRow(task, "ppl", ppl, ppl * se_nll, False, n),  # delta method
            MetricRow(task, "bits_per_byte", bpb, se_bpb, False, n),
            MetricRow(task, "nll", self.mean_nll, se_nll, False, n),
        ]


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-position NLL in float32 (log-softmax upcast: bf16 log-probs lose ~2 digits)."""
    return torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")


def perplexity(model: torch.nn.Module, windows: TokenWindows, *, batch_size: int = 8,
               progress: Progress = SILENT) -> Perplexity:
    """Perplexity of ``windows`` under ``model`` as it is now (the naive engine's way).

    Each window's context tokens (BOS, or the first text token) are context only; every later
    token is predicted from the window's start. Windows do not overlap. Progress counts windows.
    """
    skip = windows.context
    device = model.get_input_embeddings().weight.device
    nll: list[float] = []
    counts: list[int] = []
    for ids, mask in windows.batches(batch_size):
        ids, mask = ids.to(device), mask.to(device)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, **no_cache_kwargs(model)).logits
        per_token = token_nll(logits[:, skip - 1:-1], ids[:, skip:])
        valid = mask[:, skip:].bool()
        nll.extend((per_token * valid).sum(dim=1, dtype=torch.float64).tolist())
        counts.extend(valid.sum(dim=1).tolist())
        progress.advance(ids.shape[0])
    return Perplexity(nll, counts, windows.scored_bytes)


class PerplexityScorer(Scorer):
    """The built-in perplexity as a :class:`~lnsdiag.scoring.Scorer`: each window is one
    request (its context, then its scored tokens), so both engines see the same windows."""

    def __init__(self, model: torch.nn.Module, windows: TokenWindows, *, batch_size: int = 8,
                 seq_len: int | None = None, max_tokens: int | None = None) -> None:
        self.tasks = [PPL_TASK]
        self.model, self.windows, self.batch_size = model, windows, batch_size
        self.seq_len, self.max_tokens = seq_len, max_tokens  # as asked: part of the fingerprint

    def score(self) -> Scores:
        ppl = perplexity(self.model, self.windows, batch_size=self.batch_size)
        return Scores(ppl.rows(), {PPL_TASK: ppl})

    def requests(self) -> list[TokenRequest]:
        """Each window as one request: its context tokens, then its scored tokens."""
        context = self.windows.context
        return [TokenRequest(tuple(w[:context].tolist()), tuple(w[context:].tolist())) for w in self.windows.windows]

    def aggregate(self, loglik: np.ndarray, greedy: np.ndarray) -> Scores:
        ppl = Perplexity([-float(x) for x in loglik], self.windows.scored_tokens, self.windows.scored_bytes)
        return Scores(ppl.rows(), {PPL_TASK: ppl})

    def token_windows(self) -> TokenWindows:
        return self.windows

    def context_needed(self) -> int:
        return self.windows.longest - 1  # a window is scored whole: its last token is never an input

    def settings(self) -> dict[str, Any]:
        return {"ppl_text": f"{self.windows.name}#{self.windows.digest}", "ppl_max_tokens": self.max_tokens,
                "seq_len": self.seq_len}


def build(setup: ScoringSetup) -> PerplexityScorer | None:
    """The built-in perplexity when the run gives a text (``--ppl-text`` / ``--ppl-dataset``)."""
    if setup.text is None:
        return None
    model = setup.loaded.model
    seq_len = default_seq_len(model, setup.seq_len)
    windows = TokenWindows.of(setup.loaded.tokenizer, setup.text.texts, seq_len=seq_len,
                              max_tokens=setup.max_tokens, name=setup.text.name)
    return PerplexityScorer(model, windows, batch_size=setup.batch_size, seq_len=seq_len, max_tokens=setup.max_tokens)
