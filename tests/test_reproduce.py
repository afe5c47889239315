"""Pre-LN vs LNS twins: identical but for the norm, cached, measured, reported; perplexity by hand."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict

import pandas as pd
import pytest
import torch

from lnsdiag.checkpoint.reference import build_without_layers
from lnsdiag.data.text import TextSource
from lnsdiag.data.windows import TokenWindows
from lnsdiag.demo import model as demo_model
from lnsdiag.demo.model import DemoSpec
from lnsdiag.engine.sweep import perplexity_sweep
from lnsdiag.errors import UserError
from lnsdiag.model.load import LoadedModel
from lnsdiag.runners import reproduce
from tests.conftest import SAMPLE_TEXT
from tests.families import tiny_model
from tests.test_cli_basic import assert_one_line_error, invoke

TINY = dict(layers=3, hidden=32, heads=4, intermediate=64, vocab=300, seq_len=32, batch_size=4, steps=4, lr=3e-3)
CLI_TINY = ["--layers", 3, "--hidden", 32, "--heads", 4, "--intermediate", 64, "--vocab", 300, "--seq-len", 32,
            "--train-batch-size", 4, "--steps", 4, "--eval-tokens", 256, "--device", "cpu"]


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    lines = [f"{SAMPLE_TEXT} Paragraph {i} says {i * 7 % 13} and {i * 5 % 11}.\n" for i in range(60)]
    path.write_text("".join(lines), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def twins(corpus_file, tmp_path_factory):
    """Train the tiny twins once; record each one's initial weights and token stream."""
    # module fixtures run before the autouse per-test cache fixture: point at the same private cache
    patch = pytest.MonkeyPatch()
    patch.setenv("LNSDIAG_CACHE", str(tmp_path_factory.getbasetemp() / "lnsdiag-cache"))
    seen: dict[str, dict] = {}
    real = demo_model.train_causal_lm

    def spy(model, stream, **kwargs):
        norm = "lns" if getattr(model.config, "lns", None) else "pre-ln"
        seen[norm] = {"state": {k: v.clone() for k, v in model.state_dict().items()}, "stream": stream.clone(),
                      "kwargs": kwargs}
        return real(model, stream, **kwargs)

    demo_model.train_causal_lm = spy
    try:
        result = reproduce.reproduce(DemoSpec(**TINY), ["pre-ln", "lns"], text=_source(corpus_file),
                                     eval_tokens=256, batch_size=4)
    finally:
        demo_model.train_causal_lm = real
        patch.undo()
    return result, seen


def _source(path):
    from lnsdiag.data.text import from_file

    return from_file(path)


def test_twins_differ_only_in_the_norm(twins):
    result, seen = twins
    assert set(seen) == {"pre-ln", "lns"}
    pre, lns = seen["pre-ln"], seen["lns"]
    assert pre["state"].keys() == lns["state"].keys()
    assert all(torch.equal(pre["state"][k], lns["state"][k]) for k in pre["state"])  # same initial weights
    assert torch.equal(pre["stream"], lns["stream"])  # same data
    assert pre["kwargs"] == lns["kwargs"]  # same steps, batch, lr, seed
    assert result.same_tokenizer and not result.notes
    assert [r.placement for r in result.runs] == ["pre-LN", "pre-LN+LNS"]
    assert [r.record["spec"]["norm"] for r in result.runs] == ["pre-ln", "lns"]
    assert result.runs[0].parameters == result.runs[1].parameters


def test_results_are_complete_and_consistent(twins):
    result, _ = twins
    summary = result.summary()
    assert list(summary["model"]) == ["Pre-LN", "LNS"]
    assert summary["heldout_ppl"].between(1, 1000).all()
    assert summary["deep_angular"].between(0, 1).all()
    layers = result.layers()
    assert list(layers["layer"]) == [0, 1, 2]
    for run in result.runs:
        sweep = run.sweep
        assert list(sweep["removed_layer"].astype("Float64").fillna(-1)) == [-1, 0, 1, 2]
        assert sweep["value"].iloc[0] == pytest.approx(run.perplexity)
        assert sweep["retention"].tolist() == pytest.approx((100 * run.perplexity / sweep["value"]).tolist())
        # the deep-half mean in the summary is the mean of the last two angular distances (layers 1, 2)
        row = summary[summary["norm"] == run.norm].iloc[0]
        assert row["deep_angular"] == pytest.approx(run.angular.layers["angular_distance"].iloc[1:].mean())
    text = " ".join(result.headline())
    assert "LNS vs Pre-LN" in text and "perplexity" in text


