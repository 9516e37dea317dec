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

Inputs: q [B, Hkv, G, D] float32, the scores (q·k)·``scale`` (the glue passes q unscaled and
scale = 1/sqrt(D): see flash.online_softmax_step), G and D powers of two; k, v [B, Hkv, T, D]
(or [L, B, Hkv, T, D] with ``layer``), one dtype; lo, hi, start, end [B] integers with
0 <= lo <= hi <= ceil(T / chunk) and start <= end <= T. Those are traced, so the kernel keeps to
the cache whatever they hold: chunks outside [0, ceil(T / chunk)) are skipped and tokens at or past
T are not attended (a GPU load there would read another row's memory).
Outputs: o [B, Hkv, S, G, D] f32 (unnormalized), m, l [B, Hkv, S, G] f32; a split that sees no
token has m = NEG, l = 0, o = 0.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.flash import (NEG, check_layer, clamp_layer, in_range, online_softmax_step, partials_call, plgpu,
                                  program_bounds, query_rows, store_partials)


def _kernel(layer_ref, q_ref, k_ref, v_ref, lo_ref, hi_ref, start_ref, end_ref, o_ref, m_ref, l_ref, *,
            chunk, tokens, chunks_per_split, compute_dtype, precision, stacked, relative=False, scale=1.0):
    at = (clamp_layer(layer_ref[0], k_ref.shape[0]), pl.program_id(0), pl.program_id(1)) if stacked else ()
    lo, hi, start, end = program_bounds(lo_ref, hi_ref, start_ref, end_ref, chunks_per_split, relative)
    # never past the cache, whatever a caller's traced bounds say (see the module doc)
    lo, hi, end = jnp.maximum(lo, 0), jnp.minimum(hi, -(-tokens // chunk)), jnp.minimum(end, tokens)
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
                                   lambda p: dot(p, tile(v_ref, t0)), scale=scale,
                                   p_dtype=compute_dtype)

    init = (jnp.full((m_rows,), NEG, jnp.float32), jnp.zeros((m_rows,), jnp.float32),
            jnp.zeros((m_rows, d), jnp.float32))
    m_i, l_i, acc = lax.fori_loop(lo, hi, body, init)
    store_partials(o_ref, m_ref, l_ref, acc, m_i, l_i)


def dense_decode_partials(q, k, v, lo, hi, start, end, *, layer=None, **kw):
    """Flash-decoding partials over chunks [lo[b], hi[b]) of each row (see module doc).
    span_chunks: as :func:`pallas_kernels.kivi_decode.kivi_decode_partials`' (a sliding window's
    splits over each row's own chunks).

    layer: None, or an integer scalar (traced or not) when k and v are layer-stacked
    ([L, B, Hkv, T, D]): that layer is read in place (a concrete one must be in [0, L); a traced
    one is read as lax.dynamic_index_in_dim would). 16-bit caches feed the dots in their dtype
    (float32 accumulation), float32 caches at full float32 precision.
    Keywords: chunk=64, num_splits=1, interpret=False, num_warps=4, num_stages=2, span_chunks=0,
    scale=1.0 (the scores are (q·k)·scale)."""
    if layer is not None:  # (outside the jit: a concrete layer is checked, not clamped)
        check_layer(layer, jnp.shape(k)[0])
    return _partials(q, k, v, lo, hi, start, end, layer=layer, **kw)


@functools.partial(jax.jit, static_argnames=("chunk", "num_splits", "interpret", "num_warps", "num_stages",
                                             "span_chunks", "scale"))
def _partials(q, k, v, lo, hi, start, end, *, layer=None, chunk: int = 64, num_splits: int = 1,
              interpret: bool = False, num_warps: int = 4, num_stages: int = 2, span_chunks: int = 0,
              scale: float = 1.0):
    if q.ndim != 4:
        raise ValueError(f"q must be [B, Hkv, G, D]; got shape {q.shape}")
    b, hkv, _, d = q.shape
    lead = (b, hkv) if layer is None else (k.shape[0], b, hkv)
    if k.shape != v.shape or k.shape[:len(lead)] != lead or k.ndim != len(lead) + 2 or k.shape[-1] != d:
        raise ValueError(f"k and v must both be {'[L, ' if layer is not None else '['}B={b}, Hkv={hkv}, T, D={d}]; "
                         f"got {k.shape} and {v.shape}")
    if k.dtype != v.dtype:  # (v's tiles were cast to k's dtype: a float32 v lost its bits to a bf16 k)
        raise ValueError(f"k and v must have one dtype; got k {k.dtype}, v {v.dtype}")
    if d < 1 or d & (d - 1):  # (interpret mode ran it; the Triton lowering raised on the [G, D] tiles)
        raise ValueError(f"D={d} must be a power of two (zero-pad q, k and v: attention_pallas does)")
    for name, x in (("lo", lo), ("hi", hi), ("start", start), ("end", end)):
        if jnp.shape(x) != (b,) or not jnp.issubdtype(jnp.result_type(x), jnp.integer):
            raise ValueError(f"{name} must be an integer array [B={b}]; got {jnp.result_type(x)} "
                             f"of shape {jnp.shape(x)}")
    if chunk < 16 or chunk & (chunk - 1):
        raise ValueError(f"chunk={chunk} must be a power of two >= 16")
    if isinstance(num_splits, bool) or not isinstance(num_splits, (int, np.integer)) or num_splits < 1:
        raise ValueError(f"num_splits={num_splits!r} must be an integer >= 1")  # (0 divided by zero, -1 failed in MLIR)
    tokens = k.shape[-2]
    if tokens % chunk and plgpu is None:  # pragma: no cover
        raise ValueError(f"T={tokens} must be a multiple of chunk={chunk} without the Triton masked load")
    n_chunks = -(-tokens // chunk)
    if not 0 <= span_chunks <= n_chunks:
        raise ValueError(f"span_chunks={span_chunks}; allowed: 0 (all chunks) .. n_chunks={n_chunks}")
    precision = lax.Precision.HIGHEST if k.dtype == jnp.float32 else lax.Precision.DEFAULT
    kernel = functools.partial(_kernel, chunk=chunk, tokens=tokens,
                               chunks_per_split=-(-(span_chunks or n_chunks) // num_splits), compute_dtype=k.dtype,
                               precision=precision, stacked=layer is not None, relative=span_chunks > 0,
                               scale=float(scale))
    return partials_call(kernel, q, (k, v), (lo, hi, start, end), layer=layer, num_splits=num_splits,
                         interpret=interpret, num_warps=num_warps, num_stages=num_stages, name="dense_decode")
