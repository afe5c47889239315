"""Which layers barely turn the residual stream: angular distance between x_l and x_{l+n}.

A block whose output points where its input did is close to the identity, and removing it
changes little (Gromov et al.; ShortGPT's Block Influence is 1 − mean cosine). States come
from :func:`lnsdiag.stream.stream_states`, so padding is excluded and memory stays bounded.
Asked (``units``), each block's attention and MLP steps are measured in the same pass
(:mod:`.sublayers`).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
import torch
import torch.nn.functional as F

from ..data.text import TextSource
from ..data.windows import TokenWindows
from ..errors import UserError
from ..interventions.units import parse_kinds
from ..model.structure import LayerStack, find_layers
from ..progress import SILENT, Progress
from ..runs import RunFiles, Timer, write_tables
from .stream import MeasureRun, StreamConfig, TokenMode, angle_and_cosine, check_tokens, measure_batches, measure_text
from .sublayers import SublayerPart, angular_rows, check_sublayers, measure_batch, merged, tidy

if TYPE_CHECKING:
    from ..model.load import LoadedModel


#: The columns of a per-layer table (``layers``, one row per block), after ``layer`` (and ``unit``).
LAYER_COLUMNS: tuple[str, ...] = ("angular_distance", "block_influence", "cosine", "near_identity")


def _no_sublayers() -> pd.DataFrame:
    return pd.DataFrame(columns=["layer", "unit", *LAYER_COLUMNS])


@dataclass
class AngularResult:
    """Per-layer and per-block angular distances of one model on one text; the attention and MLP
    sub-layers' too when ``units`` asks for them.

    ``layers`` is always the whole blocks' table (what prune and shrink read); ``sublayers`` holds
    the sub-layers' rows (``layer, unit, ...``; empty unless asked); :meth:`units_frame` and
    :meth:`tidy` give the asked units together."""

    layers: pd.DataFrame  # layer, angular_distance, block_influence, cosine, near_identity
    blocks: pd.DataFrame  # start_layer, block_size, angular_distance, block_influence
    tokens: int
    token_mode: str
    threshold: float
    units: tuple[str, ...] = ("block",)
    sublayers: pd.DataFrame = field(default_factory=_no_sublayers)  # layer, unit, then as layers

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def near_identity(self) -> list[int]:
        return [int(i) for i in self.layers.loc[self.layers["near_identity"], "layer"]]

    def tidy(self) -> pd.DataFrame:
        """One row per layer and asked unit kind (``layer, unit, angular_distance,
        block_influence, cosine, near_identity``), by layer, then kind (block, attn, mlp)."""
        return tidy(self.layers, self.sublayers, self.units)

    def csv_frame(self) -> pd.DataFrame:
        """angular.csv: :meth:`tidy` (a ``unit`` column, as every tidy CSV of lnsdiag has)."""
        return self.tidy()

    def units_frame(self) -> pd.DataFrame:
        """Every asked unit as one frame, to rank units of any kind together: columns ``layer`` (the
        block, 0-based), ``unit`` (``block``, ``attn`` or ``mlp``, the kinds of
        :data:`~lnsdiag.interventions.units.KIND_NAMES`), ``angular_distance`` (d over its own step, in
        [0, 1]) and ``block_influence`` (1 − mean cosine); a row per block and asked kind, by layer,
        then kind. ``KIND_NAMES[unit](layer)`` is the row's removable unit."""
        return self.tidy()[["layer", "unit", "angular_distance", "block_influence"]]


