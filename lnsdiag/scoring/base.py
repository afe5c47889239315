"""What scoring a model variant means, whatever scores it: the rows it yields and the small
interface both sweep engines call.

Scorers are registered in :mod:`lnsdiag.scoring.registry` (lm-eval tasks, the built-in
perplexity). The naive engine calls ``score()`` once per variant with the variant's layers
removed; the fast engine scores every scorer's ``requests()`` for all variants in one pass and
hands each variant's answers to ``aggregate()``. What pairs two variants of a task beyond
per-document items (the perplexity's windows) is a :class:`PairedUnits` of a registered kind,
which the result store saves and the verdicts compare without knowing the scorer.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import numpy as np

if TYPE_CHECKING:
    from ..data.windows import TokenWindows

#: Metrics shown first when a task has several (the paper reports accuracy).
MAIN_METRICS = ("acc", "acc_norm", "exact_match", "em", "f1", "mcc", "ppl", "word_perplexity", "perplexity",
                "bits_per_byte", "byte_perplexity", "kl")
LOWER_IS_BETTER = {"perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte", "ppl", "nll"}


@dataclass(frozen=True)
class TokenRequest:
    """Score ``continuation`` after ``context`` (token ids), as lm-eval's loglikelihood does."""

    context: tuple[int, ...]
    continuation: tuple[int, ...]


@dataclass
class Answers:
    """One variant's answers to a scorer's requests, in the requests' order.

    ``loglik[n]``: the log-likelihood of request n's continuation; ``greedy[n]``: whether each of
    its tokens is the argmax. For a scorer that ``compares_to_full``: ``kl[n]``, the sum over its
    scored tokens of KL(p_full ‖ p_variant) in nats; ``agree[n]``, how many of them have the full
    model's argmax as the variant's argmax; ``token_kl[n]``, each token's KL (float32);
    ``token_agree[n]``, whether each token's argmax is the full model's.
    """

    loglik: np.ndarray
    greedy: np.ndarray
    kl: np.ndarray | None = None
    agree: np.ndarray | None = None
    token_kl: list[np.ndarray] | None = None
    token_agree: list[np.ndarray] | None = None

    def __getitem__(self, span: slice) -> Answers:
        """The answers of the requests in ``span`` (one scorer's part of a pass)."""
        return Answers(self.loglik[span], self.greedy[span], None if self.kl is None else self.kl[span],
                       None if self.agree is None else self.agree[span],
                       None if self.token_kl is None else self.token_kl[span],
                       None if self.token_agree is None else self.token_agree[span])


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


class PairedUnits(ABC):
    """One variant's per-unit data of one task, for metrics that are not per-document means
    (a ratio over token windows): what makes the Δ between two variants of that task paired.

    A kind is registered with :func:`paired_units` so a result store can read it back.
    """

    #: Registry name, stored beside the data.
    kind: ClassVar[str]

    @abstractmethod
    def as_json(self) -> dict[str, Any]: ...

    @classmethod
    @abstractmethod
    def from_json(cls, data: dict[str, Any]) -> PairedUnits: ...

    @abstractmethod
    def units(self) -> int:
        """How many independent units the paired comparison rests on."""

    @abstractmethod
    def delta_stderr(self, base: PairedUnits, metric: str, on_log_ratio: bool) -> float:
        """Stderr of this variant's Δ to ``base`` for ``metric`` (of its log ratio if ``on_log_ratio``);
        NaN when the two cannot be paired."""

    def sample_rows(self, task: str) -> list[dict[str, Any]]:
        """Rows of the per-document export (``task, metric, doc_id, value, item, choices``)."""
        return []

    def no_change_count(self, metric: str) -> int:
        """How many things could have changed, when none did (no spread at all): the count behind
        the interval of "nothing changed" (default: the units)."""
        return self.units()


#: kind -> class of every registered :class:`PairedUnits`.
UNIT_KINDS: dict[str, type[PairedUnits]] = {}
_U = TypeVar("_U", bound=type[PairedUnits])


def paired_units(cls: _U) -> _U:
    """Class decorator: register a :class:`PairedUnits` kind under its ``kind``."""
    UNIT_KINDS[cls.kind] = cls
    return cls


def units_to_json(units: dict[str, PairedUnits]) -> dict[str, Any]:
    return {task: {"kind": u.kind, **u.as_json()} for task, u in units.items()}


