"""The fast sweep engine: every variant's log-likelihoods from one pass over the requests.

Per batch, the full model runs once while the inputs x_i of the blocks to remove are kept;
variant i then resumes from x_i at block i+1 (``surgery.resumed_at``), so a sweep over all
L blocks costs L + L(L−1)/2 block passes instead of ≈ L². Every pass is the model's own
forward (masks, rotary embeddings, final norm and head included), so every family works.

Three more savings, all exact:
* requests whose model input is identical (the choices of a one-token multiple-choice
  question) share one row, as lm-eval's ``logits_cache`` does;
* the LM head runs only at the positions a request scores (a forward pre-hook gathers them),
  not at every position over the whole vocabulary;
* rows are sorted by length and packed by a token budget sized from free GPU memory; a batch
  that still runs out of memory is split and retried.

Log-probabilities are taken in float32 whatever the model's dtype.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import zipfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .progress import SILENT, Progress
from .runs import atomic_write
from .scoring import TokenRequest
from .structure import LayerStack, block_input, no_cache_kwargs, text_config
from .surgery import resumed_at


@dataclass
class _Row:
    """One model input and the requests it answers.

    A plain row is one request's input (shared by requests with identical inputs). A packed
    row holds a context once and each continuation after it as a segment that sees the
    context and itself only, with positions restarting after the context (``pos``), so each
    request's logits are those of its own unpacked input.
    """

    ids: tuple[int, ...]
    positions: set[int] = field(default_factory=set)
    members: list[tuple[int, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)  # (req, pos, targets)
    segments: list[tuple[int, int]] = field(default_factory=list)  # packed: (first position, length)

    @property
    def packed(self) -> bool:
        return bool(self.segments)

    @property
    def context_length(self) -> int:
        return self.segments[0][0] if self.segments else len(self.ids)

    def position_ids(self) -> list[int]:
        c = self.context_length
        out = list(range(c))
        for _, length in self.segments:
            out += range(c, c + length)
        return out


def _plain_input(req: TokenRequest, n: int, max_length: int) -> tuple[tuple[int, ...], int]:
    ids = (req.context + req.continuation)[-(max_length + 1):][:-1]
    start = len(ids) - len(req.continuation)
    if start < 0:
        raise ValueError(f"request {n}: continuation longer than the model's context ({max_length})")
    return ids, start


#: Contexts shorter than this are not worth a custom attention mask (a rolling window's BOS).
MIN_SHARED_CONTEXT = 4


def plan_rows(requests: Sequence[TokenRequest], max_length: int, pack: bool = False,
              window: int | None = None) -> list[_Row]:
    """Group requests into model rows and order them longest first (lm-eval's order).

    A request's input is ``(context + continuation)[-(max_length+1):][:-1]`` and it scores its
    continuation at the last ``len(continuation)`` positions, exactly as HFLM does. Identical
    inputs share a row (one-token choices of a question). With ``pack``, requests that share
    an untruncated context share one packed row (multi-token choices of a question); with a
    sliding ``window``, only requests that fit in it are packed (a packed row's custom mask
    replaces the model's window mask).
    """
    span = max_length + 1 if window is None else min(max_length + 1, window)
    by_input: dict[tuple[int, ...], _Row] = {}
    by_context: dict[tuple[int, ...], list[int]] = {}
    for n, req in enumerate(requests):
        if not req.continuation:  # nothing to score: the engine answers (0.0, True), as HFLM does
            continue
        ids, start = _plain_input(req, n, max_length)
        if pack and len(req.context) + len(req.continuation) <= span and len(req.context) >= MIN_SHARED_CONTEXT:
            by_context.setdefault(req.context, []).append(n)
            continue
        row = by_input.get(ids)
        if row is None:
            row = by_input[ids] = _Row(ids)
        row.members.append((n, tuple(range(start, start + len(req.continuation))), req.continuation))
        row.positions.update(range(start, len(ids)))
    rows = list(by_input.values())
    for context, members in by_context.items():
        rows += _packed_rows(context, [(n, requests[n].continuation) for n in members], max_length)
    return sorted(rows, key=lambda r: (-len(r.ids), r.ids))


def _packed_rows(context: tuple[int, ...], members: list[tuple[int, tuple[int, ...]]], max_length: int) -> list[_Row]:
    """Context once, then one segment per distinct ``continuation[:-1]``; split if too long."""
    c = len(context)
    segments: dict[tuple[int, ...], list[tuple[int, tuple[int, ...]]]] = {}
    for n, cont in members:
        segments.setdefault(cont[:-1], []).append((n, cont))
    if len(segments) < 2:  # nothing to share beyond what identical inputs already share
        (seg, group), = segments.items()
        row = _Row(context + seg)
        for n, cont in group:
            row.members.append((n, tuple(range(c - 1, c - 1 + len(cont))), cont))
        row.positions.update(range(c - 1, len(row.ids)))
        return [row]
    rows: list[_Row] = []
    row = _Row(context)
    for seg, group in sorted(segments.items(), key=lambda kv: (len(kv[0]), kv[0])):
        if row.segments and len(row.ids) + len(seg) > max(max_length, c + len(seg)):
            rows.append(row)
            row = _Row(context)
        first = len(row.ids)
        if seg:
            row.segments.append((first, len(seg)))
            row.ids = row.ids + seg
        for n, cont in group:
            # target 0 is predicted at the context's last token, target j at the segment's (j-1)-th
            positions = (c - 1, *range(first, first + len(cont) - 1))
            row.members.append((n, positions, cont))
            row.positions.update(positions)
    rows.append(row)
    for r in rows:
        if len(r.segments) == 1:  # a context and one segment right after it: the plain input
            r.segments = []
    return rows


def _batches(rows: list[_Row], budget: int, max_rows: int = 512) -> list[list[int]]:
    """Consecutive row indices whose padded size (rows × longest) stays within ``budget`` tokens."""
    out: list[list[int]] = []
    current: list[int] = []
    width = 0
    for i, row in enumerate(rows):
        w = max(width, len(row.ids))
        if current and (w * (len(current) + 1) > budget or len(current) >= max_rows):
            out.append(current)
            current, w = [], len(row.ids)
        current.append(i)
        width = w
    if current:
        out.append(current)
    return out


@contextmanager
def head_at(model: torch.nn.Module, index: torch.Tensor) -> Iterator[None]:
    """Make the LM head see only the hidden states at ``index`` ([batch, k] positions).

    Whatever the model does after its head (Gemma's logit soft-capping...) still applies; the
    logits come back as [batch, k, vocab].
    """
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings (LM head)")

    def gather(_module: Any, args: tuple) -> tuple:
        hidden = args[0]
        idx = index.to(hidden.device)
        picked = hidden.gather(1, idx.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
        return (picked, *args[1:])

    handle = head.register_forward_pre_hook(gather)
    try:
        yield
    finally:
        handle.remove()


@dataclass
class EngineResult:
    """``loglik[v, n]`` and ``greedy[v, n]`` for variant v (see ``variants``) and request n."""

    variants: list[int | None]
    loglik: np.ndarray
    greedy: np.ndarray

    def of(self, variant: int | None) -> tuple[np.ndarray, np.ndarray]:
        v = self.variants.index(variant)
        return self.loglik[v], self.greedy[v]


@dataclass
class _Progress:
    """What a checkpoint holds: results so far, which rows are done, and the batch budget
    (kept so a resumed pass cuts the same batches and gives bitwise the same numbers)."""

    loglik: np.ndarray
    greedy: np.ndarray
    done: np.ndarray
    budget: int


def _variant_codes(variants: Sequence[int | None]) -> np.ndarray:
    return np.array([-1 if v is None else v for v in variants], dtype=np.int64)


class Checkpoint:
    """Partial engine results on disk, so an interrupted sweep resumes mid-pass.

    Saved atomically at most every ``every_seconds`` (``LNSDIAG_CHECKPOINT_SECONDS``, default
    60) and when the pass is interrupted: a killed run loses at most that much work. It is
    only used again for the same requests (``fingerprint``), variants and row plan.
    """

    def __init__(self, path: Path, fingerprint: str, every_seconds: float | None = None) -> None:
        if every_seconds is None:
            every_seconds = float(os.environ.get("LNSDIAG_CHECKPOINT_SECONDS", 60))
        self.path, self.fingerprint, self.every = Path(path), fingerprint, every_seconds
        self._last = time.monotonic()
        self.variants: list[int | None] = []
        self.plan = ""

    def stored_variants(self) -> list[int | None] | None:
        """The variants of a matching checkpoint on disk (to finish that pass), if any."""
        data = self._read()
        if data is None:
            return None
        return [None if int(v) < 0 else int(v) for v in data["variants"]]

    def _read(self) -> dict[str, np.ndarray] | None:
        try:
            with np.load(self.path, allow_pickle=False) as data:
                if str(data["fingerprint"]) != self.fingerprint:
                    return None
                return {key: data[key].copy() for key in data.files}
        except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):
            return None  # missing, foreign or damaged: start the pass over

    def load(self, shape: tuple[int, int], rows: int) -> _Progress | None:
        data = self._read()
        if data is None or data["loglik"].shape != shape or data["done"].shape != (rows,):
            return None
        if not np.array_equal(data["variants"], _variant_codes(self.variants)) or str(data["plan"]) != self.plan:
            return None
        return _Progress(data["loglik"], data["greedy"], data["done"], int(data["budget"]))

    def save(self, state: _Progress, force: bool = False) -> None:
        if not force and time.monotonic() - self._last < self.every:
            return
        import io

        buf = io.BytesIO()
        np.savez(buf, fingerprint=np.array(self.fingerprint), loglik=state.loglik, greedy=state.greedy,
                 done=state.done, budget=np.array(state.budget), variants=_variant_codes(self.variants),
                 plan=np.array(self.plan))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path, buf.getvalue())
        self._last = time.monotonic()


def plan_digest(rows: Sequence[_Row]) -> str:
    """Identifies a row plan (inputs, packing, members), so a checkpoint's ``done`` matches it."""
    digest = hashlib.sha256()
    for row in rows:
        digest.update(np.asarray(row.ids, dtype=np.int64).tobytes())
        digest.update(repr((row.segments, [(n, p) for n, p, _ in row.members])).encode())
    return digest.hexdigest()[:32]


def fingerprint(requests: Sequence[TokenRequest], max_length: int, extra: dict[str, Any] | None = None) -> str:
    """Identifies what a pass scores: the token requests, the context length, the settings."""
    digest = hashlib.sha256()
    digest.update(json.dumps({"max_length": max_length, **(extra or {})}, sort_keys=True, default=str).encode())
    for req in requests:
        digest.update(np.asarray(req.context, dtype=np.int64).tobytes())
        digest.update(b"|")
        digest.update(np.asarray(req.continuation, dtype=np.int64).tobytes())
        digest.update(b";")
    return digest.hexdigest()[:32]


def default_budget(model: torch.nn.Module, stack: LayerStack, kept_states: int, rows: Sequence[_Row]) -> int:
    """Tokens per batch that fit the free memory of the model's device (CPU: 8192).

    Per token: the kept block inputs (copies), a forward's working set, the logits of the
    scored positions (model dtype plus float32 for the log-sum-exp), and for packed rows the
    row's share of its boolean attention mask.
    """
    device = model.get_input_embeddings().weight.device
    if device.type != "cuda":
        return 8192
    free, _ = torch.cuda.mem_get_info(device)
    config = text_config(model)
    hidden = int(getattr(config, "hidden_size", 4096))
    inter = int(getattr(config, "intermediate_size", 4 * hidden) or 4 * hidden)
    vocab = int(getattr(config, "vocab_size", 32000))
    elem = next(model.parameters()).element_size()
    tokens = max(1, sum(len(r.ids) for r in rows))
    scored = sum(len(r.positions) for r in rows) / tokens
    widest = max((len(r.ids) for r in rows if r.packed), default=0)
    per_token = (kept_states + 1) * hidden * elem + (12 * hidden + 3 * inter) * elem
    per_token += scored * vocab * (elem + 8) + widest
    return int(max(512, min(131_072, 0.6 * free / per_token)))


def _cannot_pack(model: torch.nn.Module) -> str:
    """Why packed rows (custom 4D mask + position ids) cannot be used on this model, if so."""
    import inspect

    impl = getattr(model.config, "_attn_implementation", "sdpa")
    if impl not in ("sdpa", "eager"):
        return f"{impl} attention takes no custom masks"
    config = text_config(model)
    if getattr(config, "alibi", False) or getattr(config, "model_type", "") in ("bloom", "mpt"):
        return "ALiBi positions ignore position ids"
    try:
        if "position_ids" not in inspect.signature(model.forward).parameters:
            return "the model's forward takes no position ids"
    except (TypeError, ValueError):
        return "the model's forward cannot be inspected"
    return ""


#: The progress phase of an engine pass (counted in tokens).
PASS_PHASE = "one pass, all variants"


class SweepEngine:
    """Log-likelihoods of the full model and of each one-block-removed variant, in one pass."""

    def __init__(self, model: torch.nn.Module, stack: LayerStack, variants: Sequence[int | None], *,
                 batch_tokens: int | None = None, pad_id: int = 0, pack: bool = True) -> None:
        self.model, self.stack = model, stack
        self.variants = list(variants)
        self.layers = sorted(v for v in self.variants if v is not None)
        self.batch_tokens = batch_tokens
        self.pad_id = pad_id
        self.device = model.get_input_embeddings().weight.device
        self.pack = pack
        self.stats: dict[str, Any] = {}

    def layer_passes(self, rows: int = 1) -> int:
        """Block passes per row: the baseline (or up to the deepest kept input) plus each resume."""
        L = len(self.stack)
        base = L if None in self.variants or not self.layers else self.layers[-1]
        return rows * (base + sum(L - i - 1 for i in self.layers))

    def run(self, requests: Sequence[TokenRequest], max_length: int, *, progress: Progress = SILENT,
            checkpoint: Checkpoint | None = None) -> EngineResult:
        """Every variant's log-likelihood and greedy flag for every request; progress counts tokens."""
        rows, packing = self._plan(requests, max_length)
        n_var, n_req = len(self.variants), len(requests)
        state = None
        if checkpoint is not None:
            checkpoint.variants, checkpoint.plan = self.variants, plan_digest(rows)
            state = checkpoint.load((n_var, n_req), len(rows))
        if state is None:
            budget = self.batch_tokens or default_budget(self.model, self.stack, len(self.layers), rows)
            state = _Progress(np.zeros((n_var, n_req)), np.zeros((n_var, n_req), dtype=bool),
                              np.zeros(len(rows), dtype=bool), budget)
            empty = [n for n, r in enumerate(requests) if not r.continuation]
            state.greedy[:, empty] = True  # an empty continuation: log-likelihood 0, trivially greedy
        total = sum(len(r.ids) for r in rows)
        self.stats = {"requests": n_req, "rows": len(rows), "packed_rows": sum(r.packed for r in rows),
                      "budget": state.budget, "tokens": total, "packing": packing,
                      "unshared_tokens": _unshared_tokens(requests, max_length)}
        progress.phase(PASS_PHASE, total=total)
        progress.advance(sum(len(r.ids) for r, d in zip(rows, state.done, strict=True) if d))
        try:
            for batch in _batches(rows, state.budget):  # the same cut on every run of the same plan
                if state.done[batch].all():
                    continue
                self._run_rows([rows[i] for i in batch], state.loglik, state.greedy)
                state.done[batch] = True
                if checkpoint is not None:
                    checkpoint.save(state)
                progress.advance(sum(len(rows[i].ids) for i in batch))
        finally:  # finished or interrupted (Ctrl-C): what is done is kept
            if checkpoint is not None:
                checkpoint.save(state, force=True)
        return EngineResult(self.variants, state.loglik, state.greedy)

    def _plan(self, requests: Sequence[TokenRequest], max_length: int) -> tuple[list[_Row], str]:
        """Rows for the requests; packed where the model supports it and a check proves it exact."""
        plain = plan_rows(requests, max_length)
        if not self.pack:
            return plain, "off"
        reason = _cannot_pack(self.model)
        if reason:
            return plain, f"off: {reason}"
        rows = plan_rows(requests, max_length, pack=True, window=_sliding_window(self.model))
        packed = [r for r in rows if r.packed]
        if not packed:
            return plain, "nothing to pack"
        probes = {id(r): r for r in (max(packed, key=lambda r: (len(r.segments), -len(r.ids))),  # most segments
                                     max(packed, key=lambda r: len(r.ids)))}.values()  # and the longest
        try:
            worst, noise, count = self._check_packing(list(probes), requests, max_length)
        except Exception as exc:  # a model whose forward rejects custom masks or position ids
            return plain, f"off: packed rows failed ({type(exc).__name__})"
        # float32: exact packing agrees to ~1e-6. Half precision: allow a few times the rounding
        # noise measured between two unpacked computations of the same requests.
        fp32 = next(self.model.parameters()).dtype == torch.float32
        tol = 2e-5 if fp32 else max(0.02, 4 * noise)
        if worst > tol:
            return plain, f"off: packed rows differed by {worst:.3g} from unpacked ones (tolerance {tol:.2g})"
        return rows, f"on (checked on {count} requests: max |Δ| {worst:.2g}, tolerance {tol:.2g})"

    def _check_packing(self, probes: list[_Row], requests: Sequence[TokenRequest], max_length: int
                       ) -> tuple[float, float, int]:
        """Max |Δ log-likelihood| packed vs unpacked, and unpacked alone vs unpacked batched."""
        members = sorted({n for row in probes for n, _, _ in row.members})
        flags = np.zeros((1, len(requests)), dtype=bool)
        packed, alone, together = (np.zeros((1, len(requests))) for _ in range(3))
        for row in probes:
            self._batch([row], packed, flags, baseline_only=True)
        for n in members:
            (row,) = plan_rows([requests[n]], max_length)
            row.members = [(n, *row.members[0][1:])]
            self._batch([row], alone, flags, baseline_only=True)
        batched = plan_rows([requests[n] for n in members], max_length)
        for row in batched:
            row.members = [(members[i], *rest) for i, *rest in row.members]
        self._batch(batched, together, flags, baseline_only=True)
        worst = float(np.abs(packed[0, members] - alone[0, members]).max())
        noise = float(np.abs(together[0, members] - alone[0, members]).max())
        return worst, noise, len(members)

    # --- one batch ------------------------------------------------------------------------

    def _run_rows(self, rows: list[_Row], loglik: np.ndarray, greedy: np.ndarray) -> None:
        try:
            self._batch(rows, loglik, greedy)
            return
        except torch.OutOfMemoryError:
            if len(rows) == 1:
                raise
        # Retry outside the handler: the failed batch's tensors (held by its traceback) are freed.
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        half = len(rows) // 2
        self._run_rows(rows[:half], loglik, greedy)
        self._run_rows(rows[half:], loglik, greedy)

    def _batch(self, rows: list[_Row], loglik: np.ndarray, greedy: np.ndarray, baseline_only: bool = False) -> None:
        """Score ``rows`` for every variant into ``loglik``/``greedy`` (rows: variants). With
        ``baseline_only``, only the full model, into row 0 (the packing check's reference)."""
        variants = [None] if baseline_only else self.variants
        layers = [] if baseline_only else self.layers
        width = max(len(r.ids) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        slots = max(len(r.positions) for r in rows)
        gather = torch.zeros((len(rows), slots), dtype=torch.long)
        row_idx, slot_idx, targets, member = [], [], [], []
        requests: list[int] = []
        for b, row in enumerate(rows):
            ids[b, : len(row.ids)] = torch.tensor(row.ids, dtype=torch.long)
            positions = sorted(row.positions)
            gather[b, : len(positions)] = torch.tensor(positions, dtype=torch.long)
            gather[b, len(positions):] = positions[-1]
            slot_of = {p: k for k, p in enumerate(positions)}
            for n, at, cont in row.members:
                m = len(requests)
                requests.append(n)
                for pos, tok in zip(at, cont, strict=True):
                    row_idx.append(b)
                    slot_idx.append(slot_of[pos])
                    targets.append(tok)
                    member.append(m)
        dev = self.device
        index = _Index(torch.tensor(row_idx, device=dev), torch.tensor(slot_idx, device=dev),
                       torch.tensor(targets, device=dev), torch.tensor(member, device=dev), len(requests),
                       np.asarray(requests))
        ids, gather = ids.to(dev), gather.to(dev)
        kwargs: dict[str, Any] = dict(no_cache_kwargs(self.model))
        if any(r.packed for r in rows):
            kwargs.update(_packed_inputs(rows, width, self.model, dev))
        kept: dict[int, torch.Tensor] = {}
        stop_after = None if None in variants or not layers else layers[-1]
        hooks = [self.stack.layers[i].register_forward_pre_hook(_keeper(i, kept, stop_after), with_kwargs=True)
                 for i in layers]
        try:
            with torch.no_grad(), head_at(self.model, gather):
                if stop_after is None:
                    logits = _checked(self.model(input_ids=ids, **kwargs).logits, gather)
                    self._score(logits, index, variants.index(None), loglik, greedy)
                    del logits
                else:  # the baseline is already scored: run only as deep as the last kept input
                    with suppress(_Captured):
                        self.model(input_ids=ids, **kwargs)
        finally:
            for h in hooks:
                h.remove()
        for layer in layers:
            state = kept.pop(layer)
            with torch.no_grad(), resumed_at(self.model, layer, state, stack=self.stack), \
                    head_at(self.model, gather):
                logits = _checked(self.model(input_ids=ids, **kwargs).logits, gather)
            self._score(logits, index, variants.index(layer), loglik, greedy)
            del logits, state

    @staticmethod
    def _score(logits: torch.Tensor, index: _Index, v: int, loglik: np.ndarray, greedy: np.ndarray) -> None:
        """Sum each request's float32 log-probs (logit − logsumexp: the full log-softmax is never
        written out); greedy if every target is the argmax."""
        rows, slots, vocab = logits.shape
        sums = torch.zeros(index.members, dtype=torch.float64, device=logits.device)
        misses = torch.zeros(index.members, dtype=torch.int32, device=logits.device)
        step = max(1, (1 << 27) // max(1, slots * vocab))  # ≤ 512 MiB of float32 at a time
        for r0 in range(0, rows, step):
            sel = (index.row >= r0) & (index.row < r0 + step)
            if not bool(sel.any()):
                continue
            chunk = logits[r0:r0 + step].float()
            norm = torch.logsumexp(chunk, dim=-1)
            r, k, t, m = index.row[sel] - r0, index.slot[sel], index.target[sel], index.member[sel]
            sums.index_add_(0, m, (chunk[r, k, t] - norm[r, k]).double())
            misses.index_add_(0, m, (chunk[r, k].argmax(dim=-1) != t).int())
            del chunk, norm
        loglik[v, index.requests] = sums.cpu().numpy()
        greedy[v, index.requests] = (misses == 0).cpu().numpy()


def _sliding_window(model: torch.nn.Module) -> int | None:
    config = text_config(model)
    if getattr(config, "use_sliding_window", True) is False:
        return None
    window = getattr(config, "sliding_window", None)
    return int(window) if isinstance(window, int) and window > 0 else None


def _unshared_tokens(requests: Sequence[TokenRequest], max_length: int) -> int:
    """Tokens HFLM would feed for these requests (one row per request), for the stats."""
    return sum(min(len(r.context) + len(r.continuation), max_length + 1) - 1 for r in requests)


def _packed_inputs(rows: list[_Row], width: int, model: torch.nn.Module, device: torch.device) -> dict[str, Any]:
    """A 4D attention mask and position ids for a batch holding packed rows.

    Plain rows get the ordinary causal mask. Padding positions see token 0 only (a fully
    masked row would give NaNs); no real token ever sees padding.
    """
    allow = torch.zeros((len(rows), width, width), dtype=torch.bool)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    for b, row in enumerate(rows):
        n, c = len(row.ids), row.context_length
        allow[b, :c, :c] = torch.ones(c, c, dtype=torch.bool).tril()
        for first, length in row.segments:
            allow[b, first:first + length, :c] = True
            allow[b, first:first + length, first:first + length] = torch.ones(length, length, dtype=torch.bool).tril()
        allow[b, n:, 0] = True
        pos[b, :n] = torch.tensor(row.position_ids(), dtype=torch.long)
    mask = allow.unsqueeze(1).to(device)
    if getattr(model.config, "_attn_implementation", "sdpa") == "eager":
        dtype = next(model.parameters()).dtype
        mask = torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(~mask, torch.finfo(dtype).min)
    return {"attention_mask": mask, "position_ids": pos.to(device)}


def _checked(logits: torch.Tensor, gather: torch.Tensor) -> torch.Tensor:
    """The head must have seen only the gathered positions (a model that computes its logits
    without calling its output-embedding module would silently misalign them)."""
    if tuple(logits.shape[:2]) != tuple(gather.shape):
        raise RuntimeError(
            f"the LM head returned logits of shape {tuple(logits.shape)}, not one per gathered position "
            f"{tuple(gather.shape)}: this model computes logits without its output-embedding module; "
            "use --engine naive")
    return logits


class _Captured(Exception):
    """Stops a capture-only pass once the deepest needed block input is kept."""


def _keeper(layer: int, kept: dict[int, torch.Tensor], stop_after: int | None) -> Callable[..., None]:
    def hook(_module: Any, args: tuple, kwargs: dict) -> None:
        # a copy: a block that updates its input in place would otherwise change what is kept
        kept[layer] = block_input(args, kwargs).clone()
        if layer == stop_after:
            raise _Captured

    return hook


@dataclass
class _Index:
    """Flattened (row, slot, target token, request) of every scored position in a batch."""

    row: torch.Tensor
    slot: torch.Tensor
    target: torch.Tensor
    member: torch.Tensor
    members: int
    requests: np.ndarray
