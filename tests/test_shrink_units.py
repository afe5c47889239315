"""`shrink --unit attn,mlp`: strategies choose among sub-layers (mixed, BlockPruner-style) and every pick is
scored as the model with those sub-layers' output projections really zeroed."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from lnsdiag.checkpoint.reference import build_without_units
from lnsdiag.errors import UserError
from lnsdiag.interventions.units import Attention, Block, Mlp, Removal
from lnsdiag.runners import shrink, strategies
from lnsdiag.runners.heal import HealConfig
from lnsdiag.runners.prune import PruneConfig
from tests.test_cli_basic import invoke
from tests.test_shrink import _config, _ppl_of, ppl_file, six_layers  # noqa: F401  (fixtures)


def test_greedy_sweep_and_last_over_mixed_sublayers_follow_brute_force(six_layers, ppl_file, tmp_path):  # noqa: F811
    model, tok = six_layers.model, six_layers.tokenizer
    run = shrink.run(six_layers, _config(ppl_file, remove=3, strategies="sweep,greedy,last", units="attn,mlp"),
                     tmp_path / "s")
    brute: dict[Removal, float] = {}

    def ppl(removal):
        if removal not in brute:
            brute[removal] = _ppl_of(build_without_units(model, removal), tok)
        return brute[removal]

    units = [kind(i) for i in range(6) for kind in (Attention, Mlp)]
    removed = Removal()
    picks = {(p.strategy, p.n): p.removal for p in run.picks}
    for n in range(1, 4):
        options = [removed | Removal.of(u) for u in units if u not in removed]
        removed = min(options, key=lambda s: (ppl(s), s))
        assert picks[("greedy", n)] == removed
    singles = sorted(units, key=lambda u: (ppl(Removal.of(u)), u))
    assert {n: picks[("sweep", n)] for n in range(1, 4)} == {n: Removal(tuple(singles[:n])) for n in range(1, 4)}
    assert picks[("last", 2)] == Removal((Attention(4), Mlp(4)))  # the deepest units before the final layer
    rows = run.frame[run.frame["metric"] == "ppl"]
    for _, r in rows.iterrows():
        removal = Removal.from_cell(r["removed_layers"])
        assert math.isclose(r["value"], _ppl_of(model, tok) if not removal else ppl(removal), rel_tol=1e-5)
    removed_rows = rows[rows["strategy"] != "full"]
    assert set(removed_rows["unit"]) <= {"attn", "mlp", "mixed"}
    assert rows["unit"][rows["strategy"] == "full"].isna().all()
    assert run.meta["units"] == ["attn", "mlp"]
    assert all(p["removed_units"] for p in run.meta["picks"])


def test_strategies_choose_among_the_asked_kinds():
    per_unit = pd.DataFrame({"layer": [0, 0, 1, 1, 2, 2], "unit": ["attn", "mlp"] * 3,
                             "block_influence": [0.3, 0.2, 0.01, 0.5, 0.02, 0.4], "angular_distance": 0.0})
    evidence = strategies.Evidence(num_layers=3, per_layer=per_unit, units=("attn",))
    bi = strategies.registered("bi").picks(evidence, 2)
    assert [p.removal for p in bi] == [Removal.of(Attention(1)), Removal((Attention(1), Attention(2)))]
    mixed = strategies.Evidence(num_layers=3, per_layer=per_unit, units=("attn", "mlp"))
    assert strategies.registered("bi").picks(mixed, 3)[2].removal == Removal((Attention(1), Attention(2), Mlp(0)))
    assert [p.removal for p in strategies.registered("last").picks(mixed, 3)] == [
        Removal.of(Mlp(1)), Removal((Attention(1), Mlp(1))), Removal((Mlp(0), Attention(1), Mlp(1)))]
    assert strategies.Evidence(num_layers=2, units=("block", "mlp")).candidates() == [Block(0), Mlp(0), Block(1),
                                                                                       Mlp(1)]


def test_config_with_sublayers():
    assert shrink.ShrinkConfig(units="attn").strategies == ("bi", "sweep", "greedy", "last")  # angular: blocks only
    with pytest.raises(UserError, match="angular removes contiguous whole blocks"):
        shrink.ShrinkConfig(units="attn", strategies="angular,bi")
    with pytest.raises(UserError, match="names its units itself"):
        shrink.ShrinkConfig(units="attn", layers="1.attn")
    with pytest.raises(UserError, match="not healable yet"):
        shrink.ShrinkConfig(units="mlp", heal=HealConfig(methods=("linear",)))
    with pytest.raises(UserError, match="did you mean attn"):
        shrink.ShrinkConfig(units="attention")
    with pytest.raises(UserError, match="removes sub-layers, which are not healable yet"):
        shrink.ShrinkConfig(layers="2,3.attn", heal=HealConfig(methods=("lora",)))
    with pytest.raises(UserError, match="more than the 10 sub-layers"):
        shrink.ShrinkConfig(units="attn,mlp", remove=11, scoring=PruneConfig(angular=False),
                            strategies="last").check_model(6)
    given = shrink.ShrinkConfig(layers="1.attn,3.mlp,4")
    assert given.remove == 3 and given.layers == Removal((Attention(1), Mlp(3), Block(4)))
    with pytest.raises(UserError, match="out of range"):
        shrink.ShrinkConfig(layers="1.attn,9.mlp").check_model(6)


def test_cli_scores_a_given_sublayer_set(tiny_llama_dir, text_file, tmp_path):
    out = tmp_path / "out"
    result = invoke("shrink", tiny_llama_dir, "--ppl-text", text_file, "--seq-len", 64, "--ppl-max-tokens", 512,
                    "--layers", "1.attn,2.mlp", "--out", out)
    assert result.exit_code == 0, result.output
    frame = pd.read_csv(out / "shrink.csv", dtype={"removed_layers": str})
    given = frame[frame["strategy"] == "given"]
    assert set(given["removed_layers"]) == {"1.attn,2.mlp"} and set(given["unit"]) == {"mixed"}
    wide = pd.read_csv(out / "shrink_wide.csv", dtype={"removed_layers": str})
    assert list(wide["unit"].fillna("")) == ["", "mixed"] and wide["flops_saved_pct"].iloc[1] > 0


def test_cli_saves_a_sublayer_pick_that_plain_transformers_computes(tiny_llama_dir, text_file, tmp_path):
    import torch
    import transformers as tf

    from lnsdiag.interventions.removal import removed_layers
    from lnsdiag.model.load import load_model

    save = tmp_path / "small"
    result = invoke("shrink", tiny_llama_dir, "--ppl-text", text_file, "--seq-len", 64, "--ppl-max-tokens", 512,
                    "--layers", "0.mlp,2.attn,3", "--out", tmp_path / "out", "--save", save)
    assert result.exit_code == 0, result.output
    plain = tf.AutoModelForCausalLM.from_pretrained(save, dtype=torch.float32).eval()
    original = load_model(str(tiny_llama_dir), dtype="float32", device="cpu").model
    ids = torch.randint(3, 200, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), removed_layers(original, Removal.parse("0.mlp,2.attn,3")):
        expected = original(input_ids=ids, use_cache=False).logits
    with torch.no_grad():
        assert torch.equal(plain(input_ids=ids).logits, expected)
    assert plain.config.lnsdiag_removed_units == ["0.mlp", "2.attn"] and plain.config.num_hidden_layers == 3
    card = (save / "README.md").read_text()
    assert "2.attn" in card and "zero" in card and "of the FLOPs per token at 64 tokens of context" in card
    shown = invoke("inspect", save)
    assert shown.exit_code == 0 and "0.mlp,2.attn (zeroed in the checkpoint" in shown.output, shown.output
    frame = pd.read_csv(tmp_path / "out" / "shrink.csv", dtype={"removed_layers": str})
    given = frame[frame["strategy"] == "given"]
    assert (given["params_removed_pct"] > 0).all() and (given["flops_saved_pct"] > 0).all()


def test_bi_ranks_sublayers_by_their_own_block_influence(six_layers, ppl_file, tmp_path):  # noqa: F811
    """ShortGPT over attention sub-layers: the n of lowest BI of their own step, as the angular measurement
    gives it on the same windows."""
    from lnsdiag.data.windows import TokenWindows
    from lnsdiag.measure.angular import AngularConfig, angular_on_windows

    run = shrink.run(six_layers, _config(ppl_file, remove=2, strategies="bi,last", units="attn"), tmp_path / "bi")
    windows = TokenWindows.of(six_layers.tokenizer, [ppl_file.read_text()], seq_len=48, max_tokens=600, name="ppl")
    measured = angular_on_windows(six_layers.model, windows, AngularConfig(units=("attn",), batch_size=4))
    attn = measured.units_frame()
    attn = attn[attn["unit"] == "attn"].sort_values(["block_influence", "layer"])
    lowest = [Attention(int(i)) for i in attn["layer"]]
    picks = {p.n: p.removal for p in run.picks if p.strategy == "bi"}
    assert picks == {1: Removal(tuple(lowest[:1])), 2: Removal(tuple(lowest[:2]))}
    stored = pd.read_csv(tmp_path / "bi" / "angular.csv")
    assert set(stored["unit"]) >= {"attn"}


@pytest.mark.parametrize("units", ["block", "attn,mlp"])
def test_greedy_steps_compare_with_the_real_full_model(six_layers, ppl_file, tmp_path, units):  # noqa: F811
    """A greedy step scores its candidates on the model with the units already chosen taken out; their KL
    and top-1 agreement must still be against the full model (a direct float64 computation on the
    reference model), not against the partly pruned one."""
    from lnsdiag.data.windows import TokenWindows
    from tests.test_shrink_heal import _direct_kl

    model, tok = six_layers.model, six_layers.tokenizer
    run = shrink.run(six_layers, _config(ppl_file, remove=3, strategies="greedy", units=units), tmp_path / "g")
    windows = TokenWindows.of(tok, [ppl_file.read_text()], seq_len=48, max_tokens=600)
    steps = [p for p in run.meta["passes"] if p["pass"].startswith("greedy step")]
    assert steps and all(p.get("reference_block_tokens", 0) > 0 for p in steps)  # the extra forward, counted
    for pick in run.picks:
        rows = run.frame[(run.frame["n_removed"] == pick.n) & (run.frame["task"] == "fidelity")]
        value = rows.set_index("metric")["value"]
        kl, agree, tokens = _direct_kl(model, build_without_units(model, pick.removal), windows)
        assert value["kl"] == pytest.approx(kl / tokens, rel=1e-5), pick.removal
        assert value["top1"] == agree / tokens, pick.removal
