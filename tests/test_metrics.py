"""Angular distances checked against a brute-force computation from full hidden states."""

from __future__ import annotations

import math

import pytest
import torch

from lnsdiag.errors import UserError
from lnsdiag.metrics import angular_distances
from lnsdiag.surgery import find_layers

from .families import padded_batch, tiny_model


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
    else:
        last = mask.sum(1) - 1
        rows = torch.arange(a.shape[0])
        a, b = a[rows, last], b[rows, last]
    cos = torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1).clamp(-1, 1)
    return float((torch.arccos(cos) / math.pi).mean()), float(1 - cos.mean())


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2", "bert"])
@pytest.mark.parametrize("tokens", ["all", "last"])
def test_matches_brute_force(family, tokens):
    model = tiny_model(family)
    ids, mask = padded_batch(lengths=(12, 5, 9))
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
