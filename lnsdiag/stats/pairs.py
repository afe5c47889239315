"""Aligned per-document scores: the input every paired statistic starts from.

A variant is scored on exactly the documents the baseline was scored on, in the same order;
misaligned scores are the one error pairing cannot survive, so they are refused here once.
Whether the scores are 0/1 decides between Tango's interval and a t interval.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def paired_arrays(base: Any, variant: Any) -> tuple[np.ndarray, np.ndarray]:
    """Two aligned 1-D float arrays; refuses misaligned input, the one error pairing cannot survive."""
    b = np.asarray(base, dtype=np.float64).ravel()
    v = np.asarray(variant, dtype=np.float64).ravel()
    if b.shape != v.shape:
        raise ValueError(f"base and variant must score the same documents: {b.size} vs {v.size} values")
    return b, v


def is_binary(x: Any) -> bool:
    """True when every value is 0 or 1 (such metrics get Tango's interval, not a t interval)."""
    a = np.asarray(x, dtype=np.float64)
    return bool(a.size) and bool(np.all((a == 0.0) | (a == 1.0)))
