"""LayerNorm Scaling and the Post-LN variant: hand-computed references, save/reload, removal, init."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from lnsdiag.checkpoint.reference import build_without_layers
from lnsdiag.errors import UserError
from lnsdiag.interventions import lns, postln
from lnsdiag.interventions.removal import removed_layers
from lnsdiag.model.placement import norm_placement
from lnsdiag.model.structure import find_layers
from tests.families import padded_batch, tiny_model


def _logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, use_cache=False).logits


def _block_call(model, index, ids, mask):
    """The input and keyword arguments block ``index`` receives in a real forward pass."""
    block = find_layers(model).layers[index]
    seen = {}

    def grab(_m, args, kwargs):
        seen["x"] = args[0] if args else kwargs["hidden_states"]
        seen["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}

    handle = block.register_forward_pre_hook(grab, with_kwargs=True)
    _logits(model, ids, mask)
    handle.remove()
    return block, seen["x"], seen["kwargs"]


def _rms(norm, x):
    """RMSNorm by hand: weight · x / sqrt(mean(x²) + eps)."""
    return norm.weight * (x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon))


def _scale_hooks(model):
    """(module name, factor) of every LNS hook installed (torch's hook dictionaries, read here only)."""
    return [(name, hook.factor) for name, m in model.named_modules() for hook in m._forward_hooks.values()
            if isinstance(hook, lns._Scale)]


@pytest.mark.parametrize("index", [0, 2, 3])
def test_block_matches_hand_computed_reference(index):
    model = lns.apply_lns(tiny_model("llama"))
    ids, mask = padded_batch()
    block, x, kwargs = _block_call(model, index, ids, mask)
    s = 1 / math.sqrt(index + 1)
    with torch.no_grad():
        out = block(x, **kwargs)
        attn, _ = block.self_attn(hidden_states=s * _rms(block.input_layernorm, x), **kwargs)
        h = x + attn
        expected = h + block.mlp(s * _rms(block.post_attention_layernorm, h))
        attn1, _ = block.self_attn(hidden_states=_rms(block.input_layernorm, x), **kwargs)
        h1 = x + attn1
        unscaled = h1 + block.mlp(_rms(block.post_attention_layernorm, h1))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    if index == 0:  # l = 1: scale 1
        torch.testing.assert_close(out, unscaled, rtol=1e-5, atol=1e-6)
    else:
        assert not torch.allclose(out, unscaled, atol=1e-4)


def test_whole_model_equals_folded_norm_weights():
    """For RMSNorm, scaling the output equals scaling the weight: an independent reference."""
    plain = tiny_model("llama")
    model = lns.apply_lns(copy.deepcopy(plain))
    folded = copy.deepcopy(plain)
    with torch.no_grad():
        for depth, block in enumerate(find_layers(folded).layers, start=1):
            block.input_layernorm.weight.mul_(1 / math.sqrt(depth))
            block.post_attention_layernorm.weight.mul_(1 / math.sqrt(depth))
    ids, mask = padded_batch()
    got = _logits(model, ids, mask)
    torch.testing.assert_close(got, _logits(folded, ids, mask), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, _logits(plain, ids, mask), atol=1e-3)


def test_no_parameters_added_and_only_block_norms_scaled():
    plain = tiny_model("llama")
    model = lns.apply_lns(copy.deepcopy(plain))
    assert list(model.state_dict()) == list(plain.state_dict())
    assert lns.layer_scales(model) == pytest.approx([1, 2 ** -0.5, 3 ** -0.5, 0.5])
    assert model.config.lns == {"scale": "1/sqrt(l)", "norms": ["input_layernorm", "post_attention_layernorm"],
                                "layers": [1, 2, 3, 4], "version": 1}
    assert [name for name, _ in _scale_hooks(model)] == [
        f"model.layers.{i}.{n}" for i in range(4) for n in ("input_layernorm", "post_attention_layernorm")]
    assert norm_placement(model) == "pre-LN+LNS"


_LLAMA_NORMS = ["input_layernorm", "post_attention_layernorm"]


@pytest.mark.parametrize("family,norms", [
    ("llama", _LLAMA_NORMS), ("mistral", _LLAMA_NORMS), ("mixtral", _LLAMA_NORMS), ("qwen2", _LLAMA_NORMS),
    ("qwen3", _LLAMA_NORMS),  # not q_norm / k_norm
    ("qwen2_moe", _LLAMA_NORMS), ("deepseek_v2", _LLAMA_NORMS), ("deepseek_v3", _LLAMA_NORMS),
    ("phi3", _LLAMA_NORMS), ("gpt_neox", _LLAMA_NORMS),
    ("gemma2", ["input_layernorm", "pre_feedforward_layernorm"]),  # sandwich: not the post-sublayer norms
    ("gemma3", ["input_layernorm", "pre_feedforward_layernorm"]),
    ("gpt2", ["ln_1", "ln_2"]),
    ("opt", ["self_attn_layer_norm", "final_layer_norm"]),
])
def test_finds_the_two_pre_sublayer_norms(family, norms):
    assert lns.find_pre_norms(tiny_model(family)) == norms


def test_unsupported_models_get_one_clear_error():
    with pytest.raises(UserError, match="not a pre-LN block"):
        lns.apply_lns(tiny_model("bert"))
    with pytest.raises(UserError, match="not a pre-LN block"):
        lns.find_pre_norms(postln.apply_post_ln(tiny_model("llama")))
    with pytest.raises(UserError, match="Post-LN"):
        lns.apply_lns(postln.apply_post_ln(tiny_model("llama")))
    with pytest.raises(UserError, match="no norm 'nope'"):
        lns.apply_lns(tiny_model("llama"), norms=["nope"])


def test_apply_twice_refused_and_remove_restores():
    plain = tiny_model("qwen2")
    ids, mask = padded_batch()
    before = _logits(plain, ids, mask)
    model = lns.apply_lns(copy.deepcopy(plain))
    with pytest.raises(UserError, match="already has LayerNorm Scaling"):
        lns.apply_lns(model)
    lns.remove_lns(model)
    assert not lns.is_lns(model) and not lns.has_lns_hooks(model)
    assert torch.equal(_logits(model, ids, mask), before)


def test_apply_remove_apply_leaves_exactly_one_set_of_scale_hooks():
    model = lns.apply_lns(tiny_model("llama"))
    ids, mask = padded_batch()
    expected, hooks = _logits(model, ids, mask), _scale_hooks(model)
    assert len(hooks) == 8
    lns.apply_lns(lns.remove_lns(model))
    assert lns.restore_lns(model) is True  # re-installing replaces, never adds
    assert _scale_hooks(model) == hooks
    assert torch.equal(_logits(model, ids, mask), expected)
    lns.remove_lns(model)
    assert _scale_hooks(model) == [] and not lns.has_lns_hooks(model)


def test_a_deep_copy_keeps_its_own_scale_hooks():
    plain = tiny_model("llama")
    model = lns.apply_lns(copy.deepcopy(plain))
    ids, mask = padded_batch()
    expected = _logits(model, ids, mask)
    copied = copy.deepcopy(model)
    assert lns.has_lns_hooks(copied) and torch.equal(_logits(copied, ids, mask), expected)
    lns.remove_lns(copied)  # the copy's hooks only
    assert _scale_hooks(copied) == [] and len(_scale_hooks(model)) == 8
    assert torch.equal(_logits(copied, ids, mask), _logits(plain, ids, mask))
    assert torch.equal(_logits(model, ids, mask), expected)


def test_save_and_reload_gives_the_same_logits(tmp_path, tokenizer):
    import transformers as tf

    from lnsdiag.model.load import load_model

    model = lns.apply_lns(tiny_model("llama", vocab_size=len(tokenizer)))
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["lns"]["layers"] == [1, 2, 3, 4]
    ids, mask = padded_batch()
    expected = _logits(model, ids, mask)

    plain = tf.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert not torch.allclose(_logits(plain, ids, mask), expected, atol=1e-4)  # hooks are not in the weights
    assert lns.restore_lns(plain) is True
    assert lns.restore_lns(plain) is True  # idempotent: not scaled twice
    assert torch.equal(_logits(plain, ids, mask), expected)

    loaded = load_model(str(tmp_path), device="cpu")
    assert torch.equal(_logits(loaded.model, ids, mask), expected)
    assert norm_placement(loaded.model) == "pre-LN+LNS"


@pytest.mark.parametrize("layer", [0, 2, 3])
def test_removal_matches_rebuilt_model_keeping_original_scales(layer):
    model = lns.apply_lns(tiny_model("llama"))
    ids, mask = padded_batch()
    reference = build_without_layers(model, [layer])
    assert reference.config.lns["layers"] == [i + 1 for i in range(4) if i != layer]
    with removed_layers(model, [layer], mode="skip"):
        removed = _logits(model, ids, mask)
    assert torch.equal(removed, _logits(reference, ids, mask))
    if layer != 3:  # LNS applied afresh renumbers the later blocks: other scales, other logits
        renumbered = build_without_layers(model, [layer])
        lns.apply_lns(lns.remove_lns(renumbered))
        assert not torch.allclose(removed, _logits(renumbered, ids, mask), atol=1e-4)


def test_scaled_init_draws_output_projections_smaller():
    torch.manual_seed(0)
    import transformers as tf

    from tests.families import tiny_config

    config = tiny_config("llama", hidden_size=64, intermediate_size=128)
    model = tf.AutoModelForCausalLM.from_config(config)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lns.initialize(model, "default")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    lns.initialize(model, "scaled")
    expected = config.initializer_range / math.sqrt(2 * 4)
    for name, value in model.state_dict().items():
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            assert float(value.std()) == pytest.approx(expected, rel=0.1), name
        else:
            assert torch.equal(value, before[name]), name
    with pytest.raises(UserError, match="unknown init"):
        lns.initialize(model, "xavier")


def test_trains_with_hf_trainer(tmp_path):
    """Hooks are plain torch: HF Trainer trains and saves an LNS model like any other."""
    import transformers as tf

    model = lns.apply_lns(tiny_model("llama"))
    ids = torch.randint(3, 97, (8, 12), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": row, "labels": row} for row in ids]
    before = model.model.layers[3].mlp.down_proj.weight.detach().clone()
    args = tf.TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=4,
                                learning_rate=1e-2, report_to=[], save_strategy="no", logging_strategy="no",
                                use_cpu=True, disable_tqdm=True)
    tf.Trainer(model=model, args=args, train_dataset=data).train()
    assert not torch.equal(before, model.model.layers[3].mlp.down_proj.weight)
    assert lns.has_lns_hooks(model)
    model.eval()
    model.save_pretrained(tmp_path / "saved")
    again = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    lns.restore_lns(again)
    batch, mask = padded_batch()
    assert torch.equal(_logits(again, batch, mask), _logits(model, batch, mask))


# --- Post-LN -------------------------------------------------------------------------------

def test_post_ln_block_matches_hand_computed_reference():
    model = postln.apply_post_ln(tiny_model("llama"))
    ids, mask = padded_batch()
    block, x, kwargs = _block_call(model, 2, ids, mask)
    with torch.no_grad():
        out = block(x, **kwargs)
        attn, _ = block.self_attn(hidden_states=x, **kwargs)
        h = _rms(block.input_layernorm, x + attn)
        expected = _rms(block.post_attention_layernorm, h + block.mlp(h))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    assert norm_placement(model) == "post-LN"


def test_post_ln_saves_reloads_and_removes_exactly(tmp_path, tokenizer):
    from lnsdiag.model.load import load_model

    plain = tiny_model("llama", vocab_size=len(tokenizer))
    model = postln.apply_post_ln(copy.deepcopy(plain))
    ids, mask = padded_batch()
    expected = _logits(model, ids, mask)
    assert not torch.allclose(expected, _logits(plain, ids, mask), atol=1e-3)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path), device="cpu")
    assert torch.equal(_logits(loaded.model, ids, mask), expected)
    copied = copy.deepcopy(model)  # the block forward follows the copy, not the original
    assert torch.equal(_logits(copied, ids, mask), expected)
    with torch.no_grad():
        copied.model.layers[2].post_attention_layernorm.weight.mul_(2)
    assert not torch.equal(_logits(copied, ids, mask), expected)  # the copy runs its own norms
    assert torch.equal(_logits(model, ids, mask), expected)
    postln.remove_post_ln(copied)  # the copy's forwards only
    assert all("forward" not in b.__dict__ for b in copied.model.layers)
    assert torch.equal(_logits(model, ids, mask), expected)
    with removed_layers(model, [1], mode="skip"):
        removed = _logits(model, ids, mask)
    assert torch.equal(removed, _logits(build_without_layers(model, [1]), ids, mask))
    assert torch.equal(_logits(model, ids, mask), expected)  # Post-LN forward back after removal
    postln.remove_post_ln(model)
    assert torch.equal(_logits(model, ids, mask), _logits(plain, ids, mask))
    with pytest.raises(UserError, match="Post-LN is supported"):
        postln.apply_post_ln(tiny_model("gemma2"))


