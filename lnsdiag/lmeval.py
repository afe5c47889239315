"""The lm-eval bridge: tasks loaded once, the model wrapped once, requests collected once, and
each variant's metrics aggregated by lm-eval itself.

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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .errors import UserError
from .scoring import LOWER_IS_BETTER, MetricRow, Scorer, Scores, TokenRequest
from .structure import no_cache_kwargs

if TYPE_CHECKING:
    from .models import LoadedModel

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
        manager = TaskManager(include_path=include)
    known = set(manager.all_tasks)
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join(close)}?" if close else " (lm-eval's task list: lm-eval ls tasks)"
            raise UserError(f"unknown task {name!r}{hint}")
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            task_dict = manager.load(list(names))
    except Exception as exc:  # a task whose dataset cannot be fetched, a broken YAML...
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:240]
        raise UserError(f"cannot load tasks {', '.join(names)}: {first}") from exc
    _configure_fewshot(task_dict, num_fewshot)
    return TaskSet(list(names), task_dict, num_fewshot, include, manager)


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
    """Every token-level request the tasks make, built and tokenised once by lm-eval itself."""
    seed_everything(seed)
    with lm.recording() as log:
        evaluate_tasks(lm, tasks, limit=limit, seed=seed, bootstrap_iters=0)
    return log


def replay_metrics(tasks: TaskSet, single: dict, rolling: dict, *, limit: int | float | None = None,
                   seed: int = 1234, bootstrap_iters: int = DEFAULT_BOOTSTRAP, log_samples: bool = False
                   ) -> dict[str, Any]:
    """lm-eval's results dict for stored per-request answers (no model runs)."""
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
        for example in examples:
            filt = example.get("filter", "none")
            for metric in example["metrics"]:
                name = metric if filt in ("none", "") else f"{metric}[{filt}]"
                documents.setdefault((task, name), {})[example["doc_id"]] = example[metric]
                if metric in functions:
                    aggregations[(task, name)] = aggregation_name(functions[metric])
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
    :meth:`requests` / :meth:`aggregate` (lm-eval's own aggregation of stored answers);
    generation tasks are left to :meth:`score_rest`, on the model as it is.
    """

    def __init__(self, loaded: LoadedModel, tasks: TaskSet, *, limit: int | float | None = None, seed: int = 1234,
                 bootstrap_iters: int = DEFAULT_BOOTSTRAP, batch_size: int = 8, documents: bool = True) -> None:
        self.taskset, self.limit, self.seed, self.bootstrap_iters = tasks, limit, seed, bootstrap_iters
        self.documents = documents  # keep each document's metric items (for paired comparisons)
        self.tasks = list(tasks.names)
        self.lm = make_lm(loaded, batch_size)
        self._log: RequestLog | None = None

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
        return self._log.token_requests()

    def aggregate(self, loglik: np.ndarray, greedy: np.ndarray) -> Scores:
        fast = self._split[0]
        if fast is None:
            return Scores()
        if self._log is None:
            self.requests()
        single, rolling = self._log.tables(loglik, greedy)
        return scores_of(replay_metrics(fast, single, rolling, limit=self.limit, seed=self.seed,
                                        bootstrap_iters=self.bootstrap_iters, log_samples=self.documents), fast)

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
