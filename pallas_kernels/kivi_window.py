"""The full-precision window of a KIVI cache inside the decode kernel: the R slots of the
residual ring, attended by the bulk kernel's (row, KV head) programs after the quantized bulk
(:mod:`pallas_kernels.kivi_decode`, ``ring_len=R``).

The ring holds the R newest tokens, whose values are in full precision in ``v_res``. Their keys
are in ``k_res`` too, except those already quantized: the block flushed last (tokens
[n - R, n), token n - R + j in slot j), dequantized here from its packed codes. Softmax does not
care about the order of its tokens, so slot j is scored in place: no gather. Each ring slot and
each word and scale row of the flushed block is read once, ``chunk`` slots a step.

Ring slot j holds token t_j = Lb - R + (j - Lb) mod R of the row (negative: an empty slot); its
key is k_res[j] when t_j >= n, else the flushed block's slot j. Tokens below ``start`` (a
sliding window's first token) are masked.

The S attention sinks (KIVIConfig.sink_tokens) sit in slots R .. R + S of the same buffers, in
full precision; the ring's program attends them too (:func:`sink_step`, 16 slots a step), so no
partial of theirs is computed and combined outside the kernel.

History: plain JAX (gather + select + two batched dots) took 7.5 of a 15.7 ms Llama-2-7B KIVI-2
step on the H200 at B=96 (decode-step-ab-2026-11-30-trace); a kernel of its own, 0.088 ms a
layer at its best (window-tuning-2026-11-30, the same as the dense kernel over the same bytes)
and 1.5 ms a step of bulk-kernel launches besides; fused here.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.flash import online_softmax_step


def ring_chunk(r: int, chunk: int) -> int:
    """Ring slots per step: the largest power of two dividing R, at most the bulk kernel's chunk
    (R = 128 with chunk 64: 64; R = 96: 32; R = 32: 32). Each step's tiles are then a power of
    two (Triton's) and the steps cover the ring exactly."""
    return min(chunk, r & -r)


def supported(r: int, k_bits: int, key_group_size: int, capacity: int, chunk: int) -> bool:
    """Whether the kernel takes this ring: its steps (:func:`ring_chunk`) at least 16 slots (a
    tensor-core dot) of whole code words and key groups (or inside one group), and a quantized
    store of at least R tokens (the flushed block exists). R need not be a power of two (96,
    192: R / ring_chunk steps)."""
    per, rc = 32 // k_bits, ring_chunk(r, chunk)
    return (rc >= 16 and r % rc == 0 and rc % per == 0
            and (rc % key_group_size == 0 or key_group_size % rc == 0) and capacity >= r)


SINK_STEP = 16  # sink slots a step: a tensor-core dot's least


def sink_steps(s: int) -> tuple[int, int]:
    """(steps, first): the S sinks in steps of SINK_STEP slots, the first step starting at sink
    index ``first`` = S - SINK_STEP * steps <= 0, i.e. at slot R + first: when S is not a
    multiple of SINK_STEP the first step also reads the ring's last -first slots, which it
    masks (sink index < 0). No buffer past R + S is read."""
    steps = -(-s // SINK_STEP)
    return steps, s - SINK_STEP * steps


def sinks_supported(s: int, r: int) -> bool:
    """Whether the kernel takes the S sinks (slots R .. R + S of the ring buffers) with a ring of
    R slots: any S > 0 whose first step (:func:`sink_steps`) starts inside the buffers."""
    return s > 0 and r + sink_steps(s)[1] >= 0


def sink_step(c, carry, *, q, refs, at, lo, hi, r, first, dot, compute_dtype, swap, scale=1.0):
    """Step c of the sinks (:func:`sink_steps`): slots R + first + SINK_STEP c .., sink index
    t = first + SINK_STEP c + i, keys and values in full precision, attended where t >= 0 and
    lo <= t < hi (a sliding window's first token, the row's length). Arguments as
    :func:`ring_step`'s. Only the attended slots are read."""
    j0 = first + SINK_STEP * c
    t = j0 + jnp.arange(SINK_STEP)
    valid = (t >= 0) & (t >= lo) & (t < hi)
    # masked loads: a slot not attended is not read (4 sinks: 4 of the step's 16 slots)
    index = at + (pl.ds(r + j0, SINK_STEP), slice(None))
    k, v = (plgpu.load(x.at[index], mask=valid[:, None], other=0).astype(compute_dtype) for x in refs)  # [16, D]
    return _attend(carry, q, k, v, valid, dot, compute_dtype, swap, scale)


def _attend(carry, q, k, v, valid, dot, compute_dtype, swap, scale):
    """The online-softmax update of carry by full-precision slots k, v [chunk, D] (valid [chunk])."""
    # mask_p: a short row's program may see only empty slots (its bulk loop visits no chunk)
    if swap:  # scoresᵀ [chunk, M]; (p·V)ᵀ = Vᵀ·pᵀ [D, M]
        return online_softmax_step(carry, dot(k, q), valid, lambda p: dot(v.T, p), slots_axis=0, mask_p=True,
                                   scale=scale, p_dtype=compute_dtype)
    return online_softmax_step(carry, dot(q, k.T), valid, lambda p: dot(p, v), mask_p=True, scale=scale,
                               p_dtype=compute_dtype)


def ring_step(j0, carry, *, q, refs, at, lengths, quantized, start, r, chunk, key_hat_t, dot, compute_dtype, swap,
              scale=1.0):
    """One online-softmax step over ring slots [j0, j0 + chunk).

    q: [M, D] (or qᵀ [D, M] with ``swap``) in the compute dtype; refs: (k_res, v_res) refs
    indexed at ``at`` + (slots, D); key_hat_t(t0) -> the flushed keys [D, chunk] float32 of
    tokens t0..; carry (m [M], l [M], acc [M, D] or [D, M] with swap) float32. chunk: the
    ring's step (:func:`ring_chunk`). scale: the scores are (q·k)·scale (flash.online_softmax_step)."""
    kr_ref, vr_ref = refs
    t = lengths - r + lax.rem(j0 + jnp.arange(chunk) - lax.rem(lengths, r) + r, r)  # token per slot (no floor-mod)
    k_ring = kr_ref[at + (pl.ds(j0, chunk), slice(None))]  # [chunk, D]
    # the flushed block is slot-aligned: its first token is a multiple of R, so slot j holds token t0 + j
    k_flushed = key_hat_t(jnp.maximum(quantized - r, 0) + j0).T.astype(k_ring.dtype)  # rounded once, as stored
    k = jnp.where((t >= quantized)[:, None], k_ring, k_flushed).astype(compute_dtype)  # [chunk, D]
    v = vr_ref[at + (pl.ds(j0, chunk), slice(None))].astype(compute_dtype)  # [chunk, D]
    return _attend(carry, q, k, v, (t >= 0) & (t >= start), dot, compute_dtype, swap, scale)
