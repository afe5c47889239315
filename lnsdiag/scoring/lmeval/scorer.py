"""The lm-eval bridge: tasks loaded once, the model wrapped once, requests (lm-eval's task
instances) built once, and each variant's metrics aggregated from its stored answers with the
tasks' own ``process_results``, aggregations and group rules (:class:`BuiltRequests`): the
numbers lm-eval's ``evaluate`` gives, without rebuilding every prompt per variant.

Pitfalls handled here (lm-eval 0.4.x): ``simple_evaluate`` ignores ``batch_size`` for a model
object and re-indexes all 14k tasks per call, so we call ``evaluate`` with a prebuilt task
dict; few-shot samplers are reseeded before every call (they advance otherwise); requests
and response caches are never used (their keys ignore the model's state).
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import io
import logging
import math
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ...errors import UserError
from ...model.structure import no_cache_kwargs
from ..base import LOWER_IS_BETTER, MetricRow, Scorer, Scores, TokenRequest
from ..registry import ScoringSetup

if TYPE_CHECKING:
    from ...model.load import LoadedModel

DEFAULT_BOOTSTRAP = 100_000  # lm-eval's own default; mean metrics use a closed form anyway


def quiet_lm_eval() -> None:
    """Stop lm-eval's loggers and tqdm bars from writing between our progress bars."""
    import tqdm as tqdm_module

    logging.getLogger("lm_eval").setLevel(logging.ERROR)

    def silent_tqdm(*args: Any, **kwargs: Any) -> Any:
        kwargs["disable"] = True
        return tqdm_module.tqdm(*args, **kwargs)

    import lm_eval.api.model
    import lm_eval.api.task
    import lm_eval.models.huggingface

    for module in (lm_eval.api.task, lm_eval.api.model, lm_eval.models.huggingface):
        if hasattr(module, "tqdm"):
            module.tqdm = silent_tqdm


def parse_limit(limit: str | float | int | None) -> int | float | None:
    """``--limit``: a count of documents per task (``100``) or a fraction (``0.1``)."""
    if limit is None or (isinstance(limit, str) and not limit.strip()):
        return None
    try:
        value = float(limit)
    except (TypeError, ValueError) as exc:
        raise UserError(f"--limit {limit!r} must be a count (100) or a fraction (0.1)") from exc
    if value <= 0:
        raise UserError(f"--limit must be positive, not {limit}")
    if value < 1:
        return value
    if value != int(value):
        raise UserError(f"--limit {limit}: a count must be a whole number (fractions are below 1)")
    return int(value)


#: Output types the fast engine serves (everything that is a log-likelihood).
LOGLIK_TYPES = ("loglikelihood", "multiple_choice", "loglikelihood_rolling")


@dataclass
class TaskSet:
    """lm-eval tasks loaded once and evaluated many times."""

    names: list[str]
    task_dict: dict[str, Any]
    num_fewshot: int | None
    include_path: str | None
    manager: Any = field(default=None, repr=False)

    def leaves_of(self, name: str) -> list[str] | None:
        """Leaf tasks under a requested name (None for a tag, whose members are not recorded)."""
        if name in self.leaf_tasks:
            return [name]
        if name not in self.task_dict.get("group_map", {}):
            return None
        out: list[str] = []
        for child in self.task_dict["group_map"][name]:
            child_name = child if isinstance(child, str) else getattr(child, "group_name", str(child))
            out += self.leaves_of(child_name) or []
        return out

    def split_by_output(self) -> tuple[list[str], list[str]]:
        """Requested names whose tasks are all log-likelihoods, and the others (generation)."""
        types = self.output_types()
        if all(t in LOGLIK_TYPES for t in types.values()):
            return list(self.names), []
        fast, slow = [], []
        for name in self.names:
            leaves = self.leaves_of(name)
            ok = leaves is not None and all(types.get(leaf) in LOGLIK_TYPES for leaf in leaves)
            (fast if ok else slow).append(name)
        return fast, slow

    def subset(self, names: list[str]) -> TaskSet:
        """The same tasks, configured the same way, for some of the requested names."""
        if names == self.names:
            return self
        with contextlib.redirect_stdout(io.StringIO()):
            task_dict = self.manager.load(list(names))
        _configure_fewshot(task_dict, self.num_fewshot)
        return TaskSet(list(names), task_dict, self.num_fewshot, self.include_path, self.manager)

    @property
    def leaf_tasks(self) -> dict[str, Any]:
        return self.task_dict["tasks"]

    def output_types(self) -> dict[str, str]:
        return {name: task.OUTPUT_TYPE for name, task in self.leaf_tasks.items()}

    def reseed(self, seed: int) -> None:
        for task in self.leaf_tasks.values():
            task.set_fewshot_seed(seed=seed)

    def describe(self) -> dict[str, Any]:
        return {"tasks": self.names, "leaf_tasks": sorted(self.leaf_tasks), "num_fewshot": self.num_fewshot,
                "include_path": self.include_path,
                "versions": {n: t.VERSION for n, t in self.leaf_tasks.items()}}


