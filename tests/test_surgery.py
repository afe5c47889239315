"""Removing a layer by hook must give bitwise the model really built without it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lnsdiag.checkpoint.reference import build_without_layers
from lnsdiag.errors import UserError
from lnsdiag.interventions.removal import removed_layers
from lnsdiag.interventions.units import Removal
from lnsdiag.model.patch import Patches, kept, patched, patched_forward, release
from lnsdiag.model.placement import norm_placement
from lnsdiag.model.structure import block_norms, find_layers, parse_layer_spec
from lnsdiag.model.watch import watch_block
from tests.families import CAUSAL, FAMILIES, padded_batch, tiny_model

POSITIONS = {"first": 0, "middle": 2, "last": 3}


def _logits(model, ids, mask, **kw):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, **kw).logits


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request):
    return request.param, tiny_model(request.param)


@pytest.mark.parametrize("where", list(POSITIONS))
def test_removal_matches_rebuilt_model(family_model, where):
    family, model = family_model
    layer = POSITIONS[where]
    ids, mask = padded_batch()
    before = _logits(model, ids, mask)
    reference = build_without_layers(model, [layer])
    assert len(find_layers(reference)) == 3
    expected = _logits(reference, ids, mask)
    with removed_layers(model, [layer], mode="skip"):
        skipped = _logits(model, ids, mask, **({} if family == "bert" else {"use_cache": False}))
    assert torch.equal(skipped, expected), f"{family}: skip-removal of layer {layer} differs"
    if family != "bert":
        # Default call (a cache is created): auto mode passes through and stays exact.
        with removed_layers(model, [layer]):
            auto = _logits(model, ids, mask)
        assert torch.equal(auto, expected)
    assert not torch.equal(expected, before), "removing a layer should change the logits"
    assert torch.equal(_logits(model, ids, mask), before), "model not restored"


@pytest.mark.parametrize("family", CAUSAL)
@pytest.mark.parametrize("where", ["first", "last"])
def test_cached_generation_matches_rebuilt_model(family, where):
    model = tiny_model(family)
    layer = POSITIONS[where]
    ids, mask = padded_batch(lengths=(9, 6), side="left")
    kwargs = dict(
        attention_mask=mask, max_new_tokens=6, do_sample=False, use_cache=True,
        output_logits=True, return_dict_in_generate=True, pad_token_id=0,
    )
    reference = build_without_layers(model, [layer])
    with torch.no_grad():
        expected = reference.generate(ids, **kwargs)
        with removed_layers(model, [layer]):
            got = model.generate(ids, **kwargs)
    assert torch.equal(got.sequences, expected.sequences)
    for a, b in zip(got.logits, expected.logits, strict=True):
        assert torch.equal(a, b)


def test_several_layers_and_nesting():
    model = tiny_model("llama")
    ids, mask = padded_batch()
    expected = _logits(build_without_layers(model, [1, 3]), ids, mask)
    with removed_layers(model, [1]), removed_layers(model, 3):
        assert torch.equal(_logits(model, ids, mask, use_cache=False), expected)
    with removed_layers(model, [1, 3]):
        assert torch.equal(_logits(model, ids, mask, use_cache=False), expected)
        with pytest.raises(RuntimeError, match="already removed"), removed_layers(model, [1]):
            pass
        # The failed nested call restored nothing of the outer one.
        assert torch.equal(_logits(model, ids, mask, use_cache=False), expected)


def test_a_removal_value_removes_its_blocks():
    """A :class:`Removal` removes its blocks as their numbers would; the full model's removes nothing."""
    model = tiny_model("llama")
    ids, mask = padded_batch()
    before = _logits(model, ids, mask, use_cache=False)
    expected = _logits(build_without_layers(model, [1, 3]), ids, mask)
    with removed_layers(model, Removal((3, 1))):
        assert torch.equal(_logits(model, ids, mask, use_cache=False), expected)
    with removed_layers(model, Removal()):
        assert torch.equal(_logits(model, ids, mask, use_cache=False), before)
    with pytest.raises(UserError, match="layer 4 is out of range"), removed_layers(model, Removal.of(4)):
        pass
    assert torch.equal(_logits(model, ids, mask, use_cache=False), before)


