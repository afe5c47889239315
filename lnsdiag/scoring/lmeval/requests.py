"""lm-eval's requests collected once, and each variant's metrics aggregated from its stored answers.

:func:`collect_requests` runs lm-eval's ``evaluate`` once with a recording model: every request
it builds (its own prompts, few-shot sampling, tokenisation and windowing) is logged as token
requests (:class:`RequestLog`), and the task instances it built are kept (:class:`BuiltRequests`).
A variant's answers to those token requests then go through the tasks' own filters,
``process_results``, aggregations and group rules: the numbers lm-eval's ``evaluate`` gives,
without rebuilding every prompt per variant. Request and response caches are never used (their
keys ignore the model's state).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..base import TokenRequest
from .aggregate import aggregate_task
from .tasks import DEFAULT_BOOTSTRAP, TaskSet, evaluate_tasks, seed_everything


def request_key(instance: Any) -> tuple:
    """Identifies a request within one evaluate() call: (type, task, doc, choice index)."""
    return (instance.request_type, instance.task_name, instance.doc_id, instance.idx)


@dataclass
class RequestLog:
    """The token-level requests lm-eval made, by request key, in the order it made them."""

    single: list[tuple[tuple, TokenRequest]] = field(default_factory=list)
    rolling: list[tuple[tuple, list[TokenRequest]]] = field(default_factory=list)
    args: dict[tuple, tuple] = field(default_factory=dict)  # the text of each request, to check replays
    #: lm-eval's instances of the collecting pass, kept to aggregate variants from (None: the
    #: direct path cannot serve these tasks; ``unsupported`` says why).
    built: BuiltRequests | None = None
    unsupported: str | None = None

    def token_requests(self) -> list[TokenRequest]:
        return [r for _, r in self.single] + [w for _, windows in self.rolling for w in windows]

    def tables(self, loglik: Sequence[float], greedy: Sequence[bool]) -> tuple[dict, dict]:
        """Per-key answers for a replay: (log-likelihood, is_greedy) and rolling totals."""
        single = {key: ((float(loglik[n]), bool(greedy[n])), self.args[key]) for n, (key, _) in enumerate(self.single)}
        rolling, n = {}, len(self.single)
        for key, windows in self.rolling:
            total = sum(float(x) for x in loglik[n:n + len(windows)])  # HFLM's order and float sum
            rolling[key] = (total, self.args[key])
            n += len(windows)
        return single, rolling

    def answer_slots(self) -> dict[tuple, int | tuple[int, int]]:
        """Where each request's answer lies in :meth:`token_requests`' order: an index, or a
        rolling request's range of windows."""
        slots: dict[tuple, int | tuple[int, int]] = {key: n for n, (key, _) in enumerate(self.single)}
        start = len(self.single)
        for key, windows in self.rolling:
            slots[key] = (start, start + len(windows))
            start += len(windows)
        return slots


def collect_requests(lm: Any, tasks: TaskSet, *, limit: int | float | None = None, seed: int = 1234) -> RequestLog:
    """Every token-level request the tasks make, built and tokenised once by lm-eval itself
    (``lm``: an :class:`~lnsdiag.scoring.lmeval.lm.LnsdiagHFLM`, which records them); the task
    instances it built are kept (``log.built``) so variants aggregate without rebuilding them."""
    seed_everything(seed)
    with lm.recording() as log:
        results = evaluate_tasks(lm, tasks, limit=limit, seed=seed, bootstrap_iters=0)
    try:
        log.built = BuiltRequests.capture(tasks, log, results, limit)
    except DirectUnsupported as exc:
        log.unsupported = str(exc)
    return log


# --- aggregating a variant from stored answers, without rebuilding its requests ---------------

class DirectUnsupported(Exception):
    """The direct aggregation cannot serve these tasks (the message says why)."""


@dataclass
class _TaskRequests:
    """One leaf task's instances from the collecting pass, and where each one's answer lies."""

    name: str
    task: Any
    alias: Any
    instances: list[Any]  # in build order: the order lm-eval's filters see them in
    slots: list[int | tuple[int, int]]  # an index into the answers, or a rolling request's windows
    docs: list[tuple[Any, Any, list[int]]]  # (doc_id, doc, its instances' positions by idx), lm-eval's doc order

    @classmethod
    def capture(cls, name: str, task: Any, alias: Any, log: RequestLog, slots: dict[tuple, int | tuple[int, int]],
                sample_size: int | None) -> _TaskRequests:
        """The task's instances as the collecting pass scored them (``sample_size`` documents of
        it), grouped by document."""
        instances = list(task.instances)
        try:
            where = [slots[request_key(inst)] for inst in instances]
        except KeyError as exc:
            raise DirectUnsupported(f"{name}: a request the collecting pass did not record ({exc})") from exc
        if not instances:
            raise DirectUnsupported(f"{name}: no instances were built")
        if any(log.args[request_key(inst)] != inst.args for inst in instances):
            raise DirectUnsupported(f"{name}: its instances are not the ones the collecting pass scored")
        by_doc: dict[Any, list[int]] = {}
        for position, inst in enumerate(instances):
            by_doc.setdefault(inst.doc_id, []).append(position)
        for positions in by_doc.values():
            positions.sort(key=lambda i: instances[i].idx)
        docs = [(doc_id, doc, by_doc.get(doc_id, []))
                for doc_id, doc in task.doc_iterator(rank=0, limit=sample_size, world_size=1)]
        return cls(name, task, alias, instances, where, docs)


