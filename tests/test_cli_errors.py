"""Bad input a user can cause: one line, exit 2, and nothing left behind in --out."""

from __future__ import annotations

import pickle
import shutil

import pytest

from lnsdiag.errors import OptionError
from lnsdiag.runners.shrink import ShrinkConfig
from tests.test_cli_basic import assert_one_line_error, invoke


@pytest.fixture()
def corrupt_model_dir(tiny_llama_dir, tmp_path):
    """The tiny model with its weights file cut in half (an interrupted download)."""
    path = tmp_path / "corrupt"
    shutil.copytree(tiny_llama_dir, path)
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return path


_TEXT = ("--seq-len", 64, "--max-tokens", 128)
#: name -> (model dir, text file, tmp dir, corrupt model dir) -> (arguments, fragment of the one-line error)
BAD_INPUTS = {
    "missing model dir": lambda m, t, tmp, c: (["angular", "./no/such/dir"], "no such model directory"),
    "malformed hub id": lambda m, t, tmp, c: (["angular", "bad id with spaces"], "valid Hugging Face model id"),
    "unknown hub id offline": lambda m, t, tmp, c: (["angular", "someone-unknown/not-a-model"], "cannot load"),
    "missing text": lambda m, t, tmp, c: (["angular", m, "--text-file", tmp / "missing.txt"], "no such text file"),
    "empty text": lambda m, t, tmp, c: (["angular", m, "--text-file", _empty(tmp)], "is empty"),
    "max block too large": lambda m, t, tmp, c: (["angular", m, "--text-file", t, *_TEXT, "--max-block", 9],
                                                 "--max-block 9"),
    "bad tokens": lambda m, t, tmp, c: (["variance", m, "--text-file", t, *_TEXT, "--tokens", "first"], "--tokens"),
    "bad layers path": lambda m, t, tmp, c: (["angular", m, "--text-file", t, *_TEXT, "--layers-path", "model.x"],
                                             "--layers-path"),
    "seq len too long": lambda m, t, tmp, c: (["variance", m, "--text-file", t, "--seq-len", 100000],
                                              "context length"),
    "layer out of range": lambda m, t, tmp, c: (["prune", m, "--ppl-text", t, "--layers", 7], "out of range"),
    "malformed layers": lambda m, t, tmp, c: (["prune", m, "--ppl-text", t, "--layers", "x-2"], "malformed"),
    "bad limit": lambda m, t, tmp, c: (["prune", m, "--tasks", "x", "--limit", "1.5"], "--limit"),
    "missing ppl text": lambda m, t, tmp, c: (["prune", m, "--ppl-text", tmp / "nope.txt"], "no such text file"),
    "corrupt weights (prune)": lambda m, t, tmp, c: (["prune", c, "--ppl-text", t], "unreadable"),
    "corrupt weights (angular)": lambda m, t, tmp, c: (["angular", c, "--text-file", t, *_TEXT], "unreadable"),
    "bad steps": lambda m, t, tmp, c: (["reproduce", "--steps", 0], "--steps"),
    "shrink: remove all": lambda m, t, tmp, c: (["shrink", m, "--ppl-text", t, "--remove", 4], "leaves no layer"),
    "shrink: remove none": lambda m, t, tmp, c: (["shrink", m, "--ppl-text", t, "--remove", 0], "at least 1"),
    "shrink: unknown strategy": lambda m, t, tmp, c: (["shrink", m, "--ppl-text", t, "--strategy", "sleb"],
                                                      "unknown --strategy 'sleb'"),
    "shrink: layers and strategy": lambda m, t, tmp, c: (["shrink", m, "--ppl-text", t, "--layers", "1,2",
                                                          "--strategy", "bi"], "not both"),
    "shrink: layers out of range": lambda m, t, tmp, c: (["shrink", m, "--ppl-text", t, "--layers", "2,9"],
                                                         "out of range"),
    "shrink: save into a full folder": lambda m, t, tmp, c: (["shrink", m, "--ppl-text", t, "--save", _full(tmp)],
                                                             "--overwrite"),
    "shrink: save strategy not run": lambda m, t, tmp, c: (["shrink", m, "--ppl-text", t, "--strategy", "bi",
                                                            "--save", tmp / "new", "--save-strategy", "last"],
                                                           "--save-strategy 'last'"),
    "shrink: bad rank-by": lambda m, t, tmp, c: (["shrink", m, "--ppl-text", t, "--rank-by", "acc"], "TASK/METRIC"),
    "shrink: reuse of no result folder": lambda m, t, tmp, c: (["shrink", m, "--ppl-text", t, "--reuse", tmp],
                                                               f"--reuse {tmp}: not a prune or shrink folder"),
    "prune: unknown engine": lambda m, t, tmp, c: (["prune", m, "--ppl-text", t, "--engine", "slow"],
                                                   "--engine must be fast or naive, not 'slow'"),
    "prune: unit attention": lambda m, t, tmp, c: (["prune", m, "--ppl-text", t, "--unit", "attention"],
                                                   "--unit 'attention' is no unit kind: did you mean attn?"),
    "prune: unit empty": lambda m, t, tmp, c: (["prune", m, "--ppl-text", t, "--unit", ","], "names no unit kind"),
    "shrink: bad sub-layer": lambda m, t, tmp, c: (["shrink", m, "--ppl-text", t, "--layers", "1,3.foo"],
                                                   "'3.foo' names no unit"),
    "shrink: sub-layer of a removed block": lambda m, t, tmp, c: (["shrink", m, "--ppl-text", t, "--layers",
                                                                   "1,1.attn"], "inside block 1"),
    "prune: text and dataset": lambda m, t, tmp, c: (["prune", m, "--ppl-text", t, "--ppl-dataset", "stdlib"],
                                                     "give --ppl-text or --ppl-dataset, not both"),
}


