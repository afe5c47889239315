"""Benchmark: the fast sweep engine against the naive one on a Llama-2-7B-shaped model.

Run on the GPU machine (see ../shared/device/README.md), e.g.

    python3 bench/sweep_bench.py --out $OUT --naive-layers 0,8,16,24,31

It measures, in one run: the matmul peak of the GPU (8192³ bf16), a plain forward's throughput,
the naive engine's time per variant (one lm-eval evaluation per removed layer, on a subset of
layers, extrapolated to the full sweep and labelled so), the fast engine's full sweep, the largest
|Δ log-likelihood| between the two on the variants both scored, peak GPU memory, and the fast
sweep's achieved TFLOP/s counted from the block passes it really does. ``--tiny`` runs the same
code on a tiny CPU model (a smoke test; its timings mean nothing).

Random weights: speed and memory do not depend on the weights' values.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lnsdiag.demo_model import train_tokenizer
from lnsdiag.engine import SweepEngine, plan_rows
from lnsdiag.lmeval import LmEvalScorer, collect_requests, load_tasks
from lnsdiag.models import LoadedModel
from lnsdiag.store import ResultStore
from lnsdiag.structure import find_layers
from lnsdiag.surgery import removed_layers
from lnsdiag.sweep import run_fast, run_naive
from lnsdiag.text import stdlib_corpus

LLAMA2_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
TINY = dict(vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def matmul_peak(device: torch.device, n: int = 8192, reps: int = 20) -> float:
    """Dense bf16 matmul TFLOP/s: the ceiling everything else is compared with."""
    if device.type != "cuda":
        return math.nan
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync()
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync()
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e12


def layer_flops_per_token(cfg: dict, context: float) -> float:
    """Forward FLOPs of one Llama block per token: 2 × weights, plus attention over ``context``
    keys on average (QKᵀ and AV: 4 × hidden per key; a causal row of n has n/2 on average)."""
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    kv = cfg["num_key_value_heads"] * h // cfg["num_attention_heads"]
    weights = h * h * 2 + h * kv * 2 + 3 * h * i
    return 2 * weights + 4 * h * context


def forward_throughput(model: torch.nn.Module, cfg: dict, device: torch.device, batch: int, seq: int) -> dict:
    ids = torch.randint(0, cfg["vocab_size"], (batch, seq), device=device)
    with torch.no_grad():
        model(ids, use_cache=False)
        sync()
        start = time.perf_counter()
        reps = 3
        for _ in range(reps):
            model(ids, use_cache=False)
        sync()
    seconds = (time.perf_counter() - start) / reps
    flops = batch * seq * (cfg["num_hidden_layers"] * layer_flops_per_token(cfg, seq / 2) + 2 * cfg["hidden_size"]
                           * cfg["vocab_size"])
    return {"batch": batch, "seq": seq, "seconds": seconds, "tokens_per_s": batch * seq / seconds,
            "tflops": flops / seconds / 1e12}


def words(tokenizer, n_tokens: int, rng: random.Random, vocab: list[str]) -> str:
    """Text of about ``n_tokens`` tokens made of real words."""
    text = " ".join(rng.choice(vocab) for _ in range(int(n_tokens * 0.8)))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:n_tokens]
    return tokenizer.decode(ids)


def write_tasks(folder: Path, tokenizer, mc_docs: int, ppl_docs: int, ppl_tokens: int, seed: int = 0) -> None:
    """A multiple-choice task (contexts 100–400 tokens, 4 choices of 3–15 tokens) and a perplexity task."""
    rng = random.Random(seed)
    vocab = sorted({w for t in stdlib_corpus("train").texts[:50] for w in t.split() if w.isalpha()})
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "mc.jsonl", "w") as fh:
        for _ in range(mc_docs):
            doc = {"question": words(tokenizer, rng.randint(100, 400), rng, vocab),
                   "choices": [words(tokenizer, rng.randint(3, 15), rng, vocab) for _ in range(4)],
                   "label": rng.randrange(4)}
            fh.write(json.dumps(doc) + "\n")
    with open(folder / "ppl.jsonl", "w") as fh:
        for _ in range(ppl_docs):
            fh.write(json.dumps({"text": words(tokenizer, ppl_tokens, rng, vocab)}) + "\n")
    (folder / "bench_mc.yaml").write_text(f"""task: bench_mc
dataset_path: json
dataset_kwargs: {{data_files: {{test: {folder / 'mc.jsonl'}}}}}
output_type: multiple_choice
test_split: test
doc_to_text: "{{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - {{metric: acc, aggregation: mean, higher_is_better: true}}
  - {{metric: acc_norm, aggregation: mean, higher_is_better: true}}
