"""Benchmark: the fast sweep engine against the naive one on a Llama-2-7B-shaped model.

Run on the GPU machine (see ../shared/device/README.md), e.g.

    python3 bench/sweep_bench.py --out $OUT --naive-layers 0,8,16,24,31

It measures, in one run: the matmul peak of the GPU (8192³ bf16), a plain forward's throughput,
then per workload the naive engine's time per variant (on a subset of layers, extrapolated to the
full sweep and labelled so), the fast engine's full sweep, the largest |Δ log-likelihood| between
the two on the variants both scored, and the counted work of both (block-token passes). Workloads:

* ``lmeval``: end to end through lm-eval (a multiple-choice and a rolling-perplexity task; the
  naive engine is one lm-eval evaluation per variant), with metric agreement, peak GPU memory and
  the fast sweep's TFLOP/s counted from the block passes it really does;
* ``mmlu_5shot``, ``hellaswag_10shot``, ``perplexity``: token-level requests of those shapes
  (``shapes.py``); naive = lm-eval's HFLM ``_loglikelihood_tokens`` per variant.

``--model small`` is the CPU indication's 8-layer, hidden-256 model; ``--tiny`` runs the same code
on a tiny CPU model with few requests (a smoke test; its timings mean nothing).

Random weights: speed and memory do not depend on the weights' values.
"""

from __future__ import annotations

import argparse
import copy
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

from bench import shapes
from lnsdiag.data.text import stdlib_corpus
from lnsdiag.demo.model import train_tokenizer
from lnsdiag.engine.budget import attention_limit
from lnsdiag.engine.fast import SweepEngine
from lnsdiag.engine.naive import run_naive
from lnsdiag.engine.plan import plan_rows
from lnsdiag.engine.sweep import run_fast
from lnsdiag.engine.work import layer_passes
from lnsdiag.interventions.removal import removed_layers
from lnsdiag.interventions.units import Removal
from lnsdiag.model.load import LoadedModel
from lnsdiag.model.structure import find_layers
from lnsdiag.results.store import ResultStore
from lnsdiag.scoring.lmeval.lm import make_lm
from lnsdiag.scoring.lmeval.requests import collect_requests
from lnsdiag.scoring.lmeval.scorer import LmEvalScorer
from lnsdiag.scoring.lmeval.tasks import load_tasks

LLAMA2_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
TINY = dict(vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024)
#: The CPU indication's model: 8 layers, hidden 256, Llama's proportions, a 2048-token context.
SMALL = dict(vocab_size=8192, hidden_size=256, intermediate_size=688, num_hidden_layers=8,
             num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048)
#: Qwen2-7B's shape: GQA (4 KV heads), bias in q/k/v, a 152k vocabulary, 28 layers.
QWEN2_7B = dict(model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768)
#: A Mixtral-shaped MoE at about 7B parameters (8 experts, top-2 routing, GQA), 24 layers.
MIXTRAL_SMALL = dict(model_type="mixtral", vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                     num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=8, num_local_experts=8,
                     num_experts_per_tok=2, max_position_embeddings=4096)
MODELS = {"llama2-7b": LLAMA2_7B, "qwen2-7b": QWEN2_7B, "mixtral-small": MIXTRAL_SMALL, "small": SMALL,
          "tiny": TINY}
#: "lmeval": end to end through lm-eval tasks; the others: token-level shapes (``shapes.py``).
WORKLOADS = ("lmeval", "mmlu_5shot", "hellaswag_10shot", "perplexity")


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
    experts = cfg.get("num_experts_per_tok", 1) if "num_local_experts" in cfg else 1  # MoE: active experts only
    weights = h * h * 2 + h * kv * 2 + 3 * h * i * experts
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


def fast_sweep_flops(rows, cfg: dict, variants: list) -> float:
    """FLOPs the fast sweep really does: per row, its block passes (weights per token, plus
    attention over the keys each token really sees: its own input up to itself, which in a
    shared row is its ancestors), and the LM head at the scored positions only."""
    h = cfg["hidden_size"]
    passes = layer_passes(cfg["num_hidden_layers"], variants)
    weights_per_token = layer_flops_per_token(cfg, 0)
    total = 0.0
    for row in rows:
        keys = sum(p + 1 for p in row.position_ids())
        total += passes * (len(row.ids) * weights_per_token + 4 * h * keys)
        total += len(row.positions) * len(variants) * 2 * h * cfg["vocab_size"]
    return total


