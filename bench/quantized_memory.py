"""Benchmark: peak memory of a prune sweep on a Llama-2-7B-shaped model, bfloat16 vs --quantize 4bit.

Run on the GPU machine, e.g.

    python3 bench/quantized_memory.py --out $OUT                      # bf16 vs 4bit (and 8bit: --modes none,8bit,4bit)

It writes a random-weight checkpoint of the shape once (``--workdir``; speed and memory do not depend
on the weights' values), then for each mode starts a fresh process that loads it the way every command
does (``load_model(..., quantize=MODE)``) and runs the one-layer-removal sweep of ``lnsdiag prune
--ppl-text`` (``perplexity_sweep``: the fast engine, every layer, the built-in perplexity) with the same
fixed batch (``--batch-tokens``), so the modes differ in their weights only. Per mode it reports the
memory the loaded model holds, the peak over the sweep (GPU: ``torch.cuda.max_memory_allocated``; CPU:
the process's peak resident set, which includes Python and the libraries), the sweep's time and the
full model's perplexity (random weights: only the agreement between the modes means anything).

``--shape tiny --device cpu`` runs the same code on a tiny model on the CPU (bitsandbytes runs 8-bit and
4-bit layers there): a smoke test, whose figures mean nothing.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LLAMA2_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
TINY = dict(vocab_size=4096, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024)
SHAPES = {"llama2-7b": LLAMA2_7B, "tiny": TINY}
NAMES = {"none": "bfloat16", "8bit": "8bit (bitsandbytes LLM.int8)", "4bit": "4bit (bitsandbytes NF4, bf16 compute)"}
GIB = 2**30


def make_checkpoint(shape: str, folder: Path, device: torch.device) -> Path:
    """A random Llama of ``shape`` in bfloat16 with the demo's tokenizer, saved once into ``folder``."""
    import transformers as tf

    target = folder / f"random-llama-{shape}"
    if (target / "config.json").is_file():
        return target
    config = tf.LlamaConfig(**SHAPES[shape], bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it is fast (a GPU), written tensor by tensor
        model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(target)
    del model
    tokenizer_dir = next(p.parent for p in sorted((ROOT / "lnsdiag" / "demo" / "weights").glob("*/tokenizer.json")))
    tf.AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(target)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return target


def measure(checkpoint: Path, mode: str, args: argparse.Namespace) -> dict:
    """One mode, in this (fresh) process: load, sweep, and the memory both took."""
    from lnsdiag.data.text import stdlib_corpus
    from lnsdiag.data.windows import TokenWindows
    from lnsdiag.engine.sweep import perplexity_sweep
    from lnsdiag.model.load import load_model

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    quantize = None if mode == "none" else mode
    start = time.perf_counter()
    loaded = load_model(str(checkpoint), dtype="bfloat16", device=args.device, quantize=quantize)
    load_s = time.perf_counter() - start
    if cuda:
        torch.cuda.synchronize()
        held = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        held = sum(t.numel() * t.element_size() for t in [*loaded.model.parameters(), *loaded.model.buffers()])
    windows = TokenWindows.of(loaded.tokenizer, stdlib_corpus("test").texts, seq_len=args.seq_len,
                              max_tokens=args.tokens, name="stdlib:test")
    start = time.perf_counter()
    frame = perplexity_sweep(loaded, windows, batch_tokens=args.batch_tokens)
    if cuda:
        torch.cuda.synchronize()
    sweep_s = time.perf_counter() - start
    if cuda:
        peak = torch.cuda.max_memory_allocated()
        reserved = torch.cuda.max_memory_reserved()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux
        reserved = None
    return {"mode": mode, "device": str(device), "parameters": loaded.num_parameters,
            "model_gib": held / GIB, "peak_gib": peak / GIB,
            "peak_reserved_gib": reserved / GIB if reserved is not None else None,
            "peak_kind": "torch.cuda.max_memory_allocated" if cuda else "peak RSS of the process (ru_maxrss)",
            "load_seconds": load_s, "sweep_seconds": sweep_s, "variants": len(frame),  # full model + each layer
            "tokens": int(frame["tokens"].iloc[0]), "baseline_ppl": float(frame["baseline"].iloc[0]),
            "quantization": loaded.describe()["quantization"]}


def table(results: list[dict], args: argparse.Namespace) -> str:
    lines = [f"# Peak memory of a prune sweep, {args.shape} shape, on {results[0]['device']}", "",
             f"One-layer-removal sweep (fast engine, built-in perplexity), {results[0]['tokens']:,} tokens in "
             f"windows of {args.seq_len}, batches of {args.batch_tokens:,} tokens; peak: {results[0]['peak_kind']}.",
             "", "| mode | model in memory (GiB) | peak over the sweep (GiB) | sweep (s) | baseline ppl |",
             "|---|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {NAMES.get(r['mode'], r['mode'])} | {r['model_gib']:.3g} | {r['peak_gib']:.3g} | "
                     f"{r['sweep_seconds']:.1f} | {r['baseline_ppl']:.4g} |")
    full = next((r for r in results if r["mode"] == "none"), None)
    lines.append("")
    for r in results:
        if full is not None and r is not full:
            lines.append(f"{r['mode']}: peak {r['peak_gib']:.3g} GiB vs {full['peak_gib']:.3g} GiB in bfloat16, "
                         f"ratio bf16/{r['mode']} = {full['peak_gib'] / r['peak_gib']:.2f} (model alone: "
                         f"{full['model_gib'] / max(r['model_gib'], 1e-12):.2f})")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama2-7b")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--modes", default="none,4bit", help="comma-separated: none (bfloat16), 8bit, 4bit")
    parser.add_argument("--tokens", type=int, default=16_384, help="perplexity tokens of the sweep")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch-tokens", type=int, default=8192, help="fixed, so modes differ in weights only")
    parser.add_argument("--workdir", type=Path, default=None, help="where the random checkpoint is written "
                        "(kept for reruns) [default: a temporary folder]")
    parser.add_argument("--out", type=Path, default=None, help="folder for quantized_memory.json and .md")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # MODE:CHECKPOINT, one measurement
    args = parser.parse_args(argv)
    if args.child:
        mode, checkpoint = args.child.split(":", 1)
        print(json.dumps(measure(Path(checkpoint), mode, args)))
        return 0

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    with tempfile.TemporaryDirectory() as scratch:
        workdir = args.workdir or Path(scratch)
        workdir.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        checkpoint = make_checkpoint(args.shape, workdir, torch.device(args.device))
        print(f"checkpoint {checkpoint} ready in {time.perf_counter() - start:.0f} s", flush=True)
        results = []
        for mode in modes:  # a fresh process per mode: its peak is its own
            child = [sys.executable, __file__, "--child", f"{mode}:{checkpoint}", "--device", args.device,
                     "--tokens", str(args.tokens), "--seq-len", str(args.seq_len),
                     "--batch-tokens", str(args.batch_tokens)]
            proc = subprocess.run(child, capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"{mode}: failed\n{proc.stdout}{proc.stderr}", file=sys.stderr)
                return 1
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"{mode}: model {results[-1]['model_gib']:.2f} GiB, peak {results[-1]['peak_gib']:.2f} GiB, "
                  f"sweep {results[-1]['sweep_seconds']:.1f} s", flush=True)
    text = table(results, args)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        record = {"shape": args.shape, "config": SHAPES[args.shape], "args": {k: str(v) for k, v in vars(args).items()},
                  "results": results, "torch": torch.__version__, "python": platform.python_version(),
                  "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
        (args.out / "quantized_memory.json").write_text(json.dumps(record, indent=2) + "\n")
        (args.out / "quantized_memory.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
