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

Asked (``units``), the same pass measures each block's sub-layers (:mod:`.sublayers`): with
h = x_l + a, the attention's row has ‖a‖/‖x_l‖ and the variance and RMS of x_l, the MLP's row
‖m‖/‖h‖ and those of h.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import pandas as pd
import torch

from ..data.text import TextSource
from ..data.windows import TokenWindows
from ..errors import UserError
from ..interventions.units import parse_kinds
from ..model.structure import LayerStack, find_layers
from ..progress import SILENT, Progress
from ..runs import Timer
from .stream import MeasureRun, StreamConfig, TokenMode, check_tokens, measure_batches, measure_text
from .sublayers import SublayerPart, check_sublayers, measure_batch, merged, tidy, variance_rows

if TYPE_CHECKING:
    from ..model.load import LoadedModel


def _no_sublayers() -> pd.DataFrame:
    return pd.DataFrame(columns=["layer", "unit", "variance", "rms", "update_ratio"])


@dataclass
class VarianceResult:
    """Per-layer residual-stream statistics of one model on one text; the attention and MLP
    sub-layers' too when ``units`` asks for them (``sublayers``; ``layers`` is the blocks' always)."""

    layers: pd.DataFrame  # layer, variance, rms, update_ratio (row L: final output, no ratio)
    tokens: int
    token_mode: str
    units: tuple[str, ...] = ("block",)
    sublayers: pd.DataFrame = field(default_factory=_no_sublayers)  # layer, unit, variance, rms, update_ratio

    @property
    def num_layers(self) -> int:
        return len(self.layers) - 1

    @property
    def growth(self) -> float:
        """Variance of the last block's output over that of the embeddings (x_L / x_0)."""
        var = self.layers["variance"]
        return float(var.iloc[-1] / var.iloc[0]) if var.iloc[0] > 0 else float("inf")

    def mean_update_ratio(self, start: float = 0.5, stop: float = 1.0, unit: str = "block") -> float:
        """Mean update ratio of the layers in a depth range (fractions of L; default deep half), of
        the whole blocks or (``unit``) of their ``attn`` or ``mlp`` sub-layers."""
        L = self.num_layers
        lo = min(int(start * L), L - 1)
        hi = max(lo + 1, round(stop * L))
        if unit == "block":
            return float(self.layers["update_ratio"].iloc[lo:hi].mean())
        rows = self.sublayers[self.sublayers["unit"] == unit]
        return float(rows.loc[(rows["layer"] >= lo) & (rows["layer"] < hi), "update_ratio"].astype(float).mean())

    def tidy(self) -> pd.DataFrame:
        """One row per layer and asked unit kind (``layer, unit, variance, rms, update_ratio``), by
        layer, then kind (block, attn, mlp); the blocks' row L is the last block's output."""
        return tidy(self.layers, self.sublayers, self.units)

    def csv_frame(self) -> pd.DataFrame:
        """variance.csv: :meth:`tidy` (a ``unit`` column, as every tidy CSV of lnsdiag has)."""
        return self.tidy()


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


#: One batch's part: its states' steps, and its sub-layers' sums (if asked).
_Part = tuple[list[_Step], SublayerPart | None]


def _batch_steps(model: torch.nn.Module, stack: LayerStack, ids: torch.Tensor, mask: torch.Tensor,
                 tokens: TokenMode, units: tuple[str, ...] = ("block",)) -> _Part:
    steps = _BatchSteps()
    sub = measure_batch(model, stack, ids, mask, steps, tokens, units)
    return steps.steps, sub


def _variance_result(parts: list[_Part], states: int, tokens: str,
                     units: tuple[str, ...] = ("block",)) -> VarianceResult:
    acc = _Moments(states)
    for steps, _ in parts:
        acc.merge(steps)
    if acc.tokens == 0:
        raise UserError("no tokens to measure: the text is empty")
    sublayers = variance_rows(merged((sub for _, sub in parts), states - 1), units)
    return VarianceResult(acc.frame(), acc.tokens, tokens, units, sublayers)


def residual_variance(
    model: torch.nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    tokens: TokenMode = "all",
    stack: LayerStack | None = None,
    units: str | Iterable[str] = ("block",),
) -> VarianceResult:
    """Variance, RMS and update ratio of x_0..x_L over the batches' non-padding tokens; ``units``
    with ``attn`` or ``mlp`` adds the sub-layers' rows (:mod:`.sublayers`)."""
    check_tokens(tokens)
    units = parse_kinds(units)
    stack = stack or find_layers(model)
    check_sublayers(model, stack, units)
    parts = [_batch_steps(model, stack, ids, mask, tokens, units) for ids, mask in batches]
    return _variance_result(parts, len(stack) + 1, tokens, units)


@dataclass(frozen=True)
class VarianceConfig(StreamConfig):
    """What ``lnsdiag variance`` measures: only the text settings (window length, how many
    tokens, batch size, which tokens) and which units."""


def variance_on_windows(model: torch.nn.Module, windows: TokenWindows, config: StreamConfig, *,
                        stack: LayerStack | None = None, progress: Progress = SILENT) -> VarianceResult:
    """Residual-stream statistics over a text's token windows, reporting windows done to ``progress``
    (under a launcher the batches are shared over the ranks, merged in one order)."""
    check_tokens(config.tokens)
    stack = stack or find_layers(model)
    check_sublayers(model, stack, config.units)
    parts = measure_batches(windows, config.batch_size,
                            lambda ids, mask: _batch_steps(model, stack, ids, mask, config.tokens, config.units),
                            progress, "residual variance")
    return _variance_result(parts, len(stack) + 1, config.tokens, config.units)


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
    units: str | Iterable[str] = ("block",),
) -> VarianceResult:
    """Tokenise ``texts`` for a :class:`~lnsdiag.models.LoadedModel` and measure the stream."""
    config = VarianceConfig(seq_len=seq_len, max_tokens=max_tokens, batch_size=batch_size, tokens=tokens,
                            units=parse_kinds(units))
    return variance_on_windows(loaded.model, config.windows(loaded, texts), config, stack=stack, progress=progress)


class VarianceRun(MeasureRun):
    """A ``variance`` run: the :class:`VarianceResult` and its ``meta.json`` record."""


def run(loaded: LoadedModel, text: TextSource, config: VarianceConfig, *, layers_path: str | None = None,
        progress: Progress = SILENT, timer: Timer | None = None) -> VarianceRun:
    """Measure one model's residual stream on ``text`` and record how (``lnsdiag variance``)."""
    result, meta = measure_text("variance", loaded, text, config, variance_on_windows, layers_path=layers_path,
                                progress=progress, timer=timer)
    return VarianceRun(result, meta)
