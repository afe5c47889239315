"""`prune`: per-variant metrics equal lm-eval on a really rebuilt model; outputs; resume; errors."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from lnsdiag.checkpoint.reference import build_without_layers
from lnsdiag.cli import app
from lnsdiag.data.windows import TokenWindows
from lnsdiag.engine.fast import PASS_PHASE
from lnsdiag.engine.naive import run_naive
from lnsdiag.interventions.units import Removal
from lnsdiag.model.load import LoadedModel
from lnsdiag.model.structure import find_layers
from lnsdiag.results.store import ResultStore, VariantResult
from lnsdiag.results.verdict import prune_frame
from lnsdiag.runners.prune import OUTPUTS
from lnsdiag.scoring.base import MetricRow, Scores
from lnsdiag.scoring.lmeval.scorer import LmEvalScorer
from lnsdiag.scoring.lmeval.tasks import load_tasks, parse_limit
from lnsdiag.scoring.perplexity import Perplexity, PerplexityScorer, perplexity
from tests.conftest import SAMPLE_TEXT
from tests.families import tiny_model
from tests.lmeval_tasks import write_tasks
from tests.test_cli_basic import assert_one_line_error

runner = CliRunner()
FULL = Removal()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory):
    return write_tasks(tmp_path_factory.mktemp("tasks"), docs=10)


def _same(a: list[MetricRow], b: list[MetricRow]) -> None:
    assert [(r.task, r.metric) for r in a] == [(r.task, r.metric) for r in b]
    for x, y in zip(a, b, strict=True):
        assert x.value == y.value, (x, y)
        assert (math.isnan(x.stderr) and math.isnan(y.stderr)) or x.stderr == y.stderr, (x, y)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen2_moe"])
def test_each_variant_equals_lm_eval_on_rebuilt_model(family, tokenizer, tasks_dir, tmp_path):
    model = tiny_model(family, vocab_size=len(tokenizer))
    loaded = LoadedModel.wrap(model, tokenizer, name=family)
    taskset = load_tasks(["tiny_mc", "tiny_ppl"], tasks_dir, num_fewshot=1)
    windows = TokenWindows.of(tokenizer, [SAMPLE_TEXT * 4], seq_len=48, max_tokens=300)

    def scorers(of: LoadedModel) -> list:
        return [LmEvalScorer(of, taskset, batch_size=3, limit=8), PerplexityScorer(of.model, windows, batch_size=3)]

    def score(of: LoadedModel) -> list[MetricRow]:
        return sum((s.score() for s in scorers(of)), Scores()).rows

    store = ResultStore(tmp_path, {"model": family})
    stack = find_layers(model)
    run_naive(model, scorers(loaded), [FULL, *Removal.each([0, 2, 3])], stack=stack, store=store)
    done = store.done()
    for layer in (0, 2, 3):
        reference = LoadedModel.wrap(build_without_layers(model, [layer]), tokenizer)
        _same(done[Removal.of(layer)].rows, score(reference))
        assert any(r.value != b.value for r, b in zip(done[Removal.of(layer)].rows, done[FULL].rows, strict=True))
    # The model is intact: scoring it again gives the baseline.
    _same(score(loaded), done[FULL].rows)
    assert all("forward" not in layer.__dict__ for layer in stack.layers)


def test_builtin_perplexity_matches_brute_force(tokenizer):
    model = tiny_model("llama", vocab_size=len(tokenizer))
    windows = TokenWindows.of(tokenizer, [SAMPLE_TEXT * 3], seq_len=40, max_tokens=200)
    result = perplexity(model, windows, batch_size=2)
    total, count = 0.0, 0
    for w in windows.windows:
        with torch.no_grad():
            logits = model(w[None]).logits[0, :-1].double()
        nll = torch.nn.functional.cross_entropy(logits, w[1:], reduction="sum")
        total, count = total + float(nll), count + len(w) - 1
    assert result.tokens == count
    assert result.mean_nll == pytest.approx(total / count, rel=1e-6)
    rows = {r.metric: r for r in result.rows()}
    assert rows["ppl"].value == pytest.approx(math.exp(total / count), rel=1e-6)
    assert rows["ppl"].stderr > 0 and rows["bits_per_byte"].stderr > 0
    assert not rows["ppl"].higher_is_better


def _row(task, metric, value, stderr, hib=True):
    return MetricRow(task, metric, value, stderr, hib)


def _removal(layer):
    """The variant of a test written with one-layer numbers: ``None`` is the full model."""
    return FULL if layer is None else Removal.of(layer)


def _keyed(*variants):
    """Results as a sweep holds them: by what each variant removes."""
    return {v.removal: v for v in variants}


def _variant(layer, task, scores, choices=4, metric="acc"):
    """A stored variant of a 0/1-scored multiple-choice task: its metric row and per-document scores."""
    scores = [float(x) for x in scores]
    n = len(scores)
    mean = sum(scores) / n
    se = math.sqrt(sum((x - mean) ** 2 for x in scores) / (n - 1) / n)
    return VariantResult(_removal(layer), [_row(task, metric, mean, se)], 1.0,
                         documents={(task, metric): dict(enumerate(scores))},
                         choices={task: dict.fromkeys(range(n), choices)}, aggregations={(task, metric): "mean"})


def _merge(*parts):
    first, *rest = parts
    for other in rest:
        first.rows += other.rows
        first.documents.update(other.documents)
        first.choices.update(other.choices)
        first.aggregations.update(other.aggregations)
    return first


def test_verdicts_are_paired_and_honest_with_few_documents():
    """The issue's known truths, through the table: paired Δ and stderr, Tango's interval, TOST."""
    base100 = [1] * 60 + [0] * 40
    drop = [0] * 10 + [1] * 50 + [1] * 2 + [0] * 38  # 10 questions lost, 2 gained: 0.60 -> 0.52
    results = _keyed(
        _merge(_variant(None, "mmlu_like", base100), _variant(None, "big", [1] * 7000 + [0] * 3000),
               _variant(None, "small", [1] * 12 + [0] * 8)),
        _merge(_variant(0, "mmlu_like", drop), _variant(0, "big", [1] * 7000 + [0] * 3000),
               _variant(0, "small", [1] * 12 + [0] * 8)),
    )
    frame = prune_frame(results).set_index(["variant", "task"])
    hurt = frame.loc[("layer_000", "mmlu_like")]
    assert hurt["delta"] == pytest.approx(-0.08) and hurt["verdict"] == "hurts" and not hurt["dead"]
    d = [v - b for b, v in zip(base100, drop, strict=True)]
    brute = float(np.std(d, ddof=1) / math.sqrt(len(d)))
    assert hurt["delta_stderr"] == pytest.approx(brute) and hurt["paired"]
    assert hurt["retention"] == pytest.approx(100 * (0.52 - 0.25) / (0.60 - 0.25))  # above chance (4 choices)
    assert frame.loc[("layer_000", "big"), "verdict"] == "dead"  # no change, 10,000 documents
    small = frame.loc[("layer_000", "small")]
    assert small["verdict"] == "inconclusive" and not small["dead"]  # no change, 20 documents: cannot tell
    assert small["documents_needed"] > 20
    assert pd.isna(frame.loc[("baseline", "big"), "verdict"]) and pd.isna(frame.loc[("baseline", "big"), "dead"])


def test_five_documents_never_prove_a_layer_dead():
    results = _keyed(_variant(None, "t", [1, 0, 1, 1, 0]), _variant(3, "t", [1, 0, 1, 1, 0]))
    row = prune_frame(results).set_index("variant").loc["layer_003"]
    assert row["delta"] == 0 and row["verdict"] == "inconclusive" and row["ci90_low"] < -0.01


def test_group_rows_pool_their_subtasks_documents():
    """An MMLU-like group (size-weighted) is judged on the pooled per-document differences."""
    def group(layer, a, b):
        v = _merge(_variant(layer, "sub_a", a), _variant(layer, "sub_b", b))
        pooled = a + b
        v.rows.append(MetricRow("grp", "acc", sum(pooled) / len(pooled), 0.01, True, len(pooled), group=True))
        v.groups = {"grp": ["sub_a", "sub_b"]}
        return v

    base_a, base_b = [1] * 30 + [0] * 20, [1] * 10 + [0] * 10
    var_a, var_b = [0] * 6 + [1] * 24 + [0] * 20, [1] * 10 + [0] * 10
    frame = prune_frame(_keyed(group(None, base_a, base_b), group(1, var_a, var_b)))
    row = frame[(frame.task == "grp") & (frame.variant == "layer_001")].iloc[0]
    d = [v - b for b, v in zip(base_a + base_b, var_a + var_b, strict=True)]
    assert row["delta_stderr"] == pytest.approx(float(np.std(d, ddof=1) / math.sqrt(len(d))))
    assert row["verdict"] == "hurts"


def test_margins_parse_and_apply():
    from lnsdiag.errors import UserError
    from lnsdiag.results.margins import Margins

    default = Margins.parse(None)
    assert default.of("acc", 0.6) == 0.01 and default.of("word_perplexity", 20.0) == pytest.approx(0.2)
    assert Margins.parse("0.02").of("acc_norm[none]", 0.5) == 0.02
    both = Margins.parse("acc=0.03,ppl=2%")
    assert both.of("acc", 0.5) == 0.03 and both.of("ppl", 50.0) == pytest.approx(1.0)
    assert both.of("exact_match", 0.5) == 0.01
    for bad in ("zero", "-1", "acc=150%", "acc=0"):
        with pytest.raises(UserError, match=r"^margin "):
            Margins.parse(bad)


@pytest.mark.parametrize("text,expected", [("3", 3), ("0.25", 0.25), ("100", 100), (None, None)])
def test_parse_limit(text, expected):
    assert parse_limit(text) == expected


@pytest.mark.parametrize("text", ["1.5", "-2", "0", "many"])
def test_parse_limit_errors(text):
    from lnsdiag.errors import UserError

    with pytest.raises(UserError, match="--limit"):
        parse_limit(text)


def test_cli_prune_outputs(tiny_llama_dir, tasks_dir, text_file, tmp_path):
    out = tmp_path / "p"
    res = invoke("prune", tiny_llama_dir, "--tasks", "tiny_mc,tiny_ppl", "--include-path", tasks_dir,
                 "--ppl-text", text_file, "--ppl-max-tokens", 400, "--seq-len", 64, "--out", out,
                 "--batch-size", 4, "--limit", 6, "--num-fewshot", 1)
    assert res.exit_code == 0, res.output
    assert "tiny_mc (acc), 4 removed layers:" in res.output and "inconclusive" in res.output
    assert "two one-sided tests" in res.output
    tidy = pd.read_csv(out / "prune.csv")
    needed = {"removed_layer", "task", "metric", "value", "stderr", "baseline", "delta", "delta_stderr",
              "ci90_low", "ci90_high", "margin", "verdict", "retention", "dead", "angular_distance"}
    assert needed <= set(tidy.columns)
    assert set(tidy["task"]) == {"tiny_mc", "tiny_ppl", "ppl", "fidelity"}
    assert tidy["removed_layer"].isna().sum() == tidy[tidy.removed_layer.isna()].shape[0] > 0
    assert sorted(tidy["removed_layer"].dropna().unique()) == [0, 1, 2, 3]
    assert tidy.loc[tidy.removed_layer.notna(), "angular_distance"].notna().all()
    wide = pd.read_csv(out / "prune_wide.csv")
    assert len(wide) == 5 and "tiny_mc/acc" in wide.columns and "ppl/ppl_delta" in wide.columns
    tex = (out / "prune.tex").read_text()
    assert "\\toprule" in tex and "\\bottomrule" in tex and "tiny\\_mc" in tex
    for name in ("prune.png", "prune.pdf"):
        assert (out / name).stat().st_size > 1000
    meta = json.loads((out / "meta.json").read_text())
    assert meta["settings"]["tasks"] == ["tiny_mc", "tiny_ppl"] and meta["settings"]["limit"] == 6
    assert meta["tasks"]["num_fewshot"] == 1 and meta["settings"]["seed"] == 1234
    assert meta["versions"]["lm-eval"] and meta["versions"]["torch"] and meta["versions"]["transformers"]
    assert set(meta["timings"]["variants"]) == {"baseline", "0", "1", "2", "3"}
    assert meta["variants_done"] == 5
    # per-document scores, one file per variant: every document of every metric, and the ppl windows
    samples = pd.read_csv(out / "samples" / "layer_002.csv.gz")
    assert sorted(p.name for p in (out / "samples").iterdir()) == sorted(
        f"{v}.csv.gz" for v in ("baseline", "layer_000", "layer_001", "layer_002", "layer_003"))
    acc = samples[(samples.task == "tiny_mc") & (samples.metric == "acc")]
    assert len(acc) == 6 and set(acc["value"]) <= {0.0, 1.0} and (acc["choices"] == 4).all()
    variant = tidy[(tidy.variant == "layer_002") & (tidy.task == "tiny_mc") & (tidy.metric == "acc")]
    assert acc["value"].mean() == pytest.approx(float(variant["value"].iloc[0]))
    words = samples[(samples.task == "tiny_ppl") & (samples.metric == "word_perplexity")]
    assert len(words) > 0 and all(len(json.loads(item)) == 2 for item in words["item"])
    assert (samples.metric == "window_nll").sum() == len(samples[samples.task == "ppl"]) > 0
    res = invoke("prune", tiny_llama_dir, "--tasks", "tiny_mc", "--include-path", tasks_dir, "--out", tmp_path / "q",
                 "--limit", 5, "--no-angular", "--no-samples")
    assert res.exit_code == 0, res.output
    assert not (tmp_path / "q" / "samples").exists()
    few = pd.read_csv(tmp_path / "q" / "prune.csv").dropna(subset=["removed_layer"])
    assert set(few["verdict"]) <= {"inconclusive", "hurts", "helps"} and not few["dead"].any()  # 5 documents


def test_cli_resume_adds_layers_and_refuses_other_settings(tiny_llama_dir, tasks_dir, tmp_path):
    out = tmp_path / "p"
    base = ["prune", tiny_llama_dir, "--tasks", "tiny_mc", "--include-path", tasks_dir, "--out", out,
            "--no-angular", "--limit", 4]
    assert invoke(*base, "--layers", "1").exit_code == 0
    first = json.loads((out / "variants" / "layer_001.json").read_text())
    res = invoke(*base, "--layers", "1,3")
    assert res.exit_code == 0 and "resuming" in res.output
    assert json.loads((out / "variants" / "layer_001.json").read_text()) == first  # not rescored
    assert sorted(pd.read_csv(out / "prune.csv")["removed_layer"].dropna().unique()) == [1, 3]
    res = invoke("prune", tiny_llama_dir, "--tasks", "tiny_mc", "--include-path", tasks_dir, "--out", out,
                 "--no-angular", "--limit", 5)
    assert_one_line_error(res, "other settings")
    assert "--fresh" in res.output
    res = invoke("prune", tiny_llama_dir, "--tasks", "tiny_mc", "--include-path", tasks_dir, "--out", out,
                 "--no-angular", "--limit", 5, "--layers", "0", "--fresh")
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (out / "variants").iterdir()) == ["baseline.json", "layer_000.json"]


@pytest.fixture(scope="module")
def deep_llama_dir(tmp_path_factory, tokenizer):
    """8 layers, so a sweep lasts long enough to be interrupted."""
    import transformers as tf

    torch.manual_seed(1)
    config = tf.LlamaConfig(vocab_size=len(tokenizer), hidden_size=96, intermediate_size=192, num_hidden_layers=8,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    path = tmp_path_factory.mktemp("deep-llama")
    tf.AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _sweep_args(model_dir, tasks_dir, out, engine) -> list[str]:
    return ["prune", str(model_dir), "--tasks", "tiny_mc,tiny_ppl", "--include-path", str(tasks_dir), "--out", str(out),
            "--no-angular", "--batch-size", "2", "--engine", engine, "--batch-tokens", "48"]


def _prune_here(model_dir, tasks_dir, out, engine) -> str:
    """The same sweep in this process (no interpreter start-up: these runs need no signal), on one
    intra-op thread as the subprocesses (OMP_NUM_THREADS=1): every run computes the same bits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = runner.invoke(app, _sweep_args(model_dir, tasks_dir, out, engine), catch_exceptions=False,
                            env={"COLUMNS": "200", "LNSDIAG_CHECKPOINT_SECONDS": "0"})
    finally:
        torch.set_num_threads(threads)
    assert res.exit_code == 0, res.output
    return res.output


