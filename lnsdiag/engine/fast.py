"""The fast sweep engine: every variant's log-likelihoods from one pass over the requests.

Per batch, the full model runs once while the inputs x_i of the blocks to remove are kept;
variant i then resumes from x_i at block i+1 (``surgery.resumed_at``), so a sweep over all
L blocks costs L + L(L−1)/2 block passes instead of ≈ L². A variant may remove several blocks
(a tuple, as ``shrink`` scores): it resumes from the input of its first removed block and skips
the others, so every candidate sharing a kept prefix reuses it. Every pass is the model's own
forward (masks, rotary embeddings, final norm and head included), so every family works.

Three more savings, all exact:
* requests share their common leading tokens (prefix sharing): the inputs are sorted into a
  trie and cut into rows; a row holds each shared prefix once and every request's remaining
  tokens as a branch that attends to its ancestors and itself only, positions continuing from
  the branch point (:class:`_Row`). A 5-shot MMLU subject's description and dev examples are
  computed once per row, a question's context once for its choices; identical inputs (one-token
  choices) share one branch, as lm-eval's ``logits_cache`` does. It is switched on only after
  a run-time check against unshared rows, and never across a sliding window;
* the LM head runs only at the positions a request scores (a forward pre-hook gathers them),
  not at every position over the whole vocabulary;
* rows are sorted by length and packed by a token budget sized from free GPU memory; a batch
  that still runs out of memory is split and retried.

The work done is counted (:func:`count_work`): block-token passes of this engine and of the
naive one (lm-eval's HFLM per variant) for the same variants.

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

from ..distributed import all_gather, my_share, on_main, world
from ..interventions.removal import removed_layers, resumed_at
from ..model.structure import LayerStack, block_input, no_cache_kwargs, text_config
from ..progress import SILENT, Progress
from ..runs import atomic_write
from ..scoring.base import TokenRequest

#: A model variant: ``None`` (the full model), one removed block, or a tuple of removed blocks.
Variant = int | tuple[int, ...] | None


def removal_set(variant: Variant) -> tuple[int, ...]:
    """The 0-based blocks a variant removes, ascending (``()`` for the full model)."""
    if variant is None:
        return ()
    if isinstance(variant, int):
        return (variant,)
    return tuple(sorted(int(i) for i in variant))


@dataclass
class _Row:
    """One model input and the requests it answers.

    A plain row is one token sequence (requests with identical inputs share it). A shared row
    lays out a trie of several requests' inputs depth first: each distinct prefix once, then
    each branch as a ``run`` of tokens that attends to its ancestors and to itself (causally)
    only, with position ids continuing from its branch point. Every request therefore sees
    exactly its own unshared input: a context with its choices is the two-level case, a
    few-shot prefix with many questions after it the general one.
    """

    ids: tuple[int, ...]
    positions: set[int] = field(default_factory=set)
    members: list[tuple[int, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)  # (req, pos, targets)
    runs: list[tuple[int, int, int]] = field(default_factory=list)  # shared: (first, length, parent token or -1)
    own_mask: bool = False  # must run with the model's own mask (longer than a sliding window)

    @property
    def shared(self) -> bool:
        return bool(self.runs)

    def position_ids(self) -> list[int]:
        """Each token's depth in its request's input (for a plain row: 0, 1, 2, ...)."""
        if not self.runs:
            return list(range(len(self.ids)))
        out = [0] * len(self.ids)
        for first, length, parent in self.runs:
            start = out[parent] + 1 if parent >= 0 else 0
            out[first:first + length] = range(start, start + length)
        return out


def _plain_input(req: TokenRequest, n: int, max_length: int) -> tuple[tuple[int, ...], int]:
    ids = (req.context + req.continuation)[-(max_length + 1):][:-1]
    start = len(ids) - len(req.continuation)
    if start < 0:
        raise ValueError(f"request {n}: continuation longer than the model's context ({max_length})")
    return ids, start


#: Requests sharing fewer leading tokens than this are not worth a custom attention mask
#: (rolling windows share one BOS).
MIN_SHARED_CONTEXT = 4


def plan_rows(requests: Sequence[TokenRequest], max_length: int, share: bool = False,
              window: int | None = None, row_tokens: int | None = None) -> list[_Row]:
    """Group requests into model rows, longest first (lm-eval's order).

    A request's input is ``(context + continuation)[-(max_length+1):][:-1]`` and it scores its
    continuation at the last ``len(continuation)`` positions, exactly as HFLM does. Identical
    inputs always share a row (one-token choices of a question). With ``share``, inputs that
    begin with the same tokens share shared rows of at most ``row_tokens`` tokens (default
    ``max_length``), chosen to hold as few tokens as possible (:func:`_cut_rows`). With a
    sliding ``window``, inputs longer than it stay plain rows on the model's own mask.
    """
    by_input: dict[tuple[int, ...], list[tuple[int, int, tuple[int, ...]]]] = {}
    for n, req in enumerate(requests):
        if not req.continuation:  # nothing to score: the engine answers (0.0, True), as HFLM does
            continue
        ids, start = _plain_input(req, n, max_length)
        by_input.setdefault(ids, []).append((n, start, req.continuation))
    inputs = sorted(by_input)  # lexicographic: inputs with a common prefix are neighbours
    rows: list[_Row] = []
    budget = max_length if row_tokens is None else row_tokens
    fits = [share and (window is None or len(ids) <= window) for ids in inputs]
    group: list[tuple[int, ...]] = []
    for k, ids in enumerate(inputs + [()]):
        joins = k < len(inputs) and fits[k] and bool(group) and fits[k - 1] and \
            _common(group[-1], ids) >= MIN_SHARED_CONTEXT
        if not joins and group:
            rows += [_build_row(part, by_input) for part in _cut_rows(group, budget)]
            group = []
        group.append(ids)
    for row in rows:
        row.own_mask = window is not None and not row.shared and len(row.ids) > window
    return sorted(rows, key=lambda r: (not r.own_mask, -len(r.ids), r.ids))


def _common(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the common prefix of ``a`` and ``b``."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _cut_rows(inputs: list[tuple[int, ...]], budget: int) -> list[list[tuple[int, ...]]]:
    """Split sorted inputs into consecutive rows of at most ``budget`` distinct tokens, with the
    fewest tokens in all (then the fewest rows).

    In sorted order an input's longest common prefix with any earlier one is the one with its
    predecessor, so a row of inputs i..j-1 holds ``len(i) + Σ (len(k) − common(k−1, k))``
    tokens; a cut before k costs ``common(k−1, k)`` repeated tokens. Dynamic programming over
    the cut points (an input longer than the budget gets a row of its own).
    """
    n = len(inputs)
    common = [0] + [_common(inputs[k - 1], inputs[k]) for k in range(1, n)]
    added = [0]
    for k in range(n):
        added.append(added[-1] + len(inputs[k]) - common[k])
    best: list[tuple[int, int]] = [(0, 0)] + [(0, 0)] * n
    start = [0] * (n + 1)
    for j in range(1, n + 1):
        choice = None
        for i in range(j - 1, -1, -1):
            size = added[j] - added[i] + common[i]
            if j - i > 1 and size > budget:
                break  # sizes only grow as the row starts earlier
            cost = (best[i][0] + size, best[i][1] + 1)
            if choice is None or cost < choice[0]:
                choice = (cost, i)
        best[j], start[j] = choice  # type: ignore[misc]
    parts: list[list[tuple[int, ...]]] = []
    j = n
    while j > 0:
        parts.append(inputs[start[j]:j])
        j = start[j]
    return parts[::-1]


def _build_row(inputs: list[tuple[int, ...]], by_input: dict) -> _Row:
    """Lay out sorted ``inputs`` depth first; a single path (one input, or inputs that are
    prefixes of the last) is a plain row."""
    ids: list[int] = []
    runs: list[list[int]] = []
    path: list[int] = []  # row index of each token of the previous input
    placed: list[tuple[tuple[int, ...], list[int]]] = []
    for ids_k in inputs:
        shared = _common(ids_k[:len(path)], [ids[p] for p in path]) if path else 0
        new = ids_k[shared:]
        parent = path[shared - 1] if shared else -1
        first = len(ids)
        if new:
            if runs and parent == first - 1 and parent >= 0:
                runs[-1][1] += len(new)  # continues the previous run: no branch
            else:
                runs.append([first, len(new), parent])
            ids += new
        path = path[:shared] + list(range(first, first + len(new)))
        placed.append((ids_k, list(path)))
    row = _Row(tuple(ids))
    if len(runs) > 1:
        row.runs = [(a, b, c) for a, b, c in runs]
    for ids_k, where in placed:
        for n, start, cont in by_input[ids_k]:
            at = tuple(where[start:start + len(cont)])
            row.members.append((n, at, cont))
            row.positions.update(at)
    return row


def _batches(rows: list[_Row], budget: int, max_rows: int = 512) -> list[list[int]]:
    """Consecutive row indices whose padded size (rows × longest) stays within ``budget`` tokens.

    A row that needs the model's own mask (beyond a sliding window) never shares a batch with
    a shared row, whose batch gets a custom mask."""
    out: list[list[int]] = []
    current: list[int] = []
    width = 0
    for i, row in enumerate(rows):
        w = max(width, len(row.ids))
        if current and (w * (len(current) + 1) > budget or len(current) >= max_rows
                        or row.own_mask != rows[current[-1]].own_mask):
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

    variants: list[Variant]
    loglik: np.ndarray
    greedy: np.ndarray

    def of(self, variant: Variant) -> tuple[np.ndarray, np.ndarray]:
        v = self.variants.index(variant)
        return self.loglik[v], self.greedy[v]


@dataclass
class _Progress:
    """What a checkpoint holds: results so far, which rows are done, and the batch budget
    (kept so a resumed pass cuts the same batches and gives bitwise the same numbers).
    ``have`` marks the requests whose values are present (those of done rows): under a
    launcher each rank's file holds its own rows, and files are merged by it."""

    loglik: np.ndarray
    greedy: np.ndarray
    done: np.ndarray
    budget: int
    have: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.have is None:
            self.have = np.zeros(self.loglik.shape[1], dtype=bool)


def _variant_codes(variants: Sequence[Variant]) -> np.ndarray:
    """Variants as stored in a checkpoint: JSON (``null``, a block, or a list of blocks)."""
    return np.array(json.dumps([v if v is None or isinstance(v, int) else list(v) for v in variants]))


def _variants_from_codes(codes: np.ndarray) -> list[Variant]:
    return [tuple(v) if isinstance(v, list) else v for v in json.loads(str(codes))]


class Checkpoint:
    """Partial engine results on disk, so an interrupted sweep resumes mid-pass.

    Saved atomically at most every ``every_seconds`` (``LNSDIAG_CHECKPOINT_SECONDS``, default
    60) and when the pass is interrupted: a killed run loses at most that much work. It is
    only used again for the same requests (``fingerprint``), variants and row plan.

    Under a launcher each rank writes its own file beside ``path`` (``engine-partial.rank-003.npz``)
    and a pass starts from all matching files merged, whatever number of ranks wrote them.
    """

    def __init__(self, path: Path, fingerprint: str, every_seconds: float | None = None) -> None:
        if every_seconds is None:
            every_seconds = float(os.environ.get("LNSDIAG_CHECKPOINT_SECONDS", 60))
        self.path, self.fingerprint, self.every = Path(path), fingerprint, every_seconds
        here = world()
        #: the file this process writes
        self.own = self.path.with_name(f"{self.path.stem}.rank-{here.rank:03d}{self.path.suffix}") \
            if here.parallel else self.path
        self._last = time.monotonic()
        self.variants: list[Variant] = []
        self.plan = ""

    def files(self) -> list[Path]:
        """Every partial file of this pass's folder: a single process's and each rank's."""
        from ..results.store import partial_files

        return partial_files(self.path)

    def stored_variants(self) -> list[Variant] | None:
        """The variants of a matching checkpoint on disk (to finish that pass), if any; rank 0
        reads, every rank gets its answer."""
        return on_main(self._stored_variants)

    def _stored_variants(self) -> list[Variant] | None:
        for path in self.files():
            data = self._read(path)
            if data is None:
                continue
            try:
                return _variants_from_codes(data["variants"])
            except (ValueError, TypeError):
                continue  # a checkpoint of an older format: start the pass over
        return None

    def _read(self, path: Path) -> dict[str, np.ndarray] | None:
        try:
            with np.load(path, allow_pickle=False) as data:
                if str(data["fingerprint"]) != self.fingerprint:
                    return None
                return {key: data[key].copy() for key in data.files}
        except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):
            return None  # missing, foreign or damaged: start the pass over

    def load(self, shape: tuple[int, int], rows: int) -> _Progress | None:
        """Every matching partial file merged (done rows, and their requests' values), or None.

        Files of another batch budget are left out: their batches were cut differently. A file
        without ``have`` (one process, older lnsdiag) holds every value it has, so it goes first.
        """
        found = []
        for path in self.files():
            data = self._read(path)
            if data is None or data["loglik"].shape != shape or data["done"].shape != (rows,):
                continue
            if str(data["variants"]) != str(_variant_codes(self.variants)) or str(data["plan"]) != self.plan:
                continue
            found.append(data)
        if not found:
            return None
        found.sort(key=lambda d: "have" in d)
        budget = int(found[0]["budget"])
        state = _Progress(np.zeros(shape), np.zeros(shape, dtype=bool), np.zeros(rows, dtype=bool), budget)
        for data in found:
            if int(data["budget"]) != budget:
                continue
            have = data["have"].astype(bool) if "have" in data else np.ones(shape[1], dtype=bool)
            state.loglik[:, have] = data["loglik"][:, have]
            state.greedy[:, have] = data["greedy"][:, have]
            state.done |= data["done"].astype(bool)
            state.have |= have
        return state

    def save(self, state: _Progress, force: bool = False) -> None:
        if not force and time.monotonic() - self._last < self.every:
            return
        import io

        buf = io.BytesIO()
        np.savez(buf, fingerprint=np.array(self.fingerprint), loglik=state.loglik, greedy=state.greedy,
                 done=state.done, budget=np.array(state.budget), variants=_variant_codes(self.variants),
                 plan=np.array(self.plan), have=state.have)
        self.own.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.own, buf.getvalue())
        self._last = time.monotonic()

    def remove(self) -> None:
        """Delete every partial file of the pass (rank 0, once the pass's results are stored)."""
        for path in self.files():
            path.unlink(missing_ok=True)