# --- folding the scales into the norm weights ----------------------------------------------

#: Llama (RMSNorm, w·x̂), families whose LayerNorms have biases (w·x̂ + b), Gemma's (1 + w)·x̂.
FOLD_FAMILIES = {"llama": "scale", "gpt_neox": "scale", "gpt2": "scale", "opt": "scale", "gemma2": "one_plus",
                 "gemma3": "one_plus"}


@pytest.mark.parametrize("family", list(FOLD_FAMILIES))
def test_folded_weights_compute_the_hooked_model(family):
    """fold_lns: no hook left, the scales in the weights (and biases), the same logits within float32 rounding."""
    model = lns.apply_lns(tiny_model(family))
    ids, mask = padded_batch()
    expected = _logits(model, ids, mask)
    plan = lns.fold_plan(model)
    assert {fold.kind for fold in plan} == {FOLD_FAMILIES[family]}
    assert [(f.block, f.norm, f.layer) for f in plan] == [
        (i, n, i + 1) for i in range(4) for n in model.config.lns["norms"]]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded = lns.fold_lns(model)
    assert folded is model and not lns.has_lns_hooks(model) and _scale_hooks(model) == []
    assert model.config.lns == {"scale": "1/sqrt(l)", "norms": lns.find_pre_norms(model),
                                "layers": [1, 2, 3, 4], "version": 2, "folded": True}
    assert lns.is_lns(model) and lns.is_folded(model) and lns.fold_plan(model) == []
    got = _logits(model, ids, mask)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    # exactly the named norms changed, each by its own block's factor
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    prefix = find_layers(model).path
    named = {f"{prefix}.{f.block}.{f.norm}.{p}" for f in plan for p, _ in f.module.named_parameters(recurse=False)}
    assert changed == {k for k in named if not k.startswith(f"{prefix}.0.")}  # l = 1: factor 1
    for f in plan:
        key = f"{prefix}.{f.block}.{f.norm}.weight"
        w, s = before[key].double(), 1 / math.sqrt(f.layer)
        want = s * w if f.kind == "scale" else s * (1 + w) - 1
        torch.testing.assert_close(model.state_dict()[key].double(), want, rtol=0, atol=1e-7)
        if f"{prefix}.{f.block}.{f.norm}.bias" in before:
            bias = before[f"{prefix}.{f.block}.{f.norm}.bias"]
            assert bias.abs().max() > 0.01  # a real bias, scaled too
            torch.testing.assert_close(model.state_dict()[f"{prefix}.{f.block}.{f.norm}.bias"].double(),
                                       s * bias.double(), rtol=0, atol=1e-7)
    assert lns.restore_lns(model) is True and not lns.has_lns_hooks(model)  # never scaled twice
    assert torch.equal(_logits(model, ids, mask), got)


