"""The newest R tokens of a MosaicKIVICache in one Pallas (Triton) launch: the residual ring read
once, in place in a layer-stacked cache.

The Mosaic kernel (:mod:`pallas_kernels.kivi_mosaic`) attends the quantized tokens [0, m); this
attends the window [m, L) of each (row, KV head), at most R tokens: ring slot j holds token
t_j = m + (j - m) mod R (m = max(L - R, 0)), its value in ``v_res[j]`` and its key in
``k_res[j]`` (dequantized there when the key's block was already flushed:
:mod:`kivi_jax.cache_mosaic`), so the kernel reads k_res and v_res once, ``chunk`` slots a step
with an online softmax, as dense decode attention reads its cache. Measured before the ring
held the flushed keys: 1.92 ms of a paper-setting step at 330 tokens moving 6.4 GB (3.3 TB/s),
next to 2.8 ms for the plain-JAX window's two reductions, but the flushed keys' scores from
their codes in XLA cost 1.6 ms more (decode-step-ab-run39-p330, -run40-p330).

With ``sink_len`` = S the same program attends the S attention sinks, slots R .. R + S of the
same buffers (:func:`pallas_kernels.kivi_window.sink_step`, as the token layout's ring program
does), so no partial of theirs is computed in XLA and combined after (the glue's default keeps
those partials: :data:`kivi_jax.attention_mosaic.KERNEL_SINKS`).

Inputs: q [B, Hkv, G, D] float32 (the scores are (q·k)·``scale``), k_res, v_res [B, Hkv, R', D] (R' >= R + S; or
[L, B, Hkv, R', D] with ``layer``), lengths, num_quantized_values [B] int32 (the body's: tokens
past the sinks), starts [B] int32 (each row's first attended body token: a sliding window), and
with sinks (sink_lo, sink_hi) [B] int32 (sink t is attended where sink_lo <= t < sink_hi).
Outputs: o [B, Hkv, G, D] (unnormalized), m, l [B, Hkv, G].
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import kivi_window
from pallas_kernels.flash import NEG, clamp_layer, online_softmax_step, partials_call, query_rows, repeat_rows, store_partials


def _kernel(layer_ref, q_ref, kr_ref, vr_ref, *refs, r, chunk, compute_dtype, precision, stacked, combine, sliding,
            sink_len=0, scale=1.0):
    # refs: (o0, m0, l0: the other tokens' partials, with combine), lengths, num_quantized_values,
    # (starts, with sliding), (sink_lo, sink_hi, with sink_len), o, m, l
    (o0_ref, m0_ref, l0_ref), refs = (refs[:3], refs[3:]) if combine else ((None,) * 3, refs)
    (len_ref, nv_ref), refs = refs[:2], refs[2:]
    (start_ref,), refs = (refs[:1], refs[1:]) if sliding else ((None,), refs)
    (sink_lo_ref, sink_hi_ref), refs = (refs[:2], refs[2:]) if sink_len else ((None,) * 2, refs)
    o_ref, m_ref, l_ref = refs
    at = (clamp_layer(layer_ref[0], kr_ref.shape[0]), pl.program_id(0), pl.program_id(1)) if stacked else ()  # (flash.clamp_layer)
    q = query_rows(q_ref, compute_dtype)  # [M, D]: G rows repeated to 16
    m_rows, d = q.shape
    length, mq = len_ref[()], nv_ref[()]
    dot = functools.partial(jnp.dot, preferred_element_type=jnp.float32, precision=precision)
    if combine:  # the online softmax goes on from the other tokens' partials (rows as query_rows has them)
        carry = tuple(repeat_rows(ref[...], m_rows) for ref in (m0_ref, l0_ref, o0_ref))
    else:
        carry = (jnp.full((m_rows,), NEG, jnp.float32), jnp.zeros((m_rows,), jnp.float32),
                 jnp.zeros((m_rows, d), jnp.float32))
    for j0 in range(0, r, chunk):  # static: R / chunk steps
        slots = j0 + jnp.arange(chunk)
        t = mq + lax.rem(slots - lax.rem(mq, r) + r, r)  # the token in each slot (no floor-mod)
        k = kr_ref[at + (pl.ds(j0, chunk), slice(None))].astype(compute_dtype)  # [chunk, D]
        s = dot(q, k.T)
        v = vr_ref[at + (pl.ds(j0, chunk), slice(None))].astype(compute_dtype)
        # mask_p: a row shorter than R has empty slots (and a row with L = 0 only those)
        valid = (t < length) & (t >= start_ref[()]) if sliding else t < length
        carry = online_softmax_step(carry, s, valid, lambda p, v=v: dot(p, v), mask_p=True, scale=scale,
                                    p_dtype=compute_dtype)
    if sink_len:  # the S sinks, slots R .. R + S of the same buffers, 16 a step
        steps, first = kivi_window.sink_steps(sink_len)
        sink = functools.partial(kivi_window.sink_step, q=q, refs=(kr_ref, vr_ref), at=at, lo=sink_lo_ref[()],
                                 hi=sink_hi_ref[()], r=r, first=first, dot=dot, compute_dtype=compute_dtype, swap=False,
                                 scale=scale)
        carry = lax.fori_loop(0, steps, sink, carry)
    m_i, l_i, acc = carry
    if combine:  # the attention itself (a row with no token at all: zeros)
        acc = acc / jnp.where(l_i > 0, l_i, 1.0)[:, None]
    store_partials(o_ref, m_ref, l_ref, acc, m_i, l_i)


_STATIC = ("chunk", "interpret", "num_warps", "num_stages", "residual", "sink_len", "scale")


@functools.partial(jax.jit, static_argnames=_STATIC)
def window_partials(q, k_res, v_res, lengths, num_quantized_values, *, layer=None, starts=None, sinks=None,
                    chunk: int = 64, interpret: bool = False, num_warps: int = 4, num_stages: int = 2,
                    residual: int | None = None, sink_len: int = 0, scale: float = 1.0):
    """Flash-decoding partials of each (row, KV head) over its window (module doc). layer: None,
    or a traced int32 scalar when k_res and v_res are layer-stacked: that layer is read in place.
    starts: None, or [B] int32: tokens below a row's start are masked (a sliding window).
    residual: R, the ring's slots (default: all of k_res's but the sinks'). sink_len: S, the
    sinks in slots R .. R + S, attended too with ``sinks`` = (sink_lo, sink_hi) [B] int32 (0: slots
    past R are not read). 16-bit rings feed the dots in their dtype (float32 accumulation),
    float32 at HIGHEST. scale: the scores are (q·k)·scale (q unscaled with scale = 1/sqrt(D): a
    16-bit q is then exact in the dots, flash.online_softmax_step)."""
    return _call(q, k_res, v_res, lengths, num_quantized_values, None, layer, starts, chunk, interpret, num_warps,
                 num_stages, residual, sinks, sink_len, scale)


@functools.partial(jax.jit, static_argnames=_STATIC)
def window_attention(q, k_res, v_res, lengths, num_quantized_values, partials, *, layer=None, starts=None,
                     sinks=None, chunk: int = 64, interpret: bool = False, num_warps: int = 4, num_stages: int = 2,
                     residual: int | None = None, sink_len: int = 0, scale: float = 1.0):
    """The attention over all of a row's tokens [B, Hkv, G, D] float32: the window's, continuing
    the online softmax from ``partials`` = (o [B, Hkv, G, D], m, l [B, Hkv, G]) over the other
    tokens (the Mosaic kernel's), normalized in the kernel: no combine of the two partials in XLA
    afterwards (a fusion and a launch a layer). Arguments as :func:`window_partials`'s."""
    o, _, _ = _call(q, k_res, v_res, lengths, num_quantized_values, partials, layer, starts, chunk, interpret,
                    num_warps, num_stages, residual, sinks, sink_len, scale)
    return o


def _call(q, k_res, v_res, lengths, num_quantized_values, partials, layer, starts, chunk, interpret, num_warps,
          num_stages, residual=None, sinks=None, sink_len=0, scale=1.0):
    b, hkv, g, d = q.shape
    rs = k_res.shape[-2]
    r = residual or rs - sink_len
    lead = (b, hkv) if layer is None else (k_res.shape[0], b, hkv)
    if k_res.shape != v_res.shape or k_res.shape != lead + (rs, d) or not 0 < r <= rs - sink_len:
        raise ValueError(f"k_res and v_res must both be {'[L, ' if layer is not None else '['}B={b}, Hkv={hkv}, "
                         f"R' >= R + S = {r} + {sink_len}, D={d}]; got {k_res.shape} and {v_res.shape}")
    if starts is not None and starts.shape != (b,):
        raise ValueError(f"starts must be [B={b}]; got {starts.shape}")
    if sink_len < 0:
        raise ValueError(f"sink_len={sink_len} must be >= 0 (the sinks past the ring's R slots)")
    if (sinks is None) != (sink_len == 0):
        raise ValueError(f"sink_len={sink_len} and sinks={'None' if sinks is None else 'given'}: pass the sinks' "
                         "bounds (sink_lo, sink_hi) exactly when sink_len > 0")
    if sink_len and not kivi_window.sinks_supported(sink_len, r):
        raise ValueError(f"sink_len={sink_len} needs a ring of R={r} >= {-kivi_window.sink_steps(sink_len)[1]} "
                         f"slots (its first step of {kivi_window.SINK_STEP} reads the ring's last ones)")
    if sinks is not None and [x.shape for x in sinks] != [(b,), (b,)]:
        raise ValueError(f"sinks must be (sink_lo, sink_hi), each [B={b}]; got {[x.shape for x in sinks]}")
    if partials is not None and [x.shape for x in partials] != [(b, hkv, g, d), (b, hkv, g), (b, hkv, g)]:
        raise ValueError(f"partials must be o [B={b}, Hkv={hkv}, G={g}, D={d}], m and l [B, Hkv, G]; got "
                         f"{[x.shape for x in partials]}")
    chunk = min(chunk, r)
    if chunk < 16 or chunk & (chunk - 1) or r % chunk:
        raise ValueError(f"chunk={chunk} must be a power of two >= 16 dividing R={r}")
    precision = lax.Precision.HIGHEST if k_res.dtype == jnp.float32 else lax.Precision.DEFAULT
    kernel = functools.partial(_kernel, r=r, chunk=chunk, compute_dtype=k_res.dtype, precision=precision,
                               stacked=layer is not None, combine=partials is not None, sliding=starts is not None,
                               sink_len=sink_len, scale=float(scale))
    scalars = (lengths, num_quantized_values) + (() if starts is None else (starts,)) + tuple(sinks or ())
    o, m, l = partials_call(kernel, q.astype(jnp.float32), (k_res, v_res), scalars,
                            layer=layer, num_splits=1, interpret=interpret, num_warps=num_warps,
                            num_stages=num_stages, name="mosaic_window",
                            blocked=() if partials is None else tuple(x.astype(jnp.float32) for x in partials))
    return o[:, :, 0], m[:, :, 0], l[:, :, 0]
