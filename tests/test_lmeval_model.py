"""lm-eval's model type ``lnsdiag`` (``--model lnsdiag --model_args pretrained=...,remove=1+2``) and
``lnsdiag lm-eval``: the same numbers as stock HFLM on a model really built without the blocks,
for log-likelihoods, rolling perplexity and cached generation; the model intact between calls;
bad ``remove=`` values refused in one line."""

from __future__ import annotations

import glob
import json
import logging
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from lnsdiag.checkpoint.reference import build_without_layers
from lnsdiag.cli import app
from lnsdiag.interventions.removal import removed_layers
from lnsdiag.interventions.units import Removal
from lnsdiag.model.patch import patched_forward
from lnsdiag.model.structure import find_layers
from lnsdiag.scoring.lmeval.model_type import RemovalHFLM, RemoveArgError, parse_remove
from tests.lmeval_tasks import write_generation_task, write_tasks

REMOVE = (1, 2)  # of the tiny Llama's 4 blocks
TASKS = ["tiny_mc", "tiny_ppl", "tiny_gen"]  # loglikelihood, loglikelihood_rolling, generate_until
runner = CliRunner()


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory):
    folder = write_tasks(tmp_path_factory.mktemp("lm-tasks"), docs=8)
    write_generation_task(folder)
    gen = folder / "tiny_gen.yaml"  # 16 new tokens: many decoding steps reading the KV cache
    gen.write_text(gen.read_text().replace("max_gen_toks: 4", "max_gen_toks: 16").replace('until: ["\\n"]',
                                                                                          'until: ["<none>"]'))
    return folder


@pytest.fixture(scope="module")
def task_manager(tasks_dir):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(tasks_dir), include_defaults=False)


@pytest.fixture(scope="module")
def reference_dir(tiny_llama_dir, tokenizer, tmp_path_factory):
    """The tiny Llama really built without blocks 1 and 2, saved like any checkpoint."""
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    path = tmp_path_factory.mktemp("tiny-llama-without-1-2")
    build_without_layers(model, REMOVE).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _evaluate(model, model_args=None, *, task_manager, tasks=TASKS, **kwargs):
    import lm_eval

    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=tasks, task_manager=task_manager,
                                   device="cpu", batch_size=4, bootstrap_iters=0, log_samples=True, **kwargs)


# --- remove= as lm-eval passes it ------------------------------------------------------------------


@pytest.mark.parametrize(("value", "blocks"), [
    ("3+5+7", (3, 5, 7)), ("20-23", (20, 21, 22, 23)), ("3+20-21", (3, 20, 21)), (" 7 + 2 ", (7, 2)),
    ("3,5", (3, 5)), (5, (5,)), (-1.0, (-1,)), ([3, "5-6"], (3, 5, 6)), (Removal((2, 4)), (2, 4)), (None, ()),
])
def test_remove_forms(value, blocks):
    assert parse_remove(value) == blocks


@pytest.mark.parametrize(("value", "unit", "message"), [
    ("x", "block", "remove=x: 'x' is not a block number; write blocks as 3+5+7 and ranges as 20-27"),
    ("3+3", "block", "remove=3+3 names block 3 twice"),
    ("2-4+3", "block", "remove=2-4+3 names block 3 twice"),
    ("5-3", "block", "the range 5-3 runs backwards"),
    ("5.attn", "block", "removing sub-layers (5.attn) is not supported yet; only whole blocks (remove=5)"),
    ("", "block", "remove= is empty"),
    ("3-", "block", "'3-' is not a block number"),
    (2.5, "block", "2.5 is not a block number"),
    (True, "block", "True is not a block number"),
    ("3", "attn", "unit=attn: removing sub-layers (attention, MLP) is not supported yet"),
    ("3", "heads", "unit=heads is not a unit"),
])
def test_remove_refused(value, unit, message):
    with pytest.raises(RemoveArgError) as info:
        parse_remove(value, unit)
    assert message in str(info.value)
    assert isinstance(info.value, ValueError) and "\n" not in str(info.value)


# --- the same numbers as stock HFLM on the rebuilt model ------------------------------------------


