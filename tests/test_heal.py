"""The training-free linear heal (lnsdiag.heal): the fit, the fold, its reversibility, the refusals.

Tiny random models of tests/families.py on CPU, random token windows, fixed seeds. A heal is
checked against the healed model really built and written (``build_healed`` →
``save_pretrained`` → ``from_pretrained``): the fold must be exact, not merely plausible.
"""

from __future__ import annotations

import json
import random
import string

import pytest
import torch
import transformers as tf

from lnsdiag.data.windows import TokenWindows
from lnsdiag.errors import UserError
from lnsdiag.heal import (
    LinearPatch,
    NormalEquations,
    build_healed,
    calibration_windows,
    check_disjoint,
    contiguous_spans,
    fit_linear_patch,
    healed,
    save_healed,
)
from lnsdiag.heal.linear import _accumulate, _empty_patch
from lnsdiag.heal.sites import block_output, fold_site, site_activations
from lnsdiag.interventions import postln
from lnsdiag.interventions.removal import removed_layers
from lnsdiag.interventions.units import Removal
from lnsdiag.model.patch import patched_forward
from lnsdiag.model.structure import find_layers

from .families import VOCAB, tiny_model


class CharTokenizer:
    """One token per character, BOS in front: enough of a tokenizer for TokenWindows."""

    pad_token_id = 0

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        ids = [ord(c) % (VOCAB - 3) + 3 for c in text]
        return {"input_ids": ([1] if add_special_tokens else []) + ids}

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return "".join(chr(i) for i in ids)


def random_windows(seed: int, count: int = 6, length: int = 24) -> TokenWindows:
    gen = torch.Generator().manual_seed(seed)
    windows = [torch.cat([torch.tensor([1]), torch.randint(3, VOCAB, (length,), generator=gen)]) for _ in range(count)]
    return TokenWindows(windows, CharTokenizer(), f"random-{seed}")


