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
