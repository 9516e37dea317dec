"""Pallas (Triton) softmax partials over a KIVI cache's full-precision window: the R slots of
the residual ring.

The bulk kernel (:mod:`pallas_kernels.kivi_decode`) covers the tokens whose keys and values
are both quantized; this one covers the R newest, whose values are in full precision in the
ring ``v_res``. Their keys are in the ring ``k_res`` too, except those already quantized: the
block flushed last (tokens [n - R, n), token n - R + j in slot j), which is dequantized here
from its packed codes. Softmax does not care about the order of its tokens, so slot j is
scored in place: no gather. Each program (row b, KV head h, split s) walks its share of the
ring in chunks, reading each ring slot and each word and scale row of the flushed block once. On an H200 the XLA version of this
(gather + select + two batched dots) took 7.5 of a 15.7 ms Llama-2-7B KIVI-2 step at B=96
(decode-step-ab-2026-11-30-trace).

Ring slot j holds token t_j = Lb - R + (j - Lb) mod R of the row (negative: an empty slot);
its key is k_res[j] when t_j >= n, else the flushed block's slot j. Tokens below ``start`` (a
sliding window's first token) are masked.

Inputs (one row b and head h are selected by the BlockSpecs; with ``layer`` given, the five
cache arrays carry a leading [L] axis and are read in place at that layer):
  q        [B, Hkv, M, D] float32, pre-scaled by 1/sqrt(D); M >= 16 (padded query heads)
  k_res, v_res [B, Hkv, R', D] (R' >= R: slots past R, e.g. attention sinks, are not read)
  k_codes  [B, Hkv, Tc*k_bits/32, D] uint32;  k_scale, k_min [B, Hkv, Tc/Gk, D]
  lengths  [B] int32: Lb, tokens in the row;  quantized [B] int32: n, keys quantized (a
           multiple of R);  start [B] int32
Outputs: o [B, Hkv, S, M, D] f32 (unnormalized), m, l [B, Hkv, S, M] f32 (the bulk
kernel's partials format; S = num_splits).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.flash import NEG, partials_call
from pallas_kernels.kivi_decode import key_hat_t


def _kernel(layer_ref, q_ref, kr_ref, vr_ref, kc_ref, ks_ref, km_ref, len_ref, n_ref, start_ref, _unused_ref,
            o_ref, m_ref, l_ref, *, r, chunk, chunks_per_split, k_bits, key_group_size, compute_dtype, precision,
            stacked):
    at = (layer_ref[0], pl.program_id(0), pl.program_id(1)) if stacked else ()
    lb, n, start = len_ref[()], n_ref[()], start_ref[()]
    m_rows, d = q_ref.shape
    q = q_ref[...].astype(compute_dtype)
    dot = functools.partial(jnp.dot, preferred_element_type=jnp.float32, precision=precision)
    # the flushed block: tokens [t0, t0 + R), slot-aligned (t0 a multiple of R: slot j = token t0 + j)
    t0 = jnp.maximum(n - r, 0)
    lb_mod = lax.rem(lb, r)

    def body(c, carry):  # ring slots [j0, j0 + chunk), online softmax
        m_prev, l_prev, acc = carry
        j0 = pl.multiple_of(c * chunk, chunk)
        t = lb - r + lax.rem(j0 + jnp.arange(chunk) - lb_mod + r, r)  # the token in each slot (no floor-mod)
        k_flushed_t = key_hat_t(kc_ref, ks_ref, km_ref, t0 + j0, chunk, k_bits, key_group_size, at)  # [D, chunk]
        k_ring_t = kr_ref[at + (pl.ds(j0, chunk), slice(None))].T  # [D, chunk]
        # dequantized in float32 and rounded once to the cache dtype, like the reference
        k_t = jnp.where((t >= n)[None, :], k_ring_t, k_flushed_t.astype(k_ring_t.dtype))
        valid = ((t >= 0) & (t >= start))[None, :]
        s = jnp.where(valid, dot(q, k_t.astype(compute_dtype)), NEG)  # [M, chunk]
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=1))
        corr = jnp.exp(m_prev - m_next)
        p = jnp.where(valid, jnp.exp(s - m_next[:, None]), 0.0)  # no valid slot yet: l = 0, o = 0
        v = vr_ref[at + (pl.ds(j0, chunk), slice(None))].astype(compute_dtype)  # [chunk, D]
        return m_next, l_prev * corr + jnp.sum(p, axis=1), acc * corr[:, None] + dot(p.astype(compute_dtype), v)

    first = pl.program_id(2) * chunks_per_split
    init = (jnp.full((m_rows,), NEG, jnp.float32), jnp.zeros((m_rows,), jnp.float32),
            jnp.zeros((m_rows, d), jnp.float32))
    m_i, l_i, acc = lax.fori_loop(first, first + chunks_per_split, body, init)
    o_ref[...] = acc
    m_ref[...] = m_i
    l_ref[...] = l_i


def supported(r: int, k_bits: int, key_group_size: int, capacity: int) -> bool:
    """Whether the kernel handles this ring: R a power of two >= 16 made of whole code words and
    key groups, and a quantized store of at least R tokens (the flushed block exists)."""
    per = 32 // k_bits
    return r >= 16 and not r & (r - 1) and r % per == 0 and r % key_group_size == 0 and capacity >= r


@functools.partial(jax.jit, static_argnames=("r", "k_bits", "key_group_size", "chunk", "num_splits", "interpret",
                                             "num_warps", "num_stages"))
def kivi_window_partials(q, k_res, v_res, k_codes, k_scale, k_min, lengths, quantized, start, *, r: int,
                         k_bits: int, key_group_size: int, layer=None, chunk: int = 32, num_splits: int = 1,
                         interpret: bool = False, num_warps: int = 4, num_stages: int = 2):
    """Softmax partials over each row's residual ring (see module doc): ``num_splits``
    programs per (row, head), each looping over R / num_splits slots in ``chunk``-slot steps."""
    b, hkv, m_rows, d = q.shape
    capacity = k_scale.shape[-2] * key_group_size
    if not supported(r, k_bits, key_group_size, capacity):
        raise ValueError(f"residual_length={r} with k_bits={k_bits}, key_group_size={key_group_size} and "
                         f"capacity={capacity}: the window kernel needs R a power of two >= 16, a multiple of "
                         f"{32 // k_bits} and of key_group_size, and capacity >= R")
    if k_res.shape != v_res.shape or k_res.shape[-2] < r or k_res.shape[-1] != d:
        raise ValueError(f"k_res and v_res must be [..., R' >= {r}, D={d}]; got {k_res.shape} and {v_res.shape}")
    if m_rows < 16 or m_rows & (m_rows - 1):
        raise ValueError(f"q rows M={m_rows} must be a power of two >= 16 (pad the query heads)")
    per = 32 // k_bits
    if chunk < 16 or chunk & (chunk - 1) or chunk % per or r % (chunk * num_splits):
        raise ValueError(f"chunk={chunk} with num_splits={num_splits}: chunk must be a power of two >= 16 of whole "
                         f"words ({per} codes) and chunk * num_splits must divide residual_length={r}")
    precision = lax.Precision.HIGHEST if k_res.dtype == jnp.float32 else lax.Precision.DEFAULT
    kernel = functools.partial(_kernel, r=r, chunk=chunk, chunks_per_split=r // chunk // num_splits, k_bits=k_bits, key_group_size=key_group_size, compute_dtype=k_res.dtype,
                               precision=precision, stacked=layer is not None)
    return partials_call(kernel, q, (k_res, v_res, k_codes, k_scale, k_min), lengths, quantized, start, start,
                         layer=layer, num_splits=num_splits, interpret=interpret, num_warps=num_warps, num_stages=num_stages,
                         name="kivi_window")