def test_restored_after_exception():
    model = tiny_model("qwen2")
    ids, mask = padded_batch()
    before = _logits(model, ids, mask)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(KeyError), removed_layers(model, [0, 2]):
        raise KeyError("boom")
    stack = find_layers(model)
    assert all("forward" not in layer.__dict__ for layer in stack.layers)
    assert torch.equal(_logits(model, ids, mask), before)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_keeps_existing_forward_override():
    """accelerate's device_map puts its own forward on modules: it must survive a removal."""
    model = tiny_model("llama")
    layer = find_layers(model).layers[1]
    calls = []
    original = layer.forward

    def wrapped(*a, **k):
        calls.append(1)
        return original(*a, **k)

    layer.forward = wrapped
    ids, mask = padded_batch()
    with removed_layers(model, [1], mode="passthrough"):
        _logits(model, ids, mask)
    assert calls == [1]
    assert layer.__dict__["forward"] is wrapped


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3", "gemma3"])
def test_rebuilt_model_round_trips_through_disk(family, tmp_path):
    """The reduced config is a real one: save and reload gives the same logits."""
    import transformers as tf

    model = tiny_model(family)
    reduced = build_without_layers(model, [0])
    reduced.save_pretrained(tmp_path)
    reloaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids, mask = padded_batch()
    assert torch.equal(_logits(reloaded, ids, mask), _logits(reduced, ids, mask))


@pytest.mark.parametrize(
    "family,expected",
    [("llama", "pre-LN"), ("gpt2", "pre-LN"), ("opt", "pre-LN"), ("qwen3", "pre-LN"),
     ("gemma2", "sandwich"), ("gemma3", "sandwich"), ("bert", "post-LN")],
)
def test_norm_placement(family, expected):
    assert norm_placement(tiny_model(family)) == expected


def test_norm_placement_post_ln_opt():
    assert norm_placement(tiny_model("opt", do_layer_norm_before=False)) == "post-LN"


def test_unknown_architecture_names_override():
    class Weird(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))

    with pytest.raises(UserError, match="--layers-path"):
        find_layers(Weird())
    with pytest.raises(UserError, match="not a list of blocks"):
        find_layers(Weird(), "blocks")
    with pytest.raises(UserError, match="no such attribute"):
        find_layers(Weird(), "nothing.here")


def test_layers_path_override():
    model = tiny_model("llama")
    assert find_layers(model, "model.layers").layers is model.model.layers


@pytest.mark.parametrize(
    "spec,expected",
    [("all", [0, 1, 2, 3, 4, 5, 6, 7]), ("0-3", [0, 1, 2, 3]), ("0,4,7", [0, 4, 7]),
     ("5-", [5, 6, 7]), ("-1", [7]), ("1-2,6", [1, 2, 6]), ("3,3", [3])],
)
def test_parse_layer_spec(spec, expected):
    assert parse_layer_spec(spec, 8) == expected


@pytest.mark.parametrize("spec,match", [("8", "out of range"), ("0-9", "out of range"),
                                         ("a-b", "malformed"), ("4-2", "backwards"), (",", "no layer")])
def test_parse_layer_spec_errors(spec, match):
    with pytest.raises(UserError, match=match):
        parse_layer_spec(spec, 8)


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2", "phi3"])
def test_auto_mode_runs_no_removed_block_without_a_cache(family):
    """Rotary (cos, sin) tuples are not a KV cache: scoring passes must not pay for removed blocks."""
    model = tiny_model(family)
    stack = find_layers(model)
    ids, mask = padded_batch()
    _logits(model, ids, mask, use_cache=False)  # the block output form is learnt once per class
    calls = []
    hook = stack.layers[2].register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with removed_layers(model, [2]):  # auto
            calls.clear()
            _logits(model, ids, mask, use_cache=False)
            assert calls == [1]  # the module is called (hooks fire) ...
        inner = []
        attn = next(m for n, m in stack.layers[2].named_modules() if n.endswith(("self_attn", "attn", "attention")))
        handle = attn.register_forward_pre_hook(lambda *a: inner.append(1))
        with removed_layers(model, [2]):
            _logits(model, ids, mask, use_cache=False)
        handle.remove()
        assert inner == []  # ... but its attention never runs
    finally:
        hook.remove()


