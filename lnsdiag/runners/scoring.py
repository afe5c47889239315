"""What ``prune`` and ``shrink`` both score every variant with: the options, the inputs, the scorers.

:class:`ScoringConfig` holds the shared choices (tasks, perplexity text, margin, engine, ...) and is
checked when built; :func:`prepare_scoring` turns it into the registered scorers and the settings
fingerprint that makes two runs' numbers comparable (a result store refuses another fingerprint).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..data.text import TextSource, from_dataset, from_file
from ..data.windows import TokenWindows, check_batch_size, default_seq_len
from ..errors import OptionError
from ..model import quantize
from ..model.load import LoadedModel
from ..model.structure import LayerStack
from ..progress import SILENT, Progress
from ..results.margins import Margins, scored_metrics
from ..scoring.base import Scorer
from ..scoring.lmeval.tasks import DEFAULT_BOOTSTRAP, TaskSet, check_num_fewshot, load_tasks, parse_limit
from ..scoring.registry import ScoringSetup, build_scorers

ENGINES = ("fast", "naive")
#: Said when neither tasks nor a perplexity text are given (fields in braces, see :class:`OptionError`).
NOTHING_TO_SCORE = "nothing to score: give {tasks} and/or {ppl_text} / {ppl_dataset}"


@dataclass(frozen=True)
class ScoringConfig:
    """What every variant is scored on and how verdicts are reached, checked when built.

    ``tasks`` defaults to MMLU unless only a perplexity text is given; ``limit`` is a count of
    documents per task or a fraction (strings as typed on the command line are parsed).
    ``angular``: also measure angular distances (``prune``'s column, ``shrink``'s angular strategies).
    ``kl``: with a perplexity text, also compare every variant's next-token distributions with the
    full model's there (KL, top-1 agreement: :mod:`lnsdiag.scoring.fidelity`); ``fidelity_tasks``: also on
    every token of the lm-eval tasks' requests (:mod:`lnsdiag.scoring.lmeval.fidelity`); ``generate``: also
    along the full model's greedy continuations of that many tokens (:mod:`lnsdiag.scoring.generation`).
    """

    tasks: tuple[str, ...] | None = None
    include_path: str | None = None
    num_fewshot: int | None = None
    limit: int | float | str | None = None
    seed: int = 1234
    bootstrap_iters: int = DEFAULT_BOOTSTRAP
    ppl_text: str | None = None
    ppl_dataset: str | None = None
    ppl_dataset_config: str | None = None
    ppl_split: str | None = None
    ppl_field: str = "text"
    ppl_max_tokens: int = 65_536
    seq_len: int | None = None
    angular: bool = True
    kl: bool = True
    fidelity_tasks: bool = False
    generate: int = 0
    margin: str | None = None
    batch_size: int = 8
    engine: str = "fast"
    batch_tokens: int | None = None
    fresh: bool = False
    samples: bool = True

    def __post_init__(self) -> None:
        if self.ppl_text is not None and self.ppl_dataset is not None:
            raise OptionError("give {ppl_text} or {ppl_dataset}, not both")
        names = self.tasks if self.tasks is not None else (() if self.wants_ppl else ("mmlu",))
        if isinstance(names, str):
            names = tuple(names.split(","))
        object.__setattr__(self, "tasks", tuple(t.strip() for t in names if t.strip()))
        object.__setattr__(self, "limit", parse_limit(self.limit))
        check_num_fewshot(self.num_fewshot)
        check_batch_size(self.batch_size)
        if self.engine not in ENGINES:
            raise OptionError("{engine} must be fast or naive, not {value!r}", value=self.engine)
        if self.batch_tokens is not None and self.batch_tokens < 1:
            raise OptionError("{batch_tokens} must be positive, not {value}", value=self.batch_tokens)
        if self.ppl_max_tokens < 1:
            raise OptionError("{ppl_max_tokens} must be positive, not {value}", value=self.ppl_max_tokens)
        if not self.tasks and not self.wants_ppl:
            raise OptionError(NOTHING_TO_SCORE)
        if self.generate < 0:
            raise OptionError("{generate} must be a count of tokens (0: off), not {value}", value=self.generate)
        if self.fidelity_tasks and not self.tasks:
            raise OptionError("{fidelity_tasks} compares on the lm-eval tasks' tokens: give {tasks} too, or drop it")
        Margins.parse(self.margin)  # a malformed margin fails here, before any output

    @property
    def margins(self) -> Margins:
        return Margins.parse(self.margin)

    def scored(self, inputs: ScoringInputs) -> dict[str, list[str]] | None:
        """Each task the run reports and its metrics (:func:`~lnsdiag.results.margins.scored_metrics`),
        once the inputs are loaded; refuses ``fidelity_tasks`` on tasks that only generate."""
        if self.fidelity_tasks and inputs.tasks is not None and not inputs.tasks.split_by_output()[0]:
            raise OptionError("{fidelity_tasks} compares on log-likelihood tasks' requests; "
                              f"{', '.join(inputs.tasks.names)} only generate (use " + "{generate} N)")
        text = inputs.ppl_text is not None
        return scored_metrics(inputs.tasks, text, kl=text and self.kl, fidelity_tasks=self.fidelity_tasks,
                              generate=self.generate > 0)

    def check_loaded(self, loaded: LoadedModel) -> None:
        """What needs the model, before any output exists: room for ``generate`` tokens after a prompt in
        the text's windows (the scorer checks the tasks' context length too, when it is built)."""
        if self.generate and self.wants_ppl:
            longest = default_seq_len(loaded.model, self.seq_len)
            if self.generate >= longest:
                raise OptionError("{generate} " + f"{self.generate} leaves no room for a prompt in the text's "
                                  f"{longest}-token windows: ask fewer tokens or a longer " + "{seq_len}")

    def check_scored(self, scored: Mapping[str, Sequence[str]] | None) -> None:
        """The margins against the metrics the run scores (task -> metrics,
        :func:`~lnsdiag.results.margins.scored_metrics`), known once the tasks are loaded: before the
        model loads and before any output exists. None: not known, nothing checked."""
        if scored is not None:
            Margins.parse(self.margin, [m for metrics in scored.values() for m in metrics])

    @property
    def wants_ppl(self) -> bool:
        return self.ppl_text is not None or self.ppl_dataset is not None

    def load_tasks(self) -> TaskSet | None:
        """The lm-eval tasks, loaded and checked, their documents too (a command does it before
        loading the model, so a typo in a task name or a bad document fails in seconds)."""
        return load_tasks(list(self.tasks), self.include_path, self.num_fewshot, self.limit) if self.tasks else None

    def load_text(self) -> TextSource | None:
        """The perplexity text, if one is asked for."""
        if self.ppl_text is not None:
            return from_file(self.ppl_text, self.ppl_field)
        if self.ppl_dataset is not None:
            return from_dataset(self.ppl_dataset, self.ppl_dataset_config, self.ppl_split or "test", self.ppl_field)
        return None

    def load_inputs(self) -> ScoringInputs:
        """Tasks and perplexity text together (:meth:`load_tasks`, :meth:`load_text`)."""
        return ScoringInputs(self.load_tasks(), self.load_text())


@dataclass
class ScoringInputs:
    """What a run scores on: lm-eval tasks and/or a perplexity text."""

    tasks: TaskSet | None = None
    ppl_text: TextSource | None = None

    def __post_init__(self) -> None:
        if self.tasks is None and self.ppl_text is None:
            raise OptionError(NOTHING_TO_SCORE)

    def describe(self) -> dict[str, Any]:
        """The inputs as a run's record names them (``tasks``, ``ppl_text``)."""
        return {"tasks": self.tasks.describe() if self.tasks else None,
                "ppl_text": self.ppl_text.name if self.ppl_text else None}