def units_from_json(data: dict[str, Any]) -> dict[str, PairedUnits]:
    """Read back what :func:`units_to_json` wrote; a kind no longer registered is left out."""
    out = {}
    for task, raw in data.items():
        cls = UNIT_KINDS.get(raw.get("kind"))
        if cls is not None:
            out[task] = cls.from_json({k: v for k, v in raw.items() if k != "kind"})
    return out


@dataclass
class Scores:
    """A variant's metric rows, plus what paired comparisons need: per-document items (lm-eval
    tasks), the number of choices of each multiple-choice document, per-task paired units."""

    rows: list[MetricRow] = field(default_factory=list)
    units: dict[str, PairedUnits] = field(default_factory=dict)
    documents: Documents = field(default_factory=dict)
    choices: dict[str, dict[Any, int]] = field(default_factory=dict)
    aggregations: dict[tuple[str, str], str] = field(default_factory=dict)  # lm-eval registry names
    groups: dict[str, list[str]] = field(default_factory=dict)  # group -> its leaf tasks

    def __add__(self, other: Scores) -> Scores:
        return Scores(self.rows + other.rows, {**self.units, **other.units},
                      {**self.documents, **other.documents}, {**self.choices, **other.choices},
                      {**self.aggregations, **other.aggregations}, {**self.groups, **other.groups})


class Scorer(ABC):
    """Scores a model variant. The contract both engines rely on:

    * :meth:`score` scores the model as it is right now: the naive engine calls it inside
      ``removed_layers``. Every metric and stderr comes from here or from :meth:`aggregate`.
    * :meth:`requests` lists the token-level log-likelihood requests the metrics depend on,
      built once, in a fixed order. The fast engine answers them for every variant.
    * :meth:`aggregate` turns one variant's :class:`Answers` to :meth:`requests` (same order)
      into the same :class:`Scores` that :meth:`score` gives for that variant. A scorer with
      ``compares_to_full`` also gets, per request, how far the variant's next-token
      distributions moved from the full model's (KL, top-1 agreement), from the same pass.
    * :meth:`naive_requests`: the requests :meth:`score` runs, for counting the naive
      engine's work (:meth:`requests` unless it scores them otherwise, e.g. whole windows).
    * :meth:`score_rest` scores what log-likelihoods cannot serve (text generation) on the
      model as it is now, inside ``removed_layers``; empty when there is nothing.
    * :meth:`settings` are what changes the numbers, for a result store's fingerprint.
    * :meth:`context_limit` / :meth:`context_needed`: the context length its requests are cut
      to (lm-eval's), and the one they need whole (a perplexity window); the engine checks both.
    * :meth:`lm_eval_tasks`: for the run's record, the lm-eval tasks served from log-likelihoods
      and those scored on the model (generation).
    * :meth:`token_windows`: text windows it scores, which a run may reuse for measurements.
    * :meth:`run_stats`: what the run's record should say about how it scored (after a pass).
    """

    #: Names of the tasks this scorer reports, in the order a table shows them.
    tasks: list[str]
    #: Whether :meth:`aggregate` needs :attr:`Answers.kl` / ``agree`` / ``token_kl`` (the engine
    #: then keeps the full model's distributions for the batch in flight).
    compares_to_full: ClassVar[bool] = False

    @abstractmethod
    def score(self) -> Scores: ...

    @abstractmethod
    def requests(self) -> list[TokenRequest]: ...

    @abstractmethod
    def aggregate(self, answers: Answers) -> Scores: ...

    def naive_requests(self) -> list[TokenRequest]:
        """The requests :meth:`score` feeds the model, as HFLM would (for the work count)."""
        return self.requests()

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

    def token_windows(self) -> TokenWindows | None:
        """The token windows this scorer scores, if it scores windows of a text."""
        return None

    def run_stats(self) -> dict[str, Any]:
        """Facts about how the last fast pass was scored, for the run's record."""
        return {}

    def keep(self, folder: Path) -> None:
        """Write into the run's ``folder`` what a resumed run can reuse instead of computing it again (the
        full model's continuations); called once the run's store has accepted the settings, so a refused
        run writes nothing. Default: nothing to keep."""
        return None

    @abstractmethod
    def settings(self) -> dict[str, Any]: ...


def main_metric(metrics: Sequence[str]) -> str:
    """The metric a table shows for a task: accuracy first, as the paper does."""
    for preferred in MAIN_METRICS:
        if preferred in metrics:
            return preferred
    return sorted(metrics)[0]