def _prune_process(model_dir, tasks_dir, out, engine, stop: str, log) -> subprocess.Popen:
    """The sweep in a subprocess, in the background, its stdout and stderr in the open file ``log``
    (no pipe to fill while nobody reads it); ``stop`` ("KILL", "INT") makes it signal itself after two units
    of progress (two saved variants; two checkpointed batches), via the progress bar's test hook."""
    cmd = [sys.executable, "-m", "lnsdiag", *_sweep_args(model_dir, tasks_dir, out, engine)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200", "LNSDIAG_CHECKPOINT_SECONDS": "0",
           "OMP_NUM_THREADS": "1", "LNSDIAG_TEST_SIGNAL": f"{'variants' if engine == 'naive' else PASS_PHASE}:2:{stop}"}
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=_ctrl_c_reaches_python)


def _ctrl_c_reaches_python() -> None:
    """A Ctrl-C must reach the child however the suite was launched: a shell starts a background
    job (``pytest &``, ``nohup``, some CI runners) with SIGINT ignored, every child inherits
    that, and Python then installs no KeyboardInterrupt handler. Restore the default first."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["naive", "fast"])
def test_interrupted_sweeps_resume_to_the_same_csv(engine, deep_llama_dir, tasks_dir, tmp_path):
    """kill -9 loses at most the work in progress; Ctrl-C stops cleanly; both resume exactly.

    The killed and the interrupted sweeps run side by side in the background while the
    uninterrupted reference runs here (each on one thread): the signals come from each run's own
    progress, so the overlap changes no outcome."""
    reference, killed, interrupted = tmp_path / "whole", tmp_path / "killed", tmp_path / "interrupted"
    logs = [tmp_path / "killed.log", tmp_path / "interrupted.log"]
    with logs[0].open("wb") as kill_log, logs[1].open("wb") as int_log:
        procs = [_prune_process(deep_llama_dir, tasks_dir, killed, engine, "KILL", kill_log),
                 _prune_process(deep_llama_dir, tasks_dir, interrupted, engine, "INT", int_log)]
    try:
        _prune_here(deep_llama_dir, tasks_dir, reference, engine)
    except BaseException:
        for proc in procs:
            proc.kill()
            proc.wait()
        raise
    for proc in procs:
        proc.wait(timeout=600)
    killed_output, interrupted_output = (log.read_text(errors="replace") for log in logs)

    assert procs[0].returncode == -signal.SIGKILL, killed_output
    if engine == "naive":
        assert 2 <= len(list((killed / "variants").glob("*.json"))) < 9
    else:
        with np.load(killed / "engine-partial.npz") as saved:
            assert 0 < saved["done"].sum() < len(saved["done"])
    for path in (killed / "variants").glob("*.json"):  # whatever is visible is whole
        json.loads(path.read_text())

    assert procs[1].returncode == 130, interrupted_output
    assert "interrupted" in interrupted_output and "Traceback" not in interrupted_output

    for folder in (killed, interrupted):
        output = _prune_here(deep_llama_dir, tasks_dir, folder, engine)
        if engine == "naive":
            assert "resuming" in output
        assert (folder / "prune.csv").read_text() == (reference / "prune.csv").read_text()
        assert not (folder / "engine-partial.npz").exists()


def test_bad_inputs(tiny_llama_dir, tasks_dir, text_file, tmp_path):
    base = ["prune", tiny_llama_dir, "--include-path", tasks_dir, "--out", tmp_path / "o", "--no-angular"]
    assert_one_line_error(invoke(*base, "--tasks", "tiny_mcc"), "did you mean tiny_mc")
    assert_one_line_error(invoke(*base, "--tasks", "tiny_mc", "--layers", "7"), "out of range")
    assert_one_line_error(invoke(*base, "--tasks", "tiny_mc", "--layers", "x-2"), "malformed")
    assert_one_line_error(invoke(*base, "--ppl-text", tmp_path / "nope.txt"), "no such text file")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert_one_line_error(invoke(*base, "--ppl-text", empty), "is empty")
    bare = tmp_path / "no-yaml"
    bare.mkdir()
    assert_one_line_error(invoke("prune", tiny_llama_dir, "--tasks", "tiny_mc", "--include-path", bare,
                                 "--out", tmp_path / "o2"), "holds no task YAML")
    assert_one_line_error(invoke(*base, "--tasks", "tiny_mc", "--limit", "1.5"), "--limit")


def test_builtin_perplexity_delta_uses_paired_noise():
    """Same windows for both: window difficulty cancels, so Δ's noise is far below each ppl's stderr."""
    tokens = [50] * 6
    base = Perplexity([100.0, 150.0, 200.0, 120.0, 180.0, 90.0], tokens, [200] * 6)
    shift = [0.4, 0.6, 0.5, 0.45, 0.55, 0.5]
    variant = Perplexity([b + d for b, d in zip(base.unit_nll, shift, strict=True)], tokens, [200] * 6)
    se = variant.paired_delta_stderr(base)
    mean_shift = sum(shift) / 300
    resid = sum((d - mean_shift * 50) ** 2 for d in shift)
    assert se["nll"] == pytest.approx(math.sqrt(resid / 30) / 50)
    own = {r.metric: r.stderr for r in variant.rows()}
    assert se["ppl"] < own["ppl"] / 20
    results = _keyed(VariantResult(FULL, base.rows(), 1.0, units={"ppl": base}),
                     VariantResult(Removal.of(3), variant.rows(), 1.0, units={"ppl": variant}))
    frame = prune_frame(results).set_index(["variant", "metric"])
    row = frame.loc[("layer_003", "nll")]
    assert row["delta_stderr"] == pytest.approx(se["nll"])
    assert abs(row["delta"]) <= 2 * row["stderr"]  # unpaired, this would look like noise
    # paired, it is measured tightly: +0.01 nats per token is perplexity ×1.01005, just beyond the 1% margin,
    # and NLL and perplexity (one measurement) get the same verdict; bits per byte is judged against 1% of the
    # byte perplexity it is the log of (here 4 bytes a token: +0.25%, within it)
    ppl = frame.loc[("layer_003", "ppl")]
    assert ppl["delta"] / ppl["baseline"] > 0.01 and ppl["verdict"] == row["verdict"] == "hurts"
    bpb = frame.loc[("layer_003", "bits_per_byte")]
    assert bpb["margin"] == pytest.approx(math.log1p(0.01) / math.log(2)) and bpb["verdict"] == "dead"


def test_fresh_clears_everything_a_previous_run_left(tmp_path):
    store = ResultStore(tmp_path, {"model": "a"})
    store.save(VariantResult(FULL, [_row("t", "acc", 0.5, 0.01)], 1.0))
    for name in ("engine-partial.npz", "angular.csv", "angular_settings.json", "prune.csv", "meta.json"):
        (tmp_path / name).write_text("old")
    ResultStore(tmp_path, {"model": "b"}, fresh=True, outputs=OUTPUTS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["settings.json", "variants"]


def test_a_checkpoint_retrained_in_place_is_not_resumed(tiny_llama_dir, tasks_dir, tmp_path):
    import shutil

    import transformers as tf

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, model_dir)
    base = ["prune", model_dir, "--tasks", "tiny_mc", "--include-path", tasks_dir, "--out", tmp_path / "o",
            "--no-angular", "--limit", 4, "--layers", "1"]
    assert invoke(*base).exit_code == 0
    torch.manual_seed(5)
    model = tf.AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    model.save_pretrained(model_dir)
    assert_one_line_error(invoke(*base), "weights")


def test_paired_ppl_delta_stderr_agrees_with_the_jackknife():
    import random

    rng = random.Random(0)
    tokens = [rng.randint(80, 120) for _ in range(60)]
    base_nll = [t * rng.uniform(4.5, 6.5) for t in tokens]
    var_nll = [b + t * rng.uniform(0.05, 0.4) for b, t in zip(base_nll, tokens, strict=True)]
    base, variant = Perplexity(base_nll, tokens, [4 * t for t in tokens]), Perplexity(var_nll, tokens,
                                                                                     [4 * t for t in tokens])

    def delta(keep):
        pick = lambda xs: [xs[i] for i in keep]  # noqa: E731
        return math.exp(sum(pick(var_nll)) / sum(pick(tokens))) - math.exp(sum(pick(base_nll)) / sum(pick(tokens)))

    n = len(tokens)
    leave_one_out = [delta([j for j in range(n) if j != i]) for i in range(n)]
    mean = sum(leave_one_out) / n
    jackknife = math.sqrt((n - 1) / n * sum((x - mean) ** 2 for x in leave_one_out))
    assert variant.paired_delta_stderr(base)["ppl"] == pytest.approx(jackknife, rel=0.1)


def test_paired_ppl_delta_stderr_agrees_with_the_paired_bootstrap():
    """The built-in perplexity's delta-method stderr of Δppl against a paired bootstrap of the same windows."""
    from lnsdiag import stats

    rng = np.random.default_rng(3)
    tokens = rng.integers(80, 120, 200).astype(float)
    base_nll = tokens * rng.uniform(4.5, 6.5, 200)
    var_nll = base_nll + tokens * rng.uniform(0.0, 0.2, 200)
    base, variant = (Perplexity(list(x), [int(t) for t in tokens], [4 * int(t) for t in tokens])
                     for x in (base_nll, var_nll))
    boot = stats.paired_bootstrap_ratio(base_nll, tokens, var_nll, tokens, np.exp, iters=20_000, seed=0)
    assert variant.paired_delta_stderr(base)["ppl"] == pytest.approx(boot.se, rel=0.05)


