"""Where a linear heal is folded, and the fold itself: exact, reversible, checked by running the model.

A removed span of blocks ``[i, j]`` is healed at its *site*: the MLP of block ``i - 1``, the last
kept block before the cut. Its output ``M`` is added to the residual stream unchanged in a
pre-LN block, so replacing ``M`` by ``M + M T`` adds ``M T`` to the stream, and that folds into
the weights that produce ``M``:

* ``nn.Linear`` (``y = h Wᵀ + b``): ``W' = W + Tᵀ W``, ``b' = b + b T``;
* GPT-2's ``Conv1D`` (``y = h W + b``): ``W' = W + W T``, ``b' = b + b T``;
* a mixture of experts: every routed and shared expert's output projection, since the MLP's
  output is a weighted sum of theirs (fused 3-D expert weights, one expert at a time).

A span starting at block 0 has no kept block before it: its site is the input embeddings
(``E' = E + E T``, the stream entering block 0 being ``E[ids]`` plus what does not depend on
``E``), only when they are not tied to the output head.

Whether ``M`` really is what the block adds is not read off class names: :func:`check_foldable`
folds a random transform and runs the model once, and a block whose MLP output passes through
a norm before the add (Gemma 2/3's sandwich norms, Post-LN blocks, BERT) is refused with one line.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import UserError
from ..interventions.removal import VARIANT_WEIGHTS
from ..model.families import MLP_OUTPUT_PROJECTIONS
from ..model.patch import patched
from ..model.structure import LayerStack, block_input, first_tensor, no_cache_kwargs, sublayers

#: The site of a span that starts at block 0: the input embeddings.
EMBEDDINGS = -1


@dataclass(frozen=True)
class Target:
    """One weight a transform folds into (and its bias, if any).

    ``out_last``: the output features lie along the last dimension (``h W``: Conv1D, embeddings,
    transposed experts), so ``W' = W + W T``; otherwise along the one before (``h Wᵀ``: nn.Linear,
    fused experts), so ``W' = W + Tᵀ W``.
    """

    name: str
    weight: nn.Parameter
    out_last: bool
    bias: nn.Parameter | None = None


@dataclass(frozen=True)
class FoldSite:
    """Where the transform of a span is folded: ``block`` (or :data:`EMBEDDINGS`), the module whose
    output is ``X`` (what the fit regresses on), and the weights that produce it."""

    block: int
    source: nn.Module
    targets: tuple[Target, ...]

    @property
    def label(self) -> str:
        return "the input embeddings" if self.block == EMBEDDINGS else f"block {self.block}'s MLP"


def fold_site(model: nn.Module, stack: LayerStack, block: int) -> FoldSite:
    """The site of block ``block``'s MLP (``-1``: the input embeddings), its weights found; refuses
    with one line where there is nothing to fold into."""
    if block == EMBEDDINGS:
        return _embedding_site(model)
    layer = stack.layers[block]
    name = type(layer).__name__
    mlp_name = sublayers(layer).get("mlp")
    scope = getattr(layer, mlp_name) if mlp_name else layer
    targets = _targets(scope, model_hidden(model), inline=mlp_name is None)
    if not targets:
        raise UserError(f"cannot heal into block {block} ({name}): no MLP output projection named "
                        f"{', '.join(MLP_OUTPUT_PROJECTIONS)} found in it")
    source = scope if mlp_name else targets[0].weight_module
    return FoldSite(block, source, tuple(t.target for t in targets))


def model_hidden(model: nn.Module) -> int:
    """The width of the residual stream (the input embeddings' width)."""
    return int(model.get_input_embeddings().weight.shape[-1])


def _embedding_site(model: nn.Module) -> FoldSite:
    embed = model.get_input_embeddings()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and getattr(head, "weight", None) is not None and _same_storage(head.weight, embed.weight):
        raise UserError(f"cannot heal a removal that starts at block 0 of {type(model).__name__}: its input "
                        "embeddings are tied to the output head, so folding the heal into them would change "
                        "the head too; keep block 0")
    return FoldSite(EMBEDDINGS, embed, (Target("input embeddings", embed.weight, out_last=True),))


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a is b or (a.device == b.device and a.data_ptr() == b.data_ptr())


@dataclass(frozen=True)
class _Found:
    target: Target
    weight_module: nn.Module


def _targets(scope: nn.Module, hidden: int, *, inline: bool) -> list[_Found]:
    """Every output projection in ``scope`` (only its direct children when the MLP is ``inline``)."""
    owners = [("", scope)] if inline else list(scope.named_modules())
    found = []
    for owner_name, owner in owners:
        for attr in MLP_OUTPUT_PROJECTIONS:
            name = f"{owner_name}.{attr}".lstrip(".")
            child = owner._modules.get(attr)
            if child is not None:
                found.append(_Found(_module_target(name, child, hidden), child))
            elif isinstance(owner._parameters.get(attr), nn.Parameter) and owner._parameters[attr].ndim == 3:
                found.append(_Found(_experts_target(name, owner, attr, hidden), owner))
    return found


def _module_target(name: str, module: nn.Module, hidden: int) -> Target:
    """nn.Linear (``W: [out, in]``) or a ``Conv1D``-like module (``W: [in, out]``)."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, nn.Parameter) or weight.ndim != 2 or not weight.is_floating_point():
        raise UserError(f"cannot heal into {name} ({type(module).__name__}): its weight is not a plain floating "
                        "point matrix (a quantized model cannot be healed)")
    out_last = not isinstance(module, nn.Linear)
    if weight.shape[-1 if out_last else -2] != hidden:
        raise UserError(f"cannot heal into {name}: its weight {tuple(weight.shape)} does not output the "
                        f"hidden size {hidden}")
    bias = getattr(module, "bias", None)
    return Target(name, weight, out_last, bias if isinstance(bias, nn.Parameter) else None)


def _experts_target(name: str, owner: nn.Module, attr: str, hidden: int) -> Target:
    """A fused experts' 3-D weight: ``[E, out, in]`` used as ``linear`` (transformers' default), or
    ``[E, in, out]`` where the module says ``is_transposed`` or only that layout fits."""
    weight = owner._parameters[attr]
    rows, cols = weight.shape[-2:]
    out_last = bool(getattr(owner, "is_transposed", False)) or (rows != hidden and cols == hidden)
    if weight.shape[-1 if out_last else -2] != hidden or not weight.is_floating_point():
        raise UserError(f"cannot heal into {name}: its weight {tuple(weight.shape)} is not a floating point "
                        f"expert projection to the hidden size {hidden}")
    bias = owner._parameters.get(f"{attr}_bias")
    return Target(name, weight, out_last, bias)


# --- the fold --------------------------------------------------------------------------------------

def folded(target: Target, transform: torch.Tensor) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """New tensors for ``target``'s weight (and bias) with ``transform`` folded in: computed in float64,
    stored in the weight's dtype; a 3-D weight one expert at a time."""
    t = transform.to(device=target.weight.device, dtype=torch.float64)
    out = [(target.weight, _fold_weight(target.weight.detach(), t, target.out_last))]
    if target.bias is not None:
        b = target.bias.detach()
        out.append((target.bias, (b.double() + b.double() @ t).to(b.dtype)))
    return out


