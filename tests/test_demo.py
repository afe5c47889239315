"""`lnsdiag demo` end to end (tiny: 2 layers, 3 steps), offline, and its cache."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from typer.testing import CliRunner

from lnsdiag.cli import app
from lnsdiag.demo_model import DemoSpec, demo_dir


@pytest.mark.slow
def test_demo_trains_caches_and_diagnoses(tmp_path):
    runner = CliRunner()
    out = tmp_path / "demo"
    args = ["demo", "--steps", "3", "--layers", "2", "--out", str(out)]
    first = runner.invoke(app, args, catch_exceptions=False)
    assert first.exit_code == 0, first.output
    cached = demo_dir(DemoSpec(steps=3, layers=2))
    assert (cached / "config.json").is_file() and (cached / "train_log.json").is_file()
    stamp = (cached / "model.safetensors").stat().st_mtime_ns
    for part in ("Angular distance per layer", "Removing one layer of", "Pre-LN vs LNS"):
        assert part in first.output
    angular = pd.read_csv(out / "angular" / "angular.csv")
    assert list(angular["layer"]) == [0, 1]
    prune = pd.read_csv(out / "prune" / "prune.csv")
    assert set(prune["task"]) == {"ppl"} and sorted(prune["removed_layer"].dropna().unique()) == [0, 1]
    twins = pd.read_csv(out / "twins" / "reproduce.csv")
    assert len(twins) == 2
    meta = json.loads((out / "prune" / "meta.json").read_text())
    assert meta["engine"] == "fast" and meta["ppl_text"] == "stdlib-docstrings[test]"

    second = runner.invoke(app, args, catch_exceptions=False)  # cached: no retraining
    assert second.exit_code == 0, second.output
    assert (cached / "model.safetensors").stat().st_mtime_ns == stamp
