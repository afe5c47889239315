"""``shrink --heal linear``: each pick healed without training and scored like every removal — equal to
the model really built healed (``build_healed``), the loaded model intact, the calibration text never the
evaluation text, the healed checkpoint what plain transformers loads, a resumed run not fitting again."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
import transformers as tf
from typer.testing import CliRunner

from lnsdiag.cli import app
from lnsdiag.data.text import TextSource
from lnsdiag.data.windows import TokenWindows
from lnsdiag.heal import LinearPatch, build_healed, healed
from lnsdiag.model.load import LoadedModel
from lnsdiag.runners.heal import HealConfig
from lnsdiag.runners.scoring import ScoringConfig, ScoringInputs
from lnsdiag.runners.shrink import ShrinkConfig, run
from lnsdiag.scoring.perplexity import perplexity
from tests.conftest import SAMPLE_TEXT
from tests.families import peaked_model


def _salad(seed: int, words: int = 3000) -> str:
    """Calibration text: the sample's words in another order (no run of tokens in common with it)."""
    rng = random.Random(seed)
    vocabulary = SAMPLE_TEXT.split()
    return " ".join(rng.choice(vocabulary) for _ in range(words))


@pytest.fixture()
def calib_file(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text(_salad(1), encoding="utf-8")
    return path


def test_healed_picks_equal_the_model_really_built_healed_and_leave_the_model_intact(tokenizer, tmp_path):
    model = peaked_model("llama", len(tokenizer))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loaded = LoadedModel.wrap(model, tokenizer, name="llama")
    evaluation = TextSource("sample", [SAMPLE_TEXT * 6])
    config = ShrinkConfig(remove=2, strategies="last,bi", scoring=ScoringConfig(ppl_text="unused", seq_len=32),
                          heal=HealConfig(methods="linear", calib_max_tokens=2048))
    result = run(loaded, config, tmp_path / "out", inputs=ScoringInputs(None, evaluation),
                 calibration=TextSource("salad", [_salad(2)]))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # restored bit for bit
    outcome = result.heals["linear"]
    assert set(outcome.patches) == {p.removal for p in result.picks}
    windows = TokenWindows.of(tokenizer, evaluation.texts, seq_len=32, max_tokens=65_536, name="sample")
    helped = 0
    for pick in result.picks:
        reference = build_healed(model, outcome.patches[pick.removal])
        rows = result.healed[(result.healed["strategy"] == pick.strategy) & (result.healed["n_removed"] == pick.n)]
        value = rows.set_index(["task", "metric"])["value"]
        want = perplexity(reference, windows)
        assert value[("ppl", "ppl")] == pytest.approx(np.exp(want.mean_nll), rel=1e-5)
        kl, agree, tokens = _direct_kl(model, reference, windows)
        assert value[("fidelity", "kl")] == pytest.approx(kl / tokens, rel=1e-5)
        assert value[("fidelity", "top1")] == agree / tokens  # the reference is the full model, not the healed one
        plain = result.frame[(result.frame["strategy"] == pick.strategy) & (result.frame["n_removed"] == pick.n)]
        helped += value[("ppl", "ppl")] < plain.set_index(["task", "metric"])["value"][("ppl", "ppl")]
    assert helped  # the heal lowers some pick's perplexity (random weights: not necessarily every one)
    assert set(result.healed["heal"]) == {"linear"} and set(result.frame["heal"]) == {"none"}
    result.write()
    tidy = (tmp_path / "out" / "shrink.csv").read_text()
    assert ",linear," in tidy and ",none," in tidy
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["heal"]["linear"]["calibration"]["name"] == "salad"
    assert meta["heal"]["linear"]["calibration"]["checked_disjoint_from"] == "sample"


def _direct_kl(model, other, windows: TokenWindows) -> tuple[float, int, int]:
    c = windows.context
    kl_sum, agree, tokens = 0.0, 0, 0
    for window in windows.windows:
        with torch.no_grad():
            full = model(input_ids=window[None]).logits[0, c - 1:-1].double().log_softmax(-1)
            variant = other(input_ids=window[None]).logits[0, c - 1:-1].double().log_softmax(-1)
        kl_sum += float((full.exp() * (full - variant)).sum())
        agree += int((full.argmax(-1) == variant.argmax(-1)).sum())
        tokens += full.shape[0]
    return kl_sum, agree, tokens


def test_cli_heals_saves_the_healed_model_and_resumes_without_fitting_again(tiny_llama_dir, text_file, calib_file,
                                                                             tmp_path):
    out, save = tmp_path / "out", tmp_path / "small"
    args = ["shrink", str(tiny_llama_dir), "--ppl-text", str(text_file), "--seq-len", "32", "--remove", "2",
            "--strategy", "last", "--heal", "linear", "--calib-text", str(calib_file), "--calib-max-tokens", "2048",
            "--no-kl", "--out", str(out)]
    res = CliRunner().invoke(app, [*args, "--save", str(save)])
    assert res.exit_code == 0, res.output
    assert "Healed (linear, no training)" in res.output and "healed (linear), Δ to the full model" in res.output
    fitted = {LinearPatch.load(f).removal: f for f in (out / "heal-linear" / "patches").glob("*.safetensors")}
    assert sorted(len(r.blocks) for r in fitted) == [1, 2]  # n = 1 and n = 2, each fitted once
    patch_file = next(f for r, f in fitted.items() if len(r.blocks) == 2)  # what --save wrote (N = 2)
    patch = LinearPatch.load(patch_file)
    # the saved checkpoint is the healed pruned model, in the standard architecture
    small = tf.AutoModelForCausalLM.from_pretrained(save).eval()
    assert small.config.num_hidden_layers == 2
    model = tf.AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    ids = torch.tensor([[1, 17, 42, 99, 7, 3, 250, 31]])
    with torch.no_grad(), healed(model, patch, remove=True):
        want = model(input_ids=ids, use_cache=False).logits
    with torch.no_grad():
        got = small(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    card = (save / "README.md").read_text()
    assert "Healed without training (linear)" in card
    # resumed: nothing scored or fitted again; unhealed on request
    stamp = patch_file.stat().st_mtime_ns
    again = CliRunner().invoke(app, [*args, "--save", str(tmp_path / "plain"), "--save-heal", "none"])
    assert again.exit_code == 0, again.output
    assert patch_file.stat().st_mtime_ns == stamp and "fitting the heal" not in again.output
    plain = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "plain").eval()
    assert not torch.allclose(plain(input_ids=ids).logits, got, atol=1e-4)
    assert "Healed without training" not in (tmp_path / "plain" / "README.md").read_text()


def test_a_heal_on_other_calibration_text_is_not_mixed_in(tiny_llama_dir, text_file, calib_file, tmp_path):
    out = tmp_path / "out"
    args = ["shrink", str(tiny_llama_dir), "--ppl-text", str(text_file), "--seq-len", "32", "--remove", "1",
            "--strategy", "last", "--heal", "linear", "--calib-max-tokens", "1024", "--no-kl", "--out", str(out)]
    assert CliRunner().invoke(app, [*args, "--calib-text", str(calib_file)]).exit_code == 0
    other = tmp_path / "other.txt"
    other.write_text(_salad(7), encoding="utf-8")
    res = CliRunner().invoke(app, [*args, "--calib-text", str(other)])
    assert res.exit_code == 2 and "settings" in res.output and "calibration" in res.output, res.output


# --- LoRA distilled from the full model ------------------------------------------------------------------

def _held_out_kl(model, windows: TokenWindows, variant) -> float:
    total, count = 0.0, 0
    for ids, mask in windows.batches(8):
        with torch.no_grad():
            full = model(input_ids=ids, attention_mask=mask).logits.double().log_softmax(-1)
            with variant():
                moved = model(input_ids=ids, attention_mask=mask).logits.double().log_softmax(-1)
        kl = (full.exp() * (full - moved)).sum(-1)[mask.bool()]
        total, count = total + float(kl.sum()), count + kl.numel()
    return total / count


def test_lora_distillation_lowers_held_out_kl_is_seeded_and_leaves_the_model_intact(tokenizer, tmp_path):
    from lnsdiag.heal import LoraPatch, lora_healed, save_lora_healed, train_lora
    from lnsdiag.interventions.removal import removed_layers

    model = peaked_model("llama", len(tokenizer))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules = [type(m) for m in model.modules()]
    calib = TokenWindows.of(tokenizer, [_salad(3)], seq_len=32, max_tokens=2048, name="salad")
    held_out = TokenWindows.of(tokenizer, [SAMPLE_TEXT * 4], seq_len=32, max_tokens=2048, name="sample")
    patch = train_lora(model, [1, 2], calib, steps=30, lr=2e-3, seed=5)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # restored bit for bit
    assert [type(m) for m in model.modules()] == modules and all(p.requires_grad for p in model.parameters())
    assert "peft_config" not in model.__dict__  # nothing of peft's left on the model
    unhealed = _held_out_kl(model, held_out, lambda: removed_layers(model, [1, 2]))
    healed_kl = _held_out_kl(model, held_out, lambda: lora_healed(model, patch, remove=True))
    assert healed_kl < 0.7 * unhealed, (unhealed, healed_kl)  # the distillation carries over to unseen text
    again = train_lora(model, [1, 2], calib, steps=30, lr=2e-3, seed=5)
    assert all(torch.equal(patch.factors[n][1], again.factors[n][1]) for n in patch.factors)  # seeded
    # saved: plain transformers computes the merged, pruned model
    patch.save(tmp_path / "p.safetensors")
    loaded_patch = LoraPatch.load(tmp_path / "p.safetensors")
    save_lora_healed(LoadedModel.wrap(model, tokenizer, name="llama"), loaded_patch, tmp_path / "small")
    small = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "small").eval()
    ids = torch.tensor([[1, 17, 42, 99, 7, 3, 250, 31]])
    with torch.no_grad(), lora_healed(model, patch, remove=True):
        want = model(input_ids=ids, use_cache=False).logits
    with torch.no_grad():
        assert torch.allclose(small(input_ids=ids).logits, want, atol=1e-5, rtol=1e-5)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_ctrl_c_during_lora_keeps_the_best_adapters_so_far(tokenizer):
    from lnsdiag.heal import train_lora

    model = peaked_model("qwen2", len(tokenizer))
    calib = TokenWindows.of(tokenizer, [_salad(4)], seq_len=32, max_tokens=1024, name="salad")
    seen = []

    def interrupt_at_the_fourth_report(message: str) -> None:
        seen.append(message)
        if len(seen) == 4:
            raise KeyboardInterrupt

    patch = train_lora(model, [2], calib, steps=20, lr=1e-3, progress=interrupt_at_the_fourth_report)
    assert patch.record["interrupted_at"] == 8 and patch.record["trained_steps"] == 8
    assert any(float(b.abs().max()) > 0 for _, b in patch.factors.values())  # trained, not the zero start
    assert "keeping the best adapters so far" in seen[-1]


