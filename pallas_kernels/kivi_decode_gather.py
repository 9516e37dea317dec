"""Kernel body of the ``"gather"`` variant: ``dequant`` with every tile read in its final shape.

The ``dequant`` variant builds its [chunk, D] tiles in the kernel (codes of 16-token slots
shifted out of one [16, D] word tile and reshaped; key scale rows and per-token value scales
broadcast and reshaped), and Triton turns those broadcasts and reshapes into one 16-bit
shared-memory load and store per code (SASS: LDS.U16 / STS.U16 per element; Nsight Compute:
L1/shared throughput 85%, the kernel's limit). Here each tile is read with integer-array
indices straight into its shape, contiguous along D:

* key code words ``words[16 * (t // blk) + t % 16, :]`` and their shift per token row;
* key scale / min rows ``scale[t // G, :]`` -> [chunk, D];
* value codes as [chunk, D/G, G] (channel d = j * G + i) with the per-token scale / min as
  [chunk, D/G, 1], broadcast along the last axis only; the dequantized tile is reshaped to
  [chunk, D] in memory order.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from pallas_kernels.kivi_decode_fma import NEG, program_bounds


def kernel(q_ref, kc_ref, ks_ref, km_ref, vc_ref, vs_ref, vm_ref, lo_ref, hi_ref, start_ref,
           o_ref, m_ref, l_ref, *, k_bits, v_bits, group_size, chunk, chunks_per_split,
           compute_dtype, precision):
    g = group_size
    m_rows, d = q_ref.shape
    n_vg = d // g
    cd = compute_dtype
    lo, hi, start = program_bounds(lo_ref, hi_ref, start_ref, chunks_per_split)
    q = q_ref[...].astype(cd)
    tloc = jnp.arange(chunk, dtype=jnp.int32)
    group = lax.broadcasted_iota(jnp.int32, (1, n_vg, 1), 1)
    within = lax.broadcasted_iota(jnp.int32, (1, 1, g), 2)

    def dot(a, b):
        return jnp.dot(a, b, preferred_element_type=jnp.float32, precision=precision)

    def word_rows(t, bits):  # token t's word row and bit shift (kivi_jax.packing's layout)
        blk = 16 * (32 // bits)
        return 16 * (t // blk) + t % 16, (bits * ((t % blk) // 16)).astype(jnp.uint32)

    def body(c, carry):
        m_prev, l_prev, acc = carry
        t = c * chunk + tloc
        row, shift = word_rows(t, k_bits)
        codes = (kc_ref[row, :] >> shift[:, None]) & jnp.uint32((1 << k_bits) - 1)  # [chunk, D]
        f32 = jnp.float32  # dequantize in float32, round once to the dot dtype (as the reference does)
        k_hat = (codes.astype(f32) * ks_ref[t // g, :].astype(f32) + km_ref[t // g, :].astype(f32)).astype(cd)
        s = dot(q, k_hat.T)  # [M, chunk]
        s = jnp.where(t[None, :] >= start, s, NEG)
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=1))
        corr = jnp.exp(m_prev - m_next)
        p = jnp.exp(s - m_next[:, None])
        l_next = l_prev * corr + jnp.sum(p, axis=1)
        row, shift = word_rows(t, v_bits)
        words = vc_ref[row[:, None, None], group * g + within]  # [chunk, D/G, G]
        codes = (words >> shift[:, None, None]) & jnp.uint32((1 << v_bits) - 1)
        t3 = t[:, None, None]
        v_hat = (codes.astype(f32) * vs_ref[t3, group].astype(f32) + vm_ref[t3, group].astype(f32)).astype(cd)
        acc = acc * corr[:, None] + dot(p.astype(cd), v_hat.reshape(chunk, d))
        return m_next, l_next, acc

    init = (jnp.full((m_rows,), NEG, jnp.float32), jnp.zeros((m_rows,), jnp.float32),
            jnp.zeros((m_rows, d), jnp.float32))
    m_i, l_i, acc = lax.fori_loop(lo, hi, body, init)
    o_ref[...] = acc
    m_ref[...] = m_i
    l_ref[...] = l_i
