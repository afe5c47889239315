"""The model card and the provenance record of a checkpoint lnsdiag writes.

:func:`model_card` writes the ``README.md`` people read of a pruned checkpoint (what was removed, how,
what it scored, how to load it), :func:`export_card` that of an exported one; :func:`provenance_record`
the ``lnsdiag_pruned.json`` programs read (source, revision, removed and kept layers, strategy,
versions), :func:`export_record` the ``lnsdiag_export.json``; :func:`read_provenance` reads either back
and :func:`provenance_line` states it in one line for ``lnsdiag inspect``. :func:`norm_note` is the
paragraph saying what a recorded norm scheme means for whoever loads the checkpoint (LayerNorm Scaling
folded into the weights: nothing to do; Post-LN: load it with lnsdiag), :func:`sublayer_note` the one
on removed sub-layers (zeroed: exact anywhere, but only lnsdiag skips their compute).
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
from ..interventions.pruned import RECORD, renumbered
from ..interventions.units import Removal, Unit

if TYPE_CHECKING:
    from torch import nn

    from ..model.structure import LayerStack

#: The machine-readable record of where a pruned checkpoint comes from, beside its config.
PROVENANCE_FILE = "lnsdiag_pruned.json"
PROVENANCE_VERSION = 1
#: The same for a checkpoint ``lnsdiag export`` wrote.
EXPORT_FILE = "lnsdiag_export.json"

#: What :func:`recorded_norm_scheme` says.
LNS = "LayerNorm Scaling"
LNS_FOLDED = "LayerNorm Scaling (folded)"
POST_LN = "Post-LN"


def recorded_norm_scheme(config: Any) -> str | None:
    """The norm scheme a config records, if any: ``LayerNorm Scaling (folded)`` (in the weights: every
    runtime computes it), ``LayerNorm Scaling`` (hooks: only lnsdiag computes it) or ``Post-LN`` (only
    lnsdiag)."""
    record = getattr(config, "lns", None)
    if isinstance(record, dict) and record:
        return LNS_FOLDED if record.get("folded") else LNS
    if getattr(config, "post_ln", None):
        return POST_LN
    return None


def norm_note(norm_scheme: str | None, path: str = "path/to/this/folder") -> str:
    """The card's paragraph on a recorded norm scheme ('' for none): folded LayerNorm Scaling needs
    nothing from whoever loads it; hooks and Post-LN need lnsdiag."""
    if not norm_scheme:
        return ""
    if norm_scheme == LNS_FOLDED:
        return (
            "**This model uses LayerNorm Scaling** (each block's pre-sublayer norm output × 1/sqrt(l), "
            "arXiv 2502.05795), **folded into the norm weights**: each scaled norm's weight (and bias) carries "
            "its block's factor (w' = s·w, or s·(1 + w) − 1 for norms computing (1 + w)·x̂), each kept block "
            "with its original l. Plain transformers, vLLM and lm-eval compute it exactly, with no custom code. "
            "`config.json` keeps `lns` only as a record (`\"folded\": true`); lnsdiag's `load_model` does not "
            "apply it again.\n"
        )
    key = "lns" if norm_scheme == LNS else "post_ln"
    return "\n".join([
        f"**This model uses {norm_scheme}**, recorded in `config.json` (`{key}`), each kept block with its "
        "original setting. Plain transformers ignores that record and runs the blocks without it, which gives "
        "wrong outputs. Load it with lnsdiag, which re-installs it:",
        "",
        *_load_snippet(path),
    ])


def _load_snippet(path: str) -> list[str]:
    """How to load the checkpoint with lnsdiag (which re-installs what plain transformers ignores)."""
    return ["```python", "from lnsdiag import load_model", "",
            f'loaded = load_model("{path}")  # or lnsdiag.restore_norms(model) after from_pretrained', "```", ""]


def sublayer_note(units: Sequence[str], path: str = "path/to/this/folder") -> str:
    """The card's paragraph on removed sub-layers (``units``: the checkpoint's numbering; '' for none):
    stored as zeroed output projections, so every runtime computes the pruned model exactly but spends
    their compute; lnsdiag's loader skips them."""
    if not units:
        return ""
    return "\n".join([
        f"**Removed sub-layers are stored as zeroed output projections.** The sub-layers {', '.join(units)} "
        "(this checkpoint's block numbering) are still in its weights, each with the projection that writes "
        "its output to the residual stream (every expert's, in a mixture of experts) stored as zeros: they add "
        "exactly nothing, so plain transformers, vLLM and lm-eval compute the pruned model exactly, **but still "
        f"spend their compute and memory**. `config.json` records them (`{RECORD}`); lnsdiag's loader skips "
        "them, so it does not spend that compute (with a KV cache, a skipped attention still runs to fill its "
        "cache slot):",
        "",
        *_load_snippet(path),
    ])