def test_cached_twins_are_reused(twins, corpus_file, monkeypatch):
    result, _ = twins

    def boom(*_a, **_k):
        raise AssertionError("retrained a cached model")

    monkeypatch.setattr(demo_model, "train_causal_lm", boom)
    again = reproduce.reproduce(DemoSpec(**TINY), ["pre-ln", "lns"], text=_source(corpus_file), eval_tokens=256,
                                batch_size=4)
    assert [r.perplexity for r in again.runs] == [r.perplexity for r in result.runs]
    assert [r.path for r in again.runs] == [r.path for r in result.runs]


def test_default_demo_cache_key_is_unchanged():
    """Adding norm/init to DemoSpec must not invalidate existing demo caches."""
    old_fields = {k: v for k, v in asdict(DemoSpec()).items() if k not in ("norm", "init")}
    blob = json.dumps({**old_fields, "recipe": demo_model.RECIPE_VERSION}, sort_keys=True)
    assert DemoSpec().key() == hashlib.sha256(blob.encode()).hexdigest()[:12]
    assert DemoSpec(norm="lns").key() != DemoSpec().key() != DemoSpec(init="scaled").key()
    assert DemoSpec(norm="lns").name.endswith("-lns")


def _loaded(family="llama"):
    from lnsdiag.demo.model import train_tokenizer

    tok = train_tokenizer([SAMPLE_TEXT * 3], vocab_size=300)
    model = tiny_model(family, vocab_size=len(tok))
    return LoadedModel.wrap(model, tok, "tiny"), tok


def test_perplexity_matches_the_model_loss_and_rebuilt_models():
    loaded, tok = _loaded()
    windows = TokenWindows.of(tok, [SAMPLE_TEXT * 4], seq_len=24, max_tokens=24 * 4 + 10)
    assert len(windows) > 1 and len(windows.windows[-1]) < 24  # a padded last window
    sweep = perplexity_sweep(loaded, windows, [0, 2], batch_tokens=48)
    # by hand: HF's own loss on each window (mean over its predicted tokens), token-weighted
    def nll(model):
        total = count = 0
        for w in windows.windows:
            with torch.no_grad():
                loss = model(input_ids=w[None], labels=w[None], use_cache=False).loss
            total += float(loss) * (len(w) - 1)
            count += len(w) - 1
        return total / count

    assert sweep["value"].iloc[0] == pytest.approx(math.exp(nll(loaded.model)), rel=1e-5)
    for row in sweep.iloc[1:].itertuples():
        reference = build_without_layers(loaded.model, [int(row.removed_layer)])
        assert row.value == pytest.approx(math.exp(nll(reference)), rel=1e-5)
    assert list(sweep["task"].unique()) == ["ppl"] and sweep["dead"].iloc[0] is pd.NA


def test_split_text():
    one = TextSource("file:x", ["line one\n" * 50])
    train, held = reproduce.split_text(one, 0.1)
    assert train.texts[0] + held.texts[0] == one.texts[0] and held.texts[0].startswith("line")
    many = TextSource("file:y", [f"doc {i}" for i in range(20)])
    train, held = reproduce.split_text(many, 0.1)
    assert held.texts == ["doc 18", "doc 19"] and len(train.texts) == 18
    with pytest.raises(UserError, match="too short"):
        reproduce.split_text(TextSource("file:z", ["x"]), 0.1)


