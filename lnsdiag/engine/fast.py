"""The fast sweep engine: every variant's log-likelihoods from one pass over the requests.

Per batch, the full model runs once while the inputs x_i of the blocks to remove are kept;
variant i then resumes from x_i at block i+1 (``removal.resumed_at``), so a sweep over all
L blocks costs L + L(L−1)/2 block passes instead of ≈ L². A variant (a
:class:`~lnsdiag.interventions.units.Removal`) may remove several units, as ``shrink`` scores: it
resumes from the input of its first removed unit's block and skips the others, so every candidate
sharing a kept prefix reuses it. A variant whose first unit is a sub-layer (``3.attn``) resumes from
the same x_3, through block 3 without that sub-layer: a sweep of every block, attention and MLP
(3L variants) shares one full pass. Every pass is the model's own forward (masks, rotary
embeddings, final norm and head included), so every family works.

Three more savings, all exact:
* requests share their common leading tokens in prefix-shared rows (:mod:`.plan`), switched
  on only after a run-time check against unshared rows (:meth:`SweepEngine._plan`);
* the LM head runs only at the positions a request scores (:func:`head_at` gathers them),
  not at every position over the whole vocabulary;
* rows are packed by a token budget sized from free GPU memory (:mod:`.budget`); a batch
  that still runs out of memory is split and retried.

The work done is counted (:mod:`.work`) and a pass resumes from its partial files
(:mod:`.checkpoint`). Log-probabilities are taken in float32 whatever the model's dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..distributed import all_gather, my_share, on_main, world
from ..interventions.removal import removals_suspended, removed_layers, resumed_at
from ..interventions.units import Block, Removal
from ..model.patch import patched
from ..model.quantize import quantized_mode
from ..model.structure import LayerStack, block_input, no_cache_kwargs
from ..progress import SILENT, Progress
from ..scoring.base import Answers, TokenRequest
from ..scoring.divergence import Reference
from .budget import attention_limit, cut_batches, default_budget, default_row_tokens
from .checkpoint import Checkpoint, PassState, compared_token_mask, token_spans
from .inputs import cannot_pack, checked_logits, head_at, padded_ids, shared_inputs
from .plan import Row, plan_digest, plan_rows
from .readout import ScoredIndex, read_out, reference_of
from .work import check_tokens, count_work, layer_passes, naive_tokens, probe_plan

#: The progress phase of an engine pass (counted in tokens).
PASS_PHASE = "one pass, all variants"


@dataclass
class EngineResult:
    """``loglik[v, n]`` and ``greedy[v, n]`` for variant v (see ``variants``) and request n; for the
    requests compared with the full model also ``kl[v, n]``, ``agree[v, n]`` and each of their
    tokens' KL and top-1 agreement (``token_kl[v]``, ``token_agree[v]``: request n's tokens from
    ``token_start[n]``)."""

    variants: list[Removal]
    loglik: np.ndarray
    greedy: np.ndarray
    kl: np.ndarray | None = None
    agree: np.ndarray | None = None
    token_kl: np.ndarray | None = None
    token_start: np.ndarray | None = None
    token_agree: np.ndarray | None = None

    def of(self, variant: Removal) -> Answers:
        """One variant's answers to every request (per-token values split by request)."""
        v = self.variants.index(variant)
        if self.kl is None or self.token_start is None:
            return Answers(self.loglik[v], self.greedy[v])
        spans = token_spans(self.token_start, self.token_kl.shape[1])

        def split(values: np.ndarray) -> list[np.ndarray]:
            return [values[v, :0] if span is None else values[v, span[0]:span[1]] for span in spans]

        return Answers(self.loglik[v], self.greedy[v], self.kl[v], self.agree[v], split(self.token_kl),
                       split(self.token_agree))


def compared_tokens(requests: Sequence[TokenRequest], compared: Sequence[bool] | None
                    ) -> tuple[np.ndarray | None, int | None]:
    """Where each compared request's tokens start in the per-token arrays (−1: not compared), and
    how many tokens the compared requests hold; (None, None) when nothing is compared."""
    if compared is None or not any(compared):
        return None, None
    starts, at = np.full(len(requests), -1, dtype=np.int64), 0
    for n, (req, wanted) in enumerate(zip(requests, compared, strict=True)):
        if wanted:
            starts[n] = at
            at += len(req.continuation)
    return starts, at


