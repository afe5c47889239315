"""Documents needed for TOST, against the textbook closed forms."""

from __future__ import annotations

import itertools
import math
from statistics import NormalDist

import pytest

from lnsdiag.stats import documents_needed, documents_needed_binary

PHI = NormalDist()


def test_documents_needed():
    z_a, z_half_b, z_b = PHI.inv_cdf(0.95), PHI.inv_cdf(0.9), PHI.inv_cdf(0.8)
    # Δ = 0: power 2Φ(m√n/sd − z) − 1 = 0.8 gives n = ((z₀.₉₅ + z₀.₉)·sd/m)² exactly
    assert documents_needed(0.3, 0.0, 0.01) == math.ceil(((z_a + z_half_b) * 0.3 / 0.01) ** 2)
    # Δ far from 0: the textbook one-sided formula ((z₀.₉₅ + z₀.₈)·sd/(m − |Δ|))²
    assert documents_needed(0.3, 0.006, 0.01) == pytest.approx(((z_a + z_b) * 0.3 / 0.004) ** 2, rel=0.01)
    needs = [documents_needed(0.3, 0.002, m) for m in (0.005, 0.01, 0.02, 0.05, 0.1)]
    assert all(a >= b for a, b in itertools.pairwise(needs))
    assert documents_needed(0.3, 0.02, 0.01) is None
    assert documents_needed(0.3, -0.01, 0.01) is None
    assert documents_needed(0.0, 0.0, 0.01) == 2
    assert documents_needed(0.3, 0.0, 0.01, power=0.9) > documents_needed(0.3, 0.0, 0.01, power=0.8)


def test_documents_needed_binary_never_zero_for_tiny_samples():
    z2 = PHI.inv_cdf(0.95) ** 2
    for n in (1, 5, 20, 100):
        need = documents_needed_binary(0, 0, n, 0.01)
        assert need is not None and need > max(n, 2)
        assert need >= z2 * 0.99 / 0.01  # Tango's 90% interval with no change fits inside ±1 point
    # with changed answers the spread comes from the discordant rate
    b, c, n = 4, 6, 200
    delta = (c - b) / n
    assert documents_needed_binary(b, c, n, 0.05) == documents_needed(math.sqrt((b + c) / n - delta**2), delta, 0.05)
    needs = [documents_needed_binary(0, 0, 20, m) for m in (0.005, 0.01, 0.02, 0.05)]
    assert all(a >= b for a, b in itertools.pairwise(needs))
    assert documents_needed_binary(10, 2, 100, 0.05) is None  # |Δ| = 0.08 ≥ margin
