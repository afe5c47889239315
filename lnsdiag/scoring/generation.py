"""Generation fidelity (``--generate N``): does a variant still say what the full model says?

Pruning studies report that generation (GSM8K, code) recovers far less than multiple choice: an
error early in a continuation changes everything after it. Here the full model continues each
prompt greedily for N tokens, once, before the sweep (the opening of every perplexity window, and
the context lm-eval built for every task document); every variant is then scored teacher-forced
along those continuations, from the same pass as everything else:

* ``kl`` / ``top1``: KL to the full model and top-1 agreement along the full model's own output,
  paired prompt by prompt, with the verdict rules of :mod:`.fidelity`;
* ``first_miss``: how many tokens of the continuation the variant reproduces before its first
  disagreement (mean over prompts, N when it never disagrees): descriptive, no verdict.

One generation in all, not one per variant; the continuations' digest joins the settings, so a
resumed run never mixes variants scored along other continuations.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..distributed import on_main
from ..errors import OptionError
from ..runs import atomic_write
from .base import MetricRow, PairedUnits, TokenRequest, paired_units
from .fidelity import ComparedRequests, Fidelity, fold_units
from .lmeval.fidelity import task_documents
from .perplexity import windows_of
from .registry import ScoringSetup

GENERATION_TASK = "generation"
#: The metrics of a generation task, in the order tables show them.
GENERATION_METRICS = ("kl", "top1", "first_miss")
#: Tokens of each perplexity window's opening the full model continues.
PROMPT_TOKENS = 64


@paired_units
@dataclass
class Generation(Fidelity):
    """:class:`~.fidelity.Fidelity` of continuations (a unit per prompt), plus each prompt's
    ``unit_run``: the tokens reproduced before the first disagreement."""

    kind = "generation"

    unit_run: list[int] = field(default_factory=list)

    def rows(self, task: str = GENERATION_TASK) -> list[MetricRow]:
        shown = [row for row in super().rows(task) if row.metric in GENERATION_METRICS]
        runs = np.asarray(self.unit_run, dtype=np.float64)
        n = runs.size
        stderr = float(runs.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan
        return [*shown, MetricRow(task, "first_miss", float(runs.mean()) if n else math.nan, stderr, True, n)]

    def delta_stderr(self, base: PairedUnits, metric: str, on_log_ratio: bool) -> float:
        return math.nan if metric == "first_miss" else super().delta_stderr(base, metric, on_log_ratio)

    def as_json(self) -> dict[str, Any]:
        return {**super().as_json(), "unit_run": self.unit_run}


def first_miss(agree: np.ndarray) -> int:
    """Tokens before the first ``False`` (all of them when none)."""
    misses = np.flatnonzero(~np.asarray(agree, dtype=bool))
    return int(misses[0]) if misses.size else int(np.asarray(agree).size)


def greedy_continuations(model: torch.nn.Module, prompts: Sequence[tuple[int, ...]], tokens: int, *,
                         batch_size: int = 8) -> list[tuple[int, ...]]:
    """The model's greedy continuation of each prompt, ``tokens`` long whatever it emits (an end of
    text does not stop it: every prompt gets as many positions), with its KV cache. Prompts of one
    length are batched together: no padding, so each is continued exactly as it would be alone."""
    device = model.get_input_embeddings().weight.device
    out: list[tuple[int, ...] | None] = [None] * len(prompts)
    by_length: dict[int, list[int]] = {}
    for n, prompt in enumerate(prompts):
        by_length.setdefault(len(prompt), []).append(n)
    for members in by_length.values():
        for start in range(0, len(members), batch_size):
            batch = members[start:start + batch_size]
            ids = torch.tensor([prompts[n] for n in batch], dtype=torch.long, device=device)
            for n, continuation in zip(batch, _greedy(model, ids, tokens).tolist(), strict=True):
                out[n] = tuple(continuation)
    return [c for c in out if c is not None]


def _greedy(model: torch.nn.Module, ids: torch.Tensor, tokens: int) -> torch.Tensor:
    name = _cache_argument(model)
    with torch.no_grad():
        step = model(input_ids=ids, use_cache=True)
        chosen = [step.logits[:, -1].argmax(dim=-1)]
        for _ in range(tokens - 1):
            step = model(input_ids=chosen[-1][:, None], use_cache=True, **{name: _cache_of(step)})
            chosen.append(step.logits[:, -1].argmax(dim=-1))
    return torch.stack(chosen, dim=1).cpu()


def _cache_argument(model: torch.nn.Module) -> str:
    """``cache`` (transformers 5) or ``past_key_values`` (before): what the model's forward takes."""
    try:
        return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    except (TypeError, ValueError):
        return "past_key_values"


def _cache_of(output: Any) -> Any:
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


