"""lm-eval's requests built once: each variant aggregated from stored answers equals lm-eval's
own ``evaluate`` (metrics, stderrs, per-document items, groups); broken task YAMLs are named."""

from __future__ import annotations

import math

import numpy as np
import pytest
from typer.testing import CliRunner

from lnsdiag.cli import app
from lnsdiag.errors import UserError
from lnsdiag.model.load import LoadedModel
from lnsdiag.scoring.base import Answers, Scores
from lnsdiag.scoring.lmeval.aggregate import scores_of
from lnsdiag.scoring.lmeval.lm import replay_metrics
from lnsdiag.scoring.lmeval.requests import collect_requests
from lnsdiag.scoring.lmeval.scorer import LmEvalScorer
from lnsdiag.scoring.lmeval.tasks import evaluate_tasks, load_tasks, seed_everything
from tests.families import tiny_model
from tests.lmeval_tasks import write_mmlu_like, write_shapes, write_tasks

BOOTSTRAP = 1000  # one seeded chunk of lm-eval's bootstrap: exact, and quick


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shapes")
    write_tasks(folder, docs=8)
    write_mmlu_like(folder, subjects=4, docs=6)
    write_shapes(folder, docs=6)
    return folder


@pytest.fixture(scope="module")
def loaded(tokenizer):
    return LoadedModel.wrap(tiny_model("llama", vocab_size=len(tokenizer)), tokenizer, name="llama")


def _answers(count: int, seed: int, ties: bool = False) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    loglik = -rng.gamma(2.0, 3.0, count)
    if ties:  # coarse values: argmax ties, as a real model's one-token answers can have
        loglik = np.round(loglik)
    return loglik, rng.random(count) < 0.4


def _same_rows(a: Scores, b: Scores) -> None:
    assert [(r.task, r.metric) for r in a.rows] == [(r.task, r.metric) for r in b.rows]
    for x, y in zip(a.rows, b.rows, strict=True):
        assert (x.value, x.higher_is_better, x.samples, x.group) == (y.value, y.higher_is_better, y.samples, y.group)
        assert (math.isnan(x.stderr) and math.isnan(y.stderr)) or x.stderr == y.stderr, (x, y)


def _same_scores(a: Scores, b: Scores) -> None:
    _same_rows(a, b)
    assert a.documents == b.documents
    assert a.choices == b.choices
    assert a.aggregations == b.aggregations
    assert a.groups == b.groups


def _same_results(got: dict, want: dict) -> None:
    """lm-eval's results dict, every key but the logged samples' extra fields."""
    assert got["results"] == want["results"]
    assert list(got["results"]) == list(want["results"])
    assert got.get("groups") == want.get("groups")
    for key in ("group_subtasks", "higher_is_better", "n-samples", "n-shot", "versions", "configs"):
        assert got[key] == want[key], key
    for task, examples in want["samples"].items():
        mine = got["samples"][task]
        assert len(mine) == len(examples)
        for a, b in zip(mine, examples, strict=True):
            for field in ("doc_id", "filter", "metrics", "arguments", *b["metrics"]):
                assert a[field] == b[field], (task, field)


CASES = {  # tasks, few-shot, limit: every shape the issue names
    "mmlu_like_5shot": (["mm"], 5, None),
    "hellaswag_like_group": (["hs"], 2, None),
    "lambada_like_greedy": (["lam"], 0, None),
    "rolling_perplexity": (["tiny_ppl"], 0, None),
    "custom_process_results": (["custom_pr"], 1, None),
    "all_limit_count": (["mm", "hs", "lam", "tiny_ppl", "custom_pr", "tiny_mc"], 1, 3),
    "all_limit_fraction": (["mm", "hs", "lam", "tiny_ppl"], 2, 0.5),
}


@pytest.mark.parametrize("case", list(CASES))
def test_direct_equals_evaluate_on_random_answers(case, loaded, shapes_dir):
    names, shots, limit = CASES[case]
    taskset = load_tasks(names, shapes_dir, num_fewshot=shots)
    scorer = LmEvalScorer(loaded, taskset, limit=limit, bootstrap_iters=BOOTSTRAP, batch_size=4, check_direct=False)
    requests = scorer.requests()
    log = scorer._log
    assert log.built is not None, log.unsupported
    for trial in range(3):
        loglik, greedy = _answers(len(requests), seed=trial, ties=trial == 2)
        single, rolling = log.tables(loglik, greedy)
        want = replay_metrics(taskset, single, rolling, limit=limit, bootstrap_iters=BOOTSTRAP, log_samples=True)
        got = log.built.results(loglik, greedy, bootstrap_iters=BOOTSTRAP, log_samples=True)
        _same_results(got, want)
        _same_scores(scorer.aggregate(Answers(loglik, greedy)), scores_of(want, taskset))
    assert scorer.aggregation_path == "direct"


