"""--quantize 8bit|4bit: bitsandbytes layers on the CPU, the engines and removal on them, the run's record,
and the refusals (bad mode, missing package, other devices, checkpoints of a quantized model)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lnsdiag.data.windows import TokenWindows
from lnsdiag.engine.fast import SweepEngine
from lnsdiag.engine.naive import run_naive
from lnsdiag.engine.sweep import run_fast
from lnsdiag.errors import UserError
from lnsdiag.interventions.removal import removed_layers
from lnsdiag.interventions.units import Removal
from lnsdiag.measure.angular import angular_on_text
from lnsdiag.measure.variance import variance_on_text
from lnsdiag.model import quantize
from lnsdiag.model.load import ModelOptions, load_model
from lnsdiag.model.structure import find_layers
from lnsdiag.results.store import ResultStore
from lnsdiag.scoring.base import TokenRequest
from lnsdiag.scoring.perplexity import PerplexityScorer
from tests.conftest import SAMPLE_TEXT
from tests.test_demo import assert_one_line_error, invoke

needs_bitsandbytes = pytest.mark.skipif(quantize.backend_version() is None,
                                        reason="bitsandbytes is not installed (pip install bitsandbytes)")
VARIANTS = [Removal(), *Removal.each([0, 3])]
LAYER_CLASS = {"8bit": "Linear8bitLt", "4bit": "Linear4bit"}
WEIGHT_DTYPE = {"8bit": torch.int8, "4bit": torch.uint8}


@pytest.fixture(scope="module")
def quantized(tiny_llama_dir):
    """The tiny Llama loaded 8-bit and 4-bit on the CPU (once per module: bitsandbytes is slow to import)."""
    if quantize.backend_version() is None:
        pytest.skip("bitsandbytes is not installed")
    return {mode: load_model(str(tiny_llama_dir), quantize=mode, device="cpu") for mode in quantize.MODES}


def _mc_requests(questions=3, seed=3):
    """Multiple-choice-shaped requests (a shared context, four continuations): shared-prefix rows."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(questions):
        ctx = tuple(torch.randint(3, 250, (int(torch.randint(8, 24, (1,), generator=g)),), generator=g).tolist())
        for _ in range(4):
            cont = torch.randint(3, 250, (int(torch.randint(1, 5, (1,), generator=g)),), generator=g)
            out.append(TokenRequest(ctx, tuple(cont.tolist())))
    return out


