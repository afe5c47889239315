"""`compare`: result folders read back, layers aligned by relative depth, files written."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from lnsdiag.errors import UserError
from lnsdiag.runners.compare import CompareConfig, compare_folders, load_run, resample, run
from tests.test_cli_basic import assert_one_line_error, invoke


def test_resample_by_overlap():
    assert resample([1.0, 2.0, 3.0, 4.0], 4) == [1.0, 2.0, 3.0, 4.0]
    assert resample([1.0, 3.0, 5.0, 7.0, 2.0, 4.0, 6.0, 8.0], 4) == [2.0, 6.0, 3.0, 7.0]
    assert resample([1.0, 5.0], 4) == [1.0, 1.0, 5.0, 5.0]
    # 3 layers onto 2 slices: slice 0 = 2/3 of layer 0's slot and 1/3 of layer 1's (by overlap)
    assert resample([3.0, 6.0, 9.0], 2) == pytest.approx([(2 * 3 + 6) / 3, (6 + 2 * 9) / 3])
    assert resample([1.0, float("nan"), 3.0, 5.0], 2) == [1.0, 4.0]


def _angular(folder, values, name, command="angular"):
    folder.mkdir(parents=True)
    pd.DataFrame({"layer": range(len(values)), "angular_distance": values, "block_influence": values,
                  "near_identity": [v < 0.2 for v in values]}).to_csv(folder / "angular.csv", index=False)
    (folder / "meta.json").write_text(json.dumps({"command": command, "model": {"name": name},
                                                  "num_layers": len(values)}))


def _variance(folder, variances, ratios):
    pd.DataFrame({"layer": range(len(variances)), "variance": variances, "rms": [v ** 0.5 for v in variances],
                  "update_ratio": [*ratios, None]}).to_csv(folder / "variance.csv", index=False)


def _prune(folder, name, values, baseline):
    folder.mkdir(parents=True)
    rows = [{"variant": "none", "removed_layer": None, "task": "arc_easy", "metric": "acc", "value": baseline,
             "stderr": 0.01, "baseline": baseline, "delta": 0.0, "retention": 100.0, "dead": None}]
    rows += [{"variant": f"-{i}", "removed_layer": i, "task": "arc_easy", "metric": "acc", "value": v,
              "stderr": 0.01, "baseline": baseline, "delta": v - baseline, "retention": 100 * v / baseline,
              "dead": abs(v - baseline) < 0.01} for i, v in enumerate(values)]
    frame = pd.DataFrame(rows)
    frame["removed_layer"] = frame["removed_layer"].astype("Int64")
    frame.to_csv(folder / "prune.csv", index=False)
    (folder / "meta.json").write_text(json.dumps({"command": "prune", "model": {"name": name},
                                                  "num_layers": len(values)}))


@pytest.fixture()
def runs(tmp_path):
    """Model A: 4 layers (angular + variance). Model B: 8 layers (angular in one folder, prune in another)."""
    a = tmp_path / "results" / "org--A" / "angular"
    _angular(a, [0.4, 0.3, 0.2, 0.1], "org/A")
    _variance(a, [1.0, 2.0, 4.0, 8.0, 16.0], [0.5, 0.4, 0.3, 0.2])
    b = tmp_path / "results" / "B"
    _angular(b / "angular", [0.8, 0.6, 0.6, 0.4, 0.4, 0.2, 0.2, 0.0], "B")
    _prune(b / "prune", "B", [0.5, 0.6, 0.7, 0.75, 0.79, 0.8, 0.8, 0.8], 0.8)
    return a, b


def test_load_and_align(runs):
    a, b = runs
    run_a = load_run(a)
    assert run_a.label == "org/A" and run_a.num_layers == 4
    assert run_a.metrics == ["angular_distance", "variance", "update_ratio"]
    assert run_a.series("variance")["value"].tolist() == [1.0, 2.0, 4.0, 8.0]  # final-output row left out
    run_b = load_run(b)  # a model's results folder: angular/ and prune/ together
    assert run_b.num_layers == 8 and "arc_easy/acc retention %" in run_b.metrics
    comparison = compare_folders([a, b])
    table = comparison.table
    assert comparison.bins == 4 and list(table["depth_to"]) == [0.25, 0.5, 0.75, 1.0]
    assert table["angular_distance | org/A"].tolist() == pytest.approx([0.4, 0.3, 0.2, 0.1])
    assert table["angular_distance | B"].tolist() == pytest.approx([0.7, 0.5, 0.3, 0.1])
    assert table["arc_easy/acc retention % | B"].tolist() == pytest.approx(
        [100 * (0.5 + 0.6) / 2 / 0.8, 100 * (0.7 + 0.75) / 2 / 0.8, 100 * (0.79 + 0.8) / 2 / 0.8, 100.0])
    assert "variance | B" not in table.columns
    finer = compare_folders([a, b], labels=["small", "big"], bins=8)
    assert finer.table["angular_distance | small"].tolist() == pytest.approx([0.4, 0.4, 0.3, 0.3, 0.2, 0.2,
                                                                              0.1, 0.1])


def test_same_label_twice_is_disambiguated(runs):
    a, _ = runs
    comparison = compare_folders([a, a])
    assert [r.label for r in comparison.runs] == ["org/A", "org/A (2)"]


def test_run_records_the_runs(runs):
    a, b = runs
    result = run(CompareConfig((a, b), ("x", "y")))
    assert result.slug == "x-vs-y" and result.comparison.bins == 4
    assert [r["label"] for r in result.meta["runs"]] == ["x", "y"] and "load" in result.meta["timings"]
    with pytest.raises(UserError, match="no result folders given"):
        CompareConfig(())


def test_cli_writes_table_plots_and_latex(runs, tmp_path):
    a, b = runs
    out = tmp_path / "cmp"
    res = invoke("compare", a, b, "--label", "Llama", "--label", "BERT", "--out", out)
    assert res.exit_code == 0, res.output
    assert "angular_distance" in res.output and "rel. depth" in res.output and "Llama" in res.output
    table = pd.read_csv(out / "compare.csv")
    assert {"angular_distance | Llama", "angular_distance | BERT"} <= set(table.columns)
    long = pd.read_csv(out / "compare_layers.csv")
    assert set(long["run"]) == {"Llama", "BERT"} and long["rel_depth"].between(0, 1).all()
    for stem in ("compare_angular_distance", "compare_variance", "compare_arc_easy_acc_retention_pct"):
        for ext in ("png", "pdf"):
            assert (out / f"{stem}.{ext}").stat().st_size > 1000
    tex = (out / "compare.tex").read_text()
    assert tex.count("\\begin{tabular}") == 4 and "Llama & BERT" in tex and "retention \\%" in tex
    meta = json.loads((out / "meta.json").read_text())
    assert [r["label"] for r in meta["runs"]] == ["Llama", "BERT"] and meta["bins"] == 4


def test_errors(runs, tmp_path):
    a, _ = runs
    with pytest.raises(UserError, match="no such result folder"):
        load_run(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match=r"holds no angular\.csv"):
        load_run(empty)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "angular.csv").write_text("layer,cosine\n0,0.5\n")
    with pytest.raises(UserError, match="lacks columns angular_distance"):
        load_run(broken)
    assert_one_line_error(invoke("compare", a, "--label", "x", "--label", "y", "--out", tmp_path / "o"),
                          "2 --label given for 1 folders")
    assert_one_line_error(invoke("compare", "--out", tmp_path / "o"), "no result folders given")
    assert_one_line_error(invoke("compare", a, "--bins", 0, "--out", tmp_path / "o"), "--bins must be at least 1")
    assert_one_line_error(invoke("compare", tmp_path / "missing", "--out", tmp_path / "o"), "no such result folder")
