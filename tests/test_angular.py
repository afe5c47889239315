"""Angular distances checked against a brute-force computation from full hidden states; its config and runner."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from lnsdiag.data.text import TextSource
from lnsdiag.errors import UserError
from lnsdiag.measure import angular
from lnsdiag.measure.angular import AngularConfig, angular_distances
from lnsdiag.model.load import LoadedModel
from lnsdiag.model.structure import find_layers
from lnsdiag.progress import Progress
from tests.conftest import SAMPLE_TEXT
from tests.families import padded_batch, tiny_model


def _all_states(model, ids, mask):
    """x_0..x_L the slow way: hidden_states for block inputs, a hook for the last output."""
    stack = find_layers(model)
    seen = {}
    def grab(_m, _a, out):
        seen["last"] = out

    handle = stack.layers[-1].register_forward_hook(grab)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    handle.remove()
    states = list(out.hidden_states[: len(stack)]) + [seen["last"]]
    return states, out.hidden_states[-1]


def _brute(states, mask, start, n, tokens="all"):
    a, b = states[start], states[start + n]
    if tokens == "all":
        sel = mask.bool()
        a, b = a[sel], b[sel]
    else:  # the last real token of each row, wherever the padding is
        last = torch.tensor([int(row.nonzero().max()) for row in mask])
        rows = torch.arange(a.shape[0])
        a, b = a[rows, last], b[rows, last]
    cos = torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1).clamp(-1, 1)
    return float((torch.arccos(cos) / math.pi).mean()), float(1 - cos.mean())


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2", "bert"])
@pytest.mark.parametrize("tokens,side", [("all", "right"), ("last", "right"), ("last", "left")])
def test_matches_brute_force(family, tokens, side):
    model = tiny_model(family)
    ids, mask = padded_batch(lengths=(12, 5, 9), side=side)
    result = angular_distances(model, [(ids, mask)], tokens=tokens, max_block=None)
    states, _ = _all_states(model, ids, mask)
    L = len(states) - 1
    assert result.tokens == (int(mask.sum()) if tokens == "all" else 3)
    for layer in range(L):
        dist, bi = _brute(states, mask, layer, 1, tokens)
        row = result.layers.iloc[layer]
        assert row["angular_distance"] == pytest.approx(dist, abs=1e-6)
        assert row["block_influence"] == pytest.approx(bi, abs=1e-6)
    for row in result.blocks.itertuples():
        dist, _ = _brute(states, mask, row.start_layer, row.block_size, tokens)
        assert row.angular_distance == pytest.approx(dist, abs=1e-6)
    assert len(result.blocks) == L * (L + 1) // 2


def test_last_token_of_left_padded_rows():
    """Left padding (many Llama tokenizers' default): the last token is the row's last real one,
    not ``mask.sum() - 1`` (which would land in the padding-free middle of the row)."""
    model = tiny_model("llama")
    ids, mask = padded_batch(lengths=(12, 5, 9), side="left")
    states, _ = _all_states(model, ids, mask)
    got = angular_distances(model, [(ids, mask)], tokens="last").layers["angular_distance"]
    rows = torch.arange(3)
    for layer in range(len(states) - 1):
        a, b = states[layer][rows, -1], states[layer + 1][rows, -1]  # left padding: the real last token is at -1
        cos = torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1).clamp(-1, 1)
        assert got.iloc[layer] == pytest.approx(float((torch.arccos(cos) / math.pi).mean()), abs=1e-6)


def test_last_layer_is_measured_before_the_final_norm():
    model = tiny_model("llama")
    ids, mask = padded_batch()
    result = angular_distances(model, [(ids, mask)])
    states, post_norm = _all_states(model, ids, mask)
    pre, _ = _brute(states, mask, 3, 1)
    wrong, _ = _brute(states[:4] + [post_norm], mask, 3, 1)
    assert result.layers.iloc[3]["angular_distance"] == pytest.approx(pre, abs=1e-6)
    assert abs(pre - wrong) > 1e-3


def test_padding_and_batching_do_not_change_the_result():
    model = tiny_model("qwen2")
    ids, mask = padded_batch(lengths=(12, 5, 9))
    together = angular_distances(model, [(ids, mask)], max_block=2)
    separate = [(ids[i:i + 1, : int(mask[i].sum())], mask[i:i + 1, : int(mask[i].sum())]) for i in range(3)]
    apart = angular_distances(model, separate, max_block=2)
    assert together.tokens == apart.tokens == 26
    for col in ("angular_distance", "block_influence"):
        assert together.layers[col].tolist() == pytest.approx(apart.layers[col].tolist(), abs=1e-6)
        assert together.blocks[col].tolist() == pytest.approx(apart.blocks[col].tolist(), abs=1e-6)


def test_threshold_flags_near_identity():
    model = tiny_model("llama")
    ids, mask = padded_batch()
    result = angular_distances(model, [(ids, mask)], threshold=1.0)
    assert result.near_identity() == [0, 1, 2, 3]
    result = angular_distances(model, [(ids, mask)], threshold=0.0)
    assert result.near_identity() == []


def test_bad_arguments():
    model = tiny_model("llama")
    ids, mask = padded_batch()
    with pytest.raises(UserError, match="--max-block 5"):
        angular_distances(model, [(ids, mask)], max_block=5)
    with pytest.raises(UserError, match="--tokens"):
        angular_distances(model, [(ids, mask)], tokens="first")
    with pytest.raises(UserError, match="no tokens"):
        angular_distances(model, [])


@pytest.mark.parametrize("settings,fragment", [
    ({"tokens": "middle"}, "--tokens must be all or last"),
    ({"max_block": 0}, "--max-block must be at least 1"),
    ({"seq_len": 1}, "--seq-len must be at least 2"),
    ({"max_tokens": 0}, "--max-tokens must be at least 1"),
    ({"batch_size": 0}, "--batch-size must be at least 1"),
    ({"threshold": float("nan")}, "--threshold must be a number"),
])
def test_config_rejects_bad_settings(settings, fragment):
    with pytest.raises(UserError, match=fragment):
        AngularConfig(**settings)


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        AngularConfig().tokens = "last"  # type: ignore[misc]


class Recorder(Progress):
    """Remembers every phase and how much was done in each."""

    def __init__(self):
        self.phases: list[tuple[str, float | None]] = []
        self.done: dict[str, float] = {}

    def phase(self, name, total=None):
        self.phases.append((name, total))
        self.done.setdefault(name, 0)

    def advance(self, amount=1, *, detail=None):
        self.done[self.phases[-1][0]] += amount


def test_run_measures_and_records(tokenizer):
    """The library runner alone: measures, reports progress in windows, and builds meta.json's record."""
    loaded = LoadedModel.wrap(tiny_model("llama", vocab_size=len(tokenizer)), tokenizer, "tiny")
    progress = Recorder()
    config = AngularConfig(max_tokens=300, batch_size=2, max_block=2)
    run = angular.run(loaded, TextSource("sample", [SAMPLE_TEXT * 5]), config, progress=progress)
    assert run.result.tokens == 300 and run.model_name == "tiny"
    meta = run.meta
    assert meta["command"] == "angular" and meta["text"] == "sample" and meta["tokens_used"] == 300
    assert meta["num_layers"] == 4 and meta["norm_placement"] == "pre-LN" and meta["layer_stack"] == "model.layers"
    assert meta["settings"] == {"seq_len": 256, "max_tokens": 300, "batch_size": 2, "tokens": "all", "max_block": 2,
                                "threshold": 0.2}  # seq_len: the model's context length
    assert "measure" in meta["timings"]
    assert progress.phases == [("angular distances", 2)] and progress.done == {"angular distances": 2}
    with pytest.raises(UserError, match="--max-block 9"):
        angular.run(loaded, TextSource("sample", [SAMPLE_TEXT]), AngularConfig(max_block=9))
    with pytest.raises(UserError, match="context length"):
        angular.run(loaded, TextSource("sample", [SAMPLE_TEXT]), AngularConfig(seq_len=1000))
