"""Options a careless user gets wrong: each is refused with one ``error:`` line naming the flag, exit 2,
before anything is written (no --out folder, no settings.json, no variants/), and where the check
needs no model, before the model loads."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest
from typer.testing import CliRunner

from lnsdiag.cli import app
from lnsdiag.errors import OptionError, UserError
from lnsdiag.results.margins import BUILTIN_PPL_METRICS, BUILTIN_PPL_TASK, Margins
from lnsdiag.runners.shrink import ShrinkConfig
from tests.lmeval_tasks import write_tasks
from tests.test_cli_basic import assert_one_line_error

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture()
def no_model_load(monkeypatch):
    """Fail the test if the command gets as far as loading the model."""
    from lnsdiag.model import load

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr(load, "load_model", refuse)


def refused(result, fragment, out):
    """One ``error:`` line containing ``fragment``, exit 2, and no --out folder."""
    assert_one_line_error(result, fragment)
    assert result.exit_code == 2, result.output
    assert not out.exists(), sorted(p.name for p in out.rglob("*"))


# --- 1. margins checked per metric kind, and against the run's metrics --------------------------------

@pytest.mark.parametrize("margin,fragment", [
    ("2", "--margin '2': an absolute margin applies to bounded metrics (accuracy-like, scored 0..1) and must be "
          "below 1"),
    ("acc=2", "--margin 'acc=2': acc is scored 0..1"),
    ("50%", "--margin '50%': a bare percentage applies to perplexity-like metrics"),
    ("foo=1%", "--margin 'foo=1%': this run scores no metric 'foo' (its metrics: acc, acc_norm)"),
    ("0.01,0.02", "--margin '0.01,0.02' gives an absolute margin (bounded metrics) twice"),
])
def test_margins_out_of_range_unused_or_unknown(margin, fragment, tiny_llama_dir, tmp_path, no_model_load):
    tasks = write_tasks(tmp_path / "tasks")
    out = tmp_path / "results" / "run"
    result = invoke("prune", tiny_llama_dir, "--include-path", tasks, "--tasks", "tiny_mc", "--margin", margin,
                    "--out", out)
    refused(result, fragment, out)


def test_margins_in_the_library():
    with pytest.raises(OptionError, match=r"^margin '2': an absolute margin"):
        Margins.parse("2")
    with pytest.raises(OptionError, match="no metric 'foo'"):
        Margins.parse("foo=1%", ["acc", "acc_norm"])
    with pytest.raises(OptionError, match="none of this run's metrics is one"):
        Margins.parse("0.02", list(BUILTIN_PPL_METRICS))
    assert Margins.parse("bleu=5").of("bleu", 20.0) == 5  # a 0–100 metric, named: below 100 is fine
    assert Margins.parse("0.02,ppl=2%", ["acc", "ppl"]).of("ppl", 50.0) == pytest.approx(1.0)
    assert Margins.parse("exact_match[strict-match]=0.05", ["exact_match[strict-match]"]).per_metric


def test_builtin_perplexity_metrics_are_the_scorers():
    from lnsdiag.scoring.perplexity import PPL_TASK, Perplexity

    rows = Perplexity([2.0, 3.0], [4, 4], [10, 12]).rows()  # nll, tokens, bytes per unit
    assert (PPL_TASK, tuple(r.metric for r in rows)) == (BUILTIN_PPL_TASK, BUILTIN_PPL_METRICS)


# --- 2. an option given twice ---------------------------------------------------------------------

@pytest.mark.parametrize("args,fragment", [
    (["shrink", "{m}", "--ppl-text", "{t}", "--remove", 1, "-n", 2], "--remove given twice: give it once"),
    (["prune", "{m}", "--ppl-text", "{t}", "--layers", 1, "--layers", 2], "--layers given twice"),
    (["angular", "{m}", "--text-file", "{t}", "--seq-len", 8, "--seq-len", 16, "--seq-len", 32],
     "--seq-len given three times"),
    (["prune", "{m}", "--ppl-text", "{t}", "--out", "{o}", "--out", "{o}2"], "--out given twice"),
])
def test_an_option_given_twice(args, fragment, tiny_llama_dir, text_file, tmp_path, no_model_load):
    out = tmp_path / "results" / "run"
    filled = [str(a).format(m=tiny_llama_dir, t=text_file, o=out) for a in args]
    result = invoke(*filled, *(["--out", out] if "--out" not in filled else []))
    refused(result, fragment, out)
    assert not (tmp_path / "results").exists()


def test_tasks_and_strategies_repeat_as_lists(tiny_llama_dir, text_file, tmp_path, monkeypatch):
    """Where a list makes sense, a repeated option adds to it (and commas still work)."""
    seen = {}

    def fake(name):
        def run(loaded, config, folder, **kwargs):
            seen[name] = config
            raise UserError("stop here")
        return run

    monkeypatch.setattr("lnsdiag.cli.shrink.run", fake("shrink"))
    monkeypatch.setattr("lnsdiag.cli.prune.run", fake("prune"))
    tasks = write_tasks(tmp_path / "tasks")
    result = invoke("shrink", tiny_llama_dir, "--ppl-text", text_file, "--remove", 2, "--strategy", "last", "-s",
                    "bi,last", "--out", tmp_path / "s")
    assert_one_line_error(result, "stop here")
    assert seen["shrink"].strategies == ("last", "bi")
    result = invoke("prune", tiny_llama_dir, "--include-path", tasks, "--tasks", "tiny_mc", "-t", "tiny_ppl,tiny_mc",
                    "--out", tmp_path / "p")
    assert_one_line_error(result, "stop here")
    assert seen["prune"].tasks == ("tiny_mc", "tiny_ppl")


# --- 3. conflicting options, refused alike ------------------------------------------------------------

@pytest.mark.parametrize("args,fragment", [
    (["shrink", "{m}", "--ppl-text", "{t}", "--layers", 1, "--remove", 3], "give --layers or --remove, not both"),
    (["angular", "{m}", "--text-file", "{t}", "--dataset", "stdlib"], "give --text-file or --dataset, not both"),
    (["variance", "{m}", "--text-file", "{t}", "--split", "train"], "--split applies to a dataset, not to --text-file"),
    (["angular", "{m}", "--dataset-config", "x"], "--dataset-config needs --dataset"),
    (["prune", "{m}", "--ppl-text", "{t}", "--ppl-dataset-config", "x"], "--ppl-dataset-config applies to "
                                                                          "--ppl-dataset"),
    (["prune", "{m}", "--ppl-text", "{t}", "--ppl-dataset", "stdlib"], "give --ppl-text or --ppl-dataset, not both"),
    (["shrink", "{m}", "--ppl-text", "{t}", "--overwrite"], "--overwrite applies to --save"),
    (["shrink", "{m}", "--ppl-text", "{t}", "--save-strategy", "last"], "--save-strategy applies to --save"),
    (["prune", "{m}", "--tasks", "mmlu", "--no-kl"], "--no-kl applies to the perplexity text"),
    (["prune", "{m}", "--ppl-text", "{t}", "--margin", "kl=5%"], "--margin 'kl=5%': kl is a divergence from the full "
                                                                "model"),
    (["shrink", "{m}", "--ppl-text", "{t}", "--margin", "kl_p99=0.1"], "kl_p99 is reported without a test"),
    (["prune", "{m}", "--ppl-text", "{t}", "--fidelity-tasks"], "--fidelity-tasks compares on the lm-eval tasks' "
                                                                "tokens: give --tasks too, or drop it"),
    (["shrink", "{m}", "--ppl-text", "{t}", "--generate", "-1"], "--generate must be a count of tokens (0: off), "
                                                                 "not -1"),
    (["prune", "{m}", "--ppl-text", "{t}", "--generate", "8", "--margin", "first_miss=2"],
     "first_miss is reported without a test"),
    (["shrink", "{m}", "--ppl-text", "{t}", "--calib-text", "{t}"], "--calib-text applies to --heal: give --heal "
                                                                    "linear too, or drop it"),
    (["shrink", "{m}", "--ppl-text", "{t}", "--heal", "lora", "--heal-loss", "ce"], "--heal-loss must be kd (distil "
                                                                                "the full model) or lm"),
    (["shrink", "{m}", "--ppl-text", "{t}", "--heal", "lora", "--heal-steps", "0"], "--heal-steps must be at least "
                                                                                "1, not 0"),
    (["shrink", "{m}", "--ppl-text", "{t}", "--heal", "linaer"], "--heal 'linaer' is not a heal: the heals are "
                                                                 "linear, lora"),
    (["shrink", "{m}", "--ppl-text", "{t}", "--heal", "linear", "--save-heal", "linear"], "--save-heal applies "
                                                                                          "to --save"),
    (["shrink", "{m}", "--ppl-text", "{t}", "--heal", "linear", "--calib-text", "{t}", "--calib-dataset", "stdlib"],
     "give --calib-text or --calib-dataset, not both"),
    (["shrink", "{m}", "--ppl-text", "{t}", "--heal", "linear", "--heal-ridge", "-1"], "--heal-ridge must be 0 or "
                                                                                       "more, not -1"),
])
def test_conflicting_options(args, fragment, tiny_llama_dir, text_file, tmp_path, no_model_load):
    out = tmp_path / "results" / "run"
    result = invoke(*[str(a).format(m=tiny_llama_dir, t=text_file) for a in args], "--out", out)
    refused(result, fragment, out)


def test_layers_and_remove_in_the_library():
    with pytest.raises(OptionError, match=r"^give layers or remove, not both"):
        ShrinkConfig(layers="1", remove=3)
    assert ShrinkConfig(layers="1,2").remove == 2 and ShrinkConfig().remove == 4


# --- 4. empty values that name something ------------------------------------------------------------

@pytest.mark.parametrize("args,fragment", [
    (["prune", "{m}", "--tasks", ""], "--tasks is empty"),
    (["prune", "{m}", "--tasks", " , "], "--tasks ' , ' names no task"),
    (["angular", "{m}", "--text-file", ""], "--text-file is empty"),
    (["angular", ""], "the MODEL argument is empty"),
])
def test_empty_values(args, fragment, tiny_llama_dir, tmp_path, no_model_load):
    out = tmp_path / "results" / "run"
    result = invoke(*[str(a).format(m=tiny_llama_dir) for a in args], "--out", out)
    refused(result, fragment, out)


def test_empty_out_is_not_the_current_folder(tiny_llama_dir, text_file, tmp_path, monkeypatch, no_model_load):
    monkeypatch.chdir(tmp_path)
    before = sorted(tmp_path.iterdir())
    result = invoke("angular", tiny_llama_dir, "--text-file", text_file, "--out", "")
    assert_one_line_error(result, "--out is empty")
    assert result.exit_code == 2 and sorted(tmp_path.iterdir()) == before


# --- 5. late refusals, now early ----------------------------------------------------------------------

@pytest.mark.parametrize("rank_by,fragment", [
    ("foo/bar", "--rank-by foo/bar: 'foo' is not scored in this run (scored: ppl, fidelity)"),
    ("ppl/acc", "--rank-by ppl/acc: task 'ppl' reports no metric 'acc' (it reports: ppl, bits_per_byte, nll)"),
])
def test_rank_by_what_the_run_does_not_score(rank_by, fragment, tiny_llama_dir, text_file, tmp_path, no_model_load):
    out = tmp_path / "results" / "run"
    result = invoke("shrink", tiny_llama_dir, "--ppl-text", text_file, "--rank-by", rank_by, "--out", out)
    refused(result, fragment, out)


def test_a_continuation_longer_than_the_windows_is_refused_before_any_output(tiny_llama_dir, text_file, tmp_path):
    out = tmp_path / "results" / "run"
    result = invoke("prune", tiny_llama_dir, "--ppl-text", text_file, "--seq-len", 32, "--generate", 32, "--out", out)
    refused(result, "--generate 32 leaves no room for a prompt in the text's 32-token windows: ask fewer tokens or "
                    "a longer --seq-len", out)


def test_calibration_text_that_is_the_evaluation_text_is_refused_before_any_output(tiny_llama_dir, text_file,
                                                                                     tmp_path):
    out = tmp_path / "results" / "run"
    result = invoke("shrink", tiny_llama_dir, "--ppl-text", text_file, "--seq-len", 32, "--remove", 1, "--heal",
                    "linear", "--calib-text", text_file, "--out", out)
    refused(result, "the calibration text contains 1 document(s) of the evaluation text", out)


def test_task_fidelity_on_tasks_that_only_generate(tiny_llama_dir, tmp_path, no_model_load):
    from tests.lmeval_tasks import write_generation_task

    (tmp_path / "tasks").mkdir()
    tasks = write_generation_task(tmp_path / "tasks")
    out = tmp_path / "results" / "run"
    result = invoke("prune", tiny_llama_dir, "--tasks", "tiny_gen", "--include-path", tasks, "--fidelity-tasks",
                    "--out", out)
    refused(result, "--fidelity-tasks compares on log-likelihood tasks' requests; tiny_gen only generate "
                    "(use --generate N)", out)


def test_reuse_of_other_settings_writes_nothing(tiny_llama_dir, text_file, tmp_path):
    other = tmp_path / "other"
    (other / "variants").mkdir(parents=True)
    (other / "settings.json").write_text(json.dumps({"model": "someone/else", "seed": 1}))
    out = tmp_path / "results" / "run"
    result = invoke("shrink", tiny_llama_dir, "--ppl-text", text_file, "--ppl-max-tokens", 64, "--seq-len", 32,
                    "--strategy", "last", "--remove", 1, "--reuse", other, "--out", out)
    refused(result, f"--reuse {other}: made with other settings (model, ", out)


def test_reuse_with_unreadable_settings(tiny_llama_dir, text_file, tmp_path, no_model_load):
    other = tmp_path / "other"
    other.mkdir()
    (other / "settings.json").write_text('{"model": ')
    out = tmp_path / "results" / "run"
    result = invoke("shrink", tiny_llama_dir, "--ppl-text", text_file, "--reuse", other, "--out", out)
    refused(result, f"cannot read {other / 'settings.json'} (not valid JSON): give --reuse the folder of a run", out)


@pytest.mark.parametrize("save", ["same", "parent"])
def test_save_into_the_runs_own_folder(save, tiny_llama_dir, text_file, tmp_path, no_model_load):
    out = tmp_path / "results" / "run"
    target = out if save == "same" else out.parent
    result = invoke("shrink", tiny_llama_dir, "--ppl-text", text_file, "--save", target, "--out", out)
    refused(result, f"--save {target} would hold the run's own results (--out {out})", out)


# --- 6. a model folder without its tokenizer ------------------------------------------------------------

def test_model_folder_without_tokenizer(tiny_llama_dir, text_file, tmp_path, monkeypatch):
    from lnsdiag.model import load

    folder = tmp_path / "no-tokenizer"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_llama_dir / name, folder / name)
    out = tmp_path / "results" / "run"
    result = invoke("angular", folder, "--text-file", text_file, "--out", out)
    refused(result, f"cannot load the tokenizer of {folder.resolve()}: the folder holds no tokenizer files "
                    "(tokenizer.json, ", out)
    assert result.output.strip().endswith("(tokenizer.save_pretrained(folder))")
    weights = []
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", lambda *a, **k: weights.append(a))
    with pytest.raises(UserError, match="holds no tokenizer files"):
        load.load_model(str(folder))
    assert not weights  # refused before the weights load


# --- 7. a truncated table given to compare ------------------------------------------------------------

def _prune_folder(folder, cut: str):
    folder.mkdir(parents=True)
    rows = [{"variant": "none", "removed_layer": None, "task": "t", "metric": "acc", "value": 0.8, "baseline": 0.8}]
    rows += [{"variant": f"-{i}", "removed_layer": i, "task": "t", "metric": "acc", "value": 0.7 + i / 100,
              "baseline": 0.8} for i in range(4)]
    frame = pd.DataFrame(rows)
    frame["removed_layer"] = frame["removed_layer"].astype("Int64")
    text = frame.to_csv(index=False)
    if cut == "mid-line":
        text = text[: len(text) - 6]
    elif cut == "whole lines":
        text = "".join(text.splitlines(keepends=True)[:3])
    (folder / "prune.csv").write_text(text)
    (folder / "meta.json").write_text(json.dumps({"command": "prune", "model": {"name": folder.name},
                                                  "num_layers": 4, "layers": [0, 1, 2, 3]}))
    return folder


@pytest.mark.parametrize("cut,fragment", [
    ("mid-line", "prune.csv is truncated (its last line is cut off)"),
    ("whole lines", "prune.csv is truncated: it lacks layer(s) 1, 2, 3 that its meta.json lists"),
])
def test_compare_refuses_a_truncated_table(cut, fragment, tmp_path):
    good = _prune_folder(tmp_path / "good", "no")
    bad = _prune_folder(tmp_path / "bad", cut)
    out = tmp_path / "results" / "cmp"
    result = invoke("compare", good, bad, "--out", out)
    refused(result, fragment, out)
    assert str(bad / "prune.csv") in result.output


# --- 8. a resumed run whose settings.json is damaged ------------------------------------------------------

@pytest.mark.parametrize("command", ["prune", "shrink"])
def test_corrupt_settings_in_out(command, tiny_llama_dir, text_file, tmp_path, no_model_load):
    out = tmp_path / "run"
    out.mkdir()
    (out / "settings.json").write_text('{"model": "x", ')
    result = invoke(command, tiny_llama_dir, "--ppl-text", text_file, "--out", out)
    assert_one_line_error(result, f"cannot read {out / 'settings.json'} (not valid JSON): rerun with --fresh")
    assert result.exit_code == 2
    assert sorted(p.name for p in out.iterdir()) == ["settings.json"]


def test_corrupt_settings_in_the_library(tmp_path):
    from lnsdiag.results.store import ResultStore

    (tmp_path / "settings.json").write_text("[1, 2")
    with pytest.raises(UserError, match=r"settings.json \(not valid JSON\): rerun with --fresh"):
        ResultStore(tmp_path, {"model": "x"})
    ResultStore(tmp_path, {"model": "x"}, fresh=True)  # --fresh replaces it
