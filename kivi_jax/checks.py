"""Argument checks shared across the package (no kivi_jax imports: any module may use them)."""

from __future__ import annotations

import numbers


def is_int(x) -> bool:
    """An integer (Python or NumPy), not a bool: True and 1.0 are not sizes, axes or windows."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)