def check_num_fewshot(num_fewshot: int | None) -> int | None:
    """``--num-fewshot``: None (each task's own) or a count of 0 or more."""
    if num_fewshot is not None and num_fewshot < 0:
        raise UserError(f"--num-fewshot must be 0 or more, not {num_fewshot}")
    return num_fewshot


def _check_include_path(include_path: str | Path | None) -> str | None:
    if include_path is None:
        return None
    path = Path(include_path).expanduser()
    if not path.is_dir():
        raise UserError(f"--include-path {include_path}: no such directory")
    if not any(path.rglob("*.yaml")) and not any(path.rglob("*.yml")):
        raise UserError(f"--include-path {include_path} holds no task YAML files")
    return str(path.resolve())


def load_tasks(names: Sequence[str], include_path: str | Path | None = None,
               num_fewshot: int | None = None) -> TaskSet:
    """Resolve task/group names (with local YAMLs first) and build the task objects once.

    Indexing lm-eval's ~14k built-in tasks takes ~15 s, so a run whose tasks all come from
    ``include_path`` never does it.
    """
    from lm_eval.tasks import TaskManager

    quiet_lm_eval()
    names = [n.strip() for n in names if n and n.strip()]
    if not names:
        raise UserError("--tasks is empty")
    check_num_fewshot(num_fewshot)
    include = _check_include_path(include_path)
    manager = TaskManager(include_path=include, include_defaults=False) if include else None
    if manager is None or any(n not in manager.all_tasks for n in names):
        problems = yaml_problems(include) if include else []
        for name in names:  # a local YAML that defines it but cannot be read: say so before the slow index
            if manager is not None and name not in manager.all_tasks:
                _raise_for_yaml(name, problems)
        manager = TaskManager(include_path=include)
    else:
        problems = []
    known = set(manager.all_tasks)
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join(close)}?" if close else " (lm-eval's task list: lm-eval ls tasks)"
            if problems:
                path, why = problems[0]
                hint += (f"; {len(problems)} task YAML file(s) in --include-path could not be read, "
                         f"e.g. {path}: {why}")
            raise UserError(f"unknown task {name!r}{hint}")
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            task_dict = manager.load(list(names))
    except Exception as exc:  # a task whose dataset cannot be fetched, a broken YAML...
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:240]
        raise UserError(f"cannot load tasks {', '.join(names)}: {first}") from exc
    _configure_fewshot(task_dict, num_fewshot)
    return TaskSet(list(names), task_dict, num_fewshot, include, manager)


def _one_line(exc: Exception) -> str:
    """A YAML parser's (or loader's) message on one line: the problem and where it is."""
    import yaml

    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        context = f" ({exc.context})" if exc.context else ""
        return f"{where}{exc.problem or exc.context}{context}"
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:240]