def with_notes(card: str, norm_scheme: str | None, units: Sequence[str], path: str) -> str:
    """A caller's ``card`` with the paragraphs on the norm scheme and removed sub-layers it lacks appended."""
    for note in (norm_note(norm_scheme, path), sublayer_note(units, path)):
        if note and note not in card:
            card = card.rstrip("\n") + "\n\n" + note
    return card


def _version(pkg: str) -> str | None:
    try:
        return md.version(pkg)
    except md.PackageNotFoundError:
        return None


def provenance_record(model: nn.Module, stack: LayerStack, removed: list[int], keep: list[int], *,
                      source: str | None, revision: str | None, strategy: str | None,
                      extra: Mapping[str, Any] | None, dtype: Any, config: Any = None,
                      units: Removal | None = None) -> dict[str, Any]:
    """What ``lnsdiag_pruned.json`` holds for ``model`` without ``removed`` (``extra``: fields of the caller's
    own, which may not replace lnsdiag's; ``config``: the checkpoint's, default the model's; ``units``:
    every unit removed, sub-layers included, default the ``removed`` blocks). ``removed_layers`` are the
    whole blocks, ``removed_units`` every unit (``[2, "3.attn"]``), both in the original numbering."""
    config = model.config if config is None else config
    version = _version
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
        "removed_units": [u.to_json() for u in units or Removal(tuple(removed))],
        "kept_layers": keep,
        "num_layers": len(keep),
        "strategy": strategy,
        "norm_scheme": recorded_norm_scheme(config),
        "lns": getattr(config, "lns", None) or None,
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


def _layer_list(layers: Iterable[int | str | Unit]) -> str:
    return ", ".join(str(i) for i in layers)


def _as_removal(removed: Removal | Sequence[int | str | Unit]) -> Removal:
    """Block numbers, unit texts (``3.attn``) or units, as the set of units they name."""
    return removed if isinstance(removed, Removal) else Removal(tuple(
        u if isinstance(u, Unit) else Unit.parse(u) for u in removed))


def _title(short: str, removal: Removal) -> str:
    """``# Model, without layers 3, 5``; sub-layers named as such."""
    parts = [f"layers {_layer_list(removal.blocks)}"] if removal.blocks else []
    parts += [f"sub-layers {_layer_list(removal.sublayers)}"] if removal.sublayers else []
    return f"# {short}, without {' and '.join(parts)}"


def _what_was_removed(removal: Removal, num_layers: int) -> str:
    """``2 of its 32 transformer blocks and 3 attention or MLP sub-layers of the kept blocks``."""
    blocks, subs = len(removal.blocks), len(removal.sublayers)
    parts = [f"{blocks} of its {num_layers} transformer blocks"] if blocks else []
    if subs:
        whose = "the kept blocks" if blocks else f"its {num_layers} transformer blocks"
        parts.append(f"{subs} attention or MLP sub-layer{'s' if subs > 1 else ''} of {whose}")
    return " and ".join(parts)


def _changed(norm_scheme: str | None, zeroed: bool) -> str:
    """What the weights lost or gained beyond the removed blocks."""
    changed = ["the scaled norms' (LayerNorm Scaling folded in, below)"] if norm_scheme == LNS_FOLDED else []
    changed += ["the removed sub-layers' output projections (stored as zeros, below)"] if zeroed else []
    return "No weight was changed" + (f" but {' and '.join(changed)}" if changed else "")


