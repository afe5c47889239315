"""lnsdiag: find the dead weight in large language models.

Everything the command line does is a function here, for notebooks::

    from lnsdiag import load_model, removed_layers, angular_on_text, stdlib_corpus, prune

    loaded = load_model("meta-llama/Llama-2-7b-hf")
    result = angular_on_text(loaded, stdlib_corpus("test").texts, max_tokens=32_768)
    with removed_layers(loaded.model, [27]):
        ...  # the model without block 27, exactly
    sweep = prune.run(loaded, prune.PruneConfig(tasks=("arc_easy",)), "results/llama")  # resumable

Each command's runner is a module: ``prune``, ``shrink``, ``angular``, ``variance``,
``reproduce``, ``demo`` (a config object, then ``run``). Names are imported on first use, so
``import lnsdiag`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: public name -> module that defines it
_EXPORTS: dict[str, str] = {
    # loading
    "ALIASES": "models", "LoadedModel": "models", "ModelOptions": "models", "load_model": "models",
    "resolve_model": "models", "restore_norms": "models",
    # structure, surgery, the reference
    "LayerStack": "structure", "find_layers": "structure", "norm_placement": "structure",
    "parse_layer_spec": "structure", "removed_layers": "surgery", "resumed_at": "surgery",
    "build_without_layers": "rebuild", "save_without_layers": "rebuild", "model_card": "rebuild",
    # text and its token windows
    "TextSource": "text", "resolve_text": "text", "from_file": "text", "from_dataset": "text",
    "stdlib_corpus": "text", "TokenWindows": "windows", "token_windows": "windows", "batches": "windows",
    # measurements
    "stream_states": "stream", "AngularConfig": "angular", "AngularResult": "angular",
    "angular_distances": "angular", "angular_on_text": "angular", "VarianceConfig": "variance",
    "VarianceResult": "variance", "residual_variance": "variance", "variance_on_text": "variance",
    # scoring and sweeps
    "Scorer": "scoring", "Scores": "scoring", "MetricRow": "scoring", "TokenRequest": "scoring",
    "TaskSet": "lmeval", "load_tasks": "lmeval", "make_lm": "lmeval", "evaluate_tasks": "lmeval",
    "LmEvalScorer": "lmeval", "Perplexity": "perplexity", "perplexity": "perplexity",
    "PerplexityScorer": "perplexity", "SweepEngine": "engine", "run_naive": "sweep", "run_fast": "sweep",
    "perplexity_sweep": "sweep", "ResultStore": "store", "VariantResult": "store", "prune_frame": "verdict",
    "PruneConfig": "prune", "PruneRun": "prune", "ShrinkConfig": "shrink", "ShrinkRun": "shrink",
    "removal_set": "engine",
    # LayerNorm Scaling and the twins
    "apply_lns": "lns", "remove_lns": "lns", "restore_lns": "lns", "apply_post_ln": "postln",
    "DemoSpec": "demo_model", "ensure_demo_model": "demo_model", "DemoConfig": "demo",
    "compare_folders": "compare", "load_run": "compare",
    # progress and errors
    "Progress": "progress", "UserError": "errors",
}

__all__ = sorted([*_EXPORTS, "__version__"])


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lnsdiag' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