def yaml_problems(include_path: str | Path) -> list[tuple[Path, str]]:
    """Task YAMLs under ``include_path`` that lm-eval's indexer skips without a word (it then
    reports their tasks as unknown): each file with the reason, on one line.

    Read the way lm-eval's index reads them (its loader, ``include:`` resolved, functions not
    imported), so a file listed here is exactly one lm-eval could not index.
    """
    try:
        from lm_eval.tasks._index import TaskIndex
        from lm_eval.tasks._yaml_loader import load_yaml
    except ImportError:  # another lm-eval layout: nothing to add to its own message
        return []
    problems = []
    for path in TaskIndex._iter_yaml_files(Path(include_path)):
        try:
            TaskIndex.process_cfg(load_yaml(path, resolve_func=False, recursive=True), path, {})
        except Exception as exc:  # whatever makes lm-eval skip the file
            if "Unknown config shape" in str(exc):
                why = "defines neither `task:` nor `group:`"
            elif isinstance(exc, ValueError) and "Expected YAML dict" in str(exc):
                why = "is not a YAML mapping"
            else:
                why = _one_line(exc)
            problems.append((path, why))
    return problems


def _raise_for_yaml(name: str, problems: list[tuple[Path, str]]) -> None:
    """The YAML error behind an unknown ``name``: a broken file named after it or naming it."""
    for path, why in problems:
        try:
            text = path.read_text(errors="replace")
        except OSError:
            text = ""
        if path.stem == name or re.search(rf"(?<![\w.-]){re.escape(name)}(?![\w.-])", text):
            raise UserError(f"task YAML {path}: {why}")


def _configure_fewshot(task_dict: dict[str, Any], num_fewshot: int | None) -> None:
    """As lm-eval's simple_evaluate: override, except where a task's config pins 0 shots."""
    for task in task_dict["tasks"].values():
        configured = task.get_config("num_fewshot")
        if num_fewshot is not None and configured != 0:
            task.set_config(key="num_fewshot", value=num_fewshot)
        elif configured is None:
            task.set_config(key="num_fewshot", value=0)


# --- lm-eval: the model -----------------------------------------------------------------------

def _request_key(instance: Any) -> tuple:
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


@functools.cache
def _lm_classes() -> tuple[type, type]:
    """lm-eval model classes, built on first use (importing lm-eval takes seconds)."""
    from lm_eval import utils as lm_utils
    from lm_eval.api.model import LM
    from lm_eval.models.huggingface import HFLM

    class LnsdiagHFLM(HFLM):
        """HFLM whose scoring passes build no KV cache (removed layers then cost nothing), and
        which can record lm-eval's tokenised requests (its own encoding and windowing) instead
        of scoring them (:meth:`recording`)."""

        log: RequestLog | None = None

        @contextlib.contextmanager
        def recording(self) -> Iterator[RequestLog]:
            self.log, self._pending = RequestLog(), []
            try:
                yield self.log
            finally:
                self.log = None

        def _model_call(self, inps: torch.Tensor, attn_mask: Any = None, labels: Any = None) -> torch.Tensor:
            if attn_mask is not None or labels is not None:
                return super()._model_call(inps, attn_mask, labels)
            with torch.no_grad():
                return self.model(inps, **no_cache_kwargs(self.model)).logits

        def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list:
            if self.log is not None:
                self._pending = requests  # HFLM encodes them, then calls _loglikelihood_tokens
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm or self.log is not None)

        def _loglikelihood_tokens(self, requests: list, disable_tqdm: bool = False, override_bs: Any = None) -> list:
            if self.log is None:
                return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
            for instance, (_, context, continuation) in zip(self._pending, requests, strict=True):
                key = _request_key(instance)
                self.log.single.append((key, TokenRequest(tuple(context), tuple(continuation))))
                self.log.args[key] = instance.args
            return [(0.0, False)] * len(requests)

        def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list:
            if self.log is None:
                return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm)
            for instance in requests:
                windows = map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(instance.args[0]), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1))
                key = _request_key(instance)
                self.log.rolling.append((key, [TokenRequest(tuple(c), tuple(t)) for c, t in windows]))
                self.log.args[key] = instance.args
            return [0.0] * len(requests)

        def generate_until(self, requests: list, disable_tqdm: bool = False) -> list:
            if self.log is not None:
                raise RuntimeError("generation tasks are scored by the naive engine")
            return super().generate_until(requests, disable_tqdm=disable_tqdm)

    class ReplayLM(LM):
        """Hands stored per-request answers to lm-eval, which aggregates metrics and stderr."""

        def __init__(self, single: dict, rolling: dict) -> None:
            super().__init__()
            self.single, self.rolling = single, rolling

        @staticmethod
        def _answer(table: dict, request: Any) -> Any:
            answer, args = table[_request_key(request)]
            if args != request.args:  # few-shot sampling or data differ from the collected run
                raise RuntimeError(f"replayed request {_request_key(request)} does not match the scored one")
            return answer

        def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list:
            return [self._answer(self.single, r) for r in requests]

        def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list:
            return [self._answer(self.rolling, r) for r in requests]

        def generate_until(self, requests: list, disable_tqdm: bool = False) -> list:
            raise RuntimeError("generation tasks are scored by the naive engine")

    return LnsdiagHFLM, ReplayLM


