"""Synthetic aligned scores shared by the stats tests."""

from __future__ import annotations

import numpy as np


def binary_pair(n: int, lost: int, gained: int, correct: int) -> tuple[np.ndarray, np.ndarray]:
    """Aligned 0/1 scores: `correct` base answers right; the variant loses `lost` and gains `gained`."""
    base = np.zeros(n)
    base[:correct] = 1
    var = base.copy()
    var[:lost] = 0
    var[correct:correct + gained] = 1
    return base, var
