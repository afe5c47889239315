"""lm-eval tasks checked before a run writes anything: what lm-eval would score wrongly without a
word, or fail on deep inside ``evaluate``, refused with one line naming the task, the document
and the field (:func:`check_tasks`, :func:`load_error`).

lm-eval scores a multiple-choice document whose gold label is out of range, negative or not one
of its choices as a wrong answer (with a warning lnsdiag keeps quiet), and one with a single
choice as always right; it fails inside ``evaluate`` on a document missing a field its
``doc_to_choice`` reads, on a ``num_fewshot`` larger than its few-shot split, and while loading
on an empty data file. The checks ask the task's own ``doc_to_text`` / ``doc_to_choice`` /
``doc_to_target`` and few-shot sampler (what lm-eval builds its requests from) for every
document a run scores, and resolve the gold answer by ``process_results``' rule.
"""

from __future__ import annotations

import functools
import numbers
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...errors import UserError

if TYPE_CHECKING:
    from .tasks import TaskSet

#: What the task's own ``doc_to_*`` raise on a document they cannot read (a field that is not
#: there, a choice list that is not a list literal): reported with the document, never hidden.
DOC_ERRORS: tuple[type[Exception], ...] = (TypeError, KeyError, IndexError, ValueError, SyntaxError,
                                           AttributeError)
#: What lm-eval's few-shot samplers draw: a pool, ``num_fewshot`` at a time (a custom sampler
#: draws its own way and is left to itself).
KNOWN_SAMPLERS = ("ContextSampler", "FirstNSampler")


def check_tasks(tasks: TaskSet, limit: int | float | None, checked: dict[str, int | None]) -> None:
    """Every leaf task's documents that ``limit`` scores, and its few-shot pool, as lm-eval will
    read them; ``checked`` (task → documents checked, None: all) is updated, and tasks it already
    covers are skipped."""
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.evaluator_utils import get_sample_size

    for name, task in tasks.leaf_tasks.items():
        if not isinstance(task, ConfigurableTask):  # a Python task class: its own methods, not a config
            continue
        size = get_sample_size(task, limit)
        if name in checked and (checked[name] is None or (size is not None and checked[name] >= size)):
            continue
        option = "--num-fewshot" if tasks.num_fewshot is not None else "num_fewshot (its config)"
        _check_fewshot(name, task, option)
        _check_documents(name, task, size)
        checked[name] = size


# --- few-shot -----------------------------------------------------------------------------------

def _check_fewshot(name: str, task: Any, option: str) -> None:
    """``num_fewshot`` examples can be drawn for every document, and each one drawn can be shown."""
    shots = task.get_config("num_fewshot") or 0
    if shots <= 0:
        return
    sampler = getattr(task, "sampler", None)
    if sampler is None:
        raise UserError(f"task {name}: {option} {shots}, but the task has no few-shot documents")
    if type(sampler).__name__ not in KNOWN_SAMPLERS:
        return
    pool = sampler.fewshot_docs()
    split = _fewshot_split(task)
    same = task.fewshot_cfg.split == task.config.test_split  # lm-eval leaves the document itself out
    if shots > len(pool) - int(same):
        own = ", less the document being asked" if same else ""
        raise UserError(f"task {name}: {option} {shots} is more than its few-shot split {split} holds "
                        f"({len(pool)} documents{own})")
    for doc_id, doc in enumerate(pool):
        _check_doc(name, task, doc_id, doc, fewshot=split)


def _fewshot_split(task: Any) -> str:
    """The split lm-eval draws few-shot examples from (as ``Task.fewshot_docs`` picks it)."""
    config = task.config
    if task.fewshot_cfg.split is not None:
        return repr(task.fewshot_cfg.split)
    if task.fewshot_cfg.samples is not None:
        return "(fewshot_config samples)"
    split = config.training_split or config.validation_split or config.test_split
    return repr(split)


# --- documents ----------------------------------------------------------------------------------

def _check_documents(name: str, task: Any, size: int | None) -> None:
    for doc_id, doc in task.doc_iterator(rank=0, limit=size, world_size=1):
        _check_doc(name, task, doc_id, doc)


