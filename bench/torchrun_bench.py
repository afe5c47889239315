"""Benchmark: the same `lnsdiag prune` as one plain process and under `torchrun`, on a random
model saved to disk (so both load it like a user's checkpoint).

Run on the GPU machine (see ../shared/device/README.md), e.g.

    python3 bench/torchrun_bench.py --out $OUT --nproc 1

It builds a Llama-shaped model of the chosen size with random weights and a tokenizer trained on
the stdlib docstrings, saves both, then times ``python -m lnsdiag prune DIR --ppl-dataset stdlib``
and ``torchrun --nproc-per-node N -m lnsdiag prune ...`` (same options, separate ``--out``), and
compares their prune.csv: identical files, else the largest relative difference of ``value``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {
    "1b": dict(hidden_size=2048, intermediate_size=5504, num_hidden_layers=24, num_attention_heads=16,
               num_key_value_heads=16),
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=4),
}


def build(folder: Path, shape: str) -> None:
    import transformers

    from lnsdiag.data.text import stdlib_corpus
    from lnsdiag.demo.model import train_tokenizer

    tokenizer = train_tokenizer(stdlib_corpus("train").texts, 8192 if shape != "tiny" else 512)
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=4096,
                                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                      pad_token_id=tokenizer.pad_token_id, **SHAPES[shape])
    torch.manual_seed(0)
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def timed(cmd: list[str], log: Path) -> float:
    start = time.perf_counter()
    with open(log, "w") as fh:
        done = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed (exit {done.returncode}); see {log}")
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("bench-out"))
    ap.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    ap.add_argument("--nproc", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=65_536, help="perplexity tokens (--ppl-max-tokens)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    model_dir = args.out / "model"
    start = time.perf_counter()
    build(model_dir, args.shape)
    build_seconds = time.perf_counter() - start
    common = [str(model_dir), "--ppl-dataset", "stdlib", "--ppl-max-tokens", str(args.tokens), "--no-samples"]
    plain = timed([sys.executable, "-m", "lnsdiag", "prune", *common, "--out", str(args.out / "plain")],
                  args.out / "plain.log")
    ranks = timed([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.nproc),
                   "-m", "lnsdiag", "prune", *common, "--out", str(args.out / "torchrun")], args.out / "torchrun.log")
    a, b = (args.out / "plain" / "prune.csv").read_text(), (args.out / "torchrun" / "prune.csv").read_text()
    import pandas as pd

    fa, fb = pd.read_csv(args.out / "plain" / "prune.csv"), pd.read_csv(args.out / "torchrun" / "prune.csv")
    rel = float(((fa["value"] - fb["value"]).abs() / fa["value"].abs().clip(lower=1e-12)).max())
    meta = json.loads((args.out / "torchrun" / "meta.json").read_text())
    record = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
              "torch": torch.__version__, "shape": args.shape, "nproc": args.nproc, "tokens": args.tokens,
              "build_seconds": build_seconds, "plain_seconds": plain, "torchrun_seconds": ranks,
              "identical_csv": a == b, "max_rel_value_difference": rel,
              "verdicts_equal": bool((fa["verdict"].fillna("") == fb["verdict"].fillna("")).all()),
              "engine_stats": meta.get("engine_stats"), "timings": meta.get("timings")}
    (args.out / "torchrun_bench.json").write_text(json.dumps(record, indent=2, default=str))
    print(json.dumps({k: v for k, v in record.items() if k not in ("engine_stats", "timings")}, indent=2))


if __name__ == "__main__":
    main()
