"""Hostile texts for the built-in perplexity: too short to predict anything."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from lnsdiag.cli import app
from tests.test_cli_basic import assert_one_line_error

runner = CliRunner()


@pytest.fixture(scope="module")
def no_bos_dir(tiny_llama_dir, tmp_path_factory):
    """The tiny Llama with a tokenizer that adds no BOS (GPT-2 style): a window's first text
    token is then its context."""
    folder = tmp_path_factory.mktemp("no-bos") / "model"
    shutil.copytree(tiny_llama_dir, folder)
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    tokenizer["post_processor"] = None
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    return folder


@pytest.mark.parametrize("command", [["prune", "--layers", "1", "--no-angular"], ["shrink", "--remove", "1"]])
def test_a_one_token_text_is_refused_before_any_output(no_bos_dir, command, tmp_path):
    text = tmp_path / "one.txt"
    text.write_text("a")
    out = tmp_path / "out"
    res = runner.invoke(app, [command[0], str(no_bos_dir), "--ppl-text", str(text), *command[1:], "--out", str(out)])
    assert res.exit_code == 2
    assert_one_line_error(res, "has no token to predict")
    assert not out.exists() or not any(out.iterdir())


def test_two_tokens_without_bos_are_scored(no_bos_dir, tmp_path):
    text = tmp_path / "two.txt"
    text.write_text("hello there")
    out = tmp_path / "out"
    res = runner.invoke(app, ["prune", str(no_bos_dir), "--ppl-text", str(text), "--layers", "1", "--no-angular",
                              "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert (out / "prune.csv").exists()
