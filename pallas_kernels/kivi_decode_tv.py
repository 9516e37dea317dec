"""Kernel body of the ``"tv"`` variant: transposed dots, value scales folded into the probabilities.

Each chunk of ``chunk`` tokens t costs two matrix-unit dots and no per-code scale for the values:

* keys: ``sT [chunk, N] = k̂ [chunk, D] @ Qᵀ [D, N]`` -- k̂ is dequantized from code words and
  key scale/min rows read with integer row indices straight into a [chunk, D] tile (vectorized
  along D, no in-kernel broadcast or reshape);
* values: the per-token scale depends on (t, channel group j), so the dot's N columns are
  (query m, group j) pairs, col = m * n_vg + j, and the right operand carries ``p[m, t] * vs[t, j]``:
  ``accᵀ [D, N] += codesᵀ [D, chunk] @ (pᵀ * vs) [chunk, N]`` with the *raw* value codes. Row d of
  query m is column m * n_vg + g(d); the other columns are discarded at the end. The value mins
  add ``Σ_t p[m, t] vm[t, j]``, a column sum.

Q's columns repeat each query n_vg times, so the scores, the softmax state and p come out repeated
the same way and nothing needs a reshape inside the loop. N = Mp * n_vg (Mp: the real query heads
rounded up to a power of two), at least 16.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.kivi_decode_fma import NEG, program_bounds


_MAGIC = {  # dtype -> (exponent bits OR-ed onto a code c, the float they make minus c)
    "bfloat16": (0x4300, 128.0),   # bf16 0x4300 | c == 128 + c  (c < 128)
    "float16": (0x6400, 1024.0),   # f16 0x6400 | c == 1024 + c  (c < 1024)
    "float32": (0x4B000000, 8388608.0),  # f32: 2**23 + c
}


def as_float(codes_u32, dtype):
    """Small uint32 codes -> exact floats of ``dtype`` by the exponent trick: one OR (merged into
    the mask by ptxas) and one subtract -- no int->float conversion, which runs at a quarter rate."""
    dtype = jnp.dtype(dtype)
    magic, offset = _MAGIC[dtype.name]
    x = codes_u32 | jnp.uint32(magic)
    if dtype.itemsize == 2:
        x = x.astype(jnp.uint16)
    return lax.bitcast_convert_type(x, dtype) - jnp.asarray(offset, dtype)


def columns(num_queries: int, head_dim: int, group_size: int) -> tuple[int, int]:
    """(Mp, N): queries rounded up to a power of two, and the dots' column count."""
    n_vg = head_dim // group_size
    mp = 1 << max(num_queries - 1, 0).bit_length()
    while mp * n_vg < 16:
        mp *= 2
    return mp, mp * n_vg


def kernel(q_ref, kc_ref, ks_ref, km_ref, vc_ref, vs_ref, vm_ref, lo_ref, hi_ref, start_ref,
           o_ref, m_ref, l_ref, *, k_bits, v_bits, group_size, chunk, chunks_per_split,
           compute_dtype, precision, num_queries):
    g = group_size
    m_rows, d = q_ref.shape
    n_vg = d // g
    mp, n = columns(num_queries, d, g)
    cd = compute_dtype
    lo, hi, start = program_bounds(lo_ref, hi_ref, start_ref, chunks_per_split)
    q = q_ref[pl.ds(0, mp), :].astype(jnp.float32)  # [Mp, D]
    qT = jnp.broadcast_to(q[:, None, :], (mp, n_vg, d)).reshape(n, d).T.astype(cd)  # [D, N]
    col_group = lax.broadcasted_iota(jnp.int32, (1, n), 1) % n_vg  # j of column col
    tloc = jnp.arange(chunk, dtype=jnp.int32)

    def dot(a, b):
        return jnp.dot(a, b, preferred_element_type=jnp.float32, precision=precision)

    def codes(words_ref, t, bits):  # t [chunk] -> [chunk, D] uint32 codes (packing.py's layout)
        blk = 16 * (32 // bits)
        w = words_ref[16 * (t // blk) + t % 16, :]
        shift = (bits * ((t % blk) // 16)).astype(jnp.uint32)
        return (w >> shift[:, None]) & jnp.uint32((1 << bits) - 1)

    def body(c, carry):
        m_prev, l_prev, accT, mins = carry  # [1, N], [1, N], [D, N], [1, N]
        t = c * chunk + tloc
        kg = t // g
        k_hat = as_float(codes(kc_ref, t, k_bits), cd) * ks_ref[kg, :].astype(cd) + km_ref[kg, :].astype(cd)
        sT = dot(k_hat, qT)  # [chunk, N]
        sT = jnp.where(t[:, None] >= start, sT, NEG)
        m_next = jnp.maximum(m_prev, jnp.max(sT, axis=0, keepdims=True))
        corr = jnp.exp(m_prev - m_next)
        pT = jnp.exp(sT - m_next)
        l_next = l_prev * corr + jnp.sum(pT, axis=0, keepdims=True)
        tcol = t[:, None]
        vs = vs_ref[tcol, col_group].astype(jnp.float32)  # [chunk, N]: vs[t, j(col)]
        vm = vm_ref[tcol, col_group].astype(jnp.float32)
        vcT = as_float(codes(vc_ref, t, v_bits), cd).T  # [D, chunk]
        accT = accT * corr + dot(vcT, (pT * vs).astype(cd))
        mins = mins * corr + jnp.sum(pT * vm, axis=0, keepdims=True)
        return m_next, l_next, accT, mins

    init = (jnp.full((1, n), NEG, jnp.float32), jnp.zeros((1, n), jnp.float32),
            jnp.zeros((d, n), jnp.float32), jnp.zeros((1, n), jnp.float32))
    m_i, l_i, accT, mins = lax.fori_loop(lo, hi, body, init)
    # row d of query i is column i * n_vg + g(d)
    accT = accT + mins
    dcol = lax.broadcasted_iota(jnp.int32, (d, 1), 0) // g
    col = lax.broadcasted_iota(jnp.int32, (1, n), 1)
    for i in range(m_rows):
        if i < num_queries:
            pick = col == i * n_vg + dcol  # [D, N]
            o_ref[pl.ds(i, 1), :] = jnp.sum(jnp.where(pick, accT, 0.0), axis=1).reshape(1, d)
            first = col == i * n_vg  # [1, N]
            m_ref[pl.ds(i, 1)] = jnp.sum(jnp.where(first, m_i, 0.0), axis=1)
            l_ref[pl.ds(i, 1)] = jnp.sum(jnp.where(first, l_i, 0.0), axis=1)
        else:  # padding rows: an empty softmax
            o_ref[pl.ds(i, 1), :] = jnp.zeros((1, d), jnp.float32)
            m_ref[pl.ds(i, 1)] = jnp.full((1,), NEG, jnp.float32)
            l_ref[pl.ds(i, 1)] = jnp.zeros((1,), jnp.float32)