@needs_bitsandbytes
@pytest.mark.parametrize("mode", quantize.MODES)
def test_linear_layers_are_quantized(quantized, tiny_llama_dir, mode):
    loaded = quantized[mode]
    model = loaded.model
    layers = [m for m in model.modules() if type(m).__name__ == LAYER_CLASS[mode]]
    assert len(layers) == 7 * 4  # q, k, v, o, gate, up, down in each of the 4 blocks
    assert all(m.weight.dtype == WEIGHT_DTYPE[mode] for m in layers)
    assert type(model.lm_head) is torch.nn.Linear and model.lm_head.weight.dtype == torch.float32
    assert loaded.quantize == mode and quantize.quantized_mode(model) == mode
    full = load_model(str(tiny_llama_dir), device="cpu")
    assert loaded.num_parameters == full.num_parameters  # weights counted, not bytes of packed storage
    described = loaded.describe()
    assert described["quantize"] == mode and described["quantization"]["backend"] == "bitsandbytes"
    ids = torch.randint(3, 250, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, exact = model(ids).logits, full.model(ids).logits
    assert not torch.equal(ours, exact)
    assert (ours - exact).abs().max() < {"8bit": 0.05, "4bit": 0.5}[mode] * exact.abs().max()


@needs_bitsandbytes
@pytest.mark.parametrize("mode", quantize.MODES)
def test_removal_restores_the_quantized_model_exactly(quantized, mode):
    model = quantized[mode].model
    stack = find_layers(model)
    ids = torch.randint(3, 250, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(ids).logits
        with removed_layers(model, [1], stack=stack):
            removed = model(ids).logits
        after = model(ids).logits
    assert torch.equal(before, after) and not torch.equal(before, removed)


@needs_bitsandbytes
@pytest.mark.parametrize("mode", quantize.MODES)
def test_fast_engine_equals_naive_on_the_quantized_model(quantized, tokenizer, mode, tmp_path):
    model = quantized[mode].model
    stack = find_layers(model)
    # 1. per request: a context shared by its continuations (one row, branches) as each request in its own row
    requests = _mc_requests()
    packed = SweepEngine(model, stack, VARIANTS, batch_tokens=160)
    got = packed.run(requests, 64)
    assert packed.stats["sharing"].startswith("on") and packed.stats["shared_rows"] == 3
    want = SweepEngine(model, stack, VARIANTS, batch_tokens=160, share=False).run(requests, 64)
    assert np.abs(got.loglik - want.loglik).max() < 1e-4 and np.array_equal(got.greedy, want.greedy)
    # 2. metrics: the fast sweep (variants resumed from the kept block inputs) equals one evaluation per
    # variant with the blocks removed by hooks
    windows = TokenWindows.of(tokenizer, [SAMPLE_TEXT * 3], seq_len=40, max_tokens=160)
    scorers = [PerplexityScorer(model, windows, batch_size=4)]
    fast, naive = ResultStore(tmp_path / "fast", {}), ResultStore(tmp_path / "naive", {})
    run_fast(model, scorers, VARIANTS, stack=stack, store=fast, batch_tokens=128)
    run_naive(model, scorers, VARIANTS, stack=stack, store=naive)
    for variant in VARIANTS:
        got = {(r.task, r.metric): r.value for r in fast.done()[variant].rows}
        want = {(r.task, r.metric): r.value for r in naive.done()[variant].rows}
        assert got.keys() == want.keys() and got == pytest.approx(want, rel=1e-5), variant


@needs_bitsandbytes
def test_angular_and_variance_measure_the_quantized_model(quantized):
    loaded = quantized["4bit"]
    angular = angular_on_text(loaded, [SAMPLE_TEXT * 4], seq_len=32, max_tokens=192)
    variance = variance_on_text(loaded, [SAMPLE_TEXT * 4], seq_len=32, max_tokens=192)
    assert angular.num_layers == variance.num_layers == 4
    assert angular.layers["angular_distance"].between(0, 1).all() and (variance.layers["variance"] > 0).all()


@needs_bitsandbytes
def test_eight_bit_takes_four_dimensional_inputs(tokenizer, tmp_path):
    """DeepSeek's MLA feeds kv_b_proj a [batch, 1, seq, rank] tensor, which bitsandbytes' 8-bit CPU path
    cannot take as it is: flattened to 3 dimensions and back, it computes as the 3-dimensional input would."""
    from tests.families import tiny_model

    torch.manual_seed(0)
    tiny_model("deepseek_v3", vocab_size=len(tokenizer)).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path), quantize="8bit", device="cpu")
    full = load_model(str(tmp_path), device="cpu")
    ids = torch.randint(3, 90, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, exact = loaded.model(ids).logits, full.model(ids).logits
    assert ours.shape == exact.shape and (ours - exact).abs().max() < 0.1 * exact.abs().max()


@needs_bitsandbytes
def test_cli_prune_quantized_records_it_and_refuses_other_settings(tiny_llama_dir, text_file, tmp_path):
    out = tmp_path / "p"
    base = ["prune", tiny_llama_dir, "--ppl-text", text_file, "--ppl-max-tokens", 256, "--seq-len", 64,
            "--out", out, "--no-angular", "--no-samples", "--layers", "1,3"]
    res = invoke(*base, "--quantize", "8bit")
    assert res.exit_code == 0, res.output
    meta = json.loads((out / "meta.json").read_text())
    assert meta["settings"]["quantize"] == "8bit" and meta["model"]["quantize"] == "8bit"
    assert meta["model"]["quantization"]["mode"] == "8bit" and meta["model"]["quantization"]["int8_threshold"] == 6
    assert json.loads((out / "settings.json").read_text())["quantize"] == "8bit"
    refused = invoke(*base, "--quantize", "4bit")  # the numbers of another model: not mixed in
    assert refused.exit_code == 2 and refused.output.count("error:") == 1, refused.output
    assert "other settings (quantize: '8bit' there, '4bit' now)" in refused.output, refused.output
    plain = tmp_path / "plain"
    assert invoke(*base[:-6], "--out", plain, "--no-angular", "--no-samples", "--layers", "1").exit_code == 0
    assert "quantize" not in json.loads((plain / "settings.json").read_text())  # older folders stay resumable
    assert json.loads((plain / "meta.json").read_text())["model"]["quantize"] is None


@needs_bitsandbytes
def test_cli_inspect_shows_the_quantization(tiny_llama_dir):
    res = invoke("inspect", tiny_llama_dir, "--quantize", "nf4", "--device", "cpu")
    assert res.exit_code == 0, res.output
    assert "mode 4bit, backend bitsandbytes" in res.output and "quant_type nf4" in res.output


@pytest.mark.parametrize("value,fragment", [("3bit", "did you mean 8bit or 4bit?"), ("8bits", "did you mean 8bit?"),
                                            ("fp8", "use 8bit or 4bit")])
def test_bad_mode_is_one_line_before_any_output(tiny_llama_dir, text_file, tmp_path, value, fragment):
    out = tmp_path / "p"
    res = invoke("prune", tiny_llama_dir, "--quantize", value, "--ppl-text", text_file, "--out", out)
    assert_one_line_error(res, f"--quantize {value!r} is not a quantization mode", fragment)
    assert not out.exists()


def test_spellings_and_library_errors(tiny_llama_dir):
    assert [quantize.parse_quantize(v) for v in ("8bit", "INT8", "4-bit", "nf4", "none", None)] == \
        ["8bit", "8bit", "4bit", "4bit", None, None]
    with pytest.raises(UserError, match="quantize '2bit' is not a quantization mode"):
        ModelOptions(str(tiny_llama_dir), quantize="2bit")


def test_missing_bitsandbytes_says_what_to_install(tiny_llama_dir, text_file, tmp_path, monkeypatch):
    monkeypatch.setattr(quantize, "backend_version", lambda: None)
    with pytest.raises(UserError, match=r"needs bitsandbytes, which is not installed: pip install 'bitsandbytes>="):
        load_model(str(tiny_llama_dir), quantize="4bit", device="cpu")
    out = tmp_path / "p"
    res = invoke("prune", tiny_llama_dir, "--quantize", "8bit", "--ppl-text", text_file, "--out", out)
    assert_one_line_error(res, "--quantize 8bit needs bitsandbytes", "pip install", "lnsdiag[quantize]")
    assert not out.exists()
    assert ModelOptions(str(tiny_llama_dir)).quantize is None  # nothing asked, nothing needed


def test_old_bitsandbytes_and_other_devices_are_refused(tiny_llama_dir, text_file, tmp_path, monkeypatch):
    monkeypatch.setattr(quantize, "backend_version", lambda: "0.42.0")
    with pytest.raises(UserError, match=r"bitsandbytes >= 0.46.1 \(installed: 0.42.0\): pip install -U"):
        ModelOptions(str(tiny_llama_dir), quantize="8bit")
    monkeypatch.setattr(quantize, "backend_version", lambda: "0.50.2")
    out = tmp_path / "a"
    res = invoke("angular", tiny_llama_dir, "--quantize", "4bit", "--device", "mps", "--text-file", text_file,
                 "--out", out)
    assert_one_line_error(res, "--quantize 4bit runs on cpu and cuda, not on mps")
    assert not out.exists()


def test_save_and_export_of_a_quantized_model_are_refused_before_any_output(tiny_llama_dir, text_file, tmp_path,
                                                                            monkeypatch):
    monkeypatch.setattr(quantize, "backend_version", lambda: "0.50.2")  # refused before bitsandbytes is needed
    out, save = tmp_path / "s", tmp_path / "small"
    res = invoke("shrink", tiny_llama_dir, "--quantize", "4bit", "--layers", "2", "--ppl-text", text_file,
                 "--out", out, "--save", save)
    assert_one_line_error(res, "--save needs full-precision weights", "loaded quantized (4bit)",
                          "--layers SET --save DIR")
    assert not out.exists() and not save.exists()
    res = invoke("export", tiny_llama_dir, tmp_path / "e", "--quantize", "8bit")
    assert_one_line_error(res, "export needs full-precision weights", "rerun without --quantize")
    assert not (tmp_path / "e").exists()


@needs_bitsandbytes
def test_library_writers_refuse_a_quantized_model(quantized, tmp_path):
    from lnsdiag.checkpoint.export import export_checkpoint
    from lnsdiag.checkpoint.save import save_without_layers

    for write in (lambda: save_without_layers(quantized["8bit"], [1], tmp_path / "a"),
                  lambda: export_checkpoint(quantized["4bit"], tmp_path / "b")):
        with pytest.raises(UserError, match=r"a checkpoint needs full-precision weights.*quantized \((8|4)bit\)"):
            write()
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
