"""Removing a block's attention or MLP sub-layer by hook must give bitwise the model whose sub-layer
output projection is really zeroed — and, both removed, the model really built without the block."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lnsdiag.checkpoint.reference import build_without_layers, build_without_units, zeroed_projections
from lnsdiag.errors import UserError
from lnsdiag.interventions.removal import removals_suspended, removed_layers
from lnsdiag.interventions.units import Attention, Block, Mlp, Removal, Unit, parse_kinds
from lnsdiag.model.structure import find_layers, sublayer_site
from tests.families import CAUSAL, FAMILIES, padded_batch, tiny_model

SETS = ("0.attn", "2.mlp", "3.attn", "0.mlp,3.attn", "1,2.attn,3.mlp")


def _logits(model, ids, mask, **kw):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, **kw).logits


def _no_cache(family):
    return {} if family == "bert" else {"use_cache": False}


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request):
    return request.param, tiny_model(request.param)


@pytest.mark.parametrize("spec", SETS)
def test_sublayer_removal_equals_zeroed_output_projection(family_model, spec):
    family, model = family_model
    removal = Removal.parse(spec)
    ids, mask = padded_batch()
    before = _logits(model, ids, mask)
    reference = build_without_units(model, removal)
    expected = _logits(reference, ids, mask)
    with removed_layers(model, removal, mode="skip"):
        skipped = _logits(model, ids, mask, **_no_cache(family))
    assert torch.equal(skipped, expected), f"{family}: removing {spec} differs from its zeroed projections"
    if family != "bert":
        with removed_layers(model, removal):  # a cache is made: a removed attention runs, discarded
            assert torch.equal(_logits(model, ids, mask), expected)
    assert not torch.equal(expected, before), f"{family}: removing {spec} should change the logits"
    assert torch.equal(_logits(model, ids, mask), before), "model not restored"


def test_reference_zeroes_only_the_named_sublayers_projections():
    model = tiny_model("qwen2_moe")
    params = dict(model.named_parameters())
    reference = build_without_units(model, Removal.parse("1.mlp"))
    changed = {n for n, p in reference.named_parameters() if not torch.equal(p, params[n])}
    assert changed and all(n.startswith("model.layers.1.mlp.") for n in changed)
    assert any("experts" in n for n in changed) and any("shared_expert." in n for n in changed)  # routed and shared
    assert all(not reference.get_parameter(n).any() for n in changed)
    assert all(torch.equal(p, params[n]) for n, p in model.named_parameters())  # original untouched


@pytest.mark.parametrize("family", CAUSAL)
def test_attention_and_mlp_removed_equal_the_block_removed(family):
    """An independent reference: both sub-layers removed add nothing, so the block passes its input on,
    exactly as the model really built without that block (every Pre-LN, sandwich and parallel family)."""
    model = tiny_model(family)
    ids, mask = padded_batch()
    for block in (0, 2):
        expected = _logits(build_without_layers(model, [block]), ids, mask)
        with removed_layers(model, Removal((Attention(block), Mlp(block)))):
            assert torch.equal(_logits(model, ids, mask, use_cache=False), expected), f"{family} block {block}"


@pytest.mark.parametrize("family", CAUSAL)
@pytest.mark.parametrize("spec", ["0.attn", "3.mlp", "1.attn,2.mlp"])
def test_cached_generation_matches_zeroed_model(family, spec):
    model = tiny_model(family)
    ids, mask = padded_batch(lengths=(9, 6), side="left")
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, use_cache=True,
                  output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    removal = Removal.parse(spec)
    with torch.no_grad():
        expected = build_without_units(model, removal).generate(ids, **kwargs)
        with removed_layers(model, removal):
            got = model.generate(ids, **kwargs)
    assert torch.equal(got.sequences, expected.sequences)
    for a, b in zip(got.logits, expected.logits, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("family", ["llama", "gpt2", "mixtral", "gemma2"])
def test_skipped_sublayer_costs_nothing(family):
    """Without a cache a removed sub-layer's modules do not run (once its class's output form is known)."""
    model = tiny_model(family)
    ids, mask = padded_batch()
    block = find_layers(model).layers[2]
    calls = {"attn": 0, "mlp": 0}
    for kind in calls:
        for module in sublayer_site(block, kind).module.modules():
            if any(True for _ in module.parameters(recurse=False)):
                module.register_forward_hook(lambda *_, kind=kind: calls.__setitem__(kind, calls[kind] + 1))
    _logits(model, ids, mask, use_cache=False)
    ran = dict(calls)
    assert ran["attn"] and ran["mlp"]
    with removed_layers(model, Removal.parse("2.attn,2.mlp")):
        _logits(model, ids, mask, use_cache=False)  # may learn the output form once
        calls.update(attn=0, mlp=0)
        _logits(model, ids, mask, use_cache=False)
    assert calls == {"attn": 0, "mlp": 0}


def test_restored_after_exception_and_suspended_inside():
    model = tiny_model("gemma2")  # a sandwich: the post-norms are patched too
    ids, mask = padded_batch()
    before = _logits(model, ids, mask)
    with pytest.raises(RuntimeError, match="boom"), removed_layers(model, Removal.parse("1.attn,2.mlp")):
        raise RuntimeError("boom")
    assert torch.equal(_logits(model, ids, mask), before)
    with removed_layers(model, Removal.parse("1.attn,2.mlp")):
        removed = _logits(model, ids, mask, use_cache=False)
        with removals_suspended(model):
            assert torch.equal(_logits(model, ids, mask, use_cache=False), before)
        assert torch.equal(_logits(model, ids, mask, use_cache=False), removed)
    with removed_layers(model, Removal.parse("1.attn")), pytest.raises(RuntimeError, match="already removed"), \
            removed_layers(model, Removal.parse("1.attn")):
        pass


def test_sandwich_post_norm_is_removed_with_its_sublayer():
    """A post-norm with a bias maps zeros to its bias: the removal must still add exactly nothing."""
    model = tiny_model("gemma2")
    block = find_layers(model).layers[1]
    site = sublayer_site(block, "attn")
    assert site.post_norm is block.post_attention_layernorm
    with removed_layers(model, Removal.parse("1.attn,1.mlp")):
        assert torch.equal(site.post_norm(torch.ones(2, 32)), torch.zeros(2, 32))
    assert not torch.equal(site.post_norm(torch.ones(2, 32)), torch.zeros(2, 32))


def test_a_block_that_cannot_be_split_is_refused_in_one_line():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.mixer = nn.Linear(4, 4)

    with pytest.raises(UserError, match="cannot remove the attn sub-layer of Odd blocks"):
        sublayer_site(Odd(), "attn")


def test_zeroed_projections_name_the_output_projections():
    names = {f: [n for n, _ in zeroed_projections(find_layers(tiny_model(f)).layers[1], "attn")]
             for f in ("llama", "gpt2", "gpt_neox", "opt", "bert")}
    assert names["llama"] == ["self_attn.o_proj.weight"]
    assert names["gpt2"] == ["attn.c_proj.weight", "attn.c_proj.bias"]
    assert names["gpt_neox"] == ["attention.dense.weight", "attention.dense.bias"]
    assert names["opt"] == ["self_attn.out_proj.weight", "self_attn.out_proj.bias"]
    assert names["bert"] == ["attention.output.dense.weight", "attention.output.dense.bias"]


# --- the unit values ----------------------------------------------------------------------------------

def test_sublayer_units_in_every_form():
    r = Removal.parse("5.attn,3,7.mlp,5.mlp")
    assert r.units == (Block(3), Attention(5), Mlp(5), Mlp(7))
    assert r.cell == "3,5.attn,5.mlp,7.mlp" and r.name == "layers_003_005attn_005mlp_007mlp"
    assert Removal.from_json(r.to_json()) == r == Removal.from_cell(r.cell)
    assert r.blocks == (3,) and r.sublayers == (Attention(5), Mlp(5), Mlp(7)) and r.first == 3 and r.kind == "mixed"
    assert Removal.parse("2-4.mlp").units == (Mlp(2), Mlp(3), Mlp(4)) and Removal.parse("2-4.mlp").kind == "mlp"
    assert Removal.of(Attention(3)).label == "without layer 3.attn" and Removal.of(Attention(3)).single == Attention(3)
    assert Removal.of(Attention(3)).single_block is None and Removal().kind == "" and Removal.of(3).kind == "block"
    assert Unit.parse("3.attn") == Attention(3) and Attention(3).kind == "attn" and Block(3).of_kind("mlp") == Mlp(3)
    assert Removal.each([1, 2], ("mlp", "block")) == [Removal.of(1), Removal.of(Mlp(1)), Removal.of(2),
                                                       Removal.of(Mlp(2))]


@pytest.mark.parametrize("spec, match", [
    ("3.foo", "names no unit"), ("3.attention", "did you mean attn"), ("3.", "names no unit"),
    ("3.block", "names no unit"), ("3,3.attn", "inside block 3"), ("x.attn", "layer numbers"),
])
def test_bad_sublayer_specs_are_refused_in_one_line(spec, match):
    with pytest.raises(UserError, match=match):
        Removal.parse(spec)


def test_unit_kinds():
    assert parse_kinds("mlp,block") == ("block", "mlp") and parse_kinds(" attn ") == ("attn",)
    with pytest.raises(UserError, match="did you mean attn"):
        parse_kinds("attention")
    with pytest.raises(UserError, match="did you mean mlp"):
        parse_kinds("ffn")
    with pytest.raises(UserError, match="names no unit kind"):
        parse_kinds(",")


# --- the fast engine's counted work -------------------------------------------------------------------

def test_counted_work_of_a_sublayer_sweep_is_the_blocks_run(tokenizer):
    """The 2L + 1 variants of a sub-layer sweep: the full model once, then each variant from its block's
    kept input through the blocks from there (its own block without the removed sub-layer counted as
    one block pass, as the naive engine's is). Counted by hooks on the blocks: what really ran."""
    from lnsdiag.engine.work import layer_passes, naive_layer_passes
    from tests.test_prefix import _workload, counted_sweep

    model = tiny_model("llama", vocab_size=len(tokenizer))
    stack = find_layers(model)
    sweep = [Removal(), *Removal.each(range(4), ("attn", "mlp"))]
    requests, _ = _workload(len(tokenizer))
    ran, stats = counted_sweep(model, stack, sweep, requests)
    assert layer_passes(4, sweep) == 4 + 2 * (4 + 3 + 2 + 1) and naive_layer_passes(4, sweep) == 9 * 4
    assert ran == stats["block_tokens"] == stats["tokens"] * layer_passes(4, sweep)
    # a 32-layer model: 1,088 block passes per row token against the naive engine's 65 × 32 = 2,080
    deep = [Removal(), *Removal.each(range(32), ("attn", "mlp"))]
    assert (layer_passes(32, deep), naive_layer_passes(32, deep)) == (32 + 2 * 528, 2080)