def test_equals_stock_hflm_on_model_built_without_the_blocks(tiny_llama_dir, reference_dir, task_manager):
    """By its registered name, model_args as lm-eval's string: every metric and every per-request
    answer (log-likelihoods, rolling sums, generated text) equal to stock HFLM on the rebuilt model,
    exactly (CPU, float32)."""
    ours = _evaluate("lnsdiag", f"pretrained={tiny_llama_dir},remove=1+2,dtype=float32", task_manager=task_manager)
    stock = _evaluate("hf", f"pretrained={reference_dir},dtype=float32", task_manager=task_manager)
    assert ours["results"] == stock["results"]
    for task in TASKS:
        mine, theirs = ours["samples"][task], stock["samples"][task]
        assert [s["doc_id"] for s in mine] == [s["doc_id"] for s in theirs]
        assert [s["resps"] for s in mine] == [s["resps"] for s in theirs], task
        assert [s["filtered_resps"] for s in mine] == [s["filtered_resps"] for s in theirs], task
    generated = [s["resps"][0][0] for s in ours["samples"]["tiny_gen"]]
    assert min(len(stock["samples"]["tiny_gen"][i]["resps"][0][0]) for i in range(4)) > 0 and generated
    config = ours["config"]
    assert config["model"] == "lnsdiag" and "remove=1+2" in config["model_args"]
    assert (config["lnsdiag_removed"], config["lnsdiag_removed_blocks"]) == ("1,2", [1, 2])
    assert (config["lnsdiag_num_layers"], config["lnsdiag_layers_kept"]) == (4, 2)
    assert config["lnsdiag_num_parameters_kept"] == stock["config"]["model_num_parameters"]


def test_instance_removes_only_during_calls(tiny_llama_dir, tokenizer, task_manager):
    """An instance for ``simple_evaluate(model=...)``: the blocks are removed during each forward
    lm-eval makes (scoring and generation) and the model is intact between and after them,
    also when a forward fails."""
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 5, 9, 14, 30, 2, 7]])
    with torch.no_grad():
        before = model(ids).logits
    lm = RemovalHFLM(pretrained=model, tokenizer=tokenizer, remove=[1, 2], device="cpu", batch_size=4)
    stack = find_layers(model)
    seen: list[tuple] = []
    hook = stack.layers[1].register_forward_pre_hook(
        lambda *_: seen.append(tuple(patched_forward(block) for block in stack.layers)))
    try:
        out = _evaluate(lm, task_manager=task_manager, tasks=["tiny_mc", "tiny_gen"], limit=3)
    finally:
        hook.remove()
    assert seen and set(seen) == {(None, "removed", "removed", None)}
    assert all(patched_forward(block) is None for block in stack.layers)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)
    assert out["config"]["lnsdiag_removed"] == "1,2"
    with pytest.raises(IndexError):  # a token id beyond the vocabulary: the forward fails inside the removal
        lm._model_call(torch.tensor([[10**6]]))
    assert all(patched_forward(block) is None for block in stack.layers)
    with pytest.raises(RemoveArgError, match=r"remove=7: block 7 is out of range; the model has 4 blocks, "
                                             r"numbered 0-3"):
        RemovalHFLM(pretrained=model, tokenizer=tokenizer, remove=7, device="cpu")


@pytest.mark.parametrize(("args", "message"), [
    ("remove=9", "remove=9: block 9 is out of range; the model has 4 blocks, numbered 0-3"),
    ("remove=-1", "remove=-1: block -1 is out of range; the model has 4 blocks, numbered 0-3"),
    ("remove=0-3", "remove=0-3 removes all 4 blocks of the model: keep at least one"),
    ("remove=1,2", "lm-eval splits model_args at commas, so 2 reached the model as an argument of its own; "
                   "write remove=1+2"),
    ("remove=1+x", "remove=1+x: 'x' is not a block number"),
    ("remove=1,unit=mlp", "unit=mlp: removing sub-layers"),
])
def test_bad_remove_through_simple_evaluate(args, message, tiny_llama_dir, task_manager):
    with pytest.raises(ValueError) as info:
        _evaluate("lnsdiag", f"pretrained={tiny_llama_dir},{args}", task_manager=task_manager, tasks=["tiny_mc"])
    assert message in str(info.value) and "\n" not in str(info.value)