def plan_digest(rows: Sequence[_Row]) -> str:
    """Identifies a row plan (inputs, packing, members), so a checkpoint's ``done`` matches it."""
    digest = hashlib.sha256()
    for row in rows:
        digest.update(np.asarray(row.ids, dtype=np.int64).tobytes())
        digest.update(repr((row.runs, row.own_mask, [(n, p) for n, p, _ in row.members])).encode())
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
    scored positions (model dtype plus float32 for the log-sum-exp), and for shared rows the
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
    widest = max((len(r.ids) for r in rows if r.shared), default=0)
    per_token = (kept_states + 1) * hidden * elem + (12 * hidden + 3 * inter) * elem
    per_token += scored * vocab * (elem + 8) + widest
    return int(max(512, min(131_072, 0.6 * free / per_token)))


def _cannot_pack(model: torch.nn.Module) -> str:
    """Why shared rows (custom 4D mask + position ids) cannot be used on this model, if so."""
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
    """Log-likelihoods of the full model and of each variant (one or several blocks removed), in one pass."""

    def __init__(self, model: torch.nn.Module, stack: LayerStack, variants: Sequence[Variant], *,
                 batch_tokens: int | None = None, pad_id: int = 0, share: bool = True,
                 row_tokens: int | None = None) -> None:
        self.model, self.stack = model, stack
        self.variants = list(variants)
        if len(set(self.variants)) != len(self.variants):
            raise ValueError("a variant is listed twice")
        for v in self.variants:
            blocks = removal_set(v)
            if blocks and (len(set(blocks)) != len(blocks) or blocks[0] < 0 or blocks[-1] >= len(stack)):
                raise ValueError(f"variant {v!r} does not name distinct blocks of a {len(stack)}-block stack")
        #: the blocks whose inputs are kept, each with the variants that resume from it
        self.resumes: dict[int, list[Variant]] = {}
        for v in self.variants:
            if v is not None:
                self.resumes.setdefault(removal_set(v)[0], []).append(v)
        self.layers = sorted(self.resumes)
        self.batch_tokens = batch_tokens
        self.pad_id = pad_id
        self.device = model.get_input_embeddings().weight.device
        self.share = share
        self.row_tokens = row_tokens
        self.stats: dict[str, Any] = {}

    def layer_passes(self, rows: int = 1) -> int:
        """Block passes per row: the baseline (or up to the deepest kept input) plus each resume."""
        return rows * layer_passes(len(self.stack), self.variants)

    def run(self, requests: Sequence[TokenRequest], max_length: int, *, progress: Progress = SILENT,
            checkpoint: Checkpoint | None = None) -> EngineResult:
        """Every variant's log-likelihood and greedy flag for every request; progress counts tokens.

        Under a launcher every rank plans the same rows and cuts the same batches (rank 0 decides
        the sharing check and the budget, and resumes from the partial files), takes a share of the
        batches not done yet (balanced by padded tokens) and computes each whole, as one process
        would; the shares meet on every rank, so each returns the same, complete result. Rank 0's
        progress counts the job: its own tokens scaled by the job's over its share.
        """
        rows, sharing, checked = self._agreed_plan(requests, max_length)
        n_var, n_req = len(self.variants), len(requests)
        if checkpoint is not None:
            checkpoint.variants, checkpoint.plan = self.variants, plan_digest(rows)
        state: _Progress = on_main(lambda: self._start(rows, (n_var, n_req), checkpoint))
        empty = [n for n, r in enumerate(requests) if not r.continuation]
        state.greedy[:, empty] = True  # an empty continuation: log-likelihood 0, trivially greedy
        total = sum(len(r.ids) for r in rows)
        self.stats = {"requests": n_req, "rows": len(rows), "shared_rows": sum(r.shared for r in rows),
                      "budget": state.budget, "row_tokens": self._row_tokens(max_length), "tokens": total,
                      "sharing": sharing, "unshared_tokens": naive_tokens(requests, max_length),
                      **count_work(requests, rows, max_length, len(self.stack), self.variants, checked)}
        batches = _batches(rows, state.budget)  # the same cut on every run (and rank) of the same plan
        todo = [k for k, batch in enumerate(batches) if not state.done[batch].all()]
        mine = [todo[i] for i in my_share([len(batches[k]) * max(len(rows[i].ids) for i in batches[k])
                                           for k in todo])]
        tokens = [sum(len(rows[i].ids) for i in batch) for batch in batches]
        already = total - sum(tokens[k] for k in todo)
        self.stats.update(resumed_tokens=already, computed_tokens=sum(tokens[k] for k in todo))
        scale = sum(tokens[k] for k in todo) / max(1, sum(tokens[k] for k in mine)) if world().parallel else 1
        progress.phase(PASS_PHASE, total=total)
        progress.advance(already)
        try:
            for k in mine:
                batch = batches[k]
                self._run_rows([rows[i] for i in batch], state.loglik, state.greedy)
                state.done[batch] = True
                state.have[[n for i in batch for n, _, _ in rows[i].members]] = True
                if checkpoint is not None:
                    checkpoint.save(state)
                progress.advance(tokens[k] * scale)
        finally:  # finished or interrupted (Ctrl-C): what is done is kept
            if checkpoint is not None:
                checkpoint.save(state, force=True)
        if world().parallel:
            self._merge(state, all_gather(self._part(state, rows, [batches[k] for k in mine])))
            if not mine:
                progress.advance(total - already)
        return EngineResult(self.variants, state.loglik, state.greedy)

    def _start(self, rows: list[_Row], shape: tuple[int, int], checkpoint: Checkpoint | None) -> _Progress:
        """Where the pass starts (rank 0 decides): the merged partial files, or nothing done with
        a budget sized from free memory."""
        state = checkpoint.load(shape, len(rows)) if checkpoint is not None else None
        if state is None:
            budget = self.batch_tokens or default_budget(self.model, self.stack, len(self.layers), rows)
            state = _Progress(np.zeros(shape), np.zeros(shape, dtype=bool), np.zeros(len(rows), dtype=bool), budget)
        return state

    @staticmethod
    def _part(state: _Progress, rows: list[_Row], batches: list[list[int]]) -> tuple:
        """What this rank computed: its rows, their requests and those requests' values."""
        done = sorted(i for batch in batches for i in batch)
        cols = np.array(sorted({n for i in done for n, _, _ in rows[i].members}), dtype=np.int64)
        return done, cols, state.loglik[:, cols], state.greedy[:, cols]

    @staticmethod
    def _merge(state: _Progress, parts: list[tuple]) -> None:
        for done, cols, loglik, greedy in parts:
            state.done[done] = True
            state.have[cols] = True
            state.loglik[:, cols] = loglik
            state.greedy[:, cols] = greedy

    def _agreed_plan(self, requests: Sequence[TokenRequest], max_length: int) -> tuple[list[_Row], str, int]:
        """:meth:`_plan` on rank 0 (the sharing check runs once), the same rows everywhere."""
        if not world().parallel:
            return self._plan(requests, max_length)
        planned: list[_Row] = []

        def decide() -> tuple[str, int, bool, str]:
            rows, sharing, checked = self._plan(requests, max_length)
            planned.extend(rows)
            return sharing, checked, any(r.shared for r in rows), plan_digest(rows)

        sharing, checked, shared, digest = on_main(decide)
        rows = planned or (self._shared_rows(requests, max_length) if shared else plan_rows(requests, max_length))
        if plan_digest(rows) != digest:
            raise RuntimeError(f"rank {world().rank} planned other model rows than rank 0 (different requests?)")
        return rows, sharing, checked

    def _shared_rows(self, requests: Sequence[TokenRequest], max_length: int) -> list[_Row]:
        """The prefix-shared plan :meth:`_plan` checks (never across a sliding window)."""
        window, _ = attention_limit(self.model)
        return plan_rows(requests, max_length, share=True, window=window, row_tokens=self._row_tokens(max_length))

    def _row_tokens(self, max_length: int) -> int:
        return self.row_tokens or default_row_tokens(self.model, max_length)

    def _plan(self, requests: Sequence[TokenRequest], max_length: int) -> tuple[list[_Row], str, int]:
        """Rows for the requests; shared where the model supports it and a check proves it exact.
        Also says why or why not, and how many tokens the check ran."""
        plain = plan_rows(requests, max_length)
        if not self.share:
            return plain, "off", 0
        reason = _cannot_pack(self.model)
        if reason:
            return plain, f"off: {reason}", 0
        window, name = attention_limit(self.model)
        rows = self._shared_rows(requests, max_length)
        limited = ""
        if window is not None:
            longer = sum(len(r.members) for r in rows if r.own_mask)
            limited = (f"; {longer} requests longer than the {window}-token attention window ({name}) "
                       "unshared: a custom mask would hide the window") if longer else ""
        if not any(r.shared for r in rows):
            return plain, ("off" + limited) if limited else "nothing to share", 0
        # float32: exact sharing agrees to ~1e-6. Half precision: allow a few times the rounding
        # noise between two unshared computations of the same requests, one alone with the model's
        # own causal mask, one batched through the explicit-mask attention path that shared rows
        # take (on a GPU that changes the attention kernel, which in bf16 moves a deep model's
        # log-likelihoods as much as sharing itself does).
        fp32 = next(self.model.parameters()).dtype == torch.float32
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

    def _check_sharing(self, probes: list[tuple[_Row, list[int]]], requests: Sequence[TokenRequest],
                       max_length: int, noise: bool = False) -> tuple[float, float, int]:
        """Max |Δ log-likelihood| shared vs unshared, and (with ``noise``) unshared alone vs
        unshared batched through the explicit-mask path."""
        members = sorted({n for _, chosen in probes for n in chosen})
        flags = np.zeros((1, len(requests)), dtype=bool)
        shared, alone, together = (np.zeros((1, len(requests))) for _ in range(3))
        for row, _ in probes:
            self._batch([row], shared, flags, baseline_only=True)
        batched = plan_rows([requests[n] for n in members], max_length)
        for row in batched:
            row.members = [(members[i], *rest) for i, *rest in row.members]
            self._batch([row], alone, flags, baseline_only=True)
        if noise:
            self._batch(batched, together, flags, baseline_only=True, explicit_mask=True)
        worst = float(np.abs(shared[0, members] - alone[0, members]).max())
        spread = float(np.abs(together[0, members] - alone[0, members]).max()) if noise else 0.0
        return worst, spread, len(members)

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

    def _batch(self, rows: list[_Row], loglik: np.ndarray, greedy: np.ndarray, baseline_only: bool = False,
               explicit_mask: bool = False) -> None:
        """Score ``rows`` for every variant into ``loglik``/``greedy`` (rows: variants). With
        ``baseline_only``, only the full model, into row 0 (the packing check's reference);
        ``explicit_mask`` gives plain rows the 4D mask shared rows get (the check's noise)."""
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
        if explicit_mask or any(r.shared for r in rows):
            kwargs.update(_shared_inputs(rows, width, self.model, dev))
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
            for variant in self.resumes[layer]:  # every variant whose first removed block is this one
                with torch.no_grad(), resumed_at(self.model, layer, state, stack=self.stack), \
                        removed_layers(self.model, removal_set(variant)[1:], mode="skip", stack=self.stack), \
                        head_at(self.model, gather):
                    logits = _checked(self.model(input_ids=ids, **kwargs).logits, gather)
                self._score(logits, index, variants.index(variant), loglik, greedy)
                del logits
            del state

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


