"""The fast engine gives lm-eval's numbers: per request within 1e-4 of HFLM, metrics equal."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from lnsdiag.cli import app
from lnsdiag.data.windows import TokenWindows
from lnsdiag.engine.checkpoint import Checkpoint
from lnsdiag.engine.fast import PASS_PHASE, SweepEngine
from lnsdiag.engine.inputs import head_at
from lnsdiag.engine.naive import run_naive
from lnsdiag.engine.plan import plan_rows
from lnsdiag.engine.sweep import run_fast
from lnsdiag.interventions.removal import removed_layers
from lnsdiag.interventions.units import Removal
from lnsdiag.model.load import LoadedModel
from lnsdiag.model.structure import find_layers
from lnsdiag.results.store import ResultStore
from lnsdiag.scoring.base import TokenRequest
from lnsdiag.scoring.lmeval.requests import collect_requests
from lnsdiag.scoring.lmeval.scorer import LmEvalScorer
from lnsdiag.scoring.lmeval.tasks import load_tasks
from lnsdiag.scoring.perplexity import PerplexityScorer
from tests.conftest import SAMPLE_TEXT, ProgressLog
from tests.families import tiny_model
from tests.lmeval_tasks import write_generation_task, write_tasks

FULL = Removal()
VARIANTS = [FULL, *Removal.each([0, 2, 3])]
#: Sub-layer variants: resumed at block 0 (no prefix), in the middle, mixed with a whole block.
SUBLAYER_VARIANTS = [FULL, *Removal.each([0, 2], ("attn", "mlp")), Removal.parse("1.attn,3"), Removal.parse("2,3.mlp")]


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory):
    folder = write_tasks(tmp_path_factory.mktemp("tasks"), docs=10)
    return write_generation_task(folder)


def _hflm_answers(lm, requests):
    """lm-eval's own HFLM computation of each token request, on the model as it is now."""
    return lm._loglikelihood_tokens([(None, list(r.context), list(r.continuation)) for r in requests],
                                    disable_tqdm=True)


