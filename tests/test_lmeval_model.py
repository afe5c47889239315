"""lm-eval's model type ``lnsdiag`` (``--model lnsdiag --model_args pretrained=...,remove=1+2``) and
``lnsdiag lm-eval``: the same numbers as stock HFLM on a model really built without the blocks (and,
for removed attention / MLP sub-layers, ``remove=1.attn+2.mlp``, with their output projections
zeroed), for log-likelihoods, rolling perplexity and cached generation; the model intact between
calls; bad ``remove=`` values refused in one line."""

from __future__ import annotations

import glob
import json
import logging
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from lnsdiag.checkpoint.reference import build_without_layers, build_without_units
from lnsdiag.cli import app
from lnsdiag.interventions.removal import removed_layers
from lnsdiag.interventions.units import Removal
from lnsdiag.model.patch import patched_forward
from lnsdiag.model.structure import find_layers, sublayer_site
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


@pytest.mark.parametrize(("value", "unit", "units"), [
    ("3+5+7", "block", "3,5,7"), ("20-23", "block", "20-23"), ("3+20-21", None, "3,20,21"), (" 7 + 2 ", "block", "2,7"),
    ("3,5", "layers", "3,5"), (5, "block", "5"), (-1.0, "block", "-1"), ([3, "5-6"], "block", "3,5-6"),
    (Removal((2, 4)), "block", "2,4"), (None, "block", None),
    ("3.attn+5.mlp+7", "block", "3.attn,5.mlp,7"), ("20-22.attn+3", "block", "3,20-22.attn"),
    ("1.mlp+0-1.attn", "block", "0.attn,1.attn,1.mlp"), ([Removal.parse("2.mlp").units[0], 4], "block", "2.mlp,4"),
    ("20-22", "attn", "20-22.attn"), ("3+5.attn", "mlp", "3.mlp,5.attn"), (4, "MLP", "4.mlp"),
    (Removal.parse("1.attn,3"), "attn", "1.attn,3"),  # a Removal is taken as it is
])
def test_remove_forms(value, unit, units):
    """``remove=`` as a Removal: blocks, ranges, sub-layers (``3.attn``, ``20-27.mlp``), ``unit=``
    for the kind of a bare number."""
    got = parse_remove(value, unit)
    assert isinstance(got, Removal)
    assert got == (Removal.parse(units) if units else Removal())


@pytest.mark.parametrize(("value", "unit", "message"), [
    ("x", "block", "remove=x: 'x' is not a block number; write blocks as 3+5+7, ranges as 20-27, sub-layers as "
                   "3.attn or 20-27.mlp (0-based)"),
    ("3+3", "block", "remove=3+3 names block 3 twice"),
    ("2-4+3", "block", "remove=2-4+3 names block 3 twice"),
    ("5-3", "block", "the range 5-3 runs backwards"),
    ("5-3.mlp", "block", "the range 5-3 runs backwards; write it 3-5"),
    ("", "block", "remove= is empty"),
    ("3-", "block", "'3-' is not a block number"),
    (2.5, "block", "2.5 is not a block number"),
    (True, "block", "True is not a block number"),
    ("3+3.attn", "block", "remove=3+3.attn: 3.attn is inside block 3, which it removes whole; name either 3 or 3.attn"),
    ("2-4+3.mlp", "block", "3.mlp is inside block 3, which it removes whole"),
    ("3.attn+3.attn", "block", "names 3.attn twice"),
    ("3+3.attn", "attn", "names 3.attn twice"),
    ("3.foo", "block", "remove=3.foo: '3.foo' names no unit (write 3.attn or 3.mlp)"),
    ("3.attention", "block", "'3.attention' names no unit (did you mean 3.attn?)"),
    ("20-27.ffn", "block", "'20-27.ffn' names no unit (did you mean 20-27.mlp?)"),
    ("3.block", "block", "'3.block' names no unit (write 3 for whole blocks)"),
    ("3.", "block", "'3.' names no unit (write 3.attn or 3.mlp)"),
    ("3.attn.x", "block", "'3.attn.x' is not a block number"),
    ("3", "heads", "unit=heads is not a unit: use block, attn or mlp"),
    ("3", "attention", "unit=attention is not a unit: did you mean attn?"),
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
    ("remove=1,unit=heads", "unit=heads is not a unit: use block, attn or mlp"),
    ("remove=4.attn", "remove=4.attn: block 4 is out of range; the model has 4 blocks, numbered 0-3"),
    ("remove=1-4.mlp+0", "remove=1-4.mlp+0: block 4 is out of range"),
    ("remove=1+1.attn", "remove=1+1.attn: 1.attn is inside block 1, which it removes whole; name either 1 or 1.attn"),
    ("remove=1.foo", "remove=1.foo: '1.foo' names no unit (write 1.attn or 1.mlp)"),
    ("remove=1.attn,2.mlp", "lm-eval splits model_args at commas, so 2.mlp reached the model as an argument of its "
                            "own; write remove=1.attn+2.mlp"),
])
def test_bad_remove_through_simple_evaluate(args, message, tiny_llama_dir, task_manager):
    with pytest.raises(ValueError) as info:
        _evaluate("lnsdiag", f"pretrained={tiny_llama_dir},{args}", task_manager=task_manager, tasks=["tiny_mc"])
    assert message in str(info.value) and "\n" not in str(info.value)


# --- attention and MLP sub-layers ------------------------------------------------------------------

SUBLAYERS = "1.attn+2.mlp"  # of the tiny Llama's blocks 1 and 2: both blocks keep their other half


