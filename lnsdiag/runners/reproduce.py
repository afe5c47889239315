"""Train Pre-LN and LNS twins, then measure both the same way: the paper's experiment, small.

Twins share everything but the norm: the tokenizer (trained on the same text), the initial
weights (same seed; LNS adds no parameters and Post-LN only reorders a block), the batches
(same seed, same token stream) and the number of steps. Each is trained and cached by
:func:`lnsdiag.demo.model.ensure_demo_model`, loaded back through the same ``load_model`` a user's
checkpoint goes through (so an LNS checkpoint must come back as LNS), and measured on
held-out text: angular distance per layer, residual-stream variance, perplexity, and the
perplexity after removing each layer in turn.

A twin's folder (``TwinRun.path``) is a checkpoint any runtime loads. An LNS twin trained here is
trained with the scale hooks and written with the scales folded into its norm weights, so plain
transformers, vLLM and lm-eval compute it; the shipped demo LNS twin (copied into the cache as
shipped) predates folding, lnsdiag loads it with hooks, and ``lnsdiag export PATH DIR`` writes a
folded copy. ``TwinRun.lns_weights`` and ``meta.json`` say which.

Whatever comes out is reported as it is; nothing here is tuned to agree with the paper.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from ..data.text import TextSource, stdlib_corpus
from ..data.windows import TokenWindows
from ..demo.model import NORMS, DemoSpec, ensure_demo_model
from ..engine.sweep import perplexity_sweep
from ..errors import UserError
from ..interventions.lns import check_init, lns_config
from ..measure.angular import AngularConfig, AngularResult, angular_on_windows
from ..measure.variance import VarianceResult, variance_on_windows
from ..model.load import load_model
from ..model.placement import norm_placement
from ..model.structure import find_layers
from ..progress import SILENT, Labelled, Progress
from ..runs import Timer, run_record

#: Sizes: ``demo`` runs in minutes on a CPU; ``llama-130m`` is the paper's smallest model
#: (12 layers, hidden 768, 12 heads, MLP 2048, sequence 256), for a GPU.
PRESETS: dict[str, DemoSpec] = {
    "demo": DemoSpec(),
    "llama-130m": DemoSpec(layers=12, hidden=768, heads=12, intermediate=2048, vocab=32_000, seq_len=256,
                           batch_size=64, steps=2000, lr=1e-3),
}
#: What the paper's label for each norm is.
LABELS = {"pre-ln": "Pre-LN", "lns": "LNS", "post-ln": "Post-LN"}
#: What ``structure.norm_placement`` must report for each twin once loaded back.
EXPECTED_PLACEMENT = {"pre-ln": "pre-LN", "lns": "pre-LN+LNS", "post-ln": "post-LN"}
#: Layers in the deepest half are "deep" for the headline numbers.
DEEP_FROM = 0.5


def parse_norms(norms: str | Sequence[str]) -> list[str]:
    """``"pre-ln,lns"`` or a list: validated, deduplicated, in the order given."""
    items = [n.strip().lower() for n in (norms.split(",") if isinstance(norms, str) else norms) if n.strip()]
    aliases = {"preln": "pre-ln", "pre": "pre-ln", "postln": "post-ln", "post": "post-ln"}
    out: list[str] = []
    for item in items:
        item = aliases.get(item, item)
        if item not in NORMS:
            raise UserError(f"unknown norm {item!r} in --norms (use {', '.join(NORMS)})")
        if item not in out:
            out.append(item)
    if len(out) < 1:
        raise UserError("--norms selects no model: give e.g. pre-ln,lns")
    return out


def split_text(source: TextSource, held_out: float = 0.1) -> tuple[TextSource, TextSource]:
    """Train and held-out parts of a user's text: the last ``held_out`` of its documents when
    there are at least ten, else the last ``held_out`` of its characters (cut at a line end)."""
    if not 0 < held_out < 1:
        raise UserError(f"held-out fraction must be between 0 and 1, not {held_out}")
    docs = source.texts
    if len(docs) >= 10:
        cut = max(1, round(len(docs) * held_out))
        train, test = docs[:-cut], docs[-cut:]
    else:
        joined = "\n\n".join(docs)
        at = int(len(joined) * (1 - held_out))
        newline = joined.find("\n", at)
        at = newline + 1 if 0 <= newline < at + 2000 else at
        train, test = [joined[:at]], [joined[at:]]
    if not any(t.strip() for t in test) or not any(t.strip() for t in train):
        raise UserError(f"{source.name} is too short to split into training and held-out text")
    return (TextSource(f"{source.name}[train {1 - held_out:.0%}]", train),
            TextSource(f"{source.name}[held-out {held_out:.0%}]", test))


# --- the experiment -----------------------------------------------------------------------

@dataclass
class TwinRun:
    """One trained model of the comparison and what was measured on it."""

    norm: str
    name: str
    path: Path
    record: dict[str, Any]
    placement: str
    parameters: int
    perplexity: float
    angular: AngularResult
    variance: VarianceResult
    sweep: pd.DataFrame
    #: LNS twins: ``folded`` (scales in the norm weights: any runtime computes it) or ``hooks`` (an older
    #: checkpoint only lnsdiag computes; ``lnsdiag export`` folds it); None for the others.
    lns_weights: str | None = None

    @property
    def label(self) -> str:
        return LABELS.get(self.norm, self.norm)

    @property
    def num_layers(self) -> int:
        return self.angular.num_layers

    def deep(self, frame: pd.DataFrame, column: str, key: str = "layer") -> float:
        """Mean of ``column`` over the deepest half of the layers."""
        rows = frame[frame[key].notna()]
        return float(rows.loc[rows[key].astype(int) >= int(DEEP_FROM * self.num_layers), column].mean())


@dataclass
class ReproduceResult:
    """Twins trained identically but for the norm, measured on the same held-out tokens."""

    spec: DemoSpec
    train_text: str
    eval_text: str
    eval_tokens: int
    runs: list[TwinRun]
    same_tokenizer: bool = True
    notes: list[str] = field(default_factory=list)

    def summary(self) -> pd.DataFrame:
        """One row per model: held-out perplexity, deep-layer angular distance, variance growth."""
        rows = []
        for run in self.runs:
            train = run.record.get("train", {})
            sweep = run.sweep[run.sweep["removed_layer"].notna()]
            rows.append({
                "model": run.label, "norm": run.norm, "placement": run.placement, "parameters": run.parameters,
                "steps": train.get("steps"), "train_seconds": train.get("seconds"),
                "final_train_loss": train.get("final_train_loss"),
                "heldout_ppl": run.perplexity,
                "deep_angular": run.deep(run.angular.layers, "angular_distance"),
                "mean_angular": float(run.angular.layers["angular_distance"].mean()),
                "near_identity_layers": len(run.angular.near_identity()),
                "variance_growth": run.variance.growth,
                "deep_update_ratio": run.variance.mean_update_ratio(DEEP_FROM, 1.0),
                "deep_removal_ppl_increase_pct": run.deep(
                    sweep.assign(pct=100.0 * (sweep["value"] / sweep["baseline"] - 1.0)), "pct", "removed_layer"),
                "dead_layers": int(sweep["dead"].fillna(False).astype(bool).sum()),
            })
        return pd.DataFrame(rows)

    def layers(self) -> pd.DataFrame:
        """One row per layer, each model's numbers side by side."""
        L = self.runs[0].num_layers
        frame = pd.DataFrame({"layer": range(L), "rel_depth": [(i + 0.5) / L for i in range(L)]})
        for run in self.runs:
            tag = run.norm
            frame[f"angular_{tag}"] = run.angular.layers["angular_distance"].to_numpy()
            frame[f"variance_{tag}"] = run.variance.layers["variance"].iloc[:L].to_numpy()
            frame[f"update_ratio_{tag}"] = run.variance.layers["update_ratio"].iloc[:L].to_numpy()
            sweep = run.sweep[run.sweep["removed_layer"].notna()].set_index("removed_layer")
            frame[f"ppl_removed_{tag}"] = frame["layer"].map(sweep["value"])
            frame[f"ppl_increase_pct_{tag}"] = 100.0 * (frame[f"ppl_removed_{tag}"] / run.perplexity - 1.0)
        return frame

    def headline(self) -> list[str]:
        """What came out, in words, whichever way it went."""
        lines = []
        by = {run.norm: run for run in self.runs}
        for run in self.runs:
            lines.append(f"{run.label}: held-out perplexity {run.perplexity:.2f}; mean angular distance of the "
                         f"deepest half {run.deep(run.angular.layers, 'angular_distance'):.3f}; residual variance "
                         f"grows ×{run.variance.growth:.3g} from the embeddings to the last block.")
        if "pre-ln" in by and "lns" in by:
            pre, lns = by["pre-ln"], by["lns"]
            d_ppl = 100.0 * (lns.perplexity / pre.perplexity - 1.0)
            d_ang = lns.deep(lns.angular.layers, "angular_distance") - pre.deep(pre.angular.layers, "angular_distance")
            lines.append(
                f"LNS vs Pre-LN: perplexity {'lower' if d_ppl < 0 else 'higher'} by {abs(d_ppl):.1f}%, deep-layer "
                f"angular distance {'higher' if d_ang > 0 else 'lower'} by {abs(d_ang):.3f} "
                f"(the paper expects lower perplexity and larger deep-layer angular distance with LNS).")
        return lines + self.notes


