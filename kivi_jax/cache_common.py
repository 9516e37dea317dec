"""Pieces shared by the cache formats: argument checks, per-row lengths, row-wise writes."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax


def pytree_dataclass(cls):
    """Frozen dataclass registered as a pytree; fields with metadata static=True are aux data."""
    cls = dataclasses.dataclass(frozen=True)(cls)
    data, meta = [], []
    for f in dataclasses.fields(cls):
        (meta if f.metadata.get("static") else data).append(f.name)
    return jax.tree_util.register_dataclass(cls, data_fields=data, meta_fields=meta)


def static(**kw):
    return dataclasses.field(metadata=dict(static=True), **kw)


def check_kv(name_k: str, k, name_v: str, v, *, batch: int, heads: int, head_dim: int, tokens: int | None = None):
    """Shape checks at trace time for k, v [B, Hkv, T, D]; returns T."""
    for name, a in ((name_k, k), (name_v, v)):
        if a.ndim != 4:
            raise ValueError(f"{name} must be [B, Hkv, T, D]; got shape {a.shape}")
        b, h, t, d = a.shape
        if (b, h, d) != (batch, heads, head_dim):
            raise ValueError(
                f"{name} has shape {a.shape}; the cache holds B={batch}, Hkv={heads}, D={head_dim}"
            )
        if tokens is not None and t != tokens:
            raise ValueError(f"{name} has {t} tokens; expected {tokens}")
    if k.shape != v.shape:
        raise ValueError(f"{name_k} shape {k.shape} differs from {name_v} shape {v.shape}")
    return k.shape[2]


def prompt_lengths(lengths, batch: int, tokens: int, max_length: int):
    """Validated per-row prompt lengths [B] int32 and a per-row 'invalid' flag.

    Static misuse raises; traced values outside [0, T] are clamped *and flagged* so the
    caller's overflow flag reports them (nothing is written out of bounds).
    """
    if tokens > max_length:
        raise ValueError(f"prompt of {tokens} tokens does not fit max_length={max_length}")
    if lengths is None:
        return jnp.full((batch,), tokens, jnp.int32), jnp.zeros((batch,), bool)
    lengths = jnp.asarray(lengths)
    if lengths.shape != (batch,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise ValueError(f"lengths must be an integer array of shape ({batch},); got {lengths.shape} {lengths.dtype}")
    if not isinstance(lengths, jax.core.Tracer):
        bad = [int(x) for x in jax.device_get(lengths) if not 0 <= int(x) <= tokens]
        if bad:
            raise ValueError(f"lengths={bad} out of range: each must be in [0, T={tokens}]")
    lengths = lengths.astype(jnp.int32)
    invalid = (lengths < 0) | (lengths > tokens)
    return jnp.clip(lengths, 0, tokens), invalid


def put_row(buf, x, index, axis):
    """Per batch row b: buf[b] with x[b] written at index[b] along ``axis`` (of the row).

    buf [B, ...], x [B, ...] (same rank, smaller along axis), index [B] int32 in range.
    """
    def one(buf_b, x_b, i):
        return lax.dynamic_update_slice_in_dim(buf_b, x_b.astype(buf_b.dtype), i, axis)

    return jax.vmap(one)(buf, x, index)


def take_row(buf, index, size, axis):
    """Per batch row b: buf[b][index[b] : index[b] + size] along ``axis`` of the row."""
    return jax.vmap(lambda buf_b, i: lax.dynamic_slice_in_dim(buf_b, i, size, axis))(buf, index)
