"""Local lm-eval tasks written by tests: a multiple-choice task and a rolling-perplexity task."""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = ("the residual stream grows with depth and each block adds an update to it while the norm "
         "rescales what the block sees so deep blocks change little").split()


def write_tasks(folder: Path, docs: int = 12, seed: int = 0, fewshot_split: bool = True) -> Path:
    """``tiny_mc`` (4 choices, acc/acc_norm) and ``tiny_ppl`` (loglikelihood_rolling) in ``folder``."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    mc = folder / "mc.jsonl"
    mc_train = folder / "mc_train.jsonl"
    ppl = folder / "ppl.jsonl"

    def mc_doc() -> dict:
        question = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12)))
        choices = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 3))) for _ in range(4)]
        return {"question": question, "choices": choices, "label": rng.randrange(4)}

    mc.write_text("".join(json.dumps(mc_doc()) + "\n" for _ in range(docs)))
    mc_train.write_text("".join(json.dumps(mc_doc()) + "\n" for _ in range(8)))
    ppl.write_text("".join(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 160)))})
                           + "\n" for _ in range(max(4, docs // 2))))
    splits = f"    test: {mc}\n" + (f"    train: {mc_train}\n" if fewshot_split else "")
    (folder / "tiny_mc.yaml").write_text(f"""task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
{splits}output_type: multiple_choice
test_split: test
{"fewshot_split: train" if fewshot_split else ""}
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
""")
    (folder / "tiny_ppl.yaml").write_text(f"""task: tiny_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {ppl}
output_type: loglikelihood_rolling
test_split: test
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: byte_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: bits_per_byte
    aggregation: bits_per_byte
    higher_is_better: false
metadata:
  version: 1.0