metadata: {{version: 1.0}}
""")
    (folder / "bench_ppl.yaml").write_text(f"""task: bench_ppl
dataset_path: json
dataset_kwargs: {{data_files: {{test: {folder / 'ppl.jsonl'}}}}}
output_type: loglikelihood_rolling
test_split: test
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - {{metric: word_perplexity, aggregation: weighted_perplexity, higher_is_better: false}}
  - {{metric: bits_per_byte, aggregation: bits_per_byte, higher_is_better: false}}
metadata: {{version: 1.0}}
""")


def fast_sweep_flops(requests, max_length: int, cfg: dict, variants: list, packed: bool, window: int | None) -> float:
    """FLOPs the fast sweep really does: per row, its block passes (weights per token, plus
    attention over the keys each token really sees: causal, or context + own segment when
    packed), and the LM head at the scored positions only."""
    L = cfg["num_hidden_layers"]
    h = cfg["hidden_size"]
    layers = [v for v in variants if v is not None]
    passes = L + sum(L - i - 1 for i in layers)
    weights_per_token = layer_flops_per_token(cfg, 0)
    total = 0.0
    for row in plan_rows(requests, max_length, pack=packed, window=window):
        n, c = len(row.ids), row.context_length
        keys = c * (c + 1) / 2 + sum(length * c + length * (length + 1) / 2 for _, length in row.segments)
        if not row.segments:
            keys = n * (n + 1) / 2
        total += passes * (n * weights_per_token + 4 * h * keys)
        total += len(row.positions) * len(variants) * 2 * h * cfg["vocab_size"]
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("bench-out"))
    ap.add_argument("--tiny", action="store_true", help="tiny CPU smoke test (timings meaningless)")
    ap.add_argument("--mc-docs", type=int, default=200)
    ap.add_argument("--ppl-docs", type=int, default=16)
    ap.add_argument("--ppl-tokens", type=int, default=2000)
    ap.add_argument("--naive-layers", default="0,8,16,24,31",
                    help="layers the naive engine times (plus the baseline); the full naive sweep is extrapolated")
    ap.add_argument("--naive-batch", type=int, default=16, help="lm-eval batch size for the naive engine")
    ap.add_argument("--batch-tokens", type=int, default=None, help="fast engine budget (default: from free memory)")
    args = ap.parse_args()

    cfg = TINY if args.tiny else LLAMA2_7B
    if args.tiny:
        args.mc_docs, args.ppl_docs, args.ppl_tokens, args.naive_layers = 12, 2, 300, "0,3"
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    args.out.mkdir(parents=True, exist_ok=True)
    record: dict = {"device": torch.cuda.get_device_name(0) if device.type == "cuda"
                    else f"CPU ({platform.machine()})",
                    "torch": torch.__version__, "cuda": torch.version.cuda, "model": cfg, "dtype": str(dtype),
                    "argv": sys.argv[1:]}
    import lm_eval
    import transformers

    record["transformers"], record["lm_eval"] = transformers.__version__, lm_eval.__version__

    print("matmul peak ...", flush=True)
    record["matmul_peak_tflops"] = matmul_peak(device)

    tokenizer = train_tokenizer(stdlib_corpus("train").texts, 8192 if not args.tiny else 1024)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**cfg, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                      pad_token_id=tokenizer.pad_token_id)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    loaded = LoadedModel.wrap(model, tokenizer, name="llama-2-7b-shaped-random")
    stack = find_layers(model)
    L = len(stack)

    print("plain forward ...", flush=True)
    record["forward"] = forward_throughput(model, cfg, device, *((8, 2048) if not args.tiny else (2, 128)))

    tasks_dir = args.out / "tasks"
    write_tasks(tasks_dir, tokenizer, args.mc_docs, args.ppl_docs, args.ppl_tokens)
    taskset = load_tasks(["bench_mc", "bench_ppl"], tasks_dir)
    scorer = LmEvalScorer(loaded, taskset, batch_size=args.naive_batch, bootstrap_iters=1000)
    naive_layers = [int(x) for x in args.naive_layers.split(",")]
    all_variants = [None, *range(L)]

    # naive: one lm-eval evaluation per variant, on a subset
    print(f"naive engine on baseline + layers {naive_layers} ...", flush=True)
    naive_store = ResultStore(args.out / "naive", {})
    per_variant = []
    for variant in [None, *naive_layers]:
        sync()
        start = time.perf_counter()
        run_naive(model, [scorer], [variant], stack=stack, store=naive_store)
        sync()
        per_variant.append(time.perf_counter() - start)
    record["naive"] = {"variants_timed": [None, *naive_layers], "seconds_each": per_variant,
                       "full_sweep_seconds_extrapolated": per_variant[0] + float(np.mean(per_variant[1:])) * L,
                       "note": "extrapolated: baseline + L × mean of the timed removed-layer variants"}

    # fast: the full sweep, end to end (request building, engine pass, lm-eval aggregation)
    print("fast engine, full sweep ...", flush=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    fast_store = ResultStore(args.out / "fast", {})
    sync()
    start = time.perf_counter()
    stats = run_fast(model, [scorer], all_variants, stack=stack, store=fast_store, batch_tokens=args.batch_tokens).stats
    sync()
    fast_seconds = time.perf_counter() - start
    record["fast"] = {"full_sweep_seconds": fast_seconds, **stats,
                      "peak_gpu_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda"
                      else None}

    # agreement on what both scored: per request and per metric
    log = collect_requests(scorer.lm, taskset)
    requests = log.token_requests()
    engine = SweepEngine(model, stack, [None, *naive_layers], batch_tokens=args.batch_tokens)
    both = engine.run(requests, scorer.lm.max_length)
    worst = 0.0
    for variant in [None, *naive_layers]:
        with removed_layers(model, [] if variant is None else [variant], stack=stack):
            ref = scorer.lm._loglikelihood_tokens([(None, list(r.context), list(r.continuation)) for r in requests],
                                                  disable_tqdm=True)
        worst = max(worst, float(np.abs(both.of(variant)[0] - np.array([x[0] for x in ref])).max()))
    metric_diff = {}
    for variant in [None, *naive_layers]:
        fast_rows = {(r.task, r.metric): r.value for r in fast_store.done()[variant].rows}
        for r in naive_store.done()[variant].rows:
            metric_diff[f"{variant}/{r.task}/{r.metric}"] = abs(fast_rows[(r.task, r.metric)] - r.value) / max(
                abs(r.value), 1e-12)
    record["agreement"] = {"max_abs_delta_loglik": worst, "max_rel_metric_delta": max(metric_diff.values()),
                           "acc_equal": all(v == 0 for k, v in metric_diff.items() if k.endswith("/acc"))}

    from lnsdiag.engine import _sliding_window

    flops = fast_sweep_flops(requests, scorer.lm.max_length, cfg, all_variants, bool(stats.get("packed_rows")),
                             _sliding_window(model))
    engine_seconds = stats["engine_seconds"]
    record["fast"]["sweep_flops"] = flops
    record["fast"]["engine_tflops"] = flops / engine_seconds / 1e12
    record["fast"]["end_to_end_tflops"] = flops / fast_seconds / 1e12
    if not math.isnan(record["matmul_peak_tflops"]):
        record["fast"]["engine_fraction_of_peak"] = record["fast"]["engine_tflops"] / record["matmul_peak_tflops"]
    record["speedup_vs_naive"] = record["naive"]["full_sweep_seconds_extrapolated"] / fast_seconds

    (args.out / "sweep_bench.json").write_text(json.dumps(record, indent=2, default=str))
    rows = [
        ("device", record["device"]),
        ("matmul peak (bf16 8192³)", f"{record['matmul_peak_tflops']:.0f} TFLOP/s"),
        ("plain forward", f"{record['forward']['tokens_per_s']:,.0f} tok/s, {record['forward']['tflops']:.0f} TFLOP/s"),
        ("naive sweep (extrapolated)", f"{record['naive']['full_sweep_seconds_extrapolated']:.1f} s"),
        ("fast sweep (measured, end to end)", f"{fast_seconds:.1f} s (engine {engine_seconds:.1f} s)"),
        ("speed-up", f"{record['speedup_vs_naive']:.2f}×"),
        ("max abs Δ loglik, fast vs naive", f"{worst:.3g}"),
        ("max relative Δ metric; acc equal", f"{record['agreement']['max_rel_metric_delta']:.3g}; "
                                             f"{record['agreement']['acc_equal']}"),
        ("peak GPU memory", f"{record['fast']['peak_gpu_memory_gib'] or 0:.1f} GiB"),
        ("fast engine TFLOP/s", f"{record['fast']['engine_tflops']:.0f} "
                                f"({100 * record['fast'].get('engine_fraction_of_peak', math.nan):.0f}% of peak)"),
    ]
    table = "| measure | value |\n|---|---|\n" + "\n".join(f"| {a} | {b} |" for a, b in rows)
    (args.out / "sweep_bench.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
