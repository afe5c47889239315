"""Training-free linear heal of a pruned model (after ReplaceMe and LinearPatch, 2025).

Fit on a calibration text, one ``d×d`` transform per removed span of blocks, folded into the
output projection of the MLP before the cut, so the healed model has the pruned model's shape::

    from lnsdiag.heal import calibration_windows, fit_linear_patch, healed, build_healed

    calib = calibration_windows(tokenizer, calib_texts, seq_len=2048, max_tokens=65_536,
                                evaluation=(eval_texts, eval_windows))  # refused if they overlap
    patch = fit_linear_patch(model, Removal.parse("20-27"), calib)
    with healed(model, patch, remove=True):      # the loaded model, restored bit for bit on exit
        ...
    small = build_healed(model, patch)           # a new, smaller model; save_healed writes one

Modules: ``sites.py`` (where and how a transform folds, checked exact by running the model),
``fitted.py`` (``LinearPatch``: plain data, saved as safetensors), ``linear.py`` (the fit),
``apply.py`` (``healed``, ``build_healed``, ``save_healed``), ``calibration.py`` (calibration
windows, disjoint from the evaluation text); ``lora.py``, the trained heal: LoRA adapters (peft)
distilled from the full model's logits, merged as weight deltas (``train_lora``, ``lora_healed``).
"""

from __future__ import annotations

from .apply import build_healed, healed, save_healed
from .calibration import calibration_windows, check_disjoint
from .fitted import LinearPatch, SpanFit, contiguous_spans
from .linear import RIDGE, NormalEquations, fit_linear_patch
from .lora import LoraPatch, lora_healed, save_lora_healed, train_lora
from .sites import check_foldable, fold_site

__all__ = [
           "RIDGE",
           "LinearPatch",
           "LoraPatch",
           "NormalEquations",
           "SpanFit",
           "build_healed",
           "calibration_windows",
           "check_disjoint",
           "check_foldable",
           "contiguous_spans",
           "fit_linear_patch",
           "fold_site",
           "healed",
           "lora_healed",
           "save_healed",
           "save_lora_healed",
           "train_lora",
]
