"""The built-in perplexity: token-level NLL of non-overlapping windows, per unit (a window, or
a block of one on a short text), so that two variants scored on the same units can be compared
pairwise."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import torch

from ..data.windows import TokenWindows, default_seq_len
from ..errors import UserError
from ..model.structure import no_cache_kwargs
from ..progress import SILENT, Progress
from ..stats.blocks import BLOCK_TOKENS, ratio_stderr
from .base import Answers, MetricRow, PairedUnits, Scorer, Scores, TokenRequest, paired_units
from .registry import ScoringSetup

PPL_TASK = "ppl"


@paired_units
@dataclass
class Perplexity(PairedUnits):
    """Token-level negative log-likelihood of a text per unit, for an honest paired stderr.

    A unit is a window, or on a short text a block of consecutive tokens of a window
    (:func:`~lnsdiag.stats.blocks.token_blocks`: a 1,000-token text is 14 units, not 2);
    ``unit_window`` says which window each block belongs to (``None``: one unit per window).
    """

    kind = "token_windows"

    unit_nll: list[float]
    unit_tokens: list[int]
    unit_bytes: list[int]
    unit_window: list[int] | None = None

    @property
    def tokens(self) -> int:
        return sum(self.unit_tokens)

    @property
    def mean_nll(self) -> float:
        return sum(self.unit_nll) / self.tokens

    def paired_delta_stderr(self, base: Perplexity) -> dict[str, float]:
        """Stderr of (self − base) for ppl, bits_per_byte and nll, paired unit by unit.

        Both were scored on the same units, so their difficulty cancels: this is the noise
        of the *difference*, far smaller than either metric's own stderr. Each unit's
        linearised contribution (delta method on the ratio estimators) is resampled.
        """
        n = len(self.unit_nll)
        if self.unit_tokens != base.unit_tokens or self.unit_window != base.unit_window or n < 2:
            return {}

        def stderr(residuals: list[float], denominators: list[int]) -> float:
            return math.sqrt(sum(r * r for r in residuals) / (n * (n - 1))) / (sum(denominators) / n)

        tokens, sizes = self.unit_tokens, self.unit_bytes
        m_v, m_b = self.mean_nll, base.mean_nll
        d_nll = m_v - m_b
        d_byte = (sum(self.unit_nll) - sum(base.unit_nll)) / sum(sizes)
        diffs = [a - b for a, b in zip(self.unit_nll, base.unit_nll, strict=True)]
        e_v, e_b = math.exp(m_v), math.exp(m_b)
        return {
            "nll": stderr([d - d_nll * t for d, t in zip(diffs, tokens, strict=True)], tokens),
            "ppl": stderr([e_v * (a - m_v * t) - e_b * (b - m_b * t)
                           for a, b, t in zip(self.unit_nll, base.unit_nll, tokens, strict=True)], tokens),
            "bits_per_byte": stderr([d - d_byte * z for d, z in zip(diffs, sizes, strict=True)], sizes) / math.log(2),
        }

    def as_json(self) -> dict[str, list | None]:
        return {"unit_nll": self.unit_nll, "unit_tokens": self.unit_tokens, "unit_bytes": self.unit_bytes,
                "unit_window": self.unit_window}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Perplexity:
        if "window_nll" in data:  # stored before short texts were cut into blocks: one unit per window
            return cls(data["window_nll"], data["window_tokens"], data["window_bytes"])
        return cls(**data)

    def units(self) -> int:
        return len(self.unit_nll)

    def delta_stderr(self, base: PairedUnits, metric: str, on_log_ratio: bool) -> float:
        """log(ppl_v / ppl_b) is the paired Δ of the mean NLL per token: its stderr is NLL's."""
        if not isinstance(base, Perplexity):
            return math.nan
        return self.paired_delta_stderr(base).get("nll" if on_log_ratio else metric, math.nan)

    def sample_rows(self, task: str) -> list[dict[str, Any]]:
        """Each unit as metric ``window_nll`` with ``[tokens, bytes]`` as item, or on a short
        text as ``block_nll`` with ``[tokens, bytes, window]``."""
        if self.unit_window is None:
            return [{"task": task, "metric": "window_nll", "doc_id": i, "value": nll,
                     "item": json.dumps([tokens, size]), "choices": None}
                    for i, (nll, tokens, size) in enumerate(zip(self.unit_nll, self.unit_tokens, self.unit_bytes,
                                                                strict=True))]
        return [{"task": task, "metric": "block_nll", "doc_id": i, "value": nll,
                 "item": json.dumps([tokens, size, window]), "choices": None}
                for i, (nll, tokens, size, window) in enumerate(zip(self.unit_nll, self.unit_tokens, self.unit_bytes,
                                                                    self.unit_window, strict=True))]

    def rows(self, task: str = PPL_TASK) -> list[MetricRow]:
        se_nll = ratio_stderr(self.unit_nll, self.unit_tokens)
        ppl = math.exp(self.mean_nll)
        bpb = sum(self.unit_nll) / sum(self.unit_bytes) / math.log(2)
        se_bpb = ratio_stderr(self.unit_nll, self.unit_bytes) / math.log(2)
        n = len(self.unit_nll)
        return [
            MetricRow(task, "ppl", ppl, ppl * se_nll, False, n),  # delta method
            MetricRow(task, "bits_per_byte", bpb, se_bpb, False, n),
            MetricRow(task, "nll", self.mean_nll, se_nll, False, n),
        ]

    @classmethod
    def of(cls, nll: Sequence[float], windows: TokenWindows) -> Perplexity:
        """The NLL of each of ``windows``' units (:attr:`~lnsdiag.data.windows.TokenWindows.blocks`)."""
        blocks = windows.blocks
        return cls([float(x) for x in nll], [b - a for _, a, b in blocks], list(windows.block_bytes),
                   None if windows.units_are_windows else [k for k, _, _ in blocks])


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-position NLL in float32 (log-softmax upcast: bf16 log-probs lose ~2 digits)."""
    return torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")


def perplexity(model: torch.nn.Module, windows: TokenWindows, *, batch_size: int = 8,
               progress: Progress = SILENT) -> Perplexity:
    """Perplexity of ``windows`` under ``model`` as it is now (the naive engine's way).

    Each window's context tokens (BOS, or the first text token) are context only; every later
    token is predicted from the window's start, and summed per unit (the window, or its
    blocks on a short text). Windows do not overlap. Progress counts windows.
    """
    skip = windows.context
    device = model.get_input_embeddings().weight.device
    nll: list[float] = []
    cuts = iter(windows.cuts)
    for ids, mask in windows.batches(batch_size):
        ids, mask = ids.to(device), mask.to(device)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, **no_cache_kwargs(model)).logits
        per_token = token_nll(logits[:, skip - 1:-1], ids[:, skip:]).double() * mask[:, skip:]
        for row in per_token:
            cut = next(cuts)
            nll += [float(row[a:b].sum()) for a, b in pairwise(cut)]
        progress.advance(ids.shape[0])
    return Perplexity.of(nll, windows)


class TextScorer(Scorer):
    """A scorer of the perplexity text's windows: one request per unit (the window up to the unit,
    then the unit's tokens), each window scored whole by the naive engine, so every scorer of the
    text asks the engine for the same rows."""

    def __init__(self, model: torch.nn.Module, windows: TokenWindows, *, batch_size: int = 8) -> None:
        self.model, self.windows, self.batch_size = model, windows, batch_size

    def requests(self) -> list[TokenRequest]:
        return unit_requests(self.windows)

    def naive_requests(self) -> list[TokenRequest]:
        """The naive engine scores each window whole, whatever its units."""
        return whole_windows(self.windows)

    def context_needed(self) -> int:
        return self.windows.longest - 1  # a window is scored whole: its last token is never an input


class PerplexityScorer(TextScorer):
    """The built-in perplexity as a :class:`~lnsdiag.scoring.Scorer`: each window is one
    request (its context, then its scored tokens), so both engines see the same windows."""

    def __init__(self, model: torch.nn.Module, windows: TokenWindows, *, batch_size: int = 8,
                 seq_len: int | None = None, max_tokens: int | None = None) -> None:
        super().__init__(model, windows, batch_size=batch_size)
        self.tasks = [PPL_TASK]
        self.seq_len, self.max_tokens = seq_len, max_tokens  # as asked: part of the fingerprint

    def score(self) -> Scores:
        ppl = perplexity(self.model, self.windows, batch_size=self.batch_size)
        return Scores(ppl.rows(), {PPL_TASK: ppl})

    def aggregate(self, answers: Answers) -> Scores:
        ppl = Perplexity.of([-float(x) for x in answers.loglik], self.windows)
        return Scores(ppl.rows(), {PPL_TASK: ppl})

    def token_windows(self) -> TokenWindows:
        return self.windows

    def settings(self) -> dict[str, Any]:
        return {"ppl_text": f"{self.windows.name}#{self.windows.digest}", "ppl_max_tokens": self.max_tokens,
                "seq_len": self.seq_len, "ppl_units": self.unit_rule()}

    def unit_rule(self) -> str:
        """How the text is cut into units (part of the fingerprint: units of another rule never pair)."""
        return "windows" if self.windows.units_are_windows else f"blocks of >= {BLOCK_TOKENS} tokens"


def unit_requests(windows: TokenWindows) -> list[TokenRequest]:
    """Each unit as one request: the window up to the unit, then the unit's tokens (the engine
    answers a window's units from one row: each is a prefix of the next)."""
    c = windows.context
    return [TokenRequest(tuple(w[:c + a].tolist()), tuple(w[c + a:c + b].tolist()))
            for w, cut in zip(windows.windows, windows.cuts, strict=True) for a, b in pairwise(cut)]


