"""Residual variance per layer checked against a brute-force computation, and `lnsdiag variance`."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from lnsdiag.errors import UserError
from lnsdiag.interventions import lns
from lnsdiag.measure.variance import VarianceConfig, residual_variance
from lnsdiag.model.structure import find_layers
from tests.conftest import SAMPLE_TEXT
from tests.families import padded_batch, tiny_model
from tests.test_cli_basic import assert_one_line_error, invoke


def _states(model, ids, mask):
    """x_0..x_L the slow way: hidden_states for block inputs, a hook for the last block's output."""
    stack = find_layers(model)
    seen = {}
    handle = stack.layers[-1].register_forward_hook(lambda _m, _a, out: seen.update(last=out))
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    handle.remove()
    last = seen["last"][0] if isinstance(seen["last"], tuple) else seen["last"]
    return [*out.hidden_states[: len(stack)], last]


def _select(state, mask, tokens):
    if tokens == "all":
        return state[mask.bool()]
    return state[torch.arange(state.shape[0]), mask.sum(1) - 1]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("tokens", ["all", "last"])
def test_matches_brute_force(family, tokens):
    model = tiny_model(family)
    ids, mask = padded_batch(lengths=(12, 5, 9))
    # two batches, so the running (Chan) combination of moments is exercised too
    result = residual_variance(model, [(ids[:2], mask[:2]), (ids[2:], mask[2:])], tokens=tokens)
    states = [_select(s, mask, tokens).double() for s in _states(model, ids, mask)]
    L = len(states) - 1
    frame = result.layers
    assert list(frame["layer"]) == list(range(L + 1))
    assert result.tokens == (int(mask.sum()) if tokens == "all" else 3)
    for i, x in enumerate(states):
        assert frame.at[i, "variance"] == pytest.approx(float(x.var(unbiased=False)), rel=1e-6)
        assert frame.at[i, "rms"] == pytest.approx(float(x.pow(2).mean().sqrt()), rel=1e-6)
        if i < L:
            ratio = ((states[i + 1] - x).norm(dim=-1) / x.norm(dim=-1)).mean()
            assert frame.at[i, "update_ratio"] == pytest.approx(float(ratio), rel=1e-5)
    assert pd.isna(frame.at[L, "update_ratio"])
    assert result.growth == pytest.approx(frame.at[L, "variance"] / frame.at[0, "variance"])


def test_padding_side_and_batching_do_not_matter():
    model = tiny_model("qwen2")
    ids, mask = padded_batch(lengths=(12, 5, 9))
    together = residual_variance(model, [(ids, mask)])
    apart = residual_variance(model, [(ids[i:i + 1, : int(mask[i].sum())], mask[i:i + 1, : int(mask[i].sum())])
                                      for i in range(3)])
    for col in ("variance", "rms", "update_ratio"):
        assert together.layers[col].tolist() == pytest.approx(apart.layers[col].tolist(), rel=1e-6, nan_ok=True)


def test_lns_shrinks_updates_from_the_second_layer_on():
    """Layer 1 sees the same input in both models (layer 0's scale is 1); with LNS its norms'
    outputs are ×1/√2, so its update is smaller, and the stream ends up smaller."""
    plain = tiny_model("llama")
    scaled = lns.apply_lns(tiny_model("llama"))
    ids, mask = padded_batch()
    pre, post = residual_variance(plain, [(ids, mask)]).layers, residual_variance(scaled, [(ids, mask)]).layers
    assert post.at[0, "update_ratio"] == pytest.approx(pre.at[0, "update_ratio"], rel=1e-6)
    assert post.at[1, "variance"] == pytest.approx(pre.at[1, "variance"], rel=1e-6)
    assert post.at[1, "update_ratio"] < 0.9 * pre.at[1, "update_ratio"]
    assert post["variance"].iloc[-1] < pre["variance"].iloc[-1]


def test_bad_arguments():
    model = tiny_model("llama")
    ids, mask = padded_batch()
    with pytest.raises(UserError, match="--tokens"):
        residual_variance(model, [(ids, mask)], tokens="first")
    with pytest.raises(UserError, match="no tokens"):
        residual_variance(model, [])


