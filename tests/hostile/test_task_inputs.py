"""Hostile local lm-eval tasks (YAML + JSONL through ``--include-path``): a careless user's data
is refused with one line naming the task, the document and the field, exit code 2, before the
model is loaded and before anything is written to ``--out``."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lnsdiag.cli import app
from lnsdiag.errors import UserError
from lnsdiag.scoring.lmeval.tasks import load_tasks
from tests.lmeval_tasks import write_generation_task, write_mmlu_like, write_shapes, write_tasks
from tests.test_cli_basic import assert_one_line_error

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def _edit_doc(file: str, doc_id: int, **fields) -> Callable[[Path], None]:
    """Set (or, given None, drop) fields of one document of a JSONL file of the task folder."""
    def edit(folder: Path) -> None:
        path = folder / file
        docs = [json.loads(line) for line in path.read_text().splitlines()]
        for key, value in fields.items():
            if value is None:
                docs[doc_id].pop(key)
            else:
                docs[doc_id][key] = value
        path.write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    return edit


def _edit_yaml(old: str, new: str) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        path = folder / "tiny_mc.yaml"
        assert old in path.read_text()
        path.write_text(path.read_text().replace(old, new))
    return edit


def _choices_by_function(folder: Path) -> None:
    """``doc_to_choice`` a function of the task's own module (lm-eval's ``!function``)."""
    (folder / "tiny_utils.py").write_text("def choices(doc):\n    return list(doc['choices'])\n")
    _edit_yaml('doc_to_choice: "{{choices}}"', "doc_to_choice: !function tiny_utils.choices")(folder)


def _empty(file: str) -> Callable[[Path], None]:
    return lambda folder: (folder / file).write_text("")


#: case: (what the careless user did to a valid tiny_mc, extra options, what the one error line says)
CASES = {
    "label_out_of_range": (_edit_doc("mc.jsonl", 3, label=7), (),
                           "task tiny_mc, doc_id 3: gold label 7 is out of range for its 4 choices (0 to 3)"),
    "label_negative": (_edit_doc("mc.jsonl", 3, label=-1), (),
                       "task tiny_mc, doc_id 3: gold label -1 is out of range for its 4 choices"),
    "label_not_a_choice": (_edit_doc("mc.jsonl", 3, label="banana"), (),
                           "task tiny_mc, doc_id 3: gold answer 'banana' is not one of its choices"),
    "label_missing": (_edit_doc("mc.jsonl", 3, label=None), (),
                      "task tiny_mc, doc_id 3: field 'label' is missing (or null) in the data, and doc_to_target"),
    "target_names_no_field": (_edit_yaml("doc_to_target: label", "doc_to_target: answer"), (),
                              "doc_to_target 'answer' names no field of the documents (they have question, "
                              "choices, label)"),
    "choices_missing": (_edit_doc("mc.jsonl", 3, choices=None), (),
                        "task tiny_mc, doc_id 3: field 'choices' is missing (or null) in the data, and doc_to_choice"),
    "choices_missing_function": (lambda folder: (_choices_by_function(folder),
                                                 _edit_doc("mc.jsonl", 3, choices=None)(folder)), (),
                                 "task tiny_mc, doc_id 3: doc_to_choice fails on it: TypeError: 'NoneType' object "
                                 "is not iterable; missing (or null) in the data: 'choices'"),
    "question_missing": (_edit_doc("mc.jsonl", 5, question=None), (),
                         "task tiny_mc, doc_id 5: field 'question' is missing (or null) in the data, and doc_to_text"),
    "too_many_shots": (lambda folder: None, ("--num-fewshot", 9),
                       "task tiny_mc: --num-fewshot 9 is more than its few-shot split 'train' holds (8 documents)"),
    "fewshot_label_out_of_range": (_edit_doc("mc_train.jsonl", 2, label=4), ("--num-fewshot", 1),
                                   "task tiny_mc, few-shot doc_id 2 of split 'train': gold label 4 is out of range"),
    "empty_test_file": (_empty("mc.jsonl"), (), "task tiny_mc: data file {folder}/mc.jsonl (test split) is empty"),
    "empty_fewshot_file": (_empty("mc_train.jsonl"), (),
                           "task tiny_mc: data file {folder}/mc_train.jsonl (train split) is empty"),
    "one_choice": (_edit_doc("mc.jsonl", 3, choices=["only"]), (),
                   "task tiny_mc, doc_id 3: 1 choice (['only']); a multiple-choice document needs at least 2"),
    "one_choice_first_doc": (_edit_doc("mc.jsonl", 0, choices=["only"], label=0), (),
                             "task tiny_mc, doc_id 0: 1 choice"),
}


def _prune(model_dir: Path, folder: Path, out: Path, *extra):
    return invoke("prune", model_dir, "--tasks", "tiny_mc", "--include-path", folder, "--no-angular",
                  "--limit", 10, "--layers", 1, "--out", out, *extra)


@pytest.mark.parametrize("case", list(CASES))
def test_bad_task_input_is_refused_before_any_output(case, tiny_llama_dir, tmp_path):
    edit, extra, message = CASES[case]
    folder = write_tasks(tmp_path / "tasks", docs=12)
    edit(folder)
    out = tmp_path / "out"
    res = _prune(tiny_llama_dir, folder, out, *extra)
    assert res.exit_code == 2, res.output
    assert_one_line_error(res, message.format(folder=folder))
    assert "loading " + str(tiny_llama_dir) not in res.output  # refused before the model is loaded
    assert not out.exists() or not any(out.iterdir())


def test_only_scored_documents_are_checked_and_every_shot_may_be_used(tiny_llama_dir, tmp_path):
    """A bad document past ``--limit`` is never scored, and a few-shot split may be drawn whole."""
    folder = write_tasks(tmp_path / "tasks", docs=12)
    _edit_doc("mc.jsonl", 11, label=7)(folder)
    out = tmp_path / "out"
    res = _prune(tiny_llama_dir, folder, out, "--num-fewshot", 8)
    assert res.exit_code == 0, res.output
    assert (out / "settings.json").is_file()


def test_a_task_set_scored_on_more_documents_is_checked_again(tmp_path):
    folder = write_tasks(tmp_path / "tasks", docs=12)
    _edit_doc("mc.jsonl", 11, label=7)(folder)
    tasks = load_tasks(["tiny_mc"], folder, limit=10)
    tasks.check(10)  # covered already
    with pytest.raises(UserError, match="task tiny_mc, doc_id 11: gold label 7"):
        tasks.check(None)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("shapes")
    write_tasks(folder)
    write_mmlu_like(folder)
    write_shapes(folder)
    write_generation_task(folder)
    return folder


@pytest.mark.parametrize(("names", "shots"), [
    (["tiny_mc", "tiny_ppl"], None),
    (["mm"], 5),  # first_n few-shot from a 5-document dev split
    (["hs", "lam", "custom_pr"], 3),  # custom_pr draws its shots from its own test split
    (["tiny_gen"], None),
])
def test_valid_tasks_pass_the_checks(shapes, names, shots):
    tasks = load_tasks(names, shapes, num_fewshot=shots)
    assert set(tasks.checked) == set(tasks.leaf_tasks)


def test_more_shots_than_a_first_n_split_holds_is_refused(shapes):
    with pytest.raises(UserError, match=r"task mm_subject0: --num-fewshot 6 is more than its few-shot split "
                                        r"'dev' holds \(5 documents\)"):
        load_tasks(["mm"], shapes, num_fewshot=6)
