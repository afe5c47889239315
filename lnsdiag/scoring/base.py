"""What scoring a model variant means, whatever scores it: the rows it yields and the small
interface both sweep engines call.

Two scorers implement :class:`Scorer`: lm-eval tasks (:mod:`lnsdiag.lmeval`) and the built-in
perplexity (:mod:`lnsdiag.perplexity`). The naive engine calls ``score()`` once per variant
with the variant's layers removed; the fast engine scores every scorer's ``requests()`` for
all variants in one pass and hands each variant's answers to ``aggregate()``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from .perplexity import Perplexity

#: Metrics shown first when a task has several (the paper reports accuracy).
MAIN_METRICS = ("acc", "acc_norm", "exact_match", "em", "f1", "mcc", "ppl", "word_perplexity", "perplexity",
                "bits_per_byte", "byte_perplexity")
LOWER_IS_BETTER = {"perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte", "ppl", "nll"}


@dataclass(frozen=True)
class TokenRequest:
    """Score ``continuation`` after ``context`` (token ids), as lm-eval's loglikelihood does."""

    context: tuple[int, ...]
    continuation: tuple[int, ...]


@dataclass
class MetricRow:
    """One number of one task for one model variant."""

    task: str
    metric: str
    value: float
    stderr: float
    higher_is_better: bool
    samples: int | None = None
    group: bool = False

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


#: Per-document items of each (task, metric): ``{(task, metric): {doc_id: item}}``. An item is
#: what lm-eval's ``process_results`` gives for one document (1.0 / 0.0 for accuracy, a
#: ``(loglikelihood, words)`` pair for word perplexity, ...), so the metric's own aggregation
#: can be applied to any subset of documents, and two variants compared document by document.
Documents = dict[tuple[str, str], dict[Any, Any]]


@dataclass
class Scores:
    """A variant's metric rows, plus what paired comparisons need: per-document items (lm-eval
    tasks), the number of choices of each multiple-choice document, per-window perplexity data."""

    rows: list[MetricRow] = field(default_factory=list)
    ppl: Perplexity | None = None
    documents: Documents = field(default_factory=dict)
    choices: dict[str, dict[Any, int]] = field(default_factory=dict)
    aggregations: dict[tuple[str, str], str] = field(default_factory=dict)  # lm-eval registry names
    groups: dict[str, list[str]] = field(default_factory=dict)  # group -> its leaf tasks

    def __add__(self, other: Scores) -> Scores:
        return Scores(self.rows + other.rows, self.ppl if other.ppl is None else other.ppl,
                      {**self.documents, **other.documents}, {**self.choices, **other.choices},
                      {**self.aggregations, **other.aggregations}, {**self.groups, **other.groups})


class Scorer(ABC):
    """Scores a model variant. The contract both engines rely on:

    * :meth:`score` scores the model as it is right now: the naive engine calls it inside
      ``removed_layers``. Every metric and stderr comes from here or from :meth:`aggregate`.
    * :meth:`requests` lists the token-level log-likelihood requests the metrics depend on,
      built once, in a fixed order. The fast engine answers them for every variant.
    * :meth:`aggregate` turns one variant's answers to :meth:`requests` (same order) into
      the same :class:`Scores` that :meth:`score` gives for that variant.
    * :meth:`score_rest` scores what log-likelihoods cannot serve (text generation) on the
      model as it is now, inside ``removed_layers``; empty when there is nothing.
    * :meth:`settings` are what changes the numbers, for a result store's fingerprint.
    * :meth:`context_limit` / :meth:`context_needed`: the context length its requests are cut
      to (lm-eval's), and the one they need whole (a perplexity window); the engine checks both.
    * :meth:`lm_eval_tasks`: for the run's record, the lm-eval tasks served from log-likelihoods
      and those scored on the model (generation).
    """

    #: Names of the tasks this scorer reports, in the order a table shows them.
    tasks: list[str]

    @abstractmethod
    def score(self) -> Scores: ...

    @abstractmethod
    def requests(self) -> list[TokenRequest]: ...

    @abstractmethod
    def aggregate(self, loglik: np.ndarray, greedy: np.ndarray) -> Scores: ...

    def score_rest(self) -> Scores:
        return Scores()

    def needs_model_per_variant(self) -> bool:
        """Whether :meth:`score_rest` has work (the fast engine then removes layers for it)."""
        return False

    def context_limit(self) -> int | None:
        """The context length this scorer cuts its requests to, if it imposes one."""
        return None

    def context_needed(self) -> int:
        """The context length its requests need uncut (0: none)."""
        return 0

    def lm_eval_tasks(self) -> tuple[list[str], list[str]]:
        """lm-eval task names served from log-likelihoods, and those scored on the model."""
        return [], []

    @abstractmethod
    def settings(self) -> dict[str, Any]: ...


def main_metric(metrics: Sequence[str]) -> str:
    """The metric a table shows for a task: accuracy first, as the paper does."""
    for preferred in MAIN_METRICS:
        if preferred in metrics:
            return preferred
    return sorted(metrics)[0]