class GenerationScorer(ComparedRequests):
    """Every variant teacher-forced along the full model's continuations, one task per prompt
    source (``generation`` for the text's windows, ``generation:<task>`` for a task's documents)."""

    def __init__(self, model: torch.nn.Module, tasks: list[str], prompts: list[list[tuple[int, ...]]],
                 continuations: list[list[tuple[int, ...]]], *, max_length: int, batch_size: int = 8) -> None:
        units = [[[TokenRequest(p, c)] for p, c in zip(ps, cs, strict=True)]
                 for ps, cs in zip(prompts, continuations, strict=True)]
        super().__init__(model, tasks, units, max_length=max_length, batch_size=batch_size)
        self.tokens = len(continuations[0][0]) if continuations and continuations[0] else 0
        self.prompt_tokens = sorted({len(p) for ps in prompts for p in ps})
        digest = hashlib.sha256()
        for request in self._requests:
            digest.update(np.asarray(request.context + request.continuation, dtype=np.int64).tobytes() + b";")
        self.digest = digest.hexdigest()[:16]

    def fold(self, kl: Sequence[float], agree: Sequence[int], token_kl: Sequence[np.ndarray],
             token_agree: Sequence[np.ndarray]) -> list[Generation]:
        plain = fold_units(self.layout, self.units, kl, agree, [len(r.continuation) for r in self._requests], token_kl)
        runs = [[0] * u for u in self.units]
        for n, (t, u) in enumerate(self.layout):
            runs[t][u] = first_miss(token_agree[n])
        return [Generation(**result.as_json(), unit_run=runs[t]) for t, result in enumerate(plain)]

    #: what :meth:`keep` writes (the continuations, keyed by what they were generated from)
    kept: dict[str, Any] | None = None

    def keep(self, folder: Path) -> None:
        """The continuations into the run's folder (atomically; one rank writes), for a resumed run."""
        if self.kept is not None and Path(folder).is_dir():
            on_main(lambda: atomic_write(Path(folder) / KEPT, json.dumps(self.kept) + "\n"))

    def settings(self) -> dict[str, Any]:
        return {"generate": self.tokens, "generate_prompt_tokens": [self.prompt_tokens[0], self.prompt_tokens[-1]]
                if self.prompt_tokens else None, "generated": self.digest}


def check_generate(tokens: int) -> int:
    """``--generate`` takes a positive count of tokens (0: off)."""
    if tokens < 0:
        raise OptionError("{generate} must be a count of tokens (0: off), not {value}", value=tokens)
    return tokens


def _sources(setup: ScoringSetup) -> tuple[list[str], list[list[tuple[int, ...]]], int]:
    """Each prompt source's task name and prompts (cut to leave room for the continuation), and the
    context length that fits them all."""
    tokens = setup.generate
    names: list[str] = []
    prompts: list[list[tuple[int, ...]]] = []
    limits: list[int] = []
    windows = windows_of(setup)
    if windows is not None:
        room = windows.longest - tokens
        if room < 1:
            raise OptionError("{generate} " + f"{tokens} leaves no room for a prompt in the text's "
                              f"{windows.longest}-token windows: ask fewer tokens or a longer " + "{seq_len}")
        names.append(GENERATION_TASK)
        prompts.append([tuple(w[:min(PROMPT_TOKENS, room, len(w))].tolist()) for w in windows.windows])
        limits.append(windows.longest)
    lm_eval = setup.cache.get("lm-eval")
    log = lm_eval.request_log() if lm_eval is not None else None
    if log is not None:
        max_length = lm_eval.context_limit()
        if max_length - tokens < 1:
            raise OptionError("{generate} " + f"{tokens} leaves no room for a task's context in the model's "
                              f"{max_length} tokens")
        for name, documents in task_documents(log, setup.tasks, max_length).items():
            chosen = [d.prompt[-(max_length - tokens):] for d in documents if d.prompt]
            if chosen:
                names.append(f"{GENERATION_TASK}:{name}")
                prompts.append(chosen)
        limits.append(max_length)
    return names, prompts, max(limits, default=0)  # every request fits the longest: nothing is cut


#: Where a run keeps the full model's continuations, so a resumed run does not generate them again.
KEPT = "continuations.json"


def _kept_or_generated(setup: ScoringSetup, prompts: list[tuple[int, ...]]) -> tuple[list[tuple[int, ...]], str]:
    """The full model's continuations of ``prompts`` and their key: read back from the run's folder when
    kept there for the same model, weights, dtype, prompts and length (unless ``--fresh``), else generated."""
    loaded = setup.loaded
    key = hashlib.sha256(json.dumps([loaded.source, loaded.revision, loaded.weights_identity(), str(loaded.dtype),
                                     setup.generate, [list(p) for p in prompts]]).encode()).hexdigest()[:32]
    path = setup.folder / KEPT if setup.folder is not None else None
    if path is not None and path.is_file() and not setup.fresh:
        try:
            kept = json.loads(path.read_text(encoding="utf-8"))
            if kept.get("key") == key and len(kept["continuations"]) == len(prompts):
                setup.note(f"reusing the full model's continuations kept in {path}")
                return [tuple(int(t) for t in c) for c in kept["continuations"]], key
        except (OSError, ValueError, KeyError, TypeError):
            pass  # damaged or foreign: generated again
    generated = greedy_continuations(loaded.model, prompts, setup.generate, batch_size=setup.batch_size)
    return [tuple(int(t) for t in c) for c in generated], key


def build(setup: ScoringSetup) -> GenerationScorer | None:
    """The full model's continuations, generated once (on the first rank, shared with the others)."""
    if setup.generate <= 0:
        return None
    names, prompts, max_length = _sources(setup)
    if not names:
        return None
    model = setup.loaded.model
    count = sum(len(p) for p in prompts)
    setup.note(f"generating {setup.generate} tokens from {count} prompt(s) with the full model (once)")
    flat = [p for ps in prompts for p in ps]
    generated, key = on_main(lambda: _kept_or_generated(setup, flat))
    continuations, at = [], 0
    for ps in prompts:
        continuations.append(generated[at:at + len(ps)])
        at += len(ps)
    scorer = GenerationScorer(model, names, prompts, continuations, max_length=max_length, batch_size=setup.batch_size)
    scorer.kept = {"key": key, "tokens": setup.generate, "continuations": [list(c) for c in generated]}
    return scorer