#: Config fields that bound how far back a layer attends: (name, what it is). A custom mask
#: replaces the model's own, so a shared row is exact only for inputs within the smallest.
_WINDOW_FIELDS = (
    ("sliding_window", "sliding window"),  # Mistral, Qwen2, Gemma 2/3, Phi-3, Cohere 2, GPT-OSS, ...
    ("window_size", "local attention window"),  # GPT-Neo
    ("attention_window", "local attention window"),  # Longformer, LED
    ("attention_window_size", "local attention window"),  # RecurrentGemma
    ("sliding_window_size", "sliding window"),  # MiMo-V2
    ("local_attention_window_len", "local attention window"),  # BLT
    ("local_attention", "local attention window"),  # ModernBERT
    ("attention_chunk_size", "attention chunk"),  # Llama 4: chunked attention
    ("sliding_windows", "sliding window"),
)


def attention_limit(model: torch.nn.Module) -> tuple[int | None, str]:
    """The smallest window (or chunk) any layer of the model attends within, and its config name.

    A window that the config says no layer uses (``use_sliding_window=False``; ``layer_types``
    or GPT-Neo's ``attention_layers`` naming full or global attention and no local kind) does
    not count. When in doubt the window counts: that only shares less.
    """
    config = text_config(model)
    kinds = getattr(config, "layer_types", None) or getattr(config, "attention_layers", None)
    kinds = [str(k) for k in kinds] if isinstance(kinds, (list, tuple)) else []
    no_local = any("full" in k or "global" in k for k in kinds) and not any(
        w in k for k in kinds for w in ("sliding", "local", "chunk"))
    if getattr(config, "use_sliding_window", True) is False or no_local:
        return None, ""
    found: list[tuple[int, str]] = []
    for name, _ in _WINDOW_FIELDS:
        value = getattr(config, name, None)
        values = value if isinstance(value, (list, tuple)) else [value]
        for v in values:
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                found.append((v, f"config.{name}"))
    return min(found) if found else (None, "")


