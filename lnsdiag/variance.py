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
from dataclasses import asdict, dataclass
from typing import Any

import pandas as pd
import torch

from .errors import UserError
from .progress import SILENT, Progress
from .runs import Timer, run_record
from .stream import StreamConfig, TokenMode, check_tokens, stream_states, tracked_batches
from .structure import LayerStack, find_layers, norm_placement
from .text import TextSource
from .windows import TokenWindows


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


class _Moments:
    """Running count/mean/M2 per state (Chan's pairwise update, float64) and update ratios."""

    def __init__(self, states: int) -> None:
        self.n = [0] * states
        self.mean = [0.0] * states
        self.m2 = [0.0] * states
        self.ratio = [0.0] * (states - 1)
        self.tokens = 0
        self._previous: torch.Tensor | None = None

    def __call__(self, index: int, state: torch.Tensor) -> None:
        x = state.detach().to(torch.float64)
        if index == 0:
            self.tokens += x.shape[0]
        n_b = x.numel()
        if n_b:
            mean_b = float(x.mean())
            m2_b = float(((x - mean_b) ** 2).sum())
            n_a, mean_a = self.n[index], self.mean[index]
            total = n_a + n_b
            delta = mean_b - mean_a
            self.mean[index] = mean_a + delta * n_b / total
            self.m2[index] += m2_b + delta * delta * n_a * n_b / total
            self.n[index] = total
        if index > 0 and self._previous is not None and n_b:
            prev = self._previous
            ratio = (x - prev).norm(dim=-1) / prev.norm(dim=-1).clamp_min(1e-30)
            self.ratio[index - 1] += float(ratio.sum())
        self._previous = x

    def frame(self) -> pd.DataFrame:
        L = len(self.n) - 1
        variance = [m2 / n if n else float("nan") for m2, n in zip(self.m2, self.n, strict=True)]
        rms = [(v + mu * mu) ** 0.5 for v, mu in zip(variance, self.mean, strict=True)]
        ratio = [r / self.tokens for r in self.ratio] + [float("nan")]
        return pd.DataFrame({"layer": range(L + 1), "variance": variance, "rms": rms, "update_ratio": ratio})


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
    acc = _Moments(len(stack) + 1)
    for ids, mask in batches:
        stream_states(model, stack, ids, mask, acc, tokens)
    if acc.tokens == 0:
        raise UserError("no tokens to measure: the text is empty")
    return VarianceResult(acc.frame(), acc.tokens, tokens)


@dataclass(frozen=True)
class VarianceConfig(StreamConfig):
    """What ``lnsdiag variance`` measures: only the text settings (window length, how many
    tokens, batch size, which tokens)."""


def variance_on_windows(model: torch.nn.Module, windows: TokenWindows, config: StreamConfig, *,
                        stack: LayerStack | None = None, progress: Progress = SILENT) -> VarianceResult:
    """Residual-stream statistics over a text's token windows, reporting windows done to ``progress``."""
    batches = tracked_batches(windows, config.batch_size, progress, "residual variance")
    return residual_variance(model, batches, tokens=config.tokens, stack=stack)


def variance_on_text(
    loaded: Any,
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


@dataclass(frozen=True)
class VarianceRun:
    """A ``variance`` run: the result, and the JSON record of how it was made (``meta.json``)."""

    result: VarianceResult
    meta: dict[str, Any]

    @property
    def model_name(self) -> str:
        return str((self.meta.get("model") or {}).get("name", "model"))

    @property
    def placement(self) -> str:
        """Where the model normalises (``pre-LN``, ``pre-LN+LNS``, ...): variance growth depends on it."""
        return str(self.meta.get("norm_placement", ""))


def run(loaded: Any, text: TextSource, config: VarianceConfig, *, layers_path: str | None = None,
        progress: Progress = SILENT, timer: Timer | None = None) -> VarianceRun:
    """Measure one model's residual stream on ``text`` and record how (``lnsdiag variance``)."""
    timer = timer or Timer()
    stack = find_layers(loaded.model, layers_path)
    config = config.for_model(loaded.model)
    placement = norm_placement(loaded.model, stack)
    with timer("measure"):
        result = variance_on_windows(loaded.model, config.windows(loaded, text.texts, text.name), config,
                                     stack=stack, progress=progress)
    meta = run_record(
        "variance", model=loaded.describe(), text=text.name, tokens_used=result.tokens, layer_stack=stack.path,
        num_layers=len(stack), norm_placement=placement, settings=asdict(config),
        timings={**timer.seconds, "total": timer.total()},
    )
    return VarianceRun(result, meta)