def test_spec_and_norm_validation():
    assert reproduce.parse_norms("pre-ln, LNS,post") == ["pre-ln", "lns", "post-ln"]
    with pytest.raises(UserError, match="unknown norm 'rmsnorm'"):
        reproduce.parse_norms("pre-ln,rmsnorm")
    assert reproduce.spec_from("llama-130m").hidden == 768
    with pytest.raises(UserError, match="multiple of --heads"):
        reproduce.spec_from("demo", hidden=30, heads=4)
    with pytest.raises(UserError, match="unknown --preset"):
        reproduce.spec_from("gpt-5")


@pytest.mark.parametrize("changes,fragment", [
    ({"norms": "pre-ln,foo"}, "unknown norm 'foo'"),
    ({"spec": DemoSpec(init="xavier")}, "--init must be default or scaled"),
    ({"spec": DemoSpec(steps=0)}, "--steps must be at least 1"),
    ({"eval_tokens": 8}, "less than one sequence"),
    ({"batch_size": 0}, "--batch-size must be at least 1"),
])
def test_config_rejects_bad_settings(changes, fragment):
    with pytest.raises(UserError, match=fragment):
        reproduce.ReproduceConfig(**changes)


def test_config_normalises_norms():
    assert reproduce.ReproduceConfig(norms="LNS, pre").norms == ("lns", "pre-ln")


def test_cli_reproduce_writes_everything(corpus_file, tmp_path, twins):
    out = tmp_path / "rep"
    res = invoke("reproduce", "--text-file", corpus_file, *CLI_TINY, "--batch-size", 4, "--out", out)
    assert res.exit_code == 0, res.output
    assert "LNS vs Pre-LN" in res.output
    summary = pd.read_csv(out / "reproduce.csv")
    assert list(summary["model"]) == ["Pre-LN", "LNS"]
    assert summary["heldout_ppl"].tolist() == pytest.approx([r.perplexity for r in twins[0].runs])
    assert len(pd.read_csv(out / "reproduce_layers.csv")) == 3
    for name in ("reproduce.png", "reproduce.pdf"):
        assert (out / name).stat().st_size > 1000
    assert "\\begin{tabular}" in (out / "reproduce.tex").read_text()
    meta = json.loads((out / "meta.json").read_text())
    assert meta["norms"] == ["pre-ln", "lns"] and meta["spec"]["layers"] == 3 and meta["same_tokenizer"]
    for norm in ("pre-ln", "lns"):
        for name in ("angular.csv", "variance.csv", "ppl_sweep.csv", "meta.json"):
            assert (out / norm / name).is_file()
    # and `compare` takes the whole reproduce folder: one run per model, in training order
    res = invoke("compare", out, "--out", tmp_path / "cmp")
    assert res.exit_code == 0, res.output
    layers = pd.read_csv(tmp_path / "cmp" / "compare_layers.csv")
    assert list(dict.fromkeys(layers["run"])) == ["Pre-LN", "LNS"]


@pytest.mark.parametrize("args,fragment", [
    (["--norms", "pre-ln,foo"], "unknown norm 'foo'"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--init", "xavier"], "--init must be default or scaled"),
    (["--hidden", "30"], "multiple of --heads"),
    (["--eval-tokens", "8"], "less than one sequence"),
    (["--text-file", "/no/such/file.txt"], "no such text file"),
])
def test_cli_reproduce_errors(args, fragment, tmp_path):
    options = {"--layers": 2, "--hidden": 32, "--heads": 4, "--seq-len": 32, "--out": tmp_path}
    options.update(zip(args[::2], args[1::2], strict=True))  # an option given once: the case's value
    assert_one_line_error(invoke("reproduce", *[x for pair in options.items() for x in pair]), fragment)


def test_cli_reproduce_text_too_short(tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("A short text.\n" * 20)
    assert_one_line_error(invoke("reproduce", "--text-file", short, "--layers", 2, "--hidden", 32, "--vocab", 300,
                                 "--seq-len", 256, "--eval-tokens", 256, "--out", tmp_path / "o"),
                          "too few for --seq-len 256")
    short.write_text("A short text.\n" * 3)
    assert_one_line_error(invoke("reproduce", "--text-file", short, *CLI_TINY, "--out", tmp_path / "o"),
                          "too short to split")
