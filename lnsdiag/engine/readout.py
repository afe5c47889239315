"""From one batch's logits to each request's answers: its log-likelihood and greedy flag, and for
the requests a scorer compares with the full model (``compares_to_full``) the KL and top-1
agreement of every scored token against the full model's distribution (:mod:`..scoring.divergence`).

Log-probabilities are taken in float32 whatever the model's dtype, a chunk of rows at a time;
the full log-softmax of the batch is never written out for the log-likelihoods, and for the
comparison only the full model's (one :class:`~lnsdiag.scoring.divergence.Reference` per batch).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..scoring.divergence import CHUNK_ELEMENTS, Reference, chunks, divergence
from .checkpoint import PassState
from .plan import Row

#: float32 elements of one chunk of logits when nothing is compared (512 MiB).
PLAIN_CHUNK = 1 << 27


@dataclass
class ScoredIndex:
    """Flattened (row, slot, target token, request) of every scored position in a batch, and for
    compared requests each position's place in the pass's per-token arrays (``token``, −1: none)."""

    row: torch.Tensor
    slot: torch.Tensor
    target: torch.Tensor
    member: torch.Tensor
    token: torch.Tensor
    members: int
    requests: np.ndarray
    compared: np.ndarray  # members (positions in ``requests``) whose request is compared

    @classmethod
    def of(cls, rows: list[Row], device: torch.device, token_start: np.ndarray | None = None) -> ScoredIndex:
        """Slots count each row's scored positions in order (the columns the head keeps).
        ``token_start[n]``: where request n's tokens start in the per-token arrays (−1: not compared)."""
        row_idx, slot_idx, targets, member, token = [], [], [], [], []
        requests: list[int] = []
        for b, row in enumerate(rows):
            slot_of = {p: k for k, p in enumerate(sorted(row.positions))}
            for n, at, cont in row.members:
                m = len(requests)
                requests.append(n)
                start = -1 if token_start is None else int(token_start[n])
                for j, (pos, tok) in enumerate(zip(at, cont, strict=True)):
                    row_idx.append(b)
                    slot_idx.append(slot_of[pos])
                    targets.append(tok)
                    member.append(m)
                    token.append(start + j if start >= 0 else -1)
        compared = [m for m, n in enumerate(requests) if token_start is not None and token_start[n] >= 0]

        def tensor(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.long, device=device)

        return cls(tensor(row_idx), tensor(slot_idx), tensor(targets), tensor(member), tensor(token), len(requests),
                   np.asarray(requests, dtype=np.int64), np.asarray(compared, dtype=np.int64))


def read_out(logits: torch.Tensor, index: ScoredIndex, v: int, state: PassState,
             reference: Reference | None = None, *, is_full: bool = False) -> None:
    """Write variant ``v``'s answers for the batch into ``state``: each request's summed float32
    log-probs (logit − logsumexp) and whether every target is the argmax; with a ``reference``
    (the full model's distributions of this batch, :func:`reference_of`), each compared request's
    summed KL, its top-1 agreements and every token's KL. ``is_full``: ``v`` is the full model (KL 0).

    Positions (row × slot) are taken a chunk at a time, so temporaries stay bounded however long
    a row or large the vocabulary."""
    rows, slots, vocab = logits.shape
    flat = logits.reshape(rows * slots, vocab)
    position = index.row * slots + index.slot
    device = logits.device
    sums = torch.zeros(index.members, dtype=torch.float64, device=device)
    misses = torch.zeros(index.members, dtype=torch.int32, device=device)
    compare = reference is not None and index.compared.size > 0 and state.kl is not None
    kl_sums = torch.zeros(index.members, dtype=torch.float64, device=device)
    agreed = torch.zeros(index.members, dtype=torch.int32, device=device)
    for p0, p1 in chunks(rows * slots, vocab, CHUNK_ELEMENTS if compare else PLAIN_CHUNK):
        sel = (position >= p0) & (position < p1)
        if not bool(sel.any()):
            continue
        at, t, m = position[sel] - p0, index.target[sel], index.member[sel]
        if compare:  # the comparison's pass over the logits also gives the log-sum-exp and the argmax
            norm, top = _compare(flat[p0:p1], reference, p0, p1, (at, m, index.token[sel]), is_full, kl_sums, agreed,
                                 state, v)
            sums.index_add_(0, m, (flat[p0:p1][at, t].float() - norm).double())
        else:
            chunk = flat[p0:p1].float()
            norm = torch.logsumexp(chunk, dim=-1)
            sums.index_add_(0, m, (chunk[at, t] - norm[at]).double())
            top = chunk[at].argmax(dim=-1)
            del chunk, norm
        misses.index_add_(0, m, (top != t).int())
    state.loglik[v, index.requests] = sums.cpu().numpy()
    state.greedy[v, index.requests] = (misses == 0).cpu().numpy()
    if compare:
        cols = index.requests[index.compared]
        state.kl[v, cols] = kl_sums.cpu().numpy()[index.compared]
        state.agree[v, cols] = agreed.cpu().numpy()[index.compared]


def reference_of(logits: torch.Tensor) -> Reference:
    """The full model's distributions at a batch's scored positions ([rows, slots, vocab] logits)."""
    rows, slots, vocab = logits.shape
    return Reference.of(logits.reshape(rows * slots, vocab))


def _compare(logits: torch.Tensor, reference: Reference, p0: int, p1: int, entries: tuple, is_full: bool,
             kl_sums: torch.Tensor, agreed: torch.Tensor, state: PassState, v: int
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Accumulate one chunk's KL and top-1 agreement per request, and keep each compared token's;
    returns the log-sum-exp and the argmax at the scored positions (bitwise ``torch.logsumexp``'s
    and ``argmax``'s: the log-likelihoods are those of a pass that compares nothing)."""
    at, m, token = entries
    if is_full:  # the full model against itself: nothing moved; its summary is the reference
        kl = torch.zeros(at.shape, dtype=torch.float64, device=logits.device)
        norm, top = reference.lse[p0:p1][at], reference.top[p0:p1][at]
        agree = torch.ones(at.shape, dtype=torch.bool, device=logits.device)
    else:
        kl_pos, top_pos, lse = divergence(reference, logits, p0, p1)
        kl, top, norm = kl_pos[at], top_pos[at], lse[at]
        agree = top == reference.top[p0:p1][at]
    kl_sums.index_add_(0, m, kl)
    agreed.index_add_(0, m, agree.int())
    keep = token >= 0
    where = token[keep].cpu().numpy()
    state.token_kl[v, where] = kl[keep].float().cpu().numpy()
    state.token_agree[v, where] = agree[keep].cpu().numpy()
    return norm, top