def make_lm(loaded: LoadedModel, batch_size: int | str = 8, max_length: int | None = None) -> Any:
    """Wrap the loaded model for lm-eval, once per run (not once per variant).

    Log-softmax runs in float32 whatever the model dtype (lm-eval's default would keep bf16
    and sum bf16 log-probs); a scoring pass builds no KV cache, so removed layers cost nothing.
    """
    quiet_lm_eval()
    hflm, _ = _lm_classes()
    with contextlib.redirect_stdout(io.StringIO()):
        return hflm(pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=batch_size,
                    max_length=max_length, softmax_dtype=torch.float32, logits_cache=True)


def collect_requests(lm: Any, tasks: TaskSet, *, limit: int | float | None = None, seed: int = 1234) -> RequestLog:
    """Every token-level request the tasks make, built and tokenised once by lm-eval itself; the
    task instances it built are kept (``log.built``) so variants aggregate without rebuilding them."""
    seed_everything(seed)
    with lm.recording() as log:
        results = evaluate_tasks(lm, tasks, limit=limit, seed=seed, bootstrap_iters=0)
    try:
        log.built = BuiltRequests.capture(tasks, log, results, limit)
    except DirectUnsupported as exc:
        log.unsupported = str(exc)
    return log


# --- lm-eval: aggregating a variant from stored answers, without rebuilding its requests -------

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
        slots: dict[tuple, int | tuple[int, int]] = {key: n for n, (key, _) in enumerate(log.single)}
        start = len(log.single)
        for key, windows in log.rolling:
            slots[key] = (start, start + len(windows))
            start += len(windows)
        built = []
        for name, task in tasks.leaf_tasks.items():
            instances = list(task.instances)
            try:
                where = [slots[_request_key(inst)] for inst in instances]
            except KeyError as exc:
                raise DirectUnsupported(f"{name}: a request the collecting pass did not record ({exc})") from exc
            if not instances:
                raise DirectUnsupported(f"{name}: no instances were built")
            if any(log.args[_request_key(inst)] != inst.args for inst in instances):
                raise DirectUnsupported(f"{name}: its instances are not the ones the collecting pass scored")
            by_doc: dict[Any, list[int]] = {}
            for position, inst in enumerate(instances):
                by_doc.setdefault(inst.doc_id, []).append(position)
            for positions in by_doc.values():
                positions.sort(key=lambda i: instances[i].idx)
            docs = [(doc_id, doc, by_doc.get(doc_id, []))
                    for doc_id, doc in task.doc_iterator(rank=0, limit=get_sample_size(task, limit), world_size=1)]
            alias = results["results"].get(name, {}).get("alias", name)
            built.append(_TaskRequests(name, task, alias, instances, where, docs))
        template = {k: v for k, v in results.items() if k not in ("results", "groups", "samples")}
        return cls(built, _groups_bottom_up(groups), template)

    def results(self, loglik: Sequence[float] | np.ndarray, greedy: Sequence[bool] | np.ndarray, *,
                bootstrap_iters: int = DEFAULT_BOOTSTRAP, log_samples: bool = False) -> dict[str, Any]:
        """lm-eval's results dict for one variant's answers (same order as ``token_requests``);
        ``samples`` holds what :func:`scores_of` reads of lm-eval's logged samples."""
        values = np.asarray(loglik, dtype=np.float64).tolist()
        flags = np.asarray(greedy).tolist()
        metrics: dict[str, dict[str, Any]] = {}
        samples: dict[str, list[dict[str, Any]]] = {}
        counts = dict(self.template.get("n-samples", {}))
        with contextlib.redirect_stdout(io.StringIO()):  # the bootstrap prints
            for t in self.tasks:
                raw, logged = self._task_items(t, values, flags, log_samples)
                entry, sample_len = _aggregate_task(t.task, raw, bootstrap_iters)
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