def test_groups_weighted_and_unweighted(loaded, shapes_dir):
    """The groups really aggregate as configured (so the equality above covers both kinds)."""
    taskset = load_tasks(["mm", "hs"], shapes_dir, num_fewshot=0)
    scorer = LmEvalScorer(loaded, taskset, bootstrap_iters=0, batch_size=4)
    loglik, greedy = _answers(len(scorer.requests()), seed=5)
    rows = {(r.task, r.metric): r for r in scorer.aggregate(Answers(loglik, greedy)).rows}
    size = {t: rows[(t, "acc")].samples for t in ("hs_a", "hs_b", "mm_subject0", "mm_subject2")}
    assert rows[("hs", "acc")].value == pytest.approx((rows[("hs_a", "acc")].value + rows[("hs_b", "acc")].value) / 2)
    weighted = (rows[("hs_a", "acc_norm")].value * size["hs_a"] + rows[("hs_b", "acc_norm")].value * size["hs_b"])
    assert rows[("hs", "acc_norm")].value == pytest.approx(weighted / (size["hs_a"] + size["hs_b"]))
    stem = (rows[("mm_subject0", "acc")].value * size["mm_subject0"]
            + rows[("mm_subject2", "acc")].value * size["mm_subject2"]) / (size["mm_subject0"] + size["mm_subject2"])
    assert rows[("mm_stem", "acc")].value == pytest.approx(stem)
    assert rows[("mm", "acc")].group and rows[("mm", "acc")].samples == sum(
        rows[(f"mm_subject{s}", "acc")].samples for s in range(4))


def _answers_of(results: dict, log) -> tuple[np.ndarray, np.ndarray]:
    """The model's own answers, as lm-eval's evaluate logged them, in the order of the requests
    (a rolling request's total on its first window, 0.0 on the others: the same float sum)."""
    given = {}
    for task, examples in results["samples"].items():
        for example in examples:
            kind = "loglikelihood_rolling" if isinstance(example["resps"][0][0], float) else "loglikelihood"
            for idx, resps in enumerate(example["resps"]):
                given[(kind, task, example["doc_id"], idx)] = resps[0]
    loglik, greedy = [], []
    for key, _ in log.single:
        value, flag = given[key]
        loglik.append(value)
        greedy.append(flag)
    for key, windows in log.rolling:
        loglik += [given[key]] + [0.0] * (len(windows) - 1)
        greedy += [False] * len(windows)
    return np.array(loglik), np.array(greedy)


def test_direct_equals_evaluate_on_the_model(loaded, shapes_dir):
    """A real (tiny) model's answers through lm-eval's HFLM: the direct aggregation of those
    answers equals lm-eval's evaluate on the model itself."""
    taskset = load_tasks(["mm", "hs", "lam", "tiny_ppl"], shapes_dir, num_fewshot=2)
    scorer = LmEvalScorer(loaded, taskset, limit=4, bootstrap_iters=BOOTSTRAP, batch_size=4)
    scorer.requests()
    seed_everything(1234)
    evaluated = evaluate_tasks(scorer.lm, taskset, limit=4, bootstrap_iters=BOOTSTRAP, log_samples=True)
    loglik, greedy = _answers_of(evaluated, scorer._log)
    _same_scores(scorer.aggregate(Answers(loglik, greedy)), scores_of(evaluated, taskset))
    _same_results(scorer._log.built.results(loglik, greedy, bootstrap_iters=BOOTSTRAP, log_samples=True), evaluated)
    assert scorer.aggregation_path == "direct"


def test_limit_and_fewshot_seeding(loaded, shapes_dir):
    """Requests are built once, as before: the same seed gives the same prompts (random
    few-shot per document for hs, the dev split's first five for mm), limits cut documents."""
    taskset = load_tasks(["mm", "hs"], shapes_dir, num_fewshot=3)
    scorer = LmEvalScorer(loaded, taskset, limit=0.5, batch_size=4)
    first = collect_requests(scorer.lm, taskset, limit=0.5, seed=7)
    again = collect_requests(scorer.lm, taskset, limit=0.5, seed=7)
    other = collect_requests(scorer.lm, taskset, limit=0.5, seed=8)
    assert first.args == again.args and first.token_requests() == again.token_requests()
    differs = {key for key in first.args if first.args[key] != other.args[key]}
    assert differs and all(key[1].startswith("hs_") for key in differs)  # first_n: mm never changes
    docs = {t.name: [doc_id for doc_id, _, _ in t.docs] for t in first.built.tasks}
    sizes = {name: len(task.eval_docs) for name, task in taskset.leaf_tasks.items()}
    assert all(ids == list(range(math.ceil(sizes[name] * 0.5))) for name, ids in docs.items())
    counted = LmEvalScorer(loaded, taskset, limit=2, batch_size=4)
    loglik, greedy = _answers(len(counted.requests()), seed=1)
    scores = counted.aggregate(Answers(loglik, greedy))
    assert all(len(items) == 2 for items in scores.documents.values())


