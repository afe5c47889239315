"""Counted work of a sub-layer sweep: the fast engine against the naive one, in block-token passes.

No model runs: the work is counted from the plan the fast engine would make (prefix-shared rows,
the exactness check's probes) for the token shapes of ``shapes.py``, exactly as
:meth:`~lnsdiag.engine.fast.SweepEngine.run` reports it (``lnsdiag.engine.work.planned_work``),
and from HFLM's rows for the naive engine (one evaluation per variant). A block whose attention or
MLP is removed counts as one block pass on both sides. Work holds on any machine; wall time is a
GPU measurement (``sweep_bench.py``).

    python bench/sublayer_work.py --layers 32            # Llama-2-7B depth, sweep_bench's default shapes
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import shapes

from lnsdiag.engine.work import planned_work
from lnsdiag.interventions.units import Removal

#: The sweeps compared: the kinds each removes one at a time, beside the full model.
SWEEPS = {"blocks (L + 1)": ("block",), "attention + MLP (2L + 1)": ("attn", "mlp"),
          "blocks + attention + MLP (3L + 1)": ("block", "attn", "mlp")}


def workloads(args: argparse.Namespace) -> dict[str, list]:
    """sweep_bench's three workloads at the sizes given."""
    return {"MMLU 5-shot": shapes.mmlu(args.mmlu_subjects, args.mmlu_questions, shots=5),
            "HellaSwag 10-shot": shapes.hellaswag(args.hs_docs, shots=10),
            "perplexity": shapes.rolling(args.ppl_docs, (args.ppl_tokens, 2 * args.ppl_tokens),
                                         max_length=args.max_length)}


def count(args: argparse.Namespace) -> list[dict]:
    rows = []
    for name, requests in workloads(args).items():
        for sweep, kinds in SWEEPS.items():
            variants = [Removal(), *Removal.each(range(args.layers), kinds)]
            work = planned_work(requests, args.max_length, args.layers, variants)
            rows.append({"workload": name, "sweep": sweep, "variants": len(variants), "requests": len(requests),
                         **work})
    return rows


def table(rows: list[dict], layers: int) -> str:
    lines = [f"| workload ({layers} layers) | sweep | variants | fast block-token passes | naive | work ratio |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['workload']} | {r['sweep']} | {r['variants']} | {r['block_tokens']:,} | "
              f"{r['naive_block_tokens']:,} | {r['work_ratio']:.2f}× |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=4096)
    ap.add_argument("--mmlu-subjects", type=int, default=10)
    ap.add_argument("--mmlu-questions", type=int, default=30)
    ap.add_argument("--hs-docs", type=int, default=60)
    ap.add_argument("--ppl-docs", type=int, default=16)
    ap.add_argument("--ppl-tokens", type=int, default=2000)
    ap.add_argument("--out", type=Path, default=None, help="also write sublayer_work.json / .md here")
    args = ap.parse_args()
    rows = count(args)
    text = table(rows, args.layers)
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "sublayer_work.json").write_text(json.dumps({"args": vars(args) | {"out": str(args.out)},
                                                                 "rows": rows}, indent=1))
        (args.out / "sublayer_work.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