def _check_doc(name: str, task: Any, doc_id: int, doc: Any, fewshot: str | None = None) -> None:
    """One document as lm-eval reads it: every field its ``doc_to_*`` use is there, they give a
    text, choices and a target, and a multiple-choice document's gold answer is one of its
    (at least two) choices. ``fewshot``: the few-shot split the document comes from."""
    where = f"task {name}, few-shot doc_id {doc_id} of split {fewshot}" if fewshot else f"task {name}, doc_id {doc_id}"
    config = task.fewshot_cfg if fewshot else task.config
    specs = {"doc_to_text": config.doc_to_text or task.config.doc_to_text,
             "doc_to_choice": config.doc_to_choice or task.config.doc_to_choice,
             "doc_to_target": config.doc_to_target or task.config.doc_to_target}
    if task.prompt is None and isinstance(doc, dict):
        for what, spec in specs.items():
            missing = _missing_fields(task, doc, spec)
            if missing:
                raise UserError(f"{where}: {_fields(missing)} missing (or null) in the data, and {what} uses "
                                f"{'it' if len(missing) == 1 else 'them'}")
    text = _read(where, "doc_to_text", task.doc_to_text, doc, specs["doc_to_text"])
    if not task.multiple_input and not isinstance(text, str):
        raise UserError(f"{where}: doc_to_text gives {_short(text)}, not a text")
    target = _read(where, "doc_to_target", task.doc_to_target, doc, specs["doc_to_target"])
    if task.config.doc_to_choice is None or task.OUTPUT_TYPE != "multiple_choice":
        if task.OUTPUT_TYPE in ("loglikelihood", "loglikelihood_rolling") and not isinstance(target, str):
            raise UserError(f"{where}: doc_to_target gives {_short(target)}, not a text to score")
        return
    choices = _read(where, "doc_to_choice", task.doc_to_choice, doc, specs["doc_to_choice"])
    if not isinstance(choices, (list, tuple)) or not all(isinstance(c, str) for c in choices):
        raise UserError(f"{where}: doc_to_choice gives {_short(choices)}, not a list of texts")
    if fewshot:  # shown as an example: an index must pick one of its choices
        if _is_index(target) and not 0 <= target < len(choices):
            raise UserError(f"{where}: gold label {target} is out of range for its {len(choices)} choices "
                            f"(0 to {len(choices) - 1})")
        return
    if len(choices) < 2:
        raise UserError(f"{where}: {len(choices)} choice{'' if len(choices) == 1 else 's'} "
                        f"({_short(choices)}); a multiple-choice document needs at least 2")
    gold, source = (text, "doc_to_text") if task.multiple_input else (target, "doc_to_target")
    problem = _gold_problem(gold, choices)
    if problem is not None:
        spec = specs[source]
        hint = ""
        if isinstance(spec, str) and spec.isidentifier() and spec not in task.features and gold == spec:
            hint = f"; {source} {spec!r} names no field of the documents (they have {', '.join(task.features)})"
        elif isinstance(spec, str) and len(spec) <= 60:
            hint = f" ({source}: {spec})"
        raise UserError(f"{where}: {problem}{hint}")


def _read(where: str, what: str, method: Callable[..., Any], doc: Any, spec: Any) -> Any:
    """``method(doc, spec)``, the task's own reading; its failure on this document named, with
    the document's null fields (a JSONL line without them), the likely cause."""
    from jinja2.exceptions import TemplateError

    try:
        return method(doc, spec)
    except (*DOC_ERRORS, TemplateError) as exc:
        nulls = [key for key, value in doc.items() if value is None] if isinstance(doc, dict) else []
        cause = f"; missing (or null) in the data: {', '.join(map(repr, nulls))}" if nulls else ""
        raise UserError(f"{where}: {what} fails on it: {type(exc).__name__}: {_one_line(exc)}{cause}") from exc


def _gold_problem(gold: Any, choices: list[str] | tuple[str, ...]) -> str | None:
    """What is wrong with a gold answer by ``process_results``' rule (an index, a choice's text,
    or a list of indices), or None."""
    n = len(choices)
    span = f"its {n} choices (0 to {n - 1})"
    if isinstance(gold, list):
        bad = [g for g in gold if not (_is_index(g) and 0 <= g < n)]
        return f"gold labels {_short(bad)} are not indices into {span}" if bad or not gold else None
    if _is_index(gold):
        return None if 0 <= gold < n else f"gold label {gold} is out of range for {span}"
    if isinstance(gold, str):
        return None if gold in choices else f"gold answer {_short(gold)} is not one of its choices {_short(choices)}"
    return f"gold label {_short(gold)} is neither a choice's index nor its text"