def random_documents(seed: int, count: int = 8, chars: int = 200) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(string.ascii_lowercase + " ") for _ in range(chars)) for _ in range(count)]


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_intact(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert all(patched_forward(b) is None for b in find_layers(model).layers)


# --- the fold is exact: in memory == built, written and reloaded ----------------------------------

FOLDS = [("llama", (1, 2)), ("llama", (0, 1)), ("llama", (1, 3)), ("qwen2", (2, 3)), ("mistral", (1,)),
         ("mixtral", (1, 2)), ("qwen2_moe", (2,)), ("qwen2_moe", (1, 3)), ("deepseek_v3", (2,)), ("gpt2", (1, 2)),
         ("phi3", (2,)), ("gpt_neox", (1,)), ("opt", (2, 3))]


@pytest.mark.parametrize(("family", "blocks"), FOLDS, ids=[f"{f}-{'_'.join(map(str, b))}" for f, b in FOLDS])
def test_fold_matches_reloaded_checkpoint(family, blocks, tmp_path):
    model = tiny_model(family)
    patch = fit_linear_patch(model, Removal(blocks), random_windows(0))
    ids = random_windows(9, count=2).windows[0].unsqueeze(0)
    with removed_layers(model, patch.removal):
        pruned = logits(model, ids)
        with healed(model, patch):
            in_memory = logits(model, ids)
    build_healed(model, patch).save_pretrained(tmp_path)
    reloaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert len(find_layers(reloaded)) == 4 - len(blocks)
    assert torch.allclose(logits(reloaded, ids), in_memory, atol=1e-5, rtol=0)
    assert not torch.allclose(pruned, in_memory, atol=1e-3)  # the heal does change the pruned model


def test_save_healed_writes_a_plain_checkpoint(tmp_path):
    model = tiny_model("llama")
    patch = fit_linear_patch(model, Removal((1, 2)), random_windows(0))
    ids = random_windows(9, count=2).windows[0].unsqueeze(0)
    with healed(model, patch, remove=True):
        in_memory = logits(model, ids)
    saved = save_healed(model, patch, tmp_path / "healed")
    reloaded = tf.AutoModelForCausalLM.from_pretrained(saved.folder, dtype=torch.float32).eval()
    assert torch.allclose(logits(reloaded, ids), in_memory, atol=1e-5, rtol=0)
    record = json.loads((saved.folder / "lnsdiag_pruned.json").read_text())
    assert record["heal"]["spans"][0]["site"] == 0


# --- the families that cannot be healed: one line each ---------------------------------------------

REFUSED = [
    ("gemma2", (2,), "norm after the MLP"),  # sandwich norms: the MLP's output is normalised before the add
    ("gemma3", (2,), "norm after the MLP"),
    ("gpt2", (0, 1), "tied to the output head"),  # no block before the cut, embeddings tied
    ("opt", (0,), "tied to the output head"),
]


@pytest.mark.parametrize(("family", "blocks", "reason"), REFUSED, ids=[r[0] + "-" + str(r[1][0]) for r in REFUSED])
def test_unfoldable_families_refused_in_one_line(family, blocks, reason):
    model = tiny_model(family)
    before = snapshot(model)
    with pytest.raises(UserError, match=reason) as caught:
        fit_linear_patch(model, Removal(blocks), random_windows(0))
    assert "\n" not in str(caught.value)
    assert_intact(model, before)


def test_post_ln_model_refused():
    model = postln.apply_post_ln(tiny_model("llama"))
    with pytest.raises(UserError, match="Post-LN") as caught:
        fit_linear_patch(model, Removal((2,)), random_windows(0))
    assert "\n" not in str(caught.value)


def test_bert_has_no_output_projection_in_its_mlp():
    with pytest.raises(UserError, match="no MLP output projection"):
        fold_site(tiny_model("bert"), find_layers(tiny_model("bert")), 1)


def test_bfloat16_models_healed_and_sandwich_norms_still_refused():
    model = tiny_model("mixtral").to(torch.bfloat16)
    patch = fit_linear_patch(model, Removal((2,)), random_windows(0))
    assert patch.spans[0].error_healed < patch.spans[0].error_unhealed
    assert patch.spans[0].transform.dtype == torch.float32
    with pytest.raises(UserError, match="norm after the MLP"):
        fit_linear_patch(tiny_model("gemma2").to(torch.bfloat16), Removal((2,)), random_windows(0))


def test_fit_inside_a_removal_refused():
    model = tiny_model("llama")
    with removed_layers(model, [2]), pytest.raises(UserError, match="blocks 2 are removed"):
        fit_linear_patch(model, Removal((2,)), random_windows(0))


def test_patch_for_another_model_refused():
    patch = fit_linear_patch(tiny_model("llama"), Removal((2,)), random_windows(0))
    with pytest.raises(UserError, match="fitted on a model of 4 blocks"), healed(tiny_model("gpt2", n_embd=16), patch):
        pass


# --- the fit is right ------------------------------------------------------------------------------

def test_least_squares_recovers_a_known_transform():
    gen = torch.Generator().manual_seed(0)
    d = 16
    a = torch.randn(d, d, generator=gen, dtype=torch.float64)
    sums = NormalEquations(d)
    for _ in range(5):  # batch by batch, as calibration windows come
        x = torch.randn(40, d, generator=gen, dtype=torch.float64)
        sums.add(x, x @ a, torch.randn(40, d, generator=gen))
    assert torch.allclose(sums.solve(ridge=0.0), a, atol=1e-9)
    assert torch.allclose(sums.solve(ridge=1e-6), a, atol=1e-4)
    assert sums.residual(a) < 1e-12 * sums.rr
    assert sums.residual(torch.zeros(d, d)) == pytest.approx(sums.rr)


def test_rank_deficient_statistics_need_a_ridge():
    sums = NormalEquations(4)
    x = torch.zeros(10, 4, dtype=torch.float64)
    x[:, 0] = 1.0  # one direction only
    sums.add(x, x, x)
    with pytest.raises(UserError, match="rank-deficient"):
        sums.solve(ridge=0.0)
    assert torch.isfinite(sums.solve(ridge=1e-4)).all()


def _error_after_cut(model, stack, patch, windows, heal: bool) -> float:
    """‖stream after the kept block before the cut − full model's after the span‖ / ‖full‖, measured."""
    (first, last), = contiguous_spans(patch.removal.blocks)
    site = fold_site(model, stack, first - 1)
    num = den = 0.0
    for ids, mask in windows.batches(4):
        target = block_output(model, stack, last, ids, mask)
        with removed_layers(model, patch.removal), healed(model, patch if heal else _no_heal(patch)):
            _, h = site_activations(model, stack, site, ids, mask)
        keep = mask.bool()
        num += float(((h - target)[keep].double() ** 2).sum())
        den += float((target[keep].double() ** 2).sum())
    return (num / den) ** 0.5


def _no_heal(patch: LinearPatch) -> LinearPatch:
    return LinearPatch(patch.removal, patch.num_layers, patch.hidden_size, ())


@pytest.mark.parametrize("family", ["llama", "mixtral"])
def test_heal_lowers_the_error_after_the_cut(family):
    model = tiny_model(family)
    stack = find_layers(model)
    windows = random_windows(0, count=8)
    patch = fit_linear_patch(model, Removal((1, 2)), windows)
    span = patch.spans[0]
    unhealed, healed_ = (_error_after_cut(model, stack, patch, windows, heal) for heal in (False, True))
    assert healed_ < unhealed
    # the record's errors, computed from the d×d sums alone, are the ones measured on the tokens
    assert span.error_unhealed == pytest.approx(unhealed, rel=1e-4)
    assert span.error_healed == pytest.approx(healed_, rel=1e-3)
    assert span.fit_error == pytest.approx(healed_ / unhealed, rel=1e-3)
    assert span.tokens == sum(len(w) for w in windows.windows)


def test_spans_are_fitted_in_order_on_the_healed_stream():
    model = tiny_model("llama")
    patch = fit_linear_patch(model, Removal((1, 3)), random_windows(0))
    assert [(s.first, s.last, s.site) for s in patch.spans] == [(1, 1, 0), (3, 3, 2)]
    alone = fit_linear_patch(model, Removal((1, 3)), random_windows(0))
    assert torch.equal(alone.spans[1].transform, patch.spans[1].transform)  # deterministic
    # the second span's target is the full model's stream: its unhealed error includes the first cut's
    single = fit_linear_patch(model, Removal((3,)), random_windows(0))
    assert patch.spans[1].error_unhealed != pytest.approx(single.spans[0].error_unhealed, rel=1e-3)


def test_contiguous_spans():
    assert contiguous_spans([7, 3, 4]) == [(3, 4), (7, 7)]
    assert contiguous_spans((0,)) == [(0, 0)]


# --- the loaded model is never changed -------------------------------------------------------------

def test_restored_bit_for_bit_after_the_context():
    model = tiny_model("qwen2_moe")
    before = snapshot(model)
    tensors = {k: v.data_ptr() for k, v in model.state_dict().items()}
    patch = fit_linear_patch(model, Removal((1, 3)), random_windows(0))
    assert_intact(model, before)  # the fit leaves it as it was
    with healed(model, patch, remove=True):
        changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
        assert changed and all("down_proj" in k for k in changed)
    assert_intact(model, before)
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == tensors  # the same tensors, not copies
    build_healed(model, patch)
    assert_intact(model, before)


def test_restored_when_an_exception_is_raised_inside():
    model = tiny_model("llama")
    before = snapshot(model)
    patch = fit_linear_patch(model, Removal((0, 1)), random_windows(0))  # embeddings folded too
    with pytest.raises(RuntimeError, match="boom"), removed_layers(model, patch.removal), healed(model, patch):
        raise RuntimeError("boom")
    assert_intact(model, before)


# --- the patch as data -----------------------------------------------------------------------------

def test_patch_saves_loads_and_summarises(tmp_path):
    model = tiny_model("gpt2")
    patch = fit_linear_patch(model, Removal((1, 3)), random_windows(0), ridge=1e-3)
    back = LinearPatch.load(patch.save(tmp_path / "heal.safetensors"))
    assert back.summary() == patch.summary()
    assert all(torch.equal(a.transform, b.transform) for a, b in zip(back.spans, patch.spans, strict=True))
    summary = json.loads(json.dumps(patch.summary()))
    assert summary["removed"] == [1, 3] and summary["spans"][0]["ridge"] == 1e-3
    assert summary["calibration"]["name"] == "random-0"
    (tmp_path / "junk.safetensors").write_bytes(b"not a patch")
    with pytest.raises(UserError, match="not a linear heal"):
        LinearPatch.load(tmp_path / "junk.safetensors")


def test_statistics_are_d_by_d_whatever_the_tokens():
    model = tiny_model("llama")
    stack = find_layers(model)
    windows = random_windows(0, count=12, length=60)
    patch = _empty_patch(model, stack, Removal((2,)), windows)
    sums = _accumulate(model, stack, patch, fold_site(model, stack, 1), 2, windows, batch_size=4)
    held = [v for v in vars(sums).values() if torch.is_tensor(v)]
    assert sums.tokens == 12 * 61 > 32
    assert held and all(v.shape == (32, 32) and v.dtype == torch.float64 for v in held)


# --- calibration text kept apart from evaluation text ----------------------------------------------

def _windows(texts: list[str], name: str) -> TokenWindows:
    return TokenWindows.of(CharTokenizer(), texts, seq_len=64, max_tokens=None, name=name)


def test_disjoint_texts_accepted():
    evaluation = random_documents(1)
    windows = calibration_windows(CharTokenizer(), random_documents(2), seq_len=64, max_tokens=None,
                                  evaluation=(evaluation, _windows(evaluation, "eval")))
    assert windows.name == "calibration" and len(windows) > 1


def test_shared_document_refused_in_one_line():
    calib, evaluation = random_documents(2), random_documents(1)
    calib.insert(3, "  " + evaluation[5].replace(" ", "\n ", 2))  # the same document, whitespace aside
    with pytest.raises(UserError, match="1 document") as caught:
        check_disjoint(calib, _windows(calib, "calib"), evaluation, _windows(evaluation, "eval"))
    assert "\n" not in str(caught.value)


def test_evaluation_tokens_inside_the_calibration_text_refused():
    calib, evaluation = random_documents(2), random_documents(1)
    calib[4] = calib[4][:50] + evaluation[2] + calib[4][50:]  # a document inside another, packed differently
    with pytest.raises(UserError, match="63 tokens in a row of evaluation window") as caught:
        check_disjoint(calib, _windows(calib, "calib"), evaluation, _windows(evaluation, "eval"))
    assert "\n" not in str(caught.value)


def test_a_shared_passage_refused_at_the_length_asked():
    calib, evaluation = random_documents(2), random_documents(1)
    calib[4] = calib[4][:50] + evaluation[2][60:100] + calib[4][50:]  # 40 characters in common
    check_disjoint(calib, _windows(calib, "calib"), evaluation, _windows(evaluation, "eval"))  # under 63: fine
    with pytest.raises(UserError, match="32 tokens in a row"):
        check_disjoint(calib, _windows(calib, "calib"), evaluation, _windows(evaluation, "eval"), ngram=32)
