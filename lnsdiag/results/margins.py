"""Margins of the dead-weight rule: which metrics a margin applies to and how it is read.

``0.02`` is absolute (bounded metrics, 0..1, or points on a 0-100 scale), ``2%`` relative
(perplexity-like metrics, judged on the ratio variant/baseline), ``acc=0.02,ppl=2%`` per metric.
Checked when parsed (a margin that would call every removal dead is refused) and against the
metrics a run scores (:func:`scored_metrics`), before any output exists.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from ..errors import OptionError

#: Metrics judged on the ratio variant/baseline (a relative margin), not on an absolute scale.
PERPLEXITY_LIKE = frozenset({"ppl", "perplexity", "word_perplexity", "byte_perplexity"})
#: Log-likelihood metrics: judged on their difference, with the margin the relative one gives the
#: perplexity they are the log of (nats per token: log(1 + r); bits per byte: log(1 + r) / ln 2).
LOG_LIKELIHOOD = {"nll": 1.0, "bits_per_byte": math.log(2)}
#: lm-eval metrics reported on a 0–100 scale (sacrebleu's BLEU, chrF, TER; TruthfulQA's BLEU/ROUGE
#: max and diff): the bounded margin applies in percentage points (0.01 → 1 point).
_PERCENT_SCALE = re.compile(r"^(bleu|chrf|chrfpp|ter|(bleu|rouge\w*)_(max|diff))$")
#: Significance level of the verdicts (TOST and the tests of hurts / helps).
ALPHA = 0.05


def base_metric(metric: str) -> str:
    """``acc`` for ``acc[strict-match]``: margins are given per metric, whatever the filter."""
    return metric.split("[", 1)[0]


#: The task and metrics of the built-in perplexity (``--ppl-text`` / ``--ppl-dataset``), as its scorer reports
#: them (:mod:`lnsdiag.scoring.perplexity`, not imported here: it loads torch; a test keeps the two equal).
BUILTIN_PPL_TASK, BUILTIN_PPL_METRICS = "ppl", ("ppl", "bits_per_byte", "nll")
#: The same for the comparison with the full model on that text (:mod:`lnsdiag.scoring.fidelity`).
BUILTIN_FIDELITY_TASK, BUILTIN_FIDELITY_METRICS = "fidelity", ("kl", "top1", "kl_p90", "kl_p99")
#: The same along the full model's own greedy continuations (:mod:`lnsdiag.scoring.generation`), and the
#: prefixes of the comparison tasks on lm-eval tasks' tokens and contexts (``fidelity:mmlu``, ``generation:mmlu``).
BUILTIN_GENERATION_TASK, GENERATION_METRICS = "generation", ("kl", "top1", "first_miss")
COMPARISON_TASKS = (BUILTIN_FIDELITY_TASK, BUILTIN_GENERATION_TASK)
#: Divergences from the full model (nats, 0 for the full model): an absolute margin, default
#: :data:`KL_MARGIN`; "hurts" needs the divergence shown *above* its margin (a minimum-effect test),
#: since every change, however small, moves it above 0.
DIVERGENCE = frozenset({"kl"})
#: About what 4-to-5-bit weight quantization costs a 7B model (llama.cpp's KL measurements).
KL_MARGIN = 0.01
#: Metrics reported without a test (percentiles of per-token KL, tokens reproduced before the first
#: disagreement): no interval of Δ, no verdict.
DESCRIPTIVE = frozenset({"kl_p90", "kl_p99", "first_miss"})
#: Metrics scored in [0, 1] (accuracies, exact match, f1, mcc): an absolute margin on them must be below 1.
_UNIT_SCALE = re.compile(r"^(acc\w*|\w+_acc|exact_match|em|f1|mcc)$")
_MARGIN_FORMS = "0.02, 2% or acc=0.02,ppl=2%"


def margin_kind(metric: str) -> str:
    """How a margin applies to ``metric``: ``relative`` (perplexity-like and their logs: a percentage of
    the baseline), ``percent`` (lm-eval's 0–100 metrics: bleu, chrf, ter, rouge), ``divergence`` (KL
    from the full model, nats), ``descriptive`` (no margin: reported without a test), else ``bounded``."""
    name = base_metric(metric)
    if name in PERPLEXITY_LIKE or name in LOG_LIKELIHOOD:
        return "relative"
    if name in DIVERGENCE:
        return "divergence"
    if name in DESCRIPTIVE:
        return "descriptive"
    return "percent" if _PERCENT_SCALE.match(name) else "bounded"


@dataclass(frozen=True)
class Margins:
    """How close to the baseline counts as no effect: ``bounded`` absolute (accuracy-like metrics
    in [0, 1]), ``relative`` on the ratio variant/baseline (perplexity-like), or per metric.

    ``given`` says which of ``bounded`` / ``relative`` the user set (for :meth:`check_metrics`)."""

    bounded: float = 0.01
    relative: float = 0.01
    per_metric: tuple[tuple[str, float, bool], ...] = ()  # (metric, margin, relative?)
    given: frozenset[str] = field(default=frozenset(), compare=False, repr=False)
    text: str | None = field(default=None, compare=False, repr=False)

    @classmethod
    def parse(cls, text: str | None, metrics: Collection[str] | None = None) -> Margins:
        """``0.02`` (bounded metrics), ``2%`` (perplexity-like), ``acc=0.02,ppl=2%`` (per metric).

        An absolute margin must be below 1 on a metric scored in [0, 1] (a margin of 2 would call
        every removal dead). With ``metrics`` (every metric the run scores), a named metric must be
        one of them and an unnamed margin must apply to at least one (:meth:`check_metrics`)."""
        margins = cls() if text is None or not text.strip() else cls._parse(text)
        if metrics is not None:
            margins.check_metrics(metrics)
        return margins

    @classmethod
    def _parse(cls, text: str) -> Margins:
        bounded, relative, named, given = cls.bounded, cls.relative, {}, set()
        for part in (p.strip() for p in text.split(",")):
            if not part:
                continue
            name, _, raw = part.rpartition("=")
            name = name.strip()
            value, is_relative = _margin_value(raw.strip(), text)
            key = name or ("relative" if is_relative else "bounded")
            if key in given or name in named:
                what = f"{name!r}" if name else ("a percentage (perplexity-like metrics)" if is_relative
                                                 else "an absolute margin (bounded metrics)")
                raise OptionError("{margin} {value!r} gives {what} twice: give it once", value=text, what=what)
            if name:
                _check_named(name, is_relative, text)
                if not is_relative:
                    _check_absolute(value, margin_kind(name), text, name)
                named[name] = (value, is_relative)
                given.add(name)
            elif is_relative:
                relative = value
                given.add(key)
            else:
                _check_absolute(value, "bounded", text, None)
                bounded = value
                given.add(key)
        per_metric = tuple((n, v, r) for n, (v, r) in named.items())
        return cls(bounded, relative, per_metric, frozenset(given), text)

    def check_metrics(self, metrics: Collection[str]) -> None:
        """Refuse a margin that names no metric of the run, or an unnamed one that applies to none of
        its metrics (a percentage on a run of accuracies only is silently unused otherwise)."""
        scored = list(dict.fromkeys(metrics))
        bases = {base_metric(m) for m in scored}
        listed = ", ".join(scored) or "none"
        for name, _, _ in self.per_metric:
            if name not in scored and base_metric(name) not in bases:
                raise OptionError("{margin} {value!r}: this run scores no metric {name!r} (its metrics: {listed})",
                                  value=self.text, name=name, listed=listed)
        unnamed = [m for m in scored if not self._named(m)]
        kinds = {margin_kind(m) for m in unnamed}
        if "relative" in self.given and "relative" not in kinds:
            raise OptionError(
                "{margin} {value!r}: a bare percentage applies to perplexity-like metrics (ppl, nll, bits_per_byte, "
                "word_perplexity, byte_perplexity) and none of this run's metrics is one (its metrics: {listed}); for "
                "them give an absolute margin (0.02 = 2 points) or name the metric (acc=2%: 2% of the baseline)",
                value=self.text, listed=listed)
        if "bounded" in self.given and not kinds & {"bounded", "percent"}:
            raise OptionError(
                "{margin} {value!r}: an absolute margin applies to bounded metrics (accuracy-like, 0..1) and none "
                "of this run's metrics is one (its metrics: {listed}); for perplexity-like metrics give a percentage "
                "(2%)",
                value=self.text, listed=listed)

    def of(self, metric: str, baseline: float) -> float:
        """The absolute margin for ``metric`` around ``baseline`` (NaN for a descriptive metric)."""
        name = base_metric(metric)
        kind = margin_kind(metric)
        if kind == "descriptive":
            return math.nan
        default = {"relative": (self.relative, True), "divergence": (KL_MARGIN, False)}.get(kind, (self.bounded, False))
        value, relative = next(((v, r) for n, v, r in self.per_metric if n in (metric, name)), default)
        if not relative:
            return value * 100 if _PERCENT_SCALE.match(name) and not self._named(metric) else value
        if name in LOG_LIKELIHOOD:
            return math.log1p(value) / LOG_LIKELIHOOD[name]
        return value * abs(baseline)

    def _named(self, metric: str) -> bool:
        return any(n in (metric, base_metric(metric)) for n, _, _ in self.per_metric)

    def describe(self) -> str:
        text = (f"±{self.bounded:g} for bounded metrics (±{100 * self.bounded:g} points for 0–100 ones: bleu, chrf, "
                f"ter, rouge), ±{100 * self.relative:g}% for perplexity-like ones (nll and bits per byte: the same "
                "ratio of the perplexity they are the log of)")
        if not any(n in DIVERGENCE for n, _, _ in self.per_metric):
            text += f", kl (KL from the full model) {KL_MARGIN:g} nats"
        named = ", ".join(f"{n} ±{100 * v:g}%" if r else f"{n} ±{v:g}" for n, v, r in self.per_metric)
        return text + (f"; {named}" if named else "")

    def as_json(self) -> dict[str, Any]:
        return {"bounded": self.bounded, "relative": self.relative,
                "per_metric": [{"metric": n, "margin": v, "relative": r} for n, v, r in self.per_metric]}


def _margin_value(raw: str, text: str) -> tuple[float, bool]:
    relative = raw.endswith("%")
    try:
        value = float(raw[:-1] if relative else raw)
    except ValueError as exc:
        raise OptionError("{margin} {value!r}: {raw!r} is not a number (use {forms})", value=text, raw=raw,
                          forms=_MARGIN_FORMS) from exc
    if not math.isfinite(value) or value <= 0 or (relative and value >= 100):
        raise OptionError("{margin} {value!r}: {raw!r} must be positive (and a percentage below 100%)", value=text,
                          raw=raw)
    return (value / 100 if relative else value), relative


def _check_named(name: str, is_relative: bool, text: str) -> None:
    """A named margin that can apply: none on a descriptive metric, none relative on a divergence
    (the full model's KL is 0: a percentage of it is 0)."""
    kind = margin_kind(name)
    if kind == "descriptive":
        raise OptionError("{margin} {value!r}: {name} is reported without a test (a percentile of per-token KL): "
                          "it takes no margin; set one on kl", value=text, name=name)
    if kind == "divergence" and is_relative:
        raise OptionError("{margin} {value!r}: {name} is a divergence from the full model, which scores 0: give its "
                          "margin in nats ({name}=0.05), not a percentage", value=text, name=name)


def _check_absolute(value: float, kind: str, text: str, name: str | None) -> None:
    """An absolute margin within its metric's range: below 1 on [0, 1] metrics, below 100 on 0–100 ones."""
    if name is None and value >= 1:
        raise OptionError(
            "{margin} {value!r}: an absolute margin applies to bounded metrics (accuracy-like, scored 0..1) and must "
            "be below 1 (0.02 = 2 points; a margin of {raw:g} would call every removal dead); for perplexity-like "
            "metrics give a percentage ({raw:g}%)", value=text, raw=value)
    if name is not None and kind == "percent" and value >= 100:
        raise OptionError("{margin} {value!r}: {name} is scored 0..100: an absolute margin on it must be below 100",
                          value=text, name=name)
    if name is not None and _UNIT_SCALE.match(base_metric(name)) and value >= 1:
        raise OptionError("{margin} {value!r}: {name} is scored 0..1: an absolute margin on it must be below 1 "
                          "(0.02 = 2 points), or give a percentage of the baseline ({name}=2%)", value=text, name=name)


def scored_metrics(tasks: Any | None, ppl: bool, kl: bool = False, fidelity_tasks: bool = False,
                   generate: bool = False) -> dict[str, list[str]] | None:
    """Each task of a run and the metrics it will report, known once its lm-eval tasks are loaded
    (before any model): lm-eval's ``metric[filter]`` names, the built-in perplexity's, and those of the
    comparisons with the full model (``kl``: on the text; ``fidelity_tasks``: on the log-likelihood
    tasks' tokens; ``generate``: along continuations of the text and of those tasks' contexts). None
    when a task does not say (an unusual task class): then nothing is checked against them."""
    out: dict[str, list[str]] = {}
    if tasks is not None:
        try:
            for name in tasks.names:
                leaves = tasks.leaves_of(name) or list(tasks.leaf_tasks)
                metrics: list[str] = []
                for leaf in leaves:
                    task = tasks.leaf_tasks[leaf]
                    filters = [getattr(f, "name", "none") for f in getattr(task, "_filters", None) or []] or ["none"]
                    metrics += [m if f in ("none", "") else f"{m}[{f}]" for f in filters for m in task.aggregation()]
                out[name] = list(dict.fromkeys(metrics))
        except Exception:  # a task class that does not say which metrics it reports
            return None
    if ppl:
        out[BUILTIN_PPL_TASK] = list(BUILTIN_PPL_METRICS)
    if ppl and kl:
        out[BUILTIN_FIDELITY_TASK] = list(BUILTIN_FIDELITY_METRICS)
    if ppl and generate:
        out[BUILTIN_GENERATION_TASK] = list(GENERATION_METRICS)
    loglik = tasks.split_by_output()[0] if tasks is not None and (fidelity_tasks or generate) else []
    for name in loglik:
        if fidelity_tasks:
            out[f"{BUILTIN_FIDELITY_TASK}:{name}"] = list(BUILTIN_FIDELITY_METRICS)
        if generate:
            out[f"{BUILTIN_GENERATION_TASK}:{name}"] = list(GENERATION_METRICS)
    return out


def comparison_of(task: str) -> tuple[str, str] | None:
    """``(kind, scored task)`` of a comparison with the full model: ``("fidelity", "ppl")`` for the text's
    KL, ``("generation", "mmlu")`` for continuations of MMLU's contexts; None for any other task."""
    kind, _, on = task.partition(":")
    if kind not in COMPARISON_TASKS:
        return None
    return kind, on or BUILTIN_PPL_TASK


def rule_text(margins: Margins, unit: str = "layer", family: str = "removed layers") -> str:
    """What was tested, in words: printed under the table and kept in meta.json. ``unit`` is what
    one comparison removes and ``family`` what Holm adjusts over (layers for ``prune``, the
    distinct removal sets for ``shrink``)."""
    return (f"dead: the 90% interval of Δ (paired, same documents) lies within the margin ({margins.describe()}): "
            f"two one-sided tests at α = {ALPHA:g} per {unit}. hurts / helps: Δ ≠ 0 at α = {ALPHA:g}, Holm-adjusted "
            f"over the {family} of each metric (the 95% interval columns are not adjusted); kl (≥ 0, moved by any "
            "change): hurts only when shown above its margin (one-sided t, Holm); kl_p90 / kl_p99 / first_miss: "
            "descriptive, no verdict. inconclusive: "
            "neither — the data cannot tell, which is not 'no effect'. Intervals: Tango's score interval for 0/1 "
            "scores (exact McNemar test when fewer than 25 answers changed), paired t for other means, lm-eval groups "
            "on their leaves' documents as lm-eval aggregates them, a paired bootstrap stderr (lm-eval's "
            "aggregation, t on n − 1 df) for other metrics, the delta method for the built-in perplexity; "
            "perplexity-like metrics on the ratio variant/baseline; no spread at all: the interval of 'nothing "
            "changed' (±z²/(n+z²)). Rows with paired = false had no per-document scores (two stderrs instead).")
