"""KL(p_full ‖ p_variant) and top-1 agreement: equal to a direct computation on models really built
without the layers, the same from both engines, exactly 0 / 1 for a block that is an identity, the
verdict rule (a minimum-effect test for "hurts"), and the memory the comparison holds."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from itertools import pairwise

import numpy as np
import pandas as pd
import pytest
import torch

from lnsdiag.checkpoint.reference import build_without_layers
from lnsdiag.data.windows import TokenWindows
from lnsdiag.engine.checkpoint import Checkpoint
from lnsdiag.engine.fast import PASS_PHASE
from lnsdiag.engine.naive import run_naive
from lnsdiag.engine.sweep import run_fast
from lnsdiag.errors import OptionError
from lnsdiag.interventions.removal import removals_suspended, removed_layers
from lnsdiag.interventions.units import Removal
from lnsdiag.model.structure import find_layers
from lnsdiag.results.margins import BUILTIN_FIDELITY_METRICS, BUILTIN_FIDELITY_TASK, Margins
from lnsdiag.results.store import VariantResult
from lnsdiag.results.verdict import prune_frame
from lnsdiag.scoring.base import MetricRow
from lnsdiag.scoring.fidelity import FIDELITY_METRICS, FIDELITY_TASK, Fidelity, FidelityScorer
from lnsdiag.scoring.perplexity import PerplexityScorer
from tests.conftest import SAMPLE_TEXT, ProgressLog
from tests.families import peaked_model

FULL = Removal()


def _peaked(family: str, tokenizer, scale: float = 12.0) -> torch.nn.Module:
    return peaked_model(family, len(tokenizer), scale)


def _direct(model: torch.nn.Module, blocks: list[int], windows: TokenWindows) -> tuple[list[float], list[int]]:
    """Per unit: Σ KL and Σ top-1 agreement, each window alone through the full model and through a
    model really built without ``blocks``, from both models' full float64 log-softmax."""
    other = build_without_layers(model, blocks) if blocks else model
    c = windows.context
    unit_kl, unit_agree = [], []
    for window, cut in zip(windows.windows, windows.cuts, strict=True):
        with torch.no_grad():
            full = model(input_ids=window[None]).logits[0, c - 1:-1].double().log_softmax(-1)
            variant = other(input_ids=window[None]).logits[0, c - 1:-1].double().log_softmax(-1)
        kl = (full.exp() * (full - variant)).sum(-1)
        agree = full.argmax(-1) == variant.argmax(-1)
        unit_kl += [float(kl[a:b].sum()) for a, b in pairwise(cut)]
        unit_agree += [int(agree[a:b].sum()) for a, b in pairwise(cut)]
    return unit_kl, unit_agree


def _variants(n: int) -> list[Removal]:
    return [FULL, *Removal.each(range(n)), Removal.of([1, 3])]


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2", "mixtral", "gpt2"])
def test_kl_and_top1_equal_a_direct_computation_on_models_built_without_the_layers(family, tokenizer):
    model = _peaked(family, tokenizer)
    stack = find_layers(model)
    windows = TokenWindows.of(tokenizer, [SAMPLE_TEXT * 3], seq_len=40, max_tokens=300)
    variants = _variants(len(stack))
    scorers = [PerplexityScorer(model, windows, batch_size=3), FidelityScorer(model, windows, batch_size=3)]
    fast = run_fast(model, scorers, variants, stack=stack, batch_tokens=128).results
    naive = run_naive(model, scorers, variants, stack=stack).results
    moved = []
    for variant in variants:
        unit_kl, unit_agree = _direct(model, list(variant.blocks), windows)
        want_kl = sum(unit_kl) / sum(windows.scored_tokens)
        for results in (fast, naive):
            units = results[variant].units[FIDELITY_TASK]
            rows = {r.metric: r.value for r in results[variant].rows if r.task == FIDELITY_TASK}
            assert units.unit_agree == unit_agree, variant  # top-1: exactly, unit by unit
            assert rows["top1"] == sum(unit_agree) / sum(windows.scored_tokens)
            assert rows["kl"] == pytest.approx(want_kl, rel=1e-5, abs=1e-12), variant
            assert np.allclose(units.unit_kl, unit_kl, rtol=1e-5, atol=1e-9), variant
        moved.append(rows["top1"] < 1)
        if variant:
            assert want_kl > 1e-5  # the test compares something that moved
        else:
            assert rows == {"kl": 0.0, "top1": 1.0, "kl_p90": 0.0, "kl_p99": 0.0}
        fast_p = {r.metric: r.value for r in fast[variant].rows if r.metric.startswith("kl_p")}
        naive_p = {r.metric: r.value for r in naive[variant].rows if r.metric.startswith("kl_p")}
        assert fast_p == pytest.approx(naive_p, rel=1e-5, abs=1e-12)
    assert any(moved)  # some removal changed a top token