def token_workloads(args: argparse.Namespace, vocab: int, max_length: int) -> dict[str, list]:
    """The three token-level workloads (see ``shapes.py``), sized by the command line."""
    return {
        "mmlu_5shot": shapes.mmlu(args.mmlu_subjects, args.mmlu_questions, shots=5, vocab=vocab),
        "hellaswag_10shot": shapes.hellaswag(args.hs_docs, shots=args.hs_shots, vocab=vocab),
        "perplexity": shapes.rolling(args.ppl_docs, (args.ppl_tokens, args.ppl_tokens * 2), max_length=max_length,
                                     vocab=vocab),
    }


def bench_workload(model, stack, lm, requests, max_length: int, naive_layers: list[int],
                   batch_tokens: int | None, group: int = 0, fp32_model=None, fp32_questions: int = 0) -> dict:
    """Naive (lm-eval's HFLM per variant on the baseline and ``naive_layers``, extrapolated to
    all layers) vs fast (the engine, all variants, measured) on one request set; with ``group``
    (answers per question), answer flips between them, and with ``fp32_model`` both engines'
    distance from a float32 baseline on the first ``fp32_questions`` questions."""
    L = len(stack)
    timed = [Removal(), *Removal.each(naive_layers)]
    naive, seconds = {}, []
    for variant in timed:
        sync()
        start = time.perf_counter()
        with removed_layers(model, variant, stack=stack):
            answers = lm._loglikelihood_tokens([(None, list(r.context), list(r.continuation)) for r in requests],
                                               disable_tqdm=True)
        sync()
        seconds.append(time.perf_counter() - start)
        naive[variant] = np.array([a[0] for a in answers])
    naive_seconds = seconds[0] + float(np.mean(seconds[1:])) * L
    engine = SweepEngine(model, stack, [Removal(), *Removal.each(range(L))], batch_tokens=batch_tokens)
    sync()
    start = time.perf_counter()
    result = engine.run(requests, max_length)
    sync()
    fast_seconds = time.perf_counter() - start
    worst = max(float(np.abs(result.of(v).loglik - naive[v]).max()) for v in timed)
    names = [str(v.to_json()) for v in timed]  # "None", "0", ...
    got = {"requests": len(requests), "naive_seconds_each": dict(zip(names, seconds, strict=True)),
           "naive_seconds_extrapolated": naive_seconds, "fast_seconds": fast_seconds,
           "wall_ratio": naive_seconds / fast_seconds, "max_abs_delta_loglik": worst,
           "mean_abs_delta_loglik": float(np.mean([np.abs(result.of(v).loglik - naive[v]).mean() for v in timed])),
           **engine.stats}
    if group:
        got["answer_flips"] = sum(flips(result.of(v).loglik, naive[v], group) for v in timed)
        got["answers_compared"] = len(timed) * (len(requests) // group)
    if fp32_model is not None and group:
        full = Removal()
        got["fp32_reference"] = fp32_reference(fp32_model, requests[: fp32_questions * group], max_length, group,
                                               {"naive bf16": naive[full], "fast bf16": result.of(full).loglik}, model)
    return got


def flips(a: np.ndarray, b: np.ndarray, group: int) -> int:
    """Questions whose chosen answer (argmax over each ``group`` of consecutive requests) differs."""
    n = len(a) // group * group
    return int((a[:n].reshape(-1, group).argmax(1) != b[:n].reshape(-1, group).argmax(1)).sum())


def fp32_reference(model32, requests, max_length: int, group: int, bf16: dict[str, np.ndarray],
                   model=None) -> dict:
    """The baseline of the first questions in float32 (unshared rows): how far each bf16 engine
    is from the exact answer, and on how many questions its choice differs from float32's."""
    engine = SweepEngine(model32, find_layers(model32), [Removal()], share=False)
    exact = engine.run(requests, max_length).of(Removal()).loglik
    if model is not None:  # shared rows in bf16 with the run-time check skipped: a diagnosis only
        forced = SweepEngine(model, find_layers(model), [Removal()])
        forced._check_sharing = lambda *a, **k: (0.0, 0.0, 0)
        bf16 = {**bf16, "fast bf16, sharing forced on": forced.run(requests, max_length).of(Removal()).loglik}
    n = len(requests)
    return {"questions": n // group, **{name: {"max_abs_delta_loglik": float(np.abs(v[:n] - exact).max()),
                                              "mean_abs_delta_loglik": float(np.abs(v[:n] - exact).mean()),
                                              "flips_vs_fp32": flips(v[:n], exact, group)}
                                       for name, v in bf16.items()}}


