"""A checkpoint without attention or MLP sub-layers: plain transformers computes what ``removed_layers``
computes (the sub-layers' output projections stored as zeros), lnsdiag's loader skips them, the card
says both, and :func:`removal_savings` counts what they cost."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file

from lnsdiag.checkpoint.card import PROVENANCE_FILE, model_card, provenance_line
from lnsdiag.checkpoint.reference import build_without_layers
from lnsdiag.checkpoint.save import save_without_layers
from lnsdiag.errors import UserError
from lnsdiag.interventions.pruned import KEPT_AS, RECORD
from lnsdiag.interventions.removal import removals_suspended, removed_layers
from lnsdiag.interventions.units import Attention, Removal
from lnsdiag.model.cost import removal_savings
from lnsdiag.model.load import LoadedModel, load_model, restore_norms
from lnsdiag.model.patch import patched, patched_forward
from lnsdiag.model.structure import find_layers, sublayer_site
from tests.families import padded_batch, tiny_model
from tests.test_save import _logits, _model

#: A sandwich (gemma2), a parallel block (gpt_neox), two mixtures (mixtral, qwen2_moe), GPT-2's Conv1D.
FAMILIES = ["llama", "gemma2", "gpt_neox", "mixtral", "qwen2_moe", "gpt2"]
#: One attention, one MLP (block 3: one of qwen2_moe's sparse blocks, 1 and 3), and a mixed removal.
REMOVALS = {"attn": "1.attn", "mlp": "3.mlp", "mixed": "0,1.attn,3.mlp"}


def _expected(model, removal, ids, mask=None):
    with removed_layers(model, Removal.parse(removal)):
        return _logits(model, ids, mask)


def _plain_load(folder):
    """What anyone without lnsdiag does, strict: no weight may be missing or left over."""
    model, info = tf.AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True, dtype=torch.float32)
    assert not any(info.values()), info
    return model.eval()


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, model.config.to_json_string()


def _intact(model, snapshot) -> bool:
    """Same weights, same config, no forward installed anywhere."""
    state, config = snapshot
    return (all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
            and model.config.to_json_string() == config and not any("forward" in vars(m) for m in model.modules()))


def _ran(model, ids, mask) -> tuple[torch.Tensor, list[str]]:
    """The logits, and the names of the modules that ran for them, in order."""
    ran: list[str] = []
    with patched() as patches:
        for name, module in model.named_modules():
            patches.hook(module, lambda _m, _a, _o, name=name: ran.append(name))
        return _logits(model, ids, mask), ran


@pytest.mark.parametrize("which", list(REMOVALS))
@pytest.mark.parametrize("family", FAMILIES)
def test_plain_transformers_computes_the_removal(family, which, tmp_path):
    model, removal = _model(family), REMOVALS[which]
    ids, mask = padded_batch()
    snapshot = _snapshot(model)
    saved = save_without_layers(model, Removal.parse(removal), tmp_path / "pruned")
    reloaded = _plain_load(tmp_path / "pruned")
    assert saved.num_parameters == reloaded.num_parameters()
    assert torch.equal(_logits(reloaded, ids, mask), _expected(model, removal, ids, mask))
    assert torch.equal(_logits(reloaded, ids), _expected(model, removal, ids))  # unpadded too
    assert _intact(model, snapshot)  # weights, config, forwards: the model in memory never changed


def test_a_mixed_removal_is_renumbered(tmp_path):
    """Block 0 removed whole, 2.attn and 3.mlp zeroed: blocks 1-3 become 0-2, the record says 1.attn, 2.mlp."""
    model = _model("llama")
    saved = save_without_layers(model, Removal.parse("0,2.attn,3.mlp"), tmp_path / "pruned")
    assert (saved.removed, saved.kept, saved.removal) == ((0,), (1, 2, 3), Removal.parse("0,2.attn,3.mlp"))
    config = json.loads((tmp_path / "pruned" / "config.json").read_text())
    assert (config["num_hidden_layers"], config[RECORD]) == (3, ["1.attn", "2.mlp"])
    record = json.loads((tmp_path / "pruned" / PROVENANCE_FILE).read_text())
    assert (record["removed_layers"], record["kept_layers"], record["removed_units"]) == (
        [0], [1, 2, 3], [0, "2.attn", "3.mlp"])
    assert "layers 0, 2.attn, 3.mlp of 4 removed" in provenance_line(record)

    written, original = load_file(tmp_path / "pruned" / "model.safetensors"), model.state_dict()
    zeroed = {"model.layers.1.self_attn.o_proj.weight", "model.layers.2.mlp.down_proj.weight"}
    for name, tensor in written.items():
        old = name
        for new in (2, 1, 0):  # kept blocks 1, 2, 3 are 0, 1, 2 now
            old = old.replace(f"model.layers.{new}.", f"model.layers.{new + 1}.")
        assert torch.equal(tensor, torch.zeros_like(tensor) if name in zeroed else original[old]), name
    assert not original["model.layers.2.self_attn.o_proj.weight"].eq(0).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_lnsdiag_skips_the_removed_sublayers(family, tmp_path):
    """Loaded by lnsdiag, a removed attention does not run (none of its modules is called), nor a removed
    MLP; the logits are those of plain transformers, which runs them on zeroed projections."""
    model = _model(family)
    ids, mask = padded_batch()
    save_without_layers(model, Removal.parse("0,1.attn,3.mlp"), tmp_path / "pruned")
    plain, ours = _plain_load(tmp_path / "pruned"), _plain_load(tmp_path / "pruned")
    restore_norms(ours)
    stack = find_layers(ours)
    attention, mlp = sublayer_site(stack.layers[0], "attn"), sublayer_site(stack.layers[2], "mlp")
    assert patched_forward(attention.module) == patched_forward(mlp.module) == KEPT_AS
    _logits(ours, ids)  # the first pass of a site class learns its output form by running it once
    got, ran = _ran(ours, ids, mask)
    skipped = (f"{stack.path}.0.{attention.name}.", f"{stack.path}.2.{mlp.name}.")
    assert not [n for n in ran if n.startswith(skipped)]  # none of their modules ran
    assert f"{stack.path}.1.{attention.name}" in ran and f"{stack.path}.0.{mlp.name}" in ran
    expected, plain_ran = _ran(plain, ids, mask)
    assert [n for n in plain_ran if n.startswith(skipped)]  # plain transformers runs them
    assert torch.equal(got, expected)
    assert torch.equal(got, _expected(model, "0,1.attn,3.mlp", ids, mask))


def test_the_skip_is_what_the_checkpoint_is(tmp_path):
    """Kept under its own tag: a variant's full-model pass keeps it, a sweep may remove the sub-layer again."""
    model = _model("llama")
    ids = padded_batch()[0]
    save_without_layers(model, Removal.parse("1.attn"), tmp_path / "pruned")
    loaded = _plain_load(tmp_path / "pruned")
    restore_norms(loaded)
    restore_norms(loaded)  # idempotent
    site = sublayer_site(find_layers(loaded).layers[1], "attn").module
    full = _logits(loaded, ids)
    with removed_layers(loaded, Removal.parse("1.attn")):  # the same sub-layer again: no "already removed"
        assert torch.equal(_logits(loaded, ids), full)
    with removed_layers(loaded, Removal.parse("1")):  # its whole block
        without = _logits(loaded, ids)
        with removals_suspended(loaded):
            assert patched_forward(site) == KEPT_AS
            assert torch.equal(_logits(loaded, ids), full)
    assert torch.equal(without, _expected(model, "1", ids))
    assert torch.equal(_logits(loaded, ids), full) and patched_forward(site) == KEPT_AS