class SweepEngine:
    """Log-likelihoods of the full model and of each variant (one or several blocks removed), in one pass."""

    def __init__(self, model: torch.nn.Module, stack: LayerStack, variants: Sequence[Removal], *,
                 batch_tokens: int | None = None, pad_id: int = 0, share: bool = True,
                 row_tokens: int | None = None, full_model_blocks: int | None = None) -> None:
        self.model, self.stack = model, stack
        #: set when the model holds removals of its own (a greedy step: ``stack`` is a view of its kept
        #: blocks): compared requests are compared with the real full model of this many blocks, one more
        #: forward per batch with those removals suspended (counted in the work)
        self.full_model_blocks = full_model_blocks
        self.variants = _distinct_variants(variants, len(stack))
        #: the blocks whose inputs are kept, each with the variants that resume from it
        self.resumes = _resume_points(self.variants)
        self.layers = sorted(self.resumes)
        self.batch_tokens = batch_tokens
        self.pad_id = pad_id
        self.device = model.get_input_embeddings().weight.device
        self.share = share
        self.row_tokens = row_tokens
        self.stats: dict[str, Any] = {}
        self.token_start: np.ndarray | None = None  # set by :meth:`run` when requests are compared

    def layer_passes(self, rows: int = 1) -> int:
        """Block passes per row: the baseline (or up to the deepest kept input) plus each resume."""
        return rows * layer_passes(len(self.stack), self.variants)

    # --- the pass ---------------------------------------------------------------------------

    def run(self, requests: Sequence[TokenRequest], max_length: int, *, progress: Progress = SILENT,
            checkpoint: Checkpoint | None = None, naive: Sequence[TokenRequest] | None = None,
            compared: Sequence[bool] | None = None) -> EngineResult:
        """Every variant's log-likelihood and greedy flag for every request; progress counts tokens.

        ``naive``: the requests the naive engine would run instead (default ``requests``), for
        the work count only (:meth:`~lnsdiag.scoring.base.Scorer.naive_requests`).
        ``compared[n]``: also measure how far each variant's distributions at request n's scored
        tokens moved from the full model's (KL, top-1 agreement), from the same pass: the full
        model's distributions of the batch in flight are kept while its variants resume.

        Under a launcher every rank plans the same rows and cuts the same batches (rank 0 decides
        the sharing check and the budget, and resumes from the partial files), takes a share of the
        batches not done yet (balanced by padded tokens) and computes each whole, as one process
        would; the shares meet on every rank, so each returns the same, complete result. Rank 0's
        progress counts the job: its own tokens scaled by the job's over its share.
        """
        rows, sharing, checked = self._agreed_plan(requests, max_length)
        if checkpoint is not None:
            checkpoint.variants, checkpoint.plan = self.variants, plan_digest(rows)
        self.token_start, tokens = compared_tokens(requests, compared)
        state: PassState = on_main(lambda: self._start(rows, (len(self.variants), len(requests)), checkpoint, tokens))
        empty = [n for n, r in enumerate(requests) if not r.continuation]
        state.greedy[:, empty] = True  # an empty continuation: log-likelihood 0, trivially greedy
        self.stats = self._planned_stats(requests, rows, max_length, state.budget, sharing, checked,
                                         requests if naive is None else naive)
        share = _Share.of(rows, state)
        total = self.stats["tokens"]
        already = total - share.computed
        self.stats.update(resumed_tokens=already, computed_tokens=share.computed)
        progress.phase(PASS_PHASE, total=total)
        progress.advance(already)
        self._run_share(rows, share, state, progress, checkpoint)
        if world().parallel:
            self._merge(state, all_gather(self._part(state, rows, [share.batches[k] for k in share.mine])))
            if not share.mine:
                progress.advance(total - already)
        return EngineResult(self.variants, state.loglik, state.greedy, state.kl, state.agree, state.token_kl,
                            self.token_start, state.token_agree)

    def _planned_stats(self, requests: Sequence[TokenRequest], rows: list[Row], max_length: int, budget: int,
                       sharing: str, checked: int, naive: Sequence[TokenRequest]) -> dict[str, Any]:
        """What the pass is about to do (for meta.json): rows, tokens, sharing, counted work."""
        work = count_work(naive, rows, max_length, len(self.stack), self.variants, checked)
        if self.full_model_blocks is not None and self.token_start is not None:  # the real full model's forward
            extra = sum(len(r.ids) for r in rows) * self.full_model_blocks
            work.update(block_tokens=work["block_tokens"] + extra, reference_block_tokens=extra,
                        work_ratio=round(work["naive_block_tokens"] / (work["block_tokens"] + extra), 3))
        return {"requests": len(requests), "rows": len(rows), "shared_rows": sum(r.shared for r in rows),
                "budget": budget, "row_tokens": self._row_tokens(max_length), "tokens": sum(len(r.ids) for r in rows),
                "sharing": sharing, "unshared_tokens": naive_tokens(naive, max_length), **work}

    def _run_share(self, rows: list[Row], share: _Share, state: PassState, progress: Progress,
                   checkpoint: Checkpoint | None) -> None:
        """This process's batches, each marked done (and checkpointed) as it finishes."""
        scale = share.scale()
        try:
            for k in share.mine:
                batch = share.batches[k]
                self._run_rows([rows[i] for i in batch], state)
                state.done[batch] = True
                state.have[[n for i in batch for n, _, _ in rows[i].members]] = True
                if checkpoint is not None:
                    checkpoint.save(state)
                progress.advance(share.tokens[k] * scale)
        finally:  # finished or interrupted (Ctrl-C): what is done is kept
            if checkpoint is not None:
                checkpoint.save(state, force=True)

    def _start(self, rows: list[Row], shape: tuple[int, int], checkpoint: Checkpoint | None,
               tokens: int | None) -> PassState:
        """Where the pass starts (rank 0 decides): the merged partial files, or nothing done with
        a budget sized from free memory."""
        state = checkpoint.load(shape, len(rows), self.token_start, tokens) if checkpoint is not None else None
        if state is None:
            budget = self.batch_tokens or default_budget(self.model, len(self.layers), rows, compare=tokens is not None)
            state = PassState.empty(shape, len(rows), budget, tokens)
        return state

    def _part(self, state: PassState, rows: list[Row], batches: list[list[int]]) -> tuple:
        """What this rank computed: its rows, their requests and those requests' values."""
        done = sorted(i for batch in batches for i in batch)
        have = np.zeros(state.loglik.shape[1], dtype=bool)
        have[[n for i in done for n, _, _ in rows[i].members]] = True
        tokens = self._token_mask(state, have)
        compared = () if state.kl is None else (state.kl[:, have], state.agree[:, have], state.token_kl[:, tokens],
                                                state.token_agree[:, tokens])
        return done, have, tokens, state.loglik[:, have], state.greedy[:, have], compared

    def _token_mask(self, state: PassState, have: np.ndarray) -> np.ndarray | None:
        if state.token_kl is None:
            return None
        return compared_token_mask(self.token_start, have, state.token_kl.shape[1])

    @staticmethod
    def _merge(state: PassState, parts: list[tuple]) -> None:
        for done, have, tokens, loglik, greedy, compared in parts:
            state.done[done] = True
            state.have |= have
            state.loglik[:, have] = loglik
            state.greedy[:, have] = greedy
            if compared:
                kl, agree, token_kl, token_agree = compared
                state.kl[:, have], state.agree[:, have] = kl, agree
                state.token_kl[:, tokens], state.token_agree[:, tokens] = token_kl, token_agree

    # --- the plan ---------------------------------------------------------------------------

    def _agreed_plan(self, requests: Sequence[TokenRequest], max_length: int) -> tuple[list[Row], str, int]:
        """:meth:`_plan` on rank 0 (the sharing check runs once), the same rows everywhere."""
        if not world().parallel:
            return self._plan(requests, max_length)
        planned: list[Row] = []

        def decide() -> tuple[str, int, bool, str]:
            rows, sharing, checked = self._plan(requests, max_length)
            planned.extend(rows)
            return sharing, checked, any(r.shared for r in rows), plan_digest(rows)

        sharing, checked, shared, digest = on_main(decide)
        rows = planned or (self._shared_rows(requests, max_length) if shared else plan_rows(requests, max_length))
        if plan_digest(rows) != digest:
            raise RuntimeError(f"rank {world().rank} planned other model rows than rank 0 (different requests?)")
        return rows, sharing, checked

    def _shared_rows(self, requests: Sequence[TokenRequest], max_length: int) -> list[Row]:
        """The prefix-shared plan :meth:`_plan` checks (never across a sliding window)."""
        window, _ = attention_limit(self.model)
        return plan_rows(requests, max_length, share=True, window=window, row_tokens=self._row_tokens(max_length))

    def _row_tokens(self, max_length: int) -> int:
        return self.row_tokens or default_row_tokens(self.model, max_length)

    def _plan(self, requests: Sequence[TokenRequest], max_length: int) -> tuple[list[Row], str, int]:
        """Rows for the requests; shared where the model supports it and a check proves it exact.
        Also says why or why not, and how many tokens the check ran."""
        plain = plan_rows(requests, max_length)
        if not self.share:
            return plain, "off", 0
        reason = cannot_pack(self.model)
        if reason:
            return plain, f"off: {reason}", 0
        rows = self._shared_rows(requests, max_length)
        limited = self._window_note(rows)
        if not any(r.shared for r in rows):
            return plain, ("off" + limited) if limited else "nothing to share", 0
        return self._checked_plan(rows, plain, requests, max_length, limited)

    def _window_note(self, rows: list[Row]) -> str:
        """How many requests stay unshared because they are longer than the attention window."""
        window, name = attention_limit(self.model)
        longer = sum(len(r.members) for r in rows if r.own_mask) if window is not None else 0
        return (f"; {longer} requests longer than the {window}-token attention window ({name}) "
                "unshared: a custom mask would hide the window") if longer else ""

    def _checked_plan(self, rows: list[Row], plain: list[Row], requests: Sequence[TokenRequest], max_length: int,
                      limited: str) -> tuple[list[Row], str, int]:
        """The shared ``rows`` if they agree with unshared ones within tolerance, else ``plain``.

        float32: exact sharing agrees to ~1e-6. Half precision: allow a few times the rounding
        noise between two unshared computations of the same requests, one alone with the model's
        own causal mask, one batched through the explicit-mask attention path that shared rows
        take (on a GPU that changes the attention kernel, which in bf16 moves a deep model's
        log-likelihoods as much as sharing itself does).
        """
        # a quantized model's matmuls (8-bit outlier handling) depend on the batch: judged as half precision
        fp32 = next(self.model.parameters()).dtype == torch.float32 and quantized_mode(self.model) is None
        probes = probe_plan(rows, len(self.stack), self.variants)
        checked = check_tokens(probes, requests, max_length, noise=not fp32)
        try:
            worst, noise, count = self._check_sharing(probes, requests, max_length, noise=not fp32)
        except Exception as exc:  # a model whose forward rejects custom masks or position ids
            return plain, f"off: shared rows failed ({type(exc).__name__})", checked
        tol = 2e-5 if fp32 else max(0.02, 4 * noise)
        if worst > tol:
            return plain, f"off: shared rows differed by {worst:.3g} from unshared ones (tolerance {tol:.2g})", checked
        return rows, (f"on (checked on {count} requests in {len(probes)} rows: max |Δ| {worst:.2g}, "
                      f"tolerance {tol:.2g}){limited}"), checked

    def _check_sharing(self, probes: list[tuple[Row, list[int]]], requests: Sequence[TokenRequest],
                       max_length: int, noise: bool = False) -> tuple[float, float, int]:
        """Max |Δ log-likelihood| shared vs unshared, and (with ``noise``) unshared alone vs
        unshared batched through the explicit-mask path."""
        members = sorted({n for _, chosen in probes for n in chosen})
        shared, alone, together = (PassState.empty((1, len(requests)), 0, 0) for _ in range(3))
        for row, _ in probes:
            self._batch([row], shared, baseline_only=True)
        batched = plan_rows([requests[n] for n in members], max_length, prefixes=False)  # each alone
        for row in batched:
            row.members = [(members[i], *rest) for i, *rest in row.members]
            self._batch([row], alone, baseline_only=True)
        if noise:
            self._batch(batched, together, baseline_only=True, explicit_mask=True)
        worst = float(np.abs(shared.loglik[0, members] - alone.loglik[0, members]).max())
        spread = float(np.abs(together.loglik[0, members] - alone.loglik[0, members]).max()) if noise else 0.0
        return worst, spread, len(members)

    # --- one batch ---------------------------------------------------------------------------

    def _run_rows(self, rows: list[Row], state: PassState) -> None:
        try:
            self._batch(rows, state)
            return
        except torch.OutOfMemoryError:
            if len(rows) == 1:
                raise
        # Retry outside the handler: the failed batch's tensors (held by its traceback) are freed.
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        half = len(rows) // 2
        self._run_rows(rows[:half], state)
        self._run_rows(rows[half:], state)

    def _batch(self, rows: list[Row], state: PassState, baseline_only: bool = False,
               explicit_mask: bool = False) -> None:
        """Score ``rows`` for every variant into ``state`` (its rows: variants). With
        ``baseline_only``, only the full model, into row 0 (the packing check's reference);
        ``explicit_mask`` gives plain rows the 4D mask shared rows get (the check's noise)."""
        variants = [Removal()] if baseline_only else self.variants
        layers = [] if baseline_only else self.layers
        batch = self._inputs(rows, explicit_mask, None if baseline_only else self.token_start)
        kept, reference = self._full_pass(batch, variants, layers, state)
        for layer in layers:
            kept_state = kept.pop(layer)
            self._resume(batch, layer, kept_state, state, reference)
            del kept_state
        del reference

    def _inputs(self, rows: list[Row], explicit_mask: bool, token_start: np.ndarray | None) -> _Batch:
        """The batch on the model's device: ids, forward kwargs (a 4D mask and position ids for
        shared rows), the positions the head sees and where each scored token goes."""
        ids, gather = padded_ids(rows, self.pad_id)
        index = ScoredIndex.of(rows, self.device, token_start)
        ids, gather = ids.to(self.device), gather.to(self.device)
        kwargs: dict[str, Any] = dict(no_cache_kwargs(self.model))
        if explicit_mask or any(r.shared for r in rows):
            kwargs.update(shared_inputs(rows, ids.shape[1], self.model, self.device))
        return _Batch(ids, kwargs, gather, index)

    def _full_pass(self, batch: _Batch, variants: list[Removal], layers: list[int], state: PassState
                   ) -> tuple[dict[int, torch.Tensor], Reference | None]:
        """The full model over the batch, keeping the inputs of ``layers``: scored as the baseline
        when that is asked for, else stopped once the deepest kept input is taken. When the batch
        holds compared requests, the full model always runs to its logits and its distributions
        are kept (the :class:`~lnsdiag.scoring.divergence.Reference` the variants are compared with)."""
        kept: dict[int, torch.Tensor] = {}
        compare = batch.index.compared.size > 0 and state.kl is not None
        outside = compare and self.full_model_blocks is not None  # the model holds removals of its own
        scored = Removal() in variants
        stop_after = None if scored or (compare and not outside) or not layers else layers[-1]
        reference = None
        if outside:  # the real full model's distributions: its removals lifted for one forward
            with torch.no_grad(), removals_suspended(self.model):
                reference = reference_of(self._logits(batch))
        with torch.no_grad(), patched() as patches:
            for i in layers:
                patches.pre_hook(self.stack.layers[i], _keeper(i, kept, stop_after), with_kwargs=True)
            if stop_after is None:
                logits = self._logits(batch)
                reference = reference if outside else reference_of(logits) if compare else None
                if scored:
                    read_out(logits, batch.index, variants.index(Removal()), state, reference, is_full=not outside)
                del logits
            else:  # the baseline is already scored: run only as deep as the last kept input
                with suppress(_Captured):
                    self.model(input_ids=batch.ids, **batch.kwargs)
        return kept, reference

    def _resume(self, batch: _Batch, layer: int, kept: torch.Tensor, state: PassState,
                reference: Reference | None) -> None:
        """Every variant whose first removed unit is in block ``layer``, from the block's kept input:
        after the block when it is removed whole, else through it without the removed sub-layer;
        the variant's other removed units skipped."""
        for variant in self.resumes[layer]:
            with torch.no_grad(), self._resumed(variant, kept):
                logits = self._logits(batch)
            read_out(logits, batch.index, self.variants.index(variant), state, reference)
            del logits

    @contextmanager
    def _resumed(self, variant: Removal, kept: torch.Tensor) -> Iterator[None]:
        """The model as ``variant``, its blocks before the first removed unit's replaced by their
        output ``kept`` (block ``first``'s input)."""
        first = variant.first
        whole = isinstance(variant.units[0], Block)
        rest = variant.without_first() if whole else variant
        with ExitStack() as exits:
            if whole:
                exits.enter_context(resumed_at(self.model, first, kept, stack=self.stack))
            elif first > 0:  # block ``first`` runs, without its removed sub-layer, from ``kept``
                exits.enter_context(resumed_at(self.model, first - 1, kept, stack=self.stack))
            exits.enter_context(removed_layers(self.model, rest, mode="skip", stack=self.stack))
            yield

    def _logits(self, batch: _Batch) -> torch.Tensor:
        """The model's logits at the batch's scored positions only ([rows, slots, vocab])."""
        with head_at(self.model, batch.gather):
            return checked_logits(self.model(input_ids=batch.ids, **batch.kwargs).logits, batch.gather)


