"""What a variant removes (:mod:`lnsdiag.interventions.units`): units, sets of them, and every form a
removal takes outside the program — byte for byte what result folders, checkpoints and CSVs held before
there was a type for it, so existing folders resume."""

from __future__ import annotations

import json
import math
import pickle

import numpy as np
import pytest

from lnsdiag.engine.checkpoint import _variant_codes, _variants_from_codes
from lnsdiag.errors import UserError
from lnsdiag.interventions.units import Block, Removal, Unit
from lnsdiag.model.structure import parse_layer_spec
from lnsdiag.results.store import ResultStore, VariantResult, plan_variants
from lnsdiag.results.verdict import prune_frame
from lnsdiag.runners.prune import PruneConfig
from lnsdiag.runners.shrink import ShrinkConfig, shrink_frame
from lnsdiag.runners.shrink_table import layer_list, layers_text, read_shrink
from lnsdiag.runners.strategies import Pick
from lnsdiag.runs import write_csv
from lnsdiag.scoring.base import MetricRow

FULL = Removal()
#: The forms a removal took before it had a type: None, one block, several (never fewer than two).
LEGACY = [None, 0, 3, 7, 31, 127, (3, 4), (0, 1, 2), (3, 4, 7), (9, 10, 31)]


def _legacy_name(layer):
    """A variant's file name as ``results.store.variant_name`` made it."""
    if layer is None:
        return "baseline"
    if isinstance(layer, int):
        return f"layer_{layer:03d}"
    return "layers_" + "_".join(f"{i:03d}" for i in layer)


def _legacy_json(layer):
    """A variant's ``removed_layer`` as ``VariantResult.to_json`` wrote it (and engine checkpoints)."""
    return list(layer) if isinstance(layer, tuple) else layer


def _of(layer):
    return FULL if layer is None else Removal.of(layer)


# --- units ----------------------------------------------------------------------------------------

def test_a_unit_is_a_block_or_a_sublayer():
    assert str(Block(3)) == "3" and Block(3).token == "003" and Block(3).to_json() == 3
    assert Block(3) == Block(3) and hash(Block(3)) == hash(Block(3)) and Block(3) != Block(4)
    assert sorted([Block(4), Block(0), Block(3)]) == [Block(0), Block(3), Block(4)]
    assert Block(2) < Block(3) <= Block(3) and Block(np.int64(5)).block == 5 and type(Block(np.int64(5)).block) is int
    assert Unit.parse("3") == Unit.parse(3) == Unit.parse(" 3 ") == Block(3)
    assert Unit.parse("3.attn").kind == "attn" and Unit.parse("3.mlp").kind == "mlp"
    for bad in ("3.", "3.foo", "x", "3.block", ""):
        with pytest.raises(ValueError):
            Unit.parse(bad)
    with pytest.raises(TypeError):
        Unit(3)  # the base of the kinds, not a kind
    with pytest.raises(TypeError):
        Block("3")


# --- sets of units --------------------------------------------------------------------------------

def test_a_removal_is_a_frozen_ordered_set():
    r = Removal((7, 3, 4, 3))
    assert r.units == (Block(3), Block(4), Block(7)) and len(r) == 3 and list(r) == [Block(3), Block(4), Block(7)]
    assert r == Removal([Block(4), 7, 3]) == Removal.of((3, 4, 7)) and hash(r) == hash(Removal((4, 7, 3)))
    assert {r: 1}[Removal((3, 4, 7))] == 1 and 4 in r and Block(4) in r and 5 not in r
    assert not FULL and len(FULL) == 0 and Removal.of(()) == FULL and r
    assert Removal.of(3) == Removal((3,)) == Removal.of(Block(3)) == Removal.of(np.int64(3)) and Removal.of(r) is r
    assert sorted([Removal.of(2), Removal((0, 1)), FULL, Removal.of(0), Removal((0, 2))]) == [
        FULL, Removal.of(0), Removal((0, 1)), Removal((0, 2)), Removal.of(2)]  # the full model first
    assert Removal.of(3) | Removal.of(1) == Removal((1, 3)) and FULL | r == r
    with pytest.raises(AttributeError):
        r.units = ()
    assert pickle.loads(pickle.dumps(r)) == r  # ranks exchange them


def test_what_the_engines_ask():
    r = Removal((7, 3, 4))
    assert r.blocks == (3, 4, 7) and r.first == 3 and r.without_first() == Removal((4, 7))
    assert Removal.of(5).single_block == 5 and r.single_block is None and FULL.single_block is None
    assert Removal.of(5).without_first() == FULL and FULL.blocks == ()
    with pytest.raises(ValueError):
        _ = FULL.first


def test_progress_labels():
    assert [FULL.label, Removal.of(3).label, Removal((3, 4)).label] == [
        "baseline", "without layer 3", "without layers 3,4"]


# --- the command line -----------------------------------------------------------------------------