def _groups_bottom_up(groups: dict[str, Any]) -> list[Any]:
    """lm-eval's group order for aggregation: from each root group, children before parents."""
    from lm_eval.api.group import Group

    nested = {child.name for group in groups.values() for child in group if isinstance(child, Group)}
    order: list[Any] = []
    seen: set[str] = set()

    def visit(group: Any) -> None:
        if group.name in seen:
            return
        for child in group:
            if isinstance(child, Group):
                visit(child)
        seen.add(group.name)
        order.append(group)

    for name, group in groups.items():
        if name not in nested:
            visit(group)
    return order


@dataclass
class BuiltRequests:
    """lm-eval's task instances, built once per run, and the per-variant post-processing that
    lm-eval's ``evaluate`` would do on them: each instance's responses from the stored answers,
    the task's filters, the task's ``process_results`` per document, the task's aggregations and
    stderrs (``stderr_for_metric``), then each group's own ``aggregate``.

    Rebuilding the requests (prompts, few-shot sampling, instances) is what made one replay
    through ``evaluate`` cost seconds; none of it depends on the variant.
    """

    tasks: list[_TaskRequests]
    groups: list[Any]  # lm-eval Group objects, children before parents
    template: dict[str, Any]  # the collecting pass's results: what does not depend on the answers

    @classmethod
    def capture(cls, tasks: TaskSet, log: RequestLog, results: dict[str, Any],
                limit: int | float | None) -> BuiltRequests:
        try:
            from lm_eval.api.group import Group
            from lm_eval.evaluator_utils import get_sample_size
        except ImportError as exc:
            raise DirectUnsupported(f"this lm-eval has no {exc.name}") from exc
        if "tasks" not in tasks.task_dict:
            raise DirectUnsupported("lm-eval's legacy nested task dict")
        groups = tasks.task_dict.get("groups", {}) or {}
        if not all(isinstance(g, Group) and callable(getattr(g, "aggregate", None)) for g in groups.values()):
            raise DirectUnsupported("a group without lm-eval's Group.aggregate")
        slots = log.answer_slots()
        built = [_TaskRequests.capture(name, task, results["results"].get(name, {}).get("alias", name), log, slots,
                                       get_sample_size(task, limit))
                 for name, task in tasks.leaf_tasks.items()]
        template = {k: v for k, v in results.items() if k not in ("results", "groups", "samples")}
        return cls(built, _groups_bottom_up(groups), template)

    def results(self, loglik: Sequence[float] | np.ndarray, greedy: Sequence[bool] | np.ndarray, *,
                bootstrap_iters: int = DEFAULT_BOOTSTRAP, log_samples: bool = False) -> dict[str, Any]:
        """lm-eval's results dict for one variant's answers (same order as ``token_requests``);
        ``samples`` holds what :func:`~lnsdiag.scoring.lmeval.aggregate.scores_of` reads of
        lm-eval's logged samples."""
        values = np.asarray(loglik, dtype=np.float64).tolist()
        flags = np.asarray(greedy).tolist()
        metrics: dict[str, dict[str, Any]] = {}
        samples: dict[str, list[dict[str, Any]]] = {}
        counts = dict(self.template.get("n-samples", {}))
        with contextlib.redirect_stdout(io.StringIO()):  # the bootstrap prints
            for t in self.tasks:
                raw, logged = self._task_items(t, values, flags, log_samples)
                entry, sample_len = aggregate_task(t.task, raw, bootstrap_iters)
                metrics[t.name] = {"name": t.name, "alias": t.alias, "sample_len": sample_len, **entry}
                original = counts.get(t.name, {}).get("original")
                counts[t.name] = {"original": original, "effective": sample_len}
                if log_samples:
                    samples[t.name] = logged
        for group in self.groups:
            metrics[group.name] = group.aggregate(metrics)
        out = {**self.template, "results": {name: dict(entry) for name, entry in metrics.items()},
               "n-samples": counts}
        aggregated = {g.name: dict(metrics[g.name]) for g in self.groups if g.has_aggregation}
        if aggregated:
            out["groups"] = {name: aggregated[name] for name in metrics if name in aggregated}
        if log_samples:
            out["samples"] = samples
        return out

    @staticmethod
    def _task_items(t: _TaskRequests, values: list[float], flags: list[bool], log_samples: bool
                    ) -> tuple[dict[tuple[str, str], list[Any]], list[dict[str, Any]]]:
        """Responses in, filters applied, ``process_results`` per document: lm-eval's per-sample
        metric items ``{(metric, filter): [item per document]}`` and the logged samples."""
        for inst, slot in zip(t.instances, t.slots, strict=True):
            if isinstance(slot, tuple):
                answer: Any = sum(values[slot[0]:slot[1]])  # as RequestLog.tables: HFLM's order and float sum
            else:
                answer = (values[slot], bool(flags[slot]))
            inst.resps = [answer] * (inst.repeats if inst.repeats is not None else 1)
            inst.filtered_resps = {}
        for ensemble in getattr(t.task, "_filters", ()):
            ensemble.apply(t.instances)
        raw: dict[tuple[str, str], list[Any]] = {}
        logged: list[dict[str, Any]] = []
        for key in list(t.instances[0].filtered_resps):
            for doc_id, doc, positions in t.docs:
                requests = [t.instances[i] for i in positions]
                items = t.task.process_results(doc, [r.filtered_resps[key] for r in requests])
                if log_samples:
                    logged.append({"doc_id": doc_id, "filter": key, "metrics": list(items),
                                   "arguments": [r.args for r in requests], **items})
                for metric, item in items.items():
                    raw.setdefault((metric, key), []).append(item)
        return raw, logged