@pytest.mark.parametrize("family,limit,fewshot,variants", [
    *[(f, limit, shots, VARIANTS) for f in ("llama", "qwen2", "gemma2", "mixtral")
      for limit, shots in ((None, 0), (5, 2))],
    *[(f, 5, 2, SUBLAYER_VARIANTS) for f in ("llama", "gemma2", "gpt_neox", "deepseek_v3")],
])
def test_fast_equals_naive(family, limit, fewshot, variants, tokenizer, tasks_dir, tmp_path):
    model = tiny_model(family, vocab_size=len(tokenizer))
    loaded = LoadedModel.wrap(model, tokenizer, name=family)
    taskset = load_tasks(["tiny_mc", "tiny_ppl"], tasks_dir, num_fewshot=fewshot)
    windows = TokenWindows.of(tokenizer, [SAMPLE_TEXT * 3], seq_len=40, max_tokens=240)
    stack = find_layers(model)

    # 1. per request: engine vs HFLM._loglikelihood_tokens on the hooked model
    scorer = LmEvalScorer(loaded, taskset, limit=limit, batch_size=3)
    scorers = [scorer, PerplexityScorer(model, windows, batch_size=3)]
    log = collect_requests(scorer.lm, taskset, limit=limit)
    requests = log.token_requests()
    assert len(log.single) > 0 and len(log.rolling) > 0
    result = SweepEngine(model, stack, variants, batch_tokens=96).run(requests, scorer.lm.max_length)
    for variant in variants:
        with removed_layers(model, variant, stack=stack):
            expected = _hflm_answers(scorer.lm, requests)
        answers = result.of(variant)
        loglik, greedy = answers.loglik, answers.greedy
        reference = np.array([e[0] for e in expected])
        # 1e-4, plus the float32 rounding of HFLM's own sum over a long rolling window (one ulp
        # of a sum near -1460 is 1.2e-4); the engine accumulates in float64.
        assert (np.abs(loglik - reference) <= 1e-4 + 2e-7 * np.abs(reference)).all()
        assert list(greedy) == [e[1] for e in expected]

    # 2. metrics: the fast sweep equals the naive one (lm-eval per variant)
    fast, naive = ResultStore(tmp_path / "fast", {}), ResultStore(tmp_path / "naive", {})
    run_fast(model, scorers, variants, stack=stack, store=fast, batch_tokens=128)
    run_naive(model, scorers, variants, stack=stack, store=naive)
    for variant in variants:
        got = {(r.task, r.metric): r for r in fast.done()[variant].rows}
        want = {(r.task, r.metric): r for r in naive.done()[variant].rows}
        assert got.keys() == want.keys()
        for key, w in want.items():
            g = got[key]
            if key[1] in ("acc", "acc_norm"):
                assert g.value == w.value and g.stderr == w.stderr, key
            else:
                assert g.value == pytest.approx(w.value, rel=1e-5), key
                assert (math.isnan(g.stderr) and math.isnan(w.stderr)) or g.stderr == pytest.approx(w.stderr, rel=1e-3)
    # 3. the verdicts: the same paired stderrs, intervals and verdicts from both engines
    from lnsdiag.results.verdict import prune_frame

    by_fast, by_naive = prune_frame(fast.done()), prune_frame(naive.done())
    assert list(by_fast["verdict"]) == list(by_naive["verdict"])
    scale = by_naive["baseline"].abs().to_numpy(float)  # a bound is a difference of near-equal metric values
    for column in ("delta_stderr", "ci90_low", "ci90_high"):
        got, want = by_fast[column].to_numpy(float), by_naive[column].to_numpy(float)
        assert (np.isnan(got) == np.isnan(want)).all(), column
        known = ~np.isnan(want)
        assert (np.abs(got - want)[known] <= 1e-3 * np.abs(want[known]) + 1e-5 * scale[known]).all(), column
    assert by_fast["paired"].dropna().all()
    for variant in variants:
        # 4. per-document scores (what paired statistics use): the same documents, items and choices
        got_docs, want_docs = fast.done()[variant], naive.done()[variant]
        assert got_docs.choices == want_docs.choices and got_docs.choices["tiny_mc"]
        assert got_docs.documents.keys() == want_docs.documents.keys()
        for key, items in want_docs.documents.items():
            assert items.keys() == got_docs.documents[key].keys(), key
            for doc, item in items.items():
                other = got_docs.documents[key][doc]
                if key[1] in ("acc", "acc_norm"):
                    assert other == item, (key, doc)
                else:  # (loglikelihood, words or bytes)
                    assert other[1] == item[1] and other[0] == pytest.approx(item[0], rel=1e-5, abs=1e-4), (key, doc)


def test_one_token_choices_share_a_row_and_truncation_matches_hflm():
    """HFLM's rows, except that an input which is a prefix of another is answered from the longer
    one's row (a causal model's logits at a position never see later tokens)."""
    ctx = tuple(range(3, 13))
    requests = [TokenRequest(ctx, (20 + k,)) for k in range(4)] + [TokenRequest(ctx, (30, 31))]
    rows = plan_rows(requests[:4], max_length=64)
    assert len(rows) == 1 and rows[0].ids == ctx and rows[0].positions == {9}  # one-token choices: one row
    (row,) = plan_rows(requests, max_length=64)  # the context is a prefix of the two-token choice's input
    assert row.ids == (*ctx, 30) and not row.shared and row.positions == {9, 10}
    assert sorted(row.members) == [(k, (9,), (20 + k,)) for k in range(4)] + [(4, (9, 10), (30, 31))]
    long = TokenRequest(tuple(range(3, 80)), (5, 6))
    (row,) = plan_rows([long], max_length=16)
    whole = (long.context + long.continuation)[-17:]
    assert row.ids == whole[:-1] and row.members[0][1] == (14, 15)
    with pytest.raises(ValueError, match="longer than"):
        plan_rows([TokenRequest((1,), tuple(range(3, 40)))], max_length=16)


def test_head_sees_only_the_asked_positions():
    model = tiny_model("gemma2")  # soft-capped logits: post-processing must still apply
    ids = torch.randint(3, 90, (2, 9))
    index = torch.tensor([[1, 4], [8, 8]])
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        with head_at(model, index):
            part = model(ids, use_cache=False).logits
    assert part.shape == (2, 2, full.shape[-1])
    assert torch.allclose(part[0, 1], full[0, 4], atol=1e-5) and torch.allclose(part[1, 0], full[1, 8], atol=1e-5)


