"""The full-precision window of a KIVI cache inside the decode kernel: the R slots of the
residual ring, attended by the bulk kernel's (row, KV head) programs after the quantized bulk
(:mod:`pallas_kernels.kivi_decode`, ``ring_len=R``).

The ring holds the R newest tokens: their values in full precision in ``v_res``, their keys
in the same slots of ``k_res`` (full precision, or dequantized once flushed: the cache keeps
them so, see :class:`kivi_jax.KIVICache`). Softmax does not care about the order of its
tokens, so slot j is scored in place, like a dense cache's token: no gather, each slot read
once, ``chunk`` slots a step.

Ring slot j holds token t_j = Lb - R + (j - Lb) mod R of the row (negative: an empty slot).
Tokens below ``start`` (a sliding window's first token) are masked.

History: plain JAX (gather + select + two batched dots) took 7.5 of a 15.7 ms Llama-2-7B KIVI-2
step on the H200 at B=96 (decode-step-ab-2026-11-30-trace); a kernel of its own, 0.088 ms a
layer at its best (window-tuning-2026-11-30, the same as the dense kernel over the same bytes)
and 1.5 ms a step of bulk-kernel launches besides; fused here (781aff9), first with the flushed
keys dequantized in the ring's loop from the packed store, since the cache keeps them in k_res.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.flash import online_softmax_step


def ring_chunk(r: int, chunk: int) -> int:
    """Ring slots per step: the bulk kernel's chunk, or all R slots when R is smaller."""
    return min(chunk, r)


def supported(r: int, chunk: int) -> bool:
    """Whether the kernel takes this ring: R a power of two and its steps (:func:`ring_chunk`)
    at least 16 slots (a tensor-core dot)."""
    rc = ring_chunk(r, chunk)
    return not r & (r - 1) and rc >= 16 and r % rc == 0


def ring_valid(j0, chunk: int, r: int, start, lengths):
    """[chunk] bool: which of ring slots j0.. hold a token of the window: slot j holds token
    Lb - R + (j - Lb) mod R of a row of Lb = ``lengths`` body tokens (negative: empty), counted
    when >= ``start``."""
    t = lengths - r + lax.rem(j0 + jnp.arange(chunk) - lax.rem(lengths, r) + r, r)  # no floor-mod
    return (t >= 0) & (t >= start)


def ring_step(j0, carry, *, q, refs, at, lengths, start, r, chunk, dot, compute_dtype, swap):
    """One online-softmax step over ring slots [j0, j0 + chunk).

    q: [M, D] (or qᵀ [D, M] with ``swap``) in the compute dtype; refs: (k_res, v_res) refs
    indexed at ``at`` + (slots, D); carry (m [M], l [M], acc [M, D] or [D, M] with swap)
    float32. chunk: the ring's step (:func:`ring_chunk`)."""
    kr_ref, vr_ref = refs
    k = kr_ref[at + (pl.ds(j0, chunk), slice(None))].astype(compute_dtype)  # [chunk, D]
    v = vr_ref[at + (pl.ds(j0, chunk), slice(None))].astype(compute_dtype)  # [chunk, D]
    valid = ring_valid(j0, chunk, r, start, lengths)
    # mask_p: a short row's program may see only empty slots (its bulk loop visits no chunk)
    if swap:  # scoresᵀ [chunk, M]; (p·V)ᵀ = Vᵀ·pᵀ [D, M]
        return online_softmax_step(carry, dot(k, q), valid, lambda p: dot(v.T, p.astype(compute_dtype)),
                                   slots_axis=0, mask_p=True)
    return online_softmax_step(carry, dot(q, k.T), valid, lambda p: dot(p.astype(compute_dtype), v), mask_p=True)
