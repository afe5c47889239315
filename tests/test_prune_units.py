"""`prune --unit`: blocks, attention and MLP sub-layers swept in one run, side by side in every output."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch

from lnsdiag.checkpoint.reference import build_without_units
from lnsdiag.data.windows import TokenWindows
from lnsdiag.interventions.units import Removal
from lnsdiag.model.load import load_model
from lnsdiag.report.prune import prune_summary, prune_table
from tests.test_cli_basic import invoke


@pytest.fixture(scope="module")
def swept(tiny_llama_dir, tmp_path_factory):
    text = tmp_path_factory.mktemp("text") / "sample.txt"
    from tests.conftest import SAMPLE_TEXT

    text.write_text(SAMPLE_TEXT * 20, encoding="utf-8")
    out = tmp_path_factory.mktemp("prune-units")
    args = ("prune", tiny_llama_dir, "--ppl-text", text, "--seq-len", 64, "--ppl-max-tokens", 512, "--layers", "1-2",
            "--out", out)
    result = invoke(*args, "--unit", "mlp,block,attn")
    assert result.exit_code == 0, result.output
    return out, text, args, result.output


def test_every_unit_kind_gets_its_rows(swept):
    out, _, _, output = swept
    frame = pd.read_csv(out / "prune.csv")
    ppl = frame[frame["metric"] == "ppl"]
    assert list(ppl["variant"]) == ["baseline", "layer_001", "layer_001attn", "layer_001mlp", "layer_002",
                                    "layer_002attn", "layer_002mlp"]
    assert list(ppl["unit"].fillna("")) == ["", "block", "attn", "mlp", "block", "attn", "mlp"]
    assert list(ppl["removed_layer"].fillna(-1).astype(int)) == [-1, 1, 1, 1, 2, 2, 2]
    assert ppl["angular_distance"].iloc[1:].notna().all()  # each unit's own step: block, attention, MLP
    angular = pd.read_csv(out / "angular.csv")
    for _, r in ppl.iloc[1:].iterrows():
        row = angular[(angular["layer"] == r["removed_layer"]) & (angular["unit"] == r["unit"])]
        assert row["angular_distance"].iloc[0] == pytest.approx(r["angular_distance"], rel=1e-12)
    wide = pd.read_csv(out / "prune_wide.csv")
    assert list(wide["unit"].fillna("")) == ["", "block", "attn", "mlp", "block", "attn", "mlp"]
    assert json.loads((out / "meta.json").read_text())["units"] == ["block", "attn", "mlp"]
    assert "side by side" in output and "attention sub-layers" in output and "MLP sub-layers" in output
    assert "1.attn" in (out / "prune.tex").read_text() and (out / "prune.png").exists()


def test_sublayer_perplexity_is_the_zeroed_models(swept, tiny_llama_dir):
    """The CLI's perplexity of ``2.attn`` removed = the model with that attention's o_proj zeroed, computed
    directly (no engine)."""
    out, text, _, _ = swept
    frame = pd.read_csv(out / "prune.csv")
    loaded = load_model(str(tiny_llama_dir), dtype="float32", device="cpu")
    windows = TokenWindows.of(loaded.tokenizer, [text.read_text()], seq_len=64, max_tokens=512)
    for variant, spec in (("layer_002attn", "2.attn"), ("layer_001mlp", "1.mlp")):
        reference = build_without_units(loaded.model, Removal.parse(spec))
        nll, count = 0.0, 0
        for w in windows.windows:  # brute force, one window at a time
            with torch.no_grad():
                logits = reference(w[None]).logits[0, :-1].double()
            nll += float(torch.nn.functional.cross_entropy(logits, w[1:], reduction="sum"))
            count += len(w) - 1
        got = float(frame.loc[(frame["variant"] == variant) & (frame["metric"] == "ppl"), "value"].iloc[0])
        assert got == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_a_block_sweep_in_the_same_folder_reuses_the_stored_variants(swept):
    out, _, args, _ = swept
    result = invoke(*args, "--unit", "block")
    assert result.exit_code == 0 and "already in" in result.output
    frame = pd.read_csv(out / "prune.csv")
    assert set(frame["unit"].dropna()) == {"block"} and "side by side" not in result.output


def test_tables_and_summary_name_each_kind():
    rows = []
    for name, layer, unit, verdict in (("baseline", None, None, None), ("layer_000", 0, "block", "hurts"),
                                       ("layer_000attn", 0, "attn", "dead"), ("layer_000mlp", 0, "mlp", "hurts"),
                                       ("layer_001", 1, "block", "dead"), ("layer_001attn", 1, "attn", "dead"),
                                       ("layer_001mlp", 1, "mlp", "inconclusive")):
        rows.append({"variant": name, "removed_layer": layer, "unit": unit, "task": "ppl", "metric": "ppl",
                     "value": 10.0, "stderr": 0.1, "baseline": 10.0, "delta": 0.0,
                     "delta_stderr": 0.01, "verdict": verdict, "retention": 100.0, "angular_distance": 0.1,
                     "documents_needed": None})
    frame = pd.DataFrame(rows)
    frame["removed_layer"] = frame["removed_layer"].astype("Int64")
    summary = prune_summary(frame, ["ppl"])
    assert summary[0].startswith("ppl (ppl), 2 removed layers: 1 dead, 1 hurts") and "dead weight: 1" in summary[0]
    assert "2 removed attention sub-layers: 2 dead" in summary[1] and "dead attention: 0, 1" in summary[1]
    assert "2 removed MLP sub-layers: 0 dead, 1 hurts" in summary[2]
    tables = prune_table(frame, ["ppl"])
    titles = [spec.title for spec in tables.specs]
    assert any("side by side" in t for t in titles)
    first = tables.specs[0]
    assert first.key[0].cells == ["baseline", "0", "0.attn", "0.mlp", "1", "1.attn", "1.mlp"]


def test_a_post_ln_model_sweeps_sublayers_without_their_angles(tokenizer, tmp_path):
    """A Post-LN block's attention and MLP are removed exactly (their update zeroed, the norm after the add
    kept), but their updates are no steps of a residual stream: prune leaves their angle empty, the
    blocks' measured."""
    from lnsdiag.interventions.postln import apply_post_ln
    from lnsdiag.model.load import LoadedModel
    from lnsdiag.runners.prune import PruneConfig, run
    from tests.conftest import SAMPLE_TEXT
    from tests.families import tiny_model

    model = apply_post_ln(tiny_model("llama", vocab_size=len(tokenizer)))
    text = tmp_path / "t.txt"
    text.write_text(SAMPLE_TEXT * 4, encoding="utf-8")
    config = PruneConfig(ppl_text=str(text), seq_len=48, ppl_max_tokens=400, layers="1-2", units="block,attn")
    result = run(LoadedModel.wrap(model, tokenizer, name="post-ln"), config, tmp_path / "out")
    ppl = result.frame[(result.frame["metric"] == "ppl") & result.frame["removed_layer"].notna()]
    assert ppl.loc[ppl["unit"] == "block", "angular_distance"].notna().all()
    assert ppl.loc[ppl["unit"] == "attn", "angular_distance"].isna().all()
    from lnsdiag.scoring.perplexity import perplexity

    windows = TokenWindows.of(tokenizer, [text.read_text()], seq_len=48, max_tokens=400)
    want = perplexity(build_without_units(model, Removal.parse("2.attn")), windows)
    got = ppl.loc[ppl["variant"] == "layer_002attn", "value"].iloc[0]
    assert got == pytest.approx(math.exp(want.mean_nll), rel=1e-5)
