"""Sub-layer measurements (``--unit attn,mlp``) checked against an independent computation: x and x_{l+1}
caught at the block, h = x + a as the block's output with its MLP removed; padding, batching, the model
left intact, Post-LN refused, the CLI's unit column and its refusals."""

from __future__ import annotations

import contextlib
import json
import math

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from lnsdiag import report
from lnsdiag.errors import UserError
from lnsdiag.interventions.postln import apply_post_ln
from lnsdiag.interventions.removal import removed_layers
from lnsdiag.interventions.units import KIND_NAMES, Removal
from lnsdiag.measure.angular import AngularConfig, AngularResult, angular_distances
from lnsdiag.measure.sublayers import measure_batch
from lnsdiag.measure.variance import VarianceConfig, residual_variance
from lnsdiag.model.families import SUBLAYER_OUTPUTS
from lnsdiag.model.structure import find_layers
from tests.families import padded_batch, tiny_model
from tests.test_cli_basic import assert_one_line_error, invoke
from tests.test_report import render

#: The families checked: sequential (Llama), sandwich norms (Gemma 2), parallel attention and MLP
#: (GPT-NeoX), a mixture of experts (Mixtral); GPT-NeoX made sequential too.
CASES = {"llama": {}, "gemma2": {}, "gpt_neox": {}, "mixtral": {},
         "gpt_neox-sequential": {"use_parallel_residual": False}}


def _model(case: str) -> torch.nn.Module:
    return tiny_model(case.split("-")[0], **CASES[case])


def _block_io(model, layer, ids, mask, removal=None):
    """Block ``layer``'s input and output (whole batch), with ``removal`` applied if given."""
    block = find_layers(model).layers[layer]
    seen = {}

    def grab(_m, args, kwargs, out):
        seen["x"] = args[0] if args else kwargs["hidden_states"]
        seen["out"] = out[0] if isinstance(out, tuple) else out

    handle = block.register_forward_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad(), (removed_layers(model, removal) if removal else contextlib.nullcontext()):
            model(input_ids=ids, attention_mask=mask, use_cache=False)
    finally:
        handle.remove()
    return seen["x"], seen["out"]


def _select(state, mask, tokens):
    if tokens == "all":
        return state[mask.bool()]
    last = mask.shape[1] - 1 - mask.flip(1).argmax(1)  # each row's last real token, left or right padding
    return state[torch.arange(state.shape[0]), last]


def _expected(model, ids, mask, tokens="all") -> pd.DataFrame:
    """Each block's attention step x → h and MLP step h → x_{l+1}, h the block's output without its MLP."""
    rows = []
    for layer in range(len(find_layers(model))):
        x, out = _block_io(model, layer, ids, mask)
        _, h = _block_io(model, layer, ids, mask, Removal.parse(f"{layer}.mlp"))
        x, h, out = (_select(t, mask, tokens).double() for t in (x, h, out))
        for unit, (start, end) in {"attn": (x, h), "mlp": (h, out)}.items():
            cos = F.cosine_similarity(start, end, dim=-1).clamp(-1, 1)
            rows.append({"layer": layer, "unit": unit,
                         "angular_distance": float((torch.arccos(cos) / math.pi).mean()),
                         "block_influence": float(1 - cos.mean()),
                         "update_ratio": float(((end - start).norm(dim=-1) / start.norm(dim=-1)).mean()),
                         "variance": float(start.var(unbiased=False)),
                         "rms": float(start.pow(2).mean().sqrt())})
    return pd.DataFrame(rows)


def _close(got: pd.Series, want: pd.Series) -> None:
    assert got.tolist() == pytest.approx(want.tolist(), rel=1e-5, abs=1e-9)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("tokens,side", [("all", "right"), ("last", "left")])
def test_matches_an_independent_computation(case, tokens, side):
    model = _model(case)
    ids, mask = padded_batch(lengths=(12, 5, 9), side=side)
    want = _expected(model, ids, mask, tokens)
    angular = angular_distances(model, [(ids, mask)], tokens=tokens, units="attn,mlp")
    variance = residual_variance(model, [(ids[:2], mask[:2]), (ids[2:], mask[2:])], tokens=tokens, units="attn,mlp")
    got = angular.units_frame()
    assert got[["layer", "unit"]].values.tolist() == want[["layer", "unit"]].values.tolist()
    for column in ("angular_distance", "block_influence"):
        _close(got[column], want[column])
    rows = variance.tidy()
    assert rows[["layer", "unit"]].values.tolist() == want[["layer", "unit"]].values.tolist()
    for column in ("update_ratio", "variance", "rms"):
        _close(rows[column], want[column])