def test_load_model_installs_the_skip(tokenizer, tmp_path):
    model = tiny_model("llama", vocab_size=len(tokenizer))
    ids = padded_batch()[0]
    save_without_layers(LoadedModel.wrap(model, tokenizer), Removal.parse("2,0.mlp,3.attn"), tmp_path / "pruned")
    loaded = load_model(str(tmp_path / "pruned"), device="cpu", dtype="float32")
    stack = find_layers(loaded.model)
    assert loaded.model.config.lnsdiag_removed_units == ["0.mlp", "2.attn"]
    assert patched_forward(sublayer_site(stack.layers[0], "mlp").module) == KEPT_AS
    assert patched_forward(sublayer_site(stack.layers[2], "attn").module) == KEPT_AS
    assert torch.equal(_logits(loaded.model, ids), _expected(model, "2,0.mlp,3.attn", ids))


def test_a_pruned_checkpoint_pruned_again(tmp_path):
    """The earlier record is renumbered with the blocks (and dropped with a removed one), the new units added;
    the reference built from the loaded model skips them too."""
    model = _model("gemma2")
    ids = padded_batch()[0]
    save_without_layers(model, Removal.parse("1.attn,2.mlp"), tmp_path / "first")
    first = _plain_load(tmp_path / "first")
    restore_norms(first)
    save_without_layers(first, Removal.parse("0,2,3.attn"), tmp_path / "second")
    config = json.loads((tmp_path / "second" / "config.json").read_text())
    assert (config["num_hidden_layers"], config[RECORD]) == (2, ["0.attn", "1.attn"])
    second = _plain_load(tmp_path / "second")
    want = _expected(model, "0,1.attn,2,3.attn", ids)
    assert torch.equal(_logits(second, ids), want)
    rebuilt = build_without_layers(first, [0, 2])
    assert rebuilt.config.lnsdiag_removed_units == ["0.attn"]
    assert patched_forward(sublayer_site(find_layers(rebuilt).layers[0], "attn").module) == KEPT_AS
    with removed_layers(rebuilt, Removal.parse("1.attn")):
        assert torch.equal(_logits(rebuilt, ids), want)


