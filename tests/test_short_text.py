"""Verdicts on a short text: its windows are too few to be the units of a paired comparison,
so it is cut into blocks of consecutive tokens (batch means, :mod:`lnsdiag.stats.blocks`).

Proof by simulation (autocorrelated, skewed per-token losses with a known truth: the 90%
interval covers it ≥ 88% of the time on short and long texts), on the case a user met (×35 on
1,000 tokens: inconclusive on window units, ``hurts`` on blocks), and on a real trained model
(the shipped demo's first layer on 1,000 tokens: ``hurts``), both engines agreeing and the fast
one running each window once.
"""

from __future__ import annotations

import json
import math
from itertools import pairwise

import numpy as np
import pandas as pd
import pytest

from lnsdiag.data.text import stdlib_corpus
from lnsdiag.demo.model import SHIPPED
from lnsdiag.engine.plan import plan_rows
from lnsdiag.interventions.units import Removal
from lnsdiag.model.load import load_model
from lnsdiag.results.store import VariantResult
from lnsdiag.results.verdict import compare
from lnsdiag.runners import prune
from lnsdiag.scoring.base import Scores, TokenRequest
from lnsdiag.scoring.perplexity import Perplexity
from lnsdiag.stats import verdict
from lnsdiag.stats.blocks import BLOCK_TOKENS, MIN_WINDOWS, token_blocks

# --- simulation: coverage of the 90% interval -------------------------------------------------


def _autocorrelated(rng: np.random.Generator, reps: int, n: int, phi: float) -> np.ndarray:
    """``reps`` series of ``n`` skewed (centred exponential) AR(1) losses with unit variance."""
    shocks = rng.standard_exponential((reps, n)) - 1.0
    x = np.empty_like(shocks)
    x[:, 0] = shocks[:, 0] / math.sqrt(1 - phi * phi)
    for t in range(1, n):
        x[:, t] = phi * x[:, t - 1] + shocks[:, t]
    return x * math.sqrt(1 - phi * phi)


def _units(per_token: np.ndarray, scored: list[int], cuts: list[list[int]]) -> list[float]:
    out, offset = [], 0
    for length, cut in zip(scored, cuts, strict=True):
        out += [float(per_token[offset + a:offset + b].sum()) for a, b in pairwise(cut)]
        offset += length
    return out


def _coverage(windows: int, seq_len: int, phi: float, reps: int, seed: int) -> tuple[float, int]:
    """How often the 90% interval of Δppl (the verdict's own path) covers the truth.

    Per-token NLL: a position effect (early tokens of a window are harder), autocorrelated
    skewed noise; the removal adds a known shift that is larger early in a window. The truth
    is the shift of the expected ratio on these positions, read at the baseline's level.
    """
    rng = np.random.default_rng(seed)
    scored = [seq_len - 1] * windows
    cuts = token_blocks(scored)
    position = np.concatenate([np.arange(1, n + 1) for n in scored])
    shift = 0.05 * (1 + 2 * np.exp(-position / 50))
    base = 2.0 + 1.5 * np.exp(-position / 30) + 1.5 * _autocorrelated(rng, reps, len(position), phi)
    variant = base + shift + 0.5 * _autocorrelated(rng, reps, len(position), phi)
    tokens = [b - a for cut in cuts for a, b in pairwise(cut)]
    owner = None if len(tokens) == windows else [k for k, cut in enumerate(cuts) for _ in cut[1:]]
    hits = 0
    for r in range(reps):
        b = Perplexity(_units(base[r], scored, cuts), tokens, [4 * t for t in tokens], owner)
        v = Perplexity(_units(variant[r], scored, cuts), tokens, [4 * t for t in tokens], owner)
        ref, row = b.rows()[0], v.rows()[0]
        c = compare(VariantResult.of(Removal(), Scores([ref], {"ppl": b}), 0, "fast"),
                    VariantResult.of(Removal.of(1), Scores([row], {"ppl": v}), 0, "fast"), row, ref)
        hits += c.lo90 <= ref.value * math.expm1(shift.mean()) <= c.hi90
    return hits / reps, len(tokens)


@pytest.mark.parametrize(("windows", "seq_len", "units"), [(1, 300, 4), (2, 501, 14), (20, 512, 20)],
                         ids=["300-tokens", "1000-tokens", "20-windows"])
@pytest.mark.parametrize("phi", [0.0, 0.5], ids=["independent", "rho0.5"])
def test_the_90_percent_interval_covers_the_truth_on_short_and_long_texts(windows, seq_len, units, phi):
    """ρ₁ = 0.5 (τ = 3) is the upper end of what per-token differences show on a trained model
    (the demo: ρ₁ ≤ 0.17, τ ≤ 4.7 across removed layers); the t quantile on units − 1 df keeps
    4 units honest too."""
    covered, n_units = _coverage(windows, seq_len, phi, reps=500, seed=7)
    assert n_units == units
    assert covered >= 0.88, covered


def test_window_units_alone_are_no_longer_the_rule_on_short_texts():
    assert token_blocks([511, 489]) == [[0, 73, 146, 219, 292, 365, 438, 511],
                                        [0, 69, 139, 209, 279, 349, 419, 489]]
    assert token_blocks([63, 40]) == [[0, 63], [0, 40]]  # shorter than a block: the window
    assert token_blocks([511] * MIN_WINDOWS) == [[0, 511]] * MIN_WINDOWS
    for cut in token_blocks([1000, 130, 64, 127]):
        sizes = np.diff(cut)
        assert sizes.min() >= BLOCK_TOKENS and sizes.max() - sizes.min() <= 1


