"""`lnsdiag demo` end to end, offline: the shipped models (checked, never retrained), and a tiny trained one."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from lnsdiag.cli import app
from lnsdiag.demo import model as demo_model
from lnsdiag.demo.model import SHIPPED_NORMS, DemoSpec, demo_dir, ensure_demo_model, shipped_dir, verify_shipped
from lnsdiag.errors import UserError
from lnsdiag.runners import demo

runner = CliRunner()
SHIPPED_SPECS = [DemoSpec().with_(norm=norm) for norm in SHIPPED_NORMS]


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    text = result.output.strip()
    assert "Traceback" not in text and text.count("error:") == 1 and len(text.splitlines()) == 1, text
    for fragment in fragments:
        assert fragment in text, text


@pytest.fixture()
def no_training(monkeypatch):
    """Any attempt to train a tokenizer or a model fails the test."""
    def refuse(*_args, **_kwargs):
        raise AssertionError("the demo trained instead of using the shipped weights")

    monkeypatch.setattr(demo_model, "train_causal_lm", refuse)
    monkeypatch.setattr(demo_model, "train_tokenizer", refuse)


@pytest.fixture()
def empty_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("LNSDIAG_CACHE", str(cache))
    return cache


def _copy_shipped(tmp_path, monkeypatch):
    """A private copy of the shipped weights, installed as the package's, to break at will."""
    copy = tmp_path / "shipped"
    shutil.copytree(demo_model.SHIPPED, copy)
    monkeypatch.setattr(demo_model, "SHIPPED", copy)
    return copy


@pytest.mark.parametrize("spec", SHIPPED_SPECS, ids=SHIPPED_NORMS)
def test_shipped_weights_match_their_manifest(spec):
    folder = shipped_dir(spec)
    assert folder is not None and folder.name == demo_dir(spec).name
    manifest = verify_shipped(folder)
    assert manifest["spec"] == asdict(spec) and manifest["recipe"] == demo_model.RECIPE_VERSION
    assert set(manifest["files"]) == {p.name for p in folder.iterdir()} - {demo_model.MANIFEST}
    weights = load_file(folder / demo_model.WEIGHTS)
    assert {t.dtype for t in weights.values()} == {torch.float16}
    assert sum(p.stat().st_size for p in folder.iterdir()) < 8_000_000
    record = json.loads((folder / demo_model.RECORD).read_text())
    assert record["weights"]["source"] == "trained" and len(record["train"]["losses"]) == spec.steps
    assert shipped_dir(DemoSpec(steps=3, layers=2)) is None  # other specs train


def test_shipped_weights_go_to_the_cache_without_training(empty_cache, no_training):
    for spec in SHIPPED_SPECS:
        path, record = ensure_demo_model(spec)
        assert path == demo_dir(spec) and record["weights"]["source"] == "shipped"
        cached = load_file(path / demo_model.WEIGHTS)
        shipped = load_file(shipped_dir(spec) / demo_model.WEIGHTS)
        assert cached.keys() == shipped.keys()
        for name, tensor in shipped.items():  # exactly the shipped numbers, as float32
            assert cached[name].dtype == torch.float32 and torch.equal(cached[name], tensor.float())
        stamp = (path / demo_model.WEIGHTS).stat().st_mtime_ns
        assert ensure_demo_model(spec)[1] == record  # then the cache is used as it is
        assert (path / demo_model.WEIGHTS).stat().st_mtime_ns == stamp


def test_demo_runs_on_the_shipped_weights(empty_cache, no_training, monkeypatch, tmp_path):
    monkeypatch.setattr(demo, "DEMO_TOKENS", 1024)  # the same path on fewer tokens
    out = tmp_path / "demo"
    result = invoke("demo", "--out", out)
    assert result.exit_code == 0, result.output
    assert "the weights shipped with lnsdiag (SHA-256 checked" in result.output
    for part in ("Angular distance per layer", "Removing one layer of", "Removing 1–4 layers", "Pre-LN vs LNS"):
        assert part in result.output
    for spec in SHIPPED_SPECS:
        assert json.loads((demo_dir(spec) / demo_model.RECORD).read_text())["weights"]["source"] == "shipped"
    prune = pd.read_csv(out / "prune" / "prune.csv")
    baseline = prune.loc[prune["removed_layer"].isna() & (prune["metric"] == "ppl"), "value"].iloc[0]
    twins = pd.read_csv(out / "twins" / "reproduce.csv")
    assert list(twins["norm"]) == ["pre-ln", "lns"]
    # the Pre-LN twin is the model the prune part measured, not a second measurement of it
    assert twins.loc[twins["norm"] == "pre-ln", "heldout_ppl"].iloc[0] == pytest.approx(baseline, rel=1e-12)
    meta = json.loads((out / "twins" / "meta.json").read_text())
    assert [m["weights"]["source"] for m in meta["models"]] == ["shipped", "shipped"] and "reused" in meta
    # shrink reuses the sweep: its full model and single removals are the prune part's, not rescored
    together = pd.read_csv(out / "shrink" / "shrink.csv", dtype={"removed_layers": str})
    ppl = together[together["metric"] == "ppl"]
    assert ppl.loc[ppl["strategy"] == "full", "value"].iloc[0] == baseline
    single = prune[(prune["metric"] == "ppl") & prune["removed_layer"].notna()]
    best = int(single.sort_values(["value", "removed_layer"]).iloc[0]["removed_layer"])
    sweep1 = ppl[(ppl["strategy"] == "sweep") & (ppl["n_removed"] == 1)].iloc[0]
    assert sweep1["removed_layers"] == str(best) and sweep1["value"] == single["value"].min()
    passes = json.loads((out / "shrink" / "meta.json").read_text())["passes"]
    assert passes and all(p["sets"] < 13 for p in passes)  # the 13 reused results are never in a pass