def model_card(
    *,
    source: str | None,
    removed: Removal | Sequence[int | str | Unit],
    num_layers: int,
    revision: str | None = None,
    strategy: str | None = None,
    n: int | None = None,
    scores: Sequence[Mapping[str, Any]] | None = None,
    norm_scheme: str | None = None,
    path: str | None = None,
    version: str | None = None,
    notes: str | None = None,
    recorded: Sequence[str] | None = None,
) -> str:
    """The Markdown model card (``README.md``) of a pruned checkpoint.

    ``source``/``revision``: the model the layers were removed from; ``removed``: 0-based, original
    numbering, whole blocks and sub-layers (a Removal, or block numbers and ``"3.attn"`` texts);
    ``num_layers``: the original depth; ``strategy`` and ``n``: how the layers were chosen
    (N defaults to the number removed); ``scores``: rows of a small table (dicts, their keys the
    columns); ``norm_scheme``: the norm scheme the config records (:func:`recorded_norm_scheme`), said
    by :func:`norm_note`; ``path``: the folder, for the loading snippet; ``recorded``: the sub-layers the
    checkpoint's config records as removed, its numbering (default: ``removed``'s, renumbered), said by
    :func:`sublayer_note`.
    """
    if version is None:
        version = __version__
    removal = _as_removal(removed)
    removed = list(removal.blocks)
    kept = num_layers - len(removed)
    if recorded is None:
        recorded = [str(u) for u in renumbered(removal.sublayers, [i for i in range(num_layers) if i not in removed])]
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
        _title(short, removal),
        "",
        f"{link}{at} with {_what_was_removed(removal, num_layers)} removed by lnsdiag {version}. "
        f"{_changed(norm_scheme, bool(removal.sublayers))}: the {kept} remaining blocks are the "
        "original ones, renumbered from 0, and the config describes them (each kept block keeps its role).",
        "",
        "| | |",
        "|---|---|",
        f"| Source model | {f'`{source}`' if source else 'not recorded'}{f' @ `{revision}`' if revision else ''} |",
    ]
    if removed:
        lines.append(f"| Removed layers (0-based, original numbering) | {_layer_list(removed)} |")
    if removal.sublayers:
        lines.append(f"| Removed sub-layers (0-based, original numbering) | {_layer_list(removal.sublayers)} |")
    if strategy:
        lines.append(f"| Strategy | {_cell(strategy)} (N = {n if n is not None else len(removal)}) |")
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
        lines += [norm_note(norm_scheme, path)]
    if recorded:
        lines += [sublayer_note(recorded, path)]
    lines += [f"`{PROVENANCE_FILE}` records the same provenance for programs; `lnsdiag inspect` shows it.", ""]
    if notes:
        lines += [notes.strip(), ""]
    return "\n".join(lines)


