"""How far a variant's next-token distributions moved from the full model's: KL(p_full ‖ p_variant)
and top-1 agreement per scored position, computed in chunks so that no more than one batch's
log-probabilities of the full model is ever held.

Both engines use these functions: the fast engine keeps the full model's :class:`Reference` for
the batch in flight and compares every variant's logits with it; the naive reference path
computes the full model's logits next to each variant's (:mod:`lnsdiag.scoring.fidelity`).

Accuracy: a KL between close distributions is a small difference of large numbers. The
logits of both are shifted by their maximum (the terms that carry the probability are then
small), the log-sum-exps are accumulated in float64, and the full model's float32 exp(shifted)
is normalised by its own float64 sum, so the rounding of a stored value moves the KL only to
second order. Identical logits give exactly 0. Measured on the tests' tiny models: within 1e-6
relative of a float64 computation from the same logits (a direct float32 one is off by ~1e-5).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: float32 elements a chunk's temporaries may hold (4 of them: 4 × 128 MiB).
CHUNK_ELEMENTS = 1 << 25


@dataclass
class Reference:
    """The full model's distributions at a batch's positions ([rows, slots, vocab] logits in).

    ``shifted``: float32 logits minus their maximum (the one tensor of the batch's size kept);
    ``log_mass``: log Σ exp(shifted) per position, summed in float64; ``top``: argmax.
    """

    shifted: torch.Tensor
    log_mass: torch.Tensor
    top: torch.Tensor
    impossible: bool = False  #: some token has probability exactly 0 (a masked logit)

    @classmethod
    def of(cls, logits: torch.Tensor) -> Reference:
        rows, slots, vocab = logits.shape
        shifted = torch.empty((rows, slots, vocab), dtype=torch.float32, device=logits.device)
        log_mass = torch.empty((rows, slots), dtype=torch.float64, device=logits.device)
        top = torch.empty((rows, slots), dtype=torch.long, device=logits.device)
        for r0, r1 in row_chunks(rows, slots * vocab):
            shifted[r0:r1], top[r0:r1], log_mass[r0:r1] = _shifted(logits[r0:r1])
        return cls(shifted, log_mass, top, bool(torch.isneginf(shifted).any()))


def _shifted(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float32 logits minus their maximum, the argmax, and log Σ exp of the shifted logits (float64
    sum). The full model and its variants go through these same operations, so identical logits
    give bitwise identical results (and a KL of exactly 0)."""
    chunk = logits.float()
    peak, top = chunk.max(dim=-1)
    shifted = chunk - peak.unsqueeze(-1)
    return shifted, top, torch.log(torch.exp(shifted).sum(dim=-1, dtype=torch.float64))


def row_chunks(rows: int, per_row: int, limit: int = CHUNK_ELEMENTS) -> list[tuple[int, int]]:
    """Consecutive row ranges of at most ``limit`` elements each (at least one row)."""
    step = max(1, limit // max(1, per_row))
    return [(r0, min(rows, r0 + step)) for r0 in range(0, rows, step)]


def divergence(reference: Reference, logits: torch.Tensor, r0: int, r1: int) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(p_full ‖ p_variant) in nats (float64) and top-1 agreement (bool), per position of rows
    ``r0:r1``; ``logits`` are the variant's logits of those rows ([r1 − r0, slots, vocab]).

    With s the shifted logits and S = Σ exp(s): KL = Σ p_full (s_full − s_variant) − log S_full + log S_variant.
    """
    shifted, top, log_mass = _shifted(logits)
    ref_shifted, ref_log_mass = reference.shifted[r0:r1], reference.log_mass[r0:r1]
    weights = torch.exp(ref_shifted)
    terms = shifted.neg_().add_(ref_shifted).mul_(weights)  # in place: the variant's shifted logits are done
    if reference.impossible:  # 0 · (−inf − x) is NaN: a token the full model cannot emit adds nothing
        terms.masked_fill_(weights == 0, 0.0)
    kl = terms.sum(dim=-1, dtype=torch.float64) / torch.exp(ref_log_mass) - ref_log_mass + log_mass
    return kl.clamp_(min=0.0), top == reference.top[r0:r1]


def full_divergence(full: torch.Tensor, variant: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`divergence` of whole [rows, positions, vocab] logits, chunked; for the naive path."""
    reference = Reference.of(full)
    rows, positions, vocab = variant.shape
    kl = torch.empty((rows, positions), dtype=torch.float64, device=variant.device)
    agree = torch.empty((rows, positions), dtype=torch.bool, device=variant.device)
    for r0, r1 in row_chunks(rows, positions * vocab):
        kl[r0:r1], agree[r0:r1] = divergence(reference, variant[r0:r1], r0, r1)
    return kl, agree
