"""A pruned model written as a real checkpoint: plain transformers loads it, and it computes what
``removed_layers`` computes on the original, bit for bit."""

from __future__ import annotations

import json
from functools import cache

import pytest
import torch
import transformers as tf
from safetensors import safe_open
from safetensors.torch import load_file
from typer.testing import CliRunner

from lnsdiag.checkpoint import save as rebuild
from lnsdiag.checkpoint.card import PROVENANCE_FILE, model_card, read_provenance
from lnsdiag.checkpoint.reference import build_without_layers
from lnsdiag.checkpoint.save import parse_size, save_without_layers
from lnsdiag.errors import UserError
from lnsdiag.interventions.lns import apply_lns
from lnsdiag.interventions.removal import removed_layers
from lnsdiag.model.load import LoadedModel, load_model
from tests.families import CAUSAL, padded_batch, tiny_model

LAYER_SETS = {"middle": [1, 2], "apart": [0, 3]}


@cache
def _model(family: str) -> torch.nn.Module:
    """One tiny model per family for the whole file (the tests check it is never changed)."""
    return tiny_model(family)


def _logits(model, ids, mask=None):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, use_cache=False).logits


def _expected(model, layers, ids, mask=None):
    with removed_layers(model, layers):
        return _logits(model, ids, mask)


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, model.config.to_json_string()


def _plain_load(folder, **kwargs):
    """What anyone without lnsdiag does, strict: no weight may be missing or left over."""
    model, info = tf.AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True, **kwargs)
    assert not any(info.values()), info
    return model.eval()


@pytest.mark.parametrize("which", list(LAYER_SETS))
@pytest.mark.parametrize("family", CAUSAL)
def test_plain_transformers_loads_the_pruned_model(family, which, tmp_path):
    model, layers = _model(family), LAYER_SETS[which]
    ids, mask = padded_batch()
    state, config = _snapshot(model)
    before = _logits(model, ids, mask)
    saved = save_without_layers(model, layers, tmp_path / "pruned")
    assert saved.removed == tuple(layers) and saved.kept == tuple(i for i in range(4) if i not in layers)
    reloaded = _plain_load(tmp_path / "pruned", dtype=torch.float32)
    assert reloaded.config.num_hidden_layers == 2
    assert saved.num_parameters == reloaded.num_parameters()
    assert torch.equal(_logits(reloaded, ids, mask), _expected(model, layers, ids, mask))
    assert torch.equal(_logits(reloaded, ids), _expected(model, layers, ids))  # unpadded too
    # The original is untouched: weights, config (save_pretrained would set dtype/architectures), outputs.
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert model.config.to_json_string() == config
    assert torch.equal(_logits(model, ids, mask), before)


@pytest.mark.parametrize("family", ["mistral", "mixtral", "qwen2_moe", "deepseek_v3", "gemma2", "gemma3", "gpt2",
                                    "gpt_neox"])
def test_writes_what_save_pretrained_writes_for_the_rebuilt_model(family, tmp_path):
    """Same tensors under the same names (tied aliases left out, fused experts split back per expert,
    GPT-NeoX's head renamed) and the same config as the reference model really built without the layers."""
    model = _model(family)
    save_without_layers(model, [0, 3], tmp_path / "ours")
    build_without_layers(model, [0, 3]).save_pretrained(tmp_path / "reference")
    ours, reference = (load_file(tmp_path / d / "model.safetensors") for d in ("ours", "reference"))
    assert ours.keys() == reference.keys()
    assert all(torch.equal(ours[k], reference[k]) for k in ours)
    configs = [json.loads((tmp_path / d / "config.json").read_text()) for d in ("ours", "reference")]
    assert configs[0] == configs[1]


def test_config_keeps_each_layer_role(tmp_path):
    """The MoE layout, DeepSeek's dense prefix and Gemma's layer types follow the kept blocks."""
    def saved_config(family, layers):
        folder = tmp_path / f"{family}-{'-'.join(map(str, layers))}"
        save_without_layers(_model(family), layers, folder)
        return json.loads((folder / "config.json").read_text())

    # Qwen2-MoE with decoder_sparse_step=2: blocks 1 and 3 are sparse. Keeping 1, 2: new block 1 (old 2) is dense.
    qwen = saved_config("qwen2_moe", [0, 3])
    assert (qwen["num_hidden_layers"], qwen["decoder_sparse_step"], qwen["mlp_only_layers"]) == (2, 1, [1])
    assert saved_config("deepseek_v3", [0, 3])["first_k_dense_replace"] == 0  # the dense block 0 is gone
    assert saved_config("deepseek_v3", [1, 2])["first_k_dense_replace"] == 1
    gemma = _model("gemma3").config.layer_types
    assert saved_config("gemma3", [0, 3])["layer_types"] == [gemma[1], gemma[2]]
    assert saved_config("llama", [1, 2])["architectures"] == ["LlamaForCausalLM"]


