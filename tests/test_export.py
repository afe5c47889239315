"""``lnsdiag export`` and ``export_checkpoint``: an LNS model written with its scales folded into the norm
weights, which plain transformers computes as lnsdiag does; refusals before anything is written."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as tf

from lnsdiag.checkpoint.card import EXPORT_FILE, read_provenance
from lnsdiag.checkpoint.export import export_checkpoint
from lnsdiag.demo.model import DemoSpec, shipped_dir
from lnsdiag.errors import UserError
from lnsdiag.interventions import lns, postln
from lnsdiag.model.load import LoadedModel, load_model
from tests.families import padded_batch, tiny_model
from tests.test_demo import assert_one_line_error, invoke


def _logits(model, ids, mask=None):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, use_cache=False).logits


def _plain(folder):
    model, info = tf.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
    assert not any(info.values()), info
    return model.eval()


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_export_is_computed_by_plain_transformers(family, tokenizer, tmp_path):
    """Llama (RMSNorm) and GPT-NeoX (LayerNorms with biases): plain transformers' logits on the export equal
    the hooked LNS model's (float32, 1e-5); lnsdiag loads the export with no hook and the same logits."""
    model = lns.apply_lns(tiny_model(family, vocab_size=len(tokenizer)))
    ids, mask = padded_batch()
    expected = _logits(model, ids, mask)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    saved = export_checkpoint(LoadedModel.wrap(model, tokenizer, name="tiny"), tmp_path / "out")
    assert saved.folded_norms == 8 and saved.note is None and saved.fold_rounding < 1e-6
    plain = _plain(tmp_path / "out")
    torch.testing.assert_close(_logits(plain, ids, mask), expected, rtol=0, atol=1e-5)
    loaded = load_model(str(tmp_path / "out"), dtype="float32", device="cpu")
    assert not lns.has_lns_hooks(loaded.model) and lns.is_folded(loaded.model)
    assert torch.equal(_logits(loaded.model, ids, mask), _logits(plain, ids, mask))
    assert lns.has_lns_hooks(model) and all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["lns"]["folded"] is True and config["lns"]["layers"] == [1, 2, 3, 4]
    record = read_provenance(tmp_path / "out")
    assert record == saved.record and record["format"] == "lnsdiag-export" and record["folded_norms"] == 8
    assert record["fold_formulas"] == ["scale"] and record["weight_files"] == ["model.safetensors"]
    card = (tmp_path / "out" / "README.md").read_text()
    assert "LayerNorm Scaling folded into the weights" in card and '"folded": true' in card
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_cli_exports_an_unfolded_checkpoint(tmp_path, monkeypatch):
    """The shipped demo LNS twin (written before folding: lnsdiag adds hooks when loading it): exported, plain
    transformers computes what lnsdiag computed; --verify measures it; the source folder is not touched."""
    shipped = shipped_dir(DemoSpec(norm="lns"))
    before = {p.name: p.stat().st_mtime_ns for p in shipped.iterdir()}
    out = tmp_path / "exported"
    result = invoke("export", shipped, out, "--verify", "--dtype", "float32", "--device", "cpu")
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "LayerNorm Scaling folded into 24 norms (input_layernorm, post_attention_layernorm; l = 1..12)" in text
    assert "max |Δlogits| = " in text
    diff = float(text.split("max |Δlogits| = ")[1].split()[0])
    assert diff <= 1e-5
    ids = torch.randint(3, 4000, (2, 24), generator=torch.Generator().manual_seed(1))
    ours = load_model(str(shipped), dtype="float32", device="cpu")
    assert lns.has_lns_hooks(ours.model)
    torch.testing.assert_close(_logits(_plain(out), ids), _logits(ours.model, ids), rtol=0, atol=1e-5)
    assert {p.name: p.stat().st_mtime_ns for p in shipped.iterdir()} == before
    assert {p.name for p in out.iterdir()} >= {"config.json", "model.safetensors", "README.md", EXPORT_FILE,
                                               "tokenizer.json", "generation_config.json"}