def _continuous(layer, task, values, metric="f1_doc"):
    n = len(values)
    mean = float(np.mean(values))
    return VariantResult(_removal(layer), [_row(task, metric, mean, float(np.std(values, ddof=1) / math.sqrt(n)))],
                         1.0,
                         documents={(task, metric): dict(enumerate(map(float, values)))},
                         aggregations={(task, metric): "mean"})


def test_identical_documents_prove_equivalence_only_when_there_are_many():
    """No spread at all is not proof: the interval is that of 'nothing changed' (±z²/(n+z²))."""
    few = [0.5, 0.25, 0.75, 0.5, 1.0]
    row = prune_frame(_keyed(_continuous(None, "t", few), _continuous(0, "t", few))).iloc[-1]
    assert row["verdict"] == "inconclusive" and row["ci90_low"] < -0.01
    many = list(np.linspace(0, 1, 10_000))
    row = prune_frame(_keyed(_continuous(None, "t", many), _continuous(0, "t", many))).iloc[-1]
    assert row["verdict"] == "dead"


def test_few_changed_answers_use_the_exact_test():
    """4 answers lost out of 100: McNemar's normal approximation says p = 0.046, the exact test 0.125."""
    base = [1] * 60 + [0] * 40
    variant = [0] * 4 + [1] * 56 + [0] * 40
    row = prune_frame(_keyed(_variant(None, "t", base), _variant(5, "t", variant))).iloc[-1]
    assert row["p_value"] == pytest.approx(0.125) and row["verdict"] == "inconclusive"