class _PairAccumulator:
    """Running sums of angle and cosine between x_l and x_{l+n}, n = 1..max_block."""

    def __init__(self, num_layers: int, max_block: int) -> None:
        self.L, self.N = num_layers, max_block
        self.window: deque[tuple[int, torch.Tensor]] = deque(maxlen=max_block)
        self.angle: torch.Tensor | None = None
        self.cosine: torch.Tensor | None = None
        self.count = 0

    def __call__(self, index: int, state: torch.Tensor) -> None:
        if self.angle is None:
            self.angle = torch.zeros(self.L, self.N, dtype=torch.float64, device=state.device)
            self.cosine = torch.zeros_like(self.angle)
        unit = F.normalize(state.to(self.angle.device, torch.float32), dim=-1)
        if index == 0:
            self.window.clear()
            self.count += unit.shape[0]
        for start, previous in self.window:
            angle, cos = angle_and_cosine(previous, unit)
            n = index - start
            self.angle[start, n - 1] += angle.sum(dtype=torch.float64) / math.pi
            self.cosine[start, n - 1] += cos.sum(dtype=torch.float64)
        self.window.append((index, unit))


#: One batch's part: sums of angle and cosine per (l, n), its token count, its sub-layers' sums (if asked).
_PairPart = tuple[torch.Tensor, torch.Tensor, int, SublayerPart | None]


def _pair_part(model: torch.nn.Module, stack: LayerStack, ids: torch.Tensor, mask: torch.Tensor, max_block: int,
               tokens: TokenMode, units: tuple[str, ...] = ("block",)) -> _PairPart:
    """One batch's sums of angle and cosine (float64, on the CPU), its token count, and its sub-layers'
    sums when ``units`` asks for them.

    Each (l, n) gets exactly one addition per batch, so adding batches' parts in order is
    bitwise the running sum one accumulator makes over the same batches."""
    acc = _PairAccumulator(len(stack), max_block)
    sub = measure_batch(model, stack, ids, mask, acc, tokens, units)
    if acc.angle is None or acc.cosine is None:
        empty = torch.zeros(len(stack), max_block, dtype=torch.float64)
        return empty, empty.clone(), acc.count, sub
    return acc.angle.cpu(), acc.cosine.cpu(), acc.count, sub


def _block_limit(model: torch.nn.Module, stack: LayerStack | None, max_block: int | None,
                 tokens: str, units: tuple[str, ...] = ("block",)) -> tuple[LayerStack, int]:
    check_tokens(tokens)
    stack = stack or find_layers(model)
    L = len(stack)
    max_block = L if max_block is None else max_block
    if not 1 <= max_block <= L:
        raise UserError(f"--max-block {max_block} must be between 1 and the layer count ({L})")
    check_sublayers(model, stack, units)
    return stack, max_block


def angular_distances(
    model: torch.nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    tokens: TokenMode = "all",
    max_block: int | None = 1,
    threshold: float = 0.2,
    stack: LayerStack | None = None,
    units: str | Iterable[str] = ("block",),
) -> AngularResult:
    """Angular distance arccos(cos(x_l, x_{l+n}))/π for every block l and n = 1..max_block.

    The per-layer table (n = 1) also has Block Influence, 1 − mean cosine (ShortGPT), and a
    ``near_identity`` flag for distances below ``threshold``. ``max_block=None`` means all.
    ``units`` with ``attn`` or ``mlp`` adds the sub-layers' steps (:mod:`.sublayers`).
    """
    units = parse_kinds(units)
    stack, max_block = _block_limit(model, stack, max_block, tokens, units)
    parts = [_pair_part(model, stack, ids, mask, max_block, tokens, units) for ids, mask in batches]
    return _angular_result(parts, len(stack), max_block, tokens, threshold, units)