""")
    return folder


LETTERS = ("A", "B", "C", "D")


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _phrase(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))


def _data_files(splits: dict[str, Path]) -> str:
    return "".join(f"    {split}: {path}\n" for split, path in splits.items())


def write_mmlu_like(folder: Path, subjects: int = 4, docs: int = 12, seed: int = 0, group: str = "mm",
                    dev: int = 5) -> Path:
    """An MMLU-shaped group: ``{group}`` over two size-weighted subgroups of ``subjects`` tasks,
    each a 4-way one-letter-answer task with a description and ``first_n`` few-shot from its own
    ``dev`` split (as lm-eval's MMLU). Subjects get different sizes so weighting matters."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)

    def doc() -> dict:
        return {"question": _phrase(rng, 6, 30), "choices": [_phrase(rng, 1, 4) for _ in range(4)],
                "answer": rng.randrange(4)}

    text = "{{question.strip()}}" + "".join(f"\\n{x}. {{{{choices[{i}]}}}}" for i, x in enumerate(LETTERS))
    (folder / f"_{group}_template_yaml").write_text(f"""output_type: multiple_choice
test_split: test
fewshot_split: dev
fewshot_config:
  sampler: first_n
doc_to_text: "{text}\\nAnswer:"
doc_to_choice: ["A", "B", "C", "D"]
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
""")
    halves = {f"{group}_stem": [], f"{group}_other": []}
    for s in range(subjects):
        name = f"{group}_subject{s}"
        half = f"{group}_stem" if s % 2 == 0 else f"{group}_other"
        halves[half].append(name)
        test = _jsonl(folder / f"{name}_test.jsonl", [doc() for _ in range(docs + 3 * s)])
        dev_file = _jsonl(folder / f"{name}_dev.jsonl", [doc() for _ in range(dev)])
        (folder / f"{name}.yaml").write_text(f"""task: {name}
task_alias: subject {s}
dataset_path: json
dataset_kwargs:
  data_files:
{_data_files({"test": test, "dev": dev_file})}description: "The following are questions about subject {s}.\\n\\n"
tag: {half}_tasks
include: _{group}_template_yaml
""")
    for half in halves:
        (folder / f"_{half}.yaml").write_text(f"""group: {half}
group_alias: {half.rsplit('_', 1)[-1]}
task:
  - {half}_tasks
aggregate_metric_list:
  - metric: acc
    weight_by_size: true
metadata:
  version: 2
""")
    (folder / f"_{group}.yaml").write_text(f"""group: {group}
task:
{"".join(f"  - {half}" + chr(10) for half in halves)}aggregate_metric_list:
  - metric: acc
    weight_by_size: true
metadata:
  version: 2
""")
    return folder


def write_shapes(folder: Path, seed: int = 0, docs: int = 10) -> Path:
    """The other shapes lnsdiag must aggregate like lm-eval: ``hs`` (a group of two
    HellaSwag-shaped tasks, multi-token endings, per-document random few-shot, acc + acc_norm,
    aggregated unweighted for acc and size-weighted for acc_norm), ``lam`` (lambada-like
    loglikelihood: perplexity + acc from the greedy flag) and ``custom_pr`` (a task's own
    ``process_results`` with a bootstrapped ``median`` metric)."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)

    def hs_doc() -> dict:
        return {"ctx": _phrase(rng, 8, 25), "endings": [_phrase(rng, 2, 8) for _ in range(4)],
                "label": rng.randrange(4)}

    for name, count in (("hs_a", docs), ("hs_b", docs + 5)):
        test = _jsonl(folder / f"{name}_test.jsonl", [hs_doc() for _ in range(count)])
        train = _jsonl(folder / f"{name}_train.jsonl", [hs_doc() for _ in range(12)])
        (folder / f"{name}.yaml").write_text(f"""task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
{_data_files({"test": test, "train": train})}output_type: multiple_choice
training_split: train
test_split: test
doc_to_text: "{{{{ctx}}}}"
doc_to_target: label
doc_to_choice: endings
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
""")
    (folder / "_hs.yaml").write_text("""group: hs
task:
  - hs_a
  - hs_b
aggregate_metric_list:
  - metric: acc
    weight_by_size: false
  - metric: acc_norm
    weight_by_size: true
metadata:
  version: 1
""")
    lam = _jsonl(folder / "lam_test.jsonl", [{"text": _phrase(rng, 6, 30)} for _ in range(docs + 2)])
    (folder / "lam.yaml").write_text(f"""task: lam
dataset_path: json
dataset_kwargs:
  data_files:
{_data_files({"test": lam})}output_type: loglikelihood
test_split: test
doc_to_text: "{{{{text.split(' ')[:-1]|join(' ')}}}}"
doc_to_target: "{{{{' '+text.split(' ')[-1]}}}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
""")
    custom = _jsonl(folder / "custom_test.jsonl", [hs_doc() for _ in range(docs)])
    (folder / "custom_utils.py").write_text('''def process_results(doc, results):
    lls = [ll for ll, _ in results]
    best = max(range(len(lls)), key=lls.__getitem__)
    return {"acc": float(best == doc["label"]), "margin": lls[doc["label"]] - max(lls)}
''')
    (folder / "custom_pr.yaml").write_text(f"""task: custom_pr
dataset_path: json
dataset_kwargs:
  data_files:
{_data_files({"test": custom})}output_type: multiple_choice
test_split: test
doc_to_text: "{{{{ctx}}}}"
doc_to_target: label
doc_to_choice: endings
process_results: !function custom_utils.process_results
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: margin
    aggregation: median
    higher_is_better: true
metadata:
  version: 1.0
""")
    return folder


def write_generation_task(folder: Path, answer: str = "stream") -> Path:
    """``tiny_gen`` (generate_until, exact_match) in ``folder``: 4 questions whose answer is ``answer``."""
    (folder / "gen.jsonl").write_text("".join(f'{{"q": "residual {i}", "a": "{answer}"}}\n' for i in range(4)))
    (folder / "tiny_gen.yaml").write_text(f"""task: tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / "gen.jsonl"}
output_type: generate_until
test_split: test
doc_to_text: "Q: {{{{q}}}}\\nA:"
doc_to_target: "{{{{a}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 4
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
""")
    return folder
