"""The work a pass does, counted in block-token passes (one block over one token).

The fast engine runs every row token through the baseline once and through each variant's
kept blocks after its first removed one; the naive engine (lm-eval's HFLM per variant) runs
every variant's kept blocks over HFLM's own rows. Padding is excluded on both sides. The
exactness check of prefix sharing (:func:`probe_plan`) is counted too: it runs the full model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..interventions.units import Removal
from ..scoring.base import TokenRequest
from .plan import Row, plan_rows


def layer_passes(n_layers: int, variants: Sequence[Removal]) -> int:
    """Blocks the fast engine runs per row token: the baseline (or up to the deepest kept
    input when the baseline is not asked for), then each variant resumed after its first
    removed block, running the blocks after it that it keeps."""
    sets = [v for v in variants if v]
    base = n_layers if Removal() in variants or not sets else max(s.first for s in sets)
    return base + sum(n_layers - s.first - len(s.blocks) for s in sets)


def naive_layer_passes(n_layers: int, variants: Sequence[Removal]) -> int:
    """Blocks the naive engine runs per row token: every block of each variant but the removed ones."""
    return sum(n_layers - len(v.blocks) for v in variants)


def naive_tokens(requests: Sequence[TokenRequest], max_length: int) -> int:
    """Tokens HFLM feeds for these requests: one row per distinct ``context + continuation[:-1]``
    (its one-token-continuation cache shares those), cut to ``max_length``; padding excluded."""
    keys = {r.context + r.continuation[:-1] for r in requests if r.continuation}
    return sum(min(len(k), max_length) for k in keys)


def probe_plan(rows: Sequence[Row], n_layers: int, variants: Sequence[Removal], *, limit: int = 8,
               per_row: int = 2, share_of_work: float = 0.05) -> list[tuple[Row, list[int]]]:
    """The shared rows the exactness check runs and the requests it compares in each.

    Rows in order of priority: the widest, the one answering most requests, then the rest
    spread over the plan, up to ``limit``; in each, ``per_row`` requests spread over the row
    (its first branch and its last, the deepest in the row). Rows are added while the check
    (each probe row, and each compared request's own input, through all blocks) costs at most
    ``share_of_work`` of the pass's block-token work; the first two always.
    """
    shared = [r for r in rows if r.shared]
    if not shared:
        return []
    picks = [max(range(len(shared)), key=lambda i: (len(shared[i].ids), -i)),
             max(range(len(shared)), key=lambda i: (len(shared[i].members), -i))]
    picks += [round(k * (len(shared) - 1) / max(1, limit - 1)) for k in range(limit)]
    allowed = share_of_work * sum(len(r.ids) for r in rows) * layer_passes(n_layers, variants) / max(1, n_layers)
    out: list[tuple[Row, list[int]]] = []
    spent = 0
    for i in list(dict.fromkeys(picks))[:limit]:
        row = shared[i]
        order = sorted(row.members, key=lambda m: (m[1][0], m[0]))
        chosen = list(dict.fromkeys(order[round(k * (len(order) - 1) / max(1, per_row - 1))][0]
                                    for k in range(per_row)))
        depth = row.position_ids()
        ends = {max(m[1]) for m in row.members if m[0] in chosen}  # one per distinct input
        cost = len(row.ids) + sum(depth[end] + 1 for end in ends)
        if len(out) >= 2 and spent + cost > allowed:
            break
        out.append((row, chosen))
        spent += cost
    where = {id(r): k for k, r in enumerate(rows)}
    return sorted(out, key=lambda probe: where[id(probe[0])])


def check_tokens(probes: Sequence[tuple[Row, list[int]]], requests: Sequence[TokenRequest], max_length: int,
                 noise: bool = False) -> int:
    """Tokens the exactness check feeds the full model: each probe row, and each compared
    request's own input (twice with ``noise``: alone, then batched through the explicit-mask
    path, to measure rounding noise)."""
    members = sorted({n for _, chosen in probes for n in chosen})
    alone = sum(len(r.ids) for r in plan_rows([requests[n] for n in members], max_length, prefixes=False))
    return sum(len(row.ids) for row, _ in probes) + (2 if noise else 1) * alone


def count_work(requests: Sequence[TokenRequest], rows: Sequence[Row], max_length: int, n_layers: int,
               variants: Sequence[Removal], checked_tokens: int = 0) -> dict[str, Any]:
    """Block-token passes of the fast engine for this plan, and of the naive engine for the same
    variants; padding excluded on both sides (it depends on batch sizes, not on the method).

    ``block_tokens`` = Σ row tokens × :func:`layer_passes` + the exactness check's tokens ×
    ``n_layers`` (it runs the full model); ``naive_block_tokens`` = HFLM's row tokens
    (:func:`naive_tokens`) × :func:`naive_layer_passes`.
    """
    fast = sum(len(r.ids) for r in rows) * layer_passes(n_layers, variants) + checked_tokens * n_layers
    naive = naive_tokens(requests, max_length) * naive_layer_passes(n_layers, variants)
    return {"block_tokens": fast, "naive_block_tokens": naive, "check_block_tokens": checked_tokens * n_layers,
            "work_ratio": round(naive / fast, 3) if fast else None}


def planned_work(requests: Sequence[TokenRequest], max_length: int, n_layers: int,
                 variants: Sequence[Removal], *, row_tokens: int | None = None,
                 window: int | None = None, half: bool = False) -> dict[str, Any]:
    """What :meth:`~lnsdiag.engine.fast.SweepEngine.run` reports as its work when sharing is on
    and checked, without a model: the same plan, probe choice and count (the counted targets)."""
    rows = plan_rows(requests, max_length, share=True, window=window, row_tokens=row_tokens)
    checked = check_tokens(probe_plan(rows, n_layers, variants), requests, max_length, noise=half)
    return count_work(requests, rows, max_length, n_layers, variants, checked)