def test_shrinks_set_grammar_and_its_messages():
    assert Removal.parse("3,4,7") == Removal.parse("7, 4,3") == Removal((3, 4, 7))
    assert Removal.parse("3-5,9") == Removal((3, 4, 5, 9)) and Removal.parse("4-4") == Removal.of(4)
    assert Removal.parse(" 3 ,, 5 ") == Removal((3, 5)) and Removal.parse([5, 3, 3]) == Removal((3, 5))
    assert Removal.parse(Removal.of(2)) == Removal.of(2)
    assert Removal.parse("-1").blocks == (-1,)  # checked against the model later ("out of range")
    for bad in ("x", "3,a", "5-3", "3-", "a.attn"):
        with pytest.raises(UserError) as err:
            Removal.parse(bad)
        assert str(err.value) == ("--layers must be layer numbers like 3,4,7 or 3-5 (3.attn, 3.mlp: a sub-layer), "
                                  f"not {bad!r}")
    with pytest.raises(UserError, match=r"'3.5' names no unit"):
        Removal.parse("3.5")
    for empty in ("", ",", " , "):
        with pytest.raises(UserError) as err:
            Removal.parse(empty)
        assert str(err.value) == "--layers names no layer"
    with pytest.raises(UserError) as err:
        ShrinkConfig(layers="3-x")
    assert str(err.value) == "--layers must be layer numbers like 3,4,7 or 3-5 (3.attn, 3.mlp: a sub-layer), not '3-x'"
    config = ShrinkConfig(layers="1,3-4")
    assert config.layers == Removal((1, 3, 4)) and config.remove == 3
    with pytest.raises(UserError) as err:
        ShrinkConfig(layers="2,9,12").check_model(6)
    assert str(err.value) == "layers 9 is out of range: the model has layers 0-5"


def test_prunes_one_at_a_time_grammar():
    assert Removal.each(parse_layer_spec("28-", 32)) == [Removal.of(i) for i in range(28, 32)]
    assert Removal.each(parse_layer_spec("0,4,8", 32)) == [Removal.of(0), Removal.of(4), Removal.of(8)]
    assert Removal.each(parse_layer_spec("all", 3)) == [Removal.of(0), Removal.of(1), Removal.of(2)]
    assert Removal.each(parse_layer_spec("-1", 4)) == [Removal.of(3)]
    with pytest.raises(UserError) as err:
        Removal.each(parse_layer_spec("0-x", 4))
    assert str(err.value) == "--layers '0-x' is malformed: use ranges and lists like 0-31 or 0,4,8"
    with pytest.raises(UserError) as err:
        Removal.each(parse_layer_spec("5-2", 8))
    assert str(err.value) == "--layers '5-2': range 5-2 runs backwards"


# --- the result store, variant files, checkpoints -------------------------------------------------

@pytest.mark.parametrize("layer", LEGACY)
def test_names_and_json_forms_are_those_of_every_stored_folder(layer):
    removal = _of(layer)
    assert removal.name == _legacy_name(layer)
    assert removal.to_json() == _legacy_json(layer)
    assert json.dumps(removal.to_json()) == json.dumps(_legacy_json(layer))
    assert Removal.from_json(json.loads(json.dumps(_legacy_json(layer)))) == removal
    assert Removal.from_json(removal.to_json()) == removal


def test_reading_json_accepts_null_a_block_or_a_list_and_refuses_the_rest():
    assert Removal.from_json(None) == FULL and Removal.from_json(3) == Removal.of(3)
    assert Removal.from_json([7, 3]) == Removal((3, 7)) and Removal.from_json([3]) == Removal.of(3)
    assert Removal.from_json([]) == FULL
    for bad in (1.5, True, [3, None], {"a": 1}, "x", [[3]]):
        with pytest.raises((ValueError, TypeError)):
            Removal.from_json(bad)


def test_engine_checkpoint_codes_are_unchanged():
    variants = [_of(layer) for layer in LEGACY]
    codes = _variant_codes(variants)
    assert str(codes) == json.dumps([_legacy_json(layer) for layer in LEGACY])
    assert str(_variant_codes([FULL, Removal.of(3), Removal((3, 4))])) == "[null, 3, [3, 4]]"
    assert _variants_from_codes(codes) == variants


def _row(value=0.5):
    return MetricRow("t", "acc", value, 0.01, True)


def _stored(layer, seconds=1.0):
    """A variant file exactly as lnsdiag wrote it before removals had a type (and older: no paired units)."""
    return {"removed_layer": _legacy_json(layer), "seconds": seconds, "engine": "fast",
            "finished": "2025-01-01T00:00:00+0000", "metrics": [_row().as_dict()]}


