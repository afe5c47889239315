"""A model without some units, written as a real Hugging Face checkpoint without ever building it.

:func:`save_without_layers` streams the kept tensors from the loaded model's ``state_dict`` into
safetensors shards under their new names (tied aliases left out, as ``save_pretrained`` does),
beside the config :mod:`.reference` reduces, the tokenizer, and the model card and provenance
record of :mod:`.card`. Everything is written into a hidden staging folder renamed into place at
the end, so a failure leaves nothing half-written; a staging folder a killed process left
behind is removed by the next save into the same parent folder. Sub-layers: :mod:`.sublayers`.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UserError
from ..interventions.lns import NormFold, fold_plan, folded_record, has_lns_hooks, is_lns
from ..interventions.units import Removal, Unit
from ..model.load import LoadedModel
from ..model.quantize import quantized_mode, refuse_save
from ..model.structure import LayerStack, find_layers
from ..runs import file_mode, remove_stale_staging, staging_folder, unmark
from .card import EXPORT_FILE, PROVENANCE_FILE, model_card, provenance_record, recorded_norm_scheme, with_notes
from .reference import config_without
from .sublayers import plan_pruning, record_sublayers, zeroed_names

#: Files :func:`save_without_layers` writes itself; ``extra_files`` may not replace them.
_RESERVED = ("config.json", "generation_config.json", "README.md", PROVENANCE_FILE, EXPORT_FILE, "model.safetensors",
             "model.safetensors.index.json")
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


@dataclass(frozen=True)
class SavedCheckpoint:
    """What :func:`save_without_layers` wrote."""

    folder: Path
    removed: tuple[int, ...]  #: original 0-based indices of the removed blocks
    kept: tuple[int, ...]  #: original 0-based indices of the kept blocks, in their new order
    weight_files: tuple[str, ...]  #: safetensors files, in order (one unless sharded)
    num_parameters: int
    total_bytes: int  #: of the weights written
    provenance: dict[str, Any]  #: what ``lnsdiag_pruned.json`` holds
    folded_norms: int = 0  #: norms whose weights were written with their LayerNorm-Scaling factor folded in
    fold_rounding: float | None = None  #: largest relative rounding a folded norm weight took (its dtype's)
    removal: Removal = field(default_factory=Removal)  #: every unit removed (blocks, sub-layers), original numbering

    @property
    def sharded(self) -> bool:
        return len(self.weight_files) > 1


def parse_size(value: int | str) -> int:
    """Bytes from ``5GB``, ``500MB``, ``20KB``, ``2GiB`` or an int (decimal units, as transformers reads them)."""
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*", str(value), flags=re.IGNORECASE)
        if not match:
            raise UserError(f"max_shard_size {value!r} is not a size: use bytes, or a number with KB, MB or GB")
        size = int(float(match.group(1)) * _SIZE_UNITS[(match.group(2) or "").upper()])
    if size <= 0:
        raise UserError(f"max_shard_size must be positive, not {value!r}")
    return size


def save_without_layers(
    model: Any,
    layers: Removal | Iterable[int | Unit] | int,
    folder: str | Path,
    *,
    tokenizer: Any = None,
    card: str | None = None,
    source: str | None = None,
    revision: str | None = None,
    strategy: str | None = None,
    provenance: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    max_shard_size: int | str = "5GB",
    stack: LayerStack | None = None,
    extra_files: Mapping[str, str] | None = None,
) -> SavedCheckpoint:
    """Write ``model`` without ``layers`` (0-based blocks, or a ``Removal`` of blocks and sub-layers) in ``folder``.

    The folder loads with plain ``AutoModelForCausalLM.from_pretrained(folder)``: the kept
    blocks' weights, renumbered (block 5 of 8 without 2 and 3 becomes block 3), under a config
    reduced as :func:`.reference.build_without_layers` reduces it (layer count, layer types, MoE layout,
    DeepSeek's dense prefix, LNS scales); safetensors in the model's dtype, sharded above
    ``max_shard_size`` with a ``model.safetensors.index.json``. Tensors go from the model's
    own ``state_dict`` to the files shard by shard, written as ``save_pretrained`` writes them
    (tied aliases left out, weight conversions reverted): the model is never copied whole, and
    it is left untouched. Also written: the tokenizer when given, the generation config, the
    model card ``README.md`` (``card``, else :func:`model_card` from what is known),
    ``lnsdiag_pruned.json`` (the provenance: ``source``, ``revision``, removed and kept layers,
    ``removed_units``, ``strategy``, ``provenance``'s fields) and ``extra_files`` (name -> text).
    A removed sub-layer of a kept block is written as zeroed output projections (:mod:`.sublayers`).

    ``model`` may be a :class:`~lnsdiag.model.load.LoadedModel`: its tokenizer, source and revision
    are then the defaults.

    A LayerNorm-Scaling model (``config.lns``) is written folded (each scaled norm's weight and bias
    times its block's original 1/sqrt(l)): plain transformers computes it; ``config.lns`` stays as a
    record marked ``folded``. A Post-LN model keeps its ``post_ln`` record: lnsdiag's ``load_model``
    re-installs it, plain transformers cannot (the card says so; a caller's ``card`` gets that paragraph
    appended).

    Atomic: everything is written into a hidden sibling folder renamed into place at the end;
    an exception leaves neither a partial ``folder`` nor the temporary one. A non-empty ``folder``
    is refused unless ``overwrite=True``, which replaces it (only a model folder, one with a
    ``config.json``) once the new checkpoint is complete.
    """
    model, tokenizer, source, revision = unwrap_loaded(model, tokenizer, source, revision)
    stack = stack or find_layers(model)
    total = len(stack)
    pruning = plan_pruning(layers, total)
    removed, keep = pruning.removed, pruning.keep
    target = Path(folder).expanduser()
    _check_target(target, overwrite)
    _check_savable(model, stack)
    folds = fold_plan(model, stack)  # every scaled norm checked foldable before anything is written
    max_bytes = parse_size(max_shard_size)
    extras = _check_extra_files(extra_files)

    dtype = getattr(model, "dtype", None) or next(model.parameters()).dtype  # transformers: first float weight's
    config = checkpoint_config(model, config_without(model.config, keep, total), dtype)
    skipped = record_sublayers(config, pruning)
    source = source or _name_or_path(model) or None
    record = provenance_record(model, stack, removed, keep, source=source, revision=revision, strategy=strategy,
                               extra=provenance, dtype=dtype, config=config, units=pruning.removal)
    scheme = recorded_norm_scheme(config)
    if card is None:
        card = model_card(source=source, revision=revision or record.get("commit"), removed=pruning.removal,
                          num_layers=total, strategy=strategy, norm_scheme=scheme, path=str(target), recorded=skipped)
    else:
        card = with_notes(card, scheme, skipped, str(target))

    num_parameters = _kept_parameters(model, stack, removed)
    written = write_checkpoint(model, stack, keep, target, config=config, card=card, record=record,
                               record_file=PROVENANCE_FILE, tokenizer=tokenizer, extras=extras, overwrite=overwrite,
                               max_bytes=max_bytes, num_parameters=num_parameters, folds=folds,
                               zeroed=zeroed_names(model, stack, pruning.removal))
    return SavedCheckpoint(folder=target, removed=tuple(removed), kept=tuple(keep), weight_files=written.files,
                           num_parameters=num_parameters, total_bytes=written.total_bytes,
                           provenance=written.record, folded_norms=len([f for f in folds if f.block in keep]),
                           fold_rounding=fold_rounding([f for f in folds if f.block in keep]), removal=pruning.removal)


def checkpoint_config(model: nn.Module, config: Any, dtype: Any) -> Any:
    """``config`` (a copy the caller owns) made the config of a written checkpoint of ``model``: the weights'
    dtype and the model's class recorded as ``save_pretrained`` records them, an LNS record marked folded."""
    _set_dtype(config, dtype)
    config.architectures = [type(model).__name__]
    if isinstance(getattr(config, "lns", None), dict) and config.lns:
        config.lns = folded_record(config.lns)
    return config


@dataclass(frozen=True)
class Written:
    """What :func:`write_checkpoint` wrote."""

    files: tuple[str, ...]
    total_bytes: int
    record: dict[str, Any]


def write_checkpoint(model: nn.Module, stack: LayerStack, keep: list[int], target: Path, *, config: Any, card: str,
                     record: dict[str, Any], record_file: str, tokenizer: Any, extras: Mapping[str, str],
                     overwrite: bool, max_bytes: int, num_parameters: int, folds: list[NormFold],
                     zeroed: Collection[str] = ()) -> Written:
    """Write the ``keep`` blocks of ``model`` (renumbered) and everything outside the stack into ``target``,
    atomically, as a Hugging Face checkpoint: the weights shard by shard (the norms of ``folds`` with their
    scale folded in, the tensors named ``zeroed`` as zeros), ``config``, generation config, tokenizer,
    ``extras``, ``card`` as ``README.md`` and ``record`` (plus its ``weight_files``) as ``record_file``. The
    caller has checked the target and the model."""
    with _staging(target, overwrite) as tmp:
        files, total_bytes = _write_weights(model, stack, keep, tmp, max_bytes, num_parameters, folds, zeroed)
        if getattr(model, "is_remote_code", lambda: False)():  # the checkpoint's own code, as save_pretrained
            from transformers.dynamic_module_utils import custom_object_save

            custom_object_save(model, tmp, config=config)
        config.save_pretrained(tmp)
        generation = getattr(model, "generation_config", None)
        can_generate = getattr(model, "can_generate", lambda: generation is not None)
        if generation is not None and can_generate():
            copy.deepcopy(generation).save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, text in extras.items():
            if (tmp / name).exists():
                raise UserError(f"extra file {name!r} would replace a file of the checkpoint itself")
            (tmp / name).write_text(text, encoding="utf-8")
        (tmp / "README.md").write_text(card if card.endswith("\n") else card + "\n", encoding="utf-8")
        record["weight_files"] = files
        (tmp / record_file).write_text(json.dumps(record, indent=2, default=str) + "\n", encoding="utf-8")
    return Written(tuple(files), total_bytes, record)


def _check_target(target: Path, overwrite: bool) -> None:
    """Refuse, before any work, a folder that cannot or must not be written."""
    if target.exists() and not target.is_dir():
        raise UserError(f"cannot write the checkpoint to {target}: it is a file")
    if target.is_dir() and any(target.iterdir()):
        if not overwrite:
            raise UserError(f"{target} is not empty: choose a new folder, or pass overwrite=True to replace it")
        if not (target / "config.json").is_file():
            raise UserError(f"{target} holds no config.json: overwrite=True replaces only a model folder, "
                            "not an arbitrary one")
    parent = next(p for p in (target.parent, *target.parent.parents) if p.exists())
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"cannot write the checkpoint to {target}: {parent} is not a writable folder")


def unwrap_loaded(model: Any, tokenizer: Any, source: str | None,
                  revision: str | None) -> tuple[Any, Any, str | None, str | None]:
    """A :class:`~lnsdiag.model.load.LoadedModel`'s module, with its tokenizer, source and revision as
    the defaults of those not given; a bare module as it is."""
    if not isinstance(model, LoadedModel):
        return model, tokenizer, source, revision
    return (model.model, tokenizer if tokenizer is not None else model.tokenizer, source or model.source,
            revision or model.revision)


def _check_savable(model: nn.Module, stack: LayerStack) -> None:
    refuse_save(quantized_mode(model))
    if any(p.device.type == "meta" for p in model.parameters()):
        raise UserError("some weights are offloaded (on the meta device): load the model without disk/CPU "
                        "offload to save it")
    if not is_lns(model) and has_lns_hooks(model, stack):
        raise UserError("the model runs LayerNorm Scaling hooks that its config does not record (config.lns): "
                        "the saved checkpoint would lose them")


def _check_extra_files(extra_files: Mapping[str, str] | None) -> dict[str, str]:
    out = {}
    for name, text in (extra_files or {}).items():
        if not name or Path(name).name != name or name in (".", ".."):
            raise UserError(f"extra file name {name!r} must be a plain file name, without folders")
        if name in _RESERVED or name.endswith(".safetensors") or name == "tokenizer.json":
            raise UserError(f"extra file {name!r} would replace a file of the checkpoint itself")
        out[name] = str(text)
    return out


def _set_dtype(config: Any, dtype: Any) -> None:
    """Record the weights' dtype in the config, as ``save_pretrained`` does (``dtype``; 4.x ``torch_dtype``)."""
    name = str(dtype).removeprefix("torch.")
    if "torch_dtype" in vars(config) and "dtype" not in vars(config):
        config.torch_dtype = name
    else:
        config.dtype = name


def _name_or_path(model: nn.Module) -> str:
    return str(getattr(getattr(model, "config", None), "_name_or_path", "") or "")


def _kept_parameters(model: nn.Module, stack: LayerStack, removed: list[int]) -> int:
    """Parameters of the pruned model (shared ones once), as ``num_parameters`` counts them."""
    kept = {id(p): p.numel() for p in model.parameters()}
    for i in removed:
        for p in stack.layers[i].parameters():
            kept.pop(id(p), None)
    return sum(kept.values())


# --- the weights, shard by shard ---

def _storage_key(tensor: torch.Tensor) -> tuple:
    """Same key for two names of the very same tensor (tied weights)."""
    return (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
            tuple(tensor.stride()), tensor.dtype)


def _tied_targets(model: nn.Module) -> set[str] | list[str]:
    """Names that ``from_pretrained`` re-ties to another weight: what ``save_pretrained`` leaves out.

    transformers 5 lists them in ``all_tied_weights_keys`` ({target: source}, only when the
    config ties); 4.x declares patterns in each module's ``_tied_weights_keys``.
    """
    expanded = getattr(model, "all_tied_weights_keys", None)
    if isinstance(expanded, Mapping):
        return set(expanded)
    patterns = []
    for name, module in model.named_modules():
        declared = getattr(module, "_tied_weights_keys", None) or []
        keys = declared.keys() if isinstance(declared, Mapping) else declared
        patterns.extend(f"{name}.{k}" if name else k for k in keys)
    return patterns


def _without_aliases(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with every second name of one tensor removed, keeping the name transformers keeps."""
    targets = _tied_targets(model)

    def is_target(name: str) -> bool:
        if isinstance(targets, set):
            return name in targets
        return any(re.search(pattern, name) for pattern in targets)

    groups: dict[tuple, list[str]] = {}
    for name, tensor in state.items():
        groups.setdefault(_storage_key(tensor), []).append(name)
    drop: set[str] = set()
    for names in groups.values():
        if len(names) < 2:
            continue
        keep = [n for n in names if not is_target(n)] or sorted(names)[-1:]
        if len(keep) > 1:
            raise UserError(f"the weights {', '.join(keep)} are one tensor but the model declares no tie between "
                            "them (tie_word_embeddings?): a checkpoint cannot store them")
        drop.update(n for n in names if n != keep[0])
    return {k: v for k, v in state.items() if k not in drop}


def _changes(stack: LayerStack, folds: list[NormFold], zeroed: Collection[str]) -> dict[str, Callable]:
    """State-dict name -> what its tensor is written as: every norm tensor that carries an LNS factor
    (folded in), every tensor of ``zeroed`` (zeros)."""
    changes: dict[str, Callable] = dict.fromkeys(zeroed, torch.zeros_like)
    changes.update({f"{stack.path}.{fold.block}.{fold.norm}.{param}": partial(fold.folded, param)
                    for fold in folds for param, _ in fold.module.named_parameters(recurse=False)})
    return changes


def fold_rounding(folds: list[NormFold]) -> float | None:
    """The largest relative rounding a folded norm tensor takes when stored in its dtype (of its largest
    entry; of 1 + w for a ``(1 + w)·x̂`` weight): ~6e-8 in float32, ~4e-3 in bfloat16, more for a
    ``(1 + w)`` weight in a deep block. None when nothing is folded."""
    worst = None
    for fold in folds:
        for param, tensor in fold.module.named_parameters(recurse=False):
            if tensor.device.type in ("mps", "meta") or not tensor.numel():
                continue
            exact = fold.folded(param, tensor.detach().double())
            stored = fold.folded(param, tensor.detach()).double()
            if fold.kind == "one_plus" and param == "weight":
                exact, stored = exact + 1.0, stored + 1.0
            error = float((stored - exact).abs().max() / exact.abs().max().clamp_min(1e-30))
            worst = error if worst is None else max(worst, error)
    return worst


def _renumbered_groups(model: nn.Module, stack: LayerStack, keep: list[int], folds: list[NormFold] | None = None,
                       zeroed: Collection[str] = ()) -> list[dict[str, torch.Tensor]]:
    """The kept tensors under their new names, in groups a weight conversion never spans: everything
    outside the stack, then each kept block. References to the model's tensors, not copies, but for the
    norm tensors of ``folds`` (new tensors with the LNS factor folded in) and those of ``zeroed`` (zeros)."""
    prefix = stack.path + "."
    new_index = {old: new for new, old in enumerate(keep)}
    ignored = set(getattr(model, "_keys_to_ignore_on_save", None) or ())
    changes = _changes(stack, folds or [], zeroed)
    state: dict[str, torch.Tensor] = {}
    group_of: dict[str, int] = {}
    for key, value in model.state_dict().items():
        if key in ignored:
            continue
        change, group = changes.pop(key, None), -1
        if key.startswith(prefix):
            idx, _, rest = key[len(prefix):].partition(".")
            if int(idx) not in new_index:
                continue
            group = new_index[int(idx)]
            key = f"{prefix}{group}.{rest}"
        state[key] = value if change is None else change(value)
        group_of[key] = group
    if changes:
        raise UserError(f"cannot fold LayerNorm Scaling or zero a removed sub-layer: the weights "
                        f"{', '.join(sorted(changes)[:3])} are not in the model's state_dict under these names")
    state = _without_aliases(model, state)
    groups: list[dict[str, torch.Tensor]] = [{} for _ in range(len(keep) + 1)]
    for key, value in state.items():
        groups[group_of[key] + 1][key] = value
    return [g for g in groups if g]


def _as_saved(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The names and layout ``save_pretrained`` writes (transformers 5 reverts its load-time weight
    conversions, e.g. fused MoE experts back to one tensor per expert); 4.x saves as is."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:
        return tensors
    return revert_weight_conversion(model, tensors)


def _save_shard(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """One safetensors file, with the user's umask (safetensors writes it ``-rw-------``)."""
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"format": "pt"})
    os.chmod(path, file_mode())


def _write_weights(model: nn.Module, stack: LayerStack, keep: list[int], folder: Path, max_bytes: int,
                   num_parameters: int, folds: list[NormFold] | None = None,
                   zeroed: Collection[str] = ()) -> tuple[list[str], int]:
    """Write the kept weights into ``folder`` as safetensors shards of at most ``max_bytes`` (a tensor
    larger than that gets a shard of its own), the norms of ``folds`` with their LNS factor folded in,
    the tensors of ``zeroed`` as zeros; returns the file names and the bytes written."""
    shards: list[list[str]] = []
    current: dict[str, torch.Tensor] = {}
    size = total = 0

    def flush() -> None:
        nonlocal current, size
        if current:
            _save_shard(current, folder / f".shard-{len(shards):05d}.tmp")
            shards.append(list(current))
            current, size = {}, 0

    for group in _renumbered_groups(model, stack, keep, folds, zeroed):
        for name, tensor in _as_saved(model, group).items():
            nbytes = tensor.numel() * tensor.element_size()
            if current and size + nbytes > max_bytes:
                flush()
            current[name] = tensor.detach().contiguous()
            size += nbytes
            total += nbytes
    flush()
    if not shards:
        raise UserError("the model has no weights to save")
    if len(shards) == 1:
        (folder / ".shard-00000.tmp").rename(folder / "model.safetensors")
        return ["model.safetensors"], total
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for i, (name, keys) in enumerate(zip(names, shards, strict=True)):
        (folder / f".shard-{i:05d}.tmp").rename(folder / name)
        weight_map.update(dict.fromkeys(keys, name))
    index = {"metadata": {"total_parameters": num_parameters, "total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n",
                                                         encoding="utf-8")
    return names, total


@contextmanager
def _staging(target: Path, overwrite: bool) -> Iterator[Path]:
    """A hidden sibling of ``target`` to write into (the user's umask, marked as this process's),
    renamed into place on success and removed on any exception (Ctrl-C included). What an
    earlier process killed mid-save left beside it is removed first. Replacing an old folder
    moves it into a marked sibling first and deletes it only once the new one is in place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(target.parent)
    tmp = staging_folder(target.parent, target.name)
    try:
        yield tmp
        for path in tmp.iterdir():  # on disk before the rename makes them visible
            if path.is_file():
                with open(path, "rb") as fh:
                    os.fsync(fh.fileno())
        _check_target(target, overwrite)  # nobody filled it meanwhile
        unmark(tmp)
        _publish(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _publish(tmp: Path, target: Path) -> None:
    """Rename ``tmp`` to ``target``; an existing ``target`` is moved aside into a marked folder
    first (put back should the rename fail) and removed once the new one is in place."""
    if not target.exists():
        os.rename(tmp, target)
        return
    aside = staging_folder(target.parent, target.name, suffix=".old", replaces=target.name)
    old = aside / "previous"
    os.rename(target, old)
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(old, target)
        shutil.rmtree(aside, ignore_errors=True)
        raise
    shutil.rmtree(aside, ignore_errors=True)
