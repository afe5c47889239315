"""What an lm-eval task really is, as one digest for a result store's fingerprint.

A task's name and version say little: a local task's JSONL edited in place, a YAML changed under
the same name or a few-shot split swapped all give other numbers under the same name, and a
resumed sweep would pair an old baseline with new variants. :func:`task_data_digest` covers what
the numbers depend on besides the model: each task's config after includes (lm-eval's
``dump_config``, functions by their source), each group's config, every request's text as
lm-eval builds it (few-shot examples included) and each scored document's gold target. The
requests of log-likelihood tasks come from the pass that collects them anyway
(:class:`~.requests.RequestLog`); those of generation tasks are built here, once
(:func:`generation_request_args`).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from typing import Any

from .requests import request_key
from .tasks import TaskSet, seed_everything


def task_data_digest(tasks: TaskSet, request_args: Mapping[tuple, Any], *, limit: int | float | None) -> str:
    """A short hex digest of ``tasks``' configs, their groups' configs, the text of every request
    (``request_args``: request key -> lm-eval's ``Instance.args``) and the gold target of every
    document scored under ``limit``."""
    from lm_eval.evaluator_utils import get_sample_size

    digest = hashlib.sha256()
    for name in sorted(tasks.leaf_tasks):
        task = tasks.leaf_tasks[name]
        _feed(digest, ["config", name, task.dump_config()])
        for doc_id, doc in task.doc_iterator(rank=0, limit=get_sample_size(task, limit), world_size=1):
            _feed(digest, ["target", name, doc_id, _target(task, doc)])
    groups = tasks.task_dict.get("groups") or {}
    for name in sorted(groups, key=str):
        _feed(digest, ["group", str(name), _group_config(groups[name])])
    for key in sorted(request_args, key=repr):
        _feed(digest, ["request", list(key), request_args[key]])
    return digest.hexdigest()[:16]


def generation_request_args(tasks: TaskSet, *, limit: int | float | None, seed: int) -> dict[tuple, Any]:
    """The requests lm-eval's ``evaluate`` builds for ``tasks`` (seeded as
    :func:`~.tasks.evaluate_tasks` seeds them), by request key, built without a model."""
    from lm_eval.evaluator_utils import get_sample_size

    seed_everything(seed)
    tasks.reseed(seed)
    out: dict[tuple, Any] = {}
    for task in tasks.leaf_tasks.values():
        task.build_all_requests(limit=get_sample_size(task, limit), rank=0, world_size=1)
        out.update({request_key(instance): instance.args for instance in task.instances})
    return out


def _target(task: Any, doc: Any) -> Any:
    """A document's gold target; a target lm-eval cannot compute is digested as its error (the
    run reports it where it always did)."""
    try:
        return task.doc_to_target(doc)
    except Exception as exc:  # whatever the task's own code raises
        return f"<{type(exc).__name__}>"


def _group_config(group: Any) -> Any:
    to_dict = getattr(group, "to_dict", None)
    config = to_dict() if callable(to_dict) else None
    return [config, [str(child) for child in getattr(group, "child_names", [])]]


def _feed(digest: Any, value: Any) -> None:
    try:
        text = json.dumps(value, sort_keys=True, default=_stable, ensure_ascii=False)
    except TypeError:  # keys of mixed types cannot be sorted
        text = json.dumps(value, default=_stable, ensure_ascii=False)
    digest.update(text.encode("utf-8", "surrogatepass") + b"\n")


def _stable(value: Any) -> Any:
    """JSON for what JSON lacks, the same in every process (no memory addresses)."""
    if isinstance(value, (set, frozenset)):
        return sorted(map(repr, value))
    if callable(value) and hasattr(value, "__qualname__"):
        return f"{getattr(value, '__module__', '')}.{value.__qualname__}"
    if hasattr(value, "tolist"):
        return value.tolist()
    return re.sub(r" at 0x[0-9a-fA-F]+", "", repr(value))