def export_record(model: nn.Module, stack: LayerStack, *, config: Any, source: str | None, revision: str | None,
                  dtype: Any, folded_norms: int, fold_rounding: float | None, kinds: Sequence[str] = (),
                  source_record: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What ``lnsdiag_export.json`` holds: where the checkpoint comes from and what folding did
    (``source_record``: the provenance record the source folder had, kept inside)."""
    record: dict[str, Any] = {
        "format": "lnsdiag-export",
        "version": PROVENANCE_VERSION,
        "source": source,
        "revision": revision,
        "commit": getattr(model.config, "_commit_hash", None),
        "architecture": type(model).__name__,
        "model_type": getattr(config, "model_type", None),
        "layer_stack": stack.path,
        "num_layers": len(stack),
        "norm_scheme": recorded_norm_scheme(config),
        "lns": getattr(config, "lns", None) or None,
        "folded_norms": folded_norms,
        "fold_formulas": sorted(set(kinds)),
        "fold_rounding": fold_rounding,
        "dtype": str(dtype).removeprefix("torch."),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "lnsdiag": __version__,
        "transformers": _version("transformers"),
        "torch": _version("torch"),
    }
    if source_record:
        record["source_provenance"] = dict(source_record)
    return record


def export_card(*, source: str | None, num_layers: int, norm_scheme: str | None, lns: Mapping[str, Any] | None,
                folded_norms: int, dtype: Any, revision: str | None = None, fold_rounding: float | None = None,
                path: str | None = None, version: str | None = None, note: str | None = None) -> str:
    """The Markdown model card (``README.md``) of a checkpoint ``lnsdiag export`` wrote."""
    version = version or __version__
    path = path or "path/to/this/folder"
    hub = bool(source) and _is_hub_id(source)
    short = (source or "").rstrip("/").rsplit("/", 1)[-1] or "Exported model"
    front = ["---"]
    if source:
        front.append(f"base_model: {source}" if hub else f"# base model: {source}")
    front += ["library_name: transformers", "tags: [lnsdiag, layernorm-scaling]", "---", ""]
    at = f" @ `{revision}`" if revision else ""
    if norm_scheme == LNS_FOLDED:
        title = f"# {short}, LayerNorm Scaling folded into the weights"
        what = (f"{f'`{source}`' if source else 'A model'}{at} written by lnsdiag {version} with its LayerNorm Scaling "
                f"folded into the weights of its {folded_norms} scaled norms" if folded_norms else
                f"{f'`{source}`' if source else 'A model'}{at} written by lnsdiag {version}; its LayerNorm Scaling was "
                "already folded into its norm weights")
        what += ": any runtime computes the LayerNorm-Scaling model exactly."
    else:
        title = f"# {short}"
        what = (f"{f'`{source}`' if source else 'A model'}{at} written as it is by lnsdiag {version}: it has no "
                "LayerNorm Scaling, so there was nothing to fold.")
    rows = ["| | |", "|---|---|", f"| Source model | {f'`{source}`' if source else 'not recorded'}{at} |",
            f"| Blocks | {num_layers} |", f"| Weights | {str(dtype).removeprefix('torch.')} |"]
    if lns:
        rows.append(f"| Scaled norms | {', '.join(lns.get('norms') or [])} |")
        rows.append(f"| l of each block (scale 1/sqrt(l)) | {_layer_list(lns.get('layers') or [])} |")
    if fold_rounding is not None:
        rows.append(f"| Largest relative rounding of a folded norm weight | {fold_rounding:.2g} |")
    rows.append(f"| Made with | lnsdiag {version} |")
    lines = [*front, title, "", what, "", *rows, "", "## How to load", "", "```python",
             "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
             f'model = AutoModelForCausalLM.from_pretrained("{path}")',
             f'tokenizer = AutoTokenizer.from_pretrained("{path}")', "```", ""]
    if norm_scheme:
        lines.append(norm_note(norm_scheme, path))
    if note:
        lines += [note.strip(), ""]
    lines += [f"`{EXPORT_FILE}` records the same provenance for programs; `lnsdiag inspect` shows it.", ""]
    return "\n".join(lines)


def _read_record(path: Path) -> dict[str, Any]:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{path} is unreadable: {exc}") from exc
    if not isinstance(record, dict):
        raise UserError(f"{path} is not an lnsdiag provenance record")
    return record


def read_provenance(folder: str | Path) -> dict[str, Any] | None:
    """The provenance record of a checkpoint folder lnsdiag wrote: ``lnsdiag_pruned.json``, else
    ``lnsdiag_export.json``; None if it has neither."""
    for name in (PROVENANCE_FILE, EXPORT_FILE):
        path = Path(folder) / name
        if path.is_file():
            return _read_record(path)
    return None


def _scheme_words(scheme: str) -> str:
    if scheme == LNS_FOLDED:
        return f"{LNS} folded into the norm weights (every runtime computes it)"
    return f"{scheme} kept (lnsdiag re-installs it, plain transformers does not)"


def provenance_line(record: Mapping[str, Any]) -> str:
    """One line saying what a checkpoint lnsdiag wrote is, for ``lnsdiag inspect``."""
    source = record.get("source") or "an unnamed model"
    pin = record.get("revision") or (str(record["commit"])[:12] if record.get("commit") else None)
    if record.get("format") == "lnsdiag-export":
        line = f"exported from {source}{f' @ {pin}' if pin else ''}"
        if record.get("norm_scheme"):
            line += f"; {_scheme_words(record['norm_scheme'])}"
        inner = record.get("source_provenance")
        if isinstance(inner, Mapping) and inner.get("format") != "lnsdiag-export":
            line += f"; that model was {provenance_line({**inner, 'norm_scheme': None})}"
        return line
    removed = record.get("removed_units") or record.get("removed_layers") or []
    total = record.get("original_layers")
    line = (f"pruned from {source}{f' @ {pin}' if pin else ''}: layers {_layer_list(removed)}"
            f"{f' of {total}' if total else ''} removed (original numbering)")
    if record.get("strategy"):
        line += f" by {record['strategy']}"
    if record.get("norm_scheme"):
        line += f"; {_scheme_words(record['norm_scheme'])}"
    return line