def _aggregate_task(task: Any, raw: dict[tuple[str, str], list[Any]], bootstrap_iters: int | None
                    ) -> tuple[dict[str, Any], int]:
    """A task's metrics and stderrs from its per-document items, as lm-eval's evaluator computes
    them: the task's aggregation (``mean`` where it has none), ``stderr_for_metric`` (closed form
    or lm-eval's seeded bootstrap, capped at 100 draws for bleu/chrf/ter), "N/A" where none."""
    from lm_eval.api.metrics import mean, stderr_for_metric

    entry: dict[str, Any] = {}
    sample_len = 0
    functions = task.aggregation()
    for (metric, key), items in raw.items():
        try:
            function = functions[metric]
        except KeyError:
            function = mean
        entry[f"{metric},{key}"] = function(items)
        sample_len = max(sample_len, len(items))
        stderr: Any = "N/A"
        if isinstance(bootstrap_iters, int) and bootstrap_iters > 0:
            iters = min(bootstrap_iters, 100) if metric in ("bleu", "chrf", "chrf++", "ter") else bootstrap_iters
            stderr_fn = stderr_for_metric(metric=function, bootstrap_iters=iters)
            if stderr_fn is not None and len(items) > 1:
                stderr = stderr_fn(items)
        entry[f"{metric}_stderr,{key}"] = stderr
    return entry, sample_len


def _same_item(a: Any, b: Any) -> bool:
    """Exact equality of metric items (floats, NaN, tuples, numpy arrays)."""
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return np.array_equal(np.asarray(a), np.asarray(b), equal_nan=True)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same_item(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_item(a[k], b[k]) for k in a)
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    try:
        return bool(a == b)
    except (TypeError, ValueError):
        return repr(a) == repr(b)


def results_difference(got: dict[str, Any], want: dict[str, Any]) -> str | None:
    """Where two lm-eval results dicts disagree (metrics, stderrs, per-document items), or None."""
    if list(got["results"]) != list(want["results"]):
        return f"tasks/groups {list(got['results'])} vs {list(want['results'])}"
    for name, entry in want["results"].items():
        mine = got["results"][name]
        if list(mine) != list(entry):
            return f"{name}: keys {list(mine)} vs {list(entry)}"
        for key, value in entry.items():
            if not _same_item(mine[key], value):
                return f"{name}: {key} is {mine[key]!r}, lm-eval gives {value!r}"
    for name, examples in (want.get("samples") or {}).items():
        mine_examples = (got.get("samples") or {}).get(name, [])
        if len(mine_examples) != len(examples):
            return f"{name}: {len(mine_examples)} documents vs {len(examples)}"
        for a, b in zip(mine_examples, examples, strict=True):
            fields = ("doc_id", "filter", "metrics", "arguments", *b["metrics"])
            for key in fields:
                if not _same_item(a.get(key), b.get(key)):
                    return f"{name}: document {b['doc_id']}: {key} is {a.get(key)!r}, lm-eval gives {b.get(key)!r}"
    return None


def replay_metrics(tasks: TaskSet, single: dict, rolling: dict, *, limit: int | float | None = None,
                   seed: int = 1234, bootstrap_iters: int = DEFAULT_BOOTSTRAP, log_samples: bool = False
                   ) -> dict[str, Any]:
    """lm-eval's results dict for stored per-request answers, through lm-eval's own ``evaluate``
    (no model runs, but every request is rebuilt: seconds per call). The reference the direct
    aggregation is checked against, and its fallback."""
    _, replay_cls = _lm_classes()
    seed_everything(seed)
    return evaluate_tasks(replay_cls(single, rolling), tasks, limit=limit, seed=seed,
                          bootstrap_iters=bootstrap_iters, log_samples=log_samples)


