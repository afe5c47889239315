"""KL and top-1 against the full model beyond the perplexity text: on every token of lm-eval tasks'
requests (``--fidelity-tasks``) and along the full model's own greedy continuations (``--generate``),
equal to direct computations on models really built without the layers, from both engines."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from lnsdiag.checkpoint.reference import build_without_layers
from lnsdiag.cli import app
from lnsdiag.engine.naive import run_naive
from lnsdiag.engine.sweep import run_fast
from lnsdiag.interventions.units import Removal
from lnsdiag.model.load import LoadedModel
from lnsdiag.model.structure import find_layers
from lnsdiag.results.margins import GENERATION_METRICS, comparison_of, scored_metrics
from lnsdiag.results.verdict import prune_frame
from lnsdiag.scoring import generation
from lnsdiag.scoring.generation import GENERATION_TASK, Generation, first_miss, greedy_continuations
from lnsdiag.scoring.lmeval.fidelity import new_positions
from lnsdiag.scoring.lmeval.tasks import load_tasks
from lnsdiag.scoring.registry import ScoringSetup, build_scorers
from tests.conftest import SAMPLE_TEXT
from tests.families import CAUSAL, peaked_model
from tests.lmeval_tasks import write_tasks

FULL = Removal()


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    return write_tasks(tmp_path_factory.mktemp("comparison-tasks"), docs=5)


def _logprobs(model: torch.nn.Module, ids: tuple[int, ...], memo: dict | None = None) -> torch.Tensor:
    """float64 log-probabilities of each position of ``ids`` (``memo``: the full model's, kept across variants)."""
    if memo is not None and ids in memo:
        return memo[ids]
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids])).logits[0].double().log_softmax(-1)
    if memo is not None:
        memo[ids] = out
    return out


