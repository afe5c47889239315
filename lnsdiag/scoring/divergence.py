"""How far a variant's next-token distributions moved from the full model's: KL(p_full ‖ p_variant)
and top-1 agreement per scored position, computed in chunks so that no more than one batch's
log-probabilities of the full model is ever held.

Both engines use these functions: the fast engine keeps the full model's :class:`Reference` for
the batch in flight and compares every variant's logits with it; the naive reference path
computes the full model's logits next to each variant's (:mod:`lnsdiag.scoring.fidelity`).

Accuracy: a KL between close distributions is a small difference of large numbers. The
log-sum-exp of the variant is accumulated in float64 around its maximum, each term is taken
against the variant's log-probabilities *relative to its maximum* (so the terms that carry the
probability are small), and the result is normalised by the reference's own probability mass
in float64: KL agrees with a float64 computation to ~1e-7 nats, whatever the logits' offset.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: float32 elements a chunk's temporaries may hold (4 of them: 4 × 128 MiB).
CHUNK_ELEMENTS = 1 << 25


@dataclass
class Reference:
    """The full model's distributions at a batch's positions ([rows, slots, vocab] logits in).

    ``logp``: float32 log-probabilities; ``mass``: Σ exp(logp) per position in float64 (1 up to
    float32 rounding; dividing by it makes the KL invariant to that rounding); ``top``: argmax.
    """

    logp: torch.Tensor
    mass: torch.Tensor
    top: torch.Tensor
    impossible: bool = False  #: some token has probability exactly 0 (a masked logit)

    @classmethod
    def of(cls, logits: torch.Tensor) -> Reference:
        rows, slots, vocab = logits.shape
        logp = torch.empty((rows, slots, vocab), dtype=torch.float32, device=logits.device)
        mass = torch.empty((rows, slots), dtype=torch.float64, device=logits.device)
        top = torch.empty((rows, slots), dtype=torch.long, device=logits.device)
        for r0, r1 in row_chunks(rows, slots * vocab):
            chunk = logits[r0:r1].float()
            peak, top[r0:r1] = chunk.max(dim=-1)
            shifted = chunk - peak.unsqueeze(-1)
            lse = torch.log(torch.exp(shifted).sum(dim=-1, dtype=torch.float64))
            torch.sub(shifted, lse.float().unsqueeze(-1), out=logp[r0:r1])
            mass[r0:r1] = torch.exp(logp[r0:r1]).sum(dim=-1, dtype=torch.float64)
            del chunk, shifted
        return cls(logp, mass, top, bool(torch.isneginf(logp).any()))


def row_chunks(rows: int, per_row: int, limit: int = CHUNK_ELEMENTS) -> list[tuple[int, int]]:
    """Consecutive row ranges of at most ``limit`` elements each (at least one row)."""
    step = max(1, limit // max(1, per_row))
    return [(r0, min(rows, r0 + step)) for r0 in range(0, rows, step)]


def divergence(reference: Reference, logits: torch.Tensor, r0: int, r1: int) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(p_full ‖ p_variant) in nats (float64) and top-1 agreement (bool), per position of rows
    ``r0:r1``; ``logits`` are the variant's logits of those rows ([r1 − r0, slots, vocab])."""
    chunk = logits.float()
    peak, top = chunk.max(dim=-1)
    relative = chunk - peak.unsqueeze(-1)  # logp_variant + log Σ exp(relative)
    log_sum = torch.log(torch.exp(relative).sum(dim=-1, dtype=torch.float64))
    ref_logp = reference.logp[r0:r1]
    relative.neg_().add_(ref_logp)  # logp_full − (logp_variant + log_sum), small where p_full is large
    relative.mul_(torch.exp(ref_logp))
    if reference.impossible:  # 0 · (−inf − x) is NaN: a token the full model cannot emit adds nothing
        relative.masked_fill_(torch.isneginf(ref_logp), 0.0)
    kl = relative.sum(dim=-1, dtype=torch.float64) / reference.mass[r0:r1] + log_sum
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