@pytest.mark.parametrize("settings,fragment", [
    ({"tokens": "first"}, "--tokens must be all or last"),
    ({"seq_len": 0}, "--seq-len must be at least 2"),
    ({"max_tokens": -1}, "--max-tokens must be at least 1"),
    ({"batch_size": 0}, "--batch-size must be at least 1"),
])
def test_config_rejects_bad_settings(settings, fragment):
    with pytest.raises(UserError, match=fragment):
        VarianceConfig(**settings)


def test_run_measures_and_records(tokenizer):
    from lnsdiag.data.text import TextSource
    from lnsdiag.measure import variance
    from lnsdiag.model.load import LoadedModel

    loaded = LoadedModel.wrap(lns.apply_lns(tiny_model("llama", vocab_size=len(tokenizer))), tokenizer, "tiny-lns")
    config = VarianceConfig(seq_len=64, max_tokens=256, batch_size=3, tokens="last")
    run = variance.run(loaded, TextSource("sample", [SAMPLE_TEXT * 5]), config)
    assert run.result.tokens == 4 and run.placement == "pre-LN+LNS" and run.model_name == "tiny-lns"
    assert run.meta["command"] == "variance" and run.meta["tokens_used"] == 4
    assert run.meta["settings"] == {"seq_len": 64, "max_tokens": 256, "batch_size": 3, "tokens": "last"}


def test_cli_writes_everything(tiny_llama_dir, text_file, tmp_path):
    out = tmp_path / "var"
    res = invoke("variance", tiny_llama_dir, "--text-file", text_file, "--out", out, "--max-tokens", 600,
                 "--seq-len", 64, "--batch-size", 3)
    assert res.exit_code == 0, res.output
    assert "Variance grows" in res.output and "pre-LN" in res.output
    frame = pd.read_csv(out / "variance.csv")
    assert list(frame.columns) == ["layer", "unit", "variance", "rms", "update_ratio"]
    assert set(frame["unit"]) == {"block"}
    assert list(frame["layer"]) == [0, 1, 2, 3, 4]
    assert (frame["variance"] > 0).all() and frame["update_ratio"].iloc[:4].notna().all()
    for name in ("variance.png", "variance.pdf"):
        assert (out / name).stat().st_size > 1000
    meta = json.loads((out / "meta.json").read_text())
    assert meta["command"] == "variance" and meta["norm_placement"] == "pre-LN"
    assert meta["tokens_used"] == 600 and meta["num_layers"] == 4
    assert "measure" in meta["timings"] and meta["versions"]["torch"]


def test_cli_sees_an_lns_checkpoint_as_such(tiny_llama_dir, text_file, tmp_path, tokenizer):
    from lnsdiag.model.load import load_model

    loaded = load_model(str(tiny_llama_dir), device="cpu")
    lns.apply_lns(loaded.model)
    ckpt = tmp_path / "lns-ckpt"
    loaded.model.save_pretrained(ckpt)
    tokenizer.save_pretrained(ckpt)
    res = invoke("variance", ckpt, "--text-file", text_file, "--out", tmp_path / "o", "--max-tokens", 256,
                 "--seq-len", 64)
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "o" / "meta.json").read_text())["norm_placement"] == "pre-LN+LNS"
    plain = pd.read_csv(tmp_path / "o" / "variance.csv")
    res = invoke("variance", tiny_llama_dir, "--text-file", text_file, "--out", tmp_path / "p", "--max-tokens", 256,
                 "--seq-len", 64)
    assert res.exit_code == 0, res.output
    assert not plain.equals(pd.read_csv(tmp_path / "p" / "variance.csv"))  # the hooks ran


def test_cli_errors(tiny_llama_dir, text_file, tmp_path):
    assert_one_line_error(invoke("variance", "--out", tmp_path), "no model given")
    assert_one_line_error(invoke("variance", tiny_llama_dir, "--text-file", text_file, "--tokens", "first",
                                 "--out", tmp_path), "--tokens")
    assert_one_line_error(invoke("variance", tiny_llama_dir, "--text-file", tmp_path / "none.txt",
                                 "--out", tmp_path), "no such text file")