def _compare(full: torch.Tensor, variant: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position KL(full ‖ variant) and top-1 agreement from float64 log-probabilities."""
    return (full.exp() * (full - variant)).sum(-1), full.argmax(-1) == variant.argmax(-1)


def _direct_task_units(model, other, log, max_length: int, memo: dict) -> dict[str, list[tuple[float, int, int]]]:
    """Per leaf task, per document (in the order the log first names it): Σ KL, agreeing tokens and
    tokens over every distinct prediction its requests make, computed position by position. A
    prediction is keyed by the tokens before it: a question's context counts once, not once per choice."""
    docs: dict[tuple, dict[tuple, tuple[float, bool]]] = {}
    entries = [(key, [request], False) for key, request in log.single]
    entries += [(key, windows, True) for key, windows in log.rolling]
    for key, requests, rolling in entries:
        seen = docs.setdefault((key[1], key[2]), {})
        for request in requests:
            seq = (request.context + request.continuation)[-(max_length + 1):]
            kl, agree = _compare(_logprobs(model, seq[:-1], memo), _logprobs(other, seq[:-1]))
            first = len(seq) - 1 - len(request.continuation) if rolling else 0
            for p in range(first, len(seq) - 1):
                seen.setdefault(seq[:p + 1], (float(kl[p]), bool(agree[p])))
    out: dict[str, list[tuple[float, int, int]]] = {}
    for (leaf, _), predictions in docs.items():
        values = list(predictions.values())
        out.setdefault(leaf, []).append((sum(k for k, _ in values), sum(a for _, a in values), len(values)))
    return out


def test_new_positions_cover_each_prediction_once():
    """A prediction is the distribution after a prefix, whatever token follows: (1, 5, 6, 9) adds none
    (its predictions after (1,), (1, 5), (1, 5, 6) were made), (1, 5, 6, 9, 4) one: after (1, 5, 6, 9)."""
    sequences = [(1, 5, 6, 7, 8), (1, 5, 6, 9), (1, 5, 6, 9, 4), (1, 5, 6, 7, 8), (1, 5), (2, 3)]
    requests = new_positions(sequences)
    assert [(r.context, r.continuation) for r in requests] == [((1,), (5, 6, 7, 8)), ((1, 5, 6, 9), (4,)),
                                                               ((2,), (3,))]


@pytest.mark.parametrize("family", ["llama"])
def test_task_kl_and_top1_equal_a_direct_computation_on_models_built_without_the_layers(family, tokenizer,
                                                                                         task_dir):
    model = peaked_model(family, len(tokenizer))
    loaded = LoadedModel.wrap(model, tokenizer, name=family)
    stack = find_layers(model)
    taskset = load_tasks(["tiny_mc", "tiny_ppl"], task_dir, num_fewshot=1)
    scorers = build_scorers(ScoringSetup(loaded, taskset, batch_size=4, bootstrap_iters=0, fidelity_tasks=True))
    lm_eval, compared = scorers
    assert compared.tasks == ["fidelity:tiny_mc", "fidelity:tiny_ppl"]
    log, max_length = lm_eval.request_log(), lm_eval.context_limit()
    variants = [FULL, Removal.of(3), Removal.of([1, 2])]
    fast = run_fast(model, scorers, variants, stack=stack, batch_tokens=96).results
    naive = run_naive(model, scorers, variants, stack=stack).results
    memo: dict = {}
    for variant in variants:
        other = build_without_layers(model, list(variant.blocks)) if variant else model
        direct = _direct_task_units(model, other, log, max_length, memo)
        for leaf in ("tiny_mc", "tiny_ppl"):
            want = direct[leaf]
            for results in (fast, naive):
                units = results[variant].units[f"fidelity:{leaf}"]
                assert units.unit_tokens == [t for _, _, t in want]  # each prediction once, per document
                assert units.unit_agree == [a for _, a, _ in want], (variant, leaf)  # top-1: exactly
                assert np.allclose(units.unit_kl, [k for k, _, _ in want], rtol=1e-5, atol=1e-9), (variant, leaf)
                rows = {r.metric: r.value for r in results[variant].rows if r.task == f"fidelity:{leaf}"}
                assert rows["kl"] == pytest.approx(sum(k for k, _, _ in want) / sum(t for _, _, t in want),
                                                   rel=1e-5, abs=1e-12)
            if variant:
                assert sum(k for k, _, _ in want) > 1e-4  # something moved
    # the documents are the units of the paired comparison; the full model's KL is 0 on each
    frame = prune_frame(fast)
    assert set(frame.loc[frame["task"] == "fidelity:tiny_mc", "samples"]) == {5}
    assert (frame.loc[(frame["task"] == "fidelity:tiny_mc") & (frame["variant"] == "baseline"), "value"]
            .tolist() == [0.0, 1.0, 0.0, 0.0])


def _direct_generation(model, other, prompt: tuple[int, ...], continuation: tuple[int, ...]) -> tuple[float, int, int]:
    seq = prompt + continuation
    kl, agree = _compare(_logprobs(model, seq[:-1]), _logprobs(other, seq[:-1]))
    at = slice(len(prompt) - 1, len(seq) - 1)
    return float(kl[at].sum()), int(agree[at].sum()), first_miss(agree[at].numpy())


def test_generation_scores_every_variant_along_the_full_models_greedy_continuations(tokenizer, task_dir):
    model = peaked_model("qwen2", len(tokenizer))
    loaded = LoadedModel.wrap(model, tokenizer, name="qwen2")
    stack = find_layers(model)
    taskset = load_tasks(["tiny_mc"], task_dir, num_fewshot=0)

    class Text:
        name, texts = "sample", [SAMPLE_TEXT * 2]

    notes: list[str] = []
    setup = ScoringSetup(loaded, taskset, Text(), batch_size=4, bootstrap_iters=0, seq_len=48, kl=False, generate=6,
                         note=notes.append)
    scorers = build_scorers(setup)
    generation = scorers[-1]
    assert generation.tasks == [GENERATION_TASK, "generation:tiny_mc"]
    assert any("generating 6 tokens" in n for n in notes)
    prompts = [r.context for r in generation.requests()]
    continuations = [r.continuation for r in generation.requests()]
    windows = setup.cache["windows"]
    assert prompts[:len(windows)] == [tuple(w[:min(48 - 6, len(w))].tolist()) for w in windows.windows]
    assert len(prompts) == len(windows) + 5  # every window's opening, every task document's context
    for prompt, continuation in zip(prompts, continuations, strict=True):  # the full model's greedy choice
        assert len(continuation) == 6
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + continuation])).logits[0]
        assert logits[len(prompt) - 1:-1].argmax(-1).tolist() == list(continuation)
    variants = [FULL, Removal.of(0), Removal.of(2), Removal.of([1, 3])]
    fast = run_fast(model, scorers, variants, stack=stack, batch_tokens=128).results
    naive = run_naive(model, scorers, variants, stack=stack).results
    moved = False
    for variant in variants:
        other = build_without_layers(model, list(variant.blocks)) if variant else model
        want = [_direct_generation(model, other, p, c) for p, c in zip(prompts, continuations, strict=True)]
        got_fast = fast[variant].units[GENERATION_TASK].unit_run + fast[variant].units["generation:tiny_mc"].unit_run
        for results in (fast, naive):
            units = [results[variant].units[t] for t in generation.tasks]
            assert all(isinstance(u, Generation) for u in units)
            assert [x for u in units for x in u.unit_agree] == [a for _, a, _ in want], variant
            assert [x for u in units for x in u.unit_run] == [f for _, _, f in want], variant
            assert np.allclose([x for u in units for x in u.unit_kl], [k for k, _, _ in want], rtol=1e-5, atol=1e-9)
        if not variant:
            assert got_fast == [6] * len(prompts)  # the full model reproduces itself to the end
        moved |= any(f < 6 for f in got_fast)
    assert moved  # some removal changed the course of a continuation
    frame = prune_frame(fast)
    rows = frame[(frame["task"] == GENERATION_TASK) & (frame["metric"] == "first_miss")]
    assert rows["verdict"].isna().all() and rows["ci90_low"].isna().all()  # descriptive: no verdict, no interval