def _full(folder):
    path = folder / "full"
    path.mkdir(exist_ok=True)
    (path / "keep.txt").write_text("mine")
    return path


def _empty(folder):
    path = folder / "empty.txt"
    path.write_text(" \n")
    return path


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_leaves_no_output_folder(case, tiny_llama_dir, text_file, tmp_path, corrupt_model_dir):
    args, fragment = BAD_INPUTS[case](tiny_llama_dir, text_file, tmp_path, corrupt_model_dir)
    out = tmp_path / "results" / "run"
    result = invoke(*args, "--out", out)
    assert_one_line_error(result, fragment)
    assert result.exit_code == 2, result.output
    assert not (tmp_path / "results").exists()


def test_an_existing_out_folder_is_kept(tiny_llama_dir, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    assert_one_line_error(invoke("angular", tiny_llama_dir, "--text-file", tmp_path / "missing.txt", "--out", out),
                          "no such text file")
    assert out.is_dir()


def test_corrupt_weights_in_the_library(corrupt_model_dir):
    from lnsdiag.errors import UserError
    from lnsdiag.model.load import load_model

    with pytest.raises(UserError, match=r"unreadable.*SafetensorError"):
        load_model(str(corrupt_model_dir))


def test_corrupt_tokenizer(tiny_llama_dir, tmp_path, text_file):
    path = tmp_path / "badtok"
    shutil.copytree(tiny_llama_dir, path)
    (path / "tokenizer.json").write_text("{not json")
    result = invoke("angular", path, "--text-file", text_file, "--out", tmp_path / "o")
    assert_one_line_error(result, "cannot load the tokenizer")
    assert result.exit_code == 2


def test_a_local_directory_wins_over_an_alias(tiny_llama_dir, text_file, tmp_path, monkeypatch):
    """Hugging Face's rule: an existing local path is used as such; the run says the alias lost."""
    import json

    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_llama_dir, tmp_path / "llama")
    result = invoke("angular", "llama", "--text-file", text_file, "--seq-len", 64, "--max-tokens", 128,
                    "--out", tmp_path / "o")
    assert result.exit_code == 0, result.output
    assert "using the local directory" in result.output and "meta-llama/Llama-2-7b-hf" in result.output
    meta = json.loads((tmp_path / "o" / "meta.json").read_text())
    assert meta["model"]["source"] == str((tmp_path / "llama").resolve())


def test_a_directory_named_like_an_alias_without_a_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mistral").mkdir()
    result = invoke("angular", "mistral", "--out", tmp_path / "o")
    assert_one_line_error(result, "holds no config.json")
    assert "mistralai/Mistral-7B-v0.1" in result.output


def test_library_errors_name_config_fields_and_the_command_line_its_flags():
    """A notebook reads the field it set (``remove``); the command line the flag that sets it (``--remove``),
    from the command's own options (``strategies`` is ``--strategy``)."""
    with pytest.raises(OptionError) as caught:
        ShrinkConfig(remove=0)
    error = caught.value
    assert str(error) == "remove must be at least 1, not 0" and error.fields == ("remove",)
    assert error.render(lambda field: f"--{field}") == "--remove must be at least 1, not 0"
    assert str(pickle.loads(pickle.dumps(error))) == str(error)
    with pytest.raises(OptionError, match=r"^unknown strategies 'sleb' "):
        ShrinkConfig(strategies="sleb")
    result = invoke("shrink", "some/model", "--strategy", "bi", "--layers", "1,2")
    assert_one_line_error(result, "give --layers or --strategy, not both: --layers scores that one set as it is")