def _load(path):
    import transformers as tf

    return tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _assert_same_numbers(ours, stock, tasks):
    """acc exactly, perplexities and every log-likelihood to rel 1e-6, generated text exactly."""
    for task in tasks:
        mine, theirs = ours["results"][task], stock["results"][task]
        assert mine.keys() == theirs.keys()
        for key, value in theirs.items():
            if key.startswith("acc"):
                assert mine[key] == value, (task, key)
            elif isinstance(value, float):
                assert mine[key] == pytest.approx(value, rel=1e-6), (task, key)
        a, b = ours["samples"][task], stock["samples"][task]
        assert [s["doc_id"] for s in a] == [s["doc_id"] for s in b]
        if task == "tiny_gen":
            assert [s["resps"] for s in a] == [s["resps"] for s in b]
            assert any(s["resps"][0][0] for s in b)  # text was generated, 16 tokens reading the KV cache
        else:
            for x, y in zip(a, b, strict=True):
                got, want = torch.tensor(_loglikelihoods(x)), torch.tensor(_loglikelihoods(y))
                assert torch.allclose(got, want, rtol=1e-6, atol=0), task


def _loglikelihoods(sample):
    """A sample's log-likelihoods (a rolling sum, or each choice's), whatever form lm-eval gives them."""
    return [float(r[0][0]) if isinstance(r[0], (list, tuple)) else float(r[0]) for r in sample["resps"]]


def test_sublayers_equal_stock_hflm_on_zeroed_projections(tiny_llama_dir, tokenizer, task_manager):
    """``RemovalHFLM(remove="1.attn+2.mlp")`` gives the numbers of stock HFLM on the model with those
    sub-layers' output projections zeroed (``build_without_units``): log-likelihoods, rolling
    perplexity and cached generation (the removed attention still fills its KV-cache slot). During the
    evaluation every forward sees exactly those sites removed; afterwards the model is intact."""
    from lm_eval.models.huggingface import HFLM

    model = _load(tiny_llama_dir)
    reference = build_without_units(model, Removal.parse("1.attn,2.mlp"))
    ids = torch.tensor([[1, 5, 9, 14, 30, 2, 7]])
    with torch.no_grad():
        before = model(ids).logits
    stack = find_layers(model)
    sites = [sublayer_site(stack.layers[1], "attn").module, sublayer_site(stack.layers[2], "mlp").module]
    lm = RemovalHFLM(pretrained=model, tokenizer=tokenizer, remove=SUBLAYERS, device="cpu", batch_size=4)
    seen: list[tuple] = []
    hook = stack.layers[0].register_forward_pre_hook(
        lambda *_: seen.append((*(patched_forward(b) for b in stack.layers), *map(patched_forward, sites))))
    try:
        ours = _evaluate(lm, task_manager=task_manager)
    finally:
        hook.remove()
    stock = _evaluate(HFLM(pretrained=reference, tokenizer=tokenizer, device="cpu", batch_size=4),
                      task_manager=task_manager)
    _assert_same_numbers(ours, stock, TASKS)
    assert set(seen) == {(None, None, None, None, "removed", "removed")}
    assert all(patched_forward(m) is None for m in (*stack.layers, *sites))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)
    config = ours["config"]
    assert config["lnsdiag_removed"] == "1.attn,2.mlp" and config["lnsdiag_removed_blocks"] == []
    assert config["lnsdiag_removed_units"] == ["1.attn", "2.mlp"] and config["lnsdiag_layers_kept"] == 4
    removed = sum(p.numel() for m in (stack.layers[1].self_attn, stack.layers[2].mlp) for p in m.parameters())
    assert config["lnsdiag_num_parameters_kept"] == stock["config"]["model_num_parameters"] - removed


def test_blocks_and_sublayers_by_name(tiny_llama_dir, tokenizer, task_manager, tmp_path):
    """By its registered name, in lm-eval's model_args string, a block and sub-layers (a range of
    attentions) at once: stock HFLM on the saved reference, built without block 3 and with 0.attn,
    0.mlp and 1.attn zeroed, gives the same numbers."""
    path = tmp_path / "reference"
    build_without_units(_load(tiny_llama_dir), Removal.parse("0.attn,0.mlp,1.attn,3")).save_pretrained(path)
    tokenizer.save_pretrained(path)
    tasks = ["tiny_mc", "tiny_gen"]
    ours = _evaluate("lnsdiag", f"pretrained={tiny_llama_dir},remove=3+0.mlp+0-1.attn,dtype=float32",
                     task_manager=task_manager, tasks=tasks, limit=4)
    stock = _evaluate("hf", f"pretrained={path},dtype=float32", task_manager=task_manager, tasks=tasks, limit=4)
    _assert_same_numbers(ours, stock, tasks)
    config = ours["config"]
    assert (config["lnsdiag_removed"], config["lnsdiag_removed_blocks"]) == ("0.attn,0.mlp,1.attn,3", [3])
    assert config["lnsdiag_removed_units"] == ["0.attn", "0.mlp", "1.attn"] and config["lnsdiag_layers_kept"] == 3


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
    ("4.attn", "error: remove=4.attn: block 4 is out of range; the model has 4 blocks, numbered 0-3"),
    ("2+2.attn", "error: remove=2+2.attn: 2.attn is inside block 2, which it removes whole"),
    ("2.atn", "error: remove=2.atn: '2.atn' names no unit (did you mean 2.attn?)"),
    ("1.attn,2.mlp", "error: remove=1.attn,2.mlp: lm-eval splits model_args at commas; write remove=1.attn+2.mlp"),
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
