"""The GPU benchmark script must not rot: its tiny CPU mode runs the same code end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_sweep_bench_tiny(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "sweep_bench.py"), "--tiny", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    record = json.loads((tmp_path / "sweep_bench.json").read_text())
    assert record["agreement"]["acc_equal"]
    assert record["agreement"]["max_abs_delta_loglik"] < 1e-2
    assert record["fast"]["requests"] > 0 and record["naive"]["full_sweep_seconds_extrapolated"] > 0
    assert "speed-up" in (tmp_path / "sweep_bench.md").read_text()
    workloads = record["workloads"]
    assert set(workloads) == {"mmlu_5shot", "hellaswag_10shot", "perplexity"}
    for name, got in workloads.items():
        assert got["max_abs_delta_loglik"] < 1e-2, name
        assert got["naive_block_tokens"] > got["block_tokens"] > 0 and got["fast_seconds"] > 0, name
    assert workloads["mmlu_5shot"]["sharing"].startswith("on")


@pytest.mark.slow
def test_quantized_memory_bench_tiny(tmp_path):
    """The GPU memory figure's script (bf16 vs 4-bit prune sweep) on a tiny model on the CPU (~40 s)."""
    from lnsdiag.model.quantize import backend_version

    if backend_version() is None:
        pytest.skip("bitsandbytes is not installed")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "quantized_memory.py"), "--shape", "tiny", "--device",
                           "cpu", "--modes", "none,4bit", "--tokens", "512", "--seq-len", "128", "--batch-tokens",
                           "256", "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    full, four = json.loads((tmp_path / "quantized_memory.json").read_text())["results"]
    assert (full["mode"], four["mode"]) == ("none", "4bit") and four["quantization"]["quant_type"] == "nf4"
    assert four["model_gib"] < full["model_gib"] and full["variants"] == four["variants"] == 5
    assert four["baseline_ppl"] == pytest.approx(full["baseline_ppl"], rel=0.05)
    assert "ratio bf16/4bit" in (tmp_path / "quantized_memory.md").read_text()