def _registry() -> Any:
    import lm_eval.api.metrics  # noqa: F401  (registers lm-eval's aggregations)
    from lm_eval.api.registry import AGGREGATION_REGISTRY

    return AGGREGATION_REGISTRY


def aggregation_name(function: Any) -> str:
    """lm-eval's registry name of an aggregation function (``mean``, ``weighted_perplexity``...);
    ``custom:<name>`` for a task's own function (it cannot be looked up again by name)."""
    registry = _registry()
    for name in list(registry):
        try:
            if registry.get(name) is function:
                return str(name)
        except KeyError:
            continue
    return f"custom:{getattr(function, '__qualname__', getattr(function, '__name__', str(function)))}"


def aggregation_function(name: str) -> Any:
    """The aggregation function lm-eval registers under ``name``, or None (a task's own function)."""
    if not name or name.startswith("custom:"):
        return None
    try:
        return _registry().get(name)
    except KeyError:
        return None


def scores_of(results: dict[str, Any], tasks: TaskSet) -> Scores:
    """Tidy rows, and (when lm-eval logged samples) what paired comparisons need: each document's
    metric items, each metric's aggregation (by lm-eval's registry name), each group's leaf
    tasks, and each multiple-choice document's number of choices."""
    documents: dict[tuple[str, str], dict[Any, Any]] = {}
    aggregations: dict[tuple[str, str], str] = {}
    choices: dict[str, dict[Any, int]] = {}
    for task, examples in (results.get("samples") or {}).items():
        task_obj = tasks.leaf_tasks.get(task)
        functions = task_obj.aggregation() if task_obj is not None else {}
        multiple_choice = getattr(task_obj, "OUTPUT_TYPE", "") == "multiple_choice"
        names = {metric: aggregation_name(function) for metric, function in functions.items()}
        for example in examples:
            filt = example.get("filter", "none")
            for metric in example["metrics"]:
                name = metric if filt in ("none", "") else f"{metric}[{filt}]"
                documents.setdefault((task, name), {})[example["doc_id"]] = example[metric]
                if metric in names:
                    aggregations[(task, name)] = names[metric]
            if multiple_choice:  # distinct continuations: mutual-information tasks score each choice twice
                choices.setdefault(task, {})[example["doc_id"]] = len({tuple(a)[-1] for a in example["arguments"]})
    groups = {group: tasks.leaves_of(group) or [] for group in results.get("group_subtasks", {})
              if group not in tasks.leaf_tasks}
    return Scores(tidy_metrics(results), documents=documents, choices=choices, aggregations=aggregations,
                  groups=groups)


def evaluate_tasks(lm: Any, tasks: TaskSet, *, limit: int | float | None = None, seed: int = 1234,
                   bootstrap_iters: int = DEFAULT_BOOTSTRAP, log_samples: bool = False) -> dict[str, Any]:
    """Run lm-eval's ``evaluate`` on the model as it is now; returns lm-eval's results dict
    (with ``samples``, each document's metric items, when ``log_samples``)."""
    from lm_eval.evaluator import evaluate

    tasks.reseed(seed)
    with contextlib.redirect_stdout(io.StringIO()):  # the bootstrap prints
        results = evaluate(lm=lm, task_dict=tasks.task_dict, limit=limit, bootstrap_iters=bootstrap_iters,
                           log_samples=log_samples)
    if results is None:  # non-zero ranks in distributed runs
        raise RuntimeError("lm-eval returned no results")
    return results