def test_an_existing_results_folder_resumes(tmp_path):
    """A store written with today's JSON forms (null, a block, a list) reads back by removal; nothing
    stored is scored again, and saving writes the same names and the same forms."""
    folder = tmp_path / "run"
    (folder / "variants").mkdir(parents=True)
    (folder / "settings.json").write_text(json.dumps({"model": "m"}))
    stored = [None, 1, 3, (1, 3), (0, 2, 5)]
    for layer in stored:
        (folder / "variants" / f"{_legacy_name(layer)}.json").write_text(json.dumps(_stored(layer)))
    (folder / "variants" / "foreign.json").write_text(json.dumps({**_stored(1), "removed_layer": "x"}))
    store = ResultStore(folder, {"model": "m"})
    done = store.done()
    assert set(done) == {_of(layer) for layer in stored}
    assert all(done[_of(layer)].removal == _of(layer) for layer in stored)
    assert all(store.has(_of(layer)) for layer in stored) and not store.has(Removal.of(2))
    assert plan_variants(Removal.each([1, 2, 3]), done) == [Removal.of(2)]
    assert plan_variants(Removal.each([2]), {}) == [FULL, Removal.of(2)]
    for layer in stored:  # written again: the same file, the same removed_layer
        path = folder / "variants" / f"{_legacy_name(layer)}.json"
        before = json.loads(path.read_text())
        store.save(done[_of(layer)])
        assert json.loads(path.read_text())["removed_layer"] == before["removed_layer"] == _legacy_json(layer)
    assert sorted(p.name for p in (folder / "variants").iterdir()) == sorted(
        [f"{_legacy_name(layer)}.json" for layer in stored] + ["foreign.json"])
    saved = store.save(VariantResult(Removal((4, 2)), [_row()], 1.0))
    assert saved.name == "layers_002_004.json" and json.loads(saved.read_text())["removed_layer"] == [2, 4]


# --- CSV cells -------------------------------------------------------------------------------------

def test_cells():
    assert [FULL.cell, Removal.of(3).cell, Removal((7, 3, 4)).cell] == ["", "3", "3,4,7"]
    assert str(Removal((3, 4))) == "3,4" and repr(Removal((3, 4))) == "Removal('3,4')"
    for cell, removal in (("3,4,7", Removal((3, 4, 7))), ("", FULL), (None, FULL), (math.nan, FULL),
                          (np.float64("nan"), FULL), (31, Removal.of(31)), (31.0, Removal.of(31)),
                          (np.int64(31), Removal.of(31)), ("3, 4", Removal((3, 4)))):
        assert Removal.from_cell(cell) == removal, cell
    assert layer_list(31.0) == [31] and layers_text(31.0) == "31" and layers_text(math.nan) == ""
    assert layers_text("3,4,7") == "3,4,7" and layer_list("7,3") == [3, 7]


def _variant(removal, value, n=40):
    docs = dict(enumerate([1.0] * int(value * n) + [0.0] * (n - int(value * n))))
    return VariantResult(removal, [MetricRow("t", "acc", value, 0.05, True, n)], 1.0,
                         documents={("t", "acc"): docs}, aggregations={("t", "acc"): "mean"})


def test_prune_csv_removed_layer_is_as_before(tmp_path):
    """prune.csv: the block number, empty for the full model (a nullable int column in memory)."""
    results = {r: _variant(r, v) for r, v in ((FULL, 0.5), (Removal.of(3), 0.45), (Removal.of(10), 0.5))}
    frame = prune_frame(results)
    assert str(frame["removed_layer"].dtype) == "Int64"
    assert list(frame["variant"]) == ["baseline", "layer_003", "layer_010"]
    lines = write_csv(tmp_path / "prune.csv", frame).read_text().splitlines()
    assert lines[0].startswith("variant,removed_layer,unit,task,") and [x.split(",")[:3] for x in lines[1:]] == [
        ["baseline", "", ""], ["layer_003", "3", "block"], ["layer_010", "10", "block"]]


def test_shrink_csv_removed_layers_is_as_before(tmp_path):
    """shrink.csv: the comma-joined blocks (quoted when several), empty for the full model."""
    sets = [Removal.of(4), Removal((3, 4)), Removal((2, 3, 4))]
    results = {FULL: _variant(FULL, 0.5), **{s: _variant(s, 0.5 - 0.05 * len(s)) for s in sets}}
    picks = [Pick("last", len(s), s) for s in sets]
    frame = shrink_frame(results, picks, PruneConfig(ppl_text="x"))
    assert list(frame["removed_layers"]) == ["", "4", "3,4", "2,3,4"]
    text = write_csv(tmp_path / "shrink.csv", frame).read_text().splitlines()
    assert [line.split(",", 3)[:3] for line in text[1:3]] == [["full", "0", ""], ["last", "1", "4"]]
    assert text[3].startswith('last,2,"3,4",block,none,t,acc,')
    assert text[4].startswith('last,3,"2,3,4",block,none,t,acc,')
    assert list(read_shrink(tmp_path / "shrink.csv")["removed_layers"]) == ["", "4", "3,4", "2,3,4"]
    # the verdicts are prune's over the distinct sets: each set's row is its own comparison
    alone = prune_frame({FULL: results[FULL], Removal((3, 4)): results[Removal((3, 4))]})
    assert frame.iloc[2]["delta"] == alone.iloc[1]["delta"] and frame.iloc[2]["p_value"] == alone.iloc[1]["p_value"]