def test_the_card_names_the_sublayers_and_their_cost(tmp_path):
    save_without_layers(_model("llama"), Removal.parse("0,2.attn"), tmp_path / "pruned", source="org/tiny")
    card = (tmp_path / "pruned" / "README.md").read_text()
    assert "# tiny, without layers 0 and sub-layers 2.attn" in card
    assert "| Removed sub-layers (0-based, original numbering) | 2.attn |" in card
    assert "The sub-layers 1.attn (this checkpoint's block numbering)" in card
    assert "stored as zeros" in card and "still spend their compute" in card
    assert f"`{RECORD}`" in card and "lnsdiag's loader skips them" in card and "load_model(" in card

    save_without_layers(_model("llama"), Removal.parse("3.mlp"), tmp_path / "own", card="# Mine\n")
    own = (tmp_path / "own" / "README.md").read_text()
    assert own.startswith("# Mine") and own.count("The sub-layers 3.mlp") == 1

    blocks_only = model_card(source="org/tiny", removed=[1, 2], num_layers=4)
    assert "sub-layer" not in blocks_only and "No weight was changed:" in blocks_only
    only_subs = model_card(source=None, removed=["1.attn", "1.mlp"], num_layers=4)
    assert "without sub-layers 1.attn, 1.mlp" in only_subs and "Removed layers" not in only_subs
    assert "| Layers kept | 4 of 4 |" in only_subs and "2 attention or MLP sub-layers of its 4" in only_subs


