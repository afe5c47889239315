"""lm-eval tasks as a :class:`~lnsdiag.scoring.Scorer` (:class:`LmEvalScorer`): the tasks
(:mod:`.tasks`), the model wrapped once (:mod:`.lm`), requests collected once (:mod:`.requests`)
and lm-eval's own aggregation (:mod:`.aggregate`), put together for both sweep engines.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from ..base import Answers, Scorer, Scores, TokenRequest
from ..registry import ScoringSetup
from .aggregate import results_difference, scores_of
from .fingerprint import generation_request_args, task_data_digest
from .requests import RequestLog, collect_requests
from .tasks import DEFAULT_BOOTSTRAP, TaskSet, evaluate_tasks, seed_everything

if TYPE_CHECKING:
    from ...model.load import LoadedModel
    from .lm import LnsdiagHFLM


def _warn(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=3)


class LmEvalScorer(Scorer):
    """lm-eval tasks as a :class:`~lnsdiag.scoring.Scorer`: one HFLM and one task set per run.

    Tasks whose requests are all log-likelihoods are served to the fast engine through
    :meth:`requests` / :meth:`aggregate`: lm-eval builds their instances once, and each variant
    is aggregated from its stored answers with the tasks' own ``process_results`` and
    aggregations (:class:`~.requests.BuiltRequests`), not by rebuilding everything in ``evaluate``.
    The first variant is also replayed through ``evaluate`` (``check_direct``): should the two
    differ (a task whose post-processing is unusual), or should the direct path not apply,
    every variant is replayed through ``evaluate`` instead and ``note`` says so.
    Generation tasks are left to :meth:`score_rest`, on the model as it is.
    """

    def __init__(self, loaded: LoadedModel, tasks: TaskSet, *, limit: int | float | None = None, seed: int = 1234,
                 bootstrap_iters: int = DEFAULT_BOOTSTRAP, batch_size: int = 8, documents: bool = True,
                 check_direct: bool = True, note: Callable[[str], None] | None = None) -> None:
        from .lm import make_lm  # lm-eval, torch and transformers: imported once a scorer is built

        tasks.check(limit)  # done by load_tasks for its limit; a task set scored on more documents is checked here
        self.taskset, self.limit, self.seed, self.bootstrap_iters = tasks, limit, seed, bootstrap_iters
        self.documents = documents  # keep each document's metric items (for paired comparisons)
        self.tasks = list(tasks.names)
        self.lm: LnsdiagHFLM = make_lm(loaded, batch_size)
        self.check_direct = check_direct
        self.note = note or _warn
        #: How variants are aggregated: "direct" (instances built once) or "replay" (lm-eval's
        #: evaluate per variant); ``fallback`` says why when it is "replay".
        self.aggregation_path = "direct"
        self.fallback: str | None = None
        self._log: RequestLog | None = None
        self._checked = False
        self._task_data: str | None = None

    @functools.cached_property
    def _split(self) -> tuple[TaskSet | None, TaskSet | None]:
        fast, slow = self.taskset.split_by_output()
        return (self.taskset.subset(fast) if fast else None), (self.taskset.subset(slow) if slow else None)

    def lm_eval_tasks(self) -> tuple[list[str], list[str]]:
        fast, slow = self._split
        return (fast.names if fast else []), (slow.names if slow else [])

    def context_limit(self) -> int:
        return int(self.lm.max_length)

    def _evaluate(self, tasks: TaskSet) -> Scores:
        seed_everything(self.seed)
        return scores_of(evaluate_tasks(self.lm, tasks, limit=self.limit, seed=self.seed,
                                        bootstrap_iters=self.bootstrap_iters, log_samples=self.documents), tasks)

    def score(self) -> Scores:
        return self._evaluate(self.taskset)

    def requests(self) -> list[TokenRequest]:
        log = self.request_log()
        if log is None:
            return []
        if log.built is None and self.fallback is None:
            self._fall_back(log.unsupported or "no instances were kept")
        return log.token_requests()

    def request_log(self) -> RequestLog | None:
        """The log-likelihood tasks' requests, collected once (None when there are none)."""
        fast = self._split[0]
        if fast is not None and self._log is None:
            self._log = collect_requests(self.lm, fast, limit=self.limit, seed=self.seed)
        return self._log

    def _fall_back(self, why: str) -> None:
        self.aggregation_path, self.fallback = "replay", why
        self.note(f"lm-eval metrics are aggregated through lm-eval's evaluate for every variant (slower): {why}")

    def run_stats(self) -> dict[str, Any]:
        """For the run's record: how variants were aggregated, and why not directly if not."""
        return {"lm_eval_aggregation": self.aggregation_path, "lm_eval_aggregation_fallback": self.fallback}

    def _replay(self, fast: TaskSet, loglik: np.ndarray, greedy: np.ndarray, *, bootstrap_iters: int,
                log_samples: bool) -> dict[str, Any]:
        from .lm import replay_metrics  # lm-eval's evaluate on a ReplayLM (imported with make_lm already)

        single, rolling = self._log.tables(loglik, greedy)
        return replay_metrics(fast, single, rolling, limit=self.limit, seed=self.seed,
                              bootstrap_iters=bootstrap_iters, log_samples=log_samples)

    def aggregate(self, answers: Answers) -> Scores:
        loglik, greedy = answers.loglik, answers.greedy
        fast = self._split[0]
        if fast is None:
            return Scores()
        if self._log is None:
            self.requests()
        built = self._log.built if self.aggregation_path == "direct" else None
        if built is not None and self.check_direct and not self._checked:
            self._checked = True
            want = self._replay(fast, loglik, greedy, bootstrap_iters=0, log_samples=True)
            difference = results_difference(built.results(loglik, greedy, bootstrap_iters=0, log_samples=True), want)
            if difference is not None:
                self._fall_back(f"the direct aggregation differs from lm-eval's ({difference})")
                built = None
        if built is not None:
            results = built.results(loglik, greedy, bootstrap_iters=self.bootstrap_iters, log_samples=self.documents)
        else:
            results = self._replay(fast, loglik, greedy, bootstrap_iters=self.bootstrap_iters,
                                   log_samples=self.documents)
        return scores_of(results, fast)

    def score_rest(self) -> Scores:
        slow = self._split[1]
        return Scores() if slow is None else self._evaluate(slow)

    def needs_model_per_variant(self) -> bool:
        return self._split[1] is not None

    def settings(self) -> dict[str, Any]:
        return {"tasks": self.taskset.names, "task_versions": self.taskset.describe()["versions"],
                "include_path": self.taskset.include_path, "num_fewshot": self.taskset.num_fewshot,
                "limit": self.limit, "seed": self.seed, "bootstrap_iters": self.bootstrap_iters,
                "max_length": self.context_limit(), "task_data": self.task_data()}

    def task_data(self) -> str:
        """A digest of what the tasks are (configs, request texts, gold targets): a task edited in
        place under the same name must not resume into another run's folder. The log-likelihood
        tasks' requests are the ones :meth:`requests` serves (collected here, once); generation
        tasks' are built for it."""
        if self._task_data is None:
            log, slow = self.request_log(), self._split[1]
            args = dict(log.args) if log is not None else {}
            if slow is not None:
                args.update(generation_request_args(slow, limit=self.limit, seed=self.seed))
            self._task_data = task_data_digest(self.taskset, args, limit=self.limit)
        return self._task_data


def build(setup: ScoringSetup) -> LmEvalScorer | None:
    """lm-eval's tasks when the run names some (``--tasks``)."""
    if setup.tasks is None:
        return None
    scorer = LmEvalScorer(setup.loaded, setup.tasks, limit=setup.limit, seed=setup.seed,
                          bootstrap_iters=setup.bootstrap_iters, batch_size=setup.batch_size, note=setup.note)
    setup.cache["lm-eval"] = scorer  # the task fidelity and generation scorers read its requests
    return scorer