def test_a_block_that_is_an_identity_moves_nothing_and_is_dead(tokenizer):
    """Block 2's output projections zeroed: it adds exactly nothing, so removing it gives KL exactly 0
    and top-1 exactly 1 from both engines, and on enough tokens the verdict is dead."""
    model = _peaked("llama", tokenizer)
    with torch.no_grad():
        model.model.layers[2].self_attn.o_proj.weight.zero_()
        model.model.layers[2].mlp.down_proj.weight.zero_()
    stack = find_layers(model)
    windows = TokenWindows.of(tokenizer, [SAMPLE_TEXT * 40], seq_len=128, max_tokens=4000)
    scorers = [PerplexityScorer(model, windows, batch_size=8), FidelityScorer(model, windows, batch_size=8)]
    variants = [FULL, Removal.of(1), Removal.of(2)]
    for results in (run_fast(model, scorers, variants, stack=stack).results,
                    run_naive(model, scorers, variants, stack=stack).results):
        rows = {r.metric: r.value for r in results[Removal.of(2)].rows if r.task == FIDELITY_TASK}
        assert rows == {"kl": 0.0, "top1": 1.0, "kl_p90": 0.0, "kl_p99": 0.0}
        frame = prune_frame(results).set_index(["removed_layer", "metric"])
        assert frame.loc[(2, "kl"), "verdict"] == "dead" and frame.loc[(2, "top1"), "verdict"] == "dead"
        assert frame.loc[(1, "kl"), "verdict"] == "hurts"  # a live block, for contrast
        assert pd.isna(frame.loc[(2, "kl_p90"), "verdict"])  # percentiles are descriptive


