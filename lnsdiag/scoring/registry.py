"""Which scorers a run builds: a lazy registry of ``"module:function"`` builders.

Adding a scorer is one module and one line here. The module defines a :class:`~.base.Scorer`
(its ``settings()`` join the result store's fingerprint by themselves) and a builder
``build(setup: ScoringSetup) -> Scorer | None`` that returns ``None`` when the run does not ask
for it; the line below names the builder. Builders are imported only when a run builds its
scorers, so a scorer's heavy dependencies (lm-eval) stay out of ``import lnsdiag``. A scorer
whose metrics are ratios over units rather than per-document means registers its
:class:`~.base.PairedUnits` kind with :func:`~.base.paired_units`, in the same module.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..model.load import LoadedModel
from .base import Scorer

#: name -> ``"module:function"`` (relative to ``lnsdiag.scoring``), in the order tables show them.
SCORERS: dict[str, str] = {
    "lm-eval": ".lmeval.scorer:build",
    "perplexity": ".perplexity:build",
    "fidelity": ".fidelity:build",
    "task-fidelity": ".lmeval.fidelity:build",
    "generation": ".generation:build",
}


@dataclass
class ScoringSetup:
    """What a run hands every scorer builder: the model, what to score it on, and the options."""

    loaded: LoadedModel
    tasks: Any = None  #: an lm-eval ``TaskSet``, or None
    text: Any = None  #: a ``TextSource`` for the built-in perplexity, or None
    limit: int | float | None = None
    seed: int = 1234
    bootstrap_iters: int = 100_000
    batch_size: int = 8
    seq_len: int | None = None
    max_tokens: int = 65_536
    kl: bool = True  #: compare every variant's distributions with the full model's on the text
    fidelity_tasks: bool = False  #: ... and on the lm-eval tasks' tokens
    generate: int = 0  #: tokens of the full model's greedy continuations to score every variant along (0: none)
    note: Callable[[str], None] = field(default=lambda _message: None)
    #: the run's folder, where a builder keeps what a resumed run reuses (the full model's continuations)
    folder: Path | None = None
    fresh: bool = False  #: ``--fresh``: nothing kept in ``folder`` is reused
    #: what builders share (the perplexity text's token windows, the lm-eval scorer: built once)
    cache: dict[str, Any] = field(default_factory=dict)


def builder(name: str) -> Callable[[ScoringSetup], Scorer | None]:
    """The registered builder ``name`` (imported on first use)."""
    module, _, function = SCORERS[name].partition(":")
    return getattr(importlib.import_module(module, __package__), function)


def build_scorers(setup: ScoringSetup) -> list[Scorer]:
    """Every registered scorer the setup asks for, in registry order."""
    built = (builder(name)(setup) for name in SCORERS)
    return [scorer for scorer in built if scorer is not None]