def default_row_tokens(model: torch.nn.Module, max_length: int) -> int:
    """Longest shared row: at most the context length, and short enough that its dense attention
    (≈ 4·hidden·width FLOPs a token, masked keys included) costs no more than the block's
    matmuls (≈ 2·(4·hidden² + 3·hidden·intermediate)); never below 1024 tokens."""
    config = text_config(model)
    hidden = int(getattr(config, "hidden_size", 0) or getattr(config, "n_embd", 0) or 4096)
    inter = int(getattr(config, "intermediate_size", 0) or getattr(config, "ffn_dim", 0) or 4 * hidden)
    return int(min(max_length, max(1024, 2 * hidden + 1.5 * inter)))


def layer_passes(n_layers: int, variants: Sequence[Variant]) -> int:
    """Blocks the fast engine runs per row token: the baseline (or up to the deepest kept
    input when the baseline is not asked for), then each variant resumed after its first
    removed block, running the blocks after it that it keeps."""
    sets = [removal_set(v) for v in variants if v is not None]
    base = n_layers if None in variants or not sets else max(s[0] for s in sets)
    return base + sum(n_layers - s[0] - len(s) for s in sets)


def naive_layer_passes(n_layers: int, variants: Sequence[Variant]) -> int:
    """Blocks the naive engine runs per row token: every block of each variant but the removed ones."""
    return sum(n_layers - len(removal_set(v)) for v in variants)


