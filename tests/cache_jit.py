"""Jitted cache operations shared by the cache tests (one compile per cache structure)."""

import jax

from kivi_jax import decode_attention


@jax.jit
def prefill(cache, k, v, lengths):
    return cache.prefill(k, v, lengths)


@jax.jit
def step(cache, k, v, q):
    """append, then reference attention (the decode step's order)."""
    cache = cache.append(k, v)
    return cache, decode_attention(q, cache, impl="reference")


@jax.jit
def attend(cache, q):
    return decode_attention(q, cache, impl="reference")


@jax.jit
def materialize(cache):
    return cache.materialize()