@pytest.mark.parametrize(("layers", "match"), [
    ("1,1.attn", "inside block 1"), ("4.attn", "out of range"), ([], "no layer to remove"),
    ("0-3", "cannot remove all"),
])
def test_refuses_what_cannot_be_saved(layers, match, tmp_path):
    with pytest.raises(UserError, match=match):
        save_without_layers(_model("llama"), layers, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_negative_sublayer_counts_from_the_end(tmp_path):
    saved = save_without_layers(_model("llama"), [Attention(-1), -2], tmp_path / "out")
    assert saved.removal == Removal.parse("2,3.attn")


# --- what removing costs and saves -----------------------------------------------------------------

def test_savings_of_llama_by_hand():
    """hidden 32, MLP 64, 4 heads of 8 (2 KV heads), vocab 97, 4 blocks, untied head."""
    model = _model("llama")
    attn = 32 * 32 + 16 * 32 + 16 * 32 + 32 * 32  # q, k, v, o: 3072
    mlp = 3 * 32 * 64  # gate, up, down: 6144
    block = attn + mlp + 2 * 32  # and its two norms: 9280
    total = 4 * block + 2 * 97 * 32 + 32  # embeddings, head, final norm: 43360
    attention = 4 * 10 * 4 * 8  # QKᵀ and AV at context 10: 1280
    total_flops = 4 * (2 * (attn + mlp) + attention) + 2 * 97 * 32
    got = removal_savings(model, Removal.parse("1.attn"), context=10)
    assert (got.params, got.total_params, got.flops, got.total_flops) == (attn, total, 2 * attn + attention,
                                                                          total_flops)
    assert got.params_fraction == attn / total and got.flops_fraction == (2 * attn + attention) / total_flops
    assert removal_savings(model, Removal.parse("2.mlp"), context=10).flops == 2 * mlp
    both = removal_savings(model, Removal.parse("0,3.mlp"), context=100)
    assert (both.params, both.flops) == (block + mlp, 2 * (attn + mlp) + 4 * 100 * 32 + 2 * mlp)
    assert removal_savings(model, [1], context=10).params == block  # block numbers do as well


def test_savings_of_mixtral_count_active_experts_only():
    """4 experts of 3·32·64 (top 2) and a 4 × 32 router: all count as parameters, two experts as FLOPs."""
    model = _model("mixtral")
    expert, router = 3 * 32 * 64, 4 * 32
    got = removal_savings(model, Removal.parse("1.mlp"), context=10)
    assert (got.params, got.flops) == (4 * expert + router, 2 * (2 * expert + router))
    block = removal_savings(model, Removal.parse("1"), context=10)
    assert block.params == 3072 + 4 * expert + router + 2 * 32
    assert block.flops == 2 * 3072 + 4 * 10 * 32 + 2 * (2 * expert + router)


def test_savings_of_gpt2_with_biases_and_a_tied_head():
    """Conv1D weights stored (in, out), biases counted as parameters only; the tied head once, its matmul counted."""
    model = _model("gpt2")
    attn = 32 * 96 + 96 + 32 * 32 + 32  # c_attn, c_proj: 4224
    mlp = 32 * 128 + 128 + 128 * 32 + 32  # c_fc, c_proj: 8352
    total = 4 * (attn + mlp + 4 * 32) + 97 * 32 + 256 * 32 + 2 * 32  # wte (= head), wpe, ln_f: 62176
    got = removal_savings(model, Removal.parse("2.attn,2.mlp"), context=16)
    assert (got.params, got.total_params) == (attn + mlp, total)
    assert got.flops == 2 * (32 * 96 + 32 * 32) + 4 * 16 * 32 + 2 * (2 * 32 * 128)
    assert got.total_flops == 4 * got.flops + 2 * 97 * 32


def test_savings_within_a_sliding_window():
    """Gemma 2's sliding layers attend at most their window (5): their QKᵀ and AV stop growing."""
    model = _model("gemma2")
    sliding, full = (removal_savings(model, Removal.parse(f"{i}.attn"), context=100) for i in (0, 1))
    assert full.flops - sliding.flops == 4 * (100 - 5) * 4 * 8
    assert removal_savings(model, Removal.parse("0.attn"), context=3).flops == \
        removal_savings(model, Removal.parse("1.attn"), context=3).flops