def _requests(n=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ctx = torch.randint(3, 90, (int(torch.randint(2, 24, (1,), generator=g)),), generator=g)
        cont = torch.randint(3, 90, (int(torch.randint(1, 6, (1,), generator=g)),), generator=g)
        out.append(TokenRequest(tuple(ctx.tolist()), tuple(cont.tolist())))
    return out


def test_checkpoint_resumes_an_interrupted_pass(tmp_path):
    model = tiny_model("qwen2")
    stack = find_layers(model)
    requests = _requests()
    whole = SweepEngine(model, stack, VARIANTS, batch_tokens=64).run(requests, 32)
    checkpoint = Checkpoint(tmp_path / "partial.npz", "fp", every_seconds=0)
    stop_after_two_batches = ProgressLog(stop_at=3)  # the resumed count, then two batches

    with pytest.raises(KeyboardInterrupt):
        SweepEngine(model, stack, VARIANTS, batch_tokens=64).run(requests, 32, progress=stop_after_two_batches,
                                                                  checkpoint=checkpoint)
    with np.load(tmp_path / "partial.npz") as saved:
        assert 0 < saved["done"].sum() < len(saved["done"]) and int(saved["budget"]) == 64
    seen = ProgressLog()
    # asked for another budget: the stored one wins, so the batches and the bits are the same
    resumed = SweepEngine(model, stack, VARIANTS, batch_tokens=999).run(
        requests, 32, progress=seen, checkpoint=checkpoint)
    assert seen.after(PASS_PHASE)[1][1] > 0  # started where it stopped
    assert np.array_equal(resumed.loglik, whole.loglik) and np.array_equal(resumed.greedy, whole.greedy)
    other = Checkpoint(tmp_path / "partial.npz", "another-run", every_seconds=0)
    assert other.load(whole.loglik.shape, 10 ** 6) is None


def test_out_of_memory_splits_the_batch(monkeypatch):
    model = tiny_model("llama")
    stack = find_layers(model)
    requests = _requests(12)
    expected = SweepEngine(model, stack, VARIANTS, batch_tokens=4096).run(requests, 32)
    engine = SweepEngine(model, stack, VARIANTS, batch_tokens=4096)
    real = engine._batch
    tried, ran = [], []

    def fussy(rows, state, baseline_only=False):
        if baseline_only:  # the packing check's reference, not a batch of the pass
            return real(rows, state, baseline_only)
        tried.append(len(rows))
        if len(rows) > 3:
            raise torch.OutOfMemoryError("pretend")
        ran.append(len(rows))
        return real(rows, state)

    monkeypatch.setattr(engine, "_batch", fussy)
    got = engine.run(requests, 32)
    assert tried[0] == 12 and max(ran) <= 3 and sum(ran) == 12
    assert np.allclose(got.loglik, expected.loglik, atol=1e-5)


def test_resume_without_baseline_stops_early():
    model = tiny_model("llama")
    stack = find_layers(model)
    requests = _requests(8)
    full = SweepEngine(model, stack, [FULL, *Removal.each([1, 2])], batch_tokens=256).run(requests, 32)
    part = SweepEngine(model, stack, [Removal.of(1)], batch_tokens=256)
    assert part.layer_passes() == 1 + 2  # up to block 1's input, then blocks 2..3
    got = part.run(requests, 32)
    assert np.allclose(got.of(Removal.of(1)).loglik, full.of(Removal.of(1)).loglik, atol=1e-6)


def test_generation_tasks_fall_back_to_naive(tiny_llama_dir, tasks_dir, tmp_path):
    runner = CliRunner()
    out = tmp_path / "p"
    res = runner.invoke(app, ["prune", str(tiny_llama_dir), "--tasks", "tiny_mc,tiny_gen", "--include-path",
                              str(tasks_dir), "--out", str(out), "--no-angular", "--layers", "0,3"],
                        catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "generation tasks (tiny_gen) were scored by the naive engine" in res.output
    naive = tmp_path / "n"
    res = runner.invoke(app, ["prune", str(tiny_llama_dir), "--tasks", "tiny_mc,tiny_gen", "--include-path",
                              str(tasks_dir), "--out", str(naive), "--no-angular", "--layers", "0,3", "--engine",
                              "naive"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    import pandas as pd

    a = pd.read_csv(out / "prune.csv").sort_values(["variant", "task", "metric"]).reset_index(drop=True)
    b = pd.read_csv(naive / "prune.csv").sort_values(["variant", "task", "metric"]).reset_index(drop=True)
    assert set(a["task"]) == {"tiny_mc", "tiny_gen"}
    assert a[["variant", "task", "metric"]].equals(b[["variant", "task", "metric"]])
    assert np.allclose(a["value"], b["value"])
    import json

    meta = json.loads((out / "meta.json").read_text())
    assert meta["engine"] == "fast" and meta["engine_stats"]["naive_tasks"] == ["tiny_gen"]


def _mc_requests(questions=5, seed=3):
    """Multiple-choice-shaped requests: a shared context, four multi-token choices."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(questions):
        ctx = tuple(torch.randint(3, 90, (int(torch.randint(8, 30, (1,), generator=g)),), generator=g).tolist())
        for _ in range(4):
            cont = torch.randint(3, 90, (int(torch.randint(1, 6, (1,), generator=g)),), generator=g)
            out.append(TokenRequest(ctx, tuple(cont.tolist())))
    return out


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "deepseek_v3", "qwen3"])
def test_packed_contexts_reproduce_unpacked_rows(family):
    model = tiny_model(family)
    stack = find_layers(model)
    requests = _mc_requests()
    packed = SweepEngine(model, stack, VARIANTS, batch_tokens=160)
    got = packed.run(requests, 64)
    assert packed.stats["sharing"].startswith("on") and packed.stats["shared_rows"] == 5
    assert packed.stats["tokens"] < packed.stats["unshared_tokens"] / 2
    plain = SweepEngine(model, stack, VARIANTS, batch_tokens=160, share=False)
    want = plain.run(requests, 64)
    assert plain.stats["shared_rows"] == 0
    assert np.abs(got.loglik - want.loglik).max() < 1e-4
    assert np.array_equal(got.greedy, want.greedy)


def test_packing_is_switched_off_when_it_would_not_be_exact(monkeypatch):
    import lnsdiag.engine.fast as engine_module

    real = engine_module.shared_inputs

    def wrong_positions(rows, width, model, device):
        inputs = real(rows, width, model, device)
        inputs["position_ids"] = torch.arange(width, device=device).expand(len(rows), -1)  # no restart
        return inputs

    monkeypatch.setattr(engine_module, "shared_inputs", wrong_positions)
    model = tiny_model("llama")
    stack = find_layers(model)
    requests = _mc_requests()
    engine = SweepEngine(model, stack, [FULL, Removal.of(1)], batch_tokens=160)
    got = engine.run(requests, 64)
    assert engine.stats["sharing"].startswith("off: shared rows differed")
    want = SweepEngine(model, stack, [FULL, Removal.of(1)], batch_tokens=160, share=False).run(requests, 64)
    assert np.abs(got.loglik - want.loglik).max() < 1e-5


def test_no_packing_beyond_a_sliding_window():
    model = tiny_model("mistral")  # window of 5 tokens: a packed mask would hide the window
    engine = SweepEngine(model, find_layers(model), [FULL], batch_tokens=160)
    engine.run(_mc_requests(), 64)
    assert engine.stats["shared_rows"] == 0
    assert "5-token attention window (config.sliding_window)" in engine.stats["sharing"]


def test_rolling_windows_stay_plain_rows():
    """Windows share only a BOS: nothing worth a custom mask, so no packing."""
    windows = [TokenRequest((1,), tuple(range(k, k + n))) for k, n in ((3, 30), (40, 30), (80, 12), (90, 5))]
    rows = plan_rows(windows, max_length=64, share=True)
    assert len(rows) == 4 and not any(r.shared for r in rows)
    mc = _mc_requests(questions=1)
    (row,) = plan_rows(mc, max_length=64, share=True)
    assert row.shared and len(row.runs) >= 3  # the context, then a branch per distinct choice


def _in_place_blocks(model):
    """Make every block write its output into its input tensor (some models do)."""
    for block in find_layers(model).layers:
        real = block.forward

        def forward(hidden_states, *args, _real=real, **kwargs):
            out = _real(hidden_states.clone(), *args, **kwargs)
            hidden_states.copy_(out)
            return hidden_states

        block.forward = forward
    return model


def test_blocks_that_update_their_input_in_place():
    model = _in_place_blocks(tiny_model("llama"))
    stack = find_layers(model)
    requests = _requests(10)
    got = SweepEngine(model, stack, VARIANTS, batch_tokens=128).run(requests, 32)
    for variant in VARIANTS:
        with removed_layers(model, variant, stack=stack):
            want = SweepEngine(model, stack, [FULL], batch_tokens=128).run(requests, 32)
        assert np.abs(got.of(variant).loglik - want.of(FULL).loglik).max() < 1e-5, variant


def test_a_damaged_or_foreign_checkpoint_is_ignored(tmp_path):
    path = tmp_path / "partial.npz"
    path.write_bytes(b"not a zip file")
    assert Checkpoint(path, "fp").load((1, 1), 1) is None
    model = tiny_model("llama")
    engine = SweepEngine(model, find_layers(model), [FULL, Removal.of(1)], batch_tokens=64)
    engine.run(_requests(6), 32, checkpoint=Checkpoint(path, "fp"))
    assert Checkpoint(path, "fp").stored_variants() == [FULL, Removal.of(1)]
    assert Checkpoint(path, "other").stored_variants() is None


def test_an_interrupted_aggregation_keeps_the_engine_pass(tokenizer, tasks_dir, tmp_path):
    model = tiny_model("llama", vocab_size=len(tokenizer))
    loaded = LoadedModel.wrap(model, tokenizer)
    scorers = [LmEvalScorer(loaded, load_tasks(["tiny_mc"], tasks_dir), batch_size=4)]
    stack = find_layers(model)
    store = ResultStore(tmp_path, {"model": "x"})
    saved = []

    def crash_after_two(result):
        saved.append(result.removal)
        if len(saved) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_fast(model, scorers, VARIANTS, stack=stack, store=store, batch_tokens=64, on_saved=crash_after_two)
    assert (tmp_path / "engine-partial.npz").is_file() and len(store.done()) == 2
    seen = ProgressLog()
    left = [v for v in VARIANTS if v not in store.done()]
    stats = run_fast(model, scorers, left, stack=stack, store=store, batch_tokens=64, progress=seen).stats
    assert stats["variants_in_pass"] == len(VARIANTS)  # the stored pass, not a new one
    (_, _, total), (_, first) = seen.after(PASS_PHASE)[:2]
    assert first == total  # nothing left to compute
    assert len(store.done()) == len(VARIANTS) and not (tmp_path / "engine-partial.npz").exists()


def test_packing_falls_back_when_the_model_rejects_it(monkeypatch):
    import lnsdiag.engine.fast as engine_module

    def broken(*args, **kwargs):
        raise ValueError("too many values to unpack")

    monkeypatch.setattr(engine_module, "shared_inputs", broken)
    model = tiny_model("llama")
    engine = SweepEngine(model, find_layers(model), [FULL], batch_tokens=160)
    engine.run(_mc_requests(), 64)
    assert engine.stats["sharing"] == "off: shared rows failed (ValueError)"
    model.config.alibi = True
    assert engine_module.cannot_pack(model) == "ALiBi positions ignore position ids"


def test_a_head_that_is_bypassed_is_caught(monkeypatch):
    import contextlib

    import lnsdiag.engine.fast as engine_module

    monkeypatch.setattr(engine_module, "head_at", lambda model, index: contextlib.nullcontext())
    model = tiny_model("llama")
    with pytest.raises(RuntimeError, match="use --engine naive"):
        SweepEngine(model, find_layers(model), [FULL], batch_tokens=64).run(_requests(4), 32)


def test_empty_continuations_score_zero_and_greedy():
    model = tiny_model("llama")
    requests = [TokenRequest((5, 6, 7), ()), *_requests(3)]
    result = SweepEngine(model, find_layers(model), [FULL, Removal.of(2)], batch_tokens=64).run(requests, 32)
    assert result.loglik[:, 0].tolist() == [0.0, 0.0] and result.greedy[:, 0].all()