def test_cli_heals_with_lora_and_linear_side_by_side(tiny_llama_dir, text_file, calib_file, tmp_path):
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["shrink", str(tiny_llama_dir), "--ppl-text", str(text_file), "--seq-len", "32",
                                   "--remove", "1", "--strategy", "last", "--heal", "linear,lora", "--heal-steps", "6",
                                   "--calib-text", str(calib_file), "--calib-max-tokens", "1024", "--no-kl",
                                   "--out", str(out)])
    assert res.exit_code == 0, res.output
    tidy = (out / "shrink.csv").read_text()
    assert ",linear," in tidy and ",lora," in tidy
    settings = json.loads((out / "heal-lora" / "settings.json").read_text())
    assert settings["heal"] == "lora" and settings["heal_steps"] == 6 and settings["heal_loss"] == "kd"
    assert "Healed (lora, no training)" not in res.output and "Healed (lora" in res.output


def test_calibration_defaults_to_the_training_split_of_the_scored_dataset():
    from lnsdiag.runners.heal import calibration_beside

    assert calibration_beside(ScoringConfig(ppl_dataset="stdlib")) == ("stdlib", None)  # scored on test: train
    assert calibration_beside(ScoringConfig(ppl_dataset="stdlib", ppl_split="train")) is None  # then wikitext-2
    assert calibration_beside(ScoringConfig(ppl_text="x.txt")) is None
    source = HealConfig(methods="linear").load_calibration(("stdlib", None))
    assert source.name == "stdlib-docstrings[train]" and source.texts
