"""The command line end to end: angular on a saved tiny model, and one-line errors."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from typer.testing import CliRunner

from lnsdiag.cli import app

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def assert_one_line_error(result, fragment: str) -> None:
    assert result.exit_code != 0, result.output
    text = result.output.strip()
    assert "Traceback" not in text
    assert fragment in text, text
    assert text.count("error:") == 1


def test_angular_writes_everything(tiny_llama_dir, text_file, tmp_path):
    out = tmp_path / "ang"
    res = invoke("angular", tiny_llama_dir, "--text-file", text_file, "--out", out, "--max-tokens", 600,
                 "--seq-len", 64, "--batch-size", 3)
    assert res.exit_code == 0, res.output
    assert "near-identity" in res.output or "0 of 4 layers" in res.output
    layers = pd.read_csv(out / "angular.csv")
    assert list(layers["layer"]) == [0, 1, 2, 3]
    assert {"angular_distance", "block_influence", "near_identity"} <= set(layers.columns)
    blocks = pd.read_csv(out / "angular_blocks.csv")
    assert {"start_layer", "block_size", "angular_distance"} <= set(blocks.columns)
    assert blocks["block_size"].max() == 4
    for name in ("angular.png", "angular.pdf", "angular_heatmap.png", "angular_heatmap.pdf"):
        assert (out / name).stat().st_size > 1000
    meta = json.loads((out / "meta.json").read_text())
    assert meta["model"]["source"] == str(tiny_llama_dir.resolve())
    assert meta["tokens_used"] == 600
    assert meta["norm_placement"] == "pre-LN"
    assert meta["text"].startswith("file:")
    assert meta["versions"]["torch"] and meta["versions"]["transformers"]
    assert "measure" in meta["timings"]


def test_model_option_and_last_tokens(tiny_llama_dir, text_file, tmp_path):
    res = invoke("angular", "--model", tiny_llama_dir, "--text-file", text_file, "--out", tmp_path,
                 "--max-tokens", 640, "--seq-len", 64, "--tokens", "last", "--max-block", 2)
    assert res.exit_code == 0, res.output
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["tokens_used"] == 10  # one per sequence
    assert pd.read_csv(tmp_path / "angular_blocks.csv")["block_size"].max() == 2


def test_default_output_folder(tiny_llama_dir, text_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = invoke("angular", tiny_llama_dir, "--text-file", text_file, "--max-tokens", 200, "--seq-len", 64)
    assert res.exit_code == 0, res.output
    assert (tmp_path / "results" / tiny_llama_dir.name / "angular" / "angular.csv").is_file()


def test_inspect_and_models(tiny_llama_dir):
    res = invoke("inspect", tiny_llama_dir)
    assert res.exit_code == 0, res.output
    assert "model.layers" in res.output and "pre-LN" in res.output and "attn: self_attn, mlp: mlp" in res.output
    res = invoke("models")
    assert "meta-llama/Llama-2-7b-hf" in res.output and "Qwen/Qwen3-8B" in res.output


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["angular", "./no/such/dir"], "no such model directory"),
        (["angular", "bad id with spaces"], "valid Hugging Face model id"),
        (["angular", "org//name"], "no such model directory"),
        (["angular", "someone-unknown/definitely-not-a-model"], "cannot load"),
        (["angular"], "no model given"),
    ],
)
def test_bad_model_errors(args, fragment, tmp_path):
    assert_one_line_error(invoke(*args, "--out", tmp_path), fragment)


def test_text_errors(tiny_llama_dir, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    assert_one_line_error(invoke("angular", tiny_llama_dir, "--text-file", empty, "--out", tmp_path), "is empty")
    assert_one_line_error(invoke("angular", tiny_llama_dir, "--text-file", tmp_path / "missing.txt",
                                 "--out", tmp_path), "no such text file")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": "x"}\n')
    assert_one_line_error(invoke("angular", tiny_llama_dir, "--text-file", bad, "--out", tmp_path), "'text' field")


def test_option_errors(tiny_llama_dir, text_file, tmp_path):
    base = ["angular", tiny_llama_dir, "--text-file", text_file, "--seq-len", 64, "--max-tokens", 128]
    assert_one_line_error(invoke(*base, "--max-block", 9, "--out", tmp_path), "--max-block 9")
    assert_one_line_error(invoke(*base, "--tokens", "first", "--out", tmp_path), "--tokens")
    assert_one_line_error(invoke(*base, "--layers-path", "model.nothing", "--out", tmp_path), "--layers-path")
    assert_one_line_error(invoke(*base[:4], "--seq-len", 100000, "--out", tmp_path), "context length")


def test_unwritable_out(tiny_llama_dir, text_file, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert_one_line_error(invoke("angular", tiny_llama_dir, "--text-file", text_file, "--out", blocker / "sub"),
                          "cannot write to")


def test_unknown_architecture(tmp_path, text_file, tokenizer):
    """A model whose blocks live somewhere unknown: a clear error naming --layers-path."""
    import torch
    import transformers as tf

    class OddConfig(tf.PretrainedConfig):
        model_type = "lnsdiag-odd"

        def __init__(self, vocab_size=300, hidden_size=8, **kw):
            super().__init__(**kw)
            self.vocab_size, self.hidden_size = vocab_size, hidden_size

    class OddModel(tf.PreTrainedModel):
        config_class = OddConfig

        def __init__(self, config):
            super().__init__(config)
            self.embed = torch.nn.Embedding(config.vocab_size, config.hidden_size)
            self.mix = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
            self.post_init()

        def get_input_embeddings(self):
            return self.embed

        def forward(self, input_ids=None, attention_mask=None, **kw):
            return tf.modeling_outputs.CausalLMOutput(logits=self.mix(self.embed(input_ids)))

    tf.AutoConfig.register("lnsdiag-odd", OddConfig, exist_ok=True)
    tf.AutoModelForCausalLM.register(OddConfig, OddModel, exist_ok=True)
    path = tmp_path / "odd"
    OddModel(OddConfig()).save_pretrained(path)
    tokenizer.save_pretrained(path)
    res = invoke("angular", path, "--text-file", text_file, "--out", tmp_path / "o")
    assert_one_line_error(res, "cannot find the layer stack")
    assert "--layers-path" in res.output


def test_debug_shows_traceback(tmp_path):
    from lnsdiag.errors import UserError

    with pytest.raises(UserError):
        invoke("--debug", "angular", "./no/such/dir", "--out", tmp_path)