def profile_engine(model, stack, requests, max_length: int, batch_tokens: int | None, path: Path) -> dict:
    """Where the fast engine's time goes: torch.profiler over a 3-variant run, the top operators
    by device (or CPU) time written to ``path``; returns the share of the main kernel families."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    engine = SweepEngine(model, stack, [Removal(), *Removal.each([0, len(stack) // 2])], batch_tokens=batch_tokens)
    with profile(activities=activities) as prof:
        engine.run(requests, max_length)
        sync()
    key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    events = prof.key_averages()
    path.write_text(events.table(sort_by=key, row_limit=30, max_name_column_width=60))
    attr = "self_device_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    times = {e.key: getattr(e, attr, 0.0) for e in events}
    total = sum(times.values()) or 1.0
    families = {"matmul": ("gemm", "nvjet", "cutlass", "xmma", "addmm", "aten::mm", "aten::bmm"),
                "attention": ("attention", "sdpa", "flash", "fmha"),
                "softmax/log_softmax": ("softmax",), "copy/cat/index": ("copy", "cat", "index", "gather", "scatter")}
    share = {fam: sum(t for k, t in times.items() if any(w in k.lower() for w in words)) / total
             for fam, words in families.items()}
    return {"device_time_share": share, "top": sorted(times, key=times.get, reverse=True)[:10]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("bench-out"))
    ap.add_argument("--tiny", action="store_true", help="tiny CPU smoke test (timings meaningless)")
    ap.add_argument("--model", choices=sorted(MODELS), default="llama2-7b",
                    help="model shape (random weights); 'small' is the CPU indication's 8-layer, hidden-256 model")
    ap.add_argument("--workloads", default=",".join(WORKLOADS),
                    help=f"comma-separated, from {', '.join(WORKLOADS)}")
    ap.add_argument("--mc-docs", type=int, default=200)
    ap.add_argument("--ppl-docs", type=int, default=16)
    ap.add_argument("--ppl-tokens", type=int, default=2000)
    ap.add_argument("--mmlu-subjects", type=int, default=10)
    ap.add_argument("--mmlu-questions", type=int, default=30, help="questions per MMLU subject")
    ap.add_argument("--hs-docs", type=int, default=60)
    ap.add_argument("--hs-shots", type=int, default=10)
    ap.add_argument("--naive-layers", default="0,8,16,24,31",
                    help="layers the naive engine times (plus the baseline); the full naive sweep is extrapolated")
    ap.add_argument("--naive-batch", type=int, default=16, help="lm-eval batch size for the naive engine")
    ap.add_argument("--batch-tokens", type=int, default=None, help="fast engine budget (default: from free memory)")
    ap.add_argument("--fp32-reference", type=int, default=0, metavar="N",
                    help="also score the first N questions of each multiple-choice shape in float32 (a copy of "
                         "the model): both bf16 engines' distance and answer flips against it")
    ap.add_argument("--profile", action="store_true",
                    help="after each token workload, profile the fast engine on 3 variants (torch.profiler)")
    args = ap.parse_args()

    if args.tiny:
        args.model = "tiny"
        args.mc_docs, args.ppl_docs, args.ppl_tokens, args.naive_layers = 12, 2, 300, "0,3"
        args.mmlu_subjects, args.mmlu_questions, args.hs_docs, args.hs_shots = 2, 3, 3, 2
    cfg = MODELS[args.model]
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    unknown = set(workloads) - set(WORKLOADS)
    if unknown:
        ap.error(f"unknown workloads: {', '.join(sorted(unknown))}")
    naive_layers = [int(x) for x in args.naive_layers.split(",") if int(x) < cfg["num_hidden_layers"]]
    device = torch.device("cuda" if torch.cuda.is_available() and args.model != "tiny" else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    args.out.mkdir(parents=True, exist_ok=True)
    record: dict = {"device": torch.cuda.get_device_name(0) if device.type == "cuda"
                    else f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)",
                    "torch": torch.__version__, "cuda": torch.version.cuda, "model": cfg, "dtype": str(dtype),
                    "argv": sys.argv[1:]}
    import lm_eval
    import transformers

    record["transformers"], record["lm_eval"] = transformers.__version__, lm_eval.__version__

    print("matmul peak ...", flush=True)
    record["matmul_peak_tflops"] = matmul_peak(device)

    tokenizer = train_tokenizer(stdlib_corpus("train").texts, min(8192, cfg["vocab_size"]) if args.model != "tiny"
                                else 1024)
    torch.manual_seed(0)
    shape = {k: v for k, v in cfg.items() if k != "model_type"}
    config = transformers.AutoConfig.for_model(cfg.get("model_type", "llama"), **shape,
                                               bos_token_id=tokenizer.bos_token_id,
                                               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    loaded = LoadedModel.wrap(model, tokenizer, name=f"{args.model}-shaped-random")
    stack = find_layers(model)
    L = len(stack)

    print("plain forward ...", flush=True)
    record["forward"] = forward_throughput(model, cfg, device, *((8, 2048) if device.type == "cuda" else (2, 128)))

    rows = [("device", record["device"]), ("model", f"{args.model}: {L} layers, hidden {cfg['hidden_size']}, "
                                                    f"vocab {cfg['vocab_size']}, {record['dtype']}"),
            ("matmul peak (bf16 8192³)", f"{record['matmul_peak_tflops']:.0f} TFLOP/s"),
            ("plain forward", f"{record['forward']['tokens_per_s']:,.0f} tok/s, "
                              f"{record['forward']['tflops']:.1f} TFLOP/s")]
    save(args.out, record, rows)
    if "lmeval" in workloads:
        rows += lmeval_workload(args, record, model, loaded, stack, tokenizer, naive_layers, device)
        save(args.out, record, rows)

    lm = make_lm(loaded, batch_size=args.naive_batch)
    record["workloads"] = {}
    model32 = None
    for name, requests in token_workloads(args, cfg["vocab_size"], lm.max_length).items():
        if name not in workloads:
            continue
        print(f"{name}: naive on baseline + layers {naive_layers}, then fast on all {L + 1} variants ...", flush=True)
        group = 0 if name == "perplexity" else 4
        if args.fp32_reference and group and model32 is None:
            model32 = copy.deepcopy(model).float()
        got = bench_workload(model, stack, lm, requests, lm.max_length, naive_layers, args.batch_tokens, group,
                             model32, args.fp32_reference)
        if args.profile:
            got["profile"] = profile_engine(model, stack, requests, lm.max_length, args.batch_tokens,
                                            args.out / f"profile_{name}.txt")
        record["workloads"][name] = got
        rows.append((f"{name} ({got['requests']} requests)",
                     f"naive {got['naive_seconds_extrapolated']:.1f} s (extrap.), fast {got['fast_seconds']:.1f} s: "
                     f"wall {got['wall_ratio']:.2f}×, work {got['work_ratio']:.2f}× "
                     f"({got['naive_block_tokens']:,} / {got['block_tokens']:,} block-tokens), "
                     f"max abs Δ loglik {got['max_abs_delta_loglik']:.2g}, "
                     f"answer flips {got.get('answer_flips', '-')}/{got.get('answers_compared', '-')}; "
                     f"sharing {got['sharing']}"))
        print(save(args.out, record, rows), flush=True)

    print(save(args.out, record, rows))


def save(out: Path, record: dict, rows: list[tuple[str, str]]) -> str:
    """Write what is measured so far (called after each workload: a run cut short keeps it)."""
    (out / "sweep_bench.json").write_text(json.dumps(record, indent=2, default=str))
    table = "| measure | value |\n|---|---|\n" + "\n".join(f"| {a} | {b} |" for a, b in rows)
    (out / "sweep_bench.md").write_text(table + "\n")
    return table


def lmeval_workload(args, record: dict, model, loaded, stack, tokenizer, naive_layers: list[int],
                    device: torch.device) -> list[tuple[str, str]]:
    """End to end through lm-eval: a multiple-choice and a rolling-perplexity task, the naive
    engine (one lm-eval evaluation per variant) vs ``run_fast`` (request building, engine pass,
    aggregation); per-request and per-metric agreement; the engine's TFLOP/s."""
    cfg, L = record["model"], len(stack)
    tasks_dir = args.out / "tasks"
    write_tasks(tasks_dir, tokenizer, args.mc_docs, args.ppl_docs, args.ppl_tokens)
    taskset = load_tasks(["bench_mc", "bench_ppl"], tasks_dir)
    scorer = LmEvalScorer(loaded, taskset, batch_size=args.naive_batch, bootstrap_iters=1000)
    all_variants = [Removal(), *Removal.each(range(L))]
    timed = [Removal(), *Removal.each(naive_layers)]

    print(f"lmeval: naive engine on baseline + layers {naive_layers} ...", flush=True)
    naive_store = ResultStore(args.out / "naive", {})
    per_variant = []
    for variant in timed:
        sync()
        start = time.perf_counter()
        run_naive(model, [scorer], [variant], stack=stack, store=naive_store)
        sync()
        per_variant.append(time.perf_counter() - start)
    record["naive"] = {"variants_timed": [None, *naive_layers], "seconds_each": per_variant,
                       "full_sweep_seconds_extrapolated": per_variant[0] + float(np.mean(per_variant[1:])) * L,
                       "note": "extrapolated: baseline + L × mean of the timed removed-layer variants"}

    print("lmeval: fast engine, full sweep ...", flush=True)
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
    engine = SweepEngine(model, stack, timed, batch_tokens=args.batch_tokens)
    both = engine.run(requests, scorer.lm.max_length)
    worst = 0.0
    for variant in timed:
        with removed_layers(model, variant, stack=stack):
            ref = scorer.lm._loglikelihood_tokens([(None, list(r.context), list(r.continuation)) for r in requests],
                                                  disable_tqdm=True)
        worst = max(worst, float(np.abs(both.of(variant).loglik - np.array([x[0] for x in ref])).max()))
    metric_diff = {}
    for variant in timed:
        fast_rows = {(r.task, r.metric): r.value for r in fast_store.done()[variant].rows}
        for r in naive_store.done()[variant].rows:
            key = f"{variant.to_json()}/{r.task}/{r.metric}"
            metric_diff[key] = abs(fast_rows[(r.task, r.metric)] - r.value) / max(abs(r.value), 1e-12)
    record["agreement"] = {"max_abs_delta_loglik": worst, "max_rel_metric_delta": max(metric_diff.values()),
                           "acc_equal": all(v == 0 for k, v in metric_diff.items() if k.endswith("/acc"))}

    rows = plan_rows(requests, scorer.lm.max_length, share=stats.get("shared_rows", 0) > 0,
                     window=attention_limit(model)[0], row_tokens=stats.get("row_tokens"))
    flops = fast_sweep_flops(rows, cfg, all_variants)
    engine_seconds = stats["engine_seconds"]
    record["fast"]["sweep_flops"] = flops
    record["fast"]["engine_tflops"] = flops / engine_seconds / 1e12
    record["fast"]["end_to_end_tflops"] = flops / fast_seconds / 1e12
    if not math.isnan(record["matmul_peak_tflops"]):
        record["fast"]["engine_fraction_of_peak"] = record["fast"]["engine_tflops"] / record["matmul_peak_tflops"]
    record["speedup_vs_naive"] = record["naive"]["full_sweep_seconds_extrapolated"] / fast_seconds
    peak = record["fast"].get("engine_fraction_of_peak", math.nan)
    return [
        ("lmeval: naive sweep (extrapolated)", f"{record['naive']['full_sweep_seconds_extrapolated']:.1f} s"),
        ("lmeval: fast sweep (measured, end to end)", f"{fast_seconds:.1f} s (engine {engine_seconds:.1f} s)"),
        ("lmeval: speed-up", f"{record['speedup_vs_naive']:.2f}×; work {stats.get('work_ratio')}×"),
        ("lmeval: max abs Δ loglik, fast vs naive", f"{worst:.3g}"),
        ("lmeval: max relative Δ metric; acc equal", f"{record['agreement']['max_rel_metric_delta']:.3g}; "
                                                     f"{record['agreement']['acc_equal']}"),
        ("peak GPU memory", f"{record['fast']['peak_gpu_memory_gib'] or 0:.1f} GiB"),
        ("lmeval: fast engine TFLOP/s", f"{record['fast']['engine_tflops']:.1f} ({100 * peak:.0f}% of peak)"),
    ]


if __name__ == "__main__":
    main()
