"""KL and top-1 agreement with the full model over lm-eval tasks' own tokens (``--fidelity-tasks``).

Accuracy moves in whole answers: on 100 MMLU questions a removal that shifts every answer's
probabilities a little shows nothing. Here every token the tasks' requests feed the model
(contexts and continuations, as lm-eval tokenised and truncated them) is a position where the
variant's next-token distribution is compared with the full model's, from the same pass as the
tasks' log-likelihoods. A document is one unit (its positions are not independent), so the
paired statistics are over documents, as for accuracy.

Positions are counted once: the choices of a question share its context, so the context's
positions are compared once per document (a prediction depends only on the tokens before it);
a rolling task's windows are compared on the tokens each window scores.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..base import TokenRequest
from ..fidelity import ComparedRequests
from ..registry import ScoringSetup

if TYPE_CHECKING:
    from .requests import RequestLog
    from .tasks import TaskSet

#: Prefix of the task names of these rows (``fidelity:mmlu``).
PREFIX = "fidelity:"


@dataclass
class TaskDocument:
    """One document of a requested task: the requests whose tokens are compared (each position
    once), and the context lm-eval built for its first request (a prompt to generate from)."""

    leaf: str
    doc_id: Any
    requests: list[TokenRequest] = field(default_factory=list)
    prompt: tuple[int, ...] | None = None


def cut(request: TokenRequest, max_length: int) -> tuple[int, ...]:
    """The tokens the model sees for a request, its last target included: HFLM's left truncation."""
    return (request.context + request.continuation)[-(max_length + 1):]


def _common(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def new_positions(sequences: Sequence[tuple[int, ...]]) -> list[TokenRequest]:
    """Requests that make every prediction of ``sequences`` once. A prediction is the distribution
    after a prefix, whatever token follows it; a sequence makes those after its prefixes of length
    1 .. len − 1, so it adds the ones after prefixes longer than any earlier sequence has made."""
    out: list[TokenRequest] = []
    for k, seq in enumerate(sequences):
        made = max((min(_common(seq, earlier), len(earlier) - 1) for earlier in sequences[:k]), default=0)
        start = max(made, 0) + 1
        if start < len(seq):
            out.append(TokenRequest(seq[:start], seq[start:]))
    return out


def task_documents(log: RequestLog, tasks: TaskSet, max_length: int) -> dict[str, list[TaskDocument]]:
    """Each requested name's documents (pooled over a group's leaf tasks), in lm-eval's order."""
    docs: dict[tuple[str, Any], TaskDocument] = {}
    singles: dict[tuple[str, Any], list[tuple[int, TokenRequest]]] = {}
    for key, request in log.single:
        _, leaf, doc_id, idx = key
        singles.setdefault((leaf, doc_id), []).append((idx, request))
    for (leaf, doc_id), requests in singles.items():
        ordered = [r for _, r in sorted(requests, key=lambda pair: pair[0])]
        docs[(leaf, doc_id)] = TaskDocument(leaf, doc_id, new_positions([cut(r, max_length) for r in ordered]),
                                            ordered[0].context[-max_length:] or None)
    for key, windows in log.rolling:
        _, leaf, doc_id, _ = key
        doc = docs.setdefault((leaf, doc_id), TaskDocument(leaf, doc_id))
        doc.requests += [w for w in windows if w.continuation]
    out: dict[str, list[TaskDocument]] = {}
    for name in tasks.names:
        leaves = set(tasks.leaves_of(name) or tasks.leaf_tasks)
        chosen = [d for d in docs.values() if d.leaf in leaves]
        if chosen:
            out[name] = chosen
    return out


def build(setup: ScoringSetup) -> ComparedRequests | None:
    """KL and top-1 on the log-likelihood tasks' tokens when the run asks (``--fidelity-tasks``)."""
    if not setup.fidelity_tasks or setup.tasks is None:
        return None
    lm_eval = setup.cache["lm-eval"]
    log = lm_eval.request_log()
    if log is None:
        return None
    documents = task_documents(log, setup.tasks, lm_eval.context_limit())
    names = list(documents)
    return ComparedRequests(setup.loaded.model, [PREFIX + n for n in names],
                            [[d.requests for d in documents[n]] for n in names],
                            max_length=lm_eval.context_limit(), batch_size=setup.batch_size,
                            settings={"fidelity_tasks": "kl, top1 against the full model on every position of the "
                                                        "tasks' requests, each once; a document is a unit"})
