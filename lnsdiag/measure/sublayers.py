"""What each sub-layer of a block does to the residual stream: the attention's step and the MLP's.

Block l takes the stream x = x_l and adds its attention's update a and its MLP's update m (each
after its sandwich norm, where the block has one: Gemma 2/3, OLMo 2). With h = x + a:

* the attention's step is x → h: angular distance d(x, h), Block Influence 1 − cos(x, h) and the
  update ratio ‖a‖/‖x‖;
* the MLP's step is h → h + m: d(h, h + m), 1 − cos(h, h + m) and ‖m‖/‖h‖.

In a sequential block h is the MLP's input and h + m the block's output x_{l+1}. A parallel block
(GPT-NeoX with ``use_parallel_residual``, GPT-J, Phi, Falcon) computes a and m both from x and
outputs x + a + m; h = x + a is defined the same way there, so in every family the two steps, one
after the other, are the block's step (a parallel MLP's step is what it adds after the attention).

The updates are caught by forward hooks on the sites (:func:`~lnsdiag.model.structure.sublayer_site`;
on the post-norm where there is one), installed through :func:`~lnsdiag.model.patch.patched`, during
the same pass that gives the block states (:func:`.stream.stream_states`), with the same tokens
(:func:`.stream.pick_tokens`). Each block's x + a + m is checked against its real output: a block
that is not that sum — a Post-LN block (BERT) normalising after each add — is refused in one line
rather than measured wrong. Sums are float64 per batch, so memory stays bounded.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import pandas as pd
import torch
import torch.nn.functional as F

from ..errors import UserError
from ..interventions.units import KIND_NAMES
from ..model.patch import patched
from ..model.placement import norm_placement
from ..model.structure import LayerStack, first_tensor, sublayer_site
from .stream import TokenMode, angle_and_cosine, pick_tokens, stream_states

#: The sub-layer kinds, in the column order of a batch's sums.
SUBLAYER_KINDS: tuple[str, ...] = ("attn", "mlp")
#: How far a block's output may be from x + a + m (mean ‖difference‖ over mean ‖output‖): the
#: rounding of the model's own adds in its precision, never a missing update or a norm.
_TOLERANCE: dict[torch.dtype, float] = {torch.float64: 1e-8, torch.float32: 1e-4}
_LOW_PRECISION_TOLERANCE = 3e-2


def wants_sublayers(units: Iterable[str]) -> bool:
    """Whether ``units`` (``--unit``'s kinds) asks for any sub-layer."""
    return any(kind in SUBLAYER_KINDS for kind in units)


def check_sublayers(model: torch.nn.Module, stack: LayerStack, units: Iterable[str]) -> None:
    """Refuse, before any batch, sub-layers of a Post-LN model (one line): its blocks normalise after each
    residual add, so a sub-layer's update is no step of a residual stream (the per-block check of
    x + a + m would refuse it too, later and less plainly)."""
    if not wants_sublayers(units):
        return
    placement = norm_placement(model, stack)
    if placement.startswith("post-LN"):
        raise UserError(f"--unit {','.join(units)}: {type(stack.layers[0]).__name__} blocks are Post-LN (they "
                        "normalise after each residual add), so their attention and MLP updates are no steps of "
                        "a residual stream; measure --unit block")


@dataclass
class SublayerPart:
    """Sums over tokens for each block and sub-layer kind (``[L, 2]``, float64, CPU): angle over π,
    cosine, update ratio; the count, mean and M2 of the entries of each step's start (x for attn,
    h for mlp); and the tokens counted. One batch's, or several merged in batch order."""

    angle: torch.Tensor
    cosine: torch.Tensor
    ratio: torch.Tensor
    entries: torch.Tensor
    mean: torch.Tensor
    m2: torch.Tensor
    tokens: int = 0

    @classmethod
    def zeros(cls, num_layers: int) -> SublayerPart:
        def z() -> torch.Tensor:
            return torch.zeros(num_layers, len(SUBLAYER_KINDS), dtype=torch.float64)

        return cls(z(), z(), z(), z(), z(), z())

    def merge(self, other: SublayerPart) -> None:
        """Add ``other``'s sums (Chan's pairwise update for the moments), in place."""
        self.angle += other.angle
        self.cosine += other.cosine
        self.ratio += other.ratio
        total = self.entries + other.entries
        safe = total.clamp_min(1)
        delta = other.mean - self.mean
        self.mean = self.mean + delta * other.entries / safe
        self.m2 = self.m2 + other.m2 + delta * delta * self.entries * other.entries / safe
        self.entries = total
        self.tokens += other.tokens


class _Steps:
    """One batch's :class:`SublayerPart`, fed the block states (x_0..x_L, selected tokens) and the
    sites' updates in the order the forward pass makes them."""

    def __init__(self, stack: LayerStack, mask: torch.Tensor, tokens: TokenMode,
                 on_state: Callable[[int, torch.Tensor], None]) -> None:
        self.stack, self.mask, self.tokens, self.on_state = stack, mask, tokens, on_state
        self.part = SublayerPart.zeros(len(stack))
        self.updates: dict[tuple[int, str], torch.Tensor] = {}
        self.current: torch.Tensor | None = None

    def state(self, index: int, state: torch.Tensor) -> None:
        """x_index, handed on to ``on_state``; it closes block index − 1."""
        self.on_state(index, state)
        if index == 0:
            self.part.tokens += state.shape[0]
        elif self.current is not None:
            self._block(index - 1, self.current, state)
        self.current = state if index < len(self.stack) else None

    def hook(self, layer: int, kind: str) -> Callable[..., None]:
        """A forward hook keeping the (selected tokens of the) update of block ``layer``'s ``kind``."""
        def record(_module: torch.nn.Module, _args: tuple, output: object) -> None:
            update = first_tensor(output)
            if update is None:
                raise UserError(f"the {kind} sub-layer of block {layer} returns no tensor: cannot measure it")
            if update.dim() == 2 and self.mask.dim() == 2:  # flattened tokens (OPT's fc2)
                update = update.view(*self.mask.shape, -1)
            if (layer, kind) in self.updates:
                raise UserError(f"the {kind} sub-layer of block {layer} ran twice in one pass: cannot measure it")
            self.updates[(layer, kind)] = pick_tokens(update, self.mask, self.tokens)
        return record

    def _update(self, layer: int, kind: str, like: torch.Tensor) -> torch.Tensor:
        update = self.updates.pop((layer, kind), None)
        if update is None:
            raise UserError(f"the {kind} sub-layer of block {layer} did not run: cannot measure it")
        return update.to(like.device, torch.float64)

    def _block(self, layer: int, x_in: torch.Tensor, x_out: torch.Tensor) -> None:
        """Block ``layer``'s two steps: x → h = x + a (attn), h → h + m (mlp)."""
        x = x_in.to(torch.float64)
        a, m = self._update(layer, "attn", x), self._update(layer, "mlp", x)
        h = x + a
        after = h + m
        self._check(layer, after, x_out)
        for k, (start, end, update) in enumerate(((x, h, a), (h, after, m))):
            self._add(layer, k, start, end, update)

    def _check(self, layer: int, after: torch.Tensor, x_out: torch.Tensor) -> None:
        """Refuse a block whose output is not x + a + m (beyond the rounding of its precision)."""
        if not x_out.numel():
            return
        out = x_out.to(after.device, torch.float64)
        gap = float((out - after).norm(dim=-1).mean()) / max(float(out.norm(dim=-1).mean()), 1e-30)
        if gap > _TOLERANCE.get(x_out.dtype, _LOW_PRECISION_TOLERANCE):
            name = type(self.stack.layers[layer]).__name__
            raise UserError(f"cannot measure the sub-layers of {name} blocks: block {layer}'s output is not its "
                            f"input plus its attention and MLP updates ({gap:.2g} apart; a Post-LN block, as BERT's, "
                            "normalises after each residual add); measure --unit block")

    def _add(self, layer: int, k: int, start: torch.Tensor, end: torch.Tensor, update: torch.Tensor) -> None:
        part = self.part
        angle, cosine = angle_and_cosine(F.normalize(start, dim=-1), F.normalize(end, dim=-1))
        part.angle[layer, k] = float(angle.sum()) / math.pi
        part.cosine[layer, k] = float(cosine.sum())
        part.ratio[layer, k] = float((update.norm(dim=-1) / start.norm(dim=-1).clamp_min(1e-30)).sum())
        if start.numel():
            mean = float(start.mean())
            part.entries[layer, k] = start.numel()
            part.mean[layer, k] = mean
            part.m2[layer, k] = float(((start - mean) ** 2).sum())


def measure_batch(model: torch.nn.Module, stack: LayerStack, ids: torch.Tensor, mask: torch.Tensor,
                  on_state: Callable[[int, torch.Tensor], None], tokens: TokenMode,
                  units: Iterable[str]) -> SublayerPart | None:
    """One batch through :func:`.stream.stream_states` (``on_state`` gets x_0..x_L as ever), its
    sub-layers measured on the way when ``units`` asks for any (else None: the plain pass)."""
    if not wants_sublayers(units):
        stream_states(model, stack, ids, mask, on_state, tokens)
        return None
    steps = _Steps(stack, mask, tokens, on_state)
    with patched() as patches:
        for layer, block in enumerate(stack.layers):
            for kind in SUBLAYER_KINDS:
                site = sublayer_site(block, kind)
                patches.hook(site.post_norm if site.post_norm is not None else site.module, steps.hook(layer, kind))
        stream_states(model, stack, ids, mask, steps.state, tokens)
    return steps.part


def merged(parts: Iterable[SublayerPart | None], num_layers: int) -> SublayerPart | None:
    """The batches' parts summed in order (None when no batch measured sub-layers)."""
    total = None
    for part in parts:
        if part is not None:
            if total is None:
                total = SublayerPart.zeros(num_layers)
            total.merge(part)
    return total


def _rows(total: SublayerPart | None, units: Iterable[str], columns: dict[str, torch.Tensor] | None,
          names: list[str]) -> pd.DataFrame:
    """One row per block and asked sub-layer kind (by layer, then kind)."""
    kinds = [k for k in SUBLAYER_KINDS if k in tuple(units)]
    if total is None or columns is None or not kinds:
        return pd.DataFrame(columns=["layer", "unit", *names])
    num_layers = total.angle.shape[0]
    rows = [{"layer": layer, "unit": kind, **{name: float(columns[name][layer, SUBLAYER_KINDS.index(kind)])
                                              for name in names}}
            for layer in range(num_layers) for kind in kinds]
    return pd.DataFrame(rows, columns=["layer", "unit", *names])


def angular_rows(total: SublayerPart | None, units: Iterable[str], threshold: float) -> pd.DataFrame:
    """The sub-layers' rows of angular.csv: layer, unit, angular_distance, block_influence, cosine,
    near_identity."""
    names = ["angular_distance", "block_influence", "cosine"]
    columns = None
    if total is not None and total.tokens:
        cosine = total.cosine / total.tokens
        columns = {"angular_distance": total.angle / total.tokens, "block_influence": 1.0 - cosine, "cosine": cosine}
    frame = _rows(total, units, columns, names)
    frame["near_identity"] = (frame["angular_distance"] < threshold).astype(bool)
    return frame


def variance_rows(total: SublayerPart | None, units: Iterable[str]) -> pd.DataFrame:
    """The sub-layers' rows of variance.csv: layer, unit, and the variance and RMS of the stream each
    sub-layer updates (x for attn, h for mlp) with its update ratio (‖a‖/‖x‖, ‖m‖/‖h‖)."""
    columns = None
    if total is not None and total.tokens:
        variance = torch.where(total.entries > 0, total.m2 / total.entries.clamp_min(1), math.nan)
        columns = {"variance": variance, "rms": (variance + total.mean ** 2).sqrt(),
                   "update_ratio": total.ratio / total.tokens}
    return _rows(total, units, columns, ["variance", "rms", "update_ratio"])


def tidy(blocks: pd.DataFrame, sublayers: pd.DataFrame, units: Iterable[str]) -> pd.DataFrame:
    """The rows of every asked unit kind as one frame, ``unit`` beside ``layer``: the blocks' (when
    ``block`` is asked) and the sub-layers', ordered by layer, then kind (block, attn, mlp)."""
    units = tuple(units)
    frames = []
    if "block" in units:
        frames.append(blocks.assign(unit="block")[["layer", "unit", *[c for c in blocks.columns if c != "layer"]]])
    wanted = sublayers[sublayers["unit"].isin(units)]
    if len(wanted):
        frames.append(wanted)
    if not frames:
        return pd.DataFrame(columns=["layer", "unit", *[c for c in blocks.columns if c != "layer"]])
    frame = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0].reset_index(drop=True)
    order = frame["unit"].map(list(KIND_NAMES).index)
    return frame.assign(_order=order).sort_values(["layer", "_order"], kind="stable").drop(columns="_order") \
        .reset_index(drop=True)
