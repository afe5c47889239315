"""How large the residual stream gets with depth, and how much each layer still changes it.

Step (1) and (2) of the paper's argument: in a Pre-LN model the variance of the residual
stream x_l grows with depth, so a deep block's update f(x_l) is small next to x_l and the
block is close to the identity. Per layer l (0-based) on a text:

* ``variance``: the variance of the entries of x_l, the stream entering block l, pooled
  over every selected token and hidden dimension (population variance);
* ``rms``: sqrt(mean(x_l²)) over the same entries (the scale a norm divides by);
* ``update_ratio``: ‖x_{l+1} − x_l‖ / ‖x_l‖ per token, averaged over tokens: the size of
  the block's update relative to its input.

One more row, ``layer = L``, holds the last block's output before the final norm (its
``update_ratio`` is empty). States come from :func:`lnsdiag.stream.stream_states`, so
padding is excluded and memory stays bounded however long the text.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pandas as pd
import torch

from ..data.text import TextSource
from ..data.windows import TokenWindows
from ..errors import UserError
from ..model.structure import LayerStack, find_layers
from ..progress import SILENT, Progress
from ..runs import Timer
from .stream import MeasureRun, StreamConfig, TokenMode, check_tokens, measure_batches, measure_text, stream_states

if TYPE_CHECKING:
    from ..model.load import LoadedModel


@dataclass
class VarianceResult:
    """Per-layer residual-stream statistics of one model on one text."""

    layers: pd.DataFrame  # layer, variance, rms, update_ratio (row L: final output, no ratio)
    tokens: int
    token_mode: str

    @property
    def num_layers(self) -> int:
        return len(self.layers) - 1

    @property
    def growth(self) -> float:
        """Variance of the last block's output over that of the embeddings (x_L / x_0)."""
        var = self.layers["variance"]
        return float(var.iloc[-1] / var.iloc[0]) if var.iloc[0] > 0 else float("inf")

    def mean_update_ratio(self, start: float = 0.5, stop: float = 1.0) -> float:
        """Mean update ratio of the layers in a depth range (fractions of L; default deep half)."""
        L = self.num_layers
        lo = min(int(start * L), L - 1)
        hi = max(lo + 1, round(stop * L))
        return float(self.layers["update_ratio"].iloc[lo:hi].mean())


#: One state's statistics within one batch: (state index, tokens counted, entries, mean, M2, update-ratio sum).
_Step = tuple[int, int, int, float, float, float | None]


class _BatchSteps:
    """Records what each state of one batch adds (:data:`_Step`), to be merged later in batch order."""

    def __init__(self) -> None:
        self.steps: list[_Step] = []
        self._previous: torch.Tensor | None = None

    def __call__(self, index: int, state: torch.Tensor) -> None:
        x = state.detach().to(torch.float64)
        n_b = x.numel()
        mean_b = m2_b = 0.0
        if n_b:
            mean_b = float(x.mean())
            m2_b = float(((x - mean_b) ** 2).sum())
        ratio_b = None
        if index > 0 and self._previous is not None and n_b:
            prev = self._previous
            ratio_b = float(((x - prev).norm(dim=-1) / prev.norm(dim=-1).clamp_min(1e-30)).sum())
        self.steps.append((index, x.shape[0] if index == 0 else 0, n_b, mean_b, m2_b, ratio_b))
        self._previous = x


