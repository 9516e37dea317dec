"""Flash-decoding Pallas (Triton) kernel over a full-precision (dense) KV cache.

The dense counterpart of :mod:`pallas_kernels.kivi_decode`, for one reason: it can read a
layer of a layer-stacked cache in place (``layer=``). XLA's own dense decode attention is as
fast as the memory allows, but with the stacked-matmul kernel in the same layer scan XLA gives
the loop-carried stacked cache the layout of its attention reductions and copies the whole
stack every layer (1.2 s steps on an H200, pallas_kernels/NOTES.md); a pallas_call reads the
default layout, so nothing is copied.

One program per (row b, KV head h, split s) walks chunks [lo, hi) of ``chunk`` tokens:
scores of all query heads of KV head h (GQA; repeated to 16 rows in registers) against K [chunk, D], an
online softmax, and p·V. Tokens outside [start, end) are masked; the chunk past the cache's
last token is loaded with a mask (no out-of-bounds read).

Inputs: q [B, Hkv, G, D] float32, pre-scaled by 1/sqrt(D), G a power of two; k, v [B, Hkv, T, D] (or
[L, B, Hkv, T, D] with ``layer``); lo, hi, start, end [B] int32.
Outputs: o [B, Hkv, S, G, D] f32 (unnormalized), m, l [B, Hkv, S, G] f32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.flash import (NEG, in_range, online_softmax_step, partials_call, plgpu,
                                  program_bounds, query_rows, store_partials)


def _kernel(layer_ref, q_ref, k_ref, v_ref, lo_ref, hi_ref, start_ref, end_ref, o_ref, m_ref, l_ref, *,
            chunk, tokens, chunks_per_split, compute_dtype, precision, stacked, relative=False):
    at = (layer_ref[0], pl.program_id(0), pl.program_id(1)) if stacked else ()
    lo, hi, start, end = program_bounds(lo_ref, hi_ref, start_ref, end_ref, chunks_per_split, relative)
    q = query_rows(q_ref, compute_dtype)  # [M, D]
    m_rows, d = q.shape
    dot = functools.partial(jnp.dot, preferred_element_type=jnp.float32, precision=precision)

    def tile(ref, t0):  # [chunk, D] in the compute dtype
        index = at + (pl.ds(pl.multiple_of(t0, chunk), chunk), slice(None))
        if tokens % chunk == 0:
            return ref[index].astype(compute_dtype)
        inside = (t0 + jnp.arange(chunk)) < tokens  # the last chunk may run past the cache
        return plgpu.load(ref.at[index], mask=inside[:, None], other=0).astype(compute_dtype)

    def body(c, carry):
        t0 = c * chunk
        s = dot(q, tile(k_ref, t0).T)  # [M, chunk]
        return online_softmax_step(carry, s, in_range(t0, chunk, start, end),
                                   lambda p: dot(p.astype(compute_dtype), tile(v_ref, t0)))

    init = (jnp.full((m_rows,), NEG, jnp.float32), jnp.zeros((m_rows,), jnp.float32),
            jnp.zeros((m_rows, d), jnp.float32))
    m_i, l_i, acc = lax.fori_loop(lo, hi, body, init)
    store_partials(o_ref, m_ref, l_ref, acc, m_i, l_i)


@functools.partial(jax.jit, static_argnames=("chunk", "num_splits", "interpret", "num_warps", "num_stages",
                                             "span_chunks"))
def dense_decode_partials(q, k, v, lo, hi, start, end, *, layer=None, chunk: int = 64, num_splits: int = 1,
                          interpret: bool = False, num_warps: int = 4, num_stages: int = 2, span_chunks: int = 0):
    """Flash-decoding partials over chunks [lo[b], hi[b]) of each row (see module doc).
    span_chunks: as :func:`pallas_kernels.kivi_decode.kivi_decode_partials`' (a sliding window's
    splits over each row's own chunks).

    layer: None, or a traced int32 scalar when k and v are layer-stacked ([L, B, Hkv, T, D]):
    that layer is read in place. 16-bit caches feed the dots in their dtype (float32
    accumulation), float32 caches at full float32 precision."""
    b, hkv, _, d = q.shape
    lead = (b, hkv) if layer is None else (k.shape[0], b, hkv)
    if k.shape != v.shape or k.shape[:len(lead)] != lead or k.ndim != len(lead) + 2 or k.shape[-1] != d:
        raise ValueError(f"k and v must both be {'[L, ' if layer is not None else '['}B={b}, Hkv={hkv}, T, D={d}]; "
                         f"got {k.shape} and {v.shape}")
    if chunk < 16 or chunk & (chunk - 1):
        raise ValueError(f"chunk={chunk} must be a power of two >= 16")
    tokens = k.shape[-2]
    if tokens % chunk and plgpu is None:  # pragma: no cover
        raise ValueError(f"T={tokens} must be a multiple of chunk={chunk} without the Triton masked load")
    n_chunks = -(-tokens // chunk)
    if not 0 <= span_chunks <= n_chunks:
        raise ValueError(f"span_chunks={span_chunks}; allowed: 0 (all chunks) .. n_chunks={n_chunks}")
    precision = lax.Precision.HIGHEST if k.dtype == jnp.float32 else lax.Precision.DEFAULT
    kernel = functools.partial(_kernel, chunk=chunk, tokens=tokens,
                               chunks_per_split=-(-(span_chunks or n_chunks) // num_splits), compute_dtype=k.dtype,
                               precision=precision, stacked=layer is not None, relative=span_chunks > 0)
    return partials_call(kernel, q, (k, v), (lo, hi, start, end), layer=layer, num_splits=num_splits,
                         interpret=interpret, num_warps=num_warps, num_stages=num_stages, name="dense_decode")
