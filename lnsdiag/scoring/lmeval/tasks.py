"""lm-eval tasks found, loaded and configured once per run (:class:`TaskSet`), and lm-eval's
``evaluate`` run on them (:func:`evaluate_tasks`).

Pitfalls handled here (lm-eval 0.4.x): ``simple_evaluate`` ignores ``batch_size`` for a model
object and re-indexes all 14k tasks per call, so we call ``evaluate`` with a prebuilt task
dict; few-shot samplers are reseeded before every call (they advance otherwise); a task YAML
lm-eval cannot read is named with its error instead of being reported as an unknown task; the
documents a run scores are checked when loaded (:mod:`.checks`: a gold label that is not a choice,
a missing field, too many few-shot examples, an empty data file are refused in one line).
"""

from __future__ import annotations

import contextlib
import difflib
import io
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...errors import UserError
from .checks import check_tasks, load_error

DEFAULT_BOOTSTRAP = 100_000  # lm-eval's own default; mean metrics use a closed form anyway

#: Output types the fast engine serves (everything that is a log-likelihood).
LOGLIK_TYPES = ("loglikelihood", "multiple_choice", "loglikelihood_rolling")


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


def check_num_fewshot(num_fewshot: int | None) -> int | None:
    """``--num-fewshot``: None (each task's own) or a count of 0 or more."""
    if num_fewshot is not None and num_fewshot < 0:
        raise UserError(f"--num-fewshot must be 0 or more, not {num_fewshot}")
    return num_fewshot


@dataclass
class TaskSet:
    """lm-eval tasks loaded once and evaluated many times."""

    names: list[str]
    task_dict: dict[str, Any]
    num_fewshot: int | None
    include_path: str | None
    manager: Any = field(default=None, repr=False)
    #: Documents checked per leaf task (None: all of them), see :meth:`check`.
    checked: dict[str, int | None] = field(default_factory=dict, repr=False, compare=False)

    def check(self, limit: int | float | None = None) -> None:
        """Refuse (:class:`~lnsdiag.errors.UserError`, one line naming the task, document and
        field) tasks lm-eval would score wrongly without a word or fail on inside ``evaluate``:
        a gold label that is not one of its document's choices, a document with fewer than two
        choices or without a field the task reads, more few-shot examples than its split holds.
        Covers the documents ``limit`` scores; documents already checked are not read again."""
        check_tasks(self, limit, self.checked)

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


# --- loading ----------------------------------------------------------------------------------

def load_tasks(names: Sequence[str], include_path: str | Path | None = None,
               num_fewshot: int | None = None, limit: int | float | None = None) -> TaskSet:
    """Resolve task/group names (with local YAMLs first), build the task objects once, and
    check the documents ``limit`` scores (:meth:`TaskSet.check`).

    Indexing lm-eval's ~14k built-in tasks takes ~15 s, so a run whose tasks all come from
    ``include_path`` never does it.
    """
    quiet_lm_eval()
    names = [n.strip() for n in names if n and n.strip()]
    if not names:
        raise UserError("--tasks is empty")
    check_num_fewshot(num_fewshot)
    include = _check_include_path(include_path)
    manager, problems = _task_manager(names, include)
    _check_known(names, set(manager.all_tasks), problems)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            task_dict = manager.load(list(names))
    except Exception as exc:  # a task whose dataset cannot be fetched, an empty data file, a broken YAML...
        raise load_error(names, exc) from exc
    _configure_fewshot(task_dict, num_fewshot)
    tasks = TaskSet(list(names), task_dict, num_fewshot, include, manager)
    tasks.check(parse_limit(limit))
    return tasks


def _check_include_path(include_path: str | Path | None) -> str | None:
    if include_path is None:
        return None
    path = Path(include_path).expanduser()
    if not path.is_dir():
        raise UserError(f"--include-path {include_path}: no such directory")
    if not any(path.rglob("*.yaml")) and not any(path.rglob("*.yml")):
        raise UserError(f"--include-path {include_path} holds no task YAML files")
    return str(path.resolve())


def _task_manager(names: list[str], include: str | None) -> tuple[Any, list[tuple[Path, str]]]:
    """lm-eval's task index: the local YAMLs alone when they define every name, else with the
    built-in tasks; and the local YAMLs it could not read (empty when all names were local)."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=include, include_defaults=False) if include else None
    if manager is not None and all(n in manager.all_tasks for n in names):
        return manager, []
    problems = yaml_problems(include) if include else []
    for name in names:  # a local YAML that defines it but cannot be read: say so before the slow index
        if manager is not None and name not in manager.all_tasks:
            _raise_for_yaml(name, problems)
    return TaskManager(include_path=include), problems


def _check_known(names: list[str], known: set[str], problems: list[tuple[Path, str]]) -> None:
    """An unknown name fails with the close ones, or lm-eval's list, and any unreadable YAML."""
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join(close)}?" if close else " (lm-eval's task list: lm-eval ls tasks)"
            if problems:
                path, why = problems[0]
                hint += (f"; {len(problems)} task YAML file(s) in --include-path could not be read, "
                         f"e.g. {path}: {why}")
            raise UserError(f"unknown task {name!r}{hint}")


def _configure_fewshot(task_dict: dict[str, Any], num_fewshot: int | None) -> None:
    """As lm-eval's simple_evaluate: override, except where a task's config pins 0 shots."""
    for task in task_dict["tasks"].values():
        configured = task.get_config("num_fewshot")
        if num_fewshot is not None and configured != 0:
            task.set_config(key="num_fewshot", value=num_fewshot)
        elif configured is None:
            task.set_config(key="num_fewshot", value=0)


# --- task YAMLs lm-eval cannot read -----------------------------------------------------------

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


def _raise_for_yaml(name: str, problems: list[tuple[Path, str]]) -> None:
    """The YAML error behind an unknown ``name``: a broken file named after it or naming it."""
    for path, why in problems:
        try:
            text = path.read_text(errors="replace")
        except OSError:
            text = ""
        if path.stem == name or re.search(rf"(?<![\w.-]){re.escape(name)}(?![\w.-])", text):
            raise UserError(f"task YAML {path}: {why}")


# --- evaluating -------------------------------------------------------------------------------

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
    import torch

    random.seed(0)
    np.random.seed(seed)
    torch.manual_seed(seed)
