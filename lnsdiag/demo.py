"""`lnsdiag demo` as a library call: the embedded default, composed of the commands' own runners.

The demo model (:mod:`lnsdiag.demo_model`) is trained or taken from the cache, then measured
exactly as a user's checkpoint would be: ``angular.run``, ``prune.run``, ``reproduce.run``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import angular, prune, reproduce
from .demo_model import DemoSpec, ensure_demo_model
from .errors import UserError
from .models import load_model, pick_device
from .progress import SILENT, Progress
from .runs import Timer
from .text import stdlib_corpus


@dataclass(frozen=True)
class DemoConfig:
    """What ``lnsdiag demo`` can be told."""

    steps: int | None = None
    layers: int | None = None
    fresh: bool = False
    twin: bool = True
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.steps is not None and self.steps < 1:
            raise UserError(f"--steps must be at least 1, not {self.steps}")
        if self.layers is not None and self.layers < 2:
            raise UserError(f"--layers must be at least 2, not {self.layers}")
        pick_device(self.device)

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
    twins: reproduce.ReproduceRun | None = None


#: Held-out tokens every demo measurement uses.
DEMO_TOKENS = 32_768


def run(config: DemoConfig, out: str | Path, *, progress: Progress = SILENT,
        on_part: Callable[[str, DemoRun], None] | None = None) -> DemoRun:
    """Train (or reuse) the demo model, then angular distances, the removal sweep and the twins.

    Each part is the library call its command makes; the sweep's resumable store goes to
    ``out/prune``. ``on_part(name, run)`` sees the run after each part (``model``, ``angular``,
    ``prune``, ``twins``): the command line shows and writes each part there.
    """
    spec = config.spec
    folder = Path(out)
    device = pick_device(config.device)
    show = on_part or (lambda _name, _run: None)
    timer = Timer()
    with timer("train"):
        path, record = ensure_demo_model(spec, fresh=config.fresh, device=device, progress=progress)
    result = DemoRun(spec, path, record)
    show("model", result)
    loaded = load_model(str(path), device=str(device))
    loaded.name = spec.name
    heldout = stdlib_corpus("test")
    result.angular = angular.run(loaded, heldout, angular.AngularConfig(
        max_tokens=DEMO_TOKENS, seq_len=spec.seq_len, batch_size=16, tokens="all", max_block=None, threshold=0.2),
        progress=progress, timer=timer)
    show("angular", result)
    sweep = prune.PruneConfig(ppl_dataset="stdlib", ppl_split="test", ppl_max_tokens=DEMO_TOKENS,
                              seq_len=spec.seq_len, batch_size=16, fresh=True)  # the held-out docstrings
    result.prune = prune.run(loaded, sweep, folder / "prune", angular_frame=result.angular.result.layers,
                             progress=progress, timer=timer)
    show("prune", result)
    if config.twin:
        twins = reproduce.ReproduceConfig(spec=spec, norms=("pre-ln", "lns"), eval_tokens=DEMO_TOKENS, batch_size=16)
        result.twins = reproduce.run(twins, device=device, fresh=["lns"] if config.fresh else False,
                                     progress=progress)
        show("twins", result)
    return result