@dataclass
class Scoring:
    """What every variant is scored with, and the settings that make two runs' numbers comparable."""

    scorers: list[Scorer]
    windows: TokenWindows | None
    settings: dict[str, Any]

    @property
    def tasks(self) -> list[str]:
        """The tasks a table shows, in the scorers' order."""
        return [t for scorer in self.scorers for t in scorer.tasks]


def prepare_scoring(loaded: LoadedModel, config: ScoringConfig, inputs: ScoringInputs, stack: LayerStack,
                    progress: Progress = SILENT, folder: Path | None = None) -> Scoring:
    """The registered scorers this run asks for, and its fingerprint: the run's own settings
    followed by each scorer's ``settings()``. ``folder``: the run's, where scorers keep what a resumed
    run reuses."""
    setup = ScoringSetup(loaded, inputs.tasks, inputs.ppl_text, limit=config.limit, seed=config.seed,
                         bootstrap_iters=config.bootstrap_iters, batch_size=config.batch_size, seq_len=config.seq_len,
                         max_tokens=config.ppl_max_tokens, kl=config.kl, fidelity_tasks=config.fidelity_tasks,
                         generate=config.generate, note=progress.note, folder=folder,
                         fresh=config.fresh)
    scorers = build_scorers(setup)
    settings: dict[str, Any] = {
        "model": loaded.source, "revision": loaded.revision, "weights": loaded.weights_identity(),
        "dtype": str(loaded.dtype).replace("torch.", ""), "limit": config.limit, "seed": config.seed,
        "bootstrap_iters": config.bootstrap_iters, "layers_path": stack.path, "softmax_dtype": "float32",
        **quantize.settings(loaded.quantize)}  # a quantized model's numbers are its own
    for scorer in scorers:
        settings.update(scorer.settings())
    windows = next((w for w in (s.token_windows() for s in scorers) if w is not None), None)
    return Scoring(scorers, windows, settings)