STATEFUL = """task: stateful
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: multiple_choice
test_split: test
doc_to_text: "{{{{question}}}}"
doc_to_target: label
doc_to_choice: "{{{{choices}}}}"
process_results: !function stateful_utils.process_results
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: calls
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def test_unusual_process_results_falls_back_and_says_so(loaded, tmp_path):
    """A task whose process_results keeps state between calls (so it depends on more than the
    document and its answers) is caught by the first variant's check: every variant then goes
    through lm-eval's evaluate, and the run is told."""
    folder = write_tasks(tmp_path / "tasks", docs=4)
    (folder / "stateful_utils.py").write_text("""CALLS = [0]


def process_results(doc, results):
    CALLS[0] += 1
    best = max(range(len(results)), key=lambda i: results[i][0])
    return {"acc": float(best == doc["label"]), "calls": float(CALLS[0])}
""")
    (folder / "stateful.yaml").write_text(STATEFUL.format(data=folder / "mc.jsonl"))
    notes: list[str] = []
    taskset = load_tasks(["stateful", "tiny_mc"], folder, num_fewshot=0)
    scorer = LmEvalScorer(loaded, taskset, bootstrap_iters=0, batch_size=4, note=notes.append)
    loglik, greedy = _answers(len(scorer.requests()), seed=0)
    assert not notes and scorer.aggregation_path == "direct"
    scores = scorer.aggregate(Answers(loglik, greedy))
    assert scorer.aggregation_path == "replay" and "stateful" in scorer.fallback
    assert len(notes) == 1 and "evaluate for every variant" in notes[0] and "calls" in notes[0]
    assert {r.task for r in scores.rows} == {"stateful", "tiny_mc"}
    assert scorer.run_stats() == {"lm_eval_aggregation": "replay",
                                          "lm_eval_aggregation_fallback": scorer.fallback}
    scorer.aggregate(Answers(loglik, greedy))  # replayed again, no second note
    assert len(notes) == 1


# --- issue 13: a broken task YAML is named, with the parser's message ---------------------------

BROKEN = """task: broken
dataset_path: json
  output_type: multiple_choice
"""


@pytest.fixture()
def broken_dir(tmp_path):
    folder = write_tasks(tmp_path / "tasks", docs=4)
    (folder / "broken.yaml").write_text(BROKEN)
    return folder


def test_broken_yaml_is_reported_with_the_parser_message(broken_dir):
    with pytest.raises(UserError) as caught:
        load_tasks(["broken"], broken_dir)
    message = str(caught.value)
    assert "\n" not in message
    assert str(broken_dir / "broken.yaml") in message
    assert "line 3, column 14" in message and "mapping values are not allowed" in message
    assert "unknown task" not in message
    # the valid tasks next to it still load
    assert list(load_tasks(["tiny_mc"], broken_dir).leaf_tasks) == ["tiny_mc"]


def test_yaml_without_task_or_group_is_named(tmp_path):
    folder = write_tasks(tmp_path / "tasks", docs=4)
    (folder / "nameless.yaml").write_text("tsak: nameless\noutput_type: multiple_choice\n")
    with pytest.raises(UserError, match=r"nameless\.yaml: defines neither `task:` nor `group:`"):
        load_tasks(["nameless"], folder)


def test_cli_broken_yaml_exits_2_with_one_line(broken_dir, tiny_llama_dir, tmp_path):
    result = CliRunner().invoke(app, ["prune", str(tiny_llama_dir), "--tasks", "broken", "--include-path",
                                      str(broken_dir), "--out", str(tmp_path / "out"), "--no-angular"],
                                catch_exceptions=False)
    assert result.exit_code == 2, result.output
    text = result.output.strip()
    assert "Traceback" not in text and text.count("error:") == 1
    (line,) = [line for line in text.splitlines() if "error:" in line]  # the error, whole, on one line
    assert "broken.yaml" in line and "line 3, column 14: mapping values are not allowed" in line
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
