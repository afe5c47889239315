"""Benchmark: the fast engine's extra wall time for KL / top-1 against the full model.

The same one-layer-removal sweep of perplexity windows (every block removed in turn, and the full
model), once plain and once with every request compared with the full model (what ``prune
--ppl-text`` does unless ``--no-kl``), alternated ``--repeats`` times so that drift of a busy
machine hits both alike; the ratio of the medians is the overhead, in wall time and in the
process's CPU time (all threads; steadier than wall time when other work shares the cores).
Random weights (speed does not depend on their values) and random token windows (no tokenizer
needed at this level).

    python3 bench/kl_overhead.py --vocab 32000 --tokens 8192            # the CPU figure in RESULTS.md
    python3 bench/kl_overhead.py --tiny                                  # smoke test (timings meaningless)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lnsdiag.engine.fast import SweepEngine
from lnsdiag.interventions.units import Removal
from lnsdiag.model.structure import find_layers
from lnsdiag.scoring.base import TokenRequest

#: The CPU indication's model (bench/sweep_bench.py ``small``): 8 layers, hidden 256.
SMALL = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=8, num_attention_heads=8,
             num_key_value_heads=8, max_position_embeddings=2048)
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)


def windows(tokens: int, seq_len: int, vocab: int, seed: int = 0) -> list[TokenRequest]:
    """Perplexity-like requests: windows of ``seq_len`` tokens, the first one context only."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(max(1, tokens // seq_len)):
        ids = torch.randint(3, vocab, (seq_len,), generator=g).tolist()
        out.append(TokenRequest((1, *ids[:1]), tuple(ids[1:])))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-tokens", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (a smoke test; timings meaningless)")
    ap.add_argument("--out", type=Path, default=None, help="also write the result as JSON here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers as tf

    shape = TINY if args.tiny else SMALL
    vocab = 512 if args.tiny else args.vocab
    tokens, seq_len = (256, 64) if args.tiny else (args.tokens, args.seq_len)
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(tf.LlamaConfig(vocab_size=vocab, **shape), dtype=torch.float32).eval()
    stack = find_layers(model)
    variants = [Removal(), *Removal.each(range(len(stack)))]
    requests = windows(tokens, seq_len, vocab)
    seconds: dict[str, list[float]] = {"plain": [], "kl": []}
    cpu: dict[str, list[float]] = {"plain": [], "kl": []}
    for _ in range(args.repeats):
        for name in ("plain", "kl"):
            engine = SweepEngine(model, stack, variants, batch_tokens=args.batch_tokens, share=False)
            compared = [True] * len(requests) if name == "kl" else None
            start, start_cpu = time.perf_counter(), time.process_time()
            engine.run(requests, seq_len, compared=compared)
            seconds[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    plain, kl = statistics.median(seconds["plain"]), statistics.median(seconds["kl"])
    plain_cpu, kl_cpu = statistics.median(cpu["plain"]), statistics.median(cpu["kl"])
    result = {"vocab": vocab, "model": shape, "scored_tokens": sum(len(r.continuation) for r in requests),
              "variants": len(variants), "threads": torch.get_num_threads(), "seconds": seconds,
              "median_plain_s": round(plain, 3), "median_kl_s": round(kl, 3),
              "kl_overhead_pct": round(100 * (kl / plain - 1), 1), "cpu_seconds": cpu,
              "kl_overhead_cpu_pct": round(100 * (kl_cpu / plain_cpu - 1), 1), "tiny": args.tiny}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