# --- lnsdiag lm-eval ---------------------------------------------------------------------------


@pytest.fixture()
def lm_eval_logging(monkeypatch):
    """lm-eval's command line configures its logger on the stream of the moment: put it back after."""
    import lm_eval.utils

    logger = logging.getLogger("lm_eval")
    monkeypatch.setattr(lm_eval.utils, "_LOGGING_CONFIGURED", False)
    saved = (logger.level, logger.propagate, list(logger.handlers))
    yield
    logger.setLevel(saved[0])
    logger.propagate = saved[1]
    logger.handlers[:] = saved[2]


def _lnsdiag(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_cli_runs_lm_eval_and_writes_its_results(tiny_llama_dir, tasks_dir, tmp_path, lm_eval_logging):
    out = tmp_path / "out"
    res = _lnsdiag("lm-eval", "--model", "lnsdiag", "--model_args", f"pretrained={tiny_llama_dir},remove=1+2",
                   "--tasks", "tiny_mc", "--include_path", tasks_dir, "--output_path", out, "--log_samples",
                   "--device", "cpu", "--limit", "4", "--batch_size", "4")
    assert res.exit_code == 0, res.output
    assert "tiny_mc" in res.output and "acc" in res.output  # lm-eval's own table
    [results] = glob.glob(str(out / "*" / "results_*.json"))
    record = json.loads(Path(results).read_text())
    assert record["config"]["model"] == "lnsdiag"
    assert record["config"]["model_args"]["remove"] == "1+2"
    assert record["config"]["lnsdiag_removed"] == "1,2"
    assert record["results"]["tiny_mc"]["sample_len"] == 4
    assert glob.glob(str(out / "*" / "samples_tiny_mc_*.jsonl"))


@pytest.mark.parametrize(("remove", "message"), [
    ("9", "error: remove=9: block 9 is out of range; the model has 4 blocks, numbered 0-3"),
    ("1,2", "error: remove=1,2: lm-eval splits model_args at commas; write remove=1+2"),
    ("2.attn", "error: remove=2.attn: removing sub-layers (2.attn) is not supported yet"),
])
def test_cli_bad_remove_one_line_exit_2(remove, message, tiny_llama_dir, tasks_dir, lm_eval_logging):
    res = _lnsdiag("lm-eval", "--model", "lnsdiag", "--model_args", f"pretrained={tiny_llama_dir},remove={remove}",
                   "--tasks", "tiny_mc", "--include_path", tasks_dir, "--device", "cpu")
    assert res.exit_code == 2
    assert message in res.output and "Traceback" not in res.output
    [line] = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert line.startswith(message)


def test_cli_help_is_lm_evals(lm_eval_logging):
    res = _lnsdiag("lm-eval", "--help")
    assert res.exit_code == 0 and "Language Model Evaluation Harness" in res.output
    assert "--model lnsdiag --model_args pretrained=ID,remove=3+5+7" in res.output
    res = _lnsdiag("lm-eval", "run", "--help")
    assert res.exit_code == 0 and "--model_args" in res.output and "--log_samples" in res.output
    assert "remove=20-27" in res.output


def test_lns_checkpoint_gets_its_norms_back(tiny_llama_dir, tokenizer, tmp_path):
    """A LayerNorm-Scaling checkpoint is evaluated with its scaling, as lnsdiag's load_model loads it
    (stock HFLM's from_pretrained drops it), and the record says so."""
    import transformers as tf

    from lnsdiag.interventions.lns import apply_lns

    model = apply_lns(tf.AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval())
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    lm = RemovalHFLM(pretrained=str(tmp_path), remove="3", device="cpu", dtype="float32")
    ids = torch.tensor([[1, 5, 9, 14, 30, 2, 7]])
    with torch.no_grad(), removed_layers(model, [3]):
        want = model(ids, use_cache=False).logits
    assert torch.equal(lm._model_call(ids), want)
    info = lm.get_model_info()
    assert info["lnsdiag_norms_restored"] is True and info["lnsdiag_removed"] == "3"