def naive_tokens(requests: Sequence[TokenRequest], max_length: int) -> int:
    """Tokens HFLM feeds for these requests: one row per distinct ``context + continuation[:-1]``
    (its one-token-continuation cache shares those), cut to ``max_length``; padding excluded."""
    keys = {r.context + r.continuation[:-1] for r in requests if r.continuation}
    return sum(min(len(k), max_length) for k in keys)


def probe_plan(rows: Sequence[_Row], n_layers: int, variants: Sequence[Variant], *, limit: int = 8,
               per_row: int = 2, share_of_work: float = 0.05) -> list[tuple[_Row, list[int]]]:
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
    out: list[tuple[_Row, list[int]]] = []
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


def check_tokens(probes: Sequence[tuple[_Row, list[int]]], requests: Sequence[TokenRequest], max_length: int,
                 noise: bool = False) -> int:
    """Tokens the exactness check feeds the full model: each probe row, and each compared
    request's own input (twice with ``noise``: alone, then batched through the explicit-mask
    path, to measure rounding noise)."""
    members = sorted({n for _, chosen in probes for n in chosen})
    alone = sum(len(r.ids) for r in plan_rows([requests[n] for n in members], max_length))
    return sum(len(row.ids) for row, _ in probes) + (2 if noise else 1) * alone