def test_tied_embeddings_are_written_once(tmp_path):
    model = _model("gpt2")
    assert model.config.tie_word_embeddings
    save_without_layers(model, [1, 2], tmp_path / "gpt2")
    with safe_open(tmp_path / "gpt2" / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "transformer.wte.weight" in keys and "lm_head.weight" not in keys
    assert {k.split(".")[2] for k in keys if k.startswith("transformer.h.")} == {"0", "1"}
    reloaded = _plain_load(tmp_path / "gpt2")
    assert reloaded.lm_head.weight.data_ptr() == reloaded.transformer.wte.weight.data_ptr()


@pytest.mark.parametrize("family", ["llama", "mixtral"])
def test_sharded_checkpoint(family, tmp_path, monkeypatch):
    model = _model(family)
    written = []
    real_save = rebuild._save_shard

    def recording(tensors, path):
        written.append({k: (v.data_ptr(), v.numel() * v.element_size()) for k, v in tensors.items()})
        real_save(tensors, path)

    monkeypatch.setattr(rebuild, "_save_shard", recording)
    saved = save_without_layers(model, [0, 3], tmp_path / "sharded", max_shard_size="20KB")
    folder = tmp_path / "sharded"
    assert saved.sharded and len(saved.weight_files) == len(written) > 2
    assert not (folder / "model.safetensors").exists()
    assert sorted(p.name for p in folder.glob("*.safetensors")) == list(saved.weight_files)
    assert saved.weight_files[-1] == f"model-{len(written):05d}-of-{len(written):05d}.safetensors"
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    on_disk = {}
    for name in saved.weight_files:
        with safe_open(folder / name, "pt") as f:
            on_disk.update(dict.fromkeys(f.keys(), name))
    assert index["weight_map"] == on_disk
    assert index["metadata"]["total_size"] == saved.total_bytes
    assert saved.total_bytes == sum(b for shard in written for _, b in shard.values())
    for shard in written:  # at most 20 kB, unless one tensor alone is larger
        assert len(shard) == 1 or sum(b for _, b in shard.values()) <= 20_000
    if family == "llama":  # no weight conversion: every tensor written straight from the model's own memory
        own = {p.data_ptr() for p in model.parameters()}
        assert all(ptr in own for shard in written for ptr, _ in shard.values())
    reloaded = _plain_load(folder, dtype=torch.float32)
    ids, mask = padded_batch()
    assert torch.equal(_logits(reloaded, ids, mask), _expected(model, [0, 3], ids, mask))


def test_weights_keep_their_dtype(tmp_path):
    model = tiny_model("llama").to(torch.bfloat16)
    save_without_layers(model, [2], tmp_path / "bf16")
    with safe_open(tmp_path / "bf16" / "model.safetensors", "pt") as f:
        names = f.keys()
        assert {f.get_slice(k).get_dtype() for k in names} == {"BF16"}
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    reloaded = _plain_load(tmp_path / "bf16", dtype="auto")
    assert reloaded.dtype == torch.bfloat16
    # Bit-identical weights. (Logits are not compared: a model cast with .to(bfloat16) also casts its rotary
    # inv_freq buffer, which from_pretrained keeps in float32, as after any save_pretrained round trip.)
    original = model.state_dict()
    for key, value in reloaded.named_parameters():
        old = key.replace("model.layers.2.", "model.layers.3.")  # kept blocks 0, 1, 3: new block 2 is old 3
        assert value.dtype == torch.bfloat16 and torch.equal(value, original[old]), key


def test_tokenizer_generation_config_card_and_provenance(tokenizer, tmp_path):
    model = _model("llama")
    loaded = LoadedModel.wrap(model, tokenizer, name="tiny")
    loaded.source, loaded.revision = "meta-llama/Llama-2-7b-hf", "main"
    folder = tmp_path / "with-tokenizer"
    saved = save_without_layers(loaded, [1, 2], folder, strategy="angular", provenance={"n": 2},
                                extra_files={"scores.csv": "layer,score\n1,0.1\n2,0.2\n"})
    reread = tf.AutoTokenizer.from_pretrained(folder)
    text = "Deep blocks add a small update."
    assert reread(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert (folder / "generation_config.json").is_file()
    assert (folder / "scores.csv").read_text().startswith("layer,score")

    card = (folder / "README.md").read_text()
    assert card.startswith("---\nbase_model: meta-llama/Llama-2-7b-hf\n")
    assert "tags: [lnsdiag, pruned]" in card.split("---")[1]
    assert "| Removed layers (0-based, original numbering) | 1, 2 |" in card
    assert "angular" in card and "2 of 4" in card and "from_pretrained" in card

    record = json.loads((folder / PROVENANCE_FILE).read_text())
    assert record == saved.provenance == read_provenance(folder)
    assert (record["source"], record["revision"], record["strategy"], record["n"]) == (
        "meta-llama/Llama-2-7b-hf", "main", "angular", 2)
    assert (record["removed_layers"], record["kept_layers"], record["original_layers"]) == ([1, 2], [0, 3], 4)
    assert record["created"] and record["lnsdiag"] and record["weight_files"] == ["model.safetensors"]
    # Nothing else is left in the folder: no temporary files, no half shards.
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".")]
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_model_card():
    card = model_card(source="Qwen/Qwen3-8B", revision="abc123", removed=[30, 27], num_layers=36,
                      strategy="angular distance", n=2, version="9.9",
                      scores=[{"layer": 27, "mmlu": 0.7512, "delta": -0.0021}, {"layer": 30, "mmlu": 0.74}],
                      path="out/qwen-pruned")
    front, body = card.split("---\n", 2)[1:]
    assert front == "base_model: Qwen/Qwen3-8B\nlibrary_name: transformers\ntags: [lnsdiag, pruned]\n"
    assert "# Qwen3-8B, without layers 27, 30" in body
    assert "| Source model | `Qwen/Qwen3-8B` @ `abc123` |" in body
    assert "| Strategy | angular distance (N = 2) |" in body
    assert "| Layers kept | 34 of 36 |" in body and "| Made with | lnsdiag 9.9 |" in body
    assert "| layer | mmlu | delta |\n|---|---|---|\n| 27 | 0.7512 | -0.0021 |\n| 30 | 0.74 |  |" in body
    assert 'AutoModelForCausalLM.from_pretrained("out/qwen-pruned")' in body
    assert "LayerNorm Scaling" not in body
    local = model_card(source="/models/my-llama", removed=[3], num_layers=8, norm_scheme="LayerNorm Scaling")
    assert "base_model:" not in local.split("---")[1]  # a local path is no hub id
    assert "load_model(" in local and "`lns`" in local
    unnamed = model_card(source=None, removed=[0], num_layers=2)
    assert "base_model" not in unnamed and "| Source model | not recorded |" in unnamed