# --- the one install/restore primitive, and the block watcher --------------------------------

_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs")


def _patch_state(model: nn.Module) -> list[tuple]:
    """Each module's own forward and hooks (torch's dictionaries, read here only), to compare before and after."""
    return [(name, module.__dict__.get("forward"), *(tuple(getattr(module, d)) for d in _HOOK_DICTS))
            for name, module in model.named_modules()]


def _untouched(module: nn.Module) -> bool:
    """No forward override and no hook of any kind on ``module``."""
    return not any(_patch_state(module)[0][1:])


def test_patches_restore_in_reverse_order_and_on_exceptions():
    layer = nn.Linear(2, 2)
    x = torch.ones(1, 2)
    before = layer(x)
    calls = []
    with pytest.raises(KeyError), patched() as patches:
        patches.forward(layer, lambda inp: inp * 2, tag="double")
        inner = layer.forward
        patches.forward(layer, lambda inp: inner(inp) + 1, tag="plus-one")  # stacked on the first override
        patches.pre_hook(layer, lambda *_: calls.append("pre"))
        patches.hook(layer, lambda *_: calls.append("post"))
        assert len(patches) == 4 and patched_forward(layer) == "plus-one"
        assert torch.equal(layer(x), x * 2 + 1) and calls == ["pre", "post"]
        raise KeyError("boom")
    # Restored last first: undoing the first override before the second would leave the second installed.
    assert _untouched(layer) and patched_forward(layer) is None
    assert torch.equal(layer(x), before)


def test_patches_keep_a_forward_of_someone_else():
    layer = nn.Linear(2, 2)
    own = layer.forward
    layer.forward = own  # as accelerate's device hooks do
    with patched() as patches:
        patches.forward(layer, lambda inp: inp, tag="identity")
    assert layer.__dict__["forward"] is own and patched_forward(layer) is None


def test_kept_patches_are_released_once():
    model = tiny_model("llama")
    stack = find_layers(model)
    patches = Patches().keep_on(stack.layers, "test")
    patches.forward(stack.layers[0], lambda *a, **k: None, tag="test")
    assert kept(stack.layers, "test") is patches
    with pytest.raises(RuntimeError, match="already keeps"):
        Patches().keep_on(stack.layers, "test")
    assert release(stack.layers, "test") is True and release(stack.layers, "test") is False
    assert kept(stack.layers, "test") is None and _untouched(stack.layers[0])


@pytest.mark.parametrize("family", FAMILIES)
def test_watch_block_sees_every_norm_and_sublayer_once(family):
    """The watcher keeps each module's first call: in every family each runs once per pass."""
    model = tiny_model(family)
    stack = find_layers(model)
    block = stack.layers[2]
    watched = {**dict(block_norms(block)), **dict(block.named_children())}
    calls = {name: 0 for name in watched}
    before = _patch_state(model)
    with patched() as patches:
        for name, module in watched.items():
            patches.hook(module, lambda *_a, name=name: calls.__setitem__(name, calls[name] + 1))
        run = watch_block(model, block, watched)
    assert all(count <= 1 for count in calls.values()), calls
    assert run.input is not None and run.output is not None
    assert set(run.outputs) == {name for name, count in calls.items() if count}
    assert _patch_state(model) == before


def test_watch_block_restores_on_exceptions():
    model = tiny_model("llama")
    block = find_layers(model).layers[2]
    before = _patch_state(model)

    def fail(*_a, **_k):
        raise KeyError("boom")

    with patched() as failing:
        failing.forward(model.lm_head, fail, tag="boom")
        with pytest.raises(KeyError):
            watch_block(model, block, dict(block_norms(block)))
    assert _patch_state(model) == before