def _angular_result(parts: list[_PairPart], L: int, max_block: int, tokens: str, threshold: float,
                    units: tuple[str, ...] = ("block",)) -> AngularResult:
    """The tables from per-batch parts, summed in batch order."""
    total_angle = torch.zeros(L, max_block, dtype=torch.float64)
    total_cosine = torch.zeros_like(total_angle)
    count = 0
    for angle_b, cosine_b, count_b, _ in parts:
        total_angle += angle_b
        total_cosine += cosine_b
        count += count_b
    if count == 0:
        raise UserError("no tokens to measure: the text is empty")
    angle = total_angle / count
    cosine = total_cosine / count
    layers = pd.DataFrame({
        "layer": range(L),
        "angular_distance": angle[:, 0].tolist(),
        "block_influence": (1.0 - cosine[:, 0]).tolist(),
        "cosine": cosine[:, 0].tolist(),
    })
    layers["near_identity"] = layers["angular_distance"] < threshold
    rows = [
        {"start_layer": s, "block_size": n, "angular_distance": float(angle[s, n - 1]),
         "block_influence": float(1.0 - cosine[s, n - 1])}
        for n in range(1, max_block + 1) for s in range(L - n + 1)
    ]
    blocks = pd.DataFrame(rows, columns=["start_layer", "block_size", "angular_distance", "block_influence"])
    sublayers = angular_rows(merged((part[3] for part in parts), L), units, threshold)
    return AngularResult(layers, blocks, count, tokens, threshold, units, sublayers)


@dataclass(frozen=True)
class AngularConfig(StreamConfig):
    """What ``lnsdiag angular`` measures: the text settings, plus the largest block size n
    (None: all layers; checked against the layer count once the model is known) and the
    near-identity threshold."""

    max_block: int | None = None
    threshold: float = 0.2

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_block is not None and self.max_block < 1:
            raise UserError(f"--max-block must be at least 1, not {self.max_block}")
        if not math.isfinite(self.threshold):
            raise UserError(f"--threshold must be a number, not {self.threshold}")


def angular_on_windows(model: torch.nn.Module, windows: TokenWindows, config: AngularConfig, *,
                       stack: LayerStack | None = None, progress: Progress = SILENT) -> AngularResult:
    """Angular distances over a text's token windows, reporting windows done to ``progress``
    (under a launcher the batches are shared over the ranks, the sums made in one order)."""
    stack, max_block = _block_limit(model, stack, config.max_block, config.tokens, config.units)
    parts = measure_batches(windows, config.batch_size,
                            lambda ids, mask: _pair_part(model, stack, ids, mask, max_block, config.tokens,
                                                         config.units),
                            progress, "angular distances")
    return _angular_result(parts, len(stack), max_block, config.tokens, config.threshold, config.units)


def angular_on_text(
    loaded: LoadedModel,
    texts: Iterable[str],
    *,
    seq_len: int | None = None,
    max_tokens: int | None = 65_536,
    batch_size: int = 4,
    tokens: TokenMode = "all",
    max_block: int | None = None,
    threshold: float = 0.2,
    stack: LayerStack | None = None,
    progress: Progress = SILENT,
    units: str | Iterable[str] = ("block",),
) -> AngularResult:
    """Tokenise ``texts`` for a :class:`~lnsdiag.models.LoadedModel` and measure angular distances."""
    config = AngularConfig(seq_len=seq_len, max_tokens=max_tokens, batch_size=batch_size, tokens=tokens,
                           max_block=max_block, threshold=threshold, units=parse_kinds(units))
    return angular_on_windows(loaded.model, config.windows(loaded, texts), config, stack=stack, progress=progress)


class AngularRun(MeasureRun):
    """An ``angular`` run: the :class:`AngularResult` and its ``meta.json`` record."""

    def write(self, folder: str | Path) -> RunFiles:
        """angular.csv (per layer, and per asked unit: :meth:`AngularResult.csv_frame`), angular_blocks.csv
        (per span of whole blocks) and meta.json, into ``folder``."""
        return write_tables(Path(folder), {"angular.csv": self.result.csv_frame(),
                                           "angular_blocks.csv": self.result.blocks}, self.meta)


def run(loaded: LoadedModel, text: TextSource, config: AngularConfig, *, layers_path: str | None = None,
        progress: Progress = SILENT, timer: Timer | None = None) -> AngularRun:
    """Measure one model's angular distances on ``text`` and record how (``lnsdiag angular``)."""
    result, meta = measure_text("angular", loaded, text, config, angular_on_windows, layers_path=layers_path,
                                progress=progress, timer=timer,
                                settings=lambda r: {"max_block": int(r.blocks["block_size"].max())})
    return AngularRun(result, meta)
