"""The training-free linear heal of a pruned model (after ReplaceMe and LinearPatch, 2025).

For each removed contiguous span of blocks ``[i, j]``, on calibration token windows:

* ``X``: the output of block ``i - 1``'s MLP (before the residual add) in the *pruned* model,
  with the heals of the earlier spans already in place (spans are fitted in order, so each one
  also corrects what the earlier cuts left over);
* ``R``: the full model's stream after block ``j`` minus the pruned model's stream after block
  ``i - 1``: what the removed span (and the earlier cuts' residual error) should have added;
* ``T = argmin ‖X T − R‖² + λ‖T‖²``, ``λ = ridge · trace(XᵀX) / d``, solved in float64 from
  ``XᵀX`` and ``XᵀR`` accumulated batch by batch (``d×d`` each: the activations are never kept).

Folding ``T`` (:mod:`.sites`) makes the MLP add ``M + M T``: the healed model has exactly the
architecture of the pruned one. Spans starting at block 0 are fitted on the input embeddings.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..data.windows import TokenWindows
from ..errors import UserError
from ..interventions.removal import REMOVED, RESUMED, removed_layers
from ..interventions.units import Removal
from ..model.patch import patched_forward
from ..model.structure import LayerStack, find_layers
from .apply import healed
from .fitted import LinearPatch, SpanFit, contiguous_spans
from .sites import (
    EMBEDDINGS,
    FoldSite,
    block_output,
    check_foldable,
    fold_site,
    model_device,
    model_hidden,
    site_activations,
)

#: The default ridge, relative to the mean eigenvalue of XᵀX (trace / d).
RIDGE = 1e-4


class NormalEquations:
    """``XᵀX`` and ``XᵀR`` (``d×d``, float64) and three sums of squares, accumulated batch by batch:
    all a least-squares fit and its errors need, whatever the number of tokens."""

    def __init__(self, hidden: int, device: torch.device | str = "cpu") -> None:
        self.xtx = torch.zeros(hidden, hidden, dtype=torch.float64, device=device)
        self.xtr = torch.zeros(hidden, hidden, dtype=torch.float64, device=device)
        self.rr = 0.0  #: ‖R‖²
        self.hh = 0.0  #: ‖H‖², the full model's stream (the scale the errors are relative to)
        self.tokens = 0

    def add(self, x: torch.Tensor, r: torch.Tensor, h: torch.Tensor) -> None:
        """One batch of tokens: rows of ``X``, ``R`` and the full stream ``H`` (``[n, d]`` each)."""
        x, r, h = (v.to(self.xtx.device, torch.float64) for v in (x, r, h))
        self.xtx += x.T @ x
        self.xtr += x.T @ r
        self.rr += float((r * r).sum())
        self.hh += float((h * h).sum())
        self.tokens += x.shape[0]

    def penalty(self, ridge: float) -> float:
        """The absolute ridge λ for a ``ridge`` relative to trace(XᵀX) / d."""
        return ridge * float(torch.trace(self.xtx)) / self.xtx.shape[0]

    def solve(self, ridge: float = RIDGE) -> torch.Tensor:
        """``T = (XᵀX + λI)⁻¹ XᵀR`` in float64."""
        if self.tokens == 0:
            raise UserError("no calibration tokens to fit the heal on")
        eye = torch.eye(self.xtx.shape[0], dtype=torch.float64, device=self.xtx.device)
        try:
            return torch.linalg.solve(self.xtx + self.penalty(ridge) * eye, self.xtr)
        except torch.linalg.LinAlgError:
            raise UserError(f"the calibration activations are rank-deficient (ridge {ridge}): use a ridge above 0 "
                            "or more calibration text") from None

    def residual(self, t: torch.Tensor) -> float:
        """``‖X T − R‖²`` from the sums alone: ``tr(Tᵀ XᵀX T) − 2 tr(Tᵀ XᵀR) + ‖R‖²``."""
        t = t.to(self.xtx.device, torch.float64)
        return max(0.0, float((t * (self.xtx @ t)).sum() - 2 * (t * self.xtr).sum()) + self.rr)


def fit_linear_patch(model: nn.Module, removal: Removal | list[int], windows: TokenWindows, *,
                     ridge: float = RIDGE, batch_size: int = 8, stack: LayerStack | None = None,
                     progress: Callable[[str], None] | None = None) -> LinearPatch:
    """Fit the heal of ``removal`` on ``windows`` (calibration text only: never the text it is scored on).

    ``model`` is the full model, with no blocks removed; it is left as it was. Each span costs two
    forward passes per batch, each stopped at the block it reads.
    """
    removal = Removal.of(removal)
    stack = stack or find_layers(model)
    if not removal.blocks:
        raise UserError("nothing is removed: there is nothing to heal")
    if len(removal.blocks) != len(removal):
        raise UserError(f"a linear heal replaces whole blocks only, not {removal.cell}")
    if ridge < 0:
        raise UserError(f"the ridge must be 0 or more, not {ridge}")
    _check_full(stack)
    spans = contiguous_spans(removal.blocks)
    sites = [fold_site(model, stack, first - 1 if first else EMBEDDINGS) for first, _ in spans]
    for site in sites:
        check_foldable(model, stack, site)
    patch = _empty_patch(model, stack, removal, windows)
    for (first, last), site in zip(spans, sites, strict=True):
        if progress:
            progress(f"fitting the heal of blocks {first}-{last} at {site.label}")
        sums = _accumulate(model, stack, patch, site, last, windows, batch_size)
        patch = _with_span(patch, _span_fit(sums, first, last, site.block, ridge))
    return patch


def _empty_patch(model: nn.Module, stack: LayerStack, removal: Removal, windows: TokenWindows) -> LinearPatch:
    calibration = {"name": windows.name, "digest": windows.digest, "windows": len(windows),
                   "tokens": sum(len(w) for w in windows.windows)}
    return LinearPatch(removal, len(stack), model_hidden(model), (), calibration=calibration)


def _with_span(patch: LinearPatch, span: SpanFit) -> LinearPatch:
    return LinearPatch(patch.removal, patch.num_layers, patch.hidden_size, (*patch.spans, span), patch.method,
                       patch.calibration)


def _accumulate(model: nn.Module, stack: LayerStack, patch: LinearPatch, site: FoldSite, last: int,
                windows: TokenWindows, batch_size: int) -> NormalEquations:
    """The sums of one span over the calibration windows: ``X`` and the pruned stream from the pruned
    model healed so far (``patch``), the target from the full model."""
    device = model_device(model)
    sums = NormalEquations(patch.hidden_size, "cpu" if device.type == "mps" else device)  # MPS has no float64
    for ids, mask in windows.batches(batch_size):
        target = block_output(model, stack, last, ids, mask)
        with removed_layers(model, patch.removal, mode="skip", stack=stack), healed(model, patch, stack=stack):
            x, h = site_activations(model, stack, site, ids, mask)
        keep = mask.to(sums.xtx.device).bool()
        x, h, target = (v.to(sums.xtx.device, torch.float64)[keep] for v in (x, h, target))
        sums.add(x, target - h, target)  # R in float64, whatever the model's dtype
    return sums


def _check_full(stack: LayerStack) -> None:
    """The fit reads the full model too: refuse one whose blocks are removed at the moment."""
    removed = [i for i, block in enumerate(stack.layers) if patched_forward(block) in (REMOVED, RESUMED)]
    if removed:
        raise UserError(f"fit the heal on the full model: blocks {', '.join(map(str, removed))} are removed "
                        "(call it outside removed_layers)")


def _span_fit(sums: NormalEquations, first: int, last: int, site: int, ridge: float) -> SpanFit:
    t = sums.solve(ridge)
    scale = max(sums.hh, 1e-300) ** 0.5
    healed_error = sums.residual(t) ** 0.5
    return SpanFit(first=first, last=last, site=site, transform=t.to("cpu", torch.float32).contiguous(), ridge=ridge,
                   penalty=sums.penalty(ridge), tokens=sums.tokens, error_unhealed=sums.rr**0.5 / scale,
                   error_healed=healed_error / scale, fit_error=healed_error / max(sums.rr, 1e-300) ** 0.5)