def test_unfold_goes_back_to_hooks():
    plain = tiny_model("gemma2")
    model = lns.apply_lns(copy.deepcopy(plain))
    ids, mask = padded_batch()
    expected = _logits(model, ids, mask)
    lns.fold_lns(model)
    with pytest.raises(UserError, match="unfold_lns"):
        lns.remove_lns(model)
    lns.unfold_lns(model)
    assert lns.has_lns_hooks(model) and model.config.lns["version"] == 1 and "folded" not in model.config.lns
    torch.testing.assert_close(_logits(model, ids, mask), expected, rtol=0, atol=1e-5)
    for key, value in plain.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=1e-6)
    with pytest.raises(UserError, match="no LayerNorm Scaling to fold"):
        lns.fold_lns(plain)


def test_a_folded_record_of_a_newer_lnsdiag_is_refused():
    model = lns.fold_lns(lns.apply_lns(tiny_model("llama")))
    model.config.lns = {**model.config.lns, "version": 3}
    with pytest.raises(UserError, match="newer lnsdiag"):
        lns.restore_lns(model)


def test_norms_that_cannot_carry_the_scale_are_one_clear_error():
    import transformers as tf

    from tests.families import tiny_config

    olmo = tf.OlmoConfig(**{k: getattr(tiny_config("llama"), k) for k in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "max_position_embeddings")})
    model = lns.apply_lns(tf.AutoModelForCausalLM.from_config(olmo).eval())  # LayerNorm without parameters
    with pytest.raises(UserError, match=r"OlmoLayerNorm 'input_layernorm' of OlmoForCausalLM \(olmo\): the norm "
                                        "has no learnable weight") as info:
        lns.fold_lns(model)
    assert "\n" not in str(info.value) and lns.has_lns_hooks(model) and not lns.is_folded(model)

    class SquaredNorm(torch.nn.Module):  # w² · x̂: neither formula
        def __init__(self, norm):
            super().__init__()
            self.weight, self.eps = norm.weight, norm.variance_epsilon

        def forward(self, x):
            return self.weight ** 2 * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    model = tiny_model("llama")
    for block in find_layers(model).layers:
        block.post_attention_layernorm = SquaredNorm(block.post_attention_layernorm)
    lns.apply_lns(model)
    with pytest.raises(UserError, match="neither w·x̂ \\+ b nor \\(1 \\+ w\\)·x̂ \\+ b"):
        lns.fold_plan(model)

    shared = tiny_model("llama")  # one norm module in two blocks cannot carry two scales
    blocks = find_layers(shared).layers
    blocks[2].input_layernorm = blocks[1].input_layernorm
    lns.apply_lns(shared, norms=_LLAMA_NORMS)
    before = shared.state_dict()["model.layers.1.input_layernorm.weight"].clone()
    with pytest.raises(UserError, match="same tensor"):
        lns.fold_lns(shared)
    assert torch.equal(shared.state_dict()["model.layers.1.input_layernorm.weight"], before)  # nothing changed
