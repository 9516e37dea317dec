"""Decode attention over a MosaicKIVICache: the Mosaic GPU kernel on the quantized tokens, a
Triton kernel (on a GPU; pallas_kernels/mosaic_window.py) or plain JAX on the newest ones.

Row b holds L tokens; values [0, m) are quantized (m = max(L - R, 0)), and so are their keys
(keys [0, n) with n = L - L % R >= m). The kernel (:func:`pallas_kernels.kivi_mosaic.bulk_partials`)
attends tokens [0, m) from the stores as they are. The window, tokens [m, L) (at most R), is
attended here, slot by slot: values from the ring (slot t % R), keys from the residual (t >= n)
or, for t in [m, n), scored from the last flushed block's codes (one key block's tile columns
and R rows of codes per row). The two partials are combined.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from kivi_jax import cache_common as cc
from kivi_jax.cache_mosaic import MosaicKIVICache
from pallas_kernels.kivi_mosaic import D, GROUP, KEY_BLOCK, code_bit, kernel_arrays, swizzle_key_rows
from pallas_kernels import kivi_mosaic, mosaic_window


# channel d = 64 o + 32 s + 8 k + 2 j + e sits in word 4 s + j at bit code_bit(o, k, e) (kivi_mosaic._pack)
_O, _S, _K, _J, _E = np.ix_(range(2), range(2), range(4), range(4), range(2))
_WORD = np.broadcast_to(4 * _S + _J, (2, 2, 4, 4, 2)).ravel()
_FIELD_SHIFT = np.broadcast_to(code_bit(_O, _K, _E), (2, 2, 4, 4, 2)).ravel()
_CHANNEL = np.broadcast_to(64 * _O + 32 * _S + 8 * _K + 2 * _J + _E, (2, 2, 4, 4, 2)).ravel()
# [8 words, 16 fields]: the channel each field of each word holds, and the field's bit
_BY_WORD = np.argsort(_WORD * 64 + _FIELD_SHIFT, kind="stable").reshape(D // 16, 16)
CHANNEL_OF_FIELD, SHIFT_OF_FIELD = _CHANNEL[_BY_WORD], _FIELD_SHIFT[_BY_WORD][0]


def flushed_scores(qg, cache: MosaicKIVICache):
    """qg [B, H, G, D] float32 -> [B, H, G, R]: scores of the last flushed block's R keys, token
    n - R + j at j, from their codes without dequantizing them: q · k = Σ_c code (q ∘ s) + q · m
    per 32-token group. Reads R rows of codes and R/32 columns of one key block's tile a row.

    The codes stay in their words: each of a word's 16 fields is shifted out and multiplied by
    the (q ∘ s) entry of its channel, reduced over [8 words, 16 fields], so XLA fuses the unpack
    into the reduction instead of writing the R x D codes out first. Within noise of that on the
    H200 (the reduction still takes 1.24-1.27 ms of a paper-setting step at 330 tokens, against
    1.40 + 0.57: results/decode-step-ab-2026-12-02-p330.md)."""
    r = cache.config.residual_length
    b, h, g = qg.shape[:3]
    n0 = jnp.maximum(cache.num_quantized_keys - r, 0)  # the block's first token (a multiple of R)
    words = swizzle_key_rows(cc.take_row(cache.kn, n0, r, 1))  # [B, H, R, 8] uint32 as _pack lays them out
    words = words.reshape(b, h, 1, r // GROUP, GROUP, D // 16, 1)
    tile = cc.take_row(cache.kt, (n0 // KEY_BLOCK) * D, D, 1)  # [B, H, D, 16]: s | m of 8 groups
    col = ((n0 % KEY_BLOCK) // GROUP)[:, None] + jnp.arange(r // GROUP)[None, :]  # [B, R/32]: the groups' columns
    s, m = (jnp.swapaxes(jnp.take_along_axis(tile, (col + off)[:, None, None, :], axis=3), 2, 3).astype(jnp.float32)
            for off in (0, 8))  # [B, H, R/32, D]
    qs = qg[:, :, :, None, :] * s[:, :, None]  # [B, H, G, R/32, D]
    const = jnp.sum(qg[:, :, :, None, :] * m[:, :, None], axis=-1)  # [B, H, G, R/32]
    qs = qs[..., CHANNEL_OF_FIELD][..., None, :, :]  # [B, H, G, R/32, 1, 8, 16]: by word and field
    codes = (words >> jnp.asarray(SHIFT_OF_FIELD, jnp.uint32)) & 3  # [B, H, 1, R/32, 32, 8, 16]
    scores = jnp.sum(codes.astype(jnp.float32) * qs, axis=(-2, -1)) + const[..., None]
    return scores.reshape(b, h, g, r)


def window_partials(qg, cache: MosaicKIVICache):
    """qg [B, Hkv, G, D] float32 (scaled) -> partials (o [B, Hkv, G, D], m, l [B, Hkv, G]) over
    tokens [m, L) of each row, slot by slot: slot j holds token t_j = m + (j - m) mod R, its
    value in v_res and its key in k_res (t_j >= n) or in the block flushed last (token n - R + j:
    n is a multiple of R). Products and sums over the R slots are elementwise reductions, not
    dots: a dot over the model's loop-carried v_res made XLA:GPU pick a slot-minor layout for it
    and copy it whole every layer (see attention_pallas._window_partials)."""
    r = cache.config.residual_length
    L, n, mq = cache.lengths[:, None], cache.num_quantized_keys[:, None], cache.num_quantized_values[:, None]
    t = mq + (jnp.arange(r)[None, :] - mq) % r  # [B, R]
    valid, in_res = (t < L)[:, None, None, :], (t >= n)[:, None, None, :]
    s_res = jnp.sum(qg[:, :, :, None, :] * cache.k_res[:, :, None].astype(jnp.float32), axis=-1)  # [B, H, G, R]
    s = jnp.where(valid, jnp.where(in_res, s_res, flushed_scores(qg, cache)), -jnp.inf)
    m = jnp.max(s, axis=-1)
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(s - m_safe[..., None])  # 0 on invalid slots
    o = jnp.sum(p[..., None] * cache.v_res[:, :, None].astype(jnp.float32), axis=3)
    return o, jnp.where(jnp.isfinite(m), m, -1e30), jnp.sum(p, axis=-1)


def window_kernel_partials(qg, cache: MosaicKIVICache, stack=None):
    """:func:`window_partials` in one Triton launch (:mod:`pallas_kernels.mosaic_window`; the
    flushed keys' scores from :func:`flushed_scores`). stack: as :func:`decode_attention`'s,
    the ring then read in place. Interpreted off the GPU."""
    ring, layer = (cache, None) if stack is None else stack
    return mosaic_window.window_partials(
        qg, ring.k_res, ring.v_res, flushed_scores(qg, cache), cache.lengths, cache.num_quantized_keys,
        cache.num_quantized_values, layer=layer, interpret=jax.default_backend() != "gpu")


WINDOW_IMPLS = {"jax": lambda qg, cache, stack: window_partials(qg, cache), "pallas": window_kernel_partials}
#: decode_attention's window when none is passed; read at trace time (benchmarks A/B it). None:
#: "pallas" on a GPU (0.9 ms less GPU time in a paper-setting step at 330 tokens, its ring read at
#: 3.3 TB/s: results/decode-step-ab-2026-12-02-run39/-run40), else "jax" (off the GPU the Triton
#: kernel would run interpreted)
DEFAULT_WINDOW_IMPL = None


def decode_attention(q, cache: MosaicKIVICache, *, stack=None, bulk=None, window_impl: str | None = None):
    """q [B, Hq, 1, D] -> [B, Hq, 1, D] in q's dtype. stack: None, or (stacked, i) when
    ``cache`` is layer i of ``stacked`` (leaves [L, B, Hkv, ...]): the kernel then reads the
    stores in place (a slice handed to a custom call is a copy). bulk: the partials over the
    quantized tokens, ``bulk(qrows [R, (G,) D], lengths [R], *arrays, row_offset=)`` (default:
    the Mosaic kernel, which needs a GPU; tests pass a plain-JAX one). window_impl: the newest
    tokens in plain JAX (:func:`window_partials`) or "pallas" (:func:`window_kernel_partials`);
    None: DEFAULT_WINDOW_IMPL."""
    window_impl = DEFAULT_WINDOW_IMPL if window_impl is None else window_impl
    if window_impl is None:
        window_impl = "pallas" if jax.default_backend() == "gpu" else "jax"
    if window_impl not in WINDOW_IMPLS:
        raise ValueError(f"window_impl={window_impl!r}; allowed: {tuple(WINDOW_IMPLS)}")
    b, hq, _, d = q.shape
    hkv = cache.num_kv_heads
    g = hq // hkv
    if g not in kivi_mosaic.HEADS:
        raise ValueError(f"the Mosaic kernel takes {kivi_mosaic.HEADS} query heads a KV head; got Hq={hq}, Hkv={hkv}")
    qg = q[:, :, 0].astype(jnp.float32).reshape(b, hkv, g, d) / math.sqrt(d)
    rows = qg.reshape(b * hkv, g, d) if g > 1 else qg.reshape(b * hkv, d)
    bulk = bulk or kivi_mosaic.bulk_partials
    if stack is None:
        arrays, offset = cache.kernel_arrays(), 0
    else:
        stacked, layer = stack
        arrays, offset = kernel_arrays(stacked.kn, stacked.kt, stacked.vn, stacked.vt), layer * b * hkv
    ob, mb, lb = (x.reshape(b, hkv, g, *x.shape[2 if g > 1 else 1:])
                  for x in bulk(rows, jnp.repeat(cache.num_quantized_values, hkv), *arrays, row_offset=offset))
    ow, mw, lw = WINDOW_IMPLS[window_impl](qg, cache, stack)
    top = jnp.maximum(mb, mw)
    wb, ww = jnp.exp(mb - top), jnp.exp(mw - top)
    den = lb * wb + lw * ww
    out = (ob * wb[..., None] + ow * ww[..., None]) / jnp.where(den > 0, den, 1.0)[..., None]
    return out.reshape(b, hq, 1, d).astype(q.dtype)
