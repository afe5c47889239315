"""lnsdiag: find the dead weight in large language models.

Everything the command line does is a function here, for notebooks::

    from lnsdiag import load_model, removed_layers, angular_on_text, stdlib_corpus

    loaded = load_model("meta-llama/Llama-2-7b-hf")
    result = angular_on_text(loaded, stdlib_corpus("test").texts, max_tokens=32_768)
    with removed_layers(loaded.model, [27]):
        ...  # the model without block 27, exactly

Names are imported on first use, so ``import lnsdiag`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: public name -> module that defines it
_EXPORTS: dict[str, str] = {
    # loading
    "ALIASES": "models", "LoadedModel": "models", "load_model": "models", "resolve_model": "models",
    # surgery
    "LayerStack": "surgery", "find_layers": "surgery", "removed_layers": "surgery", "resumed_at": "surgery",
    "build_without_layers": "surgery", "norm_placement": "surgery", "parse_layer_spec": "surgery",
    # text
    "TextSource": "text", "resolve_text": "text", "from_file": "text", "from_dataset": "text",
    "stdlib_corpus": "text", "token_windows": "text", "batches": "text",
    # measurements
    "AngularResult": "metrics", "angular_distances": "metrics", "angular_on_text": "metrics",
    "stream_states": "metrics", "VarianceResult": "variance", "residual_variance": "variance",
    "variance_on_text": "variance",
    # scoring and sweeps
    "TaskSet": "scoring", "load_tasks": "scoring", "make_lm": "scoring", "evaluate_tasks": "scoring",
    "Scorer": "scoring", "MetricRow": "scoring", "Perplexity": "scoring", "perplexity": "scoring",
    "SweepEngine": "engine", "TokenRequest": "engine",
    "ResultStore": "sweep", "VariantResult": "sweep", "run_naive": "sweep", "run_fast": "sweep",
    "prune_frame": "sweep", "perplexity_sweep": "sweep",
    # LayerNorm Scaling and the twins
    "apply_lns": "lns", "remove_lns": "lns", "restore_lns": "lns", "apply_post_ln": "postln",
    "DemoSpec": "demo", "ensure_demo_model": "demo", "reproduce": "reproduce",
    "compare_folders": "compare", "load_run": "compare",
    # errors
    "UserError": "errors",
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
