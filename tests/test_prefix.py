"""Prefix sharing in the fast engine is exact, and its work is what it says.

Per request, the engine (sharing on) equals lm-eval's own HFLM on a model really built without
the removed layer, for MMLU-, HellaSwag- and rolling-perplexity-shaped requests; the counted
work on the benchmark's shapes meets the issue's targets.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers as tf

from bench import shapes
from lnsdiag.checkpoint.reference import build_without_layers
from lnsdiag.engine.budget import attention_limit
from lnsdiag.engine.fast import SweepEngine
from lnsdiag.engine.inputs import shared_inputs
from lnsdiag.engine.plan import plan_rows
from lnsdiag.engine.work import count_work, naive_tokens, planned_work, probe_plan
from lnsdiag.interventions.removal import removed_layers
from lnsdiag.interventions.units import Removal
from lnsdiag.model.load import LoadedModel
from lnsdiag.model.structure import find_layers
from lnsdiag.scoring.base import TokenRequest
from lnsdiag.scoring.lmeval.lm import make_lm
from tests.families import tiny_model

FULL = Removal()
VARIANTS = [FULL, *Removal.each([0, 2, 3])]
MAX_LENGTH = 64


def _workload(vocab: int) -> tuple[list[TokenRequest], dict[str, slice]]:
    """Small versions of the three shapes, plus requests scored inside a shared prefix."""
    mmlu = shapes.mmlu(subjects=3, questions=4, shots=3, vocab=vocab, seed=1, description=(4, 8), shot=(8, 13),
                       question=(4, 9))
    hella = shapes.hellaswag(documents=4, shots=2, vocab=vocab, seed=2, pool=3, context=(5, 9), ending=(2, 6))
    rolling = shapes.rolling(documents=2, doc_tokens=(40, 140), max_length=MAX_LENGTH, vocab=vocab, seed=3)
    prefix = mmlu[0].context[:30]  # the first subject's description and shots: shared by its questions
    inside = [TokenRequest(prefix[:6], prefix[6:16]),  # scored wholly inside the shared prefix
              TokenRequest(prefix[:12], mmlu[0].context[12:])]  # from inside the prefix into a question's branch
    out = mmlu + hella + rolling + inside
    spans, at = {}, 0
    for name, part in (("mmlu", mmlu), ("hellaswag", hella), ("rolling", rolling), ("inside", inside)):
        spans[name] = slice(at, at + len(part))
        at += len(part)
    return out, spans


def _hflm(model, tokenizer, requests, batch_size=4):
    lm = make_lm(LoadedModel.wrap(model, tokenizer), batch_size=batch_size, max_length=MAX_LENGTH)
    answers = lm._loglikelihood_tokens([(None, list(r.context), list(r.continuation)) for r in requests],
                                       disable_tqdm=True)
    return np.array([a[0] for a in answers]), np.array([a[1] for a in answers])


@pytest.mark.parametrize("family,overrides", [("llama", {}), ("gpt2", {}), ("mixtral", {}),
                                              ("mistral", {"sliding_window": 40})])
def test_shared_prefixes_equal_hflm_on_rebuilt_models(family, overrides, tokenizer):
    model = tiny_model(family, vocab_size=len(tokenizer), **overrides)
    stack = find_layers(model)
    requests, spans = _workload(len(tokenizer))
    engine = SweepEngine(model, stack, VARIANTS, batch_tokens=256)
    result = engine.run(requests, MAX_LENGTH)
    stats = engine.stats
    assert stats["sharing"].startswith("on"), stats["sharing"]
    assert stats["shared_rows"] > 0 and stats["tokens"] < stats["unshared_tokens"]
    if family == "mistral":  # longer inputs than the window stay unshared, on the model's own mask
        assert "40-token attention window (config.sliding_window)" in stats["sharing"]
        assert any(len(r.ids) > 40 for r in plan_rows(requests, MAX_LENGTH))
    for variant in VARIANTS:
        reference = model if not variant else build_without_layers(model, variant.blocks, stack=stack)
        want, want_greedy = _hflm(reference, tokenizer, requests)
        answers = result.of(variant)
        got, greedy = answers.loglik, answers.greedy
        for name, span in spans.items():
            bound = 1e-4 + 2e-7 * np.abs(want[span])
            assert (np.abs(got[span] - want[span]) <= bound).all(), (variant, name, np.abs(got - want)[span].max())
        assert list(greedy) == list(want_greedy), variant


def test_prefix_is_held_once_and_every_request_sees_its_own_input():
    requests = shapes.mmlu(subjects=2, questions=6, shots=5, vocab=97, seed=4, description=(5, 9), shot=(6, 10),
                           question=(3, 7))
    requests += shapes.hellaswag(documents=3, shots=2, vocab=97, pool=2, context=(4, 7), ending=(2, 5))
    requests += [TokenRequest(requests[0].context[:5], requests[0].context[5:20])]  # inside the prefix
    rows = plan_rows(requests, 256, share=True)
    subjects = [r for r in rows if r.shared and len(r.members) >= 24]
    assert len(subjects) == 2  # a subject's 6 questions × 4 one-token answers in one row
    prefix_length = len(requests[0].context) - 9  # at least this much is the subject's shared prefix
    assert sum(len(r.ids) for r in rows) < naive_tokens(requests, 256) / 2
    _assert_rows_replay(rows, requests, 256)
    (inside_row,) = [r for r in rows if any(n == len(requests) - 1 for n, _, _ in r.members)]
    (at,) = [p for n, p, _ in inside_row.members if n == len(requests) - 1]
    assert inside_row.shared and max(at) < prefix_length


def _assert_rows_replay(rows, requests, max_length):
    """Through the row's mask and position ids, each request's scored position sees exactly its
    own input up to there, at positions 0, 1, 2, ..., and its targets are the next tokens."""
    model = tiny_model("llama")
    width = max(len(r.ids) for r in rows)
    inputs = shared_inputs(rows, width, model, torch.device("cpu"))
    mask, positions = inputs["attention_mask"][:, 0], inputs["position_ids"]
    seen = set()
    for b, row in enumerate(rows):
        for n, at, targets in row.members:
            seen.add(n)
            full = (requests[n].context + requests[n].continuation)[-(max_length + 1):]
            start = len(full) - 1 - len(targets)
            assert targets == requests[n].continuation
            for k, p in enumerate(at):
                keys = mask[b, p].nonzero().flatten().tolist()
                assert [row.ids[q] for q in keys] == list(full[:start + k + 1]), (n, k)
                assert positions[b, keys].tolist() == list(range(start + k + 1))
    assert seen == {n for n, r in enumerate(requests) if r.continuation}


def test_a_long_prefix_is_repeated_in_each_row_within_the_budget():
    requests = shapes.mmlu(subjects=1, questions=12, shots=3, vocab=97, seed=5, description=(10, 10), shot=(12, 12),
                           question=(8, 8))
    prefix = 1 + 10 + 3 * 15
    suffix = 8 + 2
    rows = plan_rows(requests, 256, share=True, row_tokens=prefix + 4 * suffix)
    assert len(rows) == 3 and all(len(r.ids) <= prefix + 4 * suffix for r in rows)  # 4 questions a row
    assert all(r.ids[:prefix] == requests[0].context[:prefix] for r in rows)
    _assert_rows_replay(rows, requests, 256)
    # an input longer than the row budget still gets a row of its own
    (row,) = plan_rows(requests[:1], 256, share=True, row_tokens=8)
    assert not row.shared and len(row.ids) == len(requests[0].context)


def test_sliding_windows_are_recognised_by_every_config_name():
    def limit(config):
        return attention_limit(type("M", (), {"config": config})())

    assert limit(tf.MistralConfig(sliding_window=5)) == (5, "config.sliding_window")
    assert limit(tf.LlamaConfig()) == (None, "")
    assert limit(tf.Qwen2Config(sliding_window=7)) == (None, "")  # use_sliding_window is off by default
    assert limit(tf.Qwen2Config(use_sliding_window=True, sliding_window=7, max_window_layers=1,
                                num_hidden_layers=2)) == (7, "config.sliding_window")
    assert limit(tf.Gemma2Config(sliding_window=9)) == (9, "config.sliding_window")
    neo = dict(num_layers=2, window_size=11)
    assert limit(tf.GPTNeoConfig(attention_types=[[["global", "local"], 1]], **neo)) == (11, "config.window_size")
    assert limit(tf.GPTNeoConfig(attention_types=[[["global"], 2]], **neo)) == (None, "")
    assert limit(tf.Llama4TextConfig(attention_chunk_size=13)) == (13, "config.attention_chunk_size")
    assert limit(tf.RecurrentGemmaConfig(attention_window_size=17))[0] == 17
    assert limit(tf.LongformerConfig(attention_window=[19, 21]))[0] == 19


def test_sharing_stays_exact_in_half_precision(tokenizer):
    """bf16: within 2e-2 of lm-eval per request; no more answer flips than lm-eval shows with
    another batch size."""
    model = tiny_model("llama", vocab_size=len(tokenizer)).to(torch.bfloat16)
    stack = find_layers(model)
    requests, spans = _workload(len(tokenizer))
    engine = SweepEngine(model, stack, [FULL, Removal.of(2)], batch_tokens=256)
    result = engine.run(requests, MAX_LENGTH)
    assert engine.stats["sharing"].startswith("on"), engine.stats["sharing"]
    for variant in (FULL, Removal.of(2)):
        with removed_layers(model, variant, stack=stack):
            naive, _ = _hflm(model, tokenizer, requests, batch_size=4)
            other, _ = _hflm(model, tokenizer, requests, batch_size=1)
        got = result.of(variant).loglik
        assert np.abs(got - naive).max() <= 2e-2, variant
        for name in ("mmlu", "hellaswag"):
            picks = [x[spans[name]].reshape(-1, 4).argmax(axis=1) for x in (got, naive, other)]
            assert (picks[0] != picks[1]).sum() <= (picks[2] != picks[1]).sum(), (variant, name)


def test_half_precision_noise_goes_through_the_shared_rows_attention_path(tokenizer):
    """The check's noise reference must include the explicit-mask attention path that shared rows
    take: on a GPU that path is another kernel, and in bf16 it moves a deep model's log-likelihoods
    as much as sharing does (measured on an H100, bench/RESULTS.md). Float32 needs no noise pass."""
    requests, _ = _workload(len(tokenizer))
    for dtype in (torch.bfloat16, torch.float32):
        model = tiny_model("llama", vocab_size=len(tokenizer)).to(dtype)
        seen: list[str] = []

        def record(module, args, kwargs, seen=seen):
            mask = kwargs.get("attention_mask")
            seen.append("4d" if mask is not None and mask.dim() == 4 else "plain")

        hook = model.model.register_forward_pre_hook(record, with_kwargs=True)
        engine = SweepEngine(model, find_layers(model), [FULL], batch_tokens=100_000)
        rows = plan_rows(requests, MAX_LENGTH, share=True, row_tokens=MAX_LENGTH)
        probes = probe_plan(rows, 4, [FULL], limit=2)
        try:
            worst, noise, count = engine._check_sharing(probes, requests, MAX_LENGTH, noise=dtype != torch.float32)
        finally:
            hook.remove()
        half = dtype == torch.bfloat16
        # the probe rows (shared: 4D mask), each request alone (the model's own mask), then, in
        # half precision only, the same requests batched through the explicit 4D mask
        alone = len(seen) - len(probes) - half
        assert alone >= 1 and seen == ["4d"] * len(probes) + ["plain"] * alone + ["4d"] * half, (dtype, seen)
        assert count > 0 and worst >= 0 and (noise > 0) == (dtype == torch.bfloat16), (dtype, worst, noise)


def count_block_tokens(stack) -> list[int]:
    """Count the tokens every block really computes (row × width per call) into the returned
    one-item list; a removed or resumed-past block is not counted, since removal replaces the
    forward that this wraps. Undo with :func:`uncount_blocks`."""
    ran = [0]

    def counting(block):
        real = block.forward

        def forward(hidden_states, *args, **kwargs):
            ran[0] += hidden_states.shape[0] * hidden_states.shape[1]
            return real(hidden_states, *args, **kwargs)

        return forward

    for block in stack.layers:
        block.forward = counting(block)
    return ran


def uncount_blocks(stack) -> None:
    for block in stack.layers:
        del block.forward


def counted_sweep(model, stack, variants, requests) -> tuple[int, dict]:
    """The block tokens that really compute in a fast pass over ``variants`` (one row a batch: no
    padding; after a warm-up that learns the blocks' output forms), and the engine's own stats."""
    SweepEngine(model, stack, variants, batch_tokens=1).run(requests[:4], MAX_LENGTH)
    ran = count_block_tokens(stack)
    try:
        engine = SweepEngine(model, stack, variants, batch_tokens=1, share=False)
        engine.run(requests, MAX_LENGTH)
    finally:
        uncount_blocks(stack)
    return ran[0], engine.stats


def test_reported_work_is_the_work_done(tokenizer):
    """Block-token passes counted by hooks on the blocks equal the engine's ``block_tokens``;
    HFLM's own forwards (batch size 1: no padding) equal the naive count's tokens."""
    model = tiny_model("llama", vocab_size=len(tokenizer))
    stack = find_layers(model)
    requests, _ = _workload(len(tokenizer))
    SweepEngine(model, stack, VARIANTS, batch_tokens=1).run(requests[:4], MAX_LENGTH)  # warm-up
    ran = count_block_tokens(stack)
    engine = SweepEngine(model, stack, VARIANTS, batch_tokens=1)  # one row a batch: no padding
    real_plan = engine._plan
    in_check = [0]

    def plan(*args):
        out = real_plan(*args)
        in_check[0], ran[0] = ran[0], 0
        return out

    engine._plan = plan
    engine.run(requests, MAX_LENGTH)
    stats = engine.stats
    assert ran[0] == stats["block_tokens"] - stats["check_block_tokens"]
    assert in_check[0] == stats["check_block_tokens"]
    assert stats == {**stats, **count_work(requests, plan_rows(requests, MAX_LENGTH, share=True,
                                                               row_tokens=stats["row_tokens"]),
                                           MAX_LENGTH, 4, VARIANTS, stats["check_block_tokens"] // 4)}
    assert planned_work(requests, MAX_LENGTH, 4, VARIANTS, row_tokens=stats["row_tokens"])["block_tokens"] == \
        stats["block_tokens"]
    uncount_blocks(stack)

    fed = [0]
    lm = make_lm(LoadedModel.wrap(model, tokenizer), batch_size=1, max_length=MAX_LENGTH)
    real_call = lm._model_call

    def call(inps, *args, **kwargs):
        fed[0] += inps.shape[0] * inps.shape[1]
        return real_call(inps, *args, **kwargs)

    lm._model_call = call
    lm._loglikelihood_tokens([(None, list(r.context), list(r.continuation)) for r in requests], disable_tqdm=True)
    assert fed[0] == naive_tokens(requests, MAX_LENGTH)


def test_the_check_probes_rows_spread_over_a_large_plan():
    rows = plan_rows(shapes.mmlu(subjects=20, questions=40, shots=5), 4096, share=True)
    probes = probe_plan(rows, 32, [FULL, *Removal.each(range(32))])
    assert len(probes) == 8 and len({id(r) for r, _ in probes}) == 8
    assert max(len(r.ids) for r in rows) == max(len(r.ids) for r, _ in probes)
    where = sorted(next(k for k, r in enumerate(rows) if r is p) for p, _ in probes)
    assert where[-1] - where[0] > len(rows) // 2  # spread over the plan
    for row, chosen in probes:  # the row's first and last branch
        ends = sorted(row.members, key=lambda m: m[1][0])
        assert {ends[0][0], ends[-1][0]} == set(chosen)


LLAMA_2_7B_CONTEXT = 4096
ALL_32 = [FULL, *Removal.each(range(32))]


@pytest.mark.parametrize("name,make,target", [
    ("mmlu 5-shot", lambda context: shapes.mmlu(subjects=20, questions=40, shots=5), 6.0),
    ("hellaswag 10-shot", lambda context: shapes.hellaswag(documents=200, shots=10), 5.0),
    ("perplexity windows", lambda context: shapes.rolling(documents=8, max_length=context), 1.9),
])
def test_counted_work_targets_for_32_layers(name, make, target):
    """All 32 layers of a Llama-2-7B-shaped model (context 4096, rows of up to 4096 tokens: what
    :func:`~lnsdiag.engine.budget.default_row_tokens` gives that shape)."""
    work = planned_work(make(LLAMA_2_7B_CONTEXT), LLAMA_2_7B_CONTEXT, 32, ALL_32, row_tokens=4096)
    assert work["work_ratio"] >= target, (name, work)
    # a 2048-token context (and rows) still meets them
    work = planned_work(make(2048), 2048, 32, ALL_32, row_tokens=2048)
    assert work["work_ratio"] >= target, (name, work)