class _Moments:
    """Running count/mean/M2 per state (Chan's pairwise update, float64) and update ratios,
    fed batch by batch with :class:`_BatchSteps` (so shared batches merge to the same bits)."""

    def __init__(self, states: int) -> None:
        self.n = [0] * states
        self.mean = [0.0] * states
        self.m2 = [0.0] * states
        self.ratio = [0.0] * (states - 1)
        self.tokens = 0

    def merge(self, steps: list[_Step]) -> None:
        for index, tokens, n_b, mean_b, m2_b, ratio_b in steps:
            self.tokens += tokens
            if n_b:
                n_a, mean_a = self.n[index], self.mean[index]
                total = n_a + n_b
                delta = mean_b - mean_a
                self.mean[index] = mean_a + delta * n_b / total
                self.m2[index] += m2_b + delta * delta * n_a * n_b / total
                self.n[index] = total
            if ratio_b is not None:
                self.ratio[index - 1] += ratio_b

    def frame(self) -> pd.DataFrame:
        L = len(self.n) - 1
        variance = [m2 / n if n else float("nan") for m2, n in zip(self.m2, self.n, strict=True)]
        rms = [(v + mu * mu) ** 0.5 for v, mu in zip(variance, self.mean, strict=True)]
        ratio = [r / self.tokens for r in self.ratio] + [float("nan")]
        return pd.DataFrame({"layer": range(L + 1), "variance": variance, "rms": rms, "update_ratio": ratio})


def _batch_steps(model: torch.nn.Module, stack: LayerStack, ids: torch.Tensor, mask: torch.Tensor,
                 tokens: TokenMode) -> list[_Step]:
    steps = _BatchSteps()
    stream_states(model, stack, ids, mask, steps, tokens)
    return steps.steps


def _variance_result(parts: list[list[_Step]], states: int, tokens: str) -> VarianceResult:
    acc = _Moments(states)
    for steps in parts:
        acc.merge(steps)
    if acc.tokens == 0:
        raise UserError("no tokens to measure: the text is empty")
    return VarianceResult(acc.frame(), acc.tokens, tokens)


def residual_variance(
    model: torch.nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    tokens: TokenMode = "all",
    stack: LayerStack | None = None,
) -> VarianceResult:
    """Variance, RMS and update ratio of x_0..x_L over the batches' non-padding tokens."""
    check_tokens(tokens)
    stack = stack or find_layers(model)
    parts = [_batch_steps(model, stack, ids, mask, tokens) for ids, mask in batches]
    return _variance_result(parts, len(stack) + 1, tokens)


@dataclass(frozen=True)
class VarianceConfig(StreamConfig):
    """What ``lnsdiag variance`` measures: only the text settings (window length, how many
    tokens, batch size, which tokens)."""


def variance_on_windows(model: torch.nn.Module, windows: TokenWindows, config: StreamConfig, *,
                        stack: LayerStack | None = None, progress: Progress = SILENT) -> VarianceResult:
    """Residual-stream statistics over a text's token windows, reporting windows done to ``progress``
    (under a launcher the batches are shared over the ranks, merged in one order)."""
    check_tokens(config.tokens)
    stack = stack or find_layers(model)
    parts = measure_batches(windows, config.batch_size,
                            lambda ids, mask: _batch_steps(model, stack, ids, mask, config.tokens),
                            progress, "residual variance")
    return _variance_result(parts, len(stack) + 1, config.tokens)


def variance_on_text(
    loaded: LoadedModel,
    texts: Iterable[str],
    *,
    seq_len: int | None = None,
    max_tokens: int | None = 65_536,
    batch_size: int = 4,
    tokens: TokenMode = "all",
    stack: LayerStack | None = None,
    progress: Progress = SILENT,
) -> VarianceResult:
    """Tokenise ``texts`` for a :class:`~lnsdiag.models.LoadedModel` and measure the stream."""
    config = VarianceConfig(seq_len=seq_len, max_tokens=max_tokens, batch_size=batch_size, tokens=tokens)
    return variance_on_windows(loaded.model, config.windows(loaded, texts), config, stack=stack, progress=progress)


class VarianceRun(MeasureRun):
    """A ``variance`` run: the :class:`VarianceResult` and its ``meta.json`` record."""


def run(loaded: LoadedModel, text: TextSource, config: VarianceConfig, *, layers_path: str | None = None,
        progress: Progress = SILENT, timer: Timer | None = None) -> VarianceRun:
    """Measure one model's residual stream on ``text`` and record how (``lnsdiag variance``)."""
    result, meta = measure_text("variance", loaded, text, config, variance_on_windows, layers_path=layers_path,
                                progress=progress, timer=timer)
    return VarianceRun(result, meta)
