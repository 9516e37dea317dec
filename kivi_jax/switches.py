"""Trace-time switches whose default depends on the backend: on a GPU the variant measured
faster there, elsewhere the one that compiles and runs cheaper (a Pallas kernel would run
interpreted off the GPU)."""

from __future__ import annotations

import jax


def resolve(name: str, value: str | None, allowed, *, gpu: str, other: str) -> str:
    """``value``, or when it is None ``gpu`` on a GPU and ``other`` elsewhere; a ValueError that
    names ``name``, the value and ``allowed`` when it is not one of them."""
    value = value or (gpu if jax.default_backend() == "gpu" else other)
    if value not in allowed:
        raise ValueError(f"{name}={value!r}; allowed: {tuple(allowed)} or None")
    return value
