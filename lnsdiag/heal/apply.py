"""A fitted heal applied to a model: reversibly on a loaded model, permanently only on a new one.

* :func:`healed` folds every span's transform into the loaded model's weights for the duration
  of a ``with`` block and puts the very same tensors back on exit, exceptions included; it
  composes with :func:`~lnsdiag.interventions.removal.removed_layers` (or removes the blocks
  itself with ``remove=True``).
* :func:`build_healed` is the pruned and healed model built for real (the reference a test
  compares with, what a saved checkpoint holds); :func:`save_healed` writes it as a checkpoint
  that plain ``AutoModelForCausalLM.from_pretrained`` loads.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from torch import nn

from ..checkpoint.reference import build_without_layers
from ..checkpoint.save import SavedCheckpoint, save_without_layers
from ..errors import UserError
from ..interventions.removal import removed_layers
from ..model.load import LoadedModel
from ..model.structure import LayerStack, find_layers
from .fitted import LinearPatch
from .sites import fold_site, folded, model_hidden, swapped


def check_matches(model: nn.Module, stack: LayerStack, patch: LinearPatch) -> None:
    """Refuse (one line) a patch fitted on a model of another depth or width."""
    if len(stack) != patch.num_layers or model_hidden(model) != patch.hidden_size:
        raise UserError(f"the heal was fitted on a model of {patch.num_layers} blocks of width {patch.hidden_size}, "
                        f"not {len(stack)} of width {model_hidden(model)}")


@contextmanager
def healed(model: nn.Module, patch: LinearPatch, *, remove: bool = False,
           stack: LayerStack | None = None) -> Iterator[LayerStack]:
    """``model`` with ``patch``'s transforms folded into its weights inside the ``with`` block;
    with ``remove=True`` its removed blocks are removed too. Restored bit for bit on exit.

    >>> with removed_layers(model, patch.removal), healed(model, patch):
    ...     logits = model(ids, use_cache=False).logits   # the pruned model, healed
    """
    stack = stack or find_layers(model)
    check_matches(model, stack, patch)
    pairs = [pair for span in patch.spans for target in fold_site(model, stack, span.site).targets
             for pair in folded(target, span.transform)]
    with ExitStack() as exits:
        exits.enter_context(swapped(pairs))
        if remove:
            exits.enter_context(removed_layers(model, patch.removal, stack=stack))
        yield stack


def build_healed(model: nn.Module, patch: LinearPatch, stack: LayerStack | None = None) -> nn.Module:
    """A new model of the same class really built without ``patch.removal``'s blocks, the heal folded
    into its weights (:func:`~lnsdiag.checkpoint.reference.build_without_layers` of the healed model).
    ``model`` is left as it was."""
    stack = stack or find_layers(model)
    with healed(model, patch, stack=stack):
        return build_without_layers(model, patch.removal.blocks, stack)


def save_healed(model: Any, patch: LinearPatch, folder: str | Path, **options: Any) -> SavedCheckpoint:
    """Write the pruned, healed model as a checkpoint (:func:`~lnsdiag.checkpoint.save.save_without_layers`
    of the healed model, ``options`` passed on); its provenance records the heal (``heal``)."""
    inner = model.model if isinstance(model, LoadedModel) else model
    provenance = {**(options.pop("provenance", None) or {}), "heal": patch.summary()}
    with healed(inner, patch):
        return save_without_layers(model, patch.removal.blocks, folder, provenance=provenance, **options)