def whole_windows(windows: TokenWindows) -> list[TokenRequest]:
    """Each window as one request (its context, then all its scored tokens)."""
    c = windows.context
    return [TokenRequest(tuple(w[:c].tolist()), tuple(w[c:].tolist())) for w in windows.windows]


def windows_of(setup: ScoringSetup) -> TokenWindows | None:
    """The perplexity text's windows (built once per setup: every scorer of the text shares them)."""
    if setup.text is None:
        return None
    cached = setup.cache.get("windows")
    if cached is not None:
        return cached
    seq_len = default_seq_len(setup.loaded.model, setup.seq_len)
    windows = TokenWindows.of(setup.loaded.tokenizer, setup.text.texts, seq_len=seq_len,
                              max_tokens=setup.max_tokens, name=setup.text.name)
    if not windows.blocks:
        raise UserError(f"the perplexity text {setup.text.name} has no token to predict: its {len(windows)} "
                        f"window(s) hold only the {windows.context} context token(s) each; give a longer text")
    setup.cache["windows"] = windows
    return windows


def build(setup: ScoringSetup) -> PerplexityScorer | None:
    """The built-in perplexity when the run gives a text (``--ppl-text`` / ``--ppl-dataset``)."""
    windows = windows_of(setup)
    if windows is None:
        return None
    return PerplexityScorer(setup.loaded.model, windows, batch_size=setup.batch_size,
                            seq_len=default_seq_len(setup.loaded.model, setup.seq_len), max_tokens=setup.max_tokens)
