"""How lnsdiag.results.verdict applies these statistics: margins by metric scale, chance levels of groups."""

from __future__ import annotations

import pytest

from lnsdiag.interventions.units import Removal
from lnsdiag.results.margins import Margins
from lnsdiag.results.store import VariantResult
from lnsdiag.results.verdict import chance_level, prune_frame
from lnsdiag.scoring.base import MetricRow


def test_margins_of_metrics_on_a_0_to_100_scale():
    """BLEU, chrF, TER and TruthfulQA's ROUGE are reported ×100 by lm-eval: the margin follows, unless named."""
    default = Margins.parse(None)
    assert default.of("bleu", 20.0) == 1.0 and default.of("chrf[none]", 40.0) == 1.0
    assert default.of("rouge1_max", 40.0) == 1.0 and default.of("bleu_diff", -2.0) == 1.0
    assert default.of("bleu_acc", 0.4) == 0.01  # a 0/1 score stays on its scale
    assert Margins.parse("0.02").of("ter", 60.0) == 2.0
    assert Margins.parse("bleu=0.5").of("bleu", 20.0) == 0.5  # a named margin is taken as given
    assert "points" in default.describe()


def test_chance_level_of_a_group_follows_its_weighting():
    """A group of a 2-choice leaf (4 documents) and a 4-choice leaf (1 document): pooled over documents,
    chance is (4 × 1/2 + 1/4) / 5 = 0.45; as the mean of the leaf means (unweighted groups), (1/2 + 1/4) / 2."""
    items = {"a": {i: float(i % 2) for i in range(4)}, "b": {0: 1.0}}  # leaf means 0.5 and 1.0; pooled 0.6
    choices = {"a": dict.fromkeys(range(4), 2), "b": {0: 4}}

    def result(layer, group_value):
        rows = [MetricRow("a", "acc", 0.5, 0.1, True), MetricRow("b", "acc", 1.0, 0.0, True),
                MetricRow("g", "acc", group_value, 0.1, True, group=True)]
        return VariantResult(layer, rows, 1.0, documents={(leaf, "acc"): docs for leaf, docs in items.items()},
                             choices=choices, aggregations={("a", "acc"): "mean", ("b", "acc"): "mean"},
                             groups={"g": ["a", "b"]})

    assert chance_level(result(Removal(), 0.6), "g", "acc") == pytest.approx(0.45)
    assert chance_level(result(Removal(), 0.75), "g", "acc", "means") == pytest.approx(0.375)
    for value, chance in ((0.6, 0.45), (0.75, 0.375)):
        frame = prune_frame({Removal(): result(Removal(), value), Removal.of(1): result(Removal.of(1), value)})
        assert frame.set_index(["variant", "task"]).loc[("layer_001", "g"), "chance"] == pytest.approx(chance)