def _fold_weight(weight: torch.Tensor, t: torch.Tensor, out_last: bool) -> torch.Tensor:
    if weight.ndim == 3:
        return torch.stack([_fold_weight(w, t, out_last) for w in weight])
    w = weight.double()
    new = w + w @ t if out_last else w + t.T @ w
    return new.to(weight.dtype)


@contextmanager
def swapped(pairs: list[tuple[nn.Parameter, torch.Tensor]]) -> Iterator[None]:
    """Each parameter holds its new tensor for the duration; its own tensor object is back on exit,
    exceptions included (so the model is restored bit for bit). The tensors are part of the variant
    (:data:`~lnsdiag.interventions.removal.VARIANT_WEIGHTS`): a comparison with the full model lifts them."""
    with patched() as patches:
        for param, new in pairs:
            patches.tensor(param, new, tag=VARIANT_WEIGHTS)
        yield


# --- reading activations -------------------------------------------------------------------------

class _Stop(Exception):
    """Raised by a hook once everything wanted is read: the rest of the forward pass is not run."""


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def site_activations(model: nn.Module, stack: LayerStack, site: FoldSite, ids: torch.Tensor,
                     mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(X, H)`` of a batch: the site's output, and the residual stream right after the site
    (block ``site.block``'s output; for the embeddings, what enters block 0). The pass stops there."""
    seen: dict[str, torch.Tensor] = {}

    def source(module: nn.Module, args: tuple, output: object) -> None:
        seen["x"] = first_tensor(output)

    def after(module: nn.Module, args: tuple, output: object) -> None:
        seen["h"] = first_tensor(output)
        raise _Stop

    def before(module: nn.Module, args: tuple, kwargs: dict) -> None:
        seen["h"] = block_input(args, kwargs)
        raise _Stop

    with patched() as patches:
        patches.hook(site.source, source)
        if site.block == EMBEDDINGS:
            patches.pre_hook(stack.layers[0], before, with_kwargs=True)
        else:
            patches.hook(stack.layers[site.block], after)
        _run(model, ids, mask)
    x, h = seen["x"], seen["h"]
    return (x.reshape(h.shape) if x.shape != h.shape and x.numel() == h.numel() else x), h  # OPT: flat tokens


@torch.no_grad()
def block_output(model: nn.Module, stack: LayerStack, block: int, ids: torch.Tensor,
                 mask: torch.Tensor | None) -> torch.Tensor:
    """The residual stream after block ``block`` for a batch; the pass stops there."""
    seen: dict[str, torch.Tensor] = {}

    def after(module: nn.Module, args: tuple, output: object) -> None:
        seen["h"] = first_tensor(output)
        raise _Stop

    with patched() as patches:
        patches.hook(stack.layers[block], after)
        _run(model, ids, mask)
    return seen["h"]


def _run(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor | None) -> None:
    device = model_device(model)
    kwargs = {"attention_mask": mask.to(device)} if mask is not None else {}
    try:
        model(input_ids=ids.to(device), **kwargs, **no_cache_kwargs(model))
    except _Stop:
        return
    raise RuntimeError("the model's forward pass never reached the block a heal reads")


# --- is the fold exact here? -----------------------------------------------------------------------

#: Largest relative error of ``H' - H`` against ``X T`` that still counts as exact, per dtype class.
_TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-3}
_HALF_TOLERANCE = 5e-2


def check_foldable(model: nn.Module, stack: LayerStack, site: FoldSite, seed: int = 0) -> None:
    """Refuse (one line) unless folding a transform at ``site`` adds exactly ``X T`` to the stream.

    One random ``T`` (scaled so that ``X T`` is as large as the stream, so rounding stays small
    next to it), folded for one forward pass of 8 fixed tokens: a norm between the MLP and the
    residual add, or an MLP output projection the search missed, shows as a large error.
    """
    vocab = int(getattr(model.config, "vocab_size", 100) or 100)
    ids = (torch.arange(1, 9) * 7 % max(vocab - 1, 1)).unsqueeze(0) + 1
    x, h = site_activations(model, stack, site, ids, None)
    gen = torch.Generator().manual_seed(seed)
    d = x.shape[-1]
    t = torch.randn(d, d, generator=gen, dtype=torch.float64) / d**0.5
    t *= float(h.double().norm() / (x.double() @ t.to(x.device)).norm().clamp_min(1e-30))
    pairs = [p for target in site.targets for p in folded(target, t)]
    with swapped(pairs):
        _, healed = site_activations(model, stack, site, ids, None)
    expected = x.double() @ t.to(x.device)
    error = float((healed.double() - h.double() - expected).norm() / expected.norm().clamp_min(1e-30))
    if error > _TOLERANCE.get(x.dtype, _HALF_TOLERANCE):
        raise UserError(f"cannot heal into {site.label} of {type(model).__name__}: what it outputs is not what its "
                        f"block adds to the residual stream (a norm after the MLP, or a Post-LN block; folding "
                        f"a test transform was off by {error:.0%})")