def test_block_results_are_the_same_with_sublayers_measured():
    model = tiny_model("gemma2")
    ids, mask = padded_batch(lengths=(12, 5, 9))
    alone = angular_distances(model, [(ids, mask)], max_block=2)
    beside = angular_distances(model, [(ids, mask)], max_block=2, units="mlp,block,attn")
    pd.testing.assert_frame_equal(alone.layers, beside.layers, check_exact=True)
    pd.testing.assert_frame_equal(alone.blocks, beside.blocks, check_exact=True)
    plain, both = residual_variance(model, [(ids, mask)]), residual_variance(model, [(ids, mask)], units="block,mlp")
    pd.testing.assert_frame_equal(plain.layers, both.layers, check_exact=True)
    assert beside.units == ("block", "attn", "mlp") and alone.units == ("block",) and alone.sublayers.empty
    frame = beside.units_frame()
    assert list(frame.columns) == ["layer", "unit", "angular_distance", "block_influence"]
    assert frame["unit"].tolist() == ["block", "attn", "mlp"] * 4
    assert frame["layer"].tolist() == sorted([0, 1, 2, 3] * 3)
    blocks = frame[frame["unit"] == "block"].reset_index(drop=True)
    assert blocks["angular_distance"].tolist() == alone.layers["angular_distance"].tolist()
    assert [str(KIND_NAMES[u](int(b))) for b, u in frame[["layer", "unit"]].values][:3] == ["0", "0.attn", "0.mlp"]


def test_only_the_asked_kinds_have_rows_and_the_blocks_are_still_there():
    model = tiny_model("llama")
    ids, mask = padded_batch()
    result = angular_distances(model, [(ids, mask)], units="mlp")
    assert result.units_frame()["unit"].unique().tolist() == ["mlp"] and len(result.units_frame()) == 4
    assert len(result.layers) == 4 and "unit" not in result.layers.columns  # what prune and shrink read
    assert result.csv_frame()["unit"].unique().tolist() == ["mlp"]
    blocks = angular_distances(model, [(ids, mask)]).csv_frame()  # a block-only CSV: its unit column says block
    assert set(blocks["unit"]) == {"block"} and list(blocks.columns[:2]) == ["layer", "unit"]


@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_and_batching_do_not_change_the_result(side):
    model = tiny_model("mixtral")
    ids, mask = padded_batch(lengths=(12, 5, 9), side=side)
    unpadded = [(ids[i:i + 1][mask[i:i + 1].bool()].view(1, -1), torch.ones(1, int(mask[i].sum()), dtype=torch.long))
                for i in range(3)]
    together = angular_distances(model, [(ids, mask)], units="attn,mlp")
    apart = angular_distances(model, unpadded, units="attn,mlp")
    for col in ("angular_distance", "block_influence"):
        _close(together.sublayers[col], apart.sublayers[col])
    together, apart = residual_variance(model, [(ids, mask)], units="attn,mlp"), residual_variance(model, unpadded,
                                                                                                   units="attn,mlp")
    for col in ("update_ratio", "variance", "rms"):
        _close(together.sublayers[col], apart.sublayers[col])


def _hooks(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_the_model_is_intact_afterwards_even_when_the_measurement_fails():
    model = tiny_model("gemma2")
    ids, mask = padded_batch()
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
    hooks = _hooks(model)
    angular_distances(model, [(ids, mask)], units="block,attn,mlp")
    residual_variance(model, [(ids, mask)], units="attn,mlp")
    assert _hooks(model) == hooks

    def fail(index, _state):
        if index == 2:
            raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        measure_batch(model, find_layers(model), ids, mask, fail, "all", ("attn", "mlp"))
    assert _hooks(model) == hooks
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, before)


def test_post_ln_is_refused_in_one_line():
    model = tiny_model("bert")
    ids, mask = padded_batch()
    with pytest.raises(UserError, match=r"BertLayer blocks are Post-LN .*measure --unit block$") as caught:
        angular_distances(model, [(ids, mask)], units="attn")
    assert "\n" not in str(caught.value)
    with pytest.raises(UserError, match="Post-LN"):
        residual_variance(model, [(ids, mask)], units="mlp")
    assert angular_distances(model, [(ids, mask)]).num_layers == 4  # the blocks are measured as ever
    twin = apply_post_ln(tiny_model("llama"))  # a Post-LN twin of a Pre-LN family
    with pytest.raises(UserError, match="LlamaDecoderLayer blocks are Post-LN"):
        angular_distances(twin, [(ids, mask)], units="attn,mlp")


