"""A trained heal: LoRA adapters on the pruned model's kept blocks, distilled from the full model.

shortened-llm, FinerCut and Gromov et al. heal a depth-pruned model with LoRA; distilling the full
model's next-token distributions (``loss="kd"``: KL(p_full ‖ p_pruned) per token) rather than the
next token (``"lm"``) uses what the removed blocks knew. The full model is the same loaded model:
its removals lifted and the adapters switched off for the teacher's forward, so no second copy is
held. Adapters are peft's LoRA (``W + (α/r)·B·A``, B zero at the start: the pruned model unchanged
at step 0), injected for the training only and taken out afterwards (the loaded model's own modules
put back, bit for bit); what is kept is each adapter's factors, merged as weight deltas when the
healed model is scored or saved (:func:`lora_healed`), like the linear heal.

Seeded, with progress and an ETA; Ctrl-C keeps the best adapters so far (lowest training loss over
the last steps) and says so.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint.save import SavedCheckpoint, save_without_layers
from ..data.windows import TokenWindows
from ..errors import UserError
from ..interventions.removal import VARIANT_WEIGHTS, removals_suspended, removed_layers
from ..interventions.units import Removal
from ..model.load import LoadedModel
from ..model.patch import patched
from ..model.structure import LayerStack, find_layers, no_cache_kwargs
from .fitted import read_patch_file, write_patch_file

_META_KEY = "lnsdiag_lora"
LOSSES = ("kd", "lm")
#: Adapter rank, scale and learning rate by default (shortened-llm's LoRA uses r = 8, α = 16).
RANK, ALPHA, LR = 8, 16.0, 2e-4
#: Steps the "best so far" loss is averaged over.
WINDOW = 8
_ABSENT = object()


@dataclass(frozen=True)
class LoraPatch:
    """Trained adapters of ``removal``: per adapted linear layer (its name in the model) the factors
    ``A`` (r × in) and ``B`` (out × r); the delta is ``scale · B A``. ``record``: how it was trained."""

    removal: Removal
    num_layers: int
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(repr=False)
    scale: float
    record: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {"method": "lora", "removed": self.removal.to_json(), "num_layers": self.num_layers,
                "scale": self.scale, "layers": len(self.factors), **self.record}

    def save(self, path: str | Path) -> Path:
        """The factors as one safetensors file (float32, written atomically), the record as metadata."""
        tensors = {}
        for k, (_name, (a, b)) in enumerate(sorted(self.factors.items())):
            tensors[f"{k}.A"], tensors[f"{k}.B"] = a, b
        names = [name for name, _ in sorted(self.factors.items())]
        return write_patch_file(path, tensors, {**self.summary(), "names": names}, _META_KEY)

    @classmethod
    def load(cls, path: str | Path) -> LoraPatch:
        """Read a patch :meth:`save` wrote; refuses (one line) a file that is not one."""
        record, tensors = read_patch_file(path, _META_KEY, "a LoRA heal")
        names = record.pop("names")
        factors = {name: (tensors[f"{k}.A"], tensors[f"{k}.B"]) for k, name in enumerate(names)}
        extra = {k: v for k, v in record.items() if k not in ("method", "removed", "num_layers", "scale", "layers")}
        return cls(Removal.from_json(record["removed"]), int(record["num_layers"]), factors, float(record["scale"]),
                   extra)


def adapted_layers(model: nn.Module, stack: LayerStack, removal: Removal) -> dict[str, nn.Linear]:
    """Every ``nn.Linear`` of the kept blocks, by its name in the model (what the adapters go on)."""
    names = {id(m): n for n, m in model.named_modules()}
    out = {}
    for i, block in enumerate(stack.layers):
        if i in removal.blocks:
            continue
        for module in block.modules():
            if type(module) is nn.Linear:
                out[names[id(module)]] = module
    if not out:
        raise UserError("the kept blocks hold no nn.Linear layer for LoRA (a quantized or custom model?)")
    return out


@contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    """The model's own parameters take no gradient for the duration; their flags back afterwards."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@contextmanager
def _injected(model: nn.Module, layers: dict[str, nn.Linear], rank: int, alpha: float) -> Iterator[dict[str, Any]]:
    """peft's LoRA on ``layers`` for the duration; each original module put back in its parent afterwards."""
    from peft import LoraConfig, inject_adapter_in_model

    parents = []
    for name in layers:
        owner, _, attr = name.rpartition(".")
        parents.append((model.get_submodule(owner) if owner else model, attr, layers[name]))
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(layers), bias="none")
    had = model.__dict__.get("peft_config", _ABSENT)  # peft records its config on the model: not kept
    try:
        inject_adapter_in_model(config, model, adapter_name="lnsdiag")
        yield {name: model.get_submodule(name) for name in layers}
    finally:
        for parent, attr, original in parents:
            setattr(parent, attr, original)
        if had is _ABSENT:
            model.__dict__.pop("peft_config", None)
        else:
            model.peft_config = had