def test_refuses_a_non_empty_folder_unless_overwrite(tmp_path):
    model = _model("llama")
    folder = tmp_path / "out"
    folder.mkdir()  # an existing empty folder is fine
    save_without_layers(model, [1, 2], folder, strategy="first")
    with pytest.raises(UserError, match=r"not empty.*overwrite=True"):
        save_without_layers(model, [0, 3], folder)
    assert read_provenance(folder)["removed_layers"] == [1, 2]
    (folder / "stale.txt").write_text("from before")
    saved = save_without_layers(model, [0, 3], folder, overwrite=True, strategy="second")
    assert read_provenance(folder)["removed_layers"] == [0, 3] == list(saved.removed)
    assert not (folder / "stale.txt").exists()  # replaced, not merged
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the old copy is gone too
    ids, mask = padded_batch()
    assert torch.equal(_logits(_plain_load(folder), ids, mask), _expected(model, [0, 3], ids, mask))

    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("mine")
    with pytest.raises(UserError, match="only a model folder"):
        save_without_layers(model, [1], other, overwrite=True)
    assert (other / "todo.txt").read_text() == "mine"
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        save_without_layers(model, [1], tmp_path / "file")


@pytest.mark.parametrize("layers,match", [([], "no layer to remove"), ([0, 1, 2, 3], "cannot remove all 4"),
                                          ([4], "out of range")])
