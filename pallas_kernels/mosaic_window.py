"""The newest R tokens of a MosaicKIVICache in one Pallas (Triton) launch: the residual ring and
the keys flushed last read once, in place in a layer-stacked cache.

The Mosaic kernel (:mod:`pallas_kernels.kivi_mosaic`) attends the quantized tokens [0, m); this
attends the window [m, L) of each (row, KV head), at most R tokens: ring slot j holds token
t_j = m + (j - m) mod R (m = max(L - R, 0)), its value in ``v_res[j]`` and its key in
``k_res[j]`` when t_j >= n (n: the quantized keys), else already quantized: token n0 + j of the
block flushed last (n0 = max(n - R, 0)), scored here from its key codes as stored (``kn`` rows
n0 + j, 8 words a token: memory nibble p holds channel sigma(p)'s 2 low bits and channel
64 + sigma(p)'s) against q ∘ scale permuted the same way and q · min per 32-token group
(``fq``, ``fc``: :func:`kivi_jax.attention_mosaic.flushed_query`). ``chunk`` slots a step,
online softmax. Those scores in XLA (an unpack, the sigma gather and two reductions) took 2.0
ms of a 15.6 ms paper-setting step, the ring in plain JAX 3.0 (this kernel's ring: 1.9;
results/decode-step-ab-mosaic-window-2026-12-01).

Inputs: q [B, Hkv, G, D] float32 (scaled); k_res, v_res [B, Hkv, R, D] and kn [B, Hkv, Tc, 8]
uint32 (or each with a leading [L] and ``layer``); fq [B, Hkv, G, R/32, 2, 64], fc
[B, Hkv, G, R/32] float32; lengths, num_quantized_keys, num_quantized_values [B] int32.
Outputs: o [B, Hkv, G, D] (unnormalized), m, l [B, Hkv, G].
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.flash import NEG, online_softmax_step, partials_call, query_rows, repeat_rows, store_partials

GROUP = 32  # tokens a key scale / min covers


def _flushed_scores(kn_ref, fq_ref, fc_ref, at, row0, j0, *, chunk, m_rows):
    """[M, chunk] float32: the scores of flushed tokens row0 + j0 .. + chunk from their codes."""
    words = kn_ref[at + (pl.ds(row0 + j0, chunk), slice(None))]  # [chunk, 8] uint32
    shifts = 4 * lax.broadcasted_iota(jnp.uint32, (1, 1, 8), 2)
    nib = ((words[:, :, None] >> shifts) & 15).reshape(chunk, 64)  # memory nibble p of each token
    dot = functools.partial(jnp.dot, preferred_element_type=jnp.float32, precision=lax.Precision.HIGHEST)
    lo, hi = (nib & 3).astype(jnp.float32).T, (nib >> 2).astype(jnp.float32).T  # [64, chunk]
    group_of_slot = lax.broadcasted_iota(jnp.int32, (1, chunk), 1) // GROUP
    scores = None
    for i in range(chunk // GROUP):  # static: the chunk's 32-token groups, each its own scale
        grp = j0 // GROUP + i
        qlo, qhi = (repeat_rows(fq_ref[:, grp, half, :], m_rows) for half in (0, 1))  # [M, 64]
        const = repeat_rows(fc_ref[:, pl.ds(grp, 1)], m_rows)  # [M, 1]
        s = dot(qlo, lo) + dot(qhi, hi) + const
        scores = s if scores is None else jnp.where(group_of_slot == i, s, scores)
    return scores


def _kernel(layer_ref, q_ref, kr_ref, vr_ref, kn_ref, fq_ref, fc_ref, len_ref, nk_ref, nv_ref, o_ref, m_ref, l_ref,
            *, r, chunk, compute_dtype, precision):
    at = (layer_ref[0], pl.program_id(0), pl.program_id(1))
    q = query_rows(q_ref, compute_dtype)  # [M, D]: G rows repeated to 16
    m_rows, d = q.shape
    length, n, mq = len_ref[()], nk_ref[()], nv_ref[()]
    row0 = jnp.maximum(n - r, 0)  # the block flushed last (its rows are read only where used)
    dot = functools.partial(jnp.dot, preferred_element_type=jnp.float32, precision=precision)
    carry = (jnp.full((m_rows,), NEG, jnp.float32), jnp.zeros((m_rows,), jnp.float32),
             jnp.zeros((m_rows, d), jnp.float32))
    for j0 in range(0, r, chunk):  # static: R / chunk steps
        slots = j0 + jnp.arange(chunk)
        t = mq + lax.rem(slots - lax.rem(mq, r) + r, r)  # the token in each slot (no floor-mod)
        k = kr_ref[at + (pl.ds(j0, chunk), slice(None))].astype(compute_dtype)  # [chunk, D]
        flushed = _flushed_scores(kn_ref, fq_ref, fc_ref, at, row0, j0, chunk=chunk, m_rows=m_rows)
        s = jnp.where((t >= n)[None, :], dot(q, k.T), flushed)
        v = vr_ref[at + (pl.ds(j0, chunk), slice(None))].astype(compute_dtype)
        # mask_p: a row shorter than R has empty slots (and a row with L = 0 only those)
        carry = online_softmax_step(carry, s, t < length, lambda p, v=v: dot(p.astype(compute_dtype), v), mask_p=True)
    m_i, l_i, acc = carry
    store_partials(o_ref, m_ref, l_ref, acc, m_i, l_i)


@functools.partial(jax.jit, static_argnames=("chunk", "interpret", "num_warps", "num_stages"))
def window_partials(q, k_res, v_res, kn, fq, fc, lengths, num_quantized_keys, num_quantized_values, *, layer=None,
                    chunk: int = 64, interpret: bool = False, num_warps: int = 4, num_stages: int = 2):
    """Flash-decoding partials of each (row, KV head) over its window (module doc). layer: None,
    or a traced int32 scalar when k_res, v_res and kn are layer-stacked: that layer is read in
    place. 16-bit rings feed the dots in their dtype (float32 accumulation), float32 at HIGHEST;
    the flushed keys' scores are float32 at HIGHEST."""
    b, hkv, g, d = q.shape
    r = k_res.shape[-2]
    if layer is None:  # one layer: a stack of one (a free reshape), so the kernel has one form
        k_res, v_res, kn, layer = k_res[None], v_res[None], kn[None], 0
    lead = (k_res.shape[0], b, hkv)
    if k_res.shape != v_res.shape or k_res.shape != lead + (r, d):
        raise ValueError(f"k_res and v_res must both be [(L,) B={b}, Hkv={hkv}, R, D={d}]; got {k_res.shape} and "
                         f"{v_res.shape}")
    if kn.shape[:3] != lead or kn.shape[-1] != 8 or kn.shape[-2] < r or kn.dtype != jnp.uint32:
        raise ValueError(f"kn must be uint32 [(L,) B={b}, Hkv={hkv}, Tc >= R={r}, 8]; got {kn.dtype} {kn.shape}")
    if r % GROUP or fq.shape != (b, hkv, g, r // GROUP, 2, d // 2) or fc.shape != (b, hkv, g, r // GROUP):
        raise ValueError(f"fq must be [B={b}, Hkv={hkv}, G={g}, R/32, 2, {d // 2}] and fc [B, Hkv, G, R/32] (R={r} a "
                         f"multiple of 32); got {fq.shape} and {fc.shape}")
    chunk = min(chunk, r)
    if chunk < GROUP or chunk & (chunk - 1) or r % chunk:
        raise ValueError(f"chunk={chunk} must be a power of two >= {GROUP} dividing R={r}")
    precision = lax.Precision.HIGHEST if k_res.dtype == jnp.float32 else lax.Precision.DEFAULT
    kernel = functools.partial(_kernel, r=r, chunk=chunk, compute_dtype=k_res.dtype, precision=precision)
    o, m, l = partials_call(kernel, q.astype(jnp.float32), (k_res, v_res, kn),
                            (lengths, num_quantized_keys, num_quantized_values),
                            blocked=(fq.astype(jnp.float32), fc.astype(jnp.float32)),
                            layer=layer, num_splits=1, interpret=interpret, num_warps=num_warps,
                            num_stages=num_stages, name="mosaic_window")
    return o[:, :, 0], m[:, :, 0], l[:, :, 0]