# --- the engine: a window's blocks cost one row ------------------------------------------------


def test_a_windows_blocks_are_answered_from_one_row():
    window = tuple(range(1, 201))
    cuts = [0, 66, 133, 199]
    requests = [TokenRequest(window[:1 + a], window[1 + a:1 + b]) for a, b in pairwise(cuts)]
    requests.append(TokenRequest((7, 7, 7), (8,)))  # an unrelated request keeps its own row
    for share in (False, True):
        rows = plan_rows(requests, 256, share=share)
        assert len(rows) == 2 and not any(r.shared for r in rows)
        whole = next(r for r in rows if len(r.members) == 3)
        assert whole.ids == window[:-1]
        assert [m[1][0] for m in sorted(whole.members)] == [0, 66, 133]  # each block at its own positions


# --- the user's case and a real model: a many-fold rise on 1,000 tokens is `hurts` -----------


@pytest.fixture(scope="module")
def demo_text(tmp_path_factory):
    path = tmp_path_factory.mktemp("short") / "short.txt"
    path.write_text("\n\n".join(stdlib_corpus("test").texts))
    return path


def _ppl_rows(folder, variant: str = "layer_000") -> pd.Series:
    frame = pd.read_csv(folder / "prune.csv")
    return frame[(frame.variant == variant) & (frame.task == "ppl") & (frame.metric == "ppl")].iloc[0]


def test_removing_the_first_layer_on_1000_tokens_is_hurts_with_both_engines(demo_text, tmp_path):
    folder = next(p for p in SHIPPED.iterdir() if p.is_dir() and "lns" not in p.name)
    loaded = load_model(str(folder))
    rows = {}
    for engine in ("fast", "naive"):
        config = prune.PruneConfig(ppl_text=str(demo_text), ppl_max_tokens=1000, seq_len=512, layers="0",
                                   angular=False, engine=engine)
        out = tmp_path / engine
        prune.run(loaded, config, out).write()
        rows[engine] = _ppl_rows(out)
        meta = json.loads((out / "meta.json").read_text())
        assert meta["settings"]["ppl_units"] == f"blocks of >= {BLOCK_TOKENS} tokens"
        samples = pd.read_csv(out / "samples" / "layer_000.csv.gz")
        blocks = samples[samples.metric == "block_nll"]
        assert len(blocks) == 14 and {json.loads(i)[2] for i in blocks["item"]} == {0, 1}
    fast, naive = rows["fast"], rows["naive"]
    assert fast["value"] / fast["baseline"] > 5  # a first layer matters on a trained model
    assert fast["verdict"] == naive["verdict"] == "hurts"
    assert fast["value"] == pytest.approx(naive["value"], rel=1e-5)
    assert fast["ci90_low"] == pytest.approx(naive["ci90_low"], rel=1e-4)
    work = json.loads((tmp_path / "fast" / "meta.json").read_text())["engine_stats"]
    # the perplexity's 14 block requests and the same 14 compared with the full model (KL): one row per window
    assert work["model_rows"] == 2 and work["requests"] == 2 * 14
    assert work["tokens"] == work["tokens_without_sharing"] == 1000 - 2  # the naive engine's windows


def test_a_35_fold_rise_on_1000_tokens_is_hurts_where_window_units_said_inconclusive():
    """The case a user met (stories260K, first layer removed: 4.23 → 147 on 1,000 tokens, two
    512-token windows whose rises differ): 2 window units give 1 df and an interval that reaches
    below no change; 14 blocks give ``hurts``."""
    rng = np.random.default_rng(3)
    scored = [500, 500]
    position = np.concatenate([np.arange(n) for n in scored])
    base = math.log(4.23) + 0.8 * np.exp(-position / 40) + 1.2 * _autocorrelated(rng, 1, 1000, 0.3)[0]
    rise = np.where(np.arange(1000) < 500, 4.6, 2.5) + 0.8 * _autocorrelated(rng, 1, 1000, 0.3)[0]

    def verdict_of(cuts):
        tokens = [b - a for cut in cuts for a, b in pairwise(cut)]
        owner = None if len(tokens) == 2 else [k for k, cut in enumerate(cuts) for _ in cut[1:]]
        b = Perplexity(_units(base, scored, cuts), tokens, [4 * t for t in tokens], owner)
        v = Perplexity(_units(base + rise, scored, cuts), tokens, [4 * t for t in tokens], owner)
        ref, row = b.rows()[0], v.rows()[0]
        c = compare(VariantResult.of(Removal(), Scores([ref], {"ppl": b}), 0, "fast"),
                    VariantResult.of(Removal.of(0), Scores([row], {"ppl": v}), 0, "fast"), row, ref)
        return row.value / ref.value, c.n, verdict(c.lo90, c.hi90, c.lo95, c.hi95, 0.05 * ref.value, False)

    ratio, units, said = verdict_of([[0, 500]] * 2)
    assert 25 < ratio < 50 and units == 2 and said == "inconclusive"
    assert verdict_of(token_blocks(scored))[1:] == (14, "hurts")
