"""`lnsdiag demo` as a library call: the embedded default, composed of the commands' own runners.

The demo model (:mod:`lnsdiag.demo.model`: shipped with the package, or trained with
``retrain``) is measured exactly as a user's checkpoint would be: ``angular.run``,
``prune.run``, ``shrink.run`` (N = 4, reusing the sweep's results and the angular distances),
then the Pre-LN/LNS twins of ``reproduce.run``, whose Pre-LN side is the
model the first two parts already measured on the same tokens (only its residual variance
is new), so nothing is computed twice.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from ..data.text import stdlib_corpus
from ..demo.model import (
    SHIPPED_NORMS,
    WEIGHTS,
    DemoSpec,
    demo_dir,
    ensure_demo_model,
    materialise,
    shipped_dir,
    verify_shipped,
)
from ..errors import UserError
from ..interventions.lns import is_folded, unfold_lns
from ..measure import angular
from ..model.load import load_model, pick_device
from ..progress import SILENT, Progress
from ..runs import Timer
from . import prune, reproduce, shrink


@dataclass(frozen=True)
class DemoConfig:
    """What ``lnsdiag demo`` can be told. ``retrain`` trains the models from scratch instead of
    using the shipped (or cached) ones; ``fresh`` is its old name."""

    steps: int | None = None
    layers: int | None = None
    retrain: bool = False
    twin: bool = True
    device: str = "auto"
    fresh: bool = False
    shrink: int = 4  # layers removed together at most (0: no shrink part)

    def __post_init__(self) -> None:
        if self.steps is not None and self.steps < 1:
            raise UserError(f"--steps must be at least 1, not {self.steps}")
        if self.layers is not None and self.layers < 2:
            raise UserError(f"--layers must be at least 2, not {self.layers}")
        if self.shrink < 0:
            raise UserError(f"--shrink must be 0 (off) or more, not {self.shrink}")
        pick_device(self.device)
        if self.fresh:
            object.__setattr__(self, "retrain", True)

    @property
    def spec(self) -> DemoSpec:
        return DemoSpec().with_(steps=self.steps, layers=self.layers)


@dataclass
class DemoRun:
    """Everything the demo produced, part by part."""

    spec: DemoSpec
    model_path: Path
    record: dict[str, Any]
    angular: angular.AngularRun | None = None
    prune: prune.PruneRun | None = None
    shrink: shrink.ShrinkRun | None = None
    twins: reproduce.ReproduceRun | None = None

    @property
    def shipped(self) -> bool:
        """Whether the model measured is the package's shipped one (not trained on this machine)."""
        return (self.record.get("weights") or {}).get("source") == "shipped"


#: Held-out tokens every demo measurement uses.
DEMO_TOKENS = 32_768
#: Batch size of every demo measurement.
DEMO_BATCH = 16


def run(config: DemoConfig, out: str | Path, *, progress: Progress = SILENT,
        on_part: Callable[[str, DemoRun], None] | None = None) -> DemoRun:
    """Take the demo model (shipped, cached or trained), then angular distances, the removal sweep,
    several layers removed at once (``shrink``, reusing the sweep) and the twins.

    Each part is the library call its command makes; the sweep's resumable store goes to
    ``out/prune``, shrink's to ``out/shrink``. ``on_part(name, run)`` sees the run after each part
    (``model``, ``angular``, ``prune``, ``shrink``, ``twins``): the command line shows and writes
    each part there.
    """
    spec = config.spec
    folder = Path(out)
    device = pick_device(config.device)
    show = on_part or (lambda _name, _run: None)
    timer = Timer()
    with timer("train"):
        path, record = ensure_demo_model(spec, fresh=config.retrain, device=device, progress=progress)
    result = DemoRun(spec, path, record)
    show("model", result)
    loaded = load_model(str(path), device=str(device), dtype="float32")  # as the twins: its parts are reused there
    loaded.name = spec.name
    heldout = stdlib_corpus("test")
    result.angular = angular.run(loaded, heldout, angular.AngularConfig(
        max_tokens=DEMO_TOKENS, seq_len=spec.seq_len, batch_size=DEMO_BATCH, tokens="all", max_block=None,
        threshold=0.2), progress=progress, timer=timer)
    show("angular", result)
    sweep = prune.PruneConfig(ppl_dataset="stdlib", ppl_split="test", ppl_max_tokens=DEMO_TOKENS,
                              seq_len=spec.seq_len, batch_size=DEMO_BATCH, fresh=True)  # the held-out docstrings
    result.prune = prune.run(loaded, sweep, folder / "prune", angular_frame=result.angular.result.layers,
                             progress=progress, timer=timer)
    show("prune", result)
    if config.shrink:
        together = shrink.ShrinkConfig(remove=min(config.shrink, spec.layers - 1), scoring=sweep)
        result.shrink = shrink.run(loaded, together, folder / "shrink", angular=result.angular.result,
                                   reuse=folder / "prune", progress=progress, timer=timer)
        show("shrink", result)
    if config.twin:
        result.twins = _twins(result, retrain=config.retrain, device=device, progress=progress)
        show("twins", result)
    return result