def eval_text_for(text: TextSource | None, eval_text: TextSource | None,
                  held_out: float = 0.1) -> tuple[TextSource | None, TextSource]:
    """(training text or None for the stdlib default, held-out text)."""
    if text is None:
        return None, eval_text or stdlib_corpus("test")
    if eval_text is not None:
        return text, eval_text
    return split_text(text, held_out)


def check_spec(spec: DemoSpec) -> DemoSpec:
    """``spec`` if every size is usable and its ``init`` known (where ``--init`` is checked), else a UserError."""
    for name in ("layers", "hidden", "heads", "intermediate", "vocab", "seq_len", "batch_size", "steps"):
        if getattr(spec, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, not {getattr(spec, name)}")
    if spec.hidden % spec.heads:
        raise UserError(f"--hidden {spec.hidden} must be a multiple of --heads {spec.heads}")
    if spec.seq_len < 8:
        raise UserError(f"--seq-len must be at least 8, not {spec.seq_len}")
    if spec.vocab < 260:
        raise UserError(f"--vocab must be at least 260 (256 bytes + special tokens), not {spec.vocab}")
    if not spec.lr > 0:
        raise UserError(f"--lr must be positive, not {spec.lr}")
    check_init(spec.init)
    return spec


def spec_from(preset: str = "demo", **changes: Any) -> DemoSpec:
    """A preset's spec with the given fields changed (None leaves a field as it is), checked."""
    if preset not in PRESETS:
        raise UserError(f"unknown --preset {preset!r} (use {', '.join(PRESETS)})")
    return check_spec(PRESETS[preset].with_(**changes))


@dataclass(frozen=True)
class ReproduceConfig:
    """What ``lnsdiag reproduce`` trains and measures, checked when built.

    ``spec`` is the shared recipe (its ``norm`` is set per twin); ``norms`` the twins, as a
    list or ``"pre-ln,lns"``; ``eval_tokens`` the held-out tokens every twin is measured on;
    ``held_out`` the fraction of a user's training text kept back when no held-out text is given.
    """

    spec: DemoSpec = PRESETS["demo"]
    norms: Sequence[str] = ("pre-ln", "lns")  # a tuple once built
    eval_tokens: int = 16_384
    batch_size: int = 8
    threshold: float = 0.2
    held_out: float = 0.1

    def __post_init__(self) -> None:
        object.__setattr__(self, "norms", tuple(parse_norms(self.norms)))
        check_spec(self.spec)
        if self.eval_tokens < self.spec.seq_len:
            raise UserError(f"--eval-tokens {self.eval_tokens} is less than one sequence ({self.spec.seq_len} tokens)")
        if self.batch_size < 1:
            raise UserError(f"--batch-size must be at least 1, not {self.batch_size}")

    def measuring(self) -> AngularConfig:
        """How each twin's held-out windows are measured: every block size, every token."""
        return AngularConfig(seq_len=self.spec.seq_len, max_tokens=self.eval_tokens, batch_size=self.batch_size,
                             max_block=None, threshold=self.threshold)


@dataclass(frozen=True)
class Measured:
    """A twin's angular distances and removal sweep, already measured elsewhere on the same
    held-out windows with the twins' settings (the demo's angular and prune parts): reused, not
    measured again."""

    angular: AngularResult
    sweep: pd.DataFrame  # the ppl rows of verdict.prune_frame


def _measure_twins(config: ReproduceConfig, *, text: TextSource | None, eval_text: TextSource | None,
                   device: str | torch.device, fresh: bool | Collection[str], progress: Progress,
                   measured: Mapping[str, Measured] | None = None) -> ReproduceResult:
    spec, measuring = config.spec, config.measuring()
    train_text, held = eval_text_for(text, eval_text, config.held_out)
    runs: list[TwinRun] = []
    vocabularies: list[dict[str, int]] = []
    reference: TokenWindows | None = None
    notes: list[str] = []
    for norm in config.norms:
        twin = spec.with_(norm=norm)
        retrain = fresh is True or (not isinstance(fresh, bool) and norm in fresh)
        path, record = ensure_demo_model(twin, fresh=retrain, device=device, text=train_text, progress=progress)
        loaded = load_model(str(path), device=str(device), dtype="float32")
        loaded.name = twin.name
        vocabularies.append(loaded.tokenizer.get_vocab())
        windows = TokenWindows.of(loaded.tokenizer, held.texts, seq_len=spec.seq_len, max_tokens=config.eval_tokens,
                                  name=held.name)
        if reference is None:
            reference = windows
        elif windows.digest != reference.digest:
            notes.append(f"{LABELS[norm]} was evaluated on other tokens than {LABELS[config.norms[0]]} "
                         "(its tokenizer differs)")
        labelled = Labelled(LABELS[norm], progress)
        stack = find_layers(loaded.model)
        given = (measured or {}).get(norm)
        angular = given.angular if given else angular_on_windows(loaded.model, windows, measuring, stack=stack,
                                                                 progress=labelled)
        variance = variance_on_windows(loaded.model, windows, measuring, stack=stack, progress=labelled)
        if given:
            sweep = given.sweep.reset_index(drop=True).assign(tokens=sum(windows.scored_tokens))
        else:
            sweep = perplexity_sweep(loaded, windows, angular=angular.layers, progress=labelled)
        placement = norm_placement(loaded.model, stack)
        if placement != EXPECTED_PLACEMENT[norm]:
            notes.append(f"{LABELS[norm]} loaded as {placement}, not {EXPECTED_PLACEMENT[norm]}")
        recorded = lns_config(loaded.model)
        runs.append(TwinRun(
            norm=norm, name=twin.name, path=path, record=record, placement=placement,
            parameters=loaded.num_parameters, perplexity=float(sweep["value"].iloc[0]), angular=angular,
            variance=variance, sweep=sweep,
            lns_weights=None if recorded is None else "folded" if recorded.get("folded") else "hooks",
        ))
        del loaded
    same = all(v == vocabularies[0] for v in vocabularies)
    if not same:
        notes.append("the twins' tokenizers differ (tokenizer training was not deterministic)")
    tokens = int(runs[0].sweep["tokens"].iloc[0]) if runs else 0
    return ReproduceResult(spec=spec, train_text=train_text.name if train_text else "stdlib-docstrings[train]",
                           eval_text=held.name, eval_tokens=tokens, runs=runs, same_tokenizer=same, notes=notes)


def reproduce(
    spec: DemoSpec,
    norms: str | Sequence[str] = ("pre-ln", "lns"),
    *,
    text: TextSource | None = None,
    eval_text: TextSource | None = None,
    held_out: float = 0.1,
    eval_tokens: int = 16_384,
    batch_size: int = 8,
    threshold: float = 0.2,
    device: str | torch.device = "cpu",
    fresh: bool | Collection[str] = False,
    progress: Progress = SILENT,
) -> ReproduceResult:
    """Train (or reuse cached) twins that differ only in the norm, then measure each.

    ``text`` is the training text (default: the stdlib docstrings, evaluated on the held-out
    tenth of modules); a user's text is split into train and held-out parts unless
    ``eval_text`` is given. ``fresh`` retrains cached models: all (True) or the norms named.
    """
    config = ReproduceConfig(spec=spec, norms=norms, eval_tokens=eval_tokens,
                             batch_size=batch_size, threshold=threshold, held_out=held_out)
    return _measure_twins(config, text=text, eval_text=eval_text, device=device, fresh=fresh, progress=progress)


@dataclass(frozen=True)
class ReproduceRun:
    """A ``reproduce`` run: the result, and the JSON record of how it was made (``meta.json``)."""

    result: ReproduceResult
    meta: dict[str, Any]


def run(config: ReproduceConfig, *, text: TextSource | None = None, eval_text: TextSource | None = None,
        device: str | torch.device = "cpu", fresh: bool | Collection[str] = False,
        progress: Progress = SILENT, measured: Mapping[str, Measured] | None = None) -> ReproduceRun:
    """Train (or reuse) the twins, measure them and record how (``lnsdiag reproduce`` and the demo).

    ``measured`` gives twins (by norm) whose angular distances and sweep were already measured."""
    timer = Timer()
    with timer("train and measure"):
        result = _measure_twins(config, text=text, eval_text=eval_text, device=device, fresh=fresh,
                                progress=progress, measured=measured)
    reused = ({"reused": f"{', '.join(LABELS[n] for n in measured)}: angular distances and removal sweep "
                         "measured by the run's earlier parts (same model, tokens and settings)"} if measured else {})
    meta = run_record(
        "reproduce", model=None, spec=asdict(config.spec), norms=list(config.norms), train_text=result.train_text,
        eval_text=result.eval_text, eval_tokens=result.eval_tokens, same_tokenizer=result.same_tokenizer,
        settings={"batch_size": config.batch_size, "threshold": config.threshold, "device": str(device)},
        models=[{"norm": r.norm, "name": r.name, "path": str(r.path), "placement": r.placement,
                 "train": r.record.get("train"), "weights": r.record.get("weights"),
                 **({"lns_weights": r.lns_weights} if r.lns_weights else {})} for r in result.runs],
        summary=result.summary().to_dict(orient="records"), headline=result.headline(), **reused,
        timings={**timer.seconds, "total": timer.total()},
    )
    return ReproduceRun(result, meta)