def test_a_block_its_updates_do_not_add_up_to_is_refused(monkeypatch):
    """A site that is not the sub-layer's update (here the query projection): refused, not measured wrong."""
    monkeypatch.setitem(SUBLAYER_OUTPUTS, "LlamaDecoderLayer", {"attn": "self_attn.q_proj"})
    model = tiny_model("llama")
    with pytest.raises(UserError, match="block 0's output is not its input plus its attention and MLP updates"):
        angular_distances(model, [padded_batch()], units="attn")


def test_configs_take_and_check_units():
    assert AngularConfig(units="mlp, attn").units == ("attn", "mlp")
    assert VarianceConfig(units=["block", "mlp"]).units == ("block", "mlp")
    assert AngularConfig().units == VarianceConfig().units == ("block",)
    with pytest.raises(UserError, match="did you mean attn"):
        AngularConfig(units="attention")
    with pytest.raises(UserError, match="no unit kind"):
        VarianceConfig(units="")


def test_reports_show_the_units_side_by_side():
    model = tiny_model("llama")
    ids, mask = padded_batch()
    result = angular_distances(model, [(ids, mask)], units="block,attn,mlp")
    text = render(report.angular_table(result), 100)
    assert max(len(line) for line in text.splitlines()) <= 100
    assert all(f"{unit} d" in text and f"{unit} BI" in text for unit in ("block", "attn", "mlp"))
    summary = report.angular_summary(result)
    attn = result.sublayers[result.sublayers["unit"] == "attn"]
    best = int(attn.loc[attn["angular_distance"].idxmin(), "layer"])
    assert f"most identity-like attention is {best}.attn" in summary and "most identity-like MLP is" in summary
    assert len(report.angular_figure(result).axes[0].get_legend().get_texts()) == 5  # 3 kinds, hollow, threshold
    variance = residual_variance(model, [(ids, mask)], units="attn,mlp")
    summary = report.variance_summary(variance)
    assert "Attention updates (‖a‖/‖x‖)" in summary and "MLP updates (‖m‖/‖h‖)" in summary
    assert "The deepest half of the layers" not in summary  # the blocks were not asked
    assert len(report.variance_figure(variance).axes[1].get_lines()) == 2


def test_a_result_built_without_units_reads_as_blocks():
    plain = angular_distances(tiny_model("llama"), [padded_batch()])
    built = AngularResult(plain.layers, plain.blocks, plain.tokens, plain.token_mode, plain.threshold)
    assert built.units_frame()["unit"].unique().tolist() == ["block"] and built.sublayers.empty


def test_cli_writes_the_unit_column(tiny_llama_dir, text_file, tmp_path):
    common = ("--text-file", text_file, "--max-tokens", 256, "--seq-len", 64)
    res = invoke("angular", tiny_llama_dir, *common, "--unit", "block,attn,mlp", "--out", tmp_path / "a")
    assert res.exit_code == 0, res.output
    said = " ".join(res.output.split())
    assert "most identity-like attention is" in said and "most identity-like MLP is" in said
    frame = pd.read_csv(tmp_path / "a" / "angular.csv")
    assert list(frame.columns[:2]) == ["layer", "unit"] and frame["unit"].tolist() == ["block", "attn", "mlp"] * 4
    assert json.loads((tmp_path / "a" / "meta.json").read_text())["settings"]["units"] == ["block", "attn", "mlp"]
    res = invoke("variance", tiny_llama_dir, *common, "--unit", "mlp", "--out", tmp_path / "v")
    assert res.exit_code == 0, res.output
    frame = pd.read_csv(tmp_path / "v" / "variance.csv")
    assert list(frame.columns) == ["layer", "unit", "variance", "rms", "update_ratio"]
    assert frame["unit"].tolist() == ["mlp"] * 4 and frame["layer"].tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("command", ["angular", "variance"])
def test_cli_refuses_an_unknown_unit(command, tiny_llama_dir, text_file, tmp_path):
    out = tmp_path / "results" / "run"
    res = invoke(command, tiny_llama_dir, "--text-file", text_file, "--unit", "attention", "--out", out)
    assert_one_line_error(res, "--unit 'attention' is no unit kind: did you mean attn?")
    assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1
    assert not (tmp_path / "results").exists()