def _twins(demo: DemoRun, *, retrain: bool, device: Any, progress: Progress) -> reproduce.ReproduceRun:
    """``reproduce.run`` for both twins, the Pre-LN one being the demo model: its angular
    distances and removal sweep are the demo's angular and prune parts (same held-out tokens
    and settings), so only its residual variance is measured again."""
    assert demo.angular is not None and demo.prune is not None
    frame = demo.prune.frame
    pre_ln = reproduce.Measured(demo.angular.result, frame[(frame["task"] == "ppl") & (frame["metric"] == "ppl")])
    both = reproduce.ReproduceConfig(spec=demo.spec, norms=("pre-ln", "lns"), eval_tokens=DEMO_TOKENS,
                                     batch_size=DEMO_BATCH)
    return reproduce.run(both, device=device, fresh=["lns"] if retrain else False, progress=progress,
                         measured={"pre-ln": pre_ln})


# --- the shipped weights against the recipe --------------------------------------------------

#: What "within noise" means when a retrained twin is compared with the shipped one.
PPL_TOLERANCE = 0.03  # held-out perplexity, relative
REMOVAL_TOLERANCE_PP = 1.0  # each layer's removal Δppl, in percentage points of the baseline ...
REMOVAL_TOLERANCE_REL = 0.2  # ... or this fraction of the shipped Δ, whichever is larger


def _removal_pct(sweep: pd.DataFrame) -> dict[int, float]:
    rows = sweep[sweep["removed_layer"].notna()]
    return {int(r.removed_layer): 100.0 * (r.value / r.baseline - 1.0) for r in rows.itertuples()}


def _verdicts(sweep: pd.DataFrame) -> dict[int, str]:
    rows = sweep[sweep["removed_layer"].notna()]
    return {int(r.removed_layer): str(r.verdict) for r in rows.itertuples()}


def compare_with_shipped(*, eval_tokens: int = DEMO_TOKENS, device: str = "cpu",
                         progress: Progress = SILENT) -> dict[str, Any]:
    """Measure the shipped twins, retrain them from scratch with the recipe, measure those the same way.

    Trains into the current cache (point ``LNSDIAG_CACHE`` at a scratch folder): it ends up
    holding the retrained models. Returns per twin the held-out perplexity, each layer's
    removal effect and verdict, the training losses, and whether the retrained weights
    rounded to float16 are the shipped ones bit for bit (they are when the machine computes
    exactly as the one that exported them); ``agree`` is the "within noise" judgement.
    """
    import torch
    from safetensors.torch import load_file

    spec = DemoSpec()
    shipped: dict[str, Any] = {}
    for norm in SHIPPED_NORMS:  # the shipped weights, whatever the cache holds
        twin = spec.with_(norm=norm)
        folder = shipped_dir(twin)
        if folder is None:
            raise UserError(f"no shipped weights for {twin.name}: run `python -m lnsdiag.demo export` first")
        materialise(folder, verify_shipped(folder), demo_dir(twin))
        shipped[norm] = load_file(folder / WEIGHTS)
    measure = {"eval_tokens": eval_tokens, "batch_size": DEMO_BATCH, "device": device, "progress": progress}
    before = reproduce.reproduce(spec, SHIPPED_NORMS, fresh=False, **measure)
    after = reproduce.reproduce(spec, SHIPPED_NORMS, fresh=True, **measure)
    twins: dict[str, Any] = {}
    for old, new in zip(before.runs, after.runs, strict=True):
        assert (old.record.get("weights") or {}).get("source") == "shipped", old.record.get("weights")
        retrained = _hook_form_weights(new.path, load_file)
        diff = max(float((retrained[k].half().float() - v.float()).abs().max()) for k, v in shipped[old.norm].items())
        old_pct, new_pct = _removal_pct(old.sweep), _removal_pct(new.sweep)
        old_verdicts, new_verdicts = _verdicts(old.sweep), _verdicts(new.sweep)
        worst = max(abs(new_pct[k] - old_pct[k]) - max(REMOVAL_TOLERANCE_PP, REMOVAL_TOLERANCE_REL * abs(old_pct[k]))
                    for k in old_pct)
        old_losses, new_losses = old.record["train"].get("losses", []), new.record["train"].get("losses", [])
        twins[old.norm] = {
            "label": old.label,
            "heldout_ppl": {"shipped": old.perplexity, "retrained": new.perplexity,
                            "relative_difference": new.perplexity / old.perplexity - 1.0},
            "final_train_loss": {"shipped": old.record["train"]["final_train_loss"],
                                 "retrained": new.record["train"]["final_train_loss"]},
            "max_train_loss_difference": (max(abs(a - b) for a, b in zip(old_losses, new_losses, strict=True))
                                          if old_losses and len(old_losses) == len(new_losses) else None),
            "weights_identical_in_float16": diff == 0.0,
            "max_weight_difference_in_float16": diff,
            "deep_angular": {"shipped": old.deep(old.angular.layers, "angular_distance"),
                             "retrained": new.deep(new.angular.layers, "angular_distance")},
            "removal_pct": {"shipped": old_pct, "retrained": new_pct},
            "verdicts": {"shipped": old_verdicts, "retrained": new_verdicts},
            "verdicts_agree": sum(old_verdicts[k] == new_verdicts[k] for k in old_verdicts),
            "layers": len(old_verdicts),
            "within_noise": (abs(new.perplexity / old.perplexity - 1.0) <= PPL_TOLERANCE and worst <= 0.0
                             and all(math.isfinite(v) for v in new_pct.values())),
        }
    order = [before.runs[0].perplexity > before.runs[1].perplexity, after.runs[0].perplexity > after.runs[1].perplexity]
    return {
        "spec": asdict(spec), "eval_text": before.eval_text, "eval_tokens": before.eval_tokens,
        "tolerance": {"heldout_ppl_relative": PPL_TOLERANCE, "removal_pp": REMOVAL_TOLERANCE_PP,
                      "removal_relative": REMOVAL_TOLERANCE_REL},
        "threads": torch.get_num_threads(), "twins": twins,
        "lns_lower_ppl": {"shipped": order[0], "retrained": order[1]},
        "agree": all(t["within_noise"] for t in twins.values()) and order[0] == order[1],
    }