@pytest.mark.parametrize("damage", ["flip", "missing", "manifest"])
def test_damaged_shipped_weights_are_a_one_line_error(damage, empty_cache, no_training, monkeypatch, tmp_path):
    folder = _copy_shipped(tmp_path, monkeypatch) / demo_dir(DemoSpec()).name
    weights = folder / demo_model.WEIGHTS
    if damage == "flip":
        data = bytearray(weights.read_bytes())
        data[len(data) // 2] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif damage == "missing":
        weights.unlink()
    else:
        (folder / demo_model.MANIFEST).write_text("{not json")
    result = invoke("demo", "--out", tmp_path / "out")
    shown = demo_model.MANIFEST if damage == "manifest" else demo_model.WEIGHTS
    assert_one_line_error(result, shown, "lnsdiag demo --retrain")
    assert not demo_dir(DemoSpec()).exists()  # nothing half-made in the cache


def test_damaged_cached_weights_are_a_one_line_error(empty_cache, no_training, tmp_path):
    path, _ = ensure_demo_model(DemoSpec())
    with open(path / demo_model.WEIGHTS, "r+b") as fh:
        fh.seek(1000)
        fh.write(b"\x00\x01\x02\x03")
    with pytest.raises(UserError, match="does not match the SHA-256 recorded"):
        ensure_demo_model(DemoSpec())
    assert_one_line_error(invoke("demo", "--out", tmp_path / "out"), str(path / demo_model.WEIGHTS),
                          "lnsdiag demo --retrain")


def test_retrain_and_its_old_name_train_from_scratch(monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr(demo, "run", lambda config, *_a, **_k: seen.append(config.retrain))
    for flags in ([], ["--retrain"], ["--fresh"]):
        assert invoke("demo", *flags, "--out", tmp_path / "out").exit_code == 0
    assert seen == [False, True, True]
    assert "--fresh" not in invoke("demo", "--help").output  # hidden alias


@pytest.mark.slow
def test_demo_trains_caches_and_diagnoses(tmp_path, monkeypatch):
    out = tmp_path / "demo"
    args = ["demo", "--steps", "3", "--layers", "2", "--out", str(out)]
    first = runner.invoke(app, args, catch_exceptions=False)
    assert first.exit_code == 0, first.output
    cached = demo_dir(DemoSpec(steps=3, layers=2))
    assert (cached / "config.json").is_file() and (cached / "train_log.json").is_file()
    assert json.loads((cached / "train_log.json").read_text())["weights"]["source"] == "trained"
    stamp = (cached / "model.safetensors").stat().st_mtime_ns
    for part in ("Angular distance per layer", "Removing one layer of", "Pre-LN vs LNS"):
        assert part in first.output
    angular = pd.read_csv(out / "angular" / "angular.csv")
    assert list(angular["layer"]) == [0, 1]
    prune = pd.read_csv(out / "prune" / "prune.csv")
    assert set(prune["task"]) == {"ppl", "fidelity"} and sorted(prune["removed_layer"].dropna().unique()) == [0, 1]
    assert set(prune.loc[prune["task"] == "fidelity", "metric"]) == {"kl", "top1", "kl_p90", "kl_p99"}
    twins = pd.read_csv(out / "twins" / "reproduce.csv")
    assert len(twins) == 2
    meta = json.loads((out / "prune" / "meta.json").read_text())
    assert meta["engine"] == "fast" and meta["ppl_text"] == "stdlib-docstrings[test]"

    # cached: no retraining. Every part of the rerun starts fresh (as with the same token count), here on
    # fewer held-out tokens (two batches of windows): the rerun is about the cache, not the measurements
    monkeypatch.setattr(demo, "DEMO_TOKENS", 2 * demo.DEMO_BATCH * DemoSpec().seq_len)
    second = runner.invoke(app, args, catch_exceptions=False)
    assert second.exit_code == 0, second.output
    assert (cached / "model.safetensors").stat().st_mtime_ns == stamp


@pytest.mark.retrain
def test_retrained_demo_models_match_the_shipped_ones(tmp_path, capsys):
    """The shipped weights are what the recipe gives: retrain both from scratch and measure both
    (about 10 minutes on 2 cores; LNSDIAG_SLOW=1). Same as ``python -m lnsdiag.demo compare``."""
    comparison = demo.compare_with_shipped()
    (tmp_path / "comparison.json").write_text(json.dumps(comparison, indent=2, default=str))
    with capsys.disabled():
        print("\n" + "\n".join(demo.comparison_lines(comparison)))
    assert comparison["agree"], "\n".join(demo.comparison_lines(comparison))