def test_refuses_removing_nothing_or_everything(layers, match, tmp_path):
    with pytest.raises(UserError, match=match):
        save_without_layers(_model("llama"), layers, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_refuses_bad_options(tokenizer, tmp_path):
    model = _model("llama")
    with pytest.raises(UserError, match="not a size"):
        save_without_layers(model, [1], tmp_path / "out", max_shard_size="big")
    with pytest.raises(UserError, match="replace a file of the checkpoint"):
        save_without_layers(model, [1], tmp_path / "out", extra_files={"config.json": "{}"})
    with pytest.raises(UserError, match="replace a file of the checkpoint"):  # one the tokenizer writes
        save_without_layers(model, [1], tmp_path / "out", tokenizer=tokenizer,
                            extra_files={"tokenizer_config.json": ""})
    with pytest.raises(UserError, match="plain file name"):
        save_without_layers(model, [1], tmp_path / "out", extra_files={"../escape.txt": ""})
    with pytest.raises(UserError, match="set by lnsdiag"):
        save_without_layers(model, [1], tmp_path / "out", provenance={"removed_layers": [0]})
    assert list(tmp_path.iterdir()) == []
    assert parse_size("20KB") == 20_000 and parse_size("2GiB") == 2**31 and parse_size(512) == 512


def test_an_exception_midway_leaves_nothing_behind(tmp_path, monkeypatch):
    model = _model("llama")
    folder = tmp_path / "out"
    calls = []
    real_save = rebuild._save_shard

    def failing(tensors, path):
        calls.append(path)
        if len(calls) == 3:
            raise OSError("disk full")
        real_save(tensors, path)

    monkeypatch.setattr(rebuild, "_save_shard", failing)
    with pytest.raises(OSError, match="disk full"):
        save_without_layers(model, [1, 2], folder, max_shard_size="20KB")
    assert len(calls) == 3
    assert list(tmp_path.iterdir()) == []  # no target, no hidden temporary folder

    # Replacing a checkpoint: a failure keeps the old one whole.
    monkeypatch.setattr(rebuild, "_save_shard", real_save)
    save_without_layers(model, [1, 2], folder)
    files = {p.name: p.read_bytes() for p in folder.iterdir()}
    calls.clear()
    monkeypatch.setattr(rebuild, "_save_shard", failing)
    with pytest.raises(OSError, match="disk full"):
        save_without_layers(model, [0], folder, max_shard_size="20KB", overwrite=True)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == files
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]

    # Ctrl-C while the tokenizer is written: the same.
    monkeypatch.setattr(rebuild, "_save_shard", real_save)

    class Interrupting:
        def save_pretrained(self, _folder):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        save_without_layers(model, [3], tmp_path / "other", tokenizer=Interrupting())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def _close(got, want):
    """float32 logits equal up to the rounding of folding (the scale times the weight vs times the output)."""
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_layernorm_scaling_model_is_written_folded(tokenizer, tmp_path):
    """An LNS model without two of its 8 blocks: each kept block's norm weights carry its ORIGINAL 1/sqrt(l)
    (block 7 becomes the 5th block and keeps 1/sqrt(8)); plain transformers computes the pruned LNS model,
    lnsdiag's load installs no hook on top, the original in memory is untouched."""
    from lnsdiag.interventions.lns import has_lns_hooks

    model = apply_lns(tiny_model("llama", num_hidden_layers=8))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ids, mask = padded_batch()
    expected = _expected(model, [1, 2], ids, mask)
    folder = tmp_path / "lns"
    saved = save_without_layers(model, [1, 2], folder, tokenizer=tokenizer)
    assert saved.folded_norms == 12 and saved.fold_rounding < 1e-6
    config = json.loads((folder / "config.json").read_text())
    assert config["lns"] == {"scale": "1/sqrt(l)", "norms": ["input_layernorm", "post_attention_layernorm"],
                             "layers": [1, 4, 5, 6, 7, 8], "version": 2, "folded": True}
    written = load_file(folder / "model.safetensors")
    for new, old in enumerate([0, 3, 4, 5, 6, 7]):
        for norm in ("input_layernorm", "post_attention_layernorm"):
            want = (state[f"model.layers.{old}.{norm}.weight"].double() / (old + 1) ** 0.5).float()
            assert torch.equal(written[f"model.layers.{new}.{norm}.weight"], want), (new, norm)
        assert torch.equal(written[f"model.layers.{new}.mlp.down_proj.weight"],
                           state[f"model.layers.{old}.mlp.down_proj.weight"])  # nothing else changed
    plain = _plain_load(folder, dtype=torch.float32)
    _close(_logits(plain, ids, mask), expected)
    loaded = load_model(str(folder), dtype="float32", device="cpu")
    assert not has_lns_hooks(loaded.model)
    assert torch.equal(_logits(loaded.model, ids, mask), _logits(plain, ids, mask))  # never scaled twice
    assert model.config.lns["layers"] == list(range(1, 9)) and "folded" not in model.config.lns
    assert has_lns_hooks(model) and all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    card = (folder / "README.md").read_text()
    assert "folded into the norm weights" in card and "Plain transformers, vLLM and lm-eval compute it" in card
    assert "load_model(" not in card
    record = read_provenance(folder)
    assert record["norm_scheme"] == "LayerNorm Scaling (folded)" and record["lns"]["layers"] == [1, 4, 5, 6, 7, 8]

    again = tmp_path / "again"  # the folded checkpoint pruned once more: nothing folded twice, l kept
    save_without_layers(loaded, [0], again)
    assert json.loads((again / "config.json").read_text())["lns"]["layers"] == [4, 5, 6, 7, 8]
    with removed_layers(loaded.model, [0]):
        _close(_logits(_plain_load(again, dtype=torch.float32), ids, mask), _logits(loaded.model, ids, mask))