def _is_index(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


# --- fields a document lacks ----------------------------------------------------------------------

class _PrintsNull(Exception):
    """A template prints a null value (lm-eval would print it as ``None``)."""


def _missing_fields(task: Any, doc: dict, spec: Any) -> list[str]:
    """Fields of ``doc`` that are null (a JSONL line without them) and that ``spec`` reads: a field
    named as such, or printed by a template (one that tests it, ``{% if x is none %}``, is fine)."""
    from jinja2 import meta
    from jinja2.exceptions import TemplateError

    nulls = {key for key, value in doc.items() if value is None}
    if not nulls or not isinstance(spec, str):
        return []
    if spec in task.features:
        return [spec] if spec in nulls else []
    try:
        template, parsed = _strict_template(spec)
    except TemplateError:
        return []  # lm-eval's own reading reports it
    used = sorted(nulls & meta.find_undeclared_variables(parsed))
    if not used:
        return []
    try:
        template.render(**doc)
    except (_PrintsNull, TypeError, AttributeError, TemplateError):
        return used
    return []


@functools.lru_cache(maxsize=256)
def _strict_template(spec: str) -> tuple[Any, Any]:
    """``spec`` compiled by lm-eval's own template environment, except that printing a null fails."""
    from lm_eval.utils import env

    def finalize(value: Any) -> Any:
        if value is None:
            raise _PrintsNull
        return value

    strict = env.overlay(finalize=finalize)
    return strict.from_string(spec), strict.parse(spec)


# --- a task that cannot be loaded ---------------------------------------------------------------

def load_error(names: Iterable[str], exc: BaseException) -> UserError:
    """The one line for lm-eval's failure to load tasks: the task it was building and, when that
    is why, its empty data file."""
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:240]
    task = _task_being_built(exc)
    if task is None:
        return UserError(f"cannot load tasks {', '.join(names)}: {first}")
    name = task.config.task
    for split, path in _data_files(task.config.dataset_kwargs):
        if _is_empty(path):
            return UserError(f"task {name}: data file {path} ({split} split) is empty: it holds no documents")
    return UserError(f"cannot load task {name}: {first}")


def _task_being_built(exc: BaseException) -> Any:
    """The lm-eval task whose construction raised ``exc`` (innermost), or None."""
    from lm_eval.api.task import Task

    found, tb = None, exc.__traceback__
    while tb is not None:
        candidate = tb.tb_frame.f_locals.get("self")
        if isinstance(candidate, Task) and getattr(getattr(candidate, "config", None), "task", None):
            found = candidate
        tb = tb.tb_next
    return found


def _data_files(dataset_kwargs: Any) -> list[tuple[str, Path]]:
    """``dataset_kwargs: data_files`` as (split, local path) pairs."""
    files = (dataset_kwargs or {}).get("data_files") if isinstance(dataset_kwargs, dict) else None
    if isinstance(files, (str, list)):
        files = {"train": files}  # datasets' name for data files given without splits
    out: list[tuple[str, Path]] = []
    for split, paths in (files or {}).items():
        for path in [paths] if isinstance(paths, str) else list(paths or []):
            if isinstance(path, str) and Path(path).expanduser().is_file():
                out.append((str(split), Path(path).expanduser()))
    return out


def _is_empty(path: Path) -> bool:
    """No document in it: nothing but white space."""
    try:
        with path.open("rb") as fh:
            return all(not chunk.strip() for chunk in iter(lambda: fh.read(1 << 20), b""))
    except OSError:
        return False


# --- message parts ------------------------------------------------------------------------------

def _fields(names: list[str]) -> str:
    return ("field " if len(names) == 1 else "fields ") + ", ".join(repr(n) for n in names) + (
        " is" if len(names) == 1 else " are")


def _short(value: Any, width: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= width else text[:width - 3] + "..."


def _one_line(exc: BaseException) -> str:
    return (" ".join(str(exc).split()) or type(exc).__name__)[:240]
