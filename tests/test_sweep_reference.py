"""The fast sweep against an independent reference: lm-eval's own HFLM on a model really built
without the layer, on the task shapes people sweep (MMLU-shaped k-shot groups, HellaSwag-shaped
multi-token endings, rolling perplexity), for a dense, an MoE, a sliding-window and a GPT-2 model;
a removed attention or MLP sub-layer against the model with its output projection really zeroed."""

from __future__ import annotations

import contextlib
import io
import math

import pytest

from lnsdiag.checkpoint.reference import build_without_units
from lnsdiag.engine.sweep import run_fast
from lnsdiag.interventions.units import Removal
from lnsdiag.model.load import LoadedModel
from lnsdiag.model.structure import find_layers
from lnsdiag.results.store import ResultStore
from lnsdiag.scoring.lmeval.aggregate import scores_of
from lnsdiag.scoring.lmeval.scorer import LmEvalScorer
from lnsdiag.scoring.lmeval.tasks import evaluate_tasks, load_tasks, seed_everything
from tests.families import tiny_model
from tests.lmeval_tasks import write_mmlu_like, write_shapes, write_tasks

VARIANTS = [Removal(), Removal.of(2), Removal.parse("1.attn"), Removal.parse("2.mlp,3")]


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shapes")
    write_mmlu_like(folder, subjects=4, docs=2)
    write_shapes(folder, docs=4)
    write_tasks(folder, docs=4)
    return folder


def _reference(model, tokenizer, taskset, max_length, seed=1234):
    """lm-eval's stock HFLM and ``evaluate`` on ``model`` (no lnsdiag code in the scoring path)."""
    from lm_eval.models.huggingface import HFLM

    with contextlib.redirect_stdout(io.StringIO()):
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4, max_length=max_length)
    seed_everything(seed)
    results = evaluate_tasks(lm, taskset, seed=seed, log_samples=True)
    return {(r.task, r.metric): r for r in scores_of(results, taskset).rows}


@pytest.mark.parametrize("family", ["llama", "mixtral", "mistral", "gpt2"])
def test_fast_sweep_equals_lm_eval_on_rebuilt_models(family, tokenizer, shapes_dir, tmp_path):
    context = {"n_positions": 1024} if family == "gpt2" else {"max_position_embeddings": 1024}
    model = tiny_model(family, vocab_size=len(tokenizer), **context)  # k-shot prompts of the in-test tokenizer are long
    loaded = LoadedModel.wrap(model, tokenizer, name=family)
    few_shot = load_tasks(["mm", "hs"], shapes_dir, num_fewshot=3)
    rolling = load_tasks(["tiny_ppl"], shapes_dir)
    scorers = [LmEvalScorer(loaded, few_shot, batch_size=4), LmEvalScorer(loaded, rolling, batch_size=4)]
    store = ResultStore(tmp_path / "fast", {})
    outcome = run_fast(model, scorers, VARIANTS, stack=find_layers(model), store=store, batch_tokens=2048)
    stats = outcome.stats
    assert stats["block_tokens"] < stats["naive_block_tokens"]
    if family != "mistral":  # beyond a 5-token sliding window nothing may be shared
        assert stats["shared_rows"] > 0
    max_length = scorers[0].lm.max_length
    for variant in VARIANTS:
        reference_model = model if not variant else build_without_units(model, variant)
        want = {**_reference(reference_model, tokenizer, few_shot, max_length),
                **_reference(reference_model, tokenizer, rolling, max_length)}
        got = {(r.task, r.metric): r for r in store.done()[variant].rows}
        assert got.keys() == want.keys()
        assert {"mm", "hs", "tiny_ppl"} <= {task for task, _ in got}
        for key, w in want.items():
            g = got[key]
            if key[1] in ("acc", "acc_norm"):
                assert g.value == w.value and g.stderr == pytest.approx(w.stderr, abs=1e-12), (variant, key)
            else:
                assert g.value == pytest.approx(w.value, rel=1e-5), (variant, key)
                assert (math.isnan(g.stderr) and math.isnan(w.stderr)) or g.stderr == pytest.approx(w.stderr,
                                                                                                     rel=1e-3)
