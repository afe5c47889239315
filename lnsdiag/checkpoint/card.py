"""The model card and the provenance record of a pruned checkpoint.

:func:`model_card` writes the ``README.md`` people read (what was removed, how, what it scored, how to
load it); :func:`provenance_record` the ``lnsdiag_pruned.json`` programs read (source, revision,
removed and kept layers, strategy, versions), which :func:`read_provenance` reads back and
:func:`provenance_line` states in one line for ``lnsdiag inspect``.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import __version__
from ..errors import UserError

if TYPE_CHECKING:
    from torch import nn

    from ..model.structure import LayerStack

#: The machine-readable record of where a pruned checkpoint comes from, beside its config.
PROVENANCE_FILE = "lnsdiag_pruned.json"
PROVENANCE_VERSION = 1


def recorded_norm_scheme(config: Any) -> str | None:
    """The norm scheme a config records that plain transformers does not run, if any."""
    if isinstance(getattr(config, "lns", None), dict) and config.lns:
        return "LayerNorm Scaling"
    if getattr(config, "post_ln", None):
        return "Post-LN"
    return None


def provenance_record(model: nn.Module, stack: LayerStack, removed: list[int], keep: list[int], *,
                      source: str | None, revision: str | None, strategy: str | None,
                      extra: Mapping[str, Any] | None, dtype: Any) -> dict[str, Any]:
    """What ``lnsdiag_pruned.json`` holds for ``model`` without ``removed`` (``extra``: fields of the caller's
    own, which may not replace lnsdiag's)."""

    def version(pkg: str) -> str | None:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    config = model.config
    record: dict[str, Any] = {
        "format": "lnsdiag-pruned",
        "version": PROVENANCE_VERSION,
        "source": source,
        "revision": revision,
        "commit": getattr(config, "_commit_hash", None),
        "architecture": type(model).__name__,
        "model_type": getattr(config, "model_type", None),
        "layer_stack": stack.path,
        "original_layers": len(stack),
        "removed_layers": removed,
        "kept_layers": keep,
        "num_layers": len(keep),
        "strategy": strategy,
        "norm_scheme": recorded_norm_scheme(config),
        "dtype": str(dtype).removeprefix("torch."),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "lnsdiag": __version__,
        "transformers": version("transformers"),
        "torch": version("torch"),
    }
    for key, value in (extra or {}).items():
        if key in record:
            raise UserError(f"provenance field {key!r} is set by lnsdiag itself; name it differently")
        record[key] = value
    return record


def _is_hub_id(name: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.\-]*/[A-Za-z0-9][\w.\-]*", name)) and not Path(name).exists()


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str("" if value is None else value).replace("|", "\\|").replace("\n", " ")


def _layer_list(layers: Iterable[int]) -> str:
    return ", ".join(str(i) for i in layers)


def model_card(
    *,
    source: str | None,
    removed: Sequence[int],
    num_layers: int,
    revision: str | None = None,
    strategy: str | None = None,
    n: int | None = None,
    scores: Sequence[Mapping[str, Any]] | None = None,
    norm_scheme: str | None = None,
    path: str | None = None,
    version: str | None = None,
    notes: str | None = None,
) -> str:
    """The Markdown model card (``README.md``) of a pruned checkpoint.

    ``source``/``revision``: the model the layers were removed from; ``removed``: 0-based, original
    numbering; ``num_layers``: the original depth; ``strategy`` and ``n``: how the layers were chosen
    (N defaults to the number removed); ``scores``: rows of a small table (dicts, their keys the
    columns); ``norm_scheme``: a norm scheme the config records that only lnsdiag re-installs
    (``LayerNorm Scaling``, ``Post-LN``); ``path``: the folder, for the loading snippet.
    """
    if version is None:
        version = __version__
    removed = sorted(int(i) for i in removed)
    kept = num_layers - len(removed)
    path = path or "path/to/this/folder"
    hub = bool(source) and _is_hub_id(source)
    short = (source or "").rstrip("/").rsplit("/", 1)[-1] or "Pruned model"
    link = f"[{source}](https://huggingface.co/{source})" if hub else f"`{source}`" if source else "A model"
    at = f" (revision `{revision}`)" if revision else ""
    front = ["---"]
    if source:  # the hub's base_model takes hub ids only: a local path is recorded as a comment
        front.append(f"base_model: {source}" if hub else f"# base model: {source}")
    front += ["library_name: transformers", "tags: [lnsdiag, pruned]", "---", ""]
    lines = [
        *front,
        f"# {short}, without layers {_layer_list(removed)}",
        "",
        f"{link}{at} with {len(removed)} of its {num_layers} transformer blocks removed by "
        f"lnsdiag {version}. No weight was changed: the {kept} remaining blocks are the "
        "original ones, renumbered from 0, and the config describes them (each kept block keeps its role).",
        "",
        "| | |",
        "|---|---|",
        f"| Source model | {f'`{source}`' if source else 'not recorded'}{f' @ `{revision}`' if revision else ''} |",
        f"| Removed layers (0-based, original numbering) | {_layer_list(removed)} |",
    ]
    if strategy:
        lines.append(f"| Strategy | {_cell(strategy)} (N = {n if n is not None else len(removed)}) |")
    lines += [
        f"| Layers kept | {kept} of {num_layers} |",
        f"| Made with | lnsdiag {version} |",
        "",
    ]
    if scores:
        columns: list[str] = []
        for row in scores:
            columns.extend(k for k in row if k not in columns)
        lines += ["## Scores", "", "| " + " | ".join(_cell(c) for c in columns) + " |",
                  "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in scores]
        lines.append("")
    lines += [
        "## How to load",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("{path}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{path}")',
        "```",
        "",
    ]
    if norm_scheme:
        lines += [
            f"**This model uses {norm_scheme}**, recorded in `config.json` "
            f"(`{'lns' if norm_scheme == 'LayerNorm Scaling' else 'post_ln'}`), each kept block with its original "
            "setting. Plain transformers ignores that record and runs the blocks without it, which gives wrong "
            "outputs. Load it with lnsdiag, which re-installs it:",
            "",
            "```python",
            "from lnsdiag import load_model",
            "",
            f'loaded = load_model("{path}")  # or lnsdiag.restore_norms(model) after from_pretrained',
            "```",
            "",
        ]
    lines += [f"`{PROVENANCE_FILE}` records the same provenance for programs; `lnsdiag inspect` shows it.", ""]
    if notes:
        lines += [notes.strip(), ""]
    return "\n".join(lines)


def read_provenance(folder: str | Path) -> dict[str, Any] | None:
    """The ``lnsdiag_pruned.json`` record of a checkpoint folder, or None if it has none."""
    path = Path(folder) / PROVENANCE_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{path} is unreadable: {exc}") from exc
    if not isinstance(record, dict):
        raise UserError(f"{path} is not an lnsdiag provenance record")
    return record


def provenance_line(record: Mapping[str, Any]) -> str:
    """One line saying what a pruned checkpoint is, for ``lnsdiag inspect``."""
    source = record.get("source") or "an unnamed model"
    pin = record.get("revision") or (str(record["commit"])[:12] if record.get("commit") else None)
    removed = record.get("removed_layers") or []
    total = record.get("original_layers")
    line = (f"pruned from {source}{f' @ {pin}' if pin else ''}: layers {_layer_list(removed)}"
            f"{f' of {total}' if total else ''} removed (original numbering)")
    if record.get("strategy"):
        line += f" by {record['strategy']}"
    if record.get("norm_scheme"):
        line += f"; {record['norm_scheme']} kept (lnsdiag re-installs it, plain transformers does not)"
    return line
