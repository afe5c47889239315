"""`shrink`: several layers removed at once, chosen by each strategy, scored exactly.

The reference is always independent of the code under test: models really built without the
layers (``build_without_layers``), scored by lm-eval's own HFLM or by a plain forward, and the
strategies' definitions computed by brute force.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
import transformers as tf

from lnsdiag.checkpoint.reference import build_without_layers
from lnsdiag.data.windows import TokenWindows
from lnsdiag.engine.fast import SweepEngine
from lnsdiag.engine.work import layer_passes, naive_layer_passes
from lnsdiag.errors import Interrupted, UserError
from lnsdiag.interventions.units import Removal
from lnsdiag.model.load import LoadedModel
from lnsdiag.model.structure import find_layers
from lnsdiag.runners import shrink, strategies
from lnsdiag.runners.prune import PruneConfig
from lnsdiag.scoring.lmeval.scorer import LmEvalScorer
from lnsdiag.scoring.lmeval.tasks import load_tasks
from lnsdiag.scoring.perplexity import PerplexityScorer
from tests.conftest import SAMPLE_TEXT, ProgressLog
from tests.families import tiny_model
from tests.lmeval_tasks import write_tasks
from tests.test_prefix import MAX_LENGTH, _workload, counted_sweep

SETS = [Removal(), *(Removal.of(s) for s in [(0, 1), (1, 3), (0, 2, 3), 2, (2, 3), (3,)])]


@pytest.mark.parametrize("family", ["llama", "mistral", "mixtral", "qwen2_moe", "deepseek_v3", "gemma3", "gpt2"])
def test_several_layers_at_once_equal_a_model_built_without_them(family, tokenizer):
    """Sets resume from the input of their first removed block and skip the rest: per request
    within float32 rounding of the rebuilt model (MoE, sliding windows, DeepSeek's dense prefix)."""
    model = tiny_model(family, vocab_size=len(tokenizer))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    requests, _ = _workload(len(tokenizer))
    result = SweepEngine(model, find_layers(model), SETS, batch_tokens=300).run(requests, MAX_LENGTH)
    for variant in SETS[1:]:
        rebuilt = build_without_layers(model, list(variant.blocks))
        alone = SweepEngine(rebuilt, find_layers(rebuilt), [Removal()], share=False).run(requests, MAX_LENGTH)
        ref = alone.of(Removal()).loglik
        np.testing.assert_allclose(result.of(variant).loglik, ref, rtol=1e-5, atol=1e-4, err_msg=f"{family} {variant}")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_counted_passes_of_sets_are_the_blocks_run(tokenizer):
    """Counting the blocks that really compute: the full model once, then each set from its first
    removed block on, skipping the others (the engine's ``block_tokens``); the naive engine would
    run every kept block of every set."""
    model = tiny_model("llama", vocab_size=len(tokenizer))
    stack = find_layers(model)
    requests, _ = _workload(len(tokenizer))
    ran, stats = counted_sweep(model, stack, SETS, requests)
    assert layer_passes(4, SETS) == 4 + (4 - 0 - 2) + (4 - 1 - 2) + (4 - 0 - 3) + 1 + 0 + 0
    assert naive_layer_passes(4, SETS) == 4 + 2 + 2 + 1 + 3 + 2 + 3
    assert ran == stats["block_tokens"] == stats["tokens"] * layer_passes(4, SETS)


def _picks(strategy, picks):
    return {p.n: p.removal.blocks for p in picks if p.strategy == strategy}


def test_strategy_definitions_on_known_numbers():
    blocks = pd.DataFrame([{"start_layer": s, "block_size": n, "angular_distance": d, "block_influence": 0.0}
                           for n, ds in ((1, [0.5, 0.2, 0.1, 0.1, 0.3]), (2, [0.6, 0.25, 0.15, 0.4]),
                                         (3, [0.7, 0.3, 0.35]))
                           for s, d in enumerate(ds)])
    layers = pd.DataFrame({"layer": range(5), "block_influence": [0.4, 0.05, 0.2, 0.05, 0.3]})
    evidence = strategies.Evidence(num_layers=5, blocks=blocks, per_layer=layers)

    def picks(name):
        return _picks(name, strategies.registered(name).picks(evidence, 3))

    assert picks("angular") == {1: (2,), 2: (2, 3), 3: (1, 2, 3)}
    assert picks("bi") == {1: (1,), 2: (1, 3), 3: (1, 2, 3)}
    assert picks("last") == {1: (3,), 2: (2, 3), 3: (1, 2, 3)}


def test_the_registry_orders_help_and_checks_strategies():
    assert strategies.names() == ("angular", "bi", "sweep", "greedy", "last")
    assert strategies.output_order() == (*strategies.names(), "given")
    assert shrink.ShrinkConfig(strategies="last,bi").strategies == ("last", "bi")
    with pytest.raises(UserError, match=r"unknown strategies 'x' \(use angular, bi, sweep, greedy, last or all\)"):
        shrink.ShrinkConfig(strategies="bi,x")
    with pytest.raises(UserError, match="the angular and bi strategies need angular distances"):
        shrink.ShrinkConfig(strategies="last,bi", scoring=PruneConfig(angular=False))
    shrink.ShrinkConfig(strategies="sweep,greedy,last", scoring=PruneConfig(angular=False))
    backwards = strategies.Strategy("backwards", "", "", strategies.Need.NOTHING,
                                    lambda evidence, n_max: [((2, 1)[:n], 0.5) for n in range(1, n_max + 1)])
    assert [(p.n, p.removal.blocks, p.selection) for p in backwards.picks(strategies.Evidence(num_layers=3), 2)] == [
        (1, (2,), 0.5), (2, (1, 2), 0.5)]  # sorted, as every store key is
    too_many = strategies.Strategy("bad", "", "", strategies.Need.NOTHING, lambda evidence, n_max: [((0, 1), 0.0)])
    with pytest.raises(ValueError, match="not 1 distinct layers"):
        too_many.picks(strategies.Evidence(num_layers=3), 1)


def _middle(evidence, n_max):
    mid = evidence.num_layers // 2
    return [(tuple(range(mid - n // 2, mid - n // 2 + n)), math.nan) for n in range(1, n_max + 1)]


def test_a_new_strategy_is_one_function_and_one_registration(six_layers, ppl_file, tmp_path, monkeypatch):
    """Registered last, it is accepted by --strategy, scored like the others and listed after them."""
    middle = strategies.Strategy("middle", "the layers around the middle", "the middle n layers",
                                 strategies.Need.NOTHING, _middle)
    monkeypatch.setattr(strategies, "STRATEGIES", (*strategies.STRATEGIES, middle))
    run = shrink.run(six_layers, _config(ppl_file, remove=2, strategies="middle,last"), tmp_path / "m")
    assert [(p.strategy, p.n, p.removal.blocks) for p in run.picks] == [("last", 1, (4,)), ("last", 2, (3, 4)),
                                                                 ("middle", 1, (3,)), ("middle", 2, (2, 3))]
    assert list(pd.unique(run.frame["strategy"])) == ["full", "last", "middle"]
    middle_ppl = run.frame[(run.frame["strategy"] == "middle") & (run.frame["metric"] == "ppl")]
    assert list(middle_ppl["removed_layers"]) == ["3", "2,3"] and middle_ppl["verdict"].notna().all()


def _ppl_scorer(model, tokenizer):
    windows = TokenWindows.of(tokenizer, [SAMPLE_TEXT * 6], seq_len=48, max_tokens=600, name="sample")
    return PerplexityScorer(model, windows), windows


def _ppl_of(model, tokenizer) -> float:
    scorer, _ = _ppl_scorer(model, tokenizer)
    return next(r.value for r in scorer.score().rows if r.metric == "ppl")


@pytest.fixture(scope="module")
def six_layers(tokenizer):
    torch.manual_seed(3)
    config = tf.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=6,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id)
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # distinct norms, so layers differ in how much they matter
        for name, p in model.named_parameters():
            if "norm" in name:
                p.mul_(torch.linspace(0.2, 2.0, p.numel()).reshape(p.shape))
    return LoadedModel.wrap(model, tokenizer, name="six")


@pytest.fixture()
def ppl_file(tmp_path):
    path = tmp_path / "ppl.txt"
    path.write_text(SAMPLE_TEXT * 6, encoding="utf-8")
    return path


def _config(ppl_file, **kwargs):
    return shrink.ShrinkConfig(scoring=PruneConfig(ppl_text=str(ppl_file), seq_len=48, ppl_max_tokens=600,
                                                   batch_size=4), **kwargs)


def test_greedy_and_sweep_follow_brute_force_on_rebuilt_models(six_layers, ppl_file, tmp_path):
    """Greedy: at each step the set whose rebuilt model has the lowest perplexity; sweep: the
    n single removals of lowest perplexity; every pick's perplexity equals its rebuilt model's."""
    model, tok = six_layers.model, six_layers.tokenizer
    run = shrink.run(six_layers, _config(ppl_file, remove=3, strategies="sweep,greedy,last"), tmp_path / "s")
    assert run.rank_by == ("ppl", "ppl")
    brute: dict[tuple, float] = {}

    def ppl(layers):
        if layers not in brute:
            brute[layers] = _ppl_of(build_without_layers(model, list(layers)), tok)
        return brute[layers]

    removed: tuple = ()
    for n in range(1, 4):
        options = {tuple(sorted((*removed, j))): None for j in range(6) if j not in removed}
        removed = min(options, key=lambda s: (ppl(s), s))
        assert _picks("greedy", run.picks)[n] == removed
    singles = sorted(range(6), key=lambda i: (ppl((i,)), i))
    assert _picks("sweep", run.picks) == {n: tuple(sorted(singles[:n])) for n in range(1, 4)}
    rows = run.frame[run.frame["metric"] == "ppl"]
    for _, r in rows.iterrows():
        layers = tuple(int(x) for x in r["removed_layers"].split(",")) if r["removed_layers"] else ()
        expected = _ppl_of(model, tok) if not layers else ppl(layers)
        assert math.isclose(r["value"], expected, rel_tol=1e-5), (r["strategy"], layers)
    # every greedy step after the first is one pass over the current model's remaining layers (5, then
    # 4), each candidate resumed from its own layer: at most the one-layer sweep's work on that model
    steps = [p for p in run.meta["passes"] if p["pass"].startswith("greedy")]
    assert [p["pass"] for p in steps] == ["greedy step 2/3", "greedy step 3/3"]
    for p, kept in zip(steps, (5, 4), strict=True):
        one_layer_sweep = Removal.each(range(kept))
        assert p["sets"] == p["variants_in_pass"] and p["layer_passes_per_row"] <= layer_passes(kept, one_layer_sweep)


def test_picks_score_what_lm_eval_gives_the_rebuilt_model(six_layers, tmp_path):
    """Every strategy's every pick, lm-eval task and built-in perplexity: equal to stock HFLM +
    evaluate on the model really built without those layers."""
    tasks_dir = write_tasks(tmp_path / "tasks", docs=8)
    text = tmp_path / "t.txt"
    text.write_text(SAMPLE_TEXT * 6, encoding="utf-8")
    config = shrink.ShrinkConfig(remove=2, scoring=PruneConfig(tasks=("tiny_mc",), include_path=str(tasks_dir),
                                                               ppl_text=str(text), seq_len=48, ppl_max_tokens=600,
                                                               batch_size=4, bootstrap_iters=0))
    run = shrink.run(six_layers, config, tmp_path / "out")
    assert set(run.frame["strategy"]) == {"full", *strategies.names()}
    taskset = load_tasks(["tiny_mc"], str(tasks_dir))
    seen = set()
    for _, r in run.frame[(run.frame["task"] == "tiny_mc")].iterrows():
        layers = tuple(int(x) for x in r["removed_layers"].split(",")) if r["removed_layers"] else ()
        if (layers, r["metric"]) in seen:
            continue
        seen.add((layers, r["metric"]))
        rebuilt = build_without_layers(six_layers.model, list(layers)) if layers else six_layers.model
        ref = LmEvalScorer(LoadedModel.wrap(rebuilt, six_layers.tokenizer), taskset, batch_size=4,
                           bootstrap_iters=0).score()
        value = next(x.value for x in ref.rows if x.task == "tiny_mc" and x.metric == r["metric"])
        assert r["value"] == value, (layers, r["metric"])
    assert len({s for s, _ in seen}) >= 5


def test_resumes_after_an_interruption_and_reuses_sets_for_a_larger_n(six_layers, ppl_file, tmp_path):
    before = {k: v.clone() for k, v in six_layers.model.state_dict().items()}
    reference = shrink.run(six_layers, _config(ppl_file, remove=2), tmp_path / "ref").frame
    out = tmp_path / "cut"
    with pytest.raises(Interrupted):
        shrink.run(six_layers, _config(ppl_file, remove=2), out, progress=ProgressLog(stop_at=12))
    assert any((out / "variants").glob("*.json"))
    resumed = shrink.run(six_layers, _config(ppl_file, remove=2), out)
    pd.testing.assert_frame_equal(resumed.frame, reference)
    larger = shrink.run(six_layers, _config(ppl_file, remove=3), out)
    assert larger.meta["passes"] and all(p["sets"] < 6 for p in larger.meta["passes"])
    # the same numbers for n ≤ 2; the Holm family (every set of the run) grew, so adjusted p-values differ
    same = [c for c in reference.columns if c not in ("p_holm", "verdict")]
    pd.testing.assert_frame_equal(larger.frame[larger.frame["n_removed"] <= 2].reset_index(drop=True)[same],
                                  reference.reset_index(drop=True)[same])
    assert all(torch.equal(v, before[k]) for k, v in six_layers.model.state_dict().items())


def test_config_errors_name_the_config_field():
    with pytest.raises(UserError, match="remove must be at least 1"):
        shrink.ShrinkConfig(remove=0)
    with pytest.raises(UserError, match="unknown strategies 'angualr'"):
        shrink.ShrinkConfig(strategies="angualr")
    with pytest.raises(UserError, match="not both"):
        shrink.ShrinkConfig(strategies="bi", layers="3,4")
    with pytest.raises(UserError, match="leaves no layer"):
        shrink.ShrinkConfig(remove=6).check_model(6)
    with pytest.raises(UserError, match="out of range"):
        shrink.ShrinkConfig(layers="2,9").check_model(6)
    with pytest.raises(UserError, match="TASK/METRIC"):
        shrink.ShrinkConfig(rank_by="acc")
    assert shrink.ShrinkConfig(layers="3-5,1").layers == Removal((1, 3, 4, 5))


def test_cli_writes_curves_tables_and_record(tiny_llama_dir, tmp_path):
    from typer.testing import CliRunner

    from lnsdiag.cli import app
    from lnsdiag.runners.shrink_table import read_shrink

    tasks_dir = write_tasks(tmp_path / "tasks", docs=8)
    text = tmp_path / "t.txt"
    text.write_text(SAMPLE_TEXT * 6, encoding="utf-8")
    out = tmp_path / "out"
    args = ["shrink", str(tiny_llama_dir), "--tasks", "tiny_mc", "--include-path", str(tasks_dir), "--ppl-text",
            str(text), "--seq-len", "48", "--ppl-max-tokens", "600", "--remove", "2", "--out", str(out)]
    result = CliRunner().invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "Removing" in result.output and "work:" in result.output
    for name in ("shrink.csv", "shrink_wide.csv", "shrink.tex", "shrink.png", "shrink.pdf", "meta.json"):
        assert (out / name).is_file(), name
    frame = read_shrink(out / "shrink.csv")
    assert list(frame.columns) == shrink.COLUMNS
    assert set(frame["strategy"]) == {"full", *strategies.names()}
    assert set(frame["n_removed"]) == {0, 1, 2}
    assert all(isinstance(x, str) for x in frame["removed_layers"])
    meta = __import__("json").loads((out / "meta.json").read_text())
    assert meta["command"] == "shrink" and meta["remove"] == 2 and len(meta["picks"]) == 10
    first = (out / "shrink.csv").read_text()
    again = CliRunner().invoke(app, args, catch_exceptions=False)  # everything stored: nothing rescored
    assert again.exit_code == 0 and "resuming" in again.output and "work:" not in again.output
    assert (out / "shrink.csv").read_text() == first
    bad = CliRunner().invoke(app, [*args, "--rank-by", "arc/acc"], catch_exceptions=False)
    assert bad.exit_code == 2 and "'arc' is not scored" in bad.output


def test_save_writes_a_checkpoint_plain_transformers_loads(tiny_llama_dir, tmp_path):
    """--save: the chosen strategy's N-layer removal as a checkpoint; plain transformers loads it and
    its logits equal the hooked model's (float32, bit for bit); the card says what was removed."""
    from typer.testing import CliRunner

    from lnsdiag.cli import app
    from lnsdiag.interventions.removal import removed_layers

    text = tmp_path / "t.txt"
    text.write_text(SAMPLE_TEXT * 6, encoding="utf-8")
    saved = tmp_path / "pruned"
    args = ["shrink", str(tiny_llama_dir), "--ppl-text", str(text), "--seq-len", "48", "--ppl-max-tokens", "600",
            "--remove", "2", "--strategy", "last,bi", "--out", str(tmp_path / "out"), "--save", str(saved)]
    result = CliRunner().invoke(app, [*args, "--save-strategy", "last"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "saved the model without layers 1,2 (last)" in result.output
    plain = tf.AutoModelForCausalLM.from_pretrained(saved, dtype=torch.float32).eval()
    original = tf.AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    ids = torch.randint(3, 200, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), removed_layers(original, [1, 2]):
        hooked = original(ids, use_cache=False).logits
    with torch.no_grad():
        assert torch.equal(plain(ids, use_cache=False).logits, hooked)
    assert plain.config.num_hidden_layers == 2
    card = (saved / "README.md").read_text()
    assert "1, 2" in card and "last" in card and "ppl" in card
    again = CliRunner().invoke(app, args, catch_exceptions=False)  # the folder is full now
    assert again.exit_code == 2 and "--overwrite" in again.output
    best = CliRunner().invoke(app, [*args, "--overwrite"], catch_exceptions=False)
    assert best.exit_code == 0, best.output
    frame = pd.read_csv(tmp_path / "out" / "shrink.csv", dtype={"removed_layers": str})
    two = frame[(frame["n_removed"] == 2) & (frame["metric"] == "ppl")]
    winner = two.sort_values(["value", "strategy"]).iloc[0]
    assert f"without layers {winner['removed_layers']} ({winner['strategy']})" in best.output


def test_reuse_takes_a_prune_folder_of_the_same_settings(six_layers, ppl_file, tmp_path):
    from lnsdiag.runners import prune

    scoring = PruneConfig(ppl_text=str(ppl_file), seq_len=48, ppl_max_tokens=600, batch_size=4, angular=False)
    prune.run(six_layers, scoring, tmp_path / "prune")
    config = shrink.ShrinkConfig(remove=2, strategies="sweep,greedy,last", scoring=scoring)
    reused = shrink.run(six_layers, config, tmp_path / "reused", reuse=tmp_path / "prune")
    plain = shrink.run(six_layers, config, tmp_path / "plain")
    pd.testing.assert_frame_equal(reused.frame, plain.frame)
    assert sum(p["sets"] for p in reused.meta["passes"]) == sum(p["sets"] for p in plain.meta["passes"]) - 7
    other = PruneConfig(ppl_text=str(ppl_file), seq_len=32, ppl_max_tokens=600, batch_size=4, angular=False)
    with pytest.raises(UserError, match="other settings"):
        shrink.run(six_layers, shrink.ShrinkConfig(remove=2, strategies="last", scoring=other), tmp_path / "x",
                   reuse=tmp_path / "prune")