def seed_everything(seed: int) -> None:
    """Seed python/numpy/torch as lm-eval's ``simple_evaluate`` does (0, seed, seed)."""
    import random

    import numpy as np

    random.seed(0)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _warn(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def _number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def tidy_metrics(results: dict[str, Any]) -> list[MetricRow]:
    """lm-eval's nested results as rows: every task and group, every metric, with its stderr."""
    rows = []
    higher = results.get("higher_is_better", {})
    groups = set(results.get("groups", {})) | set(results.get("group_subtasks", {}))
    samples = results.get("n-samples", {})
    for task, entry in results["results"].items():
        for key, value in entry.items():
            if "," not in key or "_stderr," in key or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            metric, _, filt = key.partition(",")
            name = metric if filt in ("none", "") else f"{metric}[{filt}]"
            stderr = _number(entry.get(f"{metric}_stderr,{filt}"))
            hib = higher.get(task, {}).get(metric, metric not in LOWER_IS_BETTER)
            count = samples.get(task, {}).get("effective") if isinstance(samples.get(task), dict) else None
            if count is None and isinstance(entry.get("sample_len"), int):
                count = entry["sample_len"]
            rows.append(MetricRow(task, name, float(value), stderr, bool(hib), count, task in groups))
    return rows


class LmEvalScorer(Scorer):
    """lm-eval tasks as a :class:`~lnsdiag.scoring.Scorer`: one HFLM and one task set per run.

    Tasks whose requests are all log-likelihoods are served to the fast engine through
    :meth:`requests` / :meth:`aggregate`: lm-eval builds their instances once, and each variant
    is aggregated from its stored answers with the tasks' own ``process_results`` and
    aggregations (:class:`BuiltRequests`), not by rebuilding everything in ``evaluate``.
    The first variant is also replayed through ``evaluate`` (``check_direct``): should the two
    differ (a task whose post-processing is unusual), or should the direct path not apply,
    every variant is replayed through ``evaluate`` instead and ``note`` says so.
    Generation tasks are left to :meth:`score_rest`, on the model as it is.
    """

    def __init__(self, loaded: LoadedModel, tasks: TaskSet, *, limit: int | float | None = None, seed: int = 1234,
                 bootstrap_iters: int = DEFAULT_BOOTSTRAP, batch_size: int = 8, documents: bool = True,
                 check_direct: bool = True, note: Callable[[str], None] | None = None) -> None:
        self.taskset, self.limit, self.seed, self.bootstrap_iters = tasks, limit, seed, bootstrap_iters
        self.documents = documents  # keep each document's metric items (for paired comparisons)
        self.tasks = list(tasks.names)
        self.lm = make_lm(loaded, batch_size)
        self.check_direct = check_direct
        self.note = note or _warn
        #: How variants are aggregated: "direct" (instances built once) or "replay" (lm-eval's
        #: evaluate per variant); ``fallback`` says why when it is "replay".
        self.aggregation_path = "direct"
        self.fallback: str | None = None
        self._log: RequestLog | None = None
        self._checked = False

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
        fast = self._split[0]
        if fast is None:
            return []
        if self._log is None:
            self._log = collect_requests(self.lm, fast, limit=self.limit, seed=self.seed)
            if self._log.built is None:
                self._fall_back(self._log.unsupported or "no instances were kept")
        return self._log.token_requests()

    def _fall_back(self, why: str) -> None:
        self.aggregation_path, self.fallback = "replay", why
        self.note(f"lm-eval metrics are aggregated through lm-eval's evaluate for every variant (slower): {why}")

    def run_stats(self) -> dict[str, Any]:
        return self.aggregation_stats()

    def aggregation_stats(self) -> dict[str, Any]:
        """For the run's record: how variants were aggregated, and why not directly if not."""
        return {"lm_eval_aggregation": self.aggregation_path, "lm_eval_aggregation_fallback": self.fallback}

    def _replay(self, fast: TaskSet, loglik: np.ndarray, greedy: np.ndarray, *, bootstrap_iters: int,
                log_samples: bool) -> dict[str, Any]:
        single, rolling = self._log.tables(loglik, greedy)
        return replay_metrics(fast, single, rolling, limit=self.limit, seed=self.seed,
                              bootstrap_iters=bootstrap_iters, log_samples=log_samples)

    def aggregate(self, loglik: np.ndarray, greedy: np.ndarray) -> Scores:
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
                "max_length": self.context_limit()}


def build(setup: ScoringSetup) -> LmEvalScorer | None:
    """lm-eval's tasks when the run names some (``--tasks``)."""
    if setup.tasks is None:
        return None
    return LmEvalScorer(setup.loaded, setup.tasks, limit=setup.limit, seed=setup.seed,
                        bootstrap_iters=setup.bootstrap_iters, batch_size=setup.batch_size, note=setup.note)