def comparison_lines(comparison: dict[str, Any]) -> list[str]:
    """:func:`compare_with_shipped`'s result in words, one twin per block."""
    lines = [f"Shipped vs retrained demo models, measured on {comparison['eval_tokens']:,} tokens of "
             f"{comparison['eval_text']}:"]
    for twin in comparison["twins"].values():
        ppl, loss, angle = twin["heldout_ppl"], twin["final_train_loss"], twin["deep_angular"]
        pct, verdicts = twin["removal_pct"], twin["verdicts"]
        steps = twin["max_train_loss_difference"]
        weights = ("equal the shipped ones bit for bit" if twin["weights_identical_in_float16"] else
                   f"differ from the shipped ones by at most {twin['max_weight_difference_in_float16']:.3g}")
        lines += [
            f"{twin['label']}: held-out perplexity {ppl['shipped']:.2f} shipped, {ppl['retrained']:.2f} retrained "
            f"({100 * ppl['relative_difference']:+.2f}%); final train loss {loss['shipped']:.4f} vs "
            f"{loss['retrained']:.4f}" + (f" (largest per-step difference {steps:.4f})" if steps is not None else ""),
            f"  weights: retrained, rounded to float16, {weights}",
            f"  deep-half angular distance {angle['shipped']:.4f} vs {angle['retrained']:.4f}; "
            f"verdicts agree on {twin['verdicts_agree']} of {twin['layers']} layers",
            "  layer  Δppl% shipped  retrained  verdict shipped  retrained",
            *(f"  {k:>5}  {pct['shipped'][k]:>+13.2f}  {pct['retrained'][k]:>+9.2f}  {verdicts['shipped'][k]:>15}  "
              f"{verdicts['retrained'][k]:>9}" for k in sorted(pct["shipped"])),
        ]
    tol = comparison["tolerance"]
    lines.append(f"{'within noise' if comparison['agree'] else 'NOT within noise'}: held-out perplexity within "
                 f"{100 * tol['heldout_ppl_relative']:.0f}%, each layer's removal Δppl within "
                 f"{tol['removal_pp']:.1f} pp or {100 * tol['removal_relative']:.0f}% of the shipped Δ, "
                 "LNS vs Pre-LN ordering the same.")
    return lines


def _hook_form_weights(folder: Path, load_file: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
    """A retrained twin's weights as the shipped ones hold them: an LNS twin is written with its
    scales folded into the norm weights, the shipped weights keep them in hooks (unfolded here)."""
    weights = load_file(folder / WEIGHTS)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    if not is_folded(model):
        return weights
    unfold_lns(model)
    state = model.state_dict()
    return {k: state[k] for k in weights}