def _distinct_variants(variants: Sequence[Removal], n_layers: int) -> list[Removal]:
    """The variants as a list, each listed once and naming blocks of the stack."""
    out = list(variants)
    if len(set(out)) != len(out):
        raise ValueError("a variant is listed twice")
    for v in out:
        if v and (v.units[0].block < 0 or v.units[-1].block >= n_layers):
            raise ValueError(f"variant {v!r} does not name blocks of a {n_layers}-block stack")
    return out


def _resume_points(variants: Sequence[Removal]) -> dict[int, list[Removal]]:
    """Each variant under the block of its first removed unit, whose input it resumes from."""
    resumes: dict[int, list[Removal]] = {}
    for v in variants:
        if v:
            resumes.setdefault(v.first, []).append(v)
    return resumes


@dataclass
class _Share:
    """The pass's batches (the same cut on every run and rank of the same plan), their tokens,
    those not done yet (``todo``) and this process's share of them (``mine``)."""

    batches: list[list[int]]
    tokens: list[int]
    todo: list[int]
    mine: list[int]

    @classmethod
    def of(cls, rows: list[Row], state: PassState) -> _Share:
        batches = cut_batches(rows, state.budget)
        tokens = [sum(len(rows[i].ids) for i in batch) for batch in batches]
        todo = [k for k, batch in enumerate(batches) if not state.done[batch].all()]
        padded = [len(batches[k]) * max(len(rows[i].ids) for i in batches[k]) for k in todo]
        return cls(batches, tokens, todo, [todo[i] for i in my_share(padded)])

    @property
    def computed(self) -> int:
        """Tokens this pass computes (on all ranks together)."""
        return sum(self.tokens[k] for k in self.todo)

    def scale(self) -> float:
        """Progress per token of this process's share, so that its share counts the job's tokens."""
        return self.computed / max(1, sum(self.tokens[k] for k in self.mine)) if world().parallel else 1


@dataclass
class _Batch:
    """One batch on the model's device: input ids, forward kwargs, gathered positions, scoring index."""

    ids: torch.Tensor
    kwargs: dict[str, Any]
    gather: torch.Tensor
    index: ScoredIndex


class _Captured(Exception):
    """Stops a capture-only pass once the deepest needed block input is kept."""


def _keeper(layer: int, kept: dict[int, torch.Tensor], stop_after: int | None) -> Callable[..., None]:
    """A block pre-hook that keeps a copy of the block's input (and, at ``stop_after``, ends the pass)."""

    def hook(_module: Any, args: tuple, kwargs: dict) -> None:
        # a copy: a block that updates its input in place would otherwise change what is kept
        kept[layer] = block_input(args, kwargs).clone()
        if layer == stop_after:
            raise _Captured

    return hook