@pytest.mark.parametrize("family", ["gpt_neox", "opt", "gemma2"])
def test_layernorm_scaling_with_biases_and_one_plus_norms(family, tmp_path):
    """LayerNorms with biases (GPT-NeoX, OPT: w·x̂ + b, both scaled) and Gemma's (1 + w)·x̂ (w' = s(1 + w) − 1)."""
    model = apply_lns(tiny_model(family))
    ids, mask = padded_batch()
    expected = _expected(model, [1], ids, mask)
    save_without_layers(model, [1], tmp_path / family)
    _close(_logits(_plain_load(tmp_path / family, dtype=torch.float32), ids, mask), expected)


def test_an_unfolded_lns_checkpoint_still_loads_and_is_saved_folded(tmp_path):
    """The shipped demo LNS twin predates folding (config.lns without "folded"): lnsdiag still loads it with
    its hooks; pruned and saved, it is written folded, and plain transformers computes the pruned LNS model."""
    from lnsdiag.demo.model import DemoSpec, shipped_dir
    from lnsdiag.interventions.lns import has_lns_hooks

    shipped = shipped_dir(DemoSpec(norm="lns"))
    assert "folded" not in json.loads((shipped / "config.json").read_text())["lns"]
    loaded = load_model(str(shipped), dtype="float32", device="cpu")
    assert has_lns_hooks(loaded.model)
    ids = torch.randint(3, 4000, (2, 24), generator=torch.Generator().manual_seed(0))
    lns_logits = _logits(loaded.model, ids)
    unscaled = _plain_load(shipped, dtype=torch.float32)
    assert (_logits(unscaled, ids) - lns_logits).abs().max() > 1.0  # what plain transformers made of it before
    expected = _expected(loaded.model, [4, 9], ids)
    save_without_layers(loaded, [4, 9], tmp_path / "pruned")
    plain = _plain_load(tmp_path / "pruned", dtype=torch.float32)
    _close(_logits(plain, ids), expected)
    again = load_model(str(tmp_path / "pruned"), dtype="float32", device="cpu")
    assert not has_lns_hooks(again.model) and torch.equal(_logits(again.model, ids), _logits(plain, ids))


def test_a_callers_card_gets_the_folding_paragraph(tmp_path):
    model = apply_lns(tiny_model("llama"))
    save_without_layers(model, [2], tmp_path / "out", card="# My pruned model\n\nScores: fine.\n")
    card = (tmp_path / "out" / "README.md").read_text()
    assert card.startswith("# My pruned model") and card.count("folded into the norm weights") == 1


def test_inspect_shows_a_pruned_checkpoint(tokenizer, tmp_path):
    from lnsdiag.cli import app

    folder = tmp_path / "pruned"
    save_without_layers(_model("llama"), [0, 2], folder, tokenizer=tokenizer, source="meta-llama/Llama-2-7b-hf",
                        revision="main", strategy="angular")
    result = CliRunner().invoke(app, ["inspect", str(folder)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "model.layers (2 ×" in text and "pre-LN" in text
    assert "checkpoint pruned from meta-llama/Llama-2-7b-hf @ main: layers 0, 2 of 4 removed (original numbering) " \
           "by angular" in text


def test_inspect_shows_a_folded_lns_checkpoint(tokenizer, tmp_path):
    from lnsdiag.cli import app

    folder = tmp_path / "pruned"
    save_without_layers(apply_lns(tiny_model("llama", vocab_size=len(tokenizer))), [1], folder, tokenizer=tokenizer,
                        source="my/lns-model")
    result = CliRunner().invoke(app, ["inspect", str(folder)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "pre-LN+LNS" in text and "LayerNorm Scaling folded into the norm weights (every runtime computes it)" in text