def test_cli_refuses_before_loading_or_writing(tmp_path, tiny_llama_dir, monkeypatch):
    import lnsdiag.cli.export as cli_export

    def no_load(*_a, **_k):
        raise AssertionError("the model was loaded before the folder was checked")

    monkeypatch.setattr(cli_export, "load", no_load)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    assert_one_line_error(invoke("export", tiny_llama_dir, busy), "is not empty", "--overwrite")
    assert_one_line_error(invoke("export", tiny_llama_dir, busy, "--overwrite"), "only a model folder")
    assert [p.name for p in busy.iterdir()] == ["notes.txt"]
    assert_one_line_error(invoke("export", tiny_llama_dir, tiny_llama_dir / "inside"), "model's own folder")
    assert_one_line_error(invoke("export", tiny_llama_dir, tmp_path / "new", "--max-shard-size", "big"),
                          "not a size")
    assert not (tmp_path / "new").exists() and not (tiny_llama_dir / "inside").exists()


def test_cli_exports_a_plain_model_as_it_is_with_a_note(tmp_path, tiny_llama_dir):
    out = tmp_path / "copy"
    result = invoke("export", tiny_llama_dir, out, "--verify")
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "nothing to fold, written as it is" in text and "max |Δlogits| = 0" in text
    config = json.loads((out / "config.json").read_text())
    assert "lns" not in config
    (out / "extra.txt").write_text("x")  # --overwrite replaces a model folder whole
    assert invoke("export", tiny_llama_dir, out, "--overwrite").exit_code == 0
    assert not (out / "extra.txt").exists()


def test_library_refusals_write_nothing(tmp_path):
    with pytest.raises(UserError, match="Post-LN"):
        export_checkpoint(postln.apply_post_ln(tiny_model("llama")), tmp_path / "post")
    hooked = lns.apply_lns(tiny_model("llama"))
    del hooked.config.lns  # hooks that no record describes
    with pytest.raises(UserError, match="does not record"):
        export_checkpoint(hooked, tmp_path / "hooks")
    already = lns.fold_lns(lns.apply_lns(tiny_model("llama")))
    saved = export_checkpoint(already, tmp_path / "folded")
    assert saved.folded_norms == 0 and "already folded" in saved.note
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folded"]


def test_trained_twins_are_written_folded(tmp_path, monkeypatch):
    """A reproduce twin trained with LNS (hooks during training) is written folded: plain transformers
    computes the trained LNS model; reproduce says which twins are folded."""
    import copy

    from lnsdiag.data.text import TextSource
    from lnsdiag.demo import model as demo_model
    from lnsdiag.runners import reproduce
    from tests.conftest import SAMPLE_TEXT

    trained = {}
    real = demo_model.train_causal_lm

    def keep(model, stream, **kwargs):
        log = real(model, stream, **kwargs)
        trained["model"] = copy.deepcopy(model).eval()  # as trained: with its hooks
        return log

    monkeypatch.setattr(demo_model, "train_causal_lm", keep)
    text = TextSource("tiny", [f"{SAMPLE_TEXT} Paragraph {i} says {i * 7 % 13}.\n" for i in range(40)])
    spec = DemoSpec(layers=3, hidden=32, heads=4, intermediate=64, vocab=300, seq_len=32, batch_size=4, steps=3,
                    norm="lns")
    path, _ = demo_model.ensure_demo_model(spec, text=text)
    assert lns.has_lns_hooks(trained["model"])
    assert json.loads((path / "config.json").read_text())["lns"]["folded"] is True
    ids = torch.randint(3, 300, (2, 20), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_logits(_plain(path), ids), _logits(trained["model"], ids), rtol=0, atol=1e-5)
    result = reproduce.reproduce(spec, ["lns"], text=text, eval_tokens=256, batch_size=4)
    assert [r.lns_weights for r in result.runs] == ["folded"] and result.runs[0].placement == "pre-LN+LNS"
