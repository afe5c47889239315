"""lnsdiag: find the dead weight in large language models.

Everything the command line does is a function here, for notebooks::

    from lnsdiag import load_model, removed_layers, angular_on_text, stdlib_corpus, prune

    loaded = load_model("meta-llama/Llama-2-7b-hf")
    result = angular_on_text(loaded, stdlib_corpus("test").texts, max_tokens=32_768)
    with removed_layers(loaded.model, [27]):
        ...  # the model without block 27, exactly
    sweep = prune.run(loaded, prune.PruneConfig(tasks=("arc_easy",)), "results/llama")  # resumable

Each command's runner is a module: ``prune``, ``shrink``, ``angular``, ``variance``,
``reproduce``, ``compare`` (a config object, then ``run``); the demo is ``lnsdiag.runners.demo``.
Names are imported on first use, so ``import lnsdiag`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: public name -> module that defines it (relative to this package)
_EXPORTS: dict[str, str] = {
    # loading
    "ALIASES": "model.families", "LoadedModel": "model.load", "ModelOptions": "model.load",
    "load_model": "model.load", "resolve_model": "model.load", "restore_norms": "model.load",
    # structure, removal, the reference
    "LayerStack": "model.structure", "find_layers": "model.structure", "norm_placement": "model.placement",
    "parse_layer_spec": "model.structure", "removed_layers": "interventions.removal",
    "resumed_at": "interventions.removal", "build_without_layers": "checkpoint.reference",
    "save_without_layers": "checkpoint.save", "model_card": "checkpoint.card", "removal_savings": "model.cost",
    # text and its token windows
    "TextSource": "data.text", "resolve_text": "data.text", "from_file": "data.text", "from_dataset": "data.text",
    "stdlib_corpus": "data.text", "TokenWindows": "data.windows", "token_windows": "data.windows",
    "batches": "data.windows",
    # measurements
    "stream_states": "measure.stream", "AngularConfig": "measure.angular", "AngularResult": "measure.angular",
    "angular_distances": "measure.angular", "angular_on_text": "measure.angular",
    "VarianceConfig": "measure.variance", "VarianceResult": "measure.variance",
    "residual_variance": "measure.variance", "variance_on_text": "measure.variance",
    # scoring and sweeps
    "Scorer": "scoring.base", "Scores": "scoring.base", "MetricRow": "scoring.base", "TokenRequest": "scoring.base",
    "TaskSet": "scoring.lmeval.tasks", "load_tasks": "scoring.lmeval.tasks", "make_lm": "scoring.lmeval.lm",
    "evaluate_tasks": "scoring.lmeval.tasks", "LmEvalScorer": "scoring.lmeval.scorer",
    "RemovalHFLM": "scoring.lmeval.model_type",  # lm-eval's model type "lnsdiag", registered on first use
    "Perplexity": "scoring.perplexity", "perplexity": "scoring.perplexity", "PerplexityScorer": "scoring.perplexity",
    "SweepEngine": "engine.fast", "Removal": "interventions.units", "run_naive": "engine.naive",
    "run_fast": "engine.sweep", "perplexity_sweep": "engine.sweep",
    "ResultStore": "results.store", "VariantResult": "results.store", "prune_frame": "results.verdict",
    "PruneConfig": "runners.prune", "PruneRun": "runners.prune", "ShrinkConfig": "runners.shrink",
    "ShrinkRun": "runners.shrink", "DemoConfig": "runners.demo",
    "compare_folders": "runners.compare", "load_run": "runners.compare",
    # LayerNorm Scaling and the twins
    "apply_lns": "interventions.lns", "remove_lns": "interventions.lns", "restore_lns": "interventions.lns",
    "fold_lns": "interventions.lns", "unfold_lns": "interventions.lns", "export_checkpoint": "checkpoint.export",
    "apply_post_ln": "interventions.postln", "DemoSpec": "demo.model", "ensure_demo_model": "demo.model",
    # a training-free linear heal of a pruned model
    "LinearPatch": "heal.fitted", "fit_linear_patch": "heal.linear", "healed": "heal.apply",
    "build_healed": "heal.apply", "save_healed": "heal.apply", "calibration_windows": "heal.calibration",
    # progress and errors
    "Progress": "progress", "UserError": "errors",
}

#: runner modules reachable as ``lnsdiag.prune`` etc. (``from lnsdiag import prune``)
_MODULES: dict[str, str] = {
    "prune": "runners.prune", "shrink": "runners.shrink", "reproduce": "runners.reproduce",
    "compare": "runners.compare", "angular": "measure.angular", "variance": "measure.variance",
}

__all__ = sorted([*_EXPORTS, *_MODULES, "__version__"])


def __getattr__(name: str) -> Any:
    if name in _MODULES:
        value = importlib.import_module(f".{_MODULES[name]}", __name__)
    elif name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    else:
        raise AttributeError(f"module 'lnsdiag' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