def count_work(requests: Sequence[TokenRequest], rows: Sequence[_Row], max_length: int, n_layers: int,
               variants: Sequence[Variant], checked_tokens: int = 0) -> dict[str, Any]:
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
                 variants: Sequence[Variant], *, row_tokens: int | None = None,
                 window: int | None = None, half: bool = False) -> dict[str, Any]:
    """What :meth:`SweepEngine.run` reports as its work when sharing is on and checked, without
    a model: the same plan, probe choice and count (used for the counted targets)."""
    rows = plan_rows(requests, max_length, share=True, window=window, row_tokens=row_tokens)
    checked = check_tokens(probe_plan(rows, n_layers, variants), requests, max_length, noise=half)
    return count_work(requests, rows, max_length, n_layers, variants, checked)


def _shared_inputs(rows: list[_Row], width: int, model: torch.nn.Module, device: torch.device) -> dict[str, Any]:
    """A 4D attention mask and position ids for a batch holding shared rows.

    A run's tokens see what its parent token sees, the parent, and the run itself causally;
    plain rows get the ordinary causal mask. Padding positions see token 0 only (a fully
    masked row would give NaNs); no real token ever sees padding.
    """
    allow = torch.zeros((len(rows), width, width), dtype=torch.bool, device=device)  # built where it is used
    causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    for b, row in enumerate(rows):
        n = len(row.ids)
        for first, length, parent in row.runs or [(0, n, -1)]:
            if parent >= 0:
                allow[b, first:first + length] = allow[b, parent]
            allow[b, first:first + length, first:first + length] = causal[:length, :length]
        allow[b, n:, 0] = True
        pos[b, :n] = torch.tensor(row.position_ids(), dtype=torch.long)
    mask = allow.unsqueeze(1)
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