@contextmanager
def _adapters_off(wrapped: dict[str, Any]) -> Iterator[None]:
    for layer in wrapped.values():
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in wrapped.values():
            layer.enable_adapters(True)


def _loss(student: torch.Tensor, teacher: torch.Tensor | None, ids: torch.Tensor, mask: torch.Tensor,
          kind: str) -> torch.Tensor:
    """Mean over predicted tokens of KL(p_teacher ‖ p_student) (``kd``) or the next token's NLL (``lm``)."""
    keep = mask[:, 1:].bool()
    logp = student[:, :-1].float().log_softmax(-1)[keep]
    if kind == "lm":
        return -logp.gather(-1, ids[:, 1:][keep].unsqueeze(-1)).mean()
    target = teacher[:, :-1].float().log_softmax(-1)[keep]
    return (target.exp() * (target - logp)).sum(-1).mean()


def train_lora(model: nn.Module, removal: Removal | list[int], windows: TokenWindows, *, steps: int,
               loss: str = "kd", rank: int = RANK, alpha: float = ALPHA, lr: float = LR, seed: int = 1234,
               batch_size: int = 8, stack: LayerStack | None = None,
               progress: Callable[[str], None] | None = None) -> LoraPatch:
    """Train LoRA adapters on the pruned model (``model`` with ``removal`` removed) over ``steps`` batches
    of the calibration ``windows``; ``model`` is left exactly as it was. Ctrl-C ends the training early
    with the best adapters so far (recorded as interrupted)."""
    removal = Removal.of(removal)
    stack = stack or find_layers(model)
    if not removal.blocks or len(removal.blocks) != len(removal):
        raise UserError(f"a LoRA heal needs whole blocks removed, not {removal.cell or 'none'}")
    if loss not in LOSSES:
        raise UserError(f"--heal-loss must be kd or lm, not {loss!r}")
    if steps < 1:
        raise UserError(f"--heal-steps must be at least 1, not {steps}")
    batches = list(windows.batches(batch_size))
    if not batches:
        raise UserError("the calibration text has no window to train on")
    layers = adapted_layers(model, stack, removal)
    device = model.get_input_embeddings().weight.device
    torch.manual_seed(seed)
    record: dict[str, Any] = {"loss": loss, "rank": rank, "alpha": alpha, "lr": lr, "seed": seed, "steps": steps,
                              "batch_size": batch_size, "calibration": {"name": windows.name, "digest": windows.digest}}
    best: tuple[float, dict[str, tuple[torch.Tensor, torch.Tensor]]] | None = None
    recent: list[float] = []
    done, start = 0, time.monotonic()
    with ExitStack() as exits:
        exits.enter_context(_frozen(model))
        wrapped = exits.enter_context(_injected(model, layers, rank, alpha))
        exits.enter_context(removed_layers(model, removal, stack=stack))
        params = [p for layer in wrapped.values()
                  for p in (layer.lora_A["lnsdiag"].weight, layer.lora_B["lnsdiag"].weight)]
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        try:
            for step in range(steps):
                ids, mask = (t.to(device) for t in batches[step % len(batches)])
                teacher = None
                if loss == "kd":
                    with torch.no_grad(), _adapters_off(wrapped), removals_suspended(model, stack=stack):
                        teacher = model(input_ids=ids, attention_mask=mask, **no_cache_kwargs(model)).logits
                student = model(input_ids=ids, attention_mask=mask, **no_cache_kwargs(model)).logits
                value = _loss(student, teacher, ids, mask, loss)
                optimizer.zero_grad(set_to_none=True)
                value.backward()
                optimizer.step()
                done = step + 1
                recent = (recent + [float(value.detach())])[-WINDOW:]
                mean = sum(recent) / len(recent)
                if best is None or mean <= best[0] or len(recent) < WINDOW:
                    best = (mean, _factors(wrapped))
                if progress and (done % max(1, steps // 10) == 0 or done == steps):
                    eta = (time.monotonic() - start) / done * (steps - done)
                    progress(f"LoRA heal of {removal.cell}: step {done}/{steps}, {loss} loss {mean:.4g}, "
                             f"ETA {eta:.0f} s")
        except KeyboardInterrupt:
            record["interrupted_at"] = done
            if progress:
                progress(f"interrupted at step {done}: keeping the best adapters so far")
            if best is None:
                raise
    record.update(trained_steps=done, final_loss=best[0] if best else math.nan)
    return LoraPatch(removal, len(stack), best[1], alpha / rank, record)


def _factors(wrapped: dict[str, Any]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {name: (layer.lora_A["lnsdiag"].weight.detach().clone(), layer.lora_B["lnsdiag"].weight.detach().clone())
            for name, layer in wrapped.items()}


def merged(model: nn.Module, patch: LoraPatch) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """Each adapted layer's weight with its delta added (``W + scale · B A``, in float32, stored in the
    weight's dtype)."""
    out = []
    for name, (a, b) in patch.factors.items():
        weight = model.get_submodule(name).weight
        delta = patch.scale * (b.to(weight.device, torch.float32) @ a.to(weight.device, torch.float32))
        out.append((weight, (weight.detach().float() + delta).to(weight.dtype)))
    return out


@contextmanager
def lora_healed(model: nn.Module, patch: LoraPatch, *, remove: bool = False,
                stack: LayerStack | None = None) -> Iterator[LayerStack]:
    """``model`` with the adapters merged into its weights inside the ``with`` block (part of the variant:
    a comparison with the full model lifts them); with ``remove=True`` its removed blocks removed too.
    Restored bit for bit on exit."""
    stack = stack or find_layers(model)
    if len(stack) != patch.num_layers:
        raise UserError(f"the LoRA heal was trained on a model of {patch.num_layers} blocks, not {len(stack)}")
    with patched() as patches, ExitStack() as exits:
        for param, new in merged(model, patch):
            patches.tensor(param, new, tag=VARIANT_WEIGHTS)
        if remove:
            exits.enter_context(removed_layers(model, patch.removal, stack=stack))
        yield stack


def save_lora_healed(model: Any, patch: LoraPatch, folder: str | Path, **options: Any) -> SavedCheckpoint:
    """Write the pruned model with the adapters merged into its weights (a plain checkpoint of the standard
    architecture: :func:`~lnsdiag.checkpoint.save.save_without_layers` inside :func:`lora_healed`)."""
    inner = model.model if isinstance(model, LoadedModel) else model
    provenance = {**(options.pop("provenance", None) or {}), "heal": patch.summary()}
    with lora_healed(inner, patch):
        return save_without_layers(model, patch.removal.blocks, folder, provenance=provenance, **options)