def test_removals_suspended_gives_the_full_model_and_removes_again(tokenizer):
    model = _peaked("llama", tokenizer)
    ids = torch.randint(3, len(tokenizer), (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(input_ids=ids).logits
        with removed_layers(model, [1, 2]):
            without = model(input_ids=ids).logits
            with removals_suspended(model):
                assert torch.equal(model(input_ids=ids).logits, full)
            assert torch.equal(model(input_ids=ids).logits, without)
            with pytest.raises(RuntimeError), removals_suspended(model):
                raise RuntimeError("restored on exceptions too")
            assert torch.equal(model(input_ids=ids).logits, without)
        assert torch.equal(model(input_ids=ids).logits, full)


def test_the_comparison_leaves_loglik_bitwise_and_an_interrupted_pass_resumes_it_bitwise(tokenizer, tmp_path):
    model = _peaked("qwen2", tokenizer)
    stack = find_layers(model)
    windows = TokenWindows.of(tokenizer, [SAMPLE_TEXT * 3], seq_len=40, max_tokens=300)
    scorer = FidelityScorer(model, windows)
    requests = scorer.requests()
    compared = [True] * len(requests)
    variants = _variants(len(stack))
    from lnsdiag.engine.fast import SweepEngine

    whole = SweepEngine(model, stack, variants, batch_tokens=64).run(requests, 64, compared=compared)
    plain = SweepEngine(model, stack, variants, batch_tokens=64).run(requests, 64)
    # comparing changes no log-likelihood: its log-sum-exp and argmax are torch's, bit for bit
    assert np.array_equal(whole.loglik, plain.loglik) and np.array_equal(whole.greedy, plain.greedy)
    checkpoint = Checkpoint(tmp_path / "partial.npz", "fp", every_seconds=0)
    with pytest.raises(KeyboardInterrupt):
        SweepEngine(model, stack, variants, batch_tokens=64).run(requests, 64, compared=compared,
                                                                 progress=ProgressLog(stop_at=3),
                                                                 checkpoint=checkpoint)
    seen = ProgressLog()
    resumed = SweepEngine(model, stack, variants, batch_tokens=64).run(requests, 64, compared=compared,
                                                                       progress=seen, checkpoint=checkpoint)
    assert seen.after(PASS_PHASE)[1][1] > 0  # started where it stopped
    for name in ("loglik", "kl", "agree", "token_kl", "token_agree"):
        assert np.array_equal(getattr(resumed, name), getattr(whole, name)), name


# --- statistics and verdicts ------------------------------------------------------------------

def _result(removal: Removal, unit_kl: list[float], unit_agree: list[int], tokens: list[int]) -> VariantResult:
    units = Fidelity(unit_kl, unit_agree, tokens, {"kl_p90": max(unit_kl), "kl_p99": max(unit_kl)})
    return VariantResult(removal, units.rows(), 1.0, units={FIDELITY_TASK: units})


def test_kl_hurts_only_when_shown_above_its_margin():
    """KL is 0 for the full model and above 0 for any change: 'hurts' needs KL shown above the margin
    (minimum-effect test), 'dead' the upper 90% bound under it, and in between the data cannot tell."""
    tokens = [100] * 40

    def around(mean: float, spread: float) -> list[float]:  # per unit of 100 tokens: mean ± spread, alternating
        return [100 * (mean + spread * (-1) ** i) for i in range(len(tokens))]

    results = {FULL: _result(FULL, [0.0] * 40, tokens, tokens),
               Removal.of(0): _result(Removal.of(0), around(0.002, 0.001), [100, 99] * 20, tokens),
               Removal.of(1): _result(Removal.of(1), around(0.0105, 0.004), [97] * 40, tokens),
               Removal.of(2): _result(Removal.of(2), around(0.05, 0.01), [80] * 40, tokens)}
    frame = prune_frame(results).set_index(["removed_layer", "metric"])
    assert frame.loc[(0, "kl"), "verdict"] == "dead"
    assert frame.loc[(1, "kl"), "verdict"] == "inconclusive"  # clearly > 0, not shown above 0.01
    assert frame.loc[(1, "kl"), "p_value"] > 0.05
    assert frame.loc[(2, "kl"), "verdict"] == "hurts"
    assert frame.loc[(0, "kl"), "ci90_low"] >= 0  # KL cannot be negative: its interval is cut at 0
    assert frame.loc[(2, "top1"), "verdict"] == "hurts" and frame.loc[(0, "top1"), "verdict"] == "dead"
    assert pd.isna(frame.loc[(2, "kl_p99"), "verdict"]) and math.isnan(frame.loc[(2, "kl_p99"), "margin"])
    stricter = prune_frame(results, margins=Margins.parse("kl=0.001")).set_index(["removed_layer", "metric"])
    assert stricter.loc[(0, "kl"), "verdict"] == "hurts"


def test_kl_margins_parse_and_refuse():
    margins = Margins.parse("kl=0.05", ["kl", "top1", "ppl"])
    assert margins.of("kl", 0.0) == 0.05 and margins.of("top1", 1.0) == 0.01
    assert Margins().of("kl", 0.0) == 0.01 and math.isnan(Margins().of("kl_p90", 0.0))
    assert "kl (KL from the full model) 0.01 nats" in Margins().describe()
    with pytest.raises(OptionError, match="in nats"):
        Margins.parse("kl=5%")
    with pytest.raises(OptionError, match="without a test"):
        Margins.parse("kl_p90=0.1")


def test_the_fidelity_scorer_reports_what_the_margins_module_says():
    assert (FIDELITY_TASK, FIDELITY_METRICS) == (BUILTIN_FIDELITY_TASK, BUILTIN_FIDELITY_METRICS)
    rows = Fidelity([1.0, 2.0], [9, 8], [10, 10], {"kl_p90": 0.3, "kl_p99": 0.4}).rows()
    assert tuple(r.metric for r in rows) == FIDELITY_METRICS
    assert all(isinstance(r, MetricRow) for r in rows)
    stored = Fidelity.from_json(json.loads(json.dumps(Fidelity([1.0], [9], [10], {"kl_p90": 0.1, "kl_p99": 0.2},
                                                               [0]).as_json())))
    assert stored.unit_window == [0] and stored.percentiles["kl_p99"] == 0.2


# --- memory -----------------------------------------------------------------------------------

MEMORY_PROBE = textwrap.dedent("""
    import resource, sys, torch
    from lnsdiag.engine.checkpoint import PassState
    from lnsdiag.engine.plan import Row
    from lnsdiag.engine.readout import ScoredIndex, read_out, reference_of
    torch.set_num_threads(2)
    vocab, rows, slots = 150_000, 2, 2048          # a batch of 4,096 scored tokens
    g = torch.Generator().manual_seed(0)
    full = torch.rand(rows, slots, vocab, generator=g)
    variant = full * 1.5
    row_list = [Row(tuple(range(slots + 1)), set(range(1, slots + 1)),
                    [(b, tuple(range(1, slots + 1)), tuple([5] * slots))]) for b in range(rows)]
    index = ScoredIndex.of(row_list, torch.device("cpu"), token_start=__import__("numpy").array([0, slots]))
    state = PassState.empty((2, rows), rows, 0, compared_tokens=rows * slots)
    def rss(): return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    before = rss()
    reference = reference_of(full)
    read_out(full, index, 0, state, reference, is_full=True)
    read_out(variant, index, 1, state, reference)
    print(rss() - before, full.numel() * 4, float(state.kl[1].sum()))
""")


def test_the_comparison_never_holds_more_than_one_batch_of_log_probabilities():
    """150k vocabulary, 4,096 scored tokens (2.5 GB of float32 log-probabilities): beyond the logits
    handed in, the peak memory of keeping the full model's distributions and comparing a variant with
    them stays within one batch of log-probabilities plus the chunk temporaries (3 × 128 MiB)."""
    out = subprocess.run([sys.executable, "-c", MEMORY_PROBE], capture_output=True, text=True, check=True,
                         timeout=600)
    grown, batch, kl = out.stdout.split()
    assert float(kl) > 0
    assert int(grown) <= int(batch) + 3 * (1 << 27) + (256 << 20), (int(grown) / 2 ** 30, int(batch) / 2 ** 30)