def test_unweighted_groups_are_judged_on_the_mean_of_their_leaf_means():
    """A group whose value is the mean of leaf means: a small leaf's 50-point drop moves it by 25."""
    def group(layer, small, big):
        v = _merge(_variant(layer, "small", small), _variant(layer, "big", big))
        value = (float(np.mean(small)) + float(np.mean(big))) / 2
        v.rows.append(MetricRow("grp", "acc", value, 0.01, True, len(small) + len(big), group=True))
        v.groups = {"grp": ["small", "big"]}
        return v

    big = [1] * 1400 + [0] * 600
    base = group(None, [1] * 20, big)
    dropped = group(1, [1] * 10 + [0] * 10, big)
    row = prune_frame(_keyed(base, dropped)).query("task == 'grp' and variant == 'layer_001'").iloc[0]
    assert row["delta"] == pytest.approx(-0.25) and row["verdict"] != "dead" and row["ci90_high"] < -0.01


def test_log_likelihood_margins_follow_the_perplexity_ratio_and_bootstrap_iters_zero_works():
    from lnsdiag.results.margins import Margins

    margins = Margins()
    assert margins.of("nll", 2.8) == pytest.approx(math.log1p(0.01))
    assert margins.of("bits_per_byte", 1.0) == pytest.approx(math.log1p(0.01) / math.log(2))
    assert margins.of("word_perplexity", 30.0) == pytest.approx(0.3)
    items = {i: (-float(100 + i), 20) for i in range(30)}
    shifted = {i: (ll * 1.001, w) for i, (ll, w) in items.items()}
    results = {}
    for removal, docs in ((FULL, items), (Removal.of(2), shifted)):
        lls = np.array([ll for ll, _ in docs.values()])
        words = np.array([w for _, w in docs.values()], dtype=float)
        value = math.exp(-lls.sum() / words.sum())
        results[removal] = VariantResult(removal, [_row("t", "word_perplexity", value, math.nan, False)], 1.0,
                                         documents={("t", "word_perplexity"): docs},
                                         aggregations={("t", "word_perplexity"): "weighted_perplexity"})
    row = prune_frame(results, bootstrap_iters=0).iloc[-1]  # lm-eval's "no stderr" must not break the paired one
    assert row["paired"] and np.isfinite(row["ci90_low"])


def test_samples_export_takes_numpy_items_and_retention_is_undefined_at_chance():
    from lnsdiag.results.verdict import retention

    result = VariantResult(FULL, [], 1.0, documents={("cola", "mcc"): {0: (1, np.int64(0)), 1: (0, np.int64(0))}})
    rows = result.sample_rows()
    assert [json.loads(r["item"]) for r in rows] == [[1, 0], [0, 0]]
    assert math.isnan(retention(0.26, 0.255, True, chance=0.25)) and retention(0.5, 0.75, True, 0.25) == 50.0