@pytest.mark.parametrize("family", CAUSAL)
def test_greedy_continuations_with_the_cache_are_the_models_argmax(family):
    """The KV-cached loop continues each prompt as the model without a cache would, end of text or not,
    and prompts of different lengths are never padded together."""
    model = peaked_model(family, 97)
    prompts = [(1, 5, 9, 13), (1, 7, 3), (1, 5, 9, 14)]
    got = greedy_continuations(model, prompts, 5, batch_size=2)
    for prompt, continuation in zip(prompts, got, strict=True):
        ids = list(prompt)
        with torch.no_grad():
            for _ in range(5):
                ids.append(int(model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1].argmax()))
        assert continuation == tuple(ids[len(prompt):]), family


def test_the_comparison_tasks_report_what_the_margins_module_says(task_dir):
    taskset = load_tasks(["tiny_mc"], task_dir, num_fewshot=0)
    scored = scored_metrics(taskset, True, kl=True, fidelity_tasks=True, generate=True)
    assert scored["generation"] == scored["generation:tiny_mc"] == list(GENERATION_METRICS)
    assert scored["fidelity:tiny_mc"] == scored["fidelity"]
    assert Generation([1.0], [3], [4], {"kl_p90": 0.0, "kl_p99": 0.0}, None, [2]).rows()[-1].metric == "first_miss"
    assert [r.metric for r in Generation([1.0], [3], [4], {"kl_p90": 0, "kl_p99": 0}, None, [2]).rows()] == \
        list(GENERATION_METRICS)
    assert comparison_of("fidelity") == ("fidelity", "ppl") and comparison_of("generation:mmlu") == ("generation",
                                                                                                       "mmlu")
    assert comparison_of("tiny_mc") is None


def test_cli_prune_with_task_fidelity_and_generation(tiny_llama_dir, task_dir, text_file, tmp_path, monkeypatch):
    out = tmp_path / "out"
    common = ["prune", str(tiny_llama_dir), "--tasks", "tiny_mc", "--include-path", str(task_dir), "--ppl-text",
              str(text_file), "--seq-len", "32", "--fidelity-tasks", "--layers", "1,3", "--batch-tokens", "128",
              "--out", str(out)]
    args = [*common, "--generate", "5"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    csv = (out / "prune.csv").read_text()
    for task in ("fidelity:tiny_mc", "generation", "generation:tiny_mc"):
        assert f",{task}," in csv
    assert "tokens to 1st miss" in res.output and "KL(full" not in res.output
    settings = json.loads((out / "settings.json").read_text())
    assert settings["generate"] == 5 and "fidelity_tasks" in settings and len(settings["generated"]) == 16
    kept = json.loads((out / "continuations.json").read_text())
    assert kept["tokens"] == 5 and all(len(c) == 5 for c in kept["continuations"])

    def not_again(*_args, **_kwargs):
        raise AssertionError("a resumed run generated the continuations again")

    with monkeypatch.context() as patch:
        patch.setattr(generation, "greedy_continuations", not_again)
        again = CliRunner().invoke(app, args)  # resumes: the kept continuations, nothing to redo
    assert again.exit_code == 0 and "already in" in again.output and "reusing the full model's continuations" in \
        again.output, again.output
    other = CliRunner().invoke(app, [*common, "--generate", "4"])
    assert other.exit_code == 2 and "settings" in other.output, other.output  # never mixed with another length's
    assert json.loads((out / "continuations.json").read_text())["tokens"] == 5  # the refused run wrote nothing
